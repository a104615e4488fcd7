//! Usage metering and storage quotas.
//!
//! Every `SILO_USAGE_INTERVAL`, one replica (a claim in the control DB,
//! plus an advisory lock while the pass runs: replicas never overlap, so
//! nothing is counted twice) reads each tenant server's statistics with one
//! query: every silo tenant database's size, commits, rollbacks, rows
//! written and sessions, with its role's connection limit and whether the
//! role may write there. From that ([`decide`]) it
//!
//! - adds what the counters grew by to each tenant's totals and to today's
//!   rollup (in bulk; a statistics reset counts from the new value, a move
//!   starts a new baseline), and keeps `SILO_USAGE_KEEP_DAYS` of rollups;
//! - makes a tenant over its plan's `storage_quota_bytes` read-only in its
//!   database (privileges: see `servers::schema::set_read_only`), records
//!   `over_quota_at` (which tells the routers) and audits it; and does the
//!   reverse when it is under quota again or its plan's quota grew;
//! - sets right a role whose `CONNECTION LIMIT` differs from its plan's
//!   (a plan change that crashed midway).
//!
//! Each is driven by the desired state, not by what the previous pass did:
//! a pass that crashed anywhere is repaired by the next. App requests and
//! errors are counted by every replica's router and added by its activity
//! flush (see `router`), so the totals hold all replicas' traffic.

pub mod decide;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use crate::registry::{
    PassRecord, QuotaChange, Registry, UsageSort, UsageTarget, UsageTotals, USAGE_ACTOR,
};
use crate::servers::{roles, schema, ServerAdmin, ServerPools};
use decide::{PassPlan, Reading};

pub use crate::config::{
    DEFAULT_USAGE_INTERVAL_SECS as DEFAULT_INTERVAL_SECS,
    DEFAULT_USAGE_KEEP_DAYS as DEFAULT_KEEP_DAYS,
};
/// Default tenants with series of their own on `/metrics`.
pub const DEFAULT_TOP_N: usize = crate::config::DEFAULT_USAGE_TOP_N as usize;
/// Privilege changes run at once (each on a connection of its own to the
/// tenant's database).
const CHANGES_AT_ONCE: usize = 4;

/// How the collector runs.
#[derive(Debug, Clone, Copy)]
pub struct UsageSettings {
    pub interval: Duration,
    pub keep_days: u32,
    pub top_n: usize,
}

impl Default for UsageSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(DEFAULT_INTERVAL_SECS),
            keep_days: DEFAULT_KEEP_DAYS,
            top_n: DEFAULT_TOP_N,
        }
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct PassReport {
    pub servers: usize,
    pub tenants: usize,
    /// Tenants measured (their database was found on their server).
    pub measured: usize,
    /// Queries sent to each tenant server to read its statistics.
    pub queries_per_server: HashMap<Uuid, u32>,
    /// Slugs of tenants made read-only, and writable again, by this pass.
    pub went_read_only: Vec<String>,
    pub went_writable: Vec<String>,
    /// Records set right without a privilege change.
    pub records_fixed: usize,
    pub connection_limits_fixed: usize,
    /// Servers that could not be read and tenants that could not be changed
    /// (the next pass tries again).
    pub errors: usize,
    #[serde(with = "secs")]
    pub duration: Duration,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// The usage collector. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Collector {
    registry: Registry,
    servers: ServerPools,
    /// Who this process is, in the claim and the pass log.
    holder: Arc<str>,
}

