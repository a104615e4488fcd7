//! The reconciler and the warm pool against a real server: orphans quarantined,
//! logins made to agree with the registry, spares kept ready and used.

use std::time::{Duration, Instant};

use crate::common::TestEnv;
use silo::control::ControlConfig;
use silo::provision::ProvisionConfig;
use silo::servers::names::{self, TEMPLATE_DB};
use sqlx::Connection;

async fn exec(env: &TestEnv, sql: &str) {
    sqlx::raw_sql(sql).execute(&env.admin).await.unwrap();
}

#[tokio::test]
async fn the_reconciler_quarantines_orphans_keeps_the_unknown_and_drops_stale_spares() {
    let env = TestEnv::setup()
        .keep_for(silo::domain::KeepFor(std::time::Duration::from_secs(1)))
        .start()
        .await;
    env.create("keeper").await;
    env.create("gone").await;
    let gone = env.record("gone").await;
    env.control.reconcile_once().await.unwrap();
    // A delete that marked its row but never dropped anything.
    sqlx::query("UPDATE tenants SET status = 'deleted' WHERE slug = 'gone'")
        .execute(env.registry().pool())
        .await
        .unwrap();
    // Objects the registry never heard of (a control DB restored to an earlier point).
    exec(
        &env,
        "CREATE DATABASE silo_t_00000000000000000000000000000bad",
    )
    .await;
    exec(
        &env,
        "CREATE ROLE silo_r_00000000000000000000000000000bad LOGIN",
    )
    .await;
    exec(
        &env,
        "CREATE DATABASE silo_spare_00000000000000000000000000000bad",
    )
    .await;
    sqlx::query("INSERT INTO spares (database_name, server_id, schema_version) SELECT 'silo_spare_missing', id, 1 FROM db_servers")
        .execute(env.registry().pool())
        .await
        .unwrap();

    let report = env.control.reconcile_once().await.unwrap();
    assert!(report.errors.is_empty(), "{report:?}");
    assert!(report.halted.is_empty(), "{report:?}");
    assert_eq!(
        (
            report.databases_quarantined,
            report.roles_quarantined,
            report.spares_dropped,
            report.unregistered.len(),
        ),
        (1, 1, 1, 2),
        "{report:?}"
    );
    // The unknown stays as it was; the deleted tenant's objects are aside, not gone.
    assert!(
        env.database_exists("silo_t_00000000000000000000000000000bad")
            .await
    );
    assert!(
        env.role_exists("silo_r_00000000000000000000000000000bad")
            .await
    );
    assert!(!env.database_exists(&gone.database_name).await);
    assert!(!env.role_exists(&gone.role_name).await);
    let kept = kept_names(&env).await;
    assert_eq!(kept.len(), 2, "{kept:?}");
    let hex = gone.id.simple().to_string();
    assert!(kept.iter().all(|k| k.contains(&hex)), "{kept:?}");
    assert_eq!(env.count("SELECT count(*) FROM spares").await, 0);
    // The live tenant is untouched.
    crate::common::close(env.connect_tenant("keeper").await.unwrap()).await;

    // After the grace period (one second here), the quarantined objects go.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let report = env.control.reconcile_once().await.unwrap();
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(report.kept_dropped, 2, "{report:?}");
    assert!(kept_names(&env).await.is_empty());
    assert!(
        env.database_exists("silo_t_00000000000000000000000000000bad")
            .await
    );
}

