//! Bounded background work: however many backups, verifications,
//! restores, archivals and moves are asked for at once, one silo process
//! runs at most `SILO_BACKUP_CONCURRENCY` of them; the others wait, visible
//! as `queued`, and run in turn. A process's memory stays under the
//! README's bound whatever the databases' sizes, and queued work whose
//! process dies is settled like running work.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::common::{Silo, TestEnv};
use axum::http::{Method, StatusCode};
use futures::future::join_all;
use rand::RngCore;
use serde_json::{json, Value};
use silo::backup::BackupKind;
use sqlx::{Connection, PgConnection};

const MIB: u64 = 1024 * 1024;
/// The README's bound on a silo process's peak RSS ("Bounded background
/// work"): this fixed footprint plus `SILO_BACKUP_CONCURRENCY` × the memory
/// of one backup ([`silo::backup::memory_per_backup`]).
const FIXED_FOOTPRINT: u64 = 64 * MIB;

/// `mib` MiB of random bytes (incompressible: the dump and the upload are as
/// large as the data), in rows of 64 KiB, into a `ballast` table by COPY.
/// Unlogged: the test's own data need not go through the WAL too.
async fn ballast(env: &TestEnv, database: &str, mib: usize) {
    let mut conn = PgConnection::connect(&env.pg.url(database)).await.unwrap();
    sqlx::query(
        "CREATE UNLOGGED TABLE IF NOT EXISTS ballast (id serial PRIMARY KEY, data bytea NOT NULL)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let mut copy = conn
        .copy_in_raw("COPY ballast (data) FROM STDIN")
        .await
        .unwrap();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut row = vec![0u8; 64 * 1024];
    for _ in 0..mib * 16 {
        rand::thread_rng().fill_bytes(&mut row);
        // COPY's text form of a bytea: `\\x` and hex digits.
        let mut line = Vec::with_capacity(row.len() * 2 + 4);
        line.extend_from_slice(b"\\\\x");
        for b in &row {
            line.push(HEX[(b >> 4) as usize]);
            line.push(HEX[(b & 15) as usize]);
        }
        line.push(b'\n');
        copy.send(line).await.unwrap();
    }
    copy.finish().await.unwrap();
    conn.close().await.ok();
}

/// `VmHWM` (peak resident set) and `VmRSS` of a process, bytes.
fn memory_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Backups of these ids by status.
async fn statuses(env: &TestEnv, ids: &[uuid::Uuid]) -> HashMap<String, i64> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM backups WHERE id = ANY($1) GROUP BY status")
            .bind(ids)
            .fetch_all(env.registry().pool())
            .await
            .unwrap();
    rows.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_backups_asked_at_once_run_a_few_at_a_time_within_the_memory_bound() {
    const TENANTS: usize = 50;
    const SLOTS: usize = 4;
    const MAX_PART_MIB: u64 = 5;
    const IN_FLIGHT: usize = 2; // `Silo::start` runs with SILO_BACKUP_PARTS_IN_FLIGHT=2
    let started = Instant::now();
    let env = TestEnv::setup().storage().start().await;
    // The tenant set: 5 tenants of 12 MiB (several parts each, parts in
    // flight) and 45 of 1 MiB, 105 MiB of incompressible rows in all.
    let slugs: Vec<String> = (0..TENANTS).map(|i| format!("bulk-{i:02}")).collect();
    for chunk in slugs.chunks(5) {
        join_all(chunk.iter().map(|s| env.create(s))).await;
    }
    let mut databases = Vec::new();
    for slug in &slugs {
        databases.push(env.record(slug).await.database_name);
    }
    for (i, chunk) in databases.chunks(5).enumerate() {
        join_all(
            chunk
                .iter()
                .map(|db| ballast(&env, db, if i == 0 { 12 } else { 1 })),
        )
        .await;
    }
    println!(
        "tenant set ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("silo.log");
    let silo = Silo::start_with(
        &env,
        None,
        0,
        &log,
        &[
            ("SILO_BACKUP_CONCURRENCY", &SLOTS.to_string()),
            ("SILO_BACKUP_MAX_PART_MIB", &MAX_PART_MIB.to_string()),
            ("RUST_LOG", "info"),
        ],
    )
    .await;
    let pid = silo.child.id();
    let (_, idle) = memory_of(pid);

    // All fifty at once.
    let asked = Instant::now();
    let answers = join_all(slugs.iter().map(|slug| {
        let path = format!("/admin/v1/tenants/{slug}/backups");
        let silo = &silo;
        async move { silo.request(reqwest::Method::POST, &path, None, None).await }
    }))
    .await;
    let mut ids = Vec::new();
    let mut queued_answers = 0;
    for answer in answers {
        let (status, body) = answer.unwrap();
        assert_eq!(status, 202, "{body}");
        match body["status"].as_str() {
            Some("queued") => queued_answers += 1,
            Some("running") => {}
            other => panic!("a fresh backup is {other:?}: {body}"),
        }
        ids.push(uuid::Uuid::parse_str(body["id"].as_str().unwrap()).unwrap());
    }
    assert!(
        queued_answers >= TENANTS - 2 * SLOTS,
        "only {queued_answers} of {TENANTS} waited for a slot"
    );

    // Watch until every one is done: never more than SLOTS running (by the
    // registry, and by pg_dump sessions on the server).
    let (mut most_running, mut most_dumps, mut most_queued) = (0, 0, 0);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let now = statuses(&env, &ids).await;
        let running = now.get("running").copied().unwrap_or(0);
        let queued = now.get("queued").copied().unwrap_or(0);
        let dumps: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'silo-backup'",
        )
        .fetch_one(&env.admin)
        .await
        .unwrap();
        most_running = most_running.max(running);
        most_dumps = most_dumps.max(dumps);
        most_queued = most_queued.max(queued);
        if running == 0 && queued == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "backups still going: {now:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = asked.elapsed();
    let done = statuses(&env, &ids).await;
    let (peak, _) = memory_of(pid);
    let per_backup = silo::backup::memory_per_backup(MAX_PART_MIB * MIB, IN_FLIGHT);
    let bound = FIXED_FOOTPRINT + SLOTS as u64 * per_backup;
    println!(
        "{TENANTS} backups in {:.1} s: at most {most_running} running and {most_dumps} pg_dump sessions at once \
         (limit {SLOTS}), up to {most_queued} queued; RSS idle {} MiB, peak {} MiB, bound {} MiB",
        took.as_secs_f64(),
        idle >> 20,
        peak >> 20,
        bound >> 20
    );
    assert_eq!(
        done.get("succeeded").copied(),
        Some(TENANTS as i64),
        "{done:?}; see {}",
        log.display()
    );
    assert!(most_running <= SLOTS as i64, "{most_running} ran at once");
    assert!(most_dumps <= SLOTS as i64, "{most_dumps} pg_dumps at once");
    assert!(most_running >= 2, "the slots were used at once");
    assert!(peak < bound, "peak RSS {peak} over the bound {bound}");
    // Big tenants went up in several parts, none over the cap.
    let parts: Vec<(i32, i64)> =
        sqlx::query_as("SELECT parts, part_size FROM backups WHERE id = ANY($1) AND parts > 1")
            .bind(&ids)
            .fetch_all(env.registry().pool())
            .await
            .unwrap();
    assert_eq!(parts.len(), 5, "{parts:?}");
    assert!(parts
        .iter()
        .all(|(_, size)| *size as u64 == MAX_PART_MIB * MIB));
    silo.stop();
    drop(env);
    println!("env dropped at {:.1} s", started.elapsed().as_secs_f64());
}

/// A backup of `slug` stuck before its dump while the returned connection
/// holds an exclusive lock on its `patients` table (until it is dropped).
async fn hold_patients(env: &TestEnv, slug: &str) -> PgConnection {
    let t = env.record(slug).await;
    let mut conn = PgConnection::connect(&env.pg.url(&t.database_name))
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE patients IN ACCESS EXCLUSIVE MODE")
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

async fn poll_backup(env: &TestEnv, id: &str, until: &[&str]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (s, b) = env
            .call(Method::GET, &format!("/admin/v1/backups/{id}"), None)
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        if until.contains(&b["status"].as_str().unwrap_or_default()) {
            return b;
        }
        assert!(Instant::now() < deadline, "backup {id} stuck: {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn operation(env: &TestEnv, op: &Value) -> Value {
    let (s, now) = env
        .call(
            Method::GET,
            &format!("/admin/v1/operations/{}", op["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{now}");
    now
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn work_asked_for_while_every_slot_is_taken_is_queued_then_runs() {
    let mut args = crate::common::storage_args();
    args.backup_concurrency = 1;
    let env = TestEnv::setup().storage_args(args).start().await;
    let second = crate::common::second_server(&env).await;
    for slug in ["busy", "waiting", "mover"] {
        env.create(slug).await;
    }
    let waiting = env.record("waiting").await;
    let earlier = env
        .backups()
        .backup_now(waiting.id, BackupKind::Manual, None)
        .await
        .unwrap();

    // The one slot: a backup held up before its dump.
    let lock = hold_patients(&env, "busy").await;
    let (s, busy) = env
        .call(Method::POST, "/admin/v1/tenants/busy/backups", None)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{busy}");
    assert_eq!(busy["status"], "running", "{busy}");

    // Everything else waits, whatever started it.
    let (s, backup) = env
        .call(Method::POST, "/admin/v1/tenants/waiting/backups", None)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{backup}");
    assert_eq!(backup["status"], "queued", "{backup}");
    let (s, again) = env
        .call(Method::POST, "/admin/v1/tenants/waiting/backups", None)
        .await;
    assert_eq!(
        s,
        StatusCode::CONFLICT,
        "one queued backup per tenant: {again}"
    );
    assert!(
        again["detail"].as_str().unwrap().contains("already queued"),
        "{again}"
    );
    let mut ops = Vec::new();
    for (path, body) in [
        (format!("/admin/v1/backups/{}/verify", earlier.id), None),
        (
            format!("/admin/v1/backups/{}/restore", earlier.id),
            Some(json!({"into_slug": "waiting-copy"})),
        ),
        (
            "/admin/v1/tenants/mover/move".to_owned(),
            Some(json!({"server": "second"})),
        ),
    ] {
        let (s, op) = env.call(Method::POST, &path, body).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{path}: {op}");
        assert_eq!(op["status"], "queued", "{path}: {op}");
        ops.push(op);
    }
    // All four wait for the one slot, which stays held.
    let slots = env.control.ops().slots();
    let deadline = Instant::now() + Duration::from_secs(30);
    while slots.waiting() < 4 {
        assert!(Instant::now() < deadline, "{} waiting", slots.waiting());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!((slots.in_use(), slots.waiting()), (1, 4));
    for op in &ops {
        assert_eq!(operation(&env, op).await["status"], "queued");
    }
    let row = poll_backup(&env, backup["id"].as_str().unwrap(), &["queued"]).await;
    assert_eq!(row["status"], "queued");

    // The slot is given back: each runs in turn, to success.
    drop(lock);
    let b = poll_backup(&env, busy["id"].as_str().unwrap(), &["succeeded", "failed"]).await;
    assert_eq!(b["status"], "succeeded", "{b}");
    let b = poll_backup(
        &env,
        backup["id"].as_str().unwrap(),
        &["succeeded", "failed"],
    )
    .await;
    assert_eq!(b["status"], "succeeded", "{b}");
    for op in &ops {
        let done = crate::common::wait_op(&env, op).await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    assert_eq!(env.record("mover").await.server_name, "second");
    assert_eq!(env.record("waiting-copy").await.status.as_str(), "active");
    assert_eq!(env.control.ops().slots().in_use(), 0);
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_work_of_a_killed_silo_is_settled_like_running_work() {
    let env = TestEnv::setup().storage().start().await;
    for slug in ["busy", "waiting", "idle"] {
        env.create(slug).await;
    }
    let waiting = env.record("waiting").await;
    let earlier = env
        .backups()
        .backup_now(waiting.id, BackupKind::Manual, None)
        .await
        .unwrap();
    let logs = tempfile::tempdir().unwrap();
    let silo = Silo::start_with(
        &env,
        None,
        0,
        &logs.path().join("silo.log"),
        &[("SILO_BACKUP_CONCURRENCY", "1")],
    )
    .await;
    let lock = hold_patients(&env, "busy").await;
    let post = |path: String| {
        let silo = &silo;
        async move {
            let (s, body) = silo
                .request(reqwest::Method::POST, &path, None, None)
                .await
                .unwrap();
            assert_eq!(s, 202, "{path}: {body}");
            body
        }
    };
    let busy = post("/admin/v1/tenants/busy/backups".into()).await;
    assert_eq!(busy["status"], "running", "{busy}");
    let backup = post("/admin/v1/tenants/waiting/backups".into()).await;
    let verify = post(format!("/admin/v1/backups/{}/verify", earlier.id)).await;
    let token = env.app_token("idle").await;
    let archive = post("/admin/v1/tenants/idle/archive".into()).await;
    for queued in [&backup, &verify, &archive] {
        assert_eq!(queued["status"], "queued", "{queued}");
    }
    assert_eq!(env.record("idle").await.status.as_str(), "archiving");
    // Its app traffic is refused as locked already (423, as the README
    // says; it answered 503 "retry later").
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = env
            .call_with(
                Method::GET,
                "/api/v1/patients",
                None,
                &[
                    ("authorization", &format!("Bearer {token}")),
                    ("x-tenant-id", "idle"),
                ],
            )
            .await;
        if status == StatusCode::LOCKED {
            break;
        }
        assert!(Instant::now() < deadline, "{status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // kill -9: the running backup and everything queued lose their process.
    drop(silo);
    drop(lock);
    // Its sessions (and the locks on them) end as the server notices.
    // (A pass may also meet what the killed process left mid-way on the
    // server, e.g. a template being rebuilt: not this test's subject.)
    let (mut abandoned, mut interrupted) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while abandoned < 2 || interrupted < 2 {
        let report = env.control.reconcile_once().await.unwrap();
        abandoned += report.backups.backups_abandoned;
        interrupted += report.backups.operations_interrupted;
        assert!(Instant::now() < deadline, "not settled: {report:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!((abandoned, interrupted), (2, 2));
    for (id, why) in [
        (busy["id"].as_str().unwrap(), "interrupted"),
        (backup["id"].as_str().unwrap(), "interrupted while queued"),
    ] {
        let b = poll_backup(&env, id, &["failed"]).await;
        assert!(b["error"].as_str().unwrap().contains(why), "{b}");
    }
    for op in [&verify, &archive] {
        let now = operation(&env, op).await;
        assert_eq!(now["status"], "failed", "{now}");
        assert!(
            now["error"].as_str().unwrap().contains("interrupted"),
            "{now}"
        );
    }
    // The archival never started: the tenant is put back, serving.
    assert_eq!(env.record("idle").await.status.as_str(), "active");
    let conn = env
        .connect_tenant("idle")
        .await
        .expect("idle logs in again");
    crate::common::close(conn).await;
    // Nothing is left claiming the tenants: they back up again.
    for slug in ["busy", "waiting"] {
        let t = env.record(slug).await;
        let b = env
            .backups()
            .backup_now(t.id, BackupKind::Manual, None)
            .await
            .unwrap();
        assert_eq!(b.status, "succeeded");
    }
    assert_eq!(env.s3().open_uploads(), 0);
}
