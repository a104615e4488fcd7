//! Console sessions: a random id in an HttpOnly, SameSite=Strict cookie
//! (Secure when the request came over TLS), recorded in the control
//! database (`console_sessions`) so that every replica knows it.
//!
//! Nothing secret is stored: the row is found by the SHA-256 of the
//! cookie, and says who signed in by the SHA-256 of the token used — a
//! named key's hash, looked up again on every request ([`actor_of`]), so a
//! revoked key's sessions end at once everywhere; or the bootstrap token's,
//! compared with the running `SILO_ADMIN_TOKEN`, so changing it ends them.
//!
//! Every form carries the session's CSRF token, an HMAC of the cookie
//! (so it is never stored, and differs per session); [`Posted`] checks it
//! before the handler runs, so no handler can forget to.

use std::time::Duration;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::{COOKIE, SET_COOKIE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::pages;
use crate::api::auth::{actor_of, Actor, Holder};
use crate::api::error::ApiError;
use crate::api::AppState;
use crate::crypto::{admin_key_hash, secret_eq};

/// The session cookie.
pub const COOKIE_NAME: &str = "silo_console";
/// The cookie binding the sign-in form to the browser that loaded it.
pub const SIGN_IN_COOKIE: &str = "silo_console_sign_in";
/// How long a session lasts from sign-in, whatever its use.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);

/// One signed-in browser.
#[derive(Clone)]
pub struct Session {
    pub holder: Holder,
    /// The token every form of this session carries.
    pub csrf: String,
    pub expires_at: DateTime<Utc>,
}

/// Open a session for `holder`; its cookie's value.
pub async fn open(state: &AppState, holder: &Holder) -> Result<String, ApiError> {
    let id = random_token();
    let (kind, token_hash) = match holder {
        Holder::Bootstrap => ("bootstrap", admin_key_hash(state.admin_token.expose())),
        Holder::Key(hash) => ("key", *hash),
    };
    let expires_at = Utc::now() + SESSION_TTL;
    state
        .registry()
        .open_console_session(&digest(&id), kind, &token_hash, expires_at)
        .await?;
    Ok(id)
}

/// The live session of a cookie, if any.
async fn load(state: &AppState, id: &str) -> Result<Option<Session>, ApiError> {
    let Some(row) = state.registry().console_session(&digest(id)).await? else {
        return Ok(None);
    };
    let Ok(hash) = <[u8; 32]>::try_from(row.token_hash.as_slice()) else {
        return Ok(None);
    };
    let holder = match row.kind.as_str() {
        // A session of an earlier bootstrap token ends when it changes.
        "bootstrap" if hash == admin_key_hash(state.admin_token.expose()) => Holder::Bootstrap,
        "key" => Holder::Key(hash),
        _ => return Ok(None),
    };
    Ok(Some(Session {
        holder,
        csrf: csrf_of(id),
        expires_at: row.expires_at,
    }))
}

/// End the session of a cookie, on every replica.
pub async fn close(state: &AppState, id: &str) -> Result<(), ApiError> {
    Ok(state.registry().close_console_session(&digest(id)).await?)
}

fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

/// A session's CSRF token: an HMAC of its cookie, base64url.
fn csrf_of(id: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(id.as_bytes()).expect("HMAC takes any key");
    mac.update(b"silo console form");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

/// 32 random bytes, base64url.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The value of the cookie `name`, if the request carries it.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// `true` when the request reached silo over TLS (directly, or through a
/// proxy that says so): the cookie is then `Secure`.
fn over_tls(parts: &HeaderMap) -> bool {
    parts
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, path `/console`,
/// Secure over TLS; `max_age` 0 removes it.
pub fn set_cookie(headers: &HeaderMap, name: &str, value: &str, max_age: Duration) -> HeaderValue {
    let secure = if over_tls(headers) { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        max_age.as_secs()
    ))
    .expect("cookie values are base64url")
}

/// A signed-in request: who acts, and its session. A page asked for without
/// a live session is sent to the sign-in page; a form posted without one is
/// refused with 403.
pub struct Signed {
    pub actor: Actor,
    pub session: Session,
    /// The cookie's value (to close the session on sign-out).
    pub cookie: String,
}

impl FromRequestParts<AppState> for Signed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let refuse = |method: &Method| -> Response {
            if method == Method::GET || method == Method::HEAD {
                Redirect::to("/console/sign-in").into_response()
            } else {
                pages::refusal(
                    StatusCode::FORBIDDEN,
                    "Not signed in",
                    "This form needs a signed-in session. Sign in and try again.",
                )
            }
        };
        let Some(id) = cookie(&parts.headers, COOKIE_NAME) else {
            return Err(refuse(&parts.method));
        };
        let cookie = id.to_owned();
        let session = match load(state, &cookie).await {
            Ok(Some(session)) => session,
            Ok(None) => return Err(refuse(&parts.method)),
            Err(e) => return Err(pages::api_failure(e)),
        };
        match actor_of(state, &session.holder).await {
            Ok(actor) => Ok(Self {
                actor,
                session,
                cookie,
            }),
            Err(ApiError::Unauthorized) => {
                // The key was revoked: its session ends with it.
                close(state, &cookie).await.map_err(pages::api_failure)?;
                Err(refuse(&parts.method))
            }
            Err(e) => Err(pages::api_failure(e)),
        }
    }
}

