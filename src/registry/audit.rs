//! The audit log: one row per admin action, never updated nor deleted (a
//! trigger refuses both, and TRUNCATE, to silo's own login too).

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
    /// Who acted: the name of the admin key, `admin` for the bootstrap token
    /// (`SILO_ADMIN_TOKEN`), or silo itself (`cli`, `scheduler`, `silo-dev`).
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

    /// Newest first; each filter optional: one tenant, one actor (an admin
    /// key's name), one action.
    pub async fn audit_entries(
        &self,
        filter: &AuditFilter<'_>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>> {
        sqlx::query_as(
            "SELECT id, at, actor, action, tenant_id, detail FROM audit_log
              WHERE ($1::uuid IS NULL OR tenant_id = $1)
                AND ($2::text IS NULL OR actor = $2)
                AND ($3::text IS NULL OR action = $3)
              ORDER BY id DESC LIMIT $4",
        )
        .bind(filter.tenant)
        .bind(filter.actor)
        .bind(filter.action)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }
}

/// Which audit entries to read; `None` is any.
#[derive(Debug, Default, Clone, Copy)]
pub struct AuditFilter<'a> {
    pub tenant: Option<Uuid>,
    pub actor: Option<&'a str>,
    pub action: Option<&'a str>,
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
