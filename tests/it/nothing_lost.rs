//! Nothing lost to an operator's mistake: the same cluster registered twice,
//! a control DB restored to an earlier point. Real clusters, real sweeps.

use std::process::Command;

use axum::http::{Method, StatusCode};
use serde_json::json;
use uuid::Uuid;

use crate::common::TestEnv;

/// Tenant databases on the test cluster.
async fn tenant_databases(env: &TestEnv) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE datname LIKE 'silo\\_t\\_%' ORDER BY 1",
    )
    .fetch_all(&env.admin)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_cluster_registered_twice_is_refused_and_never_swept() {
    let env = TestEnv::start().await;
    for slug in ["north", "south", "east"] {
        env.create(slug).await;
    }
    env.control.reconcile_once().await.unwrap();
    let before = tenant_databases(&env).await;
    assert_eq!(before.len(), 3);

    // Another name and another host alias for the same cluster: refused.
    let alias = env.pg.url("postgres").replace("127.0.0.1", "localhost");
    assert!(alias.contains("localhost"), "{alias}");
    let (s, body) = env
        .call(
            Method::POST,
            "/admin/v1/servers",
            Some(json!({"name": "alias", "admin_url": alias})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("registered already"), "{detail}");
    assert!(detail.contains("default"), "{detail}");
    assert!(!detail.contains(&env.superuser_password()), "{detail}");
    assert_eq!(
        env.count("SELECT count(*) FROM db_servers").await,
        1,
        "nothing was registered"
    );

    // Forced in behind silo's back, by SQL.
    let id = Uuid::now_v7();
    let sealed = env.keyring.seal(alias.as_bytes(), id.as_bytes());
    sqlx::query(
        "INSERT INTO db_servers (id, name, admin_url_enc, key_id, max_connections, max_tenants)
         VALUES ($1, 'alias', $2, $3, 50, 100)",
    )
    .bind(id)
    .bind(&sealed)
    .bind(env.keyring.key_id())
    .execute(env.registry().pool())
    .await
    .unwrap();

    for pass in 0..10 {
        let report = env.control.reconcile_once().await.unwrap();
        assert!(report.errors.is_empty(), "pass {pass}: {report:?}");
        assert!(
            report.halted.iter().any(|h| h.contains("server alias")),
            "pass {pass}: {report:?}"
        );
        assert_eq!(
            report.databases_quarantined + report.roles_quarantined,
            0,
            "pass {pass}: {report:?}"
        );
    }
    assert_eq!(
        tenant_databases(&env).await,
        before,
        "0 tenant databases dropped"
    );
    for slug in ["north", "south", "east"] {
        crate::common::close(env.connect_tenant(slug).await.unwrap()).await;
    }
    // Health checks keep new tenants off it.
    let checks = env
        .control
        .check_servers(std::time::Duration::ZERO)
        .await
        .unwrap();
    let alias = checks.iter().find(|c| c.name == "alias").unwrap();
    assert_eq!(alias.status, "unhealthy", "{alias:?}");
    assert!(alias.error.unwrap().contains("another server"), "{alias:?}");
    let default = checks.iter().find(|c| c.name == "default").unwrap();
    assert_eq!(default.status, "active", "{default:?}");
}

/// `pg_dump`/`pg_restore` of the control DB, as an operator would.
fn pg_tool(env: &TestEnv, tool: &str, args: &[&str]) {
    let out = Command::new(env.pg.bindir().join(tool))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{tool}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `pg_dump` of the control database, in a directory of its own.
fn dump_control(env: &TestEnv) -> tempfile::TempDir {
    let dump = tempfile::tempdir().unwrap();
    let file = dump.path().join("control.dump");
    pg_tool(
        env,
        "pg_dump",
        &["-Fc", "-f", file.to_str().unwrap(), &env.control_url()],
    );
    dump
}

/// Disaster recovery: the control database goes back to the dump.
async fn restore_control(env: &TestEnv, dump: &tempfile::TempDir) {
    for sql in [
        "DROP DATABASE silo_control WITH (FORCE)",
        "CREATE DATABASE silo_control",
    ] {
        sqlx::raw_sql(sql).execute(&env.admin).await.unwrap();
    }
    let file = dump.path().join("control.dump");
    pg_tool(
        env,
        "pg_restore",
        &["-d", &env.control_url(), file.to_str().unwrap()],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_control_db_restored_to_before_five_tenants_loses_none_and_adopts_them() {
    let env = TestEnv::start().await;
    env.create("older").await;
    env.control.reconcile_once().await.unwrap();
    let dump = dump_control(&env);

    let newer: Vec<String> = (1..=5).map(|i| format!("newer-{i}")).collect();
    for slug in &newer {
        env.create(slug).await;
    }
    let made: Vec<(String, String)> = {
        let mut v = Vec::new();
        for slug in &newer {
            let t = env.record(slug).await;
            v.push((t.database_name, t.role_name));
        }
        v
    };

    // Their marks (readable by every role of the cluster) name nobody.
    for (db, _) in &made {
        let comment: String = sqlx::query_scalar(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
        )
        .bind(db)
        .fetch_one(&env.admin)
        .await
        .unwrap();
        assert!(comment.contains("\"sealed\""), "{comment}");
        assert!(
            !comment.contains("newer") && !comment.contains("Clinic"),
            "{comment}"
        );
    }

    restore_control(&env, &dump).await;

    // A restarted silo (fresh pools on the restored DB): ten passes.
    let silo = env.replica(Default::default());
    for pass in 0..10 {
        let report = silo.reconcile_once().await.unwrap();
        assert!(report.errors.is_empty(), "pass {pass}: {report:?}");
        assert_eq!(
            report.databases_quarantined + report.roles_quarantined + report.kept_dropped,
            0,
            "pass {pass}: {report:?}"
        );
        assert_eq!(report.unregistered.len(), 10, "pass {pass}: {report:?}");
    }
    for (db, role) in &made {
        assert!(env.database_exists(db).await, "{db} was kept");
        assert!(env.role_exists(role).await, "{role} was kept");
    }
    assert!(silo
        .registry()
        .find_tenant("newer-1")
        .await
        .unwrap()
        .is_none());

    // `silo reconcile --adopt` brings them back.
    let adopted = silo.adopt("test").await.unwrap();
    assert_eq!(adopted.adopted.len(), 5, "{adopted:?}");
    assert!(adopted.skipped.is_empty(), "{adopted:?}");
    let report = silo.reconcile_once().await.unwrap();
    assert!(report.errors.is_empty(), "{report:?}");
    assert!(report.unregistered.is_empty(), "{report:?}");
    for slug in &newer {
        let t = silo.registry().find_tenant(slug).await.unwrap().unwrap();
        assert_eq!(t.status, silo::registry::TenantStatus::Active, "{slug}");
        // Its own role, with the new password, reads its tables.
        let password = silo
            .keyring()
            .open_string(&t.key_id, &t.password_enc, t.id.as_bytes())
            .unwrap();
        let mut conn = env
            .connect_as(&t.database_name, &t.role_name, &password)
            .await
            .unwrap();
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM patients")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(n, 0, "{slug}");
        crate::common::close(conn).await;
    }
    // Adopting again finds nothing left to adopt.
    let again = silo.adopt("test").await.unwrap();
    assert!(
        again.adopted.is_empty() && again.skipped.is_empty(),
        "{again:?}"
    );
    let audit = env
        .count("SELECT count(*) FROM audit_log WHERE action = 'tenant.adopt'")
        .await;
    assert_eq!(audit, 5);
}

/// Advisory locks on the test cluster: `(granted, waiting)`.
async fn advisory_locks(env: &TestEnv) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE granted), count(*) FILTER (WHERE NOT granted)
           FROM pg_locks WHERE locktype = 'advisory'",
    )
    .fetch_one(&env.admin)
    .await
    .unwrap()
}

/// Wait (at most 20 s) until no advisory lock is held or awaited.
async fn no_locks_left(env: &TestEnv, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let locks = advisory_locks(env).await;
        if locks == (0, 0) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: locks left (granted, waiting) = {locks:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_cancelled_mid_lock_wait_leave_no_lock_behind() {
    use std::time::Duration;
    let env = TestEnv::setup()
        .admin_timeout(Duration::from_secs(2))
        .start()
        .await;
    env.create("waited").await;
    let t = env.record("waited").await;
    let reps: usize = std::env::var("SILO_LOCK_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    for rep in 0..reps {
        // Someone else's operation holds the tenant.
        let held = env.registry().lock_tenant(t.id).await.unwrap();
        // A client gives up while its request waits for the lock: the
        // request's future is dropped there, as when the connection closes.
        let call = env.call(Method::POST, "/admin/v1/tenants/waited/suspend", None);
        let waiting = async {
            while advisory_locks(&env).await.1 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        tokio::select! {
            (s, body) = call => panic!("rep {rep}: answered while the lock was held: {s} {body}"),
            () = waiting => {}
        }
        held.release().await;
        no_locks_left(&env, &format!("rep {rep}")).await;
    }
    // Nothing was suspended by a cancelled request, and the next operations complete.
    assert_eq!(
        env.record("waited").await.status,
        silo::registry::TenantStatus::Active
    );
    let (s, body) = env
        .call(Method::POST, "/admin/v1/tenants/waited/suspend", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, body) = env
        .call(Method::POST, "/admin/v1/tenants/waited/resume", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");

    // A request stuck behind a lock past the admin deadline: 503, and no lock left.
    let held = env.registry().lock_tenant(t.id).await.unwrap();
    let (s, body) = env
        .call(Method::POST, "/admin/v1/tenants/waited/suspend", None)
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("took longer"),
        "{body}"
    );
    held.release().await;
    no_locks_left(&env, "after the deadline").await;
    assert_eq!(
        env.record("waited").await.status,
        silo::registry::TenantStatus::Active
    );
}

/// Names of the patients in a database, as the superuser sees them.
async fn patients_in(env: &TestEnv, database: &str) -> Vec<String> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&env.pg.url(database))
        .await
        .unwrap();
    let names = sqlx::query_scalar("SELECT full_name FROM patients ORDER BY full_name")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    crate::common::close(conn).await;
    names
}

async fn add_patient(env: &TestEnv, slug: &str, name: &str) {
    let mut conn = env.connect_tenant(slug).await.unwrap();
    sqlx::query("INSERT INTO patients (full_name) VALUES ($1)")
        .bind(name)
        .execute(&mut conn)
        .await
        .unwrap();
    crate::common::close(conn).await;
}

/// The databases set aside for a tenant.
async fn kept_of(env: &TestEnv, tenant: Uuid) -> Vec<String> {
    sqlx::query_scalar("SELECT datname::text FROM pg_database WHERE datname LIKE $1 ORDER BY 1")
        .bind(format!("silo\\_kept\\_{}\\_%", tenant.simple()))
        .fetch_all(&env.admin)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restores_never_overwrite_a_live_tenant_unasked_and_keep_what_they_replace() {
    let env = TestEnv::setup().storage().start().await;
    env.create("alpha").await;
    env.create("beta").await;
    add_patient(&env, "alpha", "A1").await;
    add_patient(&env, "beta", "B1").await;
    let backup = env
        .backups()
        .backup_now(
            env.record("alpha").await.id,
            silo::backup::BackupKind::Manual,
            None,
        )
        .await
        .unwrap()
        .id;
    add_patient(&env, "alpha", "A2").await;
    let (alpha, beta) = (env.record("alpha").await, env.record("beta").await);
    let audits =
        || env.count("SELECT count(*) FROM audit_log WHERE action = 'tenant.restore_requested'");

    // Without `overwrite`: 409, and nothing changed.
    for (path, body) in [
        (format!("/admin/v1/backups/{backup}/restore"), None),
        ("/admin/v1/tenants/alpha/restore".to_owned(), None),
        (
            "/admin/v1/tenants/alpha/restore".to_owned(),
            Some(json!({"overwrite": false})),
        ),
    ] {
        let (s, answer) = env.call(Method::POST, &path, body.clone()).await;
        assert_eq!(s, StatusCode::CONFLICT, "{path} {body:?}: {answer}");
        assert!(
            answer["detail"].as_str().unwrap().contains("overwrite"),
            "{answer}"
        );
    }
    assert_eq!(patients_in(&env, &beta.database_name).await, ["B1"]);
    assert_eq!(patients_in(&env, &alpha.database_name).await, ["A1", "A2"]);
    assert_eq!(audits().await, 0);
    assert_eq!(env.record("alpha").await.database_name, alpha.database_name);

    // In place, with `overwrite`: the backup's data, and the replaced
    // database (with the write made since) kept aside, audited when asked.
    let (s, op) = env
        .call(
            Method::POST,
            "/admin/v1/tenants/alpha/restore",
            Some(json!({"overwrite": true})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    assert_eq!(audits().await, 1, "audited at request time");
    let done = crate::common::wait_op(&env, &op).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let now = env.record("alpha").await;
    assert_ne!(now.database_name, alpha.database_name);
    assert_eq!(patients_in(&env, &now.database_name).await, ["A1"]);
    let kept = kept_of(&env, alpha.id).await;
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(patients_in(&env, &kept[0]).await, ["A1", "A2"]);
    // Closed to the tenant's role: it could write there, unmeasured.
    let refused = env
        .connect_as(&kept[0], &now.role_name, &env.password(&now))
        .await
        .expect_err("the tenant's role connected to the replaced database");
    assert_eq!(
        refused
            .as_database_error()
            .and_then(|e| e.code())
            .as_deref(),
        Some("42501"),
        "{refused}"
    );

    // Into another live tenant: never, `overwrite` or not (see
    // isolation::a_backup_is_never_restored_into_another_tenant).
    let (s, answer) = env
        .call(
            Method::POST,
            &format!("/admin/v1/backups/{backup}/restore"),
            Some(json!({"into_slug": "beta", "overwrite": true})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(
        patients_in(&env, &env.record("beta").await.database_name).await,
        ["B1"]
    );
    assert!(kept_of(&env, beta.id).await.is_empty());

    // Reconcile passes keep them until the grace period ends...
    let report = env.control.reconcile_once().await.unwrap();
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(report.kept_dropped, 0, "{report:?}");
    assert_eq!(kept_of(&env, alpha.id).await, kept);
    // ... and then drop them (time passes: the mark says it is over).
    sqlx::raw_sql(&format!(
        "COMMENT ON DATABASE \"{}\" IS '{{\"drop_after\": 0}}'",
        kept[0]
    ))
    .execute(&env.admin)
    .await
    .unwrap();
    let report = env.control.reconcile_once().await.unwrap();
    assert_eq!(report.kept_dropped, 1, "{report:?}");
    assert!(kept_of(&env, alpha.id).await.is_empty());
}

/// A control DB restored to before a tenant's restore names the database
/// that restore replaced (set aside since, on its grace period); the
/// tenant's data is in the database the restore swapped in. The reconciler
/// points the tenant at that one (it quarantined it, to be dropped after
/// the grace period: both copies on the clock).
#[tokio::test(flavor = "multi_thread")]
async fn a_control_db_restored_to_before_a_restore_points_the_tenant_at_its_data() {
    let env = TestEnv::setup().storage().start().await;
    env.create("alpha").await;
    add_patient(&env, "alpha", "A1").await;
    let before = env.record("alpha").await;
    let backup = env
        .backups()
        .backup_now(before.id, silo::backup::BackupKind::Manual, None)
        .await
        .unwrap()
        .id;
    let dump = dump_control(&env);

    let (s, op) = env
        .call(
            Method::POST,
            "/admin/v1/tenants/alpha/restore",
            Some(json!({"overwrite": true})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    let done = crate::common::wait_op(&env, &op).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    add_patient(&env, "alpha", "A3").await;
    let restored = env.record("alpha").await.database_name;
    assert_ne!(restored, before.database_name);
    // And a new tenant made by a restore, after the dump: its database is
    // the restored one, marked as a provisioned one is (it had no mark, so
    // `--adopt` could not bring it back).
    let (s, op) = env
        .call(
            Method::POST,
            &format!("/admin/v1/backups/{backup}/restore"),
            Some(json!({"into_slug": "alpha-copy"})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    let done = crate::common::wait_op(&env, &op).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let copy = env.record("alpha-copy").await;

    restore_control(&env, &dump).await;

    let silo = env.replica(Default::default());
    let report = silo.reconcile_once().await.unwrap();
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(report.databases_found, 1, "{report:?}");
    assert_eq!(report.databases_quarantined, 0, "{report:?}");
    let t = silo.registry().find_tenant("alpha").await.unwrap().unwrap();
    assert_eq!(t.database_name, restored);
    assert_eq!(patients_in(&env, &t.database_name).await, ["A1", "A3"]);
    let audited = env
        .count("SELECT count(*) FROM audit_log WHERE action = 'tenant.database_found'")
        .await;
    assert_eq!(audited, 1);
    let again = silo.reconcile_once().await.unwrap();
    assert_eq!(
        (again.databases_found, again.databases_quarantined),
        (0, 0),
        "{again:?}"
    );
    assert!(!again.unregistered.is_empty(), "{again:?}");
    let adopted = silo.adopt("test").await.unwrap();
    assert_eq!(adopted.adopted.len(), 1, "{adopted:?}");
    assert!(adopted.skipped.is_empty(), "{adopted:?}");
    let back = silo
        .registry()
        .find_tenant("alpha-copy")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (back.id, &back.database_name),
        (copy.id, &copy.database_name)
    );
    assert_eq!(patients_in(&env, &back.database_name).await, ["A1"]);
}

/// A tenant database's mark (what `--adopt` reads back) follows the
/// registry: written again by the next pass after a rename or a plan
/// change, and after a master-key rotation, sealed under the new key (a
/// mark under a retired key could no longer be read by `--adopt`).
#[tokio::test(flavor = "multi_thread")]
async fn marks_follow_renames_and_the_master_key() {
    use silo::crypto::Keyring;
    use silo::servers::owner::{mark_needs_refresh, TenantMark};
    let env = TestEnv::start().await;
    env.create("marked").await;
    let report = env.control.reconcile_once().await.unwrap();
    assert_eq!(report.marks_refreshed, 0, "{report:?}");
    let mark = || async {
        let t = env.record("marked").await;
        let comment: Option<String> = sqlx::query_scalar(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
        )
        .bind(&t.database_name)
        .fetch_one(&env.admin)
        .await
        .unwrap();
        let control = env.registry().control_id().await.unwrap();
        (comment, TenantMark::of(control, &t))
    };
    let (comment, want) = mark().await;
    assert!(!mark_needs_refresh(
        comment.as_deref(),
        &want,
        env.control.keyring()
    ));

    let (status, body) = env
        .call(
            axum::http::Method::PATCH,
            "/admin/v1/tenants/marked",
            Some(serde_json::json!({"name": "Renamed Clinic", "plan": "premium"})),
        )
        .await;
    assert!(status.is_success(), "{body}");
    let (comment, want) = mark().await;
    assert!(mark_needs_refresh(
        comment.as_deref(),
        &want,
        env.control.keyring()
    ));
    let report = env.control.reconcile_once().await.unwrap();
    assert_eq!(report.marks_refreshed, 1, "{report:?}");
    let (comment, want) = mark().await;
    assert_eq!(want.name, "Renamed Clinic");
    assert!(!mark_needs_refresh(
        comment.as_deref(),
        &want,
        env.control.keyring()
    ));

    // A plane on a new master key (the old one as previous, as during a
    // rotation) seals the mark again; the new key alone then reads it.
    let new_key = Keyring::generate_base64();
    let rotated = Keyring::from_base64(&new_key)
        .unwrap()
        .with_previous(&env.master_key)
        .unwrap();
    let plane = silo::control::ControlPlane::new(
        silo::registry::Registry::connect_lazy(&env.control_url()).unwrap(),
        rotated,
        Default::default(),
    );
    let report = plane.reconcile_once().await.unwrap();
    assert_eq!(report.marks_refreshed, 1, "{report:?}");
    let (comment, want) = mark().await;
    let alone = Keyring::from_base64(&new_key).unwrap();
    assert!(!mark_needs_refresh(comment.as_deref(), &want, &alone));
    let report = plane.reconcile_once().await.unwrap();
    assert_eq!(report.marks_refreshed, 0, "{report:?}");
    // A replica still on the old key alone leaves the newer mark be.
    let report = env.control.reconcile_once().await.unwrap();
    assert_eq!(report.marks_refreshed, 0, "{report:?}");
    let alone_old = Keyring::from_base64(&env.master_key).unwrap();
    assert!(!mark_needs_refresh(comment.as_deref(), &want, &alone_old));
}
