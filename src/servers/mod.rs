//! Admin access to tenant DB servers, shared by every feature that changes
//! them: one small admin pool per server ([`ServerPools`]), the roles silo
//! gives tenants ([`roles`]), the names it gives what it creates
//! ([`names`]), the tenant schema ([`schema`]), `pg_dump`/`pg_restore`
//! ([`tools`]), SQLSTATE names ([`sqlstate`]) and health checks.
//!
//! This module uses the registry only; the features (provisioning, backups,
//! relocation, fleet migrations) use it.

mod health;
pub mod names;
pub mod owner;
pub mod readers;
pub mod roles;
pub mod schema;
pub mod scram;
pub mod sqlstate;
pub mod tools;

pub use health::{check_all, check_server, ServerCheck, HEALTH_CHECK_TIMEOUT};
pub use schema::TenantSchema;
pub use tools::{LibpqEnv, PgTools};

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use uuid::Uuid;

use crate::crypto::Keyring;
use crate::registry::{DbServer, Registry};

/// Admin connections per server per silo process: DDL for provisioning,
/// the warm pool and the sweep. Counted apart from the tenant traffic budget.
pub const ADMIN_POOL_MAX: u32 = 4;

/// A statement on a tenant server failed: names the server (and the
/// database, when not the maintenance one), so an operator looks in the
/// right place.
#[derive(Debug, thiserror::Error)]
#[error("tenant server '{server}'{}", .database.as_deref().map(|d| format!(", database {d}")).unwrap_or_default())]
pub struct Error {
    pub server: String,
    pub database: Option<String>,
    /// The tenant role the failed connection logged in as; `None`: silo's
    /// admin login (a refused admin login means the server's admin URL is
    /// out of date, a refused tenant role does not).
    pub role: Option<String>,
    #[source]
    pub source: sqlx::Error,
}

impl Error {
    /// The SQLSTATE the server answered with, if it answered with one.
    pub fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
        sqlstate::of(&self.source)
    }

    /// Did the server answer with this SQLSTATE?
    pub fn is(&self, code: &str) -> bool {
        self.code().as_deref() == Some(code)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Admin access to one tenant DB server.
#[derive(Clone, Debug)]
pub struct ServerAdmin {
    pub server_id: Uuid,
    /// The server's registered name, for error messages.
    pub name: Arc<str>,
    /// Pool on the server's maintenance database (the admin URL's database).
    pub pool: PgPool,
    /// The same, with no statement ever logged (not even a slow one): for
    /// statements that carry a secret, such as a role's SCRAM verifier.
    quiet: PgPool,
    opts: PgConnectOptions,
    /// The same login for `pg_dump`/`pg_restore`.
    pub libpq: LibpqEnv,
    /// What silo gives every tenant role it makes here.
    pub role_settings: RoleSettings,
}

impl ServerAdmin {
    /// Wrap an error of a statement on this server (in `database`, if not the maintenance one).
    pub fn error(&self, database: Option<&str>, source: sqlx::Error) -> Error {
        Error {
            server: self.name.to_string(),
            database: database.map(str::to_owned),
            role: None,
            source,
        }
    }

    /// A one-off admin connection to `database` on this server.
    pub async fn connect_to(&self, database: &str) -> Result<PgConnection> {
        self.opts
            .clone()
            .database(database)
            .connect()
            .await
            .map_err(|e| self.error(Some(database), e))
    }

    /// A one-connection admin pool on `database`, for migrations. Close it after use.
    pub async fn single_pool(&self, database: &str) -> Result<PgPool> {
        PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(self.opts.clone().database(database))
            .await
            .map_err(|e| self.error(Some(database), e))
    }

    /// As [`Self::single_pool`], with no statement ever logged (not even a
    /// slow one): for statements that carry a secret.
    pub async fn quiet_pool(&self, database: &str) -> Result<PgPool> {
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
            .map_err(|e| self.error(Some(database), e))
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

    /// Run one utility statement (DDL that cannot be prepared or run in a
    /// transaction; several separated by `;` run as one implicit transaction).
    pub async fn exec(&self, sql: &str) -> Result<()> {
        sqlx::raw_sql(sql)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| self.error(None, e))
    }

    /// As [`Self::exec`], on a connection of its own whose lock waits end
    /// after `lock_timeout` (a PostgreSQL interval, e.g. `5s`).
    pub async fn exec_waiting_at_most(&self, sql: &str, lock_timeout: &str) -> Result<()> {
        // A one-connection pool, not a bare connection: `&mut PgConnection`
        // as an executor defeats the compiler's `Send` inference in
        // spawned tasks (see `schema::TenantSchema::apply`).
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(self.opts.clone().options([("lock_timeout", lock_timeout)]))
            .await
            .map_err(|e| self.error(None, e))?;
        let done = sqlx::raw_sql(sql)
            .execute(&pool)
            .await
            .map(|_| ())
            .map_err(|e| self.error(None, e));
        pool.close().await;
        done
    }

    /// As [`Self::exec`], never logged: for statements that carry a secret.
    pub async fn exec_quietly(&self, sql: &str) -> Result<()> {
        sqlx::raw_sql(sql)
            .execute(&self.quiet)
            .await
            .map(|_| ())
            .map_err(|e| self.error(None, e))
    }

    /// `SELECT 1` on the server within `timeout`, through the admin pool and
    /// on one direct connection. If the pool fails (busy with DDL, holding a
    /// broken connection, or the server refusing, which sqlx retries until
    /// its acquire timeout), the direct connection settles it and names the
    /// cause.
    ///
    /// The direct login runs every time: pooled connections opened before
    /// the admin login's password changed keep working, while every new
    /// one (a new pool, a move's target, a tenant database's first
    /// connection) is refused. A refused login fails the check even when
    /// the pool answered; other direct failures (a full server) do not.
    pub async fn ping(&self, timeout: Duration) -> std::result::Result<(), &'static str> {
        let pooled = sqlx::query("SELECT 1").execute(&self.pool);
        let pooled = matches!(tokio::time::timeout(timeout, pooled).await, Ok(Ok(_)));
        let direct = async {
            let mut conn = self.opts.connect().await?;
            let done = sqlx::query("SELECT 1").execute(&mut conn).await.map(|_| ());
            let _ = conn.close().await;
            done
        };
        match tokio::time::timeout(timeout, direct).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) if !pooled || health::failure(&e) == health::AUTH_FAILED => {
                Err(health::failure(&e))
            }
            Err(_) if !pooled => Err("timed out"),
            _ => Ok(()),
        }
    }
}

