//! A per-tenant connection pool whose connections draw on a per-server budget.
//!
//! sqlx's pool cannot share a connection limit across pools (its hooks run
//! after a connection is already open), so this small pool owns the lifecycle:
//! every open connection, idle or in use, holds one permit of its server's
//! [`ServerBudget`] semaphore, taken *before* connecting and released when the
//! connection closes. Hence Σ open connections on a server ≤ its budget, always.
//! When the budget is exhausted, idle connections of other tenants on the same
//! server are closed to make room before a request waits.
//!
//! No lock is held across an `.await`: the idle list is a `std::sync::Mutex`
//! touched only for push/pop.

use std::collections::{HashMap, VecDeque};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

/// How long a tenant with connections in use waits for one of them to come
/// back before taking another tenant's idle connection.
const OWN_RETURN_GRACE: Duration = Duration::from_millis(25);

/// Connections silo may hold open to one server, shared by all its tenant pools.
#[derive(Debug)]
pub struct ServerBudget {
    pub server_id: Uuid,
    pub max: usize,
    permits: Arc<Semaphore>,
    pools: Mutex<HashMap<Uuid, Weak<TenantPool>>>,
    /// Woken whenever a connection of this server goes idle or closes, so a
    /// request waiting for budget can reclaim it.
    changed: tokio::sync::Notify,
}

impl ServerBudget {
    pub fn new(server_id: Uuid, max: usize) -> Arc<Self> {
        Arc::new(Self {
            server_id,
            max,
            permits: Arc::new(Semaphore::new(max)),
            pools: Mutex::default(),
            changed: tokio::sync::Notify::new(),
        })
    }

    /// Connections open to this server right now (idle + in use).
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    fn register(&self, pool: &Arc<TenantPool>) {
        let mut pools = self.pools.lock().expect("budget lock");
        pools.retain(|_, p| p.strong_count() > 0);
        pools.insert(pool.tenant, Arc::downgrade(pool));
    }

