//! Taking one backup: claim (in a work slot, or queued for one), dump,
//! encrypt, upload, manifest, record.

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
use crate::ops::{Error, Result, Slot};
use crate::registry::{Backup, BackupDone, Lock, NewBackup, TenantRecord, TenantStatus};
use crate::servers::tools::{capture_stderr, error_lines};

const MIB: u64 = 1024 * 1024;
/// Smallest part silo uploads, unless `SILO_BACKUP_MAX_PART_MIB` is smaller
/// (S3's own minimum is 5 MiB).
pub const MIN_PART_SIZE: u64 = 8 * MIB;
/// S3's limit of parts per upload.
pub const MAX_PARTS: i32 = 10_000;
/// Parts planned for at most, leaving room for a dump larger than foreseen.
const PLANNED_PARTS: u64 = 5_000;
/// Read size from pg_dump's pipe.
const READ_CHUNK: usize = 4 * SEGMENT;
/// Memory one backup holds besides its part buffers: the read buffer and
/// the sealed (encrypted) chunk.
pub const STREAM_BUFFERS: u64 = (READ_CHUNK + READ_CHUNK + 2 * SEGMENT) as u64;

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
/// (usually smaller than the database) stays far below 10,000 parts, but
/// never over `max_part`: a backup's memory is bounded by `max_part`, not by
/// the database (see [`memory_per_backup`]); beyond [`largest_backup`] a
/// dump does not fit and the backup fails saying so.
pub fn part_size_for(database_bytes: u64, max_part: u64) -> u64 {
    let want = (database_bytes.saturating_mul(2)).div_ceil(PLANNED_PARTS);
    want.div_ceil(MIB)
        .saturating_mul(MIB)
        .clamp(MIN_PART_SIZE.min(max_part), max_part)
}

/// The largest backup (stored, encrypted bytes) parts of `max_part` hold.
pub fn largest_backup(max_part: u64) -> u64 {
    max_part * MAX_PARTS as u64
}

/// Memory one backup's upload holds at most: the part being filled, the
/// `in_flight` parts being sent, and its stream buffers.
pub fn memory_per_backup(max_part: u64, in_flight: usize) -> u64 {
    max_part * (in_flight as u64 + 1) + STREAM_BUFFERS
}

/// A backup claimed for a tenant: `running` (its runner's lock and a work
/// slot held) or `queued` for a slot. Run it with [`Backups::run_claimed`].
#[derive(Debug)]
pub struct Claimed {
    pub backup: Backup,
    running: Option<(Lock, Slot)>,
}

impl Backups {
    /// Claim a backup of `tenant` in a work slot: `running` at once when a
    /// slot is free (or this work holds one already), else `queued`.
    pub async fn claim_backup(&self, tenant: Uuid, kind: BackupKind) -> Result<Claimed> {
        match self.slots().try_acquire() {
            Some(slot) => {
                let (backup, lock) = self.start_backup(tenant, kind, None).await?;
                Ok(Claimed {
                    backup,
                    running: Some((lock, slot)),
                })
            }
            None => {
                let process = self.slots().queue_lease().await?;
                let (backup, _) = self.insert_claim(tenant, kind, None, Some(process)).await?;
                tracing::info!(tenant_id = %tenant, backup_id = %backup.id, "backup queued: every work slot is taken");
                Ok(Claimed {
                    backup,
                    running: None,
                })
            }
        }
    }

    /// Run a claimed backup to its end, waiting for its slot first if it
    /// is queued.
    pub async fn run_claimed(
        &self,
        claimed: Claimed,
        progress: Option<Progress>,
    ) -> Result<Backup> {
        let (backup, lock, slot) = match claimed.running {
            Some((lock, slot)) => (claimed.backup, lock, slot),
            None => self.start_queued(claimed.backup).await?,
        };
        slot.scope(self.run_backup(backup, lock, progress)).await
    }

