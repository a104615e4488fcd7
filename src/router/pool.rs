//! A per-tenant connection pool whose connections draw on a per-server budget.
//!
//! sqlx's pool cannot share a connection limit across pools (its hooks run
//! after a connection is already open), so this small pool owns the lifecycle:
//!
//! - **A budget the server agrees with.** Every connection, from before it
//!   connects until its server backend is *gone*, holds one permit of its
//!   server's [`ServerBudget`]. Closing sends Terminate, and the permit goes
//!   back only once the backend's pid has left `pg_stat_activity`, as seen
//!   by the budget's monitor connection (or the server restarted). So the
//!   backends PostgreSQL counts for silo never exceed the budget, even for
//!   the moment a closing backend lingers.
//! - **Self-healing.** A connection that failed with an I/O, protocol,
//!   `57P*` or `08*` error is discarded (never handed out again), and every
//!   idle connection of its server that went idle before that moment is
//!   checked (a `Sync` round trip) before its next use, as is any connection
//!   idle longer than [`PoolPolicy::check_after`]. A check that fails
//!   discards the connection and the request takes another (or a new one):
//!   it never sends its statement on a dead connection it could have known
//!   about. Connections older than [`PoolPolicy::max_lifetime`] are closed.
//! - **A fair budget.** When the budget is full, a request that needs a new
//!   connection closes the *least recently used* idle connection of the
//!   server (a hot tenant's connections are reused and never the oldest), at
//!   most [`PoolPolicy::connect_concurrency`] connection attempts run at once
//!   per server (so openings never take the whole budget from warm tenants),
//!   and waiters are served first come, first served. A small reserve of
//!   permits is kept free by closing long-idle connections ahead of need.
//!
//! No lock is held across an `.await`: the idle lists and the budget's
//! state are `std::sync::Mutex`es touched only for short bookkeeping.

use std::collections::{BTreeMap, VecDeque};
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::servers::sqlstate;

/// How long a tenant with connections in use waits for one of them to come
/// back before opening (or taking budget for) another.
const OWN_RETURN_GRACE: Duration = Duration::from_millis(25);
/// Longest a check of an idle connection may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest a polite close (Terminate) may take before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// The reserve is refilled only from connections idle at least this long,
/// so a busy tenant's connections are never closed just to keep it.
const RESERVE_MIN_IDLE: Duration = Duration::from_millis(500);
/// Between two looks of the monitor at `pg_stat_activity` while backends
/// are closing.
const MONITOR_POLL: Duration = Duration::from_millis(2);
/// The monitor connection closes after this long with nothing to watch.
const MONITOR_IDLE: Duration = Duration::from_secs(30);
/// A connection attempt that failed after the server may have started a
/// backend for it (its pid unknown) keeps its permit this long: the backend
/// sends its error and exits at once.
const FAILED_ATTEMPT_HOLD: Duration = Duration::from_millis(250);
/// A closing backend not confirmed gone after this long (the server out of
/// reach all along) gives its permit back anyway, loudly: a budget must not
/// leak away for good.
const CONFIRM_GIVE_UP: Duration = Duration::from_secs(120);

/// Monotonic nanoseconds since the first call, for atomics (and the
/// "went idle at" of idle connections in [`ServerBudget`]'s ledger).
pub fn now_nanos() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// How the connections of one server's pools behave.
#[derive(Debug, Clone)]
pub struct PoolPolicy {
    /// An idle connection unused longer than this is checked before use.
    pub check_after: Duration,
    /// Connections older than this are closed (not reused).
    pub max_lifetime: Duration,
    /// Connection attempts at once to this server.
    pub connect_concurrency: usize,
}

impl Default for PoolPolicy {
    fn default() -> Self {
        Self {
            check_after: Duration::from_secs(2),
            max_lifetime: Duration::from_secs(30 * 60),
            connect_concurrency: 8,
        }
    }
}

/// The server backend behind a connection: its pid, and the postmaster's
/// start time (a restart ends every backend, and pids may be reused).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Backend {
    pid: i32,
    postmaster_started: String,
}

/// Why a connection was closed (the `reason` label of
/// `silo_router_connections_closed_total`).
#[derive(Debug, Clone, Copy)]
enum CloseReason {
    /// Idle past the idle timeout.
    Idle,
    /// Its permit was needed by another tenant of the server.
    Reclaimed,
    /// Failed (its session is gone) or failed its check before use.
    Dead,
    /// Older than the maximum lifetime.
    Lifetime,
    /// Its pool was invalidated, evicted or rebuilt.
    PoolClosed,
}

impl CloseReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Reclaimed => "reclaimed",
            Self::Dead => "dead",
            Self::Lifetime => "lifetime",
            Self::PoolClosed => "pool_closed",
        }
    }
}

