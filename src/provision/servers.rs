//! Admin connections to tenant DB servers, one small pool per server.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgConnection, PgPool};
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
