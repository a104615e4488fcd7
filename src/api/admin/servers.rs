//! `/admin/v1/servers`: tenant DB servers.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Extension;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::auth::Actor;
use crate::api::error::{ApiError, ApiResult, Json, Path};
use crate::api::responses::{AdminErrors, JsonBody};
use crate::api::AppState;
use crate::config::{DEFAULT_SERVER_MAX_CONNECTIONS, DEFAULT_SERVER_MAX_TENANTS};
use crate::domain::ServerName;
use crate::registry::DbServer;
use crate::servers::{AlreadyRegistered, MissingPrivilege, OtherCluster, ServerUnreachable};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_servers, create_server))
        .routes(routes!(update_server))
}

/// Limits a server may be given, on create and on update.
const MAX_CONNECTIONS_RANGE: std::ops::RangeInclusive<i32> = 1..=100_000;
const MAX_TENANTS_RANGE: std::ops::RangeInclusive<i32> = 1..=1_000_000;

fn check_limits(max_connections: Option<i32>, max_tenants: Option<i32>) -> ApiResult<()> {
    if max_connections.is_some_and(|n| !MAX_CONNECTIONS_RANGE.contains(&n)) {
        return Err(ApiError::invalid(format!(
            "max_connections must be {} to {}",
            MAX_CONNECTIONS_RANGE.start(),
            MAX_CONNECTIONS_RANGE.end()
        )));
    }
    if max_tenants.is_some_and(|n| !MAX_TENANTS_RANGE.contains(&n)) {
        return Err(ApiError::invalid(format!(
            "max_tenants must be {} to {}",
            MAX_TENANTS_RANGE.start(),
            MAX_TENANTS_RANGE.end()
        )));
    }
    Ok(())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateServerBody {
    name: String,
    /// postgres:// URL of a role with CREATEDB and CREATEROLE. Stored encrypted, never shown.
    admin_url: String,
    max_connections: Option<i32>,
    max_tenants: Option<i32>,
}

/// Registered tenant DB servers (admin URLs are never shown).
#[utoipa::path(get, path = "/servers", tag = "servers", responses((status = 200, body = Vec<DbServer>), AdminErrors))]
async fn list_servers(State(state): State<AppState>) -> ApiResult<Json<Vec<DbServer>>> {
    Ok(Json(state.registry().servers().await?))
}

/// Register a tenant DB server; its admin URL is checked by connecting.
#[utoipa::path(post, path = "/servers", tag = "servers", request_body = CreateServerBody,
    responses((status = 201, body = DbServer), AdminErrors, JsonBody,
        (status = 409, description = "a server with this name exists, or its cluster is registered already (under any name) or owned by another control plane"),
        (status = 422, description = "a value is invalid, or `admin_url` does not connect")))]
async fn create_server(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Json(body): Json<CreateServerBody>,
) -> ApiResult<(StatusCode, Json<DbServer>)> {
    let name = ServerName::parse(&body.name)?;
    let max_connections = body
        .max_connections
        .unwrap_or(DEFAULT_SERVER_MAX_CONNECTIONS);
    let max_tenants = body.max_tenants.unwrap_or(DEFAULT_SERVER_MAX_TENANTS);
    check_limits(Some(max_connections), Some(max_tenants))?;
    crate::servers::admin_options(&body.admin_url)
        .map_err(|e| ApiError::invalid(format!("admin_url: {e}")))?;
    let server = state
        .control
        .register_server(name.as_str(), &body.admin_url, max_connections, max_tenants)
        .await
        .map_err(|e| match e.downcast_ref::<crate::registry::Error>() {
            Some(db) if db.is_unique_violation("db_servers_name_key") => {
                ApiError::Conflict(format!("a server named '{}' exists", body.name))
            }
            _ if e.downcast_ref::<AlreadyRegistered>().is_some() => {
                ApiError::Conflict(e.to_string())
            }
            // The URL did not connect: the client's input, not our fault. No URL in the answer.
            _ if e.downcast_ref::<ServerUnreachable>().is_some() => {
                ApiError::invalid("admin_url: could not connect to the server with it")
            }
            _ if e.downcast_ref::<MissingPrivilege>().is_some() => {
                ApiError::invalid(format!("admin_url: {e}"))
            }
            // Down is 503, anything else 500.
            _ => ApiError::from(crate::ops::Error::Internal(e)),
        })?;
    state
        .registry()
        .audit(
            actor.name(),
            "server.create",
            None,
            serde_json::json!({"server": server.name}),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(server)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateServerBody {
    /// `active` or `draining` (no new tenants; its tenants stay). `unhealthy`
    /// is set by health checks only.
    status: Option<String>,
    /// Takes effect in a router when it next builds the server's budget (restart).
    max_connections: Option<i32>,
    /// Lower than the server's tenant count makes it full; no tenant moves.
    max_tenants: Option<i32>,
    /// A new admin URL for the same cluster (its login's password changed):
    /// checked as at registration (it must connect, with the same powers,
    /// to the cluster the server is), then sealed; never echoed.
    admin_url: Option<String>,
}

/// Drain a server or make it active again, change its limits, or give it
/// a new admin URL for the same cluster.
#[utoipa::path(patch, path = "/servers/{name}", tag = "servers", request_body = UpdateServerBody,
    params(("name" = String, Path, description = "server name")),
    responses((status = 200, body = DbServer), AdminErrors, JsonBody,
        (status = 404, description = "no such server")))]
