//! Shared server connections (`SILO_PG_SHARED_CONNECTIONS`): while a
//! tenant is busy, its clients' single `SELECT`s run pipelined on a few
//! server connections. Every client still gets its own answers, its own
//! errors and its own cancel, and a shared connection that is lost ends
//! only the queries that were on it.

use std::time::Duration;

use silo::domain::PoolMode;
use sqlx::{Connection as _, Executor as _, Row as _};

use crate::common::TestEnv;
use crate::wire::{credential, pgbench_tables, text, uri, wait_until_running};

/// `slug`'s figures at the front door (`GET /admin/v1/pools`):
/// transactions, of those shared, and errors.
async fn figures(env: &TestEnv, slug: &str) -> (u64, u64, u64) {
    let tenant = crate::wire_drivers::front_door_figures(env, slug).await;
    let n = |k: &str| tenant[k].as_u64().unwrap_or(0);
    (n("transactions"), n("shared_queries"), n("errors"))
}

/// A client of `uri` inside a transaction, holding a server connection:
/// its tenant counts as busy while it stands. Simple queries (no
/// arguments) throughout, as sqlx sends a bare string.
async fn in_transaction(uri: &str) -> sqlx::PgConnection {
    let mut c = sqlx::PgConnection::connect(uri).await.unwrap();
    c.execute("BEGIN").await.unwrap();
    c.execute("SELECT 1").await.unwrap();
    c
}

async fn number(c: &mut sqlx::PgConnection, sql: &str) -> Result<i64, sqlx::Error> {
    c.fetch_one(sql).await?.try_get::<i64, _>(0)
}

#[tokio::test]
async fn a_busy_tenant_s_single_reads_share_connections_and_each_client_gets_its_own_answers() {
    let env = TestEnv::setup()
        .wire(|w| w.shared_connections = 2)
        .start()
        .await;
    env.create("busy").await;
    pgbench_tables(&env, "busy").await;
    let pw = credential(&env, "busy", "app", PoolMode::Transaction).await;
    let u = uri(&env, "app", &pw, "busy");
    // Two server connections busy: the tenant shares from now on.
    let mut held = [in_transaction(&u).await, in_transaction(&u).await];

    // One client, one statement after another: each shared, after the
    // first (which finds the tenant's pool).
    let mut c = sqlx::PgConnection::connect(&u).await.unwrap();
    assert_eq!(number(&mut c, "SELECT 0::int8").await.unwrap(), 0);
    let (_, before, _) = figures(&env, "busy").await;
    for i in 0..20i64 {
        let sql = format!("/* {i} */ select {i}::int8 + 1;");
        assert_eq!(number(&mut c, &sql).await.unwrap(), i + 1);
    }
    // Not shared: a statement that changes the session, and two at once.
    c.execute("SET application_name = 'mine'").await.unwrap();
    let two = c.fetch_all("SELECT 1; SELECT 2").await.unwrap();
    assert_eq!(two.len(), 2);
    let (_, after, _) = figures(&env, "busy").await;
    assert_eq!(after - before, 20, "every single read shared, nothing else");

    // A client with a setting of its own shares with clients of the same
    // only: each sees its own, on lines of their own.
    let options: sqlx::postgres::PgConnectOptions = u.parse().unwrap();
    let mut std =
        sqlx::PgConnection::connect_with(&options.options([("IntervalStyle", "sql_standard")]))
            .await
            .unwrap();
    std.execute("SELECT 1").await.unwrap();
    let (_, before, _) = figures(&env, "busy").await;
    let style = "SELECT current_setting('IntervalStyle')";
    for _ in 0..10 {
        let mine: String = std.fetch_one(style).await.unwrap().get(0);
        assert_eq!(mine, "sql_standard");
        let theirs: String = c.fetch_one(style).await.unwrap().get(0);
        assert_eq!(theirs, "postgres");
    }
    let (_, after, _) = figures(&env, "busy").await;
    assert_eq!(after - before, 20, "both kinds shared");

    // 24 clients at once, each with numbers of its own; some fail on
    // purpose, one reads answers larger than a line's part, one runs
    // transactions in between.
    let (_, before, errors_before) = figures(&env, "busy").await;
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..24i64 {
        let u = u.clone();
        clients.spawn(async move {
            let mut c = sqlx::PgConnection::connect(&u).await.unwrap();
            assert_eq!(number(&mut c, "SELECT 0::int8").await.unwrap(), 0);
            for j in 0..40i64 {
                let n = i * 1000 + j;
                if i % 6 == 0 && j % 10 == 5 {
                    let e = number(&mut c, "SELECT 1/0").await.unwrap_err();
                    let code = e.as_database_error().and_then(|d| d.code()).unwrap();
                    assert_eq!(code, "22012", "{e}");
                } else if i == 1 && j % 8 == 0 {
                    let row = c
                        .fetch_one(format!("SELECT {n}::int8, repeat('y', 300000)").as_str())
                        .await
                        .unwrap();
                    assert_eq!(row.get::<i64, _>(0), n);
                    assert_eq!(row.get::<String, _>(1).len(), 300_000);
                } else if i == 2 && j % 5 == 0 {
                    c.execute("BEGIN").await.unwrap();
                    c.execute(
                        format!("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, {n}, now())")
                            .as_str(),
                    )
                    .await
                    .unwrap();
                    c.execute("COMMIT").await.unwrap();
                } else {
                    let sql = format!("SELECT {n}::int8, abalance FROM pgbench_accounts WHERE aid = {}", j + 1);
                    assert_eq!(number(&mut c, &sql).await.unwrap(), n, "client {i}");
                }
            }
            c.close().await.unwrap();
        });
    }
    while let Some(done) = clients.join_next().await {
        done.unwrap();
    }
    let (_, after, errors) = figures(&env, "busy").await;
    assert!(after > before, "nothing shared under 24 clients");
    assert_eq!(
        errors - errors_before,
        16,
        "each division by zero counted, once"
    );
    let kept: i64 = held[0]
        .fetch_one("SELECT count(*)::int8 FROM pgbench_history WHERE delta BETWEEN 2000 AND 2999")
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 8, "the transactions between shared reads committed");
    for h in &mut held {
        h.execute("COMMIT").await.unwrap();
    }
}

