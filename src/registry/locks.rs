//! Advisory locks: serialize work on one tenant (or one server's
//! maintenance) across tasks, processes and replicas. A lock lives on a
//! dedicated control connection; if the process dies, PostgreSQL releases it
//! with the session, which is how the reconciler tells a crashed operation
//! from a running one.
//!
//! A lock is released on every path by construction: [`Registry::with_tenant_lock`]
//! and [`Registry::with_server_lock`] hold one for the length of a closure,
//! and a [`Lock`] dropped without [`Lock::release`] (an early return, a
//! panic, a cancelled request) closes its connection, which releases it. A
//! wait has a deadline ([`super::LOCK_WAIT`]) and runs in a task of its own
//! that owns the connection, so a caller cancelled mid-wait can never leave
//! a pooled connection holding the lock once it is granted.

use std::future::Future;

use sha2::Digest;
use sqlx::pool::PoolConnection;
use sqlx::Postgres;
use uuid::Uuid;

use super::{Registry, Result};

/// A held advisory lock. Call [`Lock::release`]; if dropped instead, the
/// connection is closed, which releases the lock too.
pub struct Lock {
    conn: Option<PoolConnection<Postgres>>,
    key: i64,
}

impl std::fmt::Debug for Lock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lock").field("key", &self.key).finish()
    }
}

/// Namespaces so tenant and server locks never collide.
const TENANT_NS: i64 = 0x7e11;
const SERVER_NS: i64 = 0x5e4e;
const OPERATION_NS: i64 = 0x0b5e;
const BACKUP_NS: i64 = 0xbac0;
const CLUSTER_NS: i64 = 0xc105;
/// The usage collector's one key (no id: one collector per control plane).
const USAGE_KEY: i64 = 0x05a6_e000_c011_ec70;

fn key_of(ns: i64, id: Uuid) -> i64 {
    let (hi, lo) = id.as_u64_pair();
    (hi ^ lo ^ (ns as u64).rotate_left(48)) as i64
}

impl Registry {
    /// Wait for the lock on `tenant` (at most [`super::LOCK_WAIT`]).
    pub async fn lock_tenant(&self, tenant: Uuid) -> Result<Lock> {
        self.lock(key_of(TENANT_NS, tenant)).await
    }

    /// Take the lock on `tenant` if free; `None` if someone holds it.
    pub async fn try_lock_tenant(&self, tenant: Uuid) -> Result<Option<Lock>> {
        self.try_lock(key_of(TENANT_NS, tenant)).await
    }

    /// Run `work` holding the lock on `tenant`; the lock is released however
    /// `work` ends.
    pub async fn with_tenant_lock<T, E, Fut>(
        &self,
        tenant: Uuid,
        work: impl FnOnce() -> Fut,
    ) -> Result<T, E>
    where
        Fut: Future<Output = Result<T, E>>,
        E: From<super::Error>,
    {
        let mut lock = self.lock_tenant(tenant).await?;
        let out = lock.hold(work()).await;
        lock.release().await;
        out?
    }

    /// Run `work` holding the maintenance lock of `server`.
    pub async fn with_server_lock<T, E, Fut>(
        &self,
        server: Uuid,
        work: impl FnOnce() -> Fut,
    ) -> Result<T, E>
    where
        Fut: Future<Output = Result<T, E>>,
        E: From<super::Error>,
    {
        let mut lock = self.lock_server(server).await?;
        let out = lock.hold(work()).await;
        lock.release().await;
        out?
    }

    /// Run `work` holding the registration lock of the PostgreSQL cluster
    /// with this identity (`pg_control_system()`'s system identifier and its
    /// port): registrations of one cluster, under any name or host alias,
    /// run one at a time.
    pub async fn with_cluster_lock<T, E, Fut>(
        &self,
        system_identifier: &str,
        port: i32,
        work: impl FnOnce() -> Fut,
    ) -> Result<T, E>
    where
        Fut: Future<Output = Result<T, E>>,
        E: From<super::Error>,
    {
        let digest = sha2::Sha256::digest(format!("{system_identifier}:{port}"));
        let id = Uuid::from_slice(&digest[..16]).expect("16 bytes");
        let mut lock = self.lock(key_of(CLUSTER_NS, id)).await?;
        let out = lock.hold(work()).await;
        lock.release().await;
        out?
    }

    /// Take the maintenance lock of a server (template, warm pool, orphan sweep).
    pub async fn try_lock_server(&self, server: Uuid) -> Result<Option<Lock>> {
        self.try_lock(key_of(SERVER_NS, server)).await
    }

    /// Wait for the maintenance lock of a server.
    pub async fn lock_server(&self, server: Uuid) -> Result<Lock> {
        self.lock(key_of(SERVER_NS, server)).await
    }

