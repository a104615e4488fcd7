//! Admin authentication: `Authorization: Bearer <SILO_ADMIN_TOKEN>`, compared
//! in constant time. Anything else is a 401 before any handler runs.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;

use super::error::ApiError;
use super::AppState;
use crate::crypto::secret_eq;

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Who performed an admin action, for the audit log.
#[derive(Debug, Clone)]
pub struct Actor(pub &'static str);

pub async fn require_admin(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = bearer_token(req.headers()).ok_or(ApiError::Unauthorized)?;
    if !secret_eq(presented.as_bytes(), state.admin_token.expose().as_bytes()) {
        return Err(ApiError::Unauthorized);
    }
    req.extensions_mut().insert(Actor("admin"));
    Ok(next.run(req).await)
}
