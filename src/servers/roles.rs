//! Tenant roles and databases on a server: how silo creates, opens, closes
//! and drops them. Every statement names only silo's own objects, whose
//! names come from [`super::names`] (never from a client).

use sqlx::{ConnectOptions, Connection};

use super::schema::TENANT_GROUP_ROLE;
use super::{scram, sqlstate, Result, ServerAdmin};

/// Attributes of every tenant login role; the password as a SCRAM verifier.
fn role_attributes(password: &str, limit: i32) -> String {
    let verifier = scram::verifier(password);
    format!(
        "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT CONNECTION LIMIT {limit} PASSWORD '{verifier}'"
    )
}

/// PUBLIC loses its default access to `database`; the tenant role may connect.
pub fn database_grants(database: &str, role: &str) -> String {
    format!(
        "REVOKE ALL ON DATABASE \"{database}\" FROM PUBLIC; GRANT CONNECT, TEMPORARY ON DATABASE \"{database}\" TO \"{role}\""
    )
}

/// Create the tenant's login role, in the data-access group, before its
/// database exists (or reset it, if a crashed attempt made it).
pub async fn create_login_role(
    admin: &ServerAdmin,
    role: &str,
    password: &str,
    limit: i32,
) -> Result<()> {
    let attrs = role_attributes(password, limit);
    match admin
        .exec(&format!(
            "CREATE ROLE \"{role}\" {attrs} IN ROLE {TENANT_GROUP_ROLE}"
        ))
        .await
    {
        Err(e) if e.is(sqlstate::DUPLICATE_OBJECT) => {
            admin
                .exec(&format!(
                    "ALTER ROLE \"{role}\" {attrs}; GRANT {TENANT_GROUP_ROLE} TO \"{role}\""
                ))
                .await
        }
        other => other,
    }
}

/// Create the tenant's login role (or reset it, if a crashed attempt made it)
/// and give it CONNECT on its database only, in one transaction.
pub async fn create_role(
    admin: &ServerAdmin,
    role: &str,
    database: &str,
    password: &str,
    limit: i32,
) -> Result<()> {
    let attrs = role_attributes(password, limit);
    let grants = database_grants(database, role);
    // A multi-statement string runs as one implicit transaction: one commit.
    let create = format!("CREATE ROLE \"{role}\" {attrs} IN ROLE {TENANT_GROUP_ROLE}; {grants}");
    match admin.exec(&create).await {
        Err(e) if e.is(sqlstate::DUPLICATE_OBJECT) => {
            let reset = format!(
                "ALTER ROLE \"{role}\" {attrs}; GRANT {TENANT_GROUP_ROLE} TO \"{role}\"; {grants}"
            );
            admin.exec(&reset).await
        }
        other => other,
    }
}

/// The tenant role can log in to its database and nobody else may connect,
/// as the shared catalogs say (no session in the database needed).
pub async fn verify_role_catalog(
    admin: &ServerAdmin,
    database: &str,
    role: &str,
) -> anyhow::Result<()> {
    let ok: bool = sqlx::query_scalar(&format!(
        "SELECT coalesce((SELECT rolcanlogin FROM pg_roles WHERE rolname = $1), false)
            AND has_database_privilege($1, $2, 'CONNECT')
            AND pg_has_role($1, '{TENANT_GROUP_ROLE}', 'MEMBER')
            AND NOT has_database_privilege('public', $2, 'CONNECT')"
    ))
    .bind(role)
    .bind(database)
    .fetch_one(&admin.pool)
    .await
    .map_err(|e| admin.error(None, e))?;
    anyhow::ensure!(
        ok,
        "the tenant role is not set up to use its database alone"
    );
    Ok(())
}

/// Log in as the tenant role and read its tables.
pub async fn verify_login(
    admin: &ServerAdmin,
    database: &str,
    role: &str,
    password: &str,
) -> Result<()> {
    let wrap = |e| admin.error(Some(database), e);
    let mut conn = admin
        .tenant_options(database, role, password)
        .connect()
        .await
        .map_err(wrap)?;
    // Schema-agnostic: the migrations table exists whatever the tenant schema.
    sqlx::query("SELECT count(*) FROM _sqlx_migrations")
        .execute(&mut conn)
        .await
        .map_err(wrap)?;
    conn.close().await.ok();
    Ok(())
}

/// Let the role log in, or not.
pub async fn set_role_login(admin: &ServerAdmin, role: &str, login: bool) -> Result<()> {
    let attr = if login { "LOGIN" } else { "NOLOGIN" };
    admin.exec(&format!("ALTER ROLE \"{role}\" {attr}")).await
}

/// Set the role's connection limit.
pub async fn set_connection_limit(admin: &ServerAdmin, role: &str, limit: i32) -> Result<()> {
    admin
        .exec(&format!("ALTER ROLE \"{role}\" CONNECTION LIMIT {limit}"))
        .await
}

/// End every session of the role.
pub async fn terminate_sessions(admin: &ServerAdmin, role: &str) -> Result<()> {
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1")
        .bind(role)
        .execute(&admin.pool)
        .await
        .map(|_| ())
        .map_err(|e| admin.error(None, e))
}

pub async fn database_exists(admin: &ServerAdmin, database: &str) -> Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(database)
        .fetch_one(&admin.pool)
        .await
        .map_err(|e| admin.error(None, e))
}

/// Drop a database, ending its sessions; nothing if it is gone.
pub async fn drop_database(admin: &ServerAdmin, database: &str) -> Result<()> {
    admin
        .exec(&format!(
            "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
        ))
        .await
}

/// Drop a role; nothing if it is gone.
pub async fn drop_role(admin: &ServerAdmin, role: &str) -> Result<()> {
    admin.exec(&format!("DROP ROLE IF EXISTS \"{role}\"")).await
}

/// Rename `db` out of every sweep's way, to `silo_kept_<tenant>_<time>`:
/// silo never drops such a database. Returns its new name.
pub async fn set_aside(
    admin: &ServerAdmin,
    db: &str,
    tenant: uuid::Uuid,
) -> anyhow::Result<String> {
    use anyhow::Context;
    if !database_exists(admin, db).await? {
        anyhow::bail!("database {db} is not there to keep");
    }
    let kept = super::names::kept_db(tenant);
    let mut tries = 0;
    loop {
        // A rename needs the database to itself.
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(db)
        .execute(&admin.pool)
        .await
        .map_err(|e| admin.error(None, e))?;
        match admin
            .exec(&format!("ALTER DATABASE \"{db}\" RENAME TO \"{kept}\""))
            .await
        {
            Ok(()) => break,
            Err(e) if tries < 5 => {
                tries += 1;
                tracing::debug!("retrying a rename: {e:#}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).context("set the database aside"),
        }
    }
    tracing::warn!(tenant_id = %tenant, database = kept, "kept a tenant's old database aside (silo never drops it)");
    Ok(kept)
}
