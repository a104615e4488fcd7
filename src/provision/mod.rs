//! Crash-safe tenant provisioning and lifecycle.
//!
//! Creating a tenant is a sequence of idempotent steps, each recorded in the
//! tenant row (`provision_step`) once done:
//!
//! 1. `registered` — row inserted as `provisioning` with server, deterministic
//!    database/role names (from the tenant id) and the sealed password;
//! 2. `database` — a warm-pool spare renamed into place, else a clone of the
//!    server's template database, else an empty database;
//! 3. `role` — a LOGIN role, member of the data-access group, nothing else,
//!    with CONNECT on its own database only and PUBLIC revoked (one transaction);
//! 4. `migrate` — tenant migrations, skipped when cloned at the latest version;
//! 5. `verify` — the tenant role logs in and reads its tables (a fresh
//!    template clone: the shared catalogs say it can log in and connect);
//! 6. `active` — the row is marked `active`: the one durable commit of a warm
//!    create (earlier control-DB writes commit lazily; see `Registry::begin_lazy`).
//!
//! All work on one tenant runs under its advisory lock, so operations on a
//! tenant are serialized across tasks and replicas, and a lock nobody holds on
//! a `provisioning` tenant means its provisioner died: the reconciler then
//! finishes the steps. Names carry the `silo_` prefix, so the sweep can drop
//! databases and roles that no registry row accounts for.

mod lifecycle;
mod reconcile;
pub mod relocate;
pub mod scram;
pub mod servers;
mod template;

pub(crate) use lifecycle::{set_role_login, terminate_sessions};
pub use reconcile::ReconcileReport;
pub use servers::{ServerAdmin, ServerPools};

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use sha2::{Digest, Sha256};
use sqlx::migrate::Migrator;
use sqlx::Connection;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::crypto::{random_password, Keyring};
use crate::failpoint;
use crate::migrate::TENANT_GROUP_ROLE;
use crate::registry::{
    is_unique_violation, DbServer, NewTenant, Registry, Spare, TenantRecord, TenantStatus,
};

/// The provisioning steps in order; each is also a failpoint name
/// (`SILO_FAILPOINT=<step>` aborts right after the step is recorded).
pub const STEPS: [&str; 6] = [
    "registered",
    "database",
    "role",
    "migrate",
    "verify",
    "active",
];

/// Plans and the most connections a tenant role of that plan may open.
pub const PLANS: [(&str, i32); 3] = [("free", 5), ("standard", 20), ("premium", 50)];
/// Plan given when a create request names none.
pub const DEFAULT_PLAN: &str = "standard";

/// Spares cloned per server in one step of the background refill: small, so
/// shutdown and the sweep never wait long behind a refill.
pub const REFILL_BATCH: usize = 2;

/// Name of the template database on every tenant server.
pub const TEMPLATE_DB: &str = "silo_template";
/// Prefixes of everything silo creates on a tenant server.
pub const TENANT_DB_PREFIX: &str = "silo_t_";
pub const TENANT_ROLE_PREFIX: &str = "silo_r_";
pub const SPARE_DB_PREFIX: &str = "silo_spare_";
pub const SPARE_ROLE_PREFIX: &str = "silo_rs_";

/// A request to create a tenant, already validated by the caller.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CreateTenant {
    pub slug: String,
    pub name: String,
    pub plan: String,
    pub server: Option<String>,
}

/// Why a tenant operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("a tenant with slug '{0}' already exists")]
    SlugTaken(String),
    #[error("this Idempotency-Key was used for a different request")]
    IdempotencyMismatch,
    #[error("no server named '{0}'")]
    UnknownServer(String),
    /// The named server takes no new tenants; the second field says why.
    #[error("server '{0}' cannot take new tenants: {1}")]
    ServerUnavailable(String, String),
    #[error("no tenant DB server has room for a new tenant (each is full, draining or unhealthy)")]
    NoCapacity,
    #[error("tenant not found")]
    NotFound,
    #[error("tenant is {0}: {1}")]
    InvalidState(&'static str, &'static str),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<sqlx::Error> for ProvisionError {
    fn from(e: sqlx::Error) -> Self {
        Self::Internal(anyhow::Error::new(e).context("query the control database"))
    }
}

