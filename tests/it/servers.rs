//! Tenant DB servers against real PostgreSQL clusters: placement by headroom,
//! draining by hand, full servers, health checks that mark a stopped server
//! `unhealthy` and bring it back, and the per-server figures.

use std::time::Duration;

use crate::common::table::{self, Client};
use crate::common::{server_named, TestEnv};
use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

/// Create a tenant, naming its server or not; the status and body.
async fn create(env: &TestEnv, slug: &str, server: Option<&str>) -> (StatusCode, Value) {
    let mut body = json!({"slug": slug, "name": format!("Clinic {slug}")});
    if let Some(s) = server {
        body["server"] = json!(s);
    }
    env.call(Method::POST, "/admin/v1/tenants", Some(body))
        .await
}

async fn patch(env: &TestEnv, name: &str, body: Value) -> (StatusCode, Value) {
    env.call(
        Method::PATCH,
        &format!("/admin/v1/servers/{name}"),
        Some(body),
    )
    .await
}

/// The server's entry in `GET /admin/v1/servers`.
async fn server(env: &TestEnv, name: &str) -> Value {
    let (s, servers) = env.call(Method::GET, "/admin/v1/servers", None).await;
    assert_eq!(s, StatusCode::OK);
    servers
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("server {name} is listed: {servers}"))
}

async fn metrics(env: &TestEnv) -> String {
    let auth = format!("Bearer {}", crate::common::ADMIN_TOKEN);
    let answer = env
        .send(Method::GET, "/metrics", None, &[("authorization", &auth)])
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    answer.body.as_str().unwrap().to_owned()
}

fn assert_conflict(status: StatusCode, body: &Value, reason: &str) {
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["type"], "urn:silo:problem:conflict");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains(reason), "{detail}");
}

/// The password in a `postgres://user:password@host/db` URL.
fn password_in(url: &str) -> String {
    let after_user = url.split_once("://").unwrap().1.split_once(':').unwrap().1;
    after_user.split_once('@').unwrap().0.to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_draining_server_gets_no_new_tenants_until_it_is_made_active_again() {
    const SECOND: &str = "second-a";
    let env = TestEnv::start().await;
    let _second = server_named(&env, SECOND).await;

    let (s, body) = patch(&env, "default", json!({"status": "draining"})).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "draining");
    assert_eq!(body["name"], "default");

    for slug in ["alpha", "beta"] {
        let (s, body) = create(&env, slug, None).await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        assert_eq!(body["server"], SECOND);
    }
    let (s, body) = create(&env, "gamma", Some("default")).await;
    assert_conflict(s, &body, "draining");
    assert!(body["detail"].as_str().unwrap().contains("default"));
    assert_eq!(
        env.count("SELECT count(*) FROM tenants WHERE slug = 'gamma'")
            .await,
        0
    );

    let (s, body) = patch(&env, "default", json!({"status": "active"})).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "active");
    let (s, body) = create(&env, "gamma", Some("default")).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert_eq!(body["server"], "default");

    let (_, audit) = env.call(Method::GET, "/admin/v1/audit", None).await;
    let updates: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "server.update")
        .collect();
    assert_eq!(updates.len(), 2, "{audit}");
    assert_eq!(updates[0]["detail"]["server"], "default");

    // Both servers, by name, with their tenant counts, whether or not the
    // router holds connections to them.
    let (s, pools) = env.call(Method::GET, "/admin/v1/pools", None).await;
    assert_eq!(s, StatusCode::OK);
    let servers = pools["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 2, "{pools}");
    let by_name = |name: &str| servers.iter().find(|s| s["name"] == name).unwrap().clone();
    let (default, second) = (by_name("default"), by_name(SECOND));
    assert_eq!(default["tenants"], 1);
    assert_eq!(second["tenants"], 2);
    assert_eq!(second["max_tenants"], 100);
    assert_eq!(second["status"], "active");
    assert_eq!(second["open"], 0);
    assert!(second["server_id"].is_string() && second["budget"].is_number());

    let text = metrics(&env).await;
    assert!(
        text.contains(&format!("silo_server_tenants{{server=\"{SECOND}\"}} 2")),
        "{text}"
    );
    assert!(text.contains(&format!(
        "silo_server_max_tenants{{server=\"{SECOND}\"}} 100"
    )));
    assert!(text.contains(&format!("silo_server_up{{server=\"{SECOND}\"}}")));
}

