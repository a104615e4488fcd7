//! Start-up: how a silo process is put together, in one place, for `silo
//! serve`, `silo dev`, the tests and the benches alike.
//!
//! 1. [`connect`]: the control DB (migrated), the keys, the tenant schema,
//!    backup storage and the default tenant server → a [`ControlPlane`];
//! 2. [`start`]: the tenant router, its upkeep, the background jobs and the
//!    HTTP application → a running [`Silo`];
//! 3. [`Silo::serve`]: HTTP on a listener until shutdown, then every task is
//!    stopped and joined.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::limits::{HttpLimits, Limits};
use crate::api::{app, AppParts, AppState};
use crate::backup::Storage;
use crate::config::{Secret, ServerArgs};
use crate::control::{ControlConfig, ControlPlane};
use crate::crypto::Keyring;
use crate::provision::ProvisionConfig;
use crate::registry::Registry;
use crate::router::{RouterConfig, TenantRouter};
use crate::servers::TenantSchema;
use crate::wire::{Front, WireSettings};

/// How long shutdown waits for in-flight requests and background tasks.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(30);

/// What the control plane is made of.
pub struct Connection {
    /// The control database.
    pub database_url: Secret,
    pub keyring: Keyring,
    /// Admin URL of the default tenant server, registered on first start
    /// (default: the control database's server).
    pub tenant_server_url: Option<Secret>,
    pub schema: TenantSchema,
    /// Backup storage; `None` turns backups off.
    pub storage: Option<Storage>,
    /// Spare databases kept ready per server.
    pub warm_pool_size: u32,
    /// How long quarantined and replaced databases are kept.
    pub keep_for: crate::domain::KeepFor,
    /// Backup-like work run at once by this process (`SILO_BACKUP_CONCURRENCY`).
    pub work_slots: usize,
    /// Settings given to every tenant role (`SILO_TENANT_TEMP_FILE_LIMIT_MB`).
    pub role_settings: crate::servers::RoleSettings,
}

/// Connect to the control DB, apply its migrations, build the control
/// plane, and register the default tenant server on first start.
pub async fn connect(c: Connection) -> anyhow::Result<ControlPlane> {
    if let Some(why) = crate::servers::weak_tls(c.database_url.expose()) {
        tracing::warn!("control database connection: {why}");
    }
    let registry = Registry::connect_lazy(c.database_url.expose())?;
    registry
        .migrate()
        .await
        .context("apply control database migrations")?;
    registry
        .close_to_public()
        .await
        .context("close the control database to PUBLIC")?;
    if c.tenant_server_url.is_none() {
        tracing::warn!("SILO_TENANT_SERVER_URL is unset: tenants share the control database's cluster. Their roles cannot connect to the control database (it is closed to PUBLIC), but a separate cluster for tenants is the stronger wall");
    }
    let control = ControlPlane::new(
        registry,
        c.keyring,
        ControlConfig {
            provision: ProvisionConfig {
                warm_pool_size: c.warm_pool_size,
                role_settings: c.role_settings,
            },
            schema: c.schema,
            storage: c.storage,
            keep_for: c.keep_for,
            work_slots: Some(c.work_slots),
        },
    );
    let tenant_server = c.tenant_server_url.as_ref().unwrap_or(&c.database_url);
    control
        .ensure_default_server(tenant_server.expose())
        .await?;
    Ok(control)
}

/// How a running silo behaves.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// Bearer token of the bootstrap admin.
    pub admin_token: Secret,
    /// Bearer token that may read `/metrics` (besides the admin token).
    pub metrics_token: Option<Secret>,
    /// A listener of its own for `/metrics`, without authentication.
    pub metrics_listen: Option<SocketAddr>,
    /// Tenants may be named by the first host label under this domain.
    pub app_domain: Option<String>,
    pub router: RouterConfig,
    /// Background jobs, or `None` for none (a test that runs them by hand).
    pub jobs: Option<JobIntervals>,
    /// Longest an admin API request may take before it is answered 503.
    pub admin_timeout: Duration,
    /// Limits of the HTTP routes: in flight, time, body, rate.
    pub limits: HttpLimits,
    /// The PostgreSQL-protocol front door, or `None` for none.
    pub wire: Option<WireSettings>,
}

