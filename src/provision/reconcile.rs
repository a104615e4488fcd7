//! The reconciler: makes the servers agree with the registry after a crash.
//!
//! One pass, per server under its maintenance lock: rebuild the template if
//! behind, drop `silo_` databases and roles that no live registry row accounts
//! for, drop stale spares, set each tenant role's LOGIN to match its tenant's
//! state. Then, per tenant under its lock (skipped if someone holds it, since
//! then its operation is alive): finish `provisioning` and `deleting` tenants
//! whose process died. Listing the server's objects *before* reading the
//! registry is what makes the sweep safe: every tenant row is written before
//! its database or role exists.

use std::collections::{HashMap, HashSet};

use anyhow::Context;
use serde::Serialize;

use super::lifecycle::set_role_login;
use super::{Provisioner, ServerAdmin, REFILL_BATCH, SPARE_DB_PREFIX, TENANT_DB_PREFIX};
use crate::registry::{DbServer, TenantStatus};

/// What one reconcile pass did.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct ReconcileReport {
    pub provisioning_finished: u32,
    pub deletes_finished: u32,
    pub orphan_databases_dropped: u32,
    pub orphan_roles_dropped: u32,
    pub spares_dropped: u32,
    pub logins_fixed: u32,
    /// Restore/verify scratch databases whose runner died, dropped.
    pub scratch_databases_dropped: u32,
    /// Moves whose process died, finished or rolled back.
    pub moves_settled: u32,
    /// Subscriptions and replication slots of moves that are over, dropped.
    pub move_leftovers_dropped: u32,
    /// Databases a move left behind without verifying its copy, renamed `silo_kept_*`.
    pub unverified_sources_kept: u32,
    /// Backups, uploads and backup operations left by a stopped process.
    pub backups: crate::backup::BackupSweep,
    pub errors: Vec<String>,
}

