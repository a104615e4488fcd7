//! The clinic app API, `/api/v1`, routed per tenant.
//!
//! Every handler takes a [`TenantDb`]: the request's tenant, resolved from
//! `X-Tenant-ID` or the host label under `SILO_APP_DOMAIN`, authenticated by a
//! tenant token minted for that same tenant, and a connection to that tenant's
//! own database as its own role. There is no other way for a handler to reach
//! tenant data, so no handler can reach the wrong tenant's.
//!
//! Answers: no tenant named 400; missing, forged or expired token 401 (checked
//! before any lookup, so it reveals nothing); unknown tenant, another
//! tenant's token or a revoked one (an older token generation) 404; over
//! the tenant's request rate 429; suspended or archived 423; database down
//! 503; a write of a tenant over its storage quota 403 (its role may only
//! read: see `usage`).
//!
//! The tenant is looked up by what the token proves (its subject), never
//! by the name the request carries: a name is only compared with it. So
//! no made-up name ever reaches the control database, however many are
//! sent, and the rate limit counts against the tenant that holds the token.
//!
//! A statement that finds its connection's session gone (the server
//! restarted, the backend was terminated) discards that connection; a GET
//! is then run once more on a fresh one ([`retry_lost_connection`]), other
//! methods are answered 503 with `Retry-After`.

mod appointments;
mod clinics;
mod common;
mod patients;
mod settings;
mod staff;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequestParts, OptionalFromRequestParts, Request};
use axum::http::header::HOST;
use axum::http::request::Parts;
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use utoipa_axum::router::OpenApiRouter;

use super::error::ApiError;
use super::AppState;
use crate::router::{TenantConn, TenantEntry};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(clinics::router())
        .merge(staff::router())
        .merge(patients::router())
        .merge(appointments::router())
        .merge(settings::router())
}

/// How an operation names its tenant, for the document: the header, or the
/// host name. What [`TenantDb`] answers is `responses::AppErrors`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // read by `tenant_name`, from the request's headers
pub struct TenantHeader {
    /// Tenant slug or id; may be left out when the host name is
    /// `<slug>.<SILO_APP_DOMAIN>`.
    #[param(rename = "X-Tenant-ID")]
    x_tenant_id: Option<String>,
}

/// The request's tenant and a connection to its database.
pub struct TenantDb {
    #[allow(dead_code)] // for handlers that need the tenant's id or plan
    pub tenant: Arc<TenantEntry>,
    pub conn: TenantConn,
    /// Raised when the connection turns out dead, for [`retry_lost_connection`].
    lost: Option<LostConnection>,
}

impl TenantDb {
    /// The answer to a failed statement. A connection whose session is
    /// gone is discarded (and a GET runs once more on a fresh one).
    pub(crate) fn fail(&mut self, e: sqlx::Error) -> ApiError {
        if self.conn.failed(&e) {
            tracing::warn!(tenant_id = %self.tenant.id, "the tenant's database connection was lost: {e}");
            if let Some(lost) = &self.lost {
                lost.0.store(true, Ordering::Release);
            }
            return ApiError::Unavailable(
                "the connection to the tenant's database was lost; retry".into(),
            );
        }
        // Write privileges taken by the usage collector before this
        // process heard of it: the quota's answer, not a 500.
        let refused = e
            .as_database_error()
            .and_then(|d| d.code())
            .is_some_and(|c| c == crate::servers::sqlstate::INSUFFICIENT_PRIVILEGE);
        if refused && (self.tenant.read_only || self.tenant.limits.storage_quota_bytes.is_some()) {
            return ApiError::Forbidden(crate::usage::over_quota_detail(
                None,
                self.tenant.limits.storage_quota_bytes,
            ));
        }
        db_error(e)
    }
}

/// Count every app request against the tenant it was resolved to (set by
/// [`TenantDb`]), with its answer: the usage totals' requests and errors
/// (status 400 or more). Requests refused before a tenant was known count
/// for nobody.
pub async fn meter_requests(
    axum::extract::State(state): axum::extract::State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let slot = MeteredTenant::default();
    req.extensions_mut().insert(slot.clone());
    let res = next.run(req).await;
    if let Some(tenant) = slot.0.get() {
        state
            .router
            .count_request(*tenant, res.status().as_u16() >= 400);
    }
    res
}

/// The tenant a request was resolved to, for [`meter_requests`].
#[derive(Clone, Default)]
struct MeteredTenant(Arc<std::sync::OnceLock<uuid::Uuid>>);

/// A write to a tenant over its storage quota: refused here, before its
/// database (whose privileges refuse it too), with the quota named.
async fn refuse_writes_over_quota(
    parts: &Parts,
    state: &AppState,
    tenant: &TenantEntry,
) -> Result<(), ApiError> {
    if !tenant.read_only || matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let size = match state.registry().current_usage(tenant.id).await {
        Ok(usage) => usage.and_then(|u| u.size_bytes),
        Err(e) => {
            tracing::warn!(tenant_id = %tenant.id, "failed to read the tenant's size: {e}");
            None
        }
    };
    Err(ApiError::Forbidden(crate::usage::over_quota_detail(
        size,
        tenant.limits.storage_quota_bytes,
    )))
}

/// Set by [`TenantDb::fail`] when the request's connection was dead.
#[derive(Clone, Default)]
struct LostConnection(Arc<AtomicBool>);

