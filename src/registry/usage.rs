//! Usage metering in the control DB: each tenant's current usage and daily
//! rollups (written by the usage collector and the routers' activity
//! flush, always in bulk), the collector's claim, and the storage-quota
//! state (`tenants.over_quota_at`), each change of it audited.

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use sqlx::FromRow;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Error, Registry, Result};

/// A tenant the collector measures, with what the previous pass read.
#[derive(Debug, Clone, FromRow)]
pub struct UsageTarget {
    pub id: Uuid,
    pub slug: String,
    pub server_id: Uuid,
    pub database_name: String,
    pub role_name: String,
    /// Its plan's role connection limit and storage quota.
    pub connection_limit: i32,
    pub storage_quota_bytes: Option<i64>,
    pub over_quota_at: Option<DateTime<Utc>>,
    pub raw_server_id: Option<Uuid>,
    pub raw_datid: Option<i64>,
    pub raw_stats_reset: Option<DateTime<Utc>>,
    pub raw_commits: Option<i64>,
    pub raw_rollbacks: Option<i64>,
    pub raw_rows_written: Option<i64>,
}

/// What one pass measured of one tenant, and what its counters grew by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageSample {
    pub tenant: Uuid,
    pub size_bytes: Option<i64>,
    pub connections: i32,
    pub server_id: Uuid,
    pub datid: i64,
    pub stats_reset: Option<DateTime<Utc>>,
    pub raw_commits: i64,
    pub raw_rollbacks: i64,
    pub raw_rows_written: i64,
    pub commits: i64,
    pub rollbacks: i64,
    pub rows_written: i64,
}

/// A tenant's current usage.
#[derive(Debug, Clone, Serialize, ToSchema, FromRow)]
pub struct CurrentUsage {
    /// When the collector last measured it (`null`: never yet).
    pub sampled_at: Option<DateTime<Utc>>,
    /// Its database's size (`pg_database_size`).
    pub size_bytes: Option<i64>,
    /// Sessions open on its database when measured.
    pub connections: Option<i32>,
    /// Totals since metering began (kept across statistics resets and moves).
    pub commits: i64,
    pub rollbacks: i64,
    /// Rows inserted, updated and deleted.
    pub rows_written: i64,
    /// App API requests, and those answered with an error (status 400 or more).
    pub requests: i64,
    pub errors: i64,
}

/// One UTC day of a tenant's usage.
#[derive(Debug, Clone, Serialize, ToSchema, FromRow, PartialEq, Eq)]
pub struct DailyUsage {
    pub day: NaiveDate,
    pub max_size_bytes: Option<i64>,
    pub max_connections: Option<i32>,
    pub commits: i64,
    pub rollbacks: i64,
    pub rows_written: i64,
    pub requests: i64,
    pub errors: i64,
}

/// A row of the top-tenants list.
#[derive(Debug, Clone, Serialize, ToSchema, FromRow)]
pub struct TenantUsageRow {
    pub tenant_id: Uuid,
    pub slug: String,
    pub plan: String,
    pub size_bytes: Option<i64>,
    pub storage_quota_bytes: Option<i64>,
    pub over_quota_at: Option<DateTime<Utc>>,
    /// App requests today (UTC) and in total.
    pub requests_today: i64,
    pub requests: i64,
    pub errors: i64,
    pub sampled_at: Option<DateTime<Utc>>,
}

/// How the top-tenants list is ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageSort {
    /// Largest database first.
    Size,
    /// Most app requests today (UTC) first.
    Requests,
}

/// Fleet totals for `/metrics`.
#[derive(Debug, Clone, Default, FromRow)]
pub struct UsageTotals {
    pub tenants: i64,
    pub size_bytes: i64,
    pub requests: i64,
    pub errors: i64,
    pub over_quota: i64,
}

/// What a pass did, for its log row.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PassRecord {
    pub servers: i32,
    pub tenants: i32,
    pub max_server_queries: i32,
    pub went_read_only: i32,
    pub went_writable: i32,
    pub errors: i32,
}

/// A change of a tenant's quota state, to record and audit.
#[derive(Debug, Clone)]
pub struct QuotaChange {
    pub tenant: Uuid,
    /// `true`: it went read-only (over quota); `false`: writable again.
    pub over_quota: bool,
    pub detail: serde_json::Value,
}

