//! Fleet migration of many tenant databases, against a sequential baseline,
//! in one run on one cluster.
//!
//! `cargo bench --bench fleet`. Knobs: `SILO_BENCH_TENANTS` (default 1000),
//! `SILO_BENCH_ROWS` patients per tenant (default 3000),
//! `SILO_BENCH_CONCURRENCY` of the fleet run (default 4), `SILO_BENCH_SAMPLE`
//! tenants in the sequential baseline (default min(100, N/10)), and
//! `SILO_BENCH_DURABILITY` (`durable` or `throwaway`) to skip the automatic
//! choice below.
//!
//! 1. **Setup** (timed, not part of the result): the template database is
//!    built, the patient rows are inserted into it, then the N tenants are
//!    created through `Provisioner::create`, two at a time, each a template
//!    clone that already carries the rows. The cluster is durable (fsync on)
//!    unless the first tenants show that setup would take over four minutes;
//!    then the bench restarts on an fsync-off cluster and says so.
//! 2. **Sequential baseline**: for the first S tenants (in the engine's
//!    order), one after another, exactly the engine's per-tenant database
//!    work: a one-connection superuser pool on the tenant database,
//!    `silo::migrate::migrate_tenant_database` with the new migrator, close.
//!    No registry bookkeeping (tenant lock, version write), so the baseline
//!    is if anything faster per tenant than the engine. Those S tenants are
//!    then recorded at version 2 so the fleet run skips them.
//! 3. **Fleet run**: `start_fleet_migration` + `FleetRun::run` over the
//!    remaining N − S tenants, timed from the start call to the returned
//!    report (this includes the template rebuild `run` does at the end).
//! 4. **Verification**: every tenant at version 2 in the registry, no
//!    failures, and five tenant databases inspected (column NOT NULL, index
//!    present, backfill right).
//!
//! The new migration adds a column, backfills every row and indexes it.
//! Percentiles are nearest-rank over the sorted samples.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use futures::{StreamExt, TryStreamExt};
use silo::crypto::Keyring;
use silo::embedded::postgres::Durability;
use silo::embedded::EmbeddedPostgres;
use silo::migrate::{embedded_tenant_migrator, FleetOptions, FleetReport};
use silo::provision::{CreateTenant, ProvisionConfig, Provisioner, TEMPLATE_DB};
use silo::registry::Registry;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

/// The new tenant migration (version 2): a column, a backfill of every row,
/// NOT NULL, an index.
const V2_SQL: &str = "ALTER TABLE patients ADD COLUMN preferred_language text;
UPDATE patients SET preferred_language = CASE WHEN full_name LIKE 'Herr %' THEN 'de' ELSE 'en' END;
ALTER TABLE patients ALTER COLUMN preferred_language SET NOT NULL;
CREATE INDEX patients_language_idx ON patients (preferred_language);";

/// Tenants created at once during setup.
const CREATE_CONCURRENCY: usize = 2;
/// Tenants created before deciding whether a durable setup is affordable.
const PROBE: usize = 20;
/// Longest acceptable setup on a durable cluster before falling back.
const SETUP_BUDGET: Duration = Duration::from_secs(240);
/// The target for migrating the whole fleet.
const TARGET: Duration = Duration::from_secs(60);
/// Tenant databases inspected after the run.
const SPOT_CHECKS: usize = 5;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    init_logging();
    let cfg = Config::from_env()?;
    let mut durability = cfg.durability.unwrap_or(Durability::Durable);
    let mut fallback_note = None;
    loop {
        let pg = tokio::task::spawn_blocking(move || EmbeddedPostgres::start_temp(durability))
            .await?
            .context("start a private PostgreSQL")?;
        // Only an automatic durable start may fall back.
        let may_fall_back = cfg.durability.is_none() && durability == Durability::Durable;
        let outcome = run(
            &pg,
            &cfg,
            durability,
            may_fall_back,
            fallback_note.as_deref(),
        )
        .await;
        let mut pg = pg;
        tokio::task::spawn_blocking(move || pg.stop())
            .await?
            .context("stop PostgreSQL")?;
        match outcome? {
            Outcome::Done => return Ok(()),
            Outcome::SetupTooSlow(projected) => {
                let note = format!(
                    "a durable setup was projected at {:.0} s (> {} s budget) from its first \
                     {PROBE} tenants, so this run uses an fsync-off cluster",
                    projected.as_secs_f64(),
                    SETUP_BUDGET.as_secs()
                );
                println!("FALLBACK: {note}");
                println!();
                fallback_note = Some(note);
                durability = Durability::Throwaway;
            }
        }
    }
}

