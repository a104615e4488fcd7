//! The PostgreSQL-protocol front door: any PostgreSQL driver connects with
//! an app credential and gets its tenant's database, under the same
//! per-server connection budget as the HTTP router.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::config::ServerArgs;

/// How the front door listens and what it allows.
#[derive(Debug, Clone)]
pub struct WireSettings {
    pub listen: SocketAddr,
    /// `host:port` clients use (for the URIs the admin API hands out).
    pub public_address: String,
    /// PEM certificate chain and key, when TLS is on.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub require_tls: bool,
    pub max_clients: usize,
    pub max_clients_per_tenant: usize,
    /// Connections from one address (IPv6: one /64) logging in at once.
    pub max_logins_per_address: usize,
    pub startup_timeout: Duration,
    /// `None`: idle clients are never disconnected.
    pub client_idle_timeout: Option<Duration>,
    pub max_message_bytes: usize,
    /// Bytes of named prepared statements one client may keep (see
    /// `session::statement_cost`).
    pub max_prepared_bytes: usize,
    /// Prepared statements one server connection keeps (the least
    /// recently used closed past it).
    pub max_server_statements: usize,
    /// Longest a client waits for a server connection (or a move's cut-over).
    pub wait_timeout: Duration,
    /// How long a session may busy-poll the socket it expects to speak
    /// next while the front door is nearly idle (see `wire::spin`).
    pub spin: Duration,
    /// Server connections per tenant pool its clients' single reads may
    /// share, pipelined, while it is busy (0: none; see `wire::mux`).
    pub shared_connections: usize,
}

impl WireSettings {
    /// From `silo serve`'s flags; `None` when the front door is off.
    pub fn from_args(args: &ServerArgs) -> Option<Self> {
        let listen = args.pg_listen.0?;
        Some(Self {
            listen,
            public_address: args
                .pg_public_address
                .clone()
                .unwrap_or_else(|| listen.to_string()),
            tls: args.pg_tls_cert.clone().zip(args.pg_tls_key.clone()),
            require_tls: args.pg_require_tls,
            max_clients: args.pg_max_clients as usize,
            max_clients_per_tenant: args.pg_max_clients_per_tenant as usize,
            max_logins_per_address: args.pg_max_logins_per_address as usize,
            startup_timeout: Duration::from_secs(args.pg_startup_timeout),
            client_idle_timeout: (args.pg_client_idle_timeout > 0)
                .then(|| Duration::from_secs(args.pg_client_idle_timeout)),
            max_message_bytes: args.pg_max_message_bytes as usize,
            max_prepared_bytes: args.pg_max_prepared_bytes as usize,
            max_server_statements: args.pg_max_server_statements as usize,
            wait_timeout: Duration::from_secs(args.pg_wait_timeout),
            spin: Duration::from_micros(args.pg_spin_micros),
            shared_connections: args.pg_shared_connections as usize,
        })
    }

    /// Defaults for a listener on `listen` (tests, benches).
    pub fn on(listen: SocketAddr) -> Self {
        Self {
            listen,
            public_address: listen.to_string(),
            tls: None,
            require_tls: false,
            max_clients: 10_000,
            max_clients_per_tenant: 1_000,
            max_logins_per_address: crate::config::DEFAULT_PG_MAX_LOGINS_PER_ADDRESS as usize,
            startup_timeout: Duration::from_secs(10),
            client_idle_timeout: None,
            max_message_bytes: 16 * 1024 * 1024,
            max_prepared_bytes: 16 * 1024 * 1024,
            max_server_statements: crate::config::DEFAULT_PG_MAX_SERVER_STATEMENTS as usize,
            wait_timeout: Duration::from_secs(30),
            spin: Duration::from_micros(crate::config::DEFAULT_PG_SPIN_MICROS),
            shared_connections: 0,
        }
    }
}

pub mod backend;
mod mux;
mod pool;
mod proto;
mod scram;
mod session;
mod spin;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::registry::{AppCredential, Registry};
use crate::router::{RouteError, TenantEntry, TenantRouter};
use backend::Target;
use pool::WirePool;

