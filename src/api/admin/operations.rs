//! `/admin/v1/operations` and `/admin/v1/audit`.

use axum::extract::State;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::api::error::{ApiError, ApiResult, Json, Path, Query};
use crate::api::responses::{AdminErrors, QueryErrors};
use crate::api::AppState;
use crate::registry::{AuditEntry, Operation};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_operation))
        .routes(routes!(list_audit))
}

/// State of a long-running operation.
#[utoipa::path(get, path = "/operations/{id}", tag = "operations",
    params(("id" = String, Path)),
    responses((status = 200, body = Operation), AdminErrors, (status = 404, description = "no such operation")))]
async fn get_operation(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Operation>> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::not_found("operation"))?;
    state
        .registry()
        .operation(id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("operation"))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    /// Tenant slug or id.
    tenant: Option<String>,
    /// 1..=500, default 100.
    limit: Option<i64>,
}

/// Admin actions, newest first.
#[utoipa::path(get, path = "/audit", tag = "audit", params(AuditParams),
    responses((status = 200, body = Vec<AuditEntry>), AdminErrors, QueryErrors,
        (status = 404, description = "`tenant` names no tenant")))]
async fn list_audit(
    State(state): State<AppState>,
    Query(p): Query<AuditParams>,
) -> ApiResult<Json<Vec<AuditEntry>>> {
    let limit = p.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid("limit must be between 1 and 500"));
    }
    let tenant = match p.tenant.as_deref() {
        None => None,
        Some(t) => Some(
            state
                .registry()
                .find_tenant(t)
                .await?
                .ok_or_else(|| ApiError::not_found("tenant"))?
                .id,
        ),
    };
    Ok(Json(state.registry().audit_entries(tenant, limit).await?))
}
