//! Backup work as operations (`202` + poll), archival, erasure, and the
//! sweep that cleans up after backups, restores and archivals whose process
//! died.

use std::collections::HashSet;

use anyhow::Context;
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use super::{BackupKind, Backups, OBJECT_PREFIX};
use crate::domain::OperationKind;
use crate::ops::{Error, Result};
use crate::registry::{Operation, OperationStatus, Registry, TenantRecord, TenantStatus};
use crate::servers::names::SCRATCH_DB_PREFIX;
use crate::servers::{roles, ServerAdmin};

/// Operation kinds whose interrupted runs the backup sweep settles.
pub const SETTLED_BY_SWEEP: [OperationKind; 3] = [
    OperationKind::TenantArchive,
    OperationKind::BackupRestore,
    OperationKind::BackupVerify,
];

/// What one backup sweep cleaned up.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct BackupSweep {
    /// Running backups whose runner died, now `failed` with their upload
    /// aborted, and queued ones whose process died, now `failed`.
    pub backups_abandoned: u32,
    /// Open multipart uploads no running backup owned, aborted.
    pub uploads_aborted: u32,
    /// Operations whose runner died, now `failed` (or finished, for archivals past the drop).
    pub operations_interrupted: u32,
}

impl Backups {
    /// `POST /backups/{id}/verify` as an operation.
    pub async fn start_verify(&self, backup: Uuid) -> Result<Operation> {
        let b = self.succeeded_backup(backup, "verified").await?;
        let this = self.clone();
        self.inner
            .ops
            .spawn(
                OperationKind::BackupVerify,
                Some(b.tenant_id),
                json!({"backup_id": backup}),
                move || async move {
                    let report = this.verify_backup(backup, None).await?;
                    if !report.ok {
                        return Err(Error::Internal(anyhow::anyhow!(
                            "verify the backup: {}",
                            report.mismatches.join("; ")
                        )));
                    }
                    Ok(serde_json::to_value(report).unwrap_or_default())
                },
            )
            .await
    }

    /// Archive a tenant: final backup, verified, then its database and role
    /// dropped and the tenant `archived`. The tenant stops serving at once
    /// (no write may land after the backup); a failure brings it back.
    #[tracing::instrument(skip(self), fields(tenant_id = %id))]
    pub async fn start_archive(&self, id: Uuid, actor: &str) -> Result<Operation> {
        let reg = self.registry();
        let from = reg
            .with_tenant_lock(id, || async {
                let t = reg.tenant(id).await?.ok_or(Error::NotFound("tenant"))?;
                match t.status {
                    TenantStatus::Active | TenantStatus::Suspended => {}
                    TenantStatus::Deleted => return Err(Error::NotFound("tenant")),
                    other => {
                        return Err(Error::state(
                            other.as_str(),
                            "only an active or suspended tenant can be archived",
                        ))
                    }
                }
                self.inner
                    .ops
                    .refuse_if_busy(OperationKind::TenantArchive, id)
                    .await?;
                self.refuse_if_erased(id).await?;
                reg.transition(id, &[t.status], TenantStatus::Archiving, None)
                    .await?
                    .ok_or_else(|| Error::conflict("tenant changed state"))?;
                reg.audit(actor, "tenant.archive", Some(id), json!({}))
                    .await?;
                Ok(t.status)
            })
            .await?;
        let this = self.clone();
        self.inner
            .ops
            .spawn(
                OperationKind::TenantArchive,
                Some(id),
                json!({"from": from.as_str()}),
                move || async move {
                    let backup = this.run_archive(id, from).await?;
                    Ok(json!({"tenant_id": id, "status": "archived", "backup_id": backup}))
                },
            )
            .await
    }

