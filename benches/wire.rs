//! The PostgreSQL front door, in three cases chosen by name
//! (`cargo bench --bench wire -- pgbench idle zipf`, or `all`; no name runs
//! `pgbench` alone):
//!
//! **pgbench**: against a direct connection and PgBouncer, driven by
//! `pgbench -S` (select-only, simple protocol) in one run (seconds per case
//! `SILO_BENCH_SECONDS`, default 10; scale `SILO_BENCH_SCALE`, default 10;
//! some cases only: `SILO_BENCH_ONLY=1,50,C`; this process's runtime
//! threads, which silo runs on here: `SILO_BENCH_WORKERS`, default 2;
//! `SILO_BENCH_MODE=session` puts silo's credential in session mode;
//! `SILO_BENCH_SPIN_MICROS` sets silo's `SILO_PG_SPIN_MICROS`, 0 to turn
//! busy-polling off; `SILO_BENCH_SHARED_CONNECTIONS` sets its
//! `SILO_PG_SHARED_CONNECTIONS`, default 0: off).
//!
//! One PostgreSQL cluster, one tenant (premium plan: 50 connections). The
//! same pgbench runs three ways, SCRAM-SHA-256 on every path:
//! - **direct**: as the tenant's own role, straight to PostgreSQL;
//! - **silo**: through `SILO_PG_LISTEN` with an app credential in
//!   transaction mode (silo's connections to the server: at most 50);
//! - **pgbouncer**: Debian's PgBouncer in transaction mode, pool size 50,
//!   logging in to the server as the tenant's role (skipped if not installed).
//!
//! Cases: 1 client; 50 clients; a `-C` storm (8 clients, a new connection
//! per transaction). Reported: TPS per path, the ratios silo/direct and
//! silo/pgbouncer, and silo's CPU time (user and system) per transaction.
//!
//! **idle**: 10,000 idle clients (`SILO_BENCH_IDLE_CLIENTS`) held by a
//! `silo serve` child process with its default settings, measured alone
//! (`/proc/<pid>/status`). sqlx `PgConnection`s log in (SCRAM) with
//! transaction-mode credentials of 10 tenants (1,000 clients each: the
//! default per-tenant limit), 200 at a time (`SILO_BENCH_IDLE_BATCH`); each
//! runs one query, then all sit idle 10 s (`SILO_BENCH_IDLE_HOLD`); then a
//! sample of them queries again. Reported: silo's RSS at each step, per
//! client, and its peak (`VmHWM`). Goal: at most 100 MiB with 10,000 idle.
//!
//! **zipf**: 1,000 tenants (`SILO_BENCH_TENANTS`), each with a
//! transaction-mode credential, through a `silo serve` child process whose
//! server budget is 100 connections. 200 client tasks (`SILO_BENCH_ZIPF_TASKS`)
//! pick a tenant by Zipf (s = 1.1) for each request and run a point query on
//! a connection they keep for that tenant (up to 10 per task,
//! `SILO_BENCH_ZIPF_KEEP`, least recently used closed first; a tenant not
//! kept is logged in to first) for 20 s (`SILO_BENCH_ZIPF_SECONDS`).
//! Reported: requests/s, p50/p99, refusals "too busy" (SQLSTATE 53300) and
//! any other error, and the most server connections of silo's front door
//! PostgreSQL counted (`pg_stat_activity`, every 5 ms). Goals: no error but
//! clean refusals, never over the budget.
//!
//! **wide**: one row far larger than `SILO_PG_MAX_MESSAGE_BYTES` (256 MiB,
//! `SILO_BENCH_WIDE_MIB`; the limit is 16 MiB), fetched by `psql` into
//! `/dev/null` three times through a `silo serve` child process (transaction
//! mode) and three times straight from PostgreSQL, interleaved. Reported:
//! each fetch's time and MiB/s, and silo's peak RSS (`VmHWM`) before and
//! after: the row is passed on in parts, so the peak should not grow by
//! anything like the row's size.
//!
//! `idle`, `zipf` and `wide` run this build's `silo serve` (or the binary
//! `SILO_BENCH_SILO_BIN` names) and raise the open-files limit to its hard limit.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use rand::rngs::StdRng;
use rand::SeedableRng;
use silo::config::OptionalAddr;
use silo::domain::{Plan, PoolMode};
use silo::embedded::EmbeddedPostgres;
use silo::registry::Registry;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection, PgConnection};
use support::{control_plane, env_number, init_logging, load_average, ms, nearest_rank, Zipf};
use uuid::Uuid;

const CASES: &[&str] = &["pgbench", "idle", "zipf", "wide"];

fn main() -> Result<()> {
    init_logging();
    // `cargo bench` adds `--bench`; names are the rest.
    let mut cases: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if cases.is_empty() {
        cases.push("pgbench".into());
    }
    if cases.iter().any(|c| c == "all") {
        cases = CASES.iter().map(|c| c.to_string()).collect();
    }
    if let Some(c) = cases.iter().find(|c| !CASES.contains(&c.as_str())) {
        anyhow::bail!("unknown case {c:?}: the cases are {CASES:?} (or all)");
    }
    if cases.iter().any(|c| c != "pgbench") {
        raise_open_files()?;
    }
    // The runtime silo runs on in the pgbench case (in this process).
    let workers: usize = env_number("SILO_BENCH_WORKERS", 2)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?
        .block_on(async {
            for case in &cases {
                match case.as_str() {
                    "pgbench" => pgbench_case().await?,
                    "idle" => idle_case().await?,
                    "wide" => wide_case().await?,
                    _ => zipf_case().await?,
                }
            }
            Ok(())
        })
}

