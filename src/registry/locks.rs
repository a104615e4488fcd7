//! Advisory locks: serialize work on one tenant (or one server's maintenance)
//! across tasks, processes and replicas. A lock lives on a dedicated control
//! connection; if the process dies, PostgreSQL releases it with the session,
//! which is how the reconciler tells a crashed operation from a running one.

use sqlx::pool::PoolConnection;
use sqlx::Postgres;
use uuid::Uuid;

use super::Registry;

/// A held advisory lock. Call [`Lock::release`]; if dropped instead, the
/// connection is closed, which releases the lock too.
pub struct Lock {
    conn: Option<PoolConnection<Postgres>>,
    key: i64,
}

/// Namespaces so tenant and server locks never collide.
const TENANT_NS: i64 = 0x7e11;
const SERVER_NS: i64 = 0x5e4e;
const OPERATION_NS: i64 = 0x0b5e;
const BACKUP_NS: i64 = 0xbac0;

fn key_of(ns: i64, id: Uuid) -> i64 {
    let (hi, lo) = id.as_u64_pair();
    (hi ^ lo ^ (ns as u64).rotate_left(48)) as i64
}

impl Registry {
    /// Wait for the lock on `tenant`.
    pub async fn lock_tenant(&self, tenant: Uuid) -> sqlx::Result<Lock> {
        self.lock(key_of(TENANT_NS, tenant)).await
    }

    /// Take the lock on `tenant` if free; `None` if someone holds it.
    pub async fn try_lock_tenant(&self, tenant: Uuid) -> sqlx::Result<Option<Lock>> {
        self.try_lock(key_of(TENANT_NS, tenant)).await
    }

    /// Take the maintenance lock of a server (template, warm pool, orphan sweep).
    pub async fn try_lock_server(&self, server: Uuid) -> sqlx::Result<Option<Lock>> {
        self.try_lock(key_of(SERVER_NS, server)).await
    }

    /// The lease of a long-running operation: held while it runs; free means
    /// its runner died and whoever takes it resumes the operation.
    pub async fn try_lock_operation(&self, op: Uuid) -> sqlx::Result<Option<Lock>> {
        self.try_lock(key_of(OPERATION_NS, op)).await
    }

    /// The liveness lock of a running backup (or scratch restore): held by its
    /// runner; free means the runner died and the sweep may clean up after it.
    pub async fn try_lock_backup(&self, id: Uuid) -> sqlx::Result<Option<Lock>> {
        self.try_lock(key_of(BACKUP_NS, id)).await
    }

    /// Wait for the maintenance lock of a server.
    pub async fn lock_server(&self, server: Uuid) -> sqlx::Result<Lock> {
        self.lock(key_of(SERVER_NS, server)).await
    }

    async fn lock(&self, key: i64) -> sqlx::Result<Lock> {
        let mut conn = self.locks.acquire().await?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(key)
            .execute(&mut *conn)
            .await?;
        Ok(Lock {
            conn: Some(conn),
            key,
        })
    }

    async fn try_lock(&self, key: i64) -> sqlx::Result<Option<Lock>> {
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

impl Lock {
    /// Release the lock and return its connection to the pool.
    pub async fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(self.key)
                .execute(&mut *conn)
                .await;
            if unlocked.is_err() {
                // Closing the session releases the lock for certain.
                drop(conn.detach());
            }
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Not released explicitly (an early return or a panic): close the
            // session so the lock cannot outlive this holder.
            drop(conn.detach());
        }
    }
}