/// Databases and roles set aside, as `database x` / `role y`.
async fn kept_names(env: &TestEnv) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT 'database ' || datname FROM pg_database WHERE datname LIKE 'silo\\_kept\\_%'
         UNION ALL SELECT 'role ' || rolname FROM pg_roles WHERE rolname LIKE 'silo\\_kept\\_%'",
    )
    .fetch_all(&env.admin)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_pass_that_would_quarantine_many_tenants_halts_and_says_so() {
    let env = TestEnv::start().await;
    let mut made = Vec::new();
    for slug in ["one", "two", "three"] {
        env.create(slug).await;
        made.push(env.record(slug).await);
    }
    env.control.reconcile_once().await.unwrap();
    // The registry suddenly says two of three tenants are deleted (say, a
    // control DB restored wrongly): two thirds is far more than a tenth.
    sqlx::query("UPDATE tenants SET status = 'deleted' WHERE slug IN ('one', 'two')")
        .execute(env.registry().pool())
        .await
        .unwrap();
    for _ in 0..3 {
        let report = env.control.reconcile_once().await.unwrap();
        assert_eq!(
            report.databases_quarantined + report.roles_quarantined,
            0,
            "{report:?}"
        );
        assert_eq!(report.halted.len(), 1, "{report:?}");
        assert!(
            report.halted[0].contains("would quarantine 2"),
            "{report:?}"
        );
    }
    for t in &made {
        assert!(env.database_exists(&t.database_name).await, "{}", t.slug);
        assert!(env.role_exists(&t.role_name).await, "{}", t.slug);
    }
}

#[tokio::test]
async fn the_reconciler_makes_role_logins_agree_with_tenant_state() {
    let env = TestEnv::start().await;
    env.create("awake").await;
    env.create("asleep").await;
    let asleep = env.record("asleep").await;
    env.control
        .provisioner()
        .suspend(asleep.id, "test")
        .await
        .unwrap();
    let awake = env.record("awake").await;
    // Simulate a crash between the registry write and the role change, both ways.
    exec(&env, &format!("ALTER ROLE \"{}\" NOLOGIN", awake.role_name)).await;
    exec(&env, &format!("ALTER ROLE \"{}\" LOGIN", asleep.role_name)).await;

    let report = env.control.reconcile_once().await.unwrap();
    assert_eq!(report.logins_fixed, 2, "{report:?}");
    crate::common::close(
        env.connect_tenant("awake")
            .await
            .expect("active tenant logs in again"),
    )
    .await;
    assert!(
        env.connect_tenant("asleep").await.is_err(),
        "suspended tenant stays out"
    );
}

#[tokio::test]
async fn the_warm_pool_keeps_spares_ready_and_creates_take_them() {
    let env = TestEnv::start().await;
    let warm = env.replica(ControlConfig {
        provision: ProvisionConfig {
            warm_pool_size: 3,
            ..Default::default()
        },
        ..Default::default()
    });
    let warm = warm.provisioner();
    warm.refill_all().await.unwrap();
    let spares: Vec<String> =
        sqlx::query_scalar("SELECT database_name FROM spares ORDER BY created_at")
            .fetch_all(env.registry().pool())
            .await
            .unwrap();
    assert_eq!(spares.len(), 3);
    for s in &spares {
        assert!(env.database_exists(s).await);
    }
    let req = TestEnv::request("from-spare", "From Spare");
    let t = warm.create(&req, None, "test").await.unwrap();
    assert_eq!(
        env.count("SELECT count(*) FROM spares").await,
        2,
        "one spare was taken"
    );
    assert!(
        !env.database_exists(&spares[0]).await,
        "the oldest spare was renamed into the tenant"
    );
    assert!(env.database_exists(&t.database_name).await);
    crate::common::close(env.connect_tenant("from-spare").await.unwrap()).await;
    // A spare is not reachable by tenant roles before it is claimed.
    let other = env.record("from-spare").await;
    assert!(env
        .connect_as(&spares[1], &other.role_name, &env.password(&other))
        .await
        .is_err());

    assert_eq!(warm.refill_all().await.unwrap(), 1);
    assert_eq!(env.count("SELECT count(*) FROM spares").await, 3);
}

