//! Scheduled backups. Every tick (driven by tokio-cron-scheduler, see
//! `jobs`), each replica works out the latest cron slot of every active
//! tenant (its own `backup_schedule`, else `SILO_BACKUP_SCHEDULE`) and
//! claims the slots nobody has run yet: a `running` row with
//! `scheduled_for = slot`, unique per tenant and slot among running and
//! succeeded attempts. So every slot runs once across replicas, a slot
//! missed while silo was down runs at the next tick, and a failed attempt
//! (or one whose replica died) is retried, up to [`MAX_ATTEMPTS`] times.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use croner::Cron;
use rand::seq::SliceRandom;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{BackupError, BackupKind};
use crate::provision::Provisioner;
use crate::registry::Schedulable;

/// Idle tenants the scheduler starts archiving per tick.
const ARCHIVE_PER_TICK: i64 = 10;

/// Attempts per tenant and slot before the scheduler gives up on that slot.
pub const MAX_ATTEMPTS: usize = 3;

/// Parse a backup cron expression (seconds optional).
pub fn parse(expr: &str) -> Option<Cron> {
    Cron::new(expr).with_seconds_optional().parse().ok()
}

/// The latest time `cron` fires at or before `now`, within the last year.
pub fn latest_slot(cron: &Cron, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    for lookback in [
        Duration::hours(1),
        Duration::days(1),
        Duration::days(32),
        Duration::days(367),
    ] {
        let mut last = None;
        for t in cron.iter_after(now - lookback) {
            if t > now {
                break;
            }
            last = Some(t);
        }
        if last.is_some() {
            return last;
        }
    }
    None
}

/// Tenants whose latest slot is still to run: (tenant, slot).
pub fn due(
    tenants: &[Schedulable],
    default: &str,
    attempts: &[(Uuid, DateTime<Utc>, String)],
    now: DateTime<Utc>,
) -> Vec<(Uuid, DateTime<Utc>)> {
    let mut slots: HashMap<&str, Option<DateTime<Utc>>> = HashMap::new();
    let mut tried: HashMap<(Uuid, DateTime<Utc>), (bool, usize)> = HashMap::new();
    for (tenant, slot, status) in attempts {
        let e = tried.entry((*tenant, *slot)).or_default();
        // A pruned (`deleted`) backup ran its slot too.
        if status == "running" || status == "succeeded" || status == "deleted" {
            e.0 = true;
        } else if status == "failed" {
            e.1 += 1;
        }
    }
    tenants
        .iter()
        .filter_map(|t| {
            let expr = t.backup_schedule.as_deref().unwrap_or(default);
            let slot = *slots
                .entry(expr)
                .or_insert_with(|| parse(expr).and_then(|c| latest_slot(&c, now)));
            let slot = slot?;
            if slot < t.created_at {
                return None; // the tenant did not exist yet: its first slot is the next one
            }
            match tried.get(&(t.id, slot)) {
                Some((true, _)) => None,
                Some((false, failed)) if *failed >= MAX_ATTEMPTS => None,
                _ => Some((t.id, slot)),
            }
        })
        .collect()
}

/// What one scheduler tick did.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct TickReport {
    pub due: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// Slots another replica claimed first.
    pub skipped: usize,
}

/// Keeps ticks of one process from overlapping.
#[derive(Debug, Default, Clone)]
pub struct TickGuard(Arc<AtomicBool>);

impl Provisioner {
    /// Run every backup due now, `concurrency` at a time; stop claiming new
    /// ones when `cancel` fires. Skipped if a previous tick is still running.
    pub async fn run_due_backups(
        &self,
        guard: &TickGuard,
        cancel: &CancellationToken,
    ) -> Result<TickReport, BackupError> {
        if guard.0.swap(true, Ordering::SeqCst) {
            return Ok(TickReport::default());
        }
        let result = self.run_due_backups_inner(cancel).await;
        guard.0.store(false, Ordering::SeqCst);
        result
    }