/// A client's byte stream: TCP, or TLS over it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connections logging in at once (each for at most the startup timeout),
/// apart from the logged-in clients' room.
const MAX_STARTUPS: usize = 1024;

/// How often idle server connections are reaped.
const UPKEEP: Duration = Duration::from_secs(5);
/// A tenant's app credentials are re-read this often (changes are
/// announced sooner, by NOTIFY).
const CREDENTIALS_TTL: Duration = Duration::from_secs(60);

/// The front door: its settings and what its sessions share.
#[derive(Clone)]
pub struct Front {
    inner: Arc<Shared>,
}

/// Ends a session, saying why.
struct Ender {
    token: CancellationToken,
    reason: Mutex<String>,
    credential: Uuid,
}

impl Ender {
    fn end(&self, why: &str) {
        *self.reason.lock().expect("reason lock") = why.to_owned();
        self.token.cancel();
    }
}

/// A tenant's figures at the front door (while it has clients).
#[derive(Default)]
struct TenantCounters {
    clients: AtomicUsize,
    /// Clients waiting for a server connection now.
    waiting: AtomicUsize,
    /// Transactions (and statements outside one) that ended.
    transactions: AtomicU64,
    /// Errors the server sent.
    errors: AtomicU64,
    /// Of the transactions, queries answered on a shared connection.
    shared: AtomicU64,
    /// Total time clients waited for a server connection.
    wait_nanos: AtomicU64,
}

/// Logins in progress per client address, so that one address cannot take
/// all the room for logins ([`MAX_STARTUPS`]) and hold back everyone
/// else's (`SILO_PG_MAX_LOGINS_PER_ADDRESS`).
#[derive(Default)]
struct LoginsByAddress(Mutex<HashMap<IpAddr, usize>>);

impl LoginsByAddress {
    /// Room for one more login from `peer`, held until the slot is
    /// dropped; `None` when its address has `limit` logging in already.
    fn enter(self: &Arc<Self>, peer: IpAddr, limit: usize) -> Option<AddressSlot> {
        let address = address_key(peer);
        let mut counts = self.0.lock().expect("logins lock");
        let n = counts.entry(address).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            of: self.clone(),
            address,
        })
    }
}

