//! Relocation: move a tenant's database to another server, with its writes
//! frozen for the cut-over only.
//!
//! 1. On the source database: a fence table (`silo_move.fence`, in a schema
//!    the tenant role cannot use) and a publication of every table.
//! 2. On the target server: the database; its schema, `pg_dump --schema-only`
//!    streamed into `pg_restore`; the tenant role with a new password, its
//!    login verified; a subscription that copies every row (logical
//!    replication's initial `COPY`, table by table) and then follows changes.
//! 3. Copy done and caught up (a fence token written on the source is seen
//!    on the target).
//! 4. Cut-over, under the tenant's lock: the tenant is frozen (routers on
//!    every replica answer 503 with `Retry-After`), its source role loses
//!    LOGIN, requests in flight get a moment to finish, its sessions end. A
//!    last fence token seen on the target means every write committed on the
//!    source is there. Sequences are copied; then the copy is **verified**:
//!    every table's row count and checksum, on both servers at once (neither
//!    changes while frozen). Only a verified copy is switched to: the
//!    registry points at the target with the new password and is unfrozen
//!    in one statement (NOTIFY: every router rebuilds its pool on the
//!    target). A copy that does not verify is never served: the freeze is
//!    lifted on the source and the target dropped.
//! 5. Subscription, replication slot, source database and role dropped.
//!
//! The write freeze lasts from step 4's freeze to its switch: a few commits
//! plus the verification, which reads every row once on each server (see
//! the README for what that costs). A failure before the switch puts
//! everything back and the tenant keeps serving from the source; after it,
//! only clean-up is left. A crash is settled by the reconciler the same
//! way: rolled back while the registry names the source, finished once it
//! names the target.
//!
//! A move runs in one of the process's work slots (`SILO_BACKUP_CONCURRENCY`,
//! shared with backups): with none free it is `queued` until one is.
//!
//! Logical replication needs `wal_level = logical` on the source server, a
//! primary key (or replica identity) on every table, and an admin login on
//! the target that may create subscriptions (a superuser on PostgreSQL 15).
//! The target server connects to the source with the source's admin URL.

mod steps;

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use crate::crypto::{random_password, Keyring};
use crate::domain::OperationKind;
use crate::ops::{Error, Operations, Result};
use crate::registry::{DbServer, Operation, Registry, TenantStatus};
use crate::servers::{roles, schema, PgTools, ServerAdmin, ServerPools};
use steps::*;

/// Prefix of publications, subscriptions and replication slots of a move.
pub const MOVE_PREFIX: &str = "silo_move_";
/// Schema of the fence table in a database being moved.
const FENCE_SCHEMA: &str = "silo_move";

/// What a failed move's params say once its source has been cleaned up.
const SOURCE_CLEANED: &str = "source_cleaned";
/// How long requests in flight may finish after the freeze before their
/// sessions are ended.
const DRAIN: Duration = Duration::from_secs(2);
/// Longest wait for the target to catch up with a fence token.
const FENCE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the copy's progress is polled.
const POLL: Duration = Duration::from_millis(200);

/// What a move needs to resume or undo it; stored as the operation's params.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MovePlan {
    pub tenant_id: Uuid,
    pub from_server: Uuid,
    pub to_server: Uuid,
    pub database: String,
    pub role: String,
    /// Schema version at the start: a migration meanwhile cancels the move.
    pub schema_version: Option<i64>,
}

impl MovePlan {
    /// Publication, subscription and slot name: one move per tenant at a time.
    pub fn name(&self) -> String {
        move_name(self.tenant_id)
    }
}

pub fn move_name(tenant: Uuid) -> String {
    format!("{MOVE_PREFIX}{}", tenant.simple())
}

/// Milliseconds spent in each phase of the freeze.
struct Phases(serde_json::Map<String, serde_json::Value>, Instant);

impl Phases {
    fn start() -> Self {
        Self(Default::default(), Instant::now())
    }

    fn lap(&mut self, phase: &str) {
        let now = Instant::now();
        let ms = (now - std::mem::replace(&mut self.1, now)).as_secs_f64() * 1000.0;
        self.0
            .insert(phase.into(), json!((ms * 10.0).round() / 10.0));
    }
}

impl Ends {
    /// A one-connection admin pool on the tenant's database at the source.
    async fn src_db(&self, db: &str) -> anyhow::Result<sqlx::PgPool> {
        self.src
            .single_pool(db)
            .await
            .context("connect to the source database")
    }