/// A permit whose backend has not been seen gone yet.
struct Closing {
    /// Held, not read: dropping it gives the permit back.
    _permit: OwnedSemaphorePermit,
    backend: Option<Backend>,
    closed_at: Instant,
    /// The monitor's last look did not find the backend: one more look
    /// that does not either, and the permit goes back.
    missed: bool,
}

/// Whoever holds idle connections of a server: a tenant pool of the
/// router, or the wire front door's. The budget closes their idle
/// connections, least recently used first, when someone else needs a permit.
pub trait IdleOwner: Send + Sync {
    /// Clients of the owner waiting for one of its own connections (its
    /// idle ones are then not taken from it).
    fn waiters(&self) -> usize;
    /// Close idle connection `id` for someone else's demand, if it is
    /// still idle.
    fn reclaim(&self, id: u64);
}

#[derive(Default)]
struct BudgetState {
    /// Every idle connection of the server, oldest first: (went idle at, id) → its owner.
    idle: BTreeMap<(u64, u64), Weak<dyn IdleOwner>>,
    /// Requests waiting for a permit.
    waiting: usize,
}

/// Connections silo may hold open to one server, shared by all its tenant pools.
pub struct ServerBudget {
    pub server_id: Uuid,
    pub max: usize,
    policy: PoolPolicy,
    permits: Arc<Semaphore>,
    connects: Arc<Semaphore>,
    /// Permits kept free ahead of need (refilled from long-idle connections).
    reserve: usize,
    state: Mutex<BudgetState>,
    /// Connections closed whose backends are not confirmed gone yet.
    closing: Mutex<Vec<Closing>>,
    closing_count: AtomicUsize,
    /// When a connection of this server was last found dead: idle
    /// connections older than that are checked before use.
    suspect_since: AtomicU64,
    /// Admin login options, for the monitor connection.
    monitor_opts: PgConnectOptions,
    monitor_running: AtomicBool,
    monitor_wake: Arc<Notify>,
    /// The server's Unix socket directory, when it is on this machine.
    socket: Mutex<Option<PathBuf>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for ServerBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBudget")
            .field("server_id", &self.server_id)
            .field("max", &self.max)
            .field("open", &self.open())
            .finish_non_exhaustive()
    }
}

impl ServerBudget {
    /// A budget of `max` connections; `monitor` is the admin login that
    /// watches closing backends leave; `socket` the server's local Unix
    /// socket directory, if tenants should connect through it.
    pub fn new(
        server_id: Uuid,
        max: usize,
        policy: PoolPolicy,
        monitor: PgConnectOptions,
        socket: Option<PathBuf>,
    ) -> Arc<Self> {
        let max = max.max(1);
        Arc::new(Self {
            server_id,
            max,
            permits: Arc::new(Semaphore::new(max)),
            connects: Arc::new(Semaphore::new(policy.connect_concurrency.max(1))),
            reserve: if max >= 10 { (max / 20).max(1) } else { 0 },
            policy,
            state: Mutex::default(),
            closing: Mutex::default(),
            closing_count: AtomicUsize::new(0),
            suspect_since: AtomicU64::new(0),
            monitor_opts: monitor.application_name("silo-router-monitor"),
            monitor_running: AtomicBool::new(false),
            monitor_wake: Arc::new(Notify::new()),
            socket: Mutex::new(socket),
            next_id: AtomicU64::new(1),
        })
    }

    /// Backends this process holds on the server right now: connections
    /// open or opening, and closed ones not yet seen gone.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// Connections closed whose backends are not confirmed gone yet.
    pub fn closing(&self) -> usize {
        self.closing_count.load(Ordering::Relaxed)
    }

    /// Whether tenant connections go through the server's Unix socket.
    pub fn local_socket(&self) -> Option<PathBuf> {
        self.socket.lock().expect("socket lock").clone()
    }

    /// Record an idle connection (`since` from [`now_nanos`], `id` from
    /// [`Self::next_conn_id`]) so it may be reclaimed for others.
    pub fn idle_insert(&self, since: u64, id: u64, owner: Weak<dyn IdleOwner>) {
        self.state
            .lock()
            .expect("budget lock")
            .idle
            .insert((since, id), owner);
    }

    /// The idle connection left the ledger (taken for use, or closed).
    pub fn idle_remove(&self, since: u64, id: u64) {
        self.state
            .lock()
            .expect("budget lock")
            .idle
            .remove(&(since, id));
    }

    /// A fresh connection id, unique within this budget.
    pub fn next_conn_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The policy of the server's connections (checks, lifetime).
    pub fn policy(&self) -> &PoolPolicy {
        &self.policy
    }

    /// When a connection of this server was last found dead ([`now_nanos`],
    /// 0 never): an idle connection older than that is checked before use.
    pub fn suspect_since(&self) -> u64 {
        self.suspect_since.load(Ordering::Acquire)
    }

