//! Tenant roles and databases on a server: how silo creates, opens, closes
//! and drops them. Every statement names only silo's own objects, whose
//! names come from [`super::names`] (never from a client).

use sqlx::{ConnectOptions, Connection};

use super::schema::LEGACY_GROUP_ROLE;
use super::{scram, sqlstate, Result, ServerAdmin};

/// Attributes of every tenant login role; the password as a SCRAM verifier.
fn role_attributes(password: &str, limit: i32) -> String {
    role_attributes_as(password, limit, true)
}

fn role_attributes_as(password: &str, limit: i32, login: bool) -> String {
    let verifier = scram::verifier(password);
    let login = if login { "LOGIN" } else { "NOLOGIN" };
    format!(
        "{login} NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT CONNECTION LIMIT {limit} PASSWORD '{verifier}'"
    )
}

/// `ALTER ROLE … SET` of the settings silo gives every tenant role (see
/// [`super::RoleSettings`]), to follow a statement that makes `role`. An
/// admin login that may not set them (not a superuser) makes the role
/// without them, with a warning in the server's log.
fn settings_sql(admin: &ServerAdmin, role: &str) -> String {
    let Some(set) = admin.role_settings.alter_sql(&format!("\"{role}\"")) else {
        return String::new();
    };
    format!(
        " DO $$ BEGIN {set}; EXCEPTION WHEN insufficient_privilege THEN \
         RAISE WARNING 'silo could not limit a tenant role''s temporary files: %', SQLERRM; END $$;"
    )
}

/// How long one of silo's statements on a tenant role waits for the role's
/// catalog row. A tenant role may alter itself (its own password or
/// settings) and keep that row locked in an open transaction as long as it
/// likes; silo's suspend, rotation or plan change must not wait on it.
const ROLE_LOCK_WAIT: &str = "5s";

/// Run `sql` (statements on `role` and its reader only) waiting at most
/// [`ROLE_LOCK_WAIT`] for their catalog rows. Only the role's own sessions
/// can hold them (no other role may alter it): if one does, the role's and
/// its reader's sessions are ended (a tenant that locks its own role loses
/// its sessions when silo must change it) and `sql` runs again. Never
/// logged when `quiet` (a verifier in it).
async fn on_role(admin: &ServerAdmin, role: &str, sql: &str, quiet: bool) -> Result<()> {
    let guarded = format!("SET LOCAL lock_timeout = '{ROLE_LOCK_WAIT}'; {sql}");
    let run = |sql: String| async move {
        if quiet {
            admin.exec_quietly(&sql).await
        } else {
            admin.exec(&sql).await
        }
    };
    match run(guarded.clone()).await {
        Err(e) if e.is(sqlstate::LOCK_NOT_AVAILABLE) => {
            tracing::warn!(server = %admin.name, role,
                "one of the role's own sessions holds its catalog row: ending its sessions");
            terminate_sessions(admin, role).await?;
            run(guarded).await
        }
        other => other,
    }
}

/// The role leaves the legacy group (which once held data privileges in
/// every tenant database), where that group exists.
pub async fn leave_legacy_group(admin: &ServerAdmin, role: &str) -> Result<()> {
    admin.exec(&leave_legacy_group_sql(role)).await
}

fn leave_legacy_group_sql(role: &str) -> String {
    format!(
        "DO $$ BEGIN
           IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{LEGACY_GROUP_ROLE}') THEN
             EXECUTE 'REVOKE {LEGACY_GROUP_ROLE} FROM \"{role}\"';
           END IF;
         END $$"
    )
}

/// Create a database nobody can connect to yet (not even silo): it is
/// opened, to its tenant's role alone, by [`database_grants`] once locked
/// down. `from` is the template (`template0` when none is given, never
/// `template1`, which other roles may have written to).
pub async fn create_database(
    admin: &ServerAdmin,
    name: &str,
    from: Option<&str>,
    options: &str,
) -> Result<()> {
    let template = from.unwrap_or("template0");
    admin
        .exec(&format!(
            "CREATE DATABASE \"{name}\" TEMPLATE \"{template}\" {options} ALLOW_CONNECTIONS false"
        ))
        .await
}

