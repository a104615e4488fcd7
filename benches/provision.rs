//! Provisioning latency, three ways, in one run on one durable cluster.
//!
//! `cargo bench --bench provision` (N tenants per method: `SILO_BENCH_N`, default 200).
//!
//! 1. **Warm pool, via HTTP**: N spares are cloned ahead of time, then N
//!    `POST /admin/v1/tenants` are sent one after another and timed end to end
//!    (request, every provisioning step, response body). A create renames a
//!    spare; meanwhile silo's background job re-clones the spares taken, which
//!    is the steady state of a real server, so it is left running.
//! 2. **Template clone, via HTTP**, against a **bare
//!    `CREATE DATABASE … TEMPLATE silo_template`** on a superuser connection:
//!    the floor under any template-based create. The two are interleaved (one
//!    of each per iteration, alternating which goes first) so that noise on a
//!    small shared machine (checkpoints, other processes, page cache) falls on
//!    both alike instead of on whichever ran second.
//! 3. **Naive**: `CREATE DATABASE` from `template1`, then the tenant migrations:
//!    what a create costs without a template.
//!
//! Percentiles are nearest-rank over the sorted samples. The cluster is
//! durable (fsync on), like `silo dev`, not the fsync-off cluster of the tests.

mod support;

use std::time::{Duration, Instant};
use support::{
    control_plane, init_logging, load_average, ms, nearest_rank, SiloServer, ADMIN_TOKEN,
};

use anyhow::{ensure, Context, Result};
use metrics_exporter_prometheus::PrometheusHandle;
use silo::control::ControlPlane;
use silo::crypto::Keyring;
use silo::embedded::postgres::Durability;
use silo::embedded::EmbeddedPostgres;
use silo::registry::Registry;
use silo::servers::names::TEMPLATE_DB;
use silo::servers::TenantSchema;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// Admin bearer token of the benchmark's servers (at least 24 characters).
/// Tenants (and statements) per method unless `SILO_BENCH_N` says otherwise.
const DEFAULT_N: usize = 200;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    init_logging();
    let n = bench_size()?;
    // Installed before anything provisions, so every create is counted.
    let metrics = silo::telemetry::metrics_handle();
    let pg = tokio::task::spawn_blocking(|| EmbeddedPostgres::start_temp(Durability::Durable))
        .await?
        .context("start a durable private PostgreSQL")?;
    let outcome = run(&pg, n, &metrics).await;
    let mut pg = pg;
    tokio::task::spawn_blocking(move || pg.stop())
        .await?
        .context("stop PostgreSQL")?;
    outcome
}

fn bench_size() -> Result<usize> {
    match std::env::var("SILO_BENCH_N") {
        Ok(s) => {
            let n: usize = s.parse().context("SILO_BENCH_N must be a whole number")?;
            ensure!(n > 0, "SILO_BENCH_N must be at least 1");
            Ok(n)
        }
        Err(_) => Ok(DEFAULT_N),
    }
}

/// Everything the phases share: the cluster, its control registry, a superuser pool.
struct Env<'a> {
    pg: &'a EmbeddedPostgres,
    registry: Registry,
    keyring: Keyring,
    /// Superuser pool on the `postgres` database.
    admin: PgPool,
    /// The embedded tenant migrations, for the naive phase.
    schema: TenantSchema,
}

impl Env<'_> {
    /// A control plane over the shared registry with its own warm-pool size.
    fn provisioner(&self, warm_pool_size: u32) -> ControlPlane {
        support::control(&self.registry, &self.keyring, warm_pool_size, None)
    }
}

async fn run(pg: &EmbeddedPostgres, n: usize, metrics: &PrometheusHandle) -> Result<()> {
    let admin_url = pg.url("postgres");
    let (keyring, registry) = control_plane(pg).await?;
    let admin = PgPoolOptions::new()
        .max_connections(2)
        // No ping before each statement: the bare timings are the floor.
        .test_before_acquire(false)
        .connect(&admin_url)
        .await
        .context("connect as superuser")?;
    let env = Env {
        pg,
        registry,
        keyring,
        admin,
        schema: TenantSchema::embedded(),
    };
    let base = env.provisioner(0);
    base.ensure_default_server(&admin_url).await?;
    base.provisioner()
        .refill_all()
        .await
        .context("build the template database")?;

    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&env.admin)
        .await?;
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("provisioning benchmark: N = {n} per method, nproc = {nproc}");
    println!("{version}");
    println!("durable cluster (fsync on), requests sent one at a time");
    println!("load average at start: {}", load_average());
    println!();

    let warm = phase_warm_pool(&env, n, metrics).await?;
    let (template, bare) = phase_template_vs_bare(&env, n, metrics).await?;
    let naive = phase_naive(&env, n).await?;

    println!("load average at end: {}", load_average());
    println!();
    report(&warm, &template, &bare, &naive);

    env.admin.close().await;
    env.registry.pool().close().await;
    Ok(())
}