/// The open-files limit up to its hard limit (the `silo serve` child
/// inherits it): both ends of every client connection are open here.
fn raise_open_files() -> Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let idle: u64 = env_number("SILO_BENCH_IDLE_CLIENTS", IDLE_CLIENTS as u64)?;
    let tasks: u64 = env_number("SILO_BENCH_ZIPF_TASKS", ZIPF_TASKS as u64)?;
    let keep: u64 = env_number("SILO_BENCH_ZIPF_KEEP", ZIPF_KEEP as u64)?;
    let wanted = idle.max(tasks * keep) + 1_000;
    anyhow::ensure!(
        hard >= wanted,
        "the hard open-files limit is {hard}, this bench needs {wanted} (ulimit -Hn)"
    );
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    println!("open files: soft limit {soft} raised to {hard}");
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// TPS pgbench reports (without the initial connection time), or an error
/// with its output.
async fn pgbench(uri: &str, clients: u32, seconds: u64, reconnect: bool) -> Result<f64> {
    let mut cmd = tokio::process::Command::new("pgbench");
    cmd.args(["-n", "-S", "-M", "simple"])
        .arg("-c")
        .arg(clients.to_string())
        .arg("-j")
        .arg(clients.min(2).to_string())
        .arg("-T")
        .arg(seconds.to_string());
    if reconnect {
        cmd.arg("-C");
    }
    let out = cmd.arg(uri).output().await.context("run pgbench")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !said.contains("number of failed transactions: 0") {
        anyhow::bail!("pgbench failed: {said}");
    }
    said.lines()
        .find_map(|l| {
            let l = l.trim();
            // With -C, the figure that counts includes the reconnections.
            l.strip_prefix("tps = ")
                .filter(|_| {
                    l.contains("without initial connection time")
                        || l.contains("including reconnection times")
                })
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .with_context(|| format!("no TPS in: {said}"))
}

/// CPU time (user and system) this process has used.
fn own_cpu() -> Result<Duration> {
    use nix::sys::resource::{getrusage, UsageWho};
    let usage = getrusage(UsageWho::RUSAGE_SELF)?;
    let micros = |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1_000_000 + t.tv_usec() as u64;
    Ok(Duration::from_micros(
        micros(usage.user_time()) + micros(usage.system_time()),
    ))
}

async fn pgbench_case() -> Result<()> {
    let seconds: u64 = env_number("SILO_BENCH_SECONDS", 10)?;
    let scale: u32 = env_number("SILO_BENCH_SCALE", 10)?;
    println!(
        "wire benchmark: pgbench -S, {seconds} s per case, scale {scale}; load {}",
        load_average()
    );
    let pg = tokio::task::spawn_blocking(EmbeddedPostgres::start_throwaway).await??;
    let (keyring, registry) = control_plane(&pg).await?;
    let control = support::control(&registry, &keyring, 0, None);
    control.ensure_default_server(&pg.url("postgres")).await?;
    let mut req = support::request("bench-wire");
    req.plan = Plan::parse("premium").unwrap();
    control.provisioner().create(&req, None, "bench").await?;
    let t = registry
        .find_tenant("bench-wire")
        .await?
        .context("the bench tenant")?;
    let role_password = keyring.open_string(&t.key_id, &t.password_enc, t.id.as_bytes())?;
    let init = tokio::process::Command::new("pgbench")
        .args(["-i", "-q", "-s"])
        .arg(scale.to_string())
        .arg(pg.url(&t.database_name))
        .output()
        .await?;
    anyhow::ensure!(init.status.success(), "pgbench -i failed");
    // The three paths each keep their idle server connections a while:
    // the role's own limit (the plan's 50) must not make one path refuse
    // another's clients. silo still opens at most 50, and PgBouncer's pool is 50.
    let admin = sqlx::PgPool::connect(&pg.url("postgres")).await?;
    sqlx::query(&format!(
        "ALTER ROLE \"{}\" CONNECTION LIMIT -1",
        t.role_name
    ))
    .execute(&admin)
    .await?;
    let app_password = silo::crypto::random_password(32);
    registry
        .create_app_credential(
            t.id,
            "bench",
            false,
            // `SILO_BENCH_MODE=session`: the credential in session mode.
            if std::env::var("SILO_BENCH_MODE").as_deref() == Ok("session") {
                PoolMode::Session
            } else {
                PoolMode::Transaction
            },
            &silo::servers::scram::verifier(&app_password),
            "bench",
        )
        .await?;
    let wire_port = free_port()?;
    let spin: u64 = env_number(
        "SILO_BENCH_SPIN_MICROS",
        silo::config::DEFAULT_PG_SPIN_MICROS,
    )?;
    println!("silo busy-polls up to {spin} µs (SILO_PG_SPIN_MICROS)");
    let shared: u32 = env_number("SILO_BENCH_SHARED_CONNECTIONS", 0)?;
    println!(
        "silo shares {shared} server connections per busy tenant (SILO_PG_SHARED_CONNECTIONS)"
    );
    let server = support::SiloServer::start_with(control, 0, |a| {
        a.pg_listen = OptionalAddr(Some(format!("127.0.0.1:{wire_port}").parse().unwrap()));
        a.pg_spin_micros = spin;
        a.pg_shared_connections = shared;
    })
    .await?;
    let direct = format!(
        "postgresql://{}:{}@127.0.0.1:{}/{}?sslmode=disable",
        t.role_name,
        role_password,
        pg.port(),
        t.database_name
    );
    let silo = format!(
        "postgresql://bench:{app_password}@127.0.0.1:{wire_port}/bench-wire?sslmode=disable"
    );
    // PgBouncer gets the role's password: 1.18 cannot log in to the server
    // with a SCRAM verifier in its auth file ("client authentication did not
    // provide SCRAM keys"), so it checks clients with its own verifier of
    // PostgreSQL's default 4096 iterations (paid by the client at each login).
    let bouncer = start_pgbouncer(&pg, &t.database_name, &t.role_name, &role_password).await;
    let mut paths = vec![("direct", direct), ("silo", silo)];
    match &bouncer {
        Ok((_, port)) => paths.push((
            "pgbouncer",
            format!(
                "postgresql://{}:{role_password}@127.0.0.1:{port}/bench?sslmode=disable",
                t.role_name
            ),
        )),
        Err(e) => println!("pgbouncer skipped: {e:#}"),
    }

    println!(
        "\n{:<22} {:>12} {:>12} {:>12} {:>12} {:>14} {:>14}",
        "case",
        "direct tps",
        "silo tps",
        "pgbouncer",
        "silo/direct",
        "silo/pgbouncer",
        "silo cpu µs/tx"
    );
    // `SILO_BENCH_ONLY=1,50,C`: some of the cases.
    let only = std::env::var("SILO_BENCH_ONLY").unwrap_or_else(|_| "1,50,C".into());
    let only: Vec<&str> = only.split(',').map(str::trim).collect();
    for (key, case, clients, reconnect) in [
        ("1", "1 client", 1, false),
        ("50", "50 clients", 50, false),
        ("C", "-C storm (8 clients)", 8, true),
    ] {
        if !only.contains(&key) {
            continue;
        }
        let mut tps = Vec::new();
        let mut silo_cpu = Duration::ZERO;
        for (name, uri) in &paths {
            // silo runs in this process: its CPU time is this process's
            // (pgbench is a child, counted apart).
            let before = own_cpu()?;
            tps.push(pgbench(uri, clients, seconds, reconnect).await?);
            if *name == "silo" {
                silo_cpu = own_cpu()?.saturating_sub(before);
            }
        }
        let bouncer = tps.get(2).copied();
        println!(
            "{:<22} {:>12.0} {:>12.0} {:>12} {:>12.2} {:>14} {:>14.1}",
            case,
            tps[0],
            tps[1],
            bouncer.map_or("-".into(), |b| format!("{b:.0}")),
            tps[1] / tps[0],
            bouncer.map_or("-".into(), |b| format!("{:.2}", tps[1] / b)),
            silo_cpu.as_secs_f64() * 1e6 / (tps[1] * seconds as f64),
        );
    }
    if let Ok((mut child, _)) = bouncer {
        let _ = child.kill().await;
    }
    server.stop().await?;
    Ok(())
}

/// PgBouncer in transaction mode, pool size 50, in front of the tenant's
/// database as its role (known to it by its password); the child, and the
/// port it listens on.
async fn start_pgbouncer(
    pg: &EmbeddedPostgres,
    database: &str,
    role: &str,
    password: &str,
) -> Result<(tokio::process::Child, u16)> {
    let bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .context("pgbouncer is not installed")?;
    let dir = tempfile::tempdir()?.keep();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let port = free_port()?;
    let ini = dir.join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]\nbench = host=127.0.0.1 port={} dbname={database} user={role}\n\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = scram-sha-256\nauth_file = {}\npool_mode = transaction\n\
             default_pool_size = 50\nmax_client_conn = 2000\nlogfile = {}\n",
            pg.port(),
            dir.join("users.txt").display(),
            dir.join("pgbouncer.log").display()
        ),
    )?;
    std::fs::write(
        dir.join("users.txt"),
        format!("\"{role}\" \"{password}\"\n"),
    )?;
    for f in ["pgbouncer.ini", "users.txt"] {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644))?;
    }
    let mut cmd = tokio::process::Command::new(bin);
    if nix::unistd::geteuid().is_root() {
        // PgBouncer will not run as root.
        let user = nix::unistd::User::from_name("postgres")?
            .context("the postgres user (PgBouncer will not run as root)")?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
        cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let child = cmd.arg(&ini).kill_on_drop(true).spawn()?;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok((child, port));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("pgbouncer did not start")
}

