//! Migrating every tenant database: bounded fan-out, a result per tenant,
//! resumable, one run at a time across replicas.
//!
//! A run is an operation (`migrate.tenants`). A partial unique index allows
//! one unfinished run; its runner holds the operation's advisory lock (the
//! lease). If the runner dies, the lock goes with its session, and the next
//! start or reconcile pass takes the lease and resumes the same operation.
//! Resuming is cheap because progress is the registry itself: each tenant's
//! `schema_version` is written as soon as its database is migrated, and a run
//! only visits tenants whose recorded version is behind the target.
//!
//! A tenant's migrations run in a transaction: one that fails leaves that
//! tenant serving at its old version, the others carry on, and the run ends
//! `failed` with the list. Tenants created by an older replica while a run is
//! under way are picked up: the run re-reads who is behind until no one is.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::domain::OperationKind;
use crate::ops::{Error, Result};
use crate::registry::{Operation, Registry, TenantRecord};
use crate::servers::{roles, ServerPools, TenantSchema};
/// Longest a run waits at its end for tenants still provisioning (a crashed
/// create is finished by the reconciler within its interval).
const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);
/// Most tenants migrated at once, whatever the budgets allow.
pub const MAX_CONCURRENCY: usize = 32;

/// How to run a fleet migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FleetOptions {
    /// Tenants migrated at once; default derived from the servers' budgets.
    pub concurrency: Option<usize>,
    /// Only this tenant (slug or id).
    pub tenant: Option<String>,
    /// Report who would be migrated, change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// What happened to one tenant.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum TenantOutcome {
    Migrated { from: Option<i64>, to: i64 },
    WouldMigrate { from: Option<i64>, to: i64 },
    Failed { error: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct TenantResult {
    pub tenant_id: Uuid,
    pub slug: String,
    #[serde(flatten)]
    pub outcome: TenantOutcome,
    pub millis: u64,
}

/// Counts so far, for progress bars and `GET /operations/{id}`.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct FleetProgress {
    pub total: usize,
    pub done: usize,
    pub failed: usize,
    pub left: usize,
}

/// The outcome of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FleetReport {
    pub target_version: i64,
    pub migrated: usize,
    pub would_migrate: usize,
    /// Dry run: the slugs that would be migrated.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<String>,
    pub failed: Vec<TenantResult>,
    pub seconds: f64,
}

/// A started run: its operation, and the lease to hold while it runs.
pub struct FleetRun {
    pub operation: Operation,
    pub options: FleetOptions,
    lease: Option<crate::registry::Lock>,
}

/// Runs fleet migrations. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Fleet {
    registry: Registry,
    servers: ServerPools,
    schema: TenantSchema,
}

impl Fleet {
    pub fn new(registry: Registry, servers: ServerPools, schema: TenantSchema) -> Self {
        Self {
            registry,
            servers,
            schema,
        }
    }

    fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Newest tenant schema version: what a run brings every tenant to.
    pub fn target_version(&self) -> i64 {
        self.schema.latest_version()
    }