    /// The same on the target.
    async fn dst_db(&self, db: &str) -> anyhow::Result<sqlx::PgPool> {
        self.dst
            .single_pool(db)
            .await
            .context("connect to the target database")
    }
}

/// A copy whose row counts or checksums differ from the source's.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Unverified(String);

/// Pause points for tests: a move of a given tenant waits at a named point
/// until the test lets it go (so a test can, say, change a row on the
/// target behind the subscription's back before the verification). Nothing
/// is armed outside tests: reaching a point is one lock and a scan of an
/// empty list.
#[doc(hidden)]
pub mod testing {
    use std::sync::{Arc, Mutex};

    use tokio::sync::Notify;
    use uuid::Uuid;

    /// In the freeze, sequences copied, before the copy is verified.
    pub const BEFORE_VERIFY: &str = "before_verify";
    /// Copied and caught up, before the cut-over takes the tenant's lock.
    pub const COPIED: &str = "copied";

    type Armed = Vec<(&'static str, Uuid, Arc<Pause>)>;
    static ARMED: Mutex<Armed> = Mutex::new(Vec::new());

    /// An armed pause point.
    #[derive(Debug, Default)]
    pub struct Pause {
        reached: Notify,
        resume: Notify,
    }

    impl Pause {
        /// Wait until the move is at the point.
        pub async fn reached(&self) {
            self.reached.notified().await;
        }

        /// Let the move go on.
        pub fn resume(&self) {
            self.resume.notify_one();
        }
    }

    /// Make the next move of `tenant` wait at `point`.
    pub fn arm(point: &'static str, tenant: Uuid) -> Arc<Pause> {
        let pause = Arc::new(Pause::default());
        ARMED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((point, tenant, pause.clone()));
        pause
    }

    pub(super) async fn reach(point: &'static str, tenant: Uuid) {
        let pause = {
            let mut armed = ARMED.lock().unwrap_or_else(|e| e.into_inner());
            match armed
                .iter()
                .position(|(p, t, _)| *p == point && *t == tenant)
            {
                Some(i) => armed.swap_remove(i).2,
                None => return,
            }
        };
        pause.reached.notify_one();
        pause.resume.notified().await;
    }
}

/// How a stopped move ended.
enum Settled {
    /// Rolled back: the tenant serves from its source.
    Source,
    /// Finished: on the target, verified, the source dropped.
    Finished,
    /// On the target without a verified copy: the source set aside under this name.
    Kept(String),
}

/// Admin access to both ends of a move.
struct Ends {
    src: ServerAdmin,
    dst: ServerAdmin,
}

/// Moves tenants between servers. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Mover {
    registry: Registry,
    keyring: Keyring,
    servers: ServerPools,
    ops: Operations,
    /// `pg_dump`/`pg_restore` (the schema copy); found on first use if not given.
    tools: Option<PgTools>,
    /// How long a database found under the tenant's name on a target is
    /// kept aside before the reconciler drops it.
    keep_for: crate::domain::KeepFor,
}

impl Mover {
    pub fn new(
        registry: Registry,
        keyring: Keyring,
        servers: ServerPools,
        ops: Operations,
        tools: Option<PgTools>,
        keep_for: crate::domain::KeepFor,
    ) -> Self {
        Self {
            registry,
            keyring,
            servers,
            ops,
            tools,
            keep_for,
        }
    }

