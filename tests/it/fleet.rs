//! Fleet migrations against real tenant databases: failures stay with their
//! tenant, re-runs pick up only what is left, a killed run resumes, and a
//! tenant created mid-run is not left behind.

use std::borrow::Cow;

use crate::common::TestEnv;
use axum::http::{Method, StatusCode};
use serde_json::json;
use silo::control::{ControlConfig, ControlPlane};
use silo::migrate::{FleetOptions, TenantOutcome};
use silo::servers::schema::embedded_migrator;
use sqlx::migrate::{Migration, MigrationType, Migrator};

/// The new migration of these tests: a column, an index, a backfill.
const V2_SQL: &str =
    "ALTER TABLE patients ADD COLUMN preferred_language text NOT NULL DEFAULT 'en';
CREATE INDEX patients_language_idx ON patients (preferred_language);
UPDATE patients SET preferred_language = 'de' WHERE full_name LIKE 'Herr %';";

fn migrator_v2() -> Migrator {
    let mut m = embedded_migrator();
    let mut all = m.migrations.to_vec();
    all.push(Migration::new(
        2,
        "preferred language".into(),
        MigrationType::Simple,
        V2_SQL.into(),
        false,
    ));
    m.migrations = Cow::Owned(all);
    m
}

/// A replica of the next release: the same control DB, schema version 2.
fn upgraded(env: &TestEnv) -> ControlPlane {
    env.replica(ControlConfig {
        schema: migrator_v2().into(),
        ..Default::default()
    })
}

async fn version_of(env: &TestEnv, slug: &str) -> Option<i64> {
    env.record(slug).await.schema_version
}

async fn superuser_exec(env: &TestEnv, slug: &str, sql: &str) {
    let t = env.record(slug).await;
    let url = env.pg.url(&t.database_name);
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::raw_sql(sql).execute(&pool).await.unwrap();
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_failing_tenant_does_not_stop_fifty_others_and_a_rerun_finishes_only_it() {
    let env = TestEnv::start().await;
    for i in 0..51 {
        env.create(&format!("fleet-{i:02}")).await;
    }
    // A conflicting object in one tenant's database makes its migration fail.
    superuser_exec(
        &env,
        "fleet-13",
        "ALTER TABLE patients ADD COLUMN preferred_language int",
    )
    .await;
    superuser_exec(
        &env,
        "fleet-07",
        "INSERT INTO patients (full_name) VALUES ('Herr Müller')",
    )
    .await;

    let new = upgraded(&env);
    let run = new
        .fleet()
        .start(
            FleetOptions {
                concurrency: Some(4),
                ..Default::default()
            },
            "test",
        )
        .await
        .unwrap();
    let op = run.operation.id;
    let report = new.run_fleet(run, |_, _| {}).await.unwrap();
    assert_eq!(report.migrated, 50, "{report:?}");
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].slug, "fleet-13");
    assert!(
        matches!(&report.failed[0].outcome, TenantOutcome::Failed { error } if error.contains("preferred_language"))
    );
    let operation = env.registry().operation(op).await.unwrap().unwrap();
    assert_eq!(operation.status, silo::registry::OperationStatus::Failed);
    assert_eq!(operation.result.unwrap()["failed"][0]["slug"], "fleet-13");

    assert_eq!(version_of(&env, "fleet-00").await, Some(2));
    assert_eq!(
        version_of(&env, "fleet-13").await,
        Some(1),
        "the failed tenant stays at its old version"
    );
    // ...and keeps serving.
    let mut conn = env.connect_tenant("fleet-13").await.unwrap();
    sqlx::query("SELECT count(*) FROM patients")
        .execute(&mut conn)
        .await
        .unwrap();
    crate::common::close(conn).await;
    // The backfill ran where it should.
    let mut conn = env.connect_tenant("fleet-07").await.unwrap();
    let lang: String = sqlx::query_scalar("SELECT preferred_language FROM patients")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(lang, "de");
    crate::common::close(conn).await;

    // While a run holds the lease, a second one is refused with its id.
    superuser_exec(
        &env,
        "fleet-13",
        "ALTER TABLE patients DROP COLUMN preferred_language",
    )
    .await;
    let rerun = new
        .fleet()
        .start(FleetOptions::default(), "test")
        .await
        .unwrap();
    match new.fleet().start(FleetOptions::default(), "test").await {
        Err(silo::ops::Error::Busy { operation, .. }) => {
            assert_eq!(operation, rerun.operation.id)
        }
        Err(e) => panic!("expected AlreadyRunning, got {e}"),
        Ok(_) => panic!("expected AlreadyRunning, got a second run"),
    }
    let report = new.run_fleet(rerun, |_, _| {}).await.unwrap();
    assert_eq!(
        (report.migrated, report.failed.len()),
        (1, 0),
        "only the tenant left behind is migrated"
    );
    assert_eq!(version_of(&env, "fleet-13").await, Some(2));

    // New tenants arrive at the new version: the template was rebuilt.
    let template: Option<i64> = sqlx::query_scalar("SELECT template_version FROM db_servers")
        .fetch_one(env.registry().pool())
        .await
        .unwrap();
    assert_eq!(template, Some(2));
    let t = new
        .provisioner()
        .create(&TestEnv::request("after-run", "After"), None, "test")
        .await
        .unwrap();
    assert_eq!(t.schema_version, Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_created_during_a_run_ends_at_the_latest_version() {
    let env = TestEnv::start().await;
    for i in 0..12 {
        env.create(&format!("early-{i:02}")).await;
    }
    let new = upgraded(&env);
    let run = new
        .fleet()
        .start(
            FleetOptions {
                concurrency: Some(1),
                ..Default::default()
            },
            "test",
        )
        .await
        .unwrap();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let started_tx = std::sync::Mutex::new(Some(started_tx));
    let runner = {
        let new = new.clone();
        tokio::spawn(async move {
            new.run_fleet(run, move |_, _| {
                if let Some(tx) = started_tx.lock().unwrap().take() {
                    let _ = tx.send(());
                }
            })
            .await
        })
    };
    started_rx.await.unwrap();
    // An old replica (still on version 1) creates a tenant mid-run.
    env.create("late-old").await;
    assert_eq!(version_of(&env, "late-old").await, Some(1));
    let report = runner.await.unwrap().unwrap();
    assert!(report.failed.is_empty());
    assert_eq!(
        report.migrated, 13,
        "the late tenant was picked up by the same run"
    );
    assert_eq!(version_of(&env, "late-old").await, Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_run_killed_halfway_is_resumed_to_completion() {
    let env = TestEnv::start().await;
    for i in 0..10 {
        env.create(&format!("resume-{i}")).await;
    }
    // The binary gets the new migration as a directory, as a user would give it.
    let dir = tempfile::tempdir().unwrap();
    let v1 = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/migrations/tenant/0001_clinic.sql"
    ))
    .unwrap();
    std::fs::write(dir.path().join("0001_clinic.sql"), v1).unwrap();
    std::fs::write(dir.path().join("0002_preferred_language.sql"), V2_SQL).unwrap();
    let url = env.control_url();
    let run_cli = |failpoint: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_silo"));
        cmd.args(["migrate", "tenants", "--concurrency", "1"])
            .env("SILO_DATABASE_URL", &url)
            .env("SILO_MASTER_KEY", &env.master_key)
            .env("SILO_TENANT_SERVER_URL", env.pg.url("postgres"))
            .env("SILO_TENANT_MIGRATIONS", dir.path())
            .env_remove("SILO_FAILPOINT");
        if let Some(fp) = failpoint {
            cmd.env("SILO_FAILPOINT", fp);
        }
        cmd.output().unwrap()
    };
    // Aborts (like kill -9) right after its first tenant.
    let killed = run_cli(Some("fleet_tenant"));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        killed.status.signal(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&killed.stderr)
    );
    let ops = env
        .registry()
        .unfinished_operations(silo::domain::OperationKind::MigrateTenants)
        .await
        .unwrap();
    assert_eq!(ops.len(), 1, "the killed run is left unfinished");
    let at_v2 = env
        .count("SELECT count(*) FROM tenants WHERE schema_version = 2")
        .await;
    assert!(
        (1..10).contains(&at_v2),
        "killed halfway: {at_v2} of 10 done"
    );

    let resumed = run_cli(None);
    let out = String::from_utf8_lossy(&resumed.stdout);
    assert!(
        resumed.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert!(
        out.contains(&ops[0].id.to_string()),
        "the same operation was resumed: {out}"
    );
    assert!(
        out.contains(&format!("{} migrated, 0 failed", 10 - at_v2)),
        "only the rest was migrated: {out}"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM tenants WHERE schema_version = 2")
            .await,
        10
    );
    let op = env.registry().operation(ops[0].id).await.unwrap().unwrap();
    assert_eq!(op.status, silo::registry::OperationStatus::Succeeded);
}