/// Settings silo gives every tenant role and reader (`ALTER ROLE … SET`):
/// ones a role cannot change itself (superuser-only parameters), so they
/// hold for every session it opens. The reconciler keeps them and resets
/// any other a role gives itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleSettings {
    /// `temp_file_limit` in kB; `None` sets none.
    pub temp_file_limit_kb: Option<u64>,
}

/// silo's defaults (`SILO_TENANT_TEMP_FILE_LIMIT_MB`'s).
impl Default for RoleSettings {
    fn default() -> Self {
        Self::from_mib(crate::config::DEFAULT_TENANT_TEMP_FILE_LIMIT_MB)
    }
}

impl RoleSettings {
    /// A `temp_file_limit` of `mib` MiB (`0`: none).
    pub fn from_mib(mib: u64) -> Self {
        Self {
            temp_file_limit_kb: (mib > 0).then(|| mib * 1024),
        }
    }

    /// The role's `pg_db_role_setting.setconfig` (for every database) as
    /// PostgreSQL stores these settings; empty when there are none.
    pub fn setconfig(&self) -> Vec<String> {
        self.temp_file_limit_kb
            .map(|kb| format!("temp_file_limit={kb}kB"))
            .into_iter()
            .collect()
    }

    /// `ALTER ROLE … SET` of these settings for `role` (a quoted
    /// identifier); `None` when there are none.
    pub fn alter_sql(&self, role: &str) -> Option<String> {
        self.temp_file_limit_kb
            .map(|kb| format!("ALTER ROLE {role} SET temp_file_limit = '{kb}kB'"))
    }

    /// The parameter names silo sets.
    pub fn names() -> &'static [&'static str] {
        &["temp_file_limit"]
    }
}

/// Admin pools by server id, built on first use from the sealed admin URL.
#[derive(Debug, Clone)]
pub struct ServerPools {
    keyring: Keyring,
    role_settings: RoleSettings,
    /// Each with the sealed admin URL it was built from: a changed URL (or
    /// a re-seal) builds the pool again at its next use, on every replica.
    pools: Arc<RwLock<HashMap<Uuid, BuiltFrom>>>,
}