/// PUBLIC loses its default access to `database`, `role` (if any) may
/// connect, and connections are allowed: one transaction, so the database
/// is never connectable by anyone but its role and silo.
pub fn database_grants(database: &str, role: Option<&str>) -> String {
    let grant = role
        .map(|role| {
            let mut grant =
                format!("GRANT CONNECT, TEMPORARY ON DATABASE \"{database}\" TO \"{role}\";");
            // Its reader, if it has one, may connect (and nothing more).
            if let Some(reader) = super::names::reader_role(role) {
                grant.push_str(&format!(
                    " DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{reader}') THEN \
                     GRANT CONNECT ON DATABASE \"{database}\" TO \"{reader}\"; END IF; END $$;"
                ));
            }
            grant
        })
        .unwrap_or_default();
    format!(
        "REVOKE ALL ON DATABASE \"{database}\" FROM PUBLIC; {grant} ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS true"
    )
}

/// Create the tenant's login role before its database exists (or reset it,
/// if a crashed attempt made it).
pub async fn create_login_role(
    admin: &ServerAdmin,
    role: &str,
    password: &str,
    limit: i32,
) -> Result<()> {
    let attrs = role_attributes(password, limit);
    let settings = settings_sql(admin, role);
    match admin
        .exec_quietly(&format!("CREATE ROLE \"{role}\" {attrs};{settings}"))
        .await
    {
        Err(e) if e.is(sqlstate::DUPLICATE_OBJECT) => {
            let reset = format!(
                "ALTER ROLE \"{role}\" {attrs}; {};{settings}",
                leave_legacy_group_sql(role)
            );
            on_role(admin, role, &reset, true).await
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
    let grants = database_grants(database, Some(role));
    let settings = settings_sql(admin, role);
    // A multi-statement string runs as one implicit transaction: one commit.
    let create = format!("CREATE ROLE \"{role}\" {attrs}; {grants};{settings}");
    match admin.exec_quietly(&create).await {
        Err(e) if e.is(sqlstate::DUPLICATE_OBJECT) => {
            let reset = format!(
                "ALTER ROLE \"{role}\" {attrs}; {}; {grants};{settings}",
                leave_legacy_group_sql(role)
            );
            on_role(admin, role, &reset, true).await
        }
        other => other,
    }
}

/// The tenant role can log in to its database, nobody else may connect, and
/// the role belongs to no group, as the shared catalogs say (no session in
/// the database needed).
pub async fn verify_role_catalog(
    admin: &ServerAdmin,
    database: &str,
    role: &str,
) -> anyhow::Result<()> {
    let ok: bool = sqlx::query_scalar(
        "SELECT coalesce((SELECT rolcanlogin FROM pg_roles WHERE rolname = $1), false)
            AND has_database_privilege($1, $2, 'CONNECT')
            AND NOT has_database_privilege('public', $2, 'CONNECT')
            AND (SELECT datallowconn FROM pg_database WHERE datname = $2)
            AND NOT EXISTS (SELECT 1 FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member
                             WHERE r.rolname = $1)",
    )
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

/// Sessions in `database` of any role but `allowed` and silo's own admin
/// login: there must be none in a database silo just created.
pub async fn foreign_sessions(
    admin: &ServerAdmin,
    database: &str,
    allowed: Option<&str>,
) -> Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT DISTINCT usename::text FROM pg_stat_activity
          WHERE datname = $1 AND usename IS NOT NULL AND usename <> current_user
            AND ($2::text IS NULL OR usename <> $2)",
    )
    .bind(database)
    .bind(allowed)
    .fetch_all(&admin.pool)
    .await
    .map_err(|e| admin.error(None, e))
}

/// Log in as the tenant role and read its tables.
pub async fn verify_login(
    admin: &ServerAdmin,
    database: &str,
    role: &str,
    password: &str,
) -> Result<()> {
    let wrap = |e| super::Error {
        role: Some(role.to_owned()),
        ..admin.error(Some(database), e)
    };
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
    let mut sql = format!("ALTER ROLE \"{role}\" {attr};");
    // Its reader, if it has one, follows.
    if let Some(reader) = super::names::reader_role(role) {
        sql.push_str(&format!(
            " DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{reader}') THEN \
             ALTER ROLE \"{reader}\" {attr}; END IF; END $$;"
        ));
    }
    on_role(admin, role, &sql, false).await
}

/// Set the role's connection limit (and its reader's, if it has one).
pub async fn set_connection_limit(admin: &ServerAdmin, role: &str, limit: i32) -> Result<()> {
    on_role(admin, role, &connection_limit_sql(role, limit), false).await
}

fn connection_limit_sql(role: &str, limit: i32) -> String {
    let mut sql = format!("ALTER ROLE \"{role}\" CONNECTION LIMIT {limit};");
    if let Some(reader) = super::names::reader_role(role) {
        sql.push_str(&format!(
            " DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{reader}') THEN \
             ALTER ROLE \"{reader}\" CONNECTION LIMIT {limit}; END IF; END $$;"
        ));
    }
    sql
}

/// How long the batch of [`set_connection_limits`] waits for any one role.
const BATCH_ROLE_LOCK_WAIT: &str = "1s";

/// Set the connection limit of each of these roles (silo's own role names),
/// a few hundred statements per round trip. A role one of its own sessions
/// holds locked (see [`ROLE_LOCK_WAIT`]) is skipped after a short wait,
/// with a warning from the server: the others are set, and the usage pass,
/// which compares every role's limit with its plan's, sets it later.
pub async fn set_connection_limits(
    admin: &ServerAdmin,
    roles: &[String],
    limit: i32,
) -> Result<()> {
    for chunk in roles.chunks(500) {
        let mut sql = format!("SET LOCAL lock_timeout = '{BATCH_ROLE_LOCK_WAIT}';");
        for role in chunk {
            let mut each = format!("ALTER ROLE \"{role}\" CONNECTION LIMIT {limit};");
            if let Some(reader) = super::names::reader_role(role) {
                each.push_str(&format!(
                    " IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{reader}') THEN \
                     ALTER ROLE \"{reader}\" CONNECTION LIMIT {limit}; END IF;"
                ));
            }
            sql.push_str(&format!(
                " DO $$ BEGIN {each} EXCEPTION WHEN lock_not_available THEN \
                 RAISE WARNING 'role {role} is held by one of its sessions: its connection limit is left for a later pass'; END $$;"
            ));
        }
        admin.exec(&sql).await?;
    }
    Ok(())
}

/// What [`settle_role_settings`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct SettingsSettled {
    /// Settings roles gave themselves, reset (rows of `pg_db_role_setting`).
    pub reset: u32,
    /// Roles given silo's own settings (see [`super::RoleSettings`]), which
    /// they lacked or held with another value.
    pub set: u32,
}

