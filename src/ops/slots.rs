//! Work slots: one limit per process (`SILO_BACKUP_CONCURRENCY`) on the
//! work that streams a whole tenant database: backups (admin API, command
//! line, scheduler, a delete's final backup), verifications, restores,
//! archivals and moves, however each was started.
//!
//! Work takes a [`Slot`] before it touches a database and keeps it to its
//! end. Work that finds every slot taken waits, recorded as `queued` (an
//! operation or a backup row), in first-come order. Nested work reuses the
//! slot of the work around it ([`Slot::scope`]): an archival's own backup and
//! verification run in the archival's slot, so a full set of archivals can
//! never wait on each other.
//!
//! A queued item holds no lock of its own (50 queued backups must not take
//! 50 control connections): it names this process's lease instead, an
//! advisory lock on [`Slots::process`] held for the life of the process on
//! one connection. When the process dies the lease goes with its session,
//! and a sweep settles its queued items as it settles running ones.
//!
//! The limit is per process: each replica has its own.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::registry::{Lock, Registry};

/// How often a queued item checks whether the process is shutting down.
const CLOSE_POLL: Duration = Duration::from_millis(200);

tokio::task_local! {
    /// Set while work holding a slot runs: work nested in it takes no other.
    static HOLDING: ();
}

/// The slots of this process. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Slots {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limit: usize,
    semaphore: Arc<Semaphore>,
    /// Items waiting for a slot in this process.
    waiting: AtomicUsize,
    /// Names this process's lease (see the module comment).
    process: Uuid,
    lease: tokio::sync::Mutex<Option<Lock>>,
    registry: Registry,
    /// The operations' tracker: closed on shutdown, when queued work gives up.
    tasks: TaskTracker,
}

/// A held slot; given back when dropped. A slot taken inside work that
/// already holds one is that slot again (it holds no permit of its own).
#[derive(Debug)]
pub struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    slots: Slots,
}

/// The process is shutting down: queued work does not start.
#[derive(Debug, thiserror::Error)]
#[error(
    "not started: silo shut down before a slot of SILO_BACKUP_CONCURRENCY was free; start it again"
)]
pub struct ShuttingDown;

impl Slots {
    pub(super) fn new(registry: Registry, limit: usize, tasks: TaskTracker) -> Self {
        let limit = limit.max(1);
        Self {
            inner: Arc::new(Inner {
                limit,
                semaphore: Arc::new(Semaphore::new(limit)),
                waiting: AtomicUsize::new(0),
                process: Uuid::now_v7(),
                lease: tokio::sync::Mutex::new(None),
                registry,
                tasks,
            }),
        }
    }

    /// Slots of this process (`SILO_BACKUP_CONCURRENCY`).
    pub fn limit(&self) -> usize {
        self.inner.limit
    }

    /// Slots held now.
    pub fn in_use(&self) -> usize {
        self.inner.limit - self.inner.semaphore.available_permits()
    }

