//! Tenant rows: lifecycle state, placement, encrypted credentials.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Error, Registry, Result};
use crate::domain::{Plan, ProvisionStep, Schedule, Slug, TenantName};

/// Lifecycle state of a tenant (README, "Admin API").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum TenantStatus {
    Provisioning,
    Active,
    Suspended,
    Archiving,
    Archived,
    Restoring,
    Deleting,
    Deleted,
    Failed,
}

impl TenantStatus {
    pub const ALL: [TenantStatus; 9] = [
        Self::Provisioning,
        Self::Active,
        Self::Suspended,
        Self::Archiving,
        Self::Archived,
        Self::Restoring,
        Self::Deleting,
        Self::Deleted,
        Self::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provisioning => "provisioning",
            Self::Active => "active",
            Self::Suspended => "suspended",
            Self::Archiving => "archiving",
            Self::Archived => "archived",
            Self::Restoring => "restoring",
            Self::Deleting => "deleting",
            Self::Deleted => "deleted",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// A tenant as the API shows it: no credentials, no internal bookkeeping.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, FromRow, PartialEq)]
pub struct Tenant {
    pub id: Uuid,
    pub slug: String,
    pub name: String,
    pub plan: Plan,
    pub status: TenantStatus,
    /// Name of the DB server holding the tenant's database.
    pub server: String,
    pub database: String,
    /// Latest tenant migration applied to its database.
    pub schema_version: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_backup_at: Option<DateTime<Utc>>,
    /// When a trial ends: the tenant is suspended then (a plan change or a
    /// new `expires_at` lifts it).
    pub expires_at: Option<DateTime<Utc>>,
    /// Set when its expiry suspended it.
    pub expired_at: Option<DateTime<Utc>>,
    /// Since when it is over its plan's storage quota, and so read-only.
    pub over_quota_at: Option<DateTime<Utc>>,
    /// Free-form settings the app reads (`GET /api/v1/settings`).
    #[schema(value_type = Object)]
    pub settings: serde_json::Value,
}

/// The full row, for silo's own use. `Debug` leaves out the sealed password.
#[derive(Clone, FromRow)]
pub struct TenantRecord {
    pub id: Uuid,
    pub slug: String,
    pub name: String,
    pub plan: Plan,
    pub status: TenantStatus,
    pub server_id: Uuid,
    pub server_name: String,
    pub database_name: String,
    pub role_name: String,
    pub password_enc: Vec<u8>,
    pub key_id: String,
    pub provision_step: Option<ProvisionStep>,
    pub last_error: Option<String>,
    pub schema_version: Option<i64>,
    pub backup_schedule: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_backup_at: Option<DateTime<Utc>>,
    /// Set while a move's cut-over freezes the tenant's writes.
    pub frozen_at: Option<DateTime<Utc>>,
    /// Its database's privileges are its role's alone (false: granted through
    /// the legacy shared group until the reconciler regrants it).
    pub own_privileges: bool,
    /// App tokens of older generations are refused (suspend, rotation and
    /// an explicit revoke start a new one).
    pub token_generation: i32,
    /// A password being rotated to (sealed, with its key id, and since when):
    /// set before the role's password changes, promoted after.
    pub pending_password_enc: Option<Vec<u8>>,
    pub pending_key_id: Option<String>,
    pub pending_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub expired_at: Option<DateTime<Utc>>,
    pub over_quota_at: Option<DateTime<Utc>>,
    pub settings: serde_json::Value,
    /// Its reader role's password (sealed), once it has a read-only app
    /// credential.
    pub reader_password_enc: Option<Vec<u8>>,
    pub reader_key_id: Option<String>,
    /// Its plan's limits (joined from `plans`).
    #[sqlx(flatten)]
    pub limits: PlanLimits,
}

/// What a tenant's plan allows, as the routers and the clinic API need it
/// (the whole plan is a `registry::PlanRecord`).
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct PlanLimits {
    /// The tenant role's `CONNECTION LIMIT`.
    pub connection_limit: i32,
    pub storage_quota_bytes: Option<i64>,
    pub requests_per_second: Option<i32>,
    pub wire_clients: Option<i32>,
    pub max_staff: Option<i32>,
    pub max_patients: Option<i32>,
}

impl std::fmt::Debug for TenantRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantRecord")
            .field("id", &self.id)
            .field("slug", &self.slug)
            .field("status", &self.status)
            .field("server", &self.server_name)
            .field("database", &self.database_name)
            .field("step", &self.provision_step)
            .finish_non_exhaustive()
    }
}

