//! Taking one backup: claim, dump, encrypt, upload, manifest, record.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context;
use aws_sdk_s3::types::CompletedPart;
use bytes::BytesMut;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection};
use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;
use uuid::Uuid;

use super::crypt::{new_data_key, Sealer, SEGMENT};
use super::{key_erased, object_keys, BackupKind, Backups, Progress, Storage, Store};
use crate::failpoint;
use crate::ops::{Error, Result};
use crate::registry::{Backup, BackupDone, Lock, NewBackup, TenantRecord, TenantStatus};
use crate::servers::tools::{capture_stderr, error_lines};

/// Smallest part silo uploads (S3's own minimum is 5 MiB).
pub const MIN_PART_SIZE: u64 = 8 * 1024 * 1024;
/// S3's limit of parts per upload.
pub const MAX_PARTS: i32 = 10_000;
/// Parts planned for at most, leaving room for a dump larger than foreseen.
const PLANNED_PARTS: u64 = 5_000;
/// Read size from pg_dump's pipe.
const READ_CHUNK: usize = 4 * SEGMENT;

/// Format name written into every manifest.
pub const FORMAT: &str = "silo-backup/1";

/// Written last, next to the dump: a backup exists only when its manifest does.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub backup_id: Uuid,
    pub tenant_id: Uuid,
    pub tenant_slug: String,
    pub kind: String,
    pub created_at: DateTime<Utc>,
    /// Bytes of the stored (encrypted) object.
    pub size_bytes: u64,
    /// SHA-256 (hex) of the stored bytes.
    pub sha256: String,
    pub part_size: u64,
    pub parts: i32,
    /// Master key id sealing the tenant's data key.
    pub key_id: String,
    /// `aes-256-gcm-stream-be32`, 64 KiB segments, backup id as associated data.
    pub encryption: String,
    pub dump_format: String,
    pub server_version: String,
    pub pg_dump_version: String,
    pub schema_version: Option<i64>,
    pub row_counts: BTreeMap<String, i64>,
}

/// One fixed part size per upload, from the database size, so the dump
/// (usually smaller than the database) stays far below 10,000 parts.
pub fn part_size_for(database_bytes: u64) -> u64 {
    const MIB: u64 = 1024 * 1024;
    let want = (database_bytes.saturating_mul(2)).div_ceil(PLANNED_PARTS);
    want.div_ceil(MIB)
        .saturating_mul(MIB)
        .clamp(MIN_PART_SIZE, 5 * 1024 * MIB)
}

impl Backups {
    /// Claim a backup of `tenant`: a `running` row and the lock that says its
    /// runner is alive. Run it with [`Provisioner::run_backup`].
    pub async fn start_backup(
        &self,
        tenant: Uuid,
        kind: BackupKind,
        scheduled_for: Option<DateTime<Utc>>,
    ) -> Result<(Backup, Lock)> {
        let storage = self.storage();
        let reg = self.registry();
        let t = reg.tenant(tenant).await?.ok_or(Error::NotFound("tenant"))?;
        let allowed = match kind {
            BackupKind::Manual | BackupKind::Scheduled => {
                matches!(t.status, TenantStatus::Active | TenantStatus::Suspended)
            }
            BackupKind::Archive => t.status == TenantStatus::Archiving,
            BackupKind::Final => t.status == TenantStatus::Deleting,
        };
        if !allowed {
            return Err(Error::state(
                t.status.as_str(),
                "only an active or suspended tenant can be backed up",
            ));
        }
        self.refuse_if_erased(tenant).await?;
        let id = Uuid::now_v7();
        // Lock before the row exists, so the sweep never sees it running unlocked.
        let lock = reg
            .try_lock_backup(id)
            .await?
            .context("lock a fresh backup id")?;
        let (object_key, manifest_key) = object_keys(tenant, id);
        let storage_class = match kind {
            BackupKind::Archive => storage.settings.archive_storage_class.as_deref(),
            _ => None,
        };
        let new = NewBackup {
            id,
            tenant_id: tenant,
            kind: kind.as_str(),
            bucket: storage.store.bucket(),
            object_key: &object_key,
            manifest_key: &manifest_key,
            storage_class,
            scheduled_for,
        };
        match reg.insert_backup(&new).await {
            Ok(b) => Ok((b, lock)),
            Err(e) if e.is_unique_violation("backups_one_running") => {
                lock.release().await;
                let running = reg.running_backup(tenant).await?;
                Err(Error::conflict(format!(
                    "a backup of this tenant is already running: backup {}",
                    running.map_or(Uuid::nil(), |b| b.id)
                )))
            }
            Err(e) if e.is_unique_violation("backups_one_per_slot") => {
                lock.release().await;
                Err(Error::conflict("this scheduled slot was already taken"))
            }
            Err(e) => {
                lock.release().await;
                Err(e.into())
            }
        }
    }

