//! Fleet migration of many tenant databases, against a sequential baseline,
//! in one run on one cluster.
//!
//! `cargo bench --bench fleet`; without `--bench` (as under
//! `cargo test --all-targets`) it only makes a small fsync-off smoke run.
//! Knobs: `SILO_BENCH_TENANTS` (default 1000), `SILO_BENCH_ROWS` patients
//! per tenant (default 3000), `SILO_BENCH_CONCURRENCY` of the fleet run
//! (default 4), `SILO_BENCH_SAMPLE` tenants in the sequential baseline
//! (default min(100, N/10)), and `SILO_BENCH_DURABILITY` (`auto`, `durable`,
//! `bulk-loaded`, `throwaway`) to skip the automatic choice below.
//!
//! 1. **Setup** (timed, not part of the result): the template database is
//!    built, the patient rows are inserted into it, then the N tenants are
//!    created through `Provisioner::create`, two at a time, each a template
//!    clone that already carries the rows, and the cluster is checkpointed so
//!    the measured phases inherit no checkpoint debt. The cluster is durable
//!    (fsync on). If the first tenants plus a checkpoint project a setup over
//!    four minutes, the rest of the setup is bulk-loaded instead: fsync,
//!    synchronous_commit and full_page_writes are turned off by a reload
//!    (same cluster, no restart), and turned back on, checkpointed and
//!    `sync`ed before anything is measured. The bench says which happened.
//!    Every measured phase runs with fsync on, except with `throwaway`.
//! 2. **Sequential baseline**: for the first S tenants (in the engine's
//!    order), one after another, exactly the engine's per-tenant database
//!    work: a one-connection superuser pool on the tenant database,
//!    `silo::servers::TenantSchema::apply` with the new migrations, close.
//!    No registry bookkeeping (tenant lock, version write), so the baseline
//!    is if anything faster per tenant than the engine. Those S tenants are
//!    then recorded at version 2 so the fleet run skips them.
//! 3. **Fleet run**: `Fleet::start` + `ControlPlane::run_fleet` over the
//!    remaining N − S tenants, timed from the start call to the returned
//!    report (this includes the template rebuild `run` does at the end).
//! 4. **Verification**: every tenant at version 2 in the registry, no
//!    failures, and five tenant databases inspected (column NOT NULL, index
//!    present, backfill right).
//!
//! The new migration adds a column, backfills every row and indexes it.
//! Percentiles are nearest-rank over the sorted samples.

mod support;

use std::borrow::Cow;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use support::{control_plane, env_number, init_logging, load_average, ms, nearest_rank};

use anyhow::{ensure, Context, Result};
use futures::{StreamExt, TryStreamExt};
use silo::control::{ControlConfig, ControlPlane};
use silo::embedded::postgres::Durability;
use silo::embedded::EmbeddedPostgres;
use silo::migrate::{FleetOptions, FleetReport};
use silo::registry::Registry;
use silo::servers::names::TEMPLATE_DB;
use silo::servers::schema::embedded_migrator;
use silo::servers::TenantSchema;
use sqlx::migrate::{Migration, MigrationType};
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
/// Tenants created (and checkpointed) to project the durable setup's length.
const PROBE: usize = 25;
/// Longest acceptable durable setup before bulk-loading the rest.
const SETUP_BUDGET: Duration = Duration::from_secs(240);
/// The target for migrating the whole fleet.
const TARGET: Duration = Duration::from_secs(60);
/// Tenant databases inspected after the run.
const SPOT_CHECKS: usize = 5;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    init_logging();
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not.
    let smoke = !std::env::args().any(|a| a == "--bench");
    if smoke {
        println!(
            "no --bench argument: a small smoke run (`cargo bench --bench fleet` for the real one)"
        );
    }
    let cfg = Config::from_env(smoke)?;
    let durability = match cfg.mode {
        Mode::Throwaway => Durability::Throwaway,
        Mode::Auto | Mode::Durable | Mode::BulkLoaded => Durability::Durable,
    };
    let pg = tokio::task::spawn_blocking(move || EmbeddedPostgres::start_temp(durability))
        .await?
        .context("start a private PostgreSQL")?;
    let outcome = run(&pg, &cfg).await;
    let mut pg = pg;
    let stopping = Instant::now();
    let stopped = tokio::task::spawn_blocking(move || {
        pg.stop()?;
        let stopped = stopping.elapsed();
        drop(pg); // removes the cluster's directory
        anyhow::Ok(stopped)
    })
    .await?
    .context("stop PostgreSQL")?;
    eprintln!(
        "[teardown] PostgreSQL stopped in {:.1} s, its files removed in {:.1} s more",
        stopped.as_secs_f64(),
        (stopping.elapsed() - stopped).as_secs_f64()
    );
    outcome
}

