//! Helpers shared by the benchmark binaries.
#![allow(dead_code)] // each bench uses its own subset

use std::time::Duration;

use anyhow::{Context, Result};

/// Warnings only by default (`RUST_LOG` overrides): logging every request
/// would add its own cost to the timings.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The 1, 5 and 15 minute load averages: other work on the machine skews every figure.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// A whole number from the environment, or `default` when unset.
pub fn env_number<T: std::str::FromStr>(name: &str, default: T) -> Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    match std::env::var(name) {
        Ok(s) => s
            .parse()
            .with_context(|| format!("{name} must be a whole number")),
        Err(_) => Ok(default),
    }
}

/// Nearest-rank percentile of sorted samples.
pub fn nearest_rank(sorted: &[Duration], pct: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (pct * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Bearer token of the admin API in every benchmark's silo.
pub const ADMIN_TOKEN: &str = "bench-admin-token-0123456789abcdef";
/// Pause after a server starts, before its start-up reconcile is waited out.
const SETTLE: Duration = Duration::from_millis(500);

/// The control database on `pg`, created and migrated, with a fresh master key.
pub async fn control_plane(
    pg: &silo::embedded::EmbeddedPostgres,
) -> Result<(silo::crypto::Keyring, silo::registry::Registry)> {
    let (_, keyring, registry) = control_plane_keyed(pg).await?;
    Ok((keyring, registry))
}

/// As [`control_plane`], with the master key's base64 too (for a
/// `silo serve` child process's `SILO_MASTER_KEY`).
pub async fn control_plane_keyed(
    pg: &silo::embedded::EmbeddedPostgres,
) -> Result<(String, silo::crypto::Keyring, silo::registry::Registry)> {
    silo::cli::ensure_database(&pg.url("postgres"), "silo_control").await?;
    let master_key = silo::crypto::Keyring::generate_base64();
    let keyring = silo::crypto::Keyring::from_base64(&master_key)?;
    let registry = silo::registry::Registry::connect_lazy(&pg.url("silo_control"))?;
    registry
        .migrate()
        .await
        .context("migrate the control database")?;
    Ok((master_key, keyring, registry))
}

/// A control plane over `registry` with its own warm-pool size (and backups
/// when `storage` is given), as a replica of silo would have.
pub fn control(
    registry: &silo::registry::Registry,
    keyring: &silo::crypto::Keyring,
    warm_pool_size: u32,
    storage: Option<silo::backup::Storage>,
) -> silo::control::ControlPlane {
    silo::control::ControlPlane::new(
        registry.clone(),
        keyring.clone(),
        silo::control::ControlConfig {
            provision: silo::provision::ProvisionConfig {
                warm_pool_size,
                ..Default::default()
            },
            storage,
            ..Default::default()
        },
    )
}

/// A create request for a bench tenant.
pub fn request(slug: &str) -> silo::provision::CreateTenant {
    silo::provision::CreateTenant {
        slug: slug.parse().expect("a valid bench slug"),
        name: slug.parse().expect("a valid bench name"),
        plan: silo::domain::Plan::default_plan(),
        server: None,
    }
}

/// A `silo serve` running in this process on a free loopback port.
pub struct SiloServer {
    pub addr: std::net::SocketAddr,
    pub stop: tokio::sync::oneshot::Sender<()>,
    pub task: tokio::task::JoinHandle<Result<()>>,
}

impl SiloServer {
    /// Serve `control` with silo's own start-up ([`silo::startup::serve`]),
    /// then wait out the start-up reconcile pass (it holds each server's
    /// maintenance lock) so it is not timed.
    pub async fn start(control: silo::control::ControlPlane, warm_pool_size: u32) -> Result<Self> {
        Self::start_with(control, warm_pool_size, |_| {}).await
    }

    /// As [`SiloServer::start`], with settings changed by `tweak`.
    pub async fn start_with(
        control: silo::control::ControlPlane,
        warm_pool_size: u32,
        tweak: impl FnOnce(&mut silo::config::ServerArgs),
    ) -> Result<Self> {
        let registry = control.registry().clone();
        let mut args = silo::config::ServerArgs {
            listen: "127.0.0.1:0".parse()?,
            warm_pool_size,
            reconcile_interval: 3600,
            app_domain: None,
            replicas: 1,
            scheduler_tick: 15,
            health_interval: silo::config::DEFAULT_HEALTH_INTERVAL_SECS,
            metrics_listen: None,
            admin_request_timeout: silo::config::DEFAULT_ADMIN_REQUEST_TIMEOUT_SECS,
            app_request_timeout: silo::config::DEFAULT_APP_REQUEST_TIMEOUT_SECS,
            app_max_in_flight: silo::config::DEFAULT_APP_MAX_IN_FLIGHT as u64,
            admin_max_in_flight: silo::config::DEFAULT_ADMIN_MAX_IN_FLIGHT as u64,
            admin_auth_failures: silo::config::DEFAULT_ADMIN_AUTH_FAILURES,
            trusted_proxies: silo::config::Networks::default(),
            app_max_body_bytes: silo::config::DEFAULT_APP_MAX_BODY_BYTES as u64,
            app_rate_limit: silo::config::DEFAULT_APP_RATE_LIMIT,
            app_rate_burst: silo::config::DEFAULT_APP_RATE_BURST,
            app_misdirected_limit: silo::config::DEFAULT_APP_MISDIRECTED_LIMIT,
            app_refusal_hold_ms: silo::config::DEFAULT_APP_REFUSAL_HOLD_MS,
            local_sockets: true,
            pg_listen: silo::config::OptionalAddr(None),
            pg_public_address: None,
            pg_tls_cert: None,
            pg_tls_key: None,
            pg_require_tls: false,
            pg_max_clients: 10_000,
            pg_max_clients_per_tenant: 1_000,
            pg_max_logins_per_address: silo::config::DEFAULT_PG_MAX_LOGINS_PER_ADDRESS,
            pg_startup_timeout: 10,
            pg_client_idle_timeout: 0,
            pg_max_message_bytes: 16 * 1024 * 1024,
            pg_max_prepared_bytes: 16 * 1024 * 1024,
            pg_max_server_statements: silo::config::DEFAULT_PG_MAX_SERVER_STATEMENTS,
            pg_wait_timeout: 30,
            pg_spin_micros: silo::config::DEFAULT_PG_SPIN_MICROS,
            pg_shared_connections: 0,
            // No usage pass in the middle of another bench's figures.
            usage_interval: 86_400,
            usage_keep_days: silo::usage::DEFAULT_KEEP_DAYS,
            usage_top_n: silo::usage::DEFAULT_TOP_N as u32,
        };
        tweak(&mut args);
        let settings = silo::startup::RunSettings::from_args(
            &args,
            silo::config::Secret::new(ADMIN_TOKEN),
            None,
        );
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop_rx.await;
            };
            let on_listen = move |addr, _| {
                let _ = addr_tx.send(addr);
            };
            silo::startup::serve(control, settings, args.listen, shutdown, on_listen).await
        });
        let addr = match addr_rx.await {
            Ok(addr) => addr,
            Err(_) => {
                task.await??;
                anyhow::bail!("silo exited before listening");
            }
        };
        tokio::time::sleep(SETTLE).await;
        for server in registry.servers().await? {
            registry.lock_server(server.id).await?.release().await;
        }
        Ok(Self { addr, stop, task })
    }

    /// `http://addr`
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful shutdown; waits for the background jobs too.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.task.await?
    }
}

/// Zipf(s) over ranks 1..=n: a precomputed CDF, sampled by binary search.
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += (k as f64).powf(-s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Self { cdf }
    }

    /// A 0-based rank.
    pub fn sample(&self, rng: &mut impl rand::Rng) -> usize {
        let u: f64 = rng.gen();
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1)
    }

    /// Share of draws going to the `k` most popular.
    pub fn head(&self, k: usize) -> f64 {
        self.cdf[k.min(self.cdf.len()) - 1]
    }
}