    /// `POST /tenants/{t}/move`: check the move can work, then run it as an operation.
    #[tracing::instrument(skip(self), fields(tenant_id = %id))]
    pub async fn start_move(&self, id: Uuid, server: &str, actor: &str) -> Result<Operation> {
        let reg = &self.registry;
        let target = reg
            .server_by_name(server)
            .await?
            .ok_or_else(|| Error::Invalid(format!("no server named '{server}'")))?;
        // Under the tenant's lock: two requests cannot both start a move.
        reg.with_tenant_lock(id, || async {
            let t = reg.tenant(id).await?.ok_or(Error::NotFound("tenant"))?;
            if t.status == TenantStatus::Deleted {
                return Err(Error::NotFound("tenant"));
            }
            self.ops
                .refuse_if_busy(OperationKind::TenantMove, id)
                .await?;
            // A suspended tenant moves too (draining a server takes it
            // along) and arrives suspended: its role may not log in there.
            if !matches!(t.status, TenantStatus::Active | TenantStatus::Suspended) {
                return Err(Error::Conflict(format!(
                    "tenant is {}: only an active or suspended tenant can be moved",
                    t.status.as_str()
                )));
            }
            if t.server_id == target.id {
                return Err(Error::Conflict(format!(
                    "tenant is already on server '{server}'"
                )));
            }
            check_target(&target)?;
            let ends = self.ends(t.server_id, &target).await?;
            check_servers(&ends, &t).await?;
            let plan = MovePlan {
                tenant_id: id,
                from_server: t.server_id,
                to_server: target.id,
                database: t.database_name.clone(),
                role: t.role_name.clone(),
                schema_version: t.schema_version,
            };
            reg.audit(
                actor,
                "tenant.move",
                Some(id),
                json!({"from": t.server_name, "to": target.name}),
            )
            .await?;
            let params = serde_json::to_value(&plan).context("record the move's plan")?;
            let this = self.clone();
            self.ops
                .spawn(
                    OperationKind::TenantMove,
                    Some(id),
                    params,
                    move || async move { this.run_move(plan).await },
                )
                .await
        })
        .await
    }

    async fn ends(&self, from: Uuid, to: &DbServer) -> Result<Ends> {
        let source = self
            .registry
            .server(from)
            .await?
            .context("find the tenant's server")?;
        Ok(Ends {
            src: self.servers.admin(&source)?,
            dst: self.servers.admin(to)?,
        })
    }

    async fn run_move(&self, plan: MovePlan) -> Result<serde_json::Value> {
        let reg = &self.registry;
        let to = reg
            .server(plan.to_server)
            .await?
            .context("find the target server")?;
        let ends = self.ends(plan.from_server, &to).await?;
        let started = Instant::now();
        // A crashed earlier attempt may have left pieces under the same names.
        discard_target(&ends, &plan, self.keep_for.drop_after()).await;
        let moved = async {
            let password = self.copy_to_target(&ends, &plan).await?;
            crate::failpoint::hit("move_copied");
            testing::reach(testing::COPIED, plan.tenant_id).await;
            self.cut_over(&ends, &plan, &password).await
        }
        .await;
        match moved {
            Ok((freeze, phases)) => {
                // Switched to a verified copy: only the source's clean-up is left.
                crate::failpoint::hit("move_switched");
                finish_source(&ends, &plan).await;
                metrics::histogram!("silo_move_freeze_seconds").record(freeze.as_secs_f64());
                metrics::counter!("silo_moves_total", "outcome" => "succeeded").increment(1);
                tracing::info!(tenant_id = %plan.tenant_id, freeze_ms = freeze.as_millis() as u64, "tenant moved");
                Ok(json!({
                    "tenant_id": plan.tenant_id,
                    "server": to.name,
                    "database": plan.database,
                    "freeze_ms": freeze.as_secs_f64() * 1000.0,
                    "freeze_phases_ms": phases.0,
                    "duration_ms": started.elapsed().as_millis() as u64,
                }))
            }
            Err(e) => {
                let outcome = if matches!(&e, Error::Internal(a) if a.is::<Unverified>()) {
                    "unverified"
                } else {
                    "failed"
                };
                metrics::counter!("silo_moves_total", "outcome" => outcome).increment(1);
                // The switch may have committed before an error: settle by what the registry says.
                match self.settle_move(&ends, &plan).await {
                    Ok(Settled::Finished) => {
                        Ok(json!({"tenant_id": plan.tenant_id, "server": to.name}))
                    }
                    Ok(Settled::Kept(kept)) => Err(anyhow::anyhow!(
                        "{}; the switch to server '{}' committed, but the copy was not verified: the old database is kept as '{kept}'",
                        e.detail(),
                        to.name
                    )
                    .into()),
                    _ => Err(e),
                }
            }
        }
    }

