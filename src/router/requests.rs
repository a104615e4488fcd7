//! App requests and errors per tenant, counted in memory by this replica
//! and added to the control DB in bulk at each activity flush, so the usage
//! totals hold every replica's traffic. Kept for the next flush if the
//! control DB cannot be reached.
//!
//! Every app request counts here, on whichever core answers it: a request
//! takes the map's read lock (shared, never waits on other requests) and
//! adds to its tenant's atomic counters; only a tenant's first request
//! since the last flush, and the flush itself, take the write lock. Every
//! addition happens under the lock, so a flush, which swaps the whole map
//! out under the write lock, loses none.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::RwLock;

use uuid::Uuid;

/// Requests and errors per tenant since the last flush.
#[derive(Debug, Default)]
pub struct RequestCounts(RwLock<HashMap<Uuid, Counts>>);

#[derive(Debug, Default)]
struct Counts {
    requests: AtomicI64,
    errors: AtomicI64,
}

impl Counts {
    fn add(&self, requests: i64, errors: i64) {
        self.requests.fetch_add(requests, Ordering::Relaxed);
        self.errors.fetch_add(errors, Ordering::Relaxed);
    }
}

impl RequestCounts {
    /// One request of `tenant`; `error`: answered with status 400 or more.
    pub fn count(&self, tenant: Uuid, error: bool) {
        self.add(tenant, 1, i64::from(error));
    }

    fn add(&self, tenant: Uuid, requests: i64, errors: i64) {
        if let Some(c) = self.0.read().expect("request counts").get(&tenant) {
            c.add(requests, errors);
            return;
        }
        self.0
            .write()
            .expect("request counts")
            .entry(tenant)
            .or_default()
            .add(requests, errors);
    }

    /// Everything counted so far, leaving nothing.
    pub fn take(&self) -> Vec<(Uuid, i64, i64)> {
        std::mem::take(&mut *self.0.write().expect("request counts"))
            .into_iter()
            .map(|(id, c)| (id, c.requests.into_inner(), c.errors.into_inner()))
            .collect()
    }

    /// Put back counts a flush could not write.
    pub fn restore(&self, counts: Vec<(Uuid, i64, i64)>) {
        for (id, n, e) in counts {
            self.add(id, n, e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_many_threads_add_up_and_a_take_leaves_nothing() {
        let counts = std::sync::Arc::new(RequestCounts::default());
        let tenants = [Uuid::now_v7(), Uuid::now_v7()];
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let counts = counts.clone();
                std::thread::spawn(move || {
                    for n in 0..1000 {
                        counts.count(tenants[(i + n) % 2], n % 10 == 0);
                    }
                })
            })
            .collect();
        // Flushes while they count: nothing is lost between them.
        let mut taken = Vec::new();
        for _ in 0..50 {
            taken.extend(counts.take());
            std::thread::yield_now();
        }
        for t in threads {
            t.join().unwrap();
        }
        taken.extend(counts.take());
        let (requests, errors) = taken
            .iter()
            .fold((0, 0), |(r, e), (_, n, x)| (r + n, e + x));
        assert_eq!((requests, errors), (4000, 400));
        assert!(counts.take().is_empty());
        counts.restore(vec![(tenants[0], 5, 1)]);
        assert_eq!(counts.take(), vec![(tenants[0], 5, 1)]);
    }
}
