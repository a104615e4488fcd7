//! `/api/v1/settings`: what the app may read about its own tenant to gate
//! features: its plan, the plan's clinic limits, whether it is read-only
//! (over its storage quota), and the settings object an operator set
//! (`PATCH /admin/v1/tenants/{t}`). Answered from the router's lookup,
//! without touching the tenant's database.

use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{AppTenant, TenantHeader};
use crate::api::error::{ApiResult, Json};
use crate::api::responses::AppErrors;
use crate::api::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_settings))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TenantSettings {
    /// The tenant's plan.
    plan: String,
    /// Staff members its plan allows (none: no limit).
    max_staff: Option<i32>,
    /// Patients its plan allows (none: no limit).
    max_patients: Option<i32>,
    /// Over its plan's storage quota: reads work, writes are refused.
    read_only: bool,
    /// The settings object its operator set.
    #[schema(value_type = Object)]
    settings: serde_json::Value,
}

/// The tenant's plan, limits and settings.
#[utoipa::path(get, path = "/settings", tag = "settings", params(TenantHeader),
    responses((status = 200, body = TenantSettings), AppErrors))]
async fn get_settings(AppTenant(t): AppTenant) -> ApiResult<Json<TenantSettings>> {
    Ok(Json(TenantSettings {
        plan: t.plan.to_string(),
        max_staff: t.limits.max_staff,
        max_patients: t.limits.max_patients,
        read_only: t.read_only,
        settings: t.settings.as_ref().clone(),
    }))
}
