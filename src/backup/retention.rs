//! Retention: which backups to keep. The newest `keep_last` always; beyond
//! them, the newest backup of each of the last `keep_daily` days,
//! `keep_weekly` ISO weeks and `keep_monthly` months that have one (the
//! grandfather-father-son scheme of restic and borg). Archive and final
//! backups are kept until the tenant is erased.
//!
//! What a verification found counts: a backup whose verification failed
//! fills no slot of the policy (it is kept a week for inspection, like a
//! failed attempt, then pruned), and two backups are kept whatever the
//! policy says: the newest verified one (restored and checked), and the
//! newest that may still be good (succeeded, not failed verification).
//! So a run of bad backups never pushes out the last one known to restore.
//! Failed attempts are forgotten after a week (their objects were removed
//! when they failed).

use std::collections::HashSet;

use chrono::{DateTime, Datelike, Duration, Utc};
use uuid::Uuid;

use super::Backups;
use crate::ops::Result;
use crate::registry::Backup;

/// How many backups to keep (see the module comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub keep_last: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
}

impl Retention {
    /// This policy with the counts a plan sets (keep last, daily, weekly,
    /// monthly; `None` keeps silo's).
    pub fn with_plan(self, plan: [Option<i32>; 4]) -> Self {
        let or = |v: Option<i32>, d: u32| v.map_or(d, |v| v.max(0) as u32);
        Self {
            keep_last: or(plan[0], self.keep_last),
            keep_daily: or(plan[1], self.keep_daily),
            keep_weekly: or(plan[2], self.keep_weekly),
            keep_monthly: or(plan[3], self.keep_monthly),
        }
    }
}

/// Calendar bucket of a time: (year, day / ISO week / month).
type Bucket = fn(&DateTime<Utc>) -> (i32, u32);

/// How long a failed attempt (or a backup that failed verification) stays.
const FAILED_KEPT: Duration = Duration::days(7);

fn succeeded(b: &Backup) -> bool {
    b.status == "succeeded"
}

/// Restored into a scratch database and found to match its record.
fn verified(b: &Backup) -> bool {
    succeeded(b) && b.verified_at.is_some() && b.verify_error.is_none()
}

/// A verification found it does not restore as recorded.
fn failed_verification(b: &Backup) -> bool {
    succeeded(b) && b.verify_error.is_some()
}

/// Taken by hand or by the schedule: the kinds the policy prunes.
fn routine(b: &Backup) -> bool {
    b.kind == "manual" || b.kind == "scheduled"
}

/// The backups to prune, from `backups` (any order).
pub fn to_prune(backups: &[Backup], policy: Retention, now: DateTime<Utc>) -> Vec<Uuid> {
    let newest = |pick: fn(&Backup) -> bool| {
        backups
            .iter()
            .filter(|b| pick(b))
            .max_by_key(|b| b.started_at)
            .map(|b| b.id)
    };
    let mut good: Vec<&Backup> = backups
        .iter()
        .filter(|b| succeeded(b) && routine(b) && !failed_verification(b))
        .collect();
    good.sort_by_key(|b| std::cmp::Reverse(b.started_at));
    let mut keep: HashSet<Uuid> = HashSet::new();
    keep.extend(good.iter().take(policy.keep_last as usize).map(|b| b.id));
    // Whatever the policy: the newest verified backup, and the newest that
    // may be good (else, when every one failed verification, the newest).
    keep.extend(newest(verified));
    keep.extend(newest(|b| succeeded(b) && !failed_verification(b)).or_else(|| newest(succeeded)));
    let buckets: [(u32, Bucket); 3] = [
        (policy.keep_daily, |t| (t.year(), t.ordinal())),
        (policy.keep_weekly, |t| {
            let w = t.iso_week();
            (w.year(), w.week())
        }),
        (policy.keep_monthly, |t| (t.year(), t.month())),
    ];
    for (count, bucket) in buckets {
        let mut seen = HashSet::new();
        for b in &good {
            if seen.len() >= count as usize {
                break;
            }
            if seen.insert(bucket(&b.started_at)) {
                keep.insert(b.id);
            }
        }
    }
    backups
        .iter()
        .filter(|b| match b.status.as_str() {
            "succeeded" if !routine(b) || keep.contains(&b.id) => false,
            "succeeded" if failed_verification(b) => now - b.started_at > FAILED_KEPT,
            "succeeded" => true,
            "failed" => now - b.started_at > FAILED_KEPT,
            _ => false,
        })
        .map(|b| b.id)
        .collect()
}