const POINT_QUERY: &str = "SELECT id, full_name FROM patients WHERE id = $1";
const MIB: f64 = 1024.0 * 1024.0;

/// Idle case.
const IDLE_CLIENTS: usize = 10_000;
const IDLE_TENANTS: usize = 10;
const IDLE_BATCH: usize = 200;
const IDLE_HOLD_SECONDS: u64 = 10;
const IDLE_GOAL_MIB: f64 = 100.0;
/// Clients of the idle case that query again at the end: one in this many.
const IDLE_SAMPLE_EVERY: usize = 100;

/// Zipf case.
const ZIPF_TENANTS: usize = 1000;
const ZIPF_S: f64 = 1.1;
const ZIPF_TASKS: usize = 200;
const ZIPF_KEEP: usize = 10;
const ZIPF_SECONDS: u64 = 20;
const SERVER_BUDGET: i32 = 100;
const ACTIVITY_EVERY: Duration = Duration::from_millis(5);
/// Tenants created at once.
const CREATE_CONCURRENCY: usize = 3;
/// A request (login and query) that takes longer is an error: silo's own
/// wait for a server connection gives up at 30 s (`SILO_PG_WAIT_TIMEOUT`).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(45);
const FRONT_DOOR_CONNECTIONS: &str = "SELECT count(*) FILTER (WHERE application_name = 'silo-wire'), count(*) FILTER (WHERE application_name = 'silo-router') FROM pg_stat_activity";