async fn update_server(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
    Json(body): Json<UpdateServerBody>,
) -> ApiResult<Json<DbServer>> {
    // No server has a name that is not a server name.
    let name = ServerName::parse(&name).map_err(|_| ApiError::not_found("server"))?;
    match body.status.as_deref() {
        None | Some("active" | "draining") => {}
        Some("unhealthy") => {
            return Err(ApiError::invalid(
                "status 'unhealthy' is set by health checks, not by hand",
            ))
        }
        Some(_) => return Err(ApiError::invalid("status must be 'active' or 'draining'")),
    }
    check_limits(body.max_connections, body.max_tenants)?;
    if let Some(url) = &body.admin_url {
        crate::servers::admin_options(url)
            .map_err(|e| ApiError::invalid(format!("admin_url: {e}")))?;
        let server = state
            .registry()
            .server_by_name(name.as_str())
            .await?
            .ok_or_else(|| ApiError::not_found("server"))?;
        state
            .control
            .change_server_admin_url(&server, url)
            .await
            .map_err(admin_url_refused)?;
    }
    // Checked with the new admin URL, if the request gives one.
    if body.status.as_deref() == Some("active") {
        refuse_if_still_unhealthy(&state, &name).await?;
    }
    let server = state
        .registry()
        .update_server(
            name.as_str(),
            body.status.as_deref(),
            body.max_connections,
            body.max_tenants,
        )
        .await?
        .ok_or_else(|| ApiError::not_found("server"))?;
    state
        .registry()
        .audit(
            actor.name(),
            "server.update",
            None,
            serde_json::json!({
                "server": server.name,
                "status": body.status,
                "max_connections": body.max_connections,
                "max_tenants": body.max_tenants,
                "admin_url_changed": body.admin_url.is_some(),
            }),
        )
        .await?;
    Ok(Json(server))
}

/// An `unhealthy` server made `active` by hand: checked now, and refused
/// (409, nothing changed) unless the check passes, which makes it `active`;
/// otherwise new tenants would be placed on a server that does not answer.
async fn refuse_if_still_unhealthy(state: &AppState, name: &ServerName) -> ApiResult<()> {
    let Some(server) = state.registry().server_by_name(name.as_str()).await? else {
        return Ok(());
    };
    if server.status != "unhealthy" {
        return Ok(());
    }
    let check = state
        .control
        .check_server(&server)
        .await
        .map_err(|e| ApiError::from(crate::ops::Error::Internal(e)))?;
    match check.error {
        None => Ok(()),
        Some(e) => Err(ApiError::Conflict(format!(
            "server '{}' is unhealthy (checked now: {e}); it becomes active by itself once a health check passes",
            server.name
        ))),
    }
}

/// Why a new admin URL was refused, as a clear answer (no URL in it).
fn admin_url_refused(e: anyhow::Error) -> ApiError {
    if e.downcast_ref::<ServerUnreachable>().is_some() {
        ApiError::invalid("admin_url: could not connect to the server with it")
    } else if e.downcast_ref::<MissingPrivilege>().is_some()
        || e.downcast_ref::<OtherCluster>().is_some()
    {
        ApiError::invalid(format!("admin_url: {e}"))
    } else {
        ApiError::from(crate::ops::Error::Internal(e))
    }
}
