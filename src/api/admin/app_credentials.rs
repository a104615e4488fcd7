//! `/admin/v1/tenants/{tenant}/app-credentials` and `/connection`: the logins
//! PostgreSQL clients use at silo's front door, and where to connect.
//!
//! A credential's password is made here, shown once (in the answer that
//! made or rotated it) and never stored: the registry keeps only its
//! SCRAM-SHA-256 verifier. The connection route hands out the front door's
//! URI, which holds no secret; `?direct=true` the tenant role's own URI,
//! with its password, and that is audited.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Extension;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgConnectOptions;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::tenants::resolve;
use crate::api::auth::Actor;
use crate::api::error::{ApiError, ApiResult, Json, Path, Query};
use crate::api::responses::{AdminErrors, JsonBody, QueryErrors};
use crate::api::AppState;
use crate::domain::{CredentialName, PoolMode};
use crate::registry::LIVE_NAME_INDEX;
use crate::registry::{AppCredential, AppCredentialView, TenantRecord, TenantStatus};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_app_credential, list_app_credentials))
        .routes(routes!(revoke_app_credential))
        .routes(routes!(rotate_app_credential))
        .routes(routes!(connection))
}

/// Length of a credential's password: 32 random alphanumeric characters,
/// about 190 bits, as the tenant roles' (see `servers::scram`).
const PASSWORD_LEN: usize = 32;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAppCredentialBody {
    /// `^[a-z][a-z0-9_-]{0,62}$`, unique among the tenant's live
    /// credentials; also the `user` clients log in with.
    name: String,
    /// Log in as the tenant's reader role: SELECT only (made with the
    /// tenant's first read-only credential). Default `false`.
    #[serde(default)]
    read_only: bool,
    /// `session` (default) or `transaction`.
    #[serde(default)]
    pool_mode: PoolMode,
}

/// A credential with its password: answered once, by the request that made
/// or rotated it. No `Debug`: it holds the password.
#[derive(Serialize, ToSchema)]
pub struct IssuedAppCredential {
    #[serde(flatten)]
    credential: AppCredentialView,
    /// Shown only in this answer; silo keeps a SCRAM-SHA-256 verifier of it.
    password: String,
    /// `postgres://{user}:{password}@{front door}/{tenant slug}`; `null`
    /// when the front door is off (`SILO_PG_LISTEN` empty).
    uri: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AppCredentialList {
    /// Live credentials, oldest first (no password, no verifier).
    items: Vec<AppCredentialView>,
}

/// Make an app credential; its password is in this answer only.
#[utoipa::path(post, path = "/tenants/{tenant}/app-credentials", tag = "app-credentials",
    request_body = CreateAppCredentialBody,
    params(("tenant" = String, Path, description = "slug or id")),
    responses(
        (status = 201, body = IssuedAppCredential),
        AdminErrors, JsonBody,
        (status = 404, description = "no such tenant (or it is deleted)"),
        (status = 409, description = "the tenant has a live credential of this name, it is being \
            deleted, or (for a read-only credential) it is neither active nor suspended"),
        (status = 422, description = "the body does not fit, or the name is malformed"),
    ))]
async fn create_app_credential(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(tenant): Path<String>,
    Json(body): Json<CreateAppCredentialBody>,
) -> ApiResult<(StatusCode, Json<IssuedAppCredential>)> {
    let name = CredentialName::parse(&body.name)?;
    let t = live_tenant(&state, &tenant).await?;
    if t.status == TenantStatus::Deleting {
        return Err(ApiError::Conflict("the tenant is being deleted".into()));
    }
    if body.read_only {
        // Its logins go through the tenant's reader role: made now if need be.
        state.control.provisioner().ensure_reader(t.id).await?;
    }
    let password = crate::crypto::random_password(PASSWORD_LEN);
    let verifier = crate::servers::scram::verifier(&password);
    let c = state
        .registry()
        .create_app_credential(
            t.id,
            name.as_str(),
            body.read_only,
            body.pool_mode,
            &verifier,
            actor.name(),
        )
        .await
        .map_err(|e| {
            if e.is_unique_violation(LIVE_NAME_INDEX) {
                ApiError::Conflict(format!(
                    "the tenant has a live app credential named '{}'; revoke it or choose another name",
                    name.as_str()
                ))
            } else {
                e.into()
            }
        })?;
    Ok((StatusCode::CREATED, Json(issued(&state, &t, &c, password))))
}