/// Most roles given silo's settings in one pass (the first pass after an
/// upgrade finds every role without them).
const SETTINGS_PER_PASS: i64 = 500;

/// Make the settings of tenant roles (and readers) silo's own and nothing
/// else. A role may `ALTER ROLE` itself `SET …` (for every database or its
/// own), which silo never does but for its own superuser-only settings
/// ([`super::RoleSettings`], which a role cannot change). Such a setting
/// breaks what silo runs as the role (a `search_path` without `public`
/// turned the app API's answers into 500s, `default_transaction_read_only`
/// its writes) and grows a catalog shared by every tenant of the cluster:
/// reset, and the role's sessions ended (they keep the settings they
/// started with). A role one of its own sessions holds locked is left for a
/// later pass. Then every role that lacks silo's settings, or holds them
/// with another value (the configuration changed), gets them, its sessions
/// kept: up to [`SETTINGS_PER_PASS`] a pass, and only where this admin
/// login may set them (a superuser).
pub async fn settle_role_settings(admin: &ServerAdmin) -> Result<SettingsSettled> {
    let wrap = |e| admin.error(None, e);
    let want = admin.role_settings.setconfig();
    let prefixes = format!(
        "(starts_with(r.rolname, '{}') OR starts_with(r.rolname, '{}'))",
        super::names::TENANT_ROLE_PREFIX,
        super::names::READER_ROLE_PREFIX
    );
    let rows: Vec<(String, Option<String>, Vec<String>)> = sqlx::query_as(&format!(
        "SELECT r.rolname::text, d.datname::text, coalesce(s.setconfig, '{{}}')
           FROM pg_db_role_setting s
           JOIN pg_roles r ON r.oid = s.setrole
           LEFT JOIN pg_database d ON d.oid = s.setdatabase
          WHERE {prefixes}"
    ))
    .fetch_all(&admin.pool)
    .await
    .map_err(wrap)?;
    let silos = |entry: &String| {
        entry.split_once('=').is_some_and(|(name, _)| {
            super::RoleSettings::names()
                .iter()
                .any(|n| name.eq_ignore_ascii_case(n))
        })
    };
    // Given by the role: any setting in one database, or one of its own
    // among those for every database.
    let given: Vec<&(String, Option<String>, Vec<String>)> = rows
        .iter()
        .filter(|(_, db, config)| db.is_some() || !config.iter().all(silos))
        .collect();
    let ident = |name: &str| format!("\"{}\"", name.replace('"', "\"\""));
    // silo's own settings for every database, after a `RESET ALL` of that
    // row in the same statement: never committed without them.
    let ours = |role: &str| {
        admin
            .role_settings
            .alter_sql(&ident(role))
            .map(|set| format!("; {set}"))
            .unwrap_or_default()
    };
    let mut settled = SettingsSettled::default();
    if !given.is_empty() {
        let mut sql = format!("SET LOCAL lock_timeout = '{BATCH_ROLE_LOCK_WAIT}';");
        for (role, database, _) in &given {
            let reset = match database {
                Some(db) => format!(
                    "ALTER ROLE {} IN DATABASE {} RESET ALL",
                    ident(role),
                    ident(db)
                ),
                None => format!("ALTER ROLE {} RESET ALL{}", ident(role), ours(role)),
            };
            // In a DO block under a tag no name in it contains (a
            // database's name, which a role may name in `ALTER ROLE … IN
            // DATABASE`, could hold `$$`).
            let mut tag = format!("silo_{}", uuid::Uuid::new_v4().simple());
            while reset.contains(&tag) {
                tag = format!("silo_{}", uuid::Uuid::new_v4().simple());
            }
            sql.push_str(&format!(
                " DO ${tag}$ BEGIN {reset}; EXCEPTION WHEN lock_not_available THEN \
                 RAISE WARNING 'a session of the role holds its settings: reset on a later pass'; END ${tag}$;"
            ));
        }
        admin.exec(&sql).await?;
        // Sessions opened under them keep them (the router's pooled
        // connections too): ended, and waited for (up to 5 s each), so what
        // replaces them starts clean.
        let roles: Vec<&str> = given.iter().map(|(r, _, _)| r.as_str()).collect();
        sqlx::query(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = ANY($1)",
        )
        .bind(&roles)
        .execute(&admin.pool)
        .await
        .map_err(wrap)?;
        tracing::warn!(server = %admin.name, settings = given.len(), "reset settings tenant roles gave themselves (ALTER ROLE ... SET), and ended their sessions");
        settled.reset = given.len() as u32;
    }
    // silo's own: to roles whose settings for every database are not
    // exactly them (none, or another value), where this login may set them.
    let unsettled: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT r.rolname::text FROM pg_roles r
          WHERE {prefixes}
            AND coalesce((SELECT s.setconfig FROM pg_db_role_setting s
                           WHERE s.setrole = r.oid AND s.setdatabase = 0), '{{}}') <> $1::text[]
          ORDER BY r.rolname LIMIT {SETTINGS_PER_PASS}"
    ))
    .bind(&want)
    .fetch_all(&admin.pool)
    .await
    .map_err(wrap)?;
    if unsettled.is_empty() {
        return Ok(settled);
    }
    let may_set: bool =
        sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            .fetch_one(&admin.pool)
            .await
            .map_err(wrap)?;
    if !may_set {
        return Ok(settled);
    }
    // One role at a time, as every statement of silo's on a role: a role
    // whose own session holds its row (an open transaction that altered
    // it) has its sessions ended after a wait, then is set.
    for role in &unsettled {
        let set = format!("ALTER ROLE {} RESET ALL{}", ident(role), ours(role));
        match on_role(admin, role, &set, false).await {
            Ok(()) => settled.set += 1,
            Err(e) => {
                tracing::warn!(server = %admin.name, role, "failed to give a tenant role silo's settings (next pass): {e}")
            }
        }
    }
    Ok(settled)
}

