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
use super::run::{hex, row_counts, Manifest};
use super::{Backups, Progress, Storage};
use crate::domain::{OperationKind, Slug};
use crate::ops::{Error, Result};
use crate::registry::{Backup, Lock, TenantRecord, TenantStatus};
use crate::servers::names::{scratch_db, tenant_names};
use crate::servers::owner;
use crate::servers::tools::{capture_stderr, error_lines};
use crate::servers::{roles, schema, ServerAdmin};

/// Where a restore goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreTarget {
    /// Replace the backed-up tenant's database (or bring it back from archive).
    InPlace,
    /// Into the tenant with this slug, created if there is none.
    IntoSlug(Slug),
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

impl Backups {
    /// Restore a backup into a new scratch database on `admin`'s server:
    /// manifest checked, object streamed through SHA-256 and decryption into
    /// pg_restore, checksum compared before pg_restore may commit.
    async fn restore_to_scratch(
        &self,
        storage: &Storage,
        b: &Backup,
        admin: &ServerAdmin,
        progress: Option<Progress>,
    ) -> Result<Scratch> {
        if b.status != "succeeded" {
            return Err(Error::Conflict(format!(
                "backup is {}: only a succeeded backup can be restored",
                b.status
            )));
        }
        let manifest: Manifest =
            match storage.store.get_bytes(&b.manifest_key).await? {
                Some(bytes) => serde_json::from_slice(&bytes)
                    .map_err(|e| anyhow::anyhow!("read the backup's manifest: {e}"))?,
                None => return Err(Error::Conflict(
                    "the backup's manifest is missing from the store: it is not a complete backup"
                        .into(),
                )),
            };
        if manifest.backup_id != b.id
            || Some(manifest.sha256.as_str()) != b.sha256.as_deref()
            || Some(manifest.size_bytes as i64) != b.size_bytes
        {
            return Err(Error::Internal(anyhow::anyhow!(
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
        // Born closed, then opened to silo alone: no session of anyone else
        // is ever inside a database a tenant's data is restored into.
        let created = async {
            roles::create_database(admin, &name, None, "").await?;
            admin.exec(&roles::database_grants(&name, None)).await
        }
        .await;
        if let Err(e) = created {
            lock.release().await;
            return Err(Error::Internal(
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
    ) -> Result<()> {
        let mut body =
            storage.store.get(&b.object_key).await?.ok_or_else(|| {
                Error::Conflict("the backup's data is missing from the store".into())
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
                return Err(Error::Internal(anyhow::anyhow!(
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
            return Err(Error::Internal(anyhow::anyhow!(
                "restore the backup: checksum mismatch (the stored object is not what was uploaded); nothing was changed"
            )));
        }
        if let Err(e) = opener.finish(&mut plain) {
            child.kill().await.ok();
            return Err(Error::Internal(anyhow::anyhow!(
                "restore the backup: {e}; nothing was changed"
            )));
        }
        if !broken {
            stdin.write_all(&plain).await.ok();
        }
        drop(stdin);
        let status = child.wait().await.context("wait for pg_restore")?;
        let errors = error_lines(&stderr.await.unwrap_or_default());
        if !status.success() {
            return Err(Error::Internal(anyhow::anyhow!(
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
    ) -> Result<VerifyReport> {
        let storage = self.storage();
        let reg = self.registry();
        let (b, t) = self.backup_and_tenant(backup).await?;
        let admin = self.admin_for(&t).await?;
        let outcome = async {
            let scratch = self
                .restore_to_scratch(storage, &b, &admin, progress)
                .await?;
            let counted = async {
                let mut conn = admin.connect_to(&scratch.name).await?;
                let counts = row_counts(&mut conn).await;
                conn.close().await.ok();
                counts
            }
            .await;
            drop_scratch(&admin, scratch).await;
            Ok::<_, Error>(counted?)
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

    /// Restore backup `b` into `target` (its own tenant, replacing its
    /// database or bringing it back from archive, or another tenant). The
    /// new database is built and checked first; only then, under the
    /// tenant's lock, is it swapped in. On any failure the tenant keeps its
    /// current database.
    #[tracing::instrument(skip_all, fields(backup_id = %b.id, tenant_id = %target.id))]
    pub async fn restore_into(
        &self,
        b: &Backup,
        target: &TenantRecord,
        actor: &str,
        progress: Option<Progress>,
    ) -> Result<TenantRecord> {
        let storage = self.storage();
        let restored = match target.status {
            TenantStatus::Archived => self.unarchive(storage, b, target, progress).await?,
            TenantStatus::Active | TenantStatus::Suspended => {
                self.replace_database(storage, b, target, progress).await?
            }
            other => {
                return Err(Error::state(
                    other.as_str(),
                    "only an active, suspended or archived tenant can be restored into",
                ))
            }
        };
        self.registry()
            .audit(
                actor,
                "tenant.restore",
                Some(restored.id),
                serde_json::json!({"backup_id": b.id, "from_tenant": b.tenant_id}),
            )
            .await?;
        Ok(restored)
    }

    /// Migrate a restored database and grant it to `role` alone, as
    /// provisioning does; no session of another role may be inside.
    async fn prepare_restored(
        &self,
        admin: &ServerAdmin,
        database: &str,
        role: &str,
    ) -> anyhow::Result<i64> {
        let foreign = roles::foreign_sessions(admin, database, None).await?;
        anyhow::ensure!(
            foreign.is_empty(),
            "check the restored database: sessions of other roles are inside ({})",
            foreign.join(", ")
        );
        let db = admin
            .single_pool(database)
            .await
            .context("connect to the restored database")?;
        let migrated = self.inner.schema.apply(&db, Some(role)).await;
        db.close().await;
        migrated.context("bring the restored database to the latest schema")
    }

    async fn replace_database(
        &self,
        storage: &Storage,
        b: &Backup,
        target: &TenantRecord,
        progress: Option<Progress>,
    ) -> Result<TenantRecord> {
        let reg = self.registry();
        let admin = self.admin_for(target).await?;
        let scratch = self
            .restore_to_scratch(storage, b, &admin, progress)
            .await?;
        let version = match self
            .prepare_restored(&admin, &scratch.name, &target.role_name)
            .await
        {
            Ok(v) => v,
            Err(e) => {
                drop_scratch(&admin, scratch).await;
                return Err(e.into());
            }
        };
        crate::failpoint::hit("restore_scratch");
        let new_name = restored_name(target.id, &scratch.name);
        // The tenant's lock serializes with its other operations; the server's
        // lock keeps the sweep from seeing the renamed database before the
        // registry names it.
        reg.with_tenant_lock(target.id, || async {
            let swapped = reg
                .with_server_lock(target.server_id, || async {
                    let t = reg.tenant(target.id).await?.context("find the tenant")?;
                    if t.server_id != target.server_id {
                        return Err(Error::conflict(
                            "tenant moved to another server during the restore; nothing was changed",
                        ));
                    }
                    if !matches!(t.status, TenantStatus::Active | TenantStatus::Suspended) {
                        return Err(Error::conflict(format!(
                            "tenant became {} during the restore; nothing was changed",
                            t.status.as_str()
                        )));
                    }
                    // Over its storage quota: the restored database is made
                    // read-only before the tenant's role may connect to it
                    // (CONNECT without TEMPORARY is the read-only record).
                    let over_quota = t.over_quota_at.is_some();
                    if over_quota {
                        let db = admin
                            .single_pool(&scratch.name)
                            .await
                            .context("connect to the restored database")?;
                        let kept =
                            schema::set_read_only(&db, &scratch.name, &t.role_name, true).await;
                        db.close().await;
                        kept?;
                    }
                    let privileges = if over_quota { "CONNECT" } else { "CONNECT, TEMPORARY" };
                    let mark = owner::tenant_mark_sql(
                        &new_name,
                        &owner::TenantMark::of(reg.control_id().await?, &t),
                        self.keyring(),
                    );
                    roles::on_database(
                        &admin,
                        &scratch.name,
                        &format!(
                            "ALTER DATABASE \"{}\" RENAME TO \"{new_name}\"; GRANT {privileges} ON DATABASE \"{new_name}\" TO \"{}\"; {mark}",
                            scratch.name, t.role_name
                        ),
                    )
                    .await
                    .context("put the restored database in place")?;
                    let updated = reg
                        .set_tenant_database(t.id, &[t.status], t.status, &new_name, Some(version))
                        .await?
                        .context("record the restored database")?;
                    Ok((t, updated))
                })
                .await;
            match swapped {
                Ok((_, updated)) => {
                    // The replaced database stays, unnamed by the registry: the
                    // caller sets it aside for the grace period (or, after a
                    // crash here, the reconciler quarantines it).
                    crate::failpoint::hit("restore_swap");
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
                            roles::drop_database(&admin, &new_name).await.ok();
                            drop_scratch(&admin, scratch).await;
                        }
                        _ => scratch.lock.release().await,
                    }
                    Err(e)
                }
            }
        })
        .await
    }

    /// Bring an archived tenant back: restore, migrate, a new role and
    /// password, verify its login, `active`.
    async fn unarchive(
        &self,
        storage: &Storage,
        b: &Backup,
        target: &TenantRecord,
        progress: Option<Progress>,
    ) -> Result<TenantRecord> {
        let reg = self.registry();
        reg.with_tenant_lock(target.id, || async {
            reg.transition(
                target.id,
                &[TenantStatus::Archived],
                TenantStatus::Restoring,
                None,
            )
            .await?
            .ok_or_else(|| Error::conflict("tenant is no longer archived"))?;
            let admin = self.admin_for(target).await?;
            let brought_back = async {
                // The role first (with a new password, and no database yet):
                // the restored database is granted to it alone.
                let password = crate::crypto::random_password(32);
                roles::create_login_role(
                    &admin,
                    &target.role_name,
                    &password,
                    target.limits.connection_limit,
                )
                .await
                .context("create the tenant role")?;
                let scratch = self
                    .restore_to_scratch(storage, b, &admin, progress)
                    .await?;
                let version = match self
                    .prepare_restored(&admin, &scratch.name, &target.role_name)
                    .await
                {
                    Ok(v) => v,
                    Err(e) => {
                        drop_scratch(&admin, scratch).await;
                        return Err(Error::from(e));
                    }
                };
                let new_name = restored_name(target.id, &scratch.name);
                let mark = owner::tenant_mark_sql(
                    &new_name,
                    &owner::TenantMark::of(reg.control_id().await?, target),
                    self.keyring(),
                );
                let placed = reg
                    .with_server_lock(target.server_id, || async {
                        roles::on_database(
                            &admin,
                            &scratch.name,
                            &format!(
                                "ALTER DATABASE \"{}\" RENAME TO \"{new_name}\"; {mark}",
                                scratch.name
                            ),
                        )
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
                        .map_err(Error::from)
                    })
                    .await;
                scratch.lock.release().await;
                placed?;
                admin
                    .exec(&roles::database_grants(&new_name, Some(&target.role_name)))
                    .await
                    .context("let the tenant role connect to its database")?;
                // Over its storage quota: read-only again before its role
                // logs in (the restore opened the database in full).
                if target.over_quota_at.is_some() {
                    let db = admin
                        .single_pool(&new_name)
                        .await
                        .context("connect to the restored database")?;
                    let kept = schema::set_read_only(&db, &new_name, &target.role_name, true).await;
                    db.close().await;
                    kept?;
                }
                let sealed = self
                    .keyring()
                    .seal(password.as_bytes(), target.id.as_bytes());
                reg.set_password(target.id, &sealed, self.keyring().key_id())
                    .await?;
                roles::verify_login(&admin, &new_name, &target.role_name, &password)
                    .await
                    .context("verify the tenant role can log in")?;
                // Archiving dropped its reader role with its role.
                crate::servers::readers::follow_reader(self.keyring(), &admin, target, &new_name)
                    .await?;
                // Back as it was archived: a tenant suspended then (or whose
                // trial has ended since) comes back suspended, its role
                // unable to log in, as `resume` would have it.
                let trial_over = target.expires_at.is_some_and(|at| at <= chrono::Utc::now());
                // (An archived tenant's latest archival is the one that
                // archived it: it records the status it came from.)
                let was_suspended = reg
                    .latest_operation_params(OperationKind::TenantArchive, target.id)
                    .await?
                    .is_some_and(|p| p["from"] == TenantStatus::Suspended.as_str());
                let back = if was_suspended || trial_over {
                    roles::set_role_login(&admin, &target.role_name, false)
                        .await
                        .context("keep the suspended tenant's role from logging in")?;
                    TenantStatus::Suspended
                } else {
                    TenantStatus::Active
                };
                let active = reg
                    .transition(target.id, &[TenantStatus::Restoring], back, None)
                    .await?
                    .context("mark the tenant back")?;
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
        })
        .await
    }

    /// A failed or interrupted un-archive: drop what it built, back to `archived`.
    pub async fn undo_unarchive(&self, id: Uuid, error: &str) {
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
            roles::drop_database(&admin, &t.database_name).await.ok();
            roles::drop_role(&admin, &t.role_name).await.ok();
        }
    }
}

/// The name a restored database takes: the tenant's prefix plus the scratch id.
fn restored_name(tenant: Uuid, scratch: &str) -> String {
    let (base, _) = tenant_names(tenant);
    let suffix = &scratch[scratch.len() - 12..];
    format!("{base}_{suffix}")
}

async fn drop_scratch(admin: &ServerAdmin, scratch: Scratch) {
    if let Err(e) = roles::drop_database(admin, &scratch.name).await {
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
        assert!(name.starts_with(&tenant_names(t).0));
    }
}
