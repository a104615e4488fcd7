//! App credentials and connection URIs through the admin API: a password is
//! shown once and never stored (PostgreSQL itself checks the verifier silo
//! keeps), rotation and revocation, the front door's URI without a secret,
//! the tenant role's own URI audited, and bad requests that change nothing.

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::Connection as _;

use crate::common::table::{self, delete, get, post, Client};
use crate::common::{close, wait_op, TestEnv};

/// The front door's public address in the tests that hand out URIs.
const FRONT_DOOR: &str = "db.clinics.test:6432";

fn credentials(slug: &str) -> String {
    format!("/admin/v1/tenants/{slug}/app-credentials")
}

async fn create_credential(env: &TestEnv, slug: &str, body: Value) -> Value {
    let (s, made) = env.call(Method::POST, &credentials(slug), Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{made}");
    made
}

async fn list(env: &TestEnv, slug: &str) -> Value {
    let (s, body) = env.call(Method::GET, &credentials(slug), None).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body
}

/// Every row of the control DB's credentials and audit log, as text.
async fn stored_rows(env: &TestEnv) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT row_to_json(c)::text FROM app_credentials c
         UNION ALL SELECT row_to_json(a)::text FROM audit_log a",
    )
    .fetch_all(env.registry().pool())
    .await
    .unwrap()
}

async fn verifier_of(env: &TestEnv, id: &str) -> String {
    sqlx::query_scalar("SELECT verifier FROM app_credentials WHERE id = $1::uuid")
        .bind(id)
        .fetch_one(env.registry().pool())
        .await
        .unwrap()
}

/// Does PostgreSQL itself let `password` log in against `verifier`? A role
/// is given the verifier as its stored password (PostgreSQL takes a SCRAM
/// verifier as it is) and logs in over SCRAM; a refusal is printed.
async fn postgres_accepts(env: &TestEnv, verifier: &str, password: &str) -> bool {
    assert!(!verifier.contains('\''), "{verifier}");
    sqlx::raw_sql(&format!(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'scram_probe') THEN
             CREATE ROLE scram_probe LOGIN;
             GRANT CONNECT ON DATABASE postgres TO scram_probe;
           END IF;
         END $$;
         ALTER ROLE scram_probe PASSWORD '{verifier}'"
    ))
    .execute(&env.admin)
    .await
    .unwrap();
    match env.connect_as("postgres", "scram_probe", password).await {
        Ok(conn) => {
            close(conn).await;
            true
        }
        Err(e) => {
            eprintln!("scram_probe refused: {e}");
            false
        }
    }
}

