//! The OpenAPI document is exact. schemathesis, a property-based OpenAPI
//! tester, fuzzes silo (the whole app on a socket, on a real PostgreSQL) from
//! the document it publishes and finds no server error, and no status,
//! content type or body the document does not describe. The document's own
//! shape (every error problem+json, the shared answers on every route) and
//! the rejections axum would answer itself are checked directly.

use std::future::IntoFuture;
use std::path::{Path, PathBuf};
use std::process::Output;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::common::{TestEnv, ADMIN_TOKEN};

/// The venv `scripts/install-deps` puts schemathesis in (the version pinned
/// in `scripts/requirements-schemathesis.txt`).
const SCHEMATHESIS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/.tools/schemathesis/bin/schemathesis"
);

/// Generated cases per operation and data kind (valid, invalid): about 700
/// requests in all. `SILO_FUZZ_EXAMPLES` asks for more, for a deeper run by hand.
const MAX_EXAMPLES: u32 = 15;
/// A fixed seed: the same requests every run (`SILO_FUZZ_SEED` to vary it).
const SEED: u32 = 20_251_130;

fn setting(var: &str, default: u32) -> u32 {
    std::env::var(var).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{var} must be a number, not {v:?}"))
    })
}

/// schemathesis hooks (`SCHEMATHESIS_HOOKS`). Header values with control
/// characters are not valid HTTP: hyper, silo's HTTP server, answers such a
/// request itself (400, no body) before silo sees it, so none are sent.
const HOOKS: &str = r#"
import schemathesis


def _valid(value):
    return not any(ord(c) < 0x20 and c != "\t" or ord(c) == 0x7F for c in str(value))


@schemathesis.hook
def filter_headers(context, headers):
    return headers is None or all(_valid(v) for v in headers.values())
"#;

fn schemathesis() -> PathBuf {
    let path = PathBuf::from(SCHEMATHESIS);
    assert!(
        path.is_file(),
        "schemathesis is not installed at {}: run scripts/install-deps (it installs the \
         pinned version there)",
        path.display()
    );
    path
}