    /// A permit for a connection opened outside the router's pools (the
    /// wire front door): a connection-attempt slot, then a permit (closing
    /// the least recently used idle connection of the server for it if none
    /// is free), by `deadline`.
    pub async fn claim(self: &Arc<Self>, deadline: Instant) -> Result<Claim, AcquireError> {
        let until = tokio::time::Instant::from_std(deadline);
        let attempt = tokio::select! {
            s = self.connects.clone().acquire_owned() => s.map_err(|_| AcquireError::Closed)?,
            _ = tokio::time::sleep_until(until) => {
                metrics::counter!("silo_router_budget_rejections_total").increment(1);
                return Err(AcquireError::BudgetExhausted);
            }
        };
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let _demand = Demand::new(self);
                tokio::select! {
                    p = self.permits.clone().acquire_owned() => p.map_err(|_| AcquireError::Closed)?,
                    _ = tokio::time::sleep_until(until) => {
                        metrics::counter!("silo_router_budget_rejections_total").increment(1);
                        return Err(AcquireError::BudgetExhausted);
                    }
                }
            }
        };
        self.rebalance();
        Ok(Claim {
            permit: Some(permit),
            attempt: Some(attempt),
            budget: self.clone(),
        })
    }

    /// Close long-idle connections to keep the reserve of free permits (the
    /// router's upkeep calls it; openings and returns do too).
    pub fn keep_reserve(self: &Arc<Self>) {
        self.rebalance();
    }

    /// Connections of this server went bad: every idle one is checked before use.
    pub fn mark_suspect(&self) {
        self.suspect_since.store(now_nanos(), Ordering::Release);
    }

    /// Close idle connections, least recently used first, while requests
    /// wait for permits that no closing connection will bring, and (from
    /// connections idle a while) to keep the reserve free.
    fn rebalance(self: &Arc<Self>) {
        let mut skipped = Vec::new();
        loop {
            let victim = {
                let mut s = self.state.lock().expect("budget lock");
                let coming = self.closing() + self.permits.available_permits();
                let for_waiters = s.waiting > coming;
                let for_reserve = coming < self.reserve;
                if !for_waiters && !for_reserve {
                    break;
                }
                let Some((&key, owner)) = s.idle.iter().next() else {
                    break;
                };
                let owner = owner.clone();
                let old_enough =
                    now_nanos().saturating_sub(key.0) >= RESERVE_MIN_IDLE.as_nanos() as u64;
                if !for_waiters && !old_enough {
                    break;
                }
                s.idle.remove(&key);
                owner.upgrade().map(|o| (o, key, owner))
            };
            let Some((pool, key, weak)) = victim else {
                continue; // its owner is gone: a stale entry
            };
            if pool.waiters() > 0 {
                // Its own tenant is waiting for it: not a victim.
                skipped.push((key, weak));
                continue;
            }
            metrics::counter!("silo_router_reclaimed_total").increment(1);
            pool.reclaim(key.1);
        }
        if !skipped.is_empty() {
            let mut s = self.state.lock().expect("budget lock");
            s.idle.extend(skipped);
        }
    }

    /// Hand a closed connection's permit to the monitor, which gives it
    /// back once the backend is gone.
    fn retire_permit(self: &Arc<Self>, permit: OwnedSemaphorePermit, backend: Option<Backend>) {
        self.closing_count.fetch_add(1, Ordering::Relaxed);
        self.closing.lock().expect("closing lock").push(Closing {
            _permit: permit,
            backend,
            closed_at: Instant::now(),
            missed: false,
        });
        self.monitor_wake.notify_one();
        if !self.monitor_running.swap(true, Ordering::AcqRel) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(monitor(Arc::downgrade(self)));
            } else {
                self.monitor_running.store(false, Ordering::Release);
            }
        }
    }

    /// Close a connection and retire its permit (in a task: the close waits
    /// for the server, and its permit for the backend to be gone).
    fn close_conn(&self, conn: Conn, reason: CloseReason) {
        metrics::counter!("silo_router_connections_closed_total", "reason" => reason.as_str())
            .increment(1);
        let Conn { conn, ticket, .. } = conn;
        let polite = !matches!(reason, CloseReason::Dead);
        let close = async move {
            if polite {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close()).await;
            } else {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close_hard()).await;
            }
            drop(ticket); // the socket is closed: the monitor watches the backend leave
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(close);
            }
            // No runtime (the process is ending): the socket closes on drop.
            Err(_) => drop(close),
        }
    }

    /// The options a tenant connects with: through the local socket when
    /// there is one.
    fn route(&self, opts: &PgConnectOptions) -> (PgConnectOptions, bool) {
        match &*self.socket.lock().expect("socket lock") {
            Some(dir) => (opts.clone().socket(dir).ssl_mode(PgSslMode::Disable), true),
            None => (opts.clone(), false),
        }
    }

    fn give_up_socket(&self) {
        if self.socket.lock().expect("socket lock").take().is_some() {
            tracing::warn!(server_id = %self.server_id, "tenant logins are refused on the server's Unix socket (pg_hba.conf?): connecting over TCP from now on");
        }
    }
}

