//! Suspend, resume and delete. Each runs under the tenant's lock; the registry
//! state and the server's state (role can log in, database exists) are put in
//! agreement, and the reconciler repairs any disagreement a crash leaves.

use anyhow::Context;
use uuid::Uuid;

use super::{ProvisionError, Provisioner, ServerAdmin};
use crate::failpoint;
use crate::registry::{Operation, TenantPatch, TenantRecord, TenantStatus};

impl Provisioner {
    /// Stop a tenant: its role can no longer log in and its sessions end.
    #[tracing::instrument(skip(self), fields(tenant_id = %id))]
    pub async fn suspend(&self, id: Uuid, actor: &str) -> Result<TenantRecord, ProvisionError> {
        self.set_login(id, actor, false).await
    }

    /// Let a suspended tenant in again.
    #[tracing::instrument(skip(self), fields(tenant_id = %id))]
    pub async fn resume(&self, id: Uuid, actor: &str) -> Result<TenantRecord, ProvisionError> {
        self.set_login(id, actor, true).await
    }

    async fn set_login(
        &self,
        id: Uuid,
        actor: &str,
        login: bool,
    ) -> Result<TenantRecord, ProvisionError> {
        let reg = self.registry();
        let lock = reg.lock_tenant(id).await?;
        let result = async {
            let t = reg.tenant(id).await?.ok_or(ProvisionError::NotFound)?;
            let (from, to, action) = if login {
                (
                    TenantStatus::Suspended,
                    TenantStatus::Active,
                    "tenant.resume",
                )
            } else {
                (
                    TenantStatus::Active,
                    TenantStatus::Suspended,
                    "tenant.suspend",
                )
            };
            if t.status == to {
                return Ok(t); // already there: idempotent
            }
            if t.status != from {
                return Err(ProvisionError::InvalidState(
                    t.status.as_str(),
                    if login {
                        "only a suspended tenant can be resumed"
                    } else {
                        "only an active tenant can be suspended"
                    },
                ));
            }
            let admin = self.admin_for(&t).await?;
            // Suspend: registry first, then the role (an active row whose role
            // cannot log in would break invariant 2). Resume: the reverse.
            if !login {
                reg.transition(id, &[from], to, None).await?;
            }
            set_role_login(&admin, &t.role_name, login).await?;
            if !login {
                terminate_sessions(&admin, &t.role_name).await?;
            }
            let t = if login {
                reg.transition(id, &[from], to, None).await?
            } else {
                reg.tenant(id).await?
            }
            .ok_or(ProvisionError::NotFound)?;
            reg.audit(actor, action, Some(id), serde_json::json!({}))
                .await?;
            Ok(t)
        }
        .await;
        lock.release().await;
        result
    }

    /// Change name, plan or backup schedule; a new plan changes the role's connection limit.
    #[tracing::instrument(skip(self, patch), fields(tenant_id = %id))]
    pub async fn patch(
        &self,
        id: Uuid,
        patch: &TenantPatch<'_>,
        actor: &str,
    ) -> Result<TenantRecord, ProvisionError> {
        let reg = self.registry();
        let lock = reg.lock_tenant(id).await?;
        let result = async {
            let t = reg.tenant(id).await?.ok_or(ProvisionError::NotFound)?;
            if let Some(plan) = patch.plan.filter(|p| *p != t.plan) {
                if matches!(t.status, TenantStatus::Active | TenantStatus::Suspended) {
                    let admin = self.admin_for(&t).await?;
                    admin
                        .exec(&format!(
                            "ALTER ROLE \"{}\" CONNECTION LIMIT {}",
                            t.role_name,
                            super::connection_limit(plan)
                        ))
                        .await
                        .context("change the tenant role's connection limit")?;
                }
            }
            let t = reg.patch_tenant(id, patch).await?.ok_or(ProvisionError::NotFound)?;
            let detail = serde_json::json!({"name": patch.name, "plan": patch.plan, "backup_schedule": patch.backup_schedule});
            reg.audit(actor, "tenant.patch", Some(id), detail).await?;
            Ok(t)
        }
        .await;
        lock.release().await;
        result
    }

    /// Give the tenant role a new password. Routers drop their pools on the
    /// change (NOTIFY) and retry a connection refused for the old password, so
    /// requests in flight do not fail.
    #[tracing::instrument(skip(self), fields(tenant_id = %id))]
    pub async fn rotate_credentials(
        &self,
        id: Uuid,
        actor: &str,
    ) -> Result<TenantRecord, ProvisionError> {
        let reg = self.registry();
        let lock = reg.lock_tenant(id).await?;
        let result = async {
            let t = reg.tenant(id).await?.ok_or(ProvisionError::NotFound)?;
            if !matches!(t.status, TenantStatus::Active | TenantStatus::Suspended) {
                return Err(ProvisionError::InvalidState(
                    t.status.as_str(),
                    "only an active or suspended tenant has credentials to rotate",
                ));
            }
            let password = crate::crypto::random_password(32);
            let admin = self.admin_for(&t).await?;
            admin
                .exec(&format!(
                    "ALTER ROLE \"{}\" PASSWORD '{}'",
                    t.role_name,
                    super::scram::verifier(&password)
                ))
                .await
                .context("set the tenant role's new password")?;
            let sealed = self.keyring().seal(password.as_bytes(), id.as_bytes());
            reg.set_password(id, &sealed, self.keyring().key_id())
                .await?;
            reg.audit(
                actor,
                "tenant.rotate_credentials",
                Some(id),
                serde_json::json!({}),
            )
            .await?;
            reg.tenant(id).await?.ok_or(ProvisionError::NotFound)
        }
        .await;
        lock.release().await;
        result
    }

