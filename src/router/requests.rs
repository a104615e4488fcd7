//! App requests and errors per tenant, counted in memory by this replica
//! and added to the control DB in bulk at each activity flush, so the usage
//! totals hold every replica's traffic. Kept for the next flush if the
//! control DB cannot be reached.

use std::collections::HashMap;
use std::sync::Mutex;

use uuid::Uuid;

/// Requests and errors per tenant since the last flush.
#[derive(Debug, Default)]
pub struct RequestCounts(Mutex<HashMap<Uuid, (i64, i64)>>);

impl RequestCounts {
    /// One request of `tenant`; `error`: answered with status 400 or more.
    pub fn count(&self, tenant: Uuid, error: bool) {
        let mut counts = self.0.lock().expect("request counts");
        let c = counts.entry(tenant).or_default();
        c.0 += 1;
        c.1 += i64::from(error);
    }

    /// Everything counted so far, leaving nothing.
    pub fn take(&self) -> Vec<(Uuid, i64, i64)> {
        std::mem::take(&mut *self.0.lock().expect("request counts"))
            .into_iter()
            .map(|(id, (n, e))| (id, n, e))
            .collect()
    }

    /// Put back counts a flush could not write.
    pub fn restore(&self, counts: Vec<(Uuid, i64, i64)>) {
        let mut now = self.0.lock().expect("request counts");
        for (id, n, e) in counts {
            let c = now.entry(id).or_default();
            c.0 += n;
            c.1 += e;
        }
    }
}
