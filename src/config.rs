//! One typed configuration for every command: clap flags, each also read from
//! its `SILO_*` environment variable (the README lists them). Secrets are
//! the exception: they are read from the environment, or from the file a
//! `<NAME>_FILE` variable names, never from a command line (where `ps` and
//! shell histories show them) and never shown by `--help`; they are wrapped
//! in [`Secret`] so `Debug` never prints them.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::crypto::{KeyError, Keyring};
use crate::domain::{AdminRole, KeyName, Plan, Schedule, ServerName, Slug, TenantName};

/// Default address for `silo serve`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default address of the PostgreSQL-protocol front door.
pub const DEFAULT_PG_LISTEN: &str = "127.0.0.1:6432";
/// `SILO_PG_SPIN_MICROS`'s default.
pub const DEFAULT_PG_SPIN_MICROS: u64 = 50;
/// Prepared statements the front door keeps on one tenant server connection
/// (PgBouncer's `max_prepared_statements` defaults to the same).
pub const DEFAULT_PG_MAX_SERVER_STATEMENTS: u32 = 200;
/// Front-door connections from one address logging in at once: a quarter
/// of the room for logins (1,024), so no one address can hold it all.
pub const DEFAULT_PG_MAX_LOGINS_PER_ADDRESS: u32 = 256;
/// Default cron schedule for tenant backups (sec min hour day month weekday).
pub const DEFAULT_BACKUP_SCHEDULE: &str = crate::domain::DEFAULT_SCHEDULE;
/// Spare databases kept ready per server: a create takes one instead of cloning.
pub const DEFAULT_WARM_POOL_SIZE: u32 = 4;
/// Seconds between reconcile passes (also run once at start-up).
pub const DEFAULT_RECONCILE_INTERVAL_SECS: u64 = 60;
/// Default longest an admin API request may take.
pub const DEFAULT_ADMIN_REQUEST_TIMEOUT_SECS: u64 = 30;
/// Default longest an app API request may take: a connection (2 s at
/// most) and a statement (10 s at most, `statement_timeout`), with room.
pub const DEFAULT_APP_REQUEST_TIMEOUT_SECS: u64 = 15;
/// Default app API requests in flight per process.
pub const DEFAULT_APP_MAX_IN_FLIGHT: usize = 512;
/// Default admin API requests in flight per process.
pub const DEFAULT_ADMIN_MAX_IN_FLIGHT: usize = 64;
/// Default failed admin authentications one client address may make per
/// minute: plenty for a person mistyping, nothing for a guesser (the
/// bootstrap token has at least 24 random characters, admin keys 256 bits).
pub const DEFAULT_ADMIN_AUTH_FAILURES: u32 = 20;
/// Default largest app API request body: a patient's 10,000-character
/// notes in UTF-8, with room.
pub const DEFAULT_APP_MAX_BODY_BYTES: usize = 64 * 1024;
/// Default app API requests per second per tenant (per process).
pub const DEFAULT_APP_RATE_LIMIT: u32 = 2000;
/// Default requests a tenant may send at once above its rate.
pub const DEFAULT_APP_RATE_BURST: u32 = 2000;
/// Default app API requests per minute per tenant that name a tenant other
/// than the token's (or carry a revoked token): a client never needs them.
pub const DEFAULT_APP_MISDIRECTED_LIMIT: u32 = 60;
/// Default `temp_file_limit` of tenant roles, in MiB (10 GiB a session).
pub const DEFAULT_TENANT_TEMP_FILE_LIMIT_MB: u64 = 10_240;
/// Default longest a `429` to a tenant over its rate is held before it is
/// sent, in milliseconds.
pub const DEFAULT_APP_REFUSAL_HOLD_MS: u64 = 1000;
/// Seconds between tenant server health checks; a server failing checks for
/// three intervals becomes `unhealthy`.
pub const DEFAULT_HEALTH_INTERVAL_SECS: u64 = 10;
/// Seconds between usage collector passes.
pub const DEFAULT_USAGE_INTERVAL_SECS: u64 = 60;
/// Days of daily usage rollups kept.
pub const DEFAULT_USAGE_KEEP_DAYS: u32 = 90;
/// Tenants with usage series of their own on `/metrics`.
pub const DEFAULT_USAGE_TOP_N: u32 = 20;
/// Shortest admin token `serve` accepts.
pub const MIN_ADMIN_TOKEN_LEN: usize = 24;
/// Connections silo may open to the default tenant server when first registered.
pub const DEFAULT_SERVER_MAX_CONNECTIONS: i32 = 100;
/// Tenant databases the default server may hold when first registered.
pub const DEFAULT_SERVER_MAX_TENANTS: i32 = 2000;