    /// Start deleting a tenant: mark it `deleting` and drop its database and
    /// role in the background. Returns the operation to poll.
    #[tracing::instrument(skip(self), fields(tenant_id = %id))]
    pub async fn start_delete(&self, id: Uuid, actor: &str) -> Result<Operation, ProvisionError> {
        let reg = self.registry();
        let lock = reg.lock_tenant(id).await?;
        let started = async {
            let t = reg.tenant(id).await?.ok_or(ProvisionError::NotFound)?;
            if !reg
                .open_operations(super::relocate::MOVE_KIND, id)
                .await?
                .is_empty()
            {
                return Err(ProvisionError::InvalidState(
                    "being moved",
                    "wait for the move to finish",
                ));
            }
            match t.status {
                TenantStatus::Deleted => return Err(ProvisionError::NotFound),
                TenantStatus::Deleting => {}
                TenantStatus::Active
                | TenantStatus::Suspended
                | TenantStatus::Failed
                | TenantStatus::Archived => {
                    reg.transition(id, &[t.status], TenantStatus::Deleting, None)
                        .await?;
                }
                other => {
                    return Err(ProvisionError::InvalidState(
                        other.as_str(),
                        "wait for the running operation to finish",
                    ))
                }
            }
            let op = reg.create_operation("tenant.delete", Some(id)).await?;
            reg.audit(
                actor,
                "tenant.delete",
                Some(id),
                serde_json::json!({"operation": op.id}),
            )
            .await?;
            Ok(op)
        }
        .await;
        lock.release().await;
        let op = started?;
        let this = self.clone();
        self.tasks().spawn(async move {
            if let Err(e) = this.finish_delete(id).await {
                tracing::error!(tenant_id = %id, "failed to delete tenant: {e:#}");
            }
        });
        Ok(op)
    }

    /// Drop the database and role of a `deleting` tenant and mark it `deleted`;
    /// finishes the tenant's open delete operations. Idempotent.
    pub(crate) async fn finish_delete(&self, id: Uuid) -> anyhow::Result<()> {
        let lock = self.registry().lock_tenant(id).await?;
        let result = self.finish_delete_locked(id).await;
        lock.release().await;
        self.finish_delete_operations(id, &result).await?;
        if let Err(e) = &result {
            self.registry()
                .set_last_error(id, &format!("{e:#}"))
                .await
                .ok();
        }
        result
    }

    /// Report a delete's outcome to whoever polls its open operations.
    pub(crate) async fn finish_delete_operations(
        &self,
        id: Uuid,
        result: &anyhow::Result<()>,
    ) -> sqlx::Result<()> {
        let reg = self.registry();
        let outcome = match result {
            Ok(()) => Ok(serde_json::json!({"tenant_id": id, "status": "deleted"})),
            Err(e) => Err(format!("{e:#}")),
        };
        for op in reg.open_operations("tenant.delete", id).await? {
            reg.finish_operation(op.id, outcome.clone()).await?;
        }
        Ok(())
    }

    pub(crate) async fn finish_delete_locked(&self, id: Uuid) -> anyhow::Result<()> {
        let reg = self.registry();
        let t = reg.tenant(id).await?.context("find tenant")?;
        if t.status != TenantStatus::Deleting {
            return Ok(());
        }
        let admin = self.admin_for(&t).await?;
        if self.storage().is_some()
            && super::database_exists(&admin, &t.database_name).await?
            && !self.final_backup_taken(&t).await?
        {
            // Nothing is dropped before a final backup of it exists.
            Box::pin(self.backup_now(id, crate::backup::BackupKind::Final, None))
                .await
                .map_err(|e| anyhow::anyhow!("take the final backup before deleting: {e:#}"))?;
        }
        admin
            .exec(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                t.database_name
            ))
            .await
            .context("drop tenant database")?;
        failpoint::hit("delete_database");
        admin
            .exec(&format!("DROP ROLE IF EXISTS \"{}\"", t.role_name))
            .await
            .context("drop tenant role")?;
        failpoint::hit("delete_role");
        reg.transition(id, &[TenantStatus::Deleting], TenantStatus::Deleted, None)
            .await?;
        Ok(())
    }

    pub(crate) async fn admin_for(&self, t: &TenantRecord) -> anyhow::Result<ServerAdmin> {
        let server = self
            .registry()
            .server(t.server_id)
            .await?
            .context("find the tenant's server")?;
        self.servers().admin(&server)
    }
}

pub(crate) async fn set_role_login(
    admin: &ServerAdmin,
    role: &str,
    login: bool,
) -> anyhow::Result<()> {
    let attr = if login { "LOGIN" } else { "NOLOGIN" };
    admin
        .exec(&format!("ALTER ROLE \"{role}\" {attr}"))
        .await
        .with_context(|| format!("set tenant role {attr}"))
}

pub(crate) async fn terminate_sessions(admin: &ServerAdmin, role: &str) -> anyhow::Result<()> {
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1")
        .bind(role)
        .execute(&admin.pool)
        .await
        .context("end the tenant's sessions")?;
    Ok(())
}
