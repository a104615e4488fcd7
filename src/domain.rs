//! Domain values, checked once where they enter silo (HTTP, command line,
//! scheduler, configuration) and typed from there on: nothing downstream
//! re-validates a string.
//!
//! - [`Slug`], [`TenantName`], [`ServerName`]: names a client chooses;
//! - [`Plan`]: the name of a tenant's plan (what it allows is a `plans` row);
//! - [`KeyName`], [`AdminRole`]: a named admin key and what it may do;
//! - [`ProvisionStep`]: the steps of a create, in order;
//! - [`OperationKind`]: the kinds of long-running operation;
//! - [`Schedule`]: a backup cron expression, parsed by one rule everywhere.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A value that does not fit its domain; the message says what would.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// A tenant's URL-safe name: `^[a-z][a-z0-9-]{1,38}[a-z0-9]$`, and not shaped
/// like a UUID (a tenant is also found by its id, so such a slug could never
/// be reached by name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Slug(String);

impl Slug {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let b = s.as_bytes();
        let shaped = (3..=40).contains(&b.len())
            && b[0].is_ascii_lowercase()
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b[b.len() - 1] != b'-';
        if !shaped {
            return Err(Invalid(
                "slug must be 3 to 40 characters of a-z, 0-9 and '-', start with a letter and not end with '-'".into(),
            ));
        }
        if uuid::Uuid::parse_str(s).is_ok() {
            return Err(Invalid(
                "slug must not be shaped like a UUID (tenants are also found by id)".into(),
            ));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A tenant's display name: 1 to 200 characters, no control characters,
/// surrounding blanks trimmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TenantName(String);

impl TenantName {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let s = s.trim();
        check_text("name", s, 200)?;
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A tenant server's name: 1 to 63 characters of a-z, A-Z, 0-9, '-' and '_'.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ServerName(String);

impl ServerName {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let ok = (1..=63).contains(&s.len())
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
        if !ok {
            return Err(Invalid(
                "server name must be 1 to 63 characters of a-z, A-Z, 0-9, '-' and '_'".into(),
            ));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Free text a client sends: non-blank, at most `max` characters, none a control character.
pub fn check_text(field: &str, value: &str, max: usize) -> Result<(), Invalid> {
    if value.trim().is_empty() || value.chars().count() > max || value.chars().any(char::is_control)
    {
        return Err(Invalid(format!(
            "{field} must be 1 to {max} characters with no control characters"
        )));
    }
    Ok(())
}

macro_rules! text_value {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0)
            }
        }
        impl FromStr for $t {
            type Err = Invalid;
            fn from_str(s: &str) -> Result<Self, Invalid> {
                Self::parse(s)
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    )*};
}
text_value!(Slug, TenantName, ServerName, CredentialName, KeyName);

/// An app credential's name, which is also the `user` a PostgreSQL client
/// logs in with: `^[a-z][a-z0-9_-]{0,62}$` (unique within its tenant).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct CredentialName(String);

impl CredentialName {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let b = s.as_bytes();
        let shaped = (1..=63).contains(&b.len())
            && b[0].is_ascii_lowercase()
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_');
        if !shaped {
            return Err(Invalid(
                "name must be 1 to 63 characters of a-z, 0-9, '_' and '-', starting with a letter"
                    .into(),
            ));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How the PostgreSQL front door pools an app credential's sessions.
///
/// - `session`: a client holds one server connection for its whole session;
///   everything PostgreSQL offers works.
/// - `transaction`: a client holds a server connection only while a
///   transaction is open, so many clients share few connections; session
///   state (`SET`, `LISTEN`, session advisory locks, `WITH HOLD` cursors)
///   does not carry over between transactions.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    ToSchema,
    sqlx::Type,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum PoolMode {
    #[default]
    Session,
    Transaction,
}

impl PoolMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Transaction => "transaction",
        }
    }
}

/// The audit log's `actor` for requests made with the bootstrap admin token
/// (`SILO_ADMIN_TOKEN`): `admin`, as every entry before named keys said.
pub const BOOTSTRAP_ACTOR: &str = "admin";

/// Actors silo itself writes in the audit log: the bootstrap token, the
/// command line, the scheduler and `silo dev` (and `bootstrap`, which reads
/// as the token too). No admin key may take one of these names, so an
/// actor always names one principal.
pub const SYSTEM_ACTORS: [&str; 5] = [
    BOOTSTRAP_ACTOR,
    "bootstrap",
    "cli",
    SCHEDULER_ACTOR,
    "silo-dev",
];

/// The audit log's actor of what silo's background jobs do on their own
/// (scheduled backups, trial expiry, quotas).
pub const SCHEDULER_ACTOR: &str = "scheduler";

/// A named admin key's name: `^[a-z][a-z0-9_-]{0,62}$`, none of
/// [`SYSTEM_ACTORS`]. Unique among live keys; the audit log's `actor` of
/// everything the key does.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct KeyName(String);

impl KeyName {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        if !is_actor_shaped(s) {
            return Err(Invalid(
                "name must be 1 to 63 characters of a-z, 0-9, '_' and '-', starting with a letter"
                    .into(),
            ));
        }
        if SYSTEM_ACTORS.contains(&s) {
            return Err(Invalid(format!(
                "name '{s}' is reserved: the audit log uses it for silo itself ({})",
                SYSTEM_ACTORS.join(", ")
            )));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `true` when `s` could be an audit log actor: a key's name or one of
/// [`SYSTEM_ACTORS`] (`^[a-z][a-z0-9_-]{0,62}$`).
pub fn is_actor_shaped(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_')
}

/// What an admin key may do, each role all that the one before may:
///
/// - `viewer`: read (`GET`), except the admin keys and a tenant role's
///   direct connection URI (it holds the role's password);
/// - `operator`: also change things: lifecycle, backups, restores that
///   replace no data, moves, migrations, servers, app credentials and
///   tokens; no deletes, no keys, no direct URIs, no `"overwrite": true`;
/// - `admin`: everything, as the bootstrap token.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    ToSchema,
    sqlx::Type,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum AdminRole {
    Viewer,
    Operator,
    Admin,
}

impl AdminRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for AdminRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The name of a plan, a row of the control DB's `plans` table (what each
/// plan allows lives there, see `registry::plans`): 1 to 40 characters of
/// a-z, 0-9, `-` and `_`, starting with a letter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[serde(try_from = "String")]
#[sqlx(transparent)]
#[schema(value_type = String, example = "standard")]
pub struct Plan(String);

impl Plan {
    /// Plan of a tenant created without one (a seed row of `plans`).
    pub const DEFAULT: &'static str = "standard";

    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let b = s.as_bytes();
        let shaped = (1..=40).contains(&b.len())
            && b[0].is_ascii_lowercase()
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_');
        if !shaped {
            return Err(Invalid(
                "plan must be 1 to 40 characters of a-z, 0-9, '-' and '_', starting with a letter"
                    .into(),
            ));
        }
        Ok(Self(s.to_owned()))
    }

    /// The plan of a tenant created without one.
    pub fn default_plan() -> Self {
        Self(Self::DEFAULT.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Plan {
    type Error = Invalid;
    fn try_from(s: String) -> Result<Self, Invalid> {
        Self::parse(&s)
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Plan {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        Self::parse(s)
    }
}

/// The steps of creating a tenant, in order; each is recorded on the tenant
/// row once done (and is a failpoint name, `SILO_FAILPOINT=<step>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum ProvisionStep {
    Registered,
    Database,
    Role,
    Migrate,
    Verify,
    Active,
}

impl ProvisionStep {
    pub const ALL: [ProvisionStep; 6] = [
        Self::Registered,
        Self::Database,
        Self::Role,
        Self::Migrate,
        Self::Verify,
        Self::Active,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Registered => "registered",
            Self::Database => "database",
            Self::Role => "role",
            Self::Migrate => "migrate",
            Self::Verify => "verify",
            Self::Active => "active",
        }
    }
}

impl fmt::Display for ProvisionStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The kinds of long-running operation (`202` + `GET /operations/{id}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum OperationKind {
    #[serde(rename = "tenant.delete")]
    TenantDelete,
    #[serde(rename = "tenant.archive")]
    TenantArchive,
    #[serde(rename = "tenant.move")]
    TenantMove,
    #[serde(rename = "backup.restore")]
    BackupRestore,
    #[serde(rename = "backup.verify")]
    BackupVerify,
    #[serde(rename = "migrate.tenants")]
    MigrateTenants,
    #[serde(rename = "migrate.tenants.dry_run")]
    MigrateTenantsDryRun,
}

impl OperationKind {
    pub const ALL: [OperationKind; 7] = [
        Self::TenantDelete,
        Self::TenantArchive,
        Self::TenantMove,
        Self::BackupRestore,
        Self::BackupVerify,
        Self::MigrateTenants,
        Self::MigrateTenantsDryRun,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::TenantDelete => "tenant.delete",
            Self::TenantArchive => "tenant.archive",
            Self::TenantMove => "tenant.move",
            Self::BackupRestore => "backup.restore",
            Self::BackupVerify => "backup.verify",
            Self::MigrateTenants => "migrate.tenants",
            Self::MigrateTenantsDryRun => "migrate.tenants.dry_run",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The open operations on the same tenant that keep one of this kind
    /// from starting: one table for the whole control plane.
    pub fn excluded_by(self) -> &'static [OperationKind] {
        use OperationKind::*;
        match self {
            TenantMove => &[
                TenantMove,
                TenantDelete,
                TenantArchive,
                BackupRestore,
                BackupVerify,
            ],
            BackupRestore => &[TenantArchive, BackupRestore, BackupVerify, TenantMove],
            TenantArchive | TenantDelete => &[TenantMove],
            BackupVerify | MigrateTenants | MigrateTenantsDryRun => &[],
        }
    }
}

impl fmt::Display for OperationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl sqlx::Type<sqlx::Postgres> for OperationKind {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <&str as sqlx::Type<sqlx::Postgres>>::type_info()
    }
    fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
        <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, sqlx::Postgres> for OperationKind {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        let s = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
        Self::parse(s).ok_or_else(|| format!("unknown operation kind '{s}'").into())
    }
}

impl sqlx::Encode<'_, sqlx::Postgres> for OperationKind {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        <&str as sqlx::Encode<sqlx::Postgres>>::encode(self.as_str(), buf)
    }
}

/// A backup schedule: a cron expression of 5 fields (minute first) or 6
/// (second first), evaluated in UTC, that fires at least once a week.
#[derive(Debug, Clone)]
pub struct Schedule {
    expr: String,
    cron: croner::Cron,
}

/// Longest a schedule may leave between two backups.
pub const MAX_SCHEDULE_GAP: Duration = Duration::days(7);

impl Schedule {
    pub fn parse(expr: &str) -> Result<Self, Invalid> {
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .year(croner::parser::Year::Disallowed)
            .build()
            .parse(expr)
            .map_err(|e| {
                Invalid(format!(
                    "not a cron expression (5 fields, or 6 with seconds first): {e}"
                ))
            })?;
        let schedule = Self {
            expr: expr.trim().to_owned(),
            cron,
        };
        schedule.check_gaps()?;
        Ok(schedule)
    }

    /// Refuse a schedule that leaves more than [`MAX_SCHEDULE_GAP`] between
    /// backups somewhere in a year (or never fires): it would silently stop
    /// a tenant's backups for that long. Walked from fire to fire (at least
    /// an hour at a time) over 400 days from a fixed date, so the answer does
    /// not depend on when it is asked.
    fn check_gaps(&self) -> Result<(), Invalid> {
        let start = Utc
            .with_ymd_and_hms(2024, 1, 1, 0, 0, 0)
            .single()
            .expect("a valid date");
        let mut at = start;
        while at < start + Duration::days(400) {
            match self.cron.find_next_occurrence(&at, false) {
                Ok(next) if next - at <= MAX_SCHEDULE_GAP => {
                    at = next.max(at + Duration::hours(1));
                }
                _ => {
                    return Err(Invalid(format!(
                        "the schedule must back up at least once every {} days: '{}' leaves a longer gap (or never fires), which would silently stop the tenant's backups",
                        MAX_SCHEDULE_GAP.num_days(),
                        self.expr
                    )))
                }
            }
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.expr
    }

    /// The latest time the schedule fires at or before `now`, in whole
    /// seconds (a slot is a key: the same for every caller in that second).
    pub fn latest_slot(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        use chrono::SubsecRound;
        self.cron
            .find_previous_occurrence(&now.trunc_subsecs(0), true)
            .ok()
            .map(|slot| slot.trunc_subsecs(0))
    }
}

/// The backup schedule of tenants without one of their own, unless configured.
pub const DEFAULT_SCHEDULE: &str = "0 0 2 * * *";

impl Default for Schedule {
    fn default() -> Self {
        Self::parse(DEFAULT_SCHEDULE).expect("the default schedule is valid")
    }
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.expr == other.expr
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.expr)
    }
}

impl FromStr for Schedule {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        Self::parse(s)
    }
}

/// How long what silo sets aside (a quarantined orphan, a database a
/// restore replaced) is kept before the reconciler drops it
/// (`SILO_KEEP_DAYS`, default 7 days).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepFor(pub std::time::Duration);

impl KeepFor {
    pub const DEFAULT_DAYS: u32 = 7;

    pub fn days(days: u32) -> Self {
        Self(std::time::Duration::from_secs(u64::from(days) * 86_400))
    }

    /// Unix seconds after which something set aside now may be dropped.
    pub fn drop_after(&self) -> i64 {
        chrono::Utc::now().timestamp() + self.0.as_secs() as i64
    }
}

impl Default for KeepFor {
    fn default() -> Self {
        Self::days(Self::DEFAULT_DAYS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row whose outcome differs from the expected one, reported together.
    fn failures<T: fmt::Debug>(rows: &[(&str, bool)], parse: impl Fn(&str) -> Result<T, Invalid>) {
        let wrong: Vec<String> = rows
            .iter()
            .filter(|(input, ok)| parse(input).is_ok() != *ok)
            .map(|(input, ok)| {
                format!("{input:?}: expected {}", if *ok { "ok" } else { "refused" })
            })
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn slugs_follow_the_contract_pattern_and_are_never_uuids() {
        let forty = format!("a{}", "b".repeat(39));
        let forty_one = format!("a{}", "b".repeat(40));
        failures(
            &[
                ("abc", true),
                ("a1-b2", true),
                ("clinic-north-7", true),
                (&forty, true),
                ("", false),
                ("ab", false),
                ("1abc", false),
                ("Abc", false),
                ("abc-", false),
                ("a_bc", false),
                ("abc def", false),
                ("ünï", false),
                (&forty_one, false),
                ("abcdef01-2345-6789-abcd-ef0123456789", false),
                ("abcdef0123456789abcdef0123456789", false),
            ],
            Slug::parse,
        );
    }

    #[test]
    fn names_are_trimmed_and_bounded() {
        let long = "x".repeat(201);
        failures(
            &[
                ("North Clinic", true),
                ("  padded  ", true),
                ("", false),
                ("   ", false),
                ("tab\there", false),
                (&long, false),
            ],
            TenantName::parse,
        );
        assert_eq!(TenantName::parse("  a b ").unwrap().as_str(), "a b");
        failures(
            &[
                ("default", true),
                ("eu_west-2", true),
                ("", false),
                ("has space", false),
                ("dot.ted", false),
            ],
            ServerName::parse,
        );
    }

    #[test]
    fn key_names_are_shaped_and_never_an_actor_of_silo_itself() {
        failures(
            &[
                ("night-shift", true),
                ("ops_2", true),
                ("a", true),
                (&"k".repeat(63), true),
                (&"k".repeat(64), false),
                ("", false),
                ("Ops", false),
                ("9lives", false),
                ("-ops", false),
                ("a b", false),
                ("a\u{0}b", false),
                ("admin", false),
                ("bootstrap", false),
                ("cli", false),
                ("scheduler", false),
                ("silo-dev", false),
            ],
            KeyName::parse,
        );
        let e = KeyName::parse("cli").unwrap_err().to_string();
        assert!(e.contains("reserved"), "{e}");
        assert!(SYSTEM_ACTORS.iter().all(|a| is_actor_shaped(a)));
        assert!(AdminRole::Viewer < AdminRole::Operator && AdminRole::Operator < AdminRole::Admin);
    }

    #[test]
    fn plan_names_are_short_lower_case_words() {
        let long = "x".repeat(41);
        failures(
            &[
                ("free", true),
                ("clinic_pro-2", true),
                ("p", true),
                ("Free", false),
                ("2pro", false),
                ("", false),
                ("a b", false),
                (long.as_str(), false),
            ],
            Plan::parse,
        );
        assert_eq!(Plan::default_plan().as_str(), "standard");
        assert!(serde_json::from_value::<Plan>(serde_json::json!("No!")).is_err());
    }

    #[test]
    fn operation_kinds_round_trip_through_their_names() {
        for k in OperationKind::ALL {
            assert_eq!(OperationKind::parse(k.as_str()), Some(k));
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        assert_eq!(OperationKind::parse("tenant.nope"), None);
    }

    #[test]
    fn schedules_are_cron_with_optional_seconds_firing_at_least_weekly() {
        failures(
            &[
                ("0 0 2 * * *", true),
                ("0 3 * * *", true),
                ("*/5 * * * * *", true),
                ("0 0 3 * * 0", true),
                ("0 0 3 * * MON", true),
                ("0 0 3 1 * *", false),
                ("0 0 0 30 2 *", false),
                ("0 0 0 29 2 *", false),
                ("0 0 3 * * * 2030", false),
                ("99 * * * * *", false),
                ("tomorrow", false),
                ("", false),
            ],
            Schedule::parse,
        );
        let e = Schedule::parse("0 0 3 1 * *").unwrap_err().to_string();
        assert!(e.contains("at least once every 7 days"), "{e}");
    }

    #[test]
    fn the_latest_slot_is_the_last_fire_time_not_after_now() {
        let now = Utc.with_ymd_and_hms(2026, 11, 25, 5, 30, 7).unwrap();
        let at = |h, m, s| Utc.with_ymd_and_hms(2026, 11, 25, h, m, s).unwrap();
        let rows = [
            ("0 0 2 * * *", now, at(2, 0, 0)),
            ("0 0 2 * * *", at(2, 0, 0), at(2, 0, 0)),
            ("*/5 * * * * *", now, at(5, 30, 5)),
            ("0 30 4 * * *", now, at(4, 30, 0)),
            // Sub-second `now`: the slot is still the whole second it fires at.
            (
                "0 0 2 * * *",
                now + chrono::Duration::microseconds(123_456),
                at(2, 0, 0),
            ),
            (
                "*/5 * * * * *",
                at(5, 30, 5) + chrono::Duration::milliseconds(999),
                at(5, 30, 5),
            ),
        ];
        let wrong: Vec<String> = rows
            .iter()
            .filter_map(|(expr, now, want)| {
                let got = Schedule::parse(expr).unwrap().latest_slot(*now);
                (got != Some(*want)).then(|| format!("{expr} at {now}: {got:?}, want {want}"))
            })
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}
