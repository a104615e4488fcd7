//! Restore and verification: stream a backup into a fresh database, check
//! it, then swap it in (restore) or count its rows and drop it (verify).

use anyhow::Context;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Connection;
use tokio::io::AsyncWriteExt;
use utoipa::ToSchema;
use uuid::Uuid;

use super::crypt::Opener;
use super::pgtools::capture_stderr;
use super::run::{hex, row_counts, Manifest};
use super::{scratch_db, BackupError, Progress, Storage};
use crate::provision::{
    connection_limit, create_role, names_for, verify_login, CreateTenant, Provisioner, ServerAdmin,
};
use crate::registry::{Backup, Lock, TenantRecord, TenantStatus};

/// Where a restore goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreTarget {
    /// Replace the backed-up tenant's database (or bring it back from archive).
    InPlace,
    /// Into the tenant with this slug, created if there is none.
    IntoSlug(String),
}

/// Outcome of a verification.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq)]
pub struct VerifyReport {
    pub backup_id: Uuid,
    pub ok: bool,
    /// Tables compared.
    pub tables: usize,
    /// `table: expected N, restored M` for each difference.
    pub mismatches: Vec<String>,
}

/// A database restored from a backup, not yet in use; dropped unless kept.
struct Scratch {
    name: String,
    lock: Lock,
    manifest: Manifest,
}

impl Provisioner {
    /// A backup and the tenant it belongs to.
    async fn backup_and_tenant(&self, id: Uuid) -> Result<(Backup, TenantRecord), BackupError> {
        let reg = self.registry();
        let b = reg
            .backup(id)
            .await?
            .ok_or(BackupError::NotFound("backup"))?;
        let t = reg
            .tenant(b.tenant_id)
            .await?
            .ok_or(BackupError::NotFound("tenant"))?;
        Ok((b, t))
    }

    /// A backup that can be read back: `succeeded`, else 404/409 saying why.
    pub(crate) async fn succeeded_backup(
        &self,
        id: Uuid,
        action: &str,
    ) -> Result<Backup, BackupError> {
        let b = self
            .registry()
            .backup(id)
            .await?
            .ok_or(BackupError::NotFound("backup"))?;
        if b.status != "succeeded" {
            return Err(BackupError::Conflict(format!(
                "backup is {}: only a succeeded backup can be {action}",
                b.status
            )));
        }
        Ok(b)
    }

    /// Restore a backup into a new scratch database on `admin`'s server:
    /// manifest checked, object streamed through SHA-256 and decryption into
    /// pg_restore, checksum compared before pg_restore may commit.
    async fn restore_to_scratch(
        &self,
        storage: &Storage,
        b: &Backup,
        admin: &ServerAdmin,
        progress: Option<Progress>,
    ) -> Result<Scratch, BackupError> {
        if b.status != "succeeded" {
            return Err(BackupError::Conflict(format!(
                "backup is {}: only a succeeded backup can be restored",
                b.status
            )));
        }
        let manifest: Manifest =
            match storage.store.get_bytes(&b.manifest_key).await? {
                Some(bytes) => serde_json::from_slice(&bytes)
                    .map_err(|e| anyhow::anyhow!("read the backup's manifest: {e}"))?,
                None => return Err(BackupError::Conflict(
                    "the backup's manifest is missing from the store: it is not a complete backup"
                        .into(),
                )),
            };
        if manifest.backup_id != b.id
            || Some(manifest.sha256.as_str()) != b.sha256.as_deref()
            || Some(manifest.size_bytes as i64) != b.size_bytes
        {
            return Err(BackupError::Internal(anyhow::anyhow!(
                "check the backup's manifest: it does not match the registry's record"
            )));
        }
        let key = self.data_key(b.tenant_id, false).await?;
        let id = Uuid::now_v7();
        let lock = self
            .registry()
            .try_lock_backup(id)
            .await?
            .context("lock a fresh scratch id")?;
        let name = scratch_db(id);
        let created = admin
            .exec(&format!("CREATE DATABASE \"{name}\" TEMPLATE template0"))
            .await;
        if let Err(e) = created {
            lock.release().await;
            return Err(BackupError::Internal(
                anyhow::Error::new(e).context("create the database to restore into"),
            ));
        }
        let scratch = Scratch {
            name,
            lock,
            manifest,
        };
        match self
            .stream_into(storage, b, admin, &scratch, &key, progress)
            .await
        {
            Ok(()) => Ok(scratch),
            Err(e) => {
                drop_scratch(admin, scratch).await;
                Err(e)
            }
        }
    }

