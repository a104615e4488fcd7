//! Health checks of the tenant servers: `SELECT 1` with a timeout, results
//! recorded in the registry so that placement skips unhealthy servers.

use std::time::Duration;

use anyhow::Context;
use uuid::Uuid;

use super::ServerPools;
use crate::registry::{DbServer, Registry};

/// How long one health check of a server may take (per attempt).
pub const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// The outcome of one server's health check.
#[derive(Debug, Clone)]
pub struct ServerCheck {
    pub server_id: Uuid,
    pub name: String,
    /// Why the check failed; `None` if it passed.
    pub error: Option<&'static str>,
    /// The server's status after the check.
    pub status: String,
}

/// Check every registered server once, all at once, and record the results.
/// A server failing checks for `unhealthy_after` becomes `unhealthy` (no new
/// tenants); a passing check makes it `active` again. Several replicas may run
/// this at the same time.
pub async fn check_all(
    registry: &Registry,
    pools: &ServerPools,
    unhealthy_after: Duration,
) -> anyhow::Result<Vec<ServerCheck>> {
    let servers = registry.servers().await.context("list tenant servers")?;
    let control = registry
        .control_id()
        .await
        .context("read the control plane's identity")?;
    // Dropping the set (on shutdown) aborts the checks in flight.
    let mut set = tokio::task::JoinSet::new();
    for (i, server) in servers.into_iter().enumerate() {
        let (registry, pools) = (registry.clone(), pools.clone());
        set.spawn(async move {
            let check = check_one(&registry, &pools, &server, control, unhealthy_after).await;
            (i, check)
        });
    }
    let mut checks = Vec::new();
    while let Some(done) = set.join_next().await {
        let (i, check) = done.context("join a server health check")?;
        checks.push((i, check?));
    }
    checks.sort_by_key(|(i, _)| *i);
    Ok(checks.into_iter().map(|(_, c)| c).collect())
}

/// Check one server now and record the result, as [`check_all`] does.
pub async fn check_server(
    registry: &Registry,
    pools: &ServerPools,
    server: &DbServer,
    unhealthy_after: Duration,
) -> anyhow::Result<ServerCheck> {
    let control = registry
        .control_id()
        .await
        .context("read the control plane's identity")?;
    check_one(registry, pools, server, control, unhealthy_after).await
}

async fn check_one(
    registry: &Registry,
    pools: &ServerPools,
    server: &DbServer,
    control: Uuid,
    unhealthy_after: Duration,
) -> anyhow::Result<ServerCheck> {
    let error = match pools.admin(server) {
        Ok(admin) => match admin.ping(HEALTH_CHECK_TIMEOUT).await {
            Ok(()) => owned(&admin, control, server.id).await,
            Err(e) => Some(e),
        },
        Err(e) => {
            tracing::warn!(server = %server.name, "failed to open the server's admin URL: {e:#}");
            Some("admin URL could not be opened")
        }
    };
    let change = match error {
        None => registry.record_server_ok(server.id).await,
        Some(e) => {
            registry
                .record_server_failure(server.id, e, unhealthy_after)
                .await
        }
    }
    .context("record a server health check")?;
    let status = match change {
        Some((before, after)) => {
            if before != after && after == "unhealthy" {
                tracing::warn!(
                    server = %server.name,
                    "tenant server is unhealthy after failing checks for {unhealthy_after:?} ({}); it gets no new tenants",
                    error.unwrap_or("unknown")
                );
            } else if before != after && before == "unhealthy" {
                tracing::info!(server = %server.name, "tenant server passed its health check and is active again");
            } else if let Some(e) = error {
                tracing::debug!(server = %server.name, "tenant server health check failed: {e}");
            }
            after
        }
        // Removed meanwhile.
        None => server.status.clone(),
    };
    Ok(ServerCheck {
        server_id: server.id,
        name: server.name.clone(),
        error,
        status,
    })
}

/// Why the server's cluster is not this server's to use, if it is not (its
/// ownership marker names another server row or control plane): then it
/// gets no new tenants, and the reconciler leaves it alone.
async fn owned(admin: &super::ServerAdmin, control: Uuid, server: Uuid) -> Option<&'static str> {
    let me = super::owner::Owner { control, server };
    match super::owner::check(admin, me).await {
        Ok(state) if state.refusal().is_some() => {
            Some("its cluster belongs to another server or control plane (registered twice?)")
        }
        _ => None,
    }
}

/// A fixed description of why a check failed: no host, user or URL in it.
/// What a check says when the server refuses silo's admin login.
pub(super) const AUTH_FAILED: &str = "authentication failed";

pub(super) fn failure(e: &sqlx::Error) -> &'static str {
    use super::sqlstate;
    use std::io::ErrorKind;
    match e {
        sqlx::Error::Io(io) => match io.kind() {
            ErrorKind::ConnectionRefused => "connection refused",
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => "connection reset",
            ErrorKind::TimedOut => "timed out",
            ErrorKind::UnexpectedEof | ErrorKind::BrokenPipe => "connection closed",
            ErrorKind::NotFound => "host not found",
            _ => "network error",
        },
        sqlx::Error::Tls(_) => "TLS error",
        sqlx::Error::PoolTimedOut => "timed out",
        sqlx::Error::PoolClosed => "admin pool closed",
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some(sqlstate::INVALID_PASSWORD | sqlstate::INVALID_AUTHORIZATION) => AUTH_FAILED,
            Some(sqlstate::CANNOT_CONNECT_NOW) => {
                "not accepting connections (starting up or shutting down)"
            }
            Some(sqlstate::TOO_MANY_CONNECTIONS) => "too many connections",
            Some(sqlstate::INVALID_CATALOG_NAME) => "maintenance database does not exist",
            _ => "database error",
        },
        _ => "check failed",
    }
}