/// A form posted by a signed-in session whose CSRF token matched: the
/// form's fields as `T`. A missing or wrong token is a 403 before any
/// handler runs; fields that do not fit `T` are a 422.
pub struct Posted<T> {
    pub signed: Signed,
    pub form: T,
}

impl<T: DeserializeOwned + Send> FromRequest<AppState> for Posted<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        let signed = Signed::from_request_parts(&mut parts, state).await?;
        let req = Request::from_parts(parts, body);
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let forged = || {
            pages::refusal(
                StatusCode::FORBIDDEN,
                "Form refused",
                "This form did not come from this session's own page (its CSRF token is \
                 missing or wrong), so nothing was done. Reload the page and try again.",
            )
        };
        // The token is checked before the other fields are read.
        let csrf = url::form_urlencoded::parse(&bytes)
            .find(|(k, _)| k == "csrf")
            .map(|(_, v)| v.into_owned())
            .ok_or_else(forged)?;
        if !secret_eq(csrf.as_bytes(), signed.session.csrf.as_bytes()) {
            return Err(forged());
        }
        // `T` ignores the `csrf` field (forms do not deny unknown fields).
        let form: T = serde_urlencoded::from_bytes(&bytes).map_err(|e| {
            pages::refusal(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Form not understood",
                &format!("The form's fields do not fit: {e}."),
            )
        })?;
        Ok(Self { signed, form })
    }
}

/// The response that signs a browser in: the session cookie, then the fleet.
pub fn signed_in(headers: &HeaderMap, cookie_value: &str) -> Response {
    let mut res = Redirect::to("/console").into_response();
    let h = res.headers_mut();
    h.append(
        SET_COOKIE,
        set_cookie(headers, COOKIE_NAME, cookie_value, SESSION_TTL),
    );
    h.append(
        SET_COOKIE,
        set_cookie(headers, SIGN_IN_COOKIE, "", Duration::ZERO),
    );
    res
}

/// The response that signs a browser out: the cookie removed.
pub fn signed_out(headers: &HeaderMap) -> Response {
    let mut res = Redirect::to("/console/sign-in").into_response();
    res.headers_mut().append(
        SET_COOKIE,
        set_cookie(headers, COOKIE_NAME, "", Duration::ZERO),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            HeaderValue::from_static("a=1; silo_console=xyz; b=2"),
        );
        assert_eq!(cookie(&h, COOKIE_NAME), Some("xyz"));
        assert_eq!(cookie(&h, "silo"), None);
        assert_eq!(cookie(&h, "b"), Some("2"));
    }

    #[test]
    fn the_session_cookie_is_http_only_strict_and_secure_over_tls() {
        let plain = set_cookie(&HeaderMap::new(), COOKIE_NAME, "v", SESSION_TTL);
        let plain = plain.to_str().unwrap();
        assert!(plain.contains("HttpOnly") && plain.contains("SameSite=Strict"));
        assert!(plain.contains("Max-Age=28800") && !plain.contains("Secure"));
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert!(set_cookie(&h, COOKIE_NAME, "v", SESSION_TTL)
            .to_str()
            .unwrap()
            .ends_with("; Secure"));
    }

    #[test]
    fn a_session_s_form_token_is_its_own_and_not_its_cookie() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(csrf_of(&a), csrf_of(&a));
        assert_ne!(csrf_of(&a), csrf_of(&b));
        assert_ne!(csrf_of(&a), a);
        assert_eq!(csrf_of(&a).len(), 43);
    }
}