/// Settings of the provisioner.
#[derive(Debug, Clone)]
pub struct ProvisionConfig {
    /// Spares kept ready per server.
    pub warm_pool_size: u32,
}

/// Creates, changes and removes tenant databases and roles.
#[derive(Clone, Debug)]
pub struct Provisioner {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    keyring: Keyring,
    servers: ServerPools,
    config: ProvisionConfig,
    /// Woken whenever a spare is taken, so the warm pool refills at once.
    spare_taken: Notify,
    tasks: tokio_util::task::TaskTracker,
    /// Tenant schema migrations (embedded, or `SILO_TENANT_MIGRATIONS`).
    migrator: Arc<Migrator>,
    /// Backup storage, when configured.
    storage: std::sync::OnceLock<Arc<crate::backup::Storage>>,
}

impl Provisioner {
    pub fn new(registry: Registry, keyring: Keyring, config: ProvisionConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                servers: ServerPools::new(keyring.clone()),
                registry,
                keyring,
                config,
                spare_taken: Notify::new(),
                tasks: tokio_util::task::TaskTracker::new(),
                migrator: Arc::new(crate::migrate::embedded_tenant_migrator()),
                storage: Default::default(),
            }),
        }
    }

    /// The same provisioner applying `migrator`'s tenant migrations instead.
    pub fn with_migrator(self, migrator: Arc<Migrator>) -> Self {
        let inner = Arc::try_unwrap(self.inner).unwrap_or_else(|shared| Inner {
            registry: shared.registry.clone(),
            keyring: shared.keyring.clone(),
            servers: shared.servers.clone(),
            config: shared.config.clone(),
            spare_taken: Notify::new(),
            tasks: tokio_util::task::TaskTracker::new(),
            migrator: shared.migrator.clone(),
            storage: shared.storage.clone(),
        });
        Self {
            inner: Arc::new(Inner { migrator, ..inner }),
        }
    }

    /// Use `storage` for backups (once; later calls are ignored).
    pub fn set_storage(&self, storage: crate::backup::Storage) {
        let _ = self.inner.storage.set(Arc::new(storage));
    }

    /// Backup storage, if configured.
    pub fn storage(&self) -> Option<&Arc<crate::backup::Storage>> {
        self.inner.storage.get()
    }

    /// The tenant migrations this provisioner applies.
    pub fn tenant_migrator(&self) -> &Migrator {
        &self.inner.migrator
    }

    /// Newest tenant schema version: what new tenants and fleet runs reach.
    pub fn latest_version(&self) -> i64 {
        crate::migrate::latest_version(&self.inner.migrator)
    }

    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    pub fn keyring(&self) -> &Keyring {
        &self.inner.keyring
    }

    pub fn servers(&self) -> &ServerPools {
        &self.inner.servers
    }

    pub fn config(&self) -> &ProvisionConfig {
        &self.inner.config
    }

    /// Background work started by operations (deletes); joined on shutdown.
    pub fn tasks(&self) -> &tokio_util::task::TaskTracker {
        &self.inner.tasks
    }

    /// Register a tenant DB server after checking its admin URL works.
    pub async fn register_server(
        &self,
        name: &str,
        admin_url: &str,
        max_connections: i32,
        max_tenants: i32,
    ) -> anyhow::Result<DbServer> {
        servers::prepare_server(admin_url).await?;
        let id = Uuid::now_v7();
        let sealed = self.inner.keyring.seal(admin_url.as_bytes(), id.as_bytes());
        self.inner
            .registry
            .insert_server(
                id,
                name,
                &sealed,
                self.inner.keyring.key_id(),
                max_connections,
                max_tenants,
            )
            .await?;
        self.inner
            .registry
            .server(id)
            .await?
            .context("read back the registered server")
    }

    /// On first start, register the default server; later, check it is prepared.
    pub async fn ensure_default_server(&self, admin_url: &str) -> anyhow::Result<()> {
        if self.inner.registry.servers().await?.is_empty() {
            let created = self
                .register_server(
                    "default",
                    admin_url,
                    crate::config::DEFAULT_SERVER_MAX_CONNECTIONS,
                    crate::config::DEFAULT_SERVER_MAX_TENANTS,
                )
                .await;
            match created {
                Ok(_) => {}
                // Another replica registered it first.
                Err(e)
                    if e.downcast_ref::<sqlx::Error>()
                        .is_some_and(|e| is_unique_violation(e, "db_servers_name_key")) => {}
                Err(e) => return Err(e.context("register the default tenant server")),
            }
        }
        Ok(())
    }

    /// Create a tenant and return it `active`. With an idempotency key, a retry
    /// of the same request returns the same tenant (finishing it if a crash
    /// interrupted the first attempt) and never creates a second one.
    #[tracing::instrument(skip_all, fields(slug = %req.slug, tenant_id = tracing::field::Empty))]
    pub async fn create(
        &self,
        req: &CreateTenant,
        idempotency_key: Option<&str>,
        actor: &str,
    ) -> Result<TenantRecord, ProvisionError> {
        let started = Instant::now();
        let reg = &self.inner.registry;
        let hash = Sha256::digest(serde_json::to_vec(req).expect("request serializes")).to_vec();
        if let Some(key) = idempotency_key {
            if let Some(id) = self.replayed(key, &hash).await? {
                return self.finish(id).await;
            }
        }
        let server = match &req.server {
            Some(name) => {
                let s = reg
                    .server_by_name(name)
                    .await?
                    .ok_or_else(|| ProvisionError::UnknownServer(name.clone()))?;
                if let Some(why) = s.refusal() {
                    return Err(ProvisionError::ServerUnavailable(name.clone(), why));
                }
                s
            }
            None => reg
                .least_loaded_server()
                .await?
                .ok_or(ProvisionError::NoCapacity)?,
        };

        let id = Uuid::now_v7();
        tracing::Span::current().record("tenant_id", tracing::field::display(id));
        let password = random_password(32);
        let sealed = self.inner.keyring.seal(password.as_bytes(), id.as_bytes());
        let (database, role) = names_for(id);
        let new = NewTenant {
            id,
            slug: &req.slug,
            name: &req.name,
            plan: &req.plan,
            server_id: server.id,
            database_name: &database,
            role_name: &role,
            password_enc: &sealed,
            key_id: self.inner.keyring.key_id(),
        };
        let idem = idempotency_key.map(|k| (k, hash.as_slice()));
        if let Err(e) = reg.register_tenant(&new, idem, actor).await {
            let slug_taken = is_unique_violation(&e, "tenants_slug_key");
            if slug_taken || is_unique_violation(&e, "idempotency_keys_pkey") {
                // A concurrent request with the same key may have won the race
                // (its tenant row takes the slug before its key row is visible).
                if let Some(key) = idempotency_key {
                    if let Some(id) = self.replayed(key, &hash).await? {
                        return self.finish(id).await;
                    }
                }
            }
            if slug_taken {
                return Err(ProvisionError::SlugTaken(req.slug.clone()));
            }
            return Err(e.into());
        }
        step_timer(started, "registered");
        failpoint::hit("registered");
        let tenant = self.finish(id).await?;
        metrics::histogram!("silo_provision_seconds").record(started.elapsed().as_secs_f64());
        Ok(tenant)
    }

    async fn replayed(&self, key: &str, hash: &[u8]) -> Result<Option<Uuid>, ProvisionError> {
        match self.inner.registry.idempotency_key(key).await? {
            Some((stored, id)) if stored == hash => Ok(Some(id)),
            Some(_) => Err(ProvisionError::IdempotencyMismatch),
            None => Ok(None),
        }
    }

    /// Under the tenant's lock, run whatever provisioning steps remain.
    async fn finish(&self, id: Uuid) -> Result<TenantRecord, ProvisionError> {
        let lock = self.inner.registry.lock_tenant(id).await?;
        let result = self.finish_locked(id).await;
        lock.release().await;
        result
    }

    /// Provisioning of a tenant whose lock the caller holds.
    pub(crate) async fn finish_locked(&self, id: Uuid) -> Result<TenantRecord, ProvisionError> {
        let reg = &self.inner.registry;
        let t = reg.tenant(id).await?.ok_or(ProvisionError::NotFound)?;
        match t.status {
            TenantStatus::Provisioning => {}
            TenantStatus::Failed if t.provision_step.is_some() => {
                // A retry of a failed create: try the remaining steps again.
                reg.transition(
                    id,
                    &[TenantStatus::Failed],
                    TenantStatus::Provisioning,
                    None,
                )
                .await?;
            }
            _ => return Ok(t),
        }
        match self.run_steps(&t).await {
            Ok(t) => Ok(t),
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::error!(tenant_id = %id, "failed to provision tenant: {msg}");
                reg.transition(
                    id,
                    &[TenantStatus::Provisioning],
                    TenantStatus::Failed,
                    Some(&msg),
                )
                .await?;
                Err(ProvisionError::Internal(e))
            }
        }
    }

    async fn run_steps(&self, t: &TenantRecord) -> anyhow::Result<TenantRecord> {
        let reg = &self.inner.registry;
        let server = reg
            .server(t.server_id)
            .await?
            .context("find the tenant's server")?;
        let admin = self.inner.servers.admin(&server)?;
        let done = t
            .provision_step
            .as_deref()
            .and_then(|s| STEPS.iter().position(|x| *x == s))
            .unwrap_or(0);
        let mut version = t.schema_version;
        let mut password =
            self.inner
                .keyring
                .open_string(&t.key_id, &t.password_enc, t.id.as_bytes())?;
        // A warm-pool spare arrives with its role created, granted and verified.
        let mut prepared = false;
        // A template clone made its role alongside (not yet granted its database).
        let mut role_made = false;

        if done < 1 {
            let step_started = Instant::now();
            let created = self
                .create_database(&admin, &server, t, &password)
                .await
                .context("create tenant database")?;
            version = created.version;
            role_made = created.role_made;
            if let Some(spare_password) = created.spare_password {
                // The tenant takes the spare role's password. Lazily recorded:
                // if lost, a resumed `role` step sets the registry's one again.
                let sealed = self
                    .inner
                    .keyring
                    .seal(spare_password.as_bytes(), t.id.as_bytes());
                reg.set_password_lazily(t.id, &sealed, self.inner.keyring.key_id())
                    .await?;
                password = spare_password;
                prepared = true;
            }
            reg.set_provision_step(t.id, "database", version).await?;
            step_timer(step_started, "database");
            failpoint::hit("database");
        }
        if done < 2 {
            let step_started = Instant::now();
            if role_made {
                admin
                    .exec(&database_grants(&t.database_name, &t.role_name))
                    .await
                    .context("grant the tenant role its database")?;
            } else if !prepared {
                // Role, PUBLIC revoked, CONNECT granted: one transaction on the server.
                create_role(
                    &admin,
                    &t.role_name,
                    &t.database_name,
                    &password,
                    connection_limit(&t.plan),
                )
                .await
                .context("create the tenant role and grant it its database")?;
            }
            reg.set_provision_step(t.id, "role", None).await?;
            step_timer(step_started, "role");
            failpoint::hit("role");
        }
        if done < 3 {
            let step_started = Instant::now();
            let latest = self.latest_version();
            if version != Some(latest) {
                let db = admin
                    .single_pool(&t.database_name)
                    .await
                    .context("connect to tenant database")?;
                let migrated =
                    crate::migrate::migrate_tenant_database(&db, self.tenant_migrator()).await;
                db.close().await;
                version = Some(migrated?);
            }
            reg.set_provision_step(t.id, "migrate", version).await?;
            step_timer(step_started, "migrate");
            failpoint::hit("migrate");
        }
        if done < 4 {
            let step_started = Instant::now();
            if role_made {
                // A clone of the template, whose tables and grants were checked
                // when it was built: what is left to check lives in the shared
                // catalogs, without a first session in the new database.
                verify_role_catalog(&admin, &t.database_name, &t.role_name)
                    .await
                    .context("verify the tenant role can log in to its database")?;
            } else if !prepared {
                verify_login(&admin, &t.database_name, &t.role_name, &password)
                    .await
                    .context("verify the tenant role can log in and read its tables")?;
            }
            reg.set_provision_step(t.id, "verify", None).await?;
            step_timer(step_started, "verify");
            failpoint::hit("verify");
        }
        let step_started = Instant::now();
        let active = reg
            .transition(
                t.id,
                &[TenantStatus::Provisioning],
                TenantStatus::Active,
                None,
            )
            .await?
            .context("mark tenant active: it changed state while provisioning")?;
        step_timer(step_started, "active");
        failpoint::hit("active");
        Ok(active)
    }

    /// Create the tenant database: a spare if one is ready (renamed into
    /// place together with its role), else a template clone, else an empty
    /// database.
    async fn create_database(
        &self,
        admin: &ServerAdmin,
        server: &DbServer,
        t: &TenantRecord,
        password: &str,
    ) -> anyhow::Result<CreatedDatabase> {
        let database = t.database_name.as_str();
        let made = |version, source: &'static str| {
            metrics::counter!("silo_provision_source_total", "source" => source).increment(1);
            CreatedDatabase {
                version,
                spare_password: None,
                role_made: false,
            }
        };
        if database_exists(admin, database).await? {
            return Ok(CreatedDatabase {
                version: None,
                spare_password: None,
                role_made: false,
            });
        }
        let latest = self.latest_version();
        while let Some(spare) = self.inner.registry.claim_spare(server.id, latest).await? {
            self.inner.spare_taken.notify_one();
            match self.take_spare(admin, &spare, t).await {
                Ok(password) => {
                    let mut created = made(Some(latest), "warm_pool");
                    created.spare_password = Some(password);
                    return Ok(created);
                }
                // Gone or busy: the sweep owns it now; try the next spare.
                Err(e) => {
                    tracing::warn!(spare = spare.database_name, "failed to take a spare: {e:#}")
                }
            }
        }
        if server.template_version == Some(latest) {
            // The login role is made while the database is cloned: its commit
            // (a shared catalog's) overlaps the clone instead of following it.
            let clone = format!("CREATE DATABASE \"{database}\" TEMPLATE {TEMPLATE_DB}");
            let (cloned, role) = tokio::join!(
                admin.exec(&clone),
                create_login_role(admin, &t.role_name, password, connection_limit(&t.plan))
            );
            match cloned {
                Ok(()) => {
                    let mut created = made(Some(latest), "template");
                    created.role_made = role.is_ok();
                    return Ok(created);
                }
                Err(e) if sql_state(&e).as_deref() == Some("42P04") => {
                    return Ok(made(None, "template"))
                }
                Err(e) => tracing::warn!(
                    "failed to clone the template database, creating an empty one: {e}"
                ),
            }
        }
        match admin.exec(&format!("CREATE DATABASE \"{database}\"")).await {
            Ok(()) => {}
            Err(e) if sql_state(&e).as_deref() == Some("42P04") => {}
            Err(e) => return Err(e.into()),
        }
        Ok(made(None, "empty"))
    }

    /// Rename a claimed spare's database and role to the tenant's, in one
    /// transaction on the server; returns the role's password.
    async fn take_spare(
        &self,
        admin: &ServerAdmin,
        spare: &Spare,
        t: &TenantRecord,
    ) -> anyhow::Result<String> {
        let (Some(role), Some(sealed), Some(key_id)) =
            (&spare.role_name, &spare.password_enc, &spare.key_id)
        else {
            anyhow::bail!("the spare has no role");
        };
        let password =
            self.inner
                .keyring
                .open_string(key_id, sealed, spare.database_name.as_bytes())?;
        admin
            .exec(&format!(
                "ALTER DATABASE \"{spare_db}\" RENAME TO \"{db}\"; ALTER ROLE \"{role}\" RENAME TO \"{tenant_role}\";
                 ALTER ROLE \"{tenant_role}\" CONNECTION LIMIT {limit}",
                spare_db = spare.database_name,
                db = t.database_name,
                tenant_role = t.role_name,
                limit = connection_limit(&t.plan),
            ))
            .await
            .context("rename the spare's database and role")?;
        Ok(password)
    }
}