/// An admin pool and the sealed admin URL it was built from.
type BuiltFrom = (Vec<u8>, ServerAdmin);

impl ServerPools {
    pub fn new(keyring: Keyring, role_settings: RoleSettings) -> Self {
        Self {
            keyring,
            role_settings,
            pools: Default::default(),
        }
    }

    pub fn admin(&self, server: &DbServer) -> anyhow::Result<ServerAdmin> {
        if let Some((_, a)) = self
            .pools
            .read()
            .expect("server pools lock")
            .get(&server.id)
            .filter(|(sealed, _)| *sealed == server.admin_url_enc)
        {
            return Ok(a.clone());
        }
        let url = self.keyring.open_string(
            &server.key_id,
            &server.admin_url_enc,
            server.id.as_bytes(),
        )?;
        let opts = admin_options(&url)?;
        let libpq = LibpqEnv::from_url(&url)?;
        if let Some(why) = weak_tls(&url) {
            tracing::warn!(server = %server.name, "tenant server admin connection: {why}");
        }
        let pool = PgPoolOptions::new()
            .max_connections(ADMIN_POOL_MAX)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(10))
            .idle_timeout(Duration::from_secs(120))
            .connect_lazy_with(opts.clone());
        let quiet = PgPoolOptions::new()
            .max_connections(2)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(10))
            .idle_timeout(Duration::from_secs(60))
            .connect_lazy_with(opts.clone().disable_statement_logging());
        let admin = ServerAdmin {
            server_id: server.id,
            name: Arc::from(server.name.as_str()),
            pool,
            quiet,
            opts,
            libpq,
            role_settings: self.role_settings,
        };
        let mut pools = self.pools.write().expect("server pools lock");
        match pools.get(&server.id) {
            // Built meanwhile from the same URL: that one, so all share one pool.
            Some((sealed, a)) if *sealed == server.admin_url_enc => Ok(a.clone()),
            _ => {
                pools.insert(server.id, (server.admin_url_enc.clone(), admin.clone()));
                Ok(admin)
            }
        }
    }

    /// Change a registered server's admin URL (its login's password
    /// changed, say). The URL must reach the same cluster (its recorded
    /// identity, else its marker naming this server) with the powers a
    /// registration needs; it is sealed as at registration. Every
    /// replica's admin pool for the server is built again from it at its
    /// next use.
    pub async fn change_admin_url(
        &self,
        registry: &Registry,
        server: &DbServer,
        admin_url: &str,
    ) -> anyhow::Result<DbServer> {
        let db = connect_admin(admin_url).await?;
        let changed = async {
            check_admin_powers(&db).await?;
            let (cluster, marker) = owner::identify(&db)
                .await
                .context("read the cluster's identity")?;
            let same = match (&server.system_identifier, server.cluster_port) {
                (Some(id), Some(port)) => *id == cluster.system_identifier && port == cluster.port,
                _ => matches!(marker, Some(Ok(o)) if o.server == server.id),
            };
            if !same {
                return Err(OtherCluster(server.name.clone()).into());
            }
            let sealed = self
                .keyring
                .seal(admin_url.as_bytes(), server.id.as_bytes());
            registry
                .set_server_admin_url(server.id, &sealed, self.keyring.key_id())
                .await?
                .context("find the server again")
        }
        .await;
        db.close().await;
        changed
    }

    /// Admin access to the server with this id, read from the registry.
    pub async fn admin_of(&self, registry: &Registry, server: Uuid) -> anyhow::Result<ServerAdmin> {
        let server = registry
            .server(server)
            .await?
            .context("find the tenant's server")?;
        self.admin(&server)
    }

    /// Register a tenant DB server after checking its admin URL works and
    /// preparing it, then mark its cluster as this control plane's. A
    /// cluster registered already (under any name or host alias) or owned
    /// by another control plane is refused with [`AlreadyRegistered`].
    pub async fn register(
        &self,
        registry: &Registry,
        name: &str,
        admin_url: &str,
        max_connections: i32,
        max_tenants: i32,
    ) -> anyhow::Result<DbServer> {
        let db = connect_admin(admin_url).await?;
        let registered = async {
            check_admin_powers(&db).await?;
            let (cluster, _) = owner::identify(&db)
                .await
                .context("read the cluster's identity")?;
            // Registrations of one cluster run one at a time, from any
            // replica: the first prepares and records it, the others then
            // find it registered and are refused without touching it (two
            // sessions closing its databases at once fail in PostgreSQL:
            // "tuple concurrently updated").
            registry
                .with_cluster_lock(&cluster.system_identifier, cluster.port, || {
                    self.register_locked(
                        registry,
                        &db,
                        &cluster,
                        name,
                        admin_url,
                        (max_connections, max_tenants),
                    )
                })
                .await
        }
        .await;
        db.close().await;
        registered
    }

    /// [`Self::register`] once the cluster's registration lock is held:
    /// refuse a cluster registered or owned already, else close its
    /// maintenance databases, record it and mark it.
    async fn register_locked(
        &self,
        registry: &Registry,
        db: &PgPool,
        cluster: &owner::ClusterId,
        name: &str,
        admin_url: &str,
        (max_connections, max_tenants): (i32, i32),
    ) -> anyhow::Result<DbServer> {
        let control = registry.control_id().await?;
        if let Some(other) = registry
            .server_by_cluster(&cluster.system_identifier, cluster.port)
            .await?
        {
            return Err(AlreadyRegistered(format!("as server '{}'", other.name)).into());
        }
        // Read under the lock: a registration that just ended marked it.
        let (_, marker) = owner::identify(db)
            .await
            .context("read the cluster's ownership marker")?;
        let taken_over = match marker {
            None => false,
            Some(Ok(o)) if o.control != control => {
                return Err(AlreadyRegistered(format!(
                    "by another silo control plane ({})",
                    o.control
                ))
                .into())
            }
            Some(Ok(o)) => match registry.server(o.server).await? {
                Some(other) => {
                    return Err(AlreadyRegistered(format!("as server '{}'", other.name)).into())
                }
                // Its server row is gone (a control DB restored from before it
                // was registered): this registration takes the cluster over.
                None => true,
            },
            Some(Err(())) => {
                return Err(AlreadyRegistered(format!(
                    "by someone else (it has a role {} that silo did not mark)",
                    owner::OWNER_ROLE
                ))
                .into())
            }
        };
        close_maintenance_databases(db).await?;
        let id = Uuid::now_v7();
        let sealed = self.keyring.seal(admin_url.as_bytes(), id.as_bytes());
        registry
            .insert_server(&crate::registry::NewServer {
                id,
                name,
                admin_url_enc: &sealed,
                key_id: self.keyring.key_id(),
                max_connections,
                max_tenants,
                cluster: (&cluster.system_identifier, cluster.port),
            })
            .await
            .map_err(|e| -> anyhow::Error {
                if e.is_unique_violation("db_servers_cluster_key") {
                    AlreadyRegistered("by a registration that ran at the same time".into()).into()
                } else {
                    e.into()
                }
            })?;
        let server = registry
            .server(id)
            .await?
            .context("read back the registered server")?;
        let me = owner::Owner {
            control,
            server: id,
        };
        let admin = self.admin(&server)?;
        let marked = if taken_over {
            owner::remark(&admin, me)
                .await
                .map(|_| owner::Ownership::Ours)
        } else {
            owner::mark(&admin, me).await
        };
        match marked {
            Ok(owner::Ownership::Ours) => Ok(server),
            // Another control plane marked it first, between our check and ours.
            Ok(other) => {
                registry.forget_new_server(id).await?;
                Err(AlreadyRegistered(other.refusal().unwrap_or_default()).into())
            }
            // Unmarked for now: the reconciler marks it (or finds it taken).
            Err(e) => {
                tracing::warn!(server = name, "failed to mark the server's cluster as this control plane's (the reconciler retries): {e:#}");
                Ok(server)
            }
        }
    }

    /// On first start, register the default server (another replica may
    /// win the race: then nothing is left to do).
    pub async fn ensure_default(&self, registry: &Registry, admin_url: &str) -> anyhow::Result<()> {
        if !registry.servers().await?.is_empty() {
            return Ok(());
        }
        let created = self
            .register(
                registry,
                "default",
                admin_url,
                crate::config::DEFAULT_SERVER_MAX_CONNECTIONS,
                crate::config::DEFAULT_SERVER_MAX_TENANTS,
            )
            .await;
        match created {
            Ok(_) => Ok(()),
            // Another replica registered it meanwhile.
            Err(e)
                if e.downcast_ref::<crate::registry::Error>()
                    .is_some_and(|e| e.is_unique_violation("db_servers_name_key"))
                    || (e.downcast_ref::<AlreadyRegistered>().is_some()
                        && !registry.servers().await?.is_empty()) =>
            {
                Ok(())
            }
            Err(e) => Err(e.context("register the default tenant server")),
        }
    }
}