    /// Items waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.inner.waiting.load(Ordering::Relaxed)
    }

    /// `true` inside work that holds a slot.
    pub fn held() -> bool {
        HOLDING.try_with(|_| ()).is_ok()
    }

    /// A slot if one is free now (or this work holds one already).
    pub fn try_acquire(&self) -> Option<Slot> {
        if Self::held() {
            return Some(self.reused());
        }
        let permit = self.inner.semaphore.clone().try_acquire_owned().ok()?;
        Some(self.granted(permit))
    }

    /// Wait for a slot, first come first served; gives up when the process
    /// shuts down (the operations' tracker is closed).
    pub async fn acquire(&self) -> Result<Slot, ShuttingDown> {
        if Self::held() {
            return Ok(self.reused());
        }
        self.inner.waiting.fetch_add(1, Ordering::Relaxed);
        self.record();
        // One acquire future for the whole wait: its place in the queue is kept.
        let acquire = self.inner.semaphore.clone().acquire_owned();
        tokio::pin!(acquire);
        let got = loop {
            tokio::select! {
                permit = &mut acquire => break permit.map_err(|_| ShuttingDown),
                _ = tokio::time::sleep(CLOSE_POLL) => {
                    if self.inner.tasks.is_closed() {
                        break Err(ShuttingDown);
                    }
                }
            }
        };
        self.inner.waiting.fetch_sub(1, Ordering::Relaxed);
        let slot = got.map(|permit| self.granted(permit));
        self.record();
        slot
    }

    /// The id of this process's lease, taken on first use: queued items
    /// name it, so a sweep knows whether the process that queued them lives.
    /// Each call checks the lease is still held (another session cannot take
    /// it) and takes it again if its connection was lost; items queued
    /// meanwhile may have been settled by a sweep, and then do not run.
    pub async fn queue_lease(&self) -> anyhow::Result<Uuid> {
        let mut lease = self.inner.lease.lock().await;
        // A sweep checking whether this process lives holds the lease for a
        // moment: try again a few times before giving up.
        for attempt in 0..10 {
            match self
                .inner
                .registry
                .try_lock_operation(self.inner.process)
                .await?
            {
                Some(lock) => {
                    if lease.is_some() {
                        tracing::warn!("this process's lease for queued work was lost (its control connection closed); taken again");
                    }
                    *lease = Some(lock);
                    return Ok(self.inner.process);
                }
                // Held: by this process's lease, or by a sweep for a moment.
                None if lease.is_some() => return Ok(self.inner.process),
                None => tokio::time::sleep(Duration::from_millis(20 * (attempt + 1))).await,
            }
        }
        anyhow::bail!("take this process's lease for queued work: it is held elsewhere")
    }

    /// This process's lease id (queued items name it).
    pub fn process(&self) -> Uuid {
        self.inner.process
    }

    /// Of these leases, the ones whose process is gone (nobody holds them).
    pub async fn dead_leases(&self, leases: Vec<Uuid>) -> anyhow::Result<HashMap<Uuid, bool>> {
        let mut dead = HashMap::new();
        for lease in leases {
            if dead.contains_key(&lease) {
                continue;
            }
            let free = match self.inner.registry.try_lock_operation(lease).await? {
                Some(lock) => {
                    lock.release().await;
                    true
                }
                None => false,
            };
            dead.insert(lease, free);
        }
        Ok(dead)
    }

    fn reused(&self) -> Slot {
        Slot {
            permit: None,
            slots: self.clone(),
        }
    }

    fn granted(&self, permit: OwnedSemaphorePermit) -> Slot {
        let slot = Slot {
            permit: Some(permit),
            slots: self.clone(),
        };
        self.record();
        slot
    }

    fn record(&self) {
        metrics::gauge!("silo_work_slots_in_use").set(self.in_use() as f64);
        metrics::gauge!("silo_work_queued").set(self.waiting() as f64);
    }
}

impl Slot {
    /// Run `work` holding this slot; work nested in it reuses the slot.
    pub async fn scope<F: Future>(self, work: F) -> F::Output {
        let out = HOLDING.scope((), work).await;
        drop(self);
        out
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            drop(permit);
            self.slots.record();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(limit: usize) -> Slots {
        let registry = Registry::connect_lazy("postgres://nobody@127.0.0.1:1/none").unwrap();
        Slots::new(registry, limit, TaskTracker::new())
    }

    #[tokio::test]
    async fn no_more_than_the_limit_are_held_and_nested_work_reuses_its_slot() {
        let s = slots(2);
        let a = s.try_acquire().expect("first");
        let b = s.try_acquire().expect("second");
        assert!(s.try_acquire().is_none(), "a third over a limit of 2");
        assert_eq!(s.in_use(), 2);
        let inner = s.clone();
        let nested = b
            .scope(async move {
                // Work inside a slot gets it again instead of waiting for another.
                let again = inner.try_acquire().expect("reused");
                let waited = inner.acquire().await.expect("reused");
                (
                    again.permit.is_none(),
                    waited.permit.is_none(),
                    inner.in_use(),
                )
            })
            .await;
        assert_eq!(nested, (true, true, 2));
        assert_eq!(s.in_use(), 1, "the scoped slot is given back");
        drop(a);
        assert_eq!(s.in_use(), 0);
    }

    #[tokio::test]
    async fn waiting_work_is_served_in_order_and_gives_up_on_shutdown() {
        let tasks = TaskTracker::new();
        let registry = Registry::connect_lazy("postgres://nobody@127.0.0.1:1/none").unwrap();
        let s = Slots::new(registry, 1, tasks.clone());
        let held = s.try_acquire().unwrap();
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for i in 0..3 {
            let (s2, order) = (s.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let slot = s2.acquire().await.unwrap();
                order.lock().unwrap().push(i);
                drop(slot);
            }));
            // Queue them in a known order.
            while s.waiting() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        for w in waiters {
            w.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);

        let held = s.try_acquire().unwrap();
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.acquire().await.map(|_| ()) })
        };
        tasks.close();
        assert!(waiter.await.unwrap().is_err(), "gave up on shutdown");
        drop(held);
    }
}
