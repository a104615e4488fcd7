//! The tenant schema: the migrations every tenant database gets (the
//! reference clinic schema embedded from `migrations/tenant`, or a team's own
//! with `SILO_TENANT_MIGRATIONS`) and the privileges that follow them.
//!
//! Isolation is PostgreSQL's: inside a tenant database, data privileges go
//! to that tenant's own login role and to no other role ([`tenant_grants`]),
//! and only that role may connect to it. No role holds privileges in more
//! than one tenant database, so a session that somehow got into another
//! tenant's database could read and write nothing there. The template and
//! spares carry no privilege a tenant role could use (a spare's privileges
//! are its own role's, which becomes the tenant's). A migration that has
//! shipped is never edited.

use std::sync::Arc;

use anyhow::Context;
use sqlx::migrate::Migrator;

static TENANT: Migrator = sqlx::migrate!("./migrations/tenant");

/// The NOLOGIN group role that, before per-tenant privileges, held data
/// privileges in every tenant database. Kept only to be taken away
/// ([`LEGACY_REVOKES`]); never granted anything again.
pub const LEGACY_GROUP_ROLE: &str = "silo_tenant_app";

/// Privileges inside a tenant database, for that tenant's role alone: data,
/// not schema; the migrations table read-only.
pub fn tenant_grants(role: &str) -> String {
    format!(
        "REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO \"{role}\";
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO \"{role}\";
REVOKE ALL ON TABLE _sqlx_migrations FROM \"{role}\";
GRANT SELECT ON TABLE _sqlx_migrations TO \"{role}\";
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO \"{role}\";
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO \"{role}\";
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO \"{role}\";
{LEGACY_REVOKES}
{HIDE_ACTIVITY}
{}
{}
{}",
        reader_grants(role),
        keep_read_only(role),
        server_file_revokes(Some(role))
    )
}

/// The functions that create or change large objects. Every role may call
/// them by default (large objects need no table privilege); where a reader
/// role exists they are the tenant role's alone. Never the server-side
/// `lo_import`/`lo_export`: they read and write the server's files.
pub const LARGE_OBJECT_WRITES: &str = "lo_creat(integer), lo_create(oid), \
lo_from_bytea(oid, bytea), lowrite(integer, bytea), lo_put(oid, bigint, bytea), \
lo_truncate(integer, integer), lo_truncate64(integer, bigint), lo_unlink(oid)";

/// The large-object functions that read or write files of the server
/// (any data file, any tenant's, the server's own secrets): PostgreSQL
/// lets only superusers call them, and so does silo. Earlier code of
/// silo granted `lo_import` with the large-object writes; this takes any
/// such grant back, from PUBLIC, the tenant role and its reader.
pub const SERVER_FILE_FUNCTIONS: &str = "pg_catalog.lo_import(text), \
pg_catalog.lo_import(text, oid), pg_catalog.lo_export(oid, text)";

/// Take [`SERVER_FILE_FUNCTIONS`] from everyone but superusers in this
/// database (only a superuser can have granted them, so only where silo's
/// login is one is there anything to take).
fn server_file_revokes(role: Option<&str>) -> String {
    let roles = role
        .into_iter()
        .flat_map(|r| [Some(r.to_owned()), super::names::reader_role(r)])
        .flatten()
        .map(|r| {
            format!(
                "IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{r}') THEN
      REVOKE EXECUTE ON FUNCTION {SERVER_FILE_FUNCTIONS} FROM \"{r}\";
    END IF;"
            )
        })
        .collect::<Vec<_>>()
        .join("\n    ");
    format!(
        "DO $$ BEGIN
  IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
    REVOKE EXECUTE ON FUNCTION {SERVER_FILE_FUNCTIONS} FROM PUBLIC;
    {roles}
  END IF;
END $$;"
    )
}

/// Privileges inside a tenant database for its reader role, if the tenant
/// has one: SELECT on tables and sequences, now and for what migrations
/// create later; nothing that writes (no `nextval`, no temporary tables:
/// it may only CONNECT to the database, no large objects where silo's
/// login may take them away from PUBLIC, a superuser). Part of
/// [`tenant_grants`], so every path that grants the tenant role (fleet
/// migrations, the reconciler, moves, restores) grants its reader too.
fn reader_grants(role: &str) -> String {
    let Some(reader) = super::names::reader_role(role) else {
        return String::new();
    };
    format!(
        "DO $$ BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{reader}') THEN
    GRANT USAGE ON SCHEMA public TO \"{reader}\";
    GRANT SELECT ON ALL TABLES IN SCHEMA public TO \"{reader}\";
    GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO \"{reader}\";
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO \"{reader}\";
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON SEQUENCES TO \"{reader}\";
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
      REVOKE EXECUTE ON FUNCTION {LARGE_OBJECT_WRITES} FROM PUBLIC;
      GRANT EXECUTE ON FUNCTION {LARGE_OBJECT_WRITES} TO \"{role}\";
    END IF;
  END IF;
END $$;"
    )
}

