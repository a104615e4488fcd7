//! Read-only app credentials: they log in, behind the front door, as the
//! tenant's reader role, which PostgreSQL lets read and nothing else,
//! whatever the client tries; the reader follows its tenant through a
//! suspension, a move to another server and a delete.

use std::time::Duration;

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::TestEnv;

async fn psql(uri: &str, sql: &str) -> (bool, String) {
    let out = tokio::process::Command::new("psql")
        .arg(uri)
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "20")
        .kill_on_drop(true)
        .output()
        .await
        .expect("run psql");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text.trim().to_owned())
}

/// An app credential made through the API; its URI (with the password).
async fn issue(env: &TestEnv, slug: &str, body: Value) -> String {
    let (status, made) = env
        .call(
            Method::POST,
            &format!("/admin/v1/tenants/{slug}/app-credentials"),
            Some(body),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    made["uri"].as_str().expect("a URI").to_owned() + "?sslmode=disable"
}

async fn role_exists(env: &TestEnv, role: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
        .bind(role)
        .fetch_one(&env.admin)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_credential_reads_and_nothing_it_tries_writes() {
    let env = TestEnv::setup().wire(|_| {}).start().await;
    env.create("library").await;
    let writer = issue(&env, "library", json!({"name": "app"})).await;
    let session = issue(
        &env,
        "library",
        json!({"name": "report", "read_only": true}),
    )
    .await;
    let pooled = issue(
        &env,
        "library",
        json!({"name": "dash", "read_only": true, "pool_mode": "transaction"}),
    )
    .await;
    let (ok, out) = psql(
        &writer,
        "INSERT INTO patients (id, full_name) VALUES (gen_random_uuid(), 'Ada')",
    )
    .await;
    assert!(ok, "the read-write credential writes: {out}");
    let t = env.record("library").await;
    let reader = t.role_name.replace("silo_r_", "silo_q_");

    for uri in [&session, &pooled] {
        let (ok, out) = psql(uri, "SELECT current_user || ' ' || count(*) FROM patients").await;
        assert!(ok, "{out}");
        assert_eq!(out, format!("{reader} 1"));
        // Everything that would write, and every trick to get write back.
        for sql in [
            "INSERT INTO patients (id, full_name) VALUES (gen_random_uuid(), 'Eve')",
            "UPDATE patients SET full_name = 'Eve'",
            "DELETE FROM patients",
            "TRUNCATE patients",
            "CREATE TABLE public.mine (x int)",
            "CREATE TEMP TABLE mine (x int)",
            "SET default_transaction_read_only = off; INSERT INTO patients (id, full_name) VALUES (gen_random_uuid(), 'Eve')",
            "BEGIN READ WRITE; INSERT INTO patients (id, full_name) VALUES (gen_random_uuid(), 'Eve'); COMMIT",
            &format!("SET ROLE \"{}\"", t.role_name),
            &format!("SELECT set_config('role', '{}', false)", t.role_name),
            &format!("SET SESSION AUTHORIZATION \"{}\"", t.role_name),
            "RESET ALL; DELETE FROM patients",
            "SELECT lo_from_bytea(0, 'data')",
            "SELECT lo_create(0)",
            "COPY patients (id, full_name) FROM PROGRAM 'true'",
        ] {
            let (ok, out) = psql(uri, sql).await;
            assert!(!ok, "{sql} was allowed: {out}");
            assert!(
                out.contains("permission denied") || out.contains("must be"),
                "{sql}: {out}"
            );
        }
    }
    let (ok, out) = psql(&writer, "SELECT count(*) FROM patients").await;
    assert!(ok && out == "1", "nothing was written: {out}");
    // The writer is still a writer (large objects included).
    let (ok, out) = psql(&writer, "SELECT lo_unlink(lo_from_bytea(0, 'x'))").await;
    assert!(ok, "{out}");

    // Suspended: refused like every credential; resumed: back.
    let (status, _) = env
        .call(Method::POST, "/admin/v1/tenants/library/suspend", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let can_login: bool = sqlx::query_scalar("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1")
        .bind(&reader)
        .fetch_one(&env.admin)
        .await
        .unwrap();
    assert!(
        !can_login,
        "the reader may not log in while its tenant is suspended"
    );
    let (ok, out) = psql(&session, "SELECT 1").await;
    assert!(!ok && out.contains("suspended"), "{out}");
    let (status, _) = env
        .call(Method::POST, "/admin/v1/tenants/library/resume", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (ok, out) = psql(&session, "SELECT count(*) FROM patients").await;
    assert!(ok && out == "1", "{out}");

    // A reader role lost (dropped by hand, as a crash between making a
    // tenant's roles and its reader would leave it) is made again by the
    // reconciler, and a reader without its tenant's role is dropped.
    let mut su = <sqlx::PgConnection as sqlx::Connection>::connect(&env.pg.url(&t.database_name))
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{reader}';
         DROP OWNED BY \"{reader}\"; DROP ROLE \"{reader}\";
         CREATE ROLE silo_q_00000000000000000000000000000abc LOGIN"
    ))
    .execute(&mut su)
    .await
    .unwrap();
    crate::common::close(su).await;
    let report = env.control.reconcile_once().await.unwrap();
    assert_eq!(report.readers_fixed, 2, "{report:?}");
    assert!(role_exists(&env, &reader).await);
    assert!(!role_exists(&env, "silo_q_00000000000000000000000000000abc").await);
    let (ok, out) = psql(&session, "SELECT count(*) FROM patients").await;
    assert!(ok && out == "1", "{out}");
    let (ok, out) = psql(&session, "DELETE FROM patients").await;
    assert!(!ok && out.contains("permission denied"), "{out}");

    // Deleted: its reader role goes with its role.
    let (status, op) = env
        .call(Method::DELETE, "/admin/v1/tenants/library", None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{op}");
    let done = crate::common::wait_op(&env, &op).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(!role_exists(&env, &t.role_name).await);
    assert!(
        !role_exists(&env, &reader).await,
        "the reader role is dropped"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_credential_follows_its_tenant_to_another_server() {
    let env = TestEnv::setup().wire(|_| {}).start().await;
    let second = crate::common::second_server(&env).await;
    crate::common::create_on(&env, "roaming", "default").await;
    let writer = issue(&env, "roaming", json!({"name": "app"})).await;
    let reader = issue(&env, "roaming", json!({"name": "ro", "read_only": true})).await;
    let (ok, out) = psql(
        &writer,
        "INSERT INTO patients (id, full_name) VALUES (gen_random_uuid(), 'Ada')",
    )
    .await;
    assert!(ok, "{out}");
    let (ok, out) = psql(&reader, "SELECT count(*) FROM patients").await;
    assert!(ok && out == "1", "{out}");

    let (status, op) = env
        .call(
            Method::POST,
            "/admin/v1/tenants/roaming/move",
            Some(json!({"server": "second"})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{op}");
    let done = crate::common::wait_op(&env, &op).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let t = env.record("roaming").await;
    assert_eq!(t.server_name, "second");

    // Reads on the new server (its reader made there), writes still refused.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out) = psql(&reader, "SELECT count(*) FROM patients").await;
        if ok {
            assert_eq!(out, "1");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ok, out) = psql(&reader, "DELETE FROM patients").await;
    assert!(!ok && out.contains("permission denied"), "{out}");
    let reader_role = t.role_name.replace("silo_r_", "silo_q_");
    let mut su = <sqlx::PgConnection as sqlx::Connection>::connect(&second.url("postgres"))
        .await
        .unwrap();
    let on_second: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(&reader_role)
            .fetch_one(&mut su)
            .await
            .unwrap();
    crate::common::close(su).await;
    assert!(on_second, "the reader role is on the new server");
    assert!(
        !role_exists(&env, &reader_role).await,
        "and gone from the old one"
    );
}

/// A reader role lost on its server (dropped by hand, as a crash between
/// making a tenant's roles and its reader would leave it) refuses the
/// read-only login that finds it so, and is made again at once, not at the
/// next reconcile pass (none runs here): the next login reads.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_reader_role_is_made_again_when_a_read_only_login_is_refused() {
    let env = TestEnv::setup().wire(|_| {}).start().await;
    env.create("stacks").await;
    let session = issue(&env, "stacks", json!({"name": "ro", "read_only": true})).await;
    let (ok, out) = psql(&session, "SELECT 1").await;
    assert!(ok && out == "1", "{out}");
    let t = env.record("stacks").await;
    let reader = silo::servers::names::reader_role(&t.role_name).unwrap();
    let mut su = <sqlx::PgConnection as sqlx::Connection>::connect(&env.pg.url(&t.database_name))
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{reader}';
         DROP OWNED BY \"{reader}\"; DROP ROLE \"{reader}\";"
    ))
    .execute(&mut su)
    .await
    .unwrap();
    crate::common::close(su).await;
    assert!(!role_exists(&env, &reader).await);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut refused = 0;
    loop {
        let (ok, out) = psql(&session, "SELECT count(*) FROM patients").await;
        if ok {
            assert_eq!(out, "0");
            break;
        }
        refused += 1;
        assert!(
            std::time::Instant::now() < deadline,
            "still refused after {refused} tries: {out}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused >= 1, "the first login found the reader gone");
    assert!(role_exists(&env, &reader).await);
    let (ok, out) = psql(&session, "DELETE FROM patients").await;
    assert!(!ok && out.contains("permission denied"), "{out}");
}