/// Watch closing backends leave `pg_stat_activity` and give their permits
/// back; stops after [`MONITOR_IDLE`] with nothing to watch.
async fn monitor(budget: Weak<ServerBudget>) {
    let mut conn: Option<PgConnection> = None;
    let mut backoff = Duration::from_millis(50);
    let mut warned = false;
    loop {
        let Some(b) = budget.upgrade() else { return };
        let watched: Vec<Option<Backend>> = b
            .closing
            .lock()
            .expect("closing lock")
            .iter()
            .map(|c| c.backend.clone())
            .collect();
        if watched.is_empty() {
            let waker = b.monitor_wake.clone();
            let wake = waker.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if !b.closing.lock().expect("closing lock").is_empty() {
                continue;
            }
            let budget_ref = Arc::downgrade(&b);
            drop(b);
            if tokio::time::timeout(MONITOR_IDLE, wake).await.is_err() {
                let Some(b) = budget_ref.upgrade() else {
                    return;
                };
                b.monitor_running.store(false, Ordering::Release);
                // Work that arrived meanwhile restarts a monitor, or this one.
                if b.closing.lock().expect("closing lock").is_empty()
                    || b.monitor_running.swap(true, Ordering::AcqRel)
                {
                    if let Some(c) = conn.take() {
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, c.close()).await;
                    }
                    return;
                }
            }
            continue;
        }
        if conn.is_none() {
            match tokio::time::timeout(Duration::from_secs(2), b.monitor_opts.connect()).await {
                Ok(Ok(c)) => {
                    conn = Some(c);
                    backoff = Duration::from_millis(50);
                }
                failed => {
                    if !warned {
                        let why = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".into(),
                        };
                        tracing::warn!(server_id = %b.server_id, "failed to watch closing tenant connections leave the server, their budget is held until it answers: {why}");
                        warned = true;
                    }
                    give_up_stale(&b);
                    drop(b);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            }
        }
        let pids: Vec<i32> = watched.iter().flatten().map(|w| w.pid).collect();
        let c = conn.as_mut().expect("monitor connected");
        let seen: Result<(String, Vec<i32>), sqlx::Error> = sqlx::query_as(
            "SELECT pg_postmaster_start_time()::text, \
             ARRAY(SELECT pid FROM pg_stat_activity WHERE pid = ANY($1))",
        )
        .bind(&pids)
        .fetch_one(&mut *c)
        .await;
        match seen {
            Ok((started, alive)) => {
                warned = false;
                let now = Instant::now();
                let gone: Vec<Closing> = {
                    let mut closing = b.closing.lock().expect("closing lock");
                    let (gone, kept) = std::mem::take(&mut *closing)
                        .into_iter()
                        .map(|mut c| {
                            let absent = c.backend.as_ref().is_some_and(|w| {
                                w.postmaster_started != started || !alive.contains(&w.pid)
                            });
                            // Gone from the activity view twice in a row: a
                            // backend leaves the view a moment before it frees
                            // its connection slot, and a reader of the view
                            // may see it a moment after.
                            let confirmed = absent && c.missed;
                            c.missed = absent;
                            (c, confirmed)
                        })
                        .partition::<Vec<_>, _>(|(c, confirmed)| match &c.backend {
                            Some(_) => *confirmed,
                            None => now.duration_since(c.closed_at) >= FAILED_ATTEMPT_HOLD,
                        });
                    *closing = kept.into_iter().map(|(c, _)| c).collect();
                    gone.into_iter().map(|(c, _)| c).collect()
                };
                release(&b, gone);
            }
            Err(e) => {
                tracing::debug!(server_id = %b.server_id, "monitor query failed, reconnecting: {e}");
                conn = None;
                give_up_stale(&b);
            }
        }
        drop(b);
        tokio::time::sleep(MONITOR_POLL).await;
    }
}

/// Give back permits: their backends are gone.
fn release(b: &Arc<ServerBudget>, gone: Vec<Closing>) {
    if gone.is_empty() {
        return;
    }
    b.closing_count.fetch_sub(gone.len(), Ordering::Relaxed);
    drop(gone); // the permits return to the semaphore: its first waiters get them
    b.rebalance();
}

