//! `/admin/v1/tenants`: onboarding and lifecycle of tenants.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Extension;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::auth::Actor;
use crate::api::error::{ApiError, ApiResult, Json, OptionalJson, Path, Query};
use crate::api::responses::{AdminErrors, JsonBody, OptionalJsonBody, QueryErrors};
use crate::api::AppState;
use crate::domain::{Plan, Schedule, ServerName, Slug, TenantName};
use crate::provision::CreateTenant;
use crate::registry::{Operation, Tenant, TenantPatch, TenantRecord, TenantStatus};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_tenant, list_tenants))
        .routes(routes!(get_tenant, patch_tenant, delete_tenant))
        .routes(routes!(suspend_tenant))
        .routes(routes!(resume_tenant))
        .routes(routes!(mint_token))
        .routes(routes!(revoke_tokens))
        .routes(routes!(rotate_credentials))
        .routes(routes!(move_tenant))
}

/// Longest `Idempotency-Key` accepted.
const MAX_IDEMPOTENCY_KEY: usize = 200;
/// Page size bounds for listing.
const MAX_PAGE: i64 = 500;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenantBody {
    /// `^[a-z][a-z0-9-]{1,38}[a-z0-9]$`
    slug: String,
    name: String,
    /// A plan's name (`GET /admin/v1/plans`); default `standard`.
    plan: Option<String>,
    /// Server to place the tenant on; default: the one with most headroom.
    server: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchTenantBody {
    name: Option<String>,
    /// Another plan: applies at once (connection limit, rates, quotas) and
    /// restarts the trial clock (the new plan's `trial_days`, or no expiry).
    plan: Option<String>,
    /// Cron expression, 5 fields or 6 with seconds first (e.g. `0 0 3 * * *`),
    /// in UTC, firing at least once a week.
    backup_schedule: Option<String>,
    /// When the tenant expires (is suspended); `null` clears it. A tenant
    /// its expiry suspended is resumed when this moves to the future.
    #[serde(default, deserialize_with = "crate::api::nullable")]
    #[schema(value_type = Option<DateTime<Utc>>)]
    expires_at: Option<Option<DateTime<Utc>>>,
    /// Replaces the tenant's settings: a JSON object of at most 16 KiB,
    /// which the app reads at `GET /api/v1/settings`.
    #[schema(value_type = Option<Object>)]
    settings: Option<serde_json::Value>,
}

/// Largest settings object of a tenant, serialized.
pub const MAX_SETTINGS_BYTES: usize = 16 * 1024;

/// Does a key or a string anywhere in `v` hold U+0000?
fn holds_nul(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(holds_nul),
        serde_json::Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    status: Option<String>,
    /// 1..=500, default 50.
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TenantPage {
    items: Vec<Tenant>,
    next_cursor: Option<String>,
}

/// Create a tenant; answers once it is active and ready to serve.
#[utoipa::path(post, path = "/tenants", tag = "tenants",
    request_body = CreateTenantBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "retries with the same key return the same tenant")),
    responses(
        (status = 201, body = Tenant),
        AdminErrors, JsonBody,
        (status = 409, description = "the slug is taken, or the server named is not active or full"),
        (status = 422, description = "a value is invalid, the server named does not exist, or the \
            `Idempotency-Key` is malformed or was used for another request"),
    ))]
async fn create_tenant(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    headers: HeaderMap,
    Json(body): Json<CreateTenantBody>,
) -> ApiResult<(StatusCode, Json<Tenant>)> {
    let key = idempotency_key(&headers)?;
    let req = CreateTenant {
        slug: Slug::parse(&body.slug)?,
        name: TenantName::parse(&body.name)?,
        plan: body
            .plan
            .as_deref()
            .map_or(Ok(Plan::default_plan()), Plan::parse)?,
        server: body.server.as_deref().map(ServerName::parse).transpose()?,
    };
    let tenant = state
        .control
        .provisioner()
        .create(&req, key.as_deref(), actor.name())
        .await?;
    Ok((StatusCode::CREATED, Json(tenant.view())))
}

/// List tenants, oldest first, one page at a time.
#[utoipa::path(get, path = "/tenants", tag = "tenants", params(ListParams),
    responses((status = 200, body = TenantPage), AdminErrors, QueryErrors))]
async fn list_tenants(
    State(state): State<AppState>,
    Query(params): Query<ListParams>,
) -> ApiResult<Json<TenantPage>> {
    let status = params
        .status
        .as_deref()
        .map(|s| {
            TenantStatus::parse(s).ok_or_else(|| ApiError::invalid(format!("unknown status '{s}'")))
        })
        .transpose()?;
    let (limit, after) =
        crate::api::paging::page(params.limit, params.cursor.as_deref(), MAX_PAGE)?;
    let rows = state.registry().list_tenants(status, after, limit).await?;
    let next_cursor = crate::api::paging::next_cursor(&rows, limit, |t| t.id);
    Ok(Json(TenantPage {
        items: rows.iter().map(TenantRecord::view).collect(),
        next_cursor,
    }))
}

