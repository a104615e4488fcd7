//! Admin authentication: `Authorization: Bearer <SILO_ADMIN_TOKEN>`, compared
//! in constant time. Anything else is a 401 before any handler runs.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;

use super::error::ApiError;
use super::AppState;
use crate::crypto::secret_eq;

/// Who performed an admin action, for the audit log.
#[derive(Debug, Clone)]
pub struct Actor(pub &'static str);

pub async fn require_admin(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or(ApiError::Unauthorized)?;
    if !secret_eq(presented.as_bytes(), state.admin_token.expose().as_bytes()) {
        return Err(ApiError::Unauthorized);
    }
    req.extensions_mut().insert(Actor("admin"));
    Ok(next.run(req).await)
}
