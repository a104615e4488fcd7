//! Per-tenant routing: `TenantRouter::acquire(tenant)` hands out a connection
//! to that tenant's own database as that tenant's own role, and nothing else.
//!
//! - Lookups (slug or id → tenant) are cached; "not found" only for a couple of
//!   seconds. When the control DB is unreachable, cached tenants keep serving.
//! - One [`TenantPool`] per tenant, built once under concurrency (moka's
//!   `try_get_with`), evicted when idle and closed only after connections in
//!   use come back.
//! - Every connection holds a permit of its server's [`ServerBudget`], so open
//!   connections to a server never exceed its budget (see [`pool`]).
//!
//! The budget arithmetic, per tenant server: a server registered with
//! `max_connections = B` (default 100) gives each of `R` replicas `B / R`
//! tenant connections. Each replica also keeps up to 4 admin connections
//! (`servers::ADMIN_POOL_MAX`) to the server for DDL. So set `B`
//! at most `server max_connections − superuser_reserved_connections − 4·R −
//! headroom for other clients`; e.g. PostgreSQL's 100 with 3 reserved and
//! 2 replicas leaves B ≤ 85. A tenant's own pool is capped by its plan (5, 20
//! or 50, also the role's CONNECTION LIMIT) and by the replica's share.
//! Each replica also keeps one monitor connection per server (the admin
//! login, `silo-router-monitor`) while tenant connections close: so count
//! `5·R` above, not `4·R`.
//! - A tenant whose database refuses connections is put in a short back-off and
//!   answered 503 alone; other tenants are unaffected.
//! - Changes to a tenant row are announced by a trigger on `silo_tenants`
//!   (LISTEN/NOTIFY), so every replica drops its cached lookup and pool at
//!   once; a lookup read before a change and cached after it is re-read
//!   (each lookup remembers the invalidation sequence it was read in).
//! - Connections heal themselves ([`pool`]): dead ones are discarded and
//!   their server's idle ones checked; a database that no longer exists
//!   (`3D000`, a restore swapped it) or a refused login makes the router
//!   re-read the tenant before it answers 503.
//! - Tenant connections go through the server's Unix socket when the
//!   server is on this machine (checked to be the same cluster), without
//!   TLS negotiation; otherwise TCP with the admin URL's TLS settings.

mod local;
pub mod pool;
mod requests;
pub mod tls;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use utoipa::ToSchema;
use uuid::Uuid;

pub use pool::{AcquireError, PoolKey, PoolPolicy, ServerBudget, TenantConn, TenantPool};

use crate::config::Secret;
use crate::crypto::Keyring;
use crate::domain::Plan;
use crate::registry::{PlanLimits, Registry, TenantRecord, TenantStatus};
use crate::servers::sqlstate;

/// Channel the `tenants` trigger notifies with a tenant id.
pub const NOTIFY_CHANNEL: &str = "silo_tenants";
/// How often tenants' app activity is written to the control DB.
pub const ACTIVITY_FLUSH: Duration = Duration::from_secs(60);
/// Tenants with a series of their own in `silo_router_tenant_connects`.
pub const CHURN_SERIES: usize = 20;
/// Re-reads of a tenant whose login was refused (or whose database is
/// gone) within one request, before it is answered 503.
const MAX_REREADS: u64 = 3;

/// Router settings; every duration is a trade-off written next to it.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// How long a request waits for a connection before a 503.
    pub acquire_timeout: Duration,
    /// `statement_timeout` of tenant sessions: one slow query cannot hold a
    /// connection of the budget for long.
    pub statement_timeout: Duration,
    /// Idle connections close after this; their budget permits go back.
    pub idle_connection_timeout: Duration,
    /// Pools unused this long are evicted (and closed once drained).
    pub pool_idle_ttl: Duration,
    /// Most tenant pools cached at once.
    pub max_pools: u64,
    /// Cached lookups are re-read after this (NOTIFY invalidates sooner).
    pub lookup_ttl: Duration,
    /// "No such tenant" is remembered this long only.
    pub negative_ttl: Duration,
    /// A tenant whose database refused connections is answered 503 this
    /// long (short: traffic is back this soon after the server is).
    pub down_backoff: Duration,
    /// Replicas sharing each server's budget (`SILO_REPLICAS`).
    pub replicas: u32,
    /// An idle connection unused this long is checked (a `Sync` round
    /// trip) before it is handed out.
    pub check_after: Duration,
    /// Connections are closed at this age.
    pub max_lifetime: Duration,
    /// Connection attempts at once per server: openings queue rather than
    /// take the whole budget (and CPU) from tenants with warm connections.
    pub connect_concurrency: usize,
    /// Connect through a server's Unix socket when it is on this machine.
    pub local_sockets: bool,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            acquire_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(10),
            idle_connection_timeout: Duration::from_secs(60),
            pool_idle_ttl: Duration::from_secs(600),
            max_pools: 10_000,
            lookup_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(2),
            down_backoff: Duration::from_millis(500),
            replicas: 1,
            check_after: PoolPolicy::default().check_after,
            max_lifetime: PoolPolicy::default().max_lifetime,
            connect_concurrency: PoolPolicy::default().connect_concurrency,
            local_sockets: true,
        }
    }
}

