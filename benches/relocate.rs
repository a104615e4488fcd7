//! Moving a tenant between servers: how long its writes are frozen, against
//! how long an offline copy would freeze them.
//!
//! `cargo bench --bench relocate` (large tenant `SILO_BENCH_ROWS` patient
//! rows, default 500000; writers `SILO_BENCH_WRITERS`, default 4).
//!
//! Two PostgreSQL clusters with fsync on (the freeze includes real commits).
//! For a small and a large tenant: writers insert patients through the
//! tenant router as fast as they can while silo moves the tenant to the
//! other server. Reported per tenant:
//! - the **write freeze** (silo's own measure, from freezing the tenant to
//!   the registry switch; by phase), and the longest gap between two
//!   successful writes seen by the writers around their refused writes
//!   (the freeze as the application sees it) and elsewhere in the move;
//! - the whole move's duration;
//! - the floor an offline move would freeze writes for: a bare
//!   `pg_dump -Fc | pg_restore` of the same database between the same two
//!   servers, timed just before.
//!
//! The ratio freeze / offline copy is the figure: silo's freeze should not
//! grow with the database.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use silo::domain::Plan;
use silo::embedded::postgres::Durability;
use silo::embedded::EmbeddedPostgres;
use silo::provision::CreateTenant;
use silo::router::{RouteError, RouterConfig, TenantRouter};
use support::{control_plane, env_number, init_logging, load_average, ms};

