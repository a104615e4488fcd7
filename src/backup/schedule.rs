//! Scheduled backups. Every tick (driven by tokio-cron-scheduler, see
//! `jobs`), each replica works out the latest cron slot of every active
//! tenant (its own `backup_schedule`, else `SILO_BACKUP_SCHEDULE`) and
//! claims the slots nobody has run yet: a `running` row with
//! `scheduled_for = slot`, unique per tenant and slot among running and
//! succeeded attempts. So every slot runs once across replicas, a slot
//! missed while silo was down runs at the next tick, and a failed attempt
//! (or one whose replica died) is retried, up to [`MAX_ATTEMPTS`] times.
//!
//! Scheduled backups share the process's work slots with every other
//! backup-like work: a tick claims a slot before it claims a tenant's cron
//! slot, so what is due but not yet started stays unclaimed (another replica
//! with a free slot may take it) instead of piling up as queued rows.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rand::seq::SliceRandom;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{BackupKind, Backups};
use crate::domain::Schedule;
use crate::ops::{Error, Result};
use crate::registry::Schedulable;

/// Tenants with a backup-age series of their own on `/metrics`: the oldest.
const AGE_SERIES: i64 = 50;

/// Idle tenants the scheduler starts archiving per tick.
const ARCHIVE_PER_TICK: i64 = 10;

/// Attempts per tenant and slot before the scheduler gives up on that slot.
pub const MAX_ATTEMPTS: usize = 3;

/// Each tenant's latest slot: the last time its schedule fired, if the
/// tenant existed then (else its first slot is the next one). A tenant's
/// own schedule that no longer parses (stored by an older version with other
/// rules) falls back to `default`, so its backups never silently stop.
pub fn latest_slots(
    tenants: &[Schedulable],
    default: &Schedule,
    now: DateTime<Utc>,
) -> Vec<(Uuid, DateTime<Utc>)> {
    let default_slot = default.latest_slot(now);
    // Each distinct schedule parsed once per tick, not once per tenant.
    let mut slots: HashMap<&str, Option<DateTime<Utc>>> = HashMap::new();
    tenants
        .iter()
        .filter_map(|t| {
            let slot = match t.backup_schedule.as_deref() {
                None => default_slot,
                Some(expr) => *slots
                    .entry(expr)
                    .or_insert_with(|| match Schedule::parse(expr) {
                        Ok(s) => s.latest_slot(now),
                        Err(e) => {
                            tracing::warn!(schedule = expr, "a tenant's backup schedule is no longer valid, using the default: {e}");
                            default_slot
                        }
                    }),
            }?;
            (slot >= t.created_at).then_some((t.id, slot))
        })
        .collect()
}

