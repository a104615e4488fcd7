//! The steps of a move, each against one or both servers: checks, schema
//! copy, fence, drain, sequences, snapshot and verification, and the
//! clean-up of either end.

use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::PgPool;
use uuid::Uuid;

use super::{Ends, MovePlan, DRAIN, FENCE_SCHEMA};
use crate::ops::{Error, Result};
use crate::registry::{DbServer, Registry, TenantRecord, TenantStatus};
use crate::servers::tools::{capture_stderr, error_lines};
use crate::servers::{roles, PgTools, ServerAdmin};

/// A server new tenants (and moved ones) may go to.
pub(super) fn check_target(target: &DbServer) -> Result<()> {
    refuse_target(target, target.refusal())
}

/// [`check_target`] for a move under way, whose place on the target was
/// counted apart (`has_room`: itself and later moves left out).
pub(super) fn check_target_given_room(target: &DbServer, has_room: bool) -> Result<()> {
    refuse_target(target, target.refusal_given_room(has_room))
}

fn refuse_target(target: &DbServer, refusal: Option<String>) -> Result<()> {
    match refusal {
        Some(why) => Err(Error::Conflict(format!(
            "server '{}' takes no tenants: {why}",
            target.name
        ))),
        None => Ok(()),
    }
}

/// What logical replication needs of both servers and the tenant's tables.
pub(super) async fn check_servers(ends: &Ends, t: &TenantRecord) -> Result<()> {
    let wal_level: String = sqlx::query_scalar("SELECT current_setting('wal_level')")
        .fetch_one(&ends.src.pool)
        .await
        .context("read the source server's wal_level")?;
    if wal_level != "logical" {
        return Err(Error::Conflict(format!(
            "the tenant's server runs with wal_level = {wal_level}: moving a tenant needs wal_level = logical there (a server restart)"
        )));
    }
    // The target subscribes: PostgreSQL refuses that to an admin login that
    // is not a superuser (or, from 16, a member of pg_create_subscription),
    // and writes the refused statement, the source's password in it, to the
    // target's log. Refused here, before anything is made.
    let may_subscribe: bool = sqlx::query_scalar(
        "SELECT rolsuper OR EXISTS (SELECT 1 FROM pg_roles g
                                     WHERE g.rolname = 'pg_create_subscription'
                                       AND pg_has_role(current_user, g.oid, 'USAGE'))
           FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(&ends.dst.pool)
    .await
    .context("read what the target server's admin login may do")?;
    if !may_subscribe {
        return Err(Error::Conflict(
            "the target server's admin login may not create subscriptions (a superuser, or from PostgreSQL 16 a member of pg_create_subscription, may): a move copies through one"
                .into(),
        ));
    }
    let id_of = |pool: &sqlx::PgPool| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT system_identifier FROM pg_control_system()")
                .fetch_one(&pool)
                .await
                .ok()
        }
    };
    let (a, b) = tokio::join!(id_of(&ends.src.pool), id_of(&ends.dst.pool));
    if a.is_some() && a == b {
        return Err(Error::Conflict(
            "both servers are the same PostgreSQL cluster: nothing to move".into(),
        ));
    }
    let conn = ends
        .src
        .single_pool(&t.database_name)
        .await
        .context("connect to the tenant's database")?;
    let missing: Vec<String> = sqlx::query_scalar(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
            AND n.nspname NOT LIKE 'pg\\_%'
            AND (c.relreplident = 'n'
                 OR (c.relreplident = 'd' AND NOT EXISTS
                       (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)))
          ORDER BY 1",
    )
    .fetch_all(&conn)
    .await
    .context("check the tenant's tables")?;
    conn.close().await;
    if !missing.is_empty() {
        return Err(Error::Conflict(format!(
            "these tables have no primary key, so their updates cannot be replicated: {}",
            missing.join(", ")
        )));
    }
    Ok(())
}

/// Every table of the tenant's database, quoted, the fence table included.
pub(super) async fn published_tables(conn: &PgPool) -> anyhow::Result<Vec<String>> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
            AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
          ORDER BY 1",
    )
    .fetch_all(conn)
    .await
    .context("list the tenant's tables")?;
    Ok(tables)
}

