//! App credentials: the logins of PostgreSQL clients at the wire front door.
//! Only a SCRAM-SHA-256 verifier is stored. A change (made, rotated,
//! revoked) is announced on the tenants channel, so every replica drops
//! what it cached and ends the sessions of a revoked credential at once.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::FromRow;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Error, Registry, Result};
use crate::domain::PoolMode;

/// Unique index: one live credential of a name per tenant.
pub const LIVE_NAME_INDEX: &str = "app_credentials_live_name";

/// An app credential as stored (its verifier is not a secret a client
/// can log in with, but it is never returned by the API either).
#[derive(Debug, Clone, FromRow)]
pub struct AppCredential {
    pub id: Uuid,
    pub tenant_id: Uuid,
    /// Also the `user` a client logs in with.
    pub name: String,
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub verifier: String,
    pub read_only: bool,
    pub pool_mode: PoolMode,
    pub created_at: DateTime<Utc>,
    pub rotated_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// What the admin API shows of a credential: no password, no verifier.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AppCredentialView {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    /// The `user` to log in with (the credential's name).
    pub user: String,
    pub read_only: bool,
    pub pool_mode: PoolMode,
    pub created_at: DateTime<Utc>,
    pub rotated_at: Option<DateTime<Utc>>,
}

impl From<&AppCredential> for AppCredentialView {
    fn from(c: &AppCredential) -> Self {
        Self {
            id: c.id,
            tenant_id: c.tenant_id,
            name: c.name.clone(),
            user: c.name.clone(),
            read_only: c.read_only,
            pool_mode: c.pool_mode,
            created_at: c.created_at,
            rotated_at: c.rotated_at,
        }
    }
}

const COLUMNS: &str =
    "id, tenant_id, name, verifier, read_only, pool_mode, created_at, rotated_at, revoked_at";

impl Registry {
    /// Store a new credential; a live one of the same name in the tenant is
    /// a unique violation of [`LIVE_NAME_INDEX`].
    pub async fn create_app_credential(
        &self,
        tenant: Uuid,
        name: &str,
        read_only: bool,
        pool_mode: PoolMode,
        verifier: &str,
        actor: &str,
    ) -> Result<AppCredential> {
        let mut tx = self.pool.begin().await?;
        let c: AppCredential = sqlx::query_as(&format!(
            "INSERT INTO app_credentials (id, tenant_id, name, verifier, read_only, pool_mode)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING {COLUMNS}"
        ))
        .bind(Uuid::now_v7())
        .bind(tenant)
        .bind(name)
        .bind(verifier)
        .bind(read_only)
        .bind(pool_mode)
        .fetch_one(&mut *tx)
        .await?;
        Self::audit_in(
            &mut tx,
            actor,
            "app_credential.create",
            Some(tenant),
            serde_json::json!({"credential_id": c.id, "name": c.name, "pool_mode": c.pool_mode.as_str()}),
        )
        .await?;
        notify(&mut tx, tenant).await?;
        tx.commit().await?;
        Ok(c)
    }

    /// A tenant's live credentials, oldest first.
    pub async fn app_credentials(&self, tenant: Uuid) -> Result<Vec<AppCredential>> {
        sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM app_credentials
              WHERE tenant_id = $1 AND revoked_at IS NULL ORDER BY created_at, id"
        ))
        .bind(tenant)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// The live credential a client names at login (`user`) for `tenant`.
    pub async fn app_credential_for_login(
        &self,
        tenant: Uuid,
        user: &str,
    ) -> Result<Option<AppCredential>> {
        sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM app_credentials
              WHERE tenant_id = $1 AND name = $2 AND revoked_at IS NULL"
        ))
        .bind(tenant)
        .bind(user)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Revoke a live credential (its sessions are ended by the front doors
    /// that hear the notice); `None` if there is no such live credential.
    pub async fn revoke_app_credential(
        &self,
        tenant: Uuid,
        id: Uuid,
        actor: &str,
    ) -> Result<Option<AppCredential>> {
        let mut tx = self.pool.begin().await?;
        let c: Option<AppCredential> = sqlx::query_as(&format!(
            "UPDATE app_credentials SET revoked_at = now()
              WHERE tenant_id = $1 AND id = $2 AND revoked_at IS NULL RETURNING {COLUMNS}"
        ))
        .bind(tenant)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(c) = &c {
            audit_and_notify(&mut tx, actor, "app_credential.revoke", c).await?;
        }
        tx.commit().await?;
        Ok(c)
    }

    /// Give a live credential a new verifier (a new password); sessions
    /// already logged in go on, as they do when PostgreSQL changes a password.
    pub async fn rotate_app_credential(
        &self,
        tenant: Uuid,
        id: Uuid,
        verifier: &str,
        actor: &str,
    ) -> Result<Option<AppCredential>> {
        let mut tx = self.pool.begin().await?;
        let c: Option<AppCredential> = sqlx::query_as(&format!(
            "UPDATE app_credentials SET verifier = $3, rotated_at = now()
              WHERE tenant_id = $1 AND id = $2 AND revoked_at IS NULL RETURNING {COLUMNS}"
        ))
        .bind(tenant)
        .bind(id)
        .bind(verifier)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(c) = &c {
            audit_and_notify(&mut tx, actor, "app_credential.rotate", c).await?;
        }
        tx.commit().await?;
        Ok(c)
    }
}

/// Audit a change of credential `c` and announce it, in the transaction
/// that makes it.
async fn audit_and_notify(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    actor: &str,
    action: &str,
    c: &AppCredential,
) -> Result<()> {
    Registry::audit_in(
        tx,
        actor,
        action,
        Some(c.tenant_id),
        serde_json::json!({"credential_id": c.id, "name": c.name}),
    )
    .await?;
    notify(tx, c.tenant_id).await
}

/// Announce a change of the tenant's credentials on the tenants channel
/// (delivered at commit).
async fn notify(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, tenant: Uuid) -> Result<()> {
    sqlx::query("SELECT pg_notify('silo_tenants', $1)")
        .bind(tenant.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(())
}
