//! The front door's server connections of one tenant: reused across its
//! clients, drawn from the same per-server budget as the router's pools
//! (a permit per connection until its backend is gone), and given up to
//! the budget, least recently used first, when anyone else needs one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::backend::{ConnectError, ServerConn, Target};
use crate::config::Secret;
use crate::router::pool::{now_nanos, IdleOwner};
use crate::router::{AcquireError, PoolKey, ServerBudget};

/// Why no server connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error(transparent)]
    Budget(#[from] AcquireError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

struct Idle {
    conn: Box<ServerConn>,
    since: u64,
}

/// One tenant's server connections (for one server, database, role and password).
pub struct WirePool {
    pub key: PoolKey,
    budget: Arc<ServerBudget>,
    target: Target,
    role: String,
    password: Secret,
    database: String,
    /// At most this many connections of the tenant at once.
    slots: Arc<Semaphore>,
    cap: usize,
    /// Largest message read from the server.
    max_message: usize,
    /// Prepared statements one connection keeps.
    max_statements: usize,
    /// The server's parameters at login, from the first connection made.
    initial: Mutex<Option<std::collections::HashMap<String, String>>>,
    idle: Mutex<Vec<Idle>>,
    closed: AtomicBool,
    /// Its shared connections (see `wire::mux`).
    pub(super) lines: super::mux::Lines,
}

impl WirePool {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: PoolKey,
        budget: Arc<ServerBudget>,
        target: Target,
        role: String,
        password: Secret,
        database: String,
        cap: usize,
        max_message: usize,
        max_statements: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            key,
            budget,
            target,
            role,
            password,
            database,
            slots: Arc::new(Semaphore::new(cap.max(1))),
            cap: cap.max(1),
            max_message,
            max_statements: max_statements.max(1),
            initial: Mutex::default(),
            idle: Mutex::default(),
            closed: AtomicBool::new(false),
            lines: Default::default(),
        })
    }

    /// At most this many connections of the tenant at once.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Whether a connection may be checked out now without waiting.
    pub fn has_room(&self) -> bool {
        self.slots.available_permits() > 0
    }

    /// Longest a server connection is kept.
    pub fn max_lifetime(&self) -> Duration {
        self.budget.policy().max_lifetime
    }

    /// Connections checked out right now.
    pub fn in_use(&self) -> usize {
        self.cap.saturating_sub(self.slots.available_permits())
    }

    /// The server's parameters at login, once a connection was made.
    pub fn initial_params(&self) -> Option<std::collections::HashMap<String, String>> {
        self.initial.lock().expect("initial lock").clone()
    }

    /// The `tracked` settings a client asking for `wanted` has (its own,
    /// else the server's at login), as one key: clients with the same may
    /// share a connection. `None` until a connection was made.
    pub fn settings_key(&self, wanted: &[(String, String)], tracked: &[&str]) -> Option<u64> {
        use std::hash::{Hash, Hasher};
        let initial = self.initial.lock().expect("initial lock");
        let initial = initial.as_ref()?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for k in tracked {
            let value = wanted
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v)
                .or_else(|| initial.get(*k));
            value.hash(&mut h);
        }
        Some(h.finish())
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Connections idle right now.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().expect("idle lock").len()
    }

    /// A server connection by `deadline`: an idle one still alive, else a
    /// new one under the budget.
    pub async fn acquire(self: &Arc<Self>, deadline: Instant) -> Result<Checkout, CheckoutError> {
        let until = tokio::time::Instant::from_std(deadline);
        let slot = tokio::time::timeout_at(until, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| AcquireError::TenantSaturated)?
            .map_err(|_| AcquireError::Closed)?;
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(AcquireError::Closed.into());
            }
            let Some(Idle { mut conn, since }) = self.pop_idle() else {
                break;
            };
            // A terminated backend has sent its error and closed: seen
            // without a round trip.
            let _ = since;
            if conn.born.elapsed() >= self.budget.policy().max_lifetime || !conn.idle_ok() {
                tokio::spawn(conn.close());
                continue;
            }
            return Ok(self.checkout(conn, slot));
        }
        let conn = loop {
            let claim = self.budget.claim(deadline).await?;
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(500));
            match ServerConn::connect(
                claim,
                &self.target,
                &self.role,
                self.password.expose(),
                &self.database,
                self.max_message,
                left,
            )
            .await
            {
                Ok(mut c) => {
                    c.statement_cap = self.max_statements;
                    break Box::new(c);
                }
                // The role's CONNECTION LIMIT, shared with the router and
                // other replicas: busy, not down; try again until the deadline.
                Err(ConnectError::Refused(code, m))
                    if code == "53300" && m.contains("for role") && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        metrics::counter!("silo_wire_server_connects_total").increment(1);
        self.initial
            .lock()
            .expect("initial lock")
            .get_or_insert_with(|| conn.initial.clone());
        Ok(self.checkout(conn, slot))
    }

    fn checkout(self: &Arc<Self>, conn: Box<ServerConn>, slot: OwnedSemaphorePermit) -> Checkout {
        Checkout {
            conn: Some(conn),
            _slot: slot,
            pool: self.clone(),
            _counted: super::spin::CheckedOut::new(),
        }
    }

    fn pop_idle(&self) -> Option<Idle> {
        let idle = self.idle.lock().expect("idle lock").pop()?;
        self.budget.idle_remove(idle.since, idle.conn.id);
        Some(idle)
    }

    fn give_back(self: &Arc<Self>, conn: Box<ServerConn>) {
        if self.closed.load(Ordering::Acquire)
            || conn.born.elapsed() >= self.budget.policy().max_lifetime
        {
            tokio::spawn(conn.close());
            return;
        }
        let since = now_nanos();
        let id = conn.id;
        self.idle
            .lock()
            .expect("idle lock")
            .push(Idle { conn, since });
        self.budget
            .idle_insert(since, id, Arc::downgrade(self) as Weak<dyn IdleOwner>);
        self.budget.keep_reserve();
    }

    /// Close connections idle longer than `max_idle`; returns how many are left open idle.
    pub fn reap(&self, max_idle: Duration) -> usize {
        let cutoff = now_nanos().saturating_sub(max_idle.as_nanos() as u64);
        let stale: Vec<Idle> = {
            let mut idle = self.idle.lock().expect("idle lock");
            let (stale, kept) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|i| i.since <= cutoff);
            *idle = kept;
            stale
        };
        for i in stale {
            self.budget.idle_remove(i.since, i.conn.id);
            tokio::spawn(i.conn.close());
        }
        self.idle_count()
    }

    /// Stop handing out connections: idle ones close now, in-use ones when returned.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.reap(Duration::ZERO);
    }
}

impl IdleOwner for WirePool {
    fn waiters(&self) -> usize {
        0
    }

    fn reclaim(&self, id: u64) {
        let taken = {
            let mut idle = self.idle.lock().expect("idle lock");
            idle.iter()
                .position(|i| i.conn.id == id)
                .map(|at| idle.remove(at))
        };
        if let Some(i) = taken {
            tokio::spawn(i.conn.close());
        }
    }
}

/// A server connection checked out by one client; closed when dropped
/// unless [`Checkout::release`]d (its state unknown).
pub struct Checkout {
    /// Boxed: a session holds its checkout inline, and 10,000 idle
    /// sessions should not each keep room for a connection they lack.
    conn: Option<Box<ServerConn>>,
    _slot: OwnedSemaphorePermit,
    pool: Arc<WirePool>,
    _counted: super::spin::CheckedOut,
}

impl Checkout {
    pub fn conn(&mut self) -> &mut ServerConn {
        self.conn.as_mut().expect("present until released")
    }

    /// Back to the pool for other clients (it is idle, its session reset).
    pub fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.give_back(conn);
        }
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(conn.close());
            }
        }
    }
}
