//! The database going away: silo answers 503 (not 500), then recovers alone.

use crate::common::TestEnv;
use axum::http::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn a_stopped_database_gets_503_and_silo_recovers_when_it_returns() {
    let mut env = TestEnv::start().await;
    env.create("before").await;
    env.pg.stop().unwrap();

    let (s, p) = env.call_with(Method::GET, "/readyz", None, &[]).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{p}");
    let (s, p) = env
        .call(
            Method::POST,
            "/admin/v1/tenants",
            Some(json!({"slug": "during", "name": "x"})),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{p}");
    assert_eq!(p["status"], 503);
    let (s, _) = env
        .call(Method::GET, "/admin/v1/tenants/before", None)
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let (s, _) = env.call_with(Method::GET, "/healthz", None, &[]).await;
    assert_eq!(s, StatusCode::OK, "the process itself is alive");

    env.pg.start_again().unwrap();
    let (s, _) = env.call_with(Method::GET, "/readyz", None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    env.create("after").await;
    assert_eq!(
        env.count("SELECT count(*) FROM tenants WHERE slug = 'during'")
            .await,
        0
    );
    assert!(env.orphans().await.is_empty());
}