#[tokio::test]
async fn the_api_starts_runs_reports_status_and_refuses_a_second_run() {
    let env = TestEnv::start().await;
    env.create("api-fleet").await;
    let (s, p) = env
        .call(
            Method::POST,
            "/admin/v1/migrations/tenants",
            Some(json!({"concurrency": 0})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
    let (s, p) = env
        .call(
            Method::POST,
            "/admin/v1/migrations/tenants",
            Some(json!({"tenant": "nobody"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
    let (s, p) = env
        .call(
            Method::POST,
            "/admin/v1/migrations/tenants",
            Some(json!({"parallel": 2})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{p}");

    let (s, status) = env
        .call(Method::GET, "/admin/v1/migrations/tenants", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(status["latest_version"], 1);
    assert_eq!(status["behind"], json!([]));

    // Hold a run's lease, as a runner on another replica would.
    let held = env
        .control
        .fleet()
        .start(FleetOptions::default(), "test")
        .await
        .unwrap();
    let (s, p) = env
        .call(
            Method::POST,
            "/admin/v1/migrations/tenants",
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{p}");
    assert_eq!(p["operation_id"], held.operation.id.to_string());
    env.control.run_fleet(held, |_, _| {}).await.unwrap();

    let (s, op) = env
        .call(
            Method::POST,
            "/admin/v1/migrations/tenants",
            Some(json!({"concurrency": 2})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    let op = wait(&env, op["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    assert_eq!(
        op["result"]["migrated"], 0,
        "everyone is already at the latest version"
    );
}

async fn wait(env: &TestEnv, id: &str) -> serde_json::Value {
    for _ in 0..200 {
        let (_, op) = env
            .call(Method::GET, &format!("/admin/v1/operations/{id}"), None)
            .await;
        if op["status"] != "running" {
            return op;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("operation {id} did not finish");
}