    async fn run_archive(&self, id: Uuid, from: TenantStatus) -> Result<Uuid> {
        let reg = self.registry();
        let t = reg.tenant(id).await?.ok_or(Error::NotFound("tenant"))?;
        let admin = self.admin_for(&t).await?;
        let backed_up = async {
            roles::set_role_login(&admin, &t.role_name, false).await?;
            roles::terminate_sessions(&admin, &t.role_name).await?;
            let b = self.backup_now(id, BackupKind::Archive, None).await?;
            let report = self.verify_backup(b.id, None).await?;
            if !report.ok {
                return Err(Error::Internal(anyhow::anyhow!(
                    "verify the archive backup: {}",
                    report.mismatches.join("; ")
                )));
            }
            crate::failpoint::hit("archive_backup");
            Ok(b.id)
        }
        .await;
        match backed_up {
            Ok(backup) => {
                reg.with_tenant_lock(id, || self.finish_archive_locked(&admin, &t))
                    .await?;
                Ok(backup)
            }
            Err(e) => {
                self.undo_archive(&admin, &t, from, &e.detail()).await;
                Err(e)
            }
        }
    }

    async fn finish_archive_locked(&self, admin: &ServerAdmin, t: &TenantRecord) -> Result<()> {
        // Only a tenant still archiving loses its database (a sweep may have
        // put it back if this runner's lock connection was lost).
        let current = self
            .registry()
            .tenant(t.id)
            .await?
            .context("find the tenant")?;
        if current.status != TenantStatus::Archiving {
            return Err(Error::conflict(format!(
                "finish the archival: the tenant is {} now; nothing was dropped",
                current.status.as_str()
            )));
        }
        roles::drop_database(admin, &t.database_name)
            .await
            .context("drop the archived tenant's database")?;
        roles::drop_role(admin, &t.role_name)
            .await
            .context("drop the archived tenant's role")?;
        self.registry()
            .transition(
                t.id,
                &[TenantStatus::Archiving],
                TenantStatus::Archived,
                None,
            )
            .await?
            .context("mark the tenant archived")?;
        Ok(())
    }

    async fn undo_archive(
        &self,
        admin: &ServerAdmin,
        t: &TenantRecord,
        from: TenantStatus,
        error: &str,
    ) {
        let reg = self.registry();
        if reg
            .transition(t.id, &[TenantStatus::Archiving], from, Some(error))
            .await
            .is_ok()
            && from == TenantStatus::Active
        {
            if let Err(e) = roles::set_role_login(admin, &t.role_name, true).await {
                tracing::warn!(tenant_id = %t.id, "failed to let the tenant in again (the reconciler will): {e:#}");
            }
        }
    }

    /// Crypto-shred a deleted tenant's backups: forget its data key, delete
    /// the objects. Nothing can read them afterwards.
    pub async fn erase_backups(&self, id: Uuid, actor: &str) -> Result<u32> {
        let storage = self.storage();
        let reg = self.registry();
        let t = reg.tenant(id).await?.ok_or(Error::NotFound("tenant"))?;
        if t.status != TenantStatus::Deleted {
            return Err(Error::state(
                t.status.as_str(),
                "only a deleted tenant's backups can be erased",
            ));
        }
        reg.erase_backup_key(id).await?;
        let mut removed = 0;
        for b in reg.live_backups_of(id).await? {
            storage.store.delete(&b.manifest_key).await?;
            storage.store.delete(&b.object_key).await?;
            reg.mark_backup_deleted(b.id).await?;
            removed += 1;
        }
        reg.audit(
            actor,
            "tenant.erase_backups",
            Some(id),
            json!({"backups": removed}),
        )
        .await?;
        Ok(removed)
    }

