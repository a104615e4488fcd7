//! Per-tenant backups in S3-compatible storage, restores, verification,
//! retention and archival.
//!
//! A backup is `pg_dump -Fc` of the tenant database at an exported snapshot,
//! streamed (never held whole in memory or on disk) through client-side
//! encryption with the tenant's data key ([`crypt`]) and SHA-256 into a
//! multipart upload of equal-sized parts (at most `SILO_BACKUP_MAX_PART_MIB`
//! each, so a backup's memory is bounded whatever the database's size), 2–4
//! in flight. pg_dump's exit
//! status is checked before the upload is completed; the manifest is written
//! last, and only then is the backup row `succeeded` (invariant 5). Any
//! failure aborts the upload and records the backup `failed`; a backup whose
//! runner died (its advisory lock is free) is cleaned up the same way by the
//! sweep at start-up and in every reconcile pass.
//!
//! A restore streams the object back through SHA-256 and decryption into
//! `pg_restore` into a new database, checks the checksum, then swaps the
//! database in under the tenant's lock; a failure leaves the tenant on its
//! current database. Verification restores into a scratch database and
//! compares per-table row counts with those recorded at the dump's snapshot.
//!
//! Backups, verifications, restores and archivals each run in one of the
//! process's work slots (`SILO_BACKUP_CONCURRENCY`, see [`crate::ops::slots`]);
//! with none free a backup is recorded `queued` and starts when one is.

mod archive;
pub mod crypt;
mod restore;
pub mod retention;
mod run;
pub mod schedule;
mod store;

pub use archive::{sweep_scratch_databases, BackupSweep, SETTLED_BY_SWEEP};
pub use restore::{RestoreTarget, VerifyReport};
pub use retention::Retention;
pub use run::{
    largest_backup, memory_per_backup, part_size_for, Claimed, Manifest, MAX_PARTS, MIN_PART_SIZE,
    STREAM_BUFFERS,
};
pub use store::{Store, StoreConfig};

use std::sync::Arc;

use uuid::Uuid;

use crate::config::StorageArgs;
use crate::crypto::Keyring;
use crate::domain::Schedule;
use crate::ops::{Error, Operations, Result, Slots};
use crate::registry::{Backup, Registry, TenantRecord};
use crate::servers::{PgTools, ServerAdmin, ServerPools, TenantSchema};

/// Prefix of every object silo writes.
pub const OBJECT_PREFIX: &str = "silo/tenants/";

/// Bytes read so far, for progress bars.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// What a backup was taken for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupKind {
    Manual,
    Scheduled,
    Archive,
    Final,
}

impl BackupKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Manual => "manual",
            Self::Scheduled => "scheduled",
            Self::Archive => "archive",
            Self::Final => "final",
        }
    }
}

/// How backups are taken and kept.
#[derive(Debug, Clone)]
pub struct BackupSettings {
    /// Default schedule of tenants without their own.
    pub schedule: Schedule,
    /// Backups run at once by this process.
    pub concurrency: usize,
    /// Parts of one backup in flight.
    pub parts_in_flight: usize,
    /// Largest part, bytes (`SILO_BACKUP_MAX_PART_MIB`).
    pub max_part_size: u64,
    pub retention: Retention,
    /// Share of scheduled backups verified right after.
    pub verify_sample: f64,
    /// Storage class of archive backups.
    pub archive_storage_class: Option<String>,
    /// Archive tenants idle this long (scheduler); `None`: only on demand.
    pub archive_after: Option<chrono::Duration>,
}

impl BackupSettings {
    pub fn from_args(args: &StorageArgs) -> Self {
        Self {
            schedule: args.backup_schedule.clone(),
            concurrency: args.backup_concurrency.max(1) as usize,
            parts_in_flight: args.backup_parts_in_flight.clamp(2, 4) as usize,
            max_part_size: u64::from(args.backup_max_part_mib.clamp(5, 64)) << 20,
            retention: Retention {
                keep_last: args.backup_keep_last,
                keep_daily: args.backup_keep_daily,
                keep_weekly: args.backup_keep_weekly,
                keep_monthly: args.backup_keep_monthly,
            },
            verify_sample: args.backup_verify_sample.clamp(0.0, 1.0),
            archive_storage_class: args.s3_archive_storage_class.clone(),
            archive_after: args
                .archive_after_days
                .map(|d| chrono::Duration::days(i64::from(d))),
        }
    }
}

