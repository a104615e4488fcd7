//! Usage metering and storage quotas against a real PostgreSQL: a tenant
//! filled past its plan's quota through the app API goes read-only within
//! one collector pass (enforced by privileges: its own role's session cannot
//! write whatever it SETs), comes back when its plan grows, its counters and
//! daily rollup are right, one replica collects at a time, and the usage
//! endpoints refuse bad parameters.

use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use rand::distributions::{Alphanumeric, DistString};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};

use crate::common::table::{self, get, Client};
use crate::common::{Silo, TestEnv, ADMIN_TOKEN};

/// App traffic of one tenant, counted as the collector should count it.
struct App<'a> {
    env: &'a TestEnv,
    slug: String,
    token: String,
    requests: i64,
    errors: i64,
}

impl App<'_> {
    async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let bearer = format!("Bearer {}", self.token);
        let a = self
            .env
            .send(
                method,
                &format!("/api/v1{path}"),
                body.map(|b| b.to_string()).as_deref(),
                &[("x-tenant-id", &self.slug), ("authorization", &bearer)],
            )
            .await;
        self.requests += 1;
        if a.status.as_u16() >= 400 {
            self.errors += 1;
            assert_eq!(a.content_type, "application/problem+json", "{}", a.body);
        }
        (a.status, a.body)
    }

    /// A patient whose notes hold `10_000` random characters (they do not
    /// compress): about 10 kB of the database each.
    async fn add_patient(&mut self) -> (StatusCode, Value) {
        let notes = Alphanumeric.sample_string(&mut rand::thread_rng(), 10_000);
        self.call(
            Method::POST,
            "/patients",
            Some(json!({"full_name": "Ada Filler", "notes": notes})),
        )
        .await
    }
}

async fn database_size(env: &TestEnv, database: &str) -> i64 {
    sqlx::query_scalar("SELECT pg_database_size($1)")
        .bind(database)
        .fetch_one(&env.admin)
        .await
        .unwrap()
}