/// How often the background jobs run.
#[derive(Debug, Clone, Copy)]
pub struct JobIntervals {
    pub reconcile: Duration,
    pub scheduler_tick: Duration,
    pub health: Duration,
    /// The usage collector's interval, rollup retention and top N.
    pub usage: crate::usage::UsageSettings,
}

impl RunSettings {
    /// From `silo serve`'s (and `silo dev`'s) flags.
    pub fn from_args(
        args: &ServerArgs,
        admin_token: Secret,
        metrics_token: Option<Secret>,
    ) -> Self {
        Self {
            admin_token,
            metrics_token,
            metrics_listen: args.metrics_listen,
            app_domain: args.app_domain.clone(),
            router: RouterConfig {
                replicas: args.replicas,
                local_sockets: args.local_sockets,
                ..RouterConfig::default()
            },
            jobs: Some(JobIntervals {
                reconcile: Duration::from_secs(args.reconcile_interval.max(1)),
                scheduler_tick: Duration::from_secs(args.scheduler_tick.max(1)),
                health: Duration::from_secs(args.health_interval.max(1)),
                usage: crate::usage::UsageSettings {
                    interval: Duration::from_secs(args.usage_interval.max(1)),
                    keep_days: args.usage_keep_days,
                    top_n: args.usage_top_n as usize,
                },
            }),
            admin_timeout: Duration::from_secs(args.admin_request_timeout.max(1)),
            limits: HttpLimits {
                app_request_timeout: Duration::from_secs(args.app_request_timeout.max(1)),
                app_max_in_flight: args.app_max_in_flight as usize,
                app_max_body_bytes: args.app_max_body_bytes as usize,
                app_rate_limit: args.app_rate_limit,
                app_rate_burst: args.app_rate_burst,
                app_misdirected_limit: args.app_misdirected_limit,
                app_refusal_hold: Duration::from_millis(args.app_refusal_hold_ms),
                app_refusal_holds_per_tenant: crate::api::limits::HOLDS_PER_TENANT,
                admin_max_in_flight: args.admin_max_in_flight as usize,
                admin_auth_failures: args.admin_auth_failures,
                trusted_proxies: args.trusted_proxies.0.clone(),
            },
            wire: WireSettings::from_args(args),
        }
    }
}

/// A running silo: its control plane, router and HTTP application, and
/// the background tasks it stops on shutdown.
pub struct Silo {
    pub control: ControlPlane,
    pub router: TenantRouter,
    app: axum::Router,
    /// `/metrics` alone, for its own listener.
    metrics_app: axum::Router,
    metrics_listen: Option<SocketAddr>,
    /// The PostgreSQL front door, when it is on (serving once `serve` runs).
    pub wire: Option<Front>,
    token: CancellationToken,
    tracker: TaskTracker,
}

/// Start the router, its upkeep and the background jobs, and build the HTTP
/// application (and the PostgreSQL front door: its TLS files are read here).
pub fn start(control: ControlPlane, settings: RunSettings) -> anyhow::Result<Silo> {
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    if let Some(every) = settings.jobs {
        crate::jobs::spawn(
            &control,
            every.reconcile,
            every.scheduler_tick,
            every.health,
            every.usage,
            &token,
            &tracker,
        );
    }
    let router = TenantRouter::new(
        control.registry().clone(),
        control.keyring().clone(),
        settings.router,
    );
    let wire = settings
        .wire
        .map(|w| {
            Front::new(
                w,
                settings.app_domain.clone(),
                router.clone(),
                control.registry().clone(),
                control.keyring(),
            )
        })
        .transpose()?;
    router.spawn_maintenance(&token, &tracker);
    spawn_lockout_repair(&control, &router, &token, &tracker);
    let state = AppState::new(AppParts {
        control: control.clone(),
        router: router.clone(),
        admin_token: Arc::new(settings.admin_token),
        metrics_token: settings.metrics_token.map(Arc::new),
        metrics: crate::telemetry::metrics_handle(),
        app_domain: settings.app_domain.as_deref().map(Arc::from),
        admin_timeout: settings.admin_timeout,
        limits: Arc::new(Limits::new(settings.limits)),
        pg_address: wire
            .as_ref()
            .map(|w| Arc::from(w.settings().public_address.as_str())),
        wire: wire.clone(),
    });
    Ok(Silo {
        control,
        router,
        app: app(state.clone()),
        metrics_app: crate::api::metrics_app(state),
        metrics_listen: settings.metrics_listen,
        wire,
        token,
        tracker,
    })
}

