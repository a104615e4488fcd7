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
use crate::domain::is_actor_shaped;
use crate::registry::{AuditEntry, AuditFilter, Operation};

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
    /// Only what this admin key did (its name; `admin` is the bootstrap
    /// token, `cli` and `scheduler` silo's own commands and jobs).
    key: Option<String>,
    /// Only this action, such as `tenant.suspend` or `key.create`.
    action: Option<String>,
    /// 1..=500, default 100.
    limit: Option<i64>,
}

/// Longest action name a filter may give (every action is shorter).
const MAX_ACTION: usize = 64;

/// Admin actions, newest first, each naming who acted (`actor`).
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
    if p.key.as_deref().is_some_and(|k| !is_actor_shaped(k)) {
        return Err(ApiError::invalid(
            "key must be an admin key's name: 1 to 63 characters of a-z, 0-9, '_' and '-', \
             starting with a letter",
        ));
    }
    let action_shaped = |a: &str| {
        (1..=MAX_ACTION).contains(&a.len())
            && a.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
    };
    if p.action.as_deref().is_some_and(|a| !action_shaped(a)) {
        return Err(ApiError::invalid(format!(
            "action must be 1 to {MAX_ACTION} characters of a-z, 0-9, '_' and '.'"
        )));
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
    let filter = AuditFilter {
        tenant,
        actor: p.key.as_deref(),
        action: p.action.as_deref(),
    };
    Ok(Json(state.registry().audit_entries(&filter, limit).await?))
}
