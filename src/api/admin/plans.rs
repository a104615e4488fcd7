//! `/admin/v1/plans`: plans as data. Reading them takes a viewer; making,
//! changing and deleting them an admin (a change applies to every tenant
//! of the plan at once).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Extension;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::auth::Actor;
use crate::api::error::{ApiError, ApiResult, Json, Path};
use crate::api::nullable;
use crate::api::responses::{AdminErrors, JsonBody};
use crate::api::AppState;
use crate::domain::Plan;
use crate::registry::{PlanFields, PlanRecord};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_plan, list_plans))
        .routes(routes!(get_plan, update_plan, delete_plan))
}

/// A plan's limits. On `PATCH`, a field left out is kept and `null` clears
/// it (back to silo's setting, or no limit); on `POST`, `connection_limit`
/// is required.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanBody {
    /// Only on `POST`: `^[a-z][a-z0-9_-]{0,39}$`.
    name: Option<String>,
    /// The tenant role's `CONNECTION LIMIT` (1–10000), shared by the routers.
    connection_limit: Option<i32>,
    /// Database size in bytes (at least 1 MiB) past which a tenant becomes
    /// read-only until it is under it again or its plan grows.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<i64>)]
    storage_quota_bytes: Option<Option<i64>>,
    /// App API requests per second per tenant (else `SILO_APP_RATE_LIMIT`).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<i32>)]
    requests_per_second: Option<Option<i32>>,
    /// Client connections at once on the PostgreSQL front door (else
    /// `SILO_PG_MAX_CLIENTS_PER_TENANT`).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<i32>)]
    wire_clients: Option<Option<i32>>,
    /// Staff members the clinic API lets a tenant have.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<i32>)]
    max_staff: Option<Option<i32>>,
    /// Patients the clinic API lets a tenant have.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<i32>)]
    max_patients: Option<Option<i32>>,
    /// A tenant put on this plan expires (is suspended) this many days later.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<i32>)]
    trial_days: Option<Option<i32>>,
    /// Backup schedule of its tenants without their own (cron, UTC).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    backup_schedule: Option<Option<String>>,
    /// Backups kept (else `SILO_BACKUP_KEEP_*`).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<i32>)]
    backup_keep_last: Option<Option<i32>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<i32>)]
    backup_keep_daily: Option<Option<i32>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<i32>)]
    backup_keep_weekly: Option<Option<i32>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<i32>)]
    backup_keep_monthly: Option<Option<i32>>,
}

impl PlanBody {
    fn fields(self) -> PlanFields {
        PlanFields {
            connection_limit: self.connection_limit,
            storage_quota_bytes: self.storage_quota_bytes,
            requests_per_second: self.requests_per_second,
            wire_clients: self.wire_clients,
            max_staff: self.max_staff,
            max_patients: self.max_patients,
            trial_days: self.trial_days,
            backup_schedule: self.backup_schedule,
            backup_keep_last: self.backup_keep_last,
            backup_keep_daily: self.backup_keep_daily,
            backup_keep_weekly: self.backup_keep_weekly,
            backup_keep_monthly: self.backup_keep_monthly,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PlanList {
    items: Vec<PlanRecord>,
}

/// A plan named in a path: one that cannot be a plan's name is not found.
fn plan_name(name: &str) -> Result<Plan, ApiError> {
    Plan::parse(name).map_err(|_| ApiError::not_found("plan"))
}

/// Add a plan.
#[utoipa::path(post, path = "/plans", tag = "plans", request_body = PlanBody,
    responses((status = 201, body = PlanRecord), AdminErrors, JsonBody,
        (status = 409, description = "a plan has this name")))]
async fn create_plan(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Json(mut body): Json<PlanBody>,
) -> ApiResult<(StatusCode, Json<PlanRecord>)> {
    let name = body
        .name
        .take()
        .ok_or_else(|| ApiError::invalid("name is required"))?;
    let name = Plan::parse(&name)?;
    let plan = state
        .control
        .provisioner()
        .create_plan(&name, &body.fields(), actor.name())
        .await?;
    Ok((StatusCode::CREATED, Json(plan)))
}

/// Every plan with its limits and how many tenants are on it.
#[utoipa::path(get, path = "/plans", tag = "plans",
    responses((status = 200, body = PlanList), AdminErrors))]
async fn list_plans(State(state): State<AppState>) -> ApiResult<Json<PlanList>> {
    Ok(Json(PlanList {
        items: state.registry().plans().await?,
    }))
}

/// One plan.
#[utoipa::path(get, path = "/plans/{plan}", tag = "plans",
    params(("plan" = String, Path, description = "the plan's name")),
    responses((status = 200, body = PlanRecord), AdminErrors,
        (status = 404, description = "no such plan")))]
async fn get_plan(
    State(state): State<AppState>,
    Path(plan): Path<String>,
) -> ApiResult<Json<PlanRecord>> {
    let name = plan_name(&plan)?;
    let plan = state
        .registry()
        .plan(&name)
        .await?
        .ok_or_else(|| ApiError::not_found("plan"))?;
    Ok(Json(plan))
}

/// Change a plan's limits. It applies to every tenant of the plan at once:
/// their roles' connection limit before this answers, routers, rates and
/// quotas at their next request or collector pass.
#[utoipa::path(patch, path = "/plans/{plan}", tag = "plans", request_body = PlanBody,
    params(("plan" = String, Path, description = "the plan's name")),
    responses((status = 200, body = PlanRecord), AdminErrors, JsonBody,
        (status = 404, description = "no such plan")))]
async fn update_plan(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(plan): Path<String>,
    Json(body): Json<PlanBody>,
) -> ApiResult<Json<PlanRecord>> {
    let name = plan_name(&plan)?;
    if body.name.as_deref().is_some_and(|n| n != name.as_str()) {
        return Err(ApiError::invalid("a plan cannot be renamed"));
    }
    let plan = state
        .control
        .provisioner()
        .update_plan(&name, &body.fields(), actor.name())
        .await?;
    Ok(Json(plan))
}

/// Delete a plan no tenant is on.
#[utoipa::path(delete, path = "/plans/{plan}", tag = "plans",
    params(("plan" = String, Path, description = "the plan's name")),
    responses((status = 204, description = "deleted"), AdminErrors,
        (status = 404, description = "no such plan"),
        (status = 409, description = "tenants are on it")))]
async fn delete_plan(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(plan): Path<String>,
) -> ApiResult<StatusCode> {
    let name = plan_name(&plan)?;
    state
        .control
        .provisioner()
        .delete_plan(&name, actor.name())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
