//! Backup speed and memory, and the scheduler over many small tenants.
//!
//! `cargo bench --bench backup` (tenant size `SILO_BENCH_MB`, default 300;
//! small tenants `SILO_BENCH_TENANTS`, default 1000), or
//! `cargo bench --bench backup -- bounded` for part 3 alone.
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
//! 3. **Bounded work** (`-- bounded`): a tenant set of `SILO_BENCH_SET_MB`
//!    MiB (default 1024) over `SILO_BENCH_SET_TENANTS` tenants (default 50),
//!    incompressible rows, and a real `silo serve` process (the bench build
//!    of the binary, default settings: `SILO_BACKUP_CONCURRENCY` 4, parts
//!    of at most 16 MiB, 3 in flight). One backup per tenant is asked for
//!    at once over HTTP; the bench polls the registry and the server's
//!    sessions until all are done and reports the most seen running at
//!    once, the queue, the wall time and the process's peak RSS (`VmHWM`)
//!    against the README's bound.
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
    if std::env::args().any(|a| a == "bounded") {
        return bounded().await;
    }
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

/// Part 3: one backup per tenant of a large tenant set, all asked for at
/// once, against a `silo serve` process with the default settings.
async fn bounded() -> Result<()> {
    use futures::future::join_all;

    const MIB: u64 = 1024 * 1024;
    /// The README's fixed footprint of a silo process.
    const FIXED_FOOTPRINT: u64 = 64 * MIB;
    let set_mb: usize = env_number("SILO_BENCH_SET_MB", 1024)?;
    let tenants: usize = env_number("SILO_BENCH_SET_TENANTS", 50)?;
    let slots: usize = silo::config::DEFAULT_BACKUP_CONCURRENCY as usize;
    let max_part = u64::from(silo::config::DEFAULT_BACKUP_MAX_PART_MIB) * MIB;
    let in_flight = silo::config::DEFAULT_PARTS_IN_FLIGHT;
    println!(
        "bounded backups: {tenants} tenants, {set_mb} MiB in all, asked for at once; load {}",
        load_average()
    );
    let pg = tokio::task::spawn_blocking(|| EmbeddedPostgres::start_temp(Durability::Throwaway))
        .await??;
    silo::cli::ensure_database(&pg.url("postgres"), "silo_control").await?;
    let dir = tempfile::tempdir()?;
    let secret = "bench-secret-0123456789";
    let s3 = EmbeddedS3::start(dir.path(), "bench", secret).await?;
    let config = silo::backup::StoreConfig {
        bucket: "bench".into(),
        endpoint: Some(s3.endpoint()),
        region: "us-east-1".into(),
        force_path_style: true,
        checksums: Default::default(),
        static_credentials: Some(("bench".into(), silo::config::Secret::new(secret))),
    };
    silo::backup::Store::connect(&config)
        .await?
        .ensure_bucket()
        .await?;

    let port = silo::embedded::postgres::free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    let log = dir.path().join("silo.log");
    let out = std::fs::File::create(&log)?;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_silo"))
        .arg("serve")
        .env("SILO_DATABASE_URL", pg.url("silo_control"))
        .env("SILO_TENANT_SERVER_URL", pg.url("postgres"))
        .env("SILO_MASTER_KEY", silo::crypto::Keyring::generate_base64())
        .env("SILO_ADMIN_TOKEN", support::ADMIN_TOKEN)
        .env("SILO_LISTEN", format!("127.0.0.1:{port}"))
        .env("SILO_WARM_POOL_SIZE", "0")
        .env("SILO_S3_BUCKET", "bench")
        .env("SILO_S3_ENDPOINT", s3.endpoint())
        .env("SILO_S3_FORCE_PATH_STYLE", "true")
        .env("AWS_ACCESS_KEY_ID", "bench")
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "warn")
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("start silo serve")?;
    let pid = child.id();
    let http = reqwest::Client::new();
    let started = Instant::now();
    while http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .map_or(true, |r| !r.status().is_success())
    {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "silo did not start; see {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let post = |path: String, body: Option<serde_json::Value>| {
        let req = http
            .post(format!("{base}{path}"))
            .bearer_auth(support::ADMIN_TOKEN)
            .timeout(Duration::from_secs(120));
        let req = match body {
            Some(b) => req.json(&b),
            None => req,
        };
        async move {
            let res = req.send().await?;
            let status = res.status();
            let body: serde_json::Value = res.json().await.unwrap_or_default();
            anyhow::ensure!(status.is_success(), "POST {path}: {status} {body}");
            anyhow::Ok(body)
        }
    };

    // The tenant set, filled with random bytes by COPY.
    let started = Instant::now();
    let slugs: Vec<String> = (0..tenants).map(|i| format!("set-{i:03}")).collect();
    let mut databases = Vec::new();
    for chunk in slugs.chunks(5) {
        for t in join_all(chunk.iter().map(|s| {
            post(
                "/admin/v1/tenants".into(),
                Some(serde_json::json!({"slug": s, "name": s})),
            )
        }))
        .await
        {
            databases.push(
                t?["database"]
                    .as_str()
                    .context("a database name")?
                    .to_owned(),
            );
        }
    }
    let per_tenant = set_mb / tenants.max(1);
    for chunk in databases.chunks(4) {
        for filled in join_all(chunk.iter().map(|db| fill(&pg, db, per_tenant))).await {
            filled?;
        }
    }
    let mut admin = sqlx::PgConnection::connect(&pg.url("postgres")).await?;
    let total: i64 = sqlx::query_scalar(
        "SELECT sum(pg_database_size(datname))::bigint FROM pg_database WHERE datname LIKE 'silo\\_t\\_%'",
    )
    .fetch_one(&mut admin)
    .await?;
    let idle = memory_of(pid);
    println!(
        "tenant set: {tenants} databases, {} MiB in all, ready in {:.1} s; silo RSS idle {} MiB",
        total >> 20,
        started.elapsed().as_secs_f64(),
        idle.1 >> 20
    );

    // All at once.
    let asked = Instant::now();
    let answers = join_all(
        slugs
            .iter()
            .map(|s| post(format!("/admin/v1/tenants/{s}/backups"), None)),
    )
    .await;
    let mut ids = Vec::new();
    let mut queued_answers = 0;
    for a in answers {
        let a = a?;
        if a["status"] == "queued" {
            queued_answers += 1;
        }
        ids.push(uuid::Uuid::parse_str(
            a["id"].as_str().context("a backup id")?,
        )?);
    }
    let answered = asked.elapsed();
    let registry = silo::registry::Registry::connect_lazy(&pg.url("silo_control"))?;
    let (mut most_running, mut most_dumps, mut most_queued, mut most_rss) =
        (0i64, 0i64, 0i64, 0u64);
    let statuses = loop {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT status, count(*) FROM backups WHERE id = ANY($1) GROUP BY status",
        )
        .bind(&ids)
        .fetch_all(registry.pool())
        .await?;
        let get = |s: &str| rows.iter().find(|(k, _)| k == s).map_or(0, |(_, n)| *n);
        let dumps: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'silo-backup'",
        )
        .fetch_one(&mut admin)
        .await?;
        most_running = most_running.max(get("running"));
        most_queued = most_queued.max(get("queued"));
        most_dumps = most_dumps.max(dumps);
        most_rss = most_rss.max(memory_of(pid).1);
        if get("running") == 0 && get("queued") == 0 {
            break rows;
        }
        anyhow::ensure!(
            asked.elapsed() < Duration::from_secs(1800),
            "backups still going: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = asked.elapsed();
    let (peak, _) = memory_of(pid);
    let stored: (i64, i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(size_bytes), 0)::bigint, coalesce(max(parts), 0)::bigint, coalesce(max(part_size), 0)::bigint
           FROM backups WHERE id = ANY($1)",
    )
    .bind(&ids)
    .fetch_one(registry.pool())
    .await?;
    let per_backup = silo::backup::memory_per_backup(max_part, in_flight);
    let bound = FIXED_FOOTPRINT + slots as u64 * per_backup;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .ok();
    child.wait()?;
    println!(
        "{tenants} backups asked at once (answered in {:.2} s, {queued_answers} queued): {statuses:?} in {:.1} s",
        answered.as_secs_f64(),
        took.as_secs_f64()
    );
    println!(
        "at once: at most {most_running} running, {most_dumps} pg_dump sessions (limit {slots}); up to {most_queued} queued"
    );
    println!(
        "stored {} MiB; largest backup {} parts of {} MiB",
        stored.0 >> 20,
        stored.1,
        stored.2 >> 20
    );
    println!(
        "silo RSS: idle {} MiB, peak (VmHWM) {} MiB, highest sampled {} MiB; README bound {} MiB = {} + {slots} × {:.1} MiB",
        idle.1 >> 20,
        peak >> 20,
        most_rss >> 20,
        bound >> 20,
        FIXED_FOOTPRINT >> 20,
        per_backup as f64 / MIB as f64
    );
    println!(
        "\n| tenants | data | slots | most running | most queued | wall time | peak RSS | bound |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {tenants} | {} MiB | {slots} | {most_running} | {most_queued} | {:.1} s | {} MiB | {} MiB |",
        total >> 20,
        took.as_secs_f64(),
        peak >> 20,
        bound >> 20
    );
    anyhow::ensure!(
        most_running <= slots as i64 && most_dumps <= slots as i64,
        "more than {slots} ran at once"
    );
    anyhow::ensure!(peak < bound, "peak RSS over the bound");
    Ok(())
}

/// `mib` MiB of random bytes into a `ballast` table, by COPY.
async fn fill(pg: &EmbeddedPostgres, db: &str, mib: usize) -> Result<()> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    use rand::RngCore;
    let mut conn = sqlx::PgConnection::connect(&pg.url(db)).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS ballast (id serial PRIMARY KEY, data bytea NOT NULL)")
        .execute(&mut conn)
        .await?;
    let mut copy = conn.copy_in_raw("COPY ballast (data) FROM STDIN").await?;
    let mut row = vec![0u8; 64 * 1024];
    for _ in 0..mib * 16 {
        rand::thread_rng().fill_bytes(&mut row);
        let mut line = Vec::with_capacity(row.len() * 2 + 4);
        line.extend_from_slice(b"\\\\x");
        for b in &row {
            line.push(HEX[(b >> 4) as usize]);
            line.push(HEX[(b & 15) as usize]);
        }
        line.push(b'\n');
        copy.send(line).await?;
    }
    copy.finish().await?;
    conn.close().await.ok();
    Ok(())
}

/// (`VmHWM`, `VmRSS`) of a process, bytes.
fn memory_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmHWM:"), field("VmRSS:"))
}
