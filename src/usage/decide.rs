//! What a pass does, decided from what it read: a pure function, so every
//! case (a statistics reset, a move, a crash between the privilege change
//! and its record) has a table test.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::registry::{UsageSample, UsageTarget};

/// One tenant database as its server's statistics showed it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Reading {
    pub tenant: Uuid,
    pub datid: i64,
    /// `None`: silo's login may not read its size.
    pub size_bytes: Option<i64>,
    pub commits: i64,
    pub rollbacks: i64,
    pub rows_written: i64,
    pub connections: i32,
    pub stats_reset: Option<DateTime<Utc>>,
    /// The tenant role's `CONNECTION LIMIT` (`None`: no such role).
    pub connection_limit: Option<i32>,
    /// The role may create temporary tables there: the database is
    /// writable for it; `false` is read-only (see `servers::schema`);
    /// `None`: no such role.
    pub writable: Option<bool>,
}

/// A tenant whose privileges must change, to `read_only`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivilegeChange {
    pub tenant: Uuid,
    pub read_only: bool,
}

/// A tenant whose `over_quota_at` must change, the privileges being right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordChange {
    pub tenant: Uuid,
    pub over_quota: bool,
}

/// What a pass does.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassPlan {
    pub samples: Vec<UsageSample>,
    /// Privileges to change; each, once done, records its state too.
    pub privileges: Vec<PrivilegeChange>,
    /// Records to set right (privileges already as they should be: a pass
    /// that crashed after changing them, or a state set by hand).
    pub records: Vec<RecordChange>,
    /// Roles whose `CONNECTION LIMIT` differs from their plan's, by limit.
    pub connection_limits: BTreeMap<i32, Vec<String>>,
}

/// Whether a tenant of this size is over this quota (no quota: never).
pub fn over_quota(size: i64, quota: Option<i64>) -> bool {
    quota.is_some_and(|q| size > q)
}

/// The growth of a counter since the previous reading. PostgreSQL's
/// counters only grow, unless its statistics were reset (by hand, or a
/// crash): a reset counts from the new value.
fn growth(previous: Option<i64>, now: i64, reset: bool) -> i64 {
    match previous {
        Some(p) if !reset && now >= p => now - p,
        Some(_) => now.max(0),
        None => 0,
    }
}