    async fn run_due_backups_inner(
        &self,
        cancel: &CancellationToken,
    ) -> Result<TickReport, BackupError> {
        let storage = self.storage_or_err()?;
        let reg = self.registry();
        let now = Utc::now();
        self.record_backup_ages(now).await?;
        if let Some(after) = storage.settings.archive_after {
            // Archival trouble must not hold back the backups.
            if let Err(e) = self.archive_idle(now - after).await {
                tracing::warn!("failed to start archiving idle tenants: {e}");
            }
        }
        let tenants = reg.schedulable_tenants().await?;
        let default = storage.settings.schedule.clone();
        // Attempts since the oldest slot in question.
        // Each distinct schedule once, not once per tenant.
        let schedules: std::collections::HashSet<&str> = tenants
            .iter()
            .map(|t| t.backup_schedule.as_deref().unwrap_or(&default))
            .collect();
        let oldest = schedules
            .into_iter()
            .filter_map(|expr| parse(expr).and_then(|c| latest_slot(&c, now)))
            .min();
        let Some(oldest) = oldest else {
            return Ok(TickReport::default());
        };
        let attempts = reg.scheduled_attempts(oldest).await?;
        let mut due = due(&tenants, &default, &attempts, now);
        // Replicas start at different tenants instead of racing for the same.
        due.shuffle(&mut rand::thread_rng());
        let mut report = TickReport {
            due: due.len(),
            ..Default::default()
        };
        let permits = Arc::new(Semaphore::new(storage.settings.concurrency));
        let mut running: JoinSet<Result<(), BackupError>> = JoinSet::new();
        for (tenant, slot) in due {
            let permit = tokio::select! {
                _ = cancel.cancelled() => break,
                p = permits.clone().acquire_owned() => p.expect("semaphore open"),
            };
            while let Some(done) = running.try_join_next() {
                tally(&mut report, done);
            }
            let (b, lock) = match self
                .start_backup(tenant, BackupKind::Scheduled, Some(slot))
                .await
            {
                Ok(claimed) => claimed,
                Err(
                    BackupError::Conflict(_) | BackupError::Running(_) | BackupError::KeyErased,
                ) => {
                    report.skipped += 1;
                    continue;
                }
                Err(BackupError::NotFound(_)) => continue,
                Err(e) => {
                    // One tenant's trouble does not stop the others.
                    tracing::warn!(tenant_id = %tenant, "failed to start a scheduled backup: {e}");
                    report.failed += 1;
                    continue;
                }
            };
            let p = self.clone();
            let sample = storage.settings.verify_sample;
            running.spawn(async move {
                let _permit = permit;
                let b = p.run_backup(b, lock, None).await?;
                if sample > 0.0 && rand::random::<f64>() < sample {
                    if let Err(e) = p.verify_backup(b.id, None).await {
                        tracing::warn!(backup_id = %b.id, "failed to verify a sampled backup: {e}");
                    }
                }
                if let Err(e) = p.prune_backups(b.tenant_id).await {
                    tracing::warn!(tenant_id = %b.tenant_id, "failed to apply backup retention: {e}");
                }
                Ok(())
            });
        }
        while let Some(done) = running.join_next().await {
            tally(&mut report, done);
        }
        Ok(report)
    }

