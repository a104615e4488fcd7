//! The admin console, `/console`: server-rendered pages over the admin API.
//!
//! - **Same powers as the API.** Every change the console makes is a
//!   request to the admin API's own router, in-process ([`Console::call`]):
//!   the same handlers, validation, role checks (`auth::require_admin`, with
//!   the session's actor instead of a bearer token), audit entries, limits
//!   and deadline. Reads use the same registry calls the API's handlers
//!   make, plus the console's listing queries (`registry::console`).
//! - **Templates: maud.** Markup is Rust, checked by the compiler and
//!   escaped by default; pages are plain functions (`pages`), with no
//!   template files to keep in step with the code and no run-time parsing.
//! - **Plain pages.** Reading works without JavaScript; a vendored htmx
//!   (`assets/vendor/htmx-2.0.4`, 0BSD) only refreshes an operation's
//!   progress in place. A strict Content-Security-Policy keeps every
//!   request on silo's own origin (no inline script or style, no CDN).
//! - **Sessions and CSRF**: see `session`. The key's role decides which
//!   controls a page shows ([`Actor::may`]), and the API refuses anyway.

// A page's error is the whole page answering it, made once per request.
#![allow(clippy::result_large_err)]

mod actions;
mod pages;
mod session;

use axum::body::Body;
use axum::extract::{FromRequestParts, Query, Request, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use axum::http::{HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use maud::Markup;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;
use serde_json::Value;
use tower::ServiceExt;

use super::auth::{Actor, Authenticated};
use super::AppState;
use session::Signed;

/// What every page may load: its own origin only, no inline script or style.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
    base-uri 'none'";

/// htmx, vendored (version and licence beside it).
const HTMX: &[u8] = include_bytes!("../../../assets/vendor/htmx-2.0.4/htmx.min.js");
/// The console's stylesheet.
const CSS: &str = include_str!("../../../assets/console/console.css");
pub const HTMX_PATH: &str = "/console/assets/htmx-2.0.4.min.js";
pub const CSS_PATH: &str = "/console/assets/console.css";

/// The console's own state: the admin API to call.
#[derive(Clone)]
pub struct Console {
    /// `/admin/v1`, as `app` serves it, for in-process calls.
    admin: Router,
}

/// An admin API answer that was not a success: its status and problem.
#[derive(Debug)]
pub struct Failure {
    pub status: StatusCode,
    pub title: String,
    pub detail: String,
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        pages::refusal(self.status, &self.title, &self.detail)
    }
}

impl Console {
    /// Call the admin API as `actor`: `path` is under `/admin/v1`, its
    /// segments already encoded ([`seg`]). The answer's JSON (`null` for
    /// none), or the problem it answered.
    pub async fn call(
        &self,
        actor: &Actor,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("/admin/v1{path}"))
            .extension(Authenticated(actor.clone()));
        let body = match body {
            Some(v) => {
                req = req.header(CONTENT_TYPE, "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let req = req.body(body).map_err(|_| Failure {
            status: StatusCode::BAD_REQUEST,
            title: "Bad request".into(),
            detail: "That address cannot be asked of the admin API.".into(),
        })?;
        let res = match self.admin.clone().oneshot(req).await {
            Ok(res) => res,
            Err(never) => match never {},
        };
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 4 << 20)
            .await
            .unwrap_or_default();
        let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(json);
        }
        Err(Failure {
            status,
            title: json["title"].as_str().unwrap_or("Refused").to_owned(),
            detail: json["detail"]
                .as_str()
                .unwrap_or("The admin API refused this.")
                .to_owned(),
        })
    }
}

