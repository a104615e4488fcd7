//! Operations: long-running work answered `202` and polled at
//! `GET /operations/{id}`. One runner for every kind ([`Operations::spawn`]),
//! one table of which kinds keep which from starting on the same tenant
//! ([`OperationKind::excluded_by`]), and one error type for the work of every
//! feature ([`Error`]).
//!
//! A running operation holds an advisory lock named by its id (its lease):
//! if its process dies, PostgreSQL releases the lock with the session, and
//! the reconciler knows the operation was interrupted.

mod error;

pub use crate::domain::OperationKind;
pub use error::{Error, Result};

use std::future::Future;

use anyhow::Context;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::registry::{Operation, Registry};

/// Runs operations in the background and remembers them, so shutdown can
/// wait for them. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Operations {
    registry: Registry,
    tasks: TaskTracker,
}

impl Operations {
    pub fn new(registry: Registry) -> Self {
        Self {
            registry,
            tasks: TaskTracker::new(),
        }
    }

    /// Background work started by operations; closed and awaited on shutdown.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// The open operation on `tenant` that keeps one of `kind` from
    /// starting, if any (see [`OperationKind::excluded_by`]).
    pub async fn in_the_way(&self, kind: OperationKind, tenant: Uuid) -> Result<Option<Uuid>> {
        Ok(self
            .registry
            .open_operation_of(tenant, kind.excluded_by())
            .await?)
    }

    /// `Err(Busy)` naming the operation in the way, if one is.
    pub async fn refuse_if_busy(&self, kind: OperationKind, tenant: Uuid) -> Result<()> {
        match self.in_the_way(kind, tenant).await? {
            Some(op) => Err(Error::busy(op)),
            None => Ok(()),
        }
    }

    /// Record an operation, hold its lease, and run `work` in the background;
    /// its result (or error) is stored on the operation, once.
    pub async fn spawn<F, Fut>(
        &self,
        kind: OperationKind,
        tenant: Option<Uuid>,
        params: serde_json::Value,
        work: F,
    ) -> Result<Operation>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<serde_json::Value>> + Send + 'static,
    {
        let id = Uuid::now_v7();
        let lease = self
            .registry
            .try_lock_operation(id)
            .await?
            .context("lock a fresh operation id")?;
        let op = match self
            .registry
            .create_operation_as(id, kind, tenant, params)
            .await
        {
            Ok(op) => op,
            Err(e) => {
                lease.release().await;
                return Err(e.into());
            }
        };
        let registry = self.registry.clone();
        self.tasks.spawn(async move {
            let outcome = work().await.map_err(|e| e.detail());
            if let Err(e) = &outcome {
                tracing::error!(operation_id = %id, %kind, "failed to {kind}: {e}");
            }
            if let Err(e) = registry.finish_operation(id, outcome).await {
                tracing::error!(operation_id = %id, "failed to record the end of an operation: {e:#}");
            }
            lease.release().await;
        });
        Ok(op)
    }
}