/// `pg_dump --schema-only` of the source streamed into `pg_restore` on the target.
pub(super) async fn copy_schema(tools: PgTools, ends: &Ends, db: &str) -> Result<()> {
    let mut dump = tools.spawn_schema_dump(&ends.src.libpq, db)?;
    let mut restore = tools.spawn_restore(&ends.dst.libpq, db)?;
    let dump_err = capture_stderr(&mut dump);
    let restore_err = capture_stderr(&mut restore);
    let mut out = dump.stdout.take().context("pg_dump's output")?;
    let mut input = restore.stdin.take().context("pg_restore's input")?;
    let copied = tokio::io::copy(&mut out, &mut input).await;
    drop(input);
    let dumped = dump.wait().await.context("wait for pg_dump")?;
    let restored = restore.wait().await.context("wait for pg_restore")?;
    let (dump_err, restore_err) = (
        dump_err.await.unwrap_or_default(),
        restore_err.await.unwrap_or_default(),
    );
    if !dumped.success() {
        return Err(anyhow::anyhow!("dump the schema: {}", error_lines(&dump_err)).into());
    }
    if !restored.success() || copied.is_err() {
        return Err(anyhow::anyhow!("restore the schema: {}", error_lines(&restore_err)).into());
    }
    Ok(())
}

