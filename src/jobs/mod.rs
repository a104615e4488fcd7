//! Background work of a running silo: the reconciler and the warm pool.
//! Every task watches one `CancellationToken` and lives in one `TaskTracker`,
//! so shutdown cancels them and waits for them to finish their current step.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::provision::Provisioner;

/// How long the warm pool waits for a spare to be taken before checking anyway.
const WARM_POOL_RECHECK: Duration = Duration::from_secs(30);

/// Start the background tasks on `tracker`; they stop when `token` is cancelled.
pub fn spawn(
    provisioner: &Provisioner,
    reconcile_every: Duration,
    token: &CancellationToken,
    tracker: &TaskTracker,
) {
    let (p, t) = (provisioner.clone(), token.clone());
    tracker.spawn(async move {
        loop {
            match p.reconcile_once().await {
                Ok(report) if report != Default::default() => tracing::info!(?report, "reconciled"),
                Ok(_) => {}
                Err(e) => tracing::warn!("failed to reconcile: {e:#}"),
            }
            tokio::select! {
                _ = t.cancelled() => break,
                _ = tokio::time::sleep(reconcile_every) => {}
            }
        }
    });
    let (p, t) = (provisioner.clone(), token.clone());
    tracker.spawn(async move {
        loop {
            if let Err(e) = p.refill_all().await {
                tracing::warn!("failed to refill the warm pool: {e:#}");
            }
            tokio::select! {
                _ = t.cancelled() => break,
                _ = p.spare_taken(WARM_POOL_RECHECK) => {}
            }
        }
    });
}