/// Why a connection URL's TLS is weaker than `sslmode=verify-full` (the
/// server's certificate checked against a trusted root and its name), if it
/// is and the host is not this machine; the answer never repeats the URL.
pub fn weak_tls(url: &str) -> Option<String> {
    let u = url::Url::parse(url).ok()?;
    let host = u.host_str().unwrap_or("");
    let local = host.is_empty()
        || host.starts_with('/')
        || host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let socket = u
        .query_pairs()
        .any(|(k, v)| k == "host" && v.starts_with('/'));
    if local || socket {
        return None;
    }
    let mode = u
        .query_pairs()
        .find(|(k, _)| k == "sslmode")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| "prefer".into());
    (mode != "verify-full").then(|| {
        format!("sslmode={mode}: the connection to {host} is not authenticated; use sslmode=verify-full (and sslrootcert if the server's CA is not a system root)")
    })
}

/// How often PostgreSQL checks, while one of silo's admin statements runs,
/// that silo is still connected. A statement whose client died (silo
/// killed mid-`CREATE DATABASE`, mid-migration) is then cancelled within
/// this long instead of running, and committing, to its end behind the
/// reconciler's back. Tenant servers are PostgreSQL 14+ (which has it).
pub const CLIENT_CHECK_INTERVAL: &str = "2s";