/// Who the audit log names for what the collector does.
pub const USAGE_ACTOR: &str = "usage-collector";

impl Registry {
    /// Every tenant whose database the collector measures (active or
    /// suspended), with its plan's limits and the previous pass's readings.
    pub async fn usage_targets(&self) -> Result<Vec<UsageTarget>> {
        sqlx::query_as(
            "SELECT t.id, t.slug, t.server_id, t.database_name, t.role_name,
                    p.connection_limit, p.storage_quota_bytes, t.over_quota_at,
                    u.raw_server_id, u.raw_datid, u.raw_stats_reset,
                    u.raw_commits, u.raw_rollbacks, u.raw_rows_written
               FROM tenants t JOIN plans p ON p.name = t.plan
               LEFT JOIN tenant_usage u ON u.tenant_id = t.id
              WHERE t.status IN ('active', 'suspended')
              ORDER BY t.server_id, t.id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Claim the next pass: only if no pass started within `interval`
    /// (`None`: claim regardless, for a pass run by hand). One statement, so
    /// of replicas ticking at once exactly one wins.
    pub async fn claim_usage_pass(
        &self,
        holder: &str,
        interval: Option<std::time::Duration>,
    ) -> Result<bool> {
        let secs = interval.map(|i| i.as_secs_f64() * 0.9);
        let claimed = sqlx::query(
            "UPDATE usage_collector SET started_at = now(), holder = $1
              WHERE $2::float8 IS NULL OR started_at IS NULL
                 OR started_at <= now() - make_interval(secs => $2)",
        )
        .bind(holder)
        .bind(secs)
        .execute(&self.pool)
        .await?;
        Ok(claimed.rows_affected() == 1)
    }

    /// Write one pass's samples: current usage and today's rollup (UTC),
    /// both in bulk, with the pass's log row, in one transaction.
    pub async fn record_usage(
        &self,
        samples: &[UsageSample],
        holder: &str,
        started_at: DateTime<Utc>,
        pass: &PassRecord,
    ) -> Result<()> {
        let mut ids = Vec::with_capacity(samples.len());
        let mut sizes = Vec::with_capacity(samples.len());
        let mut conns = Vec::with_capacity(samples.len());
        let mut servers = Vec::with_capacity(samples.len());
        let mut datids = Vec::with_capacity(samples.len());
        let mut resets = Vec::with_capacity(samples.len());
        let (mut rc, mut rr, mut rw) = (Vec::new(), Vec::new(), Vec::new());
        let (mut dc, mut dr, mut dw) = (Vec::new(), Vec::new(), Vec::new());
        for s in samples {
            ids.push(s.tenant);
            sizes.push(s.size_bytes);
            conns.push(s.connections);
            servers.push(s.server_id);
            datids.push(s.datid);
            resets.push(s.stats_reset);
            rc.push(s.raw_commits);
            rr.push(s.raw_rollbacks);
            rw.push(s.raw_rows_written);
            dc.push(s.commits);
            dr.push(s.rollbacks);
            dw.push(s.rows_written);
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO tenant_usage AS u (tenant_id, sampled_at, size_bytes, connections,
                    commits, rollbacks, rows_written, raw_server_id, raw_datid, raw_stats_reset,
                    raw_commits, raw_rollbacks, raw_rows_written)
             SELECT id, now(), size, conns, dc, dr, dw, server, datid, reset, rc, rr, rw
               FROM unnest($1::uuid[], $2::int8[], $3::int4[], $4::int8[], $5::int8[], $6::int8[],
                           $7::uuid[], $8::int8[], $9::timestamptz[], $10::int8[], $11::int8[], $12::int8[])
                    AS s(id, size, conns, dc, dr, dw, server, datid, reset, rc, rr, rw)
             ON CONFLICT (tenant_id) DO UPDATE SET
                 sampled_at = excluded.sampled_at,
                 size_bytes = coalesce(excluded.size_bytes, u.size_bytes),
                 connections = excluded.connections,
                 commits = u.commits + excluded.commits,
                 rollbacks = u.rollbacks + excluded.rollbacks,
                 rows_written = u.rows_written + excluded.rows_written,
                 raw_server_id = excluded.raw_server_id,
                 raw_datid = excluded.raw_datid,
                 raw_stats_reset = excluded.raw_stats_reset,
                 raw_commits = excluded.raw_commits,
                 raw_rollbacks = excluded.raw_rollbacks,
                 raw_rows_written = excluded.raw_rows_written",
        )
        .bind(&ids)
        .bind(&sizes)
        .bind(&conns)
        .bind(&dc)
        .bind(&dr)
        .bind(&dw)
        .bind(&servers)
        .bind(&datids)
        .bind(&resets)
        .bind(&rc)
        .bind(&rr)
        .bind(&rw)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO tenant_usage_daily AS d (tenant_id, day, max_size_bytes, max_connections,
                    commits, rollbacks, rows_written)
             SELECT id, (now() AT TIME ZONE 'UTC')::date, size, conns, dc, dr, dw
               FROM unnest($1::uuid[], $2::int8[], $3::int4[], $4::int8[], $5::int8[], $6::int8[])
                    AS s(id, size, conns, dc, dr, dw)
             ON CONFLICT (tenant_id, day) DO UPDATE SET
                 max_size_bytes = greatest(d.max_size_bytes, excluded.max_size_bytes),
                 max_connections = greatest(d.max_connections, excluded.max_connections),
                 commits = d.commits + excluded.commits,
                 rollbacks = d.rollbacks + excluded.rollbacks,
                 rows_written = d.rows_written + excluded.rows_written",
        )
        .bind(&ids)
        .bind(&sizes)
        .bind(&conns)
        .bind(&dc)
        .bind(&dr)
        .bind(&dw)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO usage_passes (holder, started_at, finished_at, servers, tenants,
                    max_server_queries, went_read_only, went_writable, errors)
             VALUES ($1, $2, clock_timestamp(), $3, $4, $5, $6, $7, $8)",
        )
        .bind(holder)
        .bind(started_at)
        .bind(pass.servers)
        .bind(pass.tenants)
        .bind(pass.max_server_queries)
        .bind(pass.went_read_only)
        .bind(pass.went_writable)
        .bind(pass.errors)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Drop daily rollups (and pass logs) older than `keep_days` days.
    pub async fn prune_usage(&self, keep_days: u32) -> Result<u64> {
        let days = keep_days as i32;
        let rollups = sqlx::query(
            "DELETE FROM tenant_usage_daily
              WHERE day < (now() AT TIME ZONE 'UTC')::date - $1",
        )
        .bind(days)
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "DELETE FROM usage_passes WHERE started_at < now() - make_interval(days => $1)",
        )
        .bind(days)
        .execute(&self.pool)
        .await?;
        Ok(rollups.rows_affected())
    }

