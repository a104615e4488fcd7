//! The control database: the only module that runs SQL against it.
//!
//! It holds tenant DB servers, tenants and their lifecycle state, encrypted
//! credentials, spare databases of the warm pool, idempotency keys, operations,
//! backups, named admin keys and the audit log. Every call is a short
//! transaction; per-tenant work is serialized across processes and replicas
//! with PostgreSQL advisory locks ([`Registry::lock_tenant`]).

mod admin_keys;
mod app_credentials;
mod audit;
mod backups;
mod console;
mod keys;
mod locks;
mod operations;
mod plans;
mod servers;
mod spares;
mod tenants;
mod usage;

pub use admin_keys::{
    AdminKey, KeyExpiry, KeyHolder, LAST_USED_EVERY, LIVE_KEY_NAME_INDEX, MAX_KEY_DAYS,
};
pub use app_credentials::{AppCredential, AppCredentialView, LIVE_NAME_INDEX};
pub use audit::{AuditEntry, AuditFilter};
pub use backups::{Backup, BackupDone, NewBackup, Schedulable};
pub use console::{ConsoleSession, FailedBackup, TenantListed, TenantQuery, TenantSort};
pub use keys::{reader_aad, Resealer, RowId, SealedColumn, SealedRow, SEALED_COLUMNS};
pub use locks::Lock;
pub use operations::{Operation, OperationStatus};
pub use plans::{is_plan_reference, PlanFields, PlanRecord, PLAN_IN_USE};
pub use servers::{DbServer, NewServer};
pub use spares::Spare;
pub use tenants::{
    NewTenant, PlanLimits, Registered, Tenant, TenantPatch, TenantRecord, TenantStatus,
};
pub use usage::{
    CurrentUsage, DailyUsage, PassRecord, QuotaChange, TenantUsageRow, UsagePass, UsageSample,
    UsageSort, UsageTarget, UsageTotals, USAGE_ACTOR,
};

use std::time::Duration;

use sqlx::migrate::Migrator;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// Connections to the control DB per silo process. Each in-flight tenant
/// operation holds one (its advisory lock lives on it), the rest serve reads.
/// With N replicas the control server must allow N × this plus headroom.
pub const CONTROL_POOL_MAX: u32 = 16;
/// Connections per silo process that hold advisory locks (one per tenant
/// operation, running backup, restore or fleet run in progress), apart from
/// the query pool so that long-held locks never starve queries. The control
/// server must allow replicas × (CONTROL_POOL_MAX + LOCK_POOL_MAX) plus headroom.
pub const LOCK_POOL_MAX: u32 = 32;

/// The control-DB migrations (`migrations/control`); a migration that has
/// shipped is never edited.
static CONTROL: Migrator = sqlx::migrate!("./migrations/control");

/// A query on the control database failed. Its message says so, whatever
/// the cause, so an operator looks at the right database.
#[derive(Debug, thiserror::Error)]
#[error("query the control database")]
pub struct Error(#[source] pub sqlx::Error);

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Self(e)
    }
}

impl Error {
    /// `true` when a unique violation of the named constraint or index said no.
    pub fn is_unique_violation(&self, constraint: &str) -> bool {
        is_unique_violation(&self.0, constraint)
    }

    /// A lock wait reached its deadline (`lock_timeout`).
    pub fn is_lock_timeout(&self) -> bool {
        self.0
            .as_database_error()
            .and_then(|d| d.code())
            .is_some_and(|c| c == "55P03")
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Longest a task waits for an advisory lock (a tenant's, a server's)
/// before giving up with a "busy, retry" answer: nothing waits forever
/// behind an operation that hangs.
pub const LOCK_WAIT: Duration = Duration::from_secs(60);

/// Handle to the control database.
#[derive(Clone, Debug)]
pub struct Registry {
    pool: PgPool,
    /// Dedicated connections for advisory locks (see [`LOCK_POOL_MAX`]).
    locks: PgPool,
    /// This control plane's identity, once read.
    control_id: std::sync::Arc<tokio::sync::OnceCell<uuid::Uuid>>,
}

impl Registry {
    /// Connect (lazily: the first query opens connections) to the control DB.
    pub fn connect_lazy(url: &str) -> anyhow::Result<Self> {
        use anyhow::Context;
        let opts: PgConnectOptions = url.parse().context("parse SILO_DATABASE_URL")?;
        let pool = PgPoolOptions::new()
            .max_connections(CONTROL_POOL_MAX)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(5))
            .idle_timeout(Duration::from_secs(300))
            .connect_lazy_with(opts.clone().application_name("silo-control"));
        let locks = PgPoolOptions::new()
            .max_connections(LOCK_POOL_MAX)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(10))
            .idle_timeout(Duration::from_secs(300))
            .connect_lazy_with(
                opts.application_name("silo-locks")
                    .options([("lock_timeout", LOCK_WAIT.as_millis().to_string())]),
            );
        Ok(Self {
            pool,
            locks,
            control_id: Default::default(),
        })
    }

    /// The identity of this control plane (written on the clusters it owns).
    pub async fn control_id(&self) -> Result<uuid::Uuid> {
        self.control_id
            .get_or_try_init(|| async {
                sqlx::query_scalar("SELECT control_id FROM control_identity")
                    .fetch_one(&self.pool)
                    .await
                    .map_err(Error::from)
            })
            .await
            .copied()
    }

    /// Apply the control-DB migrations (`migrations/control`).
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        CONTROL.run(&self.pool).await
    }

    /// Close the control database to PUBLIC: no tenant role (on a shared
    /// cluster) may connect to it, listen to tenant changes or announce any.
    /// Where silo's login neither owns the database nor is a superuser, it
    /// says so instead (the database's owner must revoke it).
    pub async fn close_to_public(&self) -> Result<bool> {
        let (open, may): (bool, bool) = sqlx::query_as(
            "SELECT has_database_privilege('public', d.oid, 'CONNECT'),
                    pg_has_role(current_user, d.datdba, 'USAGE')
                      OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
               FROM pg_database d WHERE d.datname = current_database()",
        )
        .fetch_one(&self.pool)
        .await?;
        if open && may {
            sqlx::raw_sql(
                "DO $$ BEGIN
                   EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
                 END $$",
            )
            .execute(&self.pool)
            .await?;
            tracing::info!("closed the control database to PUBLIC");
        } else if open {
            tracing::warn!("the control database is open to PUBLIC and silo's login may not close it: any role of its cluster can connect to it (run REVOKE CONNECT ON DATABASE ... FROM PUBLIC as its owner)");
        }
        Ok(!open || may)
    }

    /// `SELECT 1` against the control DB, for readiness.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(Error::from)
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A transaction whose commit does not wait for its WAL to reach disk.
    ///
    /// For writes that are hints a crash may lose: provisioning progress
    /// (every step is idempotent and re-checked on resume) and the rows that
    /// lead up to the final `active` commit, which is durable and, WAL being
    /// sequential, flushes everything committed before it. Only a crash of
    /// the control *server* can lose such a write, and then the client never
    /// received its answer. This is what keeps a warm create at a single fsync
    /// on the control DB.
    pub(crate) async fn begin_lazy(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }
}

/// `true` when `err` is a unique violation of the named constraint or index.
pub fn is_unique_violation(err: &sqlx::Error, constraint: &str) -> bool {
    match err {
        sqlx::Error::Database(db) => {
            db.is_unique_violation() && db.constraint() == Some(constraint)
        }
        _ => false,
    }
}