/// Parse an admin URL; the error never repeats the URL (it holds a password).
pub fn admin_options(url: &str) -> anyhow::Result<PgConnectOptions> {
    let opts: PgConnectOptions = url
        .parse()
        .map_err(|_| anyhow::anyhow!("not a valid postgres:// connection URL"))?;
    Ok(opts
        .application_name("silo-admin")
        .options([("client_connection_check_interval", CLIENT_CHECK_INTERVAL)])
        .log_statements(tracing::log::LevelFilter::Trace))
}

/// An admin URL that could not be used to connect (the caller's input is wrong).
#[derive(Debug, thiserror::Error)]
#[error("could not connect to the server with its admin URL")]
pub struct ServerUnreachable;

/// The admin URL's cluster is registered already, or owned by another
/// control plane (the caller's input is wrong: 409).
#[derive(Debug, thiserror::Error)]
#[error("this PostgreSQL cluster is registered already {0}; register each cluster once")]
pub struct AlreadyRegistered(pub String);

/// A new admin URL reaches another cluster than the server's (the caller's
/// input is wrong: 422).
#[derive(Debug, thiserror::Error)]
#[error("admin_url reaches another PostgreSQL cluster than server '{0}' is; register that one as a server of its own")]
pub struct OtherCluster(pub String);

/// The admin login lacks what silo needs of it (the caller's input is wrong).
#[derive(Debug, thiserror::Error)]
#[error("the admin login lacks {0}: silo needs CREATEDB, CREATEROLE and membership in pg_signal_backend (or a superuser); see the README's security model")]
pub struct MissingPrivilege(pub String);

/// What an admin login may do on its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct AdminPowers {
    pub superuser: bool,
    pub create_db: bool,
    pub create_role: bool,
    /// May end other roles' sessions (suspend, archive, move, delete).
    pub signal_backend: bool,
    /// May stream WAL: a move *from* this server needs it.
    pub replication: bool,
}

impl AdminPowers {
    /// What is missing for silo to manage tenants on the server, if anything.
    pub fn missing(&self) -> Option<String> {
        if self.superuser {
            return None;
        }
        let missing: Vec<&str> = [
            (!self.create_db).then_some("CREATEDB"),
            (!self.create_role).then_some("CREATEROLE"),
            (!self.signal_backend).then_some("membership in pg_signal_backend"),
        ]
        .into_iter()
        .flatten()
        .collect();
        (!missing.is_empty()).then(|| missing.join(", "))
    }
}