/// What a path segment keeps as it is: RFC 3986's unreserved characters.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// One path segment, percent-encoded, for [`Console::call`] and links.
pub fn seg(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// The console's routes, calling `admin` (the admin API router) in-process.
pub fn router(admin: Router) -> Router<AppState> {
    let console = Console { admin };
    Router::new()
        .route("/console", get(fleet))
        .route("/console/", get(fleet))
        .route(
            "/console/sign-in",
            get(actions::sign_in_page).post(actions::sign_in),
        )
        .route("/console/sign-out", post(actions::sign_out))
        .route(
            "/console/tenants",
            get(tenants).post(actions::create_tenant),
        )
        .route("/console/tenants/new", get(new_tenant))
        .route("/console/tenants/{tenant}", get(tenant))
        .route(
            "/console/tenants/{tenant}/{action}",
            post(actions::tenant_action),
        )
        .route(
            "/console/tenants/{tenant}/app-credentials/{id}/revoke",
            post(actions::revoke_app_credential),
        )
        .route(
            "/console/tenants/{tenant}/app-credentials/{id}/rotate",
            post(actions::rotate_app_credential),
        )
        .route(
            "/console/backups/{id}/{action}",
            post(actions::backup_action),
        )
        .route(
            "/console/servers",
            get(servers).post(actions::create_server),
        )
        .route("/console/servers/{name}", post(actions::update_server))
        .route("/console/plans", get(plans).post(actions::create_plan))
        .route("/console/plans/{name}", post(actions::update_plan))
        .route("/console/plans/{name}/delete", post(actions::delete_plan))
        .route("/console/keys", get(keys).post(actions::create_key))
        .route("/console/keys/{name}/revoke", post(actions::revoke_key))
        .route(
            "/console/keys/{name}/expiry",
            post(actions::change_key_expiry),
        )
        .route("/console/operations/{id}", get(operation))
        .route("/console/operations/{id}/progress", get(operation_progress))
        .route(
            "/console/migrations",
            get(migrations).post(actions::start_migration),
        )
        .route("/console/audit", get(audit))
        .route(HTMX_PATH, get(htmx))
        .route(CSS_PATH, get(css))
        .route("/console/{*rest}", get(not_found).post(not_found))
        .layer(axum::middleware::from_fn(headers))
        .layer(Extension(console))
}

/// Headers of every console answer: the CSP, no framing, no sniffing, no
/// referrer; pages are not cached (they show live state, and a minted
/// secret once).
async fn headers(req: Request, next: Next) -> Response {
    let asset = req.uri().path().starts_with("/console/assets/");
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    let cache = if asset {
        "public, max-age=86400"
    } else {
        "no-store"
    };
    h.insert(CACHE_CONTROL, HeaderValue::from_static(cache));
    res
}

async fn htmx() -> impl IntoResponse {
    ([(CONTENT_TYPE, "text/javascript; charset=utf-8")], HTMX)
}

async fn css() -> impl IntoResponse {
    ([(CONTENT_TYPE, "text/css; charset=utf-8")], CSS)
}

async fn not_found() -> Response {
    pages::refusal(
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no console page here.",
    )
}

/// A read of the registry that failed: logged once, answered 500/503.
fn failed(e: impl Into<crate::api::error::ApiError>) -> Response {
    pages::api_failure(e.into())
}

async fn fleet(State(state): State<AppState>, signed: Signed) -> Result<Markup, Response> {
    let data = pages::FleetData::read(&state).await.map_err(failed)?;
    Ok(pages::fleet(&signed, &data))
}

/// The tenants page's query string; every field optional, empty = any.
#[derive(Debug, Default, Deserialize)]
pub struct TenantsParams {
    #[serde(default)]
    q: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    plan: String,
    #[serde(default)]
    server: String,
    #[serde(default)]
    sort: String,
    #[serde(default)]
    cursor: String,
    limit: Option<i64>,
}

/// Longest search text.
const MAX_SEARCH: usize = 100;
/// Most tenants on one page.
const MAX_PAGE: i64 = 200;

async fn tenants(
    State(state): State<AppState>,
    signed: Signed,
    uri: Uri,
    params: Result<Query<TenantsParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Markup, Response> {
    let p = query_params(&uri, params)?;
    let listing = pages::Listing::read(&state, &p).await?;
    Ok(pages::tenants(&signed, &p, &listing))
}

/// A page's query string, read: 400 if it does not fit, or if a parameter
/// holds U+0000 (PostgreSQL text cannot hold it; see
/// [`crate::api::error::nul_in_query`]).
fn query_params<T>(
    uri: &Uri,
    params: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, Response> {
    if let Some(name) = crate::api::error::nul_in_query(uri.query()) {
        return Err(bad_request(&format!(
            "{} must not hold the character U+0000.",
            capitalized(&name)
        )));
    }
    let Query(p) = params.map_err(|e| bad_request(&e.body_text()))?;
    Ok(p)
}

fn capitalized(s: &str) -> String {
    let mut chars = s.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

fn bad_request(detail: &str) -> Response {
    pages::refusal(StatusCode::BAD_REQUEST, "Bad request", detail)
}

/// `Path` whose rejections (a segment that is not UTF-8 once decoded,
/// such as `%ff`) are console pages, as the API's are problem+json.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Response> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(t)| Self(t))
            .map_err(|e| bad_request(&e.body_text()))
    }
}

async fn new_tenant(State(state): State<AppState>, signed: Signed) -> Result<Markup, Response> {
    let servers = state.registry().servers().await.map_err(failed)?;
    Ok(pages::new_tenant(&signed, &servers))
}

/// The tenant page's query string: `cursor` pages its backups (the last
/// one shown, older ones follow).
#[derive(Debug, Default, Deserialize)]
pub struct TenantParams {
    #[serde(default)]
    cursor: String,
}

async fn tenant(
    State(state): State<AppState>,
    Extension(console): Extension<Console>,
    signed: Signed,
    Path(tenant): Path<String>,
    uri: Uri,
    params: Result<Query<TenantParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Markup, Response> {
    let p = query_params(&uri, params)?;
    let data = pages::TenantData::read(&state, &console, &signed, &tenant, &p.cursor).await?;
    Ok(pages::tenant(&signed, &data))
}

async fn operation(
    State(state): State<AppState>,
    signed: Signed,
    Path(id): Path<String>,
) -> Result<Markup, Response> {
    let op = pages::OperationData::read(&state, &id).await?;
    Ok(pages::operation(&signed, &op))
}

/// The progress part of an operation's page, which htmx fetches each second
/// until the operation ends.
async fn operation_progress(
    State(state): State<AppState>,
    _signed: Signed,
    Path(id): Path<String>,
) -> Result<Markup, Response> {
    let op = pages::OperationData::read(&state, &id).await?;
    Ok(pages::progress(&op))
}

async fn migrations(
    State(state): State<AppState>,
    Extension(console): Extension<Console>,
    signed: Signed,
) -> Result<Markup, Response> {
    let status = console
        .call(&signed.actor, Method::GET, "/migrations/tenants", None)
        .await
        .map_err(IntoResponse::into_response)?;
    let latest = state
        .registry()
        .latest_operation(crate::domain::OperationKind::MigrateTenants)
        .await
        .map_err(failed)?;
    Ok(pages::migrations(&signed, &status, latest.as_ref()))
}

async fn servers(State(state): State<AppState>, signed: Signed) -> Result<Markup, Response> {
    let servers = state.registry().servers().await.map_err(failed)?;
    Ok(pages::servers(&signed, &servers))
}

/// Plans, as `GET /plans` lists them.
async fn plans(Extension(console): Extension<Console>, signed: Signed) -> Result<Markup, Response> {
    let plans = console
        .call(&signed.actor, Method::GET, "/plans", None)
        .await
        .map_err(IntoResponse::into_response)?;
    Ok(pages::plans(&signed, &plans))
}

/// Admin keys, as `GET /keys` lists them (the admin role's alone: others
/// get its 403).
async fn keys(Extension(console): Extension<Console>, signed: Signed) -> Result<Markup, Response> {
    let keys = console
        .call(&signed.actor, Method::GET, "/keys", None)
        .await
        .map_err(IntoResponse::into_response)?;
    Ok(pages::keys(&signed, &keys))
}

/// The audit page's filters; empty = any.
#[derive(Debug, Default, Deserialize)]
pub struct AuditParams {
    #[serde(default)]
    key: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    tenant: String,
}

async fn audit(
    Extension(console): Extension<Console>,
    signed: Signed,
    uri: Uri,
    params: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Markup, Response> {
    let p = query_params(&uri, params)?;
    let query = {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("key", &p.key),
            ("action", &p.action),
            ("tenant", &p.tenant),
        ] {
            if !v.trim().is_empty() {
                query.append_pair(k, v.trim());
            }
        }
        query.append_pair("limit", "200").finish()
    };
    let entries = console
        .call(&signed.actor, Method::GET, &format!("/audit?{query}"), None)
        .await;
    Ok(pages::audit(&signed, &p, entries))
}