impl TenantRecord {
    pub fn view(&self) -> Tenant {
        Tenant {
            id: self.id,
            slug: self.slug.clone(),
            name: self.name.clone(),
            plan: self.plan.clone(),
            status: self.status,
            server: self.server_name.clone(),
            database: self.database_name.clone(),
            schema_version: self.schema_version,
            created_at: self.created_at,
            updated_at: self.updated_at,
            last_backup_at: self.last_backup_at,
            expires_at: self.expires_at,
            expired_at: self.expired_at,
            over_quota_at: self.over_quota_at,
            settings: self.settings.clone(),
        }
    }
}

/// What registering a tenant writes (its first row, status `provisioning`).
#[derive(Debug)]
pub struct NewTenant<'a> {
    pub id: Uuid,
    pub slug: &'a Slug,
    pub name: &'a TenantName,
    pub plan: Plan,
    pub server_id: Uuid,
    pub database_name: &'a str,
    pub role_name: &'a str,
    pub password_enc: &'a [u8],
    pub key_id: &'a str,
}

/// Fields an admin may change.
#[derive(Debug, Default)]
pub struct TenantPatch<'a> {
    pub name: Option<&'a TenantName>,
    /// A new plan also restarts the trial clock: `expires_at` becomes the
    /// new plan's trial length from now (none without one).
    pub plan: Option<Plan>,
    pub backup_schedule: Option<&'a Schedule>,
    /// An explicit expiry (`Some(None)` clears it); wins over the plan's.
    pub expires_at: Option<Option<DateTime<Utc>>>,
    /// Replaces the settings object.
    pub settings: Option<&'a serde_json::Value>,
}

const SELECT_RECORD: &str =
    "SELECT t.id, t.slug, t.name, t.plan, t.status, t.server_id, s.name AS server_name,
        t.database_name, t.role_name, t.password_enc, t.key_id, t.provision_step, t.last_error,
        t.schema_version, t.backup_schedule, t.created_at, t.updated_at, t.last_backup_at,
        t.frozen_at, t.own_privileges, t.token_generation,
        t.pending_password_enc, t.pending_key_id, t.pending_at,
        t.expires_at, t.expired_at, t.over_quota_at, t.settings,
        t.reader_password_enc, t.reader_key_id,
        p.connection_limit, p.storage_quota_bytes, p.requests_per_second, p.wire_clients,
        p.max_staff, p.max_patients
   FROM tenants t JOIN db_servers s ON s.id = t.server_id JOIN plans p ON p.name = t.plan";

/// The version of the grants silo's code gives a tenant database (see
/// control migration 0020): a row written by older code is below it, and
/// is regranted (or, for a spare, replaced). Bump it, with a migration
/// that sets every row below, when the grants change in a way that must
/// reach every database.
pub const GRANTS_VERSION: i32 = 1;

/// What [`Registry::register_tenant`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    Yes,
    /// Nothing: the server has no room left (`max_tenants`, counting
    /// tenants being moved to it).
    ServerFull,
}