/// The one statistics query of a pass on a server: for each tenant
/// database named, its size, counters and sessions, its role's connection
/// limit, and whether the role may write there (`TEMPORARY`, the quota
/// state's record).
pub const READ_SERVER: &str = "
SELECT t.tenant, d.oid::int8 AS datid,
       CASE WHEN has_database_privilege(d.oid, 'CONNECT') THEN pg_database_size(d.oid) END AS size_bytes,
       coalesce(s.xact_commit, 0)::int8 AS commits,
       coalesce(s.xact_rollback, 0)::int8 AS rollbacks,
       coalesce(s.tup_inserted + s.tup_updated + s.tup_deleted, 0)::int8 AS rows_written,
       coalesce(s.numbackends, 0)::int4 AS connections,
       s.stats_reset,
       r.rolconnlimit AS connection_limit,
       CASE WHEN r.oid IS NOT NULL THEN has_database_privilege(r.oid, d.oid, 'TEMPORARY') END AS writable
  FROM unnest($1::uuid[], $2::text[], $3::text[]) AS t(tenant, db, role)
  JOIN pg_database d ON d.datname = t.db
  LEFT JOIN pg_stat_database s ON s.datid = d.oid
  LEFT JOIN pg_roles r ON r.rolname = t.role";

impl Collector {
    pub fn new(registry: Registry, servers: ServerPools) -> Self {
        let holder = format!(
            "{}:{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "silo".into()),
            std::process::id()
        );
        Self {
            registry,
            servers,
            holder: Arc::from(holder.as_str()),
        }
    }

    /// Run a pass if it is this replica's turn: nobody else is running one
    /// and none started within the interval (`by_hand`: whatever the
    /// interval). `None`: not this replica's turn.
    pub async fn run(
        &self,
        settings: &UsageSettings,
        by_hand: bool,
    ) -> anyhow::Result<Option<PassReport>> {
        let Some(lock) = self.registry.try_lock_usage().await? else {
            return Ok(None);
        };
        let claimed = self
            .registry
            .claim_usage_pass(&self.holder, (!by_hand).then_some(settings.interval))
            .await;
        let out = match claimed {
            Ok(true) => self.pass(settings).await.map(Some),
            Ok(false) => Ok(None),
            Err(e) => Err(e.into()),
        };
        lock.release().await;
        out
    }

