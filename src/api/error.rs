//! The one API error type: every failure becomes `application/problem+json`
//! `{type, title, status, detail}`. Internal errors are logged in full once,
//! here, and answered with a generic 500 that shows no SQL, trace or secret.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::ToSchema;

use crate::ops;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// Authenticated, but the admin key's role may not do this.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A conflict with an operation in progress, whose id the answer carries.
    #[error("{0}")]
    Busy(String, uuid::Uuid),
    #[error("this method is not allowed here; `Allow` lists those that are")]
    MethodNotAllowed,
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Locked(String),
    /// Over a request rate limit: retry after this many seconds; with a
    /// tenant's rate, the answer is to be held (see `limits::app`).
    #[error("{0}")]
    TooManyRequests(String, u64, Option<super::limits::RefusalHold>),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

/// Answer an admin request that takes longer than `SILO_ADMIN_REQUEST_TIMEOUT`
/// with 503. Its handler is dropped there: every lock it held or waited
/// for is released by construction (see `registry::locks`), and any
/// half-done tenant work is finished or undone by the reconciler.
pub async fn deadline(
    axum::extract::State(state): axum::extract::State<super::AppState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let limit = state.admin_timeout;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(res) => res,
        Err(_) => {
            metrics::counter!("silo_admin_request_timeouts_total").increment(1);
            ApiError::Unavailable(format!(
                "the request took longer than {} s and was stopped; what it started is finished or undone by silo, retry it",
                limit.as_secs()
            ))
            .into_response()
        }
    }
}

/// RFC 9457 problem details.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The operation in the way, for a 409 caused by one that is running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<uuid::Uuid>,
}

impl ApiError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) | Self::Busy(..) => StatusCode::CONFLICT,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Locked(_) => StatusCode::LOCKED,
            Self::TooManyRequests(..) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad-request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not-found",
            Self::Conflict(_) | Self::Busy(..) => "conflict",
            Self::MethodNotAllowed => "method-not-allowed",
            Self::PayloadTooLarge(_) => "payload-too-large",
            Self::Unprocessable(_) => "validation",
            Self::UnsupportedMediaType(_) => "unsupported-media-type",
            Self::Locked(_) => "locked",
            Self::TooManyRequests(..) => "too-many-requests",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    pub fn not_found(what: &str) -> Self {
        Self::NotFound(format!("{what} not found"))
    }

    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::Unprocessable(detail.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let detail = match &self {
            Self::Internal(e) => {
                tracing::error!("failed to {e:#}");
                "the server could not complete the request; it has been logged".to_owned()
            }
            other => other.to_string(),
        };
        let problem = Problem {
            kind: format!("urn:silo:problem:{}", self.kind()),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail,
            operation_id: match &self {
                Self::Busy(_, id) => Some(*id),
                _ => None,
            },
        };
        let mut res = (status, axum::Json(problem)).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/problem+json"),
        );
        if matches!(self, Self::Unavailable(_)) {
            res.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        if let Self::TooManyRequests(_, seconds, hold) = &self {
            res.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(*seconds));
            if let Some(hold) = hold {
                res.extensions_mut().insert(*hold);
            }
        }
        if matches!(self, Self::Unauthorized) {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        res
    }
}

impl From<ops::Error> for ApiError {
    fn from(e: ops::Error) -> Self {
        use ops::Error as E;
        if let E::Internal(inner) = &e {
            if let Some(server) = refused_admin_login(inner) {
                tracing::warn!("failed to {inner:#}");
                return Self::Unavailable(format!(
                    "tenant server '{server}' refuses silo's admin login (authentication failed): if its admin password changed, register the new one with PATCH /admin/v1/servers/{server} {{\"admin_url\": …}}"
                ));
            }
        }
        match e {
            E::NotFound(what) => Self::not_found(what),
            E::Invalid(msg) => Self::Unprocessable(msg),
            E::Conflict(msg) => Self::Conflict(msg),
            E::Busy { what, operation } => Self::Busy(what, operation),
            E::NotConfigured => Self::Conflict(e.to_string()),
            E::Unavailable(msg) => Self::Unavailable(msg),
            E::Internal(e) if is_unavailable(&e) => {
                tracing::warn!("failed to {e:#}");
                Self::Unavailable("a database silo depends on is unreachable, retry shortly".into())
            }
            E::Internal(e) => Self::Internal(e),
        }
    }
}

impl From<crate::domain::Invalid> for ApiError {
    fn from(e: crate::domain::Invalid) -> Self {
        Self::Unprocessable(e.0)
    }
}

impl From<crate::router::RouteError> for ApiError {
    fn from(e: crate::router::RouteError) -> Self {
        use crate::router::RouteError;
        match e {
            RouteError::NotFound => Self::not_found("tenant"),
            RouteError::Locked(_) => Self::Locked(e.to_string()),
            RouteError::NotReady(_) | RouteError::TenantDown | RouteError::Busy => {
                Self::Unavailable(e.to_string())
            }
            RouteError::ControlDown(err) => {
                tracing::warn!("failed to reach the control database: {err}");
                Self::Unavailable("the control database is unreachable, retry shortly".into())
            }
            RouteError::Internal(e) => Self::Internal(e),
        }
    }
}

impl From<crate::registry::Error> for ApiError {
    fn from(e: crate::registry::Error) -> Self {
        Self::from(ops::Error::from(e))
    }
}

