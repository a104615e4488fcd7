//! Named admin keys: bearer tokens of `/admin/v1` with a name and a role.
//! Only a SHA-256 of each token is stored ([`crate::crypto::admin_key_hash`]).
//! Every request with a key reads its row, so a revoke holds at once on
//! every replica: nothing about a key is cached.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::FromRow;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Error, Registry, Result};
use crate::domain::AdminRole;

/// Unique index: one live key of a name.
pub const LIVE_KEY_NAME_INDEX: &str = "admin_keys_live_name";

/// A key's `last_used_at` is written when it is older than this, so a key
/// in steady use costs one write a minute, not one per request.
pub const LAST_USED_EVERY: Duration = Duration::from_secs(60);

/// An admin key as the API and the CLI show it: no token, no hash.
#[derive(Debug, Clone, Serialize, ToSchema, FromRow)]
pub struct AdminKey {
    pub id: Uuid,
    /// The audit log's `actor` of everything done with the key.
    pub name: String,
    pub role: AdminRole,
    pub created_at: DateTime<Utc>,
    /// Who made it: a key's name, `admin` (the bootstrap token) or `cli`.
    pub created_by: String,
    /// Last request made with it, to within a minute; `null` if none yet.
    pub last_used_at: Option<DateTime<Utc>>,
    /// From when it is refused (as a revoked key is); `null`: never.
    pub expires_at: Option<DateTime<Utc>>,
}

/// Who a live key is, as a request authenticated with it acts.
#[derive(Debug, Clone, FromRow)]
pub struct KeyHolder {
    pub name: String,
    pub role: AdminRole,
}

const COLUMNS: &str = "id, name, role, created_at, created_by, last_used_at, expires_at";

/// Longest a key may be made to last, in days (about ten years).
pub const MAX_KEY_DAYS: u32 = 3650;

/// What [`Registry::set_admin_key_expiry`] did.
#[derive(Debug)]
pub enum KeyExpiry {
    Set(AdminKey),
    /// No key of that name is live.
    NoSuchKey,
    /// The key has expired: it stays so (make a new one).
    Expired,
}

/// `expires_in_days` as the `make_interval(days => …)` parameter (`NULL`:
/// no expiry), at most [`MAX_KEY_DAYS`].
fn days_param(expires_in_days: Option<u32>) -> Option<i32> {
    expires_in_days.map(|d| d.min(MAX_KEY_DAYS) as i32)
}

impl Registry {
    /// Store a new key by its token's hash, audited, expiring after
    /// `expires_in_days` (by the control database's clock) if given; a live
    /// key of the same name is a unique violation of [`LIVE_KEY_NAME_INDEX`].
    pub async fn create_admin_key(
        &self,
        name: &str,
        role: AdminRole,
        token_hash: &[u8; 32],
        expires_in_days: Option<u32>,
        actor: &str,
    ) -> Result<AdminKey> {
        let mut tx = self.pool.begin().await?;
        // An expired key of this name gives it up: revoked (audited) in the
        // same transaction, so the name is free for its successor.
        let expired: Option<(Uuid, AdminRole)> = sqlx::query_as(
            "UPDATE admin_keys SET revoked_at = now(), revoked_by = $2
              WHERE name = $1 AND revoked_at IS NULL AND expires_at <= now()
              RETURNING id, role",
        )
        .bind(name)
        .bind(actor)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((id, role)) = expired {
            Self::audit_in(
                &mut tx,
                actor,
                "key.revoke",
                None,
                serde_json::json!({
                    "key_id": id, "name": name, "role": role, "reason": "expired; name reused",
                }),
            )
            .await?;
        }
        let key: AdminKey = sqlx::query_as(&format!(
            "INSERT INTO admin_keys (id, name, role, token_hash, created_by, expires_at)
             VALUES ($1, $2, $3, $4, $5, now() + make_interval(days => $6))
             RETURNING {COLUMNS}"
        ))
        .bind(Uuid::now_v7())
        .bind(name)
        .bind(role)
        .bind(&token_hash[..])
        .bind(actor)
        .bind(days_param(expires_in_days))
        .fetch_one(&mut *tx)
        .await?;
        Self::audit_in(
            &mut tx,
            actor,
            "key.create",
            None,
            serde_json::json!({
                "key_id": key.id, "name": key.name, "role": key.role, "expires_at": key.expires_at,
            }),
        )
        .await?;
        tx.commit().await?;
        Ok(key)
    }