impl Provisioner {
    /// One full reconcile pass over every server and every unsettled tenant.
    #[tracing::instrument(skip(self))]
    pub async fn reconcile_once(&self) -> anyhow::Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        let reg = self.registry();
        // Before the servers' sweep: a settled move leaves nothing it must protect.
        match self.sweep_moves().await {
            Ok(n) => report.moves_settled = n,
            Err(e) => report
                .errors
                .push(format!("settle interrupted moves: {e:#}")),
        }
        for server in reg.servers().await? {
            // Wait (not try): the warm pool holds this lock only for a clone or
            // two, and skipping would leave a crash's debris for a whole interval.
            let lock = reg.lock_server(server.id).await?;
            let swept = self.reconcile_server(&server, &mut report).await;
            lock.release().await;
            if let Err(e) = swept {
                report.errors.push(format!("server {}: {e:#}", server.name));
            }
        }
        for t in reg
            .tenants_in(&[TenantStatus::Provisioning, TenantStatus::Deleting])
            .await?
        {
            let Some(lock) = reg.try_lock_tenant(t.id).await? else {
                continue; // its operation is alive somewhere
            };
            let outcome = match t.status {
                TenantStatus::Provisioning => self
                    .finish_locked(t.id)
                    .await
                    .map(|_| report.provisioning_finished += 1)
                    .map_err(anyhow::Error::from),
                _ => self
                    .finish_delete_locked(t.id)
                    .await
                    .map(|_| report.deletes_finished += 1),
            };
            lock.release().await;
            if t.status == TenantStatus::Deleting {
                self.finish_delete_operations(t.id, &outcome).await?;
            }
            if let Err(e) = outcome {
                report.errors.push(format!("tenant {}: {e:#}", t.slug));
            }
        }
        match self.sweep_backups().await {
            Ok(swept) => report.backups = swept,
            Err(e) => report.errors.push(format!("sweep backups: {e:#}")),
        }
        for e in &report.errors {
            tracing::warn!("reconcile: failed to {e}");
        }
        Ok(report)
    }

    async fn reconcile_server(
        &self,
        server: &DbServer,
        report: &mut ReconcileReport,
    ) -> anyhow::Result<()> {
        let admin = self.servers().admin(server)?;
        self.ensure_template(server, &admin).await?;

        // 1. What exists on the server (read first; see the module comment).
        let databases: Vec<String> = sqlx::query_scalar(
            "SELECT datname::text FROM pg_database WHERE datname LIKE 'silo\\_t\\_%' OR datname LIKE 'silo\\_spare\\_%'",
        )
        .fetch_all(&admin.pool)
        .await
        .context("list databases")?;
        let roles: Vec<(String, bool)> = sqlx::query_as(
            "SELECT rolname::text, rolcanlogin FROM pg_roles WHERE rolname LIKE 'silo\\_r\\_%'",
        )
        .fetch_all(&admin.pool)
        .await
        .context("list roles")?;

        let spare_roles: Vec<String> = sqlx::query_scalar(
            "SELECT rolname::text FROM pg_roles WHERE rolname LIKE 'silo\\_rs\\_%'",
        )
        .fetch_all(&admin.pool)
        .await
        .context("list spare roles")?;

        // 2. What the registry accounts for: its tenants, and both ends of open moves.
        let reg = self.registry();
        // Moves first: a move stays open until after its switch, so whichever
        // of the two reads comes second still covers a database being moved.
        let moves = self.moves_touching(server.id).await?;
        let live = reg.tenants_on_server(server.id).await?;
        let mut live_dbs: HashSet<&str> = live.iter().map(|t| t.database_name.as_str()).collect();
        live_dbs.extend(moves.iter().map(|m| m.database.as_str()));
        let mut live_roles: HashMap<&str, Option<TenantStatus>> = live
            .iter()
            .map(|t| (t.role_name.as_str(), Some(t.status)))
            .collect();
        // A moving tenant's role: its LOGIN is the move's business (frozen at cut-over).
        live_roles.extend(moves.iter().map(|m| (m.role.as_str(), None)));
        let latest = self.latest_version();
        let spares = reg.spares(server.id).await?;
        let good_spares: HashSet<&str> = spares
            .iter()
            // A newer spare belongs to a newer replica during a rolling deploy: keep it.
            .filter(|s| s.schema_version >= latest && s.role_name.is_some())
            .map(|s| s.database_name.as_str())
            .collect();
        let good_spare_roles: HashSet<&str> = spares
            .iter()
            .filter(|s| good_spares.contains(s.database_name.as_str()))
            .filter_map(|s| s.role_name.as_deref())
            .collect();

        // Replication leftovers first: a database with a subscription cannot be dropped.
        report.move_leftovers_dropped += self.sweep_move_leftovers(&admin).await?;
        for db in &databases {
            let orphan = if db.starts_with(TENANT_DB_PREFIX) {
                !live_dbs.contains(db.as_str())
            } else {
                db.starts_with(SPARE_DB_PREFIX) && !good_spares.contains(db.as_str())
            };
            if orphan && db.starts_with(TENANT_DB_PREFIX) {
                // What a move left behind without verifying its copy is kept, not dropped.
                if reg.unverified_move_source(db, server.id).await? {
                    if let Some(tenant) = db
                        .strip_prefix(TENANT_DB_PREFIX)
                        .and_then(|h| uuid::Uuid::parse_str(h).ok())
                    {
                        super::relocate::set_aside(&admin, db, tenant).await?;
                        report.unverified_sources_kept += 1;
                        continue;
                    }
                }
            }
            if orphan {
                drop_database(&admin, db).await?;
                if db.starts_with(SPARE_DB_PREFIX) {
                    report.spares_dropped += 1;
                } else {
                    report.orphan_databases_dropped += 1;
                }
            }
        }
        for spare in &spares {
            if !good_spares.contains(spare.database_name.as_str())
                || !databases.contains(&spare.database_name)
            {
                reg.delete_spare(&spare.database_name).await?;
            }
        }
        for (role, can_login) in &roles {
            match live_roles.get(role.as_str()) {
                None => {
                    admin
                        .exec(&format!("DROP ROLE IF EXISTS \"{role}\""))
                        .await
                        .context("drop orphan role")?;
                    report.orphan_roles_dropped += 1;
                }
                Some(status) => {
                    let want = match status {
                        Some(TenantStatus::Active) => Some(true),
                        Some(TenantStatus::Suspended | TenantStatus::Archived) => Some(false),
                        _ => None,
                    };
                    if want.is_some_and(|want| want != *can_login) {
                        set_role_login(&admin, role, !can_login).await?;
                        report.logins_fixed += 1;
                    }
                }
            }
        }
        // Spare roles last: their databases (which hold their CONNECT grant) are gone by now.
        for role in spare_roles
            .iter()
            .filter(|r| !good_spare_roles.contains(r.as_str()))
        {
            admin
                .exec(&format!("DROP ROLE IF EXISTS \"{role}\""))
                .await
                .context("drop an orphan spare role")?;
            report.orphan_roles_dropped += 1;
        }
        report.scratch_databases_dropped += self.sweep_scratch_databases(&admin).await?;
        let server = reg.server(server.id).await?.context("re-read server")?;
        self.refill_warm_pool(&server, &admin, REFILL_BATCH).await?;
        Ok(())
    }
}

async fn drop_database(admin: &ServerAdmin, db: &str) -> anyhow::Result<()> {
    tracing::info!(
        database = db,
        "dropping database no registry row accounts for"
    );
    admin
        .exec(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
        .await
        .with_context(|| format!("drop orphan database {db}"))
}