/// Warnings only by default (`RUST_LOG` overrides).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The 1, 5 and 15 minute load averages: other work on the machine skews every figure.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

struct Config {
    tenants: usize,
    rows: usize,
    concurrency: usize,
    sample: usize,
    /// Forced by `SILO_BENCH_DURABILITY`; `None` means durable with fallback.
    durability: Option<Durability>,
}

impl Config {
    fn from_env() -> Result<Self> {
        let tenants = env_number("SILO_BENCH_TENANTS", 1000)?;
        ensure!(tenants >= 2, "SILO_BENCH_TENANTS must be at least 2");
        let rows = env_number("SILO_BENCH_ROWS", 3000)?;
        let concurrency = env_number("SILO_BENCH_CONCURRENCY", 4)?;
        ensure!(
            concurrency >= 1,
            "SILO_BENCH_CONCURRENCY must be at least 1"
        );
        let sample = env_number("SILO_BENCH_SAMPLE", (tenants / 10).clamp(1, 100))?;
        ensure!(
            (1..tenants).contains(&sample),
            "SILO_BENCH_SAMPLE must be between 1 and SILO_BENCH_TENANTS - 1"
        );
        let durability = match std::env::var("SILO_BENCH_DURABILITY").as_deref() {
            Err(_) => None,
            Ok("durable") => Some(Durability::Durable),
            Ok("throwaway") => Some(Durability::Throwaway),
            Ok(other) => anyhow::bail!(
                "SILO_BENCH_DURABILITY must be 'durable' or 'throwaway', not '{other}'"
            ),
        };
        Ok(Self {
            tenants,
            rows,
            concurrency,
            sample,
            durability,
        })
    }
}

fn env_number(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(s) => s
            .parse()
            .with_context(|| format!("{name} must be a whole number")),
        Err(_) => Ok(default),
    }
}

enum Outcome {
    Done,
    /// A durable setup would take this long: start again without fsync.
    SetupTooSlow(Duration),
}

/// The embedded tenant migrations plus the benchmark's version 2.
fn migrator_v2() -> Arc<Migrator> {
    let mut m = embedded_tenant_migrator();
    let mut all = m.migrations.to_vec();
    all.push(Migration::new(
        2,
        "preferred language".into(),
        MigrationType::Simple,
        V2_SQL.into(),
        false,
    ));
    m.migrations = Cow::Owned(all);
    Arc::new(m)
}

