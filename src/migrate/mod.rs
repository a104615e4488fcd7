//! Embedded migrators for the two schemas silo owns: the control registry
//! (`migrations/control`) and the clinic schema of every tenant database
//! (`migrations/tenant`). A migration that has shipped is never edited.
//!
//! After tenant migrations, [`TENANT_GRANTS`] gives the shared NOLOGIN group
//! role [`TENANT_GROUP_ROLE`] data access inside that database. Each tenant's
//! login role is a member of the group, and only its own database grants it
//! CONNECT, so a role reaches exactly one database.

mod fleet;

use std::sync::Arc;

use sqlx::migrate::Migrator;

pub use fleet::{
    FleetOptions, FleetProgress, FleetReport, FleetRun, FleetStartError, TenantOutcome,
    TenantResult, FLEET_KIND, MAX_CONCURRENCY,
};

static CONTROL: Migrator = sqlx::migrate!("./migrations/control");
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

pub fn control_migrator() -> &'static Migrator {
    &CONTROL
}

/// Version of the newest tenant migration shipped in this binary.
pub fn latest_tenant_version() -> i64 {
    latest_version(&TENANT)
}

/// The tenant migrations to apply: those embedded in this binary (the
/// reference clinic schema), or a directory of `<version>_<name>.sql` files
/// given with `SILO_TENANT_MIGRATIONS` — a team's own tenant schema.
pub async fn load_tenant_migrator(dir: Option<&std::path::Path>) -> anyhow::Result<Arc<Migrator>> {
    use anyhow::Context;
    match dir {
        None => Ok(Arc::new(embedded_tenant_migrator())),
        Some(dir) => {
            let m = Migrator::new(dir)
                .await
                .with_context(|| format!("read tenant migrations from {}", dir.display()))?;
            anyhow::ensure!(
                m.iter().next().is_some(),
                "no migrations in {}",
                dir.display()
            );
            Ok(Arc::new(m))
        }
    }
}

/// A copy of the embedded tenant migrator (the migrations themselves are static).
pub fn embedded_tenant_migrator() -> Migrator {
    Migrator {
        migrations: TENANT.migrations.clone(),
        ignore_missing: TENANT.ignore_missing,
        locking: TENANT.locking,
        no_tx: TENANT.no_tx,
    }
}

/// Version of the newest migration of `migrator`.
pub fn latest_version(migrator: &Migrator) -> i64 {
    migrator.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Bring one tenant database (a one-connection admin pool on it) to the latest
/// schema of `migrator` and re-apply the group grants. Idempotent. A pool
/// rather than a bare connection: sqlx's `Migrator::run` over
/// `&mut PgConnection` defeats the compiler's `Send` inference in spawned tasks.
pub async fn migrate_tenant_database(
    db: &sqlx::PgPool,
    migrator: &Migrator,
) -> anyhow::Result<i64> {
    use anyhow::Context;
    migrator.run(db).await.context("apply tenant migrations")?;
    sqlx::raw_sql(TENANT_GRANTS)
        .execute(db)
        .await
        .context("grant tenant group privileges")?;
    Ok(latest_version(migrator))
}