/// psql running `statements` in one session (a `-c` each), unaligned.
fn psql_session(uri: &str, statements: &[&str]) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new("psql");
    cmd.arg(uri).args(["-X", "-A", "-t"]);
    for s in statements {
        cmd.args(["-c", s]);
    }
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// The first line psql prints (its first statement answered: it sends
/// the next then), and the rest of what it prints. A first statement
/// that is not shared (`VALUES`) is not queued behind a line's long one.
async fn first_line(
    child: &mut tokio::process::Child,
) -> (String, tokio::io::BufReader<tokio::process::ChildStdout>) {
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)
        .await
        .unwrap();
    (line.trim().to_owned(), out)
}

/// Ctrl-C to psql; what it said after.
async fn interrupt(child: tokio::process::Child) -> std::process::Output {
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("psql ended after its cancel")
        .unwrap()
}

const CANCELLED: &str = "canceling statement due to user request";

/// One line (psql's clients only: one kind of settings), a transaction
/// held beside it so that the tenant counts as busy.
#[tokio::test]
async fn a_shared_query_is_cancelled_alone_and_a_lost_shared_connection_ends_only_its_own() {
    let env = TestEnv::setup()
        .wire(|w| w.shared_connections = 1)
        .start()
        .await;
    env.create("line").await;
    let pw = credential(&env, "line", "app", PoolMode::Transaction).await;
    let u = uri(&env, "app", &pw, "line");
    let mut held = in_transaction(&u).await;
    let (_, before, _) = figures(&env, "line").await;
    // Long, but its answer begun at once (a first row larger than the
    // server's send buffer): a line takes no more behind a query the
    // server has been on a while with no answer yet, but does behind this.
    let long = |name: &str| {
        format!(
            "SELECT repeat('a', 9000) FROM generate_series(1, 2) AS {name}(g) \
             WHERE g = 1 OR (SELECT count(*) FROM generate_series(1, 100000000000)) > 0"
        )
    };

    // A long query at the head of the line (psql's second statement: its
    // first finds the pool), another client's queued behind it. Ctrl-C
    // cancels the long one alone.
    let head = psql_session(&u, &["SELECT 1", &long("shared_cancel")]);
    wait_until_running(&env, "line", "%AS shared_cancel(g)%", None).await;
    let mut behind = psql_session(&u, &["VALUES ('first')", "SELECT 42"]);
    let (first, mut rest) = first_line(&mut behind).await;
    assert_eq!(first, "first");
    // Its second given to the line before the cancel is sent.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = interrupt(head).await;
    assert!(text(&out).contains(CANCELLED), "{}", text(&out));
    let out = tokio::time::timeout(Duration::from_secs(30), behind.wait_with_output())
        .await
        .expect("the query behind answered")
        .unwrap();
    let mut said = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut rest, &mut said)
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        said.trim(),
        "42",
        "the query behind the cancelled one is not cancelled"
    );
    let (_, after, _) = figures(&env, "line").await;
    assert!(after - before >= 2, "both ran shared ({before} -> {after})");

    // A query queued behind another client's long one is cancelled at
    // once, by silo: a cancel sent to the server would stop the long one.
    let head = psql_session(&u, &["SELECT 1", &long("shared_head")]);
    wait_until_running(&env, "line", "%AS shared_head(g)%", None).await;
    let mut queued = psql_session(&u, &["VALUES ('first')", "SELECT 'queued'"]);
    let (first, _) = first_line(&mut queued).await;
    assert_eq!(first, "first");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = interrupt(queued).await;
    assert!(text(&out).contains(CANCELLED), "{}", text(&out));
    let running: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%AS shared_head(g)%' AND state = 'active' AND pid <> pg_backend_pid()",
    )
    .fetch_one(&env.admin)
    .await
    .unwrap();
    assert_eq!(running, 1, "the long query goes on");
    let out = interrupt(head).await;
    assert!(text(&out).contains(CANCELLED), "{}", text(&out));

    // The shared connection ended under a long query: its client hears
    // why; the tenant's other clients go on, on a new one.
    let lost = psql_session(&u, &["SELECT 1", &long("shared_lost")]);
    wait_until_running(&env, "line", "%AS shared_lost(g)%", None).await;
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity, pg_terminate_backend(pid)
          WHERE query LIKE '%AS shared_lost(g)%' AND pid <> pg_backend_pid()",
    )
    .fetch_one(&env.admin)
    .await
    .unwrap();
    assert_eq!(ended, 1);
    let out = tokio::time::timeout(Duration::from_secs(30), lost.wait_with_output())
        .await
        .expect("psql ended with its connection")
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("terminating connection due to administrator command"),
        "{}",
        text(&out)
    );
    let out = psql_session(&u, &["SELECT 1", "SELECT 7"])
        .wait_with_output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1\n7",
        "{}",
        text(&out)
    );
    assert_eq!(number(&mut held, "SELECT 8::int8").await.unwrap(), 8);
    held.execute("COMMIT").await.unwrap();
}