/// What `create_database` made.
struct CreatedDatabase {
    /// Schema version it starts at, when known.
    version: Option<i64>,
    /// Set when a spare was taken: its role is the tenant's, with this password.
    spare_password: Option<String>,
    /// The tenant's login role was made too (a template clone), not yet granted.
    role_made: bool,
}

/// Record how long a provisioning step took (`silo_provision_step_seconds`).
fn step_timer(started: Instant, step: &'static str) {
    metrics::histogram!("silo_provision_step_seconds", "step" => step)
        .record(started.elapsed().as_secs_f64());
}

/// Database and role names of a tenant, derived from its id.
pub fn names_for(id: Uuid) -> (String, String) {
    let hex = id.simple().to_string();
    (
        format!("{TENANT_DB_PREFIX}{hex}"),
        format!("{TENANT_ROLE_PREFIX}{hex}"),
    )
}

pub fn connection_limit(plan: &str) -> i32 {
    PLANS
        .iter()
        .find(|(p, _)| *p == plan)
        .map(|(_, n)| *n)
        .unwrap_or(PLANS[0].1)
}

/// The SQLSTATE of a database error, if it is one.
pub(crate) fn sql_state(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned())
}

pub(crate) async fn database_exists(admin: &ServerAdmin, database: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(database)
        .fetch_one(&admin.pool)
        .await
}