    async fn pass(&self, settings: &UsageSettings) -> anyhow::Result<PassReport> {
        let started = Instant::now();
        let started_at = Utc::now();
        let targets = self
            .registry
            .usage_targets()
            .await
            .context("list the tenants to measure")?;
        let mut by_server: HashMap<Uuid, Vec<&UsageTarget>> = HashMap::new();
        for t in &targets {
            by_server.entry(t.server_id).or_default().push(t);
        }
        let mut report = PassReport {
            servers: by_server.len(),
            tenants: targets.len(),
            ..Default::default()
        };
        // Every server read at once: one query each.
        let mut reading = Vec::with_capacity(by_server.len());
        for (server, ts) in &by_server {
            let read: BoxFuture<'_, _> = Box::pin(async move {
                let read = self.read_server(*server, ts).await;
                (*server, read)
            });
            reading.push(read);
        }
        let reads = futures_util::future::join_all(reading).await;
        let mut plan = PassPlan::default();
        let mut admins: HashMap<Uuid, ServerAdmin> = HashMap::new();
        for (server, read) in reads {
            match read {
                Ok((admin, readings)) => {
                    report.queries_per_server.insert(server, 1);
                    report.measured += readings.len();
                    let p = decide::decide(server, &by_server[&server], &readings);
                    plan.samples.extend(p.samples);
                    plan.privileges.extend(p.privileges);
                    plan.records.extend(p.records);
                    for (limit, roles) in p.connection_limits {
                        self.fix_connection_limits(&admin, limit, &roles, &mut report)
                            .await;
                    }
                    admins.insert(server, admin);
                }
                Err(e) => {
                    report.errors += 1;
                    tracing::warn!(server = %server, "failed to read a tenant server's usage: {e:#}");
                }
            }
        }
        let by_id: HashMap<Uuid, &UsageTarget> = targets.iter().map(|t| (t.id, t)).collect();
        let sizes: HashMap<Uuid, Option<i64>> = plan
            .samples
            .iter()
            .map(|s| (s.tenant, s.size_bytes))
            .collect();
        let detail = |id: Uuid| {
            let t = by_id[&id];
            json!({
                "size_bytes": sizes.get(&id).copied().flatten(),
                "storage_quota_bytes": t.storage_quota_bytes,
            })
        };
        // Privileges first, then their record: a crash between the two is
        // set right by the next pass (the record follows the privileges).
        let mut changing: Vec<BoxFuture<'_, (Uuid, bool, anyhow::Result<bool>)>> = Vec::new();
        for c in &plan.privileges {
            let t = by_id[&c.tenant];
            let admin = admins.get(&t.server_id).cloned();
            changing.push(Box::pin(async move {
                let done = match admin {
                    Some(admin) => self.set_privileges(&admin, t, c.read_only).await,
                    None => Ok(false),
                };
                (c.tenant, c.read_only, done)
            }));
        }
        let changed: Vec<(Uuid, bool, anyhow::Result<bool>)> = futures_util::stream::iter(changing)
            .buffer_unordered(CHANGES_AT_ONCE)
            .collect()
            .await;
        let mut records: Vec<QuotaChange> = Vec::new();
        for (tenant, read_only, done) in changed {
            let t = by_id[&tenant];
            match done {
                Ok(true) => {
                    tracing::info!(tenant_id = %tenant, slug = %t.slug, read_only,
                        "storage quota: the tenant's database is now {}",
                        if read_only { "read-only" } else { "writable" });
                    if read_only {
                        report.went_read_only.push(t.slug.clone());
                    } else {
                        report.went_writable.push(t.slug.clone());
                    }
                    records.push(QuotaChange {
                        tenant,
                        over_quota: read_only,
                        detail: detail(tenant),
                    });
                }
                // Busy with an operation: the next pass.
                Ok(false) => {}
                Err(e) => {
                    report.errors += 1;
                    tracing::warn!(tenant_id = %tenant, "failed to change a tenant's write privileges for its storage quota: {e:#}");
                }
            }
        }
        report.records_fixed = plan.records.len();
        records.extend(plan.records.iter().map(|c| QuotaChange {
            tenant: c.tenant,
            over_quota: c.over_quota,
            detail: detail(c.tenant),
        }));
        self.registry
            .set_over_quota(&records)
            .await
            .context("record the tenants' storage quota state")?;
        report.duration = started.elapsed();
        let pass = PassRecord {
            servers: report.servers as i32,
            tenants: report.tenants as i32,
            max_server_queries: report
                .queries_per_server
                .values()
                .copied()
                .max()
                .unwrap_or(0) as i32,
            went_read_only: report.went_read_only.len() as i32,
            went_writable: report.went_writable.len() as i32,
            errors: report.errors as i32,
        };
        self.registry
            .record_usage(&plan.samples, &self.holder, started_at, &pass)
            .await
            .context("record the tenants' usage")?;
        if let Err(e) = self.registry.prune_usage(settings.keep_days).await {
            tracing::warn!("failed to drop old usage rollups: {e}");
        }
        metrics::histogram!("silo_usage_pass_seconds").record(report.duration.as_secs_f64());
        metrics::gauge!("silo_usage_pass_max_server_queries").set(pass.max_server_queries as f64);
        if let Err(e) = self.publish(settings.top_n).await {
            tracing::warn!("failed to publish usage metrics: {e}");
        }
        Ok(report)
    }

    /// The statistics of every tenant database of `targets` on `server`.
    async fn read_server(
        &self,
        server: Uuid,
        targets: &[&UsageTarget],
    ) -> anyhow::Result<(ServerAdmin, Vec<Reading>)> {
        let admin = self.servers.admin_of(&self.registry, server).await?;
        let ids: Vec<Uuid> = targets.iter().map(|t| t.id).collect();
        let dbs: Vec<&str> = targets.iter().map(|t| t.database_name.as_str()).collect();
        let roles: Vec<&str> = targets.iter().map(|t| t.role_name.as_str()).collect();
        let readings = sqlx::query_as::<_, Reading>(READ_SERVER)
            .bind(&ids)
            .bind(&dbs)
            .bind(&roles)
            .fetch_all(&admin.pool)
            .await
            .map_err(|e| admin.error(None, e))?;
        Ok((admin, readings))
    }

    /// Make one tenant's database read-only or writable, holding its lock
    /// (so no restore, move or regrant runs at the same time). `false`: the
    /// tenant is busy, left for the next pass.
    async fn set_privileges(
        &self,
        admin: &ServerAdmin,
        t: &UsageTarget,
        read_only: bool,
    ) -> anyhow::Result<bool> {
        let Some(lock) = self.registry.try_lock_tenant(t.id).await? else {
            return Ok(false);
        };
        let done = async {
            let db = admin.single_pool(&t.database_name).await?;
            let set = schema::set_read_only(&db, &t.database_name, &t.role_name, read_only).await;
            db.close().await;
            set
        }
        .await;
        lock.release().await;
        done.map(|_| true)
    }

    async fn fix_connection_limits(
        &self,
        admin: &ServerAdmin,
        limit: i32,
        roles: &[String],
        report: &mut PassReport,
    ) {
        match roles::set_connection_limits(admin, roles, limit).await {
            Ok(()) => {
                tracing::info!(server = %admin.name, limit, roles = roles.len(),
                    "set tenant roles' connection limits back to their plan's");
                report.connection_limits_fixed += roles.len();
            }
            Err(e) => {
                report.errors += 1;
                tracing::warn!(
                    "failed to set tenant roles' connection limits to their plan's: {e:#}"
                );
            }
        }
    }

    /// Fleet totals, and series of their own for the top `top_n` tenants
    /// by size and by today's requests (gauges: a tenant that leaves the
    /// top drops out of `/metrics` after the exporter's idle timeout).
    pub async fn publish(&self, top_n: usize) -> anyhow::Result<()> {
        let UsageTotals {
            tenants,
            size_bytes,
            requests,
            errors,
            over_quota,
        } = self.registry.usage_totals().await?;
        metrics::gauge!("silo_usage_tenants").set(tenants as f64);
        metrics::gauge!("silo_usage_size_bytes").set(size_bytes as f64);
        metrics::gauge!("silo_usage_tenants_over_quota").set(over_quota as f64);
        metrics::counter!("silo_usage_requests_total").absolute(requests.max(0) as u64);
        metrics::counter!("silo_usage_errors_total").absolute(errors.max(0) as u64);
        if top_n == 0 {
            return Ok(());
        }
        let n = top_n as i64;
        for row in self.registry.top_usage(UsageSort::Size, n).await? {
            if let Some(size) = row.size_bytes {
                metrics::gauge!("silo_usage_tenant_size_bytes", "tenant_id" => row.tenant_id.to_string())
                    .set(size as f64);
            }
        }
        for row in self.registry.top_usage(UsageSort::Requests, n).await? {
            if row.requests_today > 0 {
                metrics::gauge!("silo_usage_tenant_requests_today", "tenant_id" => row.tenant_id.to_string())
                    .set(row.requests_today as f64);
            }
        }
        Ok(())
    }
}

/// The audit log's name for the collector (re-exported for tests).
pub const ACTOR: &str = USAGE_ACTOR;

/// What a write to a tenant over its storage quota is answered (the size
/// when known).
pub fn over_quota_detail(size: Option<i64>, quota: Option<i64>) -> String {
    let what = match (size, quota) {
        (Some(size), Some(quota)) => format!(" ({size} of {quota} bytes)"),
        (None, Some(quota)) => format!(" of {quota} bytes"),
        _ => String::new(),
    };
    format!(
        "the tenant is over its storage quota{what}: writes are refused until it is under it or its plan grows; reads still work"
    )
}
