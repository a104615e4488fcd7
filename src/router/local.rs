//! Reaching a tenant server on this machine through its Unix socket: no TCP
//! handshake and no TLS negotiation for each tenant connection.
//!
//! Used only when the admin URL names a loopback host, a socket of the
//! server's port exists in one of the directories the server reports
//! (`unix_socket_directories`), and a login through it reaches the same
//! cluster (same port and postmaster start time). If tenant logins are
//! then refused on the socket (`pg_hba.conf` may treat local logins
//! differently), the pool falls back to TCP for good.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection, PgConnection};

/// Longest each probe connection may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Which cluster a connection reached: its port and postmaster start time.
const IDENTITY: &str =
    "SELECT current_setting('port') || '@' || pg_postmaster_start_time()::text, \
     current_setting('unix_socket_directories')";

/// The Unix socket directory of the server `admin` reaches over TCP, when
/// it is this machine's and the same cluster answers there.
pub async fn socket_of(admin: &PgConnectOptions) -> Option<PathBuf> {
    let host = admin.get_host();
    if admin.get_socket().is_some() || host.starts_with('/') {
        return None; // already a socket
    }
    let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return None;
    }
    let (identity, dirs) = identify(admin).await?;
    for dir in dirs.split(',').map(str::trim) {
        let dir = Path::new(dir);
        if !dir.is_absolute() || !dir.join(format!(".s.PGSQL.{}", admin.get_port())).exists() {
            continue;
        }
        let local = admin.clone().socket(dir).ssl_mode(PgSslMode::Disable);
        if let Some((same, _)) = identify(&local).await {
            if same == identity {
                tracing::info!(socket = %dir.display(), "tenant connections to this server go through its Unix socket");
                return Some(dir.to_path_buf());
            }
        }
    }
    None
}

async fn identify(opts: &PgConnectOptions) -> Option<(String, String)> {
    let mut conn: PgConnection = tokio::time::timeout(PROBE_TIMEOUT, opts.connect())
        .await
        .ok()?
        .ok()?;
    let found = sqlx::query_as(IDENTITY).fetch_one(&mut conn).await.ok();
    let _ = tokio::time::timeout(PROBE_TIMEOUT, conn.close()).await;
    found
}
