//! Operations: long-running work answered `202` and polled at
//! `GET /operations/{id}`. One runner for every kind ([`Operations::spawn`]),
//! one table of which kinds keep which from starting on the same tenant
//! ([`OperationKind::excluded_by`]), and one error type for the work of every
//! feature ([`Error`]).
//!
//! A running operation holds an advisory lock named by its id (its lease):
//! if its process dies, PostgreSQL releases the lock with the session, and
//! the reconciler knows the operation was interrupted.
//!
//! Operations that stream a tenant database ([`takes_slot`]) run in a work
//! slot ([`slots`]): when none is free they are recorded `queued` and start
//! when one is, in the order they came.

mod error;
pub mod slots;

pub use crate::domain::OperationKind;
pub use error::{Error, Result};
pub use slots::{Slot, Slots};

use std::future::Future;

use anyhow::Context;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::registry::{Operation, Registry};

/// Does an operation of this kind stream a whole tenant database (and so
/// wait for a work slot)? Archivals, moves, restores and verifications do;
/// a delete's final backup takes its slot as a backup.
pub fn takes_slot(kind: OperationKind) -> bool {
    use OperationKind::*;
    match kind {
        TenantArchive | TenantMove | BackupRestore | BackupVerify => true,
        TenantDelete | MigrateTenants | MigrateTenantsDryRun => false,
    }
}

/// Runs operations in the background and remembers them, so shutdown can
/// wait for them. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Operations {
    registry: Registry,
    tasks: TaskTracker,
    slots: Slots,
}

impl Operations {
    /// The runner of this process, with `slots` work slots
    /// (`SILO_BACKUP_CONCURRENCY`).
    pub fn new(registry: Registry, slots: usize) -> Self {
        let tasks = TaskTracker::new();
        Self {
            slots: Slots::new(registry.clone(), slots, tasks.clone()),
            registry,
            tasks,
        }
    }

    /// The work slots of this process.
    pub fn slots(&self) -> &Slots {
        &self.slots
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
    /// its result (or error) is stored on the operation, once. A kind that
    /// [`takes_slot`] runs in a work slot: with none free, it is recorded
    /// `queued` and starts when one is.
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
        let slot = if takes_slot(kind) {
            match self.slots.try_acquire() {
                Some(slot) => Some(slot),
                None => return self.spawn_queued(kind, tenant, params, work).await,
            }
        } else {
            None
        };
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
            let mut lease = lease;
            let run = lease.hold(run_to_end(&registry, id, kind, work));
            let held = match slot {
                Some(slot) => slot.scope(run).await,
                None => run.await,
            };
            stopped_if_lost(id, kind, held);
            lease.release().await;
        });
        Ok(op)
    }

    /// Record an operation `queued`, and start it (lease, `running`, work)
    /// once a slot is free.
    async fn spawn_queued<F, Fut>(
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
        let process = self.slots.queue_lease().await?;
        let op = self
            .registry
            .create_queued_operation(id, kind, tenant, params, process)
            .await?;
        tracing::info!(operation_id = %id, %kind, "queued: every work slot is taken");
        let (registry, slots) = (self.registry.clone(), self.slots.clone());
        self.tasks.spawn(async move {
            let slot = match slots.acquire().await {
                Ok(slot) => slot,
                Err(e) => {
                    if let Err(e) = registry.finish_operation(id, Err(e.to_string())).await {
                        tracing::error!(operation_id = %id, "failed to record the end of an operation: {e:#}");
                    }
                    return;
                }
            };
            // The lease first: the row says `running` only while someone holds it.
            let mut lease = match registry.try_lock_operation(id).await {
                Ok(Some(lease)) => lease,
                outcome => {
                    let why = match outcome {
                        Err(e) => format!("could not start: take its lease: {e:#}"),
                        _ => "could not start: its lease is held elsewhere".to_owned(),
                    };
                    tracing::error!(operation_id = %id, %kind, "failed to start a queued operation: {why}");
                    registry.finish_operation(id, Err(why)).await.ok();
                    return;
                }
            };
            match registry.start_queued_operation(id).await {
                Ok(true) => {
                    let run = lease.hold(run_to_end(&registry, id, kind, work));
                    stopped_if_lost(id, kind, slot.scope(run).await);
                }
                // A sweep settled it meanwhile (this process's lease was lost).
                Ok(false) => {}
                Err(e) => {
                    let why = format!("could not start: {e:#}");
                    tracing::error!(operation_id = %id, %kind, "failed to start a queued operation: {why}");
                    registry.finish_operation(id, Err(why)).await.ok();
                }
            }
            lease.release().await;
        });
        Ok(op)
    }

    /// Queued operations of `kinds` whose process died (its lease is free)
    /// become `running` without a runner, so the sweep of their kind settles
    /// them as it settles any interrupted operation. Returns how many.
    pub async fn release_abandoned_queued(&self, kinds: &[OperationKind]) -> anyhow::Result<u32> {
        let queued = self.registry.queued_operations(kinds).await?;
        let dead = self
            .slots
            .dead_leases(queued.iter().map(|(_, lease)| *lease).collect())
            .await?;
        let mut released = 0;
        for (id, lease) in queued {
            if dead.get(&lease) == Some(&true) && self.registry.start_queued_operation(id).await? {
                tracing::warn!(operation_id = %id, "queued operation of a stopped process: settled as interrupted");
                released += 1;
            }
        }
        Ok(released)
    }
}

/// An operation whose lease was lost mid-run (its control database
/// session ended) stopped there, as if its process had died: its outcome
/// is the sweep's to record, as after a crash.
fn stopped_if_lost(id: Uuid, kind: OperationKind, held: crate::registry::Result<()>) {
    if let Err(e) = held {
        tracing::warn!(operation_id = %id, %kind, "stopped: {e:#}; a sweep settles it as after a crash");
    }
}

/// Run an operation's work and record its outcome, once.
async fn run_to_end<F, Fut>(registry: &Registry, id: Uuid, kind: OperationKind, work: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<serde_json::Value>>,
{
    let outcome = work().await.map_err(|e| e.detail());
    if let Err(e) = &outcome {
        tracing::error!(operation_id = %id, %kind, "failed to {kind}: {e}");
    }
    if let Err(e) = registry.finish_operation(id, outcome).await {
        tracing::error!(operation_id = %id, "failed to record the end of an operation: {e:#}");
    }
}