/// One tenant by slug or id.
#[utoipa::path(get, path = "/tenants/{tenant}", tag = "tenants",
    params(("tenant" = String, Path, description = "slug or id")),
    responses((status = 200, body = Tenant), AdminErrors, (status = 404, description = "no such tenant")))]
async fn get_tenant(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
) -> ApiResult<Json<Tenant>> {
    Ok(Json(resolve(&state, &tenant).await?.view()))
}

/// Change a tenant's name, plan, backup schedule, expiry or settings.
#[utoipa::path(patch, path = "/tenants/{tenant}", tag = "tenants", request_body = PatchTenantBody,
    params(("tenant" = String, Path, description = "slug or id")),
    responses((status = 200, body = Tenant), AdminErrors, JsonBody,
        (status = 404, description = "no such tenant")))]
async fn patch_tenant(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(tenant): Path<String>,
    Json(body): Json<PatchTenantBody>,
) -> ApiResult<Json<Tenant>> {
    let name = body.name.as_deref().map(TenantName::parse).transpose()?;
    let plan = body.plan.as_deref().map(Plan::parse).transpose()?;
    let schedule = body
        .backup_schedule
        .as_deref()
        .map(Schedule::parse)
        .transpose()
        .map_err(|e| ApiError::invalid(format!("backup_schedule: {e}")))?;
    if let Some(settings) = &body.settings {
        if !settings.is_object() {
            return Err(ApiError::invalid("settings must be a JSON object"));
        }
        if settings.to_string().len() > MAX_SETTINGS_BYTES {
            return Err(ApiError::invalid(format!(
                "settings must be at most {MAX_SETTINGS_BYTES} bytes as JSON"
            )));
        }
        if holds_nul(settings) {
            // PostgreSQL's jsonb cannot store \u0000.
            return Err(ApiError::invalid(
                "settings must not hold the character U+0000 in a key or a string",
            ));
        }
    }
    let t = resolve(&state, &tenant).await?;
    let patch = TenantPatch {
        name: name.as_ref(),
        plan,
        backup_schedule: schedule.as_ref(),
        expires_at: body.expires_at,
        settings: body.settings.as_ref(),
    };
    let t = state
        .control
        .provisioner()
        .patch(t.id, &patch, actor.name())
        .await?;
    Ok(Json(t.view()))
}

/// Suspend a tenant: its role can no longer log in, its sessions end.
#[utoipa::path(post, path = "/tenants/{tenant}/suspend", tag = "tenants",
    params(("tenant" = String, Path, description = "slug or id")),
    responses((status = 200, body = Tenant), AdminErrors, (status = 404, description = "no such tenant"),
        (status = 409, description = "the tenant is neither active nor already suspended")))]
async fn suspend_tenant(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(tenant): Path<String>,
) -> ApiResult<Json<Tenant>> {
    let t = resolve(&state, &tenant).await?;
    let t = state
        .control
        .provisioner()
        .suspend(t.id, actor.name())
        .await?;
    state.router.invalidate(t.id).await;
    Ok(Json(t.view()))
}

/// Resume a suspended tenant.
#[utoipa::path(post, path = "/tenants/{tenant}/resume", tag = "tenants",
    params(("tenant" = String, Path, description = "slug or id")),
    responses((status = 200, body = Tenant), AdminErrors, (status = 404, description = "no such tenant"),
        (status = 409, description = "the tenant is neither suspended nor already active")))]
async fn resume_tenant(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(tenant): Path<String>,
) -> ApiResult<Json<Tenant>> {
    let t = resolve(&state, &tenant).await?;
    let t = state
        .control
        .provisioner()
        .resume(t.id, actor.name())
        .await?;
    state.router.invalidate(t.id).await;
    Ok(Json(t.view()))
}

/// Delete a tenant: its database and role are dropped, the row kept as `deleted`.
#[utoipa::path(delete, path = "/tenants/{tenant}", tag = "tenants",
    params(("tenant" = String, Path, description = "slug or id")),
    responses((status = 202, body = Operation), AdminErrors, (status = 404, description = "no such tenant"),
        (status = 409, description = "the tenant is being created, moved or restored")))]
