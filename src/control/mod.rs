//! The control plane: one handle ([`ControlPlane`]) over the features
//! (provisioning, backups, relocation, fleet migrations) that the admin API,
//! the command line and the background jobs call. It owns what crosses
//! features, so that no feature imports another:
//!
//! - a delete takes a final backup (backups) before the drop (provisioning);
//! - a restore into a new slug creates the tenant (provisioning) first;
//! - the reconciler ([`reconcile`]) settles every feature after a crash;
//! - a fleet migration that changed the schema refreshes templates and spares.

pub mod adopt;
pub mod reconcile;

use std::sync::Arc;

use anyhow::Context;
use serde_json::json;
use uuid::Uuid;

use crate::backup::{Backups, Progress, RestoreTarget, Storage};
use crate::crypto::Keyring;
use crate::domain::{OperationKind, TenantName};
use crate::migrate::{Fleet, FleetProgress, FleetReport, FleetRun, TenantResult};
use crate::ops::{Error, Operations, Result};
use crate::provision::{CreateTenant, ProvisionConfig, Provisioner};
use crate::registry::{
    Backup, DbServer, Operation, OperationStatus, Registry, TenantRecord, TenantStatus,
};
use crate::relocate::Mover;
use crate::servers::{roles, ServerCheck, ServerPools, TenantSchema};

pub use adopt::AdoptReport;
pub use reconcile::ReconcileReport;

/// What the control plane is built from, besides the control DB and the keys.
#[derive(Debug, Default)]
pub struct ControlConfig {
    pub provision: ProvisionConfig,
    /// The tenant schema (embedded, or `SILO_TENANT_MIGRATIONS`).
    pub schema: TenantSchema,
    /// Backup storage; `None` turns backups off.
    pub storage: Option<Storage>,
    /// How long quarantined and replaced databases are kept.
    pub keep_for: crate::domain::KeepFor,
    /// Work slots of this process (`SILO_BACKUP_CONCURRENCY`): backups,
    /// verifications, restores, archivals and moves running at once. `None`:
    /// the storage's setting, else the default.
    pub work_slots: Option<usize>,
}

/// Longest a delete waits for a backup of its tenant under way before its
/// final backup (the reconciler retries it after).
const DELETE_WAITS_FOR_BACKUP: std::time::Duration = std::time::Duration::from_secs(3600);

/// The control plane. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    keyring: Keyring,
    servers: ServerPools,
    ops: Operations,
    schema: TenantSchema,
    provisioner: Provisioner,
    backups: Option<Backups>,
    mover: Mover,
    fleet: Fleet,
    keep_for: crate::domain::KeepFor,
    usage: crate::usage::Collector,
}

