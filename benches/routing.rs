//! Tenant routing, measured six ways in one run on one fsync-off cluster.
//!
//! `cargo bench --bench routing` (tenants: `SILO_BENCH_TENANTS`, default 1000;
//! length of the many-tenants phase: `SILO_BENCH_SECONDS`, default 60;
//! phases run: `SILO_BENCH_PHASES`, default `1,2,c,3,4,5`).
//!
//! 1. **Routing overhead**: one point query on one warm tenant, through
//!    `TenantRouter::acquire` and on a directly held sqlx `PgPool` (one
//!    connection, same role), interleaved in blocks; then `acquire` alone,
//!    router against pool, for the router's own added latency.
//! 2. **Cold open**: the first query of a tenant the router has never seen
//!    (lookup, credentials, pool, connect, query), one tenant after another.
//!    c. **Connection cost**: where a new tenant connection's time goes: TCP
//!    handshake alone; a login over TCP with TLS negotiation (`sslmode=prefer`)
//!    and PostgreSQL's default 4096 SCRAM iterations (what silo did); without
//!    the TLS request; over the Unix socket; and over the socket with silo's
//!    16 iterations (what silo does); and the client's PBKDF2 alone.
//! 3. **Many tenants**: 200 client tasks over all tenants with Zipf (s = 1.1)
//!    popularity under a 100-connection server budget; counts answers, samples
//!    the server's router connections and this process's RSS.
//! 4. **End to end over HTTP**: `GET /api/v1/patients/{id}` through silo
//!    against a minimal axum handler holding its own sqlx pool (silo's
//!    per-tenant rate limit off for this phase: it measures routing, and one
//!    tenant here sends more than the default limit).
//! 5. **Hostile traffic**: a victim tenant's p50/p99 over HTTP alone, while
//!    50,000 requests carrying another tenant's valid token name random
//!    `X-Tenant-ID`s, and alone again; the control-DB lookups they caused
//!    (rate limit off, so every attack request reaches the lookup). Then,
//!    as the control, the victim under as many requests with a token silo
//!    did not sign (refused before any lookup): what any flood of that size
//!    costs the victim on the same cores. 5b: the same attack for as long
//!    as the victim's load runs, against silo's defaults for misdirected
//!    requests (their allowance, refusals held), from 16 clients
//!    (`SILO_BENCH_ATTACK_CLIENTS`): the victim's p99 alone, under it, and
//!    alone again.
//!
//! Everything (load generator, silo, PostgreSQL) shares the machine's cores.
//! Percentiles are nearest-rank over the sorted samples. The baseline pools
//! do not ping before handing out a connection (`test_before_acquire(false)`,
//! sqlx pings by default), as the router does not: the strictest baseline.
//! The baselines connect the way the router does (the server's Unix socket
//! when there is one), so transport is not what they compare.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{control_plane, env_number, init_logging, load_average, ms, SiloServer, Zipf};

use anyhow::{bail, ensure, Context, Result};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, NaiveDate, Utc};
use futures::{StreamExt, TryStreamExt};
use metrics_exporter_prometheus::PrometheusHandle;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use silo::control::ControlPlane;
use silo::crypto::Keyring;
use silo::embedded::postgres::Durability;
use silo::embedded::EmbeddedPostgres;
use silo::registry::{Registry, TenantRecord};
use silo::router::{RouteError, RouterConfig, TenantRouter};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// Admin bearer token of the benchmark's silo server.
const DEFAULT_TENANTS: usize = 1000;
const DEFAULT_SECONDS: u64 = 60;
/// Tenants created at once.
const CREATE_CONCURRENCY: usize = 3;

/// Phase 1: iterations per method, in interleaved blocks.
const OVERHEAD_ITERATIONS: usize = 20_000;
const OVERHEAD_BLOCK: usize = 1_000;
const OVERHEAD_WARMUP: usize = 1_000;
/// Phase 2: tenants opened cold.
const COLD_TENANTS: usize = 200;
/// Phase 3.
const SERVER_BUDGET: i32 = 100;
const CLIENT_TASKS: usize = 200;
const ZIPF_S: f64 = 1.1;
const ACTIVITY_EVERY: Duration = Duration::from_millis(50);
const RSS_EVERY: Duration = Duration::from_secs(1);
/// Phase c: connections per method.
const COST_CONNECTS: usize = 100;
/// Phase 3 targets (issue 14).
const MANY_MIN_RPS: f64 = 500.0;
const MANY_MAX_P99_MS: f64 = 1000.0;
/// Phase 5.
const HOSTILE_REQUESTS: usize = 50_000;
const HOSTILE_CLIENTS: usize = 16;
const VICTIM_CLIENTS: usize = 4;
const VICTIM_SECONDS: Duration = Duration::from_secs(10);
/// Phase 4.
const HTTP_CLIENTS: usize = 32;
const HTTP_SECONDS: Duration = Duration::from_secs(10);
const HTTP_WARMUP: Duration = Duration::from_secs(1);
const DIRECT_HTTP_POOL: u32 = 20;

const POINT_QUERY: &str = "SELECT id, full_name FROM patients WHERE id = $1";
/// What `GET /api/v1/patients/{id}` selects in silo.
const PATIENT_QUERY: &str = "SELECT id, full_name, date_of_birth, email, phone, notes, created_at, updated_at FROM patients WHERE id = $1";
const ROUTER_CONNECTIONS: &str =
    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'silo-router'";

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    init_logging();
    let tenants = env_number("SILO_BENCH_TENANTS", DEFAULT_TENANTS as u64)? as usize;
    ensure!(tenants >= 2, "SILO_BENCH_TENANTS must be at least 2");
    let seconds = env_number("SILO_BENCH_SECONDS", DEFAULT_SECONDS)?;
    ensure!(seconds >= 1, "SILO_BENCH_SECONDS must be at least 1");
    let phases = std::env::var("SILO_BENCH_PHASES").unwrap_or_else(|_| "1,2,c,3,4,5".into());
    let phases: Vec<String> = phases.split(',').map(|p| p.trim().to_owned()).collect();
    // Installed first, as `silo serve` does: the router's metrics cost what they cost in production.
    let metrics = silo::telemetry::metrics_handle();
    let pg = tokio::task::spawn_blocking(|| EmbeddedPostgres::start_temp(Durability::Throwaway))
        .await?
        .context("start a private PostgreSQL")?;
    let outcome = run(
        &pg,
        tenants,
        Duration::from_secs(seconds),
        &phases,
        &metrics,
    )
    .await;
    let mut pg = pg;
    tokio::task::spawn_blocking(move || pg.stop())
        .await?
        .context("stop PostgreSQL")?;
    outcome
}

/// What the phases share.
struct Env<'a> {
    pg: &'a EmbeddedPostgres,
    registry: Registry,
    keyring: Keyring,
    /// Superuser pool on the `postgres` database.
    admin: PgPool,
    /// The cluster's Unix socket directory (the router connects through it).
    socket: Option<PathBuf>,
}