/// Why a request cannot be routed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("tenant not found")]
    NotFound,
    #[error("tenant is {0}")]
    Locked(&'static str),
    #[error("tenant is {0}, retry later")]
    NotReady(&'static str),
    #[error("the tenant's database is unavailable, retry shortly")]
    TenantDown,
    #[error("no database connection is free, retry shortly")]
    Busy,
    #[error("the control database is unreachable: {0}")]
    ControlDown(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// What the router knows about a tenant. `Debug` leaves out the password.
#[derive(Clone)]
pub struct TenantEntry {
    pub id: Uuid,
    pub slug: String,
    pub status: TenantStatus,
    pub server_id: Uuid,
    pub database: String,
    pub role: String,
    pub plan: Plan,
    /// What its plan allows.
    pub limits: PlanLimits,
    /// Over its storage quota: its role may only read.
    pub read_only: bool,
    /// Its settings object, for the app.
    pub settings: Arc<serde_json::Value>,
    /// A move's cut-over: answered 503 with `Retry-After` until it ends.
    pub frozen: bool,
    /// App tokens of other generations are refused.
    pub token_generation: i32,
    password: Secret,
    /// A credential rotation's pending password, until it is promoted.
    pending: Option<Secret>,
    /// Its reader role and that role's password, once it has one (the
    /// front door's read-only credentials log in as it).
    reader: Option<(String, Secret)>,
    /// Log in with `pending`: the recorded password was refused, a rotation
    /// is half-way (its process died between changing the role and
    /// recording it). Shared by every request that uses this cached entry.
    use_pending: Arc<std::sync::atomic::AtomicBool>,
}

impl TenantEntry {
    /// The password to log in with now.
    fn login_password(&self) -> &Secret {
        match &self.pending {
            Some(p) if self.use_pending.load(Ordering::Relaxed) => p,
            _ => &self.password,
        }
    }

    /// Whether logins use the pending password now.
    fn using_pending(&self) -> bool {
        self.use_pending.load(Ordering::Relaxed)
    }

    /// The password used (`used_pending`) was refused: log in with the
    /// other of the recorded and the pending one from now on (unless a
    /// concurrent request switched already); `false` if there is no pending one.
    fn switch_password(&self, used_pending: bool) -> bool {
        if self.pending.is_none() {
            return false;
        }
        let _ = self.use_pending.compare_exchange(
            used_pending,
            !used_pending,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        true
    }

    /// What a pool of its reader role must have been built for.
    pub fn reader_pool_key(&self) -> Option<PoolKey> {
        use sha2::{Digest, Sha256};
        let (role, password) = self.reader.as_ref()?;
        Some(PoolKey {
            server_id: self.server_id,
            database: self.database.clone(),
            role: role.clone(),
            credentials: Sha256::digest(password.expose().as_bytes()).into(),
            connection_limit: self.limits.connection_limit,
        })
    }

    /// What a pool for this tenant, as looked up now, must have been built for.
    pub fn pool_key(&self) -> PoolKey {
        use sha2::{Digest, Sha256};
        PoolKey {
            server_id: self.server_id,
            database: self.database.clone(),
            role: self.role.clone(),
            credentials: Sha256::digest(self.login_password().expose().as_bytes()).into(),
            connection_limit: self.limits.connection_limit,
        }
    }
}

impl std::fmt::Debug for TenantEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantEntry")
            .field("id", &self.id)
            .field("slug", &self.slug)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct Lookup {
    entry: Option<Arc<TenantEntry>>,
    fetched: Instant,
    /// The [`Inner::epoch`] it was read in; an older one is stale.
    epoch: u64,
    /// [`Inner::changes`] when it was read: a tenant invalidated after
    /// that (its notice raced the read) is re-read.
    seq: u64,
    /// Marked stale by a change notice: re-read on next use (still served
    /// if the control DB cannot be reached).
    stale: bool,
}

/// Router state for `GET /admin/v1/pools`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RouterStats {
    pub pools_open: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub evictions: u64,
    /// Pools built since start (one per tenant unless evicted or invalidated).
    pub pools_built: u64,
    /// Registry lookups since start (cache misses and refreshes that reached the control DB).
    pub registry_lookups: u64,
    pub servers: Vec<ServerStats>,
    pub tenants: Vec<TenantPoolStats>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ServerStats {
    pub server_id: Uuid,
    /// This process's share of the server's connections (0 until a tenant on it is served).
    pub budget: usize,
    /// Server backends this process holds for tenants: connections open or
    /// opening, and closed ones whose backend is not confirmed gone yet.
    pub open: usize,
    /// Of those, closed connections whose backend is not confirmed gone yet.
    pub closing: usize,
    /// Tenant connections go through the server's local Unix socket.
    pub local_socket: bool,
    /// From the registry, filled in by `/admin/v1/pools` (`None` from the router alone).
    pub name: Option<String>,
    /// `active`, `draining` or `unhealthy`.
    pub status: Option<String>,
    /// Tenants on the server that are not deleted.
    pub tenants: Option<i64>,
    pub max_tenants: Option<i32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TenantPoolStats {
    pub tenant_id: Uuid,
    pub open: usize,
    pub in_use: usize,
    pub idle: usize,
    pub cap: usize,
    /// Connections this tenant has opened since this process started (churn).
    pub connects: u64,
}

/// Where and as whom a tenant's database is logged in to.
pub struct Login {
    pub budget: Arc<ServerBudget>,
    /// The server admin URL's options (host, port, TLS).
    pub base: PgConnectOptions,
    /// TLS over TCP, as the admin URL asks.
    pub tls: Arc<tls::ServerTls>,
    /// The server's local Unix socket directory, when it is on this machine.
    pub socket: Option<std::path::PathBuf>,
    pub database: String,
    pub role: String,
    pub password: Secret,
    pub key: PoolKey,
}

/// A tenant server as the router uses it: its budget, and how to reach it.
struct Server {
    budget: Arc<ServerBudget>,
    /// The admin URL's options (host, port, TLS): tenants connect with
    /// these and their own database, role and password.
    base: PgConnectOptions,
    /// TLS for the connections silo speaks the protocol on itself.
    tls: Arc<tls::ServerTls>,
}

/// Routes work to tenant databases. Cheap to clone.
#[derive(Clone)]
pub struct TenantRouter {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    keyring: Keyring,
    config: RouterConfig,
    lookups: moka::future::Cache<String, Lookup>,
    /// Re-reads of stale lookups in flight, so concurrent requests share one.
    refreshes: moka::future::Cache<String, Lookup>,
    pools: moka::future::Cache<Uuid, Arc<TenantPool>>,
    budgets: moka::future::Cache<Uuid, Arc<Server>>,
    down: moka::sync::Cache<Uuid, ()>,
    /// Invalidations so far; and, per tenant, the number of its last one.
    changes: AtomicU64,
    invalidated: moka::sync::Cache<Uuid, u64>,
    /// Connections each tenant opened since start (churn), across pool rebuilds.
    churn: moka::sync::Cache<Uuid, Arc<AtomicU64>>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: Arc<AtomicU64>,
    built: AtomicU64,
    fetched: AtomicU64,
    /// Bumped when notifications may have been missed: every lookup read
    /// before is re-read on next use, yet still served if the control DB is down.
    epoch: AtomicU64,
    /// Tenants that changed (`Uuid::nil()`: any may have), for the front
    /// doors that hold sessions of their own.
    changed: tokio::sync::broadcast::Sender<Uuid>,
    /// Tenants whose role refused the password the registry records (see
    /// [`TenantRouter::note_lockout`]).
    lockouts: tokio::sync::broadcast::Sender<(Uuid, bool)>,
    /// Tenants that got a connection since the last activity flush.
    active: Mutex<HashSet<Uuid>>,
    /// App requests and errors per tenant since the last flush (usage).
    requests: requests::RequestCounts,
    /// Control-DB sessions (by process id) known to be silo's own or not,
    /// for telling the tenant changes silo announces from anyone else's.
    senders: moka::sync::Cache<u32, bool>,
}

impl TenantRouter {
    pub fn new(registry: Registry, keyring: Keyring, config: RouterConfig) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        let counted = evictions.clone();
        let pools = moka::future::Cache::builder()
            .max_capacity(config.max_pools)
            .time_to_idle(config.pool_idle_ttl)
            .eviction_listener(move |_id, pool: Arc<TenantPool>, _cause| {
                // Connections in use finish first; they close when returned.
                pool.close();
                counted.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("silo_router_evictions_total").increment(1);
            })
            .build();
        let lookups = moka::future::Cache::builder()
            .max_capacity(config.max_pools * 4)
            .support_invalidation_closures()
            .build();
        let down = moka::sync::Cache::builder()
            .time_to_live(config.down_backoff)
            .build();
        let refreshes = moka::future::Cache::builder()
            .max_capacity(config.max_pools)
            .time_to_live(Duration::from_secs(1))
            .build();
        Self {
            inner: Arc::new(Inner {
                registry,
                keyring,
                config,
                lookups,
                refreshes,
                pools,
                budgets: moka::future::Cache::builder().build(),
                down,
                changes: AtomicU64::new(0),
                invalidated: moka::sync::Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(Duration::from_secs(600))
                    .build(),
                churn: moka::sync::Cache::builder().max_capacity(100_000).build(),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                evictions,
                built: AtomicU64::new(0),
                fetched: AtomicU64::new(0),
                epoch: AtomicU64::new(0),
                changed: tokio::sync::broadcast::channel(1024).0,
                lockouts: tokio::sync::broadcast::channel(256).0,
                active: Mutex::default(),
                requests: Default::default(),
                senders: moka::sync::Cache::builder()
                    .max_capacity(10_000)
                    .time_to_live(Duration::from_secs(600))
                    .build(),
            }),
        }
    }

    /// Tenants as they change (their lookups invalidated); `Uuid::nil()`
    /// when any may have (notices missed).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Uuid> {
        self.inner.changed.subscribe()
    }

    /// Tenants whose role refused the password the registry records, as
    /// they are seen (see [`TenantRouter::note_lockout`]).
    pub fn subscribe_lockouts(&self) -> tokio::sync::broadcast::Receiver<(Uuid, bool)> {
        self.inner.lockouts.subscribe()
    }

    /// `tenant`'s role (its reader, for `reader`) refused the password the
    /// registry records, after a re-read found nothing newer: the role
    /// gave itself another (`ALTER ROLE … PASSWORD`), or it is gone from
    /// its server (PostgreSQL refuses a role that does not exist as a
    /// wrong password). Whoever listens (`silo serve`) repairs it now,
    /// rather than at the next reconcile pass.
    pub fn note_lockout(&self, tenant: Uuid, reader: bool) {
        metrics::counter!("silo_router_lockouts_total").increment(1);
        let _ = self.inner.lockouts.send((tenant, reader));
    }

    /// How the front door logs in to `entry`'s database: the server's
    /// budget, where it listens, the role and the password to use now
    /// (`reader`: its reader role's; a tenant without one is not found).
    pub async fn login_for(&self, entry: &TenantEntry, reader: bool) -> Result<Login, RouteError> {
        let server = self.server(entry.server_id).await?;
        let socket = server.budget.local_socket();
        let (role, password, key) = if reader {
            let (role, password) = entry.reader.clone().ok_or(RouteError::NotFound)?;
            let key = entry.reader_pool_key().ok_or(RouteError::NotFound)?;
            (role, password, key)
        } else {
            (
                entry.role.clone(),
                entry.login_password().clone(),
                entry.pool_key(),
            )
        };
        Ok(Login {
            budget: server.budget.clone(),
            base: server.base.clone(),
            tls: server.tls.clone(),
            socket,
            database: entry.database.clone(),
            role,
            password,
            key,
        })
    }

    /// Why `entry` cannot be served now, if it cannot.
    pub fn check_status(entry: &TenantEntry) -> Result<(), RouteError> {
        check_status(entry)
    }

    pub fn config(&self) -> &RouterConfig {
        &self.inner.config
    }

    /// Find a tenant by slug or id (cached).
    pub async fn resolve(&self, name: &str) -> Result<Arc<TenantEntry>, RouteError> {
        let inner = &self.inner;
        if let Some(l) = inner.lookups.get(name).await {
            // A frozen tenant (a move's cut-over) is re-read as often as "not
            // found": the NOTIFY that ends the freeze may race the lookup.
            let ttl = match &l.entry {
                Some(e) if !e.frozen => inner.config.lookup_ttl,
                _ => inner.config.negative_ttl,
            };
            if !l.stale
                && l.fetched.elapsed() < ttl
                && l.epoch == inner.epoch.load(Ordering::Acquire)
                && !self.changed_since(&l)
            {
                inner.hits.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("silo_router_cache_hits_total").increment(1);
                return l.entry.ok_or(RouteError::NotFound);
            }
            // Stale: re-read (once for all requests waiting on the same
            // name), but keep serving what we know if the control DB is down.
            let refreshed = inner
                .refreshes
                .try_get_with(name.to_owned(), self.fetch(name))
                .await;
            inner.refreshes.invalidate(name).await;
            return match refreshed {
                Ok(fresh) => {
                    inner.lookups.insert(name.to_owned(), fresh.clone()).await;
                    fresh.entry.ok_or(RouteError::NotFound)
                }
                Err(e) => match l.entry {
                    Some(entry) => {
                        let e = shared_error(&e);
                        tracing::warn!(tenant_id = %entry.id, "serving a cached tenant while the control database is unreachable: {e}");
                        let kept = Lookup {
                            entry: Some(entry.clone()),
                            fetched: Instant::now(),
                            epoch: inner.epoch.load(Ordering::Acquire),
                            seq: inner.changes.load(Ordering::Acquire),
                            stale: false,
                        };
                        inner.lookups.insert(name.to_owned(), kept).await;
                        Ok(entry)
                    }
                    None => Err(shared_error(&e)),
                },
            };
        }
        inner.misses.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("silo_router_cache_misses_total").increment(1);
        let l = inner
            .lookups
            .try_get_with(name.to_owned(), self.fetch(name))
            .await
            .map_err(|e| match Arc::try_unwrap(e) {
                Ok(e) => e,
                // Shared by every request that waited on the same lookup.
                Err(shared) => match shared.as_ref() {
                    RouteError::ControlDown(msg) => RouteError::ControlDown(msg.clone()),
                    other => RouteError::Internal(anyhow::anyhow!("{other}")),
                },
            })?;
        if self.changed_since(&l) {
            // Read before a change, inserted after its notice: read again.
            let fresh = self.fetch(name).await?;
            inner.lookups.insert(name.to_owned(), fresh.clone()).await;
            return fresh.entry.ok_or(RouteError::NotFound);
        }
        l.entry.ok_or(RouteError::NotFound)
    }

    /// Read a tenant from the registry now, without caching what was read
    /// (a reader reacting to a change notice must not leave behind a read
    /// that a later change, whose notice is still on its way, outdates).
    pub async fn read_uncached(&self, name: &str) -> Result<Arc<TenantEntry>, RouteError> {
        self.fetch(name).await?.entry.ok_or(RouteError::NotFound)
    }

    /// Was the lookup read before an invalidation of its tenant (or, for
    /// "not found", before any invalidation: a tenant may have been created)?
    fn changed_since(&self, l: &Lookup) -> bool {
        match &l.entry {
            Some(e) => self
                .inner
                .invalidated
                .get(&e.id)
                .is_some_and(|seq| seq > l.seq),
            None => self.inner.changes.load(Ordering::Acquire) > l.seq,
        }
    }

    async fn fetch(&self, name: &str) -> Result<Lookup, RouteError> {
        self.inner.fetched.fetch_add(1, Ordering::Relaxed);
        let epoch = self.inner.epoch.load(Ordering::Acquire);
        let seq = self.inner.changes.load(Ordering::Acquire);
        let record = self
            .inner
            .registry
            .find_tenant(name)
            .await
            .map_err(|e| RouteError::ControlDown(format!("{:#}", anyhow::Error::from(e))))?;
        let entry = match record {
            Some(t) => Some(Arc::new(self.entry_of(&t)?)),
            None => None,
        };
        Ok(Lookup {
            entry,
            fetched: Instant::now(),
            epoch,
            seq,
            stale: false,
        })
    }

    fn entry_of(&self, t: &TenantRecord) -> Result<TenantEntry, RouteError> {
        let password = self
            .inner
            .keyring
            .open_string(&t.key_id, &t.password_enc, t.id.as_bytes())
            .context("decrypt tenant credentials")?;
        let pending = match (&t.pending_password_enc, &t.pending_key_id) {
            (Some(sealed), Some(key_id)) => Some(Secret::new(
                self.inner
                    .keyring
                    .open_string(key_id, sealed, t.id.as_bytes())
                    .context("decrypt tenant credentials")?,
            )),
            _ => None,
        };
        let reader = match (&t.reader_password_enc, &t.reader_key_id) {
            (Some(sealed), Some(key_id)) => Some((
                crate::servers::names::reader_role(&t.role_name)
                    .context("a tenant role's reader")?,
                Secret::new(
                    self.inner
                        .keyring
                        .open_string(key_id, sealed, &crate::registry::reader_aad(t.id))
                        .context("decrypt tenant credentials")?,
                ),
            )),
            _ => None,
        };
        Ok(TenantEntry {
            id: t.id,
            slug: t.slug.clone(),
            status: t.status,
            server_id: t.server_id,
            database: t.database_name.clone(),
            role: t.role_name.clone(),
            plan: t.plan.clone(),
            limits: t.limits.clone(),
            read_only: t.over_quota_at.is_some(),
            settings: Arc::new(t.settings.clone()),
            frozen: t.frozen_at.is_some(),
            token_generation: t.token_generation,
            password: Secret::new(password),
            pending,
            reader,
            use_pending: Default::default(),
        })
    }

    /// A connection to `tenant`'s database as its role, or why not.
    #[tracing::instrument(skip(self), fields(tenant_id = tracing::field::Empty))]
    pub async fn acquire(&self, tenant: &str) -> Result<TenantConn, RouteError> {
        let entry = self.resolve(tenant).await?;
        tracing::Span::current().record("tenant_id", tracing::field::display(entry.id));
        self.acquire_entry(entry).await
    }

    /// A connection for an already resolved tenant.
    pub async fn acquire_entry(
        &self,
        mut entry: Arc<TenantEntry>,
    ) -> Result<TenantConn, RouteError> {
        let started = Instant::now();
        let deadline = started + self.inner.config.acquire_timeout;
        let mut rereads = 0;
        let mut switched = 0;
        loop {
            check_status(&entry)?;
            if self.inner.down.contains_key(&entry.id) {
                return Err(RouteError::TenantDown);
            }
            let used_pending = entry.using_pending();
            let pool = self.pool_for(&entry).await?;
            let left = deadline.saturating_duration_since(Instant::now());
            match pool.acquire(left).await {
                Ok(conn) => {
                    metrics::histogram!("silo_router_acquire_seconds")
                        .record(started.elapsed().as_secs_f64());
                    self.inner
                        .active
                        .lock()
                        .expect("activity set")
                        .insert(entry.id);
                    return Ok(conn);
                }
                Err(AcquireError::Closed) if Instant::now() < deadline => {
                    // Evicted or invalidated between lookup and acquire: build anew.
                    self.inner.pools.invalidate(&entry.id).await;
                }
                Err(AcquireError::Connect(e)) if is_role_limit(&e) => {
                    // The role's connection limit is reached (other replicas): busy, not down.
                    return Err(RouteError::Busy);
                }
                Err(AcquireError::Connect(e))
                    if is_auth_failure(&e)
                        && switched < 2
                        && Instant::now() < deadline
                        && entry.switch_password(used_pending) =>
                {
                    // A rotation half-way: the role has the pending password
                    // (or not yet): the next pool logs in with the other one.
                    switched += 1;
                    tracing::info!(tenant_id = %entry.id, "the tenant's recorded password was refused: trying its rotation's other password");
                }
                Err(AcquireError::Connect(e))
                    if (is_auth_failure(&e) || is_missing_database(&e))
                        && rereads < MAX_REREADS
                        && Instant::now() < deadline =>
                {
                    rereads += 1;
                    // Credentials rotated, the tenant frozen or moved, or its
                    // database swapped by a restore, under us (before the
                    // notice arrived): re-read the tenant and retry. Rotations
                    // in quick succession can outrun one re-read, so a few.
                    self.invalidate(entry.id).await;
                    tokio::time::sleep(Duration::from_millis(20 * rereads)).await;
                    let fresh = self.resolve(&entry.id.to_string()).await?;
                    if fresh.pool_key() == entry.pool_key() && fresh.pending.is_none() {
                        // The registry names what was just refused: nothing
                        // newer to try.
                        tracing::warn!(tenant_id = %entry.id, "failed to connect to tenant database with its recorded credentials: {e}");
                        if pool::is_wrong_password(&e) {
                            self.note_lockout(entry.id, false);
                        }
                        self.inner.down.insert(entry.id, ());
                        metrics::counter!("silo_router_tenant_down_total").increment(1);
                        return Err(RouteError::TenantDown);
                    }
                    entry = fresh;
                }
                Err(e @ (AcquireError::Connect(_) | AcquireError::ConnectTimeout)) => {
                    tracing::warn!(tenant_id = %entry.id, "failed to connect to tenant database: {e}");
                    self.inner.down.insert(entry.id, ());
                    metrics::counter!("silo_router_tenant_down_total").increment(1);
                    return Err(RouteError::TenantDown);
                }
                Err(_) => return Err(RouteError::Busy),
            }
        }
    }

    async fn pool_for(&self, entry: &Arc<TenantEntry>) -> Result<Arc<TenantPool>, RouteError> {
        let key = entry.pool_key();
        if let Some(pool) = self.inner.pools.get(&entry.id).await {
            if pool.key == key {
                return Ok(pool);
            }
            // Built for another server, database or password (a lookup read
            // before a change, cached after it): stale, so built anew.
            self.inner.pools.invalidate(&entry.id).await;
            pool.close();
            metrics::counter!("silo_router_stale_pools_total").increment(1);
        }
        let build = async {
            let server = self.server(entry.server_id).await?;
            let statement_timeout = self.inner.config.statement_timeout.as_millis().to_string();
            let opts = server
                .base
                .clone()
                .database(&entry.database)
                .username(&entry.role)
                .password(entry.login_password().expose())
                .application_name("silo-router")
                .options([("statement_timeout", statement_timeout.as_str())]);
            // The role's CONNECTION LIMIT counts across replicas: each takes its share.
            let replicas = self.inner.config.replicas.max(1) as usize;
            let cap = (entry.limits.connection_limit.max(1) as usize / replicas).max(1);
            self.inner.built.fetch_add(1, Ordering::Relaxed);
            let connects = self
                .inner
                .churn
                .get_with(entry.id, || Arc::new(AtomicU64::new(0)));
            Ok::<_, RouteError>(TenantPool::new(
                entry.id,
                key.clone(),
                opts,
                cap.min(server.budget.max),
                server.budget.clone(),
                connects,
            ))
        };
        let pool = self
            .inner
            .pools
            .try_get_with(entry.id, build)
            .await
            .map_err(|e| match e.as_ref() {
                RouteError::ControlDown(msg) => RouteError::ControlDown(msg.clone()),
                other => RouteError::Internal(anyhow::anyhow!("build tenant pool: {other}")),
            })?;
        Ok(pool)
    }

    /// A tenant server's budget and connect options (built once per server,
    /// under concurrency).
    async fn server(&self, server: Uuid) -> Result<Arc<Server>, RouteError> {
        let build = async {
            let s = self
                .inner
                .registry
                .server(server)
                .await
                .map_err(|e| RouteError::ControlDown(format!("{:#}", anyhow::Error::from(e))))?
                .context("find the tenant's server")?;
            let url = self
                .inner
                .keyring
                .open_string(&s.key_id, &s.admin_url_enc, s.id.as_bytes())
                .context("decrypt server admin URL")?;
            let base = crate::servers::admin_options(&url)?;
            let socket = if self.inner.config.local_sockets {
                local::socket_of(&base).await
            } else {
                None
            };
            let share = (s.max_connections as u32 / self.inner.config.replicas.max(1)).max(1);
            let config = &self.inner.config;
            let policy = PoolPolicy {
                check_after: config.check_after,
                max_lifetime: config.max_lifetime,
                connect_concurrency: config.connect_concurrency,
            };
            let budget = ServerBudget::new(server, share as usize, policy, base.clone(), socket);
            let tls = Arc::new(tls::ServerTls::from_url(&url, &base));
            Ok::<_, RouteError>(Arc::new(Server { budget, base, tls }))
        };
        self.inner
            .budgets
            .try_get_with(server, build)
            .await
            .map_err(|e| match e.as_ref() {
                RouteError::ControlDown(msg) => RouteError::ControlDown(msg.clone()),
                other => RouteError::Internal(anyhow::anyhow!("{other}")),
            })
    }

    /// Forget what is cached about a tenant: its lookups and its pool (which
    /// closes once its connections in use are returned).
    ///
    /// Its lookups are not dropped but marked stale (as is every "not
    /// found", through the invalidation sequence): the next request re-reads
    /// them, and if the control DB cannot be reached then, what is cached
    /// keeps serving, as for any cached tenant.
    pub async fn invalidate(&self, tenant: Uuid) {
        let seq = self.inner.changes.fetch_add(1, Ordering::AcqRel) + 1;
        self.inner.invalidated.insert(tenant, seq);
        let _ = self.inner.changed.send(tenant);
        self.mark_stale(tenant).await;
        // Close it here rather than trusting the eviction notice alone: the
        // pool must stop handing out the old credentials now.
        if let Some(pool) = self.inner.pools.remove(&tenant).await {
            pool.close();
        }
        self.inner.down.invalidate(&tenant);
    }

    /// Mark a tenant's cached lookups stale: re-read on next use, still
    /// served if the control DB cannot be reached. Its pool stays, and is
    /// rebuilt only if the next lookup says it was built for something else.
    async fn mark_stale(&self, tenant: Uuid) {
        let stale: Vec<(Arc<String>, Lookup)> = self
            .inner
            .lookups
            .iter()
            .filter(|(_, l)| l.entry.as_ref().is_some_and(|e| e.id == tenant))
            .collect();
        for (name, mut l) in stale {
            l.stale = true;
            self.inner.lookups.insert(name.as_ref().clone(), l).await;
        }
    }

    /// Was the session with this process id one of silo's own (its login
    /// on the control database)? `None` when it has ended meanwhile.
    /// Remembered, so a flood from one session costs one query.
    async fn sent_by_silo(&self, pid: u32) -> Option<bool> {
        if let Some(known) = self.inner.senders.get(&pid) {
            return Some(known);
        }
        let silo: Option<bool> = sqlx::query_scalar(
            "SELECT usename = current_user FROM pg_stat_activity WHERE pid = $1",
        )
        .bind(pid as i32)
        .fetch_optional(self.inner.registry.pool())
        .await
        .ok()
        .flatten()
        .flatten();
        if let Some(silo) = silo {
            self.inner.senders.insert(pid, silo);
        }
        silo
    }

    /// Drop the lookups and pools of every cached tenant of `plan`: its
    /// limits changed.
    pub async fn invalidate_plan(&self, plan: &str) {
        let ids: std::collections::HashSet<Uuid> = self
            .inner
            .lookups
            .iter()
            .filter_map(|(_, l)| l.entry.filter(|e| e.plan.as_str() == plan).map(|e| e.id))
            .collect();
        for id in ids {
            self.invalidate(id).await;
        }
    }

    /// Mark every cached lookup stale: re-read on next use, but still served
    /// if the control DB cannot be reached.
    pub fn mark_lookups_stale(&self) {
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
        let _ = self.inner.changed.send(Uuid::nil());
    }

    /// Router state for the admin API and metrics.
    pub fn stats(&self) -> RouterStats {
        let budgets: Vec<Arc<ServerBudget>> = self
            .inner
            .budgets
            .iter()
            .map(|(_, s)| s.budget.clone())
            .collect();
        let mut tenants: Vec<TenantPoolStats> = self
            .inner
            .pools
            .iter()
            .map(|(id, p)| TenantPoolStats {
                tenant_id: *id,
                open: p.open(),
                in_use: p.in_use(),
                idle: p.idle_count(),
                cap: p.cap,
                connects: p.connects(),
            })
            .collect();
        tenants.sort_by_key(|t| std::cmp::Reverse(t.open));
        RouterStats {
            pools_open: self.inner.pools.entry_count(),
            cache_hits: self.inner.hits.load(Ordering::Relaxed),
            cache_misses: self.inner.misses.load(Ordering::Relaxed),
            evictions: self.inner.evictions.load(Ordering::Relaxed),
            pools_built: self.inner.built.load(Ordering::Relaxed),
            registry_lookups: self.inner.fetched.load(Ordering::Relaxed),
            servers: budgets
                .iter()
                .map(|b| ServerStats {
                    server_id: b.server_id,
                    budget: b.max,
                    open: b.open(),
                    closing: b.closing(),
                    local_socket: b.local_socket().is_some(),
                    name: None,
                    status: None,
                    tenants: None,
                    max_tenants: None,
                })
                .collect(),
            tenants,
        }
    }

    /// Publish gauges (called at scrape time).
    pub fn record_metrics(&self) {
        let stats = self.stats();
        metrics::gauge!("silo_router_pools").set(stats.pools_open as f64);
        for s in &stats.servers {
            let server = s.server_id.to_string();
            metrics::gauge!("silo_router_server_connections", "server" => server.clone())
                .set(s.open as f64);
            metrics::gauge!("silo_router_server_closing", "server" => server.clone())
                .set(s.closing as f64);
            metrics::gauge!("silo_router_server_budget", "server" => server).set(s.budget as f64);
        }
        // Churn per tenant: the tenants that opened the most connections
        // (ids only, and few of them: one series each).
        let mut churn: Vec<(Uuid, u64)> = self
            .inner
            .churn
            .iter()
            .map(|(id, n)| (*id, n.load(Ordering::Relaxed)))
            .collect();
        churn.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        // A gauge, not a counter: a tenant that leaves the top drops out of
        // `/metrics` after the exporter's idle timeout (counters never do, so
        // over time every tenant would keep a series).
        for (id, n) in churn.into_iter().take(CHURN_SERIES) {
            metrics::gauge!("silo_router_tenant_connects", "tenant" => id.to_string())
                .set(n as f64);
        }
    }

    /// Record in the control DB which tenants had app traffic since the last
    /// flush (`last_active_at`, for scheduled archival). Kept for the next
    /// flush if the control DB cannot be reached.
    pub async fn flush_activity(&self) {
        self.flush_requests().await;
        let ids: Vec<Uuid> = std::mem::take(&mut *self.inner.active.lock().expect("activity set"))
            .into_iter()
            .collect();
        if ids.is_empty() {
            return;
        }
        if let Err(e) = self.inner.registry.touch_tenants(&ids).await {
            tracing::warn!("failed to record tenant activity, keeping it for the next flush: {e}");
            self.inner.active.lock().expect("activity set").extend(ids);
        }
    }

    /// Count an app request of `tenant` (`error`: answered 400 or more),
    /// for its usage; written at the next activity flush.
    pub fn count_request(&self, tenant: Uuid, error: bool) {
        self.inner.requests.count(tenant, error);
    }

    /// Add the app requests counted since the last flush to the tenants'
    /// usage, in one statement; kept for the next flush if that fails.
    pub async fn flush_requests(&self) {
        let counts = self.inner.requests.take();
        if counts.is_empty() {
            return;
        }
        if let Err(e) = self.inner.registry.add_requests(&counts).await {
            tracing::warn!("failed to record app requests, keeping them for the next flush: {e}");
            self.inner.requests.restore(counts);
        }
    }

    /// Background upkeep until `token` is cancelled: close idle connections,
    /// run moka's pending evictions, and follow tenant changes over NOTIFY.
    pub fn spawn_maintenance(&self, token: &CancellationToken, tracker: &TaskTracker) {
        let (router, t) = (self.clone(), token.clone());
        tracker.spawn(async move {
            let every =
                (router.inner.config.idle_connection_timeout / 4).max(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = t.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
                router.inner.pools.run_pending_tasks().await;
                for (_, pool) in router.inner.pools.iter() {
                    pool.reap(router.inner.config.idle_connection_timeout);
                }
                for (_, server) in router.inner.budgets.iter() {
                    server.budget.keep_reserve();
                }
            }
            // Shutting down: close every pool.
            router.flush_activity().await;
            router.inner.pools.invalidate_all();
            router.inner.pools.run_pending_tasks().await;
        });
        let (router, t) = (self.clone(), token.clone());
        tracker.spawn(async move {
            tokio::select! {
                _ = t.cancelled() => {}
                _ = router.follow_notifications() => {}
            }
        });
        let (router, t) = (self.clone(), token.clone());
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = t.cancelled() => break,
                    _ = tokio::time::sleep(ACTIVITY_FLUSH) => router.flush_activity().await,
                }
            }
        });
    }

    /// LISTEN on the control DB; invalidate tenants as they change. Reconnects
    /// with back-off; after a gap, forgets every lookup (notices may be lost).
    async fn follow_notifications(&self) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.listen_once().await {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    tracing::warn!("failed to follow tenant changes, retrying: {e:#}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn listen_once(&self) -> anyhow::Result<()> {
        let mut listener = PgListener::connect_with(self.inner.registry.pool())
            .await
            .context("connect the listener")?;
        listener.ignore_pool_close_event(true);
        listener.listen(NOTIFY_CHANNEL).await.context("LISTEN")?;
        // Anything announced while we were not listening is unknown.
        self.mark_lookups_stale();
        loop {
            match listener
                .try_recv()
                .await
                .context("receive a notification")?
            {
                Some(n) if n.payload().starts_with("plan:") => {
                    // A plan's limits changed: every tenant of it is re-read.
                    let plan = &n.payload()["plan:".len()..];
                    if self.sent_by_silo(n.process_id()).await != Some(false) {
                        self.invalidate_plan(plan).await;
                    }
                }
                Some(n) => {
                    if let Ok(id) = Uuid::parse_str(n.payload()) {
                        match self.sent_by_silo(n.process_id()).await {
                            // A change silo made: drop the lookup and the pool now.
                            Some(true) => self.invalidate(id).await,
                            // Announced by another role of the cluster: ignored.
                            Some(false) => {
                                metrics::counter!("silo_router_foreign_notifications_total")
                                    .increment(1);
                                tracing::debug!(sender = n.process_id(), "ignored a tenant change announced by a session that is not silo's");
                            }
                            // Its sender is gone (or the control DB is out of
                            // reach): re-read the tenant on next use; the pool
                            // is kept unless the lookup then differs.
                            None => {
                                let _ = self.inner.changed.send(id);
                                self.mark_stale(id).await
                            }
                        }
                    }
                }
                // The connection dropped; sqlx reconnects on the next call.
                None => self.mark_lookups_stale(),
            }
        }
    }
}

