//! Liveness and readiness (unauthenticated, as probes expect), and
//! Prometheus metrics: on the main listener only with a bearer token
//! (`SILO_METRICS_TOKEN`, or the admin token), since they describe the whole
//! fleet; or without one on a listener of their own (`SILO_METRICS_LISTEN`),
//! meant for a private port.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ApiResult};
use super::AppState;
use crate::registry::TenantStatus;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "health", security(),
    responses((status = 200, description = "alive", body = String, content_type = "text/plain")))]
async fn healthz() -> &'static str {
    "ok"
}

/// The control database is reachable.
#[utoipa::path(get, path = "/readyz", tag = "health", security(), responses(
    (status = 200, description = "ready", body = String, content_type = "text/plain"),
    (status = 503, description = "control database unreachable",
        headers(("Retry-After" = u32, description = "seconds to wait before retrying")))))]
async fn readyz(State(state): State<AppState>) -> ApiResult<&'static str> {
    state
        .registry()
        .ping()
        .await
        .map_err(|_| ApiError::Unavailable("control database unreachable".into()))?;
    Ok("ready")
}

/// Prometheus metrics (bearer: `SILO_METRICS_TOKEN`, the bootstrap admin
/// token, or a live admin key of any role).
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain"),
        (status = 401, description = "no metrics token, admin token or live admin key"),
        (status = 429, description = "too many failed tokens from this address (SILO_ADMIN_AUTH_FAILURES)",
            headers(("Retry-After" = u32, description = "seconds to wait before retrying"))),
        (status = 503, description = "an admin key was presented and the control database, where it is looked up, is unreachable",
            headers(("Retry-After" = u32, description = "seconds to wait before retrying")))))]
async fn metrics(
    State(state): State<AppState>,
    super::auth::Peer(peer): super::auth::Peer,
    headers: axum::http::HeaderMap,
) -> ApiResult<impl IntoResponse> {
    let presented = super::auth::bearer_token(&headers).ok_or(ApiError::Unauthorized)?;
    // Wrong tokens count as at the admin API, this one's own included: an
    // address over its allowance gets no answer on the metrics token
    // either, unless the token signed in lately (as `sign_in` does).
    let hash = crate::crypto::admin_key_hash(presented);
    if !state.limits.recently_good(&hash) {
        state.limits.may_authenticate(peer)?;
    }
    let metrics_token = state
        .metrics_token
        .as_ref()
        .is_some_and(|t| crate::crypto::secret_eq(presented.as_bytes(), t.expose().as_bytes()));
    if metrics_token {
        state.limits.signed_in(peer, hash, true);
    } else {
        // The bootstrap token, or a live admin key of any role.
        super::auth::sign_in(&state, super::auth::Peer(peer), presented).await?;
    }
    Ok(render(state).await)
}

/// The metrics, fresh: gauges read from the registry at scrape time.
pub async fn render(state: AppState) -> impl IntoResponse {
    // Gauges read from the registry at scrape time, so every replica reports the truth.
    if let Ok(counts) = state.registry().count_by_status().await {
        for status in TenantStatus::ALL {
            let n = counts
                .iter()
                .find(|(s, _)| s == status.as_str())
                .map_or(0, |(_, n)| *n);
            metrics::gauge!("silo_tenants", "status" => status.as_str()).set(n as f64);
        }
    }
    state.router.record_metrics();
    if let Ok(servers) = state.registry().servers().await {
        for s in servers {
            let up = s.status != "unhealthy" && s.health_error.is_none();
            metrics::gauge!("silo_server_up", "server" => s.name.clone())
                .set(f64::from(u8::from(up)));
            metrics::gauge!("silo_server_tenants", "server" => s.name.clone())
                .set(s.tenant_count as f64);
            metrics::gauge!("silo_server_max_tenants", "server" => s.name)
                .set(f64::from(s.max_tenants));
        }
    }
    if let Ok(n) = state.registry().spare_count().await {
        metrics::gauge!("silo_warm_pool_spares").set(n as f64);
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