async fn delete_tenant(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(tenant): Path<String>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    let t = resolve(&state, &tenant).await?;
    let op = state.control.start_delete(t.id, actor.name()).await?;
    state.router.invalidate(t.id).await;
    Ok((StatusCode::ACCEPTED, Json(op)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Lifetime in seconds: 60..=604800, default 3600.
    ttl_seconds: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenResponse {
    token: String,
    expires_at: chrono::DateTime<chrono::Utc>,
}

/// Mint a bearer token for this tenant's app traffic.
#[utoipa::path(post, path = "/tenants/{tenant}/tokens", tag = "tenants", request_body = Option<TokenRequest>,
    params(("tenant" = String, Path, description = "slug or id")),
    responses((status = 201, body = TokenResponse), AdminErrors, OptionalJsonBody,
        (status = 404, description = "no such tenant"),
        (status = 422, description = "the body does not fit, or `ttl_seconds` is out of range")))]
async fn mint_token(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(tenant): Path<String>,
    OptionalJson(body): OptionalJson<TokenRequest>,
) -> ApiResult<(StatusCode, Json<TokenResponse>)> {
    // The body is optional: none means all defaults.
    let req = body.unwrap_or(TokenRequest { ttl_seconds: None });
    let ttl = req
        .ttl_seconds
        .unwrap_or(crate::tokens::DEFAULT_TTL_SECONDS);
    if !(60..=crate::tokens::MAX_TTL_SECONDS).contains(&ttl) {
        return Err(ApiError::invalid(format!(
            "ttl_seconds must be between 60 and {}",
            crate::tokens::MAX_TTL_SECONDS
        )));
    }
    let t = resolve(&state, &tenant).await?;
    let (token, expires_at) =
        crate::tokens::mint(state.control.keyring(), t.id, t.token_generation, ttl);
    state
        .registry()
        .audit(
            actor.name(),
            "tenant.token",
            Some(t.id),
            serde_json::json!({"expires_at": expires_at}),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(TokenResponse { token, expires_at }),
    ))
}

/// Refuse every app token of this tenant minted so far (they get 404, as an
/// unknown tenant would); tokens minted afterwards work.
#[utoipa::path(post, path = "/tenants/{tenant}/tokens/revoke", tag = "tenants",
    params(("tenant" = String, Path, description = "slug or id")),
    responses((status = 200, body = Tenant), AdminErrors, (status = 404, description = "no such tenant")))]
async fn revoke_tokens(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(tenant): Path<String>,
) -> ApiResult<Json<Tenant>> {
    let t = resolve(&state, &tenant).await?;
    let t = state
        .control
        .provisioner()
        .revoke_tokens(t.id, actor.name())
        .await?;
    state.router.invalidate(t.id).await;
    Ok(Json(t.view()))
}

/// Give the tenant's role a new password; pools switch over without failed requests.
#[utoipa::path(post, path = "/tenants/{tenant}/credentials/rotate", tag = "tenants",
    params(("tenant" = String, Path, description = "slug or id")),
    responses((status = 200, body = Tenant), AdminErrors, (status = 404, description = "no such tenant"),
        (status = 409, description = "the tenant is not active or suspended")))]
async fn rotate_credentials(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(tenant): Path<String>,
) -> ApiResult<Json<Tenant>> {
    let t = resolve(&state, &tenant).await?;
    let t = state
        .control
        .provisioner()
        .rotate_credentials(t.id, actor.name())
        .await?;
    state.router.invalidate(t.id).await;
    Ok(Json(t.view()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveTenantBody {
    /// Name of the server to move the tenant to.
    server: String,
}

/// Move a tenant to another server: copied while it serves, writes frozen
/// (503 with `Retry-After`) for the cut-over only.
#[utoipa::path(post, path = "/tenants/{tenant}/move", tag = "tenants", request_body = MoveTenantBody,
    params(("tenant" = String, Path, description = "slug or id")),
    responses((status = 202, body = Operation), AdminErrors, JsonBody,
        (status = 404, description = "no such tenant"),
        (status = 409, description = "the tenant cannot move now (neither active nor suspended, \
            already there, another operation running), or the target server cannot take it"),
        (status = 422, description = "`server` names no registered server")))]
async fn move_tenant(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(tenant): Path<String>,
    Json(body): Json<MoveTenantBody>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    let server = ServerName::parse(&body.server)
        .map_err(|_| ApiError::invalid("server must name a registered server"))?;
    let t = resolve(&state, &tenant).await?;
    let op = state
        .control
        .mover()
        .start_move(t.id, server.as_str(), actor.name())
        .await?;
    Ok((StatusCode::ACCEPTED, Json(op)))
}

/// Find a tenant by slug or id; 404 for anything else.
pub(crate) async fn resolve(state: &AppState, slug_or_id: &str) -> ApiResult<TenantRecord> {
    if slug_or_id.len() > 64 {
        return Err(ApiError::not_found("tenant"));
    }
    let t = state
        .registry()
        .find_tenant(slug_or_id)
        .await?
        .ok_or_else(|| ApiError::not_found("tenant"))?;
    tracing::Span::current().record("tenant_id", tracing::field::display(t.id));
    Ok(t)
}

fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = v
        .to_str()
        .ok()
        .filter(|k| {
            !k.is_empty()
                && k.len() <= MAX_IDEMPOTENCY_KEY
                && k.bytes().all(|b| b.is_ascii_graphic())
        })
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
            ))
        })?;
    Ok(Some(key.to_owned()))
}