    /// Wait for a slot, then turn a queued backup `running` under its lock.
    /// On any failure the row is failed (it must not stay queued under this
    /// live process's lease, where no sweep would look).
    async fn start_queued(&self, queued: Backup) -> Result<(Backup, Lock, Slot)> {
        let reg = self.registry();
        let started = async {
            let slot = self
                .slots()
                .acquire()
                .await
                .map_err(|e| Error::Unavailable(e.to_string()))?;
            // The lock first: the row says `running` only while someone holds it.
            let lock = reg
                .try_lock_backup(queued.id)
                .await?
                .context("lock a queued backup")?;
            match reg.start_queued_backup(queued.id).await {
                Ok(Some(b)) => Ok((b, lock, slot)),
                Ok(None) => {
                    lock.release().await;
                    Err(Error::conflict(
                        "the queued backup was settled by a sweep while it waited",
                    ))
                }
                Err(e) => {
                    lock.release().await;
                    Err(e.into())
                }
            }
        }
        .await;
        if let Err(e) = &started {
            if let Err(f) = reg.fail_queued_backup(queued.id, &e.detail()).await {
                tracing::warn!(backup_id = %queued.id, "failed to record a queued backup that could not start: {f}");
            }
        }
        started
    }

    /// Claim a backup of `tenant`: a `running` row and the lock that says its
    /// runner is alive. The caller holds a work slot (see
    /// [`Self::claim_backup`]); run it with [`Self::run_backup`].
    pub async fn start_backup(
        &self,
        tenant: Uuid,
        kind: BackupKind,
        scheduled_for: Option<DateTime<Utc>>,
    ) -> Result<(Backup, Lock)> {
        let (b, lock) = self.insert_claim(tenant, kind, scheduled_for, None).await?;
        Ok((b, lock.context("lock a fresh backup id")?))
    }