async fn run(
    pg: &EmbeddedPostgres,
    cfg: &Config,
    durability: Durability,
    may_fall_back: bool,
    fallback_note: Option<&str>,
) -> Result<Outcome> {
    let admin_url = pg.url("postgres");
    silo::cli::ensure_database(&admin_url, "silo_control").await?;
    let keyring = Keyring::from_base64(&Keyring::generate_base64())?;
    let registry = Registry::connect_lazy(&pg.url("silo_control"))?;
    registry
        .migrate()
        .await
        .context("migrate the control database")?;
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect(&admin_url)
        .await
        .context("connect as superuser")?;
    let provisioner = Provisioner::new(
        registry.clone(),
        keyring,
        ProvisionConfig { warm_pool_size: 0 },
    );
    provisioner.ensure_default_server(&admin_url).await?;

    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&admin)
        .await?;
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let durability_label = match durability {
        Durability::Durable => "durable (fsync on)",
        Durability::Throwaway => "throwaway (fsync, synchronous_commit, full_page_writes off)",
    };
    println!(
        "fleet migration benchmark: N = {} tenants, {} patient rows each, fleet concurrency {}, \
         sequential sample S = {}, nproc = {nproc}",
        cfg.tenants, cfg.rows, cfg.concurrency, cfg.sample
    );
    println!("{version}");
    println!("cluster: {durability_label}");
    if let Some(note) = fallback_note {
        println!("note: {note}");
    }
    println!("load average at start: {}", load_average());
    println!();

    // --- Setup --------------------------------------------------------------
    let setup_started = Instant::now();
    provisioner
        .refill_all()
        .await
        .context("build the template database")?;
    populate_template(pg, &admin, cfg.rows).await?;
    let populated = setup_started.elapsed();
    let creates_started = Instant::now();
    let probe = PROBE.min(cfg.tenants);
    create_tenants(&provisioner, 0..probe).await?;
    if may_fall_back {
        let per_tenant = creates_started.elapsed().as_secs_f64() / probe as f64;
        let projected =
            populated + Duration::from_secs_f64(per_tenant * (cfg.tenants - probe) as f64);
        if projected > SETUP_BUDGET {
            return Ok(Outcome::SetupTooSlow(projected));
        }
    }
    create_tenants(&provisioner, probe..cfg.tenants).await?;
    let setup = setup_started.elapsed();
    let created = creates_started.elapsed();
    let db_bytes: i64 = sqlx::query_scalar(
        "SELECT sum(pg_database_size(datname))::int8 FROM pg_database WHERE datname LIKE 'silo\\_t\\_%'",
    )
    .fetch_one(&admin)
    .await?;
    println!(
        "[setup] template + {} rows in {:.1} s; {} tenants created ({} at a time) in {:.1} s; \
         {:.1} GB of tenant databases; total {:.1} s",
        cfg.rows,
        populated.as_secs_f64(),
        cfg.tenants,
        CREATE_CONCURRENCY,
        created.as_secs_f64(),
        db_bytes as f64 / 1e9,
        setup.as_secs_f64()
    );
    // Start the measured phases from a clean WAL state, not mid-checkpoint.
    sqlx::raw_sql("CHECKPOINT").execute(&admin).await?;

    // --- Sequential baseline ------------------------------------------------
    let v2 = migrator_v2();
    let sample: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT id, database_name FROM tenants WHERE status = 'active' ORDER BY id LIMIT $1",
    )
    .bind(cfg.sample as i64)
    .fetch_all(registry.pool())
    .await?;
    ensure!(sample.len() == cfg.sample, "fewer tenants than the sample");
    let mut sequential = Vec::with_capacity(sample.len());
    let seq_started = Instant::now();
    for (_, database) in &sample {
        sequential.push(migrate_directly(pg, database, &v2).await?);
    }
    let seq_total = seq_started.elapsed();
    let ids: Vec<Uuid> = sample.iter().map(|(id, _)| *id).collect();
    sqlx::query("UPDATE tenants SET schema_version = 2 WHERE id = ANY($1)")
        .bind(&ids)
        .execute(registry.pool())
        .await?;
    println!(
        "[sequential] {} tenants one after another in {:.1} s",
        sample.len(),
        seq_total.as_secs_f64()
    );
    sqlx::raw_sql("CHECKPOINT").execute(&admin).await?;

    // --- Fleet run ----------------------------------------------------------
    let upgraded = provisioner.clone().with_migrator(v2);
    let latencies = Mutex::new(Vec::with_capacity(cfg.tenants));
    let fleet_started = Instant::now();
    let fleet_run = upgraded
        .start_fleet_migration(
            FleetOptions {
                concurrency: Some(cfg.concurrency),
                ..Default::default()
            },
            "bench",
        )
        .await
        .context("start the fleet migration")?;
    let report: FleetReport = fleet_run
        .run(&upgraded, |result, progress| {
            latencies
                .lock()
                .expect("latencies lock")
                .push(Duration::from_millis(result.millis));
            if progress.done % 250 == 0 {
                eprintln!(
                    "[fleet] {}/{} done, {} failed, {:.1} s",
                    progress.done,
                    progress.total,
                    progress.failed,
                    fleet_started.elapsed().as_secs_f64()
                );
            }
        })
        .await
        .context("run the fleet migration")?;
    let fleet_wall = fleet_started.elapsed();
    let latencies = latencies.into_inner().expect("latencies lock");
    println!(
        "[fleet] {} migrated, {} failed; engine phase {:.1} s, start to report {:.1} s \
         (incl. operation bookkeeping and the template rebuild)",
        report.migrated,
        report.failed.len(),
        report.seconds,
        fleet_wall.as_secs_f64()
    );

    // --- Verification -------------------------------------------------------
    let verified = verify(pg, &registry, cfg, &report).await;
    println!("load average at end: {}", load_average());
    println!();
    let fleet_tenants = cfg.tenants - cfg.sample;
    print_report(
        cfg,
        durability_label,
        setup,
        &sequential,
        &latencies,
        fleet_wall,
        report.seconds,
        fleet_tenants,
    );
    admin.close().await;
    registry.pool().close().await;
    verified?;
    println!("verification: OK");
    Ok(Outcome::Done)
}

