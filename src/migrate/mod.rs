//! Embedded migrators for the two schemas silo owns: the control registry
//! (`migrations/control`) and the clinic schema of every tenant database
//! (`migrations/tenant`). A migration that has shipped is never edited.
//!
//! After tenant migrations, [`TENANT_GRANTS`] gives the shared NOLOGIN group
//! role [`TENANT_GROUP_ROLE`] data access inside that database. Each tenant's
//! login role is a member of the group, and only its own database grants it
//! CONNECT, so a role reaches exactly one database.

mod fleet;

use sqlx::migrate::Migrator;

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

pub fn tenant_migrator() -> &'static Migrator {
    &TENANT
}

/// Version of the newest tenant migration shipped in this binary.
pub fn latest_tenant_version() -> i64 {
    TENANT.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Bring one tenant database (a one-connection admin pool on it) to the latest
/// schema and re-apply the group grants. Idempotent. A pool rather than a bare
/// connection: sqlx's `Migrator::run` over `&mut PgConnection` defeats the
/// compiler's `Send` inference inside spawned tasks.
pub async fn migrate_tenant_database(db: &sqlx::PgPool) -> anyhow::Result<i64> {
    use anyhow::Context;
    TENANT.run(db).await.context("apply tenant migrations")?;
    sqlx::raw_sql(TENANT_GRANTS)
        .execute(db)
        .await
        .context("grant tenant group privileges")?;
    Ok(latest_tenant_version())
}