    /// Close one idle connection of another tenant on this server; `true` if one was closed.
    fn reclaim_one(&self, except: Uuid) -> bool {
        let pools: Vec<Arc<TenantPool>> = self
            .pools
            .lock()
            .expect("budget lock")
            .iter()
            .filter(|(id, _)| **id != except)
            .filter_map(|(_, p)| p.upgrade())
            .collect();
        // The pool whose idle connection has waited longest gives one up.
        let victim = pools
            .iter()
            .filter_map(|p| p.oldest_idle().map(|since| (since, p)))
            .min_by_key(|(since, _)| *since);
        match victim {
            Some((_, pool)) => pool.close_one_idle(),
            None => false,
        }
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

struct Idle {
    conn: PgConnection,
    permit: OwnedSemaphorePermit,
    since: Instant,
}

/// What a pool was built for: a tenant's server, database and role, and a
/// fingerprint of the credentials (never the password itself). A lookup
/// that no longer matches means the pool is stale and is rebuilt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolKey {
    pub server_id: Uuid,
    pub database: String,
    pub role: String,
    pub credentials: [u8; 32],
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
    open: AtomicUsize,
    closed: AtomicBool,
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

impl TenantPool {
    pub fn new(
        tenant: Uuid,
        key: PoolKey,
        opts: PgConnectOptions,
        cap: usize,
        budget: Arc<ServerBudget>,
    ) -> Arc<Self> {
        let pool = Arc::new(Self {
            tenant,
            key,
            opts,
            slots: Arc::new(Semaphore::new(cap.max(1))),
            cap: cap.max(1),
            budget: budget.clone(),
            idle: Mutex::default(),
            open: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        });
        budget.register(&pool);
        pool
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

    /// A connection, within `timeout`: an idle one, else a new one under budget.
    pub async fn acquire(self: &Arc<Self>, timeout: Duration) -> Result<TenantConn, AcquireError> {
        let deadline = Instant::now() + timeout;
        let slot = tokio::time::timeout(timeout, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| AcquireError::TenantSaturated)?
            .map_err(|_| AcquireError::Closed)?;
        if self.closed.load(Ordering::Acquire) {
            return Err(AcquireError::Closed);
        }
        let permit = match self.idle_or_permit(deadline).await? {
            Ok(idle) => return Ok(self.wrap(idle.conn, idle.permit, slot)),
            Err(permit) => permit,
        };
        // A connection attempt gets a full `timeout` of its own: waiting for a
        // permit must not turn a healthy but slow connect into "database down".
        let conn = tokio::time::timeout(timeout, self.opts.connect())
            .await
            .map_err(|_| AcquireError::ConnectTimeout)?
            .map_err(AcquireError::Connect)?;
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok(self.wrap(conn, permit, slot))
    }

    /// An idle connection of this tenant (`Ok`), or a budget permit to open a
    /// new one (`Err`). When the budget is full: a tenant with connections
    /// in use waits a moment for one of its own to come back before taking
    /// another tenant's idle connection, so busy tenants keep their warm
    /// connections instead of trading them back and forth; a tenant with none
    /// takes the longest-idle connection of another tenant at once.
    async fn idle_or_permit(
        &self,
        deadline: Instant,
    ) -> Result<Result<Idle, OwnedSemaphorePermit>, AcquireError> {
        let budget = &self.budget;
        let patience = Instant::now() + OWN_RETURN_GRACE;
        loop {
            // Register for wake-ups before checking, so none is lost in between.
            let changed = budget.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(idle) = self.pop_idle() {
                return Ok(Ok(idle));
            }
            if let Ok(p) = budget.permits.clone().try_acquire_owned() {
                return Ok(Err(p));
            }
            let own_coming_back = self.open() > 0 && Instant::now() < patience;
            if !own_coming_back && budget.reclaim_one(self.tenant) {
                metrics::counter!("silo_router_reclaimed_total").increment(1);
                continue;
            }
            let until = if own_coming_back {
                patience.min(deadline)
            } else {
                deadline
            };
            let woken = tokio::time::timeout_at(until.into(), changed).await.is_ok();
            if !woken && Instant::now() >= deadline {
                metrics::counter!("silo_router_budget_rejections_total").increment(1);
                return Err(AcquireError::BudgetExhausted);
            }
        }
    }

    fn wrap(
        self: &Arc<Self>,
        conn: PgConnection,
        permit: OwnedSemaphorePermit,
        slot: OwnedSemaphorePermit,
    ) -> TenantConn {
        TenantConn {
            conn: Some(conn),
            permit: Some(permit),
            _slot: slot,
            pool: self.clone(),
            broken: false,
        }
    }

    fn pop_idle(&self) -> Option<Idle> {
        self.idle.lock().expect("idle lock").pop_back()
    }

    fn oldest_idle(&self) -> Option<Instant> {
        self.idle
            .lock()
            .expect("idle lock")
            .front()
            .map(|i| i.since)
    }

    fn close_one_idle(&self) -> bool {
        let victim = self.idle.lock().expect("idle lock").pop_front();
        match victim {
            Some(idle) => {
                self.close_idle(idle);
                true
            }
            None => false,
        }
    }

    /// Close idle connections unused for longer than `max_idle`; returns how many.
    pub fn reap(&self, max_idle: Duration) -> usize {
        let now = Instant::now();
        let stale: Vec<Idle> = {
            let mut idle = self.idle.lock().expect("idle lock");
            let keep = idle
                .iter()
                .position(|i| now.duration_since(i.since) < max_idle)
                .unwrap_or(idle.len());
            idle.drain(..keep).collect()
        };
        let n = stale.len();
        for i in stale {
            self.close_idle(i);
        }
        n
    }

    /// Stop handing out connections; idle ones close now, in-use ones when returned.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.slots.close();
        let idle: Vec<Idle> = self.idle.lock().expect("idle lock").drain(..).collect();
        for i in idle {
            self.close_idle(i);
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn close_idle(&self, idle: Idle) {
        let Idle { conn, permit, .. } = idle;
        drop(permit); // before the wake-up, so a woken waiter finds the permit
        self.close_conn(conn);
    }

    /// Close a connection whose budget permit was already released.
    fn close_conn(&self, conn: PgConnection) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.budget.changed.notify_waiters();
        // A polite Terminate when a runtime is at hand; dropping also closes the socket.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = conn.close().await;
            });
        }
    }

    fn give_back(&self, conn: PgConnection, permit: OwnedSemaphorePermit, broken: bool) {
        if broken || self.is_closed() {
            drop(permit);
            self.close_conn(conn);
            return;
        }
        self.idle.lock().expect("idle lock").push_back(Idle {
            conn,
            permit,
            since: Instant::now(),
        });
        self.budget.changed.notify_waiters();
    }
}

/// A checked-out connection; returned to its pool when dropped.
pub struct TenantConn {
    conn: Option<PgConnection>,
    permit: Option<OwnedSemaphorePermit>,
    _slot: OwnedSemaphorePermit,
    pool: Arc<TenantPool>,
    broken: bool,
}

impl TenantConn {
    /// Do not reuse this connection (e.g. after an I/O error); it closes on drop.
    pub fn mark_broken(&mut self) {
        self.broken = true;
    }

    pub fn tenant(&self) -> Uuid {
        self.pool.tenant
    }
}

impl Deref for TenantConn {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.conn.as_ref().expect("connection present until drop")
    }
}

impl DerefMut for TenantConn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn.as_mut().expect("connection present until drop")
    }
}

impl Drop for TenantConn {
    fn drop(&mut self) {
        if let (Some(conn), Some(permit)) = (self.conn.take(), self.permit.take()) {
            self.pool.give_back(conn, permit, self.broken);
        }
    }
}