/// The slots still to run: not run (nor running) yet, and not failed
/// [`MAX_ATTEMPTS`] times.
pub fn due(
    slots: &[(Uuid, DateTime<Utc>)],
    attempts: &[(Uuid, DateTime<Utc>, String)],
) -> Vec<(Uuid, DateTime<Utc>)> {
    let mut tried: HashMap<(Uuid, DateTime<Utc>), (bool, usize)> = HashMap::new();
    for (tenant, slot, status) in attempts {
        let e = tried.entry((*tenant, *slot)).or_default();
        // A pruned (`deleted`) backup ran its slot too.
        if matches!(
            status.as_str(),
            "queued" | "running" | "succeeded" | "deleted"
        ) {
            e.0 = true;
        } else if status == "failed" {
            e.1 += 1;
        }
    }
    slots
        .iter()
        .filter(|slot| match tried.get(slot) {
            Some((true, _)) => false,
            Some((false, failed)) => *failed < MAX_ATTEMPTS,
            None => true,
        })
        .copied()
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

impl Backups {
    /// Run every backup due now, in the process's work slots; stop claiming
    /// new ones when `cancel` fires. Skipped if a previous tick is still running.
    pub async fn run_due_backups(
        &self,
        guard: &TickGuard,
        cancel: &CancellationToken,
    ) -> Result<TickReport> {
        if guard.0.swap(true, Ordering::SeqCst) {
            return Ok(TickReport::default());
        }
        let result = self.run_due_backups_inner(cancel).await;
        guard.0.store(false, Ordering::SeqCst);
        result
    }

    async fn run_due_backups_inner(&self, cancel: &CancellationToken) -> Result<TickReport> {
        let storage = self.storage();
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
        let slots = latest_slots(&tenants, &storage.settings.schedule, now);
        // Attempts since the oldest slot in question.
        let Some(oldest) = slots.iter().map(|(_, slot)| *slot).min() else {
            return Ok(TickReport::default());
        };
        let attempts = reg.scheduled_attempts(oldest).await?;
        let mut due = due(&slots, &attempts);
        // Replicas start at different tenants instead of racing for the same.
        due.shuffle(&mut rand::thread_rng());
        let mut report = TickReport {
            due: due.len(),
            ..Default::default()
        };
        let mut running: JoinSet<Result<()>> = JoinSet::new();
        for (tenant, slot) in due {
            let work_slot = tokio::select! {
                _ = cancel.cancelled() => break,
                s = self.slots().acquire() => match s {
                    Ok(s) => s,
                    Err(_) => break, // shutting down
                },
            };
            while let Some(done) = running.try_join_next() {
                tally(&mut report, done);
            }
            let (b, lock) = match self
                .start_backup(tenant, BackupKind::Scheduled, Some(slot))
                .await
            {
                Ok(claimed) => claimed,
                Err(Error::Conflict(_) | Error::Busy { .. }) => {
                    report.skipped += 1;
                    continue;
                }
                Err(Error::NotFound(_)) => continue,
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
                let b = work_slot
                    .scope(async {
                        let b = p.run_backup(b, lock, None).await?;
                        if sample > 0.0 && rand::random::<f64>() < sample {
                            if let Err(e) = p.verify_backup(b.id, None).await {
                                tracing::warn!(backup_id = %b.id, "failed to verify a sampled backup: {e}");
                            }
                        }
                        Ok::<_, Error>(b)
                    })
                    .await?;
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
    pub async fn archive_idle(&self, cutoff: DateTime<Utc>) -> Result<usize> {
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
                Err(Error::Conflict(_) | Error::Busy { .. } | Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(started)
    }

    /// Backup ages for monitoring, small at any fleet size: the oldest
    /// last good backup (`silo_backup_oldest_success_age_seconds`), how many
    /// active tenants have none, and per tenant (by id, never by slug) only
    /// for the [`AGE_SERIES`] oldest (`silo_backup_last_success_age_seconds`).
    async fn record_backup_ages(&self, now: DateTime<Utc>) -> Result<()> {
        let (never, oldest) = self.registry().oldest_backups(AGE_SERIES).await?;
        let age = |at: DateTime<Utc>| (now - at).num_milliseconds() as f64 / 1000.0;
        metrics::gauge!("silo_backup_tenants_without_backup").set(never as f64);
        metrics::gauge!("silo_backup_oldest_success_age_seconds")
            .set(oldest.first().map_or(0.0, |(_, at)| age(*at)));
        for (tenant, at) in oldest {
            metrics::gauge!("silo_backup_last_success_age_seconds", "tenant_id" => tenant.to_string())
                .set(age(at));
        }
        Ok(())
    }
}

fn tally(report: &mut TickReport, done: Result<Result<()>, tokio::task::JoinError>) {
    match done {
        Ok(Ok(())) => report.succeeded += 1,
        _ => report.failed += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};

    fn tenant(created: DateTime<Utc>, schedule: Option<&str>) -> Schedulable {
        Schedulable {
            id: Uuid::now_v7(),
            slug: "t".into(),
            backup_schedule: schedule.map(str::to_owned),
            created_at: created,
        }
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
        // A stored schedule from an older version that fires too rarely: the default applies.
        let f = tenant(old, Some("0 0 3 1 * *"));
        let e = tenant(old, None);
        let attempts = vec![
            (a.id, slot, "succeeded".to_owned()),
            (b.id, slot, "failed".to_owned()),
            (e.id, slot, "failed".to_owned()),
            (e.id, slot, "failed".to_owned()),
            (e.id, slot, "failed".to_owned()),
        ];
        let tenants = [
            a.clone(),
            b.clone(),
            c.clone(),
            d.clone(),
            e.clone(),
            f.clone(),
        ];
        let slots = latest_slots(&tenants, &Schedule::parse("0 0 2 * * *").unwrap(), now);
        let due = due(&slots, &attempts);
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
        assert!(
            due.contains(&(f.id, slot)),
            "an invalid own schedule: the default's slot"
        );
    }
}