/// Closing backends the monitor could not confirm for [`CONFIRM_GIVE_UP`].
fn give_up_stale(b: &Arc<ServerBudget>) {
    let now = Instant::now();
    let stale: Vec<Closing> = {
        let mut closing = b.closing.lock().expect("closing lock");
        let (stale, kept) = std::mem::take(&mut *closing)
            .into_iter()
            .partition(|c| now.duration_since(c.closed_at) >= CONFIRM_GIVE_UP);
        *closing = kept;
        stale
    };
    if !stale.is_empty() {
        tracing::warn!(server_id = %b.server_id, count = stale.len(), "gave back the budget of closed connections never confirmed gone (the server was out of reach)");
        release(b, stale);
    }
}

/// Why a connection could not be had.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error("the tenant's connection limit is reached and none freed up in time")]
    TenantSaturated,
    #[error("the server's connection budget is exhausted")]
    BudgetExhausted,
    #[error("could not connect to the tenant database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("connecting to the tenant database timed out")]
    ConnectTimeout,
    #[error("the pool was closed")]
    Closed,
}

/// An open connection and its [`Ticket`].
struct Conn {
    conn: PgConnection,
    ticket: Ticket,
    id: u64,
    born: Instant,
}

/// A connection's claim on its server's budget: however the connection
/// ends (closed, found dead, or dropped by a request given up midway), its
/// permit goes to the monitor, which gives it back once the backend is gone.
struct Ticket {
    permit: Option<OwnedSemaphorePermit>,
    backend: Backend,
    budget: Arc<ServerBudget>,
    /// The pool's count of open connections.
    open: Arc<AtomicUsize>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(permit) = self.permit.take() {
            self.budget
                .retire_permit(permit, Some(self.backend.clone()));
        }
    }
}

/// A budget permit for a connection being opened outside the router's
/// pools. Dropped before [`Claim::connected`]: the attempt failed, and the
/// permit is held a moment (the server may have started a backend that is
/// exiting).
pub struct Claim {
    permit: Option<OwnedSemaphorePermit>,
    attempt: Option<OwnedSemaphorePermit>,
    budget: Arc<ServerBudget>,
}

impl Claim {
    pub fn budget(&self) -> &Arc<ServerBudget> {
        &self.budget
    }

    /// The connection is open, to backend `pid` of the server started at
    /// `postmaster_started` (`pg_postmaster_start_time()::text`).
    pub fn connected(mut self, pid: i32, postmaster_started: String) -> Held {
        self.attempt.take();
        Held {
            permit: self.permit.take(),
            backend: Backend {
                pid,
                postmaster_started,
            },
            budget: self.budget.clone(),
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.budget.retire_permit(permit, None);
        }
    }
}

/// An open connection's permit: when dropped (after its socket is closed),
/// the permit goes back once the server's backend is seen gone.
pub struct Held {
    permit: Option<OwnedSemaphorePermit>,
    backend: Backend,
    budget: Arc<ServerBudget>,
}

impl Held {
    pub fn budget(&self) -> &Arc<ServerBudget> {
        &self.budget
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.budget
                .retire_permit(permit, Some(self.backend.clone()));
        }
    }
}

struct Idle {
    conn: Conn,
    /// [`now_nanos`] when it went idle.
    since: u64,
}

/// What a pool was built for: a tenant's server, database and role, a
/// fingerprint of the credentials (never the password itself), and the
/// connection limit its plan sets. A lookup that no longer matches means
/// the pool is stale and is rebuilt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolKey {
    pub server_id: Uuid,
    pub database: String,
    pub role: String,
    pub credentials: [u8; 32],
    /// Its plan's connection limit, which sets the pool's cap.
    pub connection_limit: i32,
}

/// One tenant's connections.
pub struct TenantPool {
    pub tenant: Uuid,
    /// What it was built for.
    pub key: PoolKey,
    opts: PgConnectOptions,
    budget: Arc<ServerBudget>,
    /// At most `cap` connections of this tenant checked out at once.
    slots: Arc<Semaphore>,
    pub cap: usize,
    idle: Mutex<VecDeque<Idle>>,
    open: Arc<AtomicUsize>,
    closed: AtomicBool,
    /// Woken when a connection of this pool goes idle.
    returned: Notify,
    /// Requests of this tenant waiting for one of its connections.
    waiters: AtomicUsize,
    /// Connections this tenant opened, across its pools (churn).
    connects: Arc<AtomicU64>,
}

impl std::fmt::Debug for TenantPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantPool")
            .field("tenant", &self.tenant)
            .field("open", &self.open())
            .field("cap", &self.cap)
            .finish_non_exhaustive()
    }
}

/// What waiting for a new connection ended with.
enum Opened {
    New(Conn),
    /// A connection of this tenant went idle meanwhile: take it instead.
    OwnReturned,
}

/// Counts a waiter while it lives.
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Self(n)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request waiting for a permit, counted in the budget's state so idle
/// connections are closed for it.
struct Demand<'a>(&'a Arc<ServerBudget>);

