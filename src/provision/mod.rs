//! Crash-safe tenant provisioning and lifecycle.
//!
//! Creating a tenant is a sequence of idempotent steps, each recorded in the
//! tenant row (`provision_step`) once done:
//!
//! 1. `registered` — row inserted as `provisioning` with server, deterministic
//!    database/role names (from the tenant id) and the sealed password;
//! 2. `database` — a warm-pool spare renamed into place, else a clone of the
//!    server's template database, else an empty database (from `template0`);
//!    a new database allows no connection at all until step 3;
//! 3. `role` — a LOGIN role in no group, holding nothing else, with CONNECT
//!    on its own database only, PUBLIC revoked and connections allowed (one
//!    transaction: the database is never open to anyone else);
//! 4. `migrate` — tenant migrations (skipped when cloned at the latest
//!    version), then the database's privileges granted to the tenant's role
//!    alone (a spare's were granted when it was made);
//! 5. `verify` — the tenant role logs in and reads its tables (a fresh
//!    template clone: the shared catalogs say it can log in and connect),
//!    and no session of any other role is inside;
//! 6. `active` — the row is marked `active`: the one durable commit of a warm
//!    create (earlier control-DB writes commit lazily; see `Registry::begin_lazy`).
//!
//! All work on one tenant runs under its advisory lock, so operations on a
//! tenant are serialized across tasks and replicas, and a lock nobody holds on
//! a `provisioning` tenant means its provisioner died: the reconciler then
//! finishes the steps. Names carry the `silo_` prefix, so the sweep can drop
//! databases and roles that no registry row accounts for.

mod lifecycle;
pub mod plans;
pub mod readers;
mod template;

pub use lifecycle::DeleteStarted;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::crypto::{random_password, Keyring};
use crate::domain::{Plan, ProvisionStep, ServerName, Slug, TenantName};
use crate::failpoint;
use crate::ops::{Error, Result};
use crate::registry::{
    DbServer, NewTenant, Registered, Registry, Spare, TenantRecord, TenantStatus,
};
use crate::servers::names::{tenant_names, TEMPLATE_DB};
use crate::servers::{roles, schema, sqlstate, ServerAdmin, ServerPools, TenantSchema};

/// The provisioning steps in order; each is also a failpoint name
/// (`SILO_FAILPOINT=<step>` aborts right after the step is recorded).
pub const STEPS: [ProvisionStep; 6] = ProvisionStep::ALL;

/// Spares cloned per server in one step of the background refill: small, so
/// shutdown and the sweep never wait long behind a refill.
pub const REFILL_BATCH: usize = 2;

/// A request to create a tenant, its values checked where it came in.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CreateTenant {
    pub slug: Slug,
    pub name: TenantName,
    pub plan: Plan,
    pub server: Option<ServerName>,
}

/// Settings of the provisioner.
#[derive(Debug, Clone, Default)]
pub struct ProvisionConfig {
    /// Spares kept ready per server.
    pub warm_pool_size: u32,
    /// Settings silo gives every tenant role and reader.
    pub role_settings: crate::servers::RoleSettings,
}

/// Creates, changes and removes tenant databases and roles. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Provisioner {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    keyring: Keyring,
    servers: ServerPools,
    schema: TenantSchema,
    config: ProvisionConfig,
    /// Woken whenever a spare is taken, so the warm pool refills at once.
    spare_taken: Notify,
}

