//! The tenant router against real PostgreSQL servers: single-flight pool
//! creation, the per-server connection budget, eviction, invalidation across
//! processes, and failures that stay with one tenant.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{create_on, second_server, Silo, TestEnv};
use axum::http::{Method, StatusCode};
use silo::router::{RouteError, RouterConfig, TenantRouter};

async fn set_budget(env: &TestEnv, max: i32) {
    sqlx::query("UPDATE db_servers SET max_connections = $1")
        .bind(max)
        .execute(env.registry().pool())
        .await
        .unwrap();
}

async fn router_connections(env: &TestEnv) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'silo-router'",
    )
    .fetch_one(&env.admin)
    .await
    .unwrap()
}

async fn select_one(router: &TenantRouter, tenant: &str) -> Result<(), RouteError> {
    let mut conn = router.acquire(tenant).await?;
    sqlx::query("SELECT 1")
        .execute(&mut *conn)
        .await
        .expect("query on a routed connection");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_simultaneous_first_requests_build_one_pool() {
    let env = TestEnv::start().await;
    env.create("popular").await;
    let router = TenantRouter::new(
        env.registry().clone(),
        env.keyring.clone(),
        RouterConfig {
            acquire_timeout: Duration::from_secs(30),
            ..RouterConfig::default()
        },
    );
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let r = router.clone();
            tokio::spawn(async move { select_one(&r, "popular").await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let stats = router.stats();
    assert_eq!(stats.pools_built, 1, "{stats:?}");
    assert_eq!(
        stats.registry_lookups, 1,
        "one registry read for all 1000: {stats:?}"
    );
    let cap = 20; // the standard seed plan's connection limit
    assert!(stats.tenants[0].open <= cap, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn open_connections_never_exceed_the_server_budget() {
    let env = TestEnv::start().await;
    const BUDGET: i32 = 6;
    set_budget(&env, BUDGET).await;
    for i in 0..10 {
        env.create(&format!("tenant-{i}")).await;
    }
    let router = TenantRouter::new(
        env.registry().clone(),
        env.keyring.clone(),
        RouterConfig {
            acquire_timeout: Duration::from_secs(10),
            ..RouterConfig::default()
        },
    );
    let sampler = crate::common::MaxSampler::start(
        &env.admin,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'silo-router'",
    );
    let errors = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..40)
        .map(|w| {
            let (r, errors) = (router.clone(), errors.clone());
            tokio::spawn(async move {
                for i in 0..15 {
                    let tenant = format!("tenant-{}", (w * 7 + i) % 10);
                    match r.acquire(&tenant).await {
                        Ok(mut conn) => {
                            sqlx::query("SELECT pg_sleep(0.005)")
                                .execute(&mut *conn)
                                .await
                                .unwrap();
                            assert!(r.stats().servers.iter().all(|s| s.open <= BUDGET as usize));
                        }
                        Err(RouteError::Busy) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("unexpected routing error: {e}"),
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let max = sampler.finish().await;
    assert!(
        max <= BUDGET as i64,
        "pg_stat_activity saw {max} router connections over a budget of {BUDGET}"
    );
    assert!(max > 0);
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "idle connections of other tenants are reclaimed before anyone gives up"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exhausted_budget_answers_busy_then_reclaims_idle_connections() {
    let env = TestEnv::start().await;
    set_budget(&env, 2).await;
    env.create("hog").await;
    env.create("waiter").await;
    let router = TenantRouter::new(
        env.registry().clone(),
        env.keyring.clone(),
        RouterConfig {
            acquire_timeout: Duration::from_millis(300),
            ..RouterConfig::default()
        },
    );
    let a = router.acquire("hog").await.unwrap();
    let b = router.acquire("hog").await.unwrap();
    let started = Instant::now();
    assert!(matches!(
        router.acquire("waiter").await,
        Err(RouteError::Busy)
    ));
    assert!(started.elapsed() < Duration::from_secs(2));
    drop((a, b));
    // hog's connections are idle now; waiter takes one's place.
    select_one(&router, "waiter").await.unwrap();
    assert!(router_connections(&env).await <= 2);
    let (s, pools) = env.call(Method::GET, "/admin/v1/pools", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(pools["servers"].is_array());
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_pools_are_evicted_and_closed_after_work_in_flight_finishes() {
    let env = TestEnv::start().await;
    env.create("sleepy").await;
    let config = RouterConfig {
        pool_idle_ttl: Duration::from_millis(300),
        idle_connection_timeout: Duration::from_millis(400),
        ..RouterConfig::default()
    };
    let token = tokio_util::sync::CancellationToken::new();
    let router = TenantRouter::new(env.registry().clone(), env.keyring.clone(), config);
    router.spawn_maintenance(&token, &tokio_util::task::TaskTracker::new());
    let mut held = router.acquire("sleepy").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(router.stats().pools_open, 0, "the idle pool was evicted");
    assert!(router.stats().evictions >= 1);
    // The connection in use still works after eviction...
    sqlx::query("SELECT 1").execute(&mut *held).await.unwrap();
    drop(held);
    // ...and closes once returned.
    let deadline = Instant::now() + Duration::from_secs(5);
    while router_connections(&env).await > 0 {
        assert!(
            Instant::now() < deadline,
            "evicted pool's connection was not closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A new request builds a new pool.
    select_one(&router, "sleepy").await.unwrap();
    assert_eq!(router.stats().pools_built, 2);
    // Idle connections close on their own and give their budget back.
    let deadline = Instant::now() + Duration::from_secs(5);
    while router.stats().servers.iter().any(|s| s.open > 0) {
        assert!(Instant::now() < deadline, "idle connection was not closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    token.cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_whose_database_is_down_fails_alone_and_recovers() {
    let env = TestEnv::start().await;
    let mut second = second_server(&env).await;
    create_on(&env, "far-away", "second").await;
    env.create("nearby").await;
    let router = env.router.clone();
    select_one(&router, "far-away").await.unwrap();
    select_one(&router, "nearby").await.unwrap();

    second.stop().unwrap();
    // Its idle connection died with the server. Nothing is invalidated by
    // hand: either the router checks it before use and finds it dead, or
    // the first statement on it fails and the connection is discarded.
    match router.acquire("far-away").await {
        Ok(mut conn) => {
            let e = sqlx::query("SELECT 1")
                .execute(&mut *conn)
                .await
                .expect_err("the server is down");
            assert!(conn.failed(&e), "a dead connection is recognised: {e}");
        }
        Err(RouteError::TenantDown) => {}
        Err(e) => panic!("unexpected routing error: {e}"),
    }
    assert!(matches!(
        select_one(&router, "far-away").await,
        Err(RouteError::TenantDown)
    ));
    // In back-off: answered at once, without touching the dead server.
    let started = Instant::now();
    assert!(matches!(
        select_one(&router, "far-away").await,
        Err(RouteError::TenantDown)
    ));
    assert!(started.elapsed() < Duration::from_millis(100));
    // Everyone else is unaffected.
    for _ in 0..20 {
        select_one(&router, "nearby").await.unwrap();
    }
    second.start_again().unwrap();
    tokio::time::sleep(router.config().down_backoff + Duration::from_millis(100)).await;
    select_one(&router, "far-away").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn cached_tenants_keep_serving_while_the_control_database_is_down() {
    let mut env = TestEnv::setup()
        .router(RouterConfig {
            lookup_ttl: Duration::from_millis(200),
            ..RouterConfig::default()
        })
        .start()
        .await;
    let second = second_server(&env).await;
    create_on(&env, "resilient", "second").await;
    let router = env.router.clone();
    select_one(&router, "resilient").await.unwrap();

    env.pg.stop().unwrap(); // the control database (and default server) goes away
    tokio::time::sleep(Duration::from_millis(300)).await; // past the lookup TTL
    for _ in 0..5 {
        select_one(&router, "resilient")
            .await
            .expect("a cached tenant keeps serving");
    }
    assert!(matches!(
        select_one(&router, "never-seen").await,
        Err(RouteError::ControlDown(_))
    ));
    env.pg.start_again().unwrap();
    drop(second);
}

#[tokio::test(flavor = "multi_thread")]
async fn suspension_and_rotation_reach_another_silo_process_at_once() {
    let env = TestEnv::start().await;
    env.create("shared").await;
    let (_, token) = env
        .call(Method::POST, "/admin/v1/tenants/shared/tokens", None)
        .await;
    let token = token["token"].as_str().unwrap().to_owned();
    let logs = tempfile::tempdir().unwrap();
    let other = Silo::start(&env, None, 0, &logs.path().join("other.log")).await;
    let client = reqwest::Client::new();
    let get = || {
        client
            .get(format!("{}/api/v1/patients", other.base))
            .header("x-tenant-id", "shared")
            .bearer_auth(&token)
            .send()
    };
    assert_eq!(get().await.unwrap().status(), 200);

    // Rotation under load in the other process: no request fails but those
    // carrying a token the rotation revoked (404, by design); the app takes a
    // new token after each rotation, and requests with it never fail while
    // the other process's pool switches to the new password.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let current = Arc::new(std::sync::Mutex::new((0usize, token.clone())));
    let load = {
        let (stop, base, current) = (stop.clone(), other.base.clone(), current.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (generation, token) = current.lock().unwrap().clone();
                let r = client
                    .get(format!("{base}/api/v1/patients"))
                    .header("x-tenant-id", "shared")
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
                answers.push((generation, r.status().as_u16()));
            }
            answers
        })
    };
    let id = env.record("shared").await.id;
    for round in 1..=3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        env.control
            .provisioner()
            .rotate_credentials(id, "test")
            .await
            .unwrap();
        let (_, fresh) = env
            .call(Method::POST, "/admin/v1/tenants/shared/tokens", None)
            .await;
        *current.lock().unwrap() = (round, fresh["token"].as_str().unwrap().to_owned());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let answers = load.await.unwrap();
    let failed: Vec<_> = answers
        .iter()
        .filter(|(generation, status)| *status != 200 && !(*status == 404 && *generation < 3))
        .collect();
    assert!(
        failed.is_empty(),
        "requests failed during rotation: {failed:?} ({} answers)",
        answers.len()
    );
    let ok_with_last = answers.iter().filter(|(g, s)| *g == 3 && *s == 200).count();
    assert!(
        ok_with_last > 10,
        "{ok_with_last} requests with the newest token"
    );
    // Suspension: the other process answers 423 almost at once (NOTIFY), not
    // after a TTL. (The suspend revokes every token: a new one sees the lock.)
    let (s, _) = env
        .call(Method::POST, "/admin/v1/tenants/shared/suspend", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, fresh) = env
        .call(Method::POST, "/admin/v1/tenants/shared/tokens", None)
        .await;
    let token = fresh["token"].as_str().unwrap().to_owned();
    let get = || {
        client
            .get(format!("{}/api/v1/patients", other.base))
            .header("x-tenant-id", "shared")
            .bearer_auth(&token)
            .send()
    };

    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let status = get().await.unwrap().status();
        if status == 423 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other process still answers {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    other.stop();
}
