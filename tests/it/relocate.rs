//! Moving a tenant between two real PostgreSQL servers: under live app
//! traffic, with the target failing mid-copy, with silo killed mid-move,
//! with a copy that does not verify, and with requests that must be refused.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::table::{self, post, Client};
use crate::common::{create_on, second_server, Silo, TestEnv};
use axum::http::{Method, StatusCode};
use serde_json::{json, Value};
use silo::embedded::EmbeddedPostgres;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// A superuser pool on `database` of `pg`.
async fn superuser(pg: &EmbeddedPostgres, database: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .connect(&pg.url(database))
        .await
        .unwrap()
}

async fn token(env: &TestEnv, slug: &str) -> String {
    format!("Bearer {}", env.app_token(slug).await)
}

async fn start_move(env: &TestEnv, slug: &str, server: &str) -> String {
    let (s, op) = env
        .call(
            Method::POST,
            &format!("/admin/v1/tenants/{slug}/move"),
            Some(json!({ "server": server })),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    assert_eq!(op["kind"], "tenant.move");
    op["id"].as_str().unwrap().to_owned()
}

/// Poll an operation until it ends.
async fn finished(env: &TestEnv, op: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (s, body) = env
            .call(Method::GET, &format!("/admin/v1/operations/{op}"), None)
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        if body["status"] == "succeeded" || body["status"] == "failed" {
            return body;
        }
        assert!(Instant::now() < deadline, "operation did not end: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The tenant answers an app request through the router.
async fn assert_serves(env: &TestEnv, slug: &str) {
    let bearer = token(env, slug).await;
    let headers = [("x-tenant-id", slug), ("authorization", bearer.as_str())];
    let a = env
        .send(Method::GET, "/api/v1/patients?limit=1", None, &headers)
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
}

/// Wait until a move is copying rows (its target database and subscription exist).
async fn copying(env: &TestEnv, op: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = env
            .call(Method::GET, &format!("/admin/v1/operations/{op}"), None)
            .await;
        if body["progress"]["phase"] == "copying" {
            return;
        }
        assert_eq!(
            body["status"], "running",
            "the move ended before its copy: {body}"
        );
        assert!(Instant::now() < deadline, "the copy never started: {body}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Databases set aside by moves whose copy was not verified.
async fn kept_databases(pg: &EmbeddedPostgres) -> Vec<String> {
    let admin = superuser(pg, "postgres").await;
    let kept = sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE datname LIKE 'silo_kept_%'",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    admin.close().await;
    kept
}

/// Patients inserted straight into a tenant database.
async fn seed(pg: &EmbeddedPostgres, database: &str, rows: i64) {
    let db = superuser(pg, database).await;
    sqlx::query(
        "INSERT INTO patients (id, full_name, notes)
         SELECT gen_random_uuid(), 'seed ' || i, repeat('x', 200) FROM generate_series(1, $1) i",
    )
    .bind(rows)
    .execute(&db)
    .await
    .unwrap();
    db.close().await;
}

/// Everything a move creates besides the tenant's own database and role,
/// on both servers; empty once a move is over.
async fn move_leftovers(source: &EmbeddedPostgres, target: &EmbeddedPostgres) -> Vec<String> {
    let mut found = Vec::new();
    for (side, pg) in [("source", source), ("target", target)] {
        let db = superuser(pg, "postgres").await;
        let slots: Vec<String> = sqlx::query_scalar(
            "SELECT slot_name::text FROM pg_replication_slots
              WHERE slot_name LIKE 'silo_move_%' OR slot_name LIKE 'pg_%_sync_%'",
        )
        .fetch_all(&db)
        .await
        .unwrap();
        let subs: Vec<String> = sqlx::query_scalar(
            "SELECT subname::text FROM pg_subscription WHERE subname LIKE 'silo_move_%'",
        )
        .fetch_all(&db)
        .await
        .unwrap();
        found.extend(slots.into_iter().map(|s| format!("{side} slot {s}")));
        found.extend(subs.into_iter().map(|s| format!("{side} subscription {s}")));
        db.close().await;
    }
    found
}

async fn database_on(pg: &EmbeddedPostgres, name: &str) -> bool {
    exists_on(
        pg,
        "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
        name,
    )
    .await
}

async fn role_on(pg: &EmbeddedPostgres, name: &str) -> bool {
    exists_on(
        pg,
        "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)",
        name,
    )
    .await
}

async fn exists_on(pg: &EmbeddedPostgres, sql: &str, name: &str) -> bool {
    let db = superuser(pg, "postgres").await;
    let found: bool = sqlx::query_scalar(sql)
        .bind(name)
        .fetch_one(&db)
        .await
        .unwrap();
    db.close().await;
    found
}

/// What one app client saw.
#[derive(Default)]
struct Traffic {
    /// Names of patients whose create was answered 201.
    acked: Vec<String>,
    /// Names whose create got another answer (the write may or may not have landed).
    unacked: Vec<String>,
    /// 503 answers with `Retry-After` (the freeze).
    frozen: usize,
    /// Anything else: a create answered oddly, or a read that missed its own write.
    wrong: Vec<String>,
}

/// Where a client sends its app requests: this process's router, or
/// another `silo serve` replica over HTTP.
#[derive(Clone)]
enum Via {
    InProcess(Arc<TestEnv>),
    Replica(String),
}

impl Via {
    /// Status, `Retry-After` and body of one app request.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Option<String>, Value) {
        match self {
            Via::InProcess(env) => {
                let a = env.send(method, path, body, headers).await;
                (a.status, a.retry_after, a.body)
            }
            Via::Replica(base) => {
                let method = reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap();
                let mut req = reqwest::Client::new()
                    .request(method, format!("{base}{path}"))
                    .timeout(Duration::from_secs(30));
                for (k, v) in headers {
                    req = req.header(*k, *v);
                }
                if let Some(b) = body {
                    req = req
                        .header("content-type", "application/json")
                        .body(b.to_owned());
                }
                let res = req.send().await.expect("the replica answers");
                let status = StatusCode::from_u16(res.status().as_u16()).unwrap();
                let retry = res
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                (status, retry, res.json().await.unwrap_or(Value::Null))
            }
        }
    }
}

/// Create patients one after another, reading each back, until `stop`.
async fn client(
    via: Via,
    slug: String,
    bearer: String,
    n: usize,
    stop: Arc<AtomicBool>,
) -> Traffic {
    let mut t = Traffic::default();
    let headers = [
        ("x-tenant-id", slug.as_str()),
        ("authorization", bearer.as_str()),
    ];
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let name = format!("client {n} write {i}");
        let body = json!({ "full_name": name }).to_string();
        let (status, retry_after, answer) = via
            .send(Method::POST, "/api/v1/patients", Some(&body), &headers)
            .await;
        match status {
            StatusCode::CREATED => {
                let id = answer["id"].as_str().unwrap().to_owned();
                t.acked.push(name.clone());
                // Read your write: a read from the wrong database misses it.
                let (status, _, read) = via
                    .send(
                        Method::GET,
                        &format!("/api/v1/patients/{id}"),
                        None,
                        &headers,
                    )
                    .await;
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    t.frozen += 1;
                } else if status != StatusCode::OK || read["full_name"] != name.as_str() {
                    t.wrong.push(format!("read of {name}: {status} {read}"));
                }
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                t.unacked.push(name);
                if retry_after.as_deref() == Some("1") {
                    t.frozen += 1;
                } else {
                    t.wrong.push(format!("503 without Retry-After: {answer}"));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => {
                t.unacked.push(name);
                t.wrong.push(format!("create: {other} {answer}"));
            }
        }
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_moves_to_another_server_under_live_traffic_with_no_lost_write() {
    let env = TestEnv::start().await;
    let second = second_server(&env).await;
    create_on(&env, "mover", "default").await;
    let before = env.record("mover").await;
    seed(&env.pg, &before.database_name, 20_000).await;
    let bearer = token(&env, "mover").await;
    // A second replica: a `silo serve` process on the same control DB, whose
    // router learns of the freeze and the switch by NOTIFY only.
    let dir = tempfile::tempdir().unwrap();
    let replica = Silo::start(&env, None, 0, &dir.path().join("replica.log")).await;
    let env = Arc::new(env);

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..6)
        .map(|n| {
            let via = if n < 4 {
                Via::InProcess(env.clone())
            } else {
                Via::Replica(replica.base.clone())
            };
            tokio::spawn(client(via, "mover".into(), bearer.clone(), n, stop.clone()))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let op = start_move(&env, "mover", "second").await;
    let done = finished(&env, &op, Duration::from_secs(120)).await;
    // Traffic goes on a little on the target.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut traffic = Traffic::default();
    for c in clients {
        let t = c.await.unwrap();
        traffic.acked.extend(t.acked);
        traffic.unacked.extend(t.unacked);
        traffic.frozen += t.frozen;
        traffic.wrong.extend(t.wrong);
    }
    assert_eq!(done["status"], "succeeded", "{done}");
    let freeze_ms = done["result"]["freeze_ms"]
        .as_f64()
        .expect("freeze time reported");
    println!(
        "moved: freeze {freeze_ms:.1} ms {}, {} writes acknowledged, {} answered 503 + Retry-After",
        done["result"]["freeze_phases_ms"],
        traffic.acked.len(),
        traffic.frozen
    );
    assert!(traffic.wrong.is_empty(), "{:#?}", traffic.wrong);
    assert!(
        traffic.acked.len() > 20,
        "too little traffic to mean anything"
    );
    assert!(
        traffic.acked.iter().any(|n| n.starts_with("client 4 ")),
        "the other replica served no write"
    );
    replica.stop();

    // The registry names the target; the source's database and role are gone.
    let after = env.record("mover").await;
    assert_eq!(after.server_name, "second");
    assert_eq!(after.status, silo::registry::TenantStatus::Active);
    assert!(after.frozen_at.is_none());
    assert!(!database_on(&env.pg, &before.database_name).await);
    assert!(!role_on(&env.pg, &before.role_name).await);
    assert!(move_leftovers(&env.pg, &second).await.is_empty());

    // Every acknowledged write is on the target, once; nothing else was invented.
    let target = superuser(&second, &after.database_name).await;
    let names: Vec<String> =
        sqlx::query_scalar("SELECT full_name FROM patients WHERE full_name LIKE 'client %'")
            .fetch_all(&target)
            .await
            .unwrap();
    let present: HashSet<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(present.len(), names.len(), "a write landed twice");
    for name in &traffic.acked {
        assert!(
            present.contains(name.as_str()),
            "acknowledged write lost: {name}"
        );
    }
    let attempted: HashSet<&str> = traffic
        .acked
        .iter()
        .chain(&traffic.unacked)
        .map(String::as_str)
        .collect();
    assert!(present.iter().all(|n| attempted.contains(n)));
    // The target's database is marked as a provisioned one is (sealed):
    // `silo reconcile --adopt` can bring it back after a control DB restore.
    let mark: Option<String> = sqlx::query_scalar(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
    )
    .bind(&after.database_name)
    .fetch_one(&target)
    .await
    .unwrap();
    let mark = mark.expect("a mark on the moved database");
    assert!(
        mark.contains(&after.id.to_string()) && mark.contains("\"sealed\""),
        "{mark}"
    );
    let seeded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM patients WHERE full_name LIKE 'seed %'")
            .fetch_one(&target)
            .await
            .unwrap();
    assert_eq!(seeded, 20_000);
    // The move's fence table is not left in the tenant's database.
    let fence: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'silo_move')",
    )
    .fetch_one(&target)
    .await
    .unwrap();
    assert!(!fence);
    target.close().await;

    // The app keeps working on the target, as the tenant's own role only.
    let headers = [("x-tenant-id", "mover"), ("authorization", bearer.as_str())];
    let a = env
        .send(Method::GET, "/api/v1/patients?limit=5", None, &headers)
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    // A reconcile pass finds nothing to repair and drops nothing it should keep.
    let report = env.control.reconcile_once().await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.databases_quarantined, 0, "{report:?}");
    assert!(database_on(&second, &after.database_name).await);
    let a = env
        .send(Method::GET, "/api/v1/patients?limit=5", None, &headers)
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let (_, tenant) = env.call(Method::GET, "/admin/v1/tenants/mover", None).await;
    assert_eq!(tenant["server"], "second");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_move_whose_target_dies_mid_copy_leaves_the_tenant_serving_from_its_source() {
    let env = TestEnv::start().await;
    let mut second = second_server(&env).await;
    create_on(&env, "stayer", "default").await;
    let before = env.record("stayer").await;
    seed(&env.pg, &before.database_name, 400_000).await;
    let bearer = token(&env, "stayer").await;

    let op = start_move(&env, "stayer", "second").await;
    // Stop the target while rows are being copied.
    copying(&env, &op).await;
    second.stop().unwrap();
    let done = finished(&env, &op, Duration::from_secs(120)).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(
        !done["error"]
            .as_str()
            .unwrap()
            .contains(&env.superuser_password()),
        "a password in the error: {done}"
    );

    // Still on the source, serving, every row there.
    let t = env.record("stayer").await;
    assert_eq!(t.server_name, "default");
    assert!(t.frozen_at.is_none());
    let headers = [
        ("x-tenant-id", "stayer"),
        ("authorization", bearer.as_str()),
    ];
    let a = env
        .send(
            Method::POST,
            "/api/v1/patients",
            Some(r#"{"full_name": "after the failed move"}"#),
            &headers,
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    let db = superuser(&env.pg, &t.database_name).await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM patients")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(n, 400_001);
    let publications: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_publication")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(
        publications, 0,
        "the move's publication is left on the source"
    );
    db.close().await;

    // The target comes back with the half-copied database: the reconciler
    // drops it, its subscription and the source's slot.
    second.start_again().unwrap();
    for _ in 0..3 {
        env.control.reconcile_once().await.unwrap();
        if move_leftovers(&env.pg, &second).await.is_empty()
            && !database_on(&second, &t.database_name).await
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(move_leftovers(&env.pg, &second).await.is_empty());
    assert!(!database_on(&second, &t.database_name).await);
    assert!(!role_on(&second, &t.role_name).await);
    assert!(database_on(&env.pg, &t.database_name).await);

    // And the tenant can be moved once the target is healthy.
    let op = start_move(&env, "stayer", "second").await;
    let done = finished(&env, &op, Duration::from_secs(180)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(env.record("stayer").await.server_name, "second");
}

/// `silo serve` killed at `failpoint` mid-move; a restarted one settles it.
async fn killed_mid_move(failpoint: &str) -> (TestEnv, EmbeddedPostgres, String) {
    let env = TestEnv::start().await;
    let second = second_server(&env).await;
    create_on(&env, "crasher", "default").await;
    let t = env.record("crasher").await;
    seed(&env.pg, &t.database_name, 1_000).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("silo.log");
    let silo = Silo::start(&env, Some(failpoint), 0, &log).await;
    let (s, op) = silo
        .request(
            reqwest::Method::POST,
            "/admin/v1/tenants/crasher/move",
            Some(json!({"server": "second"})),
            None,
        )
        .await
        .unwrap();
    assert_eq!(s, 202, "{op}");
    silo.expect_abort();
    let op = op["id"].as_str().unwrap().to_owned();
    // The restart's reconcile pass settles the move.
    let silo = Silo::start(&env, None, 0, &log).await;
    let done = finished(&env, &op, Duration::from_secs(60)).await;
    silo.stop();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        !logged.contains(&env.superuser_password()),
        "a password in the log"
    );
    (env, second, done.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn silo_killed_during_the_freeze_rolls_the_move_back() {
    let (env, second, done) = killed_mid_move("move_frozen").await;
    assert!(done.contains("\"failed\""), "{done}");
    let t = env.record("crasher").await;
    assert_eq!(t.server_name, "default");
    assert!(t.frozen_at.is_none(), "still frozen");
    // Serving again from the source: its role got its login back.
    let mut conn = env
        .connect_tenant("crasher")
        .await
        .expect("tenant role logs in");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM patients")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 1_000);
    crate::common::close(conn).await;
    assert_serves(&env, "crasher").await;
    assert!(move_leftovers(&env.pg, &second).await.is_empty());
    assert!(!database_on(&second, &t.database_name).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn silo_killed_after_the_verified_switch_finishes_the_move() {
    let (env, second, done) = killed_mid_move("move_switched").await;
    assert!(done.contains("\"succeeded\""), "{done}");
    let t = env.record("crasher").await;
    assert_eq!(t.server_name, "second");
    assert!(t.frozen_at.is_none());
    assert!(
        !database_on(&env.pg, &t.database_name).await,
        "source database left"
    );
    assert!(!role_on(&env.pg, &t.role_name).await, "source role left");
    assert!(move_leftovers(&env.pg, &second).await.is_empty());
    let db = superuser(&second, &t.database_name).await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM patients")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(n, 1_000);
    db.close().await;
    assert_serves(&env, "crasher").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn silo_killed_between_the_verification_and_the_switch_rolls_the_move_back() {
    let (env, second, done) = killed_mid_move("move_verified").await;
    assert!(done.contains("\"failed\""), "{done}");
    // Verified but not switched: the registry names the source, so the
    // move is undone and the tenant serves from there with every row.
    let t = env.record("crasher").await;
    assert_eq!(t.server_name, "default");
    assert!(t.frozen_at.is_none(), "still frozen");
    let mut conn = env
        .connect_tenant("crasher")
        .await
        .expect("tenant role logs in");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM patients")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 1_000);
    crate::common::close(conn).await;
    assert_serves(&env, "crasher").await;
    assert!(kept_databases(&env.pg).await.is_empty());
    assert!(move_leftovers(&env.pg, &second).await.is_empty());
    assert!(!database_on(&second, &t.database_name).await);
}

/// Where "still" and "sleepy" are, and whether each is frozen for a move.
async fn placed(env: &TestEnv) -> Vec<(String, bool)> {
    let t = env.record("still").await;
    vec![(t.server_name, t.frozen_at.is_some())]
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_move_requests_get_a_clear_answer_and_change_nothing() {
    let env = TestEnv::start().await;
    let second = second_server(&env).await;
    create_on(&env, "still", "default").await;
    let still = "/admin/v1/tenants/still/move";
    #[rustfmt::skip]
    let rows = vec![
        post(still).json(json!({"server": "nowhere"})).is(422),
        post(still).json(json!({"server": "default"})).is(409),
        post(still).json(json!({})).is(422),
        post(still).json(json!({"server": ""})).is(422),
        post(still).json(json!({"server": 7})).is(422),
        post(still).json(json!({"server": "second", "now": true})).is(422),
        post(still).is(415),
        post("/admin/v1/tenants/nobody/move").json(json!({"server": "second"})).is(404),
    ];
    table::run(&Client::admin(&env), rows, async || placed(&env).await).await;
    // A table without a primary key cannot be replicated: refused up front.
    let t = env.record("still").await;
    let db = superuser(&env.pg, &t.database_name).await;
    sqlx::query("CREATE TABLE notes_without_key (body text)")
        .execute(&db)
        .await
        .unwrap();
    db.close().await;
    let (s, answer) = env
        .call(
            Method::POST,
            "/admin/v1/tenants/still/move",
            Some(json!({"server": "second"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{answer}");
    assert!(
        answer["detail"]
            .as_str()
            .unwrap()
            .contains("notes_without_key"),
        "{answer}"
    );
    let t = env.record("still").await;
    assert_eq!(t.server_name, "default");
    assert!(t.frozen_at.is_none());
    assert!(move_leftovers(&env.pg, &second).await.is_empty());

    // From a shell: refused with the reason, then done once the table has a key.
    let silo = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_silo"));
        cmd.args(args).env_remove("SILO_FAILPOINT");
        cmd.envs(env.silo_env());
        cmd.output().unwrap()
    };
    let refused = silo(&["tenants", "move", "still", "--to", "nowhere"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no server named 'nowhere'"));
    let db = superuser(&env.pg, &t.database_name).await;
    sqlx::query("ALTER TABLE notes_without_key ADD COLUMN id serial PRIMARY KEY")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("INSERT INTO notes_without_key (body) SELECT 'n' FROM generate_series(1, 5)")
        .execute(&db)
        .await
        .unwrap();
    db.close().await;
    let moved = silo(&["tenants", "move", "still", "--to", "second"]);
    assert!(
        moved.status.success(),
        "{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    let result: Value = serde_json::from_slice(&moved.stdout).unwrap();
    assert_eq!(result["server"], "second", "{result}");
    assert!(result["freeze_ms"].as_f64().is_some(), "{result}");
    assert_eq!(env.record("still").await.server_name, "second");
    // The sequence came along: the next id follows the last one copied.
    let t = env.record("still").await;
    let db = superuser(&second, &t.database_name).await;
    let next: i32 =
        sqlx::query_scalar("INSERT INTO notes_without_key (body) VALUES ('after') RETURNING id")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(next, 6);
    db.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schema_change_on_the_source_mid_move_fails_the_move_and_keeps_the_tenant() {
    let env = TestEnv::start().await;
    let second = second_server(&env).await;
    create_on(&env, "changer", "default").await;
    let t = env.record("changer").await;
    seed(&env.pg, &t.database_name, 200_000).await;
    let op = start_move(&env, "changer", "second").await;
    copying(&env, &op).await;
    // A column added on the source only (as a hand-run migration would).
    let db = superuser(&env.pg, &t.database_name).await;
    sqlx::raw_sql(
        "ALTER TABLE patients ADD COLUMN ward text;
         INSERT INTO patients (id, full_name, ward) VALUES (gen_random_uuid(), 'on the new ward', 'B')",
    )
    .execute(&db)
    .await
    .unwrap();
    let done = finished(&env, &op, Duration::from_secs(120)).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(
        done["error"].as_str().unwrap().contains("replication"),
        "{done}"
    );
    let t = env.record("changer").await;
    assert_eq!(t.server_name, "default");
    assert!(t.frozen_at.is_none());
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM patients WHERE ward = 'B'")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(n, 1);
    db.close().await;
    assert!(move_leftovers(&env.pg, &second).await.is_empty());
    assert!(!database_on(&second, &t.database_name).await);
    let conn = env
        .connect_tenant("changer")
        .await
        .expect("tenant role logs in");
    crate::common::close(conn).await;
}

/// What a failed verification must leave: the tenant on the source,
/// unfrozen, serving, with `rows` patients; the target and every piece of
/// the move gone; nothing set aside.
async fn assert_stayed_on_the_source(
    env: &TestEnv,
    second: &EmbeddedPostgres,
    slug: &str,
    rows: i64,
) {
    let t = env.record(slug).await;
    assert_eq!(t.server_name, "default");
    assert!(t.frozen_at.is_none(), "still frozen");
    let mut conn = env.connect_tenant(slug).await.expect("tenant role logs in");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM patients")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, rows);
    crate::common::close(conn).await;
    assert_serves(env, slug).await;
    assert!(kept_databases(&env.pg).await.is_empty());
    assert!(move_leftovers(&env.pg, second).await.is_empty());
    assert!(!database_on(second, &t.database_name).await);
    assert!(!role_on(second, &t.role_name).await);
    let report = env.control.reconcile_once().await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(database_on(&env.pg, &t.database_name).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_that_loses_a_row_is_never_switched_to_and_the_source_keeps_serving() {
    let env = TestEnv::start().await;
    let second = second_server(&env).await;
    create_on(&env, "lossy", "default").await;
    let t = env.record("lossy").await;
    seed(&env.pg, &t.database_name, 200_000).await;
    let op = start_move(&env, "lossy", "second").await;
    copying(&env, &op).await;
    // Sabotage the target: its replication silently drops one row.
    let target = superuser(&second, &t.database_name).await;
    sqlx::raw_sql(
        "CREATE FUNCTION lose_one() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.full_name = 'lost on the way' THEN RETURN NULL; END IF; RETURN NEW; END $$;
         CREATE TRIGGER lose_one BEFORE INSERT ON patients FOR EACH ROW EXECUTE FUNCTION lose_one();
         ALTER TABLE patients ENABLE ALWAYS TRIGGER lose_one;",
    )
    .execute(&target)
    .await
    .unwrap();
    target.close().await;
    let source = superuser(&env.pg, &t.database_name).await;
    sqlx::query(
        "INSERT INTO patients (id, full_name) VALUES (gen_random_uuid(), 'lost on the way')",
    )
    .execute(&source)
    .await
    .unwrap();
    source.close().await;

    let done = finished(&env, &op, Duration::from_secs(120)).await;
    assert_eq!(done["status"], "failed", "{done}");
    let error = done["error"].as_str().unwrap();
    assert!(error.contains("verify the copy"), "{error}");
    assert!(
        error.contains("public.patients: 200001 rows on the source, 200000 on the target"),
        "{error}"
    );
    assert!(error.contains("stays on server 'default'"), "{error}");
    assert_stayed_on_the_source(&env, &second, "lossy", 200_001).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_changed_on_the_target_fails_the_checksum_and_the_source_keeps_serving() {
    let env = TestEnv::start().await;
    let second = second_server(&env).await;
    create_on(&env, "tampered", "default").await;
    let t = env.record("tampered").await;
    seed(&env.pg, &t.database_name, 5_000).await;
    // The move waits in its freeze, before the verification, until told.
    let pause = silo::relocate::testing::arm(silo::relocate::testing::BEFORE_VERIFY, t.id);
    let op = start_move(&env, "tampered", "second").await;
    tokio::time::timeout(Duration::from_secs(120), pause.reached())
        .await
        .expect("the move reached its verification");
    // Behind the subscription's back: same row count, one row different.
    let target = superuser(&second, &t.database_name).await;
    let changed = sqlx::query(
        "UPDATE patients SET full_name = 'tampered with' WHERE id = (SELECT id FROM patients ORDER BY id LIMIT 1)",
    )
    .execute(&target)
    .await
    .unwrap();
    assert_eq!(changed.rows_affected(), 1);
    target.close().await;
    pause.resume();

    let done = finished(&env, &op, Duration::from_secs(120)).await;
    assert_eq!(done["status"], "failed", "{done}");
    let error = done["error"].as_str().unwrap();
    assert!(
        error.contains("public.patients: 5000 rows on both, but their contents differ"),
        "{error}"
    );
    assert!(error.contains("it was not switched to"), "{error}");
    assert_stayed_on_the_source(&env, &second, "tampered", 5_000).await;
    // Every row as it was on the source: nothing of the tampered copy.
    let source = superuser(&env.pg, &t.database_name).await;
    let tampered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM patients WHERE full_name = 'tampered with'")
            .fetch_one(&source)
            .await
            .unwrap();
    assert_eq!(tampered, 0);
    source.close().await;

    // With the tampering gone, the same move verifies and switches.
    let op = start_move(&env, "tampered", "second").await;
    let done = finished(&env, &op, Duration::from_secs(120)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(
        done["result"]["freeze_phases_ms"]["verify"]
            .as_f64()
            .is_some(),
        "{done}"
    );
    assert_eq!(env.record("tampered").await.server_name, "second");
}

/// A restore and a move of one tenant asked at once: exactly one starts and
/// the other is refused with 409 naming the running operation (both check
/// and record under the tenant's lock), round after round.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restore_and_a_move_of_one_tenant_asked_at_once_start_exactly_one() {
    let env = TestEnv::setup().storage().start().await;
    let _second = second_server(&env).await;
    create_on(&env, "contested", "default").await;
    let t = env.record("contested").await;
    let b = env
        .backups()
        .backup_now(t.id, silo::backup::BackupKind::Manual, None)
        .await
        .unwrap();
    let restore = json!({"backup_id": b.id, "overwrite": true});
    for round in 0..5 {
        let to = match env.record("contested").await.server_name.as_str() {
            "default" => "second",
            _ => "default",
        };
        let ((rs, r), (ms, m)) = tokio::join!(
            env.call(
                Method::POST,
                "/admin/v1/tenants/contested/restore",
                Some(restore.clone()),
            ),
            env.call(
                Method::POST,
                "/admin/v1/tenants/contested/move",
                Some(json!({ "server": to })),
            ),
        );
        let answers = [(rs, &r), (ms, &m)];
        let accepted: Vec<&Value> = answers
            .iter()
            .filter(|(s, _)| *s == StatusCode::ACCEPTED)
            .map(|(_, op)| *op)
            .collect();
        let ended: Vec<Value> = futures::future::join_all(
            accepted
                .iter()
                .map(|op| finished(&env, op["id"].as_str().unwrap(), Duration::from_secs(120))),
        )
        .await;
        assert_eq!(
            accepted.len(),
            1,
            "round {round}: restore {rs} {r}, move {ms} {m}; ended: {ended:?}"
        );
        assert_eq!(ended[0]["status"], "succeeded", "round {round}: {ended:?}");
        let (s, refused) = answers
            .iter()
            .find(|(s, _)| *s != StatusCode::ACCEPTED)
            .unwrap();
        assert_eq!(*s, StatusCode::CONFLICT, "round {round}: {refused}");
        assert!(
            refused["detail"]
                .as_str()
                .unwrap()
                .contains("another operation on this tenant is running"),
            "round {round}: {refused}"
        );
    }
    assert_serves(&env, "contested").await;
}

/// A database already under the tenant's database name on the target (an
/// operator's, or the tenant's own data there after a control database
/// restored to before an earlier move) is kept aside by a move, never
/// dropped (it was dropped before the copy, with whatever it held).
#[tokio::test(flavor = "multi_thread")]
async fn a_database_already_under_the_tenant_s_name_on_the_target_is_kept_not_dropped() {
    let env = TestEnv::start().await;
    let second = second_server(&env).await;
    create_on(&env, "squatted", "default").await;
    let t = env.record("squatted").await;
    let admin = superuser(&second, "postgres").await;
    sqlx::raw_sql(&format!("CREATE DATABASE \"{}\"", t.database_name))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let db = superuser(&second, &t.database_name).await;
    sqlx::raw_sql("CREATE TABLE precious (x int); INSERT INTO precious VALUES (42)")
        .execute(&db)
        .await
        .unwrap();
    db.close().await;

    let op = start_move(&env, "squatted", "second").await;
    let done = finished(&env, &op, Duration::from_secs(120)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_serves(&env, "squatted").await;
    let kept = kept_databases(&second).await;
    assert_eq!(kept.len(), 1, "{kept:?}");
    let db = superuser(&second, &kept[0]).await;
    let x: i32 = sqlx::query_scalar("SELECT x FROM precious")
        .fetch_one(&db)
        .await
        .unwrap();
    db.close().await;
    assert_eq!(x, 42);
}

/// A move whose *source* stops mid-copy fails, and its clean-up of the
/// source cannot get through. Once the source is back, a reconcile pass
/// drops the move's publication and fence schema there: left behind, the
/// fence table made every later verification and archival of the tenant
/// fail ("silo_move.fence: expected 1, missing").
#[tokio::test(flavor = "multi_thread")]
async fn a_move_whose_source_stops_is_cleaned_up_on_the_source_once_it_is_back() {
    let env = TestEnv::setup().storage().start().await;
    let mut second = second_server(&env).await;
    create_on(&env, "unmoored", "second").await;
    let t = env.record("unmoored").await;
    seed(&second, &t.database_name, 400_000).await;

    let op = start_move(&env, "unmoored", "default").await;
    copying(&env, &op).await;
    second.stop().unwrap();
    let done = finished(&env, &op, Duration::from_secs(120)).await;
    assert_eq!(done["status"], "failed", "{done}");
    second.start_again().unwrap();
    let leftovers = |pg: &EmbeddedPostgres| {
        let url = pg.url(&t.database_name);
        async move {
            let db = PgPoolOptions::new()
                .max_connections(1)
                .connect(&url)
                .await
                .unwrap();
            let n: i64 = sqlx::query_scalar(
                "SELECT (SELECT count(*) FROM pg_publication)
                      + (SELECT count(*) FROM pg_namespace WHERE nspname = 'silo_move')",
            )
            .fetch_one(&db)
            .await
            .unwrap();
            db.close().await;
            n
        }
    };
    assert!(
        leftovers(&second).await > 0,
        "the source kept the move's pieces"
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let report = env.control.reconcile_once().await.unwrap();
        if report.move_sources_cleaned == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{report:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(leftovers(&second).await, 0);
    let report = env.control.reconcile_once().await.unwrap();
    assert_eq!(report.move_sources_cleaned, 0, "{report:?}");

    // Its backups verify again.
    let b = env
        .backups()
        .backup_now(t.id, silo::backup::BackupKind::Manual, None)
        .await
        .unwrap();
    env.backups().verify_backup(b.id, None).await.unwrap();
    assert_eq!(env.record("unmoored").await.server_name, "second");
}

/// A move to a server whose admin login may not create subscriptions (not
/// a superuser) is refused before anything is made: it failed at `CREATE
/// SUBSCRIPTION`, which PostgreSQL wrote to the target's log with the
/// source's admin password in it.
#[tokio::test(flavor = "multi_thread")]
async fn a_move_to_a_server_whose_login_may_not_subscribe_is_refused_up_front() {
    let env = TestEnv::start().await;
    create_on(&env, "grounded", "default").await;
    let pg = tokio::task::spawn_blocking(EmbeddedPostgres::start_throwaway)
        .await
        .unwrap()
        .unwrap();
    let admin = superuser(&pg, "postgres").await;
    sqlx::raw_sql(
        "CREATE ROLE mover LOGIN CREATEDB CREATEROLE PASSWORD 'mover-password-0123456789';
         GRANT pg_signal_backend TO mover",
    )
    .execute(&admin)
    .await
    .unwrap();
    admin.close().await;
    let url = pg.url("postgres");
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.split_once('@').unwrap().1;
    let mover_url = format!("{scheme}://mover:mover-password-0123456789@{host}");
    let (s, body) = env
        .call(
            Method::POST,
            "/admin/v1/servers",
            Some(json!({"name": "no-subscribe", "admin_url": mover_url})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");

    let (s, body) = env
        .call(
            Method::POST,
            "/admin/v1/tenants/grounded/move",
            Some(json!({"server": "no-subscribe"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("may not create subscriptions"),
        "{body}"
    );
    assert_eq!(env.record("grounded").await.server_name, "default");
    let t = env.record("grounded").await;
    assert!(!database_on(&pg, &t.database_name).await);

    // Such a login may not set a role's temp_file_limit nor read
    // pg_authid: tenants are made there all the same (without the limit),
    // and a reconcile pass checks neither and fails nothing.
    create_on(&env, "plainly", "no-subscribe").await;
    let plain = env.record("plainly").await;
    let su = superuser(&pg, "postgres").await;
    let settings: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_db_role_setting WHERE setrole = $1::regrole")
            .bind(&plain.role_name)
            .fetch_one(&su)
            .await
            .unwrap();
    su.close().await;
    assert_eq!(settings, 0);
    let report = env.control.reconcile_once().await.unwrap();
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(report.role_settings_set, 0, "{report:?}");
    assert_eq!(report.passwords_restored, 0, "{report:?}");
    assert_serves(&env, "plainly").await;
}

/// A target drained while a move copies to it takes no tenant: the move
/// checks it again before the freeze and fails, the tenant staying on its
/// source (it was checked only when the move started, and the drained
/// server took the tenant).
#[tokio::test(flavor = "multi_thread")]
async fn a_target_drained_during_the_copy_takes_no_tenant() {
    let env = TestEnv::start().await;
    let _second = second_server(&env).await;
    create_on(&env, "undrained", "default").await;
    let before = env.record("undrained").await;
    seed(&env.pg, &before.database_name, 400_000).await;

    let op = start_move(&env, "undrained", "second").await;
    copying(&env, &op).await;
    let (s, body) = env
        .call(
            Method::PATCH,
            "/admin/v1/servers/second",
            Some(json!({"status": "draining"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let done = finished(&env, &op, Duration::from_secs(180)).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(
        done["error"].as_str().unwrap().contains("draining"),
        "{done}"
    );
    let t = env.record("undrained").await;
    assert_eq!(t.server_name, "default");
    assert!(t.frozen_at.is_none());
    assert_serves(&env, "undrained").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_moves_at_once_to_a_server_with_one_place_move_one_tenant() {
    let env = TestEnv::start().await;
    let _second = second_server(&env).await;
    create_on(&env, "mover-a", "default").await;
    create_on(&env, "mover-b", "default").await;
    let (s, body) = env
        .call(
            Method::PATCH,
            "/admin/v1/servers/second",
            Some(json!({"max_tenants": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");

    let ask = |slug: &'static str| {
        let env = &env;
        async move {
            env.call(
                Method::POST,
                &format!("/admin/v1/tenants/{slug}/move"),
                Some(json!({"server": "second"})),
            )
            .await
        }
    };
    let (a, b) = tokio::join!(ask("mover-a"), ask("mover-b"));
    let mut moved = 0;
    for (s, body) in [a, b] {
        match s {
            // Refused up front: the other move holds the last place.
            StatusCode::CONFLICT => {
                assert!(body["detail"].as_str().unwrap().contains("full"), "{body}")
            }
            StatusCode::ACCEPTED => {
                let op = body["id"].as_str().unwrap();
                let done = finished(&env, op, Duration::from_secs(180)).await;
                match done["status"].as_str() {
                    Some("succeeded") => moved += 1,
                    // Both passed the first check: the later one is stopped
                    // before anything is made on the target.
                    _ => assert!(done["error"].as_str().unwrap().contains("full"), "{done}"),
                }
            }
            _ => panic!("{s}: {body}"),
        }
    }
    assert_eq!(moved, 1);
    let on_second = [env.record("mover-a").await, env.record("mover-b").await]
        .iter()
        .filter(|t| t.server_name == "second")
        .count();
    assert_eq!(on_second, 1);
    assert_serves(&env, "mover-a").await;
    assert_serves(&env, "mover-b").await;
    // Full now: a create naming it is refused.
    let (s, body) = env
        .call(
            Method::POST,
            "/admin/v1/tenants",
            Some(json!({"slug": "late", "name": "Late", "server": "second"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
}

/// Whether `role` exists on `pg` and may log in.
async fn may_log_in_on(pg: &EmbeddedPostgres, role: &str) -> bool {
    exists_on(
        pg,
        "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1 AND rolcanlogin)",
        role,
    )
    .await
}

/// Patients in a tenant's database on `pg`, counted as the superuser.
async fn patients_on(pg: &EmbeddedPostgres, database: &str) -> i64 {
    let db = superuser(pg, database).await;
    let n = sqlx::query_scalar("SELECT count(*) FROM patients")
        .fetch_one(&db)
        .await
        .unwrap();
    db.close().await;
    n
}

async fn set_suspended(env: &TestEnv, slug: &str, suspended: bool) {
    let action = if suspended { "suspend" } else { "resume" };
    let (s, body) = env
        .call(
            Method::POST,
            &format!("/admin/v1/tenants/{slug}/{action}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{action} {slug}: {body}");
}

/// A suspended tenant moves (draining a server takes it along), arrives
/// suspended with every row, its role unable to log in anywhere, and serves
/// from its new server once resumed.
#[tokio::test(flavor = "multi_thread")]
async fn a_suspended_tenant_moves_and_stays_suspended_until_resumed() {
    let env = TestEnv::start().await;
    let second = second_server(&env).await;
    create_on(&env, "dormant", "default").await;
    let before = env.record("dormant").await;
    seed(&env.pg, &before.database_name, 2_000).await;
    set_suspended(&env, "dormant", true).await;

    let op = start_move(&env, "dormant", "second").await;
    let done = finished(&env, &op, Duration::from_secs(120)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let t = env.record("dormant").await;
    assert_eq!(t.server_name, "second");
    assert_eq!(t.status.as_str(), "suspended");
    assert!(t.frozen_at.is_none());
    assert!(role_on(&second, &t.role_name).await);
    assert!(
        !may_log_in_on(&second, &t.role_name).await,
        "a suspended tenant's role may not log in on its new server"
    );
    assert!(!database_on(&env.pg, &t.database_name).await);
    assert!(!role_on(&env.pg, &t.role_name).await);
    assert!(move_leftovers(&env.pg, &second).await.is_empty());
    assert_eq!(patients_on(&second, &t.database_name).await, 2_000);

    set_suspended(&env, "dormant", false).await;
    assert!(may_log_in_on(&second, &t.role_name).await);
    assert_serves(&env, "dormant").await;
}

/// A tenant suspended while its move copies arrives suspended; one resumed
/// meanwhile arrives active and serves. Each move waits after its copy,
/// before the cut-over, while its tenant's state changes.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_suspended_or_resumed_during_its_move_arrives_as_it_is_at_the_cut_over() {
    use silo::relocate::testing::{arm, COPIED};
    let env = TestEnv::start().await;
    let second = second_server(&env).await;
    create_on(&env, "napper", "default").await;
    create_on(&env, "waker", "default").await;
    set_suspended(&env, "waker", true).await;
    for (slug, suspend) in [("napper", true), ("waker", false)] {
        let t = env.record(slug).await;
        seed(&env.pg, &t.database_name, 500).await;
        let pause = arm(COPIED, t.id);
        let op = start_move(&env, slug, "second").await;
        tokio::time::timeout(Duration::from_secs(120), pause.reached())
            .await
            .expect("the move copied its tenant");
        set_suspended(&env, slug, suspend).await;
        pause.resume();
        let done = finished(&env, &op, Duration::from_secs(120)).await;
        assert_eq!(done["status"], "succeeded", "{slug}: {done}");
        let t = env.record(slug).await;
        assert_eq!(t.server_name, "second", "{slug}");
        let (status, may_log_in) = if suspend {
            ("suspended", false)
        } else {
            ("active", true)
        };
        assert_eq!(t.status.as_str(), status, "{slug}");
        assert_eq!(
            may_log_in_on(&second, &t.role_name).await,
            may_log_in,
            "{slug}"
        );
        assert!(!database_on(&env.pg, &t.database_name).await, "{slug}");
        assert_eq!(patients_on(&second, &t.database_name).await, 500, "{slug}");
    }
    assert_serves(&env, "waker").await;
    assert!(move_leftovers(&env.pg, &second).await.is_empty());
}

/// A move waiting for a work slot holds its place on its target: with the
/// process's one slot taken by another move to the same server, a create
/// naming that server finds it full, counting both moves, and both moves
/// then finish there.
#[tokio::test(flavor = "multi_thread")]
async fn a_queued_move_holds_its_place_on_its_target() {
    use silo::relocate::testing::{arm, COPIED};
    let mut args = crate::common::storage_args();
    args.backup_concurrency = 1;
    let env = TestEnv::setup().storage_args(args).start().await;
    let _second = second_server(&env).await;
    create_on(&env, "first-in", "default").await;
    create_on(&env, "next-in", "default").await;
    let (s, body) = env
        .call(
            Method::PATCH,
            "/admin/v1/servers/second",
            Some(json!({"max_tenants": 2})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");

    let first = env.record("first-in").await;
    let pause = arm(COPIED, first.id);
    let running = start_move(&env, "first-in", "second").await;
    tokio::time::timeout(Duration::from_secs(120), pause.reached())
        .await
        .expect("the first move copied its tenant");
    let queued = start_move(&env, "next-in", "second").await;
    let (_, op) = env
        .call(Method::GET, &format!("/admin/v1/operations/{queued}"), None)
        .await;
    assert_eq!(op["status"], "queued", "{op}");
    let late = json!({"slug": "late", "name": "Late", "server": "second"});
    let (s, body) = env
        .call(Method::POST, "/admin/v1/tenants", Some(late.clone()))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("full (0 of 2 tenants, 2 more being moved to it)"),
        "{body}"
    );

    pause.resume();
    for op in [running, queued] {
        let done = finished(&env, &op, Duration::from_secs(180)).await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    for slug in ["first-in", "next-in"] {
        assert_eq!(env.record(slug).await.server_name, "second", "{slug}");
        assert_serves(&env, slug).await;
    }
    let (s, body) = env
        .call(Method::POST, "/admin/v1/tenants", Some(late))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("full (2 of 2 tenants)"),
        "{body}"
    );
}