struct Config {
    tenants: usize,
    rows: usize,
    concurrency: usize,
    sample: usize,
    mode: Mode,
}

/// How the cluster is run (`SILO_BENCH_DURABILITY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Default: durable, unless a probe projects the durable setup over
    /// [`SETUP_BUDGET`]; then the rest of the setup is bulk-loaded.
    Auto,
    /// fsync on throughout, setup included, however long it takes.
    Durable,
    /// Durable cluster; the whole setup bulk-loaded with fsync off.
    BulkLoaded,
    /// fsync off throughout, like the tests' clusters.
    Throwaway,
}

impl Config {
    /// `smoke`: run without `--bench` (by `cargo test --all-targets`):
    /// small defaults and an fsync-off cluster, to check the bench works.
    fn from_env(smoke: bool) -> Result<Self> {
        let tenants = env_number("SILO_BENCH_TENANTS", if smoke { 6 } else { 1000 })?;
        ensure!(tenants >= 2, "SILO_BENCH_TENANTS must be at least 2");
        let rows = env_number("SILO_BENCH_ROWS", if smoke { 100 } else { 3000 })?;
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
        let mode = match std::env::var("SILO_BENCH_DURABILITY").as_deref() {
            Err(_) if smoke => Mode::Throwaway,
            Err(_) | Ok("auto") => Mode::Auto,
            Ok("durable") => Mode::Durable,
            Ok("bulk-loaded") => Mode::BulkLoaded,
            Ok("throwaway") => Mode::Throwaway,
            Ok(other) => anyhow::bail!(
                "SILO_BENCH_DURABILITY must be 'auto', 'durable', 'bulk-loaded' or 'throwaway', not '{other}'"
            ),
        };
        Ok(Self {
            tenants,
            rows,
            concurrency,
            sample,
            mode,
        })
    }
}

/// The embedded tenant migrations plus the benchmark's version 2.
fn migrator_v2() -> TenantSchema {
    let mut m = embedded_migrator();
    let mut all = m.migrations.to_vec();
    all.push(Migration::new(
        2,
        "preferred language".into(),
        MigrationType::Simple,
        V2_SQL.into(),
        false,
    ));
    m.migrations = Cow::Owned(all);
    m.into()
}

