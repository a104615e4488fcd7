//! The admin API against a real PostgreSQL: provisioning, isolation,
//! validation, idempotency, lifecycle, pagination.

use crate::common::table::{self, delete, get, patch, post, Client};
use crate::common::{close, TestEnv, ADMIN_TOKEN};
use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

const CLINIC_TABLES: [&str; 6] = [
    "clinics",
    "staff",
    "patients",
    "appointments",
    "invoices",
    "payments",
];

#[tokio::test]
async fn a_created_tenant_is_active_with_a_database_only_its_own_role_can_reach() {
    let env = TestEnv::start().await;
    let a = env.create("clinic-a").await;
    env.create("clinic-b").await;
    assert_eq!(a["status"], "active");
    assert_eq!(
        a["schema_version"],
        silo::servers::schema::latest_embedded_version()
    );
    assert!(a.get("password").is_none() && a.get("password_enc").is_none());

    // Its own role reads and writes its clinic tables.
    let mut conn = env
        .connect_tenant("clinic-a")
        .await
        .expect("tenant role logs in");
    for table in CLINIC_TABLES {
        sqlx::query(&format!("SELECT count(*) FROM {table}"))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{table}: {e}"));
    }
    sqlx::query("INSERT INTO patients (full_name) VALUES ('Ada')")
        .execute(&mut conn)
        .await
        .unwrap();
    // ...but cannot change the schema.
    let ddl = sqlx::query("CREATE TABLE sneaky (x int)")
        .execute(&mut conn)
        .await;
    assert!(ddl.is_err(), "tenant role must not create tables");
    close(conn).await;

    // Another tenant's role is refused by a's database.
    let ra = env.record("clinic-a").await;
    let rb = env.record("clinic-b").await;
    let cross = env
        .connect_as(&ra.database_name, &rb.role_name, &env.password(&rb))
        .await;
    let err = cross
        .expect_err("b's role must not connect to a's database")
        .to_string();
    assert!(err.contains("permission denied"), "{err}");
    // a's role with b's password fails too, and no role gets the control DB.
    assert!(env
        .connect_as(&ra.database_name, &ra.role_name, &env.password(&rb))
        .await
        .is_err());
    assert!(env
        .connect_as("silo_control", &ra.role_name, &env.password(&ra))
        .await
        .is_err());
}

