//! Admin connections to tenant DB servers, one small pool per server.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use uuid::Uuid;

use crate::crypto::Keyring;
use crate::migrate::TENANT_GROUP_ROLE;
use crate::registry::DbServer;

/// Admin connections per server per silo process: DDL for provisioning,
/// the warm pool and the sweep. Counted apart from the tenant traffic budget.
pub const ADMIN_POOL_MAX: u32 = 4;

/// Admin access to one tenant DB server.
#[derive(Clone, Debug)]
pub struct ServerAdmin {
    pub server_id: Uuid,
    /// Pool on the server's maintenance database (the admin URL's database).
    pub pool: PgPool,
    opts: PgConnectOptions,
    /// The same login for `pg_dump`/`pg_restore`.
    pub libpq: crate::backup::LibpqEnv,
}

impl ServerAdmin {
    /// A one-off admin connection to `database` on this server.
    pub async fn connect_to(&self, database: &str) -> sqlx::Result<PgConnection> {
        self.opts.clone().database(database).connect().await
    }

    /// A one-connection admin pool on `database`, for migrations. Close it after use.
    pub async fn single_pool(&self, database: &str) -> sqlx::Result<PgPool> {
        PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(self.opts.clone().database(database))
            .await
    }

    /// As [`Self::single_pool`], with no statement ever logged (not even a
    /// slow one): for statements that carry a secret.
    pub async fn quiet_pool(&self, database: &str) -> sqlx::Result<PgPool> {
        PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(
                self.opts
                    .clone()
                    .database(database)
                    .disable_statement_logging(),
            )
            .await
    }

    /// Connection options for a tenant role on its own database.
    pub fn tenant_options(&self, database: &str, role: &str, password: &str) -> PgConnectOptions {
        self.opts
            .clone()
            .database(database)
            .username(role)
            .password(password)
            .application_name("silo-tenant")
    }

    /// Run one utility statement (DDL that cannot be prepared or run in a transaction).
    pub async fn exec(&self, sql: &str) -> sqlx::Result<()> {
        sqlx::raw_sql(sql).execute(&self.pool).await.map(|_| ())
    }

    /// `SELECT 1` on the server within `timeout`, through the admin pool. If
    /// that fails (the pool is busy with DDL, holds a broken connection, or
    /// the server refuses, which sqlx retries until its acquire timeout), one
    /// direct connection settles it and names the cause.
    pub async fn ping(&self, timeout: Duration) -> Result<(), &'static str> {
        let pooled = sqlx::query("SELECT 1").execute(&self.pool);
        if let Ok(Ok(_)) = tokio::time::timeout(timeout, pooled).await {
            return Ok(());
        }
        let direct = async {
            let mut conn = self.opts.connect().await?;
            let done = sqlx::query("SELECT 1").execute(&mut conn).await.map(|_| ());
            let _ = conn.close().await;
            done
        };
        match tokio::time::timeout(timeout, direct).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(failure(&e)),
            Err(_) => Err("timed out"),
        }
    }
}

/// A fixed description of why a check failed: no host, user or URL in it.
fn failure(e: &sqlx::Error) -> &'static str {
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
            Some("28P01" | "28000") => "authentication failed",
            Some("57P03") => "not accepting connections (starting up or shutting down)",
            Some("53300") => "too many connections",
            Some("3D000") => "maintenance database does not exist",
            _ => "database error",
        },
        _ => "check failed",
    }
}

/// Admin pools by server id, built on first use from the sealed admin URL.
#[derive(Debug, Clone)]
pub struct ServerPools {
    keyring: Keyring,
    pools: Arc<RwLock<HashMap<Uuid, ServerAdmin>>>,
}

impl ServerPools {
    pub fn new(keyring: Keyring) -> Self {
        Self {
            keyring,
            pools: Default::default(),
        }
    }