/// A tenant's live app credentials (never a password or verifier).
#[utoipa::path(get, path = "/tenants/{tenant}/app-credentials", tag = "app-credentials",
    params(("tenant" = String, Path, description = "slug or id")),
    responses((status = 200, body = AppCredentialList), AdminErrors,
        (status = 404, description = "no such tenant (or it is deleted)")))]
async fn list_app_credentials(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
) -> ApiResult<Json<AppCredentialList>> {
    let t = live_tenant(&state, &tenant).await?;
    let items = state.registry().app_credentials(t.id).await?;
    Ok(Json(AppCredentialList {
        items: items.iter().map(AppCredentialView::from).collect(),
    }))
}

/// Revoke an app credential: it can no longer log in, and the front doors
/// end its sessions. Its name may be used again.
#[utoipa::path(delete, path = "/tenants/{tenant}/app-credentials/{id}", tag = "app-credentials",
    params(("tenant" = String, Path, description = "slug or id"), ("id" = String, Path)),
    responses((status = 204, description = "revoked"), AdminErrors,
        (status = 404, description = "no such tenant, or no live credential of it with this id")))]
async fn revoke_app_credential(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path((tenant, id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let t = live_tenant(&state, &tenant).await?;
    let id = credential_id(&id)?;
    state
        .registry()
        .revoke_app_credential(t.id, id, actor.name())
        .await?
        .ok_or_else(|| ApiError::not_found("app credential"))?;
    Ok(StatusCode::NO_CONTENT)
}

/// Give an app credential a new password (in this answer only). Sessions
/// logged in with the old one go on; new logins need the new one.
#[utoipa::path(post, path = "/tenants/{tenant}/app-credentials/{id}/rotate", tag = "app-credentials",
    params(("tenant" = String, Path, description = "slug or id"), ("id" = String, Path)),
    responses((status = 200, body = IssuedAppCredential), AdminErrors,
        (status = 404, description = "no such tenant, or no live credential of it with this id")))]