#[tokio::test]
async fn secrets_are_stored_encrypted_and_never_returned() {
    let env = TestEnv::start().await;
    let body = env.create("secretive").await;
    let t = env.record("secretive").await;
    let password = env.password(&t);
    assert!(!body.to_string().contains(&password));
    let dump: Vec<String> = sqlx::query_scalar(
        "SELECT row_to_json(t)::text FROM tenants t UNION ALL SELECT row_to_json(s)::text FROM db_servers s
         UNION ALL SELECT row_to_json(a)::text FROM audit_log a",
    )
    .fetch_all(env.registry().pool())
    .await
    .unwrap();
    let pg_password = env.superuser_password();
    for row in &dump {
        assert!(
            !row.contains(&password),
            "tenant password in plain text: {row}"
        );
        assert!(
            !row.contains(&pg_password),
            "server admin password in plain text: {row}"
        );
    }
    // The role's password is stored by PostgreSQL as a SCRAM verifier.
    let stored: String = sqlx::query_scalar("SELECT rolpassword FROM pg_authid WHERE rolname = $1")
        .bind(&t.role_name)
        .fetch_one(&env.admin)
        .await
        .unwrap();
    assert!(stored.starts_with("SCRAM-SHA-256$"));
    let (_, servers) = env.call(Method::GET, "/admin/v1/servers", None).await;
    assert!(!servers.to_string().contains(&pg_password));
    assert!(servers[0].get("admin_url").is_none());
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let env = TestEnv::start().await;
    env.create("existing").await;
    let (tenants, servers) = ("/admin/v1/tenants", "/admin/v1/servers");
    let existing = "/admin/v1/tenants/existing";
    let create = |body: Value| post(tenants).json(body);
    let auth = "authorization";
    #[rustfmt::skip]
    let rows = vec![
        get(tenants).without(auth).is(401),
        get(tenants).header(auth, "Bearer wrong").is(401),
        get(tenants).header(auth, ADMIN_TOKEN).is(401),
        create(json!({"slug": "Bad_Slug", "name": "x"})).is(422),
        create(json!({"slug": "ab", "name": "x"})).is(422),
        create(json!({"slug": "ends-", "name": "x"})).is(422),
        create(json!({"slug": "okay", "name": "x", "tenant_id": 1})).is(422),
        create(json!({"slug": "okay"})).is(422),
        create(json!({"slug": "okay", "name": "   "})).is(422),
        create(json!({"slug": "okay", "name": "a\u{0}b"})).is(422),
        create(json!({"slug": "okay", "name": "x".repeat(201)})).is(422),
        create(json!({"slug": "okay", "name": "x", "plan": "gold"})).is(422),
        create(json!({"slug": "okay", "name": "x", "server": "nowhere"})).is(422),
        create(json!({"slug": 7, "name": "x"})).is(422),
        create(json!([1, 2])).is(422),
        // A struct's fields as an array, in order, is not a body either.
        create(json!(["okay", "Okay Clinic"])).is(422),
        // Malformed is a 400 even when a field is missing too.
        post(tenants).raw("{} x").is(400).what("a missing field and trailing characters"),
        create(json!({"slug": "existing", "name": "x"})).is(409),
        create(json!({"slug": "okay", "name": "x"})).header("idempotency-key", "").is(422),
        post(tenants).raw("").is(400).what("an empty JSON body"),
        post(tenants).is(415).what("no content type"),
        get("/admin/v1/tenants/nope").is(404),
        get("/admin/v1/tenants/00000000-0000-0000-0000-000000000000").is(404),
        get("/admin/v1/tenants?limit=0").is(422),
        get("/admin/v1/tenants?limit=abc").is(422),
        get("/admin/v1/tenants?status=sleepy").is(422),
        get("/admin/v1/tenants?cursor=xyz").is(422),
        get("/admin/v1/tenants?colour=red").is(422),
        patch(existing).json(json!({"backup_schedule": "every day"})).is(422),
        patch(existing).json(json!({"slug": "renamed"})).is(422),
        patch("/admin/v1/tenants/nope").json(json!({"name": "x"})).is(404),
        post("/admin/v1/tenants/nope/suspend").is(404),
        delete("/admin/v1/tenants/nope").is(404),
        get("/admin/v1/operations/not-a-uuid").is(404),
        get("/admin/v1/audit?limit=100000").is(422),
        post(servers).json(json!({"name": "bad name!", "admin_url": "postgres://x"})).is(422),
        post(servers).json(json!({"name": "other", "admin_url": "not a url"})).is(422),
        post(servers).json(json!({"name": "other", "admin_url": "postgres://u:p@127.0.0.1:1/db"})).is(422),
        get("/admin/v1/nothing-here").is(404),
    ];
    table::run(&Client::admin(&env), rows, async || {
        let tenants = env.count("SELECT count(*) FROM tenants").await;
        let audit = env.count("SELECT count(*) FROM audit_log").await;
        let servers = env.count("SELECT count(*) FROM db_servers").await;
        (tenants, audit, servers, env.orphans().await)
    })
    .await;
    assert!(env.orphans().await.is_empty());
    assert_eq!(env.count("SELECT count(*) FROM db_servers").await, 1);
}

