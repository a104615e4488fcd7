//! Suspend, resume, patch, rotate and delete. Each runs under the tenant's
//! lock; the registry state and the server's state (role can log in,
//! database exists) are put in agreement, and the reconciler repairs any
//! disagreement a crash leaves.

use anyhow::Context;
use serde_json::json;
use uuid::Uuid;

use super::Provisioner;
use crate::domain::OperationKind;
use crate::failpoint;
use crate::ops::{Error, Result};
use crate::registry::{Operation, TenantPatch, TenantRecord, TenantStatus};
use crate::servers::{roles, scram, sqlstate};

/// How long a statement running under the old password may take to finish
/// before its session is ended by a rotation.
const SESSION_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Operations that make a tenant's role and database elsewhere or anew:
/// while one is under way, a role missing on its server is its business.
const MAKE_ROLES_ANEW: [OperationKind; 4] = [
    OperationKind::TenantMove,
    OperationKind::BackupRestore,
    OperationKind::TenantArchive,
    OperationKind::TenantDelete,
];

/// A delete that was started: its operation, and the tenant as it was.
#[derive(Debug)]
pub struct DeleteStarted {
    pub operation: Operation,
    pub tenant: TenantRecord,
}

impl Provisioner {
    /// Stop a tenant: its role can no longer log in and its sessions end.
    #[tracing::instrument(skip(self), fields(tenant_id = %id))]
    pub async fn suspend(&self, id: Uuid, actor: &str) -> Result<TenantRecord> {
        self.set_login(id, actor, false).await
    }

    /// Let a suspended tenant in again.
    #[tracing::instrument(skip(self), fields(tenant_id = %id))]
    pub async fn resume(&self, id: Uuid, actor: &str) -> Result<TenantRecord> {
        self.set_login(id, actor, true).await
    }

    /// Suspend a tenant whose trial has ended (`expires_at` passed): the
    /// scheduler's work. `None` when there is nothing to do (not active,
    /// not expired, or another replica did it).
    #[tracing::instrument(skip(self), fields(tenant_id = %id))]
    pub async fn expire(&self, id: Uuid, actor: &str) -> Result<Option<TenantRecord>> {
        let reg = self.registry();
        reg.with_tenant_lock(id, || async {
            let Some(t) = reg.tenant(id).await? else {
                return Ok(None);
            };
            if t.frozen_at.is_some() {
                return Ok(None); // a move's cut-over: next pass
            }
            // Registry first (one statement decides who does it), then the role.
            let Some(t) = reg.expire_tenant(id).await? else {
                return Ok(None);
            };
            let admin = self.admin_for(&t).await?;
            roles::set_role_login(&admin, &t.role_name, false)
                .await
                .context("stop the expired tenant's role from logging in")?;
            roles::terminate_sessions(&admin, &t.role_name)
                .await
                .context("end the expired tenant's sessions")?;
            let detail = json!({"expires_at": t.expires_at, "plan": t.plan});
            reg.audit(actor, "tenant.expire", Some(id), detail).await?;
            Ok(Some(t))
        })
        .await
    }

