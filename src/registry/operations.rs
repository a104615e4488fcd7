//! Operations: long-running work the API answers `202` for, then reports on.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::FromRow;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Error, Registry, Result};
use crate::domain::OperationKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum OperationStatus {
    /// Waiting for a slot of `SILO_BACKUP_CONCURRENCY` in the process that
    /// queued it; nothing was done yet.
    Queued,
    Pending,
    Running,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, Serialize, ToSchema, FromRow)]
pub struct Operation {
    pub id: Uuid,
    pub kind: OperationKind,
    pub tenant_id: Option<Uuid>,
    pub status: OperationStatus,
    #[schema(value_type = Object)]
    pub progress: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const OP_COLUMNS: &str =
    "id, kind, tenant_id, status, progress, error, result, created_at, updated_at";
const SELECT_OP: &str =
    "SELECT id, kind, tenant_id, status, progress, error, result, created_at, updated_at FROM operations";

impl Registry {
    /// Start an operation with the parameters it was asked with, under an
    /// id chosen (and locked) by the caller. A second unfinished fleet
    /// migration fails on `operations_one_fleet_migration`.
    pub async fn create_operation_as(
        &self,
        id: Uuid,
        kind: OperationKind,
        tenant: Option<Uuid>,
        params: serde_json::Value,
    ) -> Result<Operation> {
        sqlx::query_as(&format!(
            "INSERT INTO operations (id, kind, tenant_id, status, params) VALUES ($1, $2, $3, 'running', $4)
             RETURNING {OP_COLUMNS}"
        ))
        .bind(id)
        .bind(kind)
        .bind(tenant)
        .bind(params)
        .fetch_one(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Record an operation `queued` for a slot in the process whose lease
    /// is `process` (see [`Self::queued_operations`]); it holds no lease of
    /// its own until it starts ([`Self::start_queued_operation`]).
    pub async fn create_queued_operation(
        &self,
        id: Uuid,
        kind: OperationKind,
        tenant: Option<Uuid>,
        params: serde_json::Value,
        process: Uuid,
    ) -> Result<Operation> {
        sqlx::query_as(&format!(
            "INSERT INTO operations (id, kind, tenant_id, status, params, queued_by)
             VALUES ($1, $2, $3, 'queued', $4, $5) RETURNING {OP_COLUMNS}"
        ))
        .bind(id)
        .bind(kind)
        .bind(tenant)
        .bind(params)
        .bind(process)
        .fetch_one(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// A queued operation got its slot (its runner holds its lease now):
    /// `running`. `false` when it is no longer queued (a sweep settled it).
    pub async fn start_queued_operation(&self, id: Uuid) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE operations SET status = 'running', updated_at = now()
              WHERE id = $1 AND status = 'queued'",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Queued operations of `kinds` (any tenant) and the process lease each
    /// waits under, oldest first.
    pub async fn queued_operations(&self, kinds: &[OperationKind]) -> Result<Vec<(Uuid, Uuid)>> {
        let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
        sqlx::query_as(
            "SELECT id, queued_by FROM operations
              WHERE status = 'queued' AND kind = ANY($1) AND queued_by IS NOT NULL
              ORDER BY created_at",
        )
        .bind(kinds)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Parameters of the newest operation of `kind` on `tenant`.
    pub async fn latest_operation_params(
        &self,
        kind: OperationKind,
        tenant: Uuid,
    ) -> Result<Option<serde_json::Value>> {
        sqlx::query_scalar(
            "SELECT params FROM operations WHERE kind = $1 AND tenant_id = $2 ORDER BY created_at DESC LIMIT 1",
        )
        .bind(kind)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Started, unfinished operations of a kind (any tenant), oldest first:
    /// each holds its lease while its runner lives. Queued ones hold none
    /// (their process's lease says whether they still wait; see
    /// [`Self::queued_operations`]), so they are not listed here.
    pub async fn unfinished_operations(&self, kind: OperationKind) -> Result<Vec<Operation>> {
        sqlx::query_as(&format!(
            "{SELECT_OP} WHERE kind = $1 AND status IN ('pending', 'running') ORDER BY created_at"
        ))
        .bind(kind)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Parameters of every unfinished operation of a kind (queued ones
    /// too), in one query.
    pub async fn unfinished_params(&self, kind: OperationKind) -> Result<Vec<serde_json::Value>> {
        sqlx::query_scalar(
            "SELECT params FROM operations WHERE kind = $1 AND status IN ('queued', 'pending', 'running')",
        )
        .bind(kind)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// The parameters an operation was started with.
    pub async fn operation_params(&self, id: Uuid) -> Result<serde_json::Value> {
        sqlx::query_scalar("SELECT params FROM operations WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .map_err(Error::from)
    }

    pub async fn set_progress(&self, id: Uuid, progress: serde_json::Value) -> Result<()> {
        sqlx::query("UPDATE operations SET progress = $2, updated_at = now() WHERE id = $1")
            .bind(id)
            .bind(progress)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(Error::from)
    }

    pub async fn operation(&self, id: Uuid) -> Result<Option<Operation>> {
        sqlx::query_as(&format!("{SELECT_OP} WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::from)
    }

    /// Unfinished operations of `kind` on `tenant`, queued ones included.
    pub async fn open_operations(
        &self,
        kind: OperationKind,
        tenant: Uuid,
    ) -> Result<Vec<Operation>> {
        sqlx::query_as(&format!(
            "{SELECT_OP} WHERE kind = $1 AND tenant_id = $2 AND status IN ('queued', 'pending', 'running')"
        ))
        .bind(kind)
        .bind(tenant)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    pub async fn finish_operation(
        &self,
        id: Uuid,
        outcome: Result<serde_json::Value, String>,
    ) -> Result<()> {
        let (status, result, error) = match outcome {
            Ok(v) => ("succeeded", Some(v), None),
            Err(e) => ("failed", None, Some(e)),
        };
        // Only an open operation is finished: its outcome is written once.
        sqlx::query(
            "UPDATE operations SET status = $2, result = $3, error = $4, updated_at = now()
              WHERE id = $1 AND status IN ('queued', 'pending', 'running')",
        )
        .bind(id)
        .bind(status)
        .bind(result)
        .bind(error)
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(Error::from)
    }

    /// Failed operations of `kind` whose params lack `key` (what a sweep
    /// marks once it has cleaned up after one), newest first, at most `limit`.
    pub async fn failed_without(
        &self,
        kind: OperationKind,
        key: &str,
        limit: i64,
    ) -> Result<Vec<(Uuid, serde_json::Value)>> {
        sqlx::query_as(
            "SELECT id, params FROM operations
              WHERE kind = $1 AND status = 'failed' AND NOT params ? $2
              ORDER BY created_at DESC LIMIT $3",
        )
        .bind(kind)
        .bind(key)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Add fields to an operation's params (a move records `verified` there).
    pub async fn mark_operation(&self, id: Uuid, fields: serde_json::Value) -> Result<()> {
        sqlx::query("UPDATE operations SET params = params || $2, updated_at = now() WHERE id = $1")
            .bind(id)
            .bind(fields)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(Error::from)
    }

    /// Claim an unfinished operation whose runner seems gone, so that a
    /// runner still alive after all can no longer commit its decisive step
    /// (see [`Registry::relocate_tenant`], which locks the row). `false` when
    /// it is finished already.
    pub async fn claim_abandoned_operation(&self, id: Uuid) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE operations SET params = params || '{\"abandoned\": true}', updated_at = now()
              WHERE id = $1 AND status IN ('queued', 'pending', 'running')",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The oldest unfinished operation on `tenant` of one of `kinds`, queued
    /// ones included (a queued move keeps a restore from starting).
    pub async fn open_operation_of(
        &self,
        tenant: Uuid,
        kinds: &[OperationKind],
    ) -> Result<Option<Uuid>> {
        if kinds.is_empty() {
            return Ok(None);
        }
        let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
        sqlx::query_scalar(
            "SELECT id FROM operations WHERE tenant_id = $1 AND kind = ANY($2)
                AND status IN ('queued', 'pending', 'running') ORDER BY created_at LIMIT 1",
        )
        .bind(tenant)
        .bind(kinds)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Fail an open operation, keeping a report of what it did (a fleet
    /// migration's per-tenant failures stay readable). Written once, as
    /// [`Self::finish_operation`].
    pub async fn fail_operation_with_report(
        &self,
        id: Uuid,
        error: &str,
        report: serde_json::Value,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE operations SET status = 'failed', result = $3, error = $2, updated_at = now()
              WHERE id = $1 AND status IN ('queued', 'pending', 'running')",
        )
        .bind(id)
        .bind(error)
        .bind(report)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Did the latest move of a tenant verify its copy?
    pub async fn move_verified(&self, tenant: Uuid) -> Result<bool> {
        let v: Option<Option<bool>> = sqlx::query_scalar(
            "SELECT (params->>'verified')::bool FROM operations
              WHERE kind = 'tenant.move' AND tenant_id = $1 ORDER BY created_at DESC LIMIT 1",
        )
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        Ok(v.flatten().unwrap_or(false))
    }
}