/// Write a fresh token on the source and wait until the target has it: then
/// every transaction committed on the source before it is applied there.
pub(super) async fn fence(
    src: &PgPool,
    dst: &PgPool,
    subscription: &str,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let token = Uuid::new_v4();
    let started = Instant::now();
    // Flushed at commit even where the server's default is not: WAL senders
    // only send flushed WAL, and the wal writer's delay would add to the freeze.
    sqlx::query("SET synchronous_commit = on")
        .execute(src)
        .await
        .context("ask for a flushed commit")?;
    sqlx::query(&format!(
        "INSERT INTO {FENCE_SCHEMA}.fence VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET token = excluded.token"
    ))
    .bind(token)
    .execute(src)
    .await
    .context("write the fence token on the source")?;
    let mut pause = Duration::from_millis(1);
    loop {
        let seen: Option<Uuid> = sqlx::query_scalar(&format!(
            "SELECT token FROM {FENCE_SCHEMA}.fence WHERE id = 1"
        ))
        .fetch_optional(dst)
        .await
        .context("read the fence token on the target")?;
        if seen == Some(token) {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < timeout,
            "the target did not catch up with the source within {}s",
            timeout.as_secs()
        );
        // E.g. a column added on the source only: the changes cannot be applied.
        let errors: i64 = sqlx::query_scalar(
            "SELECT coalesce((SELECT apply_error_count FROM pg_stat_subscription_stats WHERE subname = $1), 0)",
        )
        .bind(subscription)
        .fetch_one(dst)
        .await
        .context("check the replication's errors")?;
        if errors > 0 {
            return Err(replication_failed());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

pub(super) fn replication_failed() -> anyhow::Error {
    anyhow::anyhow!(
        "copy rows to the target: replication reported an error (did the schema change meanwhile? see the target server's log)"
    )
}

/// Let the tenant's requests in flight finish (routers close their pools
/// on the freeze), then end whatever sessions are left, and wait until they
/// are gone: a session being terminated may still be committing.
pub(super) async fn drain_sessions(admin: &ServerAdmin, role: &str) -> anyhow::Result<()> {
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM pg_stat_activity WHERE usename = $1")
            .bind(role)
            .fetch_one(&admin.pool)
            .await
            .context("count the tenant's sessions")
    };
    let started = Instant::now();
    while started.elapsed() < DRAIN && count().await? > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Always, even if none was seen: a login that passed its check just
    // before NOLOGIN may not show its role yet.
    roles::terminate_sessions(admin, role).await?;
    let ended = Instant::now();
    while count().await? > 0 {
        anyhow::ensure!(
            ended.elapsed() < DRAIN,
            "the tenant's sessions did not end on the source"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
        roles::terminate_sessions(admin, role).await?;
    }
    Ok(())
}

/// Sequences do not replicate: set each on the target to the source's value.
pub(super) async fn copy_sequences(src: &PgPool, dst: &PgPool) -> anyhow::Result<()> {
    let seqs: Vec<String> = sqlx::query_scalar(
        "SELECT format('%I.%I', schemaname, sequencename) FROM pg_sequences
          WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
    )
    .fetch_all(src)
    .await
    .context("list sequences")?;
    for seq in seqs {
        let (value, called): (i64, bool) =
            sqlx::query_as(&format!("SELECT last_value, is_called FROM {seq}"))
                .fetch_one(src)
                .await
                .context("read a sequence")?;
        sqlx::query("SELECT setval($1::regclass, $2, $3)")
            .bind(&seq)
            .bind(value)
            .bind(called)
            .execute(dst)
            .await
            .context("set a sequence on the target")?;
    }
    Ok(())
}

/// What verification compares of each table: its rows, and a checksum of
/// their contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TableDigest {
    pub table: String,
    pub rows: i64,
    pub checksum: String,
}

/// Settings every value's text form depends on, the same on both servers
/// whatever their defaults (the checksum hashes rows as text); for the
/// verifying transaction only.
const DIGEST_SETTINGS: &str =
    "SELECT set_config('TimeZone', 'UTC', true), set_config('DateStyle', 'ISO, YMD', true),
        set_config('IntervalStyle', 'postgres', true), set_config('extra_float_digits', '1', true),
        set_config('bytea_output', 'hex', true), set_config('lc_monetary', 'C', true)";

/// Row count and checksum of every table, in one read-only transaction.
///
/// The checksum is the sum, as an exact `numeric`, of the first 64 bits of
/// the MD5 of each row's text form (`row::text`, all columns in order). A
/// sum does not depend on the order rows are read in, so it needs no
/// primary key and no sort; unlike XOR, it counts a duplicated row twice
/// (two equal rows do not cancel out). A changed, missing or extra row
/// changes the sum unless another change makes up for it exactly (odds of
/// about 2⁻⁶⁴). MD5 of text is the same on every platform and version, where
/// PostgreSQL's internal hash functions are not promised to be.
pub(super) async fn table_digests(
    pool: &PgPool,
    tables: &[String],
) -> anyhow::Result<Vec<TableDigest>> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    sqlx::query(DIGEST_SETTINGS).execute(&mut *tx).await?;
    let mut digests = Vec::with_capacity(tables.len());
    for table in tables {
        let (rows, checksum): (i64, String) = sqlx::query_as(&format!(
            "SELECT count(*), coalesce(sum(('x' || left(md5(silo_move_row::text), 16))::bit(64)::bigint::numeric), 0)::text
               FROM {table} silo_move_row"
        ))
        .fetch_one(&mut *tx)
        .await
        .with_context(|| format!("read {table}"))?;
        digests.push(TableDigest {
            table: table.clone(),
            rows,
            checksum,
        });
    }
    tx.rollback().await.ok();
    Ok(digests)
}

/// How two servers' digests differ, table by table; `None` when they agree.
pub(super) fn compare_digests(source: &[TableDigest], target: &[TableDigest]) -> Option<String> {
    let mut differ = Vec::new();
    for s in source {
        match target.iter().find(|t| t.table == s.table) {
            None => differ.push(format!("{}: missing on the target", s.table)),
            Some(t) if t.rows != s.rows => differ.push(format!(
                "{}: {} rows on the source, {} on the target",
                s.table, s.rows, t.rows
            )),
            Some(t) if t.checksum != s.checksum => differ.push(format!(
                "{}: {} rows on both, but their contents differ (checksums)",
                s.table, s.rows
            )),
            Some(_) => {}
        }
    }
    for t in target {
        if !source.iter().any(|s| s.table == t.table) {
            differ.push(format!("{}: not on the source", t.table));
        }
    }
    (!differ.is_empty()).then(|| differ.join("; "))
}

/// In the freeze, before the switch: the row count and checksum of every
/// table on the source (frozen: its role cannot log in) and on the target
/// (caught up to the last fence), read on both servers at once. `Ok(Err)`
/// says how they differ.
pub(super) async fn verify_copy(
    src: &PgPool,
    dst: &PgPool,
) -> anyhow::Result<std::result::Result<(), String>> {
    let tables = published_tables(src).await?;
    let (a, b) = tokio::join!(table_digests(src, &tables), table_digests(dst, &tables));
    let a = a.context("verify the copy: read the source")?;
    let b = b.context("verify the copy: read the target")?;
    Ok(match compare_digests(&a, &b) {
        Some(differ) => Err(differ),
        None => Ok(()),
    })
}

/// Lift a freeze: the tenant serves from the source again.
pub(super) async fn unfreeze(reg: &Registry, ends: &Ends, plan: &MovePlan) {
    match reg.tenant(plan.tenant_id).await {
        Ok(Some(t)) if t.server_id == plan.from_server => {
            if t.status == TenantStatus::Active {
                if let Err(e) = roles::set_role_login(&ends.src, &plan.role, true).await {
                    tracing::warn!(tenant_id = %t.id, "failed to give the tenant role its login back (the reconciler retries): {e:#}");
                }
            }
            if let Err(e) = reg.set_frozen(plan.tenant_id, false).await {
                tracing::warn!(tenant_id = %t.id, "failed to lift a freeze: {e}");
            }
        }
        _ => {}
    }
}

/// Drop a subscription without needing its publisher: detach its slot first.
pub(super) async fn drop_subscription(conn: &PgPool, name: &str) -> anyhow::Result<()> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_subscription WHERE subname = $1)")
            .bind(name)
            .fetch_one(conn)
            .await?;
    if exists {
        sqlx::raw_sql(&format!(
            "ALTER SUBSCRIPTION {name} DISABLE; ALTER SUBSCRIPTION {name} SET (slot_name = NONE)"
        ))
        .execute(conn)
        .await
        .context("detach the subscription")?;
        sqlx::raw_sql(&format!("DROP SUBSCRIPTION IF EXISTS {name}"))
            .execute(conn)
            .await
            .context("drop the subscription")?;
    }
    Ok(())
}