/// One schemathesis run over the operations `filter` selects, with `args`
/// (headers for authentication); its output when it finds anything.
async fn fuzz(
    tool: &Path,
    base: &str,
    work: &Path,
    filter: &[&str],
    args: &[String],
) -> Result<String, String> {
    std::fs::write(work.join("silo_fuzz_hooks.py"), HOOKS).unwrap();
    let mut cmd = tokio::process::Command::new(tool);
    cmd.current_dir(work)
        .env("PYTHONPATH", work)
        .env("SCHEMATHESIS_HOOKS", "silo_fuzz_hooks")
        .env("NO_COLOR", "1")
        // Nothing sent anywhere but to silo.
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .arg("run")
        .arg(format!("{base}/openapi.json"))
        // utoipa publishes OpenAPI 3.1, which schemathesis 3.x reads as experimental.
        .arg("--experimental=openapi-3.1")
        .arg("--checks=not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance")
        .arg("--data-generation-method=all")
        .arg("--contrib-openapi-formats-uuid")
        .arg(format!(
            "--hypothesis-max-examples={}",
            setting("SILO_FUZZ_EXAMPLES", MAX_EXAMPLES)
        ))
        .arg(format!("--hypothesis-seed={}", setting("SILO_FUZZ_SEED", SEED)))
        .arg("--hypothesis-database=none")
        // No timing assumptions: no deadline per case, no health check on speed.
        .arg("--hypothesis-deadline=300000")
        .arg("--hypothesis-suppress-health-check=all")
        .arg("--request-timeout=120000")
        .arg("--experimental-no-failfast")
        .arg("--workers=1")
        .args(filter)
        .args(args)
        .kill_on_drop(true);
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().await.expect("run schemathesis");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    if status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

#[tokio::test]
async fn a_fuzz_of_the_published_document_finds_nothing_undocumented() {
    let tool = schemathesis();
    let env = TestEnv::start().await;
    // The whole app, served on a socket as `silo serve` serves it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(axum::serve(listener, env.app()).into_future());

    // A tenant for the admin operations on one tenant (a random name finds
    // none), and one with data for the app operations, with its token.
    env.create("fuzz-admin").await;
    env.create("fuzz-app").await;
    let (status, body) = env
        .call(Method::POST, "/admin/v1/tenants/fuzz-app/tokens", None)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let token = body["token"].as_str().unwrap().to_owned();
    let bearer = format!("Bearer {token}");
    let app = [
        ("authorization", bearer.as_str()),
        ("x-tenant-id", "fuzz-app"),
    ];
    for (resource, item) in [
        (
            "clinics",
            json!({"name": "Main Street", "timezone": "Europe/Berlin"}),
        ),
        (
            "patients",
            json!({"full_name": "Ada Lovelace", "email": "ada@example.com"}),
        ),
        ("staff", json!({"full_name": "Dr. Who", "role": "doctor"})),
    ] {
        let body = item.to_string();
        let a = env
            .send(
                Method::POST,
                &format!("/api/v1/{resource}"),
                Some(&body),
                &app,
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{resource}: {}", a.body);
    }

    let work = tempfile::tempdir().unwrap();
    let admin = fuzz(
        &tool,
        &base,
        work.path(),
        &["--exclude-path-regex=^/api/"],
        &[format!("--header=Authorization: Bearer {ADMIN_TOKEN}")],
    )
    .await;
    let admin_tenant = fuzz(
        &tool,
        &base,
        work.path(),
        // All but deleting it, which would leave the rest nothing to find.
        &[
            "--include-path-regex=^/admin/v1/tenants/\\{tenant\\}",
            "--exclude-method=DELETE",
            "--set-path=tenant=fuzz-admin",
        ],
        &[format!("--header=Authorization: Bearer {ADMIN_TOKEN}")],
    )
    .await;
    let app = fuzz(
        &tool,
        &base,
        work.path(),
        &["--include-path-regex=^/api/"],
        // A header, not `--set-header`: schemathesis 3.39 drops those
        // when any `--header` is given.
        &[
            format!("--header=Authorization: {bearer}"),
            "--header=X-Tenant-ID: fuzz-app".to_owned(),
        ],
    )
    .await;
    let mut failures = Vec::new();
    for (what, run) in [
        ("admin, health and docs", admin),
        ("admin, on one tenant", admin_tenant),
        ("app", app),
    ] {
        match run {
            Ok(out) => println!("{what}: {}", out.lines().last().unwrap_or_default()),
            Err(out) => failures.push(format!("--- {what}:\n{out}")),
        }
    }
    assert!(
        failures.is_empty(),
        "schemathesis found answers the OpenAPI document does not describe:\n{}",
        failures.join("\n")
    );
    // Still serving.
    let (status, _) = env.call_with(Method::GET, "/readyz", None, &[]).await;
    assert_eq!(status, StatusCode::OK);
    server.abort();
}

/// Every operation of the document: path, method, operation.
fn operations(spec: &Value) -> Vec<(String, String, &Value)> {
    let mut out = Vec::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            out.push((path.clone(), method.clone(), op));
        }
    }
    out
}