    /// Suspend every active tenant whose trial has ended (a batch at a
    /// time); how many this call suspended.
    pub async fn expire_due(&self, actor: &str) -> Result<usize> {
        let mut done = 0;
        loop {
            let due = self.registry().expired_tenants(100).await?;
            let mut progressed = false;
            for id in &due {
                match self.expire(*id, actor).await {
                    Ok(Some(_)) => {
                        done += 1;
                        progressed = true;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(tenant_id = %id, "failed to expire a trial: {e:#}"),
                }
            }
            if due.len() < 100 || !progressed {
                return Ok(done);
            }
        }
    }

    async fn set_login(&self, id: Uuid, actor: &str, login: bool) -> Result<TenantRecord> {
        let reg = self.registry();
        reg.with_tenant_lock(id, || async {
            let t = reg.tenant(id).await?.ok_or(Error::NotFound("tenant"))?;
            if login && t.status == TenantStatus::Suspended {
                if let Some(at) = t.expires_at.filter(|at| *at <= chrono::Utc::now()) {
                    return Err(Error::conflict(format!(
                        "its trial ended at {at}: change its plan, or set a later expires_at, to resume it"
                    )));
                }
            }
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
                return Err(Error::state(
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
            // A suspend also refuses every app token minted so far.
            if !login {
                reg.transition(id, &[from], to, None).await?;
                reg.revoke_tokens(id).await?;
            }
            match roles::set_role_login(&admin, &t.role_name, login).await {
                // No role to log in as (gone from its server, e.g. with a
                // control database restored to an earlier point): suspended
                // all the same; nothing to resume.
                Err(e) if e.is(sqlstate::UNDEFINED_OBJECT) => {
                    if login {
                        return Err(Error::conflict(format!(
                            "the tenant's role {} is not on its server: it cannot log in until the reconciler's next pass makes it again (silo reconcile runs one now)",
                            t.role_name
                        )));
                    }
                    tracing::warn!(tenant_id = %id, role = t.role_name, "suspended a tenant whose role is not on its server");
                }
                other => other.context("change whether the tenant role may log in")?,
            }
            if !login {
                roles::terminate_sessions(&admin, &t.role_name)
                    .await
                    .context("end the tenant's sessions")?;
            }
            let t = if login {
                reg.transition(id, &[from], to, None).await?
            } else {
                reg.tenant(id).await?
            }
            .ok_or(Error::NotFound("tenant"))?;
            reg.audit(actor, action, Some(id), json!({})).await?;
            Ok(t)
        })
        .await
    }

    /// Change name, plan, backup schedule, expiry or settings. A new plan
    /// changes the role's connection limit and restarts the trial clock;
    /// a tenant its expiry suspended is resumed when the change lifts the
    /// expiry (a plan without a trial, or a later `expires_at`).
    #[tracing::instrument(skip(self, patch), fields(tenant_id = %id))]
    pub async fn patch(
        &self,
        id: Uuid,
        patch: &TenantPatch<'_>,
        actor: &str,
    ) -> Result<TenantRecord> {
        let reg = self.registry();
        let plan = match &patch.plan {
            Some(name) => Some(self.known_plan(name).await?),
            None => None,
        };
        reg.with_tenant_lock(id, || async {
            let t = reg.tenant(id).await?.ok_or(Error::NotFound("tenant"))?;
            if let Some(plan) = plan.as_ref().filter(|p| p.name != t.plan) {
                if matches!(t.status, TenantStatus::Active | TenantStatus::Suspended) {
                    let admin = self.admin_for(&t).await?;
                    roles::set_connection_limit(&admin, &t.role_name, plan.connection_limit)
                        .await
                        .context("change the tenant role's connection limit")?;
                }
            }
            let was_expired = t.status == TenantStatus::Suspended && t.expired_at.is_some();
            let mut t = reg
                .patch_tenant(id, patch)
                .await?
                .ok_or(Error::NotFound("tenant"))?;
            let detail = json!({
                "name": patch.name.map(|n| n.as_str()),
                "plan": patch.plan.as_ref().map(|p| p.as_str()),
                "backup_schedule": patch.backup_schedule.map(|s| s.as_str()),
                "expires_at": t.expires_at,
                "settings": patch.settings.is_some(),
            });
            reg.audit(actor, "tenant.patch", Some(id), detail).await?;
            let lifted =
                t.expired_at.is_none() && t.expires_at.is_none_or(|at| at > chrono::Utc::now());
            if was_expired && lifted {
                let admin = self.admin_for(&t).await?;
                roles::set_role_login(&admin, &t.role_name, true)
                    .await
                    .context("let the tenant role log in again")?;
                t = reg
                    .transition(id, &[TenantStatus::Suspended], TenantStatus::Active, None)
                    .await?
                    .ok_or(Error::NotFound("tenant"))?;
                let detail = json!({"reason": "its expiry was lifted"});
                reg.audit(actor, "tenant.resume", Some(id), detail).await?;
            }
            Ok(t)
        })
        .await
    }

    /// Give the tenant role a new password, crash-safe at every step:
    ///
    /// 1. the new password is stored, sealed, as *pending*;
    /// 2. the role gets it;
    /// 3. the sessions the role had open (logged in with the old password)
    ///    end, busy ones after a short grace;
    /// 4. the pending password becomes the tenant's (routers rebuild their
    ///    pools on the change), and app tokens minted before are refused.
    ///
    /// A crash anywhere leaves the pending password set: routers try it when
    /// the recorded one is refused, and the reconciler redoes steps 2–4.
    #[tracing::instrument(skip(self), fields(tenant_id = %id))]
    pub async fn rotate_credentials(&self, id: Uuid, actor: &str) -> Result<TenantRecord> {
        let reg = self.registry();
        reg.with_tenant_lock(id, || async {
            let t = reg.tenant(id).await?.ok_or(Error::NotFound("tenant"))?;
            if !matches!(t.status, TenantStatus::Active | TenantStatus::Suspended) {
                return Err(Error::state(
                    t.status.as_str(),
                    "only an active or suspended tenant has credentials to rotate",
                ));
            }
            self.refuse_if_role_gone(&t).await?;
            // Audited when asked for, whether or not it gets to the end.
            reg.audit(actor, "tenant.rotate_credentials", Some(id), json!({}))
                .await?;
            let password = crate::crypto::random_password(32);
            let sealed = self.keyring().seal(password.as_bytes(), id.as_bytes());
            reg.set_pending_password(id, &sealed, self.keyring().key_id())
                .await?;
            failpoint::hit("rotate_pending");
            self.finish_rotation_locked(id).await?;
            reg.tenant(id).await?.ok_or(Error::NotFound("tenant"))
        })
        .await
    }

    /// Steps 2–4 of [`Self::rotate_credentials`] for a tenant whose lock the
    /// caller holds and whose pending password is set (a rotation, or the
    /// reconciler finishing one that a crash interrupted). Idempotent.
    pub async fn finish_rotation_locked(&self, id: Uuid) -> Result<bool> {
        let reg = self.registry();
        let t = reg.tenant(id).await?.ok_or(Error::NotFound("tenant"))?;
        let (Some(sealed), Some(key_id)) = (&t.pending_password_enc, &t.pending_key_id) else {
            return Ok(false);
        };
        let password = self
            .keyring()
            .open_string(key_id, sealed, id.as_bytes())
            .context("open the pending password")?;
        let admin = self.admin_for(&t).await?;
        roles::set_password(&admin, &t.role_name, &password)
            .await
            .context("set the tenant role's new password")?;
        failpoint::hit("rotate_password");
        let ended = roles::end_sessions_open_now(&admin, &t.role_name, SESSION_GRACE)
            .await
            .context("end the sessions opened with the old password")?;
        failpoint::hit("rotate_sessions");
        // New credentials, new tokens: the old ones are refused (one statement).
        if !reg.promote_pending_password(id).await? {
            return Err(Error::conflict(
                "the tenant's pending password vanished during its rotation; rotate again",
            ));
        }
        failpoint::hit("rotate_promoted");
        tracing::info!(tenant_id = %id, sessions_ended = ended, "tenant credentials rotated");
        Ok(true)
    }

    /// `409` for a tenant whose role is gone from its server: nothing can
    /// be done with a role that is not there until the reconciler makes it
    /// again.
    pub async fn refuse_if_role_gone(&self, t: &TenantRecord) -> Result<()> {
        let admin = self.admin_for(t).await?;
        if roles::role_exists(&admin, &t.role_name).await? {
            return Ok(());
        }
        Err(Error::conflict(format!(
            "the tenant's role {} is not on its server: the reconciler's next pass makes it again (silo reconcile runs one now); try again after it",
            t.role_name
        )))
    }

    /// The passwords the registry records for `t`'s roles: its own role's,
    /// and its reader's if it has one.
    pub fn recorded_passwords(&self, t: &TenantRecord) -> anyhow::Result<Vec<(String, String)>> {
        let mut wanted = vec![(
            t.role_name.clone(),
            self.keyring()
                .open_string(&t.key_id, &t.password_enc, t.id.as_bytes())
                .context("open the tenant's password")?,
        )];
        let reader = crate::servers::names::reader_role(&t.role_name);
        if let (Some(reader), Some(password)) = (
            reader,
            crate::servers::readers::reader_password(self.keyring(), t)?,
        ) {
            wanted.push((reader, password));
        }
        Ok(wanted)
    }

    /// Give a live tenant's role (and its reader) back the password the
    /// registry records, where the role set another itself: any role may
    /// `ALTER ROLE … PASSWORD` itself, and a customer may hold the role's
    /// password (a direct connection URI) or run SQL as it (the front door
    /// in session mode). Left alone, that locks silo's router and front
    /// door out of the tenant until a rotation. Under the tenant's lock,
    /// tried, not waited for; a tenant with an operation that makes its
    /// roles anew under way, or a rotation half done, is left to it.
    /// Sessions are kept (the role's own). A verifier of the same password
    /// made before silo made its own is replaced without a word. Audited
    /// as `tenant.password_restored`; `false` when nothing was restored.
    #[tracing::instrument(skip(self), fields(tenant_id = %id))]
    pub async fn restore_passwords(&self, id: Uuid) -> Result<bool> {
        self.with_live_roles(id, |t| async move {
            if t.pending_password_enc.is_some() {
                return Ok(false);
            }
            let admin = self.admin_for(&t).await?;
            let wanted = self.recorded_passwords(&t)?;
            let names: Vec<String> = wanted.iter().map(|(role, _)| role.clone()).collect();
            let Some(stored) = roles::password_verifiers(&admin, &names).await? else {
                return Ok(false);
            };
            let mut restored = Vec::new();
            for (role, password) in &wanted {
                // A role that is not there is the reconciler's other business.
                let Some(verifier) = stored.get(role) else {
                    continue;
                };
                let found = scram::check(verifier.as_deref(), password);
                if found == scram::Stored::Ours {
                    continue;
                }
                roles::set_password(&admin, role, password)
                    .await
                    .context("give the role its recorded password")?;
                if found == scram::Stored::Other {
                    restored.push(role.clone());
                }
            }
            if restored.is_empty() {
                return Ok(false);
            }
            self.registry().audit(
                "reconciler",
                "tenant.password_restored",
                Some(id),
                json!({ "roles": restored }),
            )
            .await?;
            tracing::warn!(tenant_id = %id, roles = ?restored, "gave a tenant's role back the password silo records (it had set another itself)");
            Ok(true)
        })
        .await
    }

    /// Make a live tenant's role again where it is gone from its server
    /// while its database is there (a control database restored to an
    /// earlier point, a person's `DROP ROLE`): with its recorded password,
    /// logging in only while active, granted its database as provisioning
    /// grants it (read-only if over its quota). A tenant with an operation
    /// under way, or whose lock is held, is left to it (the next pass).
    /// Audited; `false` when there was nothing to do.
    #[tracing::instrument(skip(self), fields(tenant_id = %id))]
    pub async fn make_role_again(&self, id: Uuid) -> Result<bool> {
        self.with_live_roles(id, |t| async move {
            let admin = self.admin_for(&t).await?;
            if roles::role_exists(&admin, &t.role_name).await?
                || !roles::database_exists(&admin, &t.database_name).await?
            {
                return Ok(false);
            }
            let password = self
                .keyring()
                .open_string(&t.key_id, &t.password_enc, id.as_bytes())
                .context("open the tenant's password")?;
            let login = t.status == TenantStatus::Active;
            if !roles::make_role_again(
                &admin,
                &t.role_name,
                &t.database_name,
                &password,
                t.limits.connection_limit,
                login,
            )
            .await?
            {
                return Ok(false);
            }
            let db = admin
                .single_pool(&t.database_name)
                .await
                .context("connect to the tenant's database")?;
            let granted = async {
                crate::servers::schema::grant(&db, Some(&t.role_name)).await?;
                if t.over_quota_at.is_some() {
                    crate::servers::schema::set_read_only(
                        &db,
                        &t.database_name,
                        &t.role_name,
                        true,
                    )
                    .await?;
                }
                anyhow::Ok(())
            }
            .await;
            db.close().await;
            granted.context("grant the tenant's role its database again")?;
            self.registry().audit(
                "reconciler",
                "tenant.role_made_again",
                Some(id),
                json!({"role": t.role_name, "login": login}),
            )
            .await?;
            tracing::warn!(tenant_id = %id, role = t.role_name, "made a live tenant's missing role again");
            Ok(true)
        })
        .await
    }

    /// `work` with tenant `id` as the registry has it, under its lock, if
    /// it is active or suspended and no operation that makes its roles
    /// anew is under way; `false` otherwise. The lock is tried, not waited
    /// for: the reconciler calls this holding the server's lock, which a
    /// restore's swap takes after the tenant's.
    async fn with_live_roles<F, Fut>(&self, id: Uuid, work: F) -> Result<bool>
    where
        F: FnOnce(TenantRecord) -> Fut,
        Fut: std::future::Future<Output = Result<bool>>,
    {
        let reg = self.registry();
        let Some(mut lock) = reg.try_lock_tenant(id).await? else {
            return Ok(false);
        };
        let done = lock
            .hold(async {
                let Some(t) = reg.tenant(id).await? else {
                    return Ok(false);
                };
                if !matches!(t.status, TenantStatus::Active | TenantStatus::Suspended)
                    || reg.open_operation_of(id, &MAKE_ROLES_ANEW).await?.is_some()
                {
                    return Ok(false);
                }
                work(t).await
            })
            .await;
        lock.release().await;
        done?
    }

    /// Refuse every app token of the tenant minted so far (a leak, a
    /// departing employee): a new token generation, followed by every
    /// replica's router at once.
    #[tracing::instrument(skip(self), fields(tenant_id = %id))]
    pub async fn revoke_tokens(&self, id: Uuid, actor: &str) -> Result<TenantRecord> {
        let reg = self.registry();
        reg.with_tenant_lock(id, || async {
            let t = reg.tenant(id).await?.ok_or(Error::NotFound("tenant"))?;
            if t.status == TenantStatus::Deleted {
                return Err(Error::NotFound("tenant"));
            }
            let generation = reg.revoke_tokens(id).await?;
            reg.audit(
                actor,
                "tenant.revoke_tokens",
                Some(id),
                json!({"token_generation": generation}),
            )
            .await?;
            reg.tenant(id).await?.ok_or(Error::NotFound("tenant"))
        })
        .await
    }

    /// Start deleting a tenant: mark it `deleting` and record the operation
    /// to poll. The caller drops it (after a final backup) with
    /// [`Self::drop_deleting_locked`]; a crash leaves it to the reconciler.
    #[tracing::instrument(skip(self), fields(tenant_id = %id))]
    pub async fn begin_delete(&self, id: Uuid, actor: &str) -> Result<DeleteStarted> {
        let reg = self.registry();
        reg.with_tenant_lock(id, || async {
            let t = reg.tenant(id).await?.ok_or(Error::NotFound("tenant"))?;
            if reg
                .open_operation_of(id, OperationKind::TenantDelete.excluded_by())
                .await?
                .is_some()
            {
                return Err(Error::state("being moved", "wait for the move to finish"));
            }
            match t.status {
                TenantStatus::Deleted => return Err(Error::NotFound("tenant")),
                TenantStatus::Deleting => {}
                TenantStatus::Active
                | TenantStatus::Suspended
                | TenantStatus::Failed
                | TenantStatus::Archived => {
                    reg.transition(id, &[t.status], TenantStatus::Deleting, None)
                        .await?;
                }
                other => {
                    return Err(Error::state(
                        other.as_str(),
                        "wait for the running operation to finish",
                    ))
                }
            }
            let operation = reg
                .create_operation_as(
                    Uuid::now_v7(),
                    OperationKind::TenantDelete,
                    Some(id),
                    json!({}),
                )
                .await?;
            reg.audit(
                actor,
                "tenant.delete",
                Some(id),
                json!({"operation": operation.id}),
            )
            .await?;
            Ok(DeleteStarted {
                operation,
                tenant: t,
            })
        })
        .await
    }

    /// Drop the database and role of a `deleting` tenant and mark it
    /// `deleted`. Idempotent; the caller holds the tenant's lock and has
    /// taken whatever final backup is due.
    pub async fn drop_deleting_locked(&self, t: &TenantRecord) -> anyhow::Result<()> {
        let admin = self.admin_for(t).await?;
        roles::drop_database(&admin, &t.database_name)
            .await
            .context("drop tenant database")?;
        failpoint::hit("delete_database");
        roles::drop_role(&admin, &t.role_name)
            .await
            .context("drop tenant role")?;
        failpoint::hit("delete_role");
        self.registry()
            .transition(t.id, &[TenantStatus::Deleting], TenantStatus::Deleted, None)
            .await?;
        Ok(())
    }

    /// Report a delete's outcome to whoever polls its open operations.
    pub async fn finish_delete_operations(
        &self,
        id: Uuid,
        result: &anyhow::Result<()>,
    ) -> Result<()> {
        let reg = self.registry();
        let outcome = match result {
            Ok(()) => Ok(json!({"tenant_id": id, "status": "deleted"})),
            Err(e) => Err(format!("{e:#}")),
        };
        for op in reg.open_operations(OperationKind::TenantDelete, id).await? {
            reg.finish_operation(op.id, outcome.clone()).await?;
        }
        if let Err(e) = result {
            reg.set_last_error(id, &format!("{e:#}")).await.ok();
        }
        Ok(())
    }
}
