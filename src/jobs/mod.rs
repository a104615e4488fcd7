//! Background work of a running silo: the reconciler, the warm pool, tenant
//! server health checks, the usage collector and the backup scheduler. Every task watches one `CancellationToken` and lives in
//! one `TaskTracker`, so shutdown cancels them and waits for them to finish
//! their current step.
//!
//! The backup scheduler's clock is tokio-cron-scheduler: a repeated job that
//! only signals a tick; the tick's work (claiming due slots, running backups,
//! retention) runs in a task of ours, so shutdown joins it. Whether a slot
//! runs on this replica or another is decided in the control DB (see
//! `backup::schedule`), not by the clock.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::control::ControlPlane;

/// How long the warm pool waits for a spare to be taken before checking anyway.
const WARM_POOL_RECHECK: Duration = Duration::from_secs(30);
/// How long no spare must be taken before the warm pool refills.
const WARM_POOL_QUIET: Duration = Duration::from_millis(500);

/// Start the background tasks on `tracker`; they stop when `token` is cancelled.
pub fn spawn(
    control: &ControlPlane,
    reconcile_every: Duration,
    scheduler_tick: Duration,
    health_interval: Duration,
    usage: crate::usage::UsageSettings,
    token: &CancellationToken,
    tracker: &TaskTracker,
) {
    spawn_health_checks(control, health_interval, token, tracker);
    spawn_usage_collector(control, usage, token, tracker);
    let (p, t, tracker2) = (control.clone(), token.clone(), tracker.clone());
    tracker.spawn(async move {
        let tracker = tracker2;
        loop {
            match p.reconcile_once().await {
                Ok(report) if report != Default::default() => tracing::info!(?report, "reconciled"),
                Ok(_) => {}
                Err(e) => tracing::warn!("failed to reconcile: {e:#}"),
            }
            // A fleet migration whose runner died is resumed here, by one replica.
            match p.fleet().take_over().await {
                Ok(Some(run)) => {
                    let p = p.clone();
                    tracker.spawn(async move {
                        if let Err(e) = p.run_fleet(run, |_, _| {}).await {
                            tracing::warn!("failed to resume a fleet migration: {e:#}");
                        }
                    });
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("failed to check for an abandoned fleet migration: {e}"),
            }
            tokio::select! {
                _ = t.cancelled() => break,
                _ = tokio::time::sleep(reconcile_every) => {}
            }
        }
    });
    if let Ok(backups) = control.backups() {
        spawn_backup_scheduler(backups, scheduler_tick, token, tracker);
    }
    spawn_trial_expiry(control, scheduler_tick, token, tracker);
    let (p, t) = (control.provisioner().clone(), token.clone());
    tracker.spawn(async move {
        loop {
            // Small batches, checking for shutdown and for creates in between.
            loop {
                match p.refill(crate::provision::REFILL_BATCH).await {
                    Ok(0) => break,
                    Ok(_) if t.is_cancelled() => break,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!("failed to refill the warm pool: {e:#}");
                        break;
                    }
                }
            }
            tokio::select! {
                _ = t.cancelled() => break,
                _ = p.spare_taken(WARM_POOL_RECHECK) => {}
            }
            // Refill when creates pause: cloning competes with them for the disk.
            while !t.is_cancelled() && p.spare_taken(WARM_POOL_QUIET).await {}
        }
    });
}

/// Check every tenant server every `interval` until `token` is cancelled. A
/// server failing checks for three intervals becomes `unhealthy`.
fn spawn_health_checks(
    control: &ControlPlane,
    interval: Duration,
    token: &CancellationToken,
    tracker: &TaskTracker,
) {
    let (p, t) = (control.clone(), token.clone());
    tracker.spawn(async move {
        let unhealthy_after = interval * 3;
        loop {
            tokio::select! {
                _ = t.cancelled() => break,
                checked = p.check_servers(unhealthy_after) => if let Err(e) = checked {
                    tracing::warn!("failed to check tenant servers: {e:#}");
                },
            }
            tokio::select! {
                _ = t.cancelled() => break,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    });
}

/// Every `tick`, suspend the tenants whose trial ended. Every replica looks;
/// one statement per tenant decides which replica suspends it (see
/// `Provisioner::expire`), so each expiry is done and audited once.
fn spawn_trial_expiry(
    control: &ControlPlane,
    tick: Duration,
    token: &CancellationToken,
    tracker: &TaskTracker,
) {
    let (p, t) = (control.provisioner().clone(), token.clone());
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = t.cancelled() => break,
                _ = tokio::time::sleep(tick) => {}
            }
            match p.expire_due(crate::domain::SCHEDULER_ACTOR).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(tenants = n, "suspended tenants whose trial ended"),
                Err(e) => tracing::warn!("failed to expire trials: {e:#}"),
            }
        }
    });
}

/// Tick the backup scheduler every `tick` until `token` is cancelled.
fn spawn_backup_scheduler(
    backups: &crate::backup::Backups,
    tick: Duration,
    token: &CancellationToken,
    tracker: &TaskTracker,
) {
    let (p, t) = (backups.clone(), token.clone());
    tracker.spawn(async move {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let clock = async {
            let sched = tokio_cron_scheduler::JobScheduler::new().await?;
            let job = tokio_cron_scheduler::Job::new_repeated_async(tick, move |_, _| {
                let tx = tx.clone();
                Box::pin(async move {
                    // A tick still running absorbs the next one.
                    let _ = tx.try_send(());
                })
            })?;
            sched.add(job).await?;
            sched.start().await?;
            Ok::<_, tokio_cron_scheduler::JobSchedulerError>(sched)
        }
        .await;
        let mut sched = match clock {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("failed to start the backup scheduler: {e}");
                return;
            }
        };
        let guard = crate::backup::schedule::TickGuard::default();
        loop {
            tokio::select! {
                _ = t.cancelled() => break,
                ticked = rx.recv() => if ticked.is_none() { break },
            }
            match p.run_due_backups(&guard, &t).await {
                Ok(r) if r.due > 0 => tracing::info!(?r, "scheduled backups ran"),
                Ok(_) => {}
                Err(e) => tracing::warn!("failed to run scheduled backups: {e}"),
            }
        }
        sched.shutdown().await.ok();
    });
}

/// Offer a usage pass every interval until `token` is cancelled; the
/// control DB decides which replica runs it (see `usage`).
fn spawn_usage_collector(
    control: &ControlPlane,
    settings: crate::usage::UsageSettings,
    token: &CancellationToken,
    tracker: &TaskTracker,
) {
    let (usage, t) = (control.usage().clone(), token.clone());
    tracker.spawn(async move {
        loop {
            // A first pass one interval after start (not in the middle of
            // a start-up), then one per interval across the replicas.
            tokio::select! {
                _ = t.cancelled() => break,
                _ = tokio::time::sleep(settings.interval) => {}
            }
            tokio::select! {
                _ = t.cancelled() => break,
                ran = usage.run(&settings, false) => match ran {
                    Ok(Some(r)) if !r.went_read_only.is_empty() || !r.went_writable.is_empty() || r.errors > 0 => {
                        tracing::info!(?r, "usage pass")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("failed to run a usage pass: {e:#}"),
                },
            }
        }
    });
}
