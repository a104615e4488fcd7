//! `/admin/v1/pools`: what the tenant router holds right now.

use axum::extract::State;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::error::Json;
use crate::api::AppState;
use crate::router::RouterStats;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_pools))
}

/// Open pools, connections per server against its budget, cache hits and misses.
#[utoipa::path(get, path = "/pools", tag = "pools", responses((status = 200, body = RouterStats)))]
async fn get_pools(State(state): State<AppState>) -> Json<RouterStats> {
    Json(state.router.stats())
}