/// A lookup error shared by every request that waited on the same read.
fn shared_error(e: &Arc<RouteError>) -> RouteError {
    match e.as_ref() {
        RouteError::ControlDown(msg) => RouteError::ControlDown(msg.clone()),
        other => RouteError::Internal(anyhow::anyhow!("{other}")),
    }
}

fn check_status(entry: &TenantEntry) -> Result<(), RouteError> {
    match entry.status {
        TenantStatus::Active if entry.frozen => Err(RouteError::NotReady("moving")),
        TenantStatus::Active => Ok(()),
        // Archiving: on its way to archived (a queued or running archival).
        TenantStatus::Suspended | TenantStatus::Archiving | TenantStatus::Archived => {
            Err(RouteError::Locked(entry.status.as_str()))
        }
        TenantStatus::Deleted => Err(RouteError::NotFound),
        other => Err(RouteError::NotReady(other.as_str())),
    }
}

/// "too many connections for role": the tenant is busy, its database is fine.
fn is_role_limit(e: &sqlx::Error) -> bool {
    sqlstate::is(e, sqlstate::TOO_MANY_CONNECTIONS)
        && e.as_database_error()
            .is_some_and(|d| d.message().contains("for role"))
}

/// A wrong password (rotated), or a role that may not log in (frozen for a
/// move, or just suspended): the registry knows better than our cache.
fn is_auth_failure(e: &sqlx::Error) -> bool {
    pool::is_auth_refusal(e)
}

/// The database does not exist (any more): a restore swapped in another,
/// or the tenant moved; the registry knows which.
fn is_missing_database(e: &sqlx::Error) -> bool {
    sqlstate::is(e, sqlstate::INVALID_CATALOG_NAME)
}