/// Phase 1: creates through the admin API, each taking a ready spare.
async fn phase_warm_pool(env: &Env<'_>, n: usize, metrics: &PrometheusHandle) -> Result<Summary> {
    let size = u32::try_from(n).context("N does not fit a warm-pool size")?;
    let provisioner = env.provisioner(size);
    let started = Instant::now();
    let made = provisioner
        .provisioner()
        .refill_all()
        .await
        .context("fill the warm pool")?;
    println!(
        "[warm pool] pre-filled {made} spares in {:.1} s (not part of the timings)",
        started.elapsed().as_secs_f64()
    );
    let before = SourceCounts::read(metrics);
    let server = SiloServer::start(provisioner, size).await?;
    let client = reqwest::Client::new();
    let mut samples = Vec::with_capacity(n);
    let measured: Result<()> = async {
        for i in 0..n {
            samples.push(create_via_api(&client, &server.base(), &format!("warm-{i}")).await?);
        }
        Ok(())
    }
    .await;
    server.stop().await?;
    measured?;
    let used = SourceCounts::read(metrics).since(&before);
    println!(
        "[warm pool] {n} creates; database source: {used}; the background job kept re-cloning spares meanwhile"
    );
    print_step_breakdown(metrics);
    drain_spares(env).await?;
    Ok(Summary::of("warm pool (HTTP)", samples))
}

/// Where a warm create spends its time: silo's own per-step histogram
/// (`silo_provision_step_seconds`, median and p99 as Prometheus renders them).
fn print_step_breakdown(metrics: &PrometheusHandle) {
    println!("[warm pool] time per provisioning step (ms), from silo_provision_step_seconds:");
    let text = metrics.render();
    for step in silo::provision::STEPS {
        let q = |quantile: &str| {
            let key =
                format!("silo_provision_step_seconds{{step=\"{step}\",quantile=\"{quantile}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(key.as_str()))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map_or("-".to_owned(), |v| format!("{:.2}", v * 1000.0))
        };
        println!("    {step:<10} p50 {:>8}  p99 {:>8}", q("0.5"), q("0.99"));
    }
}

/// Phase 2: template-clone creates through the admin API, interleaved with
/// the bare clone statement they are built on.
async fn phase_template_vs_bare(
    env: &Env<'_>,
    n: usize,
    metrics: &PrometheusHandle,
) -> Result<(Summary, Summary)> {
    let before = SourceCounts::read(metrics);
    let server = SiloServer::start(env.provisioner(0), 0).await?;
    let client = reqwest::Client::new();
    let mut template = Vec::with_capacity(n);
    let mut bare = Vec::with_capacity(n);
    let measured: Result<()> = async {
        for i in 0..n {
            let slug = format!("tmpl-{i}");
            let clone = format!("CREATE DATABASE \"bench_bare_{i}\" TEMPLATE {TEMPLATE_DB}");
            if i % 2 == 0 {
                template.push(create_via_api(&client, &server.base(), &slug).await?);
                bare.push(timed_sql(&env.admin, &clone).await?);
            } else {
                bare.push(timed_sql(&env.admin, &clone).await?);
                template.push(create_via_api(&client, &server.base(), &slug).await?);
            }
        }
        Ok(())
    }
    .await;
    server.stop().await?;
    drop_databases(&env.admin, "bench_bare", bare.len()).await?;
    measured?;
    let used = SourceCounts::read(metrics).since(&before);
    println!("[template] {n} creates; database source: {used}");
    Ok((
        Summary::of("template clone (HTTP)", template),
        Summary::of("bare CREATE DATABASE TEMPLATE", bare),
    ))
}

/// Phase 3: an empty database plus the tenant migrations, no template.
async fn phase_naive(env: &Env<'_>, n: usize) -> Result<Summary> {
    let mut samples = Vec::with_capacity(n);
    let measured: Result<()> = async {
        for i in 0..n {
            samples.push(naive_create(env, &format!("bench_naive_{i}")).await?);
        }
        Ok(())
    }
    .await;
    drop_databases(&env.admin, "bench_naive", samples.len()).await?;
    measured?;
    println!("[naive] {n} CREATE DATABASE + tenant migrations");
    Ok(Summary::of("naive CREATE DATABASE + migrate", samples))
}

/// One `POST /admin/v1/tenants`, timed from sending to the last body byte.
async fn create_via_api(client: &reqwest::Client, base: &str, slug: &str) -> Result<Duration> {
    let url = format!("{base}/admin/v1/tenants");
    let body = serde_json::json!({ "slug": slug, "name": format!("Bench {slug}") });
    let started = Instant::now();
    let res = client
        .post(url)
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("send create {slug}"))?;
    let status = res.status();
    let text = res
        .text()
        .await
        .with_context(|| format!("read create {slug}"))?;
    let elapsed = started.elapsed();
    ensure!(
        status == reqwest::StatusCode::CREATED,
        "create {slug}: HTTP {status}: {text}"
    );
    Ok(elapsed)
}

