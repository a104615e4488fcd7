//! A tenant's reader role: what its read-only app credentials log in as
//! behind the front door (`silo_q_<hex>`, SELECT only; see
//! `servers::schema::reader_grants`). Made with the tenant's first
//! read-only credential, its password sealed in the registry like the
//! tenant role's. Every path that grants, suspends, limits or drops the
//! tenant role does the same to its reader (`servers::roles`), moves and
//! restores make it again where they make the tenant role.

use anyhow::Context;
use uuid::Uuid;

use super::Provisioner;
use crate::ops::{Error, Result};
use crate::registry::{reader_aad, TenantRecord, TenantStatus};
use crate::servers::{roles, schema, ServerAdmin};

impl Provisioner {
    /// Make sure the tenant has its reader role, on its server, with its
    /// grants (made on first use). Idempotent.
    pub async fn ensure_reader(&self, id: Uuid) -> Result<()> {
        let reg = self.registry();
        reg.with_tenant_lock(id, || async {
            let t = reg.tenant(id).await?.ok_or(Error::NotFound("tenant"))?;
            if !matches!(t.status, TenantStatus::Active | TenantStatus::Suspended) {
                return Err(Error::state(
                    t.status.as_str(),
                    "a read-only credential needs an active or suspended tenant",
                ));
            }
            // A move, restore, archive or delete makes the tenant's roles and
            // database elsewhere or anew: the reader waits for it to end.
            use crate::domain::OperationKind as K;
            let moving = [
                K::TenantMove,
                K::BackupRestore,
                K::TenantArchive,
                K::TenantDelete,
            ];
            if let Some(op) = reg.open_operation_of(id, &moving).await? {
                return Err(Error::busy(op));
            }
            self.refuse_if_role_gone(&t).await?;
            let password = match self.reader_password(&t)? {
                Some(p) => p,
                None => {
                    let fresh = crate::crypto::random_password(32);
                    let sealed = self.keyring().seal(fresh.as_bytes(), &reader_aad(id));
                    let (sealed, key_id) = reg
                        .set_reader_password(id, &sealed, self.keyring().key_id())
                        .await?
                        .ok_or(Error::NotFound("tenant"))?;
                    self.keyring()
                        .open_string(&key_id, &sealed, &reader_aad(id))
                        .context("open the reader password")?
                }
            };
            let admin = self.admin_for(&t).await?;
            make_reader(&admin, &t, &password).await
        })
        .await
    }

    /// The tenant's reader password, if it has a reader.
    pub fn reader_password(&self, t: &TenantRecord) -> Result<Option<String>> {
        Ok(crate::servers::readers::reader_password(self.keyring(), t)?)
    }
}

/// The reader role of `t` on the server of `admin`, in `t`'s database,
/// logging in only while its tenant is active.
pub async fn make_reader(admin: &ServerAdmin, t: &TenantRecord, password: &str) -> Result<()> {
    schema::ensure_reader(
        admin,
        &t.database_name,
        &t.role_name,
        password,
        t.limits.connection_limit,
    )
    .await?;
    if t.status != TenantStatus::Active {
        roles::set_role_login(admin, &t.role_name, false)
            .await
            .context("keep the suspended tenant's roles from logging in")?;
    }
    Ok(())
}