impl<'a> Demand<'a> {
    fn new(budget: &'a Arc<ServerBudget>) -> Self {
        budget.state.lock().expect("budget lock").waiting += 1;
        budget.rebalance();
        Self(budget)
    }
}

impl Drop for Demand<'_> {
    fn drop(&mut self) {
        self.0.state.lock().expect("budget lock").waiting -= 1;
    }
}

impl TenantPool {
    pub fn new(
        tenant: Uuid,
        key: PoolKey,
        opts: PgConnectOptions,
        cap: usize,
        budget: Arc<ServerBudget>,
        connects: Arc<AtomicU64>,
    ) -> Arc<Self> {
        Arc::new(Self {
            tenant,
            key,
            opts,
            slots: Arc::new(Semaphore::new(cap.max(1))),
            cap: cap.max(1),
            budget: budget.clone(),
            idle: Mutex::default(),
            open: Arc::default(),
            closed: AtomicBool::new(false),
            returned: Notify::new(),
            waiters: AtomicUsize::new(0),
            connects,
        })
    }

    /// Connections open (idle + in use).
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections checked out right now.
    pub fn in_use(&self) -> usize {
        self.cap - self.slots.available_permits()
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().expect("idle lock").len()
    }

    /// Connections this tenant has opened (across rebuilds of its pool).
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// A connection, within `timeout`: an idle one (checked first if it may
    /// be dead), else a new one under the budget.
    pub async fn acquire(self: &Arc<Self>, timeout: Duration) -> Result<TenantConn, AcquireError> {
        let deadline = Instant::now() + timeout;
        let slot = tokio::time::timeout(timeout, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| AcquireError::TenantSaturated)?
            .map_err(|_| AcquireError::Closed)?;
        let mut waited_since: Option<Instant> = None;
        loop {
            if self.is_closed() {
                return Err(AcquireError::Closed);
            }
            if let Some(idle) = self.pop_idle() {
                if let Some(conn) = self.ready(idle, deadline).await {
                    return Ok(self.wrap(conn, slot, true));
                }
                continue;
            }
            let _waiting = Counted::new(&self.waiters);
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if self.idle_count() > 0 {
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                metrics::counter!("silo_router_budget_rejections_total").increment(1);
                return Err(AcquireError::BudgetExhausted);
            }
            let since = *waited_since.get_or_insert(now);
            let grace = since + OWN_RETURN_GRACE;
            if self.open() > 0 && now < grace {
                // Busy, with connections in use: one of them is about to come back.
                tokio::select! {
                    _ = returned.as_mut() => {}
                    _ = tokio::time::sleep_until(grace.min(deadline).into()) => {}
                }
                continue;
            }
            match self.open_new(returned.as_mut(), deadline).await? {
                Opened::New(conn) => return Ok(self.wrap(conn, slot, false)),
                Opened::OwnReturned => continue,
            }
        }
    }

