//! Background work of a running silo: the reconciler and the warm pool.
//! Every task watches one `CancellationToken` and lives in one `TaskTracker`,
//! so shutdown cancels them and waits for them to finish their current step.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::provision::Provisioner;

/// How long the warm pool waits for a spare to be taken before checking anyway.
const WARM_POOL_RECHECK: Duration = Duration::from_secs(30);
/// How long no spare must be taken before the warm pool refills.
const WARM_POOL_QUIET: Duration = Duration::from_millis(500);

/// Start the background tasks on `tracker`; they stop when `token` is cancelled.
pub fn spawn(
    provisioner: &Provisioner,
    reconcile_every: Duration,
    token: &CancellationToken,
    tracker: &TaskTracker,
) {
    let (p, t, tracker2) = (provisioner.clone(), token.clone(), tracker.clone());
    tracker.spawn(async move {
        let tracker = tracker2;
        loop {
            match p.reconcile_once().await {
                Ok(report) if report != Default::default() => tracing::info!(?report, "reconciled"),
                Ok(_) => {}
                Err(e) => tracing::warn!("failed to reconcile: {e:#}"),
            }
            // A fleet migration whose runner died is resumed here, by one replica.
            match p.take_over_fleet_migration().await {
                Ok(Some(run)) => {
                    let p = p.clone();
                    tracker.spawn(async move {
                        if let Err(e) = run.run(&p, |_, _| {}).await {
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
    let (p, t) = (provisioner.clone(), token.clone());
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
