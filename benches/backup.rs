//! Backup speed and memory, and the scheduler over many small tenants.
//!
//! `cargo bench --bench backup` (tenant size `SILO_BENCH_MB`, default 300;
//! small tenants `SILO_BENCH_TENANTS`, default 1000).
//!
//! 1. **One large tenant**: a database of about `SILO_BENCH_MB` MB (clinic
//!    rows plus incompressible ballast, the worst case for upload volume) is
//!    backed up by silo (pg_dump → encryption → SHA-256 → multipart upload to
//!    the embedded S3 store over HTTP) and, interleaved, dumped by a bare
//!    `pg_dump -Fc > /dev/null`: the floor. Peak RSS of this process is
//!    sampled every 10 ms during each silo backup. The database is then
//!    grown to three times the size and both are measured again: the peak
//!    should not move.
//! 2. **The scheduler**: `SILO_BENCH_TENANTS` small tenants are due at once;
//!    one tick (`run_due_backups`, `SILO_BACKUP_CONCURRENCY` at a time, 4 by
//!    default) backs them all up. Timed from the tick's start to its end.
//!
//! The cluster runs with fsync off (like the tests) so that building the
//! fixture does not dominate; pg_dump reads, silo's pipeline and the store's
//! writes are what is timed.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use silo::backup::BackupKind;
use silo::control::ControlPlane;
use silo::embedded::postgres::Durability;
use silo::embedded::{EmbeddedPostgres, EmbeddedS3};
use sqlx::Connection;
use support::{control_plane, env_number, init_logging, load_average};