/// A configuration value that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Parser)]
#[command(
    name = "silo",
    version,
    about = "Database-per-tenant control plane for PostgreSQL",
    after_help = SECRETS_HELP
)]
pub struct Cli {
    /// Log output format.
    #[arg(long, env = "SILO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start-up and matched once: the size of `Serve`'s settings
// (grown by the front door's) costs nothing worth a `Box`.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Everything on one machine with no setup: private PostgreSQL, demo clinics.
    Dev(DevArgs),
    /// The production server: admin API, app API, metrics, background jobs.
    Serve(ServeArgs),
    /// Apply migrations.
    #[command(subcommand)]
    Migrate(MigrateCommand),
    /// Tenant administration from a shell.
    #[command(subcommand)]
    Tenants(TenantsCommand),
    /// Plans: what a tenant of each plan may use.
    #[command(subcommand)]
    Plans(PlansCommand),
    /// Backups from a shell, with progress.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// One reconcile pass now (what every `serve` runs each interval), and
    /// with `--adopt`, register again tenant databases the registry lost.
    Reconcile {
        #[command(flatten)]
        control: ControlArgs,
        /// Register again the tenant databases this control plane made that
        /// the registry has no row for (a control DB restored to an earlier point).
        #[arg(long)]
        adopt: bool,
    },
    /// Master-key rotation: re-seal stored secrets under SILO_MASTER_KEY.
    #[command(subcommand)]
    MasterKey(MasterKeyCommand),
    /// Named admin API keys; needs only SILO_DATABASE_URL (to bootstrap).
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Subcommand)]
pub enum PlansCommand {
    /// Every plan with its limits (JSON lines).
    List {
        #[command(flatten)]
        control: ControlArgs,
    },
    /// One plan (JSON).
    Show {
        #[command(flatten)]
        control: ControlArgs,
        name: Plan,
    },
    /// Add a plan.
    Create {
        #[command(flatten)]
        control: ControlArgs,
        name: Plan,
        #[command(flatten)]
        limits: PlanLimitArgs,
    },
    /// Change a plan; applies to every tenant of it at once.
    Set {
        #[command(flatten)]
        control: ControlArgs,
        name: Plan,
        #[command(flatten)]
        limits: PlanLimitArgs,
        /// Clear a limit (back to silo's setting, or no limit): a field
        /// name such as `storage_quota_bytes`; repeatable.
        #[arg(long = "clear", value_name = "FIELD")]
        clear: Vec<String>,
    },
    /// Delete a plan no tenant is on.
    Delete {
        #[command(flatten)]
        control: ControlArgs,
        name: Plan,
    },
}

/// A plan's limits on the command line (see `PATCH /admin/v1/plans/{plan}`).
#[derive(Debug, clap::Args)]
pub struct PlanLimitArgs {
    #[arg(long)]
    pub connection_limit: Option<i32>,
    #[arg(long)]
    pub storage_quota_bytes: Option<i64>,
    #[arg(long)]
    pub requests_per_second: Option<i32>,
    #[arg(long)]
    pub wire_clients: Option<i32>,
    #[arg(long)]
    pub max_staff: Option<i32>,
    #[arg(long)]
    pub max_patients: Option<i32>,
    #[arg(long)]
    pub trial_days: Option<i32>,
    /// The plan's backup schedule (`--backup-schedule` is silo's own).
    #[arg(long = "plan-backup-schedule", id = "plan_backup_schedule")]
    pub backup_schedule: Option<String>,
    #[arg(long = "plan-keep-last", id = "plan_keep_last")]
    pub backup_keep_last: Option<i32>,
    #[arg(long = "plan-keep-daily", id = "plan_keep_daily")]
    pub backup_keep_daily: Option<i32>,
    #[arg(long = "plan-keep-weekly", id = "plan_keep_weekly")]
    pub backup_keep_weekly: Option<i32>,
    #[arg(long = "plan-keep-monthly", id = "plan_keep_monthly")]
    pub backup_keep_monthly: Option<i32>,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a key and print it with its token, which is shown only now.
    Create {
        /// 1 to 63 characters of a-z, 0-9, '_' and '-', starting with a
        /// letter; the audit log names the key's actions by it.
        name: KeyName,
        /// viewer reads; operator also runs lifecycle, backups, moves and
        /// migrations (no deletes, keys or overwriting restores); admin does all.
        #[arg(long, value_enum)]
        role: AdminRole,
        /// Days until the key expires and is refused as a revoked one is
        /// (1–3650); without it the key does not expire.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=3650))]
        expires_in_days: Option<u32>,
    },
    /// Keys not revoked: name, role, created, created by, last used,
    /// expires (`-` for never; expired ones say `expired`).
    List,
    /// Revoke a key: refused at once on every replica; its name is free again.
    Revoke { name: KeyName },
    /// Change a live key's expiry: in so many days from now, or never. An
    /// expired key stays expired (make a new one).
    #[command(group = clap::ArgGroup::new("expiry").required(true))]
    Expire {
        name: KeyName,
        /// Days from now until the key expires (1–3650).
        #[arg(long, group = "expiry", value_parser = clap::value_parser!(u32).range(1..=3650))]
        in_days: Option<u32>,
        /// The key does not expire.
        #[arg(long, group = "expiry")]
        never: bool,
    },
}

/// Rows `silo master-key rotate` reads and re-seals per batch.
pub const DEFAULT_RESEAL_BATCH: u32 = 100;