async fn run(pg: &EmbeddedPostgres, cfg: &Config) -> Result<()> {
    let admin_url = pg.url("postgres");
    let (keyring, registry) = control_plane(pg).await?;
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect(&admin_url)
        .await
        .context("connect as superuser")?;
    let provisioner = support::control(&registry, &keyring, 0, None);
    provisioner.ensure_default_server(&admin_url).await?;

    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&admin)
        .await?;
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "fleet migration benchmark: N = {} tenants, {} patient rows each, fleet concurrency {}, \
         sequential sample S = {}, nproc = {nproc}",
        cfg.tenants, cfg.rows, cfg.concurrency, cfg.sample
    );
    println!("{version}");
    println!("load average at start: {}", load_average());
    println!();

    // --- Setup --------------------------------------------------------------
    let setup_started = Instant::now();
    let mut bulk = cfg.mode == Mode::BulkLoaded;
    if bulk {
        bulk_load(&admin, true).await?;
    }
    provisioner
        .provisioner()
        .refill_all()
        .await
        .context("build the template database")?;
    populate_template(pg, &admin, cfg.rows).await?;
    let populated = setup_started.elapsed();
    let creates_started = Instant::now();
    let mut done = 0;
    if cfg.mode == Mode::Auto {
        done = PROBE.min(cfg.tenants);
        create_tenants(&provisioner, 0..done).await?;
        sqlx::raw_sql("CHECKPOINT").execute(&admin).await?;
        let probe = creates_started.elapsed();
        let projected = populated + probe.mul_f64(cfg.tenants as f64 / done as f64);
        let mut note = format!(
            "durable probe: {done} creates + checkpoint in {:.1} s, projecting a {:.0} s setup",
            probe.as_secs_f64(),
            projected.as_secs_f64()
        );
        if projected > SETUP_BUDGET {
            bulk = true;
            note.push_str(&format!(
                " (> {} s): the remaining {} tenants were bulk-loaded with fsync off",
                SETUP_BUDGET.as_secs(),
                cfg.tenants - done
            ));
            bulk_load(&admin, true).await?;
        } else {
            note.push_str(&format!(
                " (<= {} s): the whole setup ran durable",
                SETUP_BUDGET.as_secs()
            ));
        }
        println!("[setup] {note}");
    }
    create_tenants(&provisioner, done..cfg.tenants).await?;
    let created = creates_started.elapsed();
    // Settle: no checkpoint or writeback debt of the setup left for the
    // measured phases to pay.
    let settle_started = Instant::now();
    sqlx::raw_sql("CHECKPOINT").execute(&admin).await?;
    if bulk {
        bulk_load(&admin, false).await?;
        tokio::task::spawn_blocking(|| std::process::Command::new("sync").status())
            .await?
            .context("run sync")?;
        sqlx::raw_sql("CHECKPOINT").execute(&admin).await?;
    }
    let settled = settle_started.elapsed();
    let setup = setup_started.elapsed();
    let db_bytes: i64 = sqlx::query_scalar(
        "SELECT sum(pg_database_size(datname))::int8 FROM pg_database WHERE datname LIKE 'silo\\_t\\_%'",
    )
    .fetch_one(&admin)
    .await?;
    println!(
        "[setup] template + {} rows in {:.1} s; {} tenants created ({} at a time) in {:.1} s; \
         {:.1} GB of tenant databases; final checkpoint{} {:.1} s; total {:.1} s",
        cfg.rows,
        populated.as_secs_f64(),
        cfg.tenants,
        CREATE_CONCURRENCY,
        created.as_secs_f64(),
        db_bytes as f64 / 1e9,
        if bulk {
            ", settings restored, sync"
        } else {
            ""
        },
        settled.as_secs_f64(),
        setup.as_secs_f64()
    );
    let settings = durability_settings(&admin).await?;
    println!("[setup] measured phases run with {settings}");
    if cfg.mode != Mode::Throwaway {
        ensure!(
            settings.contains("fsync=on") && settings.contains("synchronous_commit=on"),
            "durability settings were not restored: {settings}"
        );
    }
    let durability_label = match (cfg.mode, bulk) {
        (Mode::Throwaway, _) => "fsync off throughout (throwaway)".to_owned(),
        (_, false) => "fsync on throughout, setup included".to_owned(),
        (Mode::BulkLoaded, true) => "fsync on; setup bulk-loaded with fsync off".to_owned(),
        (_, true) => format!(
            "fsync on; first {done} creates durable, rest of setup bulk-loaded with fsync off"
        ),
    };

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
    let checkpoint_started = Instant::now();
    sqlx::raw_sql("CHECKPOINT").execute(&admin).await?;
    let seq_checkpoint = checkpoint_started.elapsed();
    println!(
        "[sequential] the CHECKPOINT after it took {:.1} s (not in the timings)",
        seq_checkpoint.as_secs_f64()
    );

    // --- Fleet run ----------------------------------------------------------
    let upgraded = ControlPlane::new(
        registry.clone(),
        keyring.clone(),
        ControlConfig {
            schema: v2,
            ..Default::default()
        },
    );
    let latencies = Mutex::new(Vec::with_capacity(cfg.tenants));
    let fleet_started = Instant::now();
    let fleet_run = upgraded
        .fleet()
        .start(
            FleetOptions {
                concurrency: Some(cfg.concurrency),
                ..Default::default()
            },
            "bench",
        )
        .await
        .context("start the fleet migration")?;
    let report: FleetReport = upgraded
        .run_fleet(fleet_run, |result, progress| {
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
    print_report(
        cfg,
        &Results {
            durability: durability_label,
            setup,
            sequential,
            seq_checkpoint,
            fleet_latencies: latencies,
            fleet_wall,
            engine: Duration::from_secs_f64(report.seconds),
            fleet_tenants: cfg.tenants - cfg.sample,
        },
    );
    admin.close().await;
    registry.pool().close().await;
    verified?;
    println!("verification: OK");
    Ok(())
}

/// Turn fsync, synchronous_commit and full_page_writes off (`true`) or back
/// to their defaults (`false`): all three take effect on reload.
async fn bulk_load(admin: &PgPool, on: bool) -> Result<()> {
    for name in ["fsync", "synchronous_commit", "full_page_writes"] {
        // One statement at a time: ALTER SYSTEM refuses a transaction block.
        let sql = if on {
            format!("ALTER SYSTEM SET {name} = off")
        } else {
            format!("ALTER SYSTEM RESET {name}")
        };
        sqlx::raw_sql(&sql)
            .execute(admin)
            .await
            .with_context(|| format!("run {sql}"))?;
    }
    sqlx::query("SELECT pg_reload_conf()")
        .execute(admin)
        .await
        .context("reload the configuration")?;
    // Every process re-reads the configuration on SIGHUP, before its next command.
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(())
}

/// The durability settings as a fresh session sees them.
async fn durability_settings(admin: &PgPool) -> Result<String> {
    Ok(sqlx::query_scalar(
        "SELECT string_agg(name || '=' || setting, ', ' ORDER BY name) FROM pg_settings
         WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes')",
    )
    .fetch_one(admin)
    .await?)
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
                 FROM generate_series(1, $1::int4) g",
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
async fn create_tenants(p: &ControlPlane, range: std::ops::Range<usize>) -> Result<()> {
    futures::stream::iter(range)
        .map(|i| async move {
            let slug = format!("bench-{i:05}");
            let req = support::request(&slug);
            p.provisioner()
                .create(&req, None, "bench")
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
    schema: &TenantSchema,
) -> Result<Duration> {
    let started = Instant::now();
    let db = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&pg.url(database))
        .await
        .with_context(|| format!("connect to {database}"))?;
    let migrated = schema.apply(&db, None).await;
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

fn mean(samples: &[Duration]) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.iter().sum::<Duration>() / samples.len() as u32
}

/// What the measured phases produced.
struct Results {
    durability: String,
    setup: Duration,
    sequential: Vec<Duration>,
    /// The CHECKPOINT after the sequential sample, outside its timing.
    seq_checkpoint: Duration,
    fleet_latencies: Vec<Duration>,
    /// From `start_fleet_migration` to the returned report.
    fleet_wall: Duration,
    /// The engine's own figure: migrating the tenants, without the
    /// operation's bookkeeping and the template rebuild after it.
    engine: Duration,
    fleet_tenants: usize,
}

fn print_report(cfg: &Config, r: &Results) {
    let mut seq = r.sequential.clone();
    seq.sort_unstable();
    let mut lat = r.fleet_latencies.clone();
    lat.sort_unstable();
    let n = cfg.tenants as u32;
    let fleet_n = r.fleet_tenants as u32;
    let seq_mean = mean(&seq);
    let seq_with_checkpoint = seq_mean + r.seq_checkpoint / seq.len() as u32;
    let per_tenant = r.fleet_wall / fleet_n;
    let engine_per_tenant = r.engine / fleet_n;
    let scaled = per_tenant * n;
    let speedup = |fleet: Duration| seq_mean.as_secs_f64() / fleet.as_secs_f64();

    let row = |k: &str, v: String| println!("{k:<52} {v}");
    row("tenants (N)", cfg.tenants.to_string());
    row("patient rows per tenant", cfg.rows.to_string());
    row("cluster", r.durability.clone());
    row(
        "setup, untimed (template, rows, N creates, settle)",
        format!("{:.1} s", r.setup.as_secs_f64()),
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
        "sequential per tenant incl. its checkpoint",
        format!("{:.1} ms", ms(seq_with_checkpoint)),
    );
    row(
        "sequential, extrapolated to N (mean x N)",
        format!("{:.1} s", (seq_mean * n).as_secs_f64()),
    );
    row(
        "fleet run: tenants / concurrency",
        format!("{} / {}", r.fleet_tenants, cfg.concurrency),
    );
    row(
        "fleet run: start to report / engine phase",
        format!(
            "{:.1} s / {:.1} s",
            r.fleet_wall.as_secs_f64(),
            r.engine.as_secs_f64()
        ),
    );
    row(
        "fleet run: throughput (start to report)",
        format!(
            "{:.1} tenants/s ({:.1} ms per tenant)",
            r.fleet_tenants as f64 / r.fleet_wall.as_secs_f64(),
            ms(per_tenant)
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
    row(
        "speed-up over sequential (start to report)",
        format!("{:.2}x", speedup(per_tenant)),
    );
    row(
        "speed-up over sequential (engine phase)",
        format!("{:.2}x", speedup(engine_per_tenant)),
    );
    row(
        "fleet run scaled to N (start to report)",
        format!("{:.1} s", scaled.as_secs_f64()),
    );
    row(
        "target: N tenants <= 60 s",
        format!(
            "{} ({:.1} s)",
            if scaled <= TARGET { "MET" } else { "NOT MET" },
            scaled.as_secs_f64()
        ),
    );
}
