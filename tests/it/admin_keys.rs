//! Named admin keys: each role is held to what it may do on every route of
//! the published document, the audit log names the key that acted and
//! cannot be rewritten, a revoke holds at once on another replica, tokens
//! are stored hashed, and `silo keys` works with only the database URL.

use std::future::IntoFuture;
use std::process::{Command, Output};

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};
use silo::backup::BackupKind;

use crate::common::table::{self, delete, get, patch, post, Client, Row};
use crate::common::{Silo, TestEnv, ADMIN_TOKEN};
use crate::console::set_cookie;

/// An admin key made through the API with the bootstrap token; its token.
/// The operator key `contractor`, made to expire in 30 days: the answer.
async fn make_contractor(env: &TestEnv) -> Value {
    let (status, made) = env
        .call(
            Method::POST,
            "/admin/v1/keys",
            Some(json!({"name": "contractor", "role": "operator", "expires_in_days": 30})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    made
}

async fn make_key(env: &TestEnv, name: &str, role: &str) -> String {
    let (status, body) = env
        .call(
            Method::POST,
            "/admin/v1/keys",
            Some(json!({"name": name, "role": role})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["name"], name);
    assert_eq!(body["role"], role);
    body["token"].as_str().unwrap().to_owned()
}

/// One request with `token` as the bearer.
async fn call_as(
    env: &TestEnv,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let bearer = format!("Bearer {token}");
    env.call_with(method, path, body, &[("authorization", bearer.as_str())])
        .await
}

/// Everything an admin request could change in the control database (a
/// key's `last_used_at` aside): compared before and after each refused one.
async fn control_state(env: &TestEnv) -> Vec<String> {
    let mut rows = Vec::new();
    for sql in [
        "SELECT row_to_json(t)::text FROM tenants t ORDER BY id",
        "SELECT row_to_json(b)::text FROM backups b ORDER BY id",
        "SELECT row_to_json(o)::text FROM operations o ORDER BY id",
        "SELECT row_to_json(c)::text FROM app_credentials c ORDER BY id",
        "SELECT row_to_json(s)::text FROM
           (SELECT id, name, status, max_connections, max_tenants FROM db_servers) s ORDER BY id",
        "SELECT row_to_json(k)::text FROM
           (SELECT id, name, role, revoked_at FROM admin_keys) k ORDER BY id",
        "SELECT row_to_json(a)::text FROM audit_log a ORDER BY id",
        "SELECT row_to_json(p)::text FROM plans p ORDER BY name",
    ] {
        let found: Vec<String> = sqlx::query_scalar(sql)
            .fetch_all(env.registry().pool())
            .await
            .unwrap();
        rows.extend(found);
    }
    rows
}

/// Real values for the path parameters of every admin route.
struct Ids {
    tenant: String,
    backup: String,
    operation: String,
    credential: String,
    server: String,
    key: String,
}

impl Ids {
    /// A tenant with a succeeded backup and an app credential, a finished
    /// operation, and a key named `victim`: every admin route has something
    /// real to act on.
    async fn make(env: &TestEnv, slug: &str) -> Self {
        env.create(slug).await;
        let t = env.record(slug).await;
        let backup = env
            .backups()
            .backup_now(t.id, BackupKind::Manual, None)
            .await
            .expect("back the tenant up");
        let (status, op) = env
            .call(
                Method::POST,
                "/admin/v1/migrations/tenants",
                Some(json!({"dry_run": true})),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{op}");
        crate::common::wait_op(env, &op).await;
        let (status, cred) = env
            .call(
                Method::POST,
                &format!("/admin/v1/tenants/{slug}/app-credentials"),
                Some(json!({"name": "reporting"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{cred}");
        make_key(env, "victim", "viewer").await;
        Self {
            tenant: slug.to_owned(),
            backup: backup.id.to_string(),
            operation: op["id"].as_str().unwrap().to_owned(),
            credential: cred["id"].as_str().unwrap().to_owned(),
            server: "default".to_owned(),
            key: "victim".to_owned(),
        }
    }

    /// `template` (a path of the document) with its parameters filled; a
    /// parameter this test does not know fails it, so a new route gets a value.
    fn fill(&self, template: &str) -> String {
        let segments: Vec<&str> = template.split('/').collect();
        let filled: Vec<&str> = segments
            .iter()
            .enumerate()
            .map(
                |(i, segment)| match (*segment, segments[i.saturating_sub(1)]) {
                    ("{tenant}", _) => self.tenant.as_str(),
                    ("{id}", "backups") => self.backup.as_str(),
                    ("{id}", "operations") => self.operation.as_str(),
                    ("{id}", "app-credentials") => self.credential.as_str(),
                    ("{name}", "servers") => self.server.as_str(),
                    ("{name}", "keys") => self.key.as_str(),
                    ("{plan}", _) => "standard",
                    (p, _) if p.starts_with('{') => panic!("no value for {p} of {template}"),
                    (s, _) => s,
                },
            )
            .collect();
        filled.join("/")
    }
}

/// Every operation under `/admin/v1` of the published document: method
/// (lower case), path template, whether it reads a body.
async fn admin_operations(env: &TestEnv) -> Vec<(String, String, bool)> {
    let (status, spec) = env.call_with(Method::GET, "/openapi.json", None, &[]).await;
    assert_eq!(status, StatusCode::OK);
    let mut out = Vec::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        if !path.starts_with("/admin/v1/") {
            continue;
        }
        for (method, op) in item.as_object().unwrap() {
            out.push((method.clone(), path.clone(), !op["requestBody"].is_null()));
        }
    }
    assert!(
        out.len() > 30,
        "the document lists {} admin operations",
        out.len()
    );
    out
}

/// A row sending `method` to `path`: a body that would be accepted where
/// the route reads one, so only the role can stop it.
fn row(method: &str, template: &str, path: String, reads_body: bool) -> table::Request {
    let body = match (method, template) {
        ("post", "/admin/v1/tenants") => json!({"slug": "made-anyway", "name": "Made Anyway"}),
        ("patch", "/admin/v1/tenants/{tenant}") => json!({"name": "Renamed"}),
        ("post", "/admin/v1/tenants/{tenant}/app-credentials") => json!({"name": "made-anyway"}),
        ("post", "/admin/v1/tenants/{tenant}/move") => json!({"server": "default"}),
        ("patch", "/admin/v1/servers/{name}") => json!({"status": "draining"}),
        ("post", "/admin/v1/keys") => json!({"name": "made-anyway", "role": "admin"}),
        ("post", "/admin/v1/plans") => json!({"name": "made-anyway", "connection_limit": 5}),
        ("patch", "/admin/v1/plans/{plan}") => json!({"connection_limit": 6}),
        ("post", "/admin/v1/migrations/tenants") => json!({"dry_run": true}),
        _ => json!({}),
    };
    let request = match method {
        "get" => get(path),
        "post" => post(path),
        "patch" => patch(path),
        "delete" => delete(path),
        other => panic!("a method this test does not send: {other}"),
    };
    if reads_body {
        request.json(body)
    } else {
        request
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_viewer_key_is_refused_every_route_that_changes_something_and_reads_the_rest() {
    let env = TestEnv::setup().storage().wire(|_| {}).start().await;
    let ids = Ids::make(&env, "viewed").await;
    let viewer = make_key(&env, "auditor", "viewer").await;
    let operations = admin_operations(&env).await;

    // Every operation that is not a GET: 403 naming the role, nothing changed.
    let rows: Vec<Row> = operations
        .iter()
        .filter(|(method, _, _)| method != "get")
        .map(|(method, template, body)| {
            row(method, template, ids.fill(template), *body)
                .is(403)
                .says_all(&["'auditor'", "viewer"])
        })
        .collect();
    assert!(rows.len() > 20, "{} routes change something", rows.len());
    let client = Client::new(&env, "", &[("authorization", &format!("Bearer {viewer}"))]);
    table::run(&client, rows, async || control_state(&env).await).await;

    // Every GET answers 200, but the keys and a direct (password-bearing) URI.
    let mut wrong = Vec::new();
    for (method, template, _) in operations.iter().filter(|(m, _, _)| m == "get") {
        let path = ids.fill(template);
        let want = if template == "/admin/v1/keys" {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::OK
        };
        let (status, body) = call_as(&env, &viewer, Method::GET, &path, None).await;
        if status != want {
            wrong.push(format!("{method} {path}: {status}, want {want}: {body}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    let direct = format!("/admin/v1/tenants/{}/connection?direct=true", ids.tenant);
    let (status, body) = call_as(&env, &viewer, Method::GET, &direct, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.get("uri").is_none());
    // The audit log is one of the reads, and the refused requests left no entry.
    let (_, mine) = call_as(
        &env,
        &viewer,
        Method::GET,
        "/admin/v1/audit?key=auditor",
        None,
    )
    .await;
    assert_eq!(mine, json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_key_runs_lifecycle_but_may_not_delete_manage_keys_overwrite_or_read_direct_uris(
) {
    let env = TestEnv::setup().storage().wire(|_| {}).start().await;
    let ids = Ids::make(&env, "operated").await;
    let operator = make_key(&env, "night-shift", "operator").await;
    let operations = admin_operations(&env).await;
    let tenant = format!("/admin/v1/tenants/{}", ids.tenant);
    let backup = format!("/admin/v1/backups/{}", ids.backup);

    let mut rows: Vec<Row> = operations
        .iter()
        .filter(|(method, template, _)| {
            method == "delete"
                || template.starts_with("/admin/v1/keys")
                || (template.starts_with("/admin/v1/plans") && method != "get")
        })
        .map(|(method, template, body)| row(method, template, ids.fill(template), *body).is(403))
        .collect();
    assert!(rows.len() >= 6, "{} delete and key routes", rows.len());
    #[rustfmt::skip]
    rows.extend([
        post(format!("{tenant}/restore")).json(json!({"overwrite": true})).is(403).says("overwrite"),
        post(format!("{tenant}/restore"))
            .json(json!({"backup_id": ids.backup, "overwrite": true})).is(403).says("overwrite"),
        post(format!("{backup}/restore")).json(json!({"overwrite": true})).is(403).says("overwrite"),
        post(format!("{backup}/restore")).raw(r#"{"overwrite": "yes"}"#).is(403)
            .what("anything but false asks to overwrite"),
        // serde reads a struct from an array of its fields, in order.
        post(format!("{backup}/restore")).raw("[null, true]").is(403)
            .what("an array may ask to overwrite"),
        post(format!("{tenant}/restore")).raw(r#"[null, true]"#).is(403)
            .what("an array may ask to overwrite"),
        get(format!("{tenant}/connection?direct=true")).is(403).says("direct connection URI"),
        get(format!("{tenant}/connection?direct=false&direct=true")).is(403),
    ]);
    let rows: Vec<Row> = rows
        .into_iter()
        .map(|r| r.says_all(&["'night-shift'", "operator"]))
        .collect();
    let client = Client::new(
        &env,
        "",
        &[("authorization", &format!("Bearer {operator}"))],
    );
    table::run(&client, rows, async || control_state(&env).await).await;

    // What an operator does: suspend and resume, credentials, a restore
    // that replaces nothing (refused by its handler, not by the role).
    let suspend = format!("{tenant}/suspend");
    let (status, body) = call_as(&env, &operator, Method::POST, &suspend, None).await;
    assert_eq!(
        (status, &body["status"]),
        (StatusCode::OK, &json!("suspended")),
        "{body}"
    );
    let resume = format!("{tenant}/resume");
    let (status, body) = call_as(&env, &operator, Method::POST, &resume, None).await;
    assert_eq!(
        (status, &body["status"]),
        (StatusCode::OK, &json!("active")),
        "{body}"
    );
    let creds = format!("{tenant}/app-credentials");
    let (status, body) = call_as(
        &env,
        &operator,
        Method::POST,
        &creds,
        Some(json!({"name": "billing"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let restore = format!("{tenant}/restore");
    let (status, body) = call_as(
        &env,
        &operator,
        Method::POST,
        &restore,
        Some(json!({"overwrite": false})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("overwrite"),
        "{body}"
    );
    let (status, body) = call_as(
        &env,
        &operator,
        Method::GET,
        &format!("{tenant}/connection"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"], Value::Null);
    // An admin key may do what the operator may not.
    let admin = make_key(&env, "lead", "admin").await;
    let (status, body) = call_as(&env, &admin, Method::GET, "/admin/v1/keys", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let direct = format!("{tenant}/connection?direct=true");
    let (status, body) = call_as(&env, &admin, Method::GET, &direct, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["user"].is_string(), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_audit_log_names_the_key_that_acted_and_filters_by_it() {
    let env = TestEnv::start().await;
    env.create("audited").await;
    let alice = make_key(&env, "ops-alice", "operator").await;
    let (status, _) = call_as(
        &env,
        &alice,
        Method::POST,
        "/admin/v1/tenants/audited/suspend",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = env
        .call(Method::POST, "/admin/v1/tenants/audited/resume", None)
        .await;
    assert_eq!(status, StatusCode::OK);

    let audit = |query: &'static str| {
        let env = &env;
        async move {
            let (status, body) = env
                .call(Method::GET, &format!("/admin/v1/audit?{query}"), None)
                .await;
            assert_eq!(status, StatusCode::OK, "{query}: {body}");
            body.as_array().unwrap().clone()
        }
    };
    let actions = |entries: &[Value]| -> Vec<String> {
        entries
            .iter()
            .map(|e| e["action"].as_str().unwrap().to_owned())
            .collect()
    };
    let by_alice = audit("key=ops-alice").await;
    assert_eq!(actions(&by_alice), ["tenant.suspend"], "{by_alice:?}");
    assert!(by_alice.iter().all(|e| e["actor"] == "ops-alice"));
    // The bootstrap token acts as `admin`, as it always has.
    let by_admin = audit("key=admin").await;
    assert_eq!(
        actions(&by_admin),
        ["tenant.resume", "key.create", "tenant.create"],
        "{by_admin:?}"
    );
    assert_eq!(by_admin[1]["detail"]["name"], "ops-alice");
    assert_eq!(by_admin[1]["detail"]["role"], "operator");
    let everyone = audit("tenant=audited").await;
    assert_eq!(
        everyone
            .iter()
            .map(|e| e["actor"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["admin", "ops-alice", "admin"]
    );
    let suspends = audit("key=ops-alice&action=tenant.suspend&tenant=audited").await;
    assert_eq!(suspends.len(), 1);
    assert!(audit("key=ops-alice&action=tenant.resume").await.is_empty());
    assert!(audit("key=nobody").await.is_empty());
    for query in [
        "key=Not%20A%20Key",
        "key=a%00b",
        "action=DROP%20TABLE",
        "key=",
    ] {
        let (status, body) = env
            .call(Method::GET, &format!("/admin/v1/audit?{query}"), None)
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{query}: {body}");
    }
}

#[tokio::test]
async fn the_audit_log_refuses_update_and_delete_even_from_silo_s_own_login() {
    let env = TestEnv::start().await;
    env.create("kept").await;
    make_key(&env, "witness", "viewer").await;
    let before = control_state(&env).await;
    // silo's own login: the one its registry connects with.
    let pool = env.registry().pool();
    for sql in [
        "UPDATE audit_log SET actor = 'someone-else'",
        "UPDATE audit_log SET detail = '{}' WHERE false",
        "DELETE FROM audit_log",
        "DELETE FROM audit_log WHERE action = 'key.create'",
        "TRUNCATE audit_log",
    ] {
        let err = sqlx::query(sql)
            .execute(pool)
            .await
            .expect_err(sql)
            .to_string();
        assert!(err.contains("append-only"), "{sql}: {err}");
    }
    assert_eq!(control_state(&env).await, before);
    // Appending still works.
    let (status, _) = env
        .call(Method::POST, "/admin/v1/tenants/kept/suspend", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        env.count("SELECT count(*) FROM audit_log").await,
        3,
        "tenant.create, key.create, tenant.suspend"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_key_is_refused_at_once_on_every_replica() {
    let env = TestEnv::start().await;
    let token = make_key(&env, "contractor", "operator").await;
    let logs = tempfile::tempdir().unwrap();
    let other = Silo::start(&env, None, 0, &logs.path().join("replica.log")).await;
    let client = reqwest::Client::new();
    let on_other = |token: String| {
        let (client, base) = (client.clone(), other.base.clone());
        async move {
            client
                .get(format!("{base}/admin/v1/tenants"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let here = async |token: &str| {
        call_as(&env, token, Method::GET, "/admin/v1/tenants", None)
            .await
            .0
    };
    assert_eq!(here(&token).await, StatusCode::OK);
    assert_eq!(on_other(token.clone()).await, 200);

    let (status, body) = env
        .call(Method::DELETE, "/admin/v1/keys/contractor", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(here(&token).await, StatusCode::UNAUTHORIZED);
    assert_eq!(on_other(token.clone()).await, 401);

    // The name is free again; the old token stays refused.
    let again = make_key(&env, "contractor", "viewer").await;
    assert_eq!(on_other(again.clone()).await, 200);
    assert_eq!(here(&again).await, StatusCode::OK);
    assert_eq!(on_other(token.clone()).await, 401);
    let rows = env
        .count("SELECT count(*) FROM admin_keys WHERE name = 'contractor'")
        .await;
    assert_eq!(rows, 2, "the revoked key's row is kept");
    other.stop();
}

#[tokio::test]
async fn keys_are_stored_hashed_and_their_last_use_is_recorded_once_a_minute() {
    let env = TestEnv::start().await;
    let token = make_key(&env, "hashed", "viewer").await;
    let last_used = async || -> Option<chrono::DateTime<chrono::Utc>> {
        sqlx::query_scalar("SELECT last_used_at FROM admin_keys WHERE name = 'hashed'")
            .fetch_one(env.registry().pool())
            .await
            .unwrap()
    };
    assert_eq!(last_used().await, None);
    let (status, keys) = env.call(Method::GET, "/admin/v1/keys", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(keys["items"][0]["name"], "hashed");
    assert_eq!(keys["items"][0]["last_used_at"], Value::Null);
    assert!(!keys.to_string().contains(&token));

    let (status, _) = call_as(&env, &token, Method::GET, "/admin/v1/tenants", None).await;
    assert_eq!(status, StatusCode::OK);
    let first = last_used().await.expect("last use recorded");
    let (status, _) = call_as(&env, &token, Method::GET, "/admin/v1/servers", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        last_used().await,
        Some(first),
        "not written again within a minute"
    );
    sqlx::query("UPDATE admin_keys SET last_used_at = now() - interval '2 minutes'")
        .execute(env.registry().pool())
        .await
        .unwrap();
    let (status, _) = call_as(&env, &token, Method::GET, "/admin/v1/servers", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        last_used().await.unwrap() > first,
        "written again after a minute"
    );

    // Only the token's SHA-256 is stored; the token is nowhere in the control DB.
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT token_hash FROM admin_keys WHERE name = 'hashed'")
            .fetch_one(env.registry().pool())
            .await
            .unwrap();
    assert_eq!(stored, silo::crypto::admin_key_hash(&token));
    let out = Command::new(env.pg.bindir().join("pg_dump"))
        .args(["--data-only", &env.control_url()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(dump.contains("hashed"), "the dump holds the key's row");
    let random_part = token.trim_start_matches(silo::crypto::ADMIN_KEY_PREFIX);
    assert!(
        !dump.contains(random_part),
        "the token is in the control DB"
    );
}

/// `silo` with no `SILO_*` variable but those given.
fn silo(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_silo"));
    cmd.args(args);
    for (var, _) in std::env::vars() {
        if var.starts_with("SILO_") || var.starts_with("AWS_") {
            cmd.env_remove(var);
        }
    }
    cmd.envs(envs.iter().copied());
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("run silo");
    (
        status.code(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn key_commands_work_from_a_shell_with_only_the_database_url() {
    let env = TestEnv::start().await;
    let url = env.control_url();
    let only_url = [("SILO_DATABASE_URL", url.as_str())];
    let run = |args: &[&str]| silo(args, &only_url);

    let (code, out, err) = run(&["keys", "create", "shell-ops", "--role", "operator"]);
    assert_eq!(code, Some(0), "{err}");
    let made: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&made["name"], &made["role"]),
        (&json!("shell-ops"), &json!("operator"))
    );
    assert!(err.contains("shown only now"), "{err}");
    let token = made["token"].as_str().unwrap().to_owned();
    // The token works on the API, as an operator.
    let (status, _) = call_as(&env, &token, Method::GET, "/admin/v1/tenants", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call_as(&env, &token, Method::GET, "/admin/v1/keys", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The fields of a key's line in `silo keys list`.
    let listed = |name: &str| -> Vec<String> {
        let (code, out, err) = run(&["keys", "list"]);
        assert_eq!(code, Some(0), "{err}");
        assert!(!out.contains(&token));
        let line = out.lines().find(|l| l.starts_with(&format!("{name}\t")));
        line.unwrap_or_else(|| panic!("{name} is not listed: {out}"))
            .split('\t')
            .map(str::to_owned)
            .collect()
    };
    let fields = listed("shell-ops");
    assert_eq!(fields[..2], ["shell-ops", "operator"], "{fields:?}");
    assert_eq!(fields[3], "cli", "made by the CLI: {fields:?}");
    assert_ne!(fields[4], "-", "used on the API above: {fields:?}");
    assert_eq!(fields[5], "-", "made without an expiry: {fields:?}");

    // A key made to expire says when, and the list too.
    let (code, out, err) = run(&[
        "keys",
        "create",
        "temp-ops",
        "--role",
        "viewer",
        "--expires-in-days",
        "7",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let temp: Value = serde_json::from_str(&out).unwrap();
    let expires = temp["expires_at"].as_str().expect("an expiry");
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(&listed("temp-ops")[5]).unwrap(),
        chrono::DateTime::parse_from_rfc3339(expires).unwrap()
    );
    // Its expiry moved, then taken away.
    let (code, out, err) = run(&["keys", "expire", "temp-ops", "--in-days", "30"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("temp-ops expires"), "{out}");
    let moved = chrono::DateTime::parse_from_rfc3339(&listed("temp-ops")[5]).unwrap();
    let days = (moved.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_hours() as f64 / 24.0;
    assert!((29.9..=30.0).contains(&days), "expires in {days} days");
    let (code, out, err) = run(&["keys", "expire", "temp-ops", "--never"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("does not expire"), "{out}");
    assert_eq!(listed("temp-ops")[5], "-");
    sqlx::query(
        "UPDATE admin_keys SET expires_at = now() - interval '1 minute' WHERE name = 'temp-ops'",
    )
    .execute(env.registry().pool())
    .await
    .unwrap();
    let expired = &listed("temp-ops")[5];
    assert!(expired.starts_with("expired "), "{expired}");
    // An expired key stays expired.
    let (code, _, err) = run(&["keys", "expire", "temp-ops", "--never"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("has expired"), "{err}");
    assert!(listed("temp-ops")[5].starts_with("expired "));
    let (code, _, _) = run(&["keys", "revoke", "temp-ops"]);
    assert_eq!(code, Some(0));

    // Refusals are usage errors (2) and change nothing.
    let keys_before = env.count("SELECT count(*) FROM admin_keys").await;
    #[rustfmt::skip]
    let refused: &[&[&str]] = &[
        &["keys", "create", "shell-ops", "--role", "viewer"],
        &["keys", "create", "Bad Name", "--role", "viewer"],
        &["keys", "create", "admin", "--role", "admin"],
        &["keys", "create", "someone", "--role", "root"],
        &["keys", "create", "someone"],
        &["keys", "create", "someone", "--role", "viewer", "--expires-in-days", "0"],
        &["keys", "create", "someone", "--role", "viewer", "--expires-in-days", "3651"],
        &["keys", "create", "someone", "--role", "viewer", "--expires-in-days", "soon"],
        &["keys", "revoke", "nobody"],
        &["keys", "expire", "nobody", "--never"],
        &["keys", "expire", "shell-ops"],
        &["keys", "expire", "shell-ops", "--in-days", "0"],
        &["keys", "expire", "shell-ops", "--in-days", "3651"],
        &["keys", "expire", "shell-ops", "--in-days", "5", "--never"],
    ];
    for args in refused {
        let (code, out, err) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {out}{err}");
    }
    assert_eq!(
        env.count("SELECT count(*) FROM admin_keys").await,
        keys_before
    );
    assert_eq!(listed("shell-ops")[5], "-", "its expiry is unchanged");
    // Without the database URL: a configuration error naming it.
    let (code, _, err) = silo(&["keys", "list"], &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("SILO_DATABASE_URL"), "{err}");

    let (code, out, err) = run(&["keys", "revoke", "shell-ops"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("revoked"), "{out}");
    let (status, _) = call_as(&env, &token, Method::GET, "/admin/v1/tenants", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (code, out, _) = run(&["keys", "list"]);
    assert_eq!(code, Some(0));
    assert!(!out.contains("shell-ops"), "{out}");
    let (_, audit) = env.call(Method::GET, "/admin/v1/audit?key=cli", None).await;
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "key.revoke",
            "key.revoke",
            "key.expiry",
            "key.expiry",
            "key.create",
            "key.create"
        ]
    );

    // To bootstrap: the first key of a fresh control database, nothing else set.
    silo::cli::ensure_database(&env.pg.url("postgres"), "silo_fresh")
        .await
        .unwrap();
    let fresh = env.pg.url("silo_fresh");
    let (code, out, err) = silo(
        &["keys", "create", "first", "--role", "admin"],
        &[("SILO_DATABASE_URL", fresh.as_str())],
    );
    assert_eq!(code, Some(0), "{err}");
    let first: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(first["role"], "admin");
    assert_eq!(first["created_by"], "cli");
}

#[tokio::test]
async fn bad_key_requests_get_a_clear_4xx_and_change_nothing() {
    let env = TestEnv::start().await;
    make_key(&env, "taken", "viewer").await;
    let gone = make_key(&env, "gone", "viewer").await;
    let (status, _) = env.call(Method::DELETE, "/admin/v1/keys/gone", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let keys = "/admin/v1/keys";
    let create = |body: Value| post(keys).json(body);
    let auth = "authorization";
    let lookalike = format!("Bearer {}", silo::crypto::AdminKeyToken::generate().token);
    #[rustfmt::skip]
    let rows = vec![
        create(json!({"name": "Bad Name", "role": "viewer"})).is(422).says("name"),
        create(json!({"name": "x".repeat(64), "role": "viewer"})).is(422),
        create(json!({"name": "a\u{0}b", "role": "viewer"})).is(422),
        create(json!({"name": "9lives", "role": "viewer"})).is(422),
        create(json!({"name": "admin", "role": "admin"})).is(422).says("reserved"),
        create(json!({"name": "cli", "role": "viewer"})).is(422).says("reserved"),
        create(json!({"name": "fine", "role": "root"})).is(422),
        create(json!({"name": "fine", "role": "Admin"})).is(422),
        create(json!({"name": "fine"})).is(422),
        create(json!({"name": "fine", "role": "viewer", "token": "my own"})).is(422),
        create(json!({"name": "taken", "role": "admin"})).is(409).says("taken"),
        create(json!({"name": "fine", "role": "viewer", "expires_in_days": 0})).is(422).says("expires_in_days"),
        create(json!({"name": "fine", "role": "viewer", "expires_in_days": 3651})).is(422).says("expires_in_days"),
        create(json!({"name": "fine", "role": "viewer", "expires_in_days": -1})).is(422),
        create(json!({"name": "fine", "role": "viewer", "expires_in_days": 1.5})).is(422),
        create(json!({"name": "fine", "role": "viewer", "expires_in_days": "30"})).is(422),
        create(json!({"name": "fine", "role": "viewer", "expires_in_days": 4294967296_u64})).is(422),
        post(keys).raw("{").is(400),
        delete("/admin/v1/keys/nobody").is(404),
        delete("/admin/v1/keys/gone").is(404).what("a revoked key"),
        delete("/admin/v1/keys/Bad%20Name").is(404),
        delete("/admin/v1/keys/%00").is(404),
        get(keys).header(auth, &lookalike).is(401).what("a token of the right shape, not a key's"),
        get(keys).header(auth, &format!("Bearer {gone}")).is(401).what("a revoked key's token"),
        get(keys).header(auth, ADMIN_TOKEN).is(401).what("no Bearer scheme"),
    ];
    table::run(&Client::admin(&env), rows, async || {
        control_state(&env).await
    })
    .await;
    let (_, listed) = env.call(Method::GET, keys, None).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "{listed}");
}

/// A client sending from the loopback address `from`.
fn client_from(from: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(std::net::IpAddr::from(from))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn bearer_status(http: &reqwest::Client, url: &str, token: &str) -> reqwest::Response {
    http.get(url).bearer_auth(token).send().await.unwrap()
}

/// A console sign-in from `http` with `token`: the answer to the form.
async fn console_sign_in(http: &reqwest::Client, base: &str, token: &str) -> reqwest::Response {
    let page = http
        .get(format!("{base}/console/sign-in"))
        .send()
        .await
        .unwrap();
    let nonce = set_cookie(&page, "silo_console_sign_in").expect("a sign-in cookie");
    http.post(format!("{base}/console/sign-in"))
        .header("cookie", format!("silo_console_sign_in={nonce}"))
        .form(&[("csrf", nonce.as_str()), ("token", token)])
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_address_that_keeps_presenting_wrong_tokens_is_answered_429_before_any_is_looked_at() {
    // 6 failures a minute: one more every 10 s, a burst of 6.
    let env = TestEnv::setup()
        .limits(silo::api::limits::HttpLimits {
            admin_auth_failures: 6,
            ..Default::default()
        })
        .start()
        .await;
    let key = make_key(&env, "ops", "viewer").await;
    // A right token that has not signed in from anywhere yet.
    let unseen = make_key(&env, "late", "viewer").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let served =
        tokio::spawn(axum::serve(listener, silo::startup::with_peers(env.app())).into_future());
    let base = format!("http://127.0.0.1:{port}");
    let tenants = format!("{base}/admin/v1/tenants");
    let (guesser, other) = (client_from([127, 0, 0, 2]), client_from([127, 0, 0, 3]));

    // Successes cost nothing: many, then the whole allowance of failures.
    for _ in 0..20 {
        assert_eq!(bearer_status(&guesser, &tenants, &key).await.status(), 200);
    }
    let started = std::time::Instant::now();
    let wrong_key = format!("{}x", &key[..key.len() - 1]);
    let wrong = [
        bearer_status(&guesser, &tenants, &wrong_key).await,
        bearer_status(&guesser, &tenants, "not-the-bootstrap-token-at-all").await,
        bearer_status(&guesser, &format!("{base}/metrics"), &wrong_key).await,
        console_sign_in(&guesser, &base, "not-the-bootstrap-token-at-all").await,
        bearer_status(&guesser, &tenants, &wrong_key).await,
        bearer_status(&guesser, &tenants, &wrong_key).await,
    ];
    for res in &wrong {
        assert_eq!(
            res.status(),
            401,
            "each failure within the allowance is a 401"
        );
    }
    // Past it, no token is looked at, a right one included, unless it
    // signed in lately: the admins behind one address (a NAT) keep
    // working while a guesser among them is held back.
    assert_eq!(bearer_status(&guesser, &tenants, &key).await.status(), 200);
    let metrics = format!("{base}/metrics");
    assert_eq!(
        bearer_status(&guesser, &metrics, &key).await.status(),
        200,
        "on /metrics too"
    );
    let mut refused = bearer_status(&guesser, &tenants, &unseen).await;
    if refused.status() == 401 {
        // The allowance refilled by one while the six ran (one each 10 s).
        assert!(started.elapsed() >= std::time::Duration::from_secs(9));
        refused = bearer_status(&guesser, &tenants, &wrong_key).await;
    }
    assert_eq!(refused.status(), 429);
    let wait: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&wait), "Retry-After {wait}");
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["status"], 429);
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("SILO_ADMIN_AUTH_FAILURES"), "{detail}");
    assert!(
        !detail.contains(&unseen) && !detail.contains(&wrong_key),
        "{detail}"
    );
    for res in [
        bearer_status(&guesser, &tenants, ADMIN_TOKEN).await,
        bearer_status(&guesser, &format!("{base}/metrics"), ADMIN_TOKEN).await,
    ] {
        assert_eq!(res.status(), 429, "the right token is not looked at either");
    }
    let page = console_sign_in(&guesser, &base, ADMIN_TOKEN).await;
    assert_eq!(page.status(), 429);
    assert!(page.headers().contains_key("retry-after"));
    let html = page.text().await.unwrap();
    assert!(html.contains("Too many failed sign-ins"), "{html}");
    // Requests without a token are not guesses: still a plain 401.
    let bare = guesser.get(&tenants).send().await.unwrap();
    assert_eq!(bare.status(), 401);

    // Another address is not held back, and its failures are its own.
    assert_eq!(bearer_status(&other, &tenants, &key).await.status(), 200);
    assert_eq!(
        bearer_status(&other, &tenants, &wrong_key).await.status(),
        401
    );
    let signed_in = console_sign_in(&other, &base, ADMIN_TOKEN).await;
    assert_eq!(
        signed_in.status(),
        303,
        "the console signs in from elsewhere"
    );

    // Guesses sent in parallel do not all pass before the first is
    // counted: a few are looked at at once, each counted.
    let racer = client_from([127, 0, 0, 4]);
    let guesses = (0..100).map(|_| bearer_status(&racer, &tenants, &wrong_key));
    let answers: Vec<u16> = futures::future::join_all(guesses)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    let looked_at = answers.iter().filter(|s| **s == 401).count();
    assert!(
        (6..=9).contains(&looked_at),
        "{looked_at} of 100 parallel guesses were looked at (6 allowed, 3 more at most in turn): {answers:?}"
    );
    assert!(
        answers.iter().all(|s| [401, 429, 503].contains(s)),
        "{answers:?}"
    );
    // Right tokens in parallel take turns; none is refused.
    let admin = client_from([127, 0, 0, 5]);
    let rights = (0..40).map(|_| bearer_status(&admin, &tenants, &key));
    for res in futures::future::join_all(rights).await {
        assert_eq!(res.status(), 200);
    }

    // After Retry-After, one more try.
    tokio::time::sleep(
        std::time::Duration::from_secs(wait) + std::time::Duration::from_millis(200),
    )
    .await;
    assert_eq!(bearer_status(&guesser, &tenants, &key).await.status(), 200);
    assert_eq!(
        bearer_status(&guesser, &tenants, &wrong_key).await.status(),
        401
    );
    assert_eq!(
        bearer_status(&guesser, &tenants, &unseen).await.status(),
        429
    );
    assert_eq!(bearer_status(&guesser, &tenants, &key).await.status(), 200);
    // A remembered token that is revoked is refused at once, and counted.
    let (status, _) = env.call(Method::DELETE, "/admin/v1/keys/ops", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(bearer_status(&guesser, &tenants, &key).await.status(), 401);
    assert_eq!(bearer_status(&guesser, &tenants, &key).await.status(), 429);
    served.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_made_to_expire_works_until_then_and_is_refused_everywhere_after() {
    let env = TestEnv::start().await;
    let before = chrono::Utc::now();
    let made = make_contractor(&env).await;
    let token = made["token"].as_str().unwrap().to_owned();
    let expires: chrono::DateTime<chrono::Utc> =
        made["expires_at"].as_str().unwrap().parse().unwrap();
    let days = (expires - before).num_seconds() as f64 / 86_400.0;
    assert!((29.99..=30.01).contains(&days), "expires in {days} days");
    let (_, audit) = env
        .call(Method::GET, "/admin/v1/audit?action=key.create", None)
        .await;
    assert_eq!(
        audit[0]["detail"]["expires_at"], made["expires_at"],
        "{audit}"
    );
    let forever = make_key(&env, "forever", "viewer").await;

    // Until then: the API, /metrics and the console.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let served =
        tokio::spawn(axum::serve(listener, silo::startup::with_peers(env.app())).into_future());
    let base = format!("http://127.0.0.1:{port}");
    let http = client_from([127, 0, 0, 1]);
    let tenants = format!("{base}/admin/v1/tenants");
    let metrics = format!("{base}/metrics");
    assert_eq!(bearer_status(&http, &tenants, &token).await.status(), 200);
    let scraped = bearer_status(&http, &metrics, &token).await;
    assert_eq!(scraped.status(), 200, "any live key reads the metrics");
    assert!(scraped.text().await.unwrap().contains("silo_tenants"));
    assert_eq!(bearer_status(&http, &metrics, &forever).await.status(), 200);
    let signed_in = console_sign_in(&http, &base, &token).await;
    assert_eq!(signed_in.status(), 303);
    let session = set_cookie(&signed_in, "silo_console").expect("a session cookie");
    let console = |path: &'static str| {
        http.get(format!("{base}{path}"))
            .header("cookie", format!("silo_console={session}"))
            .send()
    };
    assert_eq!(console("/console/tenants").await.unwrap().status(), 200);
    let (_, listed) = env.call(Method::GET, "/admin/v1/keys", None).await;
    let entry = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "contractor")
        .unwrap();
    assert_eq!(entry["expires_at"], made["expires_at"]);

    // Its time passes (moved, rather than waited for).
    sqlx::query(
        "UPDATE admin_keys SET expires_at = now() - interval '1 second' WHERE name = 'contractor'",
    )
    .execute(env.registry().pool())
    .await
    .unwrap();
    assert_eq!(bearer_status(&http, &tenants, &token).await.status(), 401);
    assert_eq!(bearer_status(&http, &metrics, &token).await.status(), 401);
    let ended = console("/console/tenants").await.unwrap();
    assert_eq!(ended.status(), 303, "its console session ended");
    assert_eq!(ended.headers()["location"], "/console/sign-in");
    assert_eq!(console_sign_in(&http, &base, &token).await.status(), 401);
    // Other keys are not affected.
    assert_eq!(bearer_status(&http, &tenants, &forever).await.status(), 200);

    // Listed as expired.
    let keys_page = {
        let admin = console_sign_in(&http, &base, ADMIN_TOKEN).await;
        let cookie = set_cookie(&admin, "silo_console").expect("a session cookie");
        http.get(format!("{base}/console/keys"))
            .header("cookie", format!("silo_console={cookie}"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    assert!(keys_page.contains("expired"), "{keys_page}");
    // Its name is free for a successor: the expired key is revoked as
    // the new one is made (audited), and the old token stays dead.
    let again = json!({"name": "contractor", "role": "operator", "expires_in_days": 1});
    let (status, successor) = env
        .call(Method::POST, "/admin/v1/keys", Some(again.clone()))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{successor}");
    assert_ne!(successor["id"], made["id"]);
    let new_token = successor["token"].as_str().unwrap().to_owned();
    assert_eq!(
        bearer_status(&http, &tenants, &new_token).await.status(),
        200
    );
    assert_eq!(
        bearer_status(&http, &tenants, &token).await.status(),
        401,
        "the old token stays dead"
    );
    let revoked: (Option<String>, serde_json::Value) = sqlx::query_as(
        "SELECT k.revoked_by, a.detail FROM admin_keys k
           JOIN audit_log a ON a.action = 'key.revoke' AND a.detail->>'key_id' = k.id::text
          WHERE k.id = $1::uuid",
    )
    .bind(made["id"].as_str().unwrap())
    .fetch_one(env.registry().pool())
    .await
    .unwrap();
    assert_eq!(
        revoked.0.as_deref(),
        Some(silo::domain::BOOTSTRAP_ACTOR),
        "{revoked:?}"
    );
    assert_eq!(revoked.1["reason"], "expired; name reused", "{revoked:?}");
    let (_, listed) = env.call(Method::GET, "/admin/v1/keys", None).await;
    let named: Vec<&serde_json::Value> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["name"] == "contractor")
        .collect();
    assert_eq!(named.len(), 1, "{listed}");
    assert_eq!(named[0]["id"], successor["id"]);
    // A live key's name is still its own.
    let (status, body) = env.call(Method::POST, "/admin/v1/keys", Some(again)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("a live admin key is named"),
        "{body}"
    );
    served.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn behind_a_trusted_proxy_wrong_tokens_count_against_the_client_it_names() {
    // 127.0.0.1 is the proxy; 3 failures a minute per client.
    let env = TestEnv::setup()
        .limits(silo::api::limits::HttpLimits {
            admin_auth_failures: 3,
            trusted_proxies: vec!["127.0.0.1/32".parse().unwrap()],
            ..Default::default()
        })
        .start()
        .await;
    let key = make_key(&env, "ops", "viewer").await;
    // Right, and never signed in: refused with its address (a token that
    // signed in lately would be looked up anyway).
    let unseen = make_key(&env, "late", "viewer").await;
    let wrong_key = format!("{}x", &key[..key.len() - 1]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let served =
        tokio::spawn(axum::serve(listener, silo::startup::with_peers(env.app())).into_future());
    let tenants = format!("http://127.0.0.1:{port}/admin/v1/tenants");
    let (proxy, direct) = (client_from([127, 0, 0, 1]), client_from([127, 0, 0, 2]));
    let via = |client: &reqwest::Client, forwarded: &str, token: &str| {
        client
            .get(&tenants)
            .header("x-forwarded-for", forwarded)
            .bearer_auth(token)
            .send()
    };
    let status = |res: reqwest::Result<reqwest::Response>| res.unwrap().status().as_u16();

    // One client behind the proxy uses up its allowance...
    for _ in 0..3 {
        assert_eq!(status(via(&proxy, "203.0.113.9", &wrong_key).await), 401);
    }
    assert_eq!(status(via(&proxy, "203.0.113.9", &unseen).await), 429);
    // ...and cannot shed it by writing another address left of its own.
    assert_eq!(
        status(via(&proxy, "198.51.100.1, 203.0.113.9", &unseen).await),
        429
    );
    // Another client behind the same proxy is not held back.
    assert_eq!(status(via(&proxy, "203.0.113.10", &key).await), 200);
    // A client that is not a trusted proxy is counted by its own address,
    // whatever its header says.
    for _ in 0..3 {
        assert_eq!(status(via(&direct, "203.0.113.10", &wrong_key).await), 401);
    }
    assert_eq!(status(via(&direct, "203.0.113.10", &unseen).await), 429);
    assert_eq!(status(via(&proxy, "203.0.113.10", &key).await), 200);
    served.abort();
}

/// A live key's expiry is moved or taken away (audited with what it was);
/// bad changes get a clear 4xx and change nothing; an expired key stays
/// expired, and only an admin changes keys.
#[tokio::test(flavor = "multi_thread")]
async fn a_live_key_s_expiry_is_changed_and_an_expired_key_stays_refused() {
    let env = TestEnv::start().await;
    let made = make_contractor(&env).await;
    let token = made["token"].as_str().unwrap().to_owned();
    let expires_at = |key: &Value| -> Option<chrono::DateTime<chrono::Utc>> {
        key["expires_at"].as_str().map(|t| t.parse().unwrap())
    };
    let listed = || async {
        let (_, keys) = env.call(Method::GET, "/admin/v1/keys", None).await;
        keys["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["name"] == "contractor")
            .cloned()
            .unwrap()
    };
    let patch = |body: Value| env.call(Method::PATCH, "/admin/v1/keys/contractor", Some(body));

    // Shortened to two days from now.
    let before = chrono::Utc::now();
    let (status, changed) = patch(json!({"expires_in_days": 2})).await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    assert!(changed.get("token").is_none(), "{changed}");
    let days = (expires_at(&changed).unwrap() - before).num_seconds() as f64 / 86_400.0;
    assert!((1.99..=2.01).contains(&days), "expires in {days} days");
    assert_eq!(listed().await["expires_at"], changed["expires_at"]);
    let (_, audit) = env
        .call(Method::GET, "/admin/v1/audit?action=key.expiry", None)
        .await;
    assert_eq!(audit[0]["detail"]["was"], made["expires_at"], "{audit}");
    assert_eq!(audit[0]["detail"]["expires_at"], changed["expires_at"]);
    assert_eq!(audit[0]["actor"], "admin");

    // Taken away: it does not expire.
    let (status, changed) = patch(json!({"expires_in_days": null})).await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    assert_eq!(changed["expires_at"], Value::Null);
    let (status, _) = call_as(&env, &token, Method::GET, "/admin/v1/tenants", None).await;
    assert_eq!(status, StatusCode::OK);

    // Bad changes: a clear 4xx, nothing changed.
    let bad = [
        (json!({}), StatusCode::UNPROCESSABLE_ENTITY),
        (
            json!({"expires_in_days": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"expires_in_days": 3651}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"expires_in_days": -1}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"expires_in_days": "soon"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"expires_in_days": 1.5}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"expires_in_days": 5, "role": "admin"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (json!([5]), StatusCode::UNPROCESSABLE_ENTITY),
    ];
    for (body, want) in bad {
        let (status, answer) = patch(body.clone()).await;
        assert_eq!(status, want, "{body}: {answer}");
        assert!(answer["detail"].as_str().is_some(), "{body}: {answer}");
    }
    for path in ["/admin/v1/keys/nobody", "/admin/v1/keys/Bad%20Name"] {
        let (status, answer) = env
            .call(Method::PATCH, path, Some(json!({"expires_in_days": 5})))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {answer}");
    }
    // Only an admin: the operator key cannot give itself more time.
    let (status, _) = call_as(
        &env,
        &token,
        Method::PATCH,
        "/admin/v1/keys/contractor",
        Some(json!({"expires_in_days": 5})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(listed().await["expires_at"], Value::Null, "nothing changed");
    assert_eq!(listed().await["role"], "operator");

    // Expired: it stays so, and refused.
    sqlx::query(
        "UPDATE admin_keys SET expires_at = now() - interval '1 second' WHERE name = 'contractor'",
    )
    .execute(env.registry().pool())
    .await
    .unwrap();
    let was = listed().await["expires_at"].clone();
    for body in [
        json!({"expires_in_days": 30}),
        json!({"expires_in_days": null}),
    ] {
        let (status, answer) = patch(body).await;
        assert_eq!(status, StatusCode::CONFLICT, "{answer}");
        assert!(
            answer["detail"].as_str().unwrap().contains("has expired"),
            "{answer}"
        );
    }
    assert_eq!(listed().await["expires_at"], was);
    let (status, _) = call_as(&env, &token, Method::GET, "/admin/v1/tenants", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}