/// Decide a pass from the tenants to measure and what their servers showed,
/// for the tenants on `server`.
pub fn decide(server: Uuid, targets: &[&UsageTarget], readings: &[Reading]) -> PassPlan {
    let by_tenant: std::collections::HashMap<Uuid, &Reading> =
        readings.iter().map(|r| (r.tenant, r)).collect();
    let mut plan = PassPlan::default();
    for t in targets {
        let Some(r) = by_tenant.get(&t.id) else {
            continue;
        };
        // The same database as last time? Another one (a move, a restore
        // into a fresh database) starts a new baseline: its counters hold
        // the copy's writes, not the tenant's. Never read before: a
        // baseline too (when those counts happened is unknown).
        let same_database = t.raw_server_id == Some(server) && t.raw_datid == Some(r.datid);
        let reset = same_database
            && (t.raw_stats_reset != r.stats_reset
                || t.raw_commits.is_some_and(|p| r.commits < p)
                || t.raw_rollbacks.is_some_and(|p| r.rollbacks < p)
                || t.raw_rows_written.is_some_and(|p| r.rows_written < p));
        let previous = |p: Option<i64>| if same_database { p } else { None };
        plan.samples.push(UsageSample {
            tenant: t.id,
            size_bytes: r.size_bytes,
            connections: r.connections,
            server_id: server,
            datid: r.datid,
            stats_reset: r.stats_reset,
            raw_commits: r.commits,
            raw_rollbacks: r.rollbacks,
            raw_rows_written: r.rows_written,
            commits: growth(previous(t.raw_commits), r.commits, reset),
            rollbacks: growth(previous(t.raw_rollbacks), r.rollbacks, reset),
            rows_written: growth(previous(t.raw_rows_written), r.rows_written, reset),
        });
        if let Some(limit) = r.connection_limit {
            if limit != t.connection_limit {
                plan.connection_limits
                    .entry(t.connection_limit)
                    .or_default()
                    .push(t.role_name.clone());
            }
        }
        // The quota: desired state from the size, actual from the
        // privileges, recorded from `over_quota_at`; each set right.
        let (Some(size), Some(writable)) = (r.size_bytes, r.writable) else {
            continue;
        };
        let want_read_only = over_quota(size, t.storage_quota_bytes);
        let recorded = t.over_quota_at.is_some();
        if want_read_only == writable {
            plan.privileges.push(PrivilegeChange {
                tenant: t.id,
                read_only: want_read_only,
            });
        } else if recorded != want_read_only {
            plan.records.push(RecordChange {
                tenant: t.id,
                over_quota: want_read_only,
            });
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(quota: Option<i64>, over: bool) -> UsageTarget {
        UsageTarget {
            id: Uuid::from_u128(1),
            slug: "acme".into(),
            server_id: Uuid::from_u128(9),
            database_name: "db".into(),
            role_name: "role".into(),
            connection_limit: 20,
            storage_quota_bytes: quota,
            over_quota_at: over.then(Utc::now),
            raw_server_id: Some(Uuid::from_u128(9)),
            raw_datid: Some(100),
            raw_stats_reset: None,
            raw_commits: Some(50),
            raw_rollbacks: Some(5),
            raw_rows_written: Some(500),
        }
    }

    fn reading(size: i64, writable: bool) -> Reading {
        Reading {
            tenant: Uuid::from_u128(1),
            datid: 100,
            size_bytes: Some(size),
            commits: 60,
            rollbacks: 5,
            rows_written: 530,
            connections: 2,
            stats_reset: None,
            connection_limit: Some(20),
            writable: Some(writable),
        }
    }

    const S: Uuid = Uuid::from_u128(9);

    fn sample(server: Uuid, t: &UsageTarget, r: Reading) -> UsageSample {
        decide(server, &[t], &[r]).samples.remove(0)
    }

    #[test]
    fn the_quota_is_set_right_from_size_privileges_and_record() {
        // (quota, recorded over, size, writable now) → (privilege change, record change)
        type Row = (Option<i64>, bool, i64, bool, Option<bool>, Option<bool>);
        let rows: &[Row] = &[
            (None, false, 1 << 40, true, None, None),
            (Some(100), false, 100, true, None, None),
            (Some(100), false, 101, true, Some(true), None),
            // Crashed after the revoke, before the record.
            (Some(100), false, 101, false, None, Some(true)),
            (Some(100), true, 101, false, None, None),
            // Recorded, but privileges never changed (or a restore regranted).
            (Some(100), true, 101, true, Some(true), None),
            (Some(100), true, 99, false, Some(false), None),
            // Crashed after the grant, before the record.
            (Some(100), true, 99, true, None, Some(false)),
            // The plan's quota was removed.
            (None, true, 500, false, Some(false), None),
        ];
        let mut failures = vec![];
        for (i, &(quota, over, size, writable, privilege, record)) in rows.iter().enumerate() {
            let t = target(quota, over);
            let plan = decide(S, &[&t], &[reading(size, writable)]);
            let got_p = plan.privileges.first().map(|c| c.read_only);
            let got_r = plan.records.first().map(|c| c.over_quota);
            if (got_p, got_r) != (privilege, record) {
                failures.push(format!(
                    "row {i}: got ({got_p:?}, {got_r:?}), want ({privilege:?}, {record:?})"
                ));
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }

    #[test]
    fn counters_grow_by_the_difference_and_count_from_the_new_value_after_a_reset() {
        let t = target(None, false);
        let plan = decide(S, &[&t], &[reading(1, true)]);
        let s = &plan.samples[0];
        assert_eq!((s.commits, s.rollbacks, s.rows_written), (10, 0, 30));

        // Counters went down: a reset; count from the new values.
        let mut r = reading(1, true);
        r.commits = 3;
        r.rollbacks = 1;
        r.rows_written = 7;
        let s = &sample(S, &t, r);
        assert_eq!((s.commits, s.rollbacks, s.rows_written), (3, 1, 7));

        // A newer stats_reset: a reset even if the values look larger.
        let mut r = reading(1, true);
        r.stats_reset = Some(Utc::now());
        let s = &sample(S, &t, r);
        assert_eq!((s.commits, s.rollbacks, s.rows_written), (60, 5, 530));

        // Another database (a move): a new baseline.
        let mut r = reading(1, true);
        r.datid = 200;
        let s = &sample(S, &t, r);
        assert_eq!((s.commits, s.rollbacks, s.rows_written), (0, 0, 0));
        assert_eq!((s.datid, s.raw_rows_written), (200, 530));
        let s = &sample(Uuid::from_u128(8), &t, reading(1, true));
        assert_eq!(s.commits, 0);

        // Never read before: a baseline.
        let mut fresh = target(None, false);
        fresh.raw_server_id = None;
        fresh.raw_datid = None;
        fresh.raw_commits = None;
        let s = &sample(S, &fresh, reading(1, true));
        assert_eq!(s.commits, 0);
    }

    #[test]
    fn a_role_whose_connection_limit_differs_from_its_plan_is_set_right() {
        let t = target(None, false);
        let mut r = reading(1, true);
        assert!(decide(S, &[&t], &[r.clone()]).connection_limits.is_empty());
        r.connection_limit = Some(5);
        let plan = decide(S, &[&t], &[r.clone()]);
        assert_eq!(
            plan.connection_limits.get(&20),
            Some(&vec!["role".to_owned()])
        );
        r.connection_limit = None;
        r.writable = None;
        let plan = decide(S, &[&t], &[r]);
        assert!(plan.connection_limits.is_empty() && plan.privileges.is_empty());
    }

    #[test]
    fn a_tenant_its_server_did_not_show_is_left_alone() {
        let t = target(Some(1), false);
        assert_eq!(decide(S, &[&t], &[]), PassPlan::default());
    }
}