    /// Clean up after backups, restores and archivals whose process died.
    pub async fn sweep_backups(&self) -> anyhow::Result<BackupSweep> {
        let mut report = BackupSweep::default();
        let storage = self.storage();
        let reg = self.registry();
        // Queued work of stopped processes first: its operations are then
        // settled below like any interrupted one.
        report.backups_abandoned += self.sweep_queued().await?;
        for b in reg.running_backups().await? {
            let Some(lock) = reg.try_lock_backup(b.id).await? else {
                continue; // alive
            };
            // Re-read under the lock: it may have finished meanwhile.
            if let Some(b) = reg.backup(b.id).await?.filter(|b| b.status == "running") {
                self.discard_backup(&storage.store, &b).await;
                reg.fail_backup(
                    b.id,
                    "interrupted: the silo process running this backup stopped",
                )
                .await?;
                report.backups_abandoned += 1;
                tracing::warn!(backup_id = %b.id, tenant_id = %b.tenant_id, "backup abandoned by a stopped process: upload aborted, marked failed");
            }
            lock.release().await;
        }
        // Uploads the registry never learnt of (a crash right after starting one),
        // where the store can list them.
        if let Some(open) = storage.store.open_uploads(OBJECT_PREFIX).await? {
            for (key, upload) in open {
                let owner = key
                    .rsplit('/')
                    .next()
                    .and_then(|f| f.strip_suffix(".dump"))
                    .and_then(|id| Uuid::parse_str(id).ok());
                let alive = match owner {
                    Some(id) => reg.backup(id).await?.is_some_and(|b| b.status == "running"),
                    None => false,
                };
                if !alive {
                    match storage.store.abort_upload(&key, &upload).await {
                        Ok(()) => report.uploads_aborted += 1,
                        Err(e) => tracing::warn!("failed to abort an abandoned upload: {e:#}"),
                    }
                }
            }
        }
        for kind in SETTLED_BY_SWEEP {
            for op in reg.unfinished_operations(kind).await? {
                let Some(lock) = reg.try_lock_operation(op.id).await? else {
                    continue; // its runner is alive
                };
                // Settle under the tenant's lock; if someone holds it, next pass.
                let tenant_lock = match op.tenant_id {
                    Some(t) => match reg.try_lock_tenant(t).await? {
                        Some(l) => Some(l),
                        None => {
                            lock.release().await;
                            continue;
                        }
                    },
                    None => None,
                };
                // Re-read under the locks: it may have finished meanwhile.
                let still_open = reg.operation(op.id).await?.is_some_and(|o| {
                    matches!(
                        o.status,
                        OperationStatus::Pending | OperationStatus::Running
                    )
                });
                if still_open {
                    let outcome = self.settle_interrupted(&op).await;
                    reg.finish_operation(op.id, outcome).await?;
                    report.operations_interrupted += 1;
                }
                if let Some(l) = tenant_lock {
                    l.release().await;
                }
                lock.release().await;
            }
        }
        // A tenant left `archiving` or `restoring` with no live operation.
        for t in reg
            .tenants_in(&[TenantStatus::Archiving, TenantStatus::Restoring])
            .await?
        {
            let Some(lock) = reg.try_lock_tenant(t.id).await? else {
                continue;
            };
            // Re-read under the lock: an operation may have settled it meanwhile.
            let Some(t) = reg
                .tenant(t.id)
                .await?
                .filter(|t| matches!(t.status, TenantStatus::Archiving | TenantStatus::Restoring))
            else {
                lock.release().await;
                continue;
            };
            let live = reg.open_operation_of(t.id, &SETTLED_BY_SWEEP).await?;
            if live.is_none() {
                match t.status {
                    TenantStatus::Restoring => {
                        self.undo_unarchive(
                            t.id,
                            "interrupted: the silo process restoring it stopped",
                        )
                        .await
                    }
                    _ => {
                        let from = reg
                            .latest_operation_params(OperationKind::TenantArchive, t.id)
                            .await?
                            .and_then(|p| p["from"].as_str().and_then(TenantStatus::parse))
                            .unwrap_or(TenantStatus::Active);
                        let admin = self.admin_for(&t).await?;
                        self.settle_archive(&admin, &t, from).await;
                    }
                }
            }
            lock.release().await;
        }
        Ok(report)
    }