#[tokio::test]
async fn an_idempotency_key_returns_the_same_tenant_and_never_creates_twice() {
    let env = TestEnv::start().await;
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let headers = [
        ("authorization", auth.as_str()),
        ("idempotency-key", "onboard-42"),
    ];
    let body = json!({"slug": "repeat", "name": "Repeat Clinic"});
    // Concurrent retries race for the key; all get the same tenant.
    let calls = (0..5).map(|_| {
        env.call_with(
            Method::POST,
            "/admin/v1/tenants",
            Some(body.clone()),
            &headers,
        )
    });
    let results = futures::future::join_all(calls).await;
    let first = results[0].1["id"].clone();
    for (status, t) in &results {
        assert_eq!(*status, StatusCode::CREATED, "{t}");
        assert_eq!(t["id"], first);
        assert_eq!(t["status"], "active");
    }
    assert_eq!(env.count("SELECT count(*) FROM tenants").await, 1);
    // The same key with another request is refused.
    let (status, _) = env
        .call_with(
            Method::POST,
            "/admin/v1/tenants",
            Some(json!({"slug": "other", "name": "x"})),
            &headers,
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // Without a key, a repeat is a conflict on the slug.
    let (status, _) = env
        .call(Method::POST, "/admin/v1/tenants", Some(body))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(env.count("SELECT count(*) FROM tenants").await, 1);
}

#[tokio::test]
async fn suspend_resume_patch_and_delete_change_what_the_database_allows() {
    let env = TestEnv::start().await;
    env.create("lifecycle").await;
    let t = env.record("lifecycle").await;

    let (s, body) = env
        .call(Method::POST, "/admin/v1/tenants/lifecycle/suspend", None)
        .await;
    assert_eq!(
        (s, body["status"].as_str()),
        (StatusCode::OK, Some("suspended"))
    );
    assert!(
        env.connect_tenant("lifecycle").await.is_err(),
        "a suspended tenant's role cannot log in"
    );
    // Suspending twice is harmless.
    let (s, _) = env
        .call(Method::POST, "/admin/v1/tenants/lifecycle/suspend", None)
        .await;
    assert_eq!(s, StatusCode::OK);

    let (s, body) = env
        .call(
            Method::POST,
            &format!("/admin/v1/tenants/{}/resume", t.id),
            None,
        )
        .await;
    assert_eq!(
        (s, body["status"].as_str()),
        (StatusCode::OK, Some("active"))
    );
    close(
        env.connect_tenant("lifecycle")
            .await
            .expect("resumed tenant logs in"),
    )
    .await;

    let (s, body) = env
        .call(
            Method::PATCH,
            "/admin/v1/tenants/lifecycle",
            Some(json!({"name": "Renamed", "plan": "premium", "backup_schedule": "0 0 3 * * *"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        (body["name"].as_str(), body["plan"].as_str()),
        (Some("Renamed"), Some("premium"))
    );
    let limit: i32 = sqlx::query_scalar("SELECT rolconnlimit FROM pg_roles WHERE rolname = $1")
        .bind(&t.role_name)
        .fetch_one(&env.admin)
        .await
        .unwrap();
    assert_eq!(limit, 50, "the premium seed plan's connection limit");

    let (s, op) = env
        .call(Method::DELETE, "/admin/v1/tenants/lifecycle", None)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    let op = wait_operation(&env, op["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    assert!(!env.database_exists(&t.database_name).await);
    assert!(!env.role_exists(&t.role_name).await);
    let (s, body) = env
        .call(Method::GET, &format!("/admin/v1/tenants/{}", t.id), None)
        .await;
    assert_eq!(
        (s, body["status"].as_str()),
        (StatusCode::OK, Some("deleted"))
    );
    let (s, _) = env
        .call(Method::GET, "/admin/v1/tenants/lifecycle", None)
        .await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "a deleted slug no longer resolves"
    );
    // The slug is free again.
    env.create("lifecycle").await;

    let (_, audit) = env
        .call(
            Method::GET,
            &format!("/admin/v1/audit?tenant={}", t.id),
            None,
        )
        .await;
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    for action in [
        "tenant.create",
        "tenant.suspend",
        "tenant.resume",
        "tenant.patch",
        "tenant.delete",
    ] {
        assert!(
            actions.contains(&action),
            "{action} missing from {actions:?}"
        );
    }
}

pub async fn wait_operation(env: &TestEnv, id: &str) -> Value {
    for _ in 0..200 {
        let (s, op) = env
            .call(Method::GET, &format!("/admin/v1/operations/{id}"), None)
            .await;
        assert_eq!(s, StatusCode::OK);
        if op["status"] != "running" && op["status"] != "pending" {
            return op;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("operation {id} did not finish");
}

#[tokio::test]
async fn concurrent_operations_on_one_tenant_are_serialized() {
    let env = TestEnv::start().await;
    env.create("busy").await;
    let t = env.record("busy").await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let p = env.control.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                p.provisioner().suspend(t.id, "test").await.map(|_| ())
            } else {
                p.provisioner().resume(t.id, "test").await.map(|_| ())
            }
        }));
    }
    for task in tasks {
        // Each either succeeds or reports a state conflict; none fails midway.
        match task.await.unwrap() {
            Ok(()) | Err(silo::ops::Error::Conflict(_)) => {}
            Err(e) => panic!("unexpected failure: {e}"),
        }
    }
    let t = env.record("busy").await;
    let can_login: bool = sqlx::query_scalar("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1")
        .bind(&t.role_name)
        .fetch_one(&env.admin)
        .await
        .unwrap();
    assert_eq!(
        can_login,
        t.status == silo::registry::TenantStatus::Active,
        "registry and role agree"
    );
}

#[tokio::test]
async fn listing_pages_with_a_cursor_and_filters_by_status() {
    let env = TestEnv::start().await;
    for i in 0..5 {
        env.create(&format!("page-{i}")).await;
    }
    env.call(Method::POST, "/admin/v1/tenants/page-3/suspend", None)
        .await;
    let mut seen = Vec::new();
    let mut path = "/admin/v1/tenants?limit=2".to_owned();
    loop {
        let (s, page) = env.call(Method::GET, &path, None).await;
        assert_eq!(s, StatusCode::OK);
        for t in page["items"].as_array().unwrap() {
            seen.push(t["slug"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/admin/v1/tenants?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, ["page-0", "page-1", "page-2", "page-3", "page-4"]);
    let (_, page) = env
        .call(Method::GET, "/admin/v1/tenants?status=suspended", None)
        .await;
    let slugs: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["slug"].as_str().unwrap())
        .collect();
    assert_eq!(slugs, ["page-3"]);
}

#[tokio::test]
async fn health_metrics_and_the_openapi_document_are_served() {
    let env = TestEnv::start().await;
    env.create("metered").await;
    let (s, _) = env.call_with(Method::GET, "/healthz", None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = env.call_with(Method::GET, "/readyz", None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    // The fleet's figures are not public: the admin (or a metrics) token reads them.
    let (s, _) = env.call_with(Method::GET, "/metrics", None, &[]).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, metrics) = env.call(Method::GET, "/metrics", None).await;
    assert_eq!(s, StatusCode::OK);
    let text = metrics.as_str().unwrap();
    assert!(text.contains("silo_tenants{status=\"active\"} 1"), "{text}");
    assert!(text.contains("silo_provision_seconds_bucket"), "{text}");
    assert!(text.contains("silo_warm_pool_spares"), "{text}");
    let (s, spec) = env.call_with(Method::GET, "/openapi.json", None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    for path in [
        "/admin/v1/tenants",
        "/admin/v1/tenants/{tenant}",
        "/admin/v1/tenants/{tenant}/suspend",
        "/admin/v1/operations/{id}",
    ] {
        assert!(
            spec["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }
    // The reference page loads its script from silo only, and says so to
    // the browser; the script is the vendored file.
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let res = env
        .app()
        .oneshot(
            axum::http::Request::get("/docs")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let csp = res.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.starts_with("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let html = String::from_utf8_lossy(&bytes);
    let sources: Vec<&str> = html
        .split("src=\"")
        .skip(1)
        .map(|s| s.split('"').next().unwrap())
        .collect();
    assert_eq!(sources, ["/docs/scalar-1.25.0.js"]);
    assert!(
        html.contains("\"/admin/v1/tenants\""),
        "the document is in the page"
    );
    let res = env
        .app()
        .oneshot(
            axum::http::Request::get(sources[0])
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    use sha2::Digest;
    let vendored =
        std::fs::read("assets/vendor/scalar-api-reference-1.25.0/standalone.js").unwrap();
    assert_eq!(
        sha2::Sha256::digest(&bytes),
        sha2::Sha256::digest(&vendored)
    );
}

/// A tenant whose role is gone from its server (a control database
/// restored to an earlier point, a person's mistake): a suspend answers
/// and records it suspended (nothing can log in as it anyway); a resume, a
/// rotation and a read-only credential are refused with a `409` that says
/// why (all answered `500`). The next reconcile pass makes the role again.
#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_calls_on_a_tenant_whose_role_is_gone_answer_clearly() {
    use sqlx::Connection;
    let env = TestEnv::start().await;
    env.create("roleless").await;
    let t = env.record("roleless").await;
    let mut db = sqlx::PgConnection::connect(&env.pg.url(&t.database_name))
        .await
        .unwrap();
    sqlx::raw_sql(&format!("DROP OWNED BY \"{}\"", t.role_name))
        .execute(&mut db)
        .await
        .unwrap();
    db.close().await.unwrap();
    sqlx::raw_sql(&format!(
        "REVOKE ALL ON DATABASE \"{db}\" FROM \"{role}\"; DROP ROLE \"{role}\"",
        db = t.database_name,
        role = t.role_name
    ))
    .execute(&env.admin)
    .await
    .unwrap();

    let (status, body) = env
        .call(Method::POST, "/admin/v1/tenants/roleless/suspend", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "suspended", "{body}");
    let (status, body) = env
        .call(Method::POST, "/admin/v1/tenants/roleless/resume", None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("not on its server"),
        "{body}"
    );
    assert_eq!(
        env.record("roleless").await.status,
        silo::registry::TenantStatus::Suspended
    );
    // A rotation and a read-only credential (which needs the role's
    // reader) are refused the same way, changing nothing (both answered 500).
    let before = env.record("roleless").await;
    for (path, body) in [
        ("/admin/v1/tenants/roleless/credentials/rotate", None),
        (
            "/admin/v1/tenants/roleless/app-credentials",
            Some(serde_json::json!({"name": "ro", "read_only": true})),
        ),
    ] {
        let (status, answer) = env.call(Method::POST, path, body).await;
        assert_eq!(status, StatusCode::CONFLICT, "{path}: {answer}");
        assert!(
            answer["detail"]
                .as_str()
                .unwrap()
                .contains("not on its server"),
            "{answer}"
        );
    }
    let after = env.record("roleless").await;
    assert_eq!(after.password_enc, before.password_enc);
    assert!(after.pending_password_enc.is_none());
    assert_eq!(
        env.count("SELECT count(*) FROM app_credentials").await,
        0,
        "no credential was made"
    );

    // The next reconcile pass makes the role again, with the recorded
    // password and its database's grants, not logging in while suspended.
    let report = env.control.reconcile_once().await.unwrap();
    assert_eq!(report.roles_made_again, 1, "{report:?}");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(env.connect_tenant("roleless").await.is_err());
    let (status, body) = env
        .call(Method::POST, "/admin/v1/tenants/roleless/resume", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut conn = env.connect_tenant("roleless").await.unwrap();
    sqlx::query("INSERT INTO clinics (name) VALUES ('made again')")
        .execute(&mut conn)
        .await
        .unwrap();
    let names: i64 = sqlx::query_scalar("SELECT count(*) FROM clinics")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(names >= 1);
    crate::common::close(conn).await;
    for (path, body) in [
        ("/admin/v1/tenants/roleless/credentials/rotate", None),
        (
            "/admin/v1/tenants/roleless/app-credentials",
            Some(serde_json::json!({"name": "ro", "read_only": true})),
        ),
    ] {
        let (status, answer) = env.call(Method::POST, path, body).await;
        assert!(status.is_success(), "{path}: {status} {answer}");
    }
    assert!(env.connect_tenant("roleless").await.is_ok());
    let report = env.control.reconcile_once().await.unwrap();
    assert_eq!(report.roles_made_again, 0, "{report:?}");
}