/// End the clones of spares and of the template that a dead silo process
/// left running: PostgreSQL finishes a statement whose client is gone, so
/// such a clone can commit after a sweep looked and leave a database (or
/// role) nobody sweeps until the next pass. Only the holder of the server's
/// maintenance lock makes spares and templates, so the caller, holding it,
/// knows any such statement still running is a dead process's. Each
/// session is waited for (up to five seconds); the answer is how many
/// ended and how many are still there after that wait (the caller must
/// not sweep then: the clone could still commit).
pub async fn end_abandoned_clones(admin: &ServerAdmin) -> Result<(u32, u32)> {
    let abandoned = format!(
        "^CREATE (DATABASE \"({spare}|{template}\")|ROLE \"{role})",
        spare = super::names::SPARE_DB_PREFIX,
        template = super::names::TEMPLATE_DB,
        role = super::names::SPARE_ROLE_PREFIX,
    );
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
          WHERE usename = session_user AND pid <> pg_backend_pid()
            AND state = 'active' AND query ~ $1",
    )
    .bind(abandoned)
    .fetch_all(&admin.pool)
    .await
    .map_err(|e| admin.error(None, e))?;
    let done = ended.iter().filter(|e| **e).count() as u32;
    Ok((done, ended.len() as u32 - done))
}

