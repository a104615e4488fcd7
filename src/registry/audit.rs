//! The audit log: one row per admin action, never updated.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, Postgres, Transaction};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Error, Registry, Result};

#[derive(Debug, Clone, Serialize, ToSchema, FromRow)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub tenant_id: Option<Uuid>,
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

impl Registry {
    /// Append an audit row.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        tenant: Option<Uuid>,
        detail: serde_json::Value,
    ) -> Result<()> {
        insert(&self.pool, actor, action, tenant, detail).await
    }

    /// Append an audit row inside a transaction that does the action itself.
    pub(super) async fn audit_in(
        tx: &mut Transaction<'_, Postgres>,
        actor: &str,
        action: &str,
        tenant: Option<Uuid>,
        detail: serde_json::Value,
    ) -> Result<()> {
        insert(&mut **tx, actor, action, tenant, detail).await
    }

    /// Newest first, optionally for one tenant.
    pub async fn audit_entries(&self, tenant: Option<Uuid>, limit: i64) -> Result<Vec<AuditEntry>> {
        sqlx::query_as(
            "SELECT id, at, actor, action, tenant_id, detail FROM audit_log
              WHERE ($1::uuid IS NULL OR tenant_id = $1) ORDER BY id DESC LIMIT $2",
        )
        .bind(tenant)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }
}

async fn insert<'e>(
    exec: impl sqlx::PgExecutor<'e>,
    actor: &str,
    action: &str,
    tenant: Option<Uuid>,
    detail: serde_json::Value,
) -> Result<()> {
    sqlx::query("INSERT INTO audit_log (actor, action, tenant_id, detail) VALUES ($1, $2, $3, $4)")
        .bind(actor)
        .bind(action)
        .bind(tenant)
        .bind(detail)
        .execute(exec)
        .await?;
    Ok(())
}
