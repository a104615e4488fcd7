//! Plans as data: create, change and delete plans, and apply a change to
//! every tenant of the plan at once.
//!
//! What a plan sets is read where it is enforced: the routers and the
//! front door read a tenant's limits with its lookup (a plan change is
//! announced to them, so it applies at their next request), the clinic
//! API checks `max_staff`/`max_patients`, the usage collector the storage
//! quota, the backup scheduler the schedule and retention. The one limit
//! PostgreSQL itself holds is the tenant role's `CONNECTION LIMIT`: a
//! change of it is applied here, role by role, and the usage collector
//! repairs any role a crash left behind.

use anyhow::Context;
use uuid::Uuid;

use super::Provisioner;
use crate::domain::{Plan, Schedule};
use crate::ops::{Error, Result};
use crate::registry::{is_plan_reference, PlanFields, PlanRecord};
use crate::servers::roles;

/// Check every limit a client sets before any of it is written.
pub fn check_fields(f: &PlanFields) -> Result<()> {
    fn range(name: &str, v: Option<Option<i64>>, lo: i64, hi: i64) -> Result<()> {
        match v.flatten() {
            Some(x) if x < lo || x > hi => Err(Error::Invalid(format!(
                "{name} must be between {lo} and {hi}"
            ))),
            _ => Ok(()),
        }
    }
    let wide = |v: Option<Option<i32>>| v.map(|o| o.map(i64::from));
    range(
        "connection_limit",
        f.connection_limit.map(|v| Some(v.into())),
        1,
        10_000,
    )?;
    range(
        "storage_quota_bytes",
        f.storage_quota_bytes,
        1 << 20,
        i64::MAX,
    )?;
    range(
        "requests_per_second",
        wide(f.requests_per_second),
        1,
        1_000_000,
    )?;
    range("wire_clients", wide(f.wire_clients), 1, 100_000)?;
    range("max_staff", wide(f.max_staff), 0, i32::MAX.into())?;
    range("max_patients", wide(f.max_patients), 0, i32::MAX.into())?;
    range("trial_days", wide(f.trial_days), 1, 3650)?;
    range("backup_keep_last", wide(f.backup_keep_last), 1, 1000)?;
    range("backup_keep_daily", wide(f.backup_keep_daily), 0, 1000)?;
    range("backup_keep_weekly", wide(f.backup_keep_weekly), 0, 1000)?;
    range("backup_keep_monthly", wide(f.backup_keep_monthly), 0, 1000)?;
    if let Some(Some(s)) = &f.backup_schedule {
        Schedule::parse(s).map_err(|e| Error::Invalid(format!("backup_schedule: {e}")))?;
    }
    Ok(())
}

impl Provisioner {
    /// Add a plan.
    pub async fn create_plan(
        &self,
        name: &Plan,
        fields: &PlanFields,
        actor: &str,
    ) -> Result<PlanRecord> {
        if fields.connection_limit.is_none() {
            return Err(Error::Invalid(
                "connection_limit is required for a new plan".into(),
            ));
        }
        check_fields(fields)?;
        self.registry()
            .create_plan(name, fields, actor)
            .await
            .map_err(|e| {
                if e.is_unique_violation("plans_pkey") {
                    Error::Conflict(format!("a plan is named '{name}'"))
                } else {
                    e.into()
                }
            })
    }

    /// Change a plan; a new connection limit is applied to the role of
    /// every tenant of the plan before this returns.
    pub async fn update_plan(
        &self,
        name: &Plan,
        fields: &PlanFields,
        actor: &str,
    ) -> Result<PlanRecord> {
        check_fields(fields)?;
        let (before, after) = self
            .registry()
            .update_plan(name, fields, actor)
            .await?
            .ok_or(Error::NotFound("plan"))?;
        if before.connection_limit != after.connection_limit {
            self.apply_connection_limit(&after).await?;
        }
        Ok(after)
    }

    /// Set the plan's connection limit on each of its tenants' roles, one
    /// statement per server. A server out of reach fails the call (the
    /// plan row is changed already; the usage collector applies it later).
    async fn apply_connection_limit(&self, plan: &PlanRecord) -> Result<()> {
        let roles = self.registry().roles_on_plan(&plan.name).await?;
        let mut by_server: Vec<(Uuid, Vec<String>)> = Vec::new();
        for (_, server, role) in roles {
            match by_server.last_mut() {
                Some((s, list)) if *s == server => list.push(role),
                _ => by_server.push((server, vec![role])),
            }
        }
        for (server, list) in by_server {
            let admin = self
                .inner
                .servers
                .admin_of(&self.inner.registry, server)
                .await?;
            roles::set_connection_limits(&admin, &list, plan.connection_limit)
                .await
                .with_context(|| {
                    format!("apply plan '{}' connection limit on a server", plan.name)
                })?;
        }
        Ok(())
    }

    /// Delete a plan no tenant is on (and not the default one).
    pub async fn delete_plan(&self, name: &Plan, actor: &str) -> Result<()> {
        if name.as_str() == Plan::DEFAULT {
            return Err(Error::Conflict(format!(
                "plan '{name}' is the plan of tenants created without one; it cannot be deleted"
            )));
        }
        match self.registry().delete_plan(name, actor).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::NotFound("plan")),
            Err(e) if is_plan_reference(&e) => Err(Error::Conflict(format!(
                "plan '{name}' has tenants; move them to another plan first"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// The plan a new or changed tenant names, which must exist.
    pub async fn known_plan(&self, name: &Plan) -> Result<PlanRecord> {
        if let Some(plan) = self.registry().plan(name).await? {
            return Ok(plan);
        }
        let plans = self.registry().plans().await?;
        let names: Vec<&str> = plans.iter().map(|p| p.name.as_str()).collect();
        Err(Error::Invalid(format!(
            "no plan is named '{name}' (plans: {})",
            names.join(", ")
        )))
    }
}