    /// A new connection: a connection-attempt slot of the server, then a
    /// permit (closing the least recently used idle connection of the
    /// server for it if none is free), then the connect, in a task of its
    /// own so a request given up meanwhile never drops a half-open one.
    async fn open_new(
        self: &Arc<Self>,
        mut returned: Pin<&mut tokio::sync::futures::Notified<'_>>,
        deadline: Instant,
    ) -> Result<Opened, AcquireError> {
        let budget = self.budget.clone();
        let until = tokio::time::Instant::from_std(deadline);
        let attempt = tokio::select! {
            biased;
            _ = returned.as_mut() => return Ok(Opened::OwnReturned),
            s = budget.connects.clone().acquire_owned() => s.map_err(|_| AcquireError::Closed)?,
            _ = tokio::time::sleep_until(until) => {
                metrics::counter!("silo_router_budget_rejections_total").increment(1);
                return Err(AcquireError::BudgetExhausted);
            }
        };
        let permit = match budget.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let _demand = Demand::new(&budget);
                tokio::select! {
                    biased;
                    _ = returned.as_mut() => return Ok(Opened::OwnReturned),
                    p = budget.permits.clone().acquire_owned() => p.map_err(|_| AcquireError::Closed)?,
                    _ = tokio::time::sleep_until(until) => {
                        metrics::counter!("silo_router_budget_rejections_total").increment(1);
                        return Err(AcquireError::BudgetExhausted);
                    }
                }
            }
        };
        // Keep the reserve: close long-idle connections ahead of need.
        budget.rebalance();
        let pool = self.clone();
        // A connection attempt gets a full `acquire_timeout` of its own
        // (from the request's start): waiting for a permit must not turn a
        // healthy but slow connect into "database down".
        let limit = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(500));
        let task = tokio::spawn(async move {
            let _attempt = attempt;
            pool.connect(permit, limit).await
        });
        match task.await {
            Ok(r) => r.map(Opened::New),
            Err(e) => Err(AcquireError::Connect(sqlx::Error::Io(
                std::io::Error::other(format!("the connection attempt failed: {e}")),
            ))),
        }
    }

    /// Connect with `permit`; learn the backend's pid. On failure the permit
    /// is held briefly (the server may have started a backend that is
    /// exiting).
    async fn connect(
        self: &Arc<Self>,
        permit: OwnedSemaphorePermit,
        limit: Duration,
    ) -> Result<Conn, AcquireError> {
        let budget = &self.budget;
        let (opts, via_socket) = budget.route(&self.opts);
        let started = Instant::now();
        let mut attempt = tokio::time::timeout(limit, opts.connect()).await;
        if via_socket {
            if let Ok(Err(e)) = &attempt {
                if is_auth_refusal(e) {
                    // pg_hba.conf may treat local logins differently: try TCP.
                    let tcp = tokio::time::timeout(limit, self.opts.connect()).await;
                    if matches!(tcp, Ok(Ok(_))) {
                        budget.give_up_socket();
                    }
                    attempt = tcp;
                }
            }
        }
        let mut conn = match attempt {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                budget.retire_permit(permit, None);
                return Err(AcquireError::Connect(e));
            }
            Err(_) => {
                budget.retire_permit(permit, None);
                return Err(AcquireError::ConnectTimeout);
            }
        };
        let who: Result<(String, String), sqlx::Error> =
            sqlx::query_as("SELECT pg_backend_pid()::text, pg_postmaster_start_time()::text")
                .fetch_one(&mut conn)
                .await;
        let backend = match who.map(|(pid, started)| (pid.parse::<i32>(), started)) {
            Ok((Ok(pid), postmaster_started)) => Backend {
                pid,
                postmaster_started,
            },
            Ok((Err(_), _)) | Err(_) => {
                drop(conn);
                budget.retire_permit(permit, None);
                return Err(AcquireError::Connect(sqlx::Error::Protocol(
                    "the new connection did not say which backend it is".into(),
                )));
            }
        };
        self.open.fetch_add(1, Ordering::Relaxed);
        self.connects.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("silo_router_connects_total").increment(1);
        metrics::histogram!("silo_router_connect_seconds").record(started.elapsed().as_secs_f64());
        Ok(Conn {
            conn,
            ticket: Ticket {
                permit: Some(permit),
                backend,
                budget: budget.clone(),
                open: self.open.clone(),
            },
            id: budget.next_id.fetch_add(1, Ordering::Relaxed),
            born: Instant::now(),
        })
    }

    /// An idle connection made ready for use: closed instead if too old,
    /// checked first if it may be dead (and discarded if it is).
    async fn ready(self: &Arc<Self>, idle: Idle, deadline: Instant) -> Option<Conn> {
        let Idle { mut conn, since } = idle;
        let policy = &self.budget.policy;
        if conn.born.elapsed() >= policy.max_lifetime {
            self.retire(conn, CloseReason::Lifetime);
            return None;
        }
        let idle_for = Duration::from_nanos(now_nanos().saturating_sub(since));
        let suspect_since = self.budget.suspect_since.load(Ordering::Acquire);
        let suspect = suspect_since > 0 && since <= suspect_since;
        if suspect || idle_for >= policy.check_after {
            let limit = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(100), CHECK_TIMEOUT);
            let alive = matches!(
                tokio::time::timeout(limit, conn.conn.ping()).await,
                Ok(Ok(()))
            );
            metrics::counter!("silo_router_checks_total", "outcome" => if alive { "alive" } else { "dead" })
                .increment(1);
            if !alive {
                self.budget.mark_suspect();
                self.retire(conn, CloseReason::Dead);
                return None;
            }
        }
        Some(conn)
    }

    fn wrap(self: &Arc<Self>, conn: Conn, slot: OwnedSemaphorePermit, reused: bool) -> TenantConn {
        TenantConn {
            conn: Some(conn),
            _slot: slot,
            pool: self.clone(),
            broken: false,
            reused,
        }
    }

    fn pop_idle(&self) -> Option<Idle> {
        let idle = self.idle.lock().expect("idle lock").pop_back()?;
        self.budget
            .state
            .lock()
            .expect("budget lock")
            .idle
            .remove(&(idle.since, idle.conn.id));
        Some(idle)
    }

    /// The idle connection `id`, if it is still idle.
    fn take_idle(&self, id: u64) -> Option<Conn> {
        let mut idle = self.idle.lock().expect("idle lock");
        let at = idle.iter().position(|i| i.conn.id == id)?;
        idle.remove(at).map(|i| i.conn)
    }

    /// Close idle connections unused for longer than `max_idle`; returns how many.
    pub fn reap(&self, max_idle: Duration) -> usize {
        let cutoff = now_nanos().saturating_sub(max_idle.as_nanos() as u64);
        let stale: Vec<Idle> = {
            let mut idle = self.idle.lock().expect("idle lock");
            let keep = idle
                .iter()
                .position(|i| i.since > cutoff)
                .unwrap_or(idle.len());
            idle.drain(..keep).collect()
        };
        let n = stale.len();
        self.forget_idle(&stale);
        for i in stale {
            self.retire(i.conn, CloseReason::Idle);
        }
        n
    }

    /// Stop handing out connections; idle ones close now, in-use ones when returned.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.slots.close();
        let idle: Vec<Idle> = self.idle.lock().expect("idle lock").drain(..).collect();
        self.forget_idle(&idle);
        for i in idle {
            self.retire(i.conn, CloseReason::PoolClosed);
        }
        self.returned.notify_waiters();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn forget_idle(&self, gone: &[Idle]) {
        if gone.is_empty() {
            return;
        }
        let mut s = self.budget.state.lock().expect("budget lock");
        for i in gone {
            s.idle.remove(&(i.since, i.conn.id));
        }
    }

    fn retire(&self, conn: Conn, reason: CloseReason) {
        self.budget.close_conn(conn, reason);
    }

    fn give_back(self: &Arc<Self>, conn: Conn, broken: bool) {
        if broken {
            self.retire(conn, CloseReason::Dead);
            return;
        }
        if self.is_closed() {
            self.retire(conn, CloseReason::PoolClosed);
            return;
        }
        if conn.born.elapsed() >= self.budget.policy.max_lifetime {
            self.retire(conn, CloseReason::Lifetime);
            return;
        }
        let since = now_nanos();
        let key = (since, conn.id);
        self.idle
            .lock()
            .expect("idle lock")
            .push_back(Idle { conn, since });
        self.budget
            .state
            .lock()
            .expect("budget lock")
            .idle
            .insert(key, Arc::downgrade(self) as Weak<dyn IdleOwner>);
        if self.waiters.load(Ordering::Acquire) > 0 {
            self.returned.notify_one();
        } else {
            // Someone may be waiting for a permit this idle connection can free.
            self.budget.rebalance();
        }
    }
}