/// Backup storage: the bucket, the PostgreSQL tools and the policy.
#[derive(Debug)]
pub struct Storage {
    pub store: Store,
    pub tools: PgTools,
    pub settings: BackupSettings,
}

impl Storage {
    /// From configuration; `None` when `SILO_S3_BUCKET` is unset.
    pub async fn from_args(args: &StorageArgs) -> anyhow::Result<Option<Self>> {
        let Some(config) = StoreConfig::from_args(args) else {
            return Ok(None);
        };
        Self::connect(&config, args).await.map(Some)
    }

    pub async fn connect(config: &StoreConfig, args: &StorageArgs) -> anyhow::Result<Self> {
        Ok(Self {
            store: Store::connect(config).await?,
            tools: PgTools::find(args.pg_bin_dir.as_deref())?,
            settings: BackupSettings::from_args(args),
        })
    }
}

/// Backups of tenants: taken, restored, verified, kept and archived.
/// Exists only when backup storage is configured. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Backups {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    keyring: Keyring,
    servers: ServerPools,
    schema: TenantSchema,
    ops: Operations,
    storage: Storage,
}

impl Backups {
    pub fn new(
        registry: Registry,
        keyring: Keyring,
        servers: ServerPools,
        schema: TenantSchema,
        ops: Operations,
        storage: Storage,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                registry,
                keyring,
                servers,
                schema,
                ops,
                storage,
            }),
        }
    }

    fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    fn keyring(&self) -> &Keyring {
        &self.inner.keyring
    }

    /// The bucket, the PostgreSQL tools and the policy.
    pub fn storage(&self) -> &Storage {
        &self.inner.storage
    }

    pub fn settings(&self) -> &BackupSettings {
        &self.inner.storage.settings
    }

    /// Admin access to the server a tenant lives on.
    async fn admin_for(&self, t: &TenantRecord) -> anyhow::Result<ServerAdmin> {
        self.inner
            .servers
            .admin_of(&self.inner.registry, t.server_id)
            .await
    }

    /// A backup and the tenant it belongs to.
    pub async fn backup_and_tenant(&self, id: Uuid) -> Result<(Backup, TenantRecord)> {
        let reg = self.registry();
        let b = reg.backup(id).await?.ok_or(Error::NotFound("backup"))?;
        let t = reg
            .tenant(b.tenant_id)
            .await?
            .ok_or(Error::NotFound("tenant"))?;
        Ok((b, t))
    }

    /// A backup that can be read back: `succeeded`, else 404/409 saying why.
    pub async fn succeeded_backup(&self, id: Uuid, action: &str) -> Result<Backup> {
        let b = self
            .registry()
            .backup(id)
            .await?
            .ok_or(Error::NotFound("backup"))?;
        if b.status != "succeeded" {
            return Err(Error::conflict(format!(
                "backup is {}: only a succeeded backup can be {action}",
                b.status
            )));
        }
        Ok(b)
    }

    /// Refuse when the tenant's backup key was erased.
    async fn refuse_if_erased(&self, tenant: Uuid) -> Result<()> {
        if self.registry().backup_key_erased(tenant).await? {
            return Err(key_erased());
        }
        Ok(())
    }

    /// The tools, for another feature (a move copies a schema with them).
    pub fn tools(&self) -> &PgTools {
        &self.inner.storage.tools
    }

    /// The process's work slots, shared with the other backup-like work.
    fn slots(&self) -> &Slots {
        self.inner.ops.slots()
    }

    /// Run `work` as a background task of this process (joined on shutdown).
    fn spawn_task(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        self.inner.ops.tasks().spawn(work);
    }
}

/// The tenant's backup key was forgotten (crypto-shredding): nothing can read its backups.
fn key_erased() -> Error {
    Error::conflict("the tenant's backup key was erased: its backups can no longer be read")
}

/// Object keys of a backup: the encrypted dump and its manifest.
pub fn object_keys(tenant: Uuid, backup: Uuid) -> (String, String) {
    let dir = format!("{OBJECT_PREFIX}{}/{}", tenant.simple(), backup.simple());
    (format!("{dir}.dump"), format!("{dir}.manifest.json"))
}
