//! `/admin/v1/keys`: named admin keys. Only an `admin` (a key of that role,
//! or the bootstrap token) reaches these routes (see `api::auth`).
//!
//! A key's token is made here, shown once (in the answer that made it) and
//! never stored: the registry keeps only its SHA-256.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Extension;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::api::auth::Actor;
use crate::api::error::{ApiError, ApiResult, Json, Path};
use crate::api::responses::{AdminErrors, JsonBody};
use crate::api::AppState;
use crate::crypto::AdminKeyToken;
use crate::domain::{AdminRole, KeyName};
use crate::registry::{AdminKey, KeyExpiry, LIVE_KEY_NAME_INDEX, MAX_KEY_DAYS};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_key, list_keys))
        .routes(routes!(revoke_key, change_key))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyBody {
    /// `^[a-z][a-z0-9_-]{0,62}$`, unique among live keys, and none of the
    /// names silo itself acts under (`admin`, `bootstrap`, `cli`,
    /// `scheduler`, `silo-dev`); the audit log's `actor` of what it does.
    name: String,
    /// `viewer` reads; `operator` also runs lifecycle, backups, restores that
    /// replace no data, moves, migrations and app credentials; `admin` does
    /// everything, deletes and keys included.
    role: AdminRole,
    /// Days until the key expires (1–3650): from then on it is refused as a
    /// revoked key is. Absent: it does not expire.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 3650)]
    expires_in_days: Option<i64>,
}

/// A key with its token: answered once, by the request that made it. No
/// `Debug`: it holds the token.
#[derive(Serialize, ToSchema)]
pub struct IssuedKey {
    id: Uuid,
    name: String,
    role: AdminRole,
    created_at: DateTime<Utc>,
    created_by: String,
    last_used_at: Option<DateTime<Utc>>,
    /// From when it is refused; `null`: never.
    expires_at: Option<DateTime<Utc>>,
    /// `Authorization: Bearer <token>` on `/admin/v1`. Shown only in this
    /// answer; silo keeps a SHA-256 of it.
    token: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    /// Keys not revoked, expired ones included (see `expires_at`), oldest
    /// first (no token, no hash).
    items: Vec<AdminKey>,
}

/// Make an admin key; its token is in this answer only.
#[utoipa::path(post, path = "/keys", tag = "keys", request_body = CreateKeyBody,
    responses(
        (status = 201, body = IssuedKey),
        AdminErrors, JsonBody,
        (status = 409, description = "a live key has this name"),
        (status = 422, description = "the body does not fit, the name is malformed or reserved, \
            the role is not `viewer`, `operator` or `admin`, or `expires_in_days` is not 1–3650"),
    ))]
async fn create_key(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Json(body): Json<CreateKeyBody>,
) -> ApiResult<(StatusCode, Json<IssuedKey>)> {
    let name = KeyName::parse(&body.name)?;
    let expires_in_days = days(body.expires_in_days, "absent")?;
    let issued = AdminKeyToken::generate();
    let key = state
        .registry()
        .create_admin_key(
            name.as_str(),
            body.role,
            &issued.hash,
            expires_in_days,
            actor.name(),
        )
        .await
        .map_err(|e| {
            if e.is_unique_violation(LIVE_KEY_NAME_INDEX) {
                ApiError::Conflict(format!(
                    "a live admin key is named '{name}'; revoke it first or pick another name"
                ))
            } else {
                e.into()
            }
        })?;
    Ok((
        StatusCode::CREATED,
        Json(IssuedKey {
            id: key.id,
            name: key.name,
            role: key.role,
            created_at: key.created_at,
            created_by: key.created_by,
            last_used_at: key.last_used_at,
            expires_at: key.expires_at,
            token: issued.token,
        }),
    ))
}

/// `expires_in_days`, checked: 1–3650 days, or none (`none` says how a
/// request asks for none).
fn days(expires_in_days: Option<i64>, none: &str) -> ApiResult<Option<u32>> {
    match expires_in_days {
        None => Ok(None),
        Some(d) if (1..=i64::from(MAX_KEY_DAYS)).contains(&d) => Ok(Some(d as u32)),
        Some(_) => Err(ApiError::Unprocessable(format!(
            "expires_in_days must be 1–{MAX_KEY_DAYS} (or {none}: the key does not expire)"
        ))),
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeKeyBody {
    /// Days from now until the key expires (1–3650), or `null`: it does
    /// not expire. Required.
    #[serde(deserialize_with = "present")]
    #[schema(required = true, minimum = 1, maximum = 3650)]
    expires_in_days: Option<i64>,
}

/// A field that must be given, `null` allowed.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Option::deserialize(d)
}

/// Change a live key's expiry: `expires_in_days` from now, or never. An
/// expired key stays expired (its token is refused; make a new key).
#[utoipa::path(patch, path = "/keys/{name}", tag = "keys", request_body = ChangeKeyBody,
    params(("name" = String, Path, description = "the key's name")),
    responses(
        (status = 200, body = AdminKey),
        AdminErrors, JsonBody,
        (status = 404, description = "no live key has this name"),
        (status = 409, description = "the key has expired"),
        (status = 422, description = "`expires_in_days` is missing, or neither 1–3650 nor `null`"),
    ))]
async fn change_key(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
    Json(body): Json<ChangeKeyBody>,
) -> ApiResult<Json<AdminKey>> {
    let name = KeyName::parse(&name).map_err(|_| ApiError::not_found("admin key"))?;
    let expires_in_days = days(body.expires_in_days, "null")?;
    match state
        .registry()
        .set_admin_key_expiry(name.as_str(), expires_in_days, actor.name())
        .await?
    {
        KeyExpiry::Set(key) => Ok(Json(key)),
        KeyExpiry::NoSuchKey => Err(ApiError::not_found("admin key")),
        KeyExpiry::Expired => Err(ApiError::Conflict(format!(
            "admin key '{name}' has expired and stays refused: make a new key (and revoke this one to free its name)"
        ))),
    }
}

/// Admin keys not revoked: name, role, who made them and when, last use,
/// expiry.
#[utoipa::path(get, path = "/keys", tag = "keys",
    responses((status = 200, body = KeyList), AdminErrors))]
async fn list_keys(State(state): State<AppState>) -> ApiResult<Json<KeyList>> {
    Ok(Json(KeyList {
        items: state.registry().admin_keys().await?,
    }))
}

/// Revoke an admin key: every request with it is refused (401) from now
/// on, on every replica. Its record is kept; its name may be used again.
#[utoipa::path(delete, path = "/keys/{name}", tag = "keys",
    params(("name" = String, Path, description = "the key's name")),
    responses((status = 204, description = "revoked"), AdminErrors,
        (status = 404, description = "no live key has this name")))]
async fn revoke_key(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    // No key has a name that is not a key's name.
    let name = KeyName::parse(&name).map_err(|_| ApiError::not_found("admin key"))?;
    state
        .registry()
        .revoke_admin_key(name.as_str(), actor.name())
        .await?
        .ok_or_else(|| ApiError::not_found("admin key"))?;
    Ok(StatusCode::NO_CONTENT)
}
