//! `/admin/v1/pools`: what the tenant router holds right now, per server
//! alongside the server's registry figures.

use axum::extract::State;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::error::Json;
use crate::api::responses::AdminAuth;
use crate::api::AppState;
use crate::registry::DbServer;
use crate::router::{RouterStats, ServerStats};
use crate::wire::WireStats;

/// The router's pools, and the PostgreSQL front door's.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct PoolsView {
    #[serde(flatten)]
    pub router: RouterStats,
    /// The front door's clients and server connections (absent when it is off).
    pub wire: Option<WireStats>,
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_pools))
}

/// Open pools, connections per server against its budget, each server's
/// status and tenant count, cache hits and misses; the front door's
/// clients, waits, transactions and errors per tenant.
#[utoipa::path(get, path = "/pools", tag = "pools", responses((status = 200, body = PoolsView), AdminAuth))]
async fn get_pools(State(state): State<AppState>) -> Json<PoolsView> {
    let mut stats = state.router.stats();
    // The router's figures stay useful with the control DB down.
    match state.registry().servers().await {
        Ok(servers) => with_servers(&mut stats, servers),
        Err(e) => tracing::warn!("failed to read tenant servers for /pools: {e}"),
    }
    Json(PoolsView {
        router: stats,
        wire: state.wire.as_ref().map(|w| w.stats()),
    })
}

/// Every registered server, in registration order, with the router's figures
/// (0 where it holds no budget yet); then any the registry no longer lists.
fn with_servers(stats: &mut RouterStats, servers: Vec<DbServer>) {
    let mut held = std::mem::take(&mut stats.servers);
    for s in servers {
        let (budget, open, closing, local_socket) =
            match held.iter().position(|h| h.server_id == s.id) {
                Some(i) => {
                    let h = held.swap_remove(i);
                    (h.budget, h.open, h.closing, h.local_socket)
                }
                None => (0, 0, 0, false),
            };
        stats.servers.push(ServerStats {
            server_id: s.id,
            budget,
            open,
            closing,
            local_socket,
            name: Some(s.name),
            status: Some(s.status),
            tenants: Some(s.tenant_count),
            max_tenants: Some(s.max_tenants),
        });
    }
    stats.servers.extend(held);
}
