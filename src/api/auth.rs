//! Admin authentication and authorization, in one place for every route of
//! `/admin/v1`: no handler checks a role, so no route can forget to.
//!
//! A request carries `Authorization: Bearer <token>`: the bootstrap token
//! (`SILO_ADMIN_TOKEN`, compared in constant time; the `admin` role, and
//! `admin` in the audit log), or a named admin key's token (found by its
//! hash in the control database on every request: a revoked key is refused
//! at once on every replica). Anything else is a 401 before any handler runs.
//! A client address whose tokens failed `SILO_ADMIN_AUTH_FAILURES` times in
//! a minute is answered 429 before its next token is looked at
//! ([`super::limits::Limits::may_authenticate`]).
//!
//! Then [`need`] says, from the method and the matched route (and, for a
//! connection URI, the query), what role the request takes; a restore asked
//! with a lesser role has its body read for `"overwrite": true` first. A key
//! whose role falls short gets a 403 naming what it may not do.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, MatchedPath, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::{Extensions, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::Response;

use super::error::ApiError;
use super::limits::client_address;
use super::AppState;
use crate::crypto::{admin_key_hash, is_admin_key_shaped, secret_eq};
use crate::domain::{AdminRole, BOOTSTRAP_ACTOR};

/// Where the admin routes are nested; [`need`] reads routes without it.
const ADMIN_PREFIX: &str = "/admin/v1";

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The address of the client that sent a request, when it came over the
/// network (`silo serve` records it; behind a trusted proxy, the address
/// its `X-Forwarded-For` gives, [`client_address`]); `None` for a request
/// made in-process.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub Option<IpAddr>);

impl Peer {
    fn of(state: &AppState, extensions: &Extensions, headers: &HeaderMap) -> Self {
        let trusted = &state.limits.settings.trusted_proxies;
        Self(
            extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(addr)| client_address(addr.ip(), headers, trusted)),
        )
    }
}

impl FromRequestParts<AppState> for Peer {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Infallible> {
        Ok(Self::of(state, &parts.extensions, &parts.headers))
    }
}

/// Who performed an admin action, for the audit log: the admin key's name
/// (or `admin`, the bootstrap token), and its role.
#[derive(Debug, Clone)]
pub struct Actor {
    name: Arc<str>,
    role: AdminRole,
}

impl Actor {
    /// The bootstrap token (`SILO_ADMIN_TOKEN`).
    fn bootstrap() -> Self {
        Self {
            name: BOOTSTRAP_ACTOR.into(),
            role: AdminRole::Admin,
        }
    }

    /// The audit log's `actor`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What this actor may do.
    pub fn role(&self) -> AdminRole {
        self.role
    }

    /// `true` when this actor's role may make the admin request `method
    /// route` (a route under `/admin/v1`, such as `/tenants/{tenant}/suspend`):
    /// the same rule [`require_admin`] applies, for the console to show only
    /// what it may use.
    pub fn may(&self, method: &Method, route: &str) -> bool {
        self.role >= need(method, route, None).role
    }
}

/// Who signed in to the console, kept in its session instead of the token:
/// the bootstrap token, or a named key by its hash (looked up again on each
/// request, so a revoked key's sessions end at once on every replica).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    Bootstrap,
    Key([u8; 32]),
}

/// An [`Actor`] already authenticated by the console's session, set on the
/// requests the console makes of the admin API in-process. Only silo's own
/// code can put it there (a client sets headers, never extensions); the
/// role check of [`require_admin`] still applies to it.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Actor);

/// What a request takes of an admin key's role, and what it is (for the 403).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub role: AdminRole,
    pub what: &'static str,
}

const READ: Need = Need {
    role: AdminRole::Viewer,
    what: "read",
};
const CHANGE: Need = Need {
    role: AdminRole::Operator,
    what: "change anything (a viewer only reads)",
};
const MANAGE_KEYS: Need = Need {
    role: AdminRole::Admin,
    what: "see or manage admin keys",
};
const MANAGE_PLANS: Need = Need {
    role: AdminRole::Admin,
    what: "make, change or delete plans",
};
const DELETE: Need = Need {
    role: AdminRole::Admin,
    what: "delete anything",
};
const DIRECT_URI: Need = Need {
    role: AdminRole::Admin,
    what: "read a tenant role's direct connection URI (it holds the role's password)",
};
const OVERWRITE: Need = Need {
    role: AdminRole::Admin,
    what: "restore over a tenant's data (\"overwrite\": true)",
};

/// The route handing out connection URIs; `?direct=true` holds a password.
const CONNECTION: &str = "/tenants/{tenant}/connection";
/// The routes whose body may ask to overwrite a tenant's data.
const RESTORES: [&str; 2] = ["/backups/{id}/restore", "/tenants/{tenant}/restore"];