    pub fn admin(&self, server: &DbServer) -> anyhow::Result<ServerAdmin> {
        if let Some(a) = self
            .pools
            .read()
            .expect("server pools lock")
            .get(&server.id)
        {
            return Ok(a.clone());
        }
        let url = self.keyring.open_string(
            &server.key_id,
            &server.admin_url_enc,
            server.id.as_bytes(),
        )?;
        let opts = admin_options(&url)?;
        let libpq = crate::backup::LibpqEnv::from_url(&url)?;
        let pool = PgPoolOptions::new()
            .max_connections(ADMIN_POOL_MAX)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(10))
            .idle_timeout(Duration::from_secs(120))
            .connect_lazy_with(opts.clone());
        let admin = ServerAdmin {
            server_id: server.id,
            pool,
            opts,
            libpq,
        };
        self.pools
            .write()
            .expect("server pools lock")
            .entry(server.id)
            .or_insert(admin.clone());
        Ok(admin)
    }
}

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

impl crate::provision::Provisioner {
    /// Check every registered server once, all at once, and record the results.
    /// A server failing checks for `unhealthy_after` becomes `unhealthy` (no
    /// new tenants); a passing check makes it `active` again. Several replicas
    /// may run this at the same time.
    pub async fn check_servers(
        &self,
        unhealthy_after: Duration,
    ) -> anyhow::Result<Vec<ServerCheck>> {
        let servers = self
            .registry()
            .servers()
            .await
            .context("list tenant servers")?;
        // Dropping the set (on shutdown) aborts the checks in flight.
        let mut set = tokio::task::JoinSet::new();
        for (i, server) in servers.into_iter().enumerate() {
            let p = self.clone();
            set.spawn(async move { (i, p.check_server(&server, unhealthy_after).await) });
        }
        let mut checks = Vec::new();
        while let Some(done) = set.join_next().await {
            let (i, check) = done.context("join a server health check")?;
            checks.push((i, check?));
        }
        checks.sort_by_key(|(i, _)| *i);
        Ok(checks.into_iter().map(|(_, c)| c).collect())
    }

    async fn check_server(
        &self,
        server: &DbServer,
        unhealthy_after: Duration,
    ) -> anyhow::Result<ServerCheck> {
        let error = match self.servers().admin(server) {
            Ok(admin) => admin.ping(HEALTH_CHECK_TIMEOUT).await.err(),
            Err(e) => {
                tracing::warn!(server = %server.name, "failed to open the server's admin URL: {e:#}");
                Some("admin URL could not be opened")
            }
        };
        let reg = self.registry();
        let change = match error {
            None => reg.record_server_ok(server.id).await,
            Some(e) => {
                reg.record_server_failure(server.id, e, unhealthy_after)
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
}

/// Parse an admin URL; the error never repeats the URL (it holds a password).
pub fn admin_options(url: &str) -> anyhow::Result<PgConnectOptions> {
    let opts: PgConnectOptions = url
        .parse()
        .map_err(|_| anyhow::anyhow!("not a valid postgres:// connection URL"))?;
    Ok(opts
        .application_name("silo-admin")
        .log_statements(tracing::log::LevelFilter::Trace))
}

/// An admin URL that could not be used to connect (the caller's input is wrong).
#[derive(Debug, thiserror::Error)]
#[error("could not connect to the server with its admin URL")]
pub struct ServerUnreachable;

/// Check an admin URL works and prepare the server: create the tenant group role.
pub async fn prepare_server(url: &str) -> anyhow::Result<()> {
    // A one-connection pool, not a bare connection: `&mut PgConnection` with
    // `raw_sql` defeats `Send` inference in handlers (a rustc limitation).
    let db = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(admin_options(url)?)
        .await
        .map_err(|e| {
            tracing::warn!("failed to connect to a tenant server: {e}");
            ServerUnreachable
        })?;
    let created = sqlx::raw_sql(&format!(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{TENANT_GROUP_ROLE}') THEN
             CREATE ROLE {TENANT_GROUP_ROLE} NOLOGIN;
           END IF;
         END $$"
    ))
    .execute(&db)
    .await;
    db.close().await;
    match created {
        Ok(_) => Ok(()),
        // Another replica created it at the same moment.
        Err(e) if crate::provision::sql_state(&e).as_deref() == Some("23505") => Ok(()),
        Err(e) => Err(e).context("create the tenant group role"),
    }
}