#[derive(Debug, Subcommand)]
pub enum MasterKeyCommand {
    /// Re-seal every tenant credential, server admin URL, spare credential
    /// and backup key not yet under SILO_MASTER_KEY, opening it with
    /// SILO_MASTER_KEY_PREVIOUS. Resumable, and safe beside running replicas.
    Rotate {
        /// Change nothing: count stored secrets per master key id, and exit 1
        /// if any is not under SILO_MASTER_KEY.
        #[arg(long)]
        check: bool,
        /// Rows read and re-sealed per batch.
        #[arg(long, default_value_t = DEFAULT_RESEAL_BATCH, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        batch_size: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Back up one tenant, or every active tenant.
    Run {
        #[command(flatten)]
        control: ControlArgs,
        /// Tenant (slug or id).
        #[arg(long, required_unless_present = "all", conflicts_with = "all")]
        tenant: Option<String>,
        /// Every active tenant, `SILO_BACKUP_CONCURRENCY` at a time.
        #[arg(long)]
        all: bool,
    },
    /// List backups, newest first.
    List {
        #[command(flatten)]
        control: ControlArgs,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Restore a backup into a scratch database and compare row counts.
    Verify {
        #[command(flatten)]
        control: ControlArgs,
        id: uuid::Uuid,
    },
    /// Restore a backup into its tenant, or into another slug.
    Restore {
        #[command(flatten)]
        control: ControlArgs,
        id: uuid::Uuid,
        /// Restore into this tenant (created if it does not exist).
        #[arg(long)]
        into: Option<Slug>,
        /// Replace the data of a tenant that has some (refused without it);
        /// its current database is kept aside for SILO_KEEP_DAYS.
        #[arg(long)]
        overwrite: bool,
    },
}

/// Secrets, read from the environment (or `<NAME>_FILE`) only.
pub const SECRETS_HELP: &str = "Secrets are read from the environment only (or from the file a <NAME>_FILE variable names), never from flags:
  SILO_DATABASE_URL       control database URL (postgres://...)
  SILO_MASTER_KEY         base64 of 32 random bytes: encrypts tenant credentials, signs tenant tokens
  SILO_MASTER_KEY_PREVIOUS  the master key being rotated away from: only opens and verifies (optional)
  SILO_TENANT_SERVER_URL  admin URL of the default tenant server (default: the control database's server)
  SILO_ADMIN_TOKEN        bootstrap admin bearer token (serve)
  SILO_METRICS_TOKEN      bearer token that may read /metrics (serve; optional)";

/// Where the control database is; its secrets come from the environment
/// ([`SECRETS_HELP`]).
#[derive(Debug, Clone, Args)]
pub struct ControlArgs {
    /// Directory of tenant migrations (`<version>_<name>.sql`), replacing the
    /// embedded reference clinic schema with your own.
    #[arg(long, env = "SILO_TENANT_MIGRATIONS")]
    pub tenant_migrations: Option<PathBuf>,

    /// Days a quarantined orphan database or role, or a database a restore
    /// replaced, is kept (renamed `silo_kept_*`) before the reconciler drops it.
    #[arg(long, env = "SILO_KEEP_DAYS", default_value_t = crate::domain::KeepFor::DEFAULT_DAYS, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub keep_days: u32,

    /// Most temporary-file space one session of a tenant role (or its
    /// reader) may use, in MiB (PostgreSQL's `temp_file_limit`, set on the
    /// role); `0` sets none. Needs a superuser admin login on the server.
    #[arg(long, env = "SILO_TENANT_TEMP_FILE_LIMIT_MB", default_value_t = DEFAULT_TENANT_TEMP_FILE_LIMIT_MB, value_parser = clap::value_parser!(u64).range(0..=2_097_151))]
    pub tenant_temp_file_limit_mb: u64,

    #[command(flatten)]
    pub storage: StorageArgs,
}

/// Default parts uploaded at once per backup; memory ≈ part size × (this + 1).
pub const DEFAULT_PARTS_IN_FLIGHT: usize = 3;
/// Default number of tenant backups (and verifications, restores,
/// archivals, moves) running at once per silo process.
pub const DEFAULT_BACKUP_CONCURRENCY: u32 = 4;
/// Default largest upload part, MiB: memory per backup ≈ this × (parts in
/// flight + 1), largest backup 10,000 × this.
pub const DEFAULT_BACKUP_MAX_PART_MIB: u32 = 16;

/// Whether to send S3 request checksums the SDK adds by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum S3Checksums {
    /// CRC32C on every part (the store verifies each part as it arrives).
    #[default]
    WhenSupported,
    /// Only where an operation requires one: for S3-compatible stores that
    /// reject the SDK's default checksum headers.
    WhenRequired,
}

/// Backup destination and policy. Storage is off unless `SILO_S3_BUCKET` is set.
#[derive(Debug, Clone, Args, Default)]
pub struct StorageArgs {
    /// Bucket for tenant backups; unset disables backups.
    #[arg(long, env = "SILO_S3_BUCKET")]
    pub s3_bucket: Option<String>,

    /// S3-compatible endpoint URL (MinIO, R2, Garage, ...); default: AWS.
    #[arg(long, env = "SILO_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,

    /// Region of the bucket.
    #[arg(long, env = "SILO_S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,

    /// Path-style addressing (`endpoint/bucket/key`), needed by most S3-compatible stores.
    #[arg(long, env = "SILO_S3_FORCE_PATH_STYLE", default_value_t = false, action = clap::ArgAction::Set)]
    pub s3_force_path_style: bool,

    /// Request checksums: `when-supported` (CRC32C per part) or `when-required`.
    #[arg(long, env = "SILO_S3_CHECKSUMS", value_enum, default_value_t = S3Checksums::WhenSupported)]
    pub s3_checksums: S3Checksums,

    /// Storage class of archive backups (e.g. `GLACIER_IR`, `STANDARD_IA`).
    #[arg(long, env = "SILO_S3_ARCHIVE_STORAGE_CLASS")]
    pub s3_archive_storage_class: Option<String>,

    /// Default cron for tenant backups (5 fields, or 6 with seconds first;
    /// UTC; at least weekly); a tenant's `backup_schedule` overrides it.
    #[arg(long, env = "SILO_BACKUP_SCHEDULE", default_value = DEFAULT_BACKUP_SCHEDULE)]
    pub backup_schedule: Schedule,

    /// Backups, verifications, restores, archivals and moves run at once by
    /// one silo process (however started); more wait, `queued`.
    #[arg(long, env = "SILO_BACKUP_CONCURRENCY", default_value_t = DEFAULT_BACKUP_CONCURRENCY, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub backup_concurrency: u32,

    /// Parts of one backup uploaded at once (2–4).
    #[arg(long, env = "SILO_BACKUP_PARTS_IN_FLIGHT", default_value_t = DEFAULT_PARTS_IN_FLIGHT as u32, value_parser = clap::value_parser!(u32).range(2..=4))]
    pub backup_parts_in_flight: u32,

    /// Largest upload part in MiB (5–64): one backup holds at most this ×
    /// (parts in flight + 1) in memory, and stores at most 10,000 × this.
    #[arg(long, env = "SILO_BACKUP_MAX_PART_MIB", default_value_t = DEFAULT_BACKUP_MAX_PART_MIB, value_parser = clap::value_parser!(u32).range(5..=64))]
    pub backup_max_part_mib: u32,

    /// Retention: newest backups always kept.
    #[arg(long, env = "SILO_BACKUP_KEEP_LAST", default_value_t = 7)]
    pub backup_keep_last: u32,
    /// Retention: beyond those, the newest backup of each of this many days.
    #[arg(long, env = "SILO_BACKUP_KEEP_DAILY", default_value_t = 7)]
    pub backup_keep_daily: u32,
    /// Retention: and of each of this many ISO weeks.
    #[arg(long, env = "SILO_BACKUP_KEEP_WEEKLY", default_value_t = 4)]
    pub backup_keep_weekly: u32,
    /// Retention: and of each of this many months.
    #[arg(long, env = "SILO_BACKUP_KEEP_MONTHLY", default_value_t = 6)]
    pub backup_keep_monthly: u32,

    /// Share of scheduled backups verified by a scratch restore right after (0–1).
    #[arg(long, env = "SILO_BACKUP_VERIFY_SAMPLE", default_value_t = 0.05)]
    pub backup_verify_sample: f64,

    /// Archive tenants with no app traffic for this many days (unset: never automatically).
    #[arg(long, env = "SILO_ARCHIVE_AFTER_DAYS", value_parser = clap::value_parser!(u32).range(1..))]
    pub archive_after_days: Option<u32>,

    /// Folder of `pg_dump`/`pg_restore` (default: PATH, `pg_config --bindir`,
    /// then the newest `/usr/lib/postgresql/*/bin`).
    #[arg(long, env = "SILO_PG_BIN_DIR")]
    pub pg_bin_dir: Option<PathBuf>,
}

/// A listen address, or none (an empty value turns a listener off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

fn parse_optional_addr(s: &str) -> Result<OptionalAddr, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(OptionalAddr(None));
    }
    s.parse()
        .map(|a| OptionalAddr(Some(a)))
        .map_err(|_| format!("`{s}` is not an address like 127.0.0.1:6432 (empty turns it off)"))
}

/// Networks: addresses (each a network of one) and CIDR blocks.
#[derive(Debug, Clone, Default)]
pub struct Networks(pub Vec<ipnet::IpNet>);

/// Comma-separated addresses and CIDR blocks; empty entries are skipped.
fn parse_networks(s: &str) -> Result<Networks, String> {
    s.split(',')
        .map(str::trim)
        .filter(|net| !net.is_empty())
        .map(|net| {
            net.parse::<ipnet::IpNet>()
                .or_else(|_| net.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| format!("`{net}` is not an address or a CIDR block like 10.0.0.0/8"))
        })
        .collect::<Result<_, _>>()
        .map(Networks)
}

/// Settings for the long-running server (`serve`, and `dev` underneath).
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Address to serve on.
    #[arg(long, env = "SILO_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Spare tenant databases kept ready per server (0 disables the warm pool).
    #[arg(long, env = "SILO_WARM_POOL_SIZE", default_value_t = DEFAULT_WARM_POOL_SIZE)]
    pub warm_pool_size: u32,