    /// The outcome to record for an operation whose runner died, after
    /// putting its tenant back in a settled state.
    async fn settle_interrupted(&self, op: &Operation) -> Result<serde_json::Value, String> {
        let reg = self.registry();
        let interrupted = "interrupted: the silo process running it stopped".to_owned();
        let Some(tenant) = op.tenant_id else {
            return Err(interrupted);
        };
        let Ok(Some(t)) = reg.tenant(tenant).await else {
            return Err(interrupted);
        };
        match (op.kind, t.status) {
            (OperationKind::TenantArchive, TenantStatus::Archiving) => {
                let from = reg
                    .operation_params(op.id)
                    .await
                    .ok()
                    .and_then(|p| p["from"].as_str().and_then(TenantStatus::parse))
                    .unwrap_or(TenantStatus::Active);
                let Ok(admin) = self.admin_for(&t).await else {
                    return Err(interrupted);
                };
                if self.settle_archive(&admin, &t, from).await {
                    Ok(json!({"tenant_id": t.id, "status": "archived"}))
                } else {
                    Err("interrupted: the silo process archiving it stopped; the tenant was put back".into())
                }
            }
            (OperationKind::BackupRestore, TenantStatus::Active | TenantStatus::Suspended) => {
                // Swapped before the process died: the tenant serves the
                // restored database, and the one it replaced (no longer
                // named) is quarantined by the reconciler for the grace
                // period, as the runner would have set it aside.
                let params = reg.operation_params(op.id).await.unwrap_or_default();
                let created = params["created"].as_bool() == Some(true);
                match params["replaces"].as_str() {
                    // A tenant created for the restore, its data never in:
                    // deleted, so its slug is free for the next try.
                    Some(replaced)
                        if created
                            && replaced == t.database_name
                            && t.status == TenantStatus::Suspended =>
                    {
                        Err(self.discard_created(op, &t).await)
                    }
                    Some(replaced) if replaced != t.database_name => {
                        if created && t.status == TenantStatus::Suspended {
                            self.let_in_created(&t).await;
                        }
                        reg.audit(
                            "reconciler",
                            "tenant.restore",
                            Some(t.id),
                            json!({"backup_id": params["backup_id"], "settled": "the silo process running it stopped after the swap"}),
                        )
                        .await
                        .ok();
                        Ok(
                            json!({"tenant_id": t.id, "slug": t.slug, "status": t.status, "database": t.database_name, "backup_id": params["backup_id"], "settled": "the silo process running it stopped after the restored database was swapped in"}),
                        )
                    }
                    _ => Err(interrupted),
                }
            }
            (OperationKind::BackupRestore, TenantStatus::Restoring) => {
                self.undo_unarchive(t.id, "interrupted: the silo process restoring it stopped")
                    .await;
                Err(interrupted)
            }
            _ => Err(interrupted),
        }
    }