/// What a request takes, from its method, its route under `/admin/v1` (the
/// matched template, such as `/tenants/{tenant}`, or the path itself) and
/// its query. A restore's `"overwrite": true` is in its body: see
/// [`reads_overwrite`] and [`OVERWRITE`].
pub fn need(method: &Method, route: &str, query: Option<&str>) -> Need {
    if route == "/keys" || route.starts_with("/keys/") {
        MANAGE_KEYS
    } else if method == Method::DELETE {
        DELETE
    } else if (route == "/plans" || route.starts_with("/plans/"))
        && method != Method::GET
        && method != Method::HEAD
    {
        MANAGE_PLANS
    } else if matches(route, CONNECTION) && asks_direct(query) {
        DIRECT_URI
    } else if method == Method::GET || method == Method::HEAD {
        READ
    } else {
        CHANGE
    }
}

/// `true` for a route whose body may say `"overwrite": true`.
pub fn reads_overwrite(method: &Method, route: &str) -> bool {
    method == Method::POST && RESTORES.iter().any(|r| matches(route, r))
}

/// `true` when `route` (a template or a path) is `template`, a `{param}`
/// segment matching any one segment.
fn matches(route: &str, template: &str) -> bool {
    let (mut a, mut b) = (route.split('/'), template.split('/'));
    loop {
        match (a.next(), b.next()) {
            (None, None) => return true,
            (Some(x), Some(y)) if x == y || (y.starts_with('{') && y.ends_with('}')) => {}
            _ => return false,
        }
    }
}

/// `true` unless every `direct` in the query says `false` (the handler
/// accepts `true` and `false` only; anything else is read as asking).
fn asks_direct(query: Option<&str>) -> bool {
    url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .any(|(k, v)| k == "direct" && v != "false")
}

/// Whether a restore's body may ask to overwrite: `false` only for no body,
/// a body that is not JSON (its handler refuses it, 400) and an object
/// whose `overwrite` is absent or `false`. Any other JSON counts as asking
/// (an array, say: serde could read one as the body's fields in order).
fn asks_overwrite(body: &[u8]) -> bool {
    if body.iter().all(u8::is_ascii_whitespace) {
        return false;
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(v)) => v
            .get("overwrite")
            .is_some_and(|o| *o != serde_json::Value::Bool(false)),
        Ok(_) => true,
        Err(_) => false,
    }
}

/// Authenticate the request, then authorize it for its key's role; the
/// handler finds the [`Actor`] among the request's extensions.
pub async fn require_admin(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let actor = match req.extensions().get::<Authenticated>() {
        Some(Authenticated(actor)) => actor.clone(),
        None => {
            let peer = Peer::of(&state, req.extensions(), req.headers());
            authenticate(&state, peer, req.headers()).await?
        }
    };
    let mut req = authorize(&actor, req).await?;
    req.extensions_mut().insert(actor);
    Ok(next.run(req).await)
}

/// The bootstrap token, or a live admin key; 401 for anything else.
async fn authenticate(
    state: &AppState,
    peer: Peer,
    headers: &HeaderMap,
) -> Result<Actor, ApiError> {
    let presented = bearer_token(headers).ok_or(ApiError::Unauthorized)?;
    Ok(sign_in(state, peer, presented).await?.0)
}

/// Who holds the token `presented`: the bootstrap token or a live admin
/// key; 401 for anything else, counted against the client's address (429
/// once it failed too often, without looking at the token, unless that
/// token signed in on this process lately: see [`Limits::recently_good`]).
///
/// [`Limits::recently_good`]: crate::api::limits::Limits::recently_good
pub async fn sign_in(
    state: &AppState,
    Peer(peer): Peer,
    presented: &str,
) -> Result<(Actor, Holder), ApiError> {
    let hash = admin_key_hash(presented);
    let _turn = match state.limits.recently_good(&hash) {
        true => None,
        false => state.limits.authenticating(peer).await?,
    };
    let found = holder_of(state, presented, hash).await;
    match &found {
        Ok(_) => state.limits.signed_in(peer, hash, true),
        Err(ApiError::Unauthorized) => {
            state.limits.signed_in(peer, hash, false);
            state.limits.authentication_failed(peer);
        }
        Err(_) => {}
    }
    found
}

/// `hash` is the SHA-256 of `presented` (an admin key is found by it).
async fn holder_of(
    state: &AppState,
    presented: &str,
    hash: [u8; 32],
) -> Result<(Actor, Holder), ApiError> {
    if secret_eq(presented.as_bytes(), state.admin_token.expose().as_bytes()) {
        return Ok((Actor::bootstrap(), Holder::Bootstrap));
    }
    if !is_admin_key_shaped(presented) {
        return Err(ApiError::Unauthorized);
    }
    let holder = Holder::Key(hash);
    Ok((actor_of(state, &holder).await?, holder))
}

/// The actor behind a holder, now: 401 once its key is revoked.
pub async fn actor_of(state: &AppState, holder: &Holder) -> Result<Actor, ApiError> {
    let hash = match holder {
        Holder::Bootstrap => return Ok(Actor::bootstrap()),
        Holder::Key(hash) => hash,
    };
    let key = state
        .registry()
        .admin_key_holder(hash)
        .await?
        .ok_or(ApiError::Unauthorized)?;
    Ok(Actor {
        name: key.name.into(),
        role: key.role,
    })
}