impl Provisioner {
    pub fn new(
        registry: Registry,
        keyring: Keyring,
        servers: ServerPools,
        schema: TenantSchema,
        config: ProvisionConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                registry,
                keyring,
                servers,
                schema,
                config,
                spare_taken: Notify::new(),
            }),
        }
    }

    fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    fn keyring(&self) -> &Keyring {
        &self.inner.keyring
    }

    /// Admin access to the server a tenant lives on.
    pub async fn admin_for(&self, t: &TenantRecord) -> anyhow::Result<ServerAdmin> {
        self.inner
            .servers
            .admin_of(&self.inner.registry, t.server_id)
            .await
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
    ) -> Result<TenantRecord> {
        let started = Instant::now();
        let reg = self.registry();
        let hash = Sha256::digest(serde_json::to_vec(req).expect("request serializes")).to_vec();
        if let Some(key) = idempotency_key {
            if let Some(id) = self.replayed(key, &hash).await? {
                return self.finish(id).await;
            }
        }
        self.known_plan(&req.plan).await?;
        let idem = idempotency_key.map(|k| (k, hash.as_slice()));
        // A slug held already is answered before a server is chosen: a full
        // one (a failed create's own place counts there) hides nothing.
        if let Some(done) = self.answer_for_taken_slug(req, idem).await? {
            return done;
        }
        // Unnamed, a server whose last place another create took since it
        // was chosen is passed over for the next one with room.
        let mut attempts = 0;
        let id = loop {
            attempts += 1;
            let server = self.place(req).await?;
            let id = Uuid::now_v7();
            let password = random_password(32);
            let sealed = self.keyring().seal(password.as_bytes(), id.as_bytes());
            let (database, role) = tenant_names(id);
            let new = NewTenant {
                id,
                slug: &req.slug,
                name: &req.name,
                plan: req.plan.clone(),
                server_id: server.id,
                database_name: &database,
                role_name: &role,
                password_enc: &sealed,
                key_id: self.keyring().key_id(),
            };
            let e = match reg.register_tenant(&new, idem, actor).await {
                Ok(Registered::Yes) => break id,
                Ok(Registered::ServerFull) => match &req.server {
                    Some(name) => {
                        return Err(Error::conflict(format!(
                            "server '{name}' cannot take new tenants: it is full"
                        )))
                    }
                    None if attempts < 3 => continue,
                    None => {
                        return Err(Error::Unavailable(
                            "no tenant DB server has room for a new tenant (the last places were just taken); retry".into(),
                        ))
                    }
                },
                Err(e) => e,
            };
            let slug_taken = e.is_unique_violation("tenants_slug_key");
            if slug_taken || e.is_unique_violation("idempotency_keys_pkey") {
                // A concurrent request with the same key may have won the race
                // (its tenant row takes the slug before its key row is visible).
                if let Some(key) = idempotency_key {
                    if let Some(id) = self.replayed(key, &hash).await? {
                        return self.finish(id).await;
                    }
                }
            }
            if slug_taken {
                return match self.answer_for_taken_slug(req, idem).await? {
                    Some(done) => done,
                    None => Err(Error::conflict(format!(
                        "a tenant with slug '{}' already exists",
                        req.slug
                    ))),
                };
            }
            if crate::registry::is_plan_reference(&e) {
                return Err(Error::Invalid(format!("no plan is named '{}'", req.plan)));
            }
            return Err(e.into());
        };
        tracing::Span::current().record("tenant_id", tracing::field::display(id));
        step_timer(started, ProvisionStep::Registered);
        failpoint::hit(ProvisionStep::Registered.as_str());
        let tenant = self.finish(id).await?;
        metrics::histogram!("silo_provision_seconds").record(started.elapsed().as_secs_f64());
        Ok(tenant)
    }

    /// The server a new tenant goes to: the one the request names, if it
    /// takes tenants, else the active one with the most headroom.
    async fn place(&self, req: &CreateTenant) -> Result<DbServer> {
        let reg = self.registry();
        match &req.server {
            Some(name) => {
                let s = reg
                    .server_by_name(name.as_str())
                    .await?
                    .ok_or_else(|| Error::Invalid(format!("no server named '{name}'")))?;
                if let Some(why) = s.refusal() {
                    return Err(Error::conflict(format!(
                        "server '{name}' cannot take new tenants: {why}"
                    )));
                }
                Ok(s)
            }
            None => reg.least_loaded_server().await?.ok_or_else(|| {
                Error::Unavailable(
                    "no tenant DB server has room for a new tenant (each is full, draining or unhealthy)".into(),
                )
            }),
        }
    }

    /// The answer to a create whose slug a tenant holds already, `None`
    /// when none does. A live tenant: `409` (or, for a replayed key, that
    /// tenant). A failed create (one that never became active, so holds no
    /// data): the same request again (same name, plan and server) retries
    /// that create's remaining steps, as its Idempotency-Key would, and
    /// records this request's key for it; another request is refused,
    /// saying how to free the slug. Asked before a server is chosen, so a
    /// full one does not hide either answer.
    async fn answer_for_taken_slug(
        &self,
        req: &CreateTenant,
        idempotency: Option<(&str, &[u8])>,
    ) -> Result<Option<Result<TenantRecord>>> {
        let Some(t) = self.registry().find_tenant(req.slug.as_str()).await? else {
            return Ok(None);
        };
        if t.slug != req.slug.as_str() {
            return Ok(None);
        }
        if t.status != TenantStatus::Failed || t.provision_step.is_none() {
            // A live tenant: the same key's first request may have
            // committed it since the key was looked up.
            if let Some((key, hash)) = idempotency {
                if let Some(id) = self.replayed(key, hash).await? {
                    return Ok(Some(self.finish(id).await));
                }
            }
            return Ok(Some(Err(Error::conflict(format!(
                "a tenant with slug '{}' already exists",
                req.slug
            )))));
        }
        let same = t.name == req.name.as_str()
            && t.plan == req.plan
            && req
                .server
                .as_ref()
                .is_none_or(|s| s.as_str() == t.server_name);
        if !same {
            return Ok(Some(Err(Error::conflict(format!(
                "a failed create of slug '{}' holds it: send that request again (same name, plan and server) to retry it, or delete the tenant first",
                req.slug
            )))));
        }
        if let Some((key, hash)) = idempotency {
            self.registry()
                .record_idempotency_key(key, hash, t.id)
                .await?;
        }
        Ok(Some(self.finish(t.id).await))
    }

    async fn replayed(&self, key: &str, hash: &[u8]) -> Result<Option<Uuid>> {
        match self.registry().idempotency_key(key).await? {
            Some((stored, id)) if stored == hash => Ok(Some(id)),
            Some(_) => Err(Error::Invalid(
                "this Idempotency-Key was used for a different request".into(),
            )),
            None => Ok(None),
        }
    }

    /// Under the tenant's lock, run whatever provisioning steps remain.
    async fn finish(&self, id: Uuid) -> Result<TenantRecord> {
        self.registry()
            .with_tenant_lock(id, || self.finish_locked(id))
            .await
    }

    /// Provisioning of a tenant whose lock the caller holds (a create, or
    /// the reconciler finishing one whose process died).
    pub async fn finish_locked(&self, id: Uuid) -> Result<TenantRecord> {
        let reg = self.registry();
        let t = reg.tenant(id).await?.ok_or(Error::NotFound("tenant"))?;
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
                Err(Error::Internal(e))
            }
        }
    }

    async fn run_steps(&self, t: &TenantRecord) -> anyhow::Result<TenantRecord> {
        use ProvisionStep as Step;
        let reg = self.registry();
        let server = reg
            .server(t.server_id)
            .await?
            .context("find the tenant's server")?;
        let admin = self.inner.servers.admin(&server)?;
        // Steps after the one recorded are left to do.
        let todo = |step: Step| t.provision_step.is_none_or(|done| step > done);
        let mut version = t.schema_version;
        let mut password =
            self.keyring()
                .open_string(&t.key_id, &t.password_enc, t.id.as_bytes())?;
        // A warm-pool spare arrives with its role created, granted and verified.
        let mut prepared = false;
        // A template clone made its role alongside (not yet granted its database).
        let mut role_made = false;

        if todo(Step::Database) {
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
                    .keyring()
                    .seal(spare_password.as_bytes(), t.id.as_bytes());
                reg.set_password_lazily(t.id, &sealed, self.keyring().key_id())
                    .await?;
                password = spare_password;
                prepared = true;
            }
            self.step_done(t, Step::Database, version, step_started)
                .await?;
        }
        if todo(Step::Role) {
            let step_started = Instant::now();
            let mark = self.tenant_mark(t).await?;
            if role_made {
                let grants = roles::database_grants(&t.database_name, Some(&t.role_name));
                admin
                    .exec(&format!("{grants}; {mark}"))
                    .await
                    .context("grant the tenant role its database")?;
            } else if !prepared {
                // Role, PUBLIC revoked, CONNECT granted: one transaction on the server.
                roles::create_role(
                    &admin,
                    &t.role_name,
                    &t.database_name,
                    &password,
                    t.limits.connection_limit,
                )
                .await
                .context("create the tenant role and grant it its database")?;
                admin
                    .exec(&mark)
                    .await
                    .context("mark the tenant database as this tenant's")?;
            }
            self.step_done(t, Step::Role, None, step_started).await?;
        }
        if todo(Step::Migrate) {
            let step_started = Instant::now();
            let latest = self.inner.schema.latest_version();
            // A spare arrives granted to its role (now the tenant's); a clone
            // of the template or an empty database is granted to it here.
            if !prepared {
                let db = admin
                    .single_pool(&t.database_name)
                    .await
                    .context("connect to tenant database")?;
                let done = if version == Some(latest) {
                    schema::grant(&db, Some(&t.role_name)).await.map(|_| latest)
                } else {
                    self.inner.schema.apply(&db, Some(&t.role_name)).await
                };
                db.close().await;
                version = Some(done?);
            }
            self.step_done(t, Step::Migrate, version, step_started)
                .await?;
        }
        if todo(Step::Verify) {
            let step_started = Instant::now();
            if role_made {
                // A clone of the template, whose tables were checked when it
                // was built: what is left to check lives in the shared
                // catalogs, without a first session as the tenant role.
                roles::verify_role_catalog(&admin, &t.database_name, &t.role_name)
                    .await
                    .context("verify the tenant role can log in to its database")?;
            } else if !prepared {
                roles::verify_login(&admin, &t.database_name, &t.role_name, &password)
                    .await
                    .context("verify the tenant role can log in and read its tables")?;
            }
            // Nobody but the tenant's role (and silo) got in while it was made.
            let foreign =
                roles::foreign_sessions(&admin, &t.database_name, Some(&t.role_name)).await?;
            anyhow::ensure!(
                foreign.is_empty(),
                "verify the new database: sessions of other roles are inside ({})",
                foreign.join(", ")
            );
            self.step_done(t, Step::Verify, None, step_started).await?;
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
        step_timer(step_started, Step::Active);
        failpoint::hit(Step::Active.as_str());
        Ok(active)
    }

    /// Record a step as done (lazily: see `Registry::begin_lazy`), time it,
    /// and abort here if its failpoint is armed.
    async fn step_done(
        &self,
        t: &TenantRecord,
        step: ProvisionStep,
        version: Option<i64>,
        started: Instant,
    ) -> anyhow::Result<()> {
        self.registry()
            .set_provision_step(t.id, step, version)
            .await?;
        step_timer(started, step);
        failpoint::hit(step.as_str());
        Ok(())
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
        if roles::database_exists(admin, database).await? {
            return Ok(CreatedDatabase {
                version: None,
                spare_password: None,
                role_made: false,
            });
        }
        let latest = self.inner.schema.latest_version();
        while let Some(spare) = self.registry().claim_spare(server.id, latest).await? {
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
            let (cloned, role) = tokio::join!(
                roles::create_database(admin, database, Some(TEMPLATE_DB), ""),
                roles::create_login_role(admin, &t.role_name, password, t.limits.connection_limit)
            );
            match cloned {
                Ok(()) => {
                    let mut created = made(Some(latest), "template");
                    created.role_made = role.is_ok();
                    return Ok(created);
                }
                Err(e) if e.is(sqlstate::DUPLICATE_DATABASE) => return Ok(made(None, "template")),
                Err(e) => tracing::warn!(
                    "failed to clone the template database, creating an empty one: {e:#}"
                ),
            }
        }
        match roles::create_database(admin, database, None, "").await {
            Err(e) if !e.is(sqlstate::DUPLICATE_DATABASE) => return Err(e.into()),
            _ => {}
        }
        Ok(made(None, "empty"))
    }

    /// The comment that marks a tenant's database as this control plane's
    /// tenant's, with what it takes to register it again (`silo reconcile --adopt`).
    async fn tenant_mark(&self, t: &TenantRecord) -> anyhow::Result<String> {
        let mark = crate::servers::owner::TenantMark::of(self.registry().control_id().await?, t);
        Ok(crate::servers::owner::tenant_mark_sql(
            &t.database_name,
            &mark,
            self.keyring(),
        ))
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
            self.keyring()
                .open_string(key_id, sealed, spare.database_name.as_bytes())?;
        let mark = self.tenant_mark(t).await?;
        roles::on_database(
            admin,
            &spare.database_name,
            &format!(
                "ALTER DATABASE \"{spare_db}\" RENAME TO \"{db}\"; ALTER ROLE \"{role}\" RENAME TO \"{tenant_role}\";
                 ALTER ROLE \"{tenant_role}\" CONNECTION LIMIT {limit}; {mark}",
                spare_db = spare.database_name,
                db = t.database_name,
                tenant_role = t.role_name,
                limit = t.limits.connection_limit,
            ),
        )
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
fn step_timer(started: Instant, step: ProvisionStep) {
    metrics::histogram!("silo_provision_step_seconds", "step" => step.as_str())
        .record(started.elapsed().as_secs_f64());
}