/// Open the template for connections, insert the patients, seal it again.
/// Every tenant cloned afterwards carries the rows.
async fn populate_template(pg: &EmbeddedPostgres, admin: &PgPool, rows: usize) -> Result<()> {
    sqlx::raw_sql(&format!(
        "ALTER DATABASE {TEMPLATE_DB} WITH ALLOW_CONNECTIONS true"
    ))
    .execute(admin)
    .await
    .context("open the template database")?;
    let filled: Result<()> = async {
        let db = PgPoolOptions::new()
            .max_connections(1)
            .connect(&pg.url(TEMPLATE_DB))
            .await
            .context("connect to the template database")?;
        let inserted = async {
            // Every tenth patient is a 'Herr', so the backfill writes two values.
            sqlx::query(
                "INSERT INTO patients (full_name, date_of_birth, email, phone)
                 SELECT CASE WHEN g % 10 = 0 THEN 'Herr ' ELSE 'Patient ' END || 'Nummer ' || g,
                        date '1950-01-01' + (g % 20000),
                        'patient' || g || '@example.org',
                        '+49 30 ' || lpad(g::text, 7, '0')
                 FROM generate_series(1, $1) g",
            )
            .bind(rows as i64)
            .execute(&db)
            .await
            .context("insert patients into the template")?;
            // Clones start with hint bits set and statistics, like a settled database.
            sqlx::raw_sql("VACUUM ANALYZE patients")
                .execute(&db)
                .await
                .context("vacuum the template")?;
            anyhow::Ok(())
        }
        .await;
        db.close().await;
        inserted
    }
    .await;
    sqlx::raw_sql(&format!(
        "ALTER DATABASE {TEMPLATE_DB} WITH ALLOW_CONNECTIONS false"
    ))
    .execute(admin)
    .await
    .context("seal the template database again")?;
    filled
}

/// Create tenants `bench-<i>` for `range`, a few at a time.
async fn create_tenants(p: &Provisioner, range: std::ops::Range<usize>) -> Result<()> {
    futures::stream::iter(range)
        .map(|i| async move {
            let slug = format!("bench-{i:05}");
            let req = CreateTenant {
                slug: slug.clone(),
                name: format!("Clinic {i}"),
                plan: "standard".into(),
                server: None,
            };
            p.create(&req, None, "bench")
                .await
                .with_context(|| format!("create tenant {slug}"))
                .and_then(|t| {
                    ensure!(
                        t.schema_version == Some(1),
                        "tenant {slug} starts at {:?}",
                        t.schema_version
                    );
                    Ok(())
                })
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .try_collect::<()>()
        .await
}

/// The engine's per-tenant database work, without its registry bookkeeping:
/// a one-connection superuser pool, the migrations and grants, close.
async fn migrate_directly(
    pg: &EmbeddedPostgres,
    database: &str,
    migrator: &Migrator,
) -> Result<Duration> {
    let started = Instant::now();
    let db = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&pg.url(database))
        .await
        .with_context(|| format!("connect to {database}"))?;
    let migrated = silo::migrate::migrate_tenant_database(&db, migrator).await;
    db.close().await;
    let version = migrated.with_context(|| format!("migrate {database}"))?;
    ensure!(version == 2, "{database} migrated to {version}, not 2");
    Ok(started.elapsed())
}

/// Every tenant at version 2, no failures, and a few databases inspected.
async fn verify(
    pg: &EmbeddedPostgres,
    registry: &Registry,
    cfg: &Config,
    report: &FleetReport,
) -> Result<()> {
    ensure!(
        report.failed.is_empty(),
        "{} tenants failed, first: {:?}",
        report.failed.len(),
        report.failed.first()
    );
    ensure!(
        report.migrated == cfg.tenants - cfg.sample,
        "the fleet run migrated {}, expected {}",
        report.migrated,
        cfg.tenants - cfg.sample
    );
    let at_v2: i64 = sqlx::query_scalar("SELECT count(*) FROM tenants WHERE schema_version = 2")
        .fetch_one(registry.pool())
        .await?;
    ensure!(
        at_v2 == cfg.tenants as i64,
        "{at_v2} of {} tenants at version 2 in the registry",
        cfg.tenants
    );
    let template: Option<i64> = sqlx::query_scalar("SELECT template_version FROM db_servers")
        .fetch_one(registry.pool())
        .await?;
    ensure!(
        template == Some(2),
        "template at {template:?} after the run"
    );
    let all: Vec<String> = sqlx::query_scalar("SELECT database_name FROM tenants ORDER BY id")
        .fetch_all(registry.pool())
        .await?;
    // The first is a baseline tenant; the rest are spread over the fleet run's.
    let picks = (0..SPOT_CHECKS).map(|k| k * (all.len() - 1) / (SPOT_CHECKS - 1));
    let expected_de = (cfg.rows / 10) as i64;
    for i in picks {
        let database = &all[i];
        let db = PgPoolOptions::new()
            .max_connections(1)
            .connect(&pg.url(database))
            .await
            .with_context(|| format!("connect to {database}"))?;
        let checked = async {
            let not_null: bool = sqlx::query_scalar(
                "SELECT attnotnull FROM pg_attribute
                 WHERE attrelid = 'patients'::regclass AND attname = 'preferred_language'",
            )
            .fetch_one(&db)
            .await
            .context("find the new column")?;
            let index: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_indexes
                 WHERE tablename = 'patients' AND indexname = 'patients_language_idx')",
            )
            .fetch_one(&db)
            .await?;
            let (de, total): (i64, i64) = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE preferred_language = 'de'), count(*) FROM patients",
            )
            .fetch_one(&db)
            .await?;
            let version: i64 = sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations")
                .fetch_one(&db)
                .await?;
            ensure!(not_null, "{database}: preferred_language is nullable");
            ensure!(index, "{database}: patients_language_idx is missing");
            ensure!(
                (de, total) == (expected_de, cfg.rows as i64),
                "{database}: {de} 'de' of {total} rows, expected {expected_de} of {}",
                cfg.rows
            );
            ensure!(version == 2, "{database}: _sqlx_migrations at {version}");
            anyhow::Ok(())
        }
        .await;
        db.close().await;
        checked?;
    }
    Ok(())
}