/// Databases under `prefix` whose `CREATE DATABASE` is running now in
/// another session of silo's login, with that session's pid: a clone of a
/// live process, or one a dead process left running (see
/// [`end_abandoned_clones`]); the caller tells which by its lock.
pub async fn creations_running(admin: &ServerAdmin, prefix: &str) -> Result<Vec<(String, i32)>> {
    sqlx::query_as(
        "SELECT substring(query from '^CREATE DATABASE \"([^\"]+)\"'), pid FROM pg_stat_activity
          WHERE usename = session_user AND pid <> pg_backend_pid() AND state = 'active'
            AND starts_with(query, 'CREATE DATABASE \"' || $1)",
    )
    .bind(prefix)
    .fetch_all(&admin.pool)
    .await
    .map_err(|e| admin.error(None, e))
}

/// End session `pid` if it is still creating `database` (checked in the
/// same statement, so a pid reused since it was listed is never ended),
/// and wait up to five seconds for it to be gone: `Some(true)` when it is
/// (the creation committed before, or never will), `Some(false)` when it
/// is still there, `None` when it had already stopped creating it.
pub async fn end_creation(admin: &ServerAdmin, pid: i32, database: &str) -> Result<Option<bool>> {
    sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
          WHERE pid = $1 AND usename = session_user AND state = 'active'
            AND starts_with(query, 'CREATE DATABASE \"' || $2 || '\"')",
    )
    .bind(pid)
    .bind(database)
    .fetch_optional(&admin.pool)
    .await
    .map_err(|e| admin.error(None, e))
}

/// End every session of the role.
pub async fn terminate_sessions(admin: &ServerAdmin, role: &str) -> Result<()> {
    let reader = super::names::reader_role(role).unwrap_or_default();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1 OR usename = $2",
    )
    .bind(role)
    .bind(reader)
    .execute(&admin.pool)
    .await
    .map(|_| ())
    .map_err(|e| admin.error(None, e))
}

/// The stored password verifiers (`pg_authid.rolpassword`) of those of
/// `roles` that exist; `None` when this admin login may not read them
/// (only a superuser may).
pub async fn password_verifiers(
    admin: &ServerAdmin,
    roles: &[String],
) -> Result<Option<std::collections::HashMap<String, Option<String>>>> {
    let rows = sqlx::query_as::<_, (String, Option<String>)>(
        "SELECT rolname::text, rolpassword FROM pg_authid WHERE rolname = ANY($1)",
    )
    .bind(roles)
    .fetch_all(&admin.pool)
    .await;
    match rows {
        Ok(rows) => Ok(Some(rows.into_iter().collect())),
        Err(e) if sqlstate::is(&e, sqlstate::INSUFFICIENT_PRIVILEGE) => Ok(None),
        Err(e) => Err(admin.error(None, e)),
    }
}

/// Give a tenant role a new password (as a SCRAM verifier: the password
/// itself never reaches the server's logs).
pub async fn set_password(admin: &ServerAdmin, role: &str, password: &str) -> Result<()> {
    let sql = format!(
        "ALTER ROLE \"{role}\" PASSWORD '{}'",
        scram::verifier(password)
    );
    on_role(admin, role, &sql, true).await
}

/// End the sessions `role` has open now (after its password changed: they
/// logged in with the old one). Idle ones end at once; a session busy with
/// a statement gets up to `grace` to finish it, then ends too. Sessions
/// opened from here on are left alone.
pub async fn end_sessions_open_now(
    admin: &ServerAdmin,
    role: &str,
    grace: std::time::Duration,
) -> Result<u64> {
    let wrap = |e| admin.error(None, e);
    let cutoff: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&admin.pool)
        .await
        .map_err(wrap)?;
    let end = |busy_too: bool| {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
              WHERE usename = $1 AND backend_start < $2 AND ($3 OR state IS DISTINCT FROM 'active')",
        )
        .bind(role)
        .bind(cutoff)
        .bind(busy_too)
        .fetch_one(&admin.pool)
    };
    let mut ended = end(false).await.map_err(wrap)? as u64;
    let deadline = std::time::Instant::now() + grace;
    loop {
        let busy: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND backend_start < $2",
        )
        .bind(role)
        .bind(cutoff)
        .fetch_one(&admin.pool)
        .await
        .map_err(wrap)?;
        if busy == 0 {
            return Ok(ended);
        }
        if std::time::Instant::now() >= deadline {
            ended += end(true).await.map_err(wrap)? as u64;
            return Ok(ended);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        ended += end(false).await.map_err(wrap)? as u64;
    }
}

