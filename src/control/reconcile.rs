//! The reconciler: makes the servers agree with the registry after a crash.
//!
//! One pass settles interrupted moves, then visits each server under its
//! maintenance lock in three steps:
//!
//! 1. **Observe** what silo's prefixes name on the server ([`Observed`]),
//!    *before* reading the registry: every tenant row is written before its
//!    database or role exists, so whatever the server shows is covered by the
//!    registry read that follows ([`Accounted`]). Spares and templates are
//!    made under the same lock, so none is in the making, except a clone
//!    a dead process left running in PostgreSQL: it is ended first.
//! 2. **Plan**: [`plan`] is a pure function from the two to a list of
//!    [`Action`]s, unit-tested on tables of cases without PostgreSQL.
//! 3. **Apply** exactly what the plan says, logging each action.
//!
//! Then the template and warm pool are brought up to date, tenants left
//! `provisioning` or `deleting` by a dead process are finished (each under
//! its lock, skipped if someone holds it: then its operation is alive), and
//! backups, restores and archivals of dead processes are settled.

use std::collections::{HashMap, HashSet};

use anyhow::Context;
use serde::Serialize;
use uuid::Uuid;

use super::ControlPlane;

/// Legacy tenant databases regranted per reconcile pass.
const REGRANT_BATCH: i64 = 50;
use crate::registry::{DbServer, TenantStatus};
use crate::servers::names::{self, SPARE_DB_PREFIX, TENANT_DB_PREFIX};
use crate::servers::roles::Kept;
use crate::servers::{owner, roles, ServerAdmin};

/// What one reconcile pass did.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct ReconcileReport {
    pub provisioning_finished: u32,
    pub deletes_finished: u32,
    /// Credential rotations a crash interrupted, finished.
    pub rotations_finished: u32,
    /// Tenant databases no live tenant accounts for (deleted, failed, or
    /// replaced by a restore), renamed `silo_kept_*` and dropped after the
    /// grace period.
    pub databases_quarantined: u32,
    /// Tenant roles no live tenant accounts for: NOLOGIN, renamed aside.
    pub roles_quarantined: u32,
    /// Quarantined databases and roles whose grace period ended, dropped.
    pub kept_dropped: u32,
    /// Tenant databases and roles the registry has no row for at all (a
    /// control DB restored to an earlier point): kept, and reported here
    /// until `silo reconcile --adopt` registers them again.
    pub unregistered: Vec<String>,
    /// Live tenants whose registered database was gone while one other
    /// database of theirs was there (a control DB restored to before a
    /// restore swapped that one in): pointed at it.
    pub databases_found: u32,
    /// Servers whose sweep stopped: their cluster is another's, or the pass
    /// would have quarantined too many tenants at once.
    pub halted: Vec<String>,
    pub spares_dropped: u32,
    /// Roles of spares that are gone, dropped.
    pub spare_roles_dropped: u32,
    pub logins_fixed: u32,
    /// Reader roles (of read-only app credentials) made again where their
    /// tenant lacked one, or dropped where their tenant's role is gone.
    pub readers_fixed: u32,
    /// Roles of live tenants gone from their server (their databases
    /// there), made again with the recorded password.
    pub roles_made_again: u32,
    /// Sources of failed moves whose publication and fence schema were
    /// left (the source was down when the move failed), cleaned up.
    pub move_sources_cleaned: u32,
    /// Marks of live tenants' databases written again: under the current
    /// master key, naming the tenant as the registry has it.
    pub marks_refreshed: u32,
    /// Settings tenant roles gave themselves (`ALTER ROLE … SET`), reset.
    pub role_settings_reset: u32,
    /// Tenant roles given silo's own settings (`SILO_TENANT_TEMP_FILE_LIMIT_MB`),
    /// which they lacked or held with another value.
    pub role_settings_set: u32,
    /// Tenants whose role (or reader) had set itself another password than
    /// the registry's, given theirs back.
    pub passwords_restored: u32,
    /// Restore/verify scratch databases whose runner died, dropped.
    pub scratch_databases_dropped: u32,
    /// Moves whose process died, finished or rolled back.
    pub moves_settled: u32,
    /// Subscriptions and replication slots of moves that are over, dropped.
    pub move_leftovers_dropped: u32,
    /// Databases a move left behind without verifying its copy, renamed `silo_kept_*`.
    pub unverified_sources_kept: u32,
    /// Spare and template clones a dead process left running on a server,
    /// ended before its sweep (else they could commit behind it).
    pub abandoned_clones_ended: u32,
    /// Sessions of roles that may not log in (a suspend that stopped half-way), ended.
    pub sessions_ended: u32,
    /// Tenant databases granted through the legacy shared group, regranted
    /// to their own role alone.
    pub privileges_regranted: u32,
    /// Backups, uploads and backup operations left by a stopped process.
    pub backups: crate::backup::BackupSweep,
    pub errors: Vec<String>,
}

/// What a server holds under silo's prefixes.
#[derive(Debug, Default, Clone)]
pub struct Observed {
    /// `silo_t_*` and `silo_spare_*` databases.
    pub databases: Vec<String>,
    /// `silo_r_*` roles, and whether each may log in.
    pub roles: Vec<(String, bool)>,
    /// `silo_rs_*` roles (of spares).
    pub spare_roles: Vec<String>,
    /// `silo_r_*` roles with at least one session open.
    pub with_sessions: Vec<String>,
    /// Databases and roles set aside (`silo_kept_*`).
    pub kept: Vec<Kept>,
}

/// A tenant row as the plan needs it.
#[derive(Debug, Clone)]
pub struct AccountedTenant {
    pub database: String,
    pub role: String,
    pub status: TenantStatus,
}

/// A spare row as the plan needs it.
#[derive(Debug, Clone)]
pub struct AccountedSpare {
    pub database: String,
    pub role: Option<String>,
    pub schema_version: i64,
    /// Granted to its own role alone (else a legacy spare: replaced).
    pub own_privileges: bool,
}

/// What the registry accounts for on a server.
#[derive(Debug, Default, Clone)]
pub struct Accounted {
    /// Tenants on the server that are not deleted.
    pub tenants: Vec<AccountedTenant>,
    /// Database and role of every open move with an end on the server.
    pub moving: Vec<(String, String)>,
    pub spares: Vec<AccountedSpare>,
    /// The tenant schema version spares must be at.
    pub latest_version: i64,
    /// Databases a move left behind without verifying its copy.
    pub unverified_sources: HashSet<String>,
    /// The registry row, on any server and in any state, of every tenant
    /// the observed names point at (none: the registry never heard of it).
    pub rows: HashMap<Uuid, RowOf>,
    /// Spare databases and roles the registry records on other servers
    /// (the same cluster registered twice): not this server's to drop.
    pub spares_elsewhere: HashSet<String>,
    /// Now, in Unix seconds: kept objects past their `drop_after` go.
    pub now: i64,
}