/// The storage quota, inside a tenant database: a tenant role that may
/// connect to its database but not create temporary tables there is
/// read-only (the usage collector took `TEMPORARY` away, see
/// [`set_read_only`]), and keeps only SELECT on tables and sequences, for
/// what exists and for what migrations create later (default privileges):
/// no INSERT, UPDATE, DELETE, TRUNCATE, no `nextval`, no large objects.
/// These are privileges, not settings: nothing a session may `SET`,
/// `RESET` or `SET ROLE` (the role belongs to no other) gives them back.
///
/// Part of [`tenant_grants`], so every path that grants a tenant its
/// privileges (provisioning, fleet migrations, the reconciler's regrant,
/// spares, moves, restores) keeps a read-only tenant read-only; the
/// database-level `TEMPORARY` is the state's one record that survives them.
/// A database the role may not connect to yet (a restore's scratch
/// database) is granted in full, and the restore re-applies the state
/// after it opens the database.
fn keep_read_only(role: &str) -> String {
    format!(
        "DO $$
DECLARE
  su boolean := (SELECT rolsuper FROM pg_roles WHERE rolname = current_user);
BEGIN
  IF has_database_privilege('{role}', current_database(), 'CONNECT')
     AND NOT has_database_privilege('{role}', current_database(), 'TEMPORARY') THEN
    {}
  ELSIF su AND NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{reader}') THEN
    -- Writable, and no reader role: large objects are PUBLIC's again (with
    -- a reader, `reader_grants` gave them to the tenant role alone).
    GRANT EXECUTE ON FUNCTION {LARGE_OBJECT_WRITES} TO PUBLIC;
  END IF;
END $$;",
        read_only_revokes(role),
        reader = super::names::reader_role(role).unwrap_or_default(),
    )
}

/// What a read-only tenant role loses, whatever the database's record says
/// (PL/pgSQL statements: inside a `DO` block).
fn read_only_revokes(role: &str) -> String {
    format!(
        "REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON ALL TABLES IN SCHEMA public FROM \"{role}\";
    REVOKE USAGE, UPDATE ON ALL SEQUENCES IN SCHEMA public FROM \"{role}\";
    ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON TABLES FROM \"{role}\";
    ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE USAGE, UPDATE ON SEQUENCES FROM \"{role}\";
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
      REVOKE EXECUTE ON FUNCTION {LARGE_OBJECT_WRITES} FROM PUBLIC;
      REVOKE EXECUTE ON FUNCTION {LARGE_OBJECT_WRITES} FROM \"{role}\";
    END IF;"
    )
}

/// Make a tenant database read-only for its role (`true`), or writable
/// again, in one transaction on a connection to that database: the
/// database-level `TEMPORARY` (the state's record) and every table and
/// sequence privilege ([`keep_read_only`]). Idempotent: applying the state
/// it is already in changes nothing, so a pass that crashed midway is
/// simply run again.
pub async fn set_read_only(
    db: &sqlx::PgPool,
    database: &str,
    role: &str,
    read_only: bool,
) -> anyhow::Result<()> {
    sqlx::raw_sql(&read_only_sql(database, role, read_only))
        .execute(db)
        .await
        .with_context(|| {
            if read_only {
                "make the tenant's database read-only"
            } else {
                "make the tenant's database writable"
            }
        })?;
    Ok(())
}

/// The statements of [`set_read_only`] (one implicit transaction). Read-only
/// takes the privileges whether or not the role may connect yet (a restore
/// makes its fresh database read-only before it opens it to the role).
pub fn read_only_sql(database: &str, role: &str, read_only: bool) -> String {
    if read_only {
        format!(
            "REVOKE TEMPORARY ON DATABASE \"{database}\" FROM \"{role}\";
{}
DO $$ BEGIN
    {}
END $$;",
            tenant_grants(role),
            read_only_revokes(role)
        )
    } else {
        format!(
            "GRANT TEMPORARY ON DATABASE \"{database}\" TO \"{role}\";\n{}",
            tenant_grants(role)
        )
    }
}