impl Registry {
    /// Insert the tenant row and, with it, the idempotency key and an audit row,
    /// if its server has room. A taken slug fails on `tenants_slug_key`, a
    /// reused key on `idempotency_keys_pkey`.
    #[tracing::instrument(skip_all, fields(tenant_id = %t.id, slug = %t.slug))]
    pub async fn register_tenant(
        &self,
        t: &NewTenant<'_>,
        idempotency: Option<(&str, &[u8])>,
        actor: &str,
    ) -> Result<Registered> {
        // Durable with the final `active` commit (see `begin_lazy`).
        let mut tx = self.begin_lazy().await?;
        sqlx::query(
            "INSERT INTO tenants (id, slug, name, plan, status, server_id, database_name, role_name,
                                  password_enc, key_id, provision_step, own_privileges, grants_version, expires_at)
             VALUES ($1, $2, $3, $4, 'provisioning', $5, $6, $7, $8, $9, 'registered', true, $10,
                     now() + make_interval(days => (SELECT trial_days FROM plans WHERE name = $4)))",
        )
        .bind(t.id)
        .bind(t.slug.as_str())
        .bind(t.name.as_str())
        .bind(&t.plan)
        .bind(t.server_id)
        .bind(t.database_name)
        .bind(t.role_name)
        .bind(t.password_enc)
        .bind(t.key_id)
        .bind(GRANTS_VERSION)
        .execute(&mut *tx)
        .await?;
        // After the insert, so a taken slug or key is told first (a replay
        // or a retry is not refused as "full"); counted under the server
        // row's lock, so creates at once cannot both take its last place.
        if !Self::has_room_in(&mut tx, t.server_id, Some(t.id), None).await? {
            return Ok(Registered::ServerFull);
        }
        if let Some((key, hash)) = idempotency {
            sqlx::query(
                "INSERT INTO idempotency_keys (key, request_hash, tenant_id) VALUES ($1, $2, $3)",
            )
            .bind(key)
            .bind(hash)
            .bind(t.id)
            .execute(&mut *tx)
            .await?;
        }
        Self::audit_in(
            &mut tx,
            actor,
            "tenant.create",
            Some(t.id),
            serde_json::json!({"slug": t.slug, "plan": t.plan.as_str()}),
        )
        .await?;
        tx.commit().await?;
        Ok(Registered::Yes)
    }

    /// Register again a tenant whose database and role exist but whose row
    /// the registry lost (a control DB restored to an earlier point): it is
    /// `active` at once; its privileges are regranted by the reconciler.
    pub async fn adopt_tenant(
        &self,
        t: &NewTenant<'_>,
        schema_version: Option<i64>,
        actor: &str,
        detail: serde_json::Value,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO tenants (id, slug, name, plan, status, server_id, database_name, role_name,
                                  password_enc, key_id, schema_version, own_privileges)
             VALUES ($1, $2, $3, $4, 'active', $5, $6, $7, $8, $9, $10, false)",
        )
        .bind(t.id)
        .bind(t.slug.as_str())
        .bind(t.name.as_str())
        .bind(&t.plan)
        .bind(t.server_id)
        .bind(t.database_name)
        .bind(t.role_name)
        .bind(t.password_enc)
        .bind(t.key_id)
        .bind(schema_version)
        .execute(&mut *tx)
        .await?;
        Self::audit_in(&mut tx, actor, "tenant.adopt", Some(t.id), detail).await?;
        tx.commit().await.map_err(Error::from)
    }

    /// The tenant an idempotency key created, with the hash of that request.
    /// Record `key` (of a request hashing to `hash`) as naming `tenant`,
    /// unless it names something already.
    pub async fn record_idempotency_key(&self, key: &str, hash: &[u8], tenant: Uuid) -> Result<()> {
        sqlx::query(
            "INSERT INTO idempotency_keys (key, request_hash, tenant_id) VALUES ($1, $2, $3)
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(hash)
        .bind(tenant)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn idempotency_key(&self, key: &str) -> Result<Option<(Vec<u8>, Uuid)>> {
        sqlx::query_as("SELECT request_hash, tenant_id FROM idempotency_keys WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::from)
    }

    /// Look a tenant up by slug (live tenants only) or by id (any status).
    /// Anything else names no tenant, and is not sent to the database (a NUL,
    /// for one, is refused there as an error).
    #[tracing::instrument(skip(self))]
    pub async fn find_tenant(&self, slug_or_id: &str) -> Result<Option<TenantRecord>> {
        if let Ok(id) = Uuid::parse_str(slug_or_id) {
            return self.tenant(id).await;
        }
        if Slug::parse(slug_or_id).is_err() {
            return Ok(None);
        }
        sqlx::query_as(&format!(
            "{SELECT_RECORD} WHERE t.slug = $1 AND t.status <> 'deleted'"
        ))
        .bind(slug_or_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::from)
    }

    #[tracing::instrument(skip(self))]
    pub async fn tenant(&self, id: Uuid) -> Result<Option<TenantRecord>> {
        sqlx::query_as(&format!("{SELECT_RECORD} WHERE t.id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::from)
    }

    /// One page of tenants in id (= creation, UUIDv7) order, after `cursor`.
    pub async fn list_tenants(
        &self,
        status: Option<TenantStatus>,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<TenantRecord>> {
        sqlx::query_as(&format!(
            "{SELECT_RECORD} WHERE ($1::text IS NULL OR t.status = $1)
               AND ($2::uuid IS NULL OR t.id > $2) ORDER BY t.id LIMIT $3"
        ))
        .bind(status.map(TenantStatus::as_str))
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Tenants in the given states (for the reconciler).
    pub async fn tenants_in(&self, states: &[TenantStatus]) -> Result<Vec<TenantRecord>> {
        let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        sqlx::query_as(&format!(
            "{SELECT_RECORD} WHERE t.status = ANY($1) ORDER BY t.id"
        ))
        .bind(states)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Count of tenants per status.
    pub async fn count_by_status(&self) -> Result<Vec<(String, i64)>> {
        sqlx::query_as("SELECT status, count(*) FROM tenants GROUP BY status")
            .fetch_all(&self.pool)
            .await
            .map_err(Error::from)
    }

    /// Record a completed provisioning step (and the schema version when known).
    #[tracing::instrument(skip(self))]
    pub async fn set_provision_step(
        &self,
        id: Uuid,
        step: ProvisionStep,
        schema_version: Option<i64>,
    ) -> Result<()> {
        // A hint for resuming: a lost one only means an idempotent step re-runs.
        let mut tx = self.begin_lazy().await?;
        sqlx::query(
            "UPDATE tenants SET provision_step = $2, schema_version = COALESCE($3, schema_version),
                    updated_at = now() WHERE id = $1",
        )
        .bind(id)
        .bind(step)
        .bind(schema_version)
        .execute(&mut *tx)
        .await?;
        tx.commit().await.map_err(Error::from)
    }

    /// Move a tenant to `to` if it is in one of `from`; returns the new row,
    /// or `None` when it was in another state (the caller reports a conflict).
    #[tracing::instrument(skip(self, from))]
    pub async fn transition(
        &self,
        id: Uuid,
        from: &[TenantStatus],
        to: TenantStatus,
        error: Option<&str>,
    ) -> Result<Option<TenantRecord>> {
        let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
        let done = sqlx::query(
            "UPDATE tenants SET status = $3, last_error = $4, updated_at = now(),
                    provision_step = CASE WHEN $3 IN ('active', 'deleted') THEN NULL ELSE provision_step END,
                    deleted_at = CASE WHEN $3 = 'deleted' THEN now() ELSE deleted_at END
              WHERE id = $1 AND status = ANY($2)",
        )
        .bind(id)
        .bind(from)
        .bind(to.as_str())
        .bind(error)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        self.tenant(id).await
    }

    /// Suspend a tenant whose trial ended, and record that its expiry did
    /// (one statement: only one caller wins, whichever replica it runs on).
    /// `None` if it is not an active tenant past `expires_at` any more.
    pub async fn expire_tenant(&self, id: Uuid) -> Result<Option<TenantRecord>> {
        let done = sqlx::query(
            "UPDATE tenants SET status = 'suspended', expired_at = now(), updated_at = now(),
                    token_generation = token_generation + 1
              WHERE id = $1 AND status = 'active' AND expires_at <= now() AND expired_at IS NULL",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        self.tenant(id).await
    }

    /// Record the tenant's reader password (sealed) unless it has one; the
    /// one it has now (this or the one recorded before).
    pub async fn set_reader_password(
        &self,
        id: Uuid,
        sealed: &[u8],
        key_id: &str,
    ) -> Result<Option<(Vec<u8>, String)>> {
        sqlx::query_as(
            "UPDATE tenants SET reader_password_enc = COALESCE(reader_password_enc, $2),
                    reader_key_id = COALESCE(reader_key_id, $3), updated_at = now()
              WHERE id = $1 RETURNING reader_password_enc, reader_key_id",
        )
        .bind(id)
        .bind(sealed)
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Tenants on `server` that have a reader role (active or suspended,
    /// not frozen by a move): `(id, role)`.
    pub async fn tenants_with_readers(&self, server: Uuid) -> Result<Vec<(Uuid, String)>> {
        sqlx::query_as(
            "SELECT id, role_name FROM tenants
              WHERE server_id = $1 AND reader_password_enc IS NOT NULL
                AND status IN ('active', 'suspended') AND frozen_at IS NULL",
        )
        .bind(server)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Active tenants whose trial has ended, at most `limit`.
    pub async fn expired_tenants(&self, limit: i64) -> Result<Vec<Uuid>> {
        sqlx::query_scalar(
            "SELECT id FROM tenants
              WHERE expires_at <= now() AND expired_at IS NULL AND status = 'active'
              ORDER BY expires_at LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Record an error on a tenant without changing its state.
    pub async fn set_last_error(&self, id: Uuid, error: &str) -> Result<()> {
        sqlx::query("UPDATE tenants SET last_error = $2, updated_at = now() WHERE id = $1")
            .bind(id)
            .bind(error)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(Error::from)
    }

    /// Apply an admin patch; `None` if the tenant does not exist.
    #[tracing::instrument(skip(self))]
    pub async fn patch_tenant(
        &self,
        id: Uuid,
        patch: &TenantPatch<'_>,
    ) -> Result<Option<TenantRecord>> {
        let done = sqlx::query(
            "UPDATE tenants t SET name = COALESCE($2, name), plan = COALESCE($3, plan),
                    backup_schedule = COALESCE($4, backup_schedule),
                    expires_at = CASE
                        WHEN $5 THEN $6
                        WHEN $3 IS NOT NULL AND $3 <> t.plan THEN now() + make_interval(
                            days => (SELECT trial_days FROM plans WHERE name = $3))
                        ELSE expires_at END,
                    expired_at = CASE
                        WHEN $5 OR ($3 IS NOT NULL AND $3 <> t.plan) THEN NULL
                        ELSE expired_at END,
                    settings = COALESCE($7, settings),
                    updated_at = now()
              WHERE id = $1 AND status <> 'deleted'",
        )
        .bind(id)
        .bind(patch.name.map(TenantName::as_str))
        .bind(&patch.plan)
        .bind(patch.backup_schedule.map(Schedule::as_str))
        .bind(patch.expires_at.is_some())
        .bind(patch.expires_at.flatten())
        .bind(patch.settings)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        self.tenant(id).await
    }
}

impl Registry {
    /// State and server of each of these tenants the registry has a row
    /// for, whatever its state (for the reconciler).
    /// `(id, status, server, database)`.
    pub async fn tenant_states(
        &self,
        ids: &[Uuid],
    ) -> Result<Vec<(Uuid, TenantStatus, Uuid, String)>> {
        sqlx::query_as(
            "SELECT id, status, server_id, database_name FROM tenants WHERE id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Every tenant on a server that is not deleted (for the reconciler).
    pub async fn tenants_on_server(&self, server: Uuid) -> Result<Vec<TenantRecord>> {
        sqlx::query_as(&format!(
            "{SELECT_RECORD} WHERE t.server_id = $1 AND t.status <> 'deleted'"
        ))
        .bind(server)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }
}

impl Registry {
    /// Record the schema version a tenant database was migrated to.
    pub async fn set_schema_version(&self, id: Uuid, version: i64) -> Result<()> {
        sqlx::query("UPDATE tenants SET schema_version = $2, updated_at = now() WHERE id = $1")
            .bind(id)
            .bind(version)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(Error::from)
    }
}

impl Registry {
    /// Stamp `last_active_at` on tenants that had app traffic.
    pub async fn touch_tenants(&self, ids: &[Uuid]) -> Result<()> {
        sqlx::query("UPDATE tenants SET last_active_at = now() WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(Error::from)
    }

    /// Active tenants with no app traffic since `before` (nor created since), oldest first.
    pub async fn idle_tenants(
        &self,
        before: chrono::DateTime<chrono::Utc>,
        limit: i64,
    ) -> Result<Vec<Uuid>> {
        sqlx::query_scalar(
            "SELECT id FROM tenants WHERE status = 'active' AND coalesce(last_active_at, created_at) < $1
              ORDER BY coalesce(last_active_at, created_at) LIMIT $2",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Point a tenant at another database (a restore's swap) and, optionally,
    /// move it between states in the same statement. Routers on every replica
    /// drop their pool for it (NOTIFY). `None` when it was in none of `from`.
    pub async fn set_tenant_database(
        &self,
        id: Uuid,
        from: &[TenantStatus],
        to: TenantStatus,
        database: &str,
        schema_version: Option<i64>,
    ) -> Result<Option<TenantRecord>> {
        let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
        let done = sqlx::query(
            "UPDATE tenants SET database_name = $3, schema_version = coalesce($4, schema_version),
                    status = $5, last_error = NULL, updated_at = now(),
                    last_active_at = CASE WHEN $5 = 'active' THEN now() ELSE last_active_at END
              WHERE id = $1 AND status = ANY($2)",
        )
        .bind(id)
        .bind(from)
        .bind(database)
        .bind(schema_version)
        .bind(to.as_str())
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        self.tenant(id).await
    }
}

impl Registry {
    /// Freeze or unfreeze a tenant's writes (a move's cut-over); routers on
    /// every replica follow at once (NOTIFY).
    pub async fn set_frozen(&self, id: Uuid, frozen: bool) -> Result<()> {
        sqlx::query(
            "UPDATE tenants SET frozen_at = CASE WHEN $2 THEN now() END, updated_at = now()
              WHERE id = $1 AND (frozen_at IS NULL) = $2",
        )
        .bind(id)
        .bind(frozen)
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(Error::from)
    }

    /// Tenants frozen for a move's cut-over.
    pub async fn frozen_tenants(&self) -> Result<Vec<Uuid>> {
        sqlx::query_scalar("SELECT id FROM tenants WHERE frozen_at IS NOT NULL")
            .fetch_all(&self.pool)
            .await
            .map_err(Error::from)
    }

    /// A move's switch: the tenant now lives on `to` with a new password, and
    /// is unfrozen, in one transaction. It holds the move's operation row
    /// locked and requires it running and not claimed by a sweep, so a
    /// sweep that claims it (see `claim_abandoned_operation`) decides after
    /// this commits or never sees it. `false` if anything did not hold.
    pub async fn relocate_tenant(
        &self,
        id: Uuid,
        operation: Uuid,
        from: Uuid,
        to: Uuid,
        status: TenantStatus,
        (password_enc, key_id): (&[u8], &str),
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let live: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM operations WHERE id = $1 AND status = 'running'
                AND NOT coalesce((params->>'abandoned')::bool, false) FOR UPDATE",
        )
        .bind(operation)
        .fetch_optional(&mut *tx)
        .await?;
        if live.is_none() {
            return Ok(false);
        }
        let done = sqlx::query(
            "UPDATE tenants SET server_id = $3, password_enc = $4, key_id = $5, frozen_at = NULL,
                    updated_at = now()
              WHERE id = $1 AND server_id = $2 AND status = $6 AND frozen_at IS NOT NULL",
        )
        .bind(id)
        .bind(from)
        .bind(to)
        .bind(password_enc)
        .bind(key_id)
        .bind(status.as_str())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Databases on `server` that a move from `server` left behind without
    /// verifying its copy (the tenant now lives on the move's target): they
    /// are kept, never dropped.
    pub async fn unverified_move_sources(&self, server: Uuid) -> Result<Vec<String>> {
        sqlx::query_scalar(
            "SELECT t.database_name FROM tenants t
               JOIN LATERAL (SELECT o.params FROM operations o
                              WHERE o.kind = 'tenant.move' AND o.tenant_id = t.id
                              ORDER BY o.created_at DESC LIMIT 1) m ON true
              WHERE t.status <> 'deleted'
                AND m.params->>'from_server' = $1::text
                AND m.params->>'to_server' = t.server_id::text
                AND NOT coalesce((m.params->>'verified')::bool, false)",
        )
        .bind(server)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// As [`Self::set_password`], committed lazily (see `begin_lazy`): for
    /// provisioning, where a resumed step re-asserts the password anyway.
    pub async fn set_password_lazily(
        &self,
        id: Uuid,
        password_enc: &[u8],
        key_id: &str,
    ) -> Result<()> {
        let mut tx = self.begin_lazy().await?;
        sqlx::query(
            "UPDATE tenants SET password_enc = $2, key_id = $3, updated_at = now() WHERE id = $1",
        )
        .bind(id)
        .bind(password_enc)
        .bind(key_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await.map_err(Error::from)
    }

    /// Record the password a rotation is about to give the tenant role
    /// (durably, before the role changes). Returns when it was recorded.
    pub async fn set_pending_password(
        &self,
        id: Uuid,
        password_enc: &[u8],
        key_id: &str,
    ) -> Result<DateTime<Utc>> {
        sqlx::query_scalar(
            "UPDATE tenants SET pending_password_enc = $2, pending_key_id = $3, pending_at = now(),
                    updated_at = now()
              WHERE id = $1 RETURNING pending_at",
        )
        .bind(id)
        .bind(password_enc)
        .bind(key_id)
        .fetch_one(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// The role has the pending password now: make it the tenant's and
    /// refuse the app tokens minted before, in one statement (a crash cannot
    /// promote without revoking; the trigger notifies routers). The caller
    /// holds the tenant's lock, so the pending password is the one it set (a
    /// master-key re-seal may have sealed it anew meanwhile: same password).
    /// `false` if none is pending.
    pub async fn promote_pending_password(&self, id: Uuid) -> Result<bool> {
        sqlx::query(
            "UPDATE tenants SET password_enc = pending_password_enc, key_id = pending_key_id,
                    pending_password_enc = NULL, pending_key_id = NULL, pending_at = NULL,
                    token_generation = token_generation + 1, updated_at = now()
              WHERE id = $1 AND pending_password_enc IS NOT NULL",
        )
        .bind(id)
        .execute(&self.pool)
        .await
        .map(|r| r.rows_affected() == 1)
        .map_err(Error::from)
    }

    /// Tenants with a rotation that did not finish (for the reconciler).
    pub async fn tenants_rotating(&self) -> Result<Vec<Uuid>> {
        sqlx::query_scalar(
            "SELECT id FROM tenants WHERE pending_password_enc IS NOT NULL AND status <> 'deleted'",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Store a tenant role's new sealed password (the trigger notifies routers).
    pub async fn set_password(&self, id: Uuid, password_enc: &[u8], key_id: &str) -> Result<()> {
        sqlx::query(
            "UPDATE tenants SET password_enc = $2, key_id = $3, updated_at = now() WHERE id = $1",
        )
        .bind(id)
        .bind(password_enc)
        .bind(key_id)
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(Error::from)
    }
}

impl Registry {
    /// Active or suspended tenants whose recorded schema is older than
    /// `target` (or unknown), optionally only the one named.
    pub async fn tenants_behind(
        &self,
        target: i64,
        only: Option<Uuid>,
    ) -> Result<Vec<TenantRecord>> {
        sqlx::query_as(&format!(
            "{SELECT_RECORD} WHERE t.status IN ('active', 'suspended')
               AND (t.schema_version IS NULL OR t.schema_version < $1)
               AND ($2::uuid IS NULL OR t.id = $2) ORDER BY t.id"
        ))
        .bind(target)
        .bind(only)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// How many active or suspended tenants are at each schema version.
    pub async fn schema_versions(&self) -> Result<Vec<(Option<i64>, i64)>> {
        sqlx::query_as(
            "SELECT schema_version, count(*) FROM tenants WHERE status IN ('active', 'suspended')
              GROUP BY schema_version ORDER BY schema_version NULLS FIRST",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }
}

impl Registry {
    /// The tenant's database is granted to its role alone now.
    pub async fn set_own_privileges(&self, id: Uuid) -> Result<()> {
        sqlx::query("UPDATE tenants SET own_privileges = true, grants_version = $2 WHERE id = $1")
            .bind(id)
            .bind(GRANTS_VERSION)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Live tenants whose databases are still granted through the legacy
    /// shared group (made before per-tenant privileges), oldest first.
    pub async fn tenants_with_shared_privileges(&self, limit: i64) -> Result<Vec<TenantRecord>> {
        Ok(sqlx::query_as(&format!(
            "{SELECT_RECORD} WHERE NOT t.own_privileges AND t.status IN ('active', 'suspended')
              ORDER BY t.id LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Refuse every app token minted so far: a new token generation
    /// (routers on every replica follow at once, by NOTIFY).
    pub async fn revoke_tokens(&self, id: Uuid) -> Result<i32> {
        Ok(sqlx::query_scalar(
            "UPDATE tenants SET token_generation = token_generation + 1, updated_at = now()
              WHERE id = $1 RETURNING token_generation",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await?)
    }
}