/// Where and in what state the registry has a tenant.
#[derive(Debug, Clone)]
pub struct RowOf {
    pub status: TenantStatus,
    /// On the server being swept.
    pub here: bool,
    /// On another server, on another cluster, where its database was found:
    /// what the server being swept holds under its name is a copy.
    pub copy: bool,
    /// Active or suspended here, but the database the registry names is
    /// not on the server: another database of the tenant here is its data
    /// (the registry is older than a restore's swap), not a leftover.
    pub lost: bool,
}

/// Most tenants one pass may quarantine on a server: a tenth of those it
/// holds, and at least one. More means the registry and the server
/// disagree wholesale (a wrong URL, another deployment's cluster, a control
/// DB restored wrongly): the pass stops and says so instead.
pub fn quarantine_limit(live_tenants: usize) -> usize {
    (live_tenants / 10).max(1)
}

/// One thing the reconciler does to a server (or to the registry's spares).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A database a move left unverified: renamed aside, never dropped.
    SetAside { database: String, tenant: Uuid },
    /// A tenant database whose tenant is deleted or failed, or that a
    /// restore replaced: renamed aside, dropped after the grace period.
    Quarantine { database: String, tenant: Uuid },
    /// A tenant role whose tenant is deleted or failed: NOLOGIN, renamed aside.
    QuarantineRole { role: String, tenant: Uuid },
    /// A tenant database or role the registry has no row for: kept, reported.
    Unregistered(String),
    /// The one database here of a live tenant whose registered database is
    /// gone: the registry is pointed at it.
    Found { database: String, tenant: Uuid },
    /// A kept database whose grace period is over.
    DropKept(String),
    /// A kept role whose grace period is over (after the kept databases).
    DropKeptRole(String),
    /// Too much to quarantine at once: nothing is, and an alert is raised.
    Halt { tenants: usize, live: usize },
    /// A spare database that is stale (older schema) or unrecorded.
    DropSpare(String),
    /// A spare row whose database is gone or stale.
    ForgetSpare(String),
    /// A spare role whose spare is gone.
    DropSpareRole(String),
    /// A tenant role whose LOGIN disagrees with its tenant's state.
    SetLogin { role: String, login: bool },
    /// A tenant role that may not log in still has sessions: end them.
    EndSessions(String),
}

/// Tenant database marks one reconcile pass writes again, at most (a
/// master-key rotation retires every mark at once).
const MARKS_PER_PASS: u32 = 500;

/// What to do with a tenant database or role no live tenant here accounts for.
enum Fate {
    Quarantine(Uuid),
    /// A copy of a tenant whose registered database is shown to live on
    /// another cluster (a failed move's target): quarantined, and not
    /// counted against the halt, which guards against what the registry
    /// cannot vouch for.
    Copy(Uuid),
    /// Its tenant's registered database is gone: this may be its data.
    Found(Uuid),
    Unregistered,
    /// Live on another server (the same cluster registered twice), or not a
    /// tenant name silo makes: not this pass's business.
    Leave,
}

fn fate(name: &str, tenant: Option<Uuid>, accounted: &Accounted) -> Fate {
    let Some(tenant) = tenant else {
        return Fate::Leave;
    };
    match accounted.rows.get(&tenant) {
        None => Fate::Unregistered,
        Some(row) if matches!(row.status, TenantStatus::Deleted | TenantStatus::Failed) => {
            Fate::Quarantine(tenant)
        }
        // Its registered database is gone: never quarantined (it may be
        // the only copy of the tenant's data).
        Some(row) if row.here && row.lost => Fate::Found(tenant),
        // Live here under another name: what a restore replaced.
        Some(row) if row.here => Fate::Quarantine(tenant),
        // Live on another cluster, where its database is: a copy (a failed move's).
        Some(row) if row.copy => Fate::Copy(tenant),
        Some(_) => {
            tracing::debug!(name, "left alone: its tenant lives on another server");
            Fate::Leave
        }
    }
}

/// Decide what to do, from what exists and what the registry accounts for.
/// Databases first, then the registry's spares, then roles (a role cannot
/// be dropped while a database grants it CONNECT), spare roles, and kept
/// objects past their grace period last. Nothing that may hold a tenant's
/// data is dropped here: it is quarantined, and only a quarantined object
/// past its grace period goes.
pub fn plan(observed: &Observed, accounted: &Accounted) -> Vec<Action> {
    let mut live_dbs: HashSet<&str> = accounted
        .tenants
        .iter()
        .map(|t| t.database.as_str())
        .collect();
    live_dbs.extend(accounted.moving.iter().map(|(db, _)| db.as_str()));
    // A moving tenant's role: its LOGIN is the move's business (frozen at cut-over).
    let mut live_roles: HashMap<&str, Option<TenantStatus>> = accounted
        .tenants
        .iter()
        .map(|t| (t.role.as_str(), Some(t.status)))
        .collect();
    live_roles.extend(
        accounted
            .moving
            .iter()
            .map(|(_, role)| (role.as_str(), None)),
    );
    // A newer spare belongs to a newer replica during a rolling deploy: keep it.
    let good_spares: HashSet<&str> = accounted
        .spares
        .iter()
        .filter(|s| {
            s.schema_version >= accounted.latest_version && s.role.is_some() && s.own_privileges
        })
        .map(|s| s.database.as_str())
        .collect();
    let good_spare_roles: HashSet<&str> = accounted
        .spares
        .iter()
        .filter(|s| good_spares.contains(s.database.as_str()))
        .filter_map(|s| s.role.as_deref())
        .collect();

    let mut actions = Vec::new();
    let mut quarantines = Vec::new();
    let mut copies = Vec::new();
    let mut found: HashMap<Uuid, Vec<String>> = HashMap::new();
    for db in &observed.databases {
        if db.starts_with(TENANT_DB_PREFIX) && !live_dbs.contains(db.as_str()) {
            let tenant = names::tenant_of_database(db);
            match tenant {
                Some(tenant) if accounted.unverified_sources.contains(db) => {
                    actions.push(Action::SetAside {
                        database: db.clone(),
                        tenant,
                    })
                }
                _ => match fate(db, tenant, accounted) {
                    Fate::Quarantine(tenant) => quarantines.push(Action::Quarantine {
                        database: db.clone(),
                        tenant,
                    }),
                    Fate::Copy(tenant) => copies.push(Action::Quarantine {
                        database: db.clone(),
                        tenant,
                    }),
                    Fate::Found(tenant) => found.entry(tenant).or_default().push(db.clone()),
                    Fate::Unregistered => actions.push(Action::Unregistered(db.clone())),
                    Fate::Leave => {}
                },
            }
        } else if db.starts_with(SPARE_DB_PREFIX)
            && !good_spares.contains(db.as_str())
            && !accounted.spares_elsewhere.contains(db)
        {
            actions.push(Action::DropSpare(db.clone()));
        }
    }
    // One candidate: the tenant's database. Several: kept, for a person.
    let mut found: Vec<(Uuid, Vec<String>)> = found.into_iter().collect();
    found.sort();
    for (tenant, mut databases) in found {
        if databases.len() == 1 {
            let database = databases.pop().expect("one");
            actions.push(Action::Found { database, tenant });
        } else {
            actions.extend(databases.into_iter().map(Action::Unregistered));
        }
    }
    for spare in &accounted.spares {
        if !good_spares.contains(spare.database.as_str())
            || !observed.databases.contains(&spare.database)
        {
            actions.push(Action::ForgetSpare(spare.database.clone()));
        }
    }
    for (role, can_login) in &observed.roles {
        match live_roles.get(role.as_str()) {
            None => match fate(role, names::tenant_of_role(role), accounted) {
                Fate::Quarantine(tenant) => quarantines.push(Action::QuarantineRole {
                    role: role.clone(),
                    tenant,
                }),
                Fate::Copy(tenant) => copies.push(Action::QuarantineRole {
                    role: role.clone(),
                    tenant,
                }),
                // A role of a tenant whose data is being found again: kept.
                Fate::Found(_) | Fate::Unregistered => {
                    actions.push(Action::Unregistered(role.clone()))
                }
                Fate::Leave => {}
            },
            Some(status) => {
                let want = match status {
                    Some(TenantStatus::Active) => Some(true),
                    Some(TenantStatus::Suspended | TenantStatus::Archived) => Some(false),
                    _ => None,
                };
                if let Some(login) = want.filter(|want| want != can_login) {
                    actions.push(Action::SetLogin {
                        role: role.clone(),
                        login,
                    });
                }
                if want == Some(false) && observed.with_sessions.contains(role) {
                    actions.push(Action::EndSessions(role.clone()));
                }
            }
        }
    }
    let tenants: HashSet<Uuid> = quarantines
        .iter()
        .filter_map(|a| match a {
            Action::Quarantine { tenant, .. } | Action::QuarantineRole { tenant, .. } => {
                Some(*tenant)
            }
            _ => None,
        })
        .collect();
    let live = accounted.tenants.len();
    if tenants.len() > quarantine_limit(live) {
        actions.push(Action::Halt {
            tenants: tenants.len(),
            live,
        });
    } else {
        copies.extend(quarantines);
    }
    // Databases before roles: a role is renamed after its database went aside.
    copies.sort_by_key(|a| matches!(a, Action::QuarantineRole { .. }));
    actions.extend(copies);
    for role in &observed.spare_roles {
        if !good_spare_roles.contains(role.as_str()) && !accounted.spares_elsewhere.contains(role) {
            actions.push(Action::DropSpareRole(role.clone()));
        }
    }
    let due = |k: &&Kept| k.drop_after.is_some_and(|t| t <= accounted.now);
    actions.extend(
        observed
            .kept
            .iter()
            .filter(|k| !k.role)
            .filter(due)
            .map(|k| Action::DropKept(k.name.clone())),
    );
    actions.extend(
        observed
            .kept
            .iter()
            .filter(|k| k.role)
            .filter(due)
            .map(|k| Action::DropKeptRole(k.name.clone())),
    );
    actions
}