fn statuses(op: &Value) -> Vec<&str> {
    op["responses"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect()
}

#[tokio::test]
async fn every_error_in_the_document_is_problem_json_and_shared_answers_are_on_every_route() {
    let env = TestEnv::start().await;
    let (status, spec) = env.call_with(Method::GET, "/openapi.json", None, &[]).await;
    assert_eq!(status, StatusCode::OK);
    let problem =
        json!({"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}});
    for (path, method, op) in operations(&spec) {
        let at = format!("{method} {path}");
        for (status, response) in op["responses"].as_object().unwrap() {
            if status.starts_with('4') || status.starts_with('5') {
                assert_eq!(response["content"], problem, "{status} of {at}");
            }
        }
        let have = statuses(op);
        let want: &[&str] = if path.starts_with("/admin/") {
            &["401", "403", "500", "503"]
        } else if path.starts_with("/api/") {
            &["400", "401", "404", "423", "500", "503"]
        } else {
            &[]
        };
        for s in want {
            assert!(have.contains(s), "{at} does not document {s}: {have:?}");
        }
        let body = &op["requestBody"];
        if !body.is_null() {
            let json_body: &[&str] = if body["required"] == true {
                &["400", "413", "415", "422"]
            } else {
                &["400", "413", "422"]
            };
            for s in json_body {
                assert!(
                    have.contains(s),
                    "{at} reads a body but does not document {s}"
                );
            }
        }
        let has_query = op["parameters"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["in"] == "query"));
        if has_query {
            assert!(
                have.contains(&"422"),
                "{at} reads a query but does not document 422"
            );
        }
        let has_path = path.contains('{');
        if has_path {
            assert!(
                have.contains(&"404"),
                "{at} has a path parameter but does not document 404"
            );
        }
    }
    // Text is documented as text.
    for (path, media) in [
        ("/healthz", "text/plain"),
        ("/readyz", "text/plain"),
        ("/metrics", "text/plain"),
        ("/docs", "text/html"),
        ("/openapi.json", "application/json"),
    ] {
        let content = &spec["paths"][path]["get"]["responses"]["200"]["content"];
        assert!(content.get(media).is_some(), "{path}: {content}");
    }
}

/// What axum itself would answer (a path segment that does not decode, a
/// method a route lacks, a body too large) is problem+json, as any error.
#[tokio::test]
async fn rejections_before_a_handler_runs_are_problem_json() {
    let env = TestEnv::start().await;
    let admin = format!("Bearer {ADMIN_TOKEN}");
    let auth = [("authorization", admin.as_str())];
    for path in [
        "/admin/v1/tenants/%FF",
        "/admin/v1/backups/%FF",
        "/admin/v1/operations/%FF",
        "/admin/v1/servers/%FF",
    ] {
        let method = if path.contains("servers") {
            Method::PATCH
        } else {
            Method::GET
        };
        let body = (method == Method::PATCH).then_some("{}");
        let a = env.send(method, path, body, &auth).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}: {}", a.body);
        assert_eq!(a.content_type, "application/problem+json", "{path}");
    }

    // A method the route lacks: 405, `Allow`, problem+json.
    let res = env
        .app()
        .oneshot(
            Request::builder()
                .method(Method::PUT)
                .uri("/admin/v1/tenants")
                .header("authorization", &admin)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let allow = res.headers()["allow"].to_str().unwrap();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");

    // Bodies over the limit: 413, the same with or without a content type check.
    let big = format!("{{\"name\": \"{}\"}}", "x".repeat(3 * 1024 * 1024));
    for path in ["/admin/v1/tenants", "/admin/v1/tenants/nobody/tokens"] {
        let a = env.send(Method::POST, path, Some(&big), &auth).await;
        assert_eq!(
            a.status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "{path}: {}",
            a.body
        );
        assert_eq!(a.content_type, "application/problem+json", "{path}");
    }

    // A JSON body without a JSON content type: 415.
    let res = env
        .app()
        .oneshot(
            Request::builder()
                .method(Method::POST)
                .uri("/admin/v1/tenants")
                .header("authorization", &admin)
                .header("content-type", "text/plain")
                .body(Body::from(r#"{"slug": "plain", "name": "Plain"}"#))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    assert!(env.registry().find_tenant("plain").await.unwrap().is_none());
}

/// PostgreSQL refuses a NUL in text as an error: a name or an email with
/// one is a 4xx that changes nothing, not a 500 (found by the fuzz).
#[tokio::test]
async fn a_nul_in_a_name_or_an_email_is_a_clear_4xx() {
    let env = TestEnv::start().await;
    env.create("nul").await;
    for (method, path, body, want) in [
        (
            Method::GET,
            "/admin/v1/tenants/%00",
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/admin/v1/tenants/a%00b/backups",
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/admin/v1/audit?tenant=%00",
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            Method::PATCH,
            "/admin/v1/servers/%00",
            Some(json!({})),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            "/admin/v1/migrations/tenants",
            Some(json!({"tenant": "a\u{0}", "dry_run": true})),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        let (status, answer) = env.call(method.clone(), path, body).await;
        assert_eq!(status, want, "{method} {path}: {answer}");
    }

    let (status, body) = env
        .call(Method::POST, "/admin/v1/tenants/nul/tokens", None)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let bearer = format!("Bearer {}", body["token"].as_str().unwrap());
    let app = [("authorization", bearer.as_str()), ("x-tenant-id", "nul")];
    for (path, body) in [
        (
            "/api/v1/patients",
            json!({"full_name": "Nul", "email": "a\u{0}@example.com"}),
        ),
        (
            "/api/v1/staff",
            json!({"full_name": "Nul", "role": "nurse", "email": "a\u{0}@example.com"}),
        ),
    ] {
        let a = env
            .send(Method::POST, path, Some(&body.to_string()), &app)
            .await;
        assert_eq!(
            a.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{path}: {}",
            a.body
        );
        assert_eq!(a.content_type, "application/problem+json");
        let list = env.send(Method::GET, path, None, &app).await;
        assert_eq!(list.body["items"], json!([]), "{path}");
    }
}