/// A database was down or saturated: the client should retry (503), not a bug (500).
/// The tenant server whose admin login was refused on the way to `e`, if
/// one was: nothing a request can change, so `503` naming it, not `500`.
fn refused_admin_login(e: &anyhow::Error) -> Option<String> {
    use crate::servers::sqlstate::{INVALID_AUTHORIZATION, INVALID_PASSWORD};
    // Only the admin login's refusal: a tenant role's (silo checking that
    // a role it made can log in) says nothing about the admin URL.
    e.chain().find_map(|cause| {
        cause
            .downcast_ref::<crate::servers::Error>()
            .filter(|s| s.role.is_none())
            .filter(|s| s.is(INVALID_PASSWORD) || s.is(INVALID_AUTHORIZATION))
            .map(|s| s.server.clone())
    })
}

fn is_unavailable(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<sqlx::Error>(),
            Some(
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Tls(_)
            )
        ) || cause.downcast_ref::<std::io::Error>().is_some()
            // The session was ended or the server is shutting down (class 57),
            // or the connection broke (class 08).
            || cause
                .downcast_ref::<sqlx::Error>()
                .is_some_and(crate::servers::sqlstate::is_disconnect)
    })
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::JsonDataError(e) => Self::Unprocessable(e.body_text()),
            JsonRejection::JsonSyntaxError(e) => Self::BadRequest(e.body_text()),
            JsonRejection::MissingJsonContentType(e) => Self::UnsupportedMediaType(e.body_text()),
            JsonRejection::BytesRejection(e) => Self::from(e),
            other => Self::BadRequest(other.body_text()),
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::PayloadTooLarge(
                "the body is larger than the limit (2 MiB on /admin/v1, SILO_APP_MAX_BODY_BYTES on /api/v1)".into(),
            )
        } else {
            Self::BadRequest(r.body_text())
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self::Unprocessable(r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        if r.status().is_client_error() {
            // A segment that does not decode (not UTF-8) names nothing that exists.
            Self::NotFound(format!("nothing has this path: {}", r.body_text()))
        } else {
            Self::Internal(anyhow::anyhow!(
                "extract path parameters: {}",
                r.body_text()
            ))
        }
    }
}

/// The largest request body the admin API reads (axum's default limit);
/// the app API's is `SILO_APP_MAX_BODY_BYTES`.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// `Json` whose rejections are problem+json answers: `415` without a JSON
/// content type, and the body read by [`json_object`].
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !json_content_type(req.headers()) {
            return Err(ApiError::UnsupportedMediaType(
                "Expected request with `Content-Type: application/json`".into(),
            ));
        }
        let body = Bytes::from_request(req, state).await?;
        json_object(&body).map(Self)
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `application/json`, or any `application/*+json`.
fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json") || subtype.to_ascii_lowercase().ends_with("+json"))
}

/// A body that must be one JSON object, read into `T`: `400` when it is
/// not JSON, `422` when it is JSON but not an object, or does not fit `T`
/// (a field named twice included). Not an object matters: serde reads a
/// struct from an array of its fields in order, so `[null, true]` would
/// be a restore's `{"into_slug": null, "overwrite": true}`, past any check
/// that looked for an `overwrite` member.
pub fn json_object<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    use serde_json::error::Category;
    let syntax = |e: serde_json::Error| {
        ApiError::BadRequest(format!("Failed to parse the request body as JSON: {e}"))
    };
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        // Whatever it is, nothing is kept of it (`IgnoredAny`).
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                Err(e) if e.classify() != Category::Data => syntax(e),
                _ => ApiError::Unprocessable("the body must be a JSON object".into()),
            },
        );
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        // A field found missing at the object's end is named before what
        // follows is read: malformed JSON is a 400 whatever else is wrong.
        let malformed = || serde_json::from_slice::<serde::de::IgnoredAny>(body).err();
        if let (Category::Data, Some(syntax_error)) = (e.inner().classify(), malformed()) {
            return syntax(syntax_error);
        }
        if e.inner().classify() == Category::Data {
            ApiError::Unprocessable(format!(
                "Failed to deserialize the JSON body into the target type: {e}"
            ))
        } else {
            syntax(e.into_inner())
        }
    })?;
    de.end().map_err(syntax)?;
    Ok(value)
}

/// `Query` whose rejections are problem+json answers. A parameter holding
/// U+0000 is refused (422) before any handler sees it: PostgreSQL text
/// cannot hold it, so it could only fail deeper down.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        if let Some(name) = nul_in_query(parts.uri.query()) {
            return Err(ApiError::invalid(format!(
                "{name} must not hold the character U+0000"
            )));
        }
        let axum::extract::Query(v) =
            axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(Self(v))
    }
}

/// The first parameter of a query string whose name or value holds U+0000
/// once decoded (`%00`), named for a message (`the query parameter 'q'`,
/// or `the query string` when the name itself is not fit to show);
/// `None` if none does. The admin API's and the console's query strings
/// are both checked with it.
pub fn nul_in_query(query: Option<&str>) -> Option<String> {
    let query = query?;
    if !query.contains("%00") && !query.contains('\0') {
        return None;
    }
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, v)| k.contains('\0') || v.contains('\0'))
        .map(|(k, _)| {
            if k.contains('\0') || k.is_empty() || k.chars().count() > 64 {
                "the query string".to_owned()
            } else {
                format!("the query parameter '{k}'")
            }
        })
}

/// `Path` whose rejections are problem+json answers.
#[derive(Debug, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// A JSON body that may be left out: empty (or blank) means `None`, else
/// it is read by [`json_object`]. Its content type is not checked.
#[derive(Debug)]
pub struct OptionalJson<T>(pub Option<T>);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let body = Bytes::from_request(req, state).await?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(None));
        }
        json_object(&body).map(|v| Self(Some(v)))
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