    /// Seconds between reconcile passes.
    #[arg(long, env = "SILO_RECONCILE_INTERVAL", default_value_t = DEFAULT_RECONCILE_INTERVAL_SECS)]
    pub reconcile_interval: u64,

    /// How many silo replicas share the tenant servers. Each process takes
    /// `max_connections / replicas` of every server's connection budget, so
    /// the replicas together never exceed it.
    #[arg(long, env = "SILO_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub replicas: u32,

    /// App API: a tenant may be named by the first host label under this domain
    /// (`acme.clinics.example.com` → `acme`), as well as by `X-Tenant-ID`.
    #[arg(long, env = "SILO_APP_DOMAIN")]
    pub app_domain: Option<String>,

    /// Seconds between scheduler ticks: due backups, retention, backup metrics.
    #[arg(long, env = "SILO_SCHEDULER_TICK", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    pub scheduler_tick: u64,

    /// Serve `/metrics` without authentication on this address, of its own
    /// (meant for a private port a Prometheus scraper reaches); on the main
    /// listener `/metrics` needs `SILO_METRICS_TOKEN` or the admin token.
    #[arg(long, env = "SILO_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Seconds between health checks of the tenant servers; a server failing
    /// them for three intervals is marked `unhealthy` and gets no new tenants.
    #[arg(long, env = "SILO_HEALTH_INTERVAL", default_value_t = DEFAULT_HEALTH_INTERVAL_SECS, value_parser = clap::value_parser!(u64).range(1..))]
    pub health_interval: u64,