/// Least time between two repairs of one tenant's password.
const LOCKOUT_PAUSE: Duration = Duration::from_secs(5);

/// A tenant whose role refused the password silo records (it gave itself
/// another, as any role may; or it is gone from its server, which
/// PostgreSQL answers the same way) is repaired as soon as the router or
/// the front door is refused, not at the next reconcile pass: minutes of
/// the tenant's traffic refused become one request's. The same repairs as
/// the pass's, each under the tenant's lock and audited: the role made
/// again ([`crate::provision::Provisioner::make_role_again`]), its
/// password given back ([`crate::provision::Provisioner::restore_passwords`]),
/// and for a read-only login its reader made again
/// ([`crate::provision::Provisioner::ensure_reader`]). At most once per
/// tenant (and reader) every [`LOCKOUT_PAUSE`]; then the tenant is read
/// again everywhere.
fn spawn_lockout_repair(
    control: &ControlPlane,
    router: &TenantRouter,
    token: &CancellationToken,
    tracker: &TaskTracker,
) {
    let mut lockouts = router.subscribe_lockouts();
    let (control, router, token, tasks) = (
        control.clone(),
        router.clone(),
        token.clone(),
        tracker.clone(),
    );
    tracker.spawn(async move {
        let mut last: std::collections::HashMap<(uuid::Uuid, bool), tokio::time::Instant> =
            Default::default();
        loop {
            let (id, reader) = tokio::select! {
                _ = token.cancelled() => return,
                got = lockouts.recv() => match got {
                    Ok(id) => id,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                },
            };
            let now = tokio::time::Instant::now();
            last.retain(|_, at| now.duration_since(*at) < LOCKOUT_PAUSE);
            if last.contains_key(&(id, reader)) {
                continue;
            }
            last.insert((id, reader), now);
            // A task of its own: a repair may wait for the tenant's lock
            // (an operation holding it), and others should not wait behind.
            let (control, router, token) = (control.clone(), router.clone(), token.clone());
            tasks.spawn(async move {
                let provisioner = control.provisioner();
                // Each step on its own: one that fails (the tenant busy
                // with an operation) does not keep the others from running.
                let repair = async {
                    let remade = provisioner.make_role_again(id).await;
                    let restored = provisioner.restore_passwords(id).await;
                    let reader_made = match reader {
                        true => provisioner.ensure_reader(id).await.map(|()| true),
                        false => Ok(false),
                    };
                    [remade, restored, reader_made]
                };
                let outcomes = tokio::select! {
                    _ = token.cancelled() => return,
                    r = repair => r,
                };
                let mut repaired = false;
                for outcome in outcomes {
                    match outcome {
                        Ok(done) => repaired |= done,
                        Err(e) => {
                            tracing::warn!(tenant_id = %id, "failed to repair a locked-out tenant's role: {}", e.detail())
                        }
                    }
                }
                if repaired {
                    router.invalidate(id).await;
                }
            });
        }
    });
}

/// `app` as served: each request knows its client's address (which the
/// limit on failed admin sign-ins counts by, [`crate::api::auth::Peer`]).
pub fn with_peers(
    app: axum::Router,
) -> axum::extract::connect_info::IntoMakeServiceWithConnectInfo<axum::Router, std::net::SocketAddr>
{
    app.into_make_service_with_connect_info::<std::net::SocketAddr>()
}

