//! Backup rows: one per attempt, (`queued` →) `running` → `succeeded` |
//! `failed`, and `deleted` once retention removed its objects. A row says `succeeded` only
//! after the manifest was written (invariant 5).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::FromRow;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Error, Registry, Result};

/// One backup attempt of one tenant.
#[derive(Debug, Clone, Serialize, ToSchema, FromRow, PartialEq)]
pub struct Backup {
    pub id: Uuid,
    pub tenant_id: Uuid,
    /// `manual`, `scheduled`, `archive` or `final`.
    pub kind: String,
    /// `queued` (waiting for a slot of `SILO_BACKUP_CONCURRENCY`),
    /// `running`, `succeeded`, `failed` or `deleted`.
    pub status: String,
    pub bucket: String,
    pub object_key: String,
    pub manifest_key: String,
    #[serde(skip)]
    pub upload_id: Option<String>,
    pub storage_class: Option<String>,
    /// Bytes per multipart part (all parts but the last are this size).
    pub part_size: Option<i64>,
    pub parts: Option<i32>,
    /// Bytes stored (encrypted dump).
    pub size_bytes: Option<i64>,
    /// SHA-256 (hex) of the stored bytes.
    pub sha256: Option<String>,
    /// Id of the master key that seals the tenant's backup data key.
    pub key_id: Option<String>,
    pub server_version: Option<String>,
    pub pg_dump_version: Option<String>,
    pub schema_version: Option<i64>,
    /// Rows per table at the dump's snapshot.
    #[schema(value_type = Option<Object>)]
    pub row_counts: Option<serde_json::Value>,
    pub error: Option<String>,
    pub scheduled_for: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub verified_at: Option<DateTime<Utc>>,
    /// Why the last verification failed; `null` when it passed or never ran.
    pub verify_error: Option<String>,
    /// The silo process that ran it, `host:pid`.
    pub runner: Option<String>,
}

const SELECT_BACKUP: &str = "SELECT id, tenant_id, kind, status, bucket, object_key, manifest_key, upload_id,
        storage_class, part_size, parts, size_bytes, sha256, key_id, server_version, pg_dump_version,
        schema_version, row_counts, error, scheduled_for, started_at, finished_at, verified_at, verify_error, runner
   FROM backups";

/// A backup attempt about to start.
#[derive(Debug)]
pub struct NewBackup<'a> {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub kind: &'a str,
    pub bucket: &'a str,
    pub object_key: &'a str,
    pub manifest_key: &'a str,
    pub storage_class: Option<&'a str>,
    pub scheduled_for: Option<DateTime<Utc>>,
    /// `Some(process lease)`: recorded `queued`, waiting for a slot in that
    /// process; `None`: `running` at once (its runner holds its lock).
    pub queued_by: Option<Uuid>,
}

/// What a finished upload recorded.
#[derive(Debug)]
pub struct BackupDone<'a> {
    pub part_size: i64,
    pub parts: i32,
    pub size_bytes: i64,
    pub sha256: &'a str,
    pub key_id: &'a str,
    pub server_version: &'a str,
    pub pg_dump_version: &'a str,
    pub schema_version: Option<i64>,
    pub row_counts: serde_json::Value,
}

