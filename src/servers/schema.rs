//! The tenant schema: the migrations every tenant database gets (the
//! reference clinic schema embedded from `migrations/tenant`, or a team's own
//! with `SILO_TENANT_MIGRATIONS`) and the grants that follow them.
//!
//! After migrations, [`TENANT_GRANTS`] gives the shared NOLOGIN group role
//! [`TENANT_GROUP_ROLE`] data access inside that database. Each tenant's
//! login role is a member of the group, and only its own database grants it
//! CONNECT, so a role reaches exactly one database. A migration that has
//! shipped is never edited.

use std::sync::Arc;

use anyhow::Context;
use sqlx::migrate::Migrator;

static TENANT: Migrator = sqlx::migrate!("./migrations/tenant");

/// NOLOGIN role on each tenant server holding data privileges in tenant databases.
pub const TENANT_GROUP_ROLE: &str = "silo_tenant_app";

/// Privileges of the group role inside a tenant database: data, not schema.
pub const TENANT_GRANTS: &str = "
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO silo_tenant_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO silo_tenant_app;
REVOKE ALL ON TABLE _sqlx_migrations FROM silo_tenant_app;
GRANT SELECT ON TABLE _sqlx_migrations TO silo_tenant_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO silo_tenant_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO silo_tenant_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO silo_tenant_app;
";

/// The tenant migrations silo applies. Cheap to clone.
#[derive(Clone, Debug)]
pub struct TenantSchema(Arc<Migrator>);

impl Default for TenantSchema {
    fn default() -> Self {
        Self::embedded()
    }
}

impl From<Migrator> for TenantSchema {
    fn from(m: Migrator) -> Self {
        Self(Arc::new(m))
    }
}

/// A copy of the embedded migrations (the migrations themselves are static).
pub fn embedded_migrator() -> Migrator {
    Migrator {
        migrations: TENANT.migrations.clone(),
        ignore_missing: TENANT.ignore_missing,
        locking: TENANT.locking,
        no_tx: TENANT.no_tx,
    }
}

impl TenantSchema {
    /// The reference clinic schema shipped in this binary.
    pub fn embedded() -> Self {
        embedded_migrator().into()
    }

    /// The embedded schema, or a directory of `<version>_<name>.sql` files.
    pub async fn load(dir: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let Some(dir) = dir else {
            return Ok(Self::embedded());
        };
        let m = Migrator::new(dir)
            .await
            .with_context(|| format!("read tenant migrations from {}", dir.display()))?;
        anyhow::ensure!(
            m.iter().next().is_some(),
            "no migrations in {}",
            dir.display()
        );
        Ok(Self(Arc::new(m)))
    }

    /// Version of the newest migration: what new tenants and fleet runs reach.
    pub fn latest_version(&self) -> i64 {
        self.0.iter().map(|m| m.version).max().unwrap_or(0)
    }

    pub fn migrator(&self) -> &Migrator {
        &self.0
    }

    /// Bring one tenant database (a one-connection admin pool on it) to the
    /// latest schema and re-apply the group grants. Idempotent. A pool rather
    /// than a bare connection: sqlx's `Migrator::run` over `&mut PgConnection`
    /// defeats the compiler's `Send` inference in spawned tasks.
    pub async fn apply(&self, db: &sqlx::PgPool) -> anyhow::Result<i64> {
        self.0.run(db).await.context("apply tenant migrations")?;
        sqlx::raw_sql(TENANT_GRANTS)
            .execute(db)
            .await
            .context("grant tenant group privileges")?;
        Ok(self.latest_version())
    }
}

/// Version of the newest tenant migration embedded in this binary.
pub fn latest_embedded_version() -> i64 {
    TenantSchema::embedded().latest_version()
}