    /// Start archiving tenants idle since before `cutoff`, a few per tick. A
    /// tenant another replica started on already is skipped (its state moved).
    pub async fn archive_idle(&self, cutoff: DateTime<Utc>) -> Result<usize, BackupError> {
        let mut started = 0;
        for id in self
            .registry()
            .idle_tenants(cutoff, ARCHIVE_PER_TICK)
            .await?
        {
            match self.start_archive(id, "scheduler").await {
                Ok(op) => {
                    tracing::info!(tenant_id = %id, operation_id = %op.id, "archiving an idle tenant");
                    started += 1;
                }
                Err(
                    BackupError::Conflict(_) | BackupError::NotFound(_) | BackupError::KeyErased,
                ) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(started)
    }

    /// `silo_backup_last_success_age_seconds{tenant}` for every active tenant.
    async fn record_backup_ages(&self, now: DateTime<Utc>) -> Result<(), BackupError> {
        let mut never = 0u64;
        for (slug, last) in self.registry().last_backups().await? {
            match last {
                Some(at) => {
                    metrics::gauge!("silo_backup_last_success_age_seconds", "tenant" => slug)
                        .set((now - at).num_milliseconds() as f64 / 1000.0)
                }
                None => never += 1,
            }
        }
        metrics::gauge!("silo_backup_tenants_without_backup").set(never as f64);
        Ok(())
    }
}

fn tally(report: &mut TickReport, done: Result<Result<(), BackupError>, tokio::task::JoinError>) {
    match done {
        Ok(Ok(())) => report.succeeded += 1,
        _ => report.failed += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn tenant(created: DateTime<Utc>, schedule: Option<&str>) -> Schedulable {
        Schedulable {
            id: Uuid::now_v7(),
            slug: "t".into(),
            backup_schedule: schedule.map(str::to_owned),
            created_at: created,
        }
    }

    #[test]
    fn the_latest_slot_is_the_last_fire_time_not_after_now() {
        let now = Utc.with_ymd_and_hms(2026, 11, 25, 5, 30, 7).unwrap();
        let daily = parse("0 0 2 * * *").unwrap();
        assert_eq!(
            latest_slot(&daily, now),
            Some(Utc.with_ymd_and_hms(2026, 11, 25, 2, 0, 0).unwrap())
        );
        let at_two = Utc.with_ymd_and_hms(2026, 11, 25, 2, 0, 0).unwrap();
        assert_eq!(latest_slot(&daily, at_two), Some(at_two));
        let every5s = parse("*/5 * * * * *").unwrap();
        assert_eq!(
            latest_slot(&every5s, now),
            Some(Utc.with_ymd_and_hms(2026, 11, 25, 5, 30, 5).unwrap())
        );
        let monthly = parse("0 0 3 1 * *").unwrap();
        assert_eq!(
            latest_slot(&monthly, now),
            Some(Utc.with_ymd_and_hms(2026, 11, 1, 3, 0, 0).unwrap())
        );
    }

    #[test]
    fn a_slot_runs_once_is_retried_after_failures_and_skips_tenants_created_after_it() {
        let now = Utc.with_ymd_and_hms(2026, 11, 25, 5, 0, 0).unwrap();
        let slot = Utc.with_ymd_and_hms(2026, 11, 25, 2, 0, 0).unwrap();
        let old = now - Duration::days(3);
        let (a, b, c, d) = (
            tenant(old, None),
            tenant(old, None),
            tenant(now - Duration::hours(1), None),
            tenant(old, Some("0 30 4 * * *")),
        );
        let e = tenant(old, None);
        let attempts = vec![
            (a.id, slot, "succeeded".to_owned()),
            (b.id, slot, "failed".to_owned()),
            (e.id, slot, "failed".to_owned()),
            (e.id, slot, "failed".to_owned()),
            (e.id, slot, "failed".to_owned()),
        ];
        let due = due(
            &[a.clone(), b.clone(), c.clone(), d.clone(), e.clone()],
            "0 0 2 * * *",
            &attempts,
            now,
        );
        assert!(!due.iter().any(|(t, _)| *t == a.id), "done already");
        assert!(due.contains(&(b.id, slot)), "one failure: retried");
        assert!(
            !due.iter().any(|(t, _)| *t == c.id),
            "created after the slot"
        );
        let own = Utc.with_ymd_and_hms(2026, 11, 25, 4, 30, 0).unwrap();
        assert!(due.contains(&(d.id, own)), "its own schedule");
        assert!(
            !due.iter().any(|(t, _)| *t == e.id),
            "gave up after {MAX_ATTEMPTS}"
        );
    }
}
