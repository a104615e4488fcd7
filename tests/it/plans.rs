//! Plans as data: CRUD through the API and the shell, a plan change applied
//! to every tenant of the plan at once, the clinic API's plan limits (422 at
//! the limit and not before, under concurrency too), a plan's request rate,
//! tenant settings read by the app, and trials suspended once by one of
//! three replicas and lifted by a plan change.

use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::common::{Silo, TestEnv};

/// The tenant role's connection limit as PostgreSQL has it.
async fn role_limit(env: &TestEnv, slug: &str) -> i32 {
    let t = env.record(slug).await;
    sqlx::query_scalar("SELECT rolconnlimit FROM pg_roles WHERE rolname = $1")
        .bind(&t.role_name)
        .fetch_one(&env.admin)
        .await
        .unwrap()
}

async fn create_on_plan(env: &TestEnv, slug: &str, plan: &str) -> Value {
    let (status, body) = env
        .call(
            Method::POST,
            "/admin/v1/tenants",
            Some(json!({"slug": slug, "name": format!("Clinic {slug}"), "plan": plan})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body
}

async fn make_plan(env: &TestEnv, body: Value) {
    let (status, made) = env
        .call(Method::POST, "/admin/v1/plans", Some(body.clone()))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}: {made}");
}

/// One app API request of `slug` with `token`.
async fn app(
    env: &TestEnv,
    token: &str,
    slug: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    env.call_with(
        method,
        path,
        body,
        &[
            ("authorization", &format!("Bearer {token}")),
            ("x-tenant-id", slug),
        ],
    )
    .await
}

/// Poll `check` until it holds (a change reaches the routers by NOTIFY).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "{what} did not happen in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn plans_are_data_and_a_change_applies_to_every_tenant_of_the_plan() {
    let env = TestEnv::start().await;

    // The three plans silo had are seed rows, with the same limits.
    let (status, list) = env.call(Method::GET, "/admin/v1/plans", None).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let limits: Vec<(String, i64)> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["connection_limit"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        limits,
        [
            ("free".to_owned(), 5),
            ("premium".to_owned(), 50),
            ("standard".to_owned(), 20)
        ]
    );

    make_plan(
        &env,
        json!({"name": "small", "connection_limit": 3, "max_staff": 2, "trial_days": 30}),
    )
    .await;
    // Bad plans: a clear 4xx, and no plan made.
    for (body, want) in [
        (json!({"name": "small", "connection_limit": 3}), 409),
        (json!({"name": "tiny"}), 422),
        (json!({"name": "Tiny", "connection_limit": 3}), 422),
        (json!({"name": "tiny", "connection_limit": 0}), 422),
        (
            json!({"name": "tiny", "connection_limit": 3, "storage_quota_bytes": 10}),
            422,
        ),
        (
            json!({"name": "tiny", "connection_limit": 3, "trial_days": 0}),
            422,
        ),
        (
            json!({"name": "tiny", "connection_limit": 3, "backup_schedule": "tomorrow"}),
            422,
        ),
        (
            json!({"name": "tiny", "connection_limit": 3, "colour": "red"}),
            422,
        ),
        (json!({"name": "tiny", "connection_limit": "three"}), 422),
    ] {
        let (status, answer) = env
            .call(Method::POST, "/admin/v1/plans", Some(body.clone()))
            .await;
        assert_eq!(status.as_u16(), want, "{body}: {answer}");
        assert!(answer["detail"].is_string(), "{answer}");
    }
    let (status, _) = env.call(Method::GET, "/admin/v1/plans/tiny", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = env
        .call(Method::GET, "/admin/v1/plans/NOT%20A%20PLAN", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A tenant on the new plan: its role has the plan's limit, and its
    // trial clock runs from its creation.
    let made = create_on_plan(&env, "smallclinic", "small").await;
    assert_eq!(made["plan"], "small");
    let expires: DateTime<Utc> = serde_json::from_value(made["expires_at"].clone()).unwrap();
    let days = (expires - Utc::now()).num_hours();
    assert!((29 * 24..=30 * 24).contains(&days), "{made}");
    assert_eq!(role_limit(&env, "smallclinic").await, 3);
    // The router's pool of it is capped by the plan too (one replica: all of it).
    let token = env.app_token("smallclinic").await;
    let t = env.record("smallclinic").await;
    let cap = || {
        env.router
            .stats()
            .tenants
            .iter()
            .find(|p| p.tenant_id == t.id)
            .map(|p| p.cap)
    };
    // An app request makes the router build (or rebuild) the tenant's pool.
    let list_patients = || {
        app(
            &env,
            &token,
            "smallclinic",
            Method::GET,
            "/api/v1/patients",
            None,
        )
    };
    let (status, body) = list_patients().await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(cap(), Some(3));
    let (status, body) = env
        .call(
            Method::POST,
            "/admin/v1/tenants",
            Some(json!({"slug": "noplan", "name": "No Plan", "plan": "gold"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("gold"), "{body}");
    assert!(env
        .registry()
        .find_tenant("noplan")
        .await
        .unwrap()
        .is_none());

    // A change of the plan applies to its tenants' roles before it answers.
    let (status, changed) = env
        .call(
            Method::PATCH,
            "/admin/v1/plans/small",
            Some(json!({"connection_limit": 7, "trial_days": null})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    assert_eq!(
        (
            &changed["connection_limit"],
            &changed["trial_days"],
            &changed["max_staff"]
        ),
        (&json!(7), &Value::Null, &json!(2)),
        "a field left out is kept, null clears"
    );
    assert_eq!(changed["tenants"], 1);
    assert_eq!(role_limit(&env, "smallclinic").await, 7);
    // Every router hears of it: the pool is rebuilt with the new cap.
    eventually("the router's pool to take the plan's new cap", || async {
        let (status, _) = list_patients().await;
        status == StatusCode::OK && cap() == Some(7)
    })
    .await;
    let (status, body) = env
        .call(
            Method::PATCH,
            "/admin/v1/plans/small",
            Some(json!({"name": "renamed"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    // A plan in use cannot be deleted; once its tenants moved, it can.
    let (status, body) = env
        .call(Method::DELETE, "/admin/v1/plans/small", None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = env
        .call(
            Method::PATCH,
            "/admin/v1/tenants/smallclinic",
            Some(json!({"plan": "premium"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(role_limit(&env, "smallclinic").await, 50);
    let (status, body) = env
        .call(Method::DELETE, "/admin/v1/plans/small", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, _) = env.call(Method::GET, "/admin/v1/plans/small", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The default plan stays, with or without tenants.
    let (status, body) = env
        .call(Method::DELETE, "/admin/v1/plans/standard", None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, _) = env.call(Method::DELETE, "/admin/v1/plans/free", None).await;
    assert_eq!(
        status,
        StatusCode::NO_CONTENT,
        "a seed plan without tenants may go"
    );

    // The audit log says what changed.
    let (_, updates) = env
        .call(Method::GET, "/admin/v1/audit?action=plan.update", None)
        .await;
    assert_eq!(
        updates[0]["detail"],
        json!({"plan": "small", "fields": {"connection_limit": 7, "trial_days": null}})
    );

    let (_, audit) = env
        .call(Method::GET, "/admin/v1/audit?limit=100", None)
        .await;
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .filter(|a| a.starts_with("plan."))
        .collect();
    for action in ["plan.create", "plan.update", "plan.delete"] {
        assert!(actions.contains(&action), "{action} in {actions:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn clinic_plan_limits_answer_422_at_the_limit_and_not_before() {
    let env = TestEnv::start().await;
    make_plan(
        &env,
        json!({"name": "practice", "connection_limit": 10, "max_staff": 2, "max_patients": 3}),
    )
    .await;
    create_on_plan(&env, "practice-a", "practice").await;
    let token = env.app_token("practice-a").await;
    let staff = |n: usize| json!({"full_name": format!("Dr {n}"), "role": "doctor"});

    for n in 0..2 {
        let (status, body) = app(
            &env,
            &token,
            "practice-a",
            Method::POST,
            "/api/v1/staff",
            Some(staff(n)),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "staff {n}: {body}");
    }
    let (status, body) = app(
        &env,
        &token,
        "practice-a",
        Method::POST,
        "/api/v1/staff",
        Some(staff(2)),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("max_staff") && detail.contains('2'),
        "{detail}"
    );

    // Eight at once against a limit of three: exactly three get in.
    let tries = (0..8).map(|n| {
        let (env, token) = (&env, &token);
        async move {
            app(
                env,
                token,
                "practice-a",
                Method::POST,
                "/api/v1/patients",
                Some(json!({"full_name": format!("Patient {n}")})),
            )
            .await
        }
    });
    let answers = futures::future::join_all(tries).await;
    let created = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .count();
    let refused: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::UNPROCESSABLE_ENTITY)
        .map(|(_, b)| b)
        .collect();
    assert_eq!((created, refused.len()), (3, 5), "{answers:?}");
    assert!(refused
        .iter()
        .all(|b| b["detail"].as_str().unwrap().contains("max_patients")));
    let mut db = env.connect_tenant("practice-a").await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM patients")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(rows, 3);

    // A larger plan lets more in (once the routers have heard of it).
    let (status, body) = env
        .call(
            Method::PATCH,
            "/admin/v1/plans/practice",
            Some(json!({"max_patients": 4})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually("the larger plan to reach the router", || async {
        let (_, s) = app(
            &env,
            &token,
            "practice-a",
            Method::GET,
            "/api/v1/settings",
            None,
        )
        .await;
        s["max_patients"] == 4
    })
    .await;
    let (status, body) = app(
        &env,
        &token,
        "practice-a",
        Method::POST,
        "/api/v1/patients",
        Some(json!({"full_name": "Patient 9"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, _) = app(
        &env,
        &token,
        "practice-a",
        Method::POST,
        "/api/v1/patients",
        Some(json!({"full_name": "Patient 10"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    crate::common::close(db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plan_s_request_rate_answers_429_with_retry_after_and_spares_other_plans() {
    // Refusals sent at once: a held one would let the next request in.
    let limits = silo::api::limits::HttpLimits {
        app_rate_burst: 3,
        app_refusal_hold: Duration::ZERO,
        ..Default::default()
    };
    let env = TestEnv::setup().limits(limits).start().await;
    make_plan(
        &env,
        json!({"name": "slow", "connection_limit": 5, "requests_per_second": 1}),
    )
    .await;
    create_on_plan(&env, "slowpoke", "slow").await;
    env.create("speedy").await;
    let (slow, fast) = (
        env.app_token("slowpoke").await,
        env.app_token("speedy").await,
    );

    let mut answers = Vec::new();
    for _ in 0..8 {
        answers.push(
            env.send(
                Method::GET,
                "/api/v1/settings",
                None,
                &[
                    ("authorization", &format!("Bearer {slow}")),
                    ("x-tenant-id", "slowpoke"),
                ],
            )
            .await,
        );
    }
    let limited: Vec<_> = answers
        .iter()
        .filter(|a| a.status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    // The burst of 3 gets in, then 429s (one more may get in per second
    // the eight requests take, on a busy machine).
    let statuses: Vec<StatusCode> = answers.iter().map(|a| a.status).collect();
    assert!(
        statuses[..3].iter().all(|s| *s == StatusCode::OK) && limited.len() >= 3,
        "{statuses:?}"
    );
    let first = limited[0];
    assert!(first
        .retry_after
        .as_deref()
        .is_some_and(|s| s.parse::<u64>().is_ok_and(|n| n >= 1)));
    assert!(
        first.body["detail"].as_str().unwrap().contains("plan"),
        "{}",
        first.body
    );
    // Another plan's tenant is not affected.
    for _ in 0..3 {
        let (status, body) =
            app(&env, &fast, "speedy", Method::GET, "/api/v1/settings", None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_are_set_by_the_operator_and_read_by_the_app() {
    let env = TestEnv::start().await;
    env.create("featured").await;
    let token = env.app_token("featured").await;
    let (status, before) = app(
        &env,
        &token,
        "featured",
        Method::GET,
        "/api/v1/settings",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{before}");
    assert_eq!(
        before,
        json!({"plan": "standard", "max_staff": null, "max_patients": null,
               "read_only": false, "settings": {}})
    );

    let settings = json!({"features": {"sms_reminders": true}, "theme": "teal"});
    let (status, body) = env
        .call(
            Method::PATCH,
            "/admin/v1/tenants/featured",
            Some(json!({"settings": settings})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["settings"], settings);
    eventually("the settings to reach the router", || async {
        let (_, s) = app(
            &env,
            &token,
            "featured",
            Method::GET,
            "/api/v1/settings",
            None,
        )
        .await;
        s["settings"] == settings
    })
    .await;

    // Bad settings or expiry: 422, nothing changed.
    let big = json!({"blob": "x".repeat(17 * 1024)});
    for body in [
        json!({"settings": [1, 2]}),
        json!({"settings": "on"}),
        json!({"settings": big}),
        json!({"settings": {"a\u{0}b": 1}}),
        json!({"settings": {"nested": ["ok", "not\u{0}ok"]}}),
        json!({"expires_at": "next tuesday"}),
        json!({"plan": "gold"}),
    ] {
        let (status, answer) = env
            .call(
                Method::PATCH,
                "/admin/v1/tenants/featured",
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
    }
    let t = env.record("featured").await;
    assert_eq!((t.settings, t.plan.as_str()), (settings, "standard"));
    assert_eq!(t.expires_at, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trial_tenant_is_suspended_once_by_one_of_three_replicas_and_a_plan_change_lifts_it() {
    let env = TestEnv::start().await;
    make_plan(
        &env,
        json!({"name": "trial", "connection_limit": 5, "trial_days": 14}),
    )
    .await;
    create_on_plan(&env, "trying", "trial").await;
    env.create("paying").await;

    let logs = tempfile::tempdir().unwrap();
    let extra = [("SILO_SCHEDULER_TICK", "1")];
    let mut replicas = Vec::new();
    for i in 0..3 {
        let log = logs.path().join(format!("replica-{i}.log"));
        replicas.push(Silo::start_with(&env, None, 0, &log, &extra).await);
    }

    // Its trial ends (an operator moves the date; the clock would too).
    let ended = (Utc::now() - chrono::Duration::seconds(1)).to_rfc3339();
    let (status, body) = env
        .call(
            Method::PATCH,
            "/admin/v1/tenants/trying",
            Some(json!({"expires_at": ended})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Suspended in the registry first, then its role may not log in.
    eventually("the expired trial to be suspended", || async {
        env.record("trying").await.status == silo::registry::TenantStatus::Suspended
            && env.connect_tenant("trying").await.is_err()
    })
    .await;
    // Give every replica several more ticks to do it again, then count.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, expired) = env
        .call(Method::GET, "/admin/v1/audit?action=tenant.expire", None)
        .await;
    let entries = expired.as_array().unwrap();
    assert_eq!(entries.len(), 1, "{expired}");
    assert_eq!(entries[0]["actor"], "scheduler");
    assert_eq!(
        env.record("paying").await.status,
        silo::registry::TenantStatus::Active
    );

    // Resuming does not lift an ended trial; a plan without one does.
    let (status, body) = env
        .call(Method::POST, "/admin/v1/tenants/trying/resume", None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("trial"), "{body}");
    let (status, body) = env
        .call(
            Method::PATCH,
            "/admin/v1/tenants/trying",
            Some(json!({"plan": "standard"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (&body["status"], &body["expires_at"], &body["plan"]),
        (&json!("active"), &Value::Null, &json!("standard"))
    );
    let again = env
        .connect_tenant("trying")
        .await
        .expect("it may log in again");
    crate::common::close(again).await;
    // The replicas leave it alone now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        env.record("trying").await.status,
        silo::registry::TenantStatus::Active
    );
    for r in replicas {
        r.stop();
    }
}

/// `silo` with the environment of `env`.
fn silo_cli(env: &TestEnv, args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_silo"))
        .args(args)
        .env_remove("SILO_FAILPOINT")
        .envs(env.silo_env())
        .output()
        .expect("run silo");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_commands_work_from_a_shell() {
    let env = TestEnv::start().await;
    let (code, out, err) = silo_cli(
        &env,
        &[
            "plans",
            "create",
            "clinic-pro",
            "--connection-limit",
            "12",
            "--max-staff",
            "40",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let made: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&made["connection_limit"], &made["max_staff"]),
        (&json!(12), &json!(40))
    );

    let (code, out, err) = silo_cli(
        &env,
        &[
            "plans",
            "set",
            "clinic-pro",
            "--connection-limit",
            "15",
            "--clear",
            "max_staff",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let set: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&set["connection_limit"], &set["max_staff"]),
        (&json!(15), &Value::Null)
    );

    let (code, out, _) = silo_cli(&env, &["plans", "list"]);
    assert_eq!(code, Some(0));
    assert_eq!(out.lines().count(), 4, "{out}");
    // Mistakes exit 2 with a message, and change nothing.
    for args in [
        &["plans", "set", "clinic-pro", "--clear", "name"][..],
        &["plans", "create", "clinic-pro", "--connection-limit", "3"][..],
        &["plans", "show", "gold"][..],
        &["plans", "delete", "gold"][..],
    ] {
        let (code, _, err) = silo_cli(&env, args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{err}");
    }
    let (code, _, err) = silo_cli(&env, &["plans", "delete", "clinic-pro"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(env
        .registry()
        .plan(&"clinic-pro".parse().unwrap())
        .await
        .unwrap()
        .is_none());
    let (_, audit) = env
        .call(Method::GET, "/admin/v1/audit?action=plan.update", None)
        .await;
    assert_eq!(audit[0]["actor"], "cli", "{audit}");
}

/// A tenant role may alter itself, and so hold its own catalog row locked
/// in an open transaction for as long as it likes. Silo's changes to roles
/// must not wait on it: a plan change sets every other tenant's limit and
/// answers (the held one is set by a later usage pass), and a suspend or a
/// rotation of the holder ends its sessions and goes through.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_holding_its_own_role_locked_stalls_no_change_to_roles() {
    let env = TestEnv::start().await;
    make_plan(
        &env,
        json!({"name": "shared", "connection_limit": 4, "max_staff": 2}),
    )
    .await;
    create_on_plan(&env, "holder", "shared").await;
    create_on_plan(&env, "bystander", "shared").await;
    let t = env.record("holder").await;
    // A plan change: answered in seconds, the bystander set, the holder
    // left for later.
    let mut held = hold_own_role(&env, "holder").await;
    let started = Instant::now();
    let (status, changed) = env
        .call(
            Method::PATCH,
            "/admin/v1/plans/shared",
            Some(json!({"connection_limit": 6})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the plan change waited {:?}",
        started.elapsed()
    );
    assert_eq!(role_limit(&env, "bystander").await, 6);
    assert_eq!(role_limit(&env, "holder").await, 4, "held: left for later");
    // Let go: the usage pass sets it.
    sqlx::raw_sql("ROLLBACK").execute(&mut held).await.unwrap();
    drop(held);
    let pass = env.control.collect_usage_once().await.unwrap().unwrap();
    assert_eq!(pass.connection_limits_fixed, 1, "{pass:?}");
    assert_eq!(role_limit(&env, "holder").await, 6);

    // A rotation and a suspend of the holder: its sessions end, and each
    // goes through.
    for (path, what) in [
        ("/admin/v1/tenants/holder/credentials/rotate", "rotate"),
        ("/admin/v1/tenants/holder/suspend", "suspend"),
    ] {
        let mut held = hold_own_role(&env, "holder").await;
        let started = Instant::now();
        let (status, body) = env.call(Method::POST, path, None).await;
        assert!(status.is_success(), "{what}: {status} {body}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what} waited {:?}",
            started.elapsed()
        );
        assert!(
            sqlx::query("SELECT 1").execute(&mut held).await.is_err(),
            "{what}: the holding session was ended"
        );
    }
    let can_login: bool = sqlx::query_scalar("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1")
        .bind(&t.role_name)
        .fetch_one(&env.admin)
        .await
        .unwrap();
    assert!(!can_login, "suspended");
}

/// A session of `slug`'s own role holding that role's catalog row: it
/// altered itself (to the same password) in a transaction left open.
async fn hold_own_role(env: &TestEnv, slug: &str) -> sqlx::PgConnection {
    let t = env.record(slug).await;
    let mut conn = env.connect_tenant(slug).await.unwrap();
    sqlx::raw_sql(&format!(
        "BEGIN; ALTER ROLE \"{}\" PASSWORD '{}'",
        t.role_name,
        env.password(&t)
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    conn
}