/// Memory of a process, bytes, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default)]
struct Mem {
    rss: u64,
    hwm: u64,
    anon: u64,
    file: u64,
}

impl Mem {
    fn of(pid: u32) -> Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("read /proc/{pid}/status"))?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
                .map(|kb| kb * 1024)
                .with_context(|| format!("no {name} in /proc/{pid}/status"))
        };
        Ok(Self {
            rss: field("VmRSS:")?,
            hwm: field("VmHWM:")?,
            anon: field("RssAnon:")?,
            file: field("RssFile:")?,
        })
    }

    fn describe(&self) -> String {
        format!(
            "RSS {:.1} MiB (anon {:.1}, file {:.1}), peak {:.1} MiB",
            self.rss as f64 / MIB,
            self.anon as f64 / MIB,
            self.file as f64 / MIB,
            self.hwm as f64 / MIB
        )
    }
}

/// `silo serve` as a child process (the bench's release build), with the
/// front door on, its default settings unless `extra` says otherwise.
struct SiloChild {
    child: tokio::process::Child,
    pid: u32,
    base: String,
    wire_port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl SiloChild {
    async fn start(
        pg: &EmbeddedPostgres,
        master_key: &str,
        registry: &Registry,
        extra: &[(&str, &str)],
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("silo.log");
        let out = std::fs::File::create(&log)?;
        let port = silo::embedded::postgres::free_port()?;
        let wire_port = silo::embedded::postgres::free_port()?;
        // This build's binary, or another (`SILO_BENCH_SILO_BIN`: one copied
        // aside, when the target directory is shared).
        let bin = std::env::var("SILO_BENCH_SILO_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_silo").to_owned());
        let child = tokio::process::Command::new(&bin)
            .arg("serve")
            .env("SILO_DATABASE_URL", pg.url("silo_control"))
            .env("SILO_TENANT_SERVER_URL", pg.url("postgres"))
            .env("SILO_MASTER_KEY", master_key)
            .env("SILO_ADMIN_TOKEN", support::ADMIN_TOKEN)
            .env("SILO_LISTEN", format!("127.0.0.1:{port}"))
            .env("SILO_PG_LISTEN", format!("127.0.0.1:{wire_port}"))
            .env("SILO_WARM_POOL_SIZE", "0")
            .env("SILO_RECONCILE_INTERVAL", "3600")
            .env("RUST_LOG", "warn")
            .envs(extra.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .context("start silo serve")?;
        let pid = child.id().context("silo serve's pid")?;
        let silo = Self {
            child,
            pid,
            base: format!("http://127.0.0.1:{port}"),
            wire_port,
            log,
            _dir: dir,
        };
        let http = reqwest::Client::new();
        let started = Instant::now();
        while http
            .get(format!("{}/readyz", silo.base))
            .send()
            .await
            .map_or(true, |r| !r.status().is_success())
        {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "silo did not start: {}",
                silo.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Its start-up reconcile holds each server's maintenance lock:
        // waited out, so it is not measured.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for server in registry.servers().await? {
            registry.lock_server(server.id).await?.release().await;
        }
        Ok(silo)
    }

    fn memory(&self) -> Result<Mem> {
        Mem::of(self.pid)
    }

    /// Client connections the front door holds now (`GET /admin/v1/pools`).
    async fn wire_clients(&self) -> Result<u64> {
        let body: serde_json::Value = reqwest::Client::new()
            .get(format!("{}/admin/v1/pools", self.base))
            .bearer_auth(support::ADMIN_TOKEN)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        body["wire"]["clients"]
            .as_u64()
            .with_context(|| format!("no wire.clients in {body}"))
    }

    /// Wait (up to 30 s) until the front door holds `n` clients.
    async fn wait_clients(&self, n: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let held = self.wire_clients().await?;
            if held == n {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the front door holds {held} clients, expected {n}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn options(&self, user: &str, password: &str, tenant: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.wire_port)
            .username(user)
            .password(password)
            .database(tenant)
            .ssl_mode(PgSslMode::Disable)
            .disable_statement_logging()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        format!("the end of {}:\n{tail}", self.log.display())
    }

    /// SIGTERM, and a clean exit.
    async fn stop(mut self) -> Result<()> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .context("silo serve did not stop within 60 s of SIGTERM")??;
        anyhow::ensure!(
            status.success(),
            "silo serve exited with {status}: {}",
            self.log_tail()
        );
        Ok(())
    }
}

/// A control plane on a fresh throwaway cluster with its template built,
/// for a `silo serve` child: the cluster, master key, keyring and registry.
async fn child_control_plane() -> Result<(EmbeddedPostgres, String, silo::crypto::Keyring, Registry)>
{
    let pg = tokio::task::spawn_blocking(EmbeddedPostgres::start_throwaway).await??;
    let (master_key, keyring, registry) = support::control_plane_keyed(&pg).await?;
    let control = support::control(&registry, &keyring, 0, None);
    control.ensure_default_server(&pg.url("postgres")).await?;
    control
        .provisioner()
        .refill_all()
        .await
        .context("build the template database")?;
    Ok((pg, master_key, keyring, registry))
}

/// Create tenants `{prefix}-{i}` (from the template, a few at a time), each
/// with the transaction-mode credential `app` of `password`; their slugs.
async fn tenants_with_credentials(
    registry: &Registry,
    keyring: &silo::crypto::Keyring,
    prefix: &str,
    n: usize,
    password: &str,
) -> Result<Vec<String>> {
    let control = support::control(registry, keyring, 0, None);
    let verifier = silo::servers::scram::verifier(password);
    futures::stream::iter(0..n)
        .map(|i| {
            let (control, verifier) = (control.clone(), verifier.clone());
            async move {
                let req = support::request(&format!("{prefix}-{i:04}"));
                let t = control
                    .provisioner()
                    .create(&req, None, "bench")
                    .await
                    .with_context(|| format!("create tenant {}", req.slug))?;
                control
                    .registry()
                    .create_app_credential(
                        t.id,
                        "app",
                        false,
                        PoolMode::Transaction,
                        &verifier,
                        "bench",
                    )
                    .await?;
                anyhow::Ok(t.slug)
            }
        })
        .buffered(CREATE_CONCURRENCY)
        .try_collect()
        .await
}

async fn point_query(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query_as::<_, (Uuid, String)>(POINT_QUERY)
        .bind(Uuid::new_v4())
        .fetch_optional(conn)
        .await
        .map(|_| ())
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB
}

/// One row far larger than the message limit: time and silo's memory.
async fn wide_case() -> Result<()> {
    let size: u64 = env_number("SILO_BENCH_WIDE_MIB", 256)?;
    anyhow::ensure!((1..1024).contains(&size), "SILO_BENCH_WIDE_MIB: 1 to 1023");
    println!(
        "\nwire wide: one {size} MiB row through silo (transaction mode) and direct; load {}",
        load_average()
    );
    let (pg, master_key, keyring, registry) = child_control_plane().await?;
    let password = silo::crypto::random_password(32);
    let slugs = tenants_with_credentials(&registry, &keyring, "wide", 1, &password).await?;
    let silo = SiloChild::start(&pg, &master_key, &registry, &[]).await?;
    let via_silo = format!(
        "postgresql://app:{password}@127.0.0.1:{}/{}?sslmode=disable",
        silo.wire_port, slugs[0]
    );
    let tenant = registry
        .find_tenant(&slugs[0])
        .await?
        .context("the tenant")?;
    let direct = format!("{}?sslmode=disable", pg.url(&tenant.database_name));
    let sql = format!("SELECT repeat('x', {})", size * 1024 * 1024);
    let fetch = |uri: String| {
        let sql = sql.clone();
        async move {
            let started = Instant::now();
            let out = tokio::process::Command::new("psql")
                .arg(&uri)
                .args([
                    "-X",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-o",
                    "/dev/null",
                    "-c",
                ])
                .arg(&sql)
                .output()
                .await
                .context("run psql")?;
            anyhow::ensure!(
                out.status.success(),
                "psql failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            anyhow::Ok(started.elapsed())
        }
    };
    let before = silo.memory()?;
    println!("[wide] silo before: {}", before.describe());
    let (mut silo_s, mut direct_s) = (Vec::new(), Vec::new());
    for round in 1..=3 {
        let d = fetch(direct.clone()).await?;
        let t = fetch(via_silo.clone()).await?;
        let mibs = |e: Duration| size as f64 / e.as_secs_f64();
        println!(
            "[wide] round {round}: direct {:.2} s ({:.0} MiB/s), silo {:.2} s ({:.0} MiB/s)",
            d.as_secs_f64(),
            mibs(d),
            t.as_secs_f64(),
            mibs(t)
        );
        direct_s.push(d.as_secs_f64());
        silo_s.push(t.as_secs_f64());
    }
    let after = silo.memory()?;
    println!("[wide] silo after: {}", after.describe());
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!("\n| figure | value |\n|---|---:|");
    println!("| row | {size} MiB (limit 16 MiB) |");
    println!(
        "| fetch time, direct / silo (mean of 3) | {:.2} / {:.2} s (silo/direct {:.2}) |",
        mean(&direct_s),
        mean(&silo_s),
        mean(&silo_s) / mean(&direct_s)
    );
    println!(
        "| silo peak RSS before / after | {:.1} / {:.1} MiB ({:+.1} MiB) |",
        mib(before.hwm),
        mib(after.hwm),
        mib(after.hwm) - mib(before.hwm)
    );
    silo.stop().await?;
    drop(pg);
    Ok(())
}

/// 10,000 idle clients: silo's memory.
async fn idle_case() -> Result<()> {
    let clients: usize = env_number("SILO_BENCH_IDLE_CLIENTS", IDLE_CLIENTS)?;
    let batch: usize = env_number("SILO_BENCH_IDLE_BATCH", IDLE_BATCH)?;
    let hold: u64 = env_number("SILO_BENCH_IDLE_HOLD", IDLE_HOLD_SECONDS)?;
    anyhow::ensure!(clients >= IDLE_TENANTS && batch >= 1);
    println!(
        "\nwire idle: {clients} idle clients over {IDLE_TENANTS} tenants (transaction mode), {batch} logging in at a time; load {}",
        load_average()
    );
    let (pg, master_key, keyring, registry) = child_control_plane().await?;
    let password = silo::crypto::random_password(32);
    let slugs =
        tenants_with_credentials(&registry, &keyring, "idle", IDLE_TENANTS, &password).await?;
    let silo = SiloChild::start(&pg, &master_key, &registry, &[]).await?;
    let outcome = idle_measure(&silo, &slugs, &password, clients, batch, hold).await;
    if outcome.is_err() {
        eprintln!("{}", silo.log_tail());
    }
    outcome?;
    silo.stop().await?;
    drop(pg);
    Ok(())
}

async fn idle_measure(
    silo: &SiloChild,
    slugs: &[String],
    password: &str,
    clients: usize,
    batch: usize,
    hold: u64,
) -> Result<()> {
    let opts: Vec<PgConnectOptions> = slugs
        .iter()
        .map(|s| silo.options("app", password, s))
        .collect();
    let at_start = silo.memory()?;
    println!(
        "[idle] silo serve (pid {}) ready: {}",
        silo.pid,
        at_start.describe()
    );
    // Warm-up: every tenant's credentials, pool and prepared statement
    // once, by one client that then leaves.
    for o in &opts {
        let mut c = PgConnection::connect_with(o).await?;
        point_query(&mut c).await?;
        c.close().await?;
    }
    silo.wait_clients(0).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = silo.memory()?;
    println!(
        "[idle] after one client per tenant came and went: {}",
        before.describe()
    );

    let started = Instant::now();
    let mut conns: Vec<PgConnection> = futures::stream::iter(0..clients)
        .map(|i| {
            let o = opts[i % opts.len()].clone();
            async move {
                PgConnection::connect_with(&o)
                    .await
                    .with_context(|| format!("client {i} logging in"))
            }
        })
        .buffer_unordered(batch)
        .try_collect()
        .await?;
    let login_time = started.elapsed();
    silo.wait_clients(clients as u64).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let logged_in = silo.memory()?;
    let per = |m: &Mem| (m.rss as f64 - before.rss as f64) / clients as f64 / 1024.0;
    println!(
        "[idle] {clients} clients logged in in {:.1} s ({:.0} logins/s); silo holds {} clients: {}; {:+.1} KiB per client",
        login_time.as_secs_f64(),
        clients as f64 / login_time.as_secs_f64(),
        silo.wire_clients().await?,
        logged_in.describe(),
        per(&logged_in)
    );

    let started = Instant::now();
    futures::stream::iter(conns.iter_mut())
        .map(point_query)
        .buffer_unordered(batch)
        .try_collect::<Vec<()>>()
        .await
        .context("a query on every client")?;
    println!(
        "[idle] one query on each client in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut highest = 0;
    for _ in 0..hold {
        tokio::time::sleep(Duration::from_secs(1)).await;
        highest = highest.max(silo.memory()?.rss);
    }
    let idle = silo.memory()?;
    let bench = Mem::of(std::process::id())?;
    println!(
        "[idle] {clients} idle after {hold} s: {}; {:+.1} KiB per client; highest RSS sampled while idle {:.1} MiB",
        idle.describe(),
        per(&idle),
        mib(highest)
    );
    println!(
        "[idle] (this bench process, with its {clients} sqlx connections: {})",
        bench.describe()
    );

    let sample: Vec<&mut PgConnection> = conns.iter_mut().step_by(IDLE_SAMPLE_EVERY).collect();
    let asked = sample.len();
    let mut answered = 0;
    for c in sample {
        let row: (i32,) = sqlx::query_as("SELECT 1").fetch_one(&mut *c).await?;
        point_query(c).await?;
        answered += usize::from(row.0 == 1);
    }
    println!("[idle] queries after the idle time: {answered} of {asked} sampled clients answered");

    futures::stream::iter(conns)
        .map(|c| c.close())
        .buffer_unordered(batch)
        .try_collect::<Vec<()>>()
        .await?;
    silo.wait_clients(0).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = silo.memory()?;
    println!("[idle] all {clients} closed: {}", after.describe());
    // Freed memory the allocator keeps is used again, not added to.
    let again: Vec<PgConnection> = futures::stream::iter(0..clients)
        .map(|i| PgConnection::connect_with(&opts[i % opts.len()]))
        .buffer_unordered(batch)
        .try_collect()
        .await?;
    silo.wait_clients(clients as u64).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = silo.memory()?;
    println!("[idle] {clients} logged in again: {}", second.describe());
    futures::stream::iter(again)
        .map(|c| c.close())
        .buffer_unordered(batch)
        .try_collect::<Vec<()>>()
        .await?;
    silo.wait_clients(0).await?;

    let met = mib(idle.rss) <= IDLE_GOAL_MIB;
    println!();
    println!("| figure | value |");
    println!("|---|---:|");
    println!("| silo RSS, ready | {:.1} MiB |", mib(at_start.rss));
    println!(
        "| silo RSS, warmed up (0 clients) | {:.1} MiB |",
        mib(before.rss)
    );
    println!(
        "| silo RSS, {clients} clients logged in | {:.1} MiB ({:+.1} KiB per client) |",
        mib(logged_in.rss),
        per(&logged_in)
    );
    println!(
        "| silo RSS, {clients} idle after a query each and {hold} s | {:.1} MiB ({:+.1} KiB per client; anon {:.1} MiB) |",
        mib(idle.rss),
        per(&idle),
        mib(idle.anon)
    );
    println!("| silo peak RSS (VmHWM) | {:.1} MiB |", mib(idle.hwm));
    println!("| silo RSS, all closed | {:.1} MiB |", mib(after.rss));
    println!(
        "| silo RSS, {clients} logged in again | {:.1} MiB |",
        mib(second.rss)
    );
    println!(
        "| logins | {clients} in {:.1} s, {batch} at a time |",
        login_time.as_secs_f64()
    );
    println!("| sampled clients answering at the end | {answered} / {asked} |");
    println!(
        "| goal: {clients} idle clients in <= {IDLE_GOAL_MIB:.0} MiB RSS | {} |",
        if met { "met" } else { "NOT MET" }
    );
    anyhow::ensure!(answered == asked, "some sampled clients did not answer");
    Ok(())
}

/// What one request of the Zipf case came to.
#[derive(Default)]
struct ZipfCounts {
    ok: AtomicU64,
    logins: AtomicU64,
    busy_login: AtomicU64,
    busy_query: AtomicU64,
    other: AtomicU64,
}

/// 1,000 Zipf tenants through the front door under a budget of 100.
async fn zipf_case() -> Result<()> {
    let n: usize = env_number("SILO_BENCH_TENANTS", ZIPF_TENANTS)?;
    let seconds: u64 = env_number("SILO_BENCH_ZIPF_SECONDS", ZIPF_SECONDS)?;
    let tasks: usize = env_number("SILO_BENCH_ZIPF_TASKS", ZIPF_TASKS)?;
    let keep: usize = env_number("SILO_BENCH_ZIPF_KEEP", ZIPF_KEEP)?;
    anyhow::ensure!(n >= 2 && tasks >= 1 && keep >= 1);
    println!(
        "\nwire zipf: {n} tenants (Zipf s = {ZIPF_S}), {tasks} tasks keeping up to {keep} connections each, budget {SERVER_BUDGET}, {seconds} s; load {}",
        load_average()
    );
    let (pg, master_key, keyring, registry) = child_control_plane().await?;
    let password = silo::crypto::random_password(32);
    let started = Instant::now();
    let slugs = tenants_with_credentials(&registry, &keyring, "zipf", n, &password).await?;
    println!(
        "[zipf] created {n} tenants with credentials in {:.1} s ({CREATE_CONCURRENCY} at a time, from the template)",
        started.elapsed().as_secs_f64()
    );
    sqlx::query("UPDATE db_servers SET max_connections = $1")
        .bind(SERVER_BUDGET)
        .execute(registry.pool())
        .await?;
    let silo = SiloChild::start(&pg, &master_key, &registry, &[]).await?;
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect(&pg.url("postgres"))
        .await?;
    let outcome = zipf_measure(&silo, &admin, &slugs, &password, seconds, tasks, keep).await;
    if outcome.is_err() {
        eprintln!("{}", silo.log_tail());
    }
    outcome?;
    admin.close().await;
    silo.stop().await?;
    drop(pg);
    Ok(())
}

/// Sessions ever opened to tenant databases (PostgreSQL 14+).
async fn tenant_sessions(admin: &sqlx::PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT COALESCE(sum(sessions), 0)::bigint FROM pg_stat_database WHERE datname LIKE 'silo\\_t\\_%'",
    )
    .fetch_one(admin)
    .await?)
}

async fn zipf_measure(
    silo: &SiloChild,
    admin: &sqlx::PgPool,
    slugs: &[String],
    password: &str,
    seconds: u64,
    tasks: usize,
    keep: usize,
) -> Result<()> {
    let zipf = Arc::new(Zipf::new(slugs.len(), ZIPF_S));
    println!(
        "[zipf] top 1 tenant {:.1}% of requests, top 10 {:.1}%, top 100 {:.1}%",
        zipf.head(1) * 100.0,
        zipf.head(10) * 100.0,
        zipf.head(100) * 100.0
    );
    let opts: Arc<Vec<PgConnectOptions>> = Arc::new(
        slugs
            .iter()
            .map(|s| silo.options("app", password, s))
            .collect(),
    );
    let counts = Arc::new(ZipfCounts::default());
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let refusals: Arc<Mutex<std::collections::BTreeMap<String, u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let at_start = silo.memory()?;
    let sessions_before = tenant_sessions(admin).await?;

    let activity = {
        let (admin, stop) = (admin.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut wire, mut router, mut samples) = (0i64, 0i64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let (w, r): (i64, i64) = sqlx::query_as(FRONT_DOOR_CONNECTIONS)
                    .fetch_one(&admin)
                    .await?;
                wire = wire.max(w);
                router = router.max(r);
                samples += 1;
                tokio::time::sleep(ACTIVITY_EVERY).await;
            }
            anyhow::Ok((wire, router, samples))
        })
    };

    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..tasks)
        .map(|w| {
            let (zipf, opts, counts) = (zipf.clone(), opts.clone(), counts.clone());
            let (errors, refusals) = (errors.clone(), refusals.clone());
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(w as u64);
                // Most recently used last.
                let mut held: Vec<(usize, PgConnection)> = Vec::with_capacity(keep);
                let mut reused = Vec::with_capacity(1 << 12);
                let mut fresh = Vec::with_capacity(1 << 10);
                let mut touched = std::collections::HashSet::new();
                while Instant::now() < deadline {
                    let t = zipf.sample(&mut rng);
                    touched.insert(t);
                    let kept = held
                        .iter()
                        .position(|(i, _)| *i == t)
                        .map(|at| held.remove(at).1);
                    if kept.is_none() && held.len() >= keep {
                        let (_, oldest) = held.remove(0);
                        let _ = oldest.close().await;
                    }
                    let login = kept.is_none();
                    let s = Instant::now();
                    let attempt = async {
                        let mut conn = match kept {
                            Some(c) => c,
                            None => {
                                counts.logins.fetch_add(1, Ordering::Relaxed);
                                PgConnection::connect_with(&opts[t])
                                    .await
                                    .map_err(|e| (true, e.into()))?
                            }
                        };
                        point_query(&mut conn)
                            .await
                            .map_err(|e| (false, anyhow::Error::from(e)))?;
                        Ok::<_, (bool, anyhow::Error)>(conn)
                    };
                    let outcome = match tokio::time::timeout(REQUEST_TIMEOUT, attempt).await {
                        Ok(o) => o,
                        Err(_) => Err((login, anyhow::anyhow!("no answer in {REQUEST_TIMEOUT:?}"))),
                    };
                    match outcome {
                        Ok(conn) => {
                            let took = s.elapsed();
                            if login {
                                fresh.push(took);
                            } else {
                                reused.push(took);
                            }
                            counts.ok.fetch_add(1, Ordering::Relaxed);
                            held.push((t, conn));
                        }
                        Err((at_login, e)) => {
                            let db = e
                                .downcast_ref::<sqlx::Error>()
                                .and_then(|e| e.as_database_error())
                                .map(|d| {
                                    (d.code().map(|c| c.into_owned()), d.message().to_owned())
                                });
                            match db {
                                Some((Some(code), message)) if code == "53300" => {
                                    let c = if at_login {
                                        &counts.busy_login
                                    } else {
                                        &counts.busy_query
                                    };
                                    c.fetch_add(1, Ordering::Relaxed);
                                    // Tenant names vary; the kind of refusal does not.
                                    let kind =
                                        message.split('"').next().unwrap_or("").trim().to_owned();
                                    *refusals.lock().expect("refusals").entry(kind).or_default() +=
                                        1;
                                }
                                _ => {
                                    counts.other.fetch_add(1, Ordering::Relaxed);
                                    let mut seen = errors.lock().expect("errors");
                                    if seen.len() < 10 {
                                        seen.push(format!(
                                            "{} on tenant {t}: {e:#}",
                                            if at_login { "login" } else { "query" }
                                        ));
                                    }
                                }
                            }
                        }
                    }
                }
                for (_, c) in held {
                    let _ = c.close().await;
                }
                (reused, fresh, touched)
            })
        })
        .collect();
    let mut reused = Vec::new();
    let mut fresh = Vec::new();
    let mut touched = std::collections::HashSet::new();
    for w in workers {
        let (r, f, t) = w.await?;
        reused.extend(r);
        fresh.extend(f);
        touched.extend(t);
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (max_wire, max_router, samples) = activity.await??;
    let at_end = silo.memory()?;
    silo.wait_clients(0).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let opened = tenant_sessions(admin).await? - sessions_before;

    let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let (ok, logins, busy_login, busy_query, other) = (
        c(&counts.ok),
        c(&counts.logins),
        c(&counts.busy_login),
        c(&counts.busy_query),
        c(&counts.other),
    );
    let mut all: Vec<Duration> = reused.iter().chain(fresh.iter()).copied().collect();
    all.sort_unstable();
    reused.sort_unstable();
    fresh.sort_unstable();
    let rps = ok as f64 / elapsed.as_secs_f64();
    let p = |s: &[Duration], pct| ms(nearest_rank(s, pct));
    println!(
        "[zipf] {:.1} s: ok {ok} ({rps:.0}/s), logins {logins}, refused too busy {} (at login {busy_login}, on a query {busy_query}), other errors {other}",
        elapsed.as_secs_f64(),
        busy_login + busy_query
    );
    println!(
        "[zipf] latency p50 / p99 / max: all {:.2} / {:.2} / {:.1} ms; on a kept connection {:.2} / {:.2} ms ({}); with a login {:.2} / {:.2} ms ({})",
        p(&all, 50),
        p(&all, 99),
        ms(all.last().copied().unwrap_or_default()),
        p(&reused, 50),
        p(&reused, 99),
        reused.len(),
        p(&fresh, 50),
        p(&fresh, 99),
        fresh.len()
    );
    println!(
        "[zipf] silo-wire server connections (pg_stat_activity): max {max_wire} over {samples} samples, budget {SERVER_BUDGET}; silo-router: max {max_router}"
    );
    println!(
        "[zipf] tenant server connections opened (pg_stat_database.sessions): {opened} ({:.2} per ok request); tenants touched {}",
        opened as f64 / ok.max(1) as f64,
        touched.len()
    );
    println!(
        "[zipf] silo: at start {}; at end {}",
        at_start.describe(),
        at_end.describe()
    );
    for (kind, n) in refusals.lock().expect("refusals").iter() {
        println!("[zipf] refusal 53300 x{n}: {kind}");
    }
    for e in errors.lock().expect("errors").iter() {
        println!("[zipf] error: {e}");
    }
    let within = max_wire <= i64::from(SERVER_BUDGET);
    println!();
    println!("| figure | value |");
    println!("|---|---:|");
    println!("| requests ok | {ok} ({rps:.0}/s) |");
    println!(
        "| of which logged in first | {logins} logins ({} ok) |",
        fresh.len()
    );
    println!(
        "| latency p50 / p99, all ok | {:.2} / {:.2} ms |",
        p(&all, 50),
        p(&all, 99)
    );
    println!(
        "| latency p50 / p99, kept connection / with a login | {:.2} / {:.2} ms, {:.2} / {:.2} ms |",
        p(&reused, 50),
        p(&reused, 99),
        p(&fresh, 50),
        p(&fresh, 99)
    );
    println!("| refused too busy (53300): at login / on a query | {busy_login} / {busy_query} |");
    println!(
        "| other errors (goal 0) | {other} ({}) |",
        if other == 0 { "met" } else { "NOT MET" }
    );
    println!(
        "| max silo-wire server connections, {samples} samples (goal <= {SERVER_BUDGET}) | {max_wire} ({}) |",
        if within { "met" } else { "NOT MET" }
    );
    println!(
        "| tenant server connections opened | {opened} ({:.2} per ok request) |",
        opened as f64 / ok.max(1) as f64
    );
    println!("| silo peak RSS (VmHWM) | {:.1} MiB |", mib(at_end.hwm));
    Ok(())
}
