//! The usage collector at fleet size: one pass over `SILO_BENCH_TENANTS`
//! tenants (default 10,000) on two tenant servers, and `/metrics` at that
//! many tenants.
//!
//! `TMPDIR=/dev/shm cargo bench --bench usage` (real databases per server
//! `SILO_BENCH_REAL`, default `50,100,200`: measured at each count in turn).
//!
//! An empty PostgreSQL database takes about 7.5 MB, so 10,000 real ones do
//! not fit on the bench machine. Every tenant is registered in the control
//! DB (spread over the two servers, as silo places them), but only the
//! first `SILO_BENCH_REAL` per server get a real database and role; the
//! rest name databases that do not exist, which the collector's one query
//! per server still carries (the names of all 5,000) but finds nothing for.
//! What grows with real databases is that query (`pg_database_size` walks
//! each database's files): it is timed at each count and fitted with a
//! line, and the pass at 10,000 real databases is the fitted server query
//! at 5,000 per server (the two run at once) plus the control-DB work,
//! which is measured at full size (10,000 targets read, 10,000 samples
//! written in bulk). The figures say which are measured and which are
//! extrapolated.
//!
//! Queries per server are counted twice: by the collector's own report, and
//! on the second server (which holds no control DB) from PostgreSQL's
//! transaction counter of the maintenance database around a pass.

mod support;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use silo::embedded::postgres::Durability;
use silo::embedded::EmbeddedPostgres;
use silo::registry::{PassRecord, UsageSample};
use sqlx::PgPool;
use support::{control_plane, env_number, init_logging, load_average, ms};
use uuid::Uuid;