    /// Take a claimed backup to the end: `succeeded` with its manifest, or
    /// `failed` with its error and no upload left open.
    #[tracing::instrument(skip_all, fields(tenant_id = %backup.tenant_id, backup_id = %backup.id))]
    pub async fn run_backup(
        &self,
        backup: Backup,
        lock: Lock,
        progress: Option<Progress>,
    ) -> Result<Backup> {
        let storage = self.storage();
        let started = Instant::now();
        let reg = self.registry();
        let outcome = async {
            let t = reg
                .tenant(backup.tenant_id)
                .await?
                .context("find the tenant")?;
            self.take_backup(storage, &backup, &t, progress).await
        }
        .await;
        let result = match outcome {
            Ok(done) => {
                metrics::counter!("silo_backups_total", "outcome" => "succeeded").increment(1);
                metrics::counter!("silo_backup_bytes_total").increment(done.size_bytes as u64);
                metrics::histogram!("silo_backup_duration_seconds")
                    .record(started.elapsed().as_secs_f64());
                tracing::info!(
                    bytes = done.size_bytes,
                    seconds = started.elapsed().as_secs_f64(),
                    "backup succeeded"
                );
                let done_ref = BackupDone {
                    part_size: done.part_size,
                    parts: done.parts,
                    size_bytes: done.size_bytes,
                    sha256: &done.sha256,
                    key_id: &done.key_id,
                    server_version: &done.server_version,
                    pg_dump_version: &done.pg_dump_version,
                    schema_version: done.schema_version,
                    row_counts: done.row_counts.clone(),
                };
                reg.finish_backup(backup.id, &done_ref)
                    .await
                    .map_err(Error::from)
            }
            Err(e) => {
                let msg = format!("{e:#}");
                metrics::counter!("silo_backups_total", "outcome" => "failed").increment(1);
                tracing::error!("failed to back up tenant: {msg}");
                // The row as it is now: it knows the upload opened meanwhile.
                let current = match reg.backup(backup.id).await {
                    Ok(Some(b)) => b,
                    _ => backup.clone(),
                };
                self.discard_backup(&storage.store, &current).await;
                reg.fail_backup(backup.id, &msg).await?;
                Err(Error::Internal(e))
            }
        };
        lock.release().await;
        result
    }

    /// `POST /tenants/{t}/backups`: claim a manual backup and run it (then
    /// retention) in the background; answers at once with the claimed backup.
    pub async fn start_manual(&self, tenant: Uuid, actor: &str) -> Result<Backup> {
        let (backup, lock) = self.start_backup(tenant, BackupKind::Manual, None).await?;
        self.registry()
            .audit(
                actor,
                "backup.start",
                Some(tenant),
                serde_json::json!({"backup_id": backup.id}),
            )
            .await?;
        let runner = self.clone();
        let started = backup.clone();
        self.spawn_task(async move {
            if runner.run_backup(started, lock, None).await.is_ok() {
                if let Err(e) = runner.prune_backups(tenant).await {
                    tracing::warn!(tenant_id = %tenant, "failed to apply backup retention: {e}");
                }
            }
        });
        Ok(backup)
    }

    /// Claim and run a backup, waiting for it.
    pub async fn backup_now(
        &self,
        tenant: Uuid,
        kind: BackupKind,
        progress: Option<Progress>,
    ) -> Result<Backup> {
        let (b, lock) = self.start_backup(tenant, kind, None).await?;
        self.run_backup(b, lock, progress).await
    }