/// Attributes of every tenant login role; the password as a SCRAM verifier.
fn role_attributes(password: &str, limit: i32) -> String {
    let verifier = scram::verifier(password);
    format!(
        "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT CONNECTION LIMIT {limit} PASSWORD '{verifier}'"
    )
}

/// PUBLIC loses its default access to `database`; the tenant role may connect.
fn database_grants(database: &str, role: &str) -> String {
    format!(
        "REVOKE ALL ON DATABASE \"{database}\" FROM PUBLIC; GRANT CONNECT, TEMPORARY ON DATABASE \"{database}\" TO \"{role}\""
    )
}

/// Create the tenant's login role, in the data-access group, before its
/// database exists (or reset it, if a crashed attempt made it).
async fn create_login_role(
    admin: &ServerAdmin,
    role: &str,
    password: &str,
    limit: i32,
) -> anyhow::Result<()> {
    let attrs = role_attributes(password, limit);
    match admin
        .exec(&format!(
            "CREATE ROLE \"{role}\" {attrs} IN ROLE {TENANT_GROUP_ROLE}"
        ))
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if sql_state(&e).as_deref() == Some("42710") => {
            admin
                .exec(&format!(
                    "ALTER ROLE \"{role}\" {attrs}; GRANT {TENANT_GROUP_ROLE} TO \"{role}\""
                ))
                .await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The tenant role can log in to its database and nobody else may connect,
/// as the shared catalogs say (no session in the database needed).
async fn verify_role_catalog(
    admin: &ServerAdmin,
    database: &str,
    role: &str,
) -> anyhow::Result<()> {
    let ok: bool = sqlx::query_scalar(&format!(
        "SELECT coalesce((SELECT rolcanlogin FROM pg_roles WHERE rolname = $1), false)
            AND has_database_privilege($1, $2, 'CONNECT')
            AND pg_has_role($1, '{TENANT_GROUP_ROLE}', 'MEMBER')
            AND NOT has_database_privilege('public', $2, 'CONNECT')"
    ))
    .bind(role)
    .bind(database)
    .fetch_one(&admin.pool)
    .await?;
    anyhow::ensure!(
        ok,
        "the tenant role is not set up to use its database alone"
    );
    Ok(())
}

/// Create the tenant's login role (or reset it, if a crashed attempt made it)
/// and give it CONNECT on its database only, in one transaction.
pub(crate) async fn create_role(
    admin: &ServerAdmin,
    role: &str,
    database: &str,
    password: &str,
    limit: i32,
) -> anyhow::Result<()> {
    let attrs = role_attributes(password, limit);
    let grants = database_grants(database, role);
    // A multi-statement string runs as one implicit transaction: one commit.
    let create = format!("CREATE ROLE \"{role}\" {attrs} IN ROLE {TENANT_GROUP_ROLE}; {grants}");
    match admin.exec(&create).await {
        Ok(()) => Ok(()),
        Err(e) if sql_state(&e).as_deref() == Some("42710") => {
            let reset = format!(
                "ALTER ROLE \"{role}\" {attrs}; GRANT {TENANT_GROUP_ROLE} TO \"{role}\"; {grants}"
            );
            admin.exec(&reset).await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

pub(crate) async fn verify_login(
    admin: &ServerAdmin,
    database: &str,
    role: &str,
    password: &str,
) -> anyhow::Result<()> {
    use sqlx::ConnectOptions;
    let mut conn = admin
        .tenant_options(database, role, password)
        .connect()
        .await?;
    // Schema-agnostic: the migrations table exists whatever the tenant schema.
    sqlx::query("SELECT count(*) FROM _sqlx_migrations")
        .execute(&mut conn)
        .await?;
    conn.close().await.ok();
    Ok(())
}