    /// Seconds between usage collector passes (one replica runs each):
    /// database sizes, counters, storage quotas.
    #[arg(long, env = "SILO_USAGE_INTERVAL", default_value_t = DEFAULT_USAGE_INTERVAL_SECS, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub usage_interval: u64,

    /// Days of daily usage rollups kept.
    #[arg(long, env = "SILO_USAGE_KEEP_DAYS", default_value_t = DEFAULT_USAGE_KEEP_DAYS, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub usage_keep_days: u32,

    /// Tenants with usage series of their own on `/metrics` (the largest,
    /// and the busiest today); the rest count in the fleet totals only.
    #[arg(long, env = "SILO_USAGE_TOP_N", default_value_t = DEFAULT_USAGE_TOP_N, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub usage_top_n: u32,

    /// Seconds an admin API request may take before it is answered 503
    /// (its work stops; whatever it left half-done, the reconciler finishes
    /// or undoes). Long work (backups, restores, moves) runs as operations.
    #[arg(long, env = "SILO_ADMIN_REQUEST_TIMEOUT", default_value_t = DEFAULT_ADMIN_REQUEST_TIMEOUT_SECS, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub admin_request_timeout: u64,

    /// Seconds an app API request may take before it is answered 503 (its
    /// statement still ends cleanly, within the 10 s statement timeout).
    #[arg(long, env = "SILO_APP_REQUEST_TIMEOUT", default_value_t = DEFAULT_APP_REQUEST_TIMEOUT_SECS, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub app_request_timeout: u64,

    /// App API requests one process serves at once; more are answered 503
    /// at once (with `Retry-After`) rather than queued.
    #[arg(long, env = "SILO_APP_MAX_IN_FLIGHT", default_value_t = DEFAULT_APP_MAX_IN_FLIGHT as u64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub app_max_in_flight: u64,

    /// Admin API requests one process serves at once; more are answered 503.
    #[arg(long, env = "SILO_ADMIN_MAX_IN_FLIGHT", default_value_t = DEFAULT_ADMIN_MAX_IN_FLIGHT as u64, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub admin_max_in_flight: u64,

    /// Failed admin authentications (a token that is neither a live admin
    /// key nor the bootstrap token, at the admin API or the console's
    /// sign-in) one client address (an IPv6 /64) may make per minute; past
    /// them, its requests that present a token are answered 429 with
    /// `Retry-After` until the allowance refills. `0` turns it off.
    #[arg(long, env = "SILO_ADMIN_AUTH_FAILURES", default_value_t = DEFAULT_ADMIN_AUTH_FAILURES)]
    pub admin_auth_failures: u32,

    /// Proxies whose `X-Forwarded-For` names the client (addresses or CIDR
    /// blocks, comma-separated): a request from one of them counts against
    /// the address that header gives, for `SILO_ADMIN_AUTH_FAILURES`.
    /// Empty: the connection's own address, always.
    #[arg(long, env = "SILO_TRUSTED_PROXIES", default_value = "", value_parser = parse_networks)]
    pub trusted_proxies: Networks,

    /// Largest app API request body in bytes; larger ones are answered 413.
    #[arg(long, env = "SILO_APP_MAX_BODY_BYTES", default_value_t = DEFAULT_APP_MAX_BODY_BYTES as u64, value_parser = clap::value_parser!(u64).range(1024..=16 * 1024 * 1024))]
    pub app_max_body_bytes: u64,

    /// App API requests per second one process accepts per tenant (the
    /// tenant its token proves); more are answered 429 with `Retry-After`.
    /// `0` turns the limit off.
    #[arg(long, env = "SILO_APP_RATE_LIMIT", default_value_t = DEFAULT_APP_RATE_LIMIT)]
    pub app_rate_limit: u32,

    /// Requests a tenant may send at once beyond its rate.
    #[arg(long, env = "SILO_APP_RATE_BURST", default_value_t = DEFAULT_APP_RATE_BURST, value_parser = clap::value_parser!(u32).range(1..))]
    pub app_rate_burst: u32,

