//! `/admin/v1/tenants/{t}/usage` and `/admin/v1/usage`: what tenants use,
//! as the usage collector measured it and the routers counted it. Reads,
//! so a viewer key may call them.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::api::error::{ApiError, ApiResult, Json, Path, Query};
use crate::api::responses::{AdminErrors, QueryErrors};
use crate::api::AppState;
use crate::registry::{CurrentUsage, DailyUsage, TenantUsageRow, UsageSort};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(tenant_usage))
        .routes(routes!(top_usage))
}

/// Longest daily series one request returns.
const MAX_DAYS: u32 = 3650;
const DEFAULT_DAYS: u32 = 30;
/// Most tenants one top list returns.
const MAX_TOP: i64 = 1000;
const DEFAULT_TOP: i64 = 20;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UsageParams {
    /// Days of daily rollups, today (UTC) included: 1..=3650, default 30.
    days: Option<i64>,
}

/// A tenant's usage: current values, its quota, and one row per UTC day
/// (newest first; days without a row had no measurement).
#[derive(Debug, Serialize, ToSchema)]
pub struct TenantUsage {
    tenant_id: Uuid,
    slug: String,
    plan: String,
    /// Its plan's storage quota in bytes (`null`: none).
    storage_quota_bytes: Option<i64>,
    /// Since when it is over its quota, and read-only (`null`: it is not).
    over_quota_at: Option<chrono::DateTime<chrono::Utc>>,
    /// `null` until the first measurement or request.
    current: Option<CurrentUsage>,
    daily: Vec<DailyUsage>,
}

/// One tenant's usage: current values and the daily series.
#[utoipa::path(get, path = "/tenants/{tenant}/usage", tag = "usage",
    params(("tenant" = String, Path, description = "slug or id"), UsageParams),
    responses((status = 200, body = TenantUsage), AdminErrors, QueryErrors,
        (status = 404, description = "no such tenant"),
        (status = 422, description = "`days` is out of range")))]
async fn tenant_usage(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    Query(params): Query<UsageParams>,
) -> ApiResult<Json<TenantUsage>> {
    let days = match params.days {
        None => DEFAULT_DAYS,
        Some(d) if (1..=MAX_DAYS as i64).contains(&d) => d as u32,
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "`days` must be between 1 and {MAX_DAYS}"
            )))
        }
    };
    let t = super::tenants::resolve(&state, &tenant).await?;
    let reg = state.registry();
    let current = reg.current_usage(t.id).await?;
    let daily = reg.daily_usage(t.id, days).await?;
    Ok(Json(TenantUsage {
        tenant_id: t.id,
        slug: t.slug,
        plan: t.plan.to_string(),
        storage_quota_bytes: t.limits.storage_quota_bytes,
        over_quota_at: t.over_quota_at,
        current,
        daily,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TopParams {
    /// `size` (largest database first, the default) or `requests` (most
    /// app requests today, UTC).
    sort: Option<String>,
    /// 1..=1000, default 20.
    limit: Option<i64>,
}

/// The top tenants.
#[derive(Debug, Serialize, ToSchema)]
pub struct TopUsage {
    sort: String,
    items: Vec<TenantUsageRow>,
}

/// The tenants using the most: by database size or by today's requests.
#[utoipa::path(get, path = "/usage", tag = "usage", params(TopParams),
    responses((status = 200, body = TopUsage), AdminErrors, QueryErrors,
        (status = 422, description = "`sort` is neither `size` nor `requests`, or `limit` is out of range")))]
async fn top_usage(
    State(state): State<AppState>,
    Query(params): Query<TopParams>,
) -> ApiResult<Json<TopUsage>> {
    let sort = match params.sort.as_deref() {
        None | Some("size") => UsageSort::Size,
        Some("requests") => UsageSort::Requests,
        Some(_) => return Err(ApiError::invalid("`sort` must be `size` or `requests`")),
    };
    let limit = match params.limit {
        None => DEFAULT_TOP,
        Some(l) if (1..=MAX_TOP).contains(&l) => l,
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "`limit` must be between 1 and {MAX_TOP}"
            )))
        }
    };
    let items = state.registry().top_usage(sort, limit).await?;
    Ok(Json(TopUsage {
        sort: match sort {
            UsageSort::Size => "size",
            UsageSort::Requests => "requests",
        }
        .to_owned(),
        items,
    }))
}