impl ControlPlane {
    /// One full reconcile pass over every server and every unsettled tenant.
    #[tracing::instrument(skip(self))]
    pub async fn reconcile_once(&self) -> anyhow::Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        let reg = self.registry();
        // Before the servers' sweep: a settled move leaves nothing it must protect.
        match self.mover().sweep_moves().await {
            Ok(n) => report.moves_settled = n,
            Err(e) => report
                .errors
                .push(format!("settle interrupted moves: {e:#}")),
        }
        match self.mover().clean_failed_sources().await {
            Ok(n) => report.move_sources_cleaned = n,
            Err(e) => report
                .errors
                .push(format!("clean up after failed moves: {e:#}")),
        }
        for server in reg.servers().await? {
            // Wait (not try): the warm pool holds this lock only for a clone or
            // two, and skipping would leave a crash's debris for a whole interval.
            let swept = reg
                .with_server_lock(server.id, || self.reconcile_server(&server, &mut report))
                .await;
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
            // A backup of a deleting tenant under way: its final backup
            // follows it, at a later pass (its delete stays open meanwhile).
            if t.status == TenantStatus::Deleting && reg.running_backup(t.id).await?.is_some() {
                lock.release().await;
                continue;
            }
            let outcome = match t.status {
                TenantStatus::Provisioning => self
                    .provisioner()
                    .finish_locked(t.id)
                    .await
                    .map(|_| report.provisioning_finished += 1)
                    .map_err(|e| anyhow::anyhow!("{}", e.detail())),
                _ => self
                    .finish_delete_locked(t.id)
                    .await
                    .map(|_| report.deletes_finished += 1),
            };
            lock.release().await;
            if t.status == TenantStatus::Deleting {
                self.provisioner()
                    .finish_delete_operations(t.id, &outcome)
                    .await?;
            }
            if let Err(e) = outcome {
                report.errors.push(format!("tenant {}: {e:#}", t.slug));
            }
        }
        for id in reg.tenants_rotating().await? {
            let Some(lock) = reg.try_lock_tenant(id).await? else {
                continue; // the rotation is running
            };
            let finished = self.provisioner().finish_rotation_locked(id).await;
            lock.release().await;
            match finished {
                Ok(true) => report.rotations_finished += 1,
                Ok(false) => {}
                Err(e) => report.errors.push(format!(
                    "finish the credential rotation of tenant {id}: {}",
                    e.detail()
                )),
            }
        }
        match self.regrant_shared().await {
            Ok(n) => report.privileges_regranted = n,
            Err(e) => report
                .errors
                .push(format!("regrant tenant databases: {e:#}")),
        }
        if let Ok(backups) = self.backups() {
            match backups.sweep_backups().await {
                Ok(swept) => report.backups = swept,
                Err(e) => report.errors.push(format!("sweep backups: {e:#}")),
            }
        }
        for e in &report.errors {
            tracing::warn!("reconcile: failed to {e}");
        }
        Ok(report)
    }

    /// Tenant databases made before per-tenant privileges (granted through
    /// one group shared by every tenant): granted to their own role alone,
    /// the group's privileges and membership taken away. A few per pass.
    async fn regrant_shared(&self) -> anyhow::Result<u32> {
        let reg = self.registry();
        let mut done = 0;
        for t in reg.tenants_with_shared_privileges(REGRANT_BATCH).await? {
            let Some(lock) = reg.try_lock_tenant(t.id).await? else {
                continue;
            };
            let regranted = async {
                let t = reg.tenant(t.id).await?.context("re-read the tenant")?;
                if t.own_privileges || t.provision_step.is_some() {
                    return anyhow::Ok(false);
                }
                let admin = self.provisioner().admin_for(&t).await?;
                let db = admin
                    .single_pool(&t.database_name)
                    .await
                    .context("connect to the tenant database")?;
                let granted = crate::servers::schema::grant(&db, Some(&t.role_name)).await;
                db.close().await;
                granted?;
                roles::leave_legacy_group(&admin, &t.role_name).await?;
                // Its mark written again, as today's code writes it (sealed;
                // databases a restore or a move made before had none).
                let mark = owner::TenantMark::of(reg.control_id().await?, &t);
                admin
                    .exec(&owner::tenant_mark_sql(
                        &t.database_name,
                        &mark,
                        self.keyring(),
                    ))
                    .await?;
                reg.set_own_privileges(t.id).await?;
                anyhow::Ok(true)
            }
            .await;
            lock.release().await;
            if regranted.with_context(|| format!("tenant {}", t.slug))? {
                tracing::info!(tenant_id = %t.id, "tenant database granted to its own role alone");
                done += 1;
            }
        }
        Ok(done)
    }

    async fn reconcile_server(
        &self,
        server: &DbServer,
        report: &mut ReconcileReport,
    ) -> anyhow::Result<()> {
        let admin = self.servers().admin(server)?;
        if let Some(why) = self.ownership(server, &admin).await? {
            // Not ours to touch: no sweep, no template, no spares.
            tracing::error!(server = %server.name, "reconcile: not touching tenant server '{}': {why}", server.name);
            metrics::gauge!("silo_reconcile_halted", "server" => server.name.clone()).set(1.0);
            report.halted.push(format!("server {}: {why}", server.name));
            return Ok(());
        }
        // Before anything is looked at: a dead process's clone still running
        // would otherwise commit behind the sweep.
        let (ended, stuck) = roles::end_abandoned_clones(&admin)
            .await
            .context("end clones left running by a dead process")?;
        report.abandoned_clones_ended += ended;
        anyhow::ensure!(
            stuck == 0,
            "{stuck} clone(s) a dead process left running did not end within 5 s: not swept this pass"
        );
        self.provisioner().ensure_template(server, &admin).await?;
        // Observed first (see the module comment), then what the registry says.
        let observed = observe(&admin).await?;
        let accounted = self.accounted(server, &admin, &observed).await?;
        // Replication leftovers first: a database with a subscription cannot be dropped.
        report.move_leftovers_dropped += self.mover().sweep_move_leftovers(&admin).await?;
        let mut halted = false;
        for action in plan(&observed, &accounted) {
            halted |= matches!(action, Action::Halt { .. });
            self.apply(server, &admin, &action, report)
                .await
                .with_context(|| format!("{action:?}"))?;
        }
        metrics::gauge!("silo_reconcile_halted", "server" => server.name.clone()).set(if halted {
            1.0
        } else {
            0.0
        });
        report.scratch_databases_dropped +=
            crate::backup::sweep_scratch_databases(self.registry(), &admin).await?;
        // Live tenants of this server, read once for both.
        let live: Vec<_> = self
            .registry()
            .tenants_on_server(server.id)
            .await?
            .into_iter()
            .filter(|t| matches!(t.status, TenantStatus::Active | TenantStatus::Suspended))
            .collect();
        report.roles_made_again += self.make_missing_roles(&admin, &live).await?;
        report.passwords_restored += self.restore_passwords(&admin, &live).await?;
        report.marks_refreshed += self.refresh_marks(&admin, &live).await?;
        report.readers_fixed += self.fix_readers(server, &admin).await?;
        let settings = roles::settle_role_settings(&admin).await?;
        report.role_settings_reset += settings.reset;
        report.role_settings_set += settings.set;
        let server = self
            .registry()
            .server(server.id)
            .await?
            .context("re-read server")?;
        self.provisioner()
            .refill_warm_pool(&server, &admin, crate::provision::REFILL_BATCH)
            .await?;
        Ok(())
    }

    /// Roles of live tenants of `server` that are gone from it while their
    /// databases are there, made again ([`crate::provision::Provisioner::make_role_again`]).
    async fn make_missing_roles(
        &self,
        admin: &ServerAdmin,
        live: &[crate::registry::TenantRecord],
    ) -> anyhow::Result<u32> {
        let present: HashSet<String> = sqlx::query_scalar(
            "SELECT rolname::text FROM pg_roles WHERE rolname LIKE 'silo\\_r\\_%'",
        )
        .fetch_all(&admin.pool)
        .await
        .map_err(|e| admin.error(None, e))
        .context("list tenant roles")?
        .into_iter()
        .collect();
        let mut made = 0;
        for t in live {
            if present.contains(&t.role_name) {
                continue;
            }
            match self.provisioner().make_role_again(t.id).await {
                Ok(true) => made += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(tenant_id = %t.id, "failed to make a live tenant's missing role again: {}", e.detail())
                }
            }
        }
        Ok(made)
    }

    /// Live tenants of `server` whose role (or reader) holds a verifier
    /// other than silo's of the recorded password, given theirs back
    /// ([`crate::provision::Provisioner::restore_passwords`]). One read of
    /// `pg_authid` and a 16-iteration check per role; with an admin login
    /// that may not read `pg_authid` (not a superuser), nothing is checked.
    async fn restore_passwords(
        &self,
        admin: &ServerAdmin,
        live: &[crate::registry::TenantRecord],
    ) -> anyhow::Result<u32> {
        let mut wanted = Vec::new();
        for t in live.iter().filter(|t| t.pending_password_enc.is_none()) {
            match self.provisioner().recorded_passwords(t) {
                Ok(roles) => wanted.extend(roles.into_iter().map(|(r, p)| (t.id, r, p))),
                Err(e) => {
                    tracing::warn!(tenant_id = %t.id, "cannot check the tenant role's password: {e:#}")
                }
            }
        }
        let names: Vec<String> = wanted.iter().map(|(_, role, _)| role.clone()).collect();
        let Some(stored) = roles::password_verifiers(admin, &names)
            .await
            .context("read the tenant roles' password verifiers")?
        else {
            return Ok(0);
        };
        let mut changed: Vec<Uuid> = wanted
            .iter()
            .filter(|(_, role, password)| {
                stored.get(role).is_some_and(|v| {
                    crate::servers::scram::check(v.as_deref(), password)
                        != crate::servers::scram::Stored::Ours
                })
            })
            .map(|(id, _, _)| *id)
            .collect();
        changed.dedup();
        let mut restored = 0;
        for id in changed {
            match self.provisioner().restore_passwords(id).await {
                Ok(true) => restored += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(tenant_id = %id, "failed to give a tenant's role its recorded password back: {}", e.detail())
                }
            }
        }
        Ok(restored)
    }

    /// Marks of live tenants' databases on `server` written again where
    /// they are not the tenant as the registry has it, or are sealed under
    /// the master key a rotation retires ([`owner::mark_needs_refresh`]): a
    /// rename, a plan change, a rotation (a mark under a retired key could
    /// no longer be read by `--adopt`). At most [`MARKS_PER_PASS`] a pass.
    async fn refresh_marks(
        &self,
        admin: &ServerAdmin,
        live: &[crate::registry::TenantRecord],
    ) -> anyhow::Result<u32> {
        let comments = owner::tenant_comments(admin).await?;
        let control = self.registry().control_id().await?;
        let mut refreshed = 0;
        for t in live {
            if refreshed >= MARKS_PER_PASS {
                break;
            }
            let Some(comment) = comments.get(&t.database_name) else {
                continue; // not here (yet): the sweep's business
            };
            let want = owner::TenantMark::of(control, t);
            if !owner::mark_needs_refresh(comment.as_deref(), &want, self.keyring()) {
                continue;
            }
            match admin
                .exec(&owner::tenant_mark_sql(
                    &t.database_name,
                    &want,
                    self.keyring(),
                ))
                .await
            {
                Ok(()) => refreshed += 1,
                // Renamed meanwhile (a restore's swap): the next pass.
                Err(e) => {
                    tracing::debug!(tenant_id = %t.id, "left a tenant's mark for the next pass: {e}")
                }
            }
        }
        Ok(refreshed)
    }

    /// Reader roles put right on `server`: made again for a tenant of it
    /// that has one but lacks it there (a crash between making the
    /// tenant's role and its reader), dropped where their tenant's role is
    /// gone (a crash between the two drops of an older silo; both go in
    /// one statement now). A tenant with an operation under way is left to it.
    async fn fix_readers(&self, server: &DbServer, admin: &ServerAdmin) -> anyhow::Result<u32> {
        let wrap = |e| admin.error(None, e);
        // One statement, one snapshot: a reader whose role is not there.
        let orphans: Vec<String> = sqlx::query_scalar(
            "SELECT q.rolname::text FROM pg_roles q
              WHERE q.rolname LIKE 'silo\\_q\\_%' AND NOT EXISTS
                    (SELECT 1 FROM pg_roles r WHERE r.rolname = 'silo_r_' || substr(q.rolname, 8))",
        )
        .fetch_all(&admin.pool)
        .await
        .map_err(wrap)
        .context("list reader roles without their tenant role")?;
        let present: Vec<String> = sqlx::query_scalar(
            "SELECT rolname::text FROM pg_roles WHERE rolname LIKE 'silo\\_q\\_%'",
        )
        .fetch_all(&admin.pool)
        .await
        .map_err(wrap)
        .context("list reader roles")?;
        let mut fixed = 0;
        for reader in orphans {
            roles::drop_role(admin, &reader).await?;
            tracing::info!(server = %server.name, role = reader, "dropped a reader role whose tenant role is gone");
            fixed += 1;
        }
        for (id, role) in self.registry().tenants_with_readers(server.id).await? {
            let Some(reader) = crate::servers::names::reader_role(&role) else {
                continue;
            };
            if present.contains(&reader) {
                continue;
            }
            match self.provisioner().ensure_reader(id).await {
                Ok(()) => {
                    tracing::info!(tenant_id = %id, "made a tenant's missing reader role again");
                    fixed += 1;
                }
                Err(e) => {
                    tracing::debug!(tenant_id = %id, "left a tenant's missing reader role for later: {e}")
                }
            }
        }
        Ok(fixed)
    }

    /// Why this control plane may not touch `server`'s cluster, if it may
    /// not: its ownership marker names another server row or control plane.
    /// An unmarked cluster (registered before markers) is marked now, and
    /// the cluster behind a server registered before clusters were
    /// recorded is recorded (a second server on the same cluster is refused).
    async fn ownership(
        &self,
        server: &DbServer,
        admin: &ServerAdmin,
    ) -> anyhow::Result<Option<String>> {
        let me = owner::Owner {
            control: self.registry().control_id().await?,
            server: server.id,
        };
        let mut state = owner::check(admin, me).await?;
        if state == owner::Ownership::Unmarked {
            state = owner::mark(admin, me).await?;
            if state == owner::Ownership::Ours {
                tracing::info!(server = %server.name, "marked the tenant server's cluster as this control plane's");
            }
        }
        if let Some(why) = state.refusal() {
            return Ok(Some(why));
        }
        if server.system_identifier.is_none() {
            let cluster = owner::cluster_id(admin).await?;
            let recorded = self
                .registry()
                .set_server_cluster(server.id, &cluster.system_identifier, cluster.port)
                .await;
            match recorded {
                Err(e) if e.is_unique_violation("db_servers_cluster_key") => {
                    return Ok(Some(
                        "its cluster is registered already as another server".into(),
                    ))
                }
                other => other?,
            }
        }
        Ok(None)
    }

    /// What the registry accounts for on `server`. Moves are read before
    /// tenants: a move stays open until after its switch, so whichever of
    /// the two reads comes second still covers a database being moved.
    async fn accounted(
        &self,
        server: &DbServer,
        admin: &ServerAdmin,
        observed: &Observed,
    ) -> anyhow::Result<Accounted> {
        let reg = self.registry();
        let spares_elsewhere = reg
            .spares_not_on(server.id)
            .await?
            .into_iter()
            .flat_map(|s| std::iter::once(s.database_name).chain(s.role_name))
            .collect();
        let moving: Vec<(String, String)> = self
            .mover()
            .moves_touching(server.id)
            .await?
            .into_iter()
            .map(|m| (m.database, m.role))
            .collect();
        let tenants: Vec<AccountedTenant> = reg
            .tenants_on_server(server.id)
            .await?
            .into_iter()
            .map(|t| AccountedTenant {
                database: t.database_name,
                role: t.role_name,
                status: t.status,
            })
            .collect();
        // The rows of what no live tenant here accounts for.
        let live: HashSet<&str> = tenants
            .iter()
            .flat_map(|t| [t.database.as_str(), t.role.as_str()])
            .chain(moving.iter().flat_map(|(d, r)| [d.as_str(), r.as_str()]))
            .collect();
        let ids: Vec<Uuid> = observed
            .databases
            .iter()
            .filter(|db| !live.contains(db.as_str()))
            .filter_map(|db| names::tenant_of_database(db))
            .chain(
                observed
                    .roles
                    .iter()
                    .filter(|(role, _)| !live.contains(role.as_str()))
                    .filter_map(|(role, _)| names::tenant_of_role(role)),
            )
            .collect();
        let mut rows = HashMap::new();
        for (id, status, server_id, database) in reg.tenant_states(&ids).await? {
            let here = server_id == server.id;
            let copy = !here && self.live_elsewhere(admin, server_id, &database).await;
            let lost = here
                && matches!(status, TenantStatus::Active | TenantStatus::Suspended)
                && !observed.databases.contains(&database);
            rows.insert(
                id,
                RowOf {
                    status,
                    here,
                    copy,
                    lost,
                },
            );
        }
        let spares = reg
            .spares(server.id)
            .await?
            .into_iter()
            .map(|s| AccountedSpare {
                database: s.database_name,
                role: s.role_name,
                schema_version: s.schema_version,
                own_privileges: s.own_privileges,
            })
            .collect();
        Ok(Accounted {
            tenants,
            moving,
            spares,
            latest_version: self.latest_version(),
            unverified_sources: reg
                .unverified_move_sources(server.id)
                .await?
                .into_iter()
                .collect(),
            rows,
            spares_elsewhere,
            now: chrono::Utc::now().timestamp(),
        })
    }

    /// Whether a tenant that lives on `other` (not the server being swept)
    /// has its database there, on another cluster than `admin`'s: then what
    /// this server holds under its name is a copy (a failed move's, say).
    /// `false` whenever that cannot be shown (the same cluster registered
    /// twice, a cluster not recorded yet, the other server unreachable).
    async fn live_elsewhere(&self, admin: &ServerAdmin, other: Uuid, database: &str) -> bool {
        let shown = async {
            let here = owner::cluster_id(admin).await?;
            let Some(other) = self.registry().server(other).await? else {
                return anyhow::Ok(false);
            };
            let recorded = other.system_identifier.as_deref().zip(other.cluster_port);
            if recorded.is_none_or(|c| c == (here.system_identifier.as_str(), here.port)) {
                return Ok(false);
            }
            let theirs = self.servers().admin(&other)?;
            Ok(roles::database_exists(&theirs, database).await?)
        }
        .await;
        shown.unwrap_or_else(|e| {
            tracing::debug!("could not tell whether a tenant's database lives elsewhere: {e:#}");
            false
        })
    }

    /// Point a live tenant whose registered database is gone at `database`,
    /// the one other database of it on its server, once re-checked under
    /// its lock (busy: the next pass). Audited.
    async fn point_at_found(
        &self,
        server: &DbServer,
        admin: &ServerAdmin,
        database: &str,
        tenant: Uuid,
    ) -> anyhow::Result<bool> {
        let reg = self.registry();
        let Some(lock) = reg.try_lock_tenant(tenant).await? else {
            return Ok(false);
        };
        let pointed = async {
            let t = reg.tenant(tenant).await?.context("re-read the tenant")?;
            if t.server_id != server.id
                || !matches!(t.status, TenantStatus::Active | TenantStatus::Suspended)
                || t.database_name == database
                || roles::database_exists(admin, &t.database_name).await?
                || !roles::database_exists(admin, database).await?
            {
                return anyhow::Ok(false);
            }
            let version = super::adopt::schema_version(admin, database).await?;
            reg.set_tenant_database(t.id, &[t.status], t.status, database, version)
                .await?
                .context("record the tenant's database")?;
            reg.audit(
                "reconciler",
                "tenant.database_found",
                Some(t.id),
                serde_json::json!({"registered": t.database_name, "found": database}),
            )
            .await?;
            tracing::warn!(tenant_id = %t.id, registered = t.database_name, found = database,
                "a live tenant's registered database is gone (a control DB restored to an earlier point?): pointed it at its other database on the server");
            anyhow::Ok(true)
        }
        .await;
        lock.release().await;
        pointed
    }

    async fn apply(
        &self,
        server: &DbServer,
        admin: &ServerAdmin,
        action: &Action,
        report: &mut ReconcileReport,
    ) -> anyhow::Result<()> {
        match action {
            Action::SetAside { database, tenant } => {
                roles::set_aside(admin, database, *tenant).await?;
                report.unverified_sources_kept += 1;
            }
            Action::Quarantine { database, tenant } => {
                let kept =
                    roles::keep_database(admin, database, *tenant, Some(self.drop_after())).await?;
                tracing::warn!(tenant_id = %tenant, database, kept, "quarantined a tenant database no live tenant accounts for (dropped after the grace period)");
                report.databases_quarantined += 1;
            }
            Action::QuarantineRole { role, tenant } => {
                let kept = roles::keep_role(admin, role, *tenant, Some(self.drop_after())).await?;
                tracing::warn!(tenant_id = %tenant, role, kept, "quarantined a tenant role no live tenant accounts for (dropped after the grace period)");
                report.roles_quarantined += 1;
            }
            Action::Found { database, tenant } => {
                if self
                    .point_at_found(server, admin, database, *tenant)
                    .await?
                {
                    report.databases_found += 1;
                }
            }
            Action::Unregistered(name) => {
                tracing::warn!(server = %server.name, name, "the registry has no tenant for this database or role (a control DB restored to an earlier point?): kept; `silo reconcile --adopt` registers it again");
                report.unregistered.push(format!("{}: {name}", server.name));
            }
            Action::DropKept(db) => {
                tracing::info!(
                    database = db,
                    "dropping a quarantined database past its grace period"
                );
                roles::drop_database(admin, db).await?;
                report.kept_dropped += 1;
            }
            Action::DropKeptRole(role) => {
                tracing::info!(role, "dropping a quarantined role past its grace period");
                roles::drop_role(admin, role).await?;
                report.kept_dropped += 1;
            }
            Action::Halt { tenants, live } => {
                let why = format!("the pass would quarantine {tenants} tenants' databases or roles of the {live} the server holds (more than {}): nothing was quarantined; check the server's URL and the registry, then quarantine by hand or raise the share", quarantine_limit(*live));
                tracing::error!(server = %server.name, "reconcile: {why}");
                report.halted.push(format!("server {}: {why}", server.name));
            }
            Action::DropSpare(db) => {
                tracing::info!(database = db, "dropping a stale or unrecorded spare");
                roles::drop_database(admin, db).await?;
                report.spares_dropped += 1;
            }
            Action::ForgetSpare(db) => {
                self.registry().delete_spare(db).await?;
            }
            Action::DropSpareRole(role) => {
                tracing::info!(role, "dropping a spare role no spare accounts for");
                roles::drop_role(admin, role).await?;
                report.spare_roles_dropped += 1;
            }
            Action::SetLogin { role, login } => {
                tracing::info!(
                    role,
                    login,
                    "setting a tenant role's login to match its state"
                );
                roles::set_role_login(admin, role, *login).await?;
                report.logins_fixed += 1;
            }
            Action::EndSessions(role) => {
                tracing::info!(
                    role,
                    "ending the sessions of a tenant role that may not log in"
                );
                roles::terminate_sessions(admin, role).await?;
                report.sessions_ended += 1;
            }
        }
        Ok(())
    }
}