impl Silo {
    /// The HTTP application (to serve, or to call with `oneshot` in tests).
    pub fn http(&self) -> axum::Router {
        self.app.clone()
    }

    /// Serve the PostgreSQL front door on `listener` (until stop).
    pub fn serve_wire(&self, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
        let front = self
            .wire
            .as_ref()
            .context("the PostgreSQL front door is off (SILO_PG_LISTEN is empty)")?;
        front.spawn(listener, &self.token, &self.tracker);
        Ok(())
    }

    /// Serve HTTP on `listener` until `shutdown` resolves, then stop.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let stop = self.token.clone();
        if let Some(addr) = self.metrics_listen {
            let metrics = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listen on {addr} for metrics"))?;
            tracing::info!(%addr, "metrics served without authentication on their own listener");
            let (app, stop) = (self.metrics_app.clone(), self.token.clone());
            self.tracker.spawn(async move {
                let served = axum::serve(metrics, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await;
                if let Err(e) = served {
                    tracing::warn!("failed to serve metrics: {e}");
                }
            });
        }
        let served = axum::serve(listener, with_peers(self.app.clone()))
            .with_graceful_shutdown(async move {
                shutdown.await;
                stop.cancel();
            })
            .await
            .context("serve HTTP");
        self.stop().await;
        served
    }

    /// Stop the background tasks and operations, waiting for them (at most
    /// [`SHUTDOWN_DEADLINE`]).
    pub async fn stop(self) {
        self.token.cancel();
        self.tracker.close();
        let tasks = self.control.tasks();
        tasks.close();
        let drained = async {
            self.tracker.wait().await;
            tasks.wait().await;
        };
        if tokio::time::timeout(SHUTDOWN_DEADLINE, drained)
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop within the shutdown deadline");
        }
        tracing::info!("silo stopped");
    }
}

/// Connections the kernel completes and holds for a listener before it
/// accepts them: a burst of new connections (a pool starting, `pgbench -C`)
/// beyond it waits a second for the client's SYN to be sent again. Tokio
/// (and the standard library) ask for 128; the kernel caps it at
/// `net.core.somaxconn` (4096 on current Linux).
pub const LISTEN_BACKLOG: u32 = 1024;

/// A TCP listener on `addr` with [`LISTEN_BACKLOG`], as `silo serve` binds
/// its own (the HTTP API and the front door).
pub fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As tokio's own `bind`: a restarted silo may take its port back at
    // once, with connections of its last run still in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Bind `addr` (and the PostgreSQL front door's), report the bound
/// addresses (HTTP, front door), start, and serve until `shutdown`.
pub async fn serve(
    control: ControlPlane,
    mut settings: RunSettings,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_listen: impl FnOnce(SocketAddr, Option<SocketAddr>),
) -> anyhow::Result<()> {
    let listener = listen(addr).with_context(|| format!("listen on {addr}"))?;
    let pg = match &mut settings.wire {
        Some(w) => {
            let pg = listen(w.listen).with_context(|| {
                format!(
                    "listen on {} for the PostgreSQL front door (SILO_PG_LISTEN)",
                    w.listen
                )
            })?;
            let bound = pg.local_addr().context("read listen address")?;
            // A port chosen by the system: the URIs handed out name it.
            if w.public_address == w.listen.to_string() {
                w.public_address = bound.to_string();
            }
            w.listen = bound;
            tracing::info!(addr = %bound, "PostgreSQL front door listening");
            Some(pg)
        }
        None => None,
    };
    on_listen(
        listener.local_addr().context("read listen address")?,
        pg.as_ref().and_then(|l| l.local_addr().ok()),
    );
    let silo = start(control, settings)?;
    if let Some(pg) = pg {
        silo.serve_wire(pg)?;
    }
    silo.serve(listener, shutdown).await
}
