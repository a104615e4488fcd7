//! Crash safety with real processes: `silo serve` is aborted (like kill -9) at
//! every provisioning and delete step through `SILO_FAILPOINT`, restarted, and
//! the system must converge: the tenant ends active and serving (or deleted),
//! no orphan database or role is left, and a retried request succeeds.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::common::{close, Silo, TestEnv, ADMIN_TOKEN};
use serde_json::json;
use silo::provision::STEPS;

async fn assert_serving(env: &TestEnv, slug: &str) {
    let t = env.record(slug).await;
    assert_eq!(
        t.status,
        silo::registry::TenantStatus::Active,
        "{slug}: {t:?}"
    );
    assert_eq!(
        t.schema_version,
        Some(silo::servers::schema::latest_embedded_version())
    );
    let mut conn = env
        .connect_tenant(slug)
        .await
        .unwrap_or_else(|e| panic!("{slug} cannot log in: {e}"));
    sqlx::query("INSERT INTO clinics (name) VALUES ('Main')")
        .execute(&mut conn)
        .await
        .unwrap();
    close(conn).await;
    let rows = env
        .count(&format!(
            "SELECT count(*) FROM tenants WHERE slug = '{slug}'"
        ))
        .await;
    assert_eq!(rows, 1, "{slug} was created exactly once");
}

async fn assert_no_orphans(env: &TestEnv, after: &str) {
    // The start-up reconcile pass runs in the background; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let orphans = env.orphans().await;
        if orphans.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{after}: orphans left: {orphans:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn log_path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(format!("{name}.log"))
}

#[tokio::test(flavor = "multi_thread")]
async fn provisioning_killed_at_every_step_converges_after_restart() {
    let env = TestEnv::start().await;
    let logs = tempfile::tempdir().unwrap();
    // With a warm pool (spare renamed into place) and without (template clone).
    for (warm_pool, retry_with_key) in [(1u32, true), (0u32, false)] {
        for step in STEPS {
            let slug = format!("crash-{warm_pool}-{step}");
            let key = format!("key-{slug}");
            let log = log_path(&logs, &slug);
            let silo = Silo::start(&env, Some(step.as_str()), warm_pool, &log).await;
            let body = json!({"slug": slug, "name": "Crash Clinic"});
            let first = silo
                .request(
                    reqwest::Method::POST,
                    "/admin/v1/tenants",
                    Some(body.clone()),
                    Some(&key),
                )
                .await;
            assert!(
                first.is_err(),
                "step {step}: the process should die before answering, got {first:?}"
            );
            silo.expect_abort();

            let silo = Silo::start(&env, None, warm_pool, &log).await;
            if retry_with_key {
                // The client retries with the same key: same tenant, finished.
                let (status, t) = silo
                    .request(
                        reqwest::Method::POST,
                        "/admin/v1/tenants",
                        Some(body),
                        Some(&key),
                    )
                    .await
                    .unwrap();
                assert_eq!(status, 201, "step {step}: retry should succeed: {t}");
                assert_eq!(t["status"], "active");
            } else {
                // No retry: the reconciler alone finishes the tenant.
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    // Every failpoint comes after the row is committed, so the
                    // reconciler always has a row to finish.
                    let t = env.registry().find_tenant(&slug).await.unwrap();
                    if t.is_some_and(|t| t.status == silo::registry::TenantStatus::Active) {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "step {step}: reconciler did not finish the tenant"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            assert_serving(&env, &slug).await;
            assert_no_orphans(&env, &slug).await;
            silo.stop();
        }
    }
    assert_no_secrets_in_logs(&env, &logs).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delete_killed_midway_is_finished_after_restart() {
    let env = TestEnv::start().await;
    let logs = tempfile::tempdir().unwrap();
    for step in ["delete_database", "delete_role"] {
        let slug = format!("gone-{}", step.replace('_', "-"));
        let log = log_path(&logs, &slug);
        let silo = Silo::start(&env, Some(step), 0, &log).await;
        let (status, _) = silo
            .request(
                reqwest::Method::POST,
                "/admin/v1/tenants",
                Some(json!({"slug": slug, "name": "Gone"})),
                None,
            )
            .await
            .unwrap();
        assert_eq!(status, 201);
        let t = env.record(&slug).await;
        let (status, op) = silo
            .request(
                reqwest::Method::DELETE,
                &format!("/admin/v1/tenants/{slug}"),
                None,
                None,
            )
            .await
            .unwrap();
        assert_eq!(status, 202, "{op}");
        silo.expect_abort();
        assert_eq!(
            env.registry().tenant(t.id).await.unwrap().unwrap().status,
            silo::registry::TenantStatus::Deleting
        );

        let silo = Silo::start(&env, None, 0, &log).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, op) = silo
                .request(
                    reqwest::Method::GET,
                    &format!("/admin/v1/operations/{}", op["id"].as_str().unwrap()),
                    None,
                    None,
                )
                .await
                .unwrap();
            if op["status"] == "succeeded" {
                break;
            }
            assert_ne!(op["status"], "failed", "{op}");
            assert!(Instant::now() < deadline, "delete was not finished: {op}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!env.database_exists(&t.database_name).await);
        assert!(!env.role_exists(&t.role_name).await);
        assert_eq!(
            env.registry().tenant(t.id).await.unwrap().unwrap().status,
            silo::registry::TenantStatus::Deleted
        );
        assert_no_orphans(&env, &slug).await;
        silo.stop();
    }
    assert_no_secrets_in_logs(&env, &logs).await;
}

/// No tenant password, admin token, master key or server password in any log line.
async fn assert_no_secrets_in_logs(env: &TestEnv, logs: &tempfile::TempDir) {
    let mut secrets = vec![
        ("the admin token".to_owned(), ADMIN_TOKEN.to_owned()),
        ("the master key".to_owned(), env.master_key.clone()),
        ("the server password".to_owned(), env.superuser_password()),
    ];
    let tenants = env.registry().list_tenants(None, None, 500).await;
    for t in tenants.expect("list the tenants") {
        secrets.push((format!("{}'s password", t.slug), env.password(&t)));
    }
    let mut read = 0;
    for entry in std::fs::read_dir(logs.path()).unwrap() {
        let path = entry.unwrap().path();
        // Lossy: a process aborted mid-line may leave a torn character.
        let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
        read += text.len();
        for (what, secret) in &secrets {
            assert!(secret.len() >= 8, "{what} is too short to look for");
            if let Some(line) = text.lines().find(|l| l.contains(secret.as_str())) {
                let shown = line.replace(secret.as_str(), "<the secret>");
                panic!("{what} appears in {}: {shown}", path.display());
            }
        }
    }
    assert!(read > 0, "the processes wrote logs");
}
