//! Retention: which backups to keep. The newest `keep_last` always; beyond
//! them, the newest backup of each of the last `keep_daily` days,
//! `keep_weekly` ISO weeks and `keep_monthly` months that have one (the
//! grandfather-father-son scheme of restic and borg). Archive and final
//! backups are kept until the tenant is erased, and the newest succeeded
//! backup is never pruned whatever the policy says. Failed attempts are
//! forgotten after a week (their objects were removed when they failed).

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

/// Calendar bucket of a time: (year, day / ISO week / month).
type Bucket = fn(&DateTime<Utc>) -> (i32, u32);

/// How long a failed attempt stays listed.
const FAILED_KEPT: Duration = Duration::days(7);

/// The backups to prune, from `backups` (any order).
pub fn to_prune(backups: &[Backup], policy: Retention, now: DateTime<Utc>) -> Vec<Uuid> {
    let mut good: Vec<&Backup> = backups
        .iter()
        .filter(|b| b.status == "succeeded" && (b.kind == "manual" || b.kind == "scheduled"))
        .collect();
    good.sort_by_key(|b| std::cmp::Reverse(b.started_at));
    let mut keep: HashSet<Uuid> = HashSet::new();
    keep.extend(good.iter().take(policy.keep_last as usize).map(|b| b.id));
    // The newest succeeded backup of any kind is kept, whatever the policy.
    if let Some(newest) = backups
        .iter()
        .filter(|b| b.status == "succeeded")
        .max_by_key(|b| b.started_at)
    {
        keep.insert(newest.id);
    }
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
            "succeeded" => (b.kind == "manual" || b.kind == "scheduled") && !keep.contains(&b.id),
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
        let mut pruned = 0;
        for id in to_prune(&backups, storage.settings.retention, Utc::now()) {
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