/// The request back, if `actor`'s role may make it; 403 if not.
async fn authorize(actor: &Actor, req: Request) -> Result<Request, ApiError> {
    if actor.role == AdminRole::Admin {
        return Ok(req);
    }
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or(req.uri().path(), MatchedPath::as_str);
    let route = route.strip_prefix(ADMIN_PREFIX).unwrap_or(route).to_owned();
    let method = req.method().clone();
    check(actor, need(&method, &route, req.uri().query()))?;
    if !reads_overwrite(&method, &route) {
        return Ok(req);
    }
    // Read the body (within the admin body limit) and put it back.
    let (parts, body) = req.into_parts();
    let bytes = Bytes::from_request(Request::from_parts(parts.clone(), body), &()).await?;
    if asks_overwrite(&bytes) {
        check(actor, OVERWRITE)?;
    }
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

fn check(actor: &Actor, need: Need) -> Result<(), ApiError> {
    if actor.role >= need.role {
        return Ok(());
    }
    Err(ApiError::Forbidden(format!(
        "the admin key '{}' has the role {}, which may not {}: that takes the role {}",
        actor.name, actor.role, need.what, need.role
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_request_needs_the_role_its_route_and_method_say() {
        use AdminRole::{Admin, Operator, Viewer};
        let cases: &[(Method, &str, Option<&str>, AdminRole)] = &[
            (Method::GET, "/tenants", None, Viewer),
            (Method::HEAD, "/tenants/{tenant}", None, Viewer),
            (Method::GET, "/audit", Some("key=ops"), Viewer),
            (Method::GET, CONNECTION, None, Viewer),
            (Method::GET, CONNECTION, Some("direct=false"), Viewer),
            (Method::GET, CONNECTION, Some("direct=true"), Admin),
            (
                Method::GET,
                CONNECTION,
                Some("direct=false&direct=true"),
                Admin,
            ),
            (Method::GET, CONNECTION, Some("direct=1"), Admin),
            (Method::GET, CONNECTION, Some("direct"), Admin),
            (
                Method::GET,
                "/tenants/northside/connection",
                Some("direct=true"),
                Admin,
            ),
            (Method::POST, "/tenants", None, Operator),
            (Method::GET, "/plans", None, Viewer),
            (Method::GET, "/plans/{plan}", None, Viewer),
            (Method::POST, "/plans", None, Admin),
            (Method::PATCH, "/plans/{plan}", None, Admin),
            (Method::DELETE, "/plans/{plan}", None, Admin),
            (Method::PATCH, "/tenants/{tenant}", None, Operator),
            (Method::POST, "/tenants/{tenant}/suspend", None, Operator),
            (Method::POST, "/backups/{id}/restore", None, Operator),
            (Method::POST, "/servers", None, Operator),
            (Method::PUT, "/tenants", None, Operator),
            (Method::DELETE, "/tenants/{tenant}", None, Admin),
            (Method::DELETE, "/tenants/{tenant}/backups", None, Admin),
            (
                Method::DELETE,
                "/tenants/{tenant}/app-credentials/{id}",
                None,
                Admin,
            ),
            (Method::GET, "/keys", None, Admin),
            (Method::POST, "/keys", None, Admin),
            (Method::DELETE, "/keys/{name}", None, Admin),
            (Method::PATCH, "/keys/{name}", None, Admin),
            (Method::GET, "/keys/anything/else", None, Admin),
        ];
        let wrong: Vec<String> = cases
            .iter()
            .filter(|(m, route, query, role)| need(m, route, *query).role != *role)
            .map(|(m, route, query, role)| {
                format!(
                    "{m} {route}?{query:?}: {:?}, want {role:?}",
                    need(m, route, *query)
                )
            })
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn only_restores_read_their_body_for_overwrite() {
        assert!(reads_overwrite(&Method::POST, "/backups/{id}/restore"));
        assert!(reads_overwrite(&Method::POST, "/tenants/{tenant}/restore"));
        assert!(reads_overwrite(&Method::POST, "/tenants/northside/restore"));
        assert!(!reads_overwrite(&Method::POST, "/tenants/{tenant}/resume"));
        assert!(!reads_overwrite(&Method::GET, "/backups/{id}/restore"));
        for (body, asks) in [
            ("", false),
            ("{}", false),
            (r#"{"overwrite": false}"#, false),
            (r#"{"into_slug": "copy"}"#, false),
            ("not json", false),
            (r#"{"overwrite": true}"#, true),
            (r#"{"overwrite": "true"}"#, true),
            (r#"{"overwrite": null}"#, true),
            (r#"{"backup_id": null, "overwrite": 1}"#, true),
        ] {
            assert_eq!(asks_overwrite(body.as_bytes()), asks, "{body}");
        }
    }

    #[test]
    fn a_template_matches_paths_segment_by_segment() {
        assert!(matches("/tenants/{tenant}/connection", CONNECTION));
        assert!(matches("/tenants/a-b/connection", CONNECTION));
        assert!(!matches("/tenants/a/b/connection", CONNECTION));
        assert!(!matches("/tenants/a/connection/x", CONNECTION));
        assert!(!matches("/tenants/a", CONNECTION));
    }
}