fn main() -> Result<()> {
    init_logging();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> Result<()> {
    let tenants: usize = env_number("SILO_BENCH_TENANTS", 10_000)?;
    let steps: Vec<usize> = std::env::var("SILO_BENCH_REAL")
        .unwrap_or_else(|_| "50,100,200".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .context("SILO_BENCH_REAL: counts per server, like 50,100,200")
        })
        .collect::<Result<_>>()?;
    ensure!(tenants >= 2 && !steps.is_empty(), "nothing to measure");
    // The recorder first: what the passes publish must reach /metrics.
    let _ = silo::telemetry::metrics_handle();
    ensure!(
        steps.windows(2).all(|w| w[0] < w[1]) && steps.last().unwrap() * 2 <= tenants,
        "SILO_BENCH_REAL must grow and fit in SILO_BENCH_TENANTS / 2"
    );
    println!(
        "usage benchmark: {tenants} tenants on 2 servers, real databases per server {steps:?}; load {}",
        load_average()
    );
    let start = || EmbeddedPostgres::start_temp(Durability::Throwaway);
    let (a, b) = tokio::join!(
        tokio::task::spawn_blocking(start),
        tokio::task::spawn_blocking(start)
    );
    let (first, second) = (a??, b??);
    let (keyring, registry) = control_plane(&first).await?;
    let p = support::control(&registry, &keyring, 0, None);
    p.ensure_default_server(&first.url("postgres")).await?;
    let other = p
        .register_server("second", &second.url("postgres"), 100, 100_000)
        .await?;
    let servers = registry.servers().await?;
    let main = servers
        .iter()
        .find(|s| s.id != other.id)
        .context("the first server")?;
    let ids = [main.id, other.id];

    // Every tenant registered, alternating servers (as least-loaded placement does).
    let setup = Instant::now();
    sqlx::query(
        "INSERT INTO tenants (id, slug, name, plan, status, server_id, database_name, role_name,
                              password_enc, key_id, own_privileges, grants_version, schema_version)
         SELECT gen_random_uuid(), 'u-' || lpad(i::text, 6, '0'), 'Bench ' || i, 'standard', 'active',
                CASE WHEN i % 2 = 0 THEN $2 ELSE $3 END,
                'silo_t_bench_' || i, 'silo_r_bench_' || i, '\\x00'::bytea, 'bench', true, 1, 1
           FROM generate_series(0, $1 - 1) AS i",
    )
    .bind(tenants as i64)
    .bind(ids[0])
    .bind(ids[1])
    .execute(registry.pool())
    .await
    .context("register the tenants")?;
    println!(
        "[setup] {tenants} tenants registered in {:.1} s",
        setup.elapsed().as_secs_f64()
    );

    let pools = [admin_pool(&first).await?, admin_pool(&second).await?];
    // The names each server's query carries: all of its registered tenants.
    let mut targets: [(Vec<Uuid>, Vec<String>, Vec<String>); 2] = Default::default();
    let rows: Vec<(Uuid, Uuid, String, String)> = sqlx::query_as(
        "SELECT id, server_id, database_name, role_name FROM tenants ORDER BY server_id, id",
    )
    .fetch_all(registry.pool())
    .await?;
    for (id, server, db, role) in rows {
        let t = &mut targets[usize::from(server == ids[1])];
        t.0.push(id);
        t.1.push(db);
        t.2.push(role);
    }

    println!(
        "\n{:>10} {:>14} {:>14} {:>12} {:>10} {:>14}",
        "real/srv", "server query", "per real db", "pass (s)", "queries", "seen on srv 2"
    );
    let mut made = 0;
    let mut fit: Vec<(f64, f64)> = Vec::new();
    let mut last_pass = Duration::ZERO;
    for &real in &steps {
        let creating = Instant::now();
        let (x, y) = tokio::join!(
            make_databases(&pools[0], 0, made, real),
            make_databases(&pools[1], 1, made, real)
        );
        x?;
        y?;
        made = real;
        eprintln!(
            "[setup] {} real databases per server in {:.1} s",
            real,
            creating.elapsed().as_secs_f64()
        );
        // The server query alone, as the collector sends it: best of 5.
        let mut best = Duration::MAX;
        for _ in 0..5 {
            let t0 = Instant::now();
            let (x, y) = tokio::join!(
                read_server(&pools[0], &targets[0]),
                read_server(&pools[1], &targets[1])
            );
            ensure!(
                x? == real && y? == real,
                "the query found another number of databases"
            );
            best = best.min(t0.elapsed());
        }
        // A whole pass (the second after new databases: the first sets baselines).
        p.collect_usage_once().await?.context("no pass ran")?;
        let before = settled(&pools[1]).await?;
        let report = p.collect_usage_once().await?.context("no pass ran")?;
        let after = settled(&pools[1]).await?;
        // Less this process's reads: the last before the pass, and all but
        // the last after it.
        let seen = match (before, after) {
            (Some((before, _)), Some((after, reads))) => (after - before - reads).to_string(),
            _ => "unsettled".to_owned(),
        };
        ensure!(
            report.measured == real * 2,
            "measured {} of {}",
            report.measured,
            real * 2
        );
        let queries = report
            .queries_per_server
            .values()
            .copied()
            .max()
            .unwrap_or(0);
        last_pass = report.duration;
        println!(
            "{:>10} {:>11.1} ms {:>11.3} ms {:>12.2} {:>10} {:>14}",
            real,
            ms(best),
            ms(best) / real as f64,
            report.duration.as_secs_f64(),
            queries,
            seen
        );
        fit.push((real as f64, ms(best)));
        if std::env::var_os("SILO_BENCH_EXPLAIN").is_some() {
            let plan: Vec<String> = sqlx::query_scalar(&format!(
                "EXPLAIN (ANALYZE, TIMING OFF) {}",
                silo::usage::READ_SERVER
            ))
            .bind(&targets[1].0)
            .bind(&targets[1].1)
            .bind(&targets[1].2)
            .fetch_all(&pools[1])
            .await?;
            eprintln!("{}", plan.join("\n"));
        }
    }

    // The server query at 5,000 real databases per server, by a least-squares line.
    let (slope, intercept) = least_squares(&fit);
    let per_server = tenants as f64 / 2.0;
    let fitted = intercept + slope * per_server;
    // The conservative figure: every millisecond of the largest count's
    // query taken as per-database cost (no fixed part), times 5,000.
    let (x, y) = *fit.last().unwrap();
    let server_at_full = (y / x * per_server).max(fitted);
    println!(
        "\n[fit] server query ≈ {intercept:.1} ms + {slope:.3} ms × real databases → {fitted:.0} ms at {per_server} per server; \
         all of it per database ({:.3} ms each) → {:.0} ms; taken: {server_at_full:.0} ms (extrapolated)",
        y / x,
        y / x * per_server
    );

    // The control-DB side at full size, measured: every target read, every
    // sample written in bulk, top-N and totals for /metrics.
    let t0 = Instant::now();
    let all = registry.usage_targets().await?;
    let read_targets = t0.elapsed();
    ensure!(all.len() == tenants, "read {} targets", all.len());
    let samples: Vec<UsageSample> = all
        .iter()
        .enumerate()
        .map(|(i, t)| UsageSample {
            tenant: t.id,
            size_bytes: Some(7_500_000 + i as i64 * 1000),
            connections: (i % 5) as i32,
            server_id: t.server_id,
            datid: 100_000 + i as i64,
            stats_reset: None,
            raw_commits: 1000 + i as i64,
            raw_rollbacks: i as i64 % 7,
            raw_rows_written: 5000 + i as i64,
            commits: 10,
            rollbacks: 1,
            rows_written: 50,
        })
        .collect();
    let t0 = Instant::now();
    registry
        .record_usage(
            &samples,
            "bench",
            chrono::Utc::now(),
            &PassRecord::default(),
        )
        .await?;
    let write = t0.elapsed();
    // Requests of every tenant, as the routers' flush adds them.
    let counts: Vec<(Uuid, i64, i64)> = all
        .iter()
        .enumerate()
        .map(|(i, t)| (t.id, i as i64, 0))
        .collect();
    let t0 = Instant::now();
    registry.add_requests(&counts).await?;
    let flush = t0.elapsed();
    let t0 = Instant::now();
    p.usage().publish(silo::usage::DEFAULT_TOP_N).await?;
    let publish = t0.elapsed();
    let t0 = Instant::now();
    registry.prune_usage(silo::usage::DEFAULT_KEEP_DAYS).await?;
    let prune = t0.elapsed();
    let control_side = read_targets + write + publish + prune;
    println!(
        "[control DB, measured at {tenants}] targets read {:.0} ms, samples written {:.0} ms, \
         top-N and totals {:.0} ms, prune {:.0} ms (a router's flush of {tenants} tenants' requests: {:.0} ms)",
        ms(read_targets),
        ms(write),
        ms(publish),
        ms(prune),
        ms(flush)
    );
    let pass_at_full = server_at_full / 1000.0 + control_side.as_secs_f64();
    println!(
        "[pass at {tenants} real databases, extrapolated] ≈ {pass_at_full:.2} s \
         (server query {:.2} s + control DB {:.2} s); target ≤ 10 s; last measured pass {:.2} s at {} real",
        server_at_full / 1000.0,
        control_side.as_secs_f64(),
        last_pass.as_secs_f64(),
        made * 2
    );

    // /metrics of a silo serving this control DB, every tenant with usage.
    let server = support::SiloServer::start(p.clone(), 0).await?;
    let body = reqwest_metrics(server.addr).await?;
    let tenant_series = body
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("tenant"))
        .count();
    println!(
        "[/metrics at {tenants} tenants] {} bytes ({:.1} KiB), {} lines, {} per-tenant series; target ≤ 1 MiB",
        body.len(),
        body.len() as f64 / 1024.0,
        body.lines().count(),
        tenant_series
    );
    ensure!(body.len() <= 1 << 20, "/metrics is over 1 MiB");
    let _ = server.stop.send(());
    let _ = server.task.await;
    Ok(())
}