/// The nearest-rank `pct`th percentile of sorted samples (zero if empty).
fn nearest_rank(sorted: &[Duration], pct: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (pct * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn mean(samples: &[Duration]) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.iter().sum::<Duration>() / samples.len() as u32
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[allow(clippy::too_many_arguments)]
fn print_report(
    cfg: &Config,
    durability: &str,
    setup: Duration,
    sequential: &[Duration],
    fleet_latencies: &[Duration],
    fleet_wall: Duration,
    engine_seconds: f64,
    fleet_tenants: usize,
) {
    let mut seq = sequential.to_vec();
    seq.sort_unstable();
    let mut lat = fleet_latencies.to_vec();
    lat.sort_unstable();
    let seq_mean = mean(&seq);
    let seq_extrapolated = seq_mean * cfg.tenants as u32;
    let fleet_per_tenant = fleet_wall / fleet_tenants as u32;
    let scaled = fleet_per_tenant * cfg.tenants as u32;
    let speedup = seq_mean.as_secs_f64() / fleet_per_tenant.as_secs_f64();
    let met = scaled <= TARGET;

    let row = |k: &str, v: String| println!("{k:<50} {v}");
    row("tenants (N)", cfg.tenants.to_string());
    row("patient rows per tenant", cfg.rows.to_string());
    row("cluster", durability.to_string());
    row(
        "setup, untimed (template, rows, N creates)",
        format!("{:.1} s", setup.as_secs_f64()),
    );
    row("sequential sample (S)", seq.len().to_string());
    row(
        "sequential per tenant: mean / p50 / p99",
        format!(
            "{:.1} / {:.1} / {:.1} ms",
            ms(seq_mean),
            ms(nearest_rank(&seq, 50)),
            ms(nearest_rank(&seq, 99))
        ),
    );
    row(
        "sequential, extrapolated to N",
        format!("{:.1} s", seq_extrapolated.as_secs_f64()),
    );
    row(
        "fleet run: tenants / concurrency",
        format!("{fleet_tenants} / {}", cfg.concurrency),
    );
    row(
        "fleet run: start to report (engine phase)",
        format!("{:.1} s ({engine_seconds:.1} s)", fleet_wall.as_secs_f64()),
    );
    row(
        "fleet run: throughput",
        format!(
            "{:.1} tenants/s ({:.1} ms per tenant)",
            fleet_tenants as f64 / fleet_wall.as_secs_f64(),
            ms(fleet_per_tenant)
        ),
    );
    row(
        "fleet run: per-tenant latency p50 / p99 / max",
        format!(
            "{:.0} / {:.0} / {:.0} ms",
            ms(nearest_rank(&lat, 50)),
            ms(nearest_rank(&lat, 99)),
            ms(lat.last().copied().unwrap_or_default())
        ),
    );
    row("speed-up over sequential", format!("{speedup:.2}x"));
    row(
        "fleet run scaled to N",
        format!("{:.1} s", scaled.as_secs_f64()),
    );
    row(
        "target: N tenants <= 60 s",
        format!(
            "{} ({:.1} s)",
            if met { "MET" } else { "NOT MET" },
            scaled.as_secs_f64()
        ),
    );
}
