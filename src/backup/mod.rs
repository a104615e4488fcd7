//! Per-tenant backups in S3-compatible storage, restores, verification,
//! retention and archival.
//!
//! A backup is `pg_dump -Fc` of the tenant database at an exported snapshot,
//! streamed (never held whole in memory or on disk) through client-side
//! encryption with the tenant's data key ([`crypt`]) and SHA-256 into a
//! multipart upload of equal-sized parts, 2–4 in flight. pg_dump's exit
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

pub mod crypt;
mod lifecycle;
mod pgtools;
mod restore;
pub mod retention;
mod run;
pub mod schedule;
mod store;

pub use lifecycle::{BackupSweep, OPERATION_KINDS};
pub use pgtools::{capture_stderr, error_lines, LibpqEnv, PgTools};
pub use restore::{RestoreTarget, VerifyReport};
pub use retention::Retention;
pub use run::{part_size_for, Manifest, MAX_PARTS, MIN_PART_SIZE};
pub use store::{Store, StoreConfig};

use std::sync::Arc;

use uuid::Uuid;

use crate::config::StorageArgs;

/// Prefix of every object silo writes.
pub const OBJECT_PREFIX: &str = "silo/tenants/";

/// Names of the databases a restore or verification builds before the swap:
/// `silo_x_<32 hex>`, the hex being the id of the advisory lock its runner
/// holds; the sweep drops those whose lock is free.
pub const SCRATCH_DB_PREFIX: &str = "silo_x_";

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
    /// Default cron (with seconds) for tenants without their own.
    pub schedule: String,
    /// Backups run at once by this process.
    pub concurrency: usize,
    /// Parts of one backup in flight.
    pub parts_in_flight: usize,
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
        croner::Cron::new(&args.backup_schedule)
            .with_seconds_optional()
            .parse()
            .map_err(|e| anyhow::anyhow!("SILO_BACKUP_SCHEDULE is not a cron expression: {e}"))?;
        Ok(Self {
            store: Store::connect(config).await?,
            tools: PgTools::find(args.pg_bin_dir.as_deref())?,
            settings: BackupSettings::from_args(args),
        })
    }
}

/// Why a backup operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("backup storage is not configured (set SILO_S3_BUCKET)")]
    NotConfigured,
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("a backup of this tenant is already running")]
    Running(Uuid),
    #[error("{0}")]
    Conflict(String),
    #[error("another operation on this tenant is running")]
    Busy(Uuid),
    #[error("the tenant's backup key was erased: its backups can no longer be read")]
    KeyErased,
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl BackupError {
    /// The message to record (an internal error with its whole cause chain).
    pub fn detail(&self) -> String {
        match self {
            Self::Internal(e) => format!("{e:#}"),
            other => other.to_string(),
        }
    }
}

impl From<sqlx::Error> for BackupError {
    fn from(e: sqlx::Error) -> Self {
        Self::Internal(anyhow::Error::new(e).context("query the control database"))
    }
}

impl From<crate::provision::ProvisionError> for BackupError {
    fn from(e: crate::provision::ProvisionError) -> Self {
        use crate::provision::ProvisionError as P;
        match e {
            P::NotFound => Self::NotFound("tenant"),
            P::Internal(e) => Self::Internal(e),
            other => Self::Conflict(other.to_string()),
        }
    }
}

/// Object keys of a backup: the encrypted dump and its manifest.
pub fn object_keys(tenant: Uuid, backup: Uuid) -> (String, String) {
    let dir = format!("{OBJECT_PREFIX}{}/{}", tenant.simple(), backup.simple());
    (format!("{dir}.dump"), format!("{dir}.manifest.json"))
}

/// Name of the scratch database held by lock `id`.
pub fn scratch_db(id: Uuid) -> String {
    format!("{SCRATCH_DB_PREFIX}{}", id.simple())
}
