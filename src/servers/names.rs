//! Names of what silo creates on a tenant server. Every one carries the
//! `silo_` prefix, and those of tenants are derived from the tenant id, so
//! a database or role can be traced back to its registry row.

use uuid::Uuid;

/// The template database on every tenant server.
pub const TEMPLATE_DB: &str = "silo_template";
/// A tenant's database: `silo_t_<tenant id hex>` (a restored one adds `_<suffix>`).
pub const TENANT_DB_PREFIX: &str = "silo_t_";
/// A tenant's login role: `silo_r_<tenant id hex>`.
pub const TENANT_ROLE_PREFIX: &str = "silo_r_";
/// A tenant's reader role, which its read-only app credentials log in as
/// behind the front door: `silo_q_<tenant id hex>`, made with the tenant's
/// first read-only credential; SELECT only.
pub const READER_ROLE_PREFIX: &str = "silo_q_";
/// A warm-pool spare database and its role.
pub const SPARE_DB_PREFIX: &str = "silo_spare_";
pub const SPARE_ROLE_PREFIX: &str = "silo_rs_";
/// A database a restore or verification builds before the swap:
/// `silo_x_<32 hex>`, the hex being the id of the advisory lock its runner
/// holds; the sweep drops those whose lock is free.
pub const SCRATCH_DB_PREFIX: &str = "silo_x_";
/// A database set aside, never dropped by silo: `silo_kept_<tenant>_<time>`.
pub const KEPT_DB_PREFIX: &str = "silo_kept_";

/// Database and role names of a tenant, derived from its id.
pub fn tenant_names(id: Uuid) -> (String, String) {
    let hex = id.simple().to_string();
    (
        format!("{TENANT_DB_PREFIX}{hex}"),
        format!("{TENANT_ROLE_PREFIX}{hex}"),
    )
}

/// The reader role of the tenant whose login role is `role` (none for a
/// role that is not a tenant's, such as a spare's).
pub fn reader_role(role: &str) -> Option<String> {
    let hex = role.strip_prefix(TENANT_ROLE_PREFIX)?;
    Some(format!("{READER_ROLE_PREFIX}{hex}"))
}

/// Name of the scratch database held by lock `id`.
pub fn scratch_db(id: Uuid) -> String {
    format!("{SCRATCH_DB_PREFIX}{}", id.simple())
}

/// The tenant a `silo_t_<hex>[_suffix]` database belongs to.
pub fn tenant_of_database(name: &str) -> Option<Uuid> {
    let hex = name.strip_prefix(TENANT_DB_PREFIX)?;
    Uuid::parse_str(hex.get(..32)?).ok()
}

/// The tenant a `silo_r_<hex>` role belongs to.
pub fn tenant_of_role(name: &str) -> Option<Uuid> {
    let hex = name.strip_prefix(TENANT_ROLE_PREFIX)?;
    Uuid::parse_str(hex.get(..32)?).ok()
}

/// Name a database set aside for `tenant` takes.
pub fn kept_db(tenant: Uuid) -> String {
    format!(
        "{KEPT_DB_PREFIX}{}_{}",
        tenant.simple(),
        chrono::Utc::now().timestamp()
    )
}