    /// App API requests per minute one process accepts per tenant that
    /// name another tenant than the token's, or carry a revoked token
    /// (each answered 404); more are answered 429. `0` turns it off.
    #[arg(long, env = "SILO_APP_MISDIRECTED_LIMIT", default_value_t = DEFAULT_APP_MISDIRECTED_LIMIT)]
    pub app_misdirected_limit: u32,

    /// Longest a 429 to a tenant over its rate (or its misdirected
    /// allowance) is held before it is sent, in milliseconds: until the
    /// tenant may send again, so a client that retries at once is slowed to
    /// its rate. `0` answers at once.
    #[arg(long, env = "SILO_APP_REFUSAL_HOLD_MS", default_value_t = DEFAULT_APP_REFUSAL_HOLD_MS, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub app_refusal_hold_ms: u64,

    /// Tenant connections to a server on this machine go through its Unix
    /// socket (checked to be the same cluster) rather than TCP.
    #[arg(long, env = "SILO_LOCAL_SOCKETS", default_value_t = true, action = clap::ArgAction::Set)]
    pub local_sockets: bool,

    /// PostgreSQL-protocol front door (`host:port`); empty turns it off.
    #[arg(long, env = "SILO_PG_LISTEN", default_value = DEFAULT_PG_LISTEN, value_parser = parse_optional_addr)]
    pub pg_listen: OptionalAddr,

    /// The `host:port` clients reach the front door at, for the connection
    /// URIs the admin API hands out (default: the listen address).
    #[arg(long, env = "SILO_PG_PUBLIC_ADDRESS")]
    pub pg_public_address: Option<String>,

    /// PEM certificate chain of the front door's TLS (with `SILO_PG_TLS_KEY`).
    #[arg(long, env = "SILO_PG_TLS_CERT", requires = "pg_tls_key")]
    pub pg_tls_cert: Option<PathBuf>,

    /// PEM private key of the front door's TLS.
    #[arg(long, env = "SILO_PG_TLS_KEY", requires = "pg_tls_cert")]
    pub pg_tls_key: Option<PathBuf>,

    /// Refuse front-door clients that do not use TLS.
    #[arg(long, env = "SILO_PG_REQUIRE_TLS", default_value_t = false, action = clap::ArgAction::Set)]
    pub pg_require_tls: bool,

    /// Front-door client connections one process holds at once; more are
    /// refused with "too many connections".
    #[arg(long, env = "SILO_PG_MAX_CLIENTS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub pg_max_clients: u32,

    /// Front-door client connections per tenant per process.
    #[arg(long, env = "SILO_PG_MAX_CLIENTS_PER_TENANT", default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub pg_max_clients_per_tenant: u32,

    /// Connections from one address (an IPv6 /64) logging in at once; more
    /// are refused at once, so one address cannot hold back others' logins.
    #[arg(long, env = "SILO_PG_MAX_LOGINS_PER_ADDRESS", default_value_t = DEFAULT_PG_MAX_LOGINS_PER_ADDRESS, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub pg_max_logins_per_address: u32,

    /// Seconds a client may take from connecting to being logged in.
    #[arg(long, env = "SILO_PG_STARTUP_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub pg_startup_timeout: u64,

    /// Seconds a logged-in client may stay silent outside a transaction
    /// before it is disconnected (0: never).
    #[arg(long, env = "SILO_PG_CLIENT_IDLE_TIMEOUT", default_value_t = 0)]
    pub pg_client_idle_timeout: u64,

    /// Largest protocol message a client may send, in bytes, and a tenant
    /// server other than a row or COPY data (those are passed on in parts,
    /// however large): a larger one ends the session.
    #[arg(long, env = "SILO_PG_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(8192..=1024 * 1024 * 1024))]
    pub pg_max_message_bytes: u64,

    /// Bytes of named prepared statements one front-door client may keep
    /// (their names and text, plus a fixed 160 bytes each): silo keeps each
    /// one's text to prepare it again on whichever server connection the
    /// client gets. A `Parse` past it ends the session.
    #[arg(long, env = "SILO_PG_MAX_PREPARED_BYTES", default_value_t = 16 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(65_536..=1024 * 1024 * 1024))]
    pub pg_max_prepared_bytes: u64,

    /// Prepared statements the front door keeps on one tenant server
    /// connection (its clients' statements, shared in transaction mode);
    /// past it the least recently used is closed, and prepared again when
    /// next used. PostgreSQL's memory for them is bounded so.
    #[arg(long, env = "SILO_PG_MAX_SERVER_STATEMENTS", default_value_t = DEFAULT_PG_MAX_SERVER_STATEMENTS, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub pg_max_server_statements: u32,

    /// Seconds a client waits for a server connection (budget full, or a
    /// move's cut-over) before it is refused.
    #[arg(long, env = "SILO_PG_WAIT_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub pg_wait_timeout: u64,

    /// Microseconds a front-door session may busy-poll the socket it
    /// expects to speak next, while at most one server connection is
    /// checked out in the process (0: never; it saves a thread wake-up
    /// per message when traffic is light).
    #[arg(long, env = "SILO_PG_SPIN_MICROS", default_value_t = DEFAULT_PG_SPIN_MICROS, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub pg_spin_micros: u64,