/// One login in progress from an address (see [`LoginsByAddress`]).
struct AddressSlot {
    of: Arc<LoginsByAddress>,
    address: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.of.0.lock().expect("logins lock");
        if let Some(n) = counts.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

/// What one client address counts as: an IPv4 address (IPv4-mapped IPv6
/// ones too), or an IPv6 /64, which one host or site usually has whole.
pub fn address_key(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => peer,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The front door for `GET /admin/v1/pools`.
#[derive(Debug, Serialize, ToSchema)]
pub struct WireStats {
    /// Client connections open now, and the most allowed.
    pub clients: usize,
    pub max_clients: usize,
    /// Connections logging in now (not counted in `clients` yet).
    pub logging_in: usize,
    /// Tenants with clients or server connections now.
    pub tenants: Vec<WireTenantStats>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WireTenantStats {
    pub tenant_id: Uuid,
    pub clients: usize,
    /// Clients waiting for a server connection now.
    pub waiting: usize,
    /// Server connections of the front door: checked out, and idle.
    pub server_in_use: usize,
    pub server_idle: usize,
    /// Since its first client of this process's current run of them.
    pub transactions: u64,
    /// Of those, single reads answered on a shared server connection
    /// (`SILO_PG_SHARED_CONNECTIONS`).
    pub shared_queries: u64,
    pub errors: u64,
    pub wait_seconds_total: f64,
}

/// The server backend a client's cancel request must reach, while it has one.
#[derive(Default)]
struct CancelSlot {
    server: Mutex<Option<(Target, i32, i32)>>,
    /// A query on a shared connection: its line, ticket, and what answers
    /// it at once when it is queued.
    #[allow(clippy::type_complexity)]
    shared: Mutex<Option<(Arc<mux::LineState>, u64, Arc<tokio::sync::Notify>)>>,
}

pub(crate) struct Shared {
    settings: WireSettings,
    app_domain: Option<String>,
    router: TenantRouter,
    registry: Registry,
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// The TLS certificate's channel-binding data (SCRAM `-PLUS`).
    tls_end_point: Option<Vec<u8>>,
    clients: Arc<Semaphore>,
    /// Connections not logged in yet, and as many as may be.
    startups: Arc<Semaphore>,
    startups_room: usize,
    /// Of those, per client address.
    logins: Arc<LoginsByAddress>,
    /// Per tenant with clients: counts and counters.
    tenants: Mutex<HashMap<Uuid, Arc<TenantCounters>>>,
    /// Per tenant, the pool of its role (`false`) and of its reader role
    /// (`true`, for read-only credentials).
    pools: Mutex<HashMap<(Uuid, bool), Arc<WirePool>>>,
    cancels: Mutex<HashMap<(i32, i32), Arc<CancelSlot>>>,
    sessions: Mutex<HashMap<Uuid, HashMap<u64, Arc<Ender>>>>,
    credentials: moka::future::Cache<Uuid, Arc<Vec<AppCredential>>>,
    /// Salts the decoy exchange of unknown users: derived from the master
    /// key, so every replica (and every restart) gives an unknown user the
    /// same salt, as it would a known one.
    decoy: [u8; 32],
    next_session: AtomicU64,
    /// Cancelled when the front door stops: every session's own token is
    /// a child of it, so sessions end with a message, as PostgreSQL's do.
    stopping: CancellationToken,
}

impl Front {
    pub fn new(
        settings: WireSettings,
        app_domain: Option<String>,
        router: TenantRouter,
        registry: Registry,
        keyring: &crate::crypto::Keyring,
    ) -> anyhow::Result<Self> {
        let (tls, tls_end_point) = match &settings.tls {
            Some((cert, key)) => {
                let (acceptor, end_point) = tls_acceptor(cert, key)?;
                (Some(acceptor), end_point)
            }
            None => (None, None),
        };
        if settings.require_tls && tls.is_none() {
            anyhow::bail!("SILO_PG_REQUIRE_TLS needs SILO_PG_TLS_CERT and SILO_PG_TLS_KEY");
        }
        let decoy = {
            use hmac::Mac;
            let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(keyring.token_key())
                .expect("HMAC takes any key length");
            m.update(b"silo wire decoy verifiers");
            m.finalize().into_bytes().into()
        };
        let mut settings = settings;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        settings.spin = spin::window(settings.spin, cpus);
        if settings.spin.is_zero() && cpus < 2 {
            tracing::info!("the front door does not busy-poll: this process has one CPU");
        }
        let startups_room = settings.max_clients.clamp(16, MAX_STARTUPS);
        Ok(Self {
            inner: Arc::new(Shared {
                clients: Arc::new(Semaphore::new(settings.max_clients)),
                startups: Arc::new(Semaphore::new(startups_room)),
                startups_room,
                logins: Arc::default(),
                settings,
                app_domain: app_domain.map(|d| d.trim_start_matches('.').to_ascii_lowercase()),
                router,
                registry,
                tls,
                tls_end_point,
                tenants: Mutex::default(),
                pools: Mutex::default(),
                cancels: Mutex::default(),
                sessions: Mutex::default(),
                credentials: moka::future::Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(CREDENTIALS_TTL)
                    .build(),
                decoy,
                next_session: AtomicU64::new(1),
                stopping: CancellationToken::new(),
            }),
        })
    }

    pub fn settings(&self) -> &WireSettings {
        &self.inner.settings
    }

    /// Accept clients on `listener` until `stop`; upkeep runs beside.
    pub fn spawn(
        &self,
        listener: tokio::net::TcpListener,
        stop: &CancellationToken,
        tracker: &TaskTracker,
    ) {
        let shared = self.inner.clone();
        let (stop_accept, clients) = (stop.clone(), tracker.clone());
        tracker.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop_accept.cancelled() => {
                        shared.stopping.cancel();
                        return;
                    }
                    a = listener.accept() => a,
                };
                match accepted {
                    Ok((tcp, _)) => {
                        spin::note_activity();
                        let shared = shared.clone();
                        let stop = stop_accept.clone();
                        let sessions = clients.clone();
                        // The login in a task of its own; a logged-in
                        // session is then a task of its own too (see
                        // `session::handle`), which ends by its token.
                        clients.spawn(async move {
                            tokio::select! {
                                _ = session::handle(shared, tcp, sessions) => {}
                                _ = stop.cancelled() => {}
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!("front door failed to accept a client: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        let shared = self.inner.clone();
        let stop_upkeep = stop.clone();
        tracker.spawn(async move {
            let mut changes = shared.router.subscribe();
            let mut tick = tokio::time::interval(UPKEEP);
            loop {
                tokio::select! {
                    _ = stop_upkeep.cancelled() => {
                        for p in shared.pools.lock().expect("pools lock").drain() {
                            p.1.close();
                        }
                        return;
                    }
                    _ = tick.tick() => shared.upkeep(),
                    changed = changes.recv() => match changed {
                        Ok(id) => shared.tenant_changed(id).await,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            shared.tenant_changed(Uuid::nil()).await
                        }
                        Err(_) => return,
                    },
                }
            }
        });
    }

    /// Client sessions open now.
    pub fn sessions(&self) -> usize {
        self.inner.settings.max_clients - self.inner.clients.available_permits()
    }

    /// Clients, server connections and counters, per tenant.
    pub fn stats(&self) -> WireStats {
        let s = &self.inner;
        let counters: Vec<(Uuid, Arc<TenantCounters>)> = s
            .tenants
            .lock()
            .expect("tenants lock")
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let mut pools: HashMap<Uuid, (usize, usize)> = HashMap::new();
        for ((tenant, _), p) in s.pools.lock().expect("pools lock").iter() {
            let counts = pools.entry(*tenant).or_default();
            counts.0 += p.in_use();
            counts.1 += p.idle_count();
        }
        let mut ids: Vec<Uuid> = counters.iter().map(|(k, _)| *k).collect();
        ids.extend(pools.keys().copied());
        ids.sort();
        ids.dedup();
        let tenants = ids
            .into_iter()
            .map(|id| {
                let c = counters
                    .iter()
                    .find(|(k, _)| *k == id)
                    .map(|(_, c)| c.clone());
                let (in_use, idle) = pools.get(&id).copied().unwrap_or_default();
                let load = |f: fn(&TenantCounters) -> u64| c.as_deref().map_or(0, f);
                WireTenantStats {
                    tenant_id: id,
                    clients: load(|c| c.clients.load(Ordering::Relaxed) as u64) as usize,
                    waiting: load(|c| c.waiting.load(Ordering::Relaxed) as u64) as usize,
                    server_in_use: in_use,
                    server_idle: idle,
                    transactions: load(|c| c.transactions.load(Ordering::Relaxed)),
                    shared_queries: load(|c| c.shared.load(Ordering::Relaxed)),
                    errors: load(|c| c.errors.load(Ordering::Relaxed)),
                    wait_seconds_total: load(|c| c.wait_nanos.load(Ordering::Relaxed)) as f64 / 1e9,
                }
            })
            .collect();
        WireStats {
            clients: self.sessions(),
            max_clients: s.settings.max_clients,
            logging_in: s.startups_room - s.startups.available_permits(),
            tenants,
        }
    }
}

impl Shared {
    fn upkeep(&self) {
        let max_idle = self.router.config().idle_connection_timeout;
        let mut pools = self.pools.lock().expect("pools lock");
        pools.retain(|_, p| p.reap(max_idle) > 0 || Arc::strong_count(p) > 1);
        let open: usize = pools.values().map(|p| p.idle_count()).sum();
        metrics::gauge!("silo_wire_server_connections_idle").set(open as f64);
        metrics::gauge!("silo_wire_pools").set(pools.len() as f64);
    }

    /// A tenant changed (`nil`: any may have): forget its credentials and
    /// end the sessions it may no longer have (suspended, deleted, their
    /// credential revoked).
    async fn tenant_changed(&self, id: Uuid) {
        let tenants: Vec<Uuid> = if id.is_nil() {
            self.credentials.invalidate_all();
            let mut all: Vec<Uuid> = self
                .sessions
                .lock()
                .expect("sessions lock")
                .keys()
                .copied()
                .collect();
            all.extend(self.pools.lock().expect("pools lock").keys().map(|k| k.0));
            all.sort();
            all.dedup();
            all
        } else {
            self.credentials.invalidate(&id).await;
            vec![id]
        };
        for tenant in tenants {
            // Nothing held for it here: nothing to look at (and no lookup
            // of the control DB for the router's sake).
            let held = self
                .pools
                .lock()
                .expect("pools lock")
                .keys()
                .any(|k| k.0 == tenant)
                || self
                    .sessions
                    .lock()
                    .expect("sessions lock")
                    .contains_key(&tenant);
            if !held {
                continue;
            }
            let entry = match self.router.read_uncached(&tenant.to_string()).await {
                Ok(e) => Some(e),
                Err(RouteError::NotFound) => None,
                // Cannot tell now; the next change or connect will.
                Err(_) => continue,
            };
            // Server connections: none kept for a tenant that cannot be
            // served, or that is frozen for a move (the move waits for its
            // sessions to leave: transactions in flight finish first, and
            // the next ones wait for the new server); a pool built for an
            // old server, database or password closes.
            match &entry {
                Some(e) if e.frozen || TenantRouter::check_status(e).is_err() => {
                    self.close_pool(tenant)
                }
                Some(e) => {
                    self.pool_if_current(e, false);
                    self.pool_if_current(e, true);
                }
                None => self.close_pool(tenant),
            }
            let enders: Vec<Arc<Ender>> = self
                .sessions
                .lock()
                .expect("sessions lock")
                .get(&tenant)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            if enders.is_empty() {
                continue;
            }
            let why = match &entry {
                None => Some("the tenant no longer exists".to_owned()),
                Some(e) => match TenantRouter::check_status(e) {
                    Err(RouteError::Locked(s)) => Some(format!("the tenant is {s}")),
                    Err(RouteError::NotFound) => Some("the tenant no longer exists".into()),
                    _ => None,
                },
            };
            if let Some(why) = why {
                enders.iter().for_each(|e| e.end(&why));
                continue;
            }
            let Ok(live) = self.credentials_of(tenant).await else {
                continue;
            };
            for e in enders {
                if !live.iter().any(|c| c.id == e.credential) {
                    e.end("the app credential was revoked");
                }
            }
        }
    }

    /// Close the tenant's pools (of its role and of its reader).
    fn close_pool(&self, tenant: Uuid) {
        let mut pools = self.pools.lock().expect("pools lock");
        for reader in [false, true] {
            if let Some(p) = pools.remove(&(tenant, reader)) {
                p.close();
            }
        }
    }

    async fn credentials_of(&self, tenant: Uuid) -> anyhow::Result<Arc<Vec<AppCredential>>> {
        let registry = self.registry.clone();
        self.credentials
            .try_get_with(tenant, async move {
                registry.app_credentials(tenant).await.map(Arc::new)
            })
            .await
            .map_err(|e| anyhow::anyhow!("read app credentials: {e}"))
    }

    /// The tenant's pool (of its reader role with `reader`) if it was
    /// built for what `entry` says now (a stale one is closed and forgotten).
    fn pool_if_current(&self, entry: &TenantEntry, reader: bool) -> Option<Arc<WirePool>> {
        let mut pools = self.pools.lock().expect("pools lock");
        let id = (entry.id, reader);
        let key = if reader {
            entry.reader_pool_key()
        } else {
            Some(entry.pool_key())
        };
        match pools.get(&id) {
            Some(p) if Some(&p.key) == key.as_ref() => Some(p.clone()),
            Some(_) => {
                if let Some(p) = pools.remove(&id) {
                    p.close();
                }
                None
            }
            None => None,
        }
    }

    /// The tenant's pool (of its reader role with `reader`), built if needed.
    async fn pool_for(
        &self,
        entry: &TenantEntry,
        reader: bool,
    ) -> Result<Arc<WirePool>, RouteError> {
        if let Some(p) = self.pool_if_current(entry, reader) {
            return Ok(p);
        }
        let login = self.router.login_for(entry, reader).await?;
        let target = match &login.socket {
            Some(dir) => Target::Unix(dir.join(format!(".s.PGSQL.{}", login.base.get_port()))),
            None => Target::Tcp(
                login.base.get_host().to_owned(),
                login.base.get_port(),
                login.tls.clone(),
            ),
        };
        let replicas = self.router.config().replicas.max(1) as usize;
        let cap = (entry.limits.connection_limit.max(1) as usize / replicas)
            .max(1)
            .min(login.budget.max);
        let fresh = WirePool::new(
            login.key,
            login.budget,
            target,
            login.role,
            login.password,
            login.database,
            cap,
            self.settings.max_message_bytes,
            self.settings.max_server_statements,
        );
        let mut pools = self.pools.lock().expect("pools lock");
        let pool = pools
            .entry((entry.id, reader))
            .or_insert_with(|| fresh.clone());
        if pool.key != fresh.key {
            pool.close();
            *pool = fresh;
        }
        Ok(pool.clone())
    }

    fn register_session(&self, tenant: Uuid, ender: Arc<Ender>) -> u64 {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        self.sessions
            .lock()
            .expect("sessions lock")
            .entry(tenant)
            .or_default()
            .insert(id, ender);
        id
    }

    fn forget_session(&self, tenant: Uuid, id: u64) {
        let mut s = self.sessions.lock().expect("sessions lock");
        if let Some(m) = s.get_mut(&tenant) {
            m.remove(&id);
            if m.is_empty() {
                s.remove(&tenant);
            }
        }
    }
}

/// The front door's TLS, and its certificate's channel-binding data
/// (`None` when its signature algorithm names no hash).
fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<(tokio_rustls::TlsAcceptor, Option<Vec<u8>>)> {
    use tokio_rustls::rustls;
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).with_context(|| format!("open {}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("read certificates from {}", cert.display()))?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).with_context(|| format!("open {}", key.display()))?,
    ))
    .with_context(|| format!("read the private key from {}", key.display()))?
    .with_context(|| format!("no private key in {}", key.display()))?;
    let end_point = certs.first().and_then(|c| scram::end_point(c));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("the front door's TLS certificate and key")?;
    Ok((tokio_rustls::TlsAcceptor::from(Arc::new(config)), end_point))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_are_counted_per_address_and_ipv6_per_64() {
        let logins = Arc::new(LoginsByAddress::default());
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = logins.enter(ip("10.0.0.1"), 2).expect("first");
        let b = logins
            .enter(ip("::ffff:10.0.0.1"), 2)
            .expect("the same host, mapped");
        assert!(logins.enter(ip("10.0.0.1"), 2).is_none(), "a third of two");
        let other = logins
            .enter(ip("10.0.0.2"), 2)
            .expect("another address has its own");
        let v6 = logins
            .enter(ip("2001:db8:1:2::1"), 1)
            .expect("an IPv6 host");
        assert!(
            logins.enter(ip("2001:db8:1:2:ffff::9"), 1).is_none(),
            "the same /64 counts as one address"
        );
        assert!(
            logins.enter(ip("2001:db8:1:3::1"), 1).is_some(),
            "another /64"
        );
        drop(a);
        let again = logins
            .enter(ip("10.0.0.1"), 2)
            .expect("a slot comes back when a login ends");
        drop((b, again, other, v6));
        assert!(logins.0.lock().unwrap().is_empty(), "no count left behind");
    }
}