/// A tenant the scheduler may back up (`backup_schedule`: its own, else
/// its plan's).
#[derive(Debug, Clone, FromRow)]
pub struct Schedulable {
    pub id: Uuid,
    pub slug: String,
    pub backup_schedule: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl Registry {
    /// Record a backup as `running` (or `queued`, see [`NewBackup::queued_by`]).
    /// Fails on `backups_one_running` when the tenant has one queued or
    /// running, and on `backups_one_per_slot` when the scheduled slot was
    /// claimed by another replica.
    pub async fn insert_backup(&self, b: &NewBackup<'_>) -> Result<Backup> {
        sqlx::query(
            "INSERT INTO backups (id, tenant_id, kind, status, bucket, object_key, manifest_key, storage_class, scheduled_for, runner, queued_by)
             VALUES ($1, $2, $3, CASE WHEN $10::uuid IS NULL THEN 'running' ELSE 'queued' END,
                     $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(b.id)
        .bind(b.tenant_id)
        .bind(b.kind)
        .bind(b.bucket)
        .bind(b.object_key)
        .bind(b.manifest_key)
        .bind(b.storage_class)
        .bind(b.scheduled_for)
        .bind(runner_id())
        .bind(b.queued_by)
        .execute(&self.pool)
        .await?;
        self.backup(b.id)
            .await?
            .ok_or(Error(sqlx::Error::RowNotFound))
    }

    pub async fn backup(&self, id: Uuid) -> Result<Option<Backup>> {
        sqlx::query_as(&format!("{SELECT_BACKUP} WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::from)
    }

    /// The queued or running backup of a tenant, if any.
    pub async fn running_backup(&self, tenant: Uuid) -> Result<Option<Backup>> {
        sqlx::query_as(&format!(
            "{SELECT_BACKUP} WHERE tenant_id = $1 AND status IN ('queued', 'running')"
        ))
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// A tenant's backups, newest first, a page before `before` (a backup id).
    pub async fn backups_of(
        &self,
        tenant: Uuid,
        before: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<Backup>> {
        sqlx::query_as(&format!(
            "{SELECT_BACKUP} WHERE tenant_id = $1 AND status <> 'deleted' AND ($2::uuid IS NULL OR id < $2)
             ORDER BY id DESC LIMIT $3"
        ))
        .bind(tenant)
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Every backup not yet pruned, newest first, for retention.
    pub async fn live_backups_of(&self, tenant: Uuid) -> Result<Vec<Backup>> {
        sqlx::query_as(&format!(
            "{SELECT_BACKUP} WHERE tenant_id = $1 AND status IN ('succeeded', 'failed') ORDER BY started_at DESC"
        ))
        .bind(tenant)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// The newest succeeded backup of a tenant.
    pub async fn latest_good_backup(&self, tenant: Uuid) -> Result<Option<Backup>> {
        sqlx::query_as(&format!(
            "{SELECT_BACKUP} WHERE tenant_id = $1 AND status = 'succeeded' ORDER BY started_at DESC LIMIT 1"
        ))
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Backups recorded as running anywhere (alive or left by a crash).
    pub async fn running_backups(&self) -> Result<Vec<Backup>> {
        sqlx::query_as(&format!("{SELECT_BACKUP} WHERE status = 'running'"))
            .fetch_all(&self.pool)
            .await
            .map_err(Error::from)
    }

    /// A queued backup got its slot (its runner holds its lock now):
    /// `running`, started now. `None` when it is no longer queued (a sweep
    /// failed it: the lease of the process that queued it was free).
    pub async fn start_queued_backup(&self, id: Uuid) -> Result<Option<Backup>> {
        let done = sqlx::query(
            "UPDATE backups SET status = 'running', started_at = now(), runner = $2
              WHERE id = $1 AND status = 'queued'",
        )
        .bind(id)
        .bind(runner_id())
        .execute(&self.pool)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(None);
        }
        self.backup(id).await
    }

    /// Queued backups (any tenant) and the process lease each waits under.
    pub async fn queued_backups(&self) -> Result<Vec<(Uuid, Uuid)>> {
        sqlx::query_as(
            "SELECT id, queued_by FROM backups WHERE status = 'queued' AND queued_by IS NOT NULL
              ORDER BY started_at",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Mark a queued backup `failed` with why (nothing was uploaded).
    /// `false` when it is no longer queued.
    pub async fn fail_queued_backup(&self, id: Uuid, error: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE backups SET status = 'failed', error = $2, finished_at = now()
              WHERE id = $1 AND status = 'queued'",
        )
        .bind(id)
        .bind(error)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Remember the open multipart upload (durably, before any part is sent).
    pub async fn set_backup_upload(&self, id: Uuid, upload_id: &str, part_size: i64) -> Result<()> {
        sqlx::query("UPDATE backups SET upload_id = $2, part_size = $3 WHERE id = $1")
            .bind(id)
            .bind(upload_id)
            .bind(part_size)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(Error::from)
    }

    /// Mark a backup `succeeded` (its manifest exists) and stamp the tenant.
    pub async fn finish_backup(&self, id: Uuid, done: &BackupDone<'_>) -> Result<Backup> {
        let mut tx = self.pool.begin().await?;
        let tenant: Uuid = sqlx::query_scalar(
            "UPDATE backups SET status = 'succeeded', upload_id = NULL, part_size = $2, parts = $3,
                    size_bytes = $4, sha256 = $5, key_id = $6, server_version = $7, pg_dump_version = $8,
                    schema_version = $9, row_counts = $10, finished_at = now()
              WHERE id = $1 AND status = 'running' RETURNING tenant_id",
        )
        .bind(id)
        .bind(done.part_size)
        .bind(done.parts)
        .bind(done.size_bytes)
        .bind(done.sha256)
        .bind(done.key_id)
        .bind(done.server_version)
        .bind(done.pg_dump_version)
        .bind(done.schema_version)
        .bind(&done.row_counts)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query("UPDATE tenants SET last_backup_at = now() WHERE id = $1")
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.backup(id)
            .await?
            .ok_or(Error(sqlx::Error::RowNotFound))
    }

    /// Mark a running backup `failed` with why; its upload is gone.
    pub async fn fail_backup(&self, id: Uuid, error: &str) -> Result<()> {
        sqlx::query(
            "UPDATE backups SET status = 'failed', upload_id = NULL, error = $2, finished_at = now()
              WHERE id = $1 AND status = 'running'",
        )
        .bind(id)
        .bind(error)
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(Error::from)
    }

    /// Retention removed a backup's objects.
    pub async fn mark_backup_deleted(&self, id: Uuid) -> Result<()> {
        sqlx::query(
            "UPDATE backups SET status = 'deleted' WHERE id = $1 AND status NOT IN ('queued', 'running')",
        )
            .bind(id)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(Error::from)
    }

    /// Record the outcome of a verification.
    pub async fn set_backup_verified(&self, id: Uuid, error: Option<&str>) -> Result<()> {
        sqlx::query("UPDATE backups SET verified_at = now(), verify_error = $2 WHERE id = $1")
            .bind(id)
            .bind(error)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(Error::from)
    }

    /// The tenant's sealed backup data key, storing `candidate` first if it has
    /// none. `None` when the key was erased (crypto-shredded).
    pub async fn backup_key(
        &self,
        tenant: Uuid,
        candidate: Option<(&[u8], &str)>,
    ) -> Result<Option<(Vec<u8>, String)>> {
        if let Some((sealed, key_id)) = candidate {
            sqlx::query(
                "UPDATE tenants SET backup_key_enc = $2, backup_key_id = $3
                  WHERE id = $1 AND backup_key_enc IS NULL AND backup_key_erased_at IS NULL",
            )
            .bind(tenant)
            .bind(sealed)
            .bind(key_id)
            .execute(&self.pool)
            .await?;
        }
        let row: Option<(Option<Vec<u8>>, Option<String>)> =
            sqlx::query_as("SELECT backup_key_enc, backup_key_id FROM tenants WHERE id = $1")
                .bind(tenant)
                .fetch_optional(&self.pool)
                .await?;
        Ok(match row {
            Some((Some(sealed), Some(key_id))) => Some((sealed, key_id)),
            _ => None,
        })
    }

    /// `true` when the tenant's backup key was erased.
    pub async fn backup_key_erased(&self, tenant: Uuid) -> Result<bool> {
        sqlx::query_scalar("SELECT backup_key_erased_at IS NOT NULL FROM tenants WHERE id = $1")
            .bind(tenant)
            .fetch_one(&self.pool)
            .await
            .map_err(Error::from)
    }

    /// Forget the tenant's backup data key for good: its backups become unreadable.
    pub async fn erase_backup_key(&self, tenant: Uuid) -> Result<()> {
        sqlx::query(
            "UPDATE tenants SET backup_key_enc = NULL, backup_key_id = NULL,
                    backup_key_erased_at = coalesce(backup_key_erased_at, now())
              WHERE id = $1",
        )
        .bind(tenant)
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(Error::from)
    }

    /// Tenants the scheduler backs up: active ones.
    pub async fn schedulable_tenants(&self) -> Result<Vec<Schedulable>> {
        sqlx::query_as(
            "SELECT t.id, t.slug, COALESCE(t.backup_schedule, p.backup_schedule) AS backup_schedule,
                    t.created_at
               FROM tenants t JOIN plans p ON p.name = t.plan
              WHERE t.status = 'active' ORDER BY t.id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Scheduled attempts at or after `since`: (tenant, slot, status).
    pub async fn scheduled_attempts(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<(Uuid, DateTime<Utc>, String)>> {
        sqlx::query_as(
            "SELECT tenant_id, scheduled_for, status FROM backups
              WHERE scheduled_for IS NOT NULL AND scheduled_for >= $1",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Active tenants without any good backup, and the `limit` active
    /// tenants whose last good backup is oldest (with its time).
    pub async fn oldest_backups(&self, limit: i64) -> Result<(i64, Vec<(Uuid, DateTime<Utc>)>)> {
        let never: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM tenants WHERE status = 'active' AND last_backup_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        let oldest = sqlx::query_as(
            "SELECT id, last_backup_at FROM tenants WHERE status = 'active' AND last_backup_at IS NOT NULL
              ORDER BY last_backup_at LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok((never, oldest))
    }
}

/// This process, as `host:pid`.
pub fn runner_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}", std::process::id())
}