impl Backups {
    /// Apply the retention policy to one tenant: delete the pruned backups'
    /// objects (manifest first), then mark their rows deleted.
    pub async fn prune_backups(&self, tenant: Uuid) -> Result<u32> {
        let storage = self.storage();
        let reg = self.registry();
        let backups = reg.live_backups_of(tenant).await?;
        let policy = match reg.plan_retention(tenant).await? {
            Some(plan) => storage.settings.retention.with_plan(plan),
            None => storage.settings.retention,
        };
        let mut pruned = 0;
        for id in to_prune(&backups, policy, Utc::now()) {
            let b = backups
                .iter()
                .find(|b| b.id == id)
                .expect("pruned from this list");
            storage.store.delete(&b.manifest_key).await?;
            storage.store.delete(&b.object_key).await?;
            reg.mark_backup_deleted(id).await?;
            pruned += 1;
        }
        if pruned > 0 {
            metrics::counter!("silo_backups_pruned_total").increment(pruned as u64);
        }
        Ok(pruned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup(days_ago: i64, hours: i64, status: &str, kind: &str, now: DateTime<Utc>) -> Backup {
        Backup {
            id: Uuid::now_v7(),
            tenant_id: Uuid::nil(),
            kind: kind.into(),
            status: status.into(),
            bucket: "b".into(),
            object_key: "k".into(),
            manifest_key: "m".into(),
            upload_id: None,
            storage_class: None,
            part_size: None,
            parts: None,
            size_bytes: None,
            sha256: None,
            key_id: None,
            server_version: None,
            pg_dump_version: None,
            schema_version: None,
            row_counts: None,
            error: None,
            scheduled_for: None,
            started_at: now - Duration::days(days_ago) - Duration::hours(hours),
            finished_at: None,
            verified_at: None,
            verify_error: None,
            runner: None,
        }
    }

    /// A backup `days` ago whose verification passed (`Some(true)`),
    /// failed (`Some(false)`) or never ran (`None`).
    fn checked(days: i64, verify: Option<bool>, now: DateTime<Utc>) -> Backup {
        let mut b = backup(days, 0, "succeeded", "scheduled", now);
        if let Some(ok) = verify {
            b.verified_at = Some(b.started_at + Duration::hours(1));
            b.verify_error = (!ok).then(|| "public.patients: expected 10, restored 9".into());
        }
        b
    }

    #[test]
    fn the_newest_verified_backup_survives_any_policy_and_failed_verifications_fill_no_slot() {
        let now = Utc::now();
        let keep_one = Retention {
            keep_last: 1,
            keep_daily: 0,
            keep_weekly: 0,
            keep_monthly: 0,
        };
        let keep_none = Retention {
            keep_last: 0,
            ..keep_one
        };
        const V: Option<bool> = Some(true);
        const F: Option<bool> = Some(false);
        const U: Option<bool> = None;
        /// What a case is, its policy, its backups newest first as (days
        /// ago, verification), and which of them survive.
        type Case = (
            &'static str,
            Retention,
            Vec<(i64, Option<bool>)>,
            Vec<usize>,
        );
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            ("newer unverified ones do not push out the newest verified",
                keep_one, vec![(1, U), (2, U), (3, V), (4, V)], vec![0, 2]),
            ("a failed verification fills no slot of the policy",
                keep_one, vec![(1, F), (2, U), (3, U)], vec![0, 1]),
            ("a failed verification goes after a week",
                keep_one, vec![(1, U), (9, F), (10, V)], vec![0, 2]),
            ("nothing verified: the newest that may be good",
                keep_none, vec![(1, F), (2, U), (3, U)], vec![0, 1]),
            ("every one failed verification: the newest is kept anyway",
                keep_none, vec![(8, F), (9, F)], vec![0]),
            ("the newest verified is also the newest",
                keep_none, vec![(1, V), (2, V), (3, U)], vec![0]),
            ("an old verified backup survives a full policy of newer ones",
                keep_one, vec![(1, U), (2, U), (3, U), (60, V)], vec![0, 3]),
        ];
        let mut failures = Vec::new();
        for (what, policy, specs, want) in cases {
            let all: Vec<Backup> = specs.iter().map(|(d, v)| checked(*d, *v, now)).collect();
            let pruned = to_prune(&all, policy, now);
            let kept: Vec<usize> = (0..all.len())
                .filter(|i| !pruned.contains(&all[*i].id))
                .collect();
            if kept != want {
                failures.push(format!("{what}: kept {kept:?}, want {want:?}"));
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }

    const POLICY: Retention = Retention {
        keep_last: 3,
        keep_daily: 5,
        keep_weekly: 3,
        keep_monthly: 2,
    };

    #[test]
    fn keeps_the_last_n_then_one_per_day_week_and_month() {
        let now = Utc::now();
        // Four backups a day for 120 days.
        let all: Vec<Backup> = (0..120)
            .flat_map(|d| (0..4).map(move |h| (d, h * 6)))
            .map(|(d, h)| backup(d, h, "succeeded", "scheduled", now))
            .collect();
        let pruned: HashSet<Uuid> = to_prune(&all, POLICY, now).into_iter().collect();
        let kept: Vec<&Backup> = all.iter().filter(|b| !pruned.contains(&b.id)).collect();
        // At most last + daily + weekly + monthly, at least the last 3 and 5 days.
        assert!(kept.len() <= 3 + 5 + 3 + 2, "kept {}", kept.len());
        assert!(kept.len() >= 3 + 4, "kept {}", kept.len());
        let newest = all.iter().max_by_key(|b| b.started_at).unwrap();
        assert!(!pruned.contains(&newest.id));
        // Something from an earlier month survives (monthly).
        let month = |t: &DateTime<Utc>| (t.year(), t.month());
        assert!(kept.iter().any(|b| month(&b.started_at) != month(&now)));
        // Pruning again prunes nothing more.
        assert!(to_prune(&kept.into_iter().cloned().collect::<Vec<_>>(), POLICY, now).is_empty());
    }

    #[test]
    fn never_prunes_the_last_good_backup_archives_or_recent_failures() {
        let now = Utc::now();
        let zero = Retention {
            keep_last: 0,
            keep_daily: 0,
            keep_weekly: 0,
            keep_monthly: 0,
        };
        let good = backup(40, 0, "succeeded", "scheduled", now);
        let failed_new = backup(0, 1, "failed", "scheduled", now);
        let failed_old = backup(30, 0, "failed", "scheduled", now);
        let archive = backup(90, 0, "succeeded", "archive", now);
        let older_good = backup(50, 0, "succeeded", "manual", now);
        let all = vec![
            good.clone(),
            failed_new.clone(),
            failed_old.clone(),
            archive.clone(),
            older_good.clone(),
        ];
        let pruned = to_prune(&all, zero, now);
        assert!(pruned.contains(&failed_old.id));
        assert!(pruned.contains(&older_good.id));
        assert!(!pruned.contains(&good.id), "the newest good backup stays");
        assert!(!pruned.contains(&failed_new.id));
        assert!(!pruned.contains(&archive.id));
    }
}