/// Drop a move's replication slots on the source, once their walsenders
/// have gone: its own, and table-sync slots left in the tenant's database.
pub(super) async fn drop_slots(admin: &ServerAdmin, plan: &MovePlan) -> anyhow::Result<()> {
    drop_slot(admin, &plan.name()).await?;
    let sync: Vec<String> = sqlx::query_scalar(
        "SELECT slot_name::text FROM pg_replication_slots
          WHERE database = $1 AND slot_type = 'logical' AND slot_name LIKE 'pg\\_%\\_sync\\_%'",
    )
    .bind(&plan.database)
    .fetch_all(&admin.pool)
    .await?;
    for slot in sync {
        drop_slot(admin, &slot).await?;
    }
    Ok(())
}

/// Drop a replication slot on the source, once its walsender has gone.
pub(super) async fn drop_slot(admin: &ServerAdmin, name: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let active: Option<bool> =
            sqlx::query_scalar("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
                .bind(name)
                .fetch_optional(&admin.pool)
                .await?;
        match active {
            None => return Ok(()),
            Some(false) => {
                match sqlx::query("SELECT pg_drop_replication_slot($1)")
                    .bind(name)
                    .execute(&admin.pool)
                    .await
                {
                    Ok(_) => return Ok(()),
                    // Taken again between the check and the drop: wait.
                    Err(e) if started.elapsed() > Duration::from_secs(10) => return Err(e.into()),
                    Err(_) => {}
                }
            }
            Some(true) if started.elapsed() > Duration::from_secs(10) => {
                anyhow::bail!("the replication slot is still in use")
            }
            Some(true) => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Undo the target side of a move and the source's publication: the
/// registry names the source. Each step is tried even if another failed (one
/// server may be down); what is left, the sweep drops.
pub(super) async fn discard_target(ends: &Ends, plan: &MovePlan, drop_after: i64) {
    let name = plan.name();
    let db = &plan.database;
    let source = async {
        if roles::database_exists(&ends.src, db).await? {
            let conn = ends.src.single_pool(db).await?;
            let dropped = sqlx::raw_sql(&format!(
                "DROP PUBLICATION IF EXISTS {name}; DROP SCHEMA IF EXISTS {FENCE_SCHEMA} CASCADE"
            ))
            .execute(&conn)
            .await;
            conn.close().await;
            dropped.context("drop the publication")?;
        }
        anyhow::Ok(())
    }
    .await;
    let target = async {
        if roles::database_exists(&ends.dst, db).await? {
            let conn = ends.dst.single_pool(db).await?;
            let dropped = drop_subscription(&conn, &name).await;
            conn.close().await;
            dropped?;
        }
        anyhow::Ok(())
    }
    .await;
    let slot = drop_slots(&ends.src, plan).await;
    // Whatever is under the tenant's database name on the target is kept
    // aside, never dropped here: an operator's database of that name, or
    // the tenant's live data itself after a control database restored to
    // before an earlier move, look the same as a failed attempt's copy.
    let database = async {
        if roles::database_exists(&ends.dst, db).await? {
            let kept = roles::keep_database(&ends.dst, db, plan.tenant_id, Some(drop_after))
                .await
                .context("keep the target database aside")?;
            tracing::warn!(tenant_id = %plan.tenant_id, database = kept, "kept a database under the tenant's name on the move's target aside until its grace period ends");
        }
        roles::drop_role(&ends.dst, &plan.role)
            .await
            .context("drop the target role")
    }
    .await;
    for e in [source, target, slot, database]
        .into_iter()
        .filter_map(Result::err)
    {
        tracing::warn!(tenant_id = %plan.tenant_id, "failed to clean up after a move (the reconciler retries): {e:#}");
    }
}

/// After the switch, when the copy was not verified: the target stops
/// following the source, whose database is set aside (renamed out of the
/// sweep's way) and whose role goes. Returns the kept database's name.
pub(super) async fn keep_source(ends: &Ends, plan: &MovePlan) -> anyhow::Result<String> {
    let name = plan.name();
    let db = &plan.database;
    // Best effort: a subscription or slot left over is dropped by the sweep.
    let detached = async {
        let conn = ends.dst.single_pool(db).await?;
        let dropped = drop_subscription(&conn, &name).await;
        conn.close().await;
        dropped?;
        drop_slots(&ends.src, plan).await
    }
    .await;
    if let Err(e) = detached {
        tracing::warn!(tenant_id = %plan.tenant_id, "failed to detach an unverified move (the reconciler retries): {e:#}");
    }
    let kept = roles::set_aside(&ends.src, db, plan.tenant_id).await?;
    // The role goes (its grants in the kept database with it): nobody logs in there.
    if let Err(e) = roles::drop_role(&ends.src, &plan.role).await {
        tracing::warn!(tenant_id = %plan.tenant_id, "failed to drop the old role of a moved tenant (the reconciler retries): {e:#}");
    }
    Ok(kept)
}

/// After the switch: the target stops following the source, and the
/// source's database and role go. Failures are left to the sweep (no
/// registry row names them any more).
pub(super) async fn finish_source(ends: &Ends, plan: &MovePlan) {
    let name = plan.name();
    let db = &plan.database;
    let finished = async {
        let conn = ends.dst.single_pool(db).await?;
        drop_subscription(&conn, &name).await?;
        sqlx::raw_sql(&format!("DROP SCHEMA IF EXISTS {FENCE_SCHEMA} CASCADE"))
            .execute(&conn)
            .await
            .context("drop the fence table on the target")?;
        conn.close().await;
        drop_slots(&ends.src, plan).await?;
        roles::drop_database(&ends.src, db)
            .await
            .context("drop the source database")?;
        roles::drop_role(&ends.src, &plan.role)
            .await
            .context("drop the source role")?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = finished {
        tracing::warn!(tenant_id = %plan.tenant_id, "failed to clean up the source after a move (the reconciler retries): {e:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(table: &str, rows: i64, checksum: &str) -> TableDigest {
        TableDigest {
            table: table.into(),
            rows,
            checksum: checksum.into(),
        }
    }

    #[test]
    fn digests_differ_by_count_contents_or_tables() {
        let source = [d("public.a", 3, "17"), d("public.b", 0, "0")];
        #[rustfmt::skip]
        let cases: [(&[TableDigest], Option<&str>); 5] = [
            (&[d("public.a", 3, "17"), d("public.b", 0, "0")], None),
            (&[d("public.a", 2, "11"), d("public.b", 0, "0")], Some("public.a: 3 rows on the source, 2 on the target")),
            (&[d("public.a", 3, "18"), d("public.b", 0, "0")], Some("public.a: 3 rows on both, but their contents differ (checksums)")),
            (&[d("public.a", 3, "17")], Some("public.b: missing on the target")),
            (&[d("public.a", 3, "17"), d("public.b", 0, "0"), d("public.c", 1, "5")], Some("public.c: not on the source")),
        ];
        let failures: Vec<String> = cases
            .iter()
            .filter_map(|(target, want)| {
                let got = compare_digests(&source, target);
                (got.as_deref() != *want).then(|| format!("{target:?}: got {got:?}, want {want:?}"))
            })
            .collect();
        assert!(failures.is_empty(), "{failures:#?}");
    }
}