    /// Start a fleet migration: create its operation and take its lease, or
    /// take over an unfinished one whose runner died. Then call [`FleetRun::run`].
    pub async fn start(&self, options: FleetOptions, actor: &str) -> Result<FleetRun> {
        let reg = self.registry();
        if let Some(t) = &options.tenant {
            reg.find_tenant(t)
                .await?
                .ok_or_else(|| Error::Invalid(format!("no tenant '{t}'")))?;
        }
        let params = serde_json::to_value(&options).context("encode options")?;
        if options.dry_run {
            let operation = reg
                .create_operation_as(
                    Uuid::now_v7(),
                    OperationKind::MigrateTenantsDryRun,
                    None,
                    params,
                )
                .await?;
            return Ok(FleetRun {
                operation,
                options,
                lease: None,
            });
        }
        match reg
            .create_operation_as(
                Uuid::now_v7(),
                OperationKind::MigrateTenants,
                None,
                params.clone(),
            )
            .await
        {
            Ok(operation) => {
                let lease = reg.try_lock_operation(operation.id).await?;
                reg.audit(
                    actor,
                    "migrations.tenants",
                    None,
                    serde_json::json!({"operation": operation.id, "options": params}),
                )
                .await?;
                Ok(FleetRun {
                    operation,
                    options,
                    lease,
                })
            }
            Err(e) if e.is_unique_violation("operations_one_fleet_migration") => {
                match self.take_over().await? {
                    Some(run) => Ok(run),
                    None => {
                        let running = reg
                            .unfinished_operations(OperationKind::MigrateTenants)
                            .await?;
                        let operation = running.first().map(|o| o.id).unwrap_or_default();
                        Err(Error::Busy {
                            what: format!(
                                "a fleet migration is already running (operation {operation})"
                            ),
                            operation,
                        })
                    }
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// An unfinished fleet migration whose runner died, with its lease now ours.
    pub async fn take_over(&self) -> Result<Option<FleetRun>> {
        let reg = self.registry();
        for operation in reg
            .unfinished_operations(OperationKind::MigrateTenants)
            .await?
        {
            if let Some(lease) = reg.try_lock_operation(operation.id).await? {
                let options = serde_json::from_value(reg.operation_params(operation.id).await?)
                    .unwrap_or_default();
                tracing::info!(operation = %operation.id, "resuming a fleet migration whose runner stopped");
                return Ok(Some(FleetRun {
                    operation,
                    options,
                    lease: Some(lease),
                }));
            }
        }
        Ok(None)
    }

    /// Default concurrency: a tenth of the smallest server budget, 1..=8.
    pub async fn default_concurrency(&self) -> anyhow::Result<usize> {
        let smallest = self
            .registry()
            .servers()
            .await?
            .iter()
            .map(|s| s.max_connections)
            .min()
            .unwrap_or(10);
        Ok(((smallest / 10).max(1) as usize).min(8))
    }

    async fn migrate_one(&self, t: &TenantRecord, target: i64, dry_run: bool) -> TenantResult {
        let started = Instant::now();
        let outcome = if dry_run {
            TenantOutcome::WouldMigrate {
                from: t.schema_version,
                to: target,
            }
        } else {
            match self.migrate_tenant_locked(t).await {
                Ok(to) => TenantOutcome::Migrated {
                    from: t.schema_version,
                    to,
                },
                Err(e) => TenantOutcome::Failed {
                    error: format!("{e:#}"),
                },
            }
        };
        if let TenantOutcome::Failed { error } = &outcome {
            tracing::warn!(tenant_id = %t.id, "failed to migrate tenant: {error}");
        }
        crate::failpoint::hit("fleet_tenant");
        TenantResult {
            tenant_id: t.id,
            slug: t.slug.clone(),
            outcome,
            millis: started.elapsed().as_millis() as u64,
        }
    }

    /// Migrate one tenant's database under its lock, over a short-lived
    /// connection, and record its new version.
    async fn migrate_tenant_locked(&self, t: &TenantRecord) -> anyhow::Result<i64> {
        let reg = self.registry();
        reg.with_tenant_lock(t.id, || async {
            // Re-read under the lock: a move may have switched its server meanwhile.
            let t = &reg.tenant(t.id).await?.context("re-read the tenant")?;
            let admin = self.servers.admin_of(reg, t.server_id).await?;
            let db = admin
                .single_pool(&t.database_name)
                .await
                .context("connect to the tenant database")?;
            let migrated = self.schema.apply(&db, Some(&t.role_name)).await;
            db.close().await;
            let version = migrated?;
            // The role holds its database's privileges alone now.
            roles::leave_legacy_group(&admin, &t.role_name).await?;
            reg.set_schema_version(t.id, version).await?;
            reg.set_own_privileges(t.id).await?;
            anyhow::Ok(version)
        })
        .await
    }
}

/// Tenants in `provisioning` right now.
async fn provisioning(reg: &crate::registry::Registry) -> anyhow::Result<i64> {
    Ok(reg
        .count_by_status()
        .await?
        .into_iter()
        .find(|(status, _)| status == "provisioning")
        .map_or(0, |(_, n)| n))
}

impl FleetRun {
    /// Migrate every tenant behind, reporting each result to `on_result`, and
    /// record the outcome on the operation. Releases the lease at the end.
    pub async fn run(
        mut self,
        p: &Fleet,
        on_result: impl Fn(&TenantResult, FleetProgress) + Send + Sync,
    ) -> anyhow::Result<FleetReport> {
        let op = self.operation.id;
        let outcome = self.run_inner(p, &on_result).await;
        let reg = p.registry();
        let finished = match &outcome {
            Ok(report) if report.failed.is_empty() => {
                reg.finish_operation(op, Ok(serde_json::to_value(report)?))
                    .await
            }
            Ok(report) => {
                let msg = format!("{} tenant(s) failed to migrate", report.failed.len());
                // The per-tenant failures stay readable on the operation.
                reg.fail_operation_with_report(op, &msg, serde_json::to_value(report)?)
                    .await
            }
            Err(e) => reg.finish_operation(op, Err(format!("{e:#}"))).await,
        };
        if let Some(lease) = self.lease.take() {
            lease.release().await;
        }
        finished.context("record the fleet migration's outcome")?;
        outcome
    }

    async fn run_inner(
        &self,
        p: &Fleet,
        on_result: &(impl Fn(&TenantResult, FleetProgress) + Send + Sync),
    ) -> anyhow::Result<FleetReport> {
        let started = Instant::now();
        let reg = p.registry();
        let target = p.target_version();
        let only = match &self.options.tenant {
            Some(t) => Some(
                reg.find_tenant(t)
                    .await?
                    .with_context(|| format!("find tenant '{t}'"))?
                    .id,
            ),
            None => None,
        };
        let concurrency = match self.options.concurrency {
            Some(n) => n.clamp(1, MAX_CONCURRENCY),
            None => p.default_concurrency().await?,
        };
        let mut report = FleetReport {
            target_version: target,
            ..FleetReport::default()
        };
        let mut progress = FleetProgress::default();
        let mut visited: HashSet<Uuid> = HashSet::new();
        // Set while the run waits for creates in flight before it ends.
        let mut settling_until: Option<Instant> = None;
        loop {
            // Re-read who is behind: tenants created during the run are included.
            let batch: Vec<TenantRecord> = reg
                .tenants_behind(target, only)
                .await?
                .into_iter()
                .filter(|t| visited.insert(t.id))
                .collect();
            if batch.is_empty() {
                // A tenant still provisioning (perhaps by an older replica) may
                // land behind: wait for creates in flight, then look again.
                if !self.options.dry_run && provisioning(reg).await? > 0 {
                    let until =
                        *settling_until.get_or_insert_with(|| Instant::now() + SETTLE_LIMIT);
                    if Instant::now() < until {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                    tracing::warn!("ending a fleet migration with tenants still provisioning; the next run picks them up");
                }
                break;
            }
            settling_until = None;
            progress.total += batch.len();
            progress.left += batch.len();
            let permits = Arc::new(Semaphore::new(concurrency));
            let mut set = tokio::task::JoinSet::new();
            for t in batch {
                let (p, permits, dry_run) = (p.clone(), permits.clone(), self.options.dry_run);
                set.spawn(async move {
                    let _permit = permits
                        .acquire_owned()
                        .await
                        .expect("semaphore is never closed");
                    p.migrate_one(&t, target, dry_run).await
                });
            }
            let mut last_write = Instant::now();
            while let Some(done) = set.join_next().await {
                let result = done.context("join a tenant migration task")?;
                progress.left -= 1;
                progress.done += 1;
                match &result.outcome {
                    TenantOutcome::Migrated { .. } => report.migrated += 1,
                    TenantOutcome::WouldMigrate { .. } => {
                        report.would_migrate += 1;
                        report.pending.push(result.slug.clone());
                    }
                    TenantOutcome::Failed { .. } => {
                        progress.failed += 1;
                        report.failed.push(result.clone());
                    }
                }
                on_result(&result, progress);
                if last_write.elapsed().as_millis() >= 500 || progress.left == 0 {
                    last_write = Instant::now();
                    reg.set_progress(self.operation.id, serde_json::to_value(progress)?)
                        .await?;
                }
            }
            if self.options.dry_run {
                break; // nothing changes, so re-reading would find the same tenants
            }
        }
        reg.set_progress(self.operation.id, serde_json::to_value(progress)?)
            .await?;
        report.seconds = started.elapsed().as_secs_f64();
        metrics::counter!("silo_fleet_migrated_total").increment(report.migrated as u64);
        metrics::counter!("silo_fleet_failed_total").increment(report.failed.len() as u64);
        Ok(report)
    }
}