pub async fn role_exists(admin: &ServerAdmin, role: &str) -> Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
        .bind(role)
        .fetch_one(&admin.pool)
        .await
        .map_err(|e| admin.error(None, e))
}

/// Make a tenant's login role again where it is gone from its server, in
/// one transaction: its recorded password, `LOGIN` only if `login`, and
/// its database's grants (as [`create_role`]). `false`, changing nothing,
/// if the role is there after all.
pub async fn make_role_again(
    admin: &ServerAdmin,
    role: &str,
    database: &str,
    password: &str,
    limit: i32,
    login: bool,
) -> Result<bool> {
    let attrs = role_attributes_as(password, limit, login);
    let grants = database_grants(database, Some(role));
    let settings = settings_sql(admin, role);
    match admin
        .exec_quietly(&format!(
            "CREATE ROLE \"{role}\" {attrs}; {grants};{settings}"
        ))
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if e.is(sqlstate::DUPLICATE_OBJECT) => Ok(false),
        Err(e) => Err(e),
    }
}

pub async fn database_exists(admin: &ServerAdmin, database: &str) -> Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(database)
        .fetch_one(&admin.pool)
        .await
        .map_err(|e| admin.error(None, e))
}

/// Drop a database, ending its sessions; nothing if it is gone. On a
/// connection of its own (`DROP DATABASE` runs outside any transaction, so
/// its lock wait is bounded by the connection's setting): see
/// [`on_database`].
pub async fn drop_database(admin: &ServerAdmin, database: &str) -> Result<()> {
    let drop = format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)");
    freeing_locks(admin, database, || {
        admin.exec_waiting_at_most(&drop, DATABASE_LOCK_WAIT)
    })
    .await
}

/// How long a drop or rename of a database waits for the locks on it
/// before the tenant sessions holding them are ended.
const DATABASE_LOCK_WAIT: &str = "5s";

/// Run `sql`, a rename of `database` with statements in the same
/// transaction, through the admin pool. Such DDL (and a drop) waits for
/// every lock on the database, and any role can take one on any database:
/// `ALTER ROLE CURRENT_USER IN DATABASE <another tenant's> SET …` in a
/// transaction left open would stall another tenant's delete, archive,
/// restore or move forever (and, queued behind it, every new connection to
/// that database). So it waits at most [`DATABASE_LOCK_WAIT`]; then the
/// sessions of tenant roles and readers holding a lock on the database are
/// ended and it runs again, three times at most. A lock held by any other
/// session (an operator's) fails it with PostgreSQL's lock timeout error.
pub async fn on_database(admin: &ServerAdmin, database: &str, sql: &str) -> Result<()> {
    let guarded = format!("SET LOCAL lock_timeout = '{DATABASE_LOCK_WAIT}'; {sql}");
    freeing_locks(admin, database, || admin.exec(&guarded)).await
}

/// `run` until it does not time out on a lock, ending the tenant sessions
/// that hold one on `database` after each time out (three tries).
async fn freeing_locks<F, Fut>(admin: &ServerAdmin, database: &str, run: F) -> Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut tries = 0;
    loop {
        match run().await {
            Err(e) if e.is(sqlstate::LOCK_NOT_AVAILABLE) && tries < 2 => {
                tries += 1;
                let ended = end_tenant_lock_holders(admin, database).await?;
                tracing::warn!(server = %admin.name, database, ended,
                    "tenant sessions held a lock on a database silo drops or renames: ended");
            }
            other => return other,
        }
    }
}