fn main() -> Result<()> {
    init_logging();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> Result<()> {
    let rows: i64 = env_number("SILO_BENCH_ROWS", 500_000)?;
    let writers: usize = env_number("SILO_BENCH_WRITERS", 4)?;
    println!(
        "relocate benchmark: tenants of 1000 and {rows} rows, {writers} writers; load {}",
        load_average()
    );
    let start = || EmbeddedPostgres::start_temp(Durability::Durable);
    let (a, b) = tokio::join!(
        tokio::task::spawn_blocking(start),
        tokio::task::spawn_blocking(start)
    );
    let (source, target) = (a??, b??);
    let (keyring, registry) = control_plane(&source).await?;
    let p = support::control(&registry, &keyring, 0, None);
    p.ensure_default_server(&source.url("postgres")).await?;
    p.register_server("second", &target.url("postgres"), 100, 1000)
        .await?;
    let router = TenantRouter::new(registry.clone(), keyring, RouterConfig::default());
    let shutdown = tokio_util::sync::CancellationToken::new();
    router.spawn_maintenance(&shutdown, &tokio_util::task::TaskTracker::new());

    println!(
        "\n{:>9} {:>8} {:>12} {:>9} {:>10} {:>11} {:>11} {:>7} {:>8} {:>6}  phases (ms)",
        "rows",
        "MiB",
        "offline (s)",
        "move (s)",
        "freeze ms",
        "freeze gap",
        "other gap",
        "ratio",
        "writes",
        "503s"
    );
    for (slug, n) in [("small", 1_000), ("large", rows)] {
        let t = p
            .provisioner()
            .create(
                &CreateTenant {
                    plan: Plan::parse("premium").unwrap(),
                    server: Some("default".parse()?),
                    ..support::request(slug)
                },
                None,
                "bench",
            )
            .await?;
        let db = sqlx::PgPool::connect(&source.url(&t.database_name)).await?;
        sqlx::query(
            "INSERT INTO patients (id, full_name, email, notes)
             SELECT gen_random_uuid(), 'seed ' || i, 'p' || i || '@example.org', repeat('x', 200)
               FROM generate_series(1, $1) i",
        )
        .bind(n)
        .execute(&db)
        .await?;
        sqlx::query("VACUUM ANALYZE patients").execute(&db).await?;
        let bytes: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
            .fetch_one(&db)
            .await?;
        db.close().await;

        let offline = offline_copy(&source, &target, &t.database_name).await?;

        let stop = Arc::new(AtomicBool::new(false));
        // Every answer a writer got: when, and whether the write was done.
        let events = Arc::new(Mutex::new(Vec::<(Instant, bool)>::new()));
        let tasks: Vec<_> = (0..writers)
            .map(|_| {
                let (router, stop, events) = (router.clone(), stop.clone(), events.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let ok = write_once(&router, slug).await.is_ok();
                        events.lock().unwrap().push((Instant::now(), ok));
                        if !ok {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let moving = Instant::now();
        let op = p
            .mover()
            .start_move(t.id, "second", "bench")
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.detail()))?;
        let done = loop {
            let o = registry.operation(op.id).await?.context("operation")?;
            if o.error.is_some() || o.result.is_some() {
                break o;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            task.await?;
        }
        let events = std::mem::take(&mut *events.lock().unwrap());
        let gaps = Gaps::of(&events, moving);
        let result = done
            .result
            .with_context(|| format!("the move failed: {:?}", done.error))?;
        let freeze_ms = result["freeze_ms"].as_f64().unwrap_or(f64::NAN);
        let move_s = result["duration_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0;
        println!(
            "{:>9} {:>8.1} {:>12.2} {:>9.2} {:>10.1} {:>11.1} {:>11.1} {:>7.3} {:>8} {:>6}  {}",
            n,
            bytes as f64 / 1048576.0,
            offline.as_secs_f64(),
            move_s,
            freeze_ms,
            ms(gaps.freeze),
            ms(gaps.other),
            freeze_ms / ms(offline),
            gaps.ok,
            gaps.refused,
            result["freeze_phases_ms"]
        );
    }
    println!("\nfreeze gap = longest time without a successful write around the refused ones (the freeze as writers see it);");
    println!("other gap = longest time without a successful write elsewhere during the move (copy load, commits);");
    println!("ratio = freeze / offline copy (pg_dump | pg_restore): what an offline move would freeze writes for");
    shutdown.cancel();
    Ok(())
}

/// Longest stretches with no successful write, from the writers' answers.
struct Gaps {
    /// The longest gap that holds refused writes: the freeze as writers see it.
    freeze: Duration,
    /// The longest gap with no refused write, after the move started.
    other: Duration,
    ok: usize,
    refused: usize,
}

impl Gaps {
    fn of(events: &[(Instant, bool)], since: Instant) -> Self {
        let mut events = events.to_vec();
        events.sort_by_key(|e| e.0);
        let mut g = Gaps {
            freeze: Duration::ZERO,
            other: Duration::ZERO,
            ok: events.iter().filter(|e| e.1).count(),
            refused: events.iter().filter(|e| !e.1).count(),
        };
        let mut last_ok: Option<Instant> = None;
        let mut refused_since = false;
        for &(at, ok) in &events {
            if !ok {
                refused_since = true;
                continue;
            }
            if let Some(prev) = last_ok.filter(|p| *p >= since) {
                let gap = at - prev;
                if refused_since {
                    g.freeze = g.freeze.max(gap);
                } else {
                    g.other = g.other.max(gap);
                }
            }
            last_ok = Some(at);
            refused_since = false;
        }
        g
    }
}

/// One patient inserted through the router; an error is a refused write.
async fn write_once(router: &TenantRouter, slug: &str) -> Result<(), RouteError> {
    let mut conn = router.acquire(slug).await?;
    sqlx::query("INSERT INTO patients (id, full_name) VALUES (gen_random_uuid(), 'live write')")
        .execute(&mut *conn)
        .await
        .map_err(|e| RouteError::Internal(e.into()))?;
    Ok(())
}

/// `pg_dump -Fc | pg_restore` of `database` from `source` into a fresh
/// database on `target`, timed; the copy is dropped after.
async fn offline_copy(
    source: &EmbeddedPostgres,
    target: &EmbeddedPostgres,
    database: &str,
) -> Result<Duration> {
    use std::process::Stdio;
    use tokio::process::Command;
    let copy = "bench_offline_copy";
    let admin = sqlx::PgPool::connect(&target.url("postgres")).await?;
    sqlx::query(&format!("CREATE DATABASE {copy}"))
        .execute(&admin)
        .await?;
    let login = |pg: &EmbeddedPostgres, db: &str| -> Result<Vec<(String, String)>> {
        let u = url::Url::parse(&pg.url(db))?;
        Ok(vec![
            ("PGHOST".into(), u.host_str().unwrap_or("127.0.0.1").into()),
            ("PGPORT".into(), u.port().unwrap_or(5432).to_string()),
            ("PGUSER".into(), u.username().into()),
            ("PGPASSWORD".into(), u.password().unwrap_or_default().into()),
            ("PGDATABASE".into(), db.into()),
        ])
    };
    let started = Instant::now();
    let mut dump = Command::new(source.bindir().join("pg_dump"))
        .arg("-Fc")
        .envs(login(source, database)?)
        .stdout(Stdio::piped())
        .spawn()?;
    let out: Stdio = dump.stdout.take().context("pg_dump's output")?.try_into()?;
    let restore = Command::new(target.bindir().join("pg_restore"))
        .args(["--no-owner", "--no-privileges", "-d", copy])
        .envs(login(target, copy)?)
        .stdin(out)
        .status();
    let (dumped, restored) = tokio::join!(dump.wait(), restore);
    anyhow::ensure!(
        dumped?.success() && restored?.success(),
        "offline copy failed"
    );
    let took = started.elapsed();
    sqlx::query(&format!("DROP DATABASE {copy}"))
        .execute(&admin)
        .await?;
    admin.close().await;
    Ok(took)
}
