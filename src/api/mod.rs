//! HTTP interface: the admin API under `/admin/v1`, the admin console under
//! `/console` (pages over the same admin API), health, metrics and the
//! generated OpenAPI document. [`app`] builds the router from state and does
//! not serve, so tests drive it with `oneshot` as well as over a real socket.

mod admin;
mod app;
mod auth;
mod console;
mod docs;
pub mod error;
pub(crate) mod health;
pub mod limits;
pub mod paging;
mod responses;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::DefaultBodyLimit;
use axum::response::IntoResponse;
use axum::{Extension, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::classify::ServerErrorsFailureClass;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::Secret;
use crate::control::ControlPlane;
use crate::registry::Registry;
use crate::router::TenantRouter;

/// Everything handlers need: one `Arc`, so the clone each middleware layer
/// and `State` extractor makes per request is one reference count, not one
/// per field (those are shared by every request on every core).
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

impl AppState {
    pub fn new(parts: AppParts) -> Self {
        Self(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppParts;

    fn deref(&self) -> &AppParts {
        &self.0
    }
}

/// What [`AppState`] holds.
pub struct AppParts {
    pub control: ControlPlane,
    pub router: TenantRouter,
    pub admin_token: Arc<Secret>,
    /// Bearer token that may read `/metrics` (besides the admin token).
    pub metrics_token: Option<Arc<Secret>>,
    pub metrics: PrometheusHandle,
    /// Tenants may be named by the first host label under this domain.
    pub app_domain: Option<Arc<str>>,
    /// Longest an admin API request may take before it is answered 503.
    pub admin_timeout: std::time::Duration,
    /// Limits of every route: in flight, time, body, rate.
    pub limits: Arc<limits::Limits>,
    /// `host:port` of the PostgreSQL-protocol front door, for the connection
    /// URIs handed out; `None` when it is off.
    pub pg_address: Option<Arc<str>>,
    /// The PostgreSQL front door, for its figures.
    pub wire: Option<crate::wire::Front>,
}

impl AppParts {
    pub fn registry(&self) -> &Registry {
        self.control.registry()
    }
}

/// For a body field that may be left out (`None`: unchanged), `null`
/// (`Some(None)`: cleared) or a value: `#[serde(default, deserialize_with = "crate::api::nullable")]`.
pub(crate) fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(d).map(Some)
}

#[derive(OpenApi)]
#[openapi(
    info(title = "silo", description = "Database-per-tenant control plane for PostgreSQL"),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(error::Problem))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "`/admin/v1`: the bootstrap admin token (`SILO_ADMIN_TOKEN`) or a \
                         named admin key's token (`POST /admin/v1/keys`), whose role \
                         (`viewer`, `operator`, `admin`) says what it may do; `/api/v1`: a \
                         tenant token minted by `POST /admin/v1/tenants/{tenant}/tokens`",
                    ))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document, as served and as the reference page shows it.
struct Documents {
    json: String,
    /// The reference page, with the document in it.
    html: String,
}

/// This document (OpenAPI 3.1).
#[utoipa::path(get, path = "/openapi.json", tag = "docs", security(),
    responses((status = 200, description = "this document", body = Object)))]
async fn openapi_json(Extension(docs): Extension<Arc<Documents>>) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        docs.json.clone(),
    )
}

/// This document as a page to read and try requests from.
#[utoipa::path(get, path = "/docs", tag = "docs", security(),
    responses((status = 200, description = "the API reference (HTML)", body = String, content_type = "text/html")))]
async fn docs(Extension(docs): Extension<Arc<Documents>>) -> impl IntoResponse {
    docs::page(docs.html.clone())
}

