//! Backups against a real PostgreSQL and a real S3-protocol server (s3s-fs
//! over HTTP, SigV4 and all), with the failure paths forced for real: the
//! store failing a part, pg_dump killed, the object corrupted.

use std::time::Duration;

use crate::common::table::{self, delete, get, post, Client};
use crate::common::{add_ballast, TestEnv};
use axum::http::{Method, StatusCode};
use serde_json::{json, Value};
use silo::backup::{BackupKind, RestoreTarget};
use silo::registry::TenantStatus;
use sqlx::PgConnection;

/// Every row of the clinic tables, as JSON text: compared by content.
async fn contents(conn: &mut PgConnection) -> String {
    let mut out = String::new();
    for table in ["clinics", "staff", "patients", "appointments"] {
        let rows: Option<String> = sqlx::query_scalar(&format!(
            "SELECT json_agg(t ORDER BY t.id)::text FROM {table} t"
        ))
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        out.push_str(&format!("{table}: {}\n", rows.unwrap_or_default()));
    }
    out
}

async fn seed(conn: &mut PgConnection, tag: &str, patients: i32) {
    sqlx::raw_sql(&format!(
        "INSERT INTO clinics (name) VALUES ('Clinic {tag}');
         INSERT INTO patients (full_name, date_of_birth)
           SELECT 'Ada {tag} ' || g, date '1990-01-01' + g FROM generate_series(1, {patients}) g;"
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
}

/// What tenant `slug` reads now.
async fn holds(env: &TestEnv, slug: &str) -> String {
    let mut conn = env.connect_tenant(slug).await.unwrap();
    let now = contents(&mut conn).await;
    crate::common::close(conn).await;
    now
}

/// A new tenant `slug` seeded with `patients` rows (tagged `slug`), then
/// backed up: its record, what it held, and the backup.
async fn backed_up(
    env: &TestEnv,
    slug: &str,
    patients: i32,
) -> (silo::registry::TenantRecord, String, silo::registry::Backup) {
    env.create(slug).await;
    let mut conn = env.connect_tenant(slug).await.unwrap();
    seed(&mut conn, slug, patients).await;
    crate::common::close(conn).await;
    let t = env.record(slug).await;
    let b = env
        .backups()
        .backup_now(t.id, BackupKind::Manual, None)
        .await
        .unwrap();
    (t, holds(env, slug).await, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_round_trip_restores_exactly_the_rows_of_the_backup_point() {
    let env = TestEnv::setup().storage().start().await;
    env.create("roundtrip").await;
    let t = env.record("roundtrip").await;
    let mut conn = env.connect_tenant("roundtrip").await.unwrap();
    seed(&mut conn, "before", 200).await;
    let at_backup = contents(&mut conn).await;

    let b = env
        .backups()
        .backup_now(t.id, BackupKind::Manual, None)
        .await
        .expect("backup succeeds");
    assert_eq!(b.status, "succeeded");
    assert_eq!(b.row_counts.as_ref().unwrap()["public.patients"], 200);
    assert!(b.size_bytes.unwrap() > 0 && b.sha256.as_ref().unwrap().len() == 64);
    // Dump and manifest are stored; the dump is encrypted (pg_dump's own
    // `PGDMP` header, always in clear in a custom-format dump, is nowhere).
    let objects = env.stored_objects(t.id);
    assert_eq!(objects.len(), 2, "{objects:?}");
    let dump = std::fs::read(env.s3().object_path(crate::common::BUCKET, &b.object_key)).unwrap();
    assert!(dump.starts_with(b"SILOBK01"));
    assert!(
        !dump.windows(5).any(|w| w == b"PGDMP"),
        "the stored dump is plaintext"
    );
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(env.s3().object_path(crate::common::BUCKET, &b.manifest_key)).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["sha256"], json!(b.sha256));
    assert_eq!(
        manifest["schema_version"],
        json!(env.control.latest_version())
    );
    assert_eq!(env.s3().open_uploads(), 0);

    // Rows change after the backup point.
    sqlx::raw_sql(
        "DELETE FROM patients WHERE date_of_birth < date '1990-03-01'; UPDATE patients SET notes = 'changed';
         INSERT INTO clinics (name) VALUES ('Clinic after');",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    assert_ne!(contents(&mut conn).await, at_backup);
    crate::common::close(conn).await;

    let restored = env
        .control
        .restore(b.id, RestoreTarget::InPlace, "test", None)
        .await
        .expect("restore succeeds");
    assert_eq!(restored.status, TenantStatus::Active);
    assert_ne!(
        restored.database_name, t.database_name,
        "a new database was swapped in"
    );
    assert!(
        !env.database_exists(&t.database_name).await,
        "the replaced database is dropped"
    );
    // The tenant's own role reads exactly the backup point's rows.
    let mut conn = env.connect_tenant("roundtrip").await.unwrap();
    assert_eq!(contents(&mut conn).await, at_backup);
    // ...and can still write (grants applied to the restored database).
    seed(&mut conn, "after-restore", 1).await;
    crate::common::close(conn).await;

    // Restoring into another slug creates that tenant with the same data.
    let copy = env
        .control
        .restore(
            b.id,
            RestoreTarget::IntoSlug("roundtrip-copy".parse().unwrap()),
            "test",
            None,
        )
        .await
        .unwrap();
    assert_eq!(copy.slug, "roundtrip-copy");
    assert_eq!(holds(&env, "roundtrip-copy").await, at_backup);

    let report = env.backups().verify_backup(b.id, None).await.unwrap();
    assert!(report.ok && report.tables >= 6, "{report:?}");
    let b = env.registry().backup(b.id).await.unwrap().unwrap();
    assert!(b.verified_at.is_some() && b.verify_error.is_none());
    assert!(env.orphans().await.is_empty(), "{:?}", env.orphans().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_failing_mid_upload_leaves_no_backup_and_no_open_upload() {
    let env = TestEnv::setup().storage().start().await;
    env.create("flaky-store").await;
    let t = env.record("flaky-store").await;
    add_ballast(&env, &t, 20).await; // three 8 MiB parts

    env.s3().faults().fail_part(2);
    let err = env
        .backups()
        .backup_now(t.id, BackupKind::Manual, None)
        .await
        .expect_err("the store refuses part 2");
    assert!(format!("{err:#}").contains("part 2"), "{err:#}");
    let backups = env.registry().backups_of(t.id, None, 10).await.unwrap();
    assert_eq!(backups.len(), 1);
    assert_eq!(backups[0].status, "failed");
    assert!(backups[0].error.as_deref().unwrap().contains("part 2"));
    assert_eq!(
        env.s3().open_uploads(),
        0,
        "the multipart upload was aborted"
    );
    assert!(
        env.stored_objects(t.id).is_empty(),
        "nothing claims to be a backup"
    );
    assert!(env
        .registry()
        .latest_good_backup(t.id)
        .await
        .unwrap()
        .is_none());
    // A failed backup cannot be restored.
    let refused = env
        .control
        .restore(backups[0].id, RestoreTarget::InPlace, "test", None)
        .await;
    assert!(refused.is_err());

    // A whole-store outage fails the same clean way.
    env.s3().faults().clear();
    env.s3().faults().set_outage(true);
    assert!(env
        .backups()
        .backup_now(t.id, BackupKind::Manual, None)
        .await
        .is_err());
    env.s3().faults().set_outage(false);
    assert_eq!(env.s3().open_uploads(), 0);

    // The store back: the next backup succeeds, with equal parts.
    let b = env
        .backups()
        .backup_now(t.id, BackupKind::Manual, None)
        .await
        .unwrap();
    assert!(b.parts.unwrap() >= 3, "{b:?}");
    assert_eq!(b.part_size, Some(silo::backup::MIN_PART_SIZE as i64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_pg_dump_fails_the_backup_and_aborts_its_upload() {
    let env = TestEnv::setup().storage().start().await;
    env.create("dump-killed").await;
    let t = env.record("dump-killed").await;
    add_ballast(&env, &t, 48).await;
    // Slow parts keep pg_dump blocked on its pipe, alive to be killed.
    env.s3().faults().delay_parts(Duration::from_millis(1500));
    let p = env.backups().clone();
    let id = t.id;
    let backup = tokio::spawn(async move { p.backup_now(id, BackupKind::Manual, None).await });
    let pid = wait_for_process("pg_dump", &t.database_name).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let err = backup
        .await
        .unwrap()
        .expect_err("a killed pg_dump fails the backup");
    assert!(format!("{err:#}").contains("pg_dump"), "{err:#}");
    env.s3().faults().clear();
    let b = &env.registry().backups_of(t.id, None, 1).await.unwrap()[0];
    assert_eq!(b.status, "failed");
    assert_eq!(env.s3().open_uploads(), 0);
    assert!(env.stored_objects(t.id).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupted_object_is_refused_and_the_tenant_keeps_its_data() {
    let env = TestEnv::setup().storage().start().await;
    env.create("corrupt").await;
    let t = env.record("corrupt").await;
    let mut conn = env.connect_tenant("corrupt").await.unwrap();
    seed(&mut conn, "x", 50).await;
    let b = env
        .backups()
        .backup_now(t.id, BackupKind::Manual, None)
        .await
        .unwrap();
    seed(&mut conn, "y", 5).await;
    let now = contents(&mut conn).await;
    crate::common::close(conn).await;

    // Flip one byte of the stored object, behind silo's back.
    let path = env.s3().object_path(crate::common::BUCKET, &b.object_key);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&path, bytes).unwrap();

    let err = env
        .control
        .restore(b.id, RestoreTarget::InPlace, "test", None)
        .await
        .expect_err("a corrupt backup is refused");
    assert!(
        format!("{err:#}").contains("nothing was changed"),
        "{err:#}"
    );
    let after = env.record("corrupt").await;
    assert_eq!(after.database_name, t.database_name, "no swap happened");
    let mut conn = env.connect_tenant("corrupt").await.unwrap();
    assert_eq!(
        contents(&mut conn).await,
        now,
        "the tenant keeps serving its data"
    );
    crate::common::close(conn).await;

    // Into a new slug: the tenant made for it is deleted again, so the
    // slug is free (it was left suspended and empty, holding the slug).
    let into = || RestoreTarget::IntoSlug("corrupt-copy".parse().unwrap());
    for _ in 0..2 {
        let err = env
            .control
            .restore(b.id, into(), "test", None)
            .await
            .expect_err("a corrupt backup is refused");
        assert!(
            format!("{err:#}").contains("nothing was changed"),
            "{err:#}"
        );
        assert!(env
            .registry()
            .find_tenant("corrupt-copy")
            .await
            .unwrap()
            .is_none());
    }

    assert!(env.backups().verify_backup(b.id, None).await.is_err());
    let b = env.registry().backup(b.id).await.unwrap().unwrap();
    assert!(
        b.verify_error.is_some(),
        "the failed verification is recorded"
    );
    assert!(env.orphans().await.is_empty(), "{:?}", env.orphans().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn archive_then_restore_returns_the_tenant_with_all_its_data() {
    let env = TestEnv::setup().storage().start().await;
    env.create("sleepy").await;
    let t = env.record("sleepy").await;
    let mut conn = env.connect_tenant("sleepy").await.unwrap();
    seed(&mut conn, "s", 120).await;
    let before = contents(&mut conn).await;
    crate::common::close(conn).await;

    let (status, op) = env
        .call(Method::POST, "/admin/v1/tenants/sleepy/archive", None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{op}");
    let op = wait_operation(&env, &op).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let archived = env.record("sleepy").await;
    assert_eq!(archived.status, TenantStatus::Archived);
    assert!(!env.database_exists(&t.database_name).await);
    assert!(!env.role_exists(&t.role_name).await);
    let archive = env
        .registry()
        .latest_good_backup(t.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(archive.kind, "archive");
    assert!(archive.verified_at.is_some() && archive.verify_error.is_none());

    let (status, op) = env
        .call(
            Method::POST,
            "/admin/v1/tenants/sleepy/restore",
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{op}");
    let op = wait_operation(&env, &op).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let back = env.record("sleepy").await;
    assert_eq!(back.status, TenantStatus::Active);
    assert_eq!(back.schema_version, Some(env.control.latest_version()));
    assert_eq!(holds(&env, "sleepy").await, before);
    assert!(env.orphans().await.is_empty(), "{:?}", env.orphans().await);

    // Delete takes a final backup first.
    let (status, op) = env
        .call(Method::DELETE, "/admin/v1/tenants/sleepy", None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let op = wait_operation(&env, &op).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let last = env
        .registry()
        .latest_good_backup(t.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(last.kind, "final");

    // Erasure crypto-shreds: the key is gone, the objects too, restore refused.
    let (status, body) = env
        .call(
            Method::DELETE,
            &format!("/admin/v1/tenants/{}/backups", t.id),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["backups_erased"].as_u64().unwrap() >= 2);
    assert!(env.stored_objects(t.id).is_empty());
    let (status, _) = env
        .call(
            Method::POST,
            &format!("/admin/v1/backups/{}/restore", last.id),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_endpoints_answer_bad_input_with_4xx_and_change_nothing() {
    let env = TestEnv::setup().storage().start().await;
    env.create("inputs").await;
    let (nil, inputs) = (
        "/admin/v1/backups/00000000-0000-0000-0000-000000000000",
        "/admin/v1/tenants/inputs",
    );
    #[rustfmt::skip]
    let rows = vec![
        post("/admin/v1/tenants/nobody/backups").is(404),
        get(format!("{inputs}/backups?limit=0")).is(422),
        get(format!("{inputs}/backups?cursor=zzz")).is(422),
        get(format!("{inputs}/backups?colour=red")).is(422),
        get("/admin/v1/backups/not-a-uuid").is(404),
        get(nil).is(404),
        post(format!("{nil}/verify")).is(404),
        post(format!("{nil}/restore")).raw(r#"{"into_slug":"Bad Slug"}"#).is(422),
        post(format!("{nil}/restore")).raw(r#"{"nope":1}"#).is(422),
        post(format!("{nil}/restore")).raw("{").is(400),
        post(format!("{inputs}/restore")).raw(r#"{"backup_id":"nope"}"#).is(422),
        post(format!("{inputs}/restore")).is(409),
        delete(format!("{inputs}/backups")).is(409),
        post("/admin/v1/tenants/nobody/archive").is(404),
    ];
    table::run(&Client::admin(&env), rows, async || {
        let backups = env.count("SELECT count(*) FROM backups").await;
        (backups, env.record("inputs").await.status)
    })
    .await;
    assert_eq!(env.count("SELECT count(*) FROM backups").await, 0);
    assert_eq!(env.record("inputs").await.status, TenantStatus::Active);

    // Without storage configured, backups are refused clearly.
    let bare = TestEnv::start().await;
    bare.create("nostore").await;
    let rows = vec![post("/admin/v1/tenants/nostore/backups")
        .is(409)
        .says("SILO_S3_BUCKET")];
    table::run(&Client::admin(&bare), rows, async || ()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scheduled_slots_run_once_across_replicas_and_retention_prunes_old_backups() {
    let mut args = crate::common::storage_args();
    args.backup_schedule = "0 0 0 * * 0".parse().unwrap(); // weekly: one fixed slot during the test
    args.backup_keep_last = 2;
    args.backup_keep_daily = 0;
    args.backup_keep_weekly = 0;
    args.backup_keep_monthly = 0;
    let env = TestEnv::setup().storage_args(args.clone()).start().await;
    for i in 0..6 {
        env.create(&format!("sched-{i}")).await;
    }
    // The tenants existed before the latest slot.
    sqlx::query("UPDATE tenants SET created_at = now() - interval '3 years'")
        .execute(env.registry().pool())
        .await
        .unwrap();
    // Two "replicas": another provisioner on the same control DB and store.
    let other = env.replica(silo::control::ControlConfig {
        storage: Some(crate::common::storage_for(env.s3(), &args).await),
        ..Default::default()
    });
    let other = other.backups().unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let (g1, g2) = (Default::default(), Default::default());
    let (a, b) = tokio::join!(
        env.backups().run_due_backups(&g1, &cancel),
        other.run_due_backups(&g2, &cancel)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.succeeded + b.succeeded, 6, "{a:?} {b:?}");
    assert_eq!(a.failed + b.failed, 0);
    let per_slot = env
        .count("SELECT count(*) FROM backups WHERE kind = 'scheduled' AND status = 'succeeded'")
        .await;
    assert_eq!(per_slot, 6, "each tenant's slot ran exactly once");
    let again = env.backups().run_due_backups(&g1, &cancel).await.unwrap();
    assert_eq!(again.due, 0);

    // Retention: keep the last two; the pruned ones' objects are gone.
    let t = env.record("sched-0").await;
    for _ in 0..3 {
        env.backups()
            .backup_now(t.id, BackupKind::Manual, None)
            .await
            .unwrap();
    }
    let pruned = env.backups().prune_backups(t.id).await.unwrap();
    assert_eq!(pruned, 2);
    let live = env.registry().backups_of(t.id, None, 10).await.unwrap();
    assert_eq!(live.len(), 2);
    assert_eq!(
        env.stored_objects(t.id).len(),
        4,
        "two backups, two objects each"
    );
}

/// Poll an operation until it ends.
async fn wait_operation(env: &TestEnv, op: &Value) -> Value {
    let id = op["id"].as_str().unwrap().to_owned();
    for _ in 0..600 {
        let (_, body) = env
            .call(Method::GET, &format!("/admin/v1/operations/{id}"), None)
            .await;
        if body["status"] != "running" && body["status"] != "pending" {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("operation {id} did not finish");
}

/// Wait for a process whose command line has both words; return its pid.
async fn wait_for_process(name: &str, arg: &str) -> i32 {
    for _ in 0..400 {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.contains(name) && cmd.contains(arg) {
                return pid;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no {name} process for {arg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silo_killed_mid_backup_leaves_nothing_claiming_success_and_the_restart_cleans_up() {
    let env = TestEnv::setup().storage().start().await;
    env.create("crashy").await;
    let t = env.record("crashy").await;
    add_ballast(&env, &t, 48).await;
    env.s3().faults().delay_parts(Duration::from_millis(1500));
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("silo.log");
    let mut silo = crate::common::Silo::start(&env, None, 0, &log).await;
    let (status, b) = silo
        .request(Method::POST, "/admin/v1/tenants/crashy/backups", None, None)
        .await
        .unwrap();
    assert_eq!(status, 202, "{b}");
    let id: uuid::Uuid = b["id"].as_str().unwrap().parse().unwrap();
    // Wait until the upload is open and parts are on their way, then kill -9.
    for _ in 0..400 {
        if env
            .registry()
            .backup(id)
            .await
            .unwrap()
            .unwrap()
            .upload_id
            .is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    silo.child.kill().unwrap();
    silo.child.wait().unwrap();
    assert_eq!(env.s3().open_uploads(), 1, "the crash left its upload open");
    assert_eq!(
        env.registry().backup(id).await.unwrap().unwrap().status,
        "running"
    );
    env.s3().faults().clear();

    // The restarted process finds the dead backup at start-up and cleans up.
    let silo = crate::common::Silo::start(&env, None, 0, &log).await;
    let mut b = env.registry().backup(id).await.unwrap().unwrap();
    for _ in 0..400 {
        if b.status != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        b = env.registry().backup(id).await.unwrap().unwrap();
    }
    assert_eq!(b.status, "failed");
    assert!(b.error.as_deref().unwrap().contains("interrupted"), "{b:?}");
    assert_eq!(env.s3().open_uploads(), 0, "the sweep aborted the upload");
    assert!(env.stored_objects(t.id).is_empty());

    // A retry through the restarted process succeeds.
    let (status, retry) = silo
        .request(Method::POST, "/admin/v1/tenants/crashy/backups", None, None)
        .await
        .unwrap();
    assert_eq!(status, 202, "{retry}");
    let path = format!("/admin/v1/backups/{}", retry["id"].as_str().unwrap());
    let mut done = Value::Null;
    for _ in 0..600 {
        let (_, body) = silo.request(Method::GET, &path, None, None).await.unwrap();
        if body["status"] != "running" {
            done = body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(done["status"], "succeeded", "{done}");
    silo.stop();
}

/// Run the `silo` binary with `env`'s configuration (plus `extra`).
async fn silo_cli(env: &TestEnv, args: &[&str], with_storage: bool) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_silo"));
    cmd.args(args);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SILO_") || k.starts_with("AWS_"))
    {
        cmd.env_remove(k);
    }
    for (k, v) in env.silo_env() {
        if with_storage || !(k.starts_with("SILO_S3") || k.starts_with("AWS_")) {
            cmd.env(k, v);
        }
    }
    tokio::task::spawn_blocking(move || cmd.output().expect("run silo"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_backup_commands_back_up_list_verify_restore_and_archive_from_a_shell() {
    let env = TestEnv::setup().storage().start().await;
    env.create("shell").await;
    let mut conn = env.connect_tenant("shell").await.unwrap();
    seed(&mut conn, "sh", 30).await;
    let at_backup = contents(&mut conn).await;

    let out = silo_cli(&env, &["backup", "run", "--tenant", "shell"], true).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(b["status"], "succeeded");
    let id = b["id"].as_str().unwrap().to_owned();

    let out = silo_cli(&env, &["backup", "list", "--tenant", "shell"], true).await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id));

    let out = silo_cli(&env, &["backup", "verify", &id], true).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], true);

    sqlx::raw_sql("DELETE FROM patients")
        .execute(&mut conn)
        .await
        .unwrap();
    crate::common::close(conn).await;
    // Replacing a live tenant's data needs saying so.
    let out = silo_cli(&env, &["backup", "restore", &id], true).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("overwrite"));
    let out = silo_cli(&env, &["backup", "restore", &id, "--overwrite"], true).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(holds(&env, "shell").await, at_backup);

    let out = silo_cli(&env, &["tenants", "archive", "shell"], true).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(env.record("shell").await.status, TenantStatus::Archived);
    let out = silo_cli(&env, &["tenants", "restore", "shell"], true).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(env.record("shell").await.status, TenantStatus::Active);
    assert_eq!(holds(&env, "shell").await, at_backup);

    // Without storage: a usage error naming the setting.
    let out = silo_cli(&env, &["backup", "run", "--tenant", "shell"], false).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SILO_S3_BUCKET"));
    // Neither --tenant nor --all: refused by the parser.
    let out = silo_cli(&env, &["backup", "run"], true).await;
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_scheduler_archives_tenants_idle_longer_than_configured_and_spares_busy_ones() {
    let mut args = crate::common::storage_args();
    args.archive_after_days = Some(7);
    let env = TestEnv::setup().storage_args(args).start().await;
    env.create("idle-one").await;
    env.create("busy-one").await;
    sqlx::query("UPDATE tenants SET created_at = now() - interval '30 days'")
        .execute(env.registry().pool())
        .await
        .unwrap();
    sqlx::query(
        "UPDATE tenants SET last_active_at = now() - interval '8 days' WHERE slug = 'idle-one'",
    )
    .execute(env.registry().pool())
    .await
    .unwrap();
    // App traffic reaches busy-one through the router; its activity is flushed.
    drop(env.router.acquire("busy-one").await.unwrap());
    env.router.flush_activity().await;
    let busy = env.count("SELECT count(*) FROM tenants WHERE slug = 'busy-one' AND last_active_at > now() - interval '1 minute'").await;
    assert_eq!(busy, 1, "router activity is recorded");

    let cancel = tokio_util::sync::CancellationToken::new();
    env.backups()
        .run_due_backups(&Default::default(), &cancel)
        .await
        .unwrap();
    let idle = env.record("idle-one").await;
    let op = env
        .registry()
        .open_operations(silo::domain::OperationKind::TenantArchive, idle.id)
        .await
        .unwrap();
    assert_eq!(op.len(), 1, "an archival started for the idle tenant");
    let op = wait_operation(&env, &serde_json::to_value(&op[0]).unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    assert_eq!(env.record("idle-one").await.status, TenantStatus::Archived);
    assert_eq!(env.record("busy-one").await.status, TenantStatus::Active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_during_archival_puts_the_tenant_back_serving() {
    let env = TestEnv::setup().storage().start().await;
    env.create("half-archived").await;
    let mut conn = env.connect_tenant("half-archived").await.unwrap();
    seed(&mut conn, "h", 20).await;
    let before = contents(&mut conn).await;
    crate::common::close(conn).await;
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("silo.log");
    // The process dies after the archive backup is verified, before the drop.
    let silo = crate::common::Silo::start(&env, Some("archive_backup"), 0, &log).await;
    let (status, op) = silo
        .request(
            Method::POST,
            "/admin/v1/tenants/half-archived/archive",
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{op}");
    silo.expect_abort();
    assert_eq!(
        env.record("half-archived").await.status,
        TenantStatus::Archiving
    );

    let silo = crate::common::Silo::start(&env, None, 0, &log).await;
    let path = format!("/admin/v1/operations/{}", op["id"].as_str().unwrap());
    let mut body = Value::Null;
    for _ in 0..200 {
        body = silo
            .request(Method::GET, &path, None, None)
            .await
            .unwrap()
            .1;
        if body["status"] != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(body["status"], "failed", "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("interrupted"),
        "{body}"
    );
    let t = env.record("half-archived").await;
    assert_eq!(t.status, TenantStatus::Active, "put back as it was");
    let mut conn = env
        .connect_tenant("half-archived")
        .await
        .expect("its role logs in again");
    assert_eq!(contents(&mut conn).await, before);
    crate::common::close(conn).await;
    assert!(env.orphans().await.is_empty(), "{:?}", env.orphans().await);
    silo.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pg_dump_older_than_the_server_is_refused_by_name() {
    // A pg_dump that reports an old version (the machine has only one).
    let bin = tempfile::tempdir().unwrap();
    for tool in ["pg_dump", "pg_restore"] {
        let path = bin.path().join(tool);
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho '{tool} (PostgreSQL) 9.6.24'\n"),
        )
        .unwrap();
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&path, perms).unwrap();
    }
    let mut args = crate::common::storage_args();
    args.pg_bin_dir = Some(bin.path().to_owned());
    let env = TestEnv::setup().storage_args(args).start().await;
    env.create("old-tools").await;
    let t = env.record("old-tools").await;
    let err = env
        .backups()
        .backup_now(t.id, BackupKind::Manual, None)
        .await
        .expect_err("an old pg_dump is refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("9.6.24") && msg.contains("older than the server"),
        "{msg}"
    );
    assert_eq!(env.s3().open_uploads(), 0);
    assert_eq!(
        env.registry().backups_of(t.id, None, 5).await.unwrap()[0].status,
        "failed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_outage_mid_backup_fails_it_and_the_sweep_aborts_its_upload() {
    let mut env = TestEnv::setup().storage().start().await;
    env.create("outage").await;
    let t = env.record("outage").await;
    add_ballast(&env, &t, 48).await;
    env.s3().faults().delay_parts(Duration::from_millis(1500));
    let p = env.backups().clone();
    let id = t.id;
    let backup = tokio::spawn(async move { p.backup_now(id, BackupKind::Manual, None).await });
    wait_for_process("pg_dump", &t.database_name).await;
    // The whole PostgreSQL server (tenant and control databases) goes down mid-dump.
    env.pg.stop().unwrap();
    backup
        .await
        .unwrap()
        .expect_err("the backup cannot succeed without its database");
    env.s3().faults().clear();
    env.pg.start_again().unwrap();
    // The failure could not even be recorded; the sweep repairs it.
    let report = env.control.reconcile_once().await.unwrap();
    assert_eq!(report.backups.backups_abandoned, 1, "{report:?}");
    let b = &env.registry().backups_of(t.id, None, 1).await.unwrap()[0];
    assert_eq!(b.status, "failed");
    assert!(b.error.as_deref().unwrap().contains("interrupted"), "{b:?}");
    assert_eq!(env.s3().open_uploads(), 0, "the upload was aborted");
    assert!(env.stored_objects(t.id).is_empty());
    // And once the database is back, a backup succeeds.
    env.backups()
        .backup_now(t.id, BackupKind::Manual, None)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_upload_no_backup_recorded_is_found_in_the_store_and_aborted() {
    let env = TestEnv::setup().storage().start().await;
    env.create("lost-upload").await;
    let t = env.record("lost-upload").await;
    // What a process that died between opening an upload and recording it
    // leaves: an upload under the tenant's prefix that no backup row names.
    let key = silo::backup::object_keys(t.id, uuid::Uuid::now_v7()).0;
    let store = &env.backups().storage().store;
    store.create_upload(&key, None).await.unwrap();
    assert_eq!(env.s3().open_uploads(), 1);
    let listed = store
        .open_uploads(silo::backup::OBJECT_PREFIX)
        .await
        .unwrap();
    assert_eq!(listed.map(|l| l.len()), Some(1), "the store lists it");

    let report = env.control.reconcile_once().await.unwrap();
    assert_eq!(report.backups.uploads_aborted, 1, "{report:?}");
    assert_eq!(env.s3().open_uploads(), 0, "no upload left open");
    // A running backup's own upload is left alone.
    let (b, lock) = env
        .backups()
        .start_backup(t.id, BackupKind::Manual, None)
        .await
        .unwrap();
    let running = env.backups().run_backup(b, lock, None);
    let sweep = env.control.reconcile_once();
    let (done, report) = tokio::join!(running, sweep);
    done.unwrap();
    assert_eq!(report.unwrap().backups.uploads_aborted, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_never_prunes_the_newest_verified_backup_and_skips_failed_verifications() {
    let mut args = crate::common::storage_args();
    args.backup_keep_last = 1;
    args.backup_keep_daily = 0;
    args.backup_keep_weekly = 0;
    args.backup_keep_monthly = 0;
    let env = TestEnv::setup().storage_args(args).start().await;
    env.create("kept").await;
    let t = env.record("kept").await;
    let mut conn = env.connect_tenant("kept").await.unwrap();
    seed(&mut conn, "x", 20).await;
    crate::common::close(conn).await;
    let backup = || async {
        env.backups()
            .backup_now(t.id, BackupKind::Manual, None)
            .await
            .unwrap()
    };
    // Oldest first: never verified, verified, never verified, then one
    // whose verification fails (its object corrupted behind silo's back).
    let unverified_old = backup().await;
    let verified = backup().await;
    let report = env
        .backups()
        .verify_backup(verified.id, None)
        .await
        .unwrap();
    assert!(report.ok, "{report:?}");
    let unverified = backup().await;
    let bad = backup().await;
    let path = env.s3().object_path(crate::common::BUCKET, &bad.object_key);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&path, bytes).unwrap();
    assert!(env.backups().verify_backup(bad.id, None).await.is_err());

    // Keep the last one: that is `unverified` (the failed verification
    // fills no slot), plus the newest verified one, whatever the policy;
    // the failed one stays a week for inspection.
    let pruned = env.backups().prune_backups(t.id).await.unwrap();
    assert_eq!(pruned, 1);
    let env = &env;
    let status =
        |id: uuid::Uuid| async move { env.registry().backup(id).await.unwrap().unwrap().status };
    assert_eq!(status(unverified_old.id).await, "deleted");
    assert_eq!(status(verified.id).await, "succeeded");
    assert_eq!(status(unverified.id).await, "succeeded");
    assert_eq!(status(bad.id).await, "succeeded");
    // The newest verified backup still restores.
    let restored = env
        .control
        .restore(
            verified.id,
            RestoreTarget::IntoSlug("kept-copy".parse().unwrap()),
            "test",
            None,
        )
        .await
        .unwrap();
    assert_eq!(restored.status, TenantStatus::Active);
    assert_eq!(
        env.stored_objects(t.id).len(),
        6,
        "three backups left, two objects each"
    );
}

/// A backup is restored into its own tenant or into a new one, never into
/// another existing tenant: that tenant's tokens and credentials would then
/// read the backup's data. Refused with 422, `overwrite` or not, the other
/// tenant active or archived, through the API and through the library (the
/// command line's path), and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_is_never_restored_into_another_existing_tenant() {
    let env = TestEnv::setup().storage().start().await;
    let mut before = std::collections::HashMap::new();
    for slug in ["owner", "other", "sleeper"] {
        env.create(slug).await;
        let mut conn = env.connect_tenant(slug).await.unwrap();
        seed(&mut conn, slug, 5).await;
        before.insert(slug, contents(&mut conn).await);
        crate::common::close(conn).await;
    }
    let owner = env.record("owner").await;
    let b = env
        .backups()
        .backup_now(owner.id, BackupKind::Manual, None)
        .await
        .unwrap();
    let (status, op) = env
        .call(Method::POST, "/admin/v1/tenants/sleeper/archive", None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{op}");
    assert_eq!(wait_operation(&env, &op).await["status"], "succeeded");
    let other = env.record("other").await;
    let restores = || {
        env.count(
            "SELECT (SELECT count(*) FROM operations WHERE kind = 'backup.restore')
                  + (SELECT count(*) FROM audit_log WHERE action = 'tenant.restore_requested')",
        )
    };

    for (slug, overwrite) in [
        ("other", true),
        ("other", false),
        ("sleeper", true),
        ("sleeper", false),
    ] {
        let body = json!({"into_slug": slug, "overwrite": overwrite});
        let (status, answer) = env
            .call(
                Method::POST,
                &format!("/admin/v1/backups/{}/restore", b.id),
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
        assert!(
            answer["detail"]
                .as_str()
                .unwrap()
                .contains("another tenant"),
            "{answer}"
        );
    }
    for slug in ["other", "sleeper"] {
        let into = || RestoreTarget::IntoSlug(slug.parse().unwrap());
        let refused = env.control.refuse_restore(b.id, &into(), true).await;
        assert!(
            matches!(refused, Err(silo::ops::Error::Invalid(_))),
            "{refused:?}"
        );
        let restored = env.control.restore(b.id, into(), "test", None).await;
        assert!(
            matches!(restored, Err(silo::ops::Error::Invalid(_))),
            "{restored:?}"
        );
    }

    // Nothing changed: no restore started, the other tenant reads its own
    // rows from the same database, the archived one comes back with its own.
    assert_eq!(restores().await, 0);
    assert_eq!(env.record("other").await.database_name, other.database_name);
    assert_eq!(holds(&env, "other").await, before["other"]);
    assert_eq!(env.record("sleeper").await.status, TenantStatus::Archived);
    let (status, op) = env
        .call(Method::POST, "/admin/v1/tenants/sleeper/restore", None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{op}");
    assert_eq!(wait_operation(&env, &op).await["status"], "succeeded");
    assert_eq!(holds(&env, "sleeper").await, before["sleeper"]);

    // Its own tenant's slug, and a slug no tenant has, still work.
    env.control
        .refuse_restore(
            b.id,
            &RestoreTarget::IntoSlug("owner".parse().unwrap()),
            true,
        )
        .await
        .unwrap();
    let (status, op) = env
        .call(
            Method::POST,
            &format!("/admin/v1/backups/{}/restore", b.id),
            Some(json!({"into_slug": "owner-copy"})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{op}");
    assert_eq!(wait_operation(&env, &op).await["status"], "succeeded");
    assert_eq!(holds(&env, "owner-copy").await, before["owner"]);
}

/// A restore into a new tenant (`into_slug`) holds that tenant suspended
/// until the backup's data is in: nothing written to the empty database
/// meanwhile is set aside by the swap (it was: the new tenant served at
/// once, and what it took landed in the replaced database).
#[tokio::test(flavor = "multi_thread")]
async fn a_restore_into_a_new_tenant_serves_it_only_once_its_data_is_in() {
    let env = TestEnv::setup().storage().start().await;
    env.create("origin").await;
    let mut conn = env.connect_tenant("origin").await.unwrap();
    seed(&mut conn, "origin", 3).await;
    let want = contents(&mut conn).await;
    crate::common::close(conn).await;
    let origin = env.record("origin").await;
    let b = env
        .backups()
        .backup_now(origin.id, BackupKind::Manual, None)
        .await
        .unwrap();

    // The swap waits for the server's maintenance lock, held here: the
    // restore is caught between its new tenant's creation and its data.
    let held = env.registry().lock_server(origin.server_id).await.unwrap();
    let (status, op) = env
        .call(
            Method::POST,
            &format!("/admin/v1/backups/{}/restore", b.id),
            Some(json!({"into_slug": "fresh-copy"})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{op}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let copy = loop {
        if let Some(t) = env.registry().find_tenant("fresh-copy").await.unwrap() {
            if t.status == TenantStatus::Suspended {
                break t;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new tenant never showed, suspended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Its role's login goes just after its status.
    while env.connect_tenant("fresh-copy").await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "its role may still log in"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let token = env.app_token("fresh-copy").await;
    let (status, body) = env
        .call_with(
            Method::POST,
            "/api/v1/patients",
            Some(json!({"full_name": "Written too early"})),
            &[
                ("authorization", &format!("Bearer {token}")),
                ("x-tenant-id", "fresh-copy"),
            ],
        )
        .await;
    assert!(
        status.is_client_error(),
        "no write reaches it yet: {status} {body}"
    );
    held.release().await;

    assert_eq!(wait_operation(&env, &op).await["status"], "succeeded");
    let now = env.record("fresh-copy").await;
    assert_eq!(now.id, copy.id);
    assert_eq!(now.status, TenantStatus::Active);
    assert_eq!(holds(&env, "fresh-copy").await, want);
}

/// A tenant archived while suspended comes back from the archive
/// suspended (it came back active: a way around a suspension, and around
/// the rule that an ended trial is not resumed); `resume` lets it in.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_archived_while_suspended_comes_back_suspended() {
    let env = TestEnv::setup().storage().start().await;
    env.create("benched").await;
    let mut conn = env.connect_tenant("benched").await.unwrap();
    seed(&mut conn, "b", 5).await;
    let before = contents(&mut conn).await;
    crate::common::close(conn).await;
    let run = |path: &'static str| {
        let env = &env;
        async move {
            let (status, op) = env.call(Method::POST, path, Some(json!({}))).await;
            assert!(status.is_success(), "{path}: {status} {op}");
            if status == StatusCode::ACCEPTED {
                let op = wait_operation(env, &op).await;
                assert_eq!(op["status"], "succeeded", "{path}: {op}");
            }
        }
    };
    run("/admin/v1/tenants/benched/suspend").await;
    run("/admin/v1/tenants/benched/archive").await;
    assert_eq!(env.record("benched").await.status, TenantStatus::Archived);
    run("/admin/v1/tenants/benched/restore").await;

    let back = env.record("benched").await;
    assert_eq!(back.status, TenantStatus::Suspended);
    assert!(
        env.connect_tenant("benched").await.is_err(),
        "its role may not log in"
    );
    run("/admin/v1/tenants/benched/resume").await;
    assert_eq!(env.record("benched").await.status, TenantStatus::Active);
    assert_eq!(holds(&env, "benched").await, before);
}

/// silo killed just after a restore swapped its database in: the tenant
/// serves the backup's data, so the operation is settled `succeeded`
/// (it was reported failed, "interrupted", for a restore that took effect).
#[tokio::test(flavor = "multi_thread")]
async fn a_restore_killed_after_its_swap_is_settled_as_succeeded() {
    let env = TestEnv::setup().storage().start().await;
    env.create("swapped").await;
    let mut conn = env.connect_tenant("swapped").await.unwrap();
    seed(&mut conn, "kept", 4).await;
    let want = contents(&mut conn).await;
    let t = env.record("swapped").await;
    env.backups()
        .backup_now(t.id, BackupKind::Manual, None)
        .await
        .unwrap();
    seed(&mut conn, "later", 2).await;
    crate::common::close(conn).await;

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("silo.log");
    let silo = crate::common::Silo::start(&env, Some("restore_swap"), 0, &log).await;
    let (status, op) = silo
        .request(
            reqwest::Method::POST,
            "/admin/v1/tenants/swapped/restore",
            Some(json!({"overwrite": true})),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{op}");
    silo.expect_abort();
    // The restart's pass settles what the dead process left.
    let silo = crate::common::Silo::start(&env, None, 0, &log).await;
    let done = crate::common::wait_op(&env, &op).await;
    silo.stop();
    assert_eq!(done["status"], "succeeded", "{done}");
    let now = env.record("swapped").await;
    assert_ne!(now.database_name, t.database_name);
    assert_eq!(holds(&env, "swapped").await, want);
}

/// silo killed in a restore into a new slug (`into_slug`). Before the
/// backup's data is in, the tenant it created is deleted, so the slug is
/// free for the next try (it was left suspended and empty, holding the
/// slug). After the swap, the tenant is let in with the data (it was left
/// suspended).
#[tokio::test(flavor = "multi_thread")]
async fn a_restore_into_a_new_tenant_killed_midway_frees_the_slug_or_lets_the_tenant_in() {
    let env = TestEnv::setup().storage().start().await;
    let (_, want, b) = backed_up(&env, "source", 3).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("silo.log");
    let path = format!("/admin/v1/backups/{}/restore", b.id);
    let body = json!({"into_slug": "copy"});

    // Killed with the backup restored into a scratch database, before the swap.
    let silo = crate::common::Silo::start(&env, Some("restore_scratch"), 0, &log).await;
    let (status, op) = silo
        .request(reqwest::Method::POST, &path, Some(body.clone()), None)
        .await
        .unwrap();
    assert_eq!(status, 202, "{op}");
    silo.expect_abort();
    let created = env.record("copy").await;
    assert_eq!(created.status, TenantStatus::Suspended);
    let silo = crate::common::Silo::start(&env, None, 0, &log).await;
    let done = crate::common::wait_op(&env, &op).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(
        done["error"].as_str().unwrap().contains("is being deleted"),
        "{done}"
    );
    // The delete it started is finished by a reconcile pass (a final
    // backup, then the drop), as any delete whose process died: this
    // one's, or the restarted silo's (which holds the tenant meanwhile).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let report = env.control.reconcile_once().await.unwrap();
        let now = env.registry().tenant(created.id).await.unwrap().unwrap();
        if now.status == TenantStatus::Deleted {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the tenant the restore created is {}: {:?}",
            now.status.as_str(),
            report.errors
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(env.registry().find_tenant("copy").await.unwrap().is_none());
    // Its database and role are dropped, and so is the scratch database.
    assert_eq!(env.orphans().await, Vec::<String>::new());
    silo.stop();

    // The next try takes the slug again; killed just after its swap.
    let silo = crate::common::Silo::start(&env, Some("restore_swap"), 0, &log).await;
    let (status, op) = silo
        .request(reqwest::Method::POST, &path, Some(body.clone()), None)
        .await
        .unwrap();
    assert_eq!(status, 202, "{op}");
    silo.expect_abort();
    assert_eq!(env.record("copy").await.status, TenantStatus::Suspended);
    let silo = crate::common::Silo::start(&env, None, 0, &log).await;
    let done = crate::common::wait_op(&env, &op).await;
    silo.stop();
    assert_eq!(done["status"], "succeeded", "{done}");
    let copy = env.record("copy").await;
    assert_eq!(copy.status, TenantStatus::Active);
    assert_ne!(copy.id, created.id);
    assert_eq!(holds(&env, "copy").await, want);
}

/// The control database's sessions end under a running restore (a restart
/// or failover of the control cluster): its lease and the tenant's lock are
/// gone, so a sweep may settle it and another replica may act on the tenant.
/// The runner stops where it is, as if its process had died, and changes
/// nothing after (it went on to swap the database in once it could).
#[tokio::test(flavor = "multi_thread")]
async fn a_restore_whose_control_session_ends_stops_and_changes_nothing_after() {
    let env = TestEnv::setup().storage().start().await;
    let (t, _, _) = backed_up(&env, "fenced", 3).await;
    let mut conn = env.connect_tenant("fenced").await.unwrap();
    seed(&mut conn, "later", 2).await;
    crate::common::close(conn).await;
    let want = holds(&env, "fenced").await;

    let holders = || async {
        sqlx::query_scalar::<_, i32>(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted",
        )
        .fetch_all(env.registry().pool())
        .await
        .unwrap()
    };
    // The swap waits for the server's maintenance lock, held here (by a
    // session this test tells apart from silo's).
    let before = holders().await;
    let held = env.registry().lock_server(t.server_id).await.unwrap();
    let mine: Vec<i32> = holders()
        .await
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(mine.len(), 1, "{mine:?}");
    let (status, op) = env
        .call(
            Method::POST,
            "/admin/v1/tenants/fenced/restore",
            Some(json!({"overwrite": true})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{op}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while env
        .count("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        .await
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the restore never reached its swap"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every session of silo's holding a lock ends, as in a restart.
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_locks
          WHERE locktype = 'advisory' AND granted AND pid <> ALL($1)",
    )
    .bind(&mine)
    .execute(env.registry().pool())
    .await
    .unwrap();
    let slots = env.control.ops().slots();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while slots.in_use() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the restore runs on without its lease"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    held.release().await;

    // Nothing was swapped, then or later; a pass settles what it left.
    let report = env.control.reconcile_once().await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let done = crate::common::wait_op(&env, &op).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(
        done["error"].as_str().unwrap().contains("interrupted"),
        "{done}"
    );
    assert_eq!(env.record("fenced").await.database_name, t.database_name);
    assert_eq!(holds(&env, "fenced").await, want);
    assert_eq!(env.orphans().await, Vec::<String>::new());
}

/// A delete asked for while a backup of the tenant runs waits for it, then
/// takes its final backup and drops the tenant: its operation succeeds (it
/// failed at once, "a backup of this tenant is already running", and the
/// reconciler finished the delete later all the same).
#[tokio::test(flavor = "multi_thread")]
async fn a_delete_asked_for_during_a_backup_waits_for_it_and_succeeds() {
    use sqlx::Connection;
    let env = TestEnv::setup().storage().start().await;
    env.create("busy").await;
    let mut conn = env.connect_tenant("busy").await.unwrap();
    seed(&mut conn, "busy", 2).await;
    crate::common::close(conn).await;
    let t = env.record("busy").await;
    // The backup's pg_dump waits for a table lock held here.
    let mut holder = PgConnection::connect(&env.pg.url(&t.database_name))
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE patients IN ACCESS EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .unwrap();
    let (status, backup) = env
        .call(Method::POST, "/admin/v1/tenants/busy/backups", None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{backup}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while env
        .count("SELECT count(*) FROM pg_locks WHERE NOT granted AND relation IS NOT NULL")
        .await
        == 0
    {
        assert!(std::time::Instant::now() < deadline, "pg_dump never waited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, op) = env
        .call(Method::DELETE, "/admin/v1/tenants/busy", None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{op}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .unwrap();
    holder.close().await.unwrap();

    let done = crate::common::wait_op(&env, &op).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(env.registry().find_tenant("busy").await.unwrap().is_none());
    let kinds: Vec<(String, String)> =
        sqlx::query_as("SELECT kind, status FROM backups WHERE tenant_id = $1 ORDER BY started_at")
            .bind(t.id)
            .fetch_all(env.registry().pool())
            .await
            .unwrap();
    assert_eq!(
        kinds,
        [
            ("manual".to_owned(), "succeeded".to_owned()),
            ("final".to_owned(), "succeeded".to_owned())
        ]
    );
}