#[tokio::test]
async fn a_stale_template_is_rebuilt_and_stale_spares_replaced() {
    let env = TestEnv::start().await;
    let warm = env.replica(ControlConfig {
        provision: ProvisionConfig {
            warm_pool_size: 2,
            ..Default::default()
        },
        ..Default::default()
    });
    warm.provisioner().refill_all().await.unwrap();
    let old: Vec<String> = sqlx::query_scalar("SELECT database_name FROM spares")
        .fetch_all(env.registry().pool())
        .await
        .unwrap();
    // Pretend the template and spares are from an older schema version.
    sqlx::query("UPDATE db_servers SET template_version = 0")
        .execute(env.registry().pool())
        .await
        .unwrap();
    sqlx::query("UPDATE spares SET schema_version = 0")
        .execute(env.registry().pool())
        .await
        .unwrap();

    let report = warm.reconcile_once().await.unwrap();
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(report.spares_dropped, 2);
    let version: Option<i64> = sqlx::query_scalar("SELECT template_version FROM db_servers")
        .fetch_one(env.registry().pool())
        .await
        .unwrap();
    assert_eq!(
        version,
        Some(silo::servers::schema::latest_embedded_version())
    );
    assert!(env.database_exists(TEMPLATE_DB).await);
    let fresh: Vec<String> = sqlx::query_scalar("SELECT database_name FROM spares")
        .fetch_all(env.registry().pool())
        .await
        .unwrap();
    assert_eq!(fresh.len(), 2);
    assert!(fresh.iter().all(|f| !old.contains(f)));
    assert!(env.orphans().await.is_empty());
}

/// A `CREATE DATABASE` whose process died is still running in PostgreSQL
/// (a statement outlives its client): a spare's clone, or a restore's
/// scratch database. The pass ends it before it looks, so it can never
/// commit behind the sweep as a database nobody accounts for.
#[tokio::test]
async fn a_clone_left_running_by_a_dead_process_is_ended_before_the_sweep() {
    let env = TestEnv::start().await;
    env.control.reconcile_once().await.unwrap(); // the template exists
    let spare = format!("{}{}", names::SPARE_DB_PREFIX, "0".repeat(31) + "d");
    let scratch = format!(
        "{}{}",
        names::SCRATCH_DB_PREFIX,
        uuid::Uuid::now_v7().simple()
    );
    for (database, template) in [(spare, TEMPLATE_DB), (scratch, "template0")] {
        // A plain login (no connection check): the statement outlives its
        // client until silo ends it.
        let login = env.pg.url("postgres").parse().unwrap();
        let (mut holder, sql) = abandon_a_clone(&env, login, &database, template).await;

        let report = env.control.reconcile_once().await.unwrap();
        assert!(report.errors.is_empty(), "{report:?}");
        if database.starts_with(names::SPARE_DB_PREFIX) {
            assert_eq!(report.abandoned_clones_ended, 1, "{report:?}");
        }
        // The template is let go: a clone that were still alive would now commit.
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut *holder)
            .await
            .unwrap();
        wait_until_no_clone(&env, &sql, &database).await;
        assert!(
            !env.database_exists(&database).await,
            "the dead clone of {database} committed"
        );
    }
    assert!(env.orphans().await.is_empty(), "{:?}", env.orphans().await);
}

/// silo's own admin login asks PostgreSQL to check that silo is still
/// there while a statement runs: a statement of a killed silo is cancelled
/// by the server itself, no reconcile pass needed.
#[tokio::test]
async fn a_statement_of_silo_s_admin_login_ends_when_silo_dies() {
    let env = TestEnv::start().await;
    env.control.reconcile_once().await.unwrap(); // the template exists
    let login = silo::servers::admin_options(&env.pg.url("postgres")).unwrap();
    let mut conn = sqlx::PgConnection::connect_with(&login).await.unwrap();
    let interval: String = sqlx::query_scalar("SHOW client_connection_check_interval")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(interval, silo::servers::CLIENT_CHECK_INTERVAL);
    conn.close().await.unwrap();
    // So do the tenant connections silo routes (a dead replica's app query).
    env.create("watched").await;
    let router = silo::router::TenantRouter::new(
        env.registry().clone(),
        env.keyring.clone(),
        silo::router::RouterConfig::default(),
    );
    let mut routed = router.acquire("watched").await.unwrap();
    let interval: String = sqlx::query_scalar("SHOW client_connection_check_interval")
        .fetch_one(&mut *routed)
        .await
        .unwrap();
    assert_eq!(interval, silo::servers::CLIENT_CHECK_INTERVAL);
    drop(routed);

    let database = format!("{}{}", names::SPARE_DB_PREFIX, "0".repeat(31) + "e");
    let (mut holder, sql) = abandon_a_clone(&env, login, &database, TEMPLATE_DB).await;
    // No pass runs: the server notices the dead client on its own.
    wait_until_no_clone(&env, &sql, &database).await;
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut *holder)
        .await
        .unwrap();
    assert!(
        !env.database_exists(&database).await,
        "the dead clone of {database} committed"
    );
}