    /// Check the tenant may be backed up and record the backup: `running`
    /// with its lock, or `queued` under the process lease `queued_by`.
    async fn insert_claim(
        &self,
        tenant: Uuid,
        kind: BackupKind,
        scheduled_for: Option<DateTime<Utc>>,
        queued_by: Option<Uuid>,
    ) -> Result<(Backup, Option<Lock>)> {
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
        // Lock before a running row exists, so the sweep never sees it
        // running unlocked. A queued row needs none: it names the lease of
        // the process that queued it.
        let lock = match queued_by {
            None => Some(
                reg.try_lock_backup(id)
                    .await?
                    .context("lock a fresh backup id")?,
            ),
            Some(_) => None,
        };
        let release = |lock: Option<Lock>| async move {
            if let Some(lock) = lock {
                lock.release().await;
            }
        };
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
            queued_by,
        };
        match reg.insert_backup(&new).await {
            Ok(b) => Ok((b, lock)),
            Err(e) if e.is_unique_violation("backups_one_running") => {
                release(lock).await;
                let running = reg.running_backup(tenant).await?;
                Err(Error::conflict(match running {
                    Some(b) => format!(
                        "a backup of this tenant is already {}: backup {}",
                        b.status, b.id
                    ),
                    None => "a backup of this tenant is already running".to_owned(),
                }))
            }
            Err(e) if e.is_unique_violation("backups_one_per_slot") => {
                release(lock).await;
                Err(Error::conflict("this scheduled slot was already taken"))
            }
            Err(e) => {
                release(lock).await;
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
        mut lock: Lock,
        progress: Option<Progress>,
    ) -> Result<Backup> {
        let storage = self.storage();
        let started = Instant::now();
        let reg = self.registry();
        // Its lock lost (the control database restarted), the backup stops:
        // a sweep may be marking it failed and aborting its upload meanwhile.
        let outcome = lock
            .hold(async {
                let t = reg
                    .tenant(backup.tenant_id)
                    .await?
                    .context("find the tenant")?;
                self.take_backup(storage, &backup, &t, progress).await
            })
            .await
            .unwrap_or_else(|lost| Err(anyhow::Error::from(lost)));
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
    /// retention) in the background; answers at once with the claimed
    /// backup, `running`, or `queued` while every work slot is taken.
    pub async fn start_manual(&self, tenant: Uuid, actor: &str) -> Result<Backup> {
        let claimed = self.claim_backup(tenant, BackupKind::Manual).await?;
        let backup = claimed.backup.clone();
        let audited = self
            .registry()
            .audit(
                actor,
                "backup.start",
                Some(tenant),
                serde_json::json!({"backup_id": backup.id, "status": backup.status}),
            )
            .await;
        if let Err(e) = audited {
            self.abandon_claim(claimed, "not started: its audit entry could not be written")
                .await;
            return Err(e.into());
        }
        let runner = self.clone();
        self.spawn_task(async move {
            if runner.run_claimed(claimed, None).await.is_ok() {
                if let Err(e) = runner.prune_backups(tenant).await {
                    tracing::warn!(tenant_id = %tenant, "failed to apply backup retention: {e}");
                }
            }
        });
        Ok(backup)
    }

    /// Claim and run a backup (waiting for a work slot if none is free),
    /// waiting for it.
    pub async fn backup_now(
        &self,
        tenant: Uuid,
        kind: BackupKind,
        progress: Option<Progress>,
    ) -> Result<Backup> {
        let claimed = self.claim_backup(tenant, kind).await?;
        self.run_claimed(claimed, progress).await
    }

    /// A claim that will not run after all: recorded `failed` with `why`.
    async fn abandon_claim(&self, claimed: Claimed, why: &str) {
        let reg = self.registry();
        let recorded = match claimed.running {
            Some((lock, _slot)) => {
                let r = reg.fail_backup(claimed.backup.id, why).await;
                lock.release().await;
                r
            }
            None => reg
                .fail_queued_backup(claimed.backup.id, why)
                .await
                .map(|_| ()),
        };
        if let Err(e) = recorded {
            tracing::warn!(backup_id = %claimed.backup.id, "failed to record an abandoned backup (the sweep will): {e}");
        }
    }

    /// Queued backups whose process died are failed (nothing was uploaded),
    /// and queued operations of the kinds the backup sweep settles are
    /// handed to it (see [`crate::ops::Operations::release_abandoned_queued`]).
    /// Returns the backups failed.
    pub(super) async fn sweep_queued(&self) -> anyhow::Result<u32> {
        let reg = self.registry();
        self.inner
            .ops
            .release_abandoned_queued(&super::SETTLED_BY_SWEEP)
            .await?;
        let queued = reg.queued_backups().await?;
        let dead = self
            .slots()
            .dead_leases(queued.iter().map(|(_, lease)| *lease).collect())
            .await?;
        let mut failed = 0;
        for (id, lease) in queued {
            if dead.get(&lease) == Some(&true)
                && reg
                    .fail_queued_backup(
                        id,
                        "interrupted while queued: the silo process that queued it stopped before a slot was free; nothing was uploaded",
                    )
                    .await?
            {
                tracing::warn!(backup_id = %id, "queued backup of a stopped process: marked failed");
                failed += 1;
            }
        }
        Ok(failed)
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
        let max_part = storage.settings.max_part_size;
        let part_size = part_size_for(db_size.max(0) as u64, max_part);
        if db_size.max(0) as u64 > largest_backup(max_part) {
            tracing::warn!(
                tenant_id = %t.id,
                database_bytes = db_size,
                "the database is larger than the largest backup parts of {} MiB can hold ({} GiB); unless its dump compresses below that, the backup fails (raise SILO_BACKUP_MAX_PART_MIB)",
                max_part >> 20,
                largest_backup(max_part) >> 30
            );
        }

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
            "upload the dump: it outgrew the largest backup that fits S3's {MAX_PARTS} parts of {} MiB ({} GiB); raise SILO_BACKUP_MAX_PART_MIB (at most 64)",
            self.part_size >> 20,
            largest_backup(self.part_size as u64) >> 30
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
    fn part_size_keeps_databases_under_the_part_limit_and_never_over_the_cap() {
        const GIB: u64 = 1024 * MIB;
        let cap = 16 * MIB;
        assert_eq!(part_size_for(0, cap), MIN_PART_SIZE);
        assert_eq!(part_size_for(300 * MIB, cap), MIN_PART_SIZE);
        // A cap under silo's usual minimum is the part size.
        assert_eq!(part_size_for(0, 5 * MIB), 5 * MIB);
        for size in [10 * GIB, 30 * GIB] {
            let part = part_size_for(size, cap);
            assert_eq!(part % MIB, 0, "whole MiB parts");
            // Even a dump twice the database size stays within the limit.
            assert!((2 * size).div_ceil(part) <= MAX_PARTS as u64, "{size}");
        }
        // Whatever the size, no part is over the cap: memory stays bounded.
        for size in [100 * GIB, 2048 * GIB, u64::MAX] {
            assert_eq!(part_size_for(size, cap), cap, "{size}");
        }
        assert_eq!(largest_backup(cap), 10_000 * cap);
        assert_eq!(largest_backup(16 * MIB) >> 30, 156);
        assert_eq!(memory_per_backup(cap, 3), 4 * cap + STREAM_BUFFERS);
    }
}