/// Run a GET (or HEAD) once more when its tenant connection turned out
/// dead: reads are safe to repeat, and the retry gets a fresh (or checked)
/// connection. Other methods are not repeated; their 503 says to retry.
pub async fn retry_lost_connection(mut req: Request, next: Next) -> Response {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return next.run(req).await;
    }
    let lost = LostConnection::default();
    req.extensions_mut().insert(lost.clone());
    let (mut parts, body) = req.into_parts();
    let first = next
        .clone()
        .run(Request::from_parts(parts.clone(), body))
        .await;
    if !lost.0.load(Ordering::Acquire) {
        return first;
    }
    metrics::counter!("silo_app_retries_total").increment(1);
    parts.extensions.remove::<LostConnection>();
    next.run(Request::from_parts(parts, Body::empty())).await
}

/// The request's tenant, authenticated (as for [`TenantDb`]) but with no
/// connection to its database: for answers the registry holds.
pub struct AppTenant(pub Arc<TenantEntry>);

impl FromRequestParts<AppState> for AppTenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let name = tenant_name(parts, state.app_domain.as_deref())?;
        let token = super::auth::bearer_token(&parts.headers).ok_or(ApiError::Unauthorized)?;
        let claims = crate::tokens::verify(state.control.keyring(), token)
            .map_err(|_| ApiError::Unauthorized)?;
        // The tenant the token proves, not the one the request names: an
        // attacker's made-up names never reach the registry.
        let tenant = state.router.resolve(&claims.tenant.to_string()).await?;
        // Every request the token's holder sends counts, whatever it names,
        // at its plan's rate (else silo's).
        state
            .limits
            .admit(claims.tenant, tenant.limits.requests_per_second)?;
        let named = name == tenant.slug || name == tenant.id.to_string();
        if !named || claims.generation != tenant.token_generation {
            // Same answer as an unknown tenant: a token cannot probe for
            // others, and a revoked one learns nothing. Past a small
            // allowance of them, 429, held.
            return Err(state
                .limits
                .misdirected(claims.tenant, ApiError::not_found("tenant")));
        }
        tracing::Span::current().record("tenant_id", tracing::field::display(tenant.id));
        if let Some(slot) = parts.extensions.get::<MeteredTenant>() {
            let _ = slot.0.set(tenant.id);
        }
        crate::router::TenantRouter::check_status(&tenant)?;
        Ok(Self(tenant))
    }
}

impl FromRequestParts<AppState> for TenantDb {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let AppTenant(tenant) = AppTenant::from_request_parts(parts, state).await?;
        refuse_writes_over_quota(parts, state, &tenant).await?;
        let conn = state.router.acquire_entry(tenant.clone()).await?;
        let lost = parts.extensions.get::<LostConnection>().cloned();
        Ok(Self { tenant, conn, lost })
    }
}

impl OptionalFromRequestParts<AppState> for TenantDb {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Option<Self>, ApiError> {
        <Self as FromRequestParts<AppState>>::from_request_parts(parts, state)
            .await
            .map(Some)
    }
}

/// The tenant named by `X-Tenant-ID` and/or the host; both must agree.
fn tenant_name(parts: &Parts, app_domain: Option<&str>) -> Result<String, ApiError> {
    let header = match parts.headers.get("x-tenant-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .map(str::trim)
                .filter(|s| !s.is_empty() && s.len() <= 64)
                .map(str::to_ascii_lowercase)
                .ok_or_else(|| {
                    ApiError::BadRequest("X-Tenant-ID is not a tenant slug or id".into())
                })?,
        ),
        None => None,
    };
    let host = app_domain.and_then(|domain| {
        let host = parts.headers.get(HOST)?.to_str().ok()?;
        let host = host.split(':').next()?.to_ascii_lowercase();
        let label = host.strip_suffix(domain)?.strip_suffix('.')?;
        (!label.is_empty() && !label.contains('.')).then(|| label.to_owned())
    });
    match (header, host) {
        (Some(h), Some(l)) if h != l => Err(ApiError::BadRequest(
            "X-Tenant-ID and the host name name different tenants".into(),
        )),
        // Slugs are lower case and ids case-insensitive: compare and look up in lower case.
        (Some(h), _) => Ok(h.to_owned()),
        (None, Some(l)) => Ok(l),
        (None, None) => Err(ApiError::BadRequest(
            "no tenant named: send X-Tenant-ID or use the tenant's host name".into(),
        )),
    }
}

/// Map database errors of tenant queries to client answers where the client caused them.
pub(crate) fn db_error(e: sqlx::Error) -> ApiError {
    if let Some(db) = e.as_database_error() {
        let constraint = db.constraint().unwrap_or("a constraint").to_owned();
        match db.code().as_deref() {
            Some("23505") => return ApiError::Conflict(format!("already exists ({constraint})")),
            Some("23503") => {
                return ApiError::invalid(format!(
                    "refers to something that does not exist ({constraint})"
                ))
            }
            Some("23514") => return ApiError::invalid(format!("violates {constraint}")),
            Some("22001") | Some("22007") | Some("22008") | Some("22P02") => {
                return ApiError::invalid("a value is out of range or malformed")
            }
            Some("57014") => return ApiError::Unavailable("the query took too long".into()),
            _ => {}
        }
    }
    ApiError::from(crate::ops::Error::Internal(
        anyhow::Error::new(e).context("query the tenant's database"),
    ))
}