/// What the server holds under silo's prefixes.
async fn observe(admin: &ServerAdmin) -> anyhow::Result<Observed> {
    let wrap = |e| admin.error(None, e);
    let databases = sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE datname LIKE 'silo\\_t\\_%' OR datname LIKE 'silo\\_spare\\_%'",
    )
    .fetch_all(&admin.pool)
    .await
    .map_err(wrap)
    .context("list databases")?;
    let roles = sqlx::query_as(
        "SELECT rolname::text, rolcanlogin FROM pg_roles WHERE rolname LIKE 'silo\\_r\\_%'",
    )
    .fetch_all(&admin.pool)
    .await
    .map_err(wrap)
    .context("list roles")?;
    let spare_roles =
        sqlx::query_scalar("SELECT rolname::text FROM pg_roles WHERE rolname LIKE 'silo\\_rs\\_%'")
            .fetch_all(&admin.pool)
            .await
            .map_err(wrap)
            .context("list spare roles")?;
    let with_sessions = sqlx::query_scalar(
        "SELECT DISTINCT usename::text FROM pg_stat_activity WHERE usename LIKE 'silo\\_r\\_%'",
    )
    .fetch_all(&admin.pool)
    .await
    .map_err(wrap)
    .context("list tenant sessions")?;
    let kept = roles::kept_objects(admin)
        .await
        .context("list databases and roles set aside")?;
    Ok(Observed {
        databases,
        roles,
        spare_roles,
        with_sessions,
        kept,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use TenantStatus::*;

    const A: &str = "0190aaaa000070008000000000000001";
    const B: &str = "0190bbbb000070008000000000000002";

    fn db(hex: &str) -> String {
        format!("silo_t_{hex}")
    }
    fn role(hex: &str) -> String {
        format!("silo_r_{hex}")
    }
    fn tenant(hex: &str, status: TenantStatus) -> AccountedTenant {
        AccountedTenant {
            database: db(hex),
            role: role(hex),
            status,
        }
    }

    /// One case: what the server holds, what the registry says, what must be done.
    struct Case {
        name: &'static str,
        observed: Observed,
        accounted: Accounted,
        want: Vec<Action>,
    }

    fn on_server(dbs: &[&str], roles: &[(&str, bool)]) -> Observed {
        Observed {
            databases: dbs.iter().map(|d| d.to_string()).collect(),
            roles: roles.iter().map(|(r, l)| (r.to_string(), *l)).collect(),
            spare_roles: vec![],
            with_sessions: vec![],
            kept: vec![],
        }
    }

    /// The registry with these tenants active on another cluster, where
    /// their databases were found: what the server holds of them are copies.
    fn copies_elsewhere(tenants: &[&str]) -> Accounted {
        let mut a = registry(vec![]);
        for t in tenants {
            let row = RowOf {
                status: Active,
                here: false,
                copy: true,
                lost: false,
            };
            a.rows.insert(id(t), row);
        }
        a
    }

    /// The registry with these tenants live on the server (and their rows).
    fn registry(tenants: Vec<AccountedTenant>) -> Accounted {
        let rows = tenants
            .iter()
            .map(|t| {
                let id = names::tenant_of_role(&t.role).unwrap();
                (
                    id,
                    RowOf {
                        status: t.status,
                        here: true,
                        copy: false,
                        lost: false,
                    },
                )
            })
            .collect();
        Accounted {
            tenants,
            latest_version: 1,
            rows,
            now: 1_000_000,
            ..Default::default()
        }
    }

    /// ... plus rows of tenants that are not live here.
    fn with_rows(mut accounted: Accounted, rows: &[(&str, TenantStatus, bool)]) -> Accounted {
        for (hex, status, here) in rows {
            accounted.rows.insert(
                Uuid::parse_str(hex).unwrap(),
                RowOf {
                    status: *status,
                    here: *here,
                    copy: false,
                    lost: false,
                },
            );
        }
        accounted
    }

    fn id(hex: &str) -> Uuid {
        Uuid::parse_str(hex).unwrap()
    }

    fn kept(name: &str, role: bool, drop_after: Option<i64>) -> Kept {
        Kept {
            name: name.into(),
            role,
            drop_after,
        }
    }

    fn cases() -> Vec<Case> {
        let (a_db, a_role, b_db, b_role) = (db(A), role(A), db(B), role(B));
        let restored = format!("{}_0123456789ab", db(A));
        let spare = |name: &str, role: Option<&str>, v| AccountedSpare {
            database: name.into(),
            role: role.map(str::to_owned),
            schema_version: v,
            own_privileges: true,
        };
        vec![
            Case {
                name: "a database and role the registry never heard of are kept and reported",
                observed: on_server(&[&a_db], &[(&a_role, true)]),
                accounted: registry(vec![]),
                want: vec![
                    Action::Unregistered(a_db.clone()),
                    Action::Unregistered(a_role.clone()),
                ],
            },
            Case {
                name: "a deleted tenant's database and role are quarantined, database first",
                observed: on_server(&[&a_db], &[(&a_role, true)]),
                accounted: with_rows(registry(vec![]), &[(A, Deleted, true)]),
                want: vec![
                    Action::Quarantine {
                        database: a_db.clone(),
                        tenant: id(A),
                    },
                    Action::QuarantineRole {
                        role: a_role.clone(),
                        tenant: id(A),
                    },
                ],
            },
            Case {
                name:
                    "a tenant live on another server (one cluster registered twice) is left alone",
                observed: on_server(&[&a_db], &[(&a_role, false)]),
                accounted: with_rows(registry(vec![tenant(B, Active)]), &[(A, Active, false)]),
                want: vec![],
            },
            Case {
                name:
                    "a copy of a tenant living on another cluster (a failed move's) is quarantined",
                observed: on_server(&[&a_db], &[(&a_role, false)]),
                accounted: copies_elsewhere(&[A]),
                want: vec![
                    Action::Quarantine {
                        database: a_db.clone(),
                        tenant: id(A),
                    },
                    Action::QuarantineRole {
                        role: a_role.clone(),
                        tenant: id(A),
                    },
                ],
            },
            Case {
                name: "copies of tenants living on another cluster do not count toward the halt",
                observed: on_server(&[&a_db, &b_db], &[]),
                accounted: copies_elsewhere(&[A, B]),
                want: vec![
                    Action::Quarantine {
                        database: a_db.clone(),
                        tenant: id(A),
                    },
                    Action::Quarantine {
                        database: b_db.clone(),
                        tenant: id(B),
                    },
                ],
            },
            Case {
                name: "quarantining more than a tenth of the server's tenants halts instead",
                observed: on_server(&[&a_db, &b_db], &[]),
                accounted: with_rows(registry(vec![]), &[(A, Deleted, true), (B, Failed, true)]),
                want: vec![Action::Halt {
                    tenants: 2,
                    live: 0,
                }],
            },
            Case {
                name: "spares another server records (one cluster registered twice) are left alone",
                observed: Observed {
                    spare_roles: vec!["silo_rs_9".into()],
                    ..on_server(&["silo_spare_9"], &[])
                },
                accounted: Accounted {
                    spares_elsewhere: ["silo_spare_9".to_owned(), "silo_rs_9".to_owned()].into(),
                    ..registry(vec![])
                },
                want: vec![],
            },
            Case {
                name: "kept objects past their grace period are dropped, databases first",
                observed: Observed {
                    kept: vec![
                        kept("silo_kept_r_old", true, Some(999_999)),
                        kept("silo_kept_old", false, Some(1_000_000)),
                        kept("silo_kept_new", false, Some(1_000_001)),
                        kept("silo_kept_forever", false, None),
                    ],
                    ..on_server(&[], &[])
                },
                accounted: registry(vec![]),
                want: vec![
                    Action::DropKept("silo_kept_old".into()),
                    Action::DropKeptRole("silo_kept_r_old".into()),
                ],
            },
            Case {
                name: "a current spare and its role are kept",
                observed: Observed {
                    spare_roles: vec!["silo_rs_1".into()],
                    ..on_server(&["silo_spare_1"], &[])
                },
                accounted: Accounted {
                    spares: vec![spare("silo_spare_1", Some("silo_rs_1"), 1)],
                    ..registry(vec![])
                },
                want: vec![],
            },
            Case {
                name: "a spare of an older schema goes: database, row and role",
                observed: Observed {
                    spare_roles: vec!["silo_rs_1".into()],
                    ..on_server(&["silo_spare_1"], &[])
                },
                accounted: Accounted {
                    latest_version: 2,
                    spares: vec![spare("silo_spare_1", Some("silo_rs_1"), 1)],
                    ..registry(vec![])
                },
                want: vec![
                    Action::DropSpare("silo_spare_1".into()),
                    Action::ForgetSpare("silo_spare_1".into()),
                    Action::DropSpareRole("silo_rs_1".into()),
                ],
            },
            Case {
                name: "a newer replica's spare is kept (rolling deploy)",
                observed: on_server(&["silo_spare_2"], &[]),
                accounted: Accounted {
                    spares: vec![spare("silo_spare_2", Some("silo_rs_2"), 7)],
                    ..registry(vec![])
                },
                want: vec![],
            },
            Case {
                name: "a spare granted through the legacy shared group is replaced",
                observed: Observed {
                    spare_roles: vec!["silo_rs_5".into()],
                    ..on_server(&["silo_spare_5"], &[])
                },
                accounted: Accounted {
                    spares: vec![AccountedSpare {
                        own_privileges: false,
                        ..spare("silo_spare_5", Some("silo_rs_5"), 1)
                    }],
                    ..registry(vec![])
                },
                want: vec![
                    Action::DropSpare("silo_spare_5".into()),
                    Action::ForgetSpare("silo_spare_5".into()),
                    Action::DropSpareRole("silo_rs_5".into()),
                ],
            },
            Case {
                name: "an unrecorded spare (its clone crashed before the row) is dropped",
                observed: on_server(&["silo_spare_3"], &[]),
                accounted: registry(vec![]),
                want: vec![Action::DropSpare("silo_spare_3".into())],
            },
            Case {
                name: "a spare row whose database is gone is forgotten",
                observed: on_server(&[], &[]),
                accounted: Accounted {
                    spares: vec![spare("silo_spare_4", Some("silo_rs_4"), 1)],
                    ..registry(vec![])
                },
                want: vec![Action::ForgetSpare("silo_spare_4".into())],
            },
            Case {
                name: "a tenant mid-create keeps its database and role, login untouched",
                observed: on_server(&[&a_db], &[(&a_role, true)]),
                accounted: registry(vec![tenant(A, Provisioning)]),
                want: vec![],
            },
            Case {
                name: "a tenant mid-create whose database is not made yet: its role stays",
                observed: on_server(&[], &[(&a_role, false)]),
                accounted: registry(vec![tenant(A, Provisioning)]),
                want: vec![],
            },
            Case {
                name: "a tenant mid-delete keeps both until its delete drops them",
                observed: on_server(&[&a_db], &[(&a_role, true)]),
                accounted: registry(vec![tenant(A, Deleting)]),
                want: vec![],
            },
            Case {
                name: "a tenant mid-move: the target's copy and role are kept",
                observed: on_server(&[&a_db], &[(&a_role, false)]),
                accounted: Accounted {
                    moving: vec![(a_db.clone(), a_role.clone())],
                    ..registry(vec![])
                },
                want: vec![],
            },
            Case {
                name: "a tenant mid-restore (restoring from archive) keeps its new database",
                observed: on_server(&[&restored], &[(&a_role, false)]),
                accounted: registry(vec![AccountedTenant {
                    database: restored.clone(),
                    ..tenant(A, Restoring)
                }]),
                want: vec![],
            },
            Case {
                name: "a restore's replaced database, no longer named, is quarantined",
                observed: on_server(&[&a_db, &restored], &[(&a_role, true)]),
                accounted: registry(vec![AccountedTenant {
                    database: restored.clone(),
                    ..tenant(A, Active)
                }]),
                want: vec![Action::Quarantine {
                    database: a_db.clone(),
                    tenant: id(A),
                }],
            },
            Case {
                name: "a live tenant's registered database is gone: its one other database is its data, found",
                observed: on_server(&[&restored], &[(&a_role, true)]),
                accounted: {
                    let mut a = registry(vec![tenant(A, Active)]);
                    a.rows.get_mut(&id(A)).unwrap().lost = true;
                    a
                },
                want: vec![Action::Found {
                    database: restored.clone(),
                    tenant: id(A),
                }],
            },
            Case {
                name: "a live tenant's registered database is gone and two others are there: both kept, reported",
                observed: on_server(&[&restored, &format!("{restored}2")], &[(&a_role, true)]),
                accounted: {
                    let mut a = registry(vec![tenant(A, Active)]);
                    a.rows.get_mut(&id(A)).unwrap().lost = true;
                    a
                },
                want: vec![
                    Action::Unregistered(restored.clone()),
                    Action::Unregistered(format!("{restored}2")),
                ],
            },
            Case {
                name: "a move's unverified source is set aside, never dropped",
                observed: on_server(&[&a_db], &[]),
                accounted: Accounted {
                    unverified_sources: [a_db.clone()].into(),
                    ..registry(vec![])
                },
                want: vec![Action::SetAside {
                    database: a_db.clone(),
                    tenant: Uuid::parse_str(A).unwrap(),
                }],
            },
            Case {
                name: "logins follow the state: active may, suspended and archived may not",
                observed: on_server(&[&a_db, &b_db], &[(&a_role, false), (&b_role, true)]),
                accounted: registry(vec![tenant(A, Active), tenant(B, Suspended)]),
                want: vec![
                    Action::SetLogin {
                        role: a_role.clone(),
                        login: true,
                    },
                    Action::SetLogin {
                        role: b_role.clone(),
                        login: false,
                    },
                ],
            },
            Case {
                name: "a suspend that stopped half-way: the role's sessions are ended",
                observed: Observed {
                    with_sessions: vec![a_role.clone(), b_role.clone()],
                    ..on_server(&[&a_db, &b_db], &[(&a_role, false), (&b_role, true)])
                },
                accounted: registry(vec![tenant(A, Suspended), tenant(B, Active)]),
                want: vec![Action::EndSessions(a_role.clone())],
            },
            Case {
                name: "an archived tenant's leftover role may not log in",
                observed: on_server(&[], &[(&a_role, true)]),
                accounted: registry(vec![tenant(A, Archived)]),
                want: vec![Action::SetLogin {
                    role: a_role.clone(),
                    login: false,
                }],
            },
            Case {
                name: "a live tenant in agreement: nothing to do",
                observed: on_server(&[&a_db], &[(&a_role, true)]),
                accounted: registry(vec![tenant(A, Active)]),
                want: vec![],
            },
        ]
    }

    #[test]
    fn the_plan_drops_only_what_nothing_accounts_for() {
        let wrong: Vec<String> = cases()
            .into_iter()
            .filter_map(|c| {
                let got = plan(&c.observed, &c.accounted);
                (got != c.want).then(|| format!("{}:\n  got  {got:?}\n  want {:?}", c.name, c.want))
            })
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}