    /// Let in a tenant a restore created and filled, whose process died
    /// before it resumed the tenant: as a resume does, the role first, then
    /// the registry. If this fails, the tenant stays suspended (with its
    /// data) for an operator to resume.
    async fn let_in_created(&self, t: &TenantRecord) {
        let reg = self.registry();
        let resumed = async {
            let admin = self.admin_for(t).await?;
            roles::set_role_login(&admin, &t.role_name, true).await?;
            reg.transition(t.id, &[TenantStatus::Suspended], TenantStatus::Active, None)
                .await?;
            reg.audit(
                "reconciler",
                "tenant.resume",
                Some(t.id),
                json!({"settled": "the restore that created it had its data in"}),
            )
            .await?;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = resumed {
            tracing::warn!(tenant_id = %t.id, "failed to resume a tenant its interrupted restore had filled (resume it): {e:#}");
        }
    }

    /// Start deleting a tenant a restore created and never filled (its
    /// process died first), as a delete does: `deleting` with a delete
    /// operation, which the reconciler finishes. Returns the restore's error.
    async fn discard_created(&self, op: &Operation, t: &TenantRecord) -> String {
        let reg = self.registry();
        let started = async {
            if reg
                .transition(t.id, &[t.status], TenantStatus::Deleting, None)
                .await?
                .is_some()
            {
                let delete = reg
                    .create_operation_as(Uuid::now_v7(), OperationKind::TenantDelete, Some(t.id), json!({}))
                    .await?;
                reg.audit(
                    "reconciler",
                    "tenant.delete",
                    Some(t.id),
                    json!({"operation": delete.id, "why": "the restore that created it stopped before its data was in", "restore": op.id}),
                )
                .await?;
            }
            anyhow::Ok(())
        }
        .await;
        match started {
            Ok(()) => format!(
                "interrupted: the silo process running it stopped before the backup's data was in; the tenant it had created ('{}') is being deleted, so the slug is free again for another try",
                t.slug
            ),
            Err(e) => {
                tracing::warn!(tenant_id = %t.id, "failed to start deleting the tenant an interrupted restore had created: {e:#}");
                format!(
                    "interrupted: the silo process running it stopped before the backup's data was in; the tenant it had created ('{}') holds none of it: delete it",
                    t.slug
                )
            }
        }
    }

    /// An archival that lost its process: finished if the database is
    /// already gone, else undone. Returns `true` when it ended archived.
    async fn settle_archive(
        &self,
        admin: &ServerAdmin,
        t: &TenantRecord,
        from: TenantStatus,
    ) -> bool {
        match roles::database_exists(admin, &t.database_name).await {
            Ok(false) => self.finish_archive_locked(admin, t).await.is_ok(),
            Ok(true) => {
                self.undo_archive(
                    admin,
                    t,
                    from,
                    "interrupted: the silo process archiving it stopped",
                )
                .await;
                false
            }
            Err(_) => false,
        }
    }

    /// Has the tenant a succeeded final backup taken since its delete was asked for?
    pub async fn final_backup_taken(&self, t: &TenantRecord) -> Result<bool> {
        let reg = self.registry();
        let asked = reg
            .open_operations(OperationKind::TenantDelete, t.id)
            .await?
            .iter()
            .map(|op| op.created_at)
            .min()
            .unwrap_or(t.updated_at);
        Ok(reg
            .live_backups_of(t.id)
            .await?
            .iter()
            .any(|b| b.kind == "final" && b.status == "succeeded" && b.started_at >= asked))
    }
}

/// Drop scratch databases (`silo_x_*`) whose restore or verification died
/// (their runner's lock is free). Runs whether or not storage is configured:
/// a scratch database may outlive the configuration that made it. A dead
/// runner's `CREATE DATABASE` still running in PostgreSQL is ended first,
/// else it could commit once the databases were listed.
pub async fn sweep_scratch_databases(
    registry: &Registry,
    admin: &ServerAdmin,
) -> anyhow::Result<u32> {
    for (name, pid) in roles::creations_running(admin, SCRATCH_DB_PREFIX).await? {
        let Some(id) = name
            .strip_prefix(SCRATCH_DB_PREFIX)
            .and_then(|h| Uuid::parse_str(h).ok())
        else {
            continue;
        };
        if let Some(lock) = registry.try_lock_backup(id).await? {
            let ended = roles::end_creation(admin, pid, &name).await;
            lock.release().await;
            match ended? {
                Some(true) => tracing::info!(
                    database = name,
                    "ended a dead runner's scratch database creation"
                ),
                Some(false) => anyhow::bail!(
                    "the creation of {name}, left running by a dead runner, did not end within 5 s"
                ),
                None => {}
            }
        }
    }
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE datname LIKE 'silo\\_x\\_%'",
    )
    .fetch_all(&admin.pool)
    .await
    .map_err(|e| admin.error(None, e))
    .context("list scratch databases")?;
    let mut dropped = 0;
    let mut seen = HashSet::new();
    for name in names {
        let Some(id) = name
            .strip_prefix(SCRATCH_DB_PREFIX)
            .and_then(|h| Uuid::parse_str(h).ok())
        else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        if let Some(lock) = registry.try_lock_backup(id).await? {
            let dropped_now = roles::drop_database(admin, &name)
                .await
                .with_context(|| format!("drop abandoned scratch database {name}"));
            lock.release().await;
            dropped_now?;
            dropped += 1;
        }
    }
    Ok(dropped)
}