impl Env<'_> {
    fn provisioner(&self) -> ControlPlane {
        support::control(&self.registry, &self.keyring, 0, None)
    }

    fn router(&self) -> TenantRouter {
        TenantRouter::new(
            self.registry.clone(),
            self.keyring.clone(),
            RouterConfig::default(),
        )
    }

    /// Connect options for a tenant's database as the tenant's own role,
    /// with the router's session settings and transport (the Unix socket).
    fn direct_options(&self, t: &TenantRecord) -> Result<PgConnectOptions> {
        let tcp = self.tcp_options(t)?;
        Ok(match &self.socket {
            Some(dir) => tcp.socket(dir).ssl_mode(PgSslMode::Disable),
            None => tcp,
        })
    }

    /// As [`Env::direct_options`], over TCP as any client would (`sslmode=prefer`).
    fn tcp_options(&self, t: &TenantRecord) -> Result<PgConnectOptions> {
        let password = self.password(t)?;
        let statement_timeout = RouterConfig::default()
            .statement_timeout
            .as_millis()
            .to_string();
        Ok(PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.pg.port())
            .database(&t.database_name)
            .username(&t.role_name)
            .password(&password)
            .application_name("bench-direct")
            .options([("statement_timeout", statement_timeout.as_str())]))
    }

    fn password(&self, t: &TenantRecord) -> Result<String> {
        self.keyring
            .open_string(&t.key_id, &t.password_enc, t.id.as_bytes())
            .context("decrypt the tenant password")
    }

    /// A sqlx pool on a tenant's database as the tenant's own role.
    async fn direct_pool(&self, t: &TenantRecord, max: u32) -> Result<PgPool> {
        let opts = self.direct_options(t)?;
        PgPoolOptions::new()
            .max_connections(max)
            .min_connections(0)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .context("connect the direct pool")
    }

    /// Wait (up to 15 s) until no connection matches `filter` in pg_stat_activity.
    async fn wait_closed(&self, filter: &str, arg: &str) -> Result<()> {
        let sql = format!("SELECT count(*) FROM pg_stat_activity WHERE {filter} = $1");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let n: i64 = sqlx::query_scalar(&sql)
                .bind(arg)
                .fetch_one(&self.admin)
                .await?;
            if n == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{n} connections with {filter} = {arg} still open");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn run(
    pg: &EmbeddedPostgres,
    n: usize,
    seconds: Duration,
    phases: &[String],
    metrics: &PrometheusHandle,
) -> Result<()> {
    let admin_url = pg.url("postgres");
    let (keyring, registry) = control_plane(pg).await?;
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect(&admin_url)
        .await
        .context("connect as superuser")?;
    let dirs: String = sqlx::query_scalar("SELECT current_setting('unix_socket_directories')")
        .fetch_one(&admin)
        .await?;
    let socket = dirs
        .split(',')
        .map(|d| PathBuf::from(d.trim()))
        .find(|d| d.join(format!(".s.PGSQL.{}", pg.port())).exists());
    let env = Env {
        pg,
        registry,
        keyring,
        admin,
        socket,
    };
    let provisioner = env.provisioner();
    provisioner.ensure_default_server(&admin_url).await?;
    provisioner
        .provisioner()
        .refill_all()
        .await
        .context("build the template database")?;

    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&env.admin)
        .await?;
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "routing benchmark: {n} tenants, many-tenants phase {} s, nproc = {nproc}",
        seconds.as_secs()
    );
    println!("{version}");
    println!("throwaway cluster (fsync off); load generator, silo and PostgreSQL share the cores");
    println!("load average at start: {}", load_average());
    match &env.socket {
        Some(dir) => println!(
            "Unix socket in {} (the router and baselines use it)",
            dir.display()
        ),
        None => println!("no Unix socket: the router and baselines use TCP"),
    }

    let started = Instant::now();
    let tenants = create_tenants(&provisioner, n).await?;
    println!(
        "[setup] created {n} tenants in {:.1} s ({} at a time; database source: {})",
        started.elapsed().as_secs_f64(),
        CREATE_CONCURRENCY,
        provision_sources(metrics)
    );
    let hot = &tenants[0];
    let patient = insert_patient(&env, hot).await?;

    let mut report = Report::default();
    let run_phase = |p: &str| phases.iter().any(|q| q == p);
    if run_phase("1") {
        phase_overhead(&env, hot, patient, &mut report).await?;
    }
    // Tenants 1..=200 are opened by the router, 201..=400 by a bare connect:
    // none of them was ever connected to before.
    let cold_end = tenants.len().min(COLD_TENANTS + 1);
    let cold = &tenants[1..cold_end];
    let floor = &tenants[cold_end..tenants.len().min(cold_end + COLD_TENANTS)];
    if run_phase("2") {
        phase_cold_open(&env, cold, floor, &mut report).await?;
    }
    if run_phase("c") {
        let last = tenants.len() - 1;
        phase_connection_cost(&env, &tenants[last], &tenants[last - 1], &mut report).await?;
    }
    if run_phase("3") {
        phase_many_tenants(&env, &tenants, seconds, &mut report).await?;
    }
    if run_phase("4") {
        phase_http(&env, hot, patient, &mut report).await?;
    }
    if run_phase("5") && tenants.len() >= 3 {
        phase_hostile(&env, hot, &tenants[2], patient, &mut report).await?;
    }

    println!("load average at end: {}", load_average());
    println!();
    report.print();

    env.admin.close().await;
    env.registry.pool().close().await;
    Ok(())
}

async fn create_tenants(provisioner: &ControlPlane, n: usize) -> Result<Vec<TenantRecord>> {
    futures::stream::iter(0..n)
        .map(|i| {
            let p = provisioner.clone();
            async move {
                let req = support::request(&format!("bench-{i:04}"));
                p.provisioner()
                    .create(&req, None, "bench")
                    .await
                    .with_context(|| format!("create tenant {}", req.slug))
            }
        })
        .buffered(CREATE_CONCURRENCY)
        .try_collect()
        .await
}