/// Privileges of the template (and of anything cloned from it before its
/// tenant's role is granted): nobody but the owner.
pub const TEMPLATE_GRANTS: &str = "REVOKE ALL ON SCHEMA public FROM PUBLIC;";

/// Where silo's admin login may (a superuser), tenant roles lose the views
/// of every session of the cluster (who else is connected, from where, to
/// which database): the catalog's activity view and the function under it,
/// in this database. Elsewhere they keep seeing what PostgreSQL shows every
/// role (never other roles' queries).
pub const HIDE_ACTIVITY: &str = "
DO $$ BEGIN
  IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
    REVOKE SELECT ON pg_catalog.pg_stat_activity FROM PUBLIC;
    REVOKE EXECUTE ON FUNCTION pg_catalog.pg_stat_get_activity(integer) FROM PUBLIC;
    -- The same sessions, one field at a time (their pids, databases, roles).
    REVOKE EXECUTE ON FUNCTION pg_catalog.pg_stat_get_backend_idset(),
      pg_catalog.pg_stat_get_backend_pid(integer),
      pg_catalog.pg_stat_get_backend_dbid(integer),
      pg_catalog.pg_stat_get_backend_userid(integer),
      pg_catalog.pg_stat_get_backend_client_addr(integer),
      pg_catalog.pg_stat_get_backend_activity_start(integer) FROM PUBLIC;
  END IF;
END $$;";

/// Take away whatever the legacy group role held in this database (a no-op
/// where the role does not exist).
pub const LEGACY_REVOKES: &str = "
DO $$ BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'silo_tenant_app') THEN
    EXECUTE 'REVOKE ALL ON ALL TABLES IN SCHEMA public FROM silo_tenant_app';
    EXECUTE 'REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM silo_tenant_app';
    EXECUTE 'REVOKE ALL ON SCHEMA public FROM silo_tenant_app';
    EXECUTE 'ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE ALL ON TABLES FROM silo_tenant_app';
    EXECUTE 'ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE ALL ON SEQUENCES FROM silo_tenant_app';
  END IF;
END $$;";

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

    /// Bring one database (a one-connection admin pool on it) to the latest
    /// schema and grant its privileges: to `role`, the tenant's own, or, for
    /// the template (`None`), to nobody. Idempotent. A pool rather than a bare
    /// connection: sqlx's `Migrator::run` over `&mut PgConnection` defeats the
    /// compiler's `Send` inference in spawned tasks.
    pub async fn apply(&self, db: &sqlx::PgPool, role: Option<&str>) -> anyhow::Result<i64> {
        self.0.run(db).await.context("apply tenant migrations")?;
        grant(db, role).await?;
        Ok(self.latest_version())
    }
}

/// Version of the newest tenant migration embedded in this binary.
pub fn latest_embedded_version() -> i64 {
    TenantSchema::embedded().latest_version()
}

/// Make (or reset) the reader role of the tenant whose role is `role`, on
/// the server of `admin`, and grant it what [`reader_grants`] says in the
/// tenant's `database`. Idempotent.
pub async fn ensure_reader(
    admin: &super::ServerAdmin,
    database: &str,
    role: &str,
    password: &str,
    limit: i32,
) -> anyhow::Result<()> {
    let reader = super::names::reader_role(role).context("a tenant role has a reader")?;
    super::roles::create_reader(admin, &reader, database, password, limit)
        .await
        .context("create the tenant's reader role")?;
    let db = admin
        .single_pool(database)
        .await
        .context("connect to the tenant's database")?;
    let granted = grant(&db, Some(role)).await;
    db.close().await;
    granted
}

/// Grant a database's privileges to `role` alone (`None`: the template's,
/// to nobody), taking away what the legacy group held.
pub async fn grant(db: &sqlx::PgPool, role: Option<&str>) -> anyhow::Result<()> {
    let sql = match role {
        Some(role) => tenant_grants(role),
        None => format!(
            "{TEMPLATE_GRANTS}\n{LEGACY_REVOKES}\n{HIDE_ACTIVITY}\n{}",
            server_file_revokes(None)
        ),
    };
    sqlx::raw_sql(&sql)
        .execute(db)
        .await
        .context("grant the tenant role its privileges")?;
    Ok(())
}