async fn rotate_app_credential(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path((tenant, id)): Path<(String, String)>,
) -> ApiResult<Json<IssuedAppCredential>> {
    let t = live_tenant(&state, &tenant).await?;
    let id = credential_id(&id)?;
    let password = crate::crypto::random_password(PASSWORD_LEN);
    let verifier = crate::servers::scram::verifier(&password);
    let c = state
        .registry()
        .rotate_app_credential(t.id, id, &verifier, actor.name())
        .await?
        .ok_or_else(|| ApiError::not_found("app credential"))?;
    Ok(Json(issued(&state, &t, &c, password)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ConnectionParams {
    /// `true`: the tenant role's own URI on its server, with its password
    /// (audited); default: the front door's, with no secret.
    direct: Option<bool>,
}

/// Where to connect. No `Debug`: a direct URI holds a password.
#[derive(Serialize, ToSchema)]
pub struct TenantConnection {
    /// Front door: `postgres://{host}:{port}/{slug}`, no user or password
    /// (add an app credential's). Direct: the tenant role's own URI,
    /// password included.
    uri: String,
    host: String,
    port: u16,
    database: String,
    /// The tenant role (direct); `null` at the front door, where the user
    /// is an app credential's name.
    user: Option<String>,
}

/// How to connect to a tenant's database: through silo's PostgreSQL front
/// door (with an app credential), or, with `direct=true`, straight to its
/// server as the tenant's own role (the answer holds that role's password;
/// the request is audited as `tenant.connection.direct`).
#[utoipa::path(get, path = "/tenants/{tenant}/connection", tag = "app-credentials",
    params(("tenant" = String, Path, description = "slug or id"), ConnectionParams),
    responses((status = 200, body = TenantConnection), AdminErrors, QueryErrors,
        (status = 404, description = "no such tenant (or it is deleted)"),
        (status = 409, description = "the front door is off (`SILO_PG_LISTEN` empty); direct: the \
            tenant is not active, or its role's password is being rotated (retry shortly)")))]
async fn connection(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(tenant): Path<String>,
    Query(params): Query<ConnectionParams>,
) -> ApiResult<Json<TenantConnection>> {
    let t = live_tenant(&state, &tenant).await?;
    if params.direct == Some(true) {
        return direct_connection(&state, &actor, &t).await.map(Json);
    }
    let address = state.pg_address.as_deref().ok_or_else(|| {
        ApiError::Conflict(
            "the PostgreSQL front door is off (SILO_PG_LISTEN is empty); ask for ?direct=true \
             to connect to the tenant's server"
                .into(),
        )
    })?;
    let (host, port) = split_address(address);
    Ok(Json(TenantConnection {
        uri: format!("postgres://{address}/{}", encode(&t.slug)),
        host,
        port,
        database: t.slug.clone(),
        user: None,
    }))
}

/// The tenant role's URI on its server (the host and port silo reaches it
/// at), audited.
async fn direct_connection(
    state: &AppState,
    actor: &Actor,
    t: &TenantRecord,
) -> ApiResult<TenantConnection> {
    if t.status != TenantStatus::Active {
        return Err(ApiError::Conflict(format!(
            "the tenant is {}: its role logs in only while it is active",
            t.status.as_str()
        )));
    }
    if t.pending_password_enc.is_some() {
        return Err(ApiError::Conflict(
            "the tenant role's password is being rotated; retry shortly".into(),
        ));
    }
    let keyring = state.control.keyring();
    let password = keyring
        .open_string(&t.key_id, &t.password_enc, t.id.as_bytes())
        .map_err(|e| anyhow::Error::from(e).context("decrypt tenant credentials"))?;
    let server = state
        .registry()
        .server(t.server_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("find the tenant's server"))?;
    let url = keyring
        .open_string(&server.key_id, &server.admin_url_enc, server.id.as_bytes())
        .map_err(|e| anyhow::Error::from(e).context("decrypt server admin URL"))?;
    let opts = crate::servers::admin_options(&url)?;
    let (uri, host, port) = direct_uri(&opts, &t.role_name, &password, &t.database_name);
    state
        .registry()
        .audit(
            actor.name(),
            "tenant.connection.direct",
            Some(t.id),
            serde_json::json!({
                "server": server.name,
                "database": t.database_name,
                "role": t.role_name,
            }),
        )
        .await?;
    Ok(TenantConnection {
        uri,
        host,
        port,
        database: t.database_name.clone(),
        user: Some(t.role_name.clone()),
    })
}

/// `role`'s URI on its `database`, on the server silo reaches with `opts`
/// (by TCP or in a Unix-socket directory, with the same `sslmode` unless it
/// is the default), and the host (or socket directory) and port it names.
fn direct_uri(
    opts: &PgConnectOptions,
    role: &str,
    password: &str,
    database: &str,
) -> (String, String, u16) {
    let port = opts.get_port();
    let (host, authority) = match opts.get_socket() {
        // A socket directory is the host, percent-encoded (libpq and sqlx
        // both read it so).
        Some(dir) => {
            let dir = dir.to_string_lossy().into_owned();
            let authority = format!("{}:{port}", encode(&dir));
            (dir, authority)
        }
        // An IPv6 address is bracketed in the URI, not in `host`.
        None => {
            let host = opts
                .get_host()
                .trim_start_matches('[')
                .trim_end_matches(']');
            let authority = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            (host.to_owned(), authority)
        }
    };
    let query = ssl_mode(opts.get_ssl_mode())
        .map(|mode| format!("?sslmode={mode}"))
        .unwrap_or_default();
    let uri = format!(
        "postgres://{}:{}@{authority}/{}{query}",
        encode(role),
        encode(password),
        encode(database)
    );
    (uri, host, port)
}

/// The tenant named, unless it is deleted (404 then, as for no tenant).
async fn live_tenant(state: &AppState, slug_or_id: &str) -> ApiResult<TenantRecord> {
    let t = resolve(state, slug_or_id).await?;
    if t.status == TenantStatus::Deleted {
        return Err(ApiError::not_found("tenant"));
    }
    Ok(t)
}

/// A credential id of the path; one that is not a UUID names nothing (404).
fn credential_id(id: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found("app credential"))
}

/// The answer that shows a credential's new password, with its front-door URI.
fn issued(
    state: &AppState,
    t: &TenantRecord,
    c: &AppCredential,
    password: String,
) -> IssuedAppCredential {
    let uri = state.pg_address.as_deref().map(|address| {
        format!(
            "postgres://{}:{}@{address}/{}",
            encode(&c.name),
            encode(&password),
            encode(&t.slug)
        )
    });
    IssuedAppCredential {
        credential: AppCredentialView::from(c),
        password,
        uri,
    }
}