/// `template 998, empty 2` from silo's `silo_provision_source_total`.
fn provision_sources(metrics: &PrometheusHandle) -> String {
    let rendered = metrics.render();
    ["warm_pool", "template", "empty"]
        .iter()
        .map(|source| {
            let prefix = format!("silo_provision_source_total{{source=\"{source}\"}}");
            let count = rendered
                .lines()
                .find_map(|line| line.strip_prefix(&prefix))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            format!("{source} {count}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

async fn insert_patient(env: &Env<'_>, t: &TenantRecord) -> Result<Uuid> {
    let pool = env.direct_pool(t, 1).await?;
    let id: Uuid = sqlx::query_scalar(
        "INSERT INTO patients (full_name, email) VALUES ('Ada Bench', 'ada@example.com') RETURNING id",
    )
    .fetch_one(&pool)
    .await
    .context("insert the benchmark patient")?;
    pool.close().await;
    Ok(id)
}

async fn routed_query(router: &TenantRouter, slug: &str, id: Uuid) -> Result<()> {
    let mut conn = router.acquire(slug).await?;
    let row: Option<(Uuid, String)> = sqlx::query_as(POINT_QUERY)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    ensure!(row.is_some(), "the patient is missing");
    Ok(())
}

async fn direct_query(pool: &PgPool, id: Uuid) -> Result<()> {
    let mut conn = pool.acquire().await?;
    bare_query(&mut conn, id).await
}

async fn bare_query(conn: &mut PgConnection, id: Uuid) -> Result<()> {
    let row: Option<(Uuid, String)> = sqlx::query_as(POINT_QUERY)
        .bind(id)
        .fetch_optional(conn)
        .await?;
    ensure!(row.is_some(), "the patient is missing");
    Ok(())
}

/// Phase 1: the same point query routed and direct, then acquire alone.
async fn phase_overhead(
    env: &Env<'_>,
    t: &TenantRecord,
    patient: Uuid,
    report: &mut Report,
) -> Result<()> {
    let router = env.router();
    let direct = env.direct_pool(t, 1).await?;
    // Not in the brief's comparison: the floor, one connection and no pool at all.
    let mut bare = env.direct_options(t)?.connect().await?;
    let slug = t.slug.as_str();
    for _ in 0..OVERHEAD_WARMUP {
        routed_query(&router, slug, patient).await?;
        direct_query(&direct, patient).await?;
        bare_query(&mut bare, patient).await?;
    }

    // Point query, interleaved blocks; which method goes first rotates.
    let mut routed = Samples::new(OVERHEAD_ITERATIONS);
    let mut plain = Samples::new(OVERHEAD_ITERATIONS);
    let mut floor = Samples::new(OVERHEAD_ITERATIONS);
    for block in 0..OVERHEAD_ITERATIONS / OVERHEAD_BLOCK {
        for turn in 0..3 {
            let started = Instant::now();
            match (block + turn) % 3 {
                0 => {
                    for _ in 0..OVERHEAD_BLOCK {
                        let s = Instant::now();
                        routed_query(&router, slug, patient).await?;
                        routed.push(s.elapsed());
                    }
                    routed.total += started.elapsed();
                }
                1 => {
                    for _ in 0..OVERHEAD_BLOCK {
                        let s = Instant::now();
                        direct_query(&direct, patient).await?;
                        plain.push(s.elapsed());
                    }
                    plain.total += started.elapsed();
                }
                _ => {
                    for _ in 0..OVERHEAD_BLOCK {
                        let s = Instant::now();
                        bare_query(&mut bare, patient).await?;
                        floor.push(s.elapsed());
                    }
                    floor.total += started.elapsed();
                }
            }
        }
    }
    bare.close().await?;

    // Acquire alone (returned at once, untimed), interleaved the same way.
    let mut acq_router = Samples::new(OVERHEAD_ITERATIONS);
    let mut acq_direct = Samples::new(OVERHEAD_ITERATIONS);
    for block in 0..OVERHEAD_ITERATIONS / OVERHEAD_BLOCK {
        for router_turn in [block % 2 == 0, block % 2 != 0] {
            for _ in 0..OVERHEAD_BLOCK {
                if router_turn {
                    let s = Instant::now();
                    let conn = router.acquire(slug).await?;
                    acq_router.push(s.elapsed());
                    drop(conn);
                } else {
                    let s = Instant::now();
                    let conn = direct.acquire().await?;
                    acq_direct.push(s.elapsed());
                    drop(conn);
                }
            }
        }
    }
    let stats = router.stats();
    ensure!(
        stats.pools_built == 1 && stats.registry_lookups == 1,
        "the warm path should not rebuild: {stats:?}"
    );
    router.invalidate(t.id).await;
    drop(router);
    direct.close().await;
    env.wait_closed("usename", &t.role_name).await?;

    let (routed, plain, floor) = (routed.sorted(), plain.sorted(), floor.sorted());
    let (acq_router, acq_direct) = (acq_router.sorted(), acq_direct.sorted());
    let router_qps = routed.rate();
    let direct_qps = plain.rate();
    let ratio = router_qps / direct_qps;
    for (name, q) in [
        ("router", &routed),
        ("direct PgPool", &plain),
        ("bare PgConnection", &floor),
    ] {
        println!(
            "[overhead] point query, {name}: {:.0}/s; p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs",
            q.rate(),
            us(q.pct(50)),
            us(q.pct(90)),
            us(q.pct(99)),
            us(q.pct_1000(999)),
            us(q.max())
        );
    }
    println!(
        "[overhead] acquire alone: router p50 {:.1} µs p99 {:.1} µs max {:.1} µs; pool p50 {:.1} µs p99 {:.1} µs max {:.1} µs",
        us(acq_router.pct(50)), us(acq_router.pct(99)), us(acq_router.max()),
        us(acq_direct.pct(50)), us(acq_direct.pct(99)), us(acq_direct.max())
    );
    report.section("1. Routing overhead (one warm tenant, sequential)");
    report.info("point query, router: queries/s", format!("{router_qps:.0}"));
    report.info(
        "point query, direct PgPool: queries/s",
        format!("{direct_qps:.0}"),
    );
    report.target(
        "throughput ratio router/direct",
        format!("{ratio:.3}"),
        ">= 0.95",
        ratio >= 0.95,
    );
    report.info(
        "point query p50 / p99, router",
        format!("{:.1} / {:.1} µs", us(routed.pct(50)), us(routed.pct(99))),
    );
    report.info(
        "point query p50 / p99, direct",
        format!("{:.1} / {:.1} µs", us(plain.pct(50)), us(plain.pct(99))),
    );
    report.info(
        "(floor) bare PgConnection: queries/s",
        format!("{:.0}", floor.rate()),
    );
    report.info(
        "(floor) bare PgConnection p50 / p99",
        format!("{:.1} / {:.1} µs", us(floor.pct(50)), us(floor.pct(99))),
    );
    report.info(
        "acquire p50, router / pool",
        format!(
            "{:.1} / {:.1} µs",
            us(acq_router.pct(50)),
            us(acq_direct.pct(50))
        ),
    );
    report.target(
        "acquire p99, router",
        format!("{:.1} µs", us(acq_router.pct(99))),
        "<= 20 µs",
        us(acq_router.pct(99)) <= 20.0,
    );
    report.info(
        "acquire p99, pool",
        format!("{:.1} µs", us(acq_direct.pct(99))),
    );
    report.info(
        "acquire p99 difference router - pool",
        format!("{:+.1} µs", us(acq_router.pct(99)) - us(acq_direct.pct(99))),
    );
    Ok(())
}

/// Phase 2: first query of tenants the router has never seen.
async fn phase_cold_open(
    env: &Env<'_>,
    tenants: &[TenantRecord],
    floor_tenants: &[TenantRecord],
    report: &mut Report,
) -> Result<()> {
    let router = env.router();
    let mut samples = Samples::new(tenants.len());
    let mut floor = Samples::new(floor_tenants.len());
    for (i, t) in tenants.iter().enumerate() {
        let s = Instant::now();
        let mut conn = router.acquire(&t.slug).await?;
        let _: Option<(Uuid, String)> = sqlx::query_as(POINT_QUERY)
            .bind(Uuid::new_v4())
            .fetch_optional(&mut *conn)
            .await?;
        samples.push(s.elapsed());
        drop(conn); // kept idle in its pool, as in service: past the budget, opens reclaim
                    // The floor: a bare connect and the same first query on another never-opened tenant.
        if let Some(f) = floor_tenants.get(i) {
            let opts = env.direct_options(f)?;
            let s = Instant::now();
            let mut conn = opts.connect().await?;
            let _: Option<(Uuid, String)> = sqlx::query_as(POINT_QUERY)
                .bind(Uuid::new_v4())
                .fetch_optional(&mut conn)
                .await?;
            floor.push(s.elapsed());
            conn.close().await?;
        }
    }
    let stats = router.stats();
    ensure!(
        stats.pools_built as usize == tenants.len(),
        "every open should be cold: {stats:?}"
    );
    let budget_full_from = SERVER_BUDGET as usize;
    let (free, full) = samples
        .samples
        .split_at(budget_full_from.min(samples.len()));
    let (free, full) = (
        Samples::from(free.to_vec()).sorted(),
        Samples::from(full.to_vec()).sorted(),
    );
    for t in tenants {
        router.invalidate(t.id).await;
    }
    drop(router);
    env.wait_closed("application_name", "silo-router").await?;

    let s = samples.sorted();
    println!(
        "[cold open] {} tenants: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        s.len(),
        ms(s.pct(50)),
        ms(s.pct(90)),
        ms(s.pct(99)),
        ms(s.max())
    );
    println!(
        "[cold open] first {} (budget free): p50 {:.2} ms p99 {:.2} ms; the other {} (budget full, an idle connection reclaimed): p50 {:.2} ms p99 {:.2} ms",
        free.len(), ms(free.pct(50)), ms(free.pct(99)),
        full.len(), ms(full.pct(50)), ms(full.pct(99))
    );
    report.section(&format!(
        "2. Cold open ({} tenants, acquire + first query)",
        s.len()
    ));
    report.target(
        "cold open p50",
        format!("{:.2} ms", ms(s.pct(50))),
        "<= 8 ms",
        ms(s.pct(50)) <= 8.0,
    );
    report.info(
        "cold open p50, budget free / budget full",
        format!("{:.2} / {:.2} ms", ms(free.pct(50)), ms(full.pct(50))),
    );
    report.target(
        "cold open p99",
        format!("{:.2} ms", ms(s.pct(99))),
        "<= 100 ms",
        ms(s.pct(99)) <= 100.0,
    );
    report.info("cold open max", format!("{:.2} ms", ms(s.max())));
    let floor = floor.sorted();
    if floor.len() > 0 {
        println!(
            "[cold open] floor, bare connect + first query on {} other tenants: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            floor.len(),
            ms(floor.pct(50)),
            ms(floor.pct(90)),
            ms(floor.pct(99)),
            ms(floor.max())
        );
        report.info(
            &format!(
                "(floor) bare connect + first query p50 / p99, n={} (same transport and verifier as the router)",
                floor.len()
            ),
            format!("{:.2} / {:.2} ms", ms(floor.pct(50)), ms(floor.pct(99))),
        );
    }
    Ok(())
}

/// Phase c: where a new tenant connection's time goes. Each method connects
/// `COST_CONNECTS` times (interleaved), to ReadyForQuery; closing is untimed.
async fn phase_connection_cost(
    env: &Env<'_>,
    slow: &TenantRecord,
    fast: &TenantRecord,
    report: &mut Report,
) -> Result<()> {
    use silo::servers::scram;
    // `slow` gets PostgreSQL's default iteration count, as silo's roles had;
    // `fast` keeps silo's.
    let slow_password = env.password(slow)?;
    sqlx::raw_sql(&format!(
        "ALTER ROLE \"{}\" PASSWORD '{}'",
        slow.role_name,
        scram::verifier_with(&slow_password, scram::POSTGRES_DEFAULT_ITERATIONS)
    ))
    .execute(&env.admin)
    .await?;
    let tcp_addr = format!("127.0.0.1:{}", env.pg.port());
    let methods: Vec<(&str, Option<PgConnectOptions>)> = vec![
        ("TCP handshake alone", None),
        (
            "login over TCP, TLS request, 4096 iterations (silo before)",
            Some(env.tcp_options(slow)?),
        ),
        (
            "login over TCP, no TLS request, 4096 iterations",
            Some(env.tcp_options(slow)?.ssl_mode(PgSslMode::Disable)),
        ),
        (
            "login over TCP, no TLS request, 16 iterations",
            Some(env.tcp_options(fast)?.ssl_mode(PgSslMode::Disable)),
        ),
        (
            "login over the Unix socket, 4096 iterations",
            Some(env.direct_options(slow)?),
        ),
        (
            "login over the Unix socket, 16 iterations (silo now)",
            Some(env.direct_options(fast)?),
        ),
    ];
    let mut samples: Vec<Samples> = methods
        .iter()
        .map(|_| Samples::new(COST_CONNECTS))
        .collect();
    for round in 0..COST_CONNECTS {
        for k in 0..methods.len() {
            let i = (round + k) % methods.len();
            let s = Instant::now();
            match &methods[i].1 {
                None => {
                    let stream = tokio::net::TcpStream::connect(&tcp_addr).await?;
                    samples[i].push(s.elapsed());
                    drop(stream);
                }
                Some(opts) => {
                    let conn = opts.connect().await?;
                    samples[i].push(s.elapsed());
                    conn.close().await?;
                }
            }
        }
    }
    // The client's share of SCRAM: PBKDF2-HMAC-SHA256 alone.
    let pbkdf2 = |iterations: u32| {
        let s = Instant::now();
        for _ in 0..COST_CONNECTS {
            let _ = scram::verifier_with(&slow_password, iterations);
        }
        s.elapsed() / COST_CONNECTS as u32
    };
    let (slow_kdf, fast_kdf) = (
        pbkdf2(scram::POSTGRES_DEFAULT_ITERATIONS),
        pbkdf2(scram::ITERATIONS),
    );
    // Back to silo's own verifier for the phases after.
    sqlx::raw_sql(&format!(
        "ALTER ROLE \"{}\" PASSWORD '{}'",
        slow.role_name,
        scram::verifier(&slow_password)
    ))
    .execute(&env.admin)
    .await?;
    env.wait_closed("application_name", "bench-direct").await?;

    report.section(&format!(
        "c. Connection cost ({COST_CONNECTS} connects per method, to ReadyForQuery)"
    ));
    for ((name, _), s) in methods.iter().zip(samples) {
        let s = s.sorted();
        println!(
            "[connection cost] {name}: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms",
            ms(s.pct(50)),
            ms(s.pct(90)),
            ms(s.pct(99))
        );
        report.info(
            &format!("{name}: p50 / p99"),
            format!("{:.2} / {:.2} ms", ms(s.pct(50)), ms(s.pct(99))),
        );
    }
    println!(
        "[connection cost] client PBKDF2 alone: 4096 iterations {:.3} ms, 16 iterations {:.3} ms",
        ms(slow_kdf),
        ms(fast_kdf)
    );
    report.info(
        "client PBKDF2 alone, 4096 / 16 iterations",
        format!("{:.3} / {:.3} ms", ms(slow_kdf), ms(fast_kdf)),
    );
    Ok(())
}

/// Phase 5: a victim's latency over HTTP, alone and while another tenant's
/// valid token is sent with random `X-Tenant-ID`s.
async fn phase_hostile(
    env: &Env<'_>,
    victim: &TenantRecord,
    attacker: &TenantRecord,
    patient: Uuid,
    report: &mut Report,
) -> Result<()> {
    // The per-tenant rate limit off: the victim alone sends more than the
    // default rate here; and the misdirected allowance off, so every
    // attack request reaches the tenant lookup (the strictest case for the
    // lookup count) and none is held.
    let silo = SiloServer::start_with(env.provisioner(), 0, |a| {
        a.app_rate_limit = 0;
        a.app_misdirected_limit = 0;
    })
    .await?;
    let base = format!("http://{}", silo.addr);
    let outcome = async {
        let sides = Hostile::ready(env, &base, victim, attacker, patient).await?;
        let victim_load = |length| sides.victim_load(length);
        let attacker_token = &sides.attacker_token;
        let lookups_before = registry_lookups(&base).await?;
        let commits_before = control_commits(env).await?;
        let alone = victim_load(VICTIM_SECONDS).await?;

        // The attack, with the victim's traffic beside it.
        let attack_started = Instant::now();
        let (attacked, answers, _) = under_flood(
            victim_load(VICTIM_SECONDS),
            &base,
            format!("Bearer {attacker_token}"),
            FloodLength::Requests(HOSTILE_REQUESTS),
            HOSTILE_CLIENTS,
        )
        .await?;
        let attack_secs = attack_started.elapsed().as_secs_f64();
        let again = victim_load(VICTIM_SECONDS).await?;
        // Statistics reach pg_stat_database within a second of a backend going idle.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let lookups = registry_lookups(&base).await? - lookups_before;
        let commits = control_commits(env).await? - commits_before;
        // The control: a flood as large that silo refuses before any
        // tenant is looked up (a token it did not sign), with the victim
        // beside it; what any flood costs the victim on these cores.
        let (control, control_answers, _) = under_flood(
            victim_load(VICTIM_SECONDS),
            &base,
            "Bearer not-a-token".into(),
            FloodLength::Requests(HOSTILE_REQUESTS),
            HOSTILE_CLIENTS,
        )
        .await?;
        Ok::<_, anyhow::Error>((
            alone,
            attacked,
            again,
            lookups,
            commits,
            answers,
            attack_secs,
            control,
            control_answers,
        ))
    }
    .await;
    silo.stop().await?;
    let (alone, attacked, again, lookups, commits, answers, attack_secs, control, control_answers) =
        outcome?;
    let p = |l: &HttpLoad| {
        format!(
            "{:.2} / {:.2} ms ({} ok, {} failed)",
            ms(l.latencies.pct(50)),
            ms(l.latencies.pct(99)),
            l.ok,
            l.failed
        )
    };
    println!(
        "[hostile] victim alone: {}; under attack: {}; alone again: {}; under a flood of bad tokens: {}",
        p(&alone),
        p(&attacked),
        p(&again),
        p(&control)
    );
    println!(
        "[hostile] {HOSTILE_REQUESTS} attack requests in {attack_secs:.1} s, answers {answers:?}; router registry lookups meanwhile {lookups}; control-DB transactions {commits}"
    );
    report.section(&format!(
        "5. Hostile traffic ({HOSTILE_REQUESTS} requests, random X-Tenant-ID, valid token, {HOSTILE_CLIENTS} clients; victim {VICTIM_CLIENTS} clients)"
    ));
    report.info("victim p50 / p99, alone", p(&alone));
    report.info("victim p50 / p99, under attack", p(&attacked));
    report.info("victim p50 / p99, alone again", p(&again));
    report.info(
        "victim p50 / p99, under as many requests with a bad token (401 before any lookup)",
        p(&control),
    );
    report.info(
        "victim p99 under attack / under the bad-token flood",
        format!(
            "{:.2}",
            attacked.latencies.pct(99).as_secs_f64() / control.latencies.pct(99).as_secs_f64()
        ),
    );
    report.info(
        "attack answers by status",
        answers
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let share = lookups as f64 / HOSTILE_REQUESTS as f64;
    report.target(
        "router registry lookups during the attack",
        format!("{lookups} ({:.3}% of requests)", share * 100.0),
        "<= 1%",
        share <= 0.01,
    );
    report.info(
        "control-DB transactions during the attack (all sources)",
        commits.to_string(),
    );
    report.info(
        "bad-token flood answers by status",
        control_answers
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let failed = alone.failed + attacked.failed + again.failed + control.failed;
    report.target(
        "victim failed requests",
        failed.to_string(),
        "= 0",
        failed == 0,
    );
    phase_hostile_defaults(env, victim, attacker, patient, report).await
}

/// Phase 5, second part: the same attack against silo's defaults for
/// misdirected requests (`SILO_APP_MISDIRECTED_LIMIT`, refusals held
/// `SILO_APP_REFUSAL_HOLD_MS`), the rate limit off (the victim alone sends
/// more than its default): the victim alone, under the attack for as long
/// as its load runs, and alone again.
async fn phase_hostile_defaults(
    env: &Env<'_>,
    victim: &TenantRecord,
    attacker: &TenantRecord,
    patient: Uuid,
    report: &mut Report,
) -> Result<()> {
    let attackers = env_number("SILO_BENCH_ATTACK_CLIENTS", HOSTILE_CLIENTS as u64)? as usize;
    let silo = SiloServer::start_with(env.provisioner(), 0, |a| a.app_rate_limit = 0).await?;
    let base = format!("http://{}", silo.addr);
    let outcome = async {
        let sides = Hostile::ready(env, &base, victim, attacker, patient).await?;
        let victim_load = |length| sides.victim_load(length);
        let attacker_token = &sides.attacker_token;
        let alone = victim_load(VICTIM_SECONDS).await?;
        let attack_started = Instant::now();
        let (attacked, answers, sent) = under_flood(
            victim_load(VICTIM_SECONDS),
            &base,
            format!("Bearer {attacker_token}"),
            FloodLength::Victim,
            attackers,
        )
        .await?;
        let attack_secs = attack_started.elapsed().as_secs_f64();
        let again = victim_load(VICTIM_SECONDS).await?;
        Ok::<_, anyhow::Error>((alone, attacked, again, answers, sent, attack_secs))
    }
    .await;
    silo.stop().await?;
    let (alone, attacked, again, answers, sent, attack_secs) = outcome?;
    let p99 = |l: &HttpLoad| l.latencies.pct(99).as_secs_f64() * 1000.0;
    let p = |l: &HttpLoad| {
        format!(
            "{:.2} / {:.2} ms ({} ok, {} failed)",
            ms(l.latencies.pct(50)),
            p99(l),
            l.ok,
            l.failed
        )
    };
    println!(
        "[hostile, defaults] victim alone: {}; under attack: {}; alone again: {}; attack: {sent} requests in {attack_secs:.1} s, answers {answers:?}",
        p(&alone),
        p(&attacked),
        p(&again),
    );
    report.section(&format!(
        "5b. The same attack from {attackers} clients against silo's defaults for misdirected requests (SILO_APP_MISDIRECTED_LIMIT {}/min, refusals held up to {} ms; rate limit off for the victim)",
        silo::config::DEFAULT_APP_MISDIRECTED_LIMIT,
        silo::config::DEFAULT_APP_REFUSAL_HOLD_MS
    ));
    report.info("victim p50 / p99, alone", p(&alone));
    report.info("victim p50 / p99, under attack", p(&attacked));
    report.info("victim p50 / p99, alone again", p(&again));
    report.info(
        "attack requests answered while the victim's load ran",
        format!(
            "{sent} in {attack_secs:.1} s ({})",
            answers
                .iter()
                .map(|(s, n)| format!("{s}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    // Unchanged within noise: the p99 under attack against the two runs
    // alone around it, within the spread those two show (at least 20 %).
    let (low, high) = (p99(&alone).min(p99(&again)), p99(&alone).max(p99(&again)));
    let noise = (high / low).max(1.2);
    let ratio = p99(&attacked) / high;
    report.target(
        "victim p99 under attack / the higher p99 alone",
        format!(
            "{ratio:.2} (the two runs alone differ {:.2}x; bound {noise:.2})",
            high / low
        ),
        "<= the runs alone's spread, at least 1.2",
        ratio <= noise,
    );
    let failed = alone.failed + attacked.failed + again.failed;
    report.target(
        "victim failed requests",
        failed.to_string(),
        "= 0",
        failed == 0,
    );
    Ok(())
}

/// Phase 5's two sides on a running silo: the victim's requests, and the
/// attacker's token.
struct Hostile {
    url: String,
    headers: [(&'static str, String); 2],
    attacker_token: String,
}

impl Hostile {
    /// Tokens minted for both, the victim's patient read once through silo,
    /// and its load warmed up.
    async fn ready(
        env: &Env<'_>,
        base: &str,
        victim: &TenantRecord,
        attacker: &TenantRecord,
        patient: Uuid,
    ) -> Result<Self> {
        let (victim_token, _) =
            silo::tokens::mint(&env.keyring, victim.id, victim.token_generation, 3600);
        let (attacker_token, _) =
            silo::tokens::mint(&env.keyring, attacker.id, attacker.token_generation, 3600);
        let sides = Self {
            url: format!("{base}/api/v1/patients/{patient}"),
            headers: [
                ("x-tenant-id", victim.slug.clone()),
                ("authorization", format!("Bearer {victim_token}")),
            ],
            attacker_token,
        };
        check_patient(&sides.url, &sides.headers, patient).await?;
        sides.victim_load(HTTP_WARMUP).await?;
        Ok(sides)
    }

    /// The victim's `VICTIM_CLIENTS` clients for `length`.
    fn victim_load(
        &self,
        length: Duration,
    ) -> impl std::future::Future<Output = Result<HttpLoad>> + Send + 'static {
        let (url, headers) = (self.url.clone(), self.headers.clone());
        async move { http_load_with(&url, &headers, length, VICTIM_CLIENTS).await }
    }
}

/// How long a flood lasts.
#[derive(Clone, Copy)]
enum FloodLength {
    /// Until this many requests are sent.
    Requests(usize),
    /// Until the victim's load ends.
    Victim,
}

/// `victim` run while `clients` clients send requests with `bearer`, each
/// naming a random tenant, for `length`; the victim's load, the flood's
/// answers by status, and how many it sent.
async fn under_flood(
    victim: impl std::future::Future<Output = Result<HttpLoad>> + Send + 'static,
    base: &str,
    bearer: String,
    length: FloodLength,
    clients: usize,
) -> Result<(HttpLoad, std::collections::BTreeMap<u16, u64>, u64)> {
    let sent = Arc::new(AtomicU64::new(0));
    let answers: Arc<Mutex<std::collections::BTreeMap<u16, u64>>> = Arc::default();
    let victim_done = Arc::new(AtomicBool::new(false));
    let flood: Vec<JoinHandle<Result<()>>> = (0..clients)
        .map(|c| {
            let client = reqwest::Client::new();
            let (sent, answers, bearer) = (sent.clone(), answers.clone(), bearer.clone());
            let victim_done = victim_done.clone();
            let url = format!("{base}/api/v1/patients?limit=1");
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(1000 + c as u64);
                while match length {
                    FloodLength::Requests(n) => sent.fetch_add(1, Ordering::Relaxed) < n as u64,
                    FloodLength::Victim => !victim_done.load(Ordering::Relaxed),
                } {
                    let status = client
                        .get(&url)
                        .header("authorization", &bearer)
                        .header("x-tenant-id", format!("t{:016x}", rng.gen::<u64>()))
                        .send()
                        .await?
                        .status()
                        .as_u16();
                    *answers.lock().expect("answers").entry(status).or_default() += 1;
                }
                Ok(())
            })
        })
        .collect();
    let load = {
        let victim_done = victim_done.clone();
        tokio::spawn(async move {
            let load = victim.await;
            victim_done.store(true, Ordering::Relaxed);
            load
        })
    };
    let load = load.await??;
    for f in flood {
        f.await??;
    }
    let answers = answers.lock().expect("answers").clone();
    let sent = answers.values().sum();
    Ok((load, answers, sent))
}

/// `registry_lookups` of a running silo's router (`GET /admin/v1/pools`).
async fn registry_lookups(base: &str) -> Result<u64> {
    let pools: serde_json::Value = reqwest::Client::new()
        .get(format!("{base}/admin/v1/pools"))
        .bearer_auth(support::ADMIN_TOKEN)
        .send()
        .await?
        .json()
        .await?;
    pools["registry_lookups"]
        .as_u64()
        .context("registry_lookups in /admin/v1/pools")
}

/// Transactions committed in the control database so far.
async fn control_commits(env: &Env<'_>) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = 'silo_control'",
    )
    .fetch_one(&env.admin)
    .await?)
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    busy: AtomicU64,
    other: AtomicU64,
}

/// Phase 3: every tenant, Zipf popularity, a 100-connection budget.
async fn phase_many_tenants(
    env: &Env<'_>,
    tenants: &[TenantRecord],
    seconds: Duration,
    report: &mut Report,
) -> Result<()> {
    sqlx::query("UPDATE db_servers SET max_connections = $1")
        .bind(SERVER_BUDGET)
        .execute(env.registry.pool())
        .await?;
    let router = env.router();
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    router.spawn_maintenance(&token, &tracker);

    let zipf = Arc::new(Zipf::new(tenants.len(), ZIPF_S));
    println!(
        "[many tenants] Zipf s = {ZIPF_S}: top 1 tenant {:.1}% of requests, top 10 {:.1}%, top 100 {:.1}%",
        zipf.head(1) * 100.0,
        zipf.head(10) * 100.0,
        zipf.head(100) * 100.0
    );
    let slugs: Arc<Vec<String>> = Arc::new(tenants.iter().map(|t| t.slug.clone()).collect());
    let counts = Arc::new(Counts::default());
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));

    let activity = {
        let (admin, stop) = (env.admin.clone(), stop.clone());
        tokio::spawn(async move {
            let mut max = 0i64;
            let mut n = 0u64;
            let mut every = tokio::time::interval(ACTIVITY_EVERY);
            while !stop.load(Ordering::Relaxed) {
                every.tick().await;
                let open: i64 = sqlx::query_scalar(ROUTER_CONNECTIONS)
                    .fetch_one(&admin)
                    .await?;
                max = max.max(open);
                n += 1;
            }
            Ok::<_, sqlx::Error>((max, n))
        })
    };
    let rss = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let page = page_size();
            let mut samples = Vec::new();
            let mut every = tokio::time::interval(RSS_EVERY);
            while !stop.load(Ordering::Relaxed) {
                every.tick().await;
                if let Some(pages) = rss_pages() {
                    samples.push(pages * page);
                }
            }
            samples
        })
    };

    let sessions_before = tenant_sessions(env).await?;
    let started = Instant::now();
    let deadline = started + seconds;
    let workers: Vec<JoinHandle<Vec<Duration>>> = (0..CLIENT_TASKS)
        .map(|w| {
            let (router, zipf, slugs) = (router.clone(), zipf.clone(), slugs.clone());
            let (counts, errors) = (counts.clone(), errors.clone());
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(w as u64);
                let mut latencies = Vec::with_capacity(1 << 14);
                while Instant::now() < deadline {
                    let slug = &slugs[zipf.sample(&mut rng)];
                    let s = Instant::now();
                    let outcome = match router.acquire(slug).await {
                        Ok(mut conn) => sqlx::query_as::<_, (Uuid, String)>(POINT_QUERY)
                            .bind(Uuid::new_v4())
                            .fetch_optional(&mut *conn)
                            .await
                            .map(|_| ())
                            .map_err(|e| format!("query on {slug}: {e}")),
                        Err(RouteError::Busy) => {
                            counts.busy.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        Err(e) => Err(format!("acquire {slug}: {e}")),
                    };
                    match outcome {
                        Ok(()) => {
                            latencies.push(s.elapsed());
                            counts.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            counts.other.fetch_add(1, Ordering::Relaxed);
                            let mut seen = errors.lock().expect("errors lock");
                            if seen.len() < 5 {
                                seen.push(e);
                            }
                        }
                    }
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for w in workers {
        latencies.extend(w.await?);
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (max_open, activity_samples) = activity.await??;
    let rss = rss.await?;
    let stats = router.stats();
    token.cancel();
    tracker.close();
    tracker.wait().await;
    drop(router);
    env.wait_closed("application_name", "silo-router").await?;
    // Backends report their session on exit; give the last ones a moment.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let opened = tenant_sessions(env).await? - sessions_before;

    let ok = counts.ok.load(Ordering::Relaxed);
    let busy = counts.busy.load(Ordering::Relaxed);
    let other = counts.other.load(Ordering::Relaxed);
    let s = Samples::from(latencies).sorted();
    let rps = ok as f64 / elapsed.as_secs_f64();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let (first, max_rss, last) = (
        rss.first().copied().unwrap_or(0),
        rss.iter().copied().max().unwrap_or(0),
        rss.last().copied().unwrap_or(0),
    );
    println!(
        "[many tenants] {:.1} s: ok {ok}, busy {busy}, other errors {other}; {rps:.0} requests/s, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
        elapsed.as_secs_f64(), ms(s.pct(50)), ms(s.pct(99)), ms(s.max())
    );
    println!(
        "[many tenants] router connections: max {max_open} over {activity_samples} samples; pools built {}, evictions {}, pools open at end {}, lookups {} (hits {}, misses {})",
        stats.pools_built, stats.evictions, stats.pools_open, stats.registry_lookups, stats.cache_hits, stats.cache_misses
    );
    println!(
        "[many tenants] RSS MiB per second: {}",
        rss.iter()
            .map(|b| format!("{:.0}", mib(*b)))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "[many tenants] tenant connections opened during the phase (pg_stat_database.sessions): {opened}, i.e. {:.2} per ok request",
        opened as f64 / ok.max(1) as f64
    );
    for e in errors.lock().expect("errors lock").iter() {
        println!("[many tenants] error: {e}");
    }

    report.section(&format!(
        "3. Many tenants ({} tenants, Zipf s = {ZIPF_S}, {CLIENT_TASKS} tasks, budget {SERVER_BUDGET}, {:.0} s)",
        tenants.len(),
        elapsed.as_secs_f64()
    ));
    report.info("requests ok", ok.to_string());
    report.target(
        "requests/s (ok)",
        format!("{rps:.0}"),
        ">= 500",
        rps >= MANY_MIN_RPS,
    );
    report.info(
        "latency p50 / p99 (ok)",
        format!("{:.2} / {:.2} ms", ms(s.pct(50)), ms(s.pct(99))),
    );
    report.target(
        "latency p99 (ok)",
        format!("{:.0} ms", ms(s.pct(99))),
        "<= 1000 ms",
        ms(s.pct(99)) <= MANY_MAX_P99_MS,
    );
    report.info("Busy (deliberate 503)", busy.to_string());
    report.target("other errors", other.to_string(), "= 0", other == 0);
    report.target(
        "max router connections (pg_stat_activity)",
        max_open.to_string(),
        "<= 100",
        max_open <= i64::from(SERVER_BUDGET),
    );
    report.info(
        "pools built (distinct tenants opened, incl. rebuilds)",
        stats.pools_built.to_string(),
    );
    report.info(
        "tenant connections opened (sessions)",
        format!(
            "{opened} ({:.2} per ok request)",
            opened as f64 / ok.max(1) as f64
        ),
    );
    report.info(
        "RSS first / max / last",
        format!(
            "{:.1} / {:.1} / {:.1} MiB",
            mib(first),
            mib(max_rss),
            mib(last)
        ),
    );
    Ok(())
}

/// Sessions ever opened to tenant databases (PostgreSQL 14+).
async fn tenant_sessions(env: &Env<'_>) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT COALESCE(sum(sessions), 0)::bigint FROM pg_stat_database WHERE datname LIKE 'silo\\_t\\_%'",
    )
    .fetch_one(&env.admin)
    .await?)
}

fn page_size() -> u64 {
    std::process::Command::new("getconf")
        .arg("PAGESIZE")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096)
}

/// Resident pages of this process, from `/proc/self/statm`.
fn rss_pages() -> Option<u64> {
    std::fs::read_to_string("/proc/self/statm")
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The JSON shape of silo's `GET /api/v1/patients/{id}`.
#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
struct Patient {
    id: Uuid,
    full_name: String,
    date_of_birth: Option<NaiveDate>,
    email: Option<String>,
    phone: Option<String>,
    notes: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

async fn direct_get_patient(
    State(pool): State<PgPool>,
    Path(id): Path<String>,
) -> Result<axum::Json<Patient>, StatusCode> {
    let id = Uuid::parse_str(&id).map_err(|_| StatusCode::BAD_REQUEST)?;
    sqlx::query_as(PATIENT_QUERY)
        .bind(id)
        .fetch_optional(&pool)
        .await
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?
        .map(axum::Json)
        .ok_or(StatusCode::NOT_FOUND)
}

/// A server running in a task until told to stop.
struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<()>>,
}

impl Running {
    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.task.await?
    }
}

async fn start_silo(env: &Env<'_>) -> Result<Running> {
    // One tenant sends more than the default per-tenant rate here.
    let s = SiloServer::start_with(env.provisioner(), 0, |a| a.app_rate_limit = 0).await?;
    Ok(Running {
        addr: s.addr,
        stop: s.stop,
        task: s.task,
    })
}

async fn start_direct(pool: PgPool) -> Result<Running> {
    let app = axum::Router::new()
        .route(
            "/api/v1/patients/{id}",
            axum::routing::get(direct_get_patient),
        )
        .with_state(pool);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .await
            .context("serve the direct handler")
    });
    Ok(Running { addr, stop, task })
}

struct HttpLoad {
    ok: u64,
    failed: u64,
    elapsed: Duration,
    latencies: Samples,
}

/// `HTTP_CLIENTS` clients sending GETs back to back for `length`.
async fn http_load(url: &str, headers: &[(&str, String)], length: Duration) -> Result<HttpLoad> {
    http_load_with(url, headers, length, HTTP_CLIENTS).await
}

/// `clients` clients sending GETs back to back for `length`.
async fn http_load_with(
    url: &str,
    headers: &[(&str, String)],
    length: Duration,
    clients: usize,
) -> Result<HttpLoad> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let mut request_headers = reqwest::header::HeaderMap::new();
    for (k, v) in headers {
        request_headers.insert(
            reqwest::header::HeaderName::from_bytes(k.as_bytes())?,
            reqwest::header::HeaderValue::from_str(v)?,
        );
    }
    let failure: Arc<Mutex<Option<String>>> = Arc::default();
    let started = Instant::now();
    let deadline = started + length;
    let clients: Vec<JoinHandle<(u64, Vec<Duration>)>> = (0..clients)
        .map(|_| {
            let (client, url) = (client.clone(), url.to_owned());
            let (headers, failure) = (request_headers.clone(), failure.clone());
            tokio::spawn(async move {
                let mut failed = 0;
                let mut latencies = Vec::with_capacity(1 << 14);
                while Instant::now() < deadline {
                    let s = Instant::now();
                    let res = client.get(&url).headers(headers.clone()).send().await;
                    let outcome = match res {
                        Ok(r) => {
                            let status = r.status();
                            match r.bytes().await {
                                Ok(body) if status == reqwest::StatusCode::OK => Ok(body),
                                Ok(body) => Err(format!(
                                    "HTTP {status}: {}",
                                    String::from_utf8_lossy(&body)
                                )),
                                Err(e) => Err(e.to_string()),
                            }
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    match outcome {
                        Ok(_) => latencies.push(s.elapsed()),
                        Err(e) => {
                            failed += 1;
                            failure.lock().expect("failure lock").get_or_insert(e);
                        }
                    }
                }
                (failed, latencies)
            })
        })
        .collect();
    let mut failed = 0;
    let mut latencies = Vec::new();
    for c in clients {
        let (f, l) = c.await?;
        failed += f;
        latencies.extend(l);
    }
    let elapsed = started.elapsed();
    if let Some(e) = failure.lock().expect("failure lock").take() {
        println!("[http] first failure on {url}: {e}");
    }
    Ok(HttpLoad {
        ok: latencies.len() as u64,
        failed,
        elapsed,
        latencies: Samples::from(latencies).sorted(),
    })
}

/// One GET, checked against the patient inserted.
async fn check_patient(url: &str, headers: &[(&str, String)], patient: Uuid) -> Result<()> {
    let mut req = reqwest::Client::new().get(url);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let res = req.send().await?;
    let status = res.status();
    let text = res.text().await?;
    ensure!(
        status == reqwest::StatusCode::OK,
        "{url}: HTTP {status}: {text}"
    );
    let p: Patient = serde_json::from_str(&text).with_context(|| format!("parse {text}"))?;
    ensure!(p.id == patient, "{url}: wrong patient {text}");
    Ok(())
}

/// Phase 4: the same GET through silo and through a minimal handler.
async fn phase_http(
    env: &Env<'_>,
    t: &TenantRecord,
    patient: Uuid,
    report: &mut Report,
) -> Result<()> {
    let (token, _) = silo::tokens::mint(&env.keyring, t.id, t.token_generation, 3600);
    let path = format!("/api/v1/patients/{patient}");

    let silo = start_silo(env).await?;
    let url = format!("http://{}{path}", silo.addr);
    let headers = [
        ("x-tenant-id", t.slug.clone()),
        ("authorization", format!("Bearer {token}")),
    ];
    let measured = async {
        check_patient(&url, &headers, patient).await?;
        http_load(&url, &headers, HTTP_WARMUP).await?;
        http_load(&url, &headers, HTTP_SECONDS).await
    }
    .await;
    silo.stop().await?;
    let through_silo = measured?;
    // The role's connection limit is the plan's 20: let silo's close first.
    env.wait_closed("usename", &t.role_name).await?;

    let pool = env.direct_pool(t, DIRECT_HTTP_POOL).await?;
    let direct = start_direct(pool.clone()).await?;
    let url = format!("http://{}{path}", direct.addr);
    let measured = async {
        check_patient(&url, &[], patient).await?;
        http_load(&url, &[], HTTP_WARMUP).await?;
        http_load(&url, &[], HTTP_SECONDS).await
    }
    .await;
    direct.stop().await?;
    pool.close().await;
    let plain = measured?;

    let rate = |l: &HttpLoad| l.ok as f64 / l.elapsed.as_secs_f64();
    let (silo_rps, direct_rps) = (rate(&through_silo), rate(&plain));
    for (name, l) in [("silo", &through_silo), ("direct", &plain)] {
        println!(
            "[http] {name}: {} ok, {} failed in {:.1} s: {:.0} requests/s, p50 {:.2} ms, p99 {:.2} ms",
            l.ok,
            l.failed,
            l.elapsed.as_secs_f64(),
            rate(l),
            ms(l.latencies.pct(50)),
            ms(l.latencies.pct(99))
        );
    }
    report.section(&format!(
        "4. End to end over HTTP (GET /api/v1/patients/{{id}}, {HTTP_CLIENTS} clients, {} s each)",
        HTTP_SECONDS.as_secs()
    ));
    for (name, l) in [
        ("through silo", &through_silo),
        ("direct axum + PgPool(20)", &plain),
    ] {
        report.info(&format!("{name}: requests/s"), format!("{:.0}", rate(l)));
        report.info(
            &format!("{name}: p50 / p99"),
            format!(
                "{:.2} / {:.2} ms",
                ms(l.latencies.pct(50)),
                ms(l.latencies.pct(99))
            ),
        );
    }
    report.info(
        "throughput ratio silo/direct",
        format!("{:.3}", silo_rps / direct_rps),
    );
    let failed = through_silo.failed + plain.failed;
    report.target("failed requests", failed.to_string(), "= 0", failed == 0);
    Ok(())
}

/// Latency samples of one method.
struct Samples {
    samples: Vec<Duration>,
    /// Wall time of the loops that produced them (for throughput).
    total: Duration,
}

impl Samples {
    fn new(capacity: usize) -> Self {
        Self {
            samples: Vec::with_capacity(capacity),
            total: Duration::ZERO,
        }
    }

    fn from(samples: Vec<Duration>) -> Self {
        Self {
            samples,
            total: Duration::ZERO,
        }
    }

    fn push(&mut self, d: Duration) {
        self.samples.push(d);
    }

    fn len(&self) -> usize {
        self.samples.len()
    }

    fn sorted(mut self) -> Self {
        self.samples.sort_unstable();
        self
    }

    /// Nearest-rank percentile of sorted samples.
    fn pct(&self, pct: usize) -> Duration {
        if self.samples.is_empty() {
            return Duration::ZERO;
        }
        let rank = (pct * self.samples.len()).div_ceil(100).max(1);
        self.samples[rank - 1]
    }

    /// Nearest-rank per-mille percentile of sorted samples.
    fn pct_1000(&self, permille: usize) -> Duration {
        if self.samples.is_empty() {
            return Duration::ZERO;
        }
        let rank = (permille * self.samples.len()).div_ceil(1000).max(1);
        self.samples[rank - 1]
    }

    fn max(&self) -> Duration {
        self.samples.last().copied().unwrap_or_default()
    }

    fn rate(&self) -> f64 {
        self.samples.len() as f64 / self.total.as_secs_f64()
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

enum Row {
    Section(String),
    Figure {
        name: String,
        value: String,
        target: Option<(&'static str, bool)>,
    },
}

/// The closing table: every figure, its target if it has one, met or not.
#[derive(Default)]
struct Report {
    rows: Vec<Row>,
}

impl Report {
    fn section(&mut self, title: &str) {
        self.rows.push(Row::Section(title.to_owned()));
    }

    fn info(&mut self, name: &str, value: String) {
        self.rows.push(Row::Figure {
            name: name.to_owned(),
            value,
            target: None,
        });
    }

    fn target(&mut self, name: &str, value: String, target: &'static str, met: bool) {
        self.rows.push(Row::Figure {
            name: name.to_owned(),
            value,
            target: Some((target, met)),
        });
    }

    fn print(&self) {
        println!(
            "| {:<48} | {:>24} | {:>10} | {:<7} |",
            "figure", "value", "target", "result"
        );
        println!("|{:-<50}|{:->26}|{:->12}|{:-<9}|", "", "", "", "");
        for row in &self.rows {
            match row {
                Row::Section(title) => println!("| **{title}** | | | |"),
                Row::Figure {
                    name,
                    value,
                    target,
                } => {
                    let (target, result) = match target {
                        Some((t, true)) => (*t, "met"),
                        Some((t, false)) => (*t, "NOT MET"),
                        None => ("", ""),
                    };
                    println!("| {name:<48} | {value:>24} | {target:>10} | {result:<7} |");
                }
            }
        }
    }
}