    /// Remove whatever a failed or abandoned backup left in the store: the
    /// open upload, and the objects if the upload had been completed.
    pub async fn discard_backup(&self, store: &Store, b: &Backup) {
        if let Some(upload) = &b.upload_id {
            if let Err(e) = store.abort_upload(&b.object_key, upload).await {
                tracing::warn!(backup_id = %b.id, "failed to abort the upload of a failed backup: {e:#}");
            }
        }
        // The manifest first: without it, the dump is not a backup.
        for key in [&b.manifest_key, &b.object_key] {
            if let Err(e) = store.delete(key).await {
                tracing::warn!(backup_id = %b.id, "failed to delete {key} of a failed backup: {e:#}");
            }
        }
    }

    /// The tenant's backup data key, created on first use.
    pub async fn data_key(&self, tenant: Uuid, create: bool) -> Result<[u8; 32]> {
        let context = data_key_context(tenant);
        let candidate = create.then(|| {
            let key = new_data_key();
            self.keyring().seal(&key, &context)
        });
        let sealed = self
            .registry()
            .backup_key(
                tenant,
                candidate.as_deref().map(|s| (s, self.keyring().key_id())),
            )
            .await?;
        let Some((sealed, key_id)) = sealed else {
            return Err(if self.registry().backup_key_erased(tenant).await? {
                key_erased()
            } else {
                Error::Internal(anyhow::anyhow!("the tenant has no backup key"))
            });
        };
        let key = self
            .keyring()
            .open(&key_id, &sealed, &context)
            .map_err(|e| Error::Internal(anyhow::anyhow!("open the tenant's backup key: {e}")))?;
        key.try_into()
            .map_err(|_| Error::Internal(anyhow::anyhow!("the tenant's backup key is malformed")))
    }