/// End the sessions of tenant roles and readers holding a lock on the
/// database object `database` (not sessions connected to it: those hold
/// none); how many.
async fn end_tenant_lock_holders(admin: &ServerAdmin, database: &str) -> Result<u64> {
    let ended: Vec<bool> = sqlx::query_scalar(&format!(
        "SELECT pg_terminate_backend(l.pid, 5000)
           FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE l.locktype = 'object' AND l.granted
            AND l.classid = 'pg_database'::regclass
            AND l.objid = (SELECT oid FROM pg_database WHERE datname = $1)
            AND l.pid <> pg_backend_pid()
            AND (starts_with(a.usename, '{}') OR starts_with(a.usename, '{}'))",
        super::names::TENANT_ROLE_PREFIX,
        super::names::READER_ROLE_PREFIX
    ))
    .bind(database)
    .fetch_all(&admin.pool)
    .await
    .map_err(|e| admin.error(None, e))?;
    Ok(ended.len() as u64)
}

/// Drop a role (and a tenant role's reader); nothing if it is gone. A
/// role still granted something in a database that remains (a database set
/// aside, say) has those grants taken away first, database by database.
pub async fn drop_role(admin: &ServerAdmin, role: &str) -> Result<()> {
    let Some(reader) = super::names::reader_role(role) else {
        return drop_one_role(admin, role).await;
    };
    // Both in one statement (neither outlives the other), unless one still
    // holds grants somewhere: then each on its own.
    match admin
        .exec(&format!("DROP ROLE IF EXISTS \"{role}\", \"{reader}\""))
        .await
    {
        Err(e) if e.is(sqlstate::DEPENDENT_OBJECTS_STILL_EXIST) => {
            drop_one_role(admin, role).await?;
            drop_one_role(admin, &reader).await
        }
        other => other,
    }
}

async fn drop_one_role(admin: &ServerAdmin, role: &str) -> Result<()> {
    let drop = format!("DROP ROLE IF EXISTS \"{role}\"");
    match on_role(admin, role, &drop, false).await {
        Err(e) if e.is(sqlstate::DEPENDENT_OBJECTS_STILL_EXIST) => {
            let databases: Vec<String> = sqlx::query_scalar(
                "SELECT DISTINCT d.datname::text FROM pg_shdepend s
                   JOIN pg_roles r ON r.oid = s.refobjid
                   JOIN pg_database d ON d.oid = s.dbid OR (s.classid = 'pg_database'::regclass AND d.oid = s.objid)
                  WHERE r.rolname = $1",
            )
            .bind(role)
            .fetch_all(&admin.pool)
            .await
            .map_err(|e| admin.error(None, e))?;
            for db in databases {
                admin
                    .exec(&format!("REVOKE ALL ON DATABASE \"{db}\" FROM \"{role}\""))
                    .await?;
                let pool = admin.single_pool(&db).await?;
                let revoked = sqlx::raw_sql(&tenant_revokes(role)).execute(&pool).await;
                pool.close().await;
                revoked.map_err(|e| admin.error(Some(&db), e))?;
            }
            on_role(admin, role, &drop, false).await
        }
        other => other,
    }
}

/// Take back what [`super::schema::tenant_grants`] gave `role` in a database.
fn tenant_revokes(role: &str) -> String {
    format!(
        "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM \"{role}\";
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM \"{role}\";
REVOKE ALL ON SCHEMA public FROM \"{role}\";
ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE ALL ON TABLES FROM \"{role}\";
ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE ALL ON SEQUENCES FROM \"{role}\";
DO $$ BEGIN
  IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
    REVOKE EXECUTE ON FUNCTION {} FROM \"{role}\";
  END IF;
END $$;",
        super::schema::LARGE_OBJECT_WRITES
    )
}

/// Create (or reset) a tenant's reader role, which may CONNECT to the
/// tenant's database and nothing else yet: its SELECT privileges come with
/// the tenant role's (`schema::grant`).
pub async fn create_reader(
    admin: &ServerAdmin,
    reader: &str,
    database: &str,
    password: &str,
    limit: i32,
) -> Result<()> {
    let attrs = role_attributes(password, limit);
    let connect = format!("GRANT CONNECT ON DATABASE \"{database}\" TO \"{reader}\"");
    let settings = settings_sql(admin, reader);
    match admin
        .exec_quietly(&format!(
            "CREATE ROLE \"{reader}\" {attrs}; {connect};{settings}"
        ))
        .await
    {
        Err(e) if e.is(sqlstate::DUPLICATE_OBJECT) => {
            let reset = format!("ALTER ROLE \"{reader}\" {attrs}; {connect};{settings}");
            on_role(admin, reader, &reset, true).await
        }
        other => other,
    }
}

