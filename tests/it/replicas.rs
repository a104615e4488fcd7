//! Several `silo serve` processes on one control DB behave as one: each
//! scheduled backup runs exactly once, and a replica killed mid-backup is
//! cleaned up after and its backup retried by another.

use std::time::Duration;

use crate::common::{add_ballast, Silo, TestEnv};
use chrono::{DateTime, Timelike, Utc};
use uuid::Uuid;

/// Slot length of the test schedule, seconds.
const EVERY: u32 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_run_each_scheduled_backup_once_and_retry_one_whose_replica_died() {
    let env = TestEnv::setup().storage().start().await;
    for i in 0..4 {
        env.create(&format!("rep-{i}")).await;
    }
    env.create("rep-big").await;
    let big = env.record("rep-big").await;
    add_ballast(&env, &big, 24).await; // three parts: a backup long enough to interrupt
    sqlx::query("UPDATE tenants SET created_at = now() - interval '1 day'")
        .execute(env.registry().pool())
        .await
        .unwrap();
    env.s3().faults().delay_parts(Duration::from_millis(700));

    // Start just after a slot boundary, so the kill and the retry share a slot.
    loop {
        let s = Utc::now().second() % EVERY;
        if s == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let schedule = format!("*/{EVERY} * * * * *");
    let extra = [
        ("SILO_SCHEDULER_TICK", "1"),
        ("SILO_BACKUP_SCHEDULE", schedule.as_str()),
        ("SILO_RECONCILE_INTERVAL", "2"),
        ("SILO_BACKUP_VERIFY_SAMPLE", "0"),
    ];
    let logs = tempfile::tempdir().unwrap();
    let started = Utc::now();
    let mut replicas = Vec::new();
    for i in 0..3 {
        let log = logs.path().join(format!("replica-{i}.log"));
        replicas.push(Some(Silo::start_with(&env, None, 0, &log, &extra).await));
    }

    // Catch the big tenant's backup running, and kill the replica running it.
    let (victim_backup, runner, slot) = loop {
        let running: Option<(Uuid, String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT id, runner, scheduled_for FROM backups WHERE tenant_id = $1 AND status = 'running' AND upload_id IS NOT NULL",
        )
        .bind(big.id)
        .fetch_optional(env.registry().pool())
        .await
        .unwrap();
        if let Some(r) = running {
            break r;
        }
        assert!(
            Utc::now() - started < chrono::Duration::seconds(30),
            "no backup of rep-big started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let pid: u32 = runner.rsplit(':').next().unwrap().parse().unwrap();
    let victim = replicas
        .iter()
        .position(|r| r.as_ref().is_some_and(|s| s.child.id() == pid))
        .expect("the runner is one of the three replicas");
    let mut killed = replicas[victim].take().unwrap();
    killed.child.kill().unwrap();
    killed.child.wait().unwrap();

    // Another replica's sweep fails the dead attempt; a tick retries the slot.
    let mut retried = None;
    for _ in 0..600 {
        retried = sqlx::query_scalar::<_, String>(
            "SELECT runner FROM backups WHERE tenant_id = $1 AND scheduled_for = $2 AND status = 'succeeded'",
        )
        .bind(big.id)
        .bind(slot)
        .fetch_optional(env.registry().pool())
        .await
        .unwrap();
        if retried.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let retried = retried.expect("the slot was retried after the replica died");
    assert_ne!(retried, runner, "retried by another replica");
    let dead: (String, Option<String>) =
        sqlx::query_as("SELECT status, error FROM backups WHERE id = $1")
            .bind(victim_backup)
            .fetch_one(env.registry().pool())
            .await
            .unwrap();
    assert_eq!(dead.0, "failed");
    assert!(dead.1.unwrap().contains("interrupted"));

    // Let the two survivors run the schedule for a few more slots.
    while Utc::now() - started < chrono::Duration::seconds(i64::from(EVERY) * 3 + 5) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ended = Utc::now();
    for s in replicas.into_iter().flatten() {
        s.stop();
    }

    // No (tenant, slot) ran twice.
    let twice: i64 = env
        .count(
            "SELECT count(*) FROM (SELECT tenant_id, scheduled_for FROM backups WHERE status = 'succeeded'
               AND scheduled_for IS NOT NULL GROUP BY 1, 2 HAVING count(*) > 1) d",
        )
        .await;
    assert_eq!(twice, 0, "a slot ran more than once");
    // Every small tenant's every slot inside the window ran, exactly once.
    let first = started.timestamp() - started.timestamp() % i64::from(EVERY);
    let last = ended.timestamp() - i64::from(EVERY);
    let mut slots = 0;
    for t in 0..4 {
        let tenant = env.record(&format!("rep-{t}")).await;
        let mut slot = first;
        while slot <= last {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM backups WHERE tenant_id = $1 AND status = 'succeeded' AND scheduled_for = to_timestamp($2)",
            )
            .bind(tenant.id)
            .bind(slot as f64)
            .fetch_one(env.registry().pool())
            .await
            .unwrap();
            assert_eq!(n, 1, "rep-{t} slot {slot}");
            slots += 1;
            slot += i64::from(EVERY);
        }
    }
    assert!(slots >= 8, "the window held {slots} tenant slots");
    let runners: i64 = env
        .count("SELECT count(DISTINCT runner) FROM backups WHERE status = 'succeeded'")
        .await;
    assert!(runners >= 2, "the work was shared by the replicas");
    assert_eq!(env.s3().open_uploads(), 0, "no upload left open");
    assert_eq!(
        env.count("SELECT count(*) FROM backups WHERE status = 'running'")
            .await,
        0
    );
}