    async fn take_backup(
        &self,
        storage: &Storage,
        b: &Backup,
        t: &TenantRecord,
        progress: Option<Progress>,
    ) -> anyhow::Result<Done> {
        let key = self
            .data_key(t.id, true)
            .await
            .map_err(anyhow::Error::from)?;
        let admin = self.admin_for(t).await?;
        let (server_version, server_num): (String, String) = sqlx::query_as(
            "SELECT current_setting('server_version'), current_setting('server_version_num')",
        )
        .fetch_one(&admin.pool)
        .await
        .context("read the server version")?;
        let server_major: u32 = server_num.parse::<u32>().unwrap_or(0) / 10_000;
        let (dump_version, dump_major) = storage.tools.dump_version().await?;
        anyhow::ensure!(
            dump_major >= server_major,
            "check pg_dump: {dump_version} is older than the server (PostgreSQL {server_major}); install the PostgreSQL {server_major} client tools or point SILO_PG_BIN_DIR at them"
        );
        let db_size: i64 = sqlx::query_scalar("SELECT pg_database_size($1)")
            .bind(&t.database_name)
            .fetch_one(&admin.pool)
            .await
            .context("read the database size")?;
        let part_size = part_size_for(db_size.max(0) as u64);

        // The snapshot pg_dump will see; row counts are taken in it too.
        let mut snap = admin
            .connect_to(&t.database_name)
            .await
            .context("connect to the tenant database")?;
        let snapshot = export_snapshot(&mut snap).await?;
        let row_counts = row_counts(&mut snap).await?;
        let schema_version = schema_version(&mut snap).await;

        let upload_id = storage
            .store
            .create_upload(&b.object_key, b.storage_class.as_deref())
            .await?;
        if let Err(e) = self
            .registry()
            .set_backup_upload(b.id, &upload_id, part_size as i64)
            .await
        {
            // Unrecorded, nobody else could abort it: abort it now.
            storage
                .store
                .abort_upload(&b.object_key, &upload_id)
                .await
                .ok();
            return Err(anyhow::Error::new(e).context("record the open upload"));
        }
        failpoint::hit("backup_upload");

        let mut child = storage
            .tools
            .spawn_dump(&admin.libpq, &t.database_name, &snapshot)?;
        let stderr = capture_stderr(&mut child);
        let mut stdout = child.stdout.take().context("pg_dump's output")?;
        let (mut sealer, header) = Sealer::new(&key, b.id);
        let mut parts = PartWriter::new(
            storage.store.clone(),
            b.object_key.clone(),
            upload_id.clone(),
            part_size as usize,
            storage.settings.parts_in_flight,
            progress,
        );
        parts.write(&header).await?;
        let mut buf = vec![0u8; READ_CHUNK];
        let mut sealed = Vec::with_capacity(READ_CHUNK + 2 * SEGMENT);
        loop {
            let n = stdout
                .read(&mut buf)
                .await
                .context("read pg_dump's output")?;
            if n == 0 {
                break;
            }
            sealer.push(&buf[..n], &mut sealed);
            parts.write(&sealed).await?;
            sealed.clear();
        }
        let status = child.wait().await.context("wait for pg_dump")?;
        let errors = error_lines(&stderr.await.unwrap_or_default());
        anyhow::ensure!(
            status.success(),
            "run pg_dump: it exited with {status}: {}",
            errors
        );
        sealer.finish(&mut sealed);
        parts.write(&sealed).await?;
        let (completed, size, sha256) = parts.finish().await?;
        snap.close().await.ok();

        let part_count = completed.len() as i32;
        storage
            .store
            .complete_upload(&b.object_key, &upload_id, completed)
            .await?;
        let stored = storage.store.size(&b.object_key).await?;
        anyhow::ensure!(
            stored == Some(size as i64),
            "check the uploaded object: the store holds {stored:?} bytes, silo sent {size}"
        );
        let manifest = Manifest {
            format: FORMAT.into(),
            backup_id: b.id,
            tenant_id: t.id,
            tenant_slug: t.slug.clone(),
            kind: b.kind.clone(),
            created_at: Utc::now(),
            size_bytes: size,
            sha256: sha256.clone(),
            part_size,
            parts: part_count,
            key_id: self
                .registry()
                .backup_key(t.id, None)
                .await?
                .map(|(_, k)| k)
                .unwrap_or_default(),
            encryption: "aes-256-gcm-stream-be32-64k".into(),
            dump_format: "pg_dump custom (-Fc)".into(),
            server_version: server_version.clone(),
            pg_dump_version: dump_version.clone(),
            schema_version,
            row_counts: row_counts.clone(),
        };
        failpoint::hit("backup_manifest");
        storage
            .store
            .put(
                &b.manifest_key,
                serde_json::to_vec_pretty(&manifest).context("encode the manifest")?,
            )
            .await?;
        Ok(Done {
            part_size: part_size as i64,
            parts: part_count,
            size_bytes: size as i64,
            sha256,
            key_id: manifest.key_id,
            server_version,
            pg_dump_version: dump_version,
            schema_version,
            row_counts: serde_json::to_value(&row_counts).context("encode row counts")?,
        })
    }
}

/// What a finished upload recorded (owned).
struct Done {
    part_size: i64,
    parts: i32,
    size_bytes: i64,
    sha256: String,
    key_id: String,
    server_version: String,
    pg_dump_version: String,
    schema_version: Option<i64>,
    row_counts: serde_json::Value,
}

/// Associated data binding a sealed data key to its tenant.
fn data_key_context(tenant: Uuid) -> Vec<u8> {
    let mut c = b"silo-backup-key:".to_vec();
    c.extend_from_slice(tenant.as_bytes());
    c
}

/// Open a repeatable-read transaction and export its snapshot for pg_dump.
async fn export_snapshot(conn: &mut PgConnection) -> anyhow::Result<String> {
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *conn)
        .await
        .context("begin the backup snapshot")?;
    sqlx::query_scalar("SELECT pg_export_snapshot()")
        .fetch_one(&mut *conn)
        .await
        .context("export the backup snapshot")
}