    /// The lease of a long-running operation: held while it runs; free means
    /// its runner died and whoever takes it resumes the operation.
    pub async fn try_lock_operation(&self, op: Uuid) -> Result<Option<Lock>> {
        self.try_lock(key_of(OPERATION_NS, op)).await
    }

    /// The liveness lock of a running backup (or scratch restore): held by its
    /// runner; free means the runner died and the sweep may clean up after it.
    pub async fn try_lock_backup(&self, id: Uuid) -> Result<Option<Lock>> {
        self.try_lock(key_of(BACKUP_NS, id)).await
    }

    /// The usage collector's lock: held while a pass runs, so passes of
    /// several replicas never overlap (and never count twice).
    pub async fn try_lock_usage(&self) -> Result<Option<Lock>> {
        self.try_lock(USAGE_KEY).await
    }

    async fn lock(&self, key: i64) -> Result<Lock> {
        let locks = self.locks.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        // The wait runs in a task that owns the connection: if the caller
        // goes away mid-wait, the task still sees the answer, and a granted
        // lock goes back (`release`) instead of staying on a pooled connection.
        tokio::spawn(async move {
            let granted = async {
                let mut conn = locks.acquire().await?;
                sqlx::query("SELECT pg_advisory_lock($1)")
                    .bind(key)
                    .execute(&mut *conn)
                    .await?;
                Ok(Lock {
                    conn: Some(conn),
                    key,
                })
            }
            .await;
            if let Err(Ok(lock)) = tx.send(granted) {
                lock.release().await;
            }
        });
        match rx.await {
            Ok(granted) => granted,
            Err(_) => Err(sqlx::Error::WorkerCrashed.into()),
        }
    }

    async fn try_lock(&self, key: i64) -> Result<Option<Lock>> {
        let mut conn = self.locks.acquire().await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut *conn)
            .await?;
        Ok(got.then_some(Lock {
            conn: Some(conn),
            key,
        }))
    }
}

/// How often a held lock's session is checked while work runs under it.
const HOLD_CHECK: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a check may wait for its answer.
const HOLD_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Lock {
    /// Run `work` while holding this lock. If the lock's session ends under
    /// it (the control database restarted or failed over, the session was
    /// terminated), PostgreSQL has let the lock go and another holder may
    /// take it: `work` is dropped at its next await, as if its process had
    /// died, and an error is returned. Whoever takes the lock next settles
    /// what it left, as after a crash (everything under a lock is written
    /// to be crash-safe). Two holders can overlap only for about one check
    /// (a second; ten more if the session went silent), plus whatever
    /// statement the dropped work had already sent to a tenant server.
    ///
    /// `work` is boxed here: the futures of nested locked sections would
    /// otherwise each carry the next one inline (a debug build's worker
    /// stack overflowed).
    pub fn hold<'a, F>(
        &'a mut self,
        work: F,
    ) -> impl std::future::Future<Output = Result<F::Output>> + 'a
    where
        F: std::future::Future + 'a,
    {
        let work = Box::pin(work);
        self.hold_boxed(work)
    }

    async fn hold_boxed<F: std::future::Future>(
        &mut self,
        work: std::pin::Pin<Box<F>>,
    ) -> Result<F::Output> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(work.await);
        };
        let lost = async {
            loop {
                tokio::time::sleep(HOLD_CHECK).await;
                // A session left half-open by a failover answers nothing,
                // ever: no answer within the timeout is a lost lock too.
                let ping = sqlx::Connection::ping(&mut **conn);
                match tokio::time::timeout(HOLD_CHECK_TIMEOUT, ping).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return e.to_string(),
                    Err(_) => return format!("no answer within {HOLD_CHECK_TIMEOUT:?}"),
                }
            }
        };
        tokio::select! {
            out = work => Ok(out),
            e = lost => {
                tracing::warn!(key = self.key, "lost a lock (its control database session ended: {e}): the work under it stops, as if its process had died");
                metrics::counter!("silo_locks_lost_total").increment(1);
                Err(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    format!("the session holding a lock ended, so the work under it stopped: {e}"),
                ))
                .into())
            }
        }
    }

    /// Release the lock and return its connection to the pool. A connection
    /// that cannot prove it let go is closed instead (which releases it).
    pub async fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            let unlocked: std::result::Result<bool, _> =
                sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
                    .bind(self.key)
                    .fetch_one(&mut *conn)
                    .await;
            if !matches!(unlocked, Ok(true)) {
                drop(conn.detach());
            }
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Not released explicitly (an early return, a panic, a cancelled
            // request): close the session so the lock cannot outlive this holder.
            drop(conn.detach());
        }
    }
}