    /// Add app requests and errors counted by one router since its last
    /// flush, to the totals and to today's rollup, in bulk.
    pub async fn add_requests(&self, counts: &[(Uuid, i64, i64)]) -> Result<()> {
        let ids: Vec<Uuid> = counts.iter().map(|c| c.0).collect();
        let requests: Vec<i64> = counts.iter().map(|c| c.1).collect();
        let errors: Vec<i64> = counts.iter().map(|c| c.2).collect();
        // Only tenants that still exist (a request may race a delete's purge).
        sqlx::query(
            "WITH c AS (
               SELECT c.id, c.n, c.e FROM unnest($1::uuid[], $2::int8[], $3::int8[]) AS c(id, n, e)
                WHERE EXISTS (SELECT 1 FROM tenants t WHERE t.id = c.id)
             ), totals AS (
               INSERT INTO tenant_usage AS u (tenant_id, requests, errors)
               SELECT id, n, e FROM c ORDER BY id
               ON CONFLICT (tenant_id) DO UPDATE
                 SET requests = u.requests + excluded.requests, errors = u.errors + excluded.errors
             )
             INSERT INTO tenant_usage_daily AS d (tenant_id, day, requests, errors)
             SELECT id, (now() AT TIME ZONE 'UTC')::date, n, e FROM c ORDER BY id
             ON CONFLICT (tenant_id, day) DO UPDATE
               SET requests = d.requests + excluded.requests, errors = d.errors + excluded.errors",
        )
        .bind(&ids)
        .bind(&requests)
        .bind(&errors)
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(Error::from)
    }

    /// Record quota changes in bulk (`over_quota_at` set or cleared, which
    /// tells the routers), each with an audit row, in one transaction.
    /// A tenant already in the recorded state is left as it is.
    pub async fn set_over_quota(&self, changes: &[QuotaChange]) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = changes.iter().map(|c| c.tenant).collect();
        let over: Vec<bool> = changes.iter().map(|c| c.over_quota).collect();
        let details: Vec<serde_json::Value> = changes.iter().map(|c| c.detail.clone()).collect();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "WITH c AS (
               SELECT * FROM unnest($1::uuid[], $2::bool[], $3::jsonb[]) AS c(id, over, detail)
             ), changed AS (
               UPDATE tenants t SET over_quota_at = CASE WHEN c.over THEN now() END
                 FROM c
                WHERE t.id = c.id AND (t.over_quota_at IS NOT NULL) <> c.over
               RETURNING t.id
             )
             INSERT INTO audit_log (actor, action, tenant_id, detail)
             SELECT $4, CASE WHEN c.over THEN 'tenant.over_quota' ELSE 'tenant.under_quota' END,
                    c.id, c.detail
               FROM c JOIN changed ON changed.id = c.id",
        )
        .bind(&ids)
        .bind(&over)
        .bind(&details)
        .bind(USAGE_ACTOR)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A tenant's current usage (`None`: nothing measured or counted yet).
    pub async fn current_usage(&self, tenant: Uuid) -> Result<Option<CurrentUsage>> {
        sqlx::query_as(
            "SELECT sampled_at, size_bytes, connections, commits, rollbacks, rows_written,
                    requests, errors
               FROM tenant_usage WHERE tenant_id = $1",
        )
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// A tenant's daily rollups of the last `days` days (today included), newest first.
    pub async fn daily_usage(&self, tenant: Uuid, days: u32) -> Result<Vec<DailyUsage>> {
        sqlx::query_as(
            "SELECT day, max_size_bytes, max_connections, commits, rollbacks, rows_written,
                    requests, errors
               FROM tenant_usage_daily
              WHERE tenant_id = $1 AND day > (now() AT TIME ZONE 'UTC')::date - $2
              ORDER BY day DESC",
        )
        .bind(tenant)
        .bind(days as i32)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// The live tenants using the most, by size or by today's requests.
    pub async fn top_usage(&self, sort: UsageSort, limit: i64) -> Result<Vec<TenantUsageRow>> {
        let order = match sort {
            UsageSort::Size => "u.size_bytes DESC NULLS LAST, t.id",
            UsageSort::Requests => "requests_today DESC, t.id",
        };
        sqlx::query_as(&format!(
            "SELECT t.id AS tenant_id, t.slug, t.plan, u.size_bytes, p.storage_quota_bytes,
                    t.over_quota_at, coalesce(d.requests, 0) AS requests_today,
                    u.requests, u.errors, u.sampled_at
               FROM tenant_usage u
               JOIN tenants t ON t.id = u.tenant_id
               JOIN plans p ON p.name = t.plan
               LEFT JOIN tenant_usage_daily d
                 ON d.tenant_id = u.tenant_id AND d.day = (now() AT TIME ZONE 'UTC')::date
              WHERE t.status <> 'deleted'
              ORDER BY {order} LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Totals over the live tenants, for `/metrics`.
    pub async fn usage_totals(&self) -> Result<UsageTotals> {
        sqlx::query_as(
            "SELECT count(*) AS tenants, coalesce(sum(u.size_bytes), 0)::int8 AS size_bytes,
                    coalesce(sum(u.requests), 0)::int8 AS requests,
                    coalesce(sum(u.errors), 0)::int8 AS errors,
                    (SELECT count(*) FROM tenants WHERE over_quota_at IS NOT NULL
                        AND status <> 'deleted') AS over_quota
               FROM tenant_usage u JOIN tenants t ON t.id = u.tenant_id
              WHERE t.status <> 'deleted'",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// The collector's last passes, newest first (for tests and operators).
    pub async fn usage_passes(&self, limit: i64) -> Result<Vec<UsagePass>> {
        sqlx::query_as(
            "SELECT id, holder, started_at, finished_at, servers, tenants, max_server_queries,
                    went_read_only, went_writable, errors
               FROM usage_passes ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }
}

/// A logged collector pass.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct UsagePass {
    pub id: i64,
    pub holder: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub servers: i32,
    pub tenants: i32,
    pub max_server_queries: i32,
    pub went_read_only: i32,
    pub went_writable: i32,
    pub errors: i32,
}