/// A client that stops reading a large shared answer holds up only what
/// was already queued behind it on its line: a line reading a large answer
/// takes no more, and one whose client has not taken its part for 10 s
/// ends that client, drops the rest of its answer and goes on.
#[tokio::test]
async fn a_client_that_stops_reading_a_shared_answer_holds_up_no_one_for_long() {
    use futures_util::StreamExt as _;
    let env = TestEnv::setup()
        .wire(|w| w.shared_connections = 1)
        .start()
        .await;
    env.create("stall").await;
    let pw = credential(&env, "stall", "app", PoolMode::Transaction).await;
    let u = uri(&env, "app", &pw, "stall");
    let mut held = in_transaction(&u).await;
    let mut c = sqlx::PgConnection::connect(&u).await.unwrap();
    assert_eq!(number(&mut c, "SELECT 1::int8").await.unwrap(), 1);
    let mut stalled = sqlx::PgConnection::connect(&u).await.unwrap();
    assert_eq!(number(&mut stalled, "SELECT 1::int8").await.unwrap(), 1);
    let (_, before, _) = figures(&env, "stall").await;

    // 100 MB of rows, of which the client takes one and then no more.
    let mut rows =
        stalled.fetch("SELECT repeat('z', 10000) FROM generate_series(1, 10000) AS stalled");
    assert_eq!(
        rows.next()
            .await
            .unwrap()
            .unwrap()
            .get::<String, _>(0)
            .len(),
        10_000
    );
    // Its backend waits for silo to take what it sends: the line waits
    // for the client.
    wait_until_running(&env, "stall", "%AS stalled", Some("ClientWrite")).await;
    let still_running = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%AS stalled' AND state = 'active'",
        )
        .fetch_one(&env.admin)
        .await
        .unwrap()
    };
    // Another client's reads are answered meanwhile.
    for i in 0..5i64 {
        assert_eq!(
            number(&mut c, &format!("SELECT {i}::int8")).await.unwrap(),
            i
        );
    }
    assert_eq!(still_running().await, 1, "answered while the line was held");

    // Within 10 s (and the time to drop the rest) the stalled client is
    // ended and its line is free again.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while still_running().await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the stalled answer is still being sent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut rest = 0;
    let ended = loop {
        match rows.next().await {
            Some(Ok(_)) => rest += 1,
            Some(Err(e)) => break e.to_string(),
            None => break format!("the answer ended after {rest} more rows"),
        }
    };
    assert!(rest < 9_999, "{ended}");
    drop(rows);
    for i in 0..5i64 {
        assert_eq!(
            number(&mut c, &format!("SELECT {i}::int8")).await.unwrap(),
            i
        );
    }
    let (_, after, _) = figures(&env, "stall").await;
    assert!(
        after - before >= 5,
        "the reads after it were shared ({before} -> {after})"
    );
    held.execute("COMMIT").await.unwrap();
}