/// Rename `db` out of every sweep's way, to `silo_kept_<tenant>_<time>`:
/// silo never drops such a database. Returns its new name.
pub async fn set_aside(
    admin: &ServerAdmin,
    db: &str,
    tenant: uuid::Uuid,
) -> anyhow::Result<String> {
    let kept = keep_database(admin, db, tenant, None).await?;
    tracing::warn!(tenant_id = %tenant, database = kept, "kept a tenant's old database aside (silo never drops it)");
    Ok(kept)
}

/// Rename `db` aside to `silo_kept_<tenant>_<time>`, its comment saying
/// when the reconciler may drop it (`None`: never). Returns its new name.
pub async fn keep_database(
    admin: &ServerAdmin,
    db: &str,
    tenant: uuid::Uuid,
    drop_after: Option<i64>,
) -> anyhow::Result<String> {
    use anyhow::Context;
    if !database_exists(admin, db).await? {
        anyhow::bail!("database {db} is not there to keep");
    }
    let kept = super::names::kept_db(tenant);
    let mark = kept_mark_sql("DATABASE", &kept, drop_after);
    // Closed to every role but its owner: a tenant role could connect to
    // the database a restore replaced and keep writing there, unmeasured.
    let closed = format!(
        "DO $$ DECLARE r text; BEGIN
           FOR r IN SELECT a.grantee::regrole::text
                      FROM pg_database d, aclexplode(d.datacl) a
                     WHERE d.datname = '{kept}' AND a.grantee <> 0 AND a.grantee <> d.datdba
           LOOP
             EXECUTE format('REVOKE ALL ON DATABASE %I FROM %s', '{kept}', r);
           END LOOP;
           REVOKE ALL ON DATABASE \"{kept}\" FROM PUBLIC;
         END $$"
    );
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
        // Rename and mark: one transaction.
        match on_database(
            admin,
            db,
            &format!("ALTER DATABASE \"{db}\" RENAME TO \"{kept}\"; {mark}; {closed}"),
        )
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
    Ok(kept)
}

/// Quarantine a tenant role no live tenant accounts for: it may no longer
/// log in, its sessions end, and it is renamed aside
/// (`silo_kept_<tenant>_<time>`), to be dropped after `drop_after`.
pub async fn keep_role(
    admin: &ServerAdmin,
    role: &str,
    tenant: uuid::Uuid,
    drop_after: Option<i64>,
) -> Result<String> {
    let kept = super::names::kept_db(tenant);
    on_role(
        admin,
        role,
        &format!("ALTER ROLE \"{role}\" NOLOGIN"),
        false,
    )
    .await?;
    terminate_sessions(admin, role).await?;
    let mark = kept_mark_sql("ROLE", &kept, drop_after);
    admin
        .exec(&format!(
            "ALTER ROLE \"{role}\" RENAME TO \"{kept}\"; {mark}"
        ))
        .await?;
    Ok(kept)
}

fn kept_mark_sql(kind: &str, name: &str, drop_after: Option<i64>) -> String {
    let mark = super::owner::KeptMark { drop_after };
    let comment =
        super::owner::quote_literal(&serde_json::to_string(&mark).expect("mark serializes"));
    format!("COMMENT ON {kind} \"{name}\" IS {comment}")
}

/// Databases and roles set aside (`silo_kept_*`), each with when it may be
/// dropped (`None`: never, or no mark silo can read).
pub async fn kept_objects(admin: &ServerAdmin) -> Result<Vec<Kept>> {
    let rows: Vec<(String, bool, Option<String>)> = sqlx::query_as(
        "SELECT datname::text, false, shobj_description(oid, 'pg_database')
           FROM pg_database WHERE datname LIKE 'silo\\_kept\\_%'
         UNION ALL
         SELECT rolname::text, true, shobj_description(oid, 'pg_authid')
           FROM pg_roles WHERE rolname LIKE 'silo\\_kept\\_%'",
    )
    .fetch_all(&admin.pool)
    .await
    .map_err(|e| admin.error(None, e))?;
    Ok(rows
        .into_iter()
        .map(|(name, role, comment)| Kept {
            name,
            role,
            drop_after: comment
                .and_then(|c| serde_json::from_str::<super::owner::KeptMark>(&c).ok())
                .and_then(|m| m.drop_after),
        })
        .collect())
}

/// A database or role set aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub name: String,
    /// A role (else a database).
    pub role: bool,
    /// Unix seconds after which it may be dropped; `None`: never.
    pub drop_after: Option<i64>,
}