/// Time one statement on the superuser pool.
async fn timed_sql(pool: &PgPool, sql: &str) -> Result<Duration> {
    let started = Instant::now();
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .with_context(|| format!("run {sql}"))?;
    Ok(started.elapsed())
}

/// `CREATE DATABASE`, connect, run the tenant migrations, disconnect.
async fn naive_create(env: &Env<'_>, database: &str) -> Result<Duration> {
    let started = Instant::now();
    sqlx::raw_sql(&format!("CREATE DATABASE \"{database}\""))
        .execute(&env.admin)
        .await
        .with_context(|| format!("create database {database}"))?;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&env.pg.url(database))
        .await
        .with_context(|| format!("connect to {database}"))?;
    let migrated = env.schema.apply(&pool, None).await;
    pool.close().await;
    migrated.with_context(|| format!("migrate {database}"))?;
    Ok(started.elapsed())
}

/// Drop `<prefix>_0` .. `<prefix>_<count-1>`, untimed.
async fn drop_databases(admin: &PgPool, prefix: &str, count: usize) -> Result<()> {
    for i in 0..count {
        let sql = format!("DROP DATABASE IF EXISTS \"{prefix}_{i}\" WITH (FORCE)");
        sqlx::raw_sql(&sql)
            .execute(admin)
            .await
            .with_context(|| format!("run {sql}"))?;
    }
    Ok(())
}

/// Remove the spares phase 1 left, so phase 2's creates clone the template.
/// Runs under each server's maintenance lock, which the refill job holds
/// while it clones.
async fn drain_spares(env: &Env<'_>) -> Result<()> {
    for server in env.registry.servers().await? {
        let lock = env.registry.lock_server(server.id).await?;
        let drained: Result<()> = async {
            for spare in env.registry.spares(server.id).await? {
                env.registry.delete_spare(&spare.database_name).await?;
                let sql = format!(
                    "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                    spare.database_name
                );
                sqlx::raw_sql(&sql).execute(&env.admin).await?;
            }
            Ok(())
        }
        .await;
        lock.release().await;
        drained.context("drain the warm pool")?;
    }
    Ok(())
}

/// How many creates took a spare, cloned the template, or made an empty
/// database, from silo's `silo_provision_source_total` counter.
#[derive(Debug, Default)]
struct SourceCounts {
    warm_pool: u64,
    template: u64,
    empty: u64,
}

impl SourceCounts {
    fn read(metrics: &PrometheusHandle) -> Self {
        let rendered = metrics.render();
        let count = |source: &str| {
            let prefix = format!("silo_provision_source_total{{source=\"{source}\"}}");
            rendered
                .lines()
                .find_map(|line| line.strip_prefix(&prefix))
                .and_then(|value| value.trim().parse::<f64>().ok())
                .map_or(0, |v| v as u64)
        };
        Self {
            warm_pool: count("warm_pool"),
            template: count("template"),
            empty: count("empty"),
        }
    }

    fn since(&self, before: &Self) -> Self {
        Self {
            warm_pool: self.warm_pool.saturating_sub(before.warm_pool),
            template: self.template.saturating_sub(before.template),
            empty: self.empty.saturating_sub(before.empty),
        }
    }
}

impl std::fmt::Display for SourceCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "warm pool {}, template {}, empty {}",
            self.warm_pool, self.template, self.empty
        )
    }
}

/// Latency percentiles of one method.
struct Summary {
    label: &'static str,
    n: usize,
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
}

impl Summary {
    fn of(label: &'static str, mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Self {
            label,
            n: samples.len(),
            p50: nearest_rank(&samples, 50),
            p90: nearest_rank(&samples, 90),
            p99: nearest_rank(&samples, 99),
            max: samples.last().copied().unwrap_or_default(),
        }
    }
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

fn met(ok: bool) -> &'static str {
    if ok {
        "MET"
    } else {
        "NOT MET"
    }
}

fn report(warm: &Summary, template: &Summary, bare: &Summary, naive: &Summary) {
    println!(
        "{:<32} {:>5} {:>9} {:>9} {:>9} {:>9}",
        "method (ms)", "n", "p50", "p90", "p99", "max"
    );
    for s in [warm, template, bare, naive] {
        println!(
            "{:<32} {:>5} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            s.label,
            s.n,
            ms(s.p50),
            ms(s.p90),
            ms(s.p99),
            ms(s.max)
        );
    }
    let p50_ratio = ratio(template.p50, bare.p50);
    let p99_ratio = ratio(template.p99, bare.p99);
    println!();
    println!("template clone / bare statement: p50 {p50_ratio:.2}x, p99 {p99_ratio:.2}x");
    println!(
        "target warm pool p50 <= 20 ms: {} ({:.1} ms)",
        met(ms(warm.p50) <= 20.0),
        ms(warm.p50)
    );
    println!(
        "target template/bare p50 <= 1.3x: {} ({p50_ratio:.2}x)",
        met(p50_ratio <= 1.3)
    );
}
