//! Credential rotation that survives a crash at any step: the router serves
//! through a rotation left half-way, the reconciler finishes it, and a
//! `silo serve` killed at each step serves again after a restart.

use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};

use crate::common::{Silo, TestEnv};

async fn token(env: &TestEnv, slug: &str) -> String {
    format!("Bearer {}", env.app_token(slug).await)
}

async fn app_status(env: &TestEnv, slug: &str, bearer: &str) -> StatusCode {
    env.send(
        Method::GET,
        "/api/v1/patients?limit=1",
        None,
        &[("x-tenant-id", slug), ("authorization", bearer)],
    )
    .await
    .status
}

/// Leave a tenant as a rotation killed after `step` would: a pending
/// password recorded and, past `rotate_pending`, given to the role.
async fn half_rotate(env: &TestEnv, slug: &str, role_changed: bool) -> String {
    let t = env.record(slug).await;
    let password = "half-rotated-password-0123456789";
    let sealed = env.keyring.seal(password.as_bytes(), t.id.as_bytes());
    env.registry()
        .set_pending_password(t.id, &sealed, env.keyring.key_id())
        .await
        .unwrap();
    if role_changed {
        sqlx::raw_sql(&format!(
            "ALTER ROLE \"{}\" PASSWORD '{password}'",
            t.role_name
        ))
        .execute(&env.admin)
        .await
        .unwrap();
    }
    password.to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_router_serves_through_a_half_done_rotation_and_the_reconciler_finishes_it() {
    let env = TestEnv::start().await;
    for (slug, role_changed) in [("before-alter", false), ("after-alter", true)] {
        env.create(slug).await;
        let bearer = token(&env, slug).await;
        assert_eq!(app_status(&env, slug, &bearer).await, StatusCode::OK);
        let pending = half_rotate(&env, slug, role_changed).await;
        // Pools built before are stale either way: start from nothing.
        env.router.invalidate(env.record(slug).await.id).await;
        // No reconcile pass yet: the router finds a password that works.
        for _ in 0..5 {
            assert_eq!(
                app_status(&env, slug, &bearer).await,
                StatusCode::OK,
                "{slug}"
            );
        }
        let report = env.control.reconcile_once().await.unwrap();
        assert!(report.errors.is_empty(), "{report:?}");
        assert_eq!(report.rotations_finished, 1, "{slug}: {report:?}");
        let t = env.record(slug).await;
        assert!(t.pending_password_enc.is_none(), "{slug}");
        // The recorded password is the rotation's, and the role has it.
        assert_eq!(env.password(&t), pending, "{slug}");
        crate::common::close(env.connect_tenant(slug).await.unwrap()).await;
        // Tokens minted before the rotation are refused (as if the tenant
        // did not exist for them) once the router has heard of it (the
        // change reaches it by NOTIFY, which a busy machine may delay);
        // new ones serve.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while app_status(&env, slug, &bearer).await != StatusCode::NOT_FOUND {
            assert!(
                std::time::Instant::now() < deadline,
                "{slug}: the old token is still served"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let fresh = token(&env, slug).await;
        assert_eq!(
            app_status(&env, slug, &fresh).await,
            StatusCode::OK,
            "{slug}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_ends_the_sessions_opened_with_the_old_password() {
    let env = TestEnv::start().await;
    env.create("leaky").await;
    // Someone holds the old password and an open session.
    let mut stolen = env.connect_tenant("leaky").await.unwrap();
    let (s, body) = env
        .call(
            Method::POST,
            "/admin/v1/tenants/leaky/credentials/rotate",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let gone = sqlx::query("SELECT 1").execute(&mut stolen).await;
    assert!(gone.is_err(), "the old session was ended");
    let t = env.record("leaky").await;
    assert!(t.pending_password_enc.is_none());
    crate::common::close(env.connect_tenant("leaky").await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_killed_at_each_step_serves_after_restart() {
    let env = TestEnv::start().await;
    let logs = tempfile::tempdir().unwrap();
    for step in [
        "rotate_pending",
        "rotate_password",
        "rotate_sessions",
        "rotate_promoted",
    ] {
        let slug = step.replace('_', "-");
        let log = logs.path().join(format!("{slug}.log"));
        let silo = Silo::start(&env, Some(step), 0, &log).await;
        let (s, body) = silo
            .request(
                reqwest::Method::POST,
                "/admin/v1/tenants",
                Some(serde_json::json!({"slug": slug, "name": "Rotated"})),
                None,
            )
            .await
            .unwrap();
        assert_eq!(s, 201, "{body}");
        let (s, body) = silo
            .request(
                reqwest::Method::POST,
                &format!("/admin/v1/tenants/{slug}/tokens"),
                None,
                None,
            )
            .await
            .unwrap();
        assert_eq!(s, 201, "{step}: {body}");
        let before = format!("Bearer {}", body["token"].as_str().unwrap());
        let rotate = silo
            .request(
                reqwest::Method::POST,
                &format!("/admin/v1/tenants/{slug}/credentials/rotate"),
                None,
                None,
            )
            .await;
        assert!(rotate.is_err(), "{step}: the process died mid-request");
        silo.expect_abort();

        // Restarted: the start-up reconcile pass finishes the rotation.
        let silo = Silo::start(&env, None, 0, &log).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let t = env.record(&slug).await;
            if t.pending_password_enc.is_none() {
                break;
            }
            assert!(Instant::now() < deadline, "{step}: rotation never finished");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (s, body) = silo
            .request(
                reqwest::Method::POST,
                &format!("/admin/v1/tenants/{slug}/tokens"),
                None,
                None,
            )
            .await
            .unwrap();
        assert_eq!(s, 201, "{step}: {body}");
        let bearer = format!("Bearer {}", body["token"].as_str().unwrap());
        let res = reqwest::Client::new()
            .get(format!("{}/api/v1/patients?limit=1", silo.base))
            .header("x-tenant-id", &slug)
            .header("authorization", &bearer)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 200, "{step}: the tenant serves");
        // A token minted before the rotation is refused, however it ended.
        let res = reqwest::Client::new()
            .get(format!("{}/api/v1/patients?limit=1", silo.base))
            .header("x-tenant-id", &slug)
            .header("authorization", &before)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 404, "{step}: the old token");
        // The recorded password is the one the role has.
        crate::common::close(env.connect_tenant(&slug).await.unwrap()).await;
        silo.stop();
    }
}