    /// Steps 1–3: the target database, filled and following the source.
    /// Returns the tenant role's new password.
    async fn copy_to_target(&self, ends: &Ends, plan: &MovePlan) -> Result<String> {
        let name = plan.name();
        let db = &plan.database;
        let progress = |phase: &str, extra: serde_json::Value| {
            let mut v = json!({"phase": phase});
            if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
                v.extend(extra.clone());
            }
            v
        };
        let op = self.open_move_operation(plan.tenant_id).await?;
        let reg = &self.registry;
        // Counted again with the move recorded: of moves (and creates) that
        // passed `check_target` at once, only those the server has room for
        // go on.
        if let Some(op) = op {
            if !reg
                .move_has_room(plan.to_server, plan.tenant_id, op)
                .await?
            {
                return Err(Error::Conflict(
                    "the target server is full: other tenants took its last places since the move was asked for".into(),
                ));
            }
        }
        let src = ends.src_db(db).await?;
        sqlx::raw_sql(&format!(
            "CREATE SCHEMA IF NOT EXISTS {FENCE_SCHEMA};
             CREATE TABLE IF NOT EXISTS {FENCE_SCHEMA}.fence (id int PRIMARY KEY, token uuid NOT NULL);"
        ))
        .execute(&src)
        .await
        .context("create the fence table on the source")?;
        let tables = published_tables(&src).await?;
        sqlx::raw_sql(&format!(
            "DROP PUBLICATION IF EXISTS {name}; CREATE PUBLICATION {name} FOR TABLE {}",
            tables.join(", ")
        ))
        .execute(&src)
        .await
        .context("publish the source's tables")?;

        // Same encoding and collation as the source: the rows and the order of indexes agree.
        let (encoding, collate, ctype): (String, String, String) = sqlx::query_as(
            "SELECT pg_encoding_to_char(encoding)::text, datcollate::text, datctype::text
               FROM pg_database WHERE datname = $1",
        )
        .bind(db)
        .fetch_one(&ends.src.pool)
        .await
        .context("read the source database's encoding")?;
        let quote = |v: &str| v.replace('\'', "''");
        // Born closed; opened to the tenant's new role alone (and silo).
        roles::create_database(
            &ends.dst,
            db,
            None,
            &format!(
                "ENCODING '{}' LC_COLLATE '{}' LC_CTYPE '{}'",
                quote(&encoding),
                quote(&collate),
                quote(&ctype)
            ),
        )
        .await
        .context("create the database on the target")?;
        let t = reg
            .tenant(plan.tenant_id)
            .await?
            .ok_or(Error::NotFound("tenant"))?;
        let password = random_password(32);
        roles::create_role(
            &ends.dst,
            &plan.role,
            db,
            &password,
            t.limits.connection_limit,
        )
        .await
        .context("create the tenant role on the target")?;
        // Marked as this control plane's tenant's, as a provisioned
        // database is (`silo reconcile --adopt` reads it).
        let mark = crate::servers::owner::TenantMark::of(reg.control_id().await?, &t);
        ends.dst
            .exec(&crate::servers::owner::tenant_mark_sql(
                db,
                &mark,
                &self.keyring,
            ))
            .await
            .context("mark the database on the target")?;
        if let Some(op) = op {
            reg.set_progress(op, progress("schema", json!({}))).await?;
        }
        copy_schema(self.pg_tools()?, ends, db).await?;
        let target = ends.dst_db(db).await?;
        let mut granted = schema::grant(&target, Some(&plan.role)).await;
        // Over its storage quota: read-only on the target too.
        if granted.is_ok() && t.over_quota_at.is_some() {
            granted = schema::set_read_only(&target, db, &plan.role, true).await;
        }
        target.close().await;
        granted.context("grant the tenant role its privileges on the target")?;
        roles::verify_login(&ends.dst, db, &plan.role, &password)
            .await
            .context("log in as the tenant role on the target")?;
        let foreign = roles::foreign_sessions(&ends.dst, db, Some(&plan.role)).await?;
        if !foreign.is_empty() {
            return Err(anyhow::anyhow!(
                "check the target database: sessions of other roles are inside ({})",
                foreign.join(", ")
            )
            .into());
        }