#[tokio::test]
async fn bad_server_updates_get_a_clear_4xx_and_change_nothing() {
    let env = TestEnv::start().await;
    let default = "/admin/v1/servers/default";
    let update = |body: Value| table::patch(default).json(body);
    #[rustfmt::skip]
    let rows = vec![
        update(json!({"status": "unhealthy"})).is(422).says("health checks"),
        update(json!({"status": "gone"})).is(422).says("'active' or 'draining'"),
        update(json!({"status": 5})).is(422),
        update(json!({"max_tenants": 0})).is(422).says("max_tenants"),
        update(json!({"max_tenants": 2_000_000})).is(422).says("max_tenants"),
        update(json!({"max_connections": -1})).is(422).says("max_connections"),
        update(json!({"status": "draining", "max_connections": 0})).is(422).says("max_connections"),
        update(json!({"colour": "red"})).is(422).says("colour"),
        table::patch(default).raw("{\"status\":").is(400),
        table::patch("/admin/v1/servers/nowhere").json(json!({"status": "draining"})).is(404).says_exactly("server not found"),
    ];
    table::run(&Client::admin(&env), rows, async || {
        let updates = "SELECT count(*) FROM audit_log WHERE action = 'server.update'";
        (server(&env, "default").await, env.count(updates).await)
    })
    .await;
    assert_eq!(
        env.count("SELECT count(*) FROM audit_log WHERE action = 'server.update'")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_server_is_skipped_and_refused_by_name() {
    const SECOND: &str = "second-c";
    let env = TestEnv::start().await;
    let _second = server_named(&env, SECOND).await;

    // Equal shares used: the server with more connections per tenant wins.
    let (s, body) = create(&env, "first", None).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert_eq!(body["server"], "default");

    let (s, body) = patch(&env, SECOND, json!({"max_tenants": 1})).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["max_tenants"], 1);
    let (s, body) = create(&env, "only-one", Some(SECOND)).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (s, body) = create(&env, "one-more", Some(SECOND)).await;
    assert_conflict(s, &body, "full (1 of 1 tenants)");

    // Not named: the full server is skipped.
    let (s, body) = create(&env, "elsewhere", None).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert_eq!(body["server"], "default");

    // No server with room: a clear 503, never a 500.
    let (s, _) = patch(&env, "default", json!({"max_tenants": 2})).await;
    assert_eq!(s, StatusCode::OK);
    let (s, body) = create(&env, "no-room", None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["detail"]
        .as_str()
        .unwrap()
        .contains("no tenant DB server has room"));
    assert_eq!(
        env.count("SELECT count(*) FROM tenants WHERE slug IN ('one-more', 'no-room')")
            .await,
        0
    );

    // Room again once a limit is raised.
    let (s, _) = patch(&env, SECOND, json!({"max_tenants": 10})).await;
    assert_eq!(s, StatusCode::OK);
    let (s, body) = create(&env, "one-more", None).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert_eq!(body["server"], SECOND);
}

#[tokio::test(flavor = "multi_thread")]
async fn creates_at_once_never_take_more_places_than_a_server_has() {
    let env = TestEnv::start().await;
    let (s, _) = patch(&env, "default", json!({"max_tenants": 3})).await;
    assert_eq!(s, StatusCode::OK);
    let answers = futures::future::join_all((0..8).map(|i| {
        let env = &env;
        async move { create(env, &format!("racer-{i}"), Some("default")).await }
    }))
    .await;
    let created = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .count();
    for (s, body) in answers.iter().filter(|(s, _)| *s != StatusCode::CREATED) {
        assert_conflict(*s, body, "full");
    }
    assert_eq!(created, 3, "{answers:?}");
    assert_eq!(
        env.count("SELECT count(*) FROM tenants WHERE status <> 'deleted'")
            .await,
        3
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn creates_at_once_naming_no_server_fill_every_last_place() {
    const SECOND: &str = "second-f";
    let env = TestEnv::start().await;
    let _second = server_named(&env, SECOND).await;
    for name in ["default", SECOND] {
        let (s, _) = patch(&env, name, json!({"max_tenants": 1})).await;
        assert_eq!(s, StatusCode::OK);
    }
    // Most pick the same server first; those that lose its one place go
    // on to the other.
    let answers = futures::future::join_all((0..6).map(|i| {
        let env = &env;
        async move { create(env, &format!("unplaced-{i}"), None).await }
    }))
    .await;
    let mut placed: Vec<String> = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .map(|(_, body)| body["server"].as_str().unwrap().to_owned())
        .collect();
    placed.sort();
    assert_eq!(placed, ["default", SECOND], "{answers:?}");
    for (s, body) in answers.iter().filter(|(s, _)| *s != StatusCode::CREATED) {
        assert_eq!(*s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body["detail"].as_str().unwrap().contains("room"), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_create_is_retried_by_the_same_request_and_no_other_takes_its_slug() {
    const ELSEWHERE: &str = "elsewhere-r";
    let env = TestEnv::start().await;
    let mut other = server_named(&env, ELSEWHERE).await;
    other.stop().unwrap();
    // Still `active` (no health check yet): the create fails on it.
    let (st, body) = create(&env, "retried", Some(ELSEWHERE)).await;
    assert!(st.is_server_error(), "{st}: {body}");
    assert_eq!(env.record("retried").await.status.as_str(), "failed");

    // Another request for the slug is told how to free it; nothing changes.
    let (st, body) = env
        .call(
            Method::POST,
            "/admin/v1/tenants",
            Some(json!({"slug": "retried", "name": "Someone else", "server": ELSEWHERE})),
        )
        .await;
    assert_conflict(st, &body, "a failed create of slug 'retried' holds it");
    assert_eq!(env.record("retried").await.status.as_str(), "failed");

    // The same request again, with the server back and now full (its
    // failed create holds its one place): the create is finished, and the
    // request's Idempotency-Key recorded for it.
    let (st, _) = patch(&env, ELSEWHERE, json!({"max_tenants": 1})).await;
    assert_eq!(st, StatusCode::OK);
    other.start_again().unwrap();
    let request = json!({"slug": "retried", "name": "Clinic retried", "server": ELSEWHERE});
    let send = |key: &'static str| {
        let (env, request) = (&env, request.to_string());
        async move {
            let answer = env
                .send(
                    Method::POST,
                    "/admin/v1/tenants",
                    Some(&request),
                    &[
                        (
                            "authorization",
                            &format!("Bearer {}", crate::common::ADMIN_TOKEN),
                        ),
                        ("content-type", "application/json"),
                        ("idempotency-key", key),
                    ],
                )
                .await;
            (answer.status, answer.body)
        }
    };
    let (st, body) = send("retry-of-retried").await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    assert_eq!(body["status"], "active", "{body}");
    let (st, again) = send("retry-of-retried").await;
    assert_eq!(st, StatusCode::CREATED, "{again}");
    assert_eq!(again["id"], body["id"]);
    assert_eq!(
        env.count("SELECT count(*) FROM tenants WHERE slug = 'retried'")
            .await,
        1
    );
    // Active now: the same request is a duplicate.
    let (st, body) = create(&env, "retried", Some(ELSEWHERE)).await;
    assert_conflict(st, &body, "already exists");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_server_becomes_unhealthy_gets_no_tenants_and_recovers() {
    const SECOND: &str = "second-d";
    let env = TestEnv::start().await;
    let mut second = server_named(&env, SECOND).await;
    let second_password = password_in(&second.url("postgres"));
    let long = Duration::from_secs(3600);

    let checks = env.control.check_servers(long).await.unwrap();
    assert_eq!(checks.len(), 2);
    assert!(checks.iter().all(|c| c.error.is_none()), "{checks:?}");
    let s = server(&env, SECOND).await;
    assert!(s["last_ok_at"].is_string() && s["checked_at"].is_string());
    assert!(s["health_error"].is_null());

    second.stop().unwrap();
    // Failing, but not for long enough: still active, with the cause shown.
    env.control.check_servers(long).await.unwrap();
    let s = server(&env, SECOND).await;
    assert_eq!(s["status"], "active");
    assert_eq!(s["health_error"], "connection refused");
    assert!(metrics(&env)
        .await
        .contains(&format!("silo_server_up{{server=\"{SECOND}\"}} 0")));
    assert!(server(&env, "default").await["health_error"].is_null());

    // Failing past the threshold: unhealthy.
    let checks = env.control.check_servers(Duration::ZERO).await.unwrap();
    let c = checks.iter().find(|c| c.name == SECOND).unwrap();
    assert_eq!(c.status, "unhealthy");
    let s = server(&env, SECOND).await;
    assert_eq!(s["status"], "unhealthy");
    let shown = s.to_string();
    assert!(!shown.contains(&second_password) && !shown.contains("postgres://"));
    assert_eq!(server(&env, "default").await["status"], "active");

    // New tenants avoid it; naming it is refused with the reason.
    let (st, body) = create(&env, "while-down", None).await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    assert_eq!(body["server"], "default");
    let (st, body) = create(&env, "on-the-dead", Some(SECOND)).await;
    assert_conflict(st, &body, "unhealthy (last check: connection refused)");
    // Made active by hand while it still does not answer: checked, refused,
    // and left unhealthy.
    let (st, body) = patch(&env, SECOND, json!({"status": "active"})).await;
    assert_conflict(st, &body, "unhealthy (checked now: connection refused)");
    assert_eq!(server(&env, SECOND).await["status"], "unhealthy");

    // Back up: made active by hand, it is checked and taken at once.
    second.start_again().unwrap();
    let (st, body) = patch(&env, SECOND, json!({"status": "active"})).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "active", "{body}");
    assert!(body["health_error"].is_null(), "{body}");
    // And the next check keeps it so.
    let checks = env.control.check_servers(long).await.unwrap();
    assert!(checks.iter().all(|c| c.error.is_none()), "{checks:?}");
    let s = server(&env, SECOND).await;
    assert_eq!(s["status"], "active");
    assert!(s["health_error"].is_null());
    assert!(metrics(&env)
        .await
        .contains(&format!("silo_server_up{{server=\"{SECOND}\"}} 1")));
    let (st, body) = create(&env, "on-the-living", Some(SECOND)).await;
    assert_eq!(st, StatusCode::CREATED, "{body}");

    // Health checks never undo a drain, failing or passing.
    let (st, _) = patch(&env, SECOND, json!({"status": "draining"})).await;
    assert_eq!(st, StatusCode::OK);
    second.stop().unwrap();
    env.control.check_servers(Duration::ZERO).await.unwrap();
    assert_eq!(server(&env, SECOND).await["status"], "draining");
    second.start_again().unwrap();
    env.control.check_servers(long).await.unwrap();
    let s = server(&env, SECOND).await;
    assert_eq!(s["status"], "draining");
    assert!(s["health_error"].is_null());
}

#[tokio::test]
async fn a_tenant_server_failure_names_that_server_not_the_control_database() {
    const ELSEWHERE: &str = "elsewhere";
    let env = TestEnv::start().await;
    let mut other = server_named(&env, ELSEWHERE).await;
    let (st, body) = create(&env, "far-away", Some(ELSEWHERE)).await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    other.stop().unwrap();

    // The delete fails at its first statement on the stopped server.
    let (st, op) = env
        .call(Method::DELETE, "/admin/v1/tenants/far-away", None)
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{op}");
    let id = op["id"].as_str().unwrap().to_owned();
    let failed = loop {
        let (_, op) = env
            .call(Method::GET, &format!("/admin/v1/operations/{id}"), None)
            .await;
        if op["status"] != "running" {
            break op;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(failed["status"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("tenant server '{ELSEWHERE}'")),
        "the error names the tenant server: {error}"
    );
    assert!(!error.contains("control database"), "{error}");
    let t = env.record("far-away").await;
    assert_eq!(t.status.as_str(), "deleting", "nothing is marked deleted");

    // Back up: the reconciler finishes the delete.
    other.start_again().unwrap();
    let report = env.control.reconcile_once().await.unwrap();
    assert_eq!(report.deletes_finished, 1, "{report:?}");
}

/// One new cluster registered by several requests at once (other names,
/// the same admin URL): registrations of one cluster run one at a time, so
/// the first is created (201) and every other finds it registered (409),
/// never a 500 from preparing the cluster twice at once. Forty rounds of eight
/// requests on one cluster, made new again between rounds (its row, its
/// ownership marker and the closing of its maintenance databases undone).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_registrations_of_one_cluster_create_it_once_and_refuse_the_rest_with_409() {
    // Each request in a task of its own: they run in parallel.
    let env = std::sync::Arc::new(TestEnv::start().await);
    let pg = tokio::task::spawn_blocking(silo::embedded::EmbeddedPostgres::start_throwaway)
        .await
        .unwrap()
        .unwrap();
    let url = pg.url("postgres");
    let cluster = sqlx::PgPool::connect(&url).await.unwrap();
    for round in 0..40 {
        let answers: Vec<(StatusCode, Value)> = futures::future::join_all((0..8).map(|i| {
            let body = json!({"name": format!("racer-{round}-{i}"), "admin_url": url});
            let env = env.clone();
            tokio::spawn(async move {
                env.call(Method::POST, "/admin/v1/servers", Some(body))
                    .await
            })
        }))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
        let count = |status| answers.iter().filter(|(s, _)| *s == status).count();
        assert_eq!(
            (count(StatusCode::CREATED), count(StatusCode::CONFLICT)),
            (1, 7),
            "round {round}: {answers:?}"
        );
        for (s, body) in &answers {
            if *s == StatusCode::CONFLICT {
                let detail = body["detail"].as_str().unwrap();
                assert!(detail.contains("registered already"), "{detail}");
                assert!(!detail.contains(&env.superuser_password()), "{detail}");
            }
        }
        let sql = format!("SELECT count(*) FROM db_servers WHERE name LIKE 'racer-{round}-%'");
        assert_eq!(env.count(&sql).await, 1, "round {round}");
        // The cluster new again for the next round.
        sqlx::query("DELETE FROM db_servers WHERE name LIKE 'racer-%'")
            .execute(env.registry().pool())
            .await
            .unwrap();
        sqlx::raw_sql(&format!(
            "DROP ROLE {}; GRANT CONNECT ON DATABASE postgres TO PUBLIC;
             GRANT CONNECT ON DATABASE template1 TO PUBLIC;",
            silo::servers::owner::OWNER_ROLE
        ))
        .execute(&cluster)
        .await
        .unwrap();
    }
    cluster.close().await;
}

/// The password of a server's admin login changed behind silo's back: the
/// health check says so (it logged in through the pool's old connections
/// and said healthy), requests that need the server answer `503` naming
/// it (they answered `500`), and `PATCH … {"admin_url"}` with the new
/// password puts it right: checked against the same cluster, never echoed.
#[tokio::test(flavor = "multi_thread")]
async fn a_changed_admin_password_is_reported_and_a_new_admin_url_puts_it_right() {
    const SECOND: &str = "second-p";
    let env = TestEnv::start().await;
    let second = server_named(&env, SECOND).await;
    let (s, body) = create(&env, "on-second", Some(SECOND)).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let rotate = || {
        env.call(
            Method::POST,
            "/admin/v1/tenants/on-second/credentials/rotate",
            None,
        )
    };
    let old_url = second.url("postgres");
    let old_password = password_in(&old_url);
    let new_password = "a-new-Admin-password-0123456789";
    let new_url = old_url.replacen(&old_password, new_password, 1);

    let check = || async {
        let checks = env
            .control
            .check_servers(Duration::from_secs(3600))
            .await
            .unwrap();
        checks.into_iter().find(|c| c.name == SECOND).unwrap().error
    };
    assert_eq!(check().await, None, "a pooled admin connection is open now");

    // The password changes: the pool's open connection still answers, a
    // fresh login does not, and the check says so.
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&old_url)
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "ALTER ROLE CURRENT_USER PASSWORD '{new_password}'"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    assert_eq!(check().await, Some("authentication failed"));
    // Every other session of the login ends: requests need new logins.
    sqlx::raw_sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE usename = current_user AND pid <> pg_backend_pid()",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let (s, body) = rotate().await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("refuses silo's admin login"),
        "{body}"
    );

    // A URL of another cluster, a wrong password: refused, nothing changes.
    for (url, why) in [
        (env.pg.url("postgres"), "another PostgreSQL cluster"),
        (old_url.clone(), "could not connect"),
    ] {
        let (s, body) = patch(&env, SECOND, json!({ "admin_url": url })).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(body["detail"].as_str().unwrap().contains(why), "{body}");
        assert!(!body.to_string().contains(&password_in(&url)), "{body}");
    }
    assert_eq!(check().await, Some("authentication failed"), "unchanged");
    // Failing long enough to be unhealthy: the new URL and `active` in one
    // request put it right (the check runs with the new URL).
    env.control.check_servers(Duration::ZERO).await.unwrap();
    assert_eq!(server(&env, SECOND).await["status"], "unhealthy");
    let (s, body) = patch(
        &env,
        SECOND,
        json!({ "admin_url": new_url, "status": "active" }),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "active", "{body}");
    assert!(!body.to_string().contains(new_password), "{body}");
    assert_eq!(check().await, None);
    let (s, body) = rotate().await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let audit = env
        .count("SELECT count(*) FROM audit_log WHERE action = 'server.update' AND detail->>'admin_url_changed' = 'true'")
        .await;
    assert_eq!(audit, 1);
    <sqlx::PgConnection as sqlx::Connection>::close(conn)
        .await
        .unwrap();
}