/// The admin login's powers, as the server sees them.
pub async fn admin_powers(db: &PgPool) -> sqlx::Result<AdminPowers> {
    sqlx::query_as(
        "SELECT rolsuper AS superuser, rolcreatedb AS create_db, rolcreaterole AS create_role,
                rolsuper OR pg_has_role(current_user, 'pg_signal_backend', 'MEMBER') AS signal_backend,
                rolsuper OR rolreplication AS replication
           FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(db)
    .await
}

/// A one-connection pool on a server not registered yet, with its admin
/// URL: [`ServerUnreachable`] if it does not connect.
async fn connect_admin(url: &str) -> anyhow::Result<PgPool> {
    // A one-connection pool, not a bare connection: `&mut PgConnection` with
    // `raw_sql` defeats `Send` inference in handlers (a rustc limitation).
    Ok(PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(admin_options(url)?)
        .await
        .map_err(|e| {
            tracing::warn!("failed to connect to a tenant server: {e}");
            ServerUnreachable
        })?)
}

/// Check the admin login may do what silo does (refused with
/// [`MissingPrivilege`] naming what it lacks).
async fn check_admin_powers(db: &PgPool) -> anyhow::Result<AdminPowers> {
    let powers = admin_powers(db)
        .await
        .context("read the admin login's privileges")?;
    if let Some(missing) = powers.missing() {
        return Err(MissingPrivilege(missing).into());
    }
    if !powers.replication {
        tracing::warn!(
            "the admin login has no REPLICATION: tenants cannot be moved off this server"
        );
    }
    Ok(powers)
}

/// Revoke PUBLIC's CONNECT on the databases every cluster has (`postgres`,
/// `template1`) and the admin URL's own, where the admin login owns them or
/// is a superuser, so that tenant roles can connect to nothing but their
/// own; say which stay open.
async fn close_maintenance_databases(db: &PgPool) -> anyhow::Result<()> {
    let open: Vec<(String, bool)> = sqlx::query_as(
        "SELECT d.datname::text,
                pg_has_role(current_user, d.datdba, 'USAGE')
                  OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
           FROM pg_database d
          WHERE (d.datname IN ('postgres', 'template1') OR d.datname = current_database())
            AND has_database_privilege('public', d.oid, 'CONNECT')",
    )
    .fetch_all(db)
    .await
    .context("list the maintenance databases open to PUBLIC")?;
    for (name, may) in open {
        if may {
            sqlx::raw_sql(&format!(
                "REVOKE CONNECT ON DATABASE \"{name}\" FROM PUBLIC"
            ))
            .execute(db)
            .await
            .with_context(|| format!("close database {name} to PUBLIC"))?;
            tracing::info!(
                database = name,
                "closed a maintenance database to PUBLIC (tenant roles cannot connect to it)"
            );
        } else {
            tracing::warn!(database = name, "a maintenance database stays open to PUBLIC (the admin login does not own it): tenant roles can connect to it, though not to any tenant's database");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::weak_tls;

    #[test]
    fn tls_weaker_than_verify_full_is_named_unless_the_server_is_local() {
        let rows = [
            ("postgres://u:p@db.internal/silo", true),
            ("postgres://u:p@db.internal/silo?sslmode=require", true),
            ("postgres://u:p@db.internal/silo?sslmode=verify-ca", true),
            ("postgres://u:p@db.internal/silo?sslmode=verify-full", false),
            ("postgres://u:p@10.0.0.7:5432/silo?sslmode=disable", true),
            ("postgres://u:p@127.0.0.1:5432/silo", false),
            ("postgres://u:p@localhost/silo", false),
            ("postgres://u:p@[::1]:5432/silo", false),
            ("postgres://u:p@/silo?host=/var/run/postgresql", false),
        ];
        let wrong: Vec<String> = rows
            .iter()
            .filter(|(url, weak)| weak_tls(url).is_some() != *weak)
            .map(|(url, weak)| format!("{url}: expected weak = {weak}"))
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        assert!(!weak_tls("postgres://u:secret@db/x")
            .unwrap()
            .contains("secret"));
    }
}