/// Start `CREATE DATABASE database TEMPLATE template` as silo sends it, on
/// a connection made with `login`, wait until it waits on the template
/// (held by the returned transaction), then drop its client, as when a
/// process is killed. Returns the holder and the statement.
async fn abandon_a_clone(
    env: &TestEnv,
    login: sqlx::postgres::PgConnectOptions,
    database: &str,
    template: &str,
) -> (sqlx::pool::PoolConnection<sqlx::Postgres>, String) {
    // Hold the template (as a comment does) so the clone waits, mid-statement.
    let mut holder = env.admin.acquire().await.unwrap();
    sqlx::raw_sql(&format!(
        "BEGIN; COMMENT ON DATABASE {template} IS 'held by the test'"
    ))
    .execute(&mut *holder)
    .await
    .unwrap();
    let sql =
        format!("CREATE DATABASE \"{database}\" TEMPLATE \"{template}\"  ALLOW_CONNECTIONS false");
    let cloner = {
        let sql = sql.clone();
        tokio::spawn(async move {
            let mut conn = sqlx::PgConnection::connect_with(&login).await.unwrap();
            sqlx::Executor::execute(&mut conn, sql.as_str()).await.ok();
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while clones(env, &sql, true).await == 0 {
        assert!(
            Instant::now() < deadline,
            "{database}: the clone never waited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cloner.abort(); // its socket closes, as when a process is killed
    assert!(cloner.await.unwrap_err().is_cancelled());
    (holder, sql)
}

/// Sessions running `sql` (only those waiting on a lock if `waiting`).
async fn clones(env: &TestEnv, sql: &str, waiting: bool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
          WHERE query = $1 AND (NOT $2 OR wait_event_type = 'Lock')",
    )
    .bind(sql)
    .bind(waiting)
    .fetch_one(&env.admin)
    .await
    .unwrap()
}

async fn wait_until_no_clone(env: &TestEnv, sql: &str, database: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while clones(env, sql, false).await > 0 {
        assert!(
            Instant::now() < deadline,
            "{database}: the clone is still running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A tenant role may give itself settings (`ALTER ROLE … SET`), for every
/// database or its own; silo gives its roles none. The next pass resets
/// them: a `search_path` without `public` hid the tenant's tables from
/// everything silo runs as the role (the app API answered 500).
#[tokio::test]
async fn settings_a_tenant_role_gives_itself_are_reset_by_the_next_pass() {
    let env = TestEnv::start().await;
    env.create("tinkerer").await;
    let t = env.record("tinkerer").await;
    let mut conn = env.connect_tenant("tinkerer").await.unwrap();
    sqlx::raw_sql(&format!(
        "ALTER ROLE \"{role}\" SET search_path = pg_catalog;
         ALTER ROLE \"{role}\" IN DATABASE \"{db}\" SET default_transaction_read_only = on",
        role = t.role_name,
        db = t.database_name
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    let mut conn = env.connect_tenant("tinkerer").await.unwrap();
    assert!(
        sqlx::query("SELECT count(*) FROM patients")
            .execute(&mut conn)
            .await
            .is_err(),
        "its tables are hidden from its next session"
    );
    // And from the app API, through connections the router opened now.
    let bearer = format!("Bearer {}", env.app_token("tinkerer").await);
    let headers = [
        ("authorization", bearer.as_str()),
        ("x-tenant-id", "tinkerer"),
    ];
    let app = || env.call_with(axum::http::Method::GET, "/api/v1/patients", None, &headers);
    let (status, body) = app().await;
    assert!(status.is_server_error(), "{status} {body}");

    let report = env.control.reconcile_once().await.unwrap();
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(report.role_settings_reset, 2, "{report:?}");
    // silo's own setting kept by the same statement (never committed
    // without it, so no session starts unlimited), nothing else left.
    assert_eq!(report.role_settings_set, 0, "{report:?}");
    assert_eq!(settings_of(&env, &t.role_name).await, [silo_s_settings()]);
    // Sessions opened under the settings are ended: the router's pooled
    // connections start again clean (they kept the settings, and the app
    // API its 500s), and so does the tenant's own.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sqlx::query("SELECT 1").execute(&mut conn).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "a session opened under the settings was ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = app().await;
    assert_eq!(status, axum::http::StatusCode::OK, "{body}");
    let mut conn = env.connect_tenant("tinkerer").await.unwrap();
    sqlx::query("INSERT INTO patients (full_name) VALUES ('back to normal')")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let again = env.control.reconcile_once().await.unwrap();
    assert_eq!(again.role_settings_reset, 0, "{again:?}");
    assert_eq!(again.role_settings_set, 0, "{again:?}");
}

/// Every `pg_db_role_setting` row of `role`, as `database: settings`.
async fn settings_of(env: &TestEnv, role: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT coalesce(d.datname::text, '*') || ': ' || array_to_string(s.setconfig, ', ')
           FROM pg_db_role_setting s LEFT JOIN pg_database d ON d.oid = s.setdatabase
          WHERE s.setrole = $1::regrole ORDER BY 1",
    )
    .bind(role)
    .fetch_all(&env.admin)
    .await
    .unwrap()
}

/// The settings silo gives a tenant role by default, as [`settings_of`] shows them.
fn silo_s_settings() -> String {
    format!(
        "*: temp_file_limit={}kB",
        silo::config::DEFAULT_TENANT_TEMP_FILE_LIMIT_MB * 1024
    )
}

/// silo's own settings (the temporary-file limit) reach roles that lack
/// them (made before silo set any, or someone removed them) or hold them
/// with another value, on the next pass, without ending their sessions;
/// readers too.
#[tokio::test]
async fn silo_s_role_settings_reach_every_tenant_role_without_ending_its_sessions() {
    let env = TestEnv::start().await;
    env.create("unlimited").await;
    env.create("loosened").await;
    env.create("holdout").await;
    let (status, body) = env
        .call(
            axum::http::Method::POST,
            "/admin/v1/tenants/loosened/app-credentials",
            Some(serde_json::json!({"name": "ro", "read_only": true})),
        )
        .await;
    assert_eq!(status, axum::http::StatusCode::CREATED, "{body}");
    let unlimited = env.record("unlimited").await;
    let loosened = env.record("loosened").await;
    let reader = names::reader_role(&loosened.role_name).unwrap();
    for role in [&unlimited.role_name, &loosened.role_name, &reader] {
        assert_eq!(settings_of(&env, role).await, [silo_s_settings()], "{role}");
    }
    exec(
        &env,
        &format!("ALTER ROLE \"{}\" RESET ALL", unlimited.role_name),
    )
    .await;
    for role in [&loosened.role_name, &reader] {
        exec(
            &env,
            &format!("ALTER ROLE \"{role}\" SET temp_file_limit = '5MB'"),
        )
        .await;
    }
    let mut session = env.connect_tenant("unlimited").await.unwrap();
    // A role without the limit whose own session holds its settings in a
    // transaction left open: that session is ended, and the limit set.
    let holdout = env.record("holdout").await;
    exec(
        &env,
        &format!("ALTER ROLE \"{}\" RESET ALL", holdout.role_name),
    )
    .await;
    let mut holding = env.connect_tenant("holdout").await.unwrap();
    sqlx::raw_sql("BEGIN; ALTER ROLE CURRENT_USER SET work_mem = '1MB'")
        .execute(&mut holding)
        .await
        .unwrap();

    let report = env.control.reconcile_once().await.unwrap();
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(report.role_settings_set, 4, "{report:?}");
    assert_eq!(report.role_settings_reset, 0, "{report:?}");
    for role in [
        &unlimited.role_name,
        &loosened.role_name,
        &reader,
        &holdout.role_name,
    ] {
        assert_eq!(settings_of(&env, role).await, [silo_s_settings()], "{role}");
    }
    assert!(
        sqlx::raw_sql("COMMIT").execute(&mut holding).await.is_err(),
        "the session holding the role's settings was ended"
    );
    // The session opened without the limit is kept; the next one has it.
    sqlx::query("SELECT 1").execute(&mut session).await.unwrap();
    session.close().await.unwrap();
    let mut session = env.connect_tenant("unlimited").await.unwrap();
    let shown: String = sqlx::query_scalar("SHOW temp_file_limit")
        .fetch_one(&mut session)
        .await
        .unwrap();
    assert_eq!(shown, "10GB");
    session.close().await.unwrap();
    let again = env.control.reconcile_once().await.unwrap();
    assert_eq!(again.role_settings_set, 0, "{again:?}");
}

/// The stored verifier of `role`, read as the superuser.
async fn verifier_of(env: &TestEnv, role: &str) -> Option<String> {
    sqlx::query_scalar("SELECT rolpassword FROM pg_authid WHERE rolname = $1")
        .bind(role)
        .fetch_one(&env.admin)
        .await
        .unwrap()
}

/// `slug`'s role logs in with the password the registry records again,
/// and no longer with the one it gave itself.
async fn assert_recorded_password_logs_in(env: &TestEnv, slug: &str) {
    let t = env.record(slug).await;
    env.connect_tenant(slug)
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    assert!(env
        .connect_as(&t.database_name, &t.role_name, "chosen-by-the-customer")
        .await
        .is_err());
}

/// Any role may give itself a password (`ALTER ROLE … PASSWORD`), and a
/// customer may hold the tenant role's or run SQL as it: every connection
/// silo opens for the tenant from then on is refused. The next pass gives
/// the role (and its reader) the password the registry records; audited.
/// A verifier of the recorded password with PostgreSQL's iteration count
/// (set before silo made its own) is replaced without a report.
#[tokio::test]
async fn a_password_a_tenant_role_gives_itself_is_taken_back_by_the_next_pass() {
    let env = TestEnv::start().await;
    env.create("locksmith").await;
    env.create("oldtimer").await;
    let (status, body) = env
        .call(
            axum::http::Method::POST,
            "/admin/v1/tenants/locksmith/app-credentials",
            Some(serde_json::json!({"name": "ro", "read_only": true})),
        )
        .await;
    assert_eq!(status, axum::http::StatusCode::CREATED, "{body}");
    let t = env.record("locksmith").await;
    let reader = names::reader_role(&t.role_name).unwrap();
    let reader_before = verifier_of(&env, &reader).await.unwrap();

    // The tenant role sets its own; someone sets the reader's (and removes nothing else).
    let mut conn = env.connect_tenant("locksmith").await.unwrap();
    sqlx::raw_sql(&format!(
        "ALTER ROLE \"{}\" PASSWORD 'chosen-by-the-customer'",
        t.role_name
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    exec(&env, &format!("ALTER ROLE \"{reader}\" PASSWORD NULL")).await;
    assert!(
        env.connect_tenant("locksmith").await.is_err(),
        "the recorded password no longer logs in"
    );
    // An older tenant's verifier: the same password, PostgreSQL's count.
    let old = env.record("oldtimer").await;
    let old_verifier = silo::servers::scram::verifier_with(&env.password(&old), 4096);
    exec(
        &env,
        &format!("ALTER ROLE \"{}\" PASSWORD '{old_verifier}'", old.role_name),
    )
    .await;

    let report = env.control.reconcile_once().await.unwrap();
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(report.passwords_restored, 1, "{report:?}");
    // The recorded password logs in again, the customer's no longer does,
    // and the session opened meanwhile is the role's own: kept.
    assert_recorded_password_logs_in(&env, "locksmith").await;
    sqlx::query("SELECT 1").execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    let reader_after = verifier_of(&env, &reader).await.unwrap();
    assert!(
        reader_after.starts_with(&format!(
            "SCRAM-SHA-256${}:",
            silo::servers::scram::ITERATIONS
        )),
        "{reader_after}"
    );
    assert_ne!(reader_after, reader_before, "a fresh salt");
    let audited = env
        .count(&format!(
            "SELECT count(*) FROM audit_log WHERE action = 'tenant.password_restored' AND tenant_id = '{}'",
            t.id
        ))
        .await;
    assert_eq!(audited, 1);
    // The older tenant: silo's verifier now, the same password, no report.
    let now = verifier_of(&env, &old.role_name).await.unwrap();
    assert_eq!(
        silo::servers::scram::check(Some(&now), &env.password(&old)),
        silo::servers::scram::Stored::Ours
    );
    env.connect_tenant("oldtimer")
        .await
        .unwrap()
        .close()
        .await
        .unwrap();

    let again = env.control.reconcile_once().await.unwrap();
    assert_eq!(again.passwords_restored, 0, "{again:?}");
    assert_eq!(verifier_of(&env, &old.role_name).await.unwrap(), now);
}

/// A tenant role that gives itself a password locks silo out for one
/// request, not until the next reconcile pass (none runs here): the router
/// and the front door, refused with the recorded password after a re-read,
/// report the lockout, and the role gets its recorded password back at
/// once (audited as the pass audits it).
#[tokio::test]
async fn a_password_a_tenant_role_gives_itself_is_taken_back_when_silo_is_refused() {
    let env = TestEnv::setup().wire(|_| {}).start().await;
    env.create("router-side").await;
    env.create("wire-side").await;
    let pw =
        crate::wire::credential(&env, "wire-side", "app", silo::domain::PoolMode::Session).await;
    let audited = |t: uuid::Uuid| {
        format!(
            "SELECT count(*) FROM audit_log WHERE action = 'tenant.password_restored' AND tenant_id = '{t}'"
        )
    };
    for slug in ["router-side", "wire-side"] {
        let t = env.record(slug).await;
        let mut own = env.connect_tenant(slug).await.unwrap();
        sqlx::raw_sql(&format!(
            "ALTER ROLE \"{}\" PASSWORD 'chosen-by-the-customer'",
            t.role_name
        ))
        .execute(&mut own)
        .await
        .unwrap();
        own.close().await.unwrap();
        assert!(env.connect_tenant(slug).await.is_err(), "locked out");
        // Requests until one is served: the first is refused, the repair
        // follows it at once.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut refused = 0;
        loop {
            let served = if slug == "router-side" {
                env.router
                    .acquire(slug)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            } else {
                let u = crate::wire::uri(&env, "app", &pw, slug);
                match sqlx::PgConnection::connect(&u).await {
                    Ok(mut c) => sqlx::query("SELECT 1")
                        .execute(&mut c)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            };
            match served {
                Ok(()) => break,
                Err(e) => {
                    refused += 1;
                    assert!(
                        Instant::now() < deadline,
                        "{slug}: still refused after {refused} tries: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        assert!(
            refused >= 1,
            "{slug}: the first request found the role locked"
        );
        assert_recorded_password_logs_in(&env, slug).await;
        assert_eq!(env.count(&audited(t.id)).await, 1, "{slug}");
    }
}