impl IdleOwner for TenantPool {
    fn waiters(&self) -> usize {
        self.waiters.load(Ordering::Acquire)
    }

    fn reclaim(&self, id: u64) {
        if let Some(conn) = self.take_idle(id) {
            self.retire(conn, CloseReason::Reclaimed);
        }
    }
}

/// A checked-out connection; returned to its pool when dropped (or closed,
/// if it broke).
pub struct TenantConn {
    conn: Option<Conn>,
    _slot: OwnedSemaphorePermit,
    pool: Arc<TenantPool>,
    broken: bool,
    reused: bool,
}

impl TenantConn {
    /// Do not reuse this connection; it closes on drop.
    pub fn mark_broken(&mut self) {
        self.broken = true;
    }

    /// A statement on this connection failed with `e`: if its session is
    /// gone (I/O, protocol, `57P*`, `08*`), the connection is discarded
    /// and every idle connection of its server is checked before its next
    /// use. Returns whether the session was gone.
    pub fn failed(&mut self, e: &sqlx::Error) -> bool {
        if !sqlstate::is_disconnect(e) {
            return false;
        }
        self.broken = true;
        self.pool.budget.mark_suspect();
        metrics::counter!("silo_router_dead_connections_total").increment(1);
        true
    }

    /// Whether it was taken from idle (not opened for this request).
    pub fn reused(&self) -> bool {
        self.reused
    }

    pub fn tenant(&self) -> Uuid {
        self.pool.tenant
    }

    /// The server backend's pid.
    pub fn backend_pid(&self) -> i32 {
        self.conn
            .as_ref()
            .expect("present until drop")
            .ticket
            .backend
            .pid
    }
}

impl Deref for TenantConn {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self
            .conn
            .as_ref()
            .expect("connection present until drop")
            .conn
    }
}

impl DerefMut for TenantConn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self
            .conn
            .as_mut()
            .expect("connection present until drop")
            .conn
    }
}

impl Drop for TenantConn {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Dropped while unwinding: whatever it was doing is unknown.
            let broken = self.broken || std::thread::panicking();
            self.pool.give_back(conn, broken);
        }
    }
}

/// A login refused for its password.
pub fn is_wrong_password(e: &sqlx::Error) -> bool {
    sqlstate::is(e, sqlstate::INVALID_PASSWORD)
}

/// A login refused by the server (wrong password, no `pg_hba.conf` entry,
/// or a role that may not log in).
pub fn is_auth_refusal(e: &sqlx::Error) -> bool {
    sqlstate::is(e, sqlstate::INVALID_PASSWORD) || sqlstate::is(e, sqlstate::INVALID_AUTHORIZATION)
}