async fn admin_pool(pg: &EmbeddedPostgres) -> Result<PgPool> {
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&pg.url("postgres"))
        .await?)
}

/// Real databases and roles for this server's tenants `from..to` (the
/// tenants alternate servers: tenant `2k + server`).
async fn make_databases(pool: &PgPool, server: usize, from: usize, to: usize) -> Result<()> {
    for k in from..to {
        let i = 2 * k + server;
        let (db, role) = (format!("silo_t_bench_{i}"), format!("silo_r_bench_{i}"));
        sqlx::raw_sql(&format!("CREATE ROLE \"{role}\" LOGIN CONNECTION LIMIT 20"))
            .execute(pool)
            .await?;
        sqlx::raw_sql(&format!(
            "CREATE DATABASE \"{db}\" TEMPLATE template0 STRATEGY FILE_COPY"
        ))
        .execute(pool)
        .await?;
        sqlx::raw_sql(&format!(
            "REVOKE ALL ON DATABASE \"{db}\" FROM PUBLIC; GRANT CONNECT, TEMPORARY ON DATABASE \"{db}\" TO \"{role}\""
        ))
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// The collector's statistics query over this server's tenants: the rows found.
async fn read_server(pool: &PgPool, t: &(Vec<Uuid>, Vec<String>, Vec<String>)) -> Result<usize> {
    let rows = sqlx::query(silo::usage::READ_SERVER)
        .bind(&t.0)
        .bind(&t.1)
        .bind(&t.2)
        .fetch_all(pool)
        .await?;
    Ok(rows.len())
}

/// Transactions of the maintenance database so far (each statement the
/// collector sends it is one).
async fn commits(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT (xact_commit + xact_rollback)::int8 FROM pg_stat_database WHERE datname = 'postgres'",
    )
    .fetch_one(pool)
    .await?)
}

/// The maintenance database's transaction counter once PostgreSQL's
/// statistics have caught up (a session reports at most once a second, an
/// idle one within 10 s): read until only this process's own previous read
/// grew it. The value, and how many reads it took (each a transaction that
/// the value does not hold yet).
/// `None` when other sessions (autovacuum, say) kept it moving.
async fn settled(pool: &PgPool) -> Result<Option<(i64, i64)>> {
    let mut last = commits(pool).await?;
    let mut reads = 1;
    loop {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let now = commits(pool).await?;
        reads += 1;
        if now == last + 1 {
            return Ok(Some((now, reads)));
        }
        last = now;
        if reads >= 15 {
            return Ok(None);
        }
    }
}

fn least_squares(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    if points.len() < 2 {
        let (x, y) = points[0];
        return (y / x, 0.0);
    }
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let sxy: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let sxx: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    let slope = sxy / sxx;
    (slope, my - slope * mx)
}

/// `GET /metrics` with the admin token, as a scraper would.
async fn reqwest_metrics(addr: std::net::SocketAddr) -> Result<String> {
    let res = reqwest::Client::new()
        .get(format!("http://{addr}/metrics"))
        .bearer_auth(support::ADMIN_TOKEN)
        .send()
        .await?;
    ensure!(
        res.status().is_success(),
        "/metrics answered {}",
        res.status()
    );
    Ok(res.text().await?)
}