async fn usage(env: &TestEnv, slug: &str) -> Value {
    let (s, body) = env
        .call(
            Method::GET,
            &format!("/admin/v1/tenants/{slug}/usage?days=7"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body
}

/// Run passes until `done` holds of the tenant's usage (PostgreSQL's
/// statistics reach its shared counters up to a second after a commit).
async fn collect_until(
    env: &TestEnv,
    slug: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        env.control
            .collect_usage_once()
            .await
            .unwrap()
            .expect("no other pass runs");
        let u = usage(env, slug).await;
        if done(&u) {
            return u;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never seen; last usage {u:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every way a session of the tenant's own role might try to write.
async fn tenant_session_writes(conn: &mut PgConnection) -> Vec<(&'static str, Result<(), String>)> {
    let attempts: &[(&str, &str)] = &[
        ("INSERT", "INSERT INTO patients (full_name) VALUES ('sneaky')"),
        ("UPDATE", "UPDATE patients SET notes = 'x'"),
        ("DELETE", "DELETE FROM patients"),
        ("TRUNCATE", "TRUNCATE patients"),
        ("SET read_only off", "SET default_transaction_read_only = off; INSERT INTO patients (full_name) VALUES ('sneaky')"),
        ("SET transaction read write", "BEGIN READ WRITE; INSERT INTO patients (full_name) VALUES ('sneaky'); COMMIT"),
        ("RESET ALL", "RESET ALL; INSERT INTO patients (full_name) VALUES ('sneaky')"),
        ("SET ROLE", "SET ROLE postgres"),
        ("SET SESSION AUTHORIZATION", "SET SESSION AUTHORIZATION postgres"),
        ("temporary table", "CREATE TEMP TABLE scratch (x text)"),
        ("table", "CREATE TABLE public.scratch (x text)"),
        ("large object", "SELECT lo_from_bytea(0, 'abc'::bytea)"),
        ("COPY", "COPY patients (full_name) FROM PROGRAM 'echo x'"),
    ];
    let mut out = Vec::new();
    for (name, sql) in attempts {
        let r = sqlx::raw_sql(sql).execute(&mut *conn).await;
        // A failed BEGIN block leaves the transaction open: end it.
        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
        out.push((*name, r.map(|_| ()).map_err(|e| e.to_string())));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_filled_past_its_quota_goes_read_only_in_one_pass_and_writable_when_its_plan_grows(
) {
    let env = TestEnv::start().await;
    env.create("quota-a").await;
    env.create("quota-b").await;
    let t = env.record("quota-a").await;
    let mut app = App {
        env: &env,
        slug: "quota-a".into(),
        token: env.app_token("quota-a").await,
        requests: 0,
        errors: 0,
    };
    // The first pass sets every counter's baseline.
    let first = env.control.collect_usage_once().await.unwrap().unwrap();
    assert_eq!(
        first.queries_per_server.values().copied().max(),
        Some(1),
        "{first:?}"
    );
    assert!(first.went_read_only.is_empty(), "{first:?}");

    // A plan whose quota is 400 kB above the tenant's size now.
    let quota = database_size(&env, &t.database_name).await + 400_000;
    let (s, body) = env
        .call(
            Method::POST,
            "/admin/v1/plans",
            Some(json!({"name": "tiny", "connection_limit": 5, "storage_quota_bytes": quota})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (s, body) = env
        .call(
            Method::PATCH,
            "/admin/v1/tenants/quota-a",
            Some(json!({"plan": "tiny"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let under = env.control.collect_usage_once().await.unwrap().unwrap();
    assert!(
        under.went_read_only.is_empty(),
        "under its quota: {under:?}"
    );

    // Fill it through the app API until its database is past the quota.
    let mut added = 0;
    while database_size(&env, &t.database_name).await <= quota {
        for _ in 0..5 {
            let (s, body) = app.add_patient().await;
            assert_eq!(s, StatusCode::CREATED, "{body}");
            added += 1;
        }
        assert!(added < 400, "the database never grew past {quota} bytes");
    }
    let (s, _) = app.call(Method::GET, "/patients?limit=1", None).await;
    assert_eq!(s, StatusCode::OK);

    // One pass: read-only, recorded and audited; the other tenant untouched.
    let pass = env.control.collect_usage_once().await.unwrap().unwrap();
    assert_eq!(pass.went_read_only, vec!["quota-a".to_owned()], "{pass:?}");
    let rec = env.record("quota-a").await;
    assert!(rec.over_quota_at.is_some());
    assert!(env.record("quota-b").await.over_quota_at.is_none());
    let audit: Vec<(String, Value)> = sqlx::query_as(
        "SELECT action, detail FROM audit_log WHERE tenant_id = $1 AND actor = 'usage-collector' ORDER BY id",
    )
    .bind(t.id)
    .fetch_all(env.registry().pool())
    .await
    .unwrap();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0].0, "tenant.over_quota");
    assert_eq!(audit[0].1["storage_quota_bytes"], json!(quota));
    assert!(
        audit[0].1["size_bytes"].as_i64().unwrap() > quota,
        "{audit:?}"
    );
    let (s, body) = env
        .call(Method::GET, "/admin/v1/tenants/quota-a", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(!body["over_quota_at"].is_null(), "{body}");

    // App writes: a 403 naming the quota, at once (PostgreSQL refuses them
    // even before this process hears of the change); reads still 200.
    for (method, path, body) in [
        (
            Method::POST,
            "/patients",
            Some(json!({"full_name": "Late Comer"})),
        ),
        (Method::POST, "/clinics", Some(json!({"name": "Annex"}))),
    ] {
        let (s, answer) = app.call(method, path, body).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{answer}");
        let detail = answer["detail"].as_str().unwrap();
        assert!(
            detail.contains("storage quota") && detail.contains(&quota.to_string()),
            "{detail}"
        );
        assert!(detail.contains("reads still work"), "{detail}");
    }
    let (s, list) = app.call(Method::GET, "/patients?limit=5", None).await;
    assert_eq!(s, StatusCode::OK, "{list}");
    // Once the router heard of it, the answer names the size too.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, answer) = app
            .call(
                Method::DELETE,
                "/patients/00000000-0000-0000-0000-000000000000",
                None,
            )
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{answer}");
        if answer["detail"].as_str().unwrap().contains(" bytes)") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the router never heard of the quota: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The tenant's own role, straight to its database: no trick writes.
    let mut conn = env.connect_tenant("quota-a").await.unwrap();
    let refused = |attempts: Vec<(&str, Result<(), String>)>| {
        let wrote: Vec<_> = attempts.into_iter().filter(|(_, r)| r.is_ok()).collect();
        assert!(
            wrote.is_empty(),
            "a read-only tenant role could still: {wrote:?}"
        );
    };
    refused(tenant_session_writes(&mut conn).await);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM patients")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, added, "reads work, and nothing was written");

    // Regranting the tenant's privileges (what fleet migrations, the
    // reconciler and moves do) keeps it read-only.
    let db = env
        .control
        .servers()
        .admin_of(env.registry(), t.server_id)
        .await
        .unwrap()
        .single_pool(&t.database_name)
        .await
        .unwrap();
    silo::servers::schema::grant(&db, Some(&t.role_name))
        .await
        .unwrap();
    db.close().await;
    refused(tenant_session_writes(&mut conn).await);
    // And the next pass changes nothing.
    let again = env.control.collect_usage_once().await.unwrap().unwrap();
    assert!(
        again.went_read_only.is_empty() && again.went_writable.is_empty(),
        "{again:?}"
    );

    // Its plan grows: writable again within one pass, recorded and audited.
    let (s, body) = env
        .call(
            Method::PATCH,
            "/admin/v1/plans/tiny",
            Some(json!({"storage_quota_bytes": quota * 100})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let pass = env.control.collect_usage_once().await.unwrap().unwrap();
    assert_eq!(pass.went_writable, vec!["quota-a".to_owned()], "{pass:?}");
    assert!(env.record("quota-a").await.over_quota_at.is_none());
    let actions: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE tenant_id = $1 AND actor = 'usage-collector' ORDER BY id",
    )
    .bind(t.id)
    .fetch_all(env.registry().pool())
    .await
    .unwrap();
    assert_eq!(actions, ["tenant.over_quota", "tenant.under_quota"]);
    sqlx::query("INSERT INTO patients (full_name) VALUES ('back')")
        .execute(&mut conn)
        .await
        .expect("the tenant role writes again");
    conn.close().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, body) = app.add_patient().await;
        if s == StatusCode::CREATED {
            break;
        }
        assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
        assert!(
            Instant::now() < deadline,
            "app writes never came back: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    added += 2; // the direct insert and the app's

    // Counters: rows written and commits since the baseline pass, and
    // exactly the app requests and errors sent.
    env.router.flush_requests().await;
    let u = collect_until(&env, "quota-a", "every insert counted", |u| {
        u["current"]["rows_written"].as_i64().unwrap_or(0) >= added
    })
    .await;
    let current = &u["current"];
    assert_eq!(current["requests"], json!(app.requests), "{u:#}");
    assert_eq!(current["errors"], json!(app.errors), "{u:#}");
    assert!(current["commits"].as_i64().unwrap() >= added, "{u:#}");
    assert!(current["size_bytes"].as_i64().unwrap() > quota, "{u:#}");
    assert_eq!(u["storage_quota_bytes"], json!(quota * 100));
    assert!(u["over_quota_at"].is_null());
    // The daily rollup holds the same (the test may span midnight UTC: sum the days).
    let days = u["daily"].as_array().unwrap();
    let sum = |k: &str| days.iter().map(|d| d[k].as_i64().unwrap()).sum::<i64>();
    assert_eq!(sum("requests"), app.requests, "{u:#}");
    assert_eq!(sum("errors"), app.errors, "{u:#}");
    assert_eq!(
        sum("rows_written"),
        current["rows_written"].as_i64().unwrap(),
        "{u:#}"
    );
    assert_eq!(
        sum("commits"),
        current["commits"].as_i64().unwrap(),
        "{u:#}"
    );
    let max_size = days
        .iter()
        .map(|d| d["max_size_bytes"].as_i64().unwrap())
        .max()
        .unwrap();
    assert!(max_size >= current["size_bytes"].as_i64().unwrap(), "{u:#}");

    // A statistics reset: the totals never go back, and count on from there.
    let before = current["rows_written"].as_i64().unwrap();
    let mut admin_conn = PgConnection::connect(&env.pg.url(&t.database_name))
        .await
        .unwrap();
    sqlx::query("SELECT pg_stat_reset()")
        .execute(&mut admin_conn)
        .await
        .unwrap();
    admin_conn.close().await.unwrap();
    let (s, _) = app.add_patient().await;
    assert_eq!(s, StatusCode::CREATED);
    let after = collect_until(&env, "quota-a", "the insert after the reset", |u| {
        u["current"]["rows_written"].as_i64().unwrap_or(0) > before
    })
    .await;
    // From the new value: the insert, and whatever sessions had not yet
    // reported when the reset came (PostgreSQL flushes them once a second).
    assert!(
        after["current"]["rows_written"].as_i64().unwrap() <= before + 100,
        "before the reset {before}: {after:#}"
    );

    // The top lists rank it, and /metrics has the fleet totals.
    env.router.flush_requests().await;
    let (s, top) = env
        .call(Method::GET, "/admin/v1/usage?sort=size&limit=1", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{top}");
    assert_eq!(top["items"][0]["slug"], "quota-a", "{top}");
    let (s, top) = env
        .call(Method::GET, "/admin/v1/usage?sort=requests", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{top}");
    assert_eq!(top["items"][0]["slug"], "quota-a", "{top}");
    assert_eq!(top["items"][0]["requests"], json!(app.requests), "{top}");
    let metrics = env
        .send(
            Method::GET,
            "/metrics",
            None,
            &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        )
        .await;
    let text = metrics.body.as_str().unwrap().to_owned();
    for series in [
        "silo_usage_size_bytes",
        "silo_usage_tenants_over_quota",
        "silo_usage_pass_seconds",
        &format!("silo_usage_tenant_size_bytes{{tenant_id=\"{}\"}}", t.id),
    ] {
        assert!(text.contains(series), "/metrics lacks {series}");
    }
}

/// Whether the tenant role may write in its database now.
async fn writable(env: &TestEnv, slug: &str) -> bool {
    writes(env.connect_tenant(slug).await.unwrap()).await
}

/// Whether this session of a tenant role may write.
async fn writes(mut conn: PgConnection) -> bool {
    let wrote = sqlx::query("INSERT INTO clinics (name) VALUES ('probe ' || gen_random_uuid())")
        .execute(&mut conn)
        .await;
    conn.close().await.unwrap();
    match wrote {
        Ok(_) => true,
        Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("42501") => false,
        Err(e) => panic!("neither written nor refused by privileges: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pass_sets_right_a_quota_change_a_crash_or_a_regrant_left_half_done() {
    let env = TestEnv::start().await;
    env.create("crash-a").await;
    let t = env.record("crash-a").await;
    let set = |read_only: bool| {
        let (env, t) = (&env, &t);
        async move {
            let db = env
                .control
                .servers()
                .admin_of(env.registry(), t.server_id)
                .await
                .unwrap()
                .single_pool(&t.database_name)
                .await
                .unwrap();
            silo::servers::schema::set_read_only(&db, &t.database_name, &t.role_name, read_only)
                .await
                .unwrap();
            db.close().await;
        }
    };
    let audits = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT action FROM audit_log WHERE tenant_id = $1 AND actor = 'usage-collector' ORDER BY id",
        )
        .bind(t.id)
        .fetch_all(env.registry().pool())
        .await
        .unwrap()
    };
    // A plan whose quota an empty database is already past.
    let (s, body) = env
        .call(
            Method::POST,
            "/admin/v1/plans",
            Some(json!({"name": "mini", "connection_limit": 5, "storage_quota_bytes": 1 << 20})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (s, body) = env
        .call(
            Method::PATCH,
            "/admin/v1/tenants/crash-a",
            Some(json!({"plan": "mini"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");

    // Crashed after the revoke, before the record: the pass records it.
    set(true).await;
    let pass = env.control.collect_usage_once().await.unwrap().unwrap();
    assert!(pass.went_read_only.is_empty(), "{pass:?}");
    assert_eq!(pass.records_fixed, 1, "{pass:?}");
    assert!(env.record("crash-a").await.over_quota_at.is_some());
    assert!(!writable(&env, "crash-a").await);
    assert_eq!(audits().await, ["tenant.over_quota"]);

    // Something granted it everything again (a restore, by hand): the next
    // pass takes it back, and the record (unchanged) is not audited twice.
    set(false).await;
    assert!(writable(&env, "crash-a").await);
    let pass = env.control.collect_usage_once().await.unwrap().unwrap();
    assert_eq!(pass.went_read_only, ["crash-a"], "{pass:?}");
    assert!(!writable(&env, "crash-a").await);
    assert_eq!(audits().await, ["tenant.over_quota"]);

    // Its plan's quota removed; crashed after the grant, before the record.
    let (s, body) = env
        .call(
            Method::PATCH,
            "/admin/v1/plans/mini",
            Some(json!({"storage_quota_bytes": null})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    set(false).await;
    let pass = env.control.collect_usage_once().await.unwrap().unwrap();
    assert!(pass.went_writable.is_empty(), "{pass:?}");
    assert_eq!(pass.records_fixed, 1, "{pass:?}");
    assert!(env.record("crash-a").await.over_quota_at.is_none());
    assert!(writable(&env, "crash-a").await);
    assert_eq!(audits().await, ["tenant.over_quota", "tenant.under_quota"]);

    // Nothing left to do: a pass changes nothing.
    let pass = env.control.collect_usage_once().await.unwrap().unwrap();
    assert!(
        pass.went_read_only.is_empty() && pass.went_writable.is_empty() && pass.records_fixed == 0,
        "{pass:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_role_whose_connection_limit_differs_from_its_plan_is_set_right_by_a_pass() {
    let env = TestEnv::start().await;
    env.create("limit-a").await;
    let t = env.record("limit-a").await;
    // What a plan change that crashed midway leaves behind.
    sqlx::query(&format!(
        "ALTER ROLE \"{}\" CONNECTION LIMIT 1",
        t.role_name
    ))
    .execute(&env.admin)
    .await
    .unwrap();
    let pass = env.control.collect_usage_once().await.unwrap().unwrap();
    assert_eq!(pass.connection_limits_fixed, 1, "{pass:?}");
    let limit: i32 = sqlx::query_scalar("SELECT rolconnlimit FROM pg_roles WHERE rolname = $1")
        .bind(&t.role_name)
        .fetch_one(&env.admin)
        .await
        .unwrap();
    assert_eq!(limit, t.limits.connection_limit);
    let pass = env.control.collect_usage_once().await.unwrap().unwrap();
    assert_eq!(pass.connection_limits_fixed, 0, "{pass:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_usage_endpoints_refuse_bad_parameters_and_a_viewer_may_read_them() {
    let env = TestEnv::start().await;
    env.create("usage-a").await;
    let (s, key) = env
        .call(
            Method::POST,
            "/admin/v1/keys",
            Some(json!({"name": "watcher", "role": "viewer"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{key}");
    let viewer = format!("Bearer {}", key["token"].as_str().unwrap());
    let rows = vec![
        get("/tenants/usage-a/usage?days=0").is(422).says("days"),
        get("/tenants/usage-a/usage?days=3651").is(422).says("days"),
        get("/tenants/usage-a/usage?days=-1").is(422),
        get("/tenants/usage-a/usage?days=many").is(422),
        get("/tenants/usage-a/usage?day=3").is(422),
        get("/tenants/no-such/usage").is(404),
        get("/tenants/no-such/usage?days=0").is(422),
        get("/usage?sort=bytes").is(422).says("sort"),
        get("/usage?sort=").is(422),
        get("/usage?limit=0").is(422).says("limit"),
        get("/usage?limit=1001").is(422).says("limit"),
        get("/usage?limit=ten").is(422),
        get("/usage?order=size").is(422),
    ];
    for path in [
        "/tenants/usage-a/usage",
        "/tenants/usage-a/usage?days=1",
        "/tenants/usage-a/usage?days=3650",
        "/usage",
        "/usage?sort=size&limit=1",
        "/usage?sort=requests&limit=1000",
    ] {
        let (s, body) = env
            .call_with(
                Method::GET,
                &format!("/admin/v1{path}"),
                None,
                &[("authorization", &viewer)],
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{path}: {body}");
        assert!(
            body["daily"].is_array() || body["items"].is_array(),
            "{path}: {body}"
        );
    }
    let client = Client::new(&env, "/admin/v1", &[("authorization", &viewer)]);
    // Nothing a read may change: the usage rows and the audit log.
    table::run(&client, rows, async || {
        sqlx::query_scalar::<_, i64>(
            "SELECT (SELECT count(*) FROM tenant_usage) + (SELECT count(*) FROM audit_log)",
        )
        .fetch_one(env.registry().pool())
        .await
        .unwrap()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_three_replicas_one_collects_at_a_time_and_once_per_interval() {
    let env = TestEnv::start().await;
    for i in 0..3 {
        env.create(&format!("rep-usage-{i}")).await;
    }
    let logs = tempfile::tempdir().unwrap();
    let extra = [("SILO_USAGE_INTERVAL", "1")];
    let mut replicas = Vec::new();
    for i in 0..3 {
        let log = logs.path().join(format!("replica-{i}.log"));
        replicas.push(Silo::start_with(&env, None, 0, &log, &extra).await);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let passes = env.registry().usage_passes(100).await.unwrap();
        if passes.len() >= 8 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} passes ran",
            passes.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // App requests to each replica: their routers' flushes (the last one
    // at shutdown) add up in the tenant's totals.
    let token = env.app_token("rep-usage-0").await;
    let client = reqwest::Client::new();
    let mut sent = 0;
    for (i, r) in replicas.iter().enumerate() {
        for _ in 0..=i {
            let res = client
                .get(format!("{}/api/v1/clinics", r.base))
                .bearer_auth(&token)
                .header("x-tenant-id", "rep-usage-0")
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
            sent += 1;
        }
    }
    for r in replicas {
        r.stop();
    }
    let counted: (i64, i64) = sqlx::query_as(
        "SELECT u.requests, u.errors FROM tenant_usage u JOIN tenants t ON t.id = u.tenant_id
          WHERE t.slug = 'rep-usage-0'",
    )
    .fetch_one(env.registry().pool())
    .await
    .unwrap();
    assert_eq!(
        counted,
        (sent, 0),
        "the replicas' requests, counted once each"
    );
    let mut passes = env.registry().usage_passes(100).await.unwrap();
    passes.sort_by_key(|p| p.started_at);
    for w in passes.windows(2) {
        // Never two at once, and never two within 0.9 of an interval.
        assert!(
            w[1].started_at >= w[0].finished_at,
            "passes overlapped: {w:#?}"
        );
        assert!(
            w[1].started_at - w[0].started_at >= chrono::Duration::milliseconds(900),
            "two passes within one interval: {w:#?}"
        );
    }
    for p in &passes {
        assert_eq!(p.tenants, 3, "{p:?}");
        assert_eq!(p.max_server_queries, 1, "{p:?}");
    }
    // Counted once: rows written never exceed what the tenants did (their
    // databases saw no writes after the first pass's baseline).
    let rows: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(rows_written), 0)::int8 FROM tenant_usage")
            .fetch_one(env.registry().pool())
            .await
            .unwrap();
    assert!(rows < 1000, "{rows} rows written counted for idle tenants");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_over_quota_tenant_stays_read_only_when_restored_from_a_backup_and_moved_to_another_server(
) {
    let env = TestEnv::setup().storage().start().await;
    let second = crate::common::second_server(&env).await;
    crate::common::create_on(&env, "ro-moved", "default").await;
    let mut conn = env.connect_tenant("ro-moved").await.unwrap();
    sqlx::query("INSERT INTO clinics (name) VALUES ('Main')")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let (s, body) = env
        .call(
            Method::POST,
            "/admin/v1/plans",
            Some(json!({"name": "mini", "connection_limit": 5, "storage_quota_bytes": 1 << 20})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (s, body) = env
        .call(
            Method::PATCH,
            "/admin/v1/tenants/ro-moved",
            Some(json!({"plan": "mini"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let pass = env.control.collect_usage_once().await.unwrap().unwrap();
    assert_eq!(pass.went_read_only, ["ro-moved"], "{pass:?}");
    assert!(!writable(&env, "ro-moved").await);

    // A restore into a fresh database, swapped in: read-only before the
    // collector runs again.
    let t = env.record("ro-moved").await;
    let b = env
        .backups()
        .backup_now(t.id, silo::backup::BackupKind::Manual, None)
        .await
        .expect("backup succeeds");
    let restored = env
        .control
        .restore(b.id, silo::backup::RestoreTarget::InPlace, "test", None)
        .await
        .expect("restore succeeds");
    assert_ne!(restored.database_name, t.database_name, "a new database");
    assert!(restored.over_quota_at.is_some());
    assert!(
        !writable(&env, "ro-moved").await,
        "writable after a restore"
    );

    // A move to the other server: read-only there too.
    let (s, op) = env
        .call(
            Method::POST,
            "/admin/v1/tenants/ro-moved/move",
            Some(json!({"server": "second"})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    let done = crate::common::wait_op(&env, &op).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let moved = env.record("ro-moved").await;
    assert_eq!(moved.server_name, "second");
    let on_second = sqlx::postgres::PgConnectOptions::new()
        .host("127.0.0.1")
        .port(second.port())
        .database(&moved.database_name)
        .username(&moved.role_name)
        .password(&env.password(&moved));
    let conn = sqlx::ConnectOptions::connect(&on_second).await.unwrap();
    assert!(!writes(conn).await, "writable after a move");

    // And the collector agrees: nothing to change.
    let pass = env.control.collect_usage_once().await.unwrap().unwrap();
    assert!(
        pass.went_read_only.is_empty() && pass.records_fixed == 0,
        "{pass:?}"
    );
}