        let dst = ends.dst_db(db).await?;
        // The statement holds the source's admin password: sent over a
        // connection that logs no statement, dollar-quoted under a tag the
        // password cannot contain. (The target server may still log it if
        // its own `log_statement` says so.)
        let quiet = ends
            .dst
            .quiet_pool(db)
            .await
            .context("connect to the target database")?;
        let conninfo = ends.src.libpq.conninfo(db);
        let mut tag = format!("silo_{}", Uuid::new_v4().simple());
        while conninfo.contains(&tag) {
            tag = format!("silo_{}", Uuid::new_v4().simple());
        }
        let subscribed = sqlx::raw_sql(&format!(
            "CREATE SUBSCRIPTION {name} CONNECTION ${tag}${conninfo}${tag}$ PUBLICATION {name} WITH (slot_name = '{name}', copy_data = true)"
        ))
        .execute(&quiet)
        .await;
        quiet.close().await;
        subscribed.map_err(|e| {
            anyhow::anyhow!(
                "subscribe the target to the source (the target server must reach the source with its admin URL): {}",
                e.as_database_error()
                    .map(|d| d.message().to_owned())
                    .unwrap_or_else(|| "connection failed".into())
            )
        })?;
        let started = Instant::now();
        loop {
            let (left, errors): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid
                          WHERE s.subname = $1 AND r.srsubstate <> 'r'),
                        coalesce((SELECT apply_error_count + sync_error_count FROM pg_stat_subscription_stats
                                   WHERE subname = $1), 0)",
            )
            .bind(&name)
            .fetch_one(&dst)
            .await
            .context("check the copy's progress")?;
            if errors > 0 {
                return Err(replication_failed().into());
            }
            if left == 0 {
                break;
            }
            // A source that stops answering counts no error on the target
            // (its workers only fail to connect): the copy would wait forever.
            sqlx::query("SELECT 1")
                .execute(&src)
                .await
                .context("the tenant's server stopped answering during the copy")?;
            if let Some(op) = op {
                let p = progress(
                    "copying",
                    json!({"tables_left": left, "tables": tables.len(), "seconds": started.elapsed().as_secs()}),
                );
                reg.set_progress(op, p).await?;
            }
            tokio::time::sleep(POLL).await;
        }
        // Caught up: the cut-over's own fence then waits for seconds of writes at most.
        fence(&src, &dst, &name, FENCE_TIMEOUT * 10).await?;
        if let Some(op) = op {
            reg.set_progress(op, progress("cut-over", json!({})))
                .await?;
        }
        src.close().await;
        dst.close().await;
        Ok(password)
    }

    /// Step 4: freeze, fence, verify, switch. Returns how long writes were
    /// frozen, by phase.
    async fn cut_over(
        &self,
        ends: &Ends,
        plan: &MovePlan,
        password: &str,
    ) -> Result<(Duration, Phases)> {
        let reg = &self.registry;
        let db = &plan.database;
        let src = ends.src_db(db).await?;
        let dst = ends.dst_db(db).await?;
        let sealed = self
            .keyring
            .seal(password.as_bytes(), plan.tenant_id.as_bytes());
        let op = self
            .open_move_operation(plan.tenant_id)
            .await?
            .context("find the move's operation")?;
        let switched = reg
            .with_tenant_lock(plan.tenant_id, || async {
                let switched = self.switch(ends, plan, &src, &dst, &sealed, op).await;
                if switched.is_err() {
                    // Undo the freeze under the same lock; the rest is undone by `settle_move`.
                    unfreeze(&self.registry, ends, plan).await;
                }
                switched
            })
            .await;
        src.close().await;
        dst.close().await;
        switched
    }

    /// Freeze, drain, fence, copy sequences, verify the copy and switch the
    /// registry; the caller holds the tenant's lock.
    async fn switch(
        &self,
        ends: &Ends,
        plan: &MovePlan,
        src: &sqlx::PgPool,
        dst: &sqlx::PgPool,
        sealed: &[u8],
        op: Uuid,
    ) -> Result<(Duration, Phases)> {
        let reg = &self.registry;
        let t = reg
            .tenant(plan.tenant_id)
            .await?
            .ok_or(Error::NotFound("tenant"))?;
        if !matches!(t.status, TenantStatus::Active | TenantStatus::Suspended)
            || t.server_id != plan.from_server
            || t.database_name != plan.database
            || t.schema_version != plan.schema_version
        {
            return Err(Error::Conflict(format!(
                "the tenant changed during the move (now {}, schema version {:?}); it stays where it was",
                t.status.as_str(),
                t.schema_version
            )));
        }
        // The target may have been drained, marked unhealthy or filled
        // (its limit lowered) during the copy: checked again before the
        // freeze. This move holds its place: itself and the moves asked for
        // after it are not counted.
        let target = reg
            .server(plan.to_server)
            .await?
            .context("find the target server")?;
        let has_room = match self.open_move_operation(plan.tenant_id).await? {
            Some(op) => {
                reg.move_has_room(plan.to_server, plan.tenant_id, op)
                    .await?
            }
            None => true,
        };
        if let Err(refused) = check_target_given_room(&target, has_room) {
            return Err(Error::Conflict(format!(
                "{}; it changed during the copy: the tenant stays where it was",
                refused
            )));
        }
        // Its reader role (if it has one) on the target too, and the plan
        // may have changed during the copy.
        crate::servers::readers::follow_reader(&self.keyring, &ends.dst, &t, &plan.database)
            .await?;
        roles::set_connection_limit(&ends.dst, &plan.role, t.limits.connection_limit)
            .await
            .context("set the tenant role's connection limit on the target")?;
        // Its logins as its state says now (suspended or resumed during the
        // copy too; neither changes while this lock is held).
        let active = t.status == TenantStatus::Active;
        roles::set_role_login(&ends.dst, &plan.role, active)
            .await
            .context("set whether the tenant role may log in on the target")?;
        let frozen = Instant::now();
        let mut phases = Phases::start();
        reg.set_frozen(plan.tenant_id, true).await?;
        roles::set_role_login(&ends.src, &plan.role, false).await?;
        phases.lap("freeze");
        drain_sessions(&ends.src, &plan.role).await?;
        phases.lap("drain");
        fence(src, dst, &plan.name(), FENCE_TIMEOUT).await?;
        phases.lap("fence");
        crate::failpoint::hit("move_frozen");
        copy_sequences(src, dst).await?;
        phases.lap("sequences");
        testing::reach(testing::BEFORE_VERIFY, plan.tenant_id).await;
        // Nothing writes to either side now: the source is frozen, the
        // target has applied everything up to the fence.
        let verified = verify_copy(src, dst).await?;
        if let Err(differ) = verified {
            let from = match reg.server(plan.from_server).await? {
                Some(s) => s.name,
                None => plan.from_server.to_string(),
            };
            return Err(anyhow::Error::new(Unverified(format!(
                "verify the copy: {differ}; it was not switched to: the tenant stays on server '{from}' with all its data, and the copy is kept aside"
            )))
            .into());
        }
        phases.lap("verify");
        // Recorded before the switch: a switch that commits is of a verified copy.
        reg.mark_operation(op, json!({"verified": true})).await?;
        crate::failpoint::hit("move_verified");
        let moved = reg
            .relocate_tenant(
                plan.tenant_id,
                op,
                plan.from_server,
                plan.to_server,
                // The state the target's LOGIN was set for.
                t.status,
                (sealed, self.keyring.key_id()),
            )
            .await?;
        if !moved {
            return Err(Error::Conflict(
                "the tenant changed during the cut-over; it stays where it was".into(),
            ));
        }
        phases.lap("switch");
        Ok((frozen.elapsed(), phases))
    }

    /// Settle a move that stopped, by what the registry names: rolled back
    /// while it names the source; once it names the target, finished if the
    /// copy was verified, else the source is kept aside (never dropped).
    async fn settle_move(&self, ends: &Ends, plan: &MovePlan) -> anyhow::Result<Settled> {
        let reg = &self.registry;
        let t = reg
            .tenant(plan.tenant_id)
            .await?
            .context("find the tenant")?;
        if t.server_id == plan.to_server {
            if reg.move_verified(plan.tenant_id).await? {
                finish_source(ends, plan).await;
                return Ok(Settled::Finished);
            }
            return Ok(Settled::Kept(keep_source(ends, plan).await?));
        }
        unfreeze(&self.registry, ends, plan).await;
        discard_target(ends, plan, self.keep_for.drop_after()).await;
        Ok(Settled::Source)
    }

    /// Settle moves whose process died (from the reconciler), queued ones
    /// included. Returns how many.
    pub(crate) async fn sweep_moves(&self) -> anyhow::Result<u32> {
        let reg = &self.registry;
        let mut settled = 0;
        // Queued moves of a stopped process are settled below like running ones.
        self.ops
            .release_abandoned_queued(&[OperationKind::TenantMove])
            .await?;
        for op in reg.unfinished_operations(OperationKind::TenantMove).await? {
            let Some(lock) = reg.try_lock_operation(op.id).await? else {
                continue; // its runner is alive
            };
            let plan: Option<MovePlan> = reg
                .operation_params(op.id)
                .await
                .ok()
                .and_then(|p| serde_json::from_value(p).ok());
            let Some(plan) = plan else {
                reg.finish_operation(op.id, Err("interrupted: its plan was unreadable".into()))
                    .await?;
                lock.release().await;
                continue;
            };
            let Some(tenant_lock) = reg.try_lock_tenant(plan.tenant_id).await? else {
                lock.release().await;
                continue; // next pass
            };
            // Claimed first: a runner still alive after all (its lock lost
            // with its connection) can no longer switch the registry.
            let outcome = if reg.claim_abandoned_operation(op.id).await? {
                let to = reg.server(plan.to_server).await?;
                Some(match to {
                    Some(to) => match self.ends(plan.from_server, &to).await {
                        Ok(ends) => self.settle_move(&ends, &plan).await,
                        Err(e) => Err(anyhow::anyhow!("{}", e.detail())),
                    },
                    None => Err(anyhow::anyhow!("the target server is gone")),
                })
            } else {
                None
            };
            tenant_lock.release().await;
            let finished = match outcome {
                Some(Ok(Settled::Finished)) => Ok(json!({"tenant_id": plan.tenant_id, "resumed": true})),
                Some(Ok(Settled::Kept(kept))) => Err(format!(
                    "interrupted after the switch: the tenant serves from its new server, but the copy was not verified; the old database is kept as '{kept}'"
                )),
                Some(Ok(Settled::Source)) => Err(
                    "interrupted: the silo process moving it stopped; the tenant stays on its server".into(),
                ),
                Some(Err(e)) => {
                    tracing::warn!(operation_id = %op.id, "failed to settle an interrupted move, retrying next pass: {e:#}");
                    lock.release().await;
                    continue;
                }
                None => {
                    lock.release().await;
                    continue;
                }
            };
            reg.finish_operation(op.id, finished).await?;
            settled += 1;
            lock.release().await;
        }
        // A freeze no open move accounts for (its lifting failed): lift it.
        for id in reg.frozen_tenants().await? {
            if !reg
                .open_operations(OperationKind::TenantMove, id)
                .await?
                .is_empty()
            {
                continue;
            }
            let Some(lock) = reg.try_lock_tenant(id).await? else {
                continue;
            };
            if reg
                .open_operations(OperationKind::TenantMove, id)
                .await?
                .is_empty()
            {
                reg.set_frozen(id, false).await?;
                settled += 1;
            }
            lock.release().await;
        }
        Ok(settled)
    }

    /// The open move operation of a tenant (to record progress on).
    async fn open_move_operation(&self, tenant: Uuid) -> Result<Option<Uuid>> {
        Ok(self
            .registry
            .open_operations(OperationKind::TenantMove, tenant)
            .await?
            .first()
            .map(|o| o.id))
    }

    /// Databases and roles of open moves on a server: the sweep leaves them be.
    pub async fn moves_touching(&self, server: Uuid) -> Result<Vec<MovePlan>> {
        let mut plans = self.open_moves().await?;
        plans.retain(|p| p.from_server == server || p.to_server == server);
        Ok(plans)
    }

    fn pg_tools(&self) -> anyhow::Result<PgTools> {
        match &self.tools {
            Some(tools) => Ok(tools.clone()),
            None => PgTools::find(None),
        }
    }

    /// Drop replication leftovers of moves that are over: subscriptions on
    /// this server (in their database), and inactive slots: a move's own, and
    /// the table-sync slots its subscription could not drop while the source
    /// was unreachable (`pg_<sub>_sync_<rel>_<sys>`, in a tenant database).
    /// Whether a move is open is read again before each drop. Returns how many.
    pub(crate) async fn sweep_move_leftovers(&self, admin: &ServerAdmin) -> anyhow::Result<u32> {
        let mut dropped = 0;
        let subs: Vec<(String, String)> = sqlx::query_as(
            "SELECT s.subname::text, d.datname::text FROM pg_subscription s
               JOIN pg_database d ON d.oid = s.subdbid WHERE s.subname LIKE 'silo\\_move\\_%'",
        )
        .fetch_all(&admin.pool)
        .await
        .context("list subscriptions")?;
        for (sub, db) in subs {
            if self.open_moves().await?.iter().any(|p| p.name() == sub) {
                continue;
            }
            let conn = admin.single_pool(&db).await?;
            let done = drop_subscription(&conn, &sub).await;
            conn.close().await;
            done?;
            dropped += 1;
        }
        let slots: Vec<(String, String)> = sqlx::query_as(
            "SELECT slot_name::text, coalesce(database::text, '') FROM pg_replication_slots
              WHERE NOT active AND slot_type = 'logical'
                AND (slot_name LIKE 'silo\\_move\\_%'
                     OR (slot_name LIKE 'pg\\_%\\_sync\\_%' AND database LIKE 'silo\\_t\\_%'))",
        )
        .fetch_all(&admin.pool)
        .await
        .context("list replication slots")?;
        for (slot, db) in slots {
            let open = self.open_moves().await?;
            if open.iter().any(|p| p.name() == slot || p.database == db) {
                continue;
            }
            sqlx::query("SELECT pg_drop_replication_slot($1)")
                .bind(&slot)
                .execute(&admin.pool)
                .await
                .context("drop an abandoned replication slot")?;
            dropped += 1;
        }
        Ok(dropped)
    }

    /// Sources of failed moves whose clean-up did not get through (the
    /// source was down when the move failed): the move's publication and
    /// fence schema are dropped from the tenant's database now, unless a
    /// move of the tenant is under way, and the move is marked
    /// `source_cleaned`. Left behind, the fence table made every later
    /// verification and archival of the tenant fail. Returns how many.
    pub(crate) async fn clean_failed_sources(&self) -> anyhow::Result<u32> {
        let reg = &self.registry;
        let mut cleaned = 0;
        for (id, params) in reg
            .failed_without(OperationKind::TenantMove, SOURCE_CLEANED, 100)
            .await?
        {
            let Ok(plan) = serde_json::from_value::<MovePlan>(params) else {
                reg.mark_operation(id, json!({ SOURCE_CLEANED: true }))
                    .await?;
                continue;
            };
            // Under the tenant's lock: no move of it starts meanwhile (the
            // fence schema's name is the same for every move).
            let Some(mut lock) = reg.try_lock_tenant(plan.tenant_id).await? else {
                continue;
            };
            let done = lock.hold(self.clean_failed_source(id, &plan)).await;
            lock.release().await;
            match done.map_err(anyhow::Error::from).and_then(|r| r) {
                Ok(true) => cleaned += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(tenant_id = %plan.tenant_id, "left a failed move's source clean-up for the next pass: {e:#}")
                }
            }
        }
        Ok(cleaned)
    }

    /// [`Self::clean_failed_sources`] for one failed move, under its
    /// tenant's lock: `true` when its source was cleaned now. One with
    /// nothing left to clean (no live tenant, its server gone) is marked
    /// too, so it never holds up the others.
    async fn clean_failed_source(&self, id: Uuid, plan: &MovePlan) -> anyhow::Result<bool> {
        let reg = &self.registry;
        if self
            .open_moves()
            .await?
            .iter()
            .any(|p| p.tenant_id == plan.tenant_id)
        {
            return Ok(false);
        }
        let t = reg
            .tenant(plan.tenant_id)
            .await?
            .filter(|t| matches!(t.status, TenantStatus::Active | TenantStatus::Suspended));
        let server = match &t {
            Some(t) => reg.server(t.server_id).await?,
            None => None,
        };
        let (Some(t), Some(server)) = (t, server) else {
            reg.mark_operation(id, json!({ SOURCE_CLEANED: true }))
                .await?;
            return Ok(false);
        };
        let admin = self.servers.admin(&server)?;
        if roles::database_exists(&admin, &t.database_name).await? {
            let conn = admin.single_pool(&t.database_name).await?;
            let dropped = sqlx::raw_sql(&format!(
                "DROP PUBLICATION IF EXISTS {}; DROP SCHEMA IF EXISTS {FENCE_SCHEMA} CASCADE",
                plan.name()
            ))
            .execute(&conn)
            .await;
            conn.close().await;
            dropped.context("drop a failed move's publication and fence")?;
        }
        reg.mark_operation(id, json!({ SOURCE_CLEANED: true }))
            .await?;
        Ok(true)
    }

    /// Plans of every unfinished move.
    async fn open_moves(&self) -> Result<Vec<MovePlan>> {
        // One query: the reconciler asks on every pass, for every server.
        Ok(self
            .registry
            .unfinished_params(OperationKind::TenantMove)
            .await?
            .into_iter()
            .filter_map(|p| serde_json::from_value(p).ok())
            .collect())
    }
}