/// The audit entries of a tenant, newest first.
async fn audit(env: &TestEnv, slug: &str) -> Vec<Value> {
    let (s, body) = env
        .call(
            Method::GET,
            &format!("/admin/v1/audit?tenant={slug}&limit=500"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body.as_array().unwrap().clone()
}

fn actions(entries: &[Value]) -> Vec<&str> {
    entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn a_new_credential_shows_its_password_once_and_silo_keeps_only_a_verifier_postgres_accepts()
{
    let env = TestEnv::setup().pg_public_address(FRONT_DOOR).start().await;
    env.create("northside").await;

    let made = create_credential(
        &env,
        "northside",
        json!({"name": "billing", "pool_mode": "transaction"}),
    )
    .await;
    let password = made["password"].as_str().unwrap().to_owned();
    assert!(
        password.len() >= 32 && password.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{password}"
    );
    assert_eq!(made["name"], "billing");
    assert_eq!(made["user"], "billing");
    assert_eq!(made["pool_mode"], "transaction");
    assert_eq!(made["read_only"], false);
    assert!(made["created_at"].is_string() && made["id"].is_string());
    assert!(made.get("verifier").is_none(), "{made}");
    assert_eq!(
        made["uri"],
        format!("postgres://billing:{password}@{FRONT_DOOR}/northside")
    );

    // Listed without its password or verifier; the default pool mode is session.
    create_credential(&env, "northside", json!({"name": "reports"})).await;
    let listed = list(&env, "northside").await;
    let items = listed["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{listed}");
    assert_eq!(items[0]["id"], made["id"]);
    assert_eq!(items[0]["pool_mode"], "transaction");
    assert_eq!(items[1]["name"], "reports");
    assert_eq!(items[1]["pool_mode"], "session");
    for item in items {
        let keys: Vec<&String> = item.as_object().unwrap().keys().collect();
        assert!(
            !keys
                .iter()
                .any(|k| ["password", "verifier", "uri"].contains(&k.as_str())),
            "{item}"
        );
    }
    assert!(!listed.to_string().contains(&password));

    // The control DB holds a SCRAM verifier, and the password nowhere (not
    // in the credential's row, not in the audit log).
    let verifier = verifier_of(&env, made["id"].as_str().unwrap()).await;
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    for row in stored_rows(&env).await {
        assert!(!row.contains(&password), "the password is stored: {row}");
    }
    // It is a verifier of that password: PostgreSQL lets it log in, and
    // nothing else.
    assert!(postgres_accepts(&env, &verifier, &password).await);
    assert!(!postgres_accepts(&env, &verifier, "not-the-password").await);

    // The creates are audited.
    let entries = audit(&env, "northside").await;
    assert_eq!(
        actions(&entries)
            .iter()
            .filter(|a| **a == "app_credential.create")
            .count(),
        2
    );
}

#[tokio::test]
async fn a_rotated_credential_logs_in_only_with_its_new_password_and_a_revoked_one_is_gone() {
    let env = TestEnv::setup().pg_public_address(FRONT_DOOR).start().await;
    env.create("eastside").await;
    let made = create_credential(&env, "eastside", json!({"name": "app"})).await;
    let id = made["id"].as_str().unwrap().to_owned();
    let old = made["password"].as_str().unwrap().to_owned();
    let item = format!("{}/{id}", credentials("eastside"));

    let (s, rotated) = env
        .call(Method::POST, &format!("{item}/rotate"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{rotated}");
    let new = rotated["password"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert_eq!(new.len(), old.len());
    assert_eq!(rotated["id"], made["id"]);
    assert_eq!(rotated["name"], "app");
    assert!(rotated["rotated_at"].is_string(), "{rotated}");
    assert_eq!(
        rotated["uri"],
        format!("postgres://app:{new}@{FRONT_DOOR}/eastside")
    );
    let verifier = verifier_of(&env, &id).await;
    assert!(postgres_accepts(&env, &verifier, &new).await);
    assert!(!postgres_accepts(&env, &verifier, &old).await);
    for row in stored_rows(&env).await {
        assert!(!row.contains(&new) && !row.contains(&old), "{row}");
    }

    // A live name is taken; revoked, it is free again.
    let (s, body) = env
        .call(
            Method::POST,
            &credentials("eastside"),
            Some(json!({"name": "app"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    let (s, body) = env.call(Method::DELETE, &item, None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(list(&env, "eastside").await["items"], json!([]));
    let (s, _) = env.call(Method::DELETE, &item, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = env
        .call(Method::POST, &format!("{item}/rotate"), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let revoked_at: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT revoked_at FROM app_credentials WHERE id = $1::uuid")
            .bind(&id)
            .fetch_one(env.registry().pool())
            .await
            .unwrap();
    assert!(revoked_at.is_some(), "the row is kept, revoked");

    let again = create_credential(&env, "eastside", json!({"name": "app"})).await;
    assert_ne!(again["id"], made["id"]);
    let listed = list(&env, "eastside").await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed["items"][0]["id"], again["id"]);

    let entries = audit(&env, "eastside").await;
    let done = actions(&entries);
    for action in [
        "app_credential.create",
        "app_credential.rotate",
        "app_credential.revoke",
    ] {
        assert!(done.contains(&action), "{action} in {done:?}");
    }
    // The rotate and revoke that found nothing audited nothing.
    assert_eq!(
        done.iter()
            .filter(|a| **a == "app_credential.rotate")
            .count(),
        1
    );
    assert_eq!(
        done.iter()
            .filter(|a| **a == "app_credential.revoke")
            .count(),
        1
    );
}

#[tokio::test]
async fn bad_requests_about_app_credentials_get_a_clear_4xx_and_change_nothing() {
    // The front door is off here: no URIs.
    let env = TestEnv::start().await;
    env.create("clinic").await;
    env.create("dormant").await;
    env.create("gone").await;
    let made = create_credential(&env, "clinic", json!({"name": "app"})).await;
    assert_eq!(made["uri"], Value::Null, "{made}");
    assert!(made["password"].is_string());
    let id = made["id"].as_str().unwrap().to_owned();
    let (s, body) = env
        .call(Method::POST, "/admin/v1/tenants/dormant/suspend", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, op) = env
        .call(Method::DELETE, "/admin/v1/tenants/gone", None)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    assert_eq!(wait_op(&env, &op).await["status"], "succeeded");

    let before = list(&env, "clinic").await;
    let creds = credentials("clinic");
    let unknown = uuid::Uuid::now_v7();
    let long = "a".repeat(64);
    let rows = vec![
        post(&creds)
            .json(json!({"name": "App"}))
            .is(422)
            .says("name must be"),
        post(&creds)
            .json(json!({"name": ""}))
            .is(422)
            .says("name must be"),
        post(&creds)
            .json(json!({"name": "1app"}))
            .is(422)
            .says("name must be"),
        post(&creds)
            .json(json!({"name": "ap p"}))
            .is(422)
            .says("name must be"),
        post(&creds)
            .json(json!({"name": long}))
            .is(422)
            .says("name must be"),
        post(&creds)
            .json(json!({"name": "reader", "read_only": "yes"}))
            .is(422),
        post(&creds)
            .json(json!({"name": "x", "pool_mode": "statement"}))
            .is(422),
        post(&creds)
            .json(json!({"name": "x", "password": "mine"}))
            .is(422)
            .says("password"),
        post(&creds).json(json!({})).is(422).says("name"),
        post(&creds).raw("{\"name\":").is(400),
        post(&creds)
            .json(json!({"name": "app"}))
            .is(409)
            .says("'app'"),
        post(credentials("nope")).json(json!({"name": "x"})).is(404),
        post(credentials("gone"))
            .json(json!({"name": "x"}))
            .is(404)
            .what("deleted tenant"),
        get(credentials("nope")).is(404),
        get(credentials("gone")).is(404),
        delete(format!("{creds}/not-a-uuid")).is(404),
        delete(format!("{creds}/{unknown}")).is(404),
        delete(format!("{}/{id}", credentials("nope"))).is(404),
        delete(format!("{}/{id}", credentials("dormant")))
            .is(404)
            .what("another tenant's"),
        post(format!("{creds}/not-a-uuid/rotate")).is(404),
        post(format!("{creds}/{unknown}/rotate")).is(404),
        post(format!("{}/{id}/rotate", credentials("dormant")))
            .is(404)
            .what("another tenant's"),
        get("/admin/v1/tenants/clinic/connection")
            .is(409)
            .says("front door is off"),
        get("/admin/v1/tenants/clinic/connection?direct=false").is(409),
        get("/admin/v1/tenants/clinic/connection?direct=maybe").is(422),
        get("/admin/v1/tenants/clinic/connection?verbose=true").is(422),
        get("/admin/v1/tenants/dormant/connection?direct=true")
            .is(409)
            .says("suspended"),
        get("/admin/v1/tenants/nope/connection?direct=true").is(404),
        get("/admin/v1/tenants/gone/connection?direct=true").is(404),
    ];
    table::run(&Client::admin(&env), rows, async || {
        let counts: (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM app_credentials),
                    (SELECT count(*) FROM app_credentials WHERE revoked_at IS NOT NULL OR rotated_at IS NOT NULL),
                    (SELECT count(*) FROM audit_log)",
        )
        .fetch_one(env.registry().pool())
        .await
        .unwrap();
        counts
    })
    .await;
    assert_eq!(list(&env, "clinic").await, before);

    // A tenant that is not active may get credentials ahead of its return.
    let ahead = create_credential(&env, "dormant", json!({"name": "app"})).await;
    assert_eq!(ahead["name"], "app");
    assert_eq!(list(&env, "dormant").await["items"][0]["id"], ahead["id"]);
}

#[tokio::test]
async fn the_connection_route_names_the_front_door_without_a_secret_and_direct_the_role_audited() {
    let env = TestEnv::setup().pg_public_address(FRONT_DOOR).start().await;
    env.create("westside").await;
    let t = env.record("westside").await;
    let role_password = env.password(&t);

    let (s, front) = env
        .call(Method::GET, "/admin/v1/tenants/westside/connection", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{front}");
    assert_eq!(
        front,
        json!({
            "uri": format!("postgres://{FRONT_DOOR}/westside"),
            "host": "db.clinics.test",
            "port": 6432,
            "database": "westside",
            "user": null,
        })
    );
    let (_, same) = env
        .call(
            Method::GET,
            "/admin/v1/tenants/westside/connection?direct=false",
            None,
        )
        .await;
    assert_eq!(same, front);
    let audited = audit(&env, "westside").await.len();

    let (s, direct) = env
        .call(
            Method::GET,
            "/admin/v1/tenants/westside/connection?direct=true",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{direct}");
    let uri = direct["uri"].as_str().unwrap();
    assert_eq!(
        uri,
        format!(
            "postgres://{}:{role_password}@127.0.0.1:{}/{}",
            t.role_name,
            env.pg.port(),
            t.database_name
        )
    );
    assert_eq!(direct["user"], t.role_name.as_str());
    assert_eq!(direct["database"], t.database_name.as_str());
    assert_eq!(direct["host"], "127.0.0.1");
    assert_eq!(direct["port"], env.pg.port());
    // The URI logs in as the tenant's role, on its database.
    let mut conn = sqlx::PgConnection::connect(uri).await.unwrap();
    let (user, db): (String, String) =
        sqlx::query_as("SELECT current_user::text, current_database()::text")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!((user, db), (t.role_name.clone(), t.database_name.clone()));
    close(conn).await;

    // Audited once (the front door's URI is not), with no secret.
    let entries = audit(&env, "westside").await;
    assert_eq!(entries.len(), audited + 1);
    assert_eq!(entries[0]["action"], "tenant.connection.direct");
    assert_eq!(entries[0]["actor"], "admin");
    assert_eq!(entries[0]["detail"]["role"], t.role_name.as_str());
    for row in stored_rows(&env).await {
        assert!(!row.contains(&role_password), "{row}");
    }

    // While the role's password is being rotated, which one works is not
    // known: no direct URI (and no audit entry).
    let sealed = env.keyring.seal(b"next-password", t.id.as_bytes());
    env.registry()
        .set_pending_password(t.id, &sealed, env.keyring.key_id())
        .await
        .unwrap();
    let (s, body) = env
        .call(
            Method::GET,
            "/admin/v1/tenants/westside/connection?direct=true",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("being rotated"));
    assert!(!body.to_string().contains(&role_password));
    assert_eq!(audit(&env, "westside").await.len(), audited + 1);
}