    async fn stream_into(
        &self,
        storage: &Storage,
        b: &Backup,
        admin: &ServerAdmin,
        scratch: &Scratch,
        key: &[u8; 32],
        progress: Option<Progress>,
    ) -> Result<(), BackupError> {
        admin
            .exec(&format!(
                "REVOKE ALL ON DATABASE \"{}\" FROM PUBLIC",
                scratch.name
            ))
            .await
            .context("close the restored database to PUBLIC")?;
        let mut body = storage.store.get(&b.object_key).await?.ok_or_else(|| {
            BackupError::Conflict("the backup's data is missing from the store".into())
        })?;
        let mut child = storage.tools.spawn_restore(&admin.libpq, &scratch.name)?;
        let stderr = capture_stderr(&mut child);
        let mut stdin = child.stdin.take().context("pg_restore's input")?;
        let mut opener = Opener::new(key, b.id);
        let mut hasher = Sha256::new();
        let mut total: u64 = 0;
        let mut plain = Vec::new();
        let mut broken = false;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.context("read the backup from the store")?;
            hasher.update(&chunk);
            total += chunk.len() as u64;
            if let Some(p) = &progress {
                p(total);
            }
            if let Err(e) = opener.push(&chunk, &mut plain) {
                child.kill().await.ok();
                return Err(BackupError::Internal(anyhow::anyhow!(
                    "restore the backup: {e}; nothing was changed"
                )));
            }
            if !broken && stdin.write_all(&plain).await.is_err() {
                broken = true; // pg_restore stopped; its exit status says why
            }
            plain.clear();
        }
        let sha = hex(&hasher.finalize());
        if sha != scratch.manifest.sha256 || total != scratch.manifest.size_bytes {
            child.kill().await.ok();
            return Err(BackupError::Internal(anyhow::anyhow!(
                "restore the backup: checksum mismatch (the stored object is not what was uploaded); nothing was changed"
            )));
        }
        if let Err(e) = opener.finish(&mut plain) {
            child.kill().await.ok();
            return Err(BackupError::Internal(anyhow::anyhow!(
                "restore the backup: {e}; nothing was changed"
            )));
        }
        if !broken {
            stdin.write_all(&plain).await.ok();
        }
        drop(stdin);
        let status = child.wait().await.context("wait for pg_restore")?;
        let errors = super::pgtools::error_lines(&stderr.await.unwrap_or_default());
        if !status.success() {
            return Err(BackupError::Internal(anyhow::anyhow!(
                "run pg_restore: it exited with {status}: {errors}"
            )));
        }
        Ok(())
    }

    /// Restore `backup` into a scratch database, compare its row counts with
    /// those recorded at backup time, drop it, and record the outcome.
    #[tracing::instrument(skip(self, progress))]
    pub async fn verify_backup(
        &self,
        backup: Uuid,
        progress: Option<Progress>,
    ) -> Result<VerifyReport, BackupError> {
        let storage = self.storage_or_err()?;
        let reg = self.registry();
        let (b, t) = self.backup_and_tenant(backup).await?;
        let admin = self.admin_for(&t).await?;
        let outcome = async {
            let scratch = self
                .restore_to_scratch(&storage, &b, &admin, progress)
                .await?;
            let counted = async {
                let mut conn = admin.connect_to(&scratch.name).await?;
                let counts = row_counts(&mut conn).await;
                conn.close().await.ok();
                counts
            }
            .await;
            drop_scratch(&admin, scratch).await;
            Ok::<_, BackupError>(counted?)
        }
        .await;
        let report = match outcome {
            Ok(restored) => {
                let expected: std::collections::BTreeMap<String, i64> = b
                    .row_counts
                    .clone()
                    .and_then(|v| serde_json::from_value(v).ok())
                    .unwrap_or_default();
                let mut mismatches = Vec::new();
                for (table, n) in &expected {
                    match restored.get(table) {
                        Some(m) if m == n => {}
                        Some(m) => mismatches.push(format!("{table}: expected {n}, restored {m}")),
                        None => mismatches.push(format!("{table}: expected {n}, missing")),
                    }
                }
                for table in restored.keys().filter(|t| !expected.contains_key(*t)) {
                    mismatches.push(format!("{table}: not in the backup's record"));
                }
                VerifyReport {
                    backup_id: b.id,
                    ok: mismatches.is_empty(),
                    tables: expected.len(),
                    mismatches,
                }
            }
            Err(e) => {
                reg.set_backup_verified(b.id, Some(&e.detail())).await?;
                metrics::counter!("silo_backup_verifications_total", "outcome" => "failed")
                    .increment(1);
                return Err(e);
            }
        };
        let error = (!report.ok).then(|| report.mismatches.join("; "));
        reg.set_backup_verified(b.id, error.as_deref()).await?;
        let outcome = if report.ok { "ok" } else { "failed" };
        metrics::counter!("silo_backup_verifications_total", "outcome" => outcome).increment(1);
        Ok(report)
    }

    /// Restore `backup` into its tenant (replacing its database, or bringing
    /// an archived tenant back) or into another tenant. The new database is
    /// built and checked first; only then, under the tenant's lock, is it
    /// swapped in. On any failure the tenant keeps its current database.
    #[tracing::instrument(skip(self, progress))]
    pub async fn restore_backup(
        &self,
        backup: Uuid,
        target: RestoreTarget,
        actor: &str,
        progress: Option<Progress>,
    ) -> Result<TenantRecord, BackupError> {
        let storage = self.storage_or_err()?;
        let reg = self.registry();
        let (b, source) = self.backup_and_tenant(backup).await?;
        let target = match target {
            RestoreTarget::InPlace => source.clone(),
            RestoreTarget::IntoSlug(slug) => match reg.find_tenant(&slug).await? {
                Some(t) => t,
                None => {
                    let req = CreateTenant {
                        slug,
                        name: source.name.clone(),
                        plan: source.plan.clone(),
                        server: None,
                    };
                    self.create(&req, None, actor).await?
                }
            },
        };
        let restored = match target.status {
            TenantStatus::Archived => self.unarchive(&storage, &b, &target, progress).await?,
            TenantStatus::Active | TenantStatus::Suspended => {
                self.replace_database(&storage, &b, &target, progress)
                    .await?
            }
            other => {
                return Err(BackupError::Conflict(format!(
                "tenant is {}: only an active, suspended or archived tenant can be restored into",
                other.as_str()
            )))
            }
        };
        reg.audit(
            actor,
            "tenant.restore",
            Some(restored.id),
            serde_json::json!({"backup_id": b.id, "from_tenant": b.tenant_id}),
        )
        .await?;
        Ok(restored)
    }

    /// Migrate and grant a restored database, as provisioning does.
    async fn prepare_restored(&self, admin: &ServerAdmin, database: &str) -> anyhow::Result<i64> {
        let db = admin
            .single_pool(database)
            .await
            .context("connect to the restored database")?;
        let migrated = crate::migrate::migrate_tenant_database(&db, self.tenant_migrator()).await;
        db.close().await;
        migrated.context("bring the restored database to the latest schema")
    }

    async fn replace_database(
        &self,
        storage: &Storage,
        b: &Backup,
        target: &TenantRecord,
        progress: Option<Progress>,
    ) -> Result<TenantRecord, BackupError> {
        let reg = self.registry();
        let admin = self.admin_for(target).await?;
        let scratch = self
            .restore_to_scratch(storage, b, &admin, progress)
            .await?;
        let version = match self.prepare_restored(&admin, &scratch.name).await {
            Ok(v) => v,
            Err(e) => {
                drop_scratch(&admin, scratch).await;
                return Err(e.into());
            }
        };
        let new_name = restored_name(target.id, &scratch.name);
        // The tenant's lock serializes with its other operations; the server's
        // lock keeps the sweep from seeing the renamed database before the
        // registry names it.
        let tenant_lock = reg.lock_tenant(target.id).await?;
        let server_lock = reg.lock_server(target.server_id).await?;
        let swapped = async {
            let t = reg.tenant(target.id).await?.context("find the tenant")?;
            if t.server_id != target.server_id {
                return Err(BackupError::Conflict(
                    "tenant moved to another server during the restore; nothing was changed".into(),
                ));
            }
            if !matches!(t.status, TenantStatus::Active | TenantStatus::Suspended) {
                return Err(BackupError::Conflict(format!(
                    "tenant became {} during the restore; nothing was changed",
                    t.status.as_str()
                )));
            }
            admin
                .exec(&format!(
                    "ALTER DATABASE \"{}\" RENAME TO \"{new_name}\"; GRANT CONNECT, TEMPORARY ON DATABASE \"{new_name}\" TO \"{}\"",
                    scratch.name, t.role_name
                ))
                .await
                .context("put the restored database in place")?;
            let updated = reg
                .set_tenant_database(t.id, &[t.status], t.status, &new_name, Some(version))
                .await?
                .context("record the restored database")?;
            Ok((t, updated))
        }
        .await;
        server_lock.release().await;
        let result = match swapped {
            Ok((old, updated)) => {
                crate::failpoint::hit("restore_swap");
                if let Err(e) = admin
                    .exec(&format!(
                        "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                        old.database_name
                    ))
                    .await
                {
                    // The sweep drops it later: no registry row names it any more.
                    tracing::warn!(tenant_id = %old.id, "failed to drop the replaced database: {e}");
                }
                scratch.lock.release().await;
                Ok(updated)
            }
            Err(e) => {
                // Drop the restored database only if the registry surely does
                // not name it (the switch may have committed before an error).
                // When unsure, drop nothing: the sweep drops whichever
                // database the registry does not name.
                match reg.tenant(target.id).await {
                    Ok(Some(now)) if now.database_name != new_name => {
                        admin
                            .exec(&format!(
                                "DROP DATABASE IF EXISTS \"{new_name}\" WITH (FORCE)"
                            ))
                            .await
                            .ok();
                        drop_scratch(&admin, scratch).await;
                    }
                    _ => scratch.lock.release().await,
                }
                Err(e)
            }
        };
        tenant_lock.release().await;
        result
    }

    /// Bring an archived tenant back: restore, migrate, a new role and
    /// password, verify its login, `active`.
    async fn unarchive(
        &self,
        storage: &Storage,
        b: &Backup,
        target: &TenantRecord,
        progress: Option<Progress>,
    ) -> Result<TenantRecord, BackupError> {
        let reg = self.registry();
        let lock = reg.lock_tenant(target.id).await?;
        let result = async {
            reg.transition(
                target.id,
                &[TenantStatus::Archived],
                TenantStatus::Restoring,
                None,
            )
            .await?
            .ok_or_else(|| BackupError::Conflict("tenant is no longer archived".into()))?;
            let admin = self.admin_for(target).await?;
            let brought_back = async {
                let scratch = self
                    .restore_to_scratch(storage, b, &admin, progress)
                    .await?;
                let version = match self.prepare_restored(&admin, &scratch.name).await {
                    Ok(v) => v,
                    Err(e) => {
                        drop_scratch(&admin, scratch).await;
                        return Err(BackupError::from(e));
                    }
                };
                let new_name = restored_name(target.id, &scratch.name);
                let server_lock = reg.lock_server(target.server_id).await?;
                let placed = async {
                    admin
                        .exec(&format!(
                            "ALTER DATABASE \"{}\" RENAME TO \"{new_name}\"",
                            scratch.name
                        ))
                        .await
                        .context("put the restored database in place")?;
                    reg.set_tenant_database(
                        target.id,
                        &[TenantStatus::Restoring],
                        TenantStatus::Restoring,
                        &new_name,
                        Some(version),
                    )
                    .await?
                    .context("record the restored database")
                }
                .await;
                server_lock.release().await;
                scratch.lock.release().await;
                placed?;
                let password = crate::crypto::random_password(32);
                create_role(
                    &admin,
                    &target.role_name,
                    &new_name,
                    &password,
                    connection_limit(&target.plan),
                )
                .await
                .context("create the tenant role")?;
                let sealed = self
                    .keyring()
                    .seal(password.as_bytes(), target.id.as_bytes());
                reg.set_password(target.id, &sealed, self.keyring().key_id())
                    .await?;
                verify_login(&admin, &new_name, &target.role_name, &password)
                    .await
                    .context("verify the tenant role can log in")?;
                let active = reg
                    .transition(
                        target.id,
                        &[TenantStatus::Restoring],
                        TenantStatus::Active,
                        None,
                    )
                    .await?
                    .context("mark the tenant active")?;
                // Just brought back: not idle, whatever its traffic before.
                reg.touch_tenants(&[target.id]).await?;
                Ok(active)
            }
            .await;
            match brought_back {
                Ok(t) => Ok(t),
                Err(e) => {
                    self.undo_unarchive(target.id, &e.detail()).await;
                    Err(e)
                }
            }
        }
        .await;
        lock.release().await;
        result
    }

    /// A failed or interrupted un-archive: drop what it built, back to `archived`.
    pub(crate) async fn undo_unarchive(&self, id: Uuid, error: &str) {
        let reg = self.registry();
        // Back to `archived` first, and only from `restoring`: a tenant that
        // has meanwhile come back `active` keeps its database and role.
        let Ok(Some(t)) = reg
            .transition(
                id,
                &[TenantStatus::Restoring],
                TenantStatus::Archived,
                Some(error),
            )
            .await
        else {
            return;
        };
        if let Ok(admin) = self.admin_for(&t).await {
            // An archived tenant has no database: whatever the row names now
            // was built by this restore. (If this fails, the login-state sweep
            // keeps the role from logging in; the next restore reuses both.)
            admin
                .exec(&format!(
                    "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                    t.database_name
                ))
                .await
                .ok();
            admin
                .exec(&format!("DROP ROLE IF EXISTS \"{}\"", t.role_name))
                .await
                .ok();
        }
    }
}

/// The name a restored database takes: the tenant's prefix plus the scratch id.
fn restored_name(tenant: Uuid, scratch: &str) -> String {
    let (base, _) = names_for(tenant);
    let suffix = &scratch[scratch.len() - 12..];
    format!("{base}_{suffix}")
}

async fn drop_scratch(admin: &ServerAdmin, scratch: Scratch) {
    if let Err(e) = admin
        .exec(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            scratch.name
        ))
        .await
    {
        tracing::warn!(
            database = scratch.name,
            "failed to drop a scratch database (the sweep will): {e}"
        );
    }
    scratch.lock.release().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restored_names_fit_postgres_identifiers_and_keep_the_tenant_prefix() {
        let t = Uuid::now_v7();
        let name = restored_name(t, &scratch_db(Uuid::now_v7()));
        assert!(name.len() <= 63, "{name}");
        assert!(name.starts_with(&names_for(t).0));
    }
}