fn main() -> Result<()> {
    init_logging();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> Result<()> {
    let mb: usize = env_number("SILO_BENCH_MB", 300)?;
    let tenants: usize = env_number("SILO_BENCH_TENANTS", 1000)?;
    println!(
        "backup benchmark: {mb} MB tenant (then {}), {tenants} small tenants; load {}",
        3 * mb,
        load_average()
    );
    let pg = tokio::task::spawn_blocking(|| EmbeddedPostgres::start_temp(Durability::Throwaway))
        .await??;
    let (keyring, registry) = control_plane(&pg).await?;
    let dir = tempfile::tempdir()?;
    let s3 = EmbeddedS3::start(dir.path(), "bench", "bench-secret-0123456789").await?;
    let mut args = silo::config::StorageArgs::from_env()?;
    args.s3_bucket = Some("bench".into());
    let config = silo::backup::StoreConfig {
        bucket: "bench".into(),
        endpoint: Some(s3.endpoint()),
        region: "us-east-1".into(),
        force_path_style: true,
        checksums: args.s3_checksums,
        static_credentials: Some((
            "bench".into(),
            silo::config::Secret::new("bench-secret-0123456789"),
        )),
    };
    let storage = silo::backup::Storage::connect(&config, &args).await?;
    storage.store.ensure_bucket().await?;
    let p = support::control(&registry, &keyring, 0, Some(storage));
    p.ensure_default_server(&pg.url("postgres")).await?;

    // 1. One large tenant, then three times larger.
    let big = create(&p, "big").await?;
    grow(&pg, &big.database_name, mb).await?;
    let size_1 = db_size(&pg, &big.database_name).await?;
    let first = measure(&p, &pg, &big, 2).await?;
    grow(&pg, &big.database_name, 2 * mb).await?;
    let size_3 = db_size(&pg, &big.database_name).await?;
    let third = measure(&p, &pg, &big, 1).await?;
    println!();
    println!("| database | pg_dump -Fc > /dev/null | silo backup | ratio | stored | parts × size | peak RSS during backup |");
    println!("|---|---|---|---|---|---|---|");
    for (size, m) in [(size_1, &first), (size_3, &third)] {
        println!(
            "| {} MiB | {:.2} s | {:.2} s | {:.2}× | {} MiB | {} × {} MiB | {} MiB (+{} MiB over idle) |",
            size >> 20,
            m.baseline.as_secs_f64(),
            m.silo.as_secs_f64(),
            m.silo.as_secs_f64() / m.baseline.as_secs_f64(),
            m.stored >> 20,
            m.parts,
            m.part_size >> 20,
            m.peak_rss >> 20,
            m.peak_rss.saturating_sub(m.idle_rss) >> 20,
        );
    }

    // 2. The scheduler over many small tenants.
    let started = Instant::now();
    for i in 0..tenants {
        create(&p, &format!("small-{i:04}")).await?;
    }
    println!(
        "\ncreated {tenants} small tenants in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    sqlx::query("UPDATE tenants SET created_at = now() - interval '3 years', backup_schedule = '0 0 0 * * 0' WHERE slug LIKE 'small-%'")
        .execute(p.registry().pool())
        .await?;
    sqlx::query("UPDATE tenants SET status = 'suspended' WHERE slug = 'big'")
        .execute(p.registry().pool())
        .await?;
    let guard = Default::default();
    let cancel = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let report = p.backups()?.run_due_backups(&guard, &cancel).await?;
    let took = started.elapsed();
    println!(
        "scheduler: {} due, {} succeeded, {} failed in {:.1} s ({:.1} tenants/s, concurrency {}); target ≤ 300 s",
        report.due,
        report.succeeded,
        report.failed,
        took.as_secs_f64(),
        report.succeeded as f64 / took.as_secs_f64(),
        p.backups()?.settings().concurrency,
    );
    Ok(())
}

async fn create(p: &ControlPlane, slug: &str) -> Result<silo::registry::TenantRecord> {
    let req = support::request(slug);
    Ok(p.provisioner().create(&req, None, "bench").await?)
}

/// Add about `mb` MB: clinic rows (compressible) and random bytes (not).
async fn grow(pg: &EmbeddedPostgres, db: &str, mb: usize) -> Result<()> {
    let mut conn = sqlx::PgConnection::connect(&pg.url(db)).await?;
    sqlx::raw_sql(&format!(
        "CREATE TABLE IF NOT EXISTS ballast (id serial PRIMARY KEY, data bytea NOT NULL);
         INSERT INTO ballast (data)
           SELECT decode(string_agg(md5(random()::text || g::text || r::text), ''), 'hex')
             FROM generate_series(1, {ballast_rows}) r, generate_series(1, 4096) g GROUP BY r;
         INSERT INTO patients (full_name, date_of_birth, notes)
           SELECT 'Patient ' || g, date '1950-01-01' + (g % 20000), repeat('follow-up visit notes ', 20)
             FROM generate_series(1, {patients}) g;
         CHECKPOINT;",
        // Half the size each: 64 KiB per ballast row, ~0.5 KiB per patient row.
        ballast_rows = mb * 8,
        patients = mb * 1000,
    ))
    .execute(&mut conn)
    .await
    .context("grow the benchmark tenant")?;
    conn.close().await.ok();
    Ok(())
}

async fn db_size(pg: &EmbeddedPostgres, db: &str) -> Result<u64> {
    let mut conn = sqlx::PgConnection::connect(&pg.url("postgres")).await?;
    let n: i64 = sqlx::query_scalar("SELECT pg_database_size($1)")
        .bind(db)
        .fetch_one(&mut conn)
        .await?;
    Ok(n as u64)
}

struct Measured {
    baseline: Duration,
    silo: Duration,
    stored: u64,
    parts: i32,
    part_size: u64,
    peak_rss: u64,
    idle_rss: u64,
}

/// Best of `rounds` interleaved runs of each.
async fn measure(
    p: &ControlPlane,
    pg: &EmbeddedPostgres,
    t: &silo::registry::TenantRecord,
    rounds: usize,
) -> Result<Measured> {
    let mut best: Option<Measured> = None;
    for _ in 0..rounds {
        let started = Instant::now();
        let status = tokio::process::Command::new(pg.bindir().join("pg_dump"))
            .args(["--format=custom", "--no-password"])
            .arg(format!("--dbname={}", pg.url(&t.database_name)))
            .stdout(std::process::Stdio::null())
            .status()
            .await?;
        anyhow::ensure!(status.success(), "pg_dump failed");
        let baseline = started.elapsed();

        let idle_rss = rss();
        let peak = Arc::new(AtomicU64::new(idle_rss));
        let stop = tokio_util::sync::CancellationToken::new();
        let sampler = {
            let (peak, stop) = (peak.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    peak.fetch_max(rss(), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        let started = Instant::now();
        let b = p
            .backups()?
            .backup_now(t.id, BackupKind::Manual, None)
            .await?;
        let silo = started.elapsed();
        stop.cancel();
        sampler.await?;
        println!(
            "  run: pg_dump {:.2} s, silo {:.2} s, peak RSS {} MiB",
            baseline.as_secs_f64(),
            silo.as_secs_f64(),
            peak.load(Ordering::Relaxed) >> 20
        );
        let m = Measured {
            baseline,
            silo,
            stored: b.size_bytes.unwrap_or(0) as u64,
            parts: b.parts.unwrap_or(0),
            part_size: b.part_size.unwrap_or(0) as u64,
            peak_rss: peak.load(Ordering::Relaxed),
            idle_rss,
        };
        // Fastest of each, highest memory peak of all.
        best = Some(match best {
            Some(prev) => Measured {
                baseline: prev.baseline.min(m.baseline),
                silo: prev.silo.min(m.silo),
                peak_rss: prev.peak_rss.max(m.peak_rss),
                idle_rss: prev.idle_rss.min(m.idle_rss),
                ..m
            },
            None => m,
        });
    }
    best.context("at least one round")
}

/// Resident set size of this process, bytes.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