impl ControlPlane {
    pub fn new(registry: Registry, keyring: Keyring, config: ControlConfig) -> Self {
        let servers = ServerPools::new(keyring.clone(), config.provision.role_settings);
        let slots = config
            .work_slots
            .or(config.storage.as_ref().map(|s| s.settings.concurrency))
            .unwrap_or(crate::config::DEFAULT_BACKUP_CONCURRENCY as usize);
        let ops = Operations::new(registry.clone(), slots);
        let schema = config.schema;
        let provisioner = Provisioner::new(
            registry.clone(),
            keyring.clone(),
            servers.clone(),
            schema.clone(),
            config.provision,
        );
        let tools = config.storage.as_ref().map(|s| s.tools.clone());
        let backups = config.storage.map(|storage| {
            Backups::new(
                registry.clone(),
                keyring.clone(),
                servers.clone(),
                schema.clone(),
                ops.clone(),
                storage,
            )
        });
        let mover = Mover::new(
            registry.clone(),
            keyring.clone(),
            servers.clone(),
            ops.clone(),
            tools,
            config.keep_for,
        );
        let fleet = Fleet::new(registry.clone(), servers.clone(), schema.clone());
        let usage = crate::usage::Collector::new(registry.clone(), servers.clone());
        Self {
            inner: Arc::new(Inner {
                registry,
                keyring,
                servers,
                ops,
                schema,
                provisioner,
                backups,
                mover,
                fleet,
                keep_for: config.keep_for,
                usage,
            }),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// How long quarantined and replaced databases are kept.
    pub fn keep_for(&self) -> crate::domain::KeepFor {
        self.inner.keep_for
    }

    /// Unix seconds after which something set aside now may be dropped.
    pub(crate) fn drop_after(&self) -> i64 {
        self.inner.keep_for.drop_after()
    }

    pub fn keyring(&self) -> &Keyring {
        &self.inner.keyring
    }

    pub fn servers(&self) -> &ServerPools {
        &self.inner.servers
    }

    pub fn ops(&self) -> &Operations {
        &self.inner.ops
    }

    /// Background work started by operations; closed and awaited on shutdown.
    pub fn tasks(&self) -> &tokio_util::task::TaskTracker {
        self.inner.ops.tasks()
    }

    pub fn provisioner(&self) -> &Provisioner {
        &self.inner.provisioner
    }

    /// Backups, or `NotConfigured` when no bucket is.
    pub fn backups(&self) -> Result<&Backups> {
        self.inner.backups.as_ref().ok_or(Error::NotConfigured)
    }

    pub fn has_backups(&self) -> bool {
        self.inner.backups.is_some()
    }

    pub fn mover(&self) -> &Mover {
        &self.inner.mover
    }

    pub fn fleet(&self) -> &Fleet {
        &self.inner.fleet
    }

    /// The usage collector (see [`crate::usage`]).
    pub fn usage(&self) -> &crate::usage::Collector {
        &self.inner.usage
    }

    /// Run a usage pass now, whenever the last one ran (still one replica
    /// at a time: `None` if another is running one), with the default
    /// settings: for tests, benches and operators.
    pub async fn collect_usage_once(&self) -> anyhow::Result<Option<crate::usage::PassReport>> {
        self.inner
            .usage
            .run(&crate::usage::UsageSettings::default(), true)
            .await
    }

    /// Newest tenant schema version: what new tenants and fleet runs reach.
    pub fn latest_version(&self) -> i64 {
        self.inner.schema.latest_version()
    }

    /// Register a tenant DB server after checking its admin URL works.
    pub async fn register_server(
        &self,
        name: &str,
        admin_url: &str,
        max_connections: i32,
        max_tenants: i32,
    ) -> anyhow::Result<DbServer> {
        self.inner
            .servers
            .register(
                &self.inner.registry,
                name,
                admin_url,
                max_connections,
                max_tenants,
            )
            .await
    }

    /// Change a registered server's admin URL (see
    /// [`ServerPools::change_admin_url`]).
    pub async fn change_server_admin_url(
        &self,
        server: &DbServer,
        admin_url: &str,
    ) -> anyhow::Result<DbServer> {
        self.inner
            .servers
            .change_admin_url(&self.inner.registry, server, admin_url)
            .await
    }

    /// On first start, register the default server.
    pub async fn ensure_default_server(&self, admin_url: &str) -> anyhow::Result<()> {
        self.inner
            .servers
            .ensure_default(&self.inner.registry, admin_url)
            .await
    }

    /// Check every tenant server once and record the results.
    pub async fn check_servers(
        &self,
        unhealthy_after: std::time::Duration,
    ) -> anyhow::Result<Vec<ServerCheck>> {
        crate::servers::check_all(&self.inner.registry, &self.inner.servers, unhealthy_after).await
    }

    /// Check one tenant server now and record the result (an `unhealthy`
    /// one that passes is `active` again; a failure changes no status).
    pub async fn check_server(&self, server: &DbServer) -> anyhow::Result<ServerCheck> {
        // Long: a failure here only records its cause.
        let unhealthy_after = std::time::Duration::from_secs(365 * 86_400);
        crate::servers::check_server(
            &self.inner.registry,
            &self.inner.servers,
            server,
            unhealthy_after,
        )
        .await
    }

    /// Start deleting a tenant: `deleting` now, then (in the background) a
    /// final backup when storage is configured, then the drop. Returns the
    /// operation to poll.
    pub async fn start_delete(&self, id: Uuid, actor: &str) -> Result<Operation> {
        let started = self.provisioner().begin_delete(id, actor).await?;
        let this = self.clone();
        self.tasks().spawn(async move {
            if let Err(e) = this.finish_delete(id).await {
                tracing::error!(tenant_id = %id, "failed to delete tenant: {e:#}");
            }
        });
        Ok(started.operation)
    }

    /// Finish a delete under the tenant's lock and report it on its operations.
    pub async fn finish_delete(&self, id: Uuid) -> anyhow::Result<()> {
        let result = self
            .registry()
            .with_tenant_lock(id, || async {
                // A backup of it under way (scheduled or asked for before
                // the delete) is waited for, then the final one is taken.
                self.wait_for_running_backup(id).await?;
                self.finish_delete_locked(id).await
            })
            .await;
        self.provisioner()
            .finish_delete_operations(id, &result)
            .await?;
        result
    }

    /// Wait for a queued or running backup of tenant `id` to end (at most
    /// [`DELETE_WAITS_FOR_BACKUP`]): a delete's final backup follows it, where
    /// it would be refused as "already running".
    async fn wait_for_running_backup(&self, id: Uuid) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + DELETE_WAITS_FOR_BACKUP;
        while let Some(b) = self.registry().running_backup(id).await? {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "wait for backup {} of the tenant, {} for over {} minutes (the reconciler retries the delete once it has ended)",
                b.id,
                b.status,
                DELETE_WAITS_FOR_BACKUP.as_secs() / 60
            );
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        Ok(())
    }

    /// Drop a `deleting` tenant (the caller holds its lock): nothing is
    /// dropped before a final backup of it exists, when storage is configured.
    pub async fn finish_delete_locked(&self, id: Uuid) -> anyhow::Result<()> {
        let t = self.registry().tenant(id).await?.context("find tenant")?;
        if t.status != TenantStatus::Deleting {
            return Ok(());
        }
        if let Some(backups) = &self.inner.backups {
            let admin = self.provisioner().admin_for(&t).await?;
            if roles::database_exists(&admin, &t.database_name).await?
                && !backups.final_backup_taken(&t).await?
            {
                Box::pin(backups.backup_now(id, crate::backup::BackupKind::Final, None))
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!("take the final backup before deleting: {}", e.detail())
                    })?;
            }
        }
        self.provisioner().drop_deleting_locked(&t).await
    }

    /// Refuse a restore that may not happen, before anything changes: into
    /// another existing tenant than the backup's own (422, see
    /// [`refuse_foreign_target`]), or replacing the data of a tenant that
    /// has some (active or suspended) unless the request says `overwrite`
    /// (409).
    pub async fn refuse_restore(
        &self,
        backup: Uuid,
        target: &RestoreTarget,
        overwrite: bool,
    ) -> Result<()> {
        let b = self
            .registry()
            .backup(backup)
            .await?
            .ok_or(Error::NotFound("backup"))?;
        let existing = match target {
            RestoreTarget::InPlace => self.registry().tenant(b.tenant_id).await?,
            RestoreTarget::IntoSlug(slug) => {
                let t = self.registry().find_tenant(slug.as_str()).await?;
                if let Some(t) = &t {
                    refuse_foreign_target(&b, t)?;
                }
                t
            }
        };
        if overwrite {
            return Ok(());
        }
        match existing {
            Some(t) if matches!(t.status, TenantStatus::Active | TenantStatus::Suspended) => {
                Err(Error::conflict(format!(
                    "tenant '{}' exists and holds data: a restore replaces it (its current database is kept aside for {} days); send \"overwrite\": true to do that",
                    t.slug,
                    self.keep_for().0.as_secs() / 86_400
                )))
            }
            _ => Ok(()),
        }
    }

    /// Restore a backup into its own tenant or into `target`'s slug (a new
    /// tenant, created first, when the slug is free), and wait for it. The
    /// database it replaces, if any, is set aside for the grace period
    /// ([`crate::domain::KeepFor`]), not dropped.
    pub async fn restore(
        &self,
        backup: Uuid,
        target: RestoreTarget,
        actor: &str,
        progress: Option<Progress>,
    ) -> Result<TenantRecord> {
        let backups = self.backups()?;
        let (b, source) = backups.backup_and_tenant(backup).await?;
        let target = match target {
            RestoreTarget::InPlace => source,
            RestoreTarget::IntoSlug(slug) => {
                match self.registry().find_tenant(slug.as_str()).await? {
                    Some(t) => {
                        refuse_foreign_target(&b, &t)?;
                        t
                    }
                    None => {
                        let held = self.create_held(&source, slug, actor).await?;
                        return self.restore_created(&b, &held, actor, progress).await;
                    }
                }
            }
        };
        self.restore_into(&b, &target, actor, progress).await
    }

    /// Restore `b` into `target`, keeping the database it replaces aside.
    async fn restore_into(
        &self,
        b: &crate::registry::Backup,
        target: &TenantRecord,
        actor: &str,
        progress: Option<Progress>,
    ) -> Result<TenantRecord> {
        let replaced = matches!(
            target.status,
            TenantStatus::Active | TenantStatus::Suspended
        )
        .then(|| target.database_name.clone());
        let restored = self
            .backups()?
            .restore_into(b, target, actor, progress)
            .await?;
        if let Some(old) = replaced.filter(|old| *old != restored.database_name) {
            self.keep_replaced(&restored, &old).await;
        }
        Ok(restored)
    }

    /// The tenant a restore into a free slug creates, with the backed-up
    /// tenant's name and plan, held suspended until the backup's data is
    /// in: no token, login or write reaches the empty database the restore
    /// is about to replace. If it cannot be held, it is deleted again.
    async fn create_held(
        &self,
        source: &TenantRecord,
        slug: crate::domain::Slug,
        actor: &str,
    ) -> Result<TenantRecord> {
        let req = CreateTenant {
            slug,
            name: TenantName::parse(&source.name)?,
            plan: source.plan.clone(),
            server: None,
        };
        let made = self.provisioner().create(&req, None, actor).await?;
        match self.provisioner().suspend(made.id, actor).await {
            Ok(held) => Ok(held),
            Err(e) => {
                self.discard_created(made.id, actor).await;
                Err(e)
            }
        }
    }

    /// Restore `b` into `held`, a tenant [`Self::create_held`] made for it,
    /// and let it in. A restore that fails before its data is in deletes
    /// that tenant again (its slug is free for the next try); once the data
    /// is in, the tenant is kept whatever fails after.
    async fn restore_created(
        &self,
        b: &Backup,
        held: &TenantRecord,
        actor: &str,
        progress: Option<Progress>,
    ) -> Result<TenantRecord> {
        match self.restore_into(b, held, actor, progress).await {
            Ok(restored) => self.provisioner().resume(restored.id, actor).await,
            Err(e) => {
                // Deleted only when surely not swapped: a registry that
                // cannot be read now (a control database restarting) leaves
                // the tenant to the sweep, which settles it either way.
                let not_swapped = matches!(
                    self.registry().tenant(held.id).await,
                    Ok(Some(t)) if t.database_name == held.database_name
                );
                if not_swapped {
                    self.discard_created(held.id, actor).await;
                }
                Err(e)
            }
        }
    }

    /// Delete a tenant a restore created and could not fill (as any delete:
    /// a final backup first, then the drop). If this fails, the tenant stays
    /// `deleting` and the reconciler finishes it.
    async fn discard_created(&self, id: Uuid, actor: &str) {
        let deleted = async {
            self.provisioner().begin_delete(id, actor).await?;
            self.finish_delete(id).await.map_err(Error::from)
        }
        .await;
        match deleted {
            Ok(()) => {
                tracing::info!(tenant_id = %id, "deleted the tenant a failed restore had created")
            }
            Err(e) => {
                tracing::warn!(tenant_id = %id, "failed to delete the tenant a failed restore had created (the reconciler finishes it if it is deleting): {}", e.detail())
            }
        }
    }

    /// Set the database a restore replaced aside until the grace period
    /// ends. If this fails, the reconciler quarantines it (the registry no
    /// longer names it), with the same grace period.
    async fn keep_replaced(&self, t: &TenantRecord, old: &str) {
        let kept = async {
            let admin = self
                .servers()
                .admin_of(self.registry(), t.server_id)
                .await?;
            // Under the server's lock: the sweep is not quarantining it meanwhile.
            self.registry()
                .with_server_lock(t.server_id, || {
                    roles::keep_database(&admin, old, t.id, Some(self.drop_after()))
                })
                .await
        }
        .await;
        match kept {
            Ok(kept) => {
                tracing::info!(tenant_id = %t.id, database = kept, "kept the database a restore replaced, until its grace period ends")
            }
            Err(e) => {
                tracing::warn!(tenant_id = %t.id, database = old, "failed to set the replaced database aside (the reconciler quarantines it): {e:#}")
            }
        }
    }

    /// `POST /backups/{id}/restore` and `POST /tenants/{t}/restore` as an operation.
    pub async fn start_restore(
        &self,
        backup: Uuid,
        target: RestoreTarget,
        overwrite: bool,
        actor: &str,
        progress: Option<Progress>,
    ) -> Result<Operation> {
        let backups = self.backups()?;
        let reg = self.registry();
        let b = backups.succeeded_backup(backup, "restored").await?;
        let into = match &target {
            RestoreTarget::InPlace => None,
            RestoreTarget::IntoSlug(s) => Some(s.clone()),
        };
        let target_tenant = match &into {
            Some(slug) => reg.find_tenant(slug.as_str()).await?.map(|t| t.id),
            None => Some(b.tenant_id),
        };
        if let (RestoreTarget::IntoSlug(slug), None) = (&target, target_tenant) {
            return self
                .start_restore_into_new(&b, slug.clone(), overwrite, actor, progress)
                .await;
        }
        // The operation is recorded on the tenant restored into (the
        // backup's own when a new one is created).
        let recorded_on = target_tenant.unwrap_or(b.tenant_id);
        // Checked and recorded under the tenant's lock, as moves and
        // archivals are: of concurrent requests, one starts; the others
        // see it (or the state it left) and are refused.
        reg.with_tenant_lock(recorded_on, || async move {
            self.refuse_restore(backup, &target, overwrite).await?;
            if reg.backup_key_erased(b.tenant_id).await? {
                return Err(Error::conflict(
                    "the tenant's backup key was erased: its backups can no longer be read",
                ));
            }
            // The database the restore will replace, if any: a process that
            // dies after the swap is known to have swapped by it.
            let mut replaces: Option<String> = None;
            if let Some(t) = target_tenant {
                self.ops()
                    .refuse_if_busy(OperationKind::BackupRestore, t)
                    .await?;
                if let Some(t) = reg.tenant(t).await? {
                    replaces = matches!(t.status, TenantStatus::Active | TenantStatus::Suspended)
                        .then(|| t.database_name.clone());
                    if !matches!(
                        t.status,
                        TenantStatus::Active | TenantStatus::Suspended | TenantStatus::Archived
                    ) {
                        return Err(Error::state(
                            t.status.as_str(),
                            "only an active, suspended or archived tenant can be restored into",
                        ));
                    }
                }
            }
            let this = self.clone();
            let owned_actor = actor.to_owned();
            let op = self
                .ops()
                .spawn(
                    OperationKind::BackupRestore,
                    Some(recorded_on),
                    json!({"backup_id": backup, "into_slug": into, "overwrite": overwrite, "replaces": replaces}),
                    move || async move {
                        let t = this.restore(backup, target, &owned_actor, progress).await?;
                        Ok(json!({"tenant_id": t.id, "slug": t.slug, "status": t.status, "database": t.database_name, "backup_id": backup}))
                    },
                )
                .await?;
            // Audited when asked for, whether or not it succeeds.
            reg.audit(
                actor,
                "tenant.restore_requested",
                target_tenant,
                json!({"backup_id": backup, "from_tenant": b.tenant_id, "into_slug": into, "overwrite": overwrite, "operation": op.id}),
            )
            .await?;
            Ok(op)
        })
        .await
    }

    /// A restore into a slug no tenant has: the tenant is created and held
    /// suspended now, and the operation is recorded on it with the database
    /// it was created with (`replaces`) and `created`. A process that dies
    /// mid-restore leaves what the sweep settles from those alone: swapped
    /// (the tenant names another database) is let in, not swapped is
    /// deleted, so the slug is free for the next try.
    async fn start_restore_into_new(
        &self,
        b: &Backup,
        slug: crate::domain::Slug,
        overwrite: bool,
        actor: &str,
        progress: Option<Progress>,
    ) -> Result<Operation> {
        let reg = self.registry();
        if reg.backup_key_erased(b.tenant_id).await? {
            return Err(Error::conflict(
                "the tenant's backup key was erased: its backups can no longer be read",
            ));
        }
        let (_, source) = self.backups()?.backup_and_tenant(b.id).await?;
        let held = self.create_held(&source, slug.clone(), actor).await?;
        let (this, b_run, held_run, owned_actor) =
            (self.clone(), b.clone(), held.clone(), actor.to_owned());
        let spawned = self
            .ops()
            .spawn(
                OperationKind::BackupRestore,
                Some(held.id),
                json!({"backup_id": b.id, "into_slug": slug, "overwrite": overwrite, "replaces": held.database_name, "created": true}),
                move || async move {
                    let t = this
                        .restore_created(&b_run, &held_run, &owned_actor, progress)
                        .await?;
                    Ok(json!({"tenant_id": t.id, "slug": t.slug, "status": t.status, "database": t.database_name, "backup_id": b_run.id}))
                },
            )
            .await;
        let op = match spawned {
            Ok(op) => op,
            Err(e) => {
                self.discard_created(held.id, actor).await;
                return Err(e);
            }
        };
        reg.audit(
            actor,
            "tenant.restore_requested",
            Some(held.id),
            json!({"backup_id": b.id, "from_tenant": b.tenant_id, "into_slug": slug, "overwrite": overwrite, "operation": op.id}),
        )
        .await?;
        Ok(op)
    }

    /// Wait for an operation to end (`succeeded` or `failed`). One left
    /// `running` with nobody holding its lease (its runner stopped when
    /// its control database session ended) is not waited for: a reconcile
    /// pass settles it.
    pub async fn wait_operation(&self, id: Uuid) -> Result<Operation> {
        let mut unheld = 0;
        for tick in 0u64.. {
            let op = self
                .registry()
                .operation(id)
                .await?
                .ok_or(Error::NotFound("operation"))?;
            if matches!(
                op.status,
                OperationStatus::Succeeded | OperationStatus::Failed
            ) {
                return Ok(op);
            }
            if op.status == OperationStatus::Running && tick % 10 == 9 {
                match self.registry().try_lock_operation(id).await? {
                    Some(lease) => {
                        lease.release().await;
                        unheld += 1;
                    }
                    None => unheld = 0,
                }
                if unheld >= 3 {
                    return Err(Error::Unavailable(format!(
                        "operation {id} lost its runner (its control database session ended): a reconcile pass settles it (silo reconcile)"
                    )));
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        unreachable!("the ticks never run out")
    }

    /// Run a started fleet migration to its end; if it changed any tenant's
    /// schema, new tenants must arrive at the new version too: templates are
    /// rebuilt and spares replaced (a reconcile pass).
    pub async fn run_fleet(
        &self,
        run: FleetRun,
        on_result: impl Fn(&TenantResult, FleetProgress) + Send + Sync,
    ) -> anyhow::Result<FleetReport> {
        let report = run.run(self.fleet(), on_result).await?;
        if report.migrated > 0 {
            if let Err(e) = self.reconcile_once().await {
                tracing::warn!("failed to refresh templates after a fleet migration: {e:#}");
            }
        }
        Ok(report)
    }
}

/// A backup is restored into its own tenant or into a new one, never into
/// another existing tenant: that tenant's tokens and credentials would then
/// read the backup's tenant's data.
fn refuse_foreign_target(b: &Backup, into: &TenantRecord) -> Result<()> {
    if into.id == b.tenant_id {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "into_slug names another tenant ('{}'): a backup can only be restored into its own tenant or into a new tenant (a slug no tenant has)",
        into.slug
    )))
}