    /// Keys not revoked (expired ones too), oldest first.
    pub async fn admin_keys(&self) -> Result<Vec<AdminKey>> {
        sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM admin_keys WHERE revoked_at IS NULL ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Give the live key of this name a new expiry, `expires_in_days` from
    /// now (by the control database's clock) or never, audited with the
    /// old one. An expired key is not changed: it stays refused
    /// ([`KeyExpiry::Expired`]).
    pub async fn set_admin_key_expiry(
        &self,
        name: &str,
        expires_in_days: Option<u32>,
        actor: &str,
    ) -> Result<KeyExpiry> {
        let mut tx = self.pool.begin().await?;
        let before: Option<(Uuid, Option<DateTime<Utc>>, bool)> = sqlx::query_as(
            "SELECT id, expires_at, expires_at IS NOT NULL AND expires_at <= now() FROM admin_keys
              WHERE name = $1 AND revoked_at IS NULL FOR UPDATE",
        )
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((id, was, expired)) = before else {
            return Ok(KeyExpiry::NoSuchKey);
        };
        if expired {
            return Ok(KeyExpiry::Expired);
        }
        let key: AdminKey = sqlx::query_as(&format!(
            "UPDATE admin_keys SET expires_at = now() + make_interval(days => $2)
              WHERE id = $1 RETURNING {COLUMNS}"
        ))
        .bind(id)
        .bind(days_param(expires_in_days))
        .fetch_one(&mut *tx)
        .await?;
        Self::audit_in(
            &mut tx,
            actor,
            "key.expiry",
            None,
            serde_json::json!({
                "key_id": key.id, "name": key.name, "was": was, "expires_at": key.expires_at,
            }),
        )
        .await?;
        tx.commit().await?;
        Ok(KeyExpiry::Set(key))
    }

    /// Revoke the live key of this name, audited; `None` if there is none.
    /// Its row stays (with `revoked_at`); the name is free again.
    pub async fn revoke_admin_key(&self, name: &str, actor: &str) -> Result<Option<AdminKey>> {
        let mut tx = self.pool.begin().await?;
        let key: Option<AdminKey> = sqlx::query_as(&format!(
            "UPDATE admin_keys SET revoked_at = now(), revoked_by = $2
              WHERE name = $1 AND revoked_at IS NULL RETURNING {COLUMNS}"
        ))
        .bind(name)
        .bind(actor)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(key) = &key {
            Self::audit_in(
                &mut tx,
                actor,
                "key.revoke",
                None,
                serde_json::json!({"key_id": key.id, "name": key.name, "role": key.role}),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(key)
    }

    /// The live key (neither revoked nor expired) whose token hashes to
    /// `token_hash`, if any; its
    /// `last_used_at` is brought up to date in the same statement when it
    /// is older than [`LAST_USED_EVERY`].
    pub async fn admin_key_holder(&self, token_hash: &[u8; 32]) -> Result<Option<KeyHolder>> {
        sqlx::query_as(
            "WITH k AS (
                 SELECT id, name, role, last_used_at FROM admin_keys
                  WHERE token_hash = $1 AND revoked_at IS NULL
                    AND (expires_at IS NULL OR expires_at > now())
             ), touched AS (
                 UPDATE admin_keys a SET last_used_at = now() FROM k
                  WHERE a.id = k.id
                    AND (k.last_used_at IS NULL
                         OR k.last_used_at < now() - make_interval(secs => $2))
             )
             SELECT name, role FROM k",
        )
        .bind(&token_hash[..])
        .bind(LAST_USED_EVERY.as_secs_f64())
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::from)
    }
}