/// Everything but RFC 3986's unreserved characters is percent-encoded: safe
/// in a URI's user, password, path and query value alike.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn encode(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

/// `host` and `port` of a `host:port` (`[v6]:port` too); a bare host means
/// PostgreSQL's default port, as a driver reading the URI would take it.
fn split_address(address: &str) -> (String, u16) {
    const DEFAULT_PORT: u16 = 5432;
    if let Some((host, port)) = address.rsplit_once(':') {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(port) = port.parse() {
            if !host.is_empty() && (!host.contains(':') || address.starts_with('[')) {
                return (host.to_owned(), port);
            }
        }
    }
    let host = address.trim_start_matches('[').trim_end_matches(']');
    (host.to_owned(), DEFAULT_PORT)
}

/// The `sslmode` a client needs to match how silo reaches the server, when
/// it is not libpq's default (`prefer`).
fn ssl_mode(mode: sqlx::postgres::PgSslMode) -> Option<&'static str> {
    use sqlx::postgres::PgSslMode as M;
    match mode {
        M::Prefer => None,
        M::Disable => Some("disable"),
        M::Allow => Some("allow"),
        M::Require => Some("require"),
        M::VerifyCa => Some("verify-ca"),
        M::VerifyFull => Some("verify-full"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_split_into_host_and_port() {
        for (address, host, port) in [
            ("127.0.0.1:6432", "127.0.0.1", 6432),
            ("db.example.com:5433", "db.example.com", 5433),
            ("[::1]:6432", "::1", 6432),
            ("db.example.com", "db.example.com", 5432),
            ("::1", "::1", 5432),
        ] {
            assert_eq!(split_address(address), (host.to_owned(), port), "{address}");
        }
    }

    #[test]
    fn a_direct_uri_reaches_the_server_as_silo_does_with_the_role_instead() {
        let cases = [
            (
                "postgres://admin:s3cret@127.0.0.1:5433/postgres",
                "postgres://silo_r_1:p%40ss@127.0.0.1:5433/silo_t_1",
                "127.0.0.1",
                5433,
            ),
            (
                "postgres://admin:s3cret@pg-2.internal/postgres?sslmode=verify-full&sslrootcert=/etc/ca.pem",
                "postgres://silo_r_1:p%40ss@pg-2.internal:5432/silo_t_1?sslmode=verify-full",
                "pg-2.internal",
                5432,
            ),
            (
                "postgres://admin@%2Fvar%2Frun%2Fpostgresql:5434/postgres",
                "postgres://silo_r_1:p%40ss@%2Fvar%2Frun%2Fpostgresql:5434/silo_t_1",
                "/var/run/postgresql",
                5434,
            ),
            (
                "postgres://admin:s3cret@localhost/postgres?host=/var/run/postgresql&port=5434",
                "postgres://silo_r_1:p%40ss@%2Fvar%2Frun%2Fpostgresql:5434/silo_t_1",
                "/var/run/postgresql",
                5434,
            ),
            (
                "postgres://admin:s3cret@[::1]:5432/postgres",
                "postgres://silo_r_1:p%40ss@[::1]:5432/silo_t_1",
                "::1",
                5432,
            ),
        ];
        for (admin_url, uri, host, port) in cases {
            let opts = crate::servers::admin_options(admin_url).expect(admin_url);
            assert_eq!(
                direct_uri(&opts, "silo_r_1", "p@ss", "silo_t_1"),
                (uri.to_owned(), host.to_owned(), port),
                "{admin_url}"
            );
            // It reads back as the same server, role and database.
            let back: PgConnectOptions = uri.parse().unwrap();
            assert_eq!(back.get_port(), port, "{uri}");
            assert_eq!(
                back.get_socket().is_some(),
                opts.get_socket().is_some(),
                "{uri}"
            );
            assert_eq!(back.get_username(), "silo_r_1", "{uri}");
            assert_eq!(back.get_database(), Some("silo_t_1"), "{uri}");
        }
    }

    #[test]
    fn uri_components_are_percent_encoded_except_unreserved() {
        assert_eq!(encode("app_user-1.x~"), "app_user-1.x~");
        assert_eq!(encode("p@ss:w/rd?#%"), "p%40ss%3Aw%2Frd%3F%23%25");
        assert_eq!(encode("/var/run/pg"), "%2Fvar%2Frun%2Fpg");
    }
}