/// `/metrics` alone, without authentication: for a listener of its own on a
/// private port (`SILO_METRICS_LISTEN`).
pub fn metrics_app(state: AppState) -> Router {
    Router::new()
        .route(
            "/metrics",
            axum::routing::get(
                |axum::extract::State(state): axum::extract::State<AppState>| health::render(state),
            ),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::other,
        ))
        .with_state(state)
}

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    // Outermost last: the token and role check, the in-flight limit, the deadline.
    let admin_api = || {
        admin::router()
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                error::deadline,
            ))
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                limits::admin,
            ))
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                auth::require_admin,
            ))
    };
    let admin = admin_api();
    // The console calls the same admin API in-process, as its signed-in key.
    let console = console::router(
        OpenApiRouter::new()
            .nest("/admin/v1", admin_api())
            .split_for_parts()
            .0
            .with_state(state.clone()),
    )
    .layer(axum::middleware::from_fn_with_state(
        state.clone(),
        limits::other,
    ));
    // Innermost first: a GET whose connection was found dead runs once
    // more; the body limit; then the in-flight limit and the deadline.
    let app_api = app::router()
        .layer(axum::middleware::from_fn(app::retry_lost_connection))
        .layer(DefaultBodyLimit::max(
            state.limits.settings.app_max_body_bytes,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::app,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            app::meter_requests,
        ));
    let other = OpenApiRouter::new()
        .merge(health::router())
        .routes(routes!(openapi_json))
        .routes(routes!(docs))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::other,
        ));
    let (router, mut api) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest("/admin/v1", admin)
        .nest("/api/v1", app_api)
        .merge(other)
        .split_for_parts();
    responses::problem_json(&mut api);
    responses::overload(&mut api);
    let json = serde_json::to_string(&api).expect("the OpenAPI document serializes");
    let documents = Documents {
        html: docs::html(&json),
        json,
    };
    router
        .merge(docs::assets().layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::other,
        )))
        .merge(console)
        .layer(Extension(Arc::new(documents)))
        .layer(DefaultBodyLimit::max(error::MAX_BODY_BYTES))
        .method_not_allowed_fallback(|| async { error::ApiError::MethodNotAllowed })
        .fallback(|| async { error::ApiError::not_found("resource") })
        .layer(
            tower::ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
                    let id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-");
                    tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), request_id = id, tenant_id = tracing::field::Empty)
                }).on_failure(log_failure))
                .layer(PropagateRequestIdLayer::x_request_id()),
        )
        .with_state(state)
}

/// A response the trace layer counts as failed (a 5xx, or one cut short):
/// at most one warning a second, saying how many more there were since, so
/// a flood of shed requests (`503`, which anyone can cause without a
/// token) cannot flood the log. A `500` is also logged with its cause where
/// it happens ([`error::ApiError`]); sheds are counted on `/metrics`.
fn log_failure(class: ServerErrorsFailureClass, latency: Duration, span: &tracing::Span) {
    static BASE: OnceLock<Instant> = OnceLock::new();
    // The second (since the first failure, counted from 1) of the last
    // warning, and failures not logged since.
    static LOGGED: AtomicU64 = AtomicU64::new(0);
    static UNLOGGED: AtomicU64 = AtomicU64::new(0);
    let second = BASE.get_or_init(Instant::now).elapsed().as_secs() + 1;
    let last = LOGGED.load(Ordering::Relaxed);
    let turn = second > last
        && LOGGED
            .compare_exchange(last, second, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
    if !turn {
        UNLOGGED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let more = UNLOGGED.swap(0, Ordering::Relaxed);
    tracing::warn!(
        parent: span,
        classification = %class,
        latency_ms = latency.as_millis() as u64,
        failed_unlogged_before = more,
        "response failed (at most one such line a second; failed_unlogged_before counts the others since the last)"
    );
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use axum::http::StatusCode;

    use super::*;

    /// Log lines written, kept for the test to read.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_flood_of_failed_responses_writes_a_line_a_second_and_counts_the_rest() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let shed = || ServerErrorsFailureClass::StatusCode(StatusCode::SERVICE_UNAVAILABLE);
        let lines = || {
            let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
            text.lines().map(str::to_owned).collect::<Vec<_>>()
        };
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("http");
            let started = Instant::now();
            for _ in 0..10_000 {
                log_failure(shed(), Duration::ZERO, &span);
            }
            let seconds = started.elapsed().as_secs();
            let written = lines().len() as u64;
            // One a second: the first, and one per second boundary crossed.
            assert!(
                (1..=seconds + 2).contains(&written),
                "{written} lines in {seconds} s"
            );
            std::thread::sleep(Duration::from_millis(1100));
            log_failure(shed(), Duration::ZERO, &span);
        });
        let lines = lines();
        let last = lines.last().unwrap();
        assert!(last.contains("503"), "{last}");
        let unlogged: u64 = lines
            .iter()
            .map(|line| {
                line.split("failed_unlogged_before=")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or_else(|| panic!("{line}"))
            })
            .sum();
        // Every failure is a line, or counted in the line after it.
        assert_eq!(unlogged + lines.len() as u64, 10_001, "{lines:?}");
    }
}