    /// Server connections per tenant that its clients' single `SELECT`s
    /// (simple queries, between transactions) may share, pipelined, once
    /// that many of its connections are busy; 0 turns sharing off. A
    /// shared query waits for those given to its connection before it.
    #[arg(long, env = "SILO_PG_SHARED_CONNECTIONS", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub pg_shared_connections: u32,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    #[command(flatten)]
    pub server: ServerArgs,

    /// Bootstrap admin bearer token (at least 24 characters).
    /// Bootstrap admin bearer token: `SILO_ADMIN_TOKEN` (or `_FILE`) only.
    #[arg(skip)]
    pub admin_token: Option<Secret>,
}

#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Folder for the private cluster, keys and state.
    #[arg(long, env = "SILO_DEV_DIR", default_value = ".silo")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// Apply control-DB migrations.
    Control {
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Apply tenant migrations to every tenant (or one), resumably.
    Tenants {
        #[command(flatten)]
        control: ControlArgs,
        /// Tenants migrated at once (default: from the servers' connection budgets).
        #[arg(long)]
        concurrency: Option<usize>,
        /// Only this tenant (slug or id).
        #[arg(long)]
        tenant: Option<String>,
        /// Show who would be migrated; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Show which tenants are behind the latest version; change nothing.
        #[arg(long, conflicts_with_all = ["dry_run", "concurrency", "tenant"])]
        status: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TenantsCommand {
    /// Provision a tenant: database, role, migrations, registry.
    Create {
        #[command(flatten)]
        control: ControlArgs,
        slug: Slug,
        #[arg(long)]
        name: TenantName,
        /// Plan (default: standard).
        #[arg(long)]
        plan: Option<Plan>,
        /// Server to place the tenant on (default: most headroom).
        #[arg(long)]
        server: Option<ServerName>,
    },
    /// List tenants.
    List {
        #[command(flatten)]
        control: ControlArgs,
        #[arg(long)]
        status: Option<String>,
    },
    /// Show one tenant (slug or id).
    Show {
        #[command(flatten)]
        control: ControlArgs,
        tenant: String,
    },
    /// Suspend a tenant: its role can no longer log in.
    Suspend {
        #[command(flatten)]
        control: ControlArgs,
        tenant: String,
    },
    /// Resume a suspended tenant.
    Resume {
        #[command(flatten)]
        control: ControlArgs,
        tenant: String,
    },
    /// Final backup, verified, then database and role dropped: `archived`.
    Archive {
        #[command(flatten)]
        control: ControlArgs,
        tenant: String,
    },
    /// Bring an archived tenant back (or roll an active one back) from a backup.
    Restore {
        #[command(flatten)]
        control: ControlArgs,
        tenant: String,
        /// Backup to restore (default: the newest succeeded one).
        #[arg(long)]
        backup: Option<uuid::Uuid>,
        /// Replace the data of an active or suspended tenant (refused
        /// without it); its current database is kept aside for SILO_KEEP_DAYS.
        #[arg(long)]
        overwrite: bool,
    },
    /// Move a tenant to another server; writes are frozen for the cut-over only.
    Move {
        #[command(flatten)]
        control: ControlArgs,
        tenant: String,
        /// Name of the server to move it to.
        #[arg(long)]
        to: ServerName,
    },
    /// Drop a tenant's database and role; the registry row is kept as `deleted`.
    Delete {
        #[command(flatten)]
        control: ControlArgs,
        tenant: String,
    },
}

impl StorageArgs {
    /// Storage settings from the environment and defaults alone (for `silo dev`).
    pub fn from_env() -> Result<Self, clap::Error> {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            storage: StorageArgs,
        }
        Only::try_parse_from(["silo"]).map(|o| o.storage)
    }
}

/// A configuration problem: exit code 2, with a message naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} is required (in the environment, or a file named by {0}_FILE)")]
    Missing(&'static str),
    #[error("{0}_FILE names a file that cannot be read: {1}")]
    SecretFile(&'static str, std::io::Error),
    #[error(transparent)]
    MasterKey(#[from] KeyError),
    #[error("{0} is too weak: use at least {MIN_ADMIN_TOKEN_LEN} random characters (e.g. `openssl rand -hex 24`)")]
    WeakToken(&'static str),
}

impl Secret {
    /// The secret in the environment variable `name`, or in the file named
    /// by `<name>_FILE` (surrounding blanks trimmed); `None` if neither is set.
    pub fn from_env(name: &'static str) -> Result<Option<Self>, ConfigError> {
        if let Some(v) = std::env::var(name).ok().filter(|v| !v.is_empty()) {
            return Ok(Some(Self(v)));
        }
        match std::env::var_os(format!("{name}_FILE")) {
            Some(path) if !path.is_empty() => std::fs::read_to_string(&path)
                .map(|s| Some(Self(s.trim().to_owned())))
                .map_err(|e| ConfigError::SecretFile(name, e)),
            _ => Ok(None),
        }
    }

    /// As [`Self::from_env`], refusing its absence by name.
    pub fn required(name: &'static str) -> Result<Self, ConfigError> {
        Self::from_env(name)?.ok_or(ConfigError::Missing(name))
    }
}

impl ControlArgs {
    /// `SILO_DATABASE_URL`.
    pub fn database_url(&self) -> Result<Secret, ConfigError> {
        Secret::required("SILO_DATABASE_URL")
    }

    /// `SILO_TENANT_SERVER_URL`, if set.
    pub fn tenant_server_url(&self) -> Result<Option<Secret>, ConfigError> {
        Secret::from_env("SILO_TENANT_SERVER_URL")
    }

    /// The keys derived from the master keys ([`master_keyring`]).
    pub fn keyring(&self) -> Result<Keyring, ConfigError> {
        master_keyring()
    }
}

impl ServeArgs {
    /// `SILO_METRICS_TOKEN`, if set (checked like the admin token).
    pub fn metrics_token(&self) -> Result<Option<Secret>, ConfigError> {
        match Secret::from_env("SILO_METRICS_TOKEN")? {
            Some(t) => {
                check_token("SILO_METRICS_TOKEN", &t)?;
                Ok(Some(t))
            }
            None => Ok(None),
        }
    }

    /// `SILO_ADMIN_TOKEN`, checked.
    pub fn admin_token(&self) -> Result<Secret, ConfigError> {
        let token = Secret::from_env("SILO_ADMIN_TOKEN")?;
        check_admin_token(token.as_ref()).map(Secret::new)
    }
}

/// The keys derived from `SILO_MASTER_KEY`, and from
/// `SILO_MASTER_KEY_PREVIOUS` when a rotation is under way (refused if weak
/// or the same key as the current one).
pub fn master_keyring() -> Result<Keyring, ConfigError> {
    let key = Secret::required(crate::crypto::MASTER_KEY_VAR)?;
    let keyring = Keyring::from_base64(key.expose())?;
    match Secret::from_env(crate::crypto::PREVIOUS_KEY_VAR)? {
        Some(previous) => Ok(keyring.with_previous(previous.expose())?),
        None => Ok(keyring),
    }
}

/// Refuse admin tokens that are short or made of a few repeated characters.
pub fn check_admin_token(token: Option<&Secret>) -> Result<&str, ConfigError> {
    let token = token.ok_or(ConfigError::Missing("SILO_ADMIN_TOKEN"))?;
    check_token("SILO_ADMIN_TOKEN", token)
}

/// Refuse a bearer token that is short or made of a few repeated characters.
fn check_token<'a>(name: &'static str, token: &'a Secret) -> Result<&'a str, ConfigError> {
    let token = token.expose();
    let mut distinct: Vec<char> = token.chars().collect();
    distinct.sort_unstable();
    distinct.dedup();
    if token.len() < MIN_ADMIN_TOKEN_LEN || distinct.len() < 8 {
        return Err(ConfigError::WeakToken(name));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_line_is_well_formed() {
        // clap checks clashing names and ids only when a command is used.
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn trusted_proxies_are_addresses_and_blocks_and_empty_is_none() {
        let nets = |s: &str| {
            parse_networks(s).map(|n| n.0.iter().map(ToString::to_string).collect::<Vec<_>>())
        };
        assert_eq!(nets(""), Ok(vec![]));
        assert_eq!(nets(" , "), Ok(vec![]));
        assert_eq!(
            nets("10.0.0.0/8, 192.0.2.1,2001:db8::/32"),
            Ok(vec![
                "10.0.0.0/8".into(),
                "192.0.2.1/32".into(),
                "2001:db8::/32".into()
            ])
        );
        // A block's host bits are dropped.
        assert_eq!(nets("10.1.2.3/8"), Ok(vec!["10.0.0.0/8".into()]));
        for bad in ["bogus", "10.0.0.1/33", "10.0.0.0/8;", "*"] {
            assert!(nets(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secrets_are_redacted_from_debug_output() {
        let shown = format!("{:?}", Secret::new("postgres://u:hunter2@h/db"));
        assert!(!shown.contains("hunter2"));
    }

    #[test]
    fn no_secret_is_a_flag() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let mut flags = Vec::new();
        let mut stack = vec![&cli];
        while let Some(c) = stack.pop() {
            flags.extend(
                c.get_arguments()
                    .filter_map(|a| a.get_long().map(str::to_owned)),
            );
            stack.extend(c.get_subcommands());
        }
        let secret = [
            "database-url",
            "master-key",
            "master-key-previous",
            "previous",
            "admin-token",
            "tenant-server-url",
        ];
        let found: Vec<_> = flags
            .iter()
            .filter(|f| secret.contains(&f.as_str()))
            .collect();
        assert!(found.is_empty(), "secrets taken as flags: {found:?}");
    }

    #[test]
    fn missing_and_weak_admin_tokens_are_refused_by_name() {
        let missing = check_admin_token(None).unwrap_err().to_string();
        assert!(missing.contains("SILO_ADMIN_TOKEN"));
        let weak = Secret::new("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa");
        assert!(matches!(
            check_admin_token(Some(&weak)),
            Err(ConfigError::WeakToken(_))
        ));
        let short = Secret::new("abc123");
        assert!(matches!(
            check_admin_token(Some(&short)),
            Err(ConfigError::WeakToken(_))
        ));
        let good = Secret::new("3f9a0c1e7b2d48e6a5c9f01b2e7d4c8a");
        assert!(check_admin_token(Some(&good)).is_ok());
    }
}
