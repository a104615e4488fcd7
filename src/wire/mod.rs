//! The PostgreSQL-protocol front door: any PostgreSQL driver connects with
//! an app credential and gets its tenant's database, under the same
//! per-server connection budget as the HTTP router.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::ServerArgs;

/// How the front door listens and what it allows.
#[derive(Debug, Clone)]
pub struct WireSettings {
    pub listen: SocketAddr,
    /// `host:port` clients use (for the URIs the admin API hands out).
    pub public_address: String,
    /// PEM certificate chain and key, when TLS is on.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub require_tls: bool,
    pub max_clients: usize,
    pub max_clients_per_tenant: usize,
    pub startup_timeout: Duration,
    /// `None`: idle clients are never disconnected.
    pub client_idle_timeout: Option<Duration>,
    pub max_message_bytes: usize,
    /// Longest a client waits for a server connection (or a move's cut-over).
    pub wait_timeout: Duration,
}

impl WireSettings {
    /// From `silo serve`'s flags; `None` when the front door is off.
    pub fn from_args(args: &ServerArgs) -> Option<Self> {
        let listen = args.pg_listen.0?;
        Some(Self {
            listen,
            public_address: args
                .pg_public_address
                .clone()
                .unwrap_or_else(|| listen.to_string()),
            tls: args.pg_tls_cert.clone().zip(args.pg_tls_key.clone()),
            require_tls: args.pg_require_tls,
            max_clients: args.pg_max_clients as usize,
            max_clients_per_tenant: args.pg_max_clients_per_tenant as usize,
            startup_timeout: Duration::from_secs(args.pg_startup_timeout),
            client_idle_timeout: (args.pg_client_idle_timeout > 0)
                .then(|| Duration::from_secs(args.pg_client_idle_timeout)),
            max_message_bytes: args.pg_max_message_bytes as usize,
            wait_timeout: Duration::from_secs(args.pg_wait_timeout),
        })
    }

    /// Defaults for a listener on `listen` (tests, benches).
    pub fn on(listen: SocketAddr) -> Self {
        Self {
            listen,
            public_address: listen.to_string(),
            tls: None,
            require_tls: false,
            max_clients: 10_000,
            max_clients_per_tenant: 1_000,
            startup_timeout: Duration::from_secs(10),
            client_idle_timeout: None,
            max_message_bytes: 16 * 1024 * 1024,
            wait_timeout: Duration::from_secs(30),
        }
    }
}
