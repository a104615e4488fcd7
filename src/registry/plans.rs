//! Plans: what a tenant of each plan may use (the `plans` table). A tenant
//! row names its plan; a plan in use cannot be deleted.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::FromRow;
use utoipa::ToSchema;

use super::{Error, Registry, Result};
use crate::domain::Plan;

/// The `plans` foreign key of `tenants`: a plan in use (or an unknown one).
pub const PLAN_IN_USE: &str = "tenants_plan_fkey";

/// A plan and its limits. An absent limit means "silo's setting applies"
/// (request rate, front-door clients, backups) or "no limit" (storage,
/// clinic limits, trial).
#[derive(Debug, Clone, Serialize, ToSchema, FromRow, PartialEq)]
pub struct PlanRecord {
    pub name: Plan,
    /// The tenant role's `CONNECTION LIMIT`, shared by the routers' pools.
    pub connection_limit: i32,
    /// Database size (bytes) past which the tenant becomes read-only.
    pub storage_quota_bytes: Option<i64>,
    /// App API requests per second per tenant (else `SILO_APP_RATE_LIMIT`).
    pub requests_per_second: Option<i32>,
    /// Client connections at once on the PostgreSQL front door (else
    /// `SILO_PG_MAX_CLIENTS_PER_TENANT`).
    pub wire_clients: Option<i32>,
    /// Staff members the clinic API lets a tenant have.
    pub max_staff: Option<i32>,
    /// Patients the clinic API lets a tenant have.
    pub max_patients: Option<i32>,
    /// A tenant put on this plan expires (is suspended) this many days later.
    pub trial_days: Option<i32>,
    /// Backup schedule of its tenants without their own (else `SILO_BACKUP_SCHEDULE`).
    pub backup_schedule: Option<String>,
    /// Retention of its tenants' backups (else `SILO_BACKUP_KEEP_*`).
    pub backup_keep_last: Option<i32>,
    pub backup_keep_daily: Option<i32>,
    pub backup_keep_weekly: Option<i32>,
    pub backup_keep_monthly: Option<i32>,
    /// Tenants on this plan (not deleted).
    pub tenants: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Every settable field of a plan; a patch leaves `None` fields as they are,
/// and `Some(None)` clears a limit. Serialized (for the audit log), it
/// lists the fields given, `null` for a cleared one.
#[derive(Debug, Default, Clone, Serialize)]
pub struct PlanFields {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_limit: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_quota_bytes: Option<Option<i64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<Option<i32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wire_clients: Option<Option<i32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_staff: Option<Option<i32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_patients: Option<Option<i32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trial_days: Option<Option<i32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_schedule: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_keep_last: Option<Option<i32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_keep_daily: Option<Option<i32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_keep_weekly: Option<Option<i32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_keep_monthly: Option<Option<i32>>,
}

const SELECT_PLAN: &str = "SELECT p.name, p.connection_limit, p.storage_quota_bytes,
        p.requests_per_second, p.wire_clients, p.max_staff, p.max_patients, p.trial_days,
        p.backup_schedule, p.backup_keep_last, p.backup_keep_daily, p.backup_keep_weekly,
        p.backup_keep_monthly,
        (SELECT count(*) FROM tenants t WHERE t.plan = p.name AND t.status <> 'deleted') AS tenants,
        p.created_at, p.updated_at
   FROM plans p";

/// Announce a change of a plan's limits to every router (delivered at
/// commit): `plan:<name>` on the tenants channel.
async fn notify_plan(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, name: &Plan) -> Result<()> {
    sqlx::query("SELECT pg_notify('silo_tenants', $1)")
        .bind(format!("plan:{name}"))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

impl Registry {
    /// Every plan, by name.
    pub async fn plans(&self) -> Result<Vec<PlanRecord>> {
        sqlx::query_as(&format!("{SELECT_PLAN} ORDER BY p.name"))
            .fetch_all(&self.pool)
            .await
            .map_err(Error::from)
    }

    pub async fn plan(&self, name: &Plan) -> Result<Option<PlanRecord>> {
        sqlx::query_as(&format!("{SELECT_PLAN} WHERE p.name = $1"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::from)
    }

    /// Add a plan (`connection_limit` is required); a taken name fails on
    /// `plans_pkey`.
    pub async fn create_plan(
        &self,
        name: &Plan,
        f: &PlanFields,
        actor: &str,
    ) -> Result<PlanRecord> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO plans (name, connection_limit) VALUES ($1, $2)")
            .bind(name)
            .bind(f.connection_limit.unwrap_or(20))
            .execute(&mut *tx)
            .await?;
        Self::set_plan_fields(&mut tx, name, f).await?;
        Self::audit_in(
            &mut tx,
            actor,
            "plan.create",
            None,
            serde_json::json!({"plan": name, "fields": f}),
        )
        .await?;
        tx.commit().await?;
        self.plan(name)
            .await?
            .ok_or(Error(sqlx::Error::RowNotFound))
    }

    /// Change a plan's limits; `None` if there is no such plan. Routers
    /// are told at commit.
    pub async fn update_plan(
        &self,
        name: &Plan,
        f: &PlanFields,
        actor: &str,
    ) -> Result<Option<(PlanRecord, PlanRecord)>> {
        let Some(before) = self.plan(name).await? else {
            return Ok(None);
        };
        let mut tx = self.pool.begin().await?;
        let found: Option<(i32,)> =
            sqlx::query_as("SELECT connection_limit FROM plans WHERE name = $1 FOR UPDATE")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        if found.is_none() {
            return Ok(None);
        }
        Self::set_plan_fields(&mut tx, name, f).await?;
        notify_plan(&mut tx, name).await?;
        Self::audit_in(
            &mut tx,
            actor,
            "plan.update",
            None,
            serde_json::json!({"plan": name, "fields": f}),
        )
        .await?;
        tx.commit().await?;
        let after = self
            .plan(name)
            .await?
            .ok_or(Error(sqlx::Error::RowNotFound))?;
        Ok(Some((before, after)))
    }

    async fn set_plan_fields(
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        name: &Plan,
        f: &PlanFields,
    ) -> Result<()> {
        // One statement: a given field is set (to a value or NULL) when its
        // flag is true, kept otherwise.
        sqlx::query(
            "UPDATE plans SET
                connection_limit    = COALESCE($2, connection_limit),
                storage_quota_bytes = CASE WHEN $3 THEN $4 ELSE storage_quota_bytes END,
                requests_per_second = CASE WHEN $5 THEN $6 ELSE requests_per_second END,
                wire_clients        = CASE WHEN $7 THEN $8 ELSE wire_clients END,
                max_staff           = CASE WHEN $9 THEN $10 ELSE max_staff END,
                max_patients        = CASE WHEN $11 THEN $12 ELSE max_patients END,
                trial_days          = CASE WHEN $13 THEN $14 ELSE trial_days END,
                backup_schedule     = CASE WHEN $15 THEN $16 ELSE backup_schedule END,
                backup_keep_last    = CASE WHEN $17 THEN $18 ELSE backup_keep_last END,
                backup_keep_daily   = CASE WHEN $19 THEN $20 ELSE backup_keep_daily END,
                backup_keep_weekly  = CASE WHEN $21 THEN $22 ELSE backup_keep_weekly END,
                backup_keep_monthly = CASE WHEN $23 THEN $24 ELSE backup_keep_monthly END,
                updated_at = now()
             WHERE name = $1",
        )
        .bind(name)
        .bind(f.connection_limit)
        .bind(f.storage_quota_bytes.is_some())
        .bind(f.storage_quota_bytes.flatten())
        .bind(f.requests_per_second.is_some())
        .bind(f.requests_per_second.flatten())
        .bind(f.wire_clients.is_some())
        .bind(f.wire_clients.flatten())
        .bind(f.max_staff.is_some())
        .bind(f.max_staff.flatten())
        .bind(f.max_patients.is_some())
        .bind(f.max_patients.flatten())
        .bind(f.trial_days.is_some())
        .bind(f.trial_days.flatten())
        .bind(f.backup_schedule.is_some())
        .bind(f.backup_schedule.clone().flatten())
        .bind(f.backup_keep_last.is_some())
        .bind(f.backup_keep_last.flatten())
        .bind(f.backup_keep_daily.is_some())
        .bind(f.backup_keep_daily.flatten())
        .bind(f.backup_keep_weekly.is_some())
        .bind(f.backup_keep_weekly.flatten())
        .bind(f.backup_keep_monthly.is_some())
        .bind(f.backup_keep_monthly.flatten())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Delete a plan no tenant uses; `false` if there is no such plan. One
    /// in use fails on [`PLAN_IN_USE`].
    pub async fn delete_plan(&self, name: &Plan, actor: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM plans WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        if done {
            Self::audit_in(
                &mut tx,
                actor,
                "plan.delete",
                None,
                serde_json::json!({"plan": name}),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(done)
    }

    /// Tenants of `plan` whose role exists (active or suspended), with
    /// their server and role: those whose connection limit follows the plan.
    pub async fn roles_on_plan(
        &self,
        plan: &Plan,
    ) -> Result<Vec<(uuid::Uuid, uuid::Uuid, String)>> {
        sqlx::query_as(
            "SELECT id, server_id, role_name FROM tenants
              WHERE plan = $1 AND status IN ('active', 'suspended') ORDER BY server_id, id",
        )
        .bind(plan)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }
}

impl Registry {
    /// The backup retention counts the plan of `tenant` sets (each `None`
    /// where silo's setting applies): keep last, daily, weekly, monthly.
    pub async fn plan_retention(&self, tenant: uuid::Uuid) -> Result<Option<[Option<i32>; 4]>> {
        type Counts = (Option<i32>, Option<i32>, Option<i32>, Option<i32>);
        let row: Option<Counts> = sqlx::query_as(
            "SELECT p.backup_keep_last, p.backup_keep_daily, p.backup_keep_weekly,
                    p.backup_keep_monthly
               FROM tenants t JOIN plans p ON p.name = t.plan WHERE t.id = $1",
        )
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(a, b, c, d)| [a, b, c, d]))
    }
}

/// Is `e` a foreign-key violation of the tenants' plan (in use, or unknown)?
pub fn is_plan_reference(e: &Error) -> bool {
    e.0.as_database_error().is_some_and(|d| {
        d.code().as_deref() == Some("23503") && d.constraint() == Some(PLAN_IN_USE)
    })
}