/// Rows per user table, keyed `schema.table`.
pub(crate) async fn row_counts(conn: &mut PgConnection) -> anyhow::Result<BTreeMap<String, i64>> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
            AND n.nspname NOT LIKE 'pg\\_%'
          ORDER BY 1",
    )
    .fetch_all(&mut *conn)
    .await
    .context("list tables")?;
    let mut counts = BTreeMap::new();
    for table in tables {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&mut *conn)
            .await
            .with_context(|| format!("count rows of {table}"))?;
        counts.insert(table, n);
    }
    Ok(counts)
}

/// Newest applied tenant migration, if the database has silo's migrations table.
pub(crate) async fn schema_version(conn: &mut PgConnection) -> Option<i64> {
    sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
        .fetch_one(&mut *conn)
        .await
        .ok()
        .flatten()
}

/// Cuts the stored byte stream into equal parts and uploads them, a few at once.
struct PartWriter {
    store: Store,
    key: String,
    upload_id: String,
    part_size: usize,
    max_in_flight: usize,
    part: BytesMut,
    next: i32,
    in_flight: JoinSet<anyhow::Result<CompletedPart>>,
    done: Vec<CompletedPart>,
    hasher: Sha256,
    total: u64,
    progress: Option<Progress>,
}

impl PartWriter {
    fn new(
        store: Store,
        key: String,
        upload_id: String,
        part_size: usize,
        max_in_flight: usize,
        progress: Option<Progress>,
    ) -> Self {
        Self {
            store,
            key,
            upload_id,
            part_size,
            max_in_flight,
            part: BytesMut::with_capacity(part_size),
            next: 1,
            in_flight: JoinSet::new(),
            done: Vec::new(),
            hasher: Sha256::new(),
            total: 0,
            progress,
        }
    }

    async fn write(&mut self, mut data: &[u8]) -> anyhow::Result<()> {
        self.hasher.update(data);
        self.total += data.len() as u64;
        if let Some(p) = &self.progress {
            p(self.total);
        }
        while !data.is_empty() {
            let take = (self.part_size - self.part.len()).min(data.len());
            self.part.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.part.len() == self.part_size {
                self.send_part().await?;
            }
        }
        Ok(())
    }

    async fn send_part(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.next <= MAX_PARTS,
            "upload the dump: it outgrew {MAX_PARTS} parts of {} MiB",
            self.part_size >> 20
        );
        while self.in_flight.len() >= self.max_in_flight {
            self.join_one().await?;
        }
        let body =
            std::mem::replace(&mut self.part, BytesMut::with_capacity(self.part_size)).freeze();
        let (store, key, upload, n) = (
            self.store.clone(),
            self.key.clone(),
            self.upload_id.clone(),
            self.next,
        );
        self.in_flight
            .spawn(async move { store.upload_part(&key, &upload, n, body).await });
        self.next += 1;
        Ok(())
    }

    async fn join_one(&mut self) -> anyhow::Result<()> {
        if let Some(joined) = self.in_flight.join_next().await {
            self.done.push(joined.context("part upload task")??);
        }
        Ok(())
    }

    /// Upload the last (shorter) part and wait for all; returns the parts in
    /// order, the byte count and the SHA-256.
    async fn finish(mut self) -> anyhow::Result<(Vec<CompletedPart>, u64, String)> {
        if !self.part.is_empty() || self.next == 1 {
            self.send_part().await?;
        }
        while !self.in_flight.is_empty() {
            self.join_one().await?;
        }
        self.done.sort_by_key(|p| p.part_number());
        let sha = hex(&self.hasher.finalize());
        Ok((self.done, self.total, sha))
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_size_keeps_any_database_under_the_part_limit() {
        const MIB: u64 = 1024 * 1024;
        assert_eq!(part_size_for(0), MIN_PART_SIZE);
        assert_eq!(part_size_for(300 * MIB), MIN_PART_SIZE);
        for size in [10 * 1024 * MIB, 100 * 1024 * MIB, 2 * 1024 * 1024 * MIB] {
            let part = part_size_for(size);
            assert_eq!(part % MIB, 0, "whole MiB parts");
            // Even a dump twice the database size stays within the limit.
            assert!((2 * size).div_ceil(part) <= MAX_PARTS as u64, "{size}");
        }
    }
}
