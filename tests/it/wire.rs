//! The PostgreSQL-protocol front door, driven by unmodified real clients
//! (`psql`, `pgbench`, sqlx) against real clusters: login with app
//! credentials, isolation between tenants, session and transaction
//! pooling with prepared statements, `\copy`, cancel, and the lifecycle
//! (a revoked credential's session ends, a suspended tenant is refused).

use std::process::Output;
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use silo::domain::PoolMode;
use sqlx::{Connection as _, Row as _};

use crate::common::TestEnv;

async fn env() -> TestEnv {
    TestEnv::setup().wire(|_| {}).start().await
}

/// Make an app credential of `slug` directly in the registry; its password.
pub(crate) async fn credential(env: &TestEnv, slug: &str, name: &str, mode: PoolMode) -> String {
    let t = env.record(slug).await;
    let password = silo::crypto::random_password(32);
    env.registry()
        .create_app_credential(
            t.id,
            name,
            false,
            mode,
            &silo::servers::scram::verifier(&password),
            "test",
        )
        .await
        .unwrap();
    password
}

pub(crate) fn uri(env: &TestEnv, user: &str, password: &str, database: &str) -> String {
    let addr = env.pg_addr.expect("front door on");
    format!("postgresql://{user}:{password}@{addr}/{database}?sslmode=disable")
}

pub(crate) async fn psql(uri: &str, args: &[&str]) -> Output {
    tokio::process::Command::new("psql")
        .arg(uri)
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(args)
        .env("PGCONNECT_TIMEOUT", "20")
        .kill_on_drop(true)
        .output()
        .await
        .expect("run psql")
}

pub(crate) fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Wait (at most 30 s) until a statement whose text is `LIKE like` runs in
/// `slug`'s database, waiting on `wait_event` when one is given.
pub(crate) async fn wait_until_running(
    env: &TestEnv,
    slug: &str,
    like: &str,
    wait_event: Option<&str>,
) {
    let database = env.record(slug).await.database_name;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND query LIKE $2
               AND state = 'active' AND ($3::text IS NULL OR wait_event = $3)",
        )
        .bind(&database)
        .bind(like)
        .bind(wait_event)
        .fetch_one(&env.admin)
        .await
        .unwrap();
        if running > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no statement {like} running (waiting on {wait_event:?}) in {slug}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// pgbench's tables in `slug`'s database, made by the server's superuser
/// (tenant roles may not create tables; the tenant's default privileges
/// give its role the data).
pub(crate) async fn pgbench_tables(env: &TestEnv, slug: &str) {
    let t = env.record(slug).await;
    let out = tokio::process::Command::new("pgbench")
        .arg("-i")
        .arg("-q")
        .arg(env.pg.url(&t.database_name))
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "pgbench -i: {}", text(&out));
}

async fn pgbench(uri: &str, args: &[&str]) -> Output {
    tokio::process::Command::new("pgbench")
        .args(["-n", "-c", "4", "-j", "2", "-t", "25"])
        .args(args)
        .arg(uri)
        .env("PGCONNECT_TIMEOUT", "20")
        .kill_on_drop(true)
        .output()
        .await
        .expect("run pgbench")
}

#[tokio::test]
async fn psql_reaches_its_own_tenant_and_nothing_else() {
    let env = env().await;
    env.create("north").await;
    env.create("south").await;
    let pw = credential(&env, "north", "app", PoolMode::Session).await;
    let south_pw = credential(&env, "south", "app", PoolMode::Session).await;
    let north = env.record("north").await;

    let out = psql(
        &uri(&env, "app", &pw, "north"),
        &[
            "-c",
            "SELECT current_database() || ' ' || current_user || ' ' || current_setting('client_connection_check_interval')",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    // silo's server connection asks the server to notice a dead silo.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!(
            "{} {} {}",
            north.database_name,
            north.role_name,
            silo::servers::CLIENT_CHECK_INTERVAL
        )
    );

    // A wrong password, north's credential naming south's database, an
    // unknown tenant and an unknown user: one and the same refusal.
    let refusals = [
        uri(&env, "app", "wrong-password", "north"),
        uri(&env, "app", &pw, "south"),
        uri(&env, "app", &pw, "nowhere"),
        uri(&env, "nobody", &pw, "north"),
        uri(&env, "app", &south_pw, "north"),
    ];
    for u in &refusals {
        let out = psql(u, &["-c", "SELECT 1"]).await;
        assert!(!out.status.success(), "{u} got in");
        let said = text(&out);
        assert!(
            said.contains("password authentication failed for user"),
            "{u}: {said}"
        );
        assert!(
            !said.contains("south") && !said.contains("nowhere"),
            "{said}"
        );
    }
}

#[tokio::test]
async fn psql_copies_in_and_out_and_its_cancel_stops_a_statement() {
    let env = env().await;
    env.create("copier").await;
    let pw = credential(&env, "copier", "app", PoolMode::Session).await;
    let u = uri(&env, "app", &pw, "copier");
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("in.csv");
    let rows: String = (1..=500).map(|i| format!("{i}\n")).collect();
    std::fs::write(&csv, rows).unwrap();
    let back = dir.path().join("out.csv");
    let script = format!(
        "CREATE TEMP TABLE t (n int);\n\\copy t FROM '{}' CSV\n\\copy (SELECT n FROM t ORDER BY n) TO '{}' CSV\nSELECT count(*), sum(n) FROM t;\n",
        csv.display(),
        back.display()
    );
    let file = dir.path().join("script.sql");
    std::fs::write(&file, script).unwrap();
    let out = psql(&u, &["-f", file.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("500|125250"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_to_string(&back).unwrap().lines().count(), 500);

    // Ctrl-C: psql sends a CancelRequest, which silo forwards to the backend.
    let child = tokio::process::Command::new("psql")
        .arg(&u)
        .args(["-X", "-c", "SELECT pg_sleep(60)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    // Wait until the statement runs on the server, then interrupt psql.
    wait_until_running(&env, "copier", "SELECT pg_sleep%", None).await;
    let started = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("psql ended after its cancel")
        .unwrap();
    assert!(
        text(&out).contains("canceling statement due to user request"),
        "{}",
        text(&out)
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test]
async fn pgbench_runs_clean_in_every_protocol_and_pool_mode() {
    let env = env().await;
    env.create("bench").await;
    pgbench_tables(&env, "bench").await;
    let session = credential(&env, "bench", "sess", PoolMode::Session).await;
    let txn = credential(&env, "bench", "txn", PoolMode::Transaction).await;
    let mut failures = Vec::new();
    for (user, pw) in [("sess", &session), ("txn", &txn)] {
        let u = uri(&env, user, pw, "bench");
        for mode in ["simple", "extended", "prepared"] {
            for reconnect in [false, true] {
                let mut args = vec!["-M", mode];
                if reconnect {
                    args.push("-C");
                }
                let out = pgbench(&u, &args).await;
                let said = text(&out);
                if !out.status.success()
                    || !said.contains("number of transactions actually processed: 100/100")
                {
                    failures.push(format!("{user} -M {mode} -C={reconnect}: {said}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // Every transaction landed: 2 pool modes × 3 protocols × 2 × 100.
    let t = env.record("bench").await;
    let mut c = env
        .connect_as(&t.database_name, &t.role_name, &env.password(&t))
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pgbench_history")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 1200);
}

#[tokio::test]
async fn transaction_mode_shares_few_server_connections_and_keeps_prepared_statements() {
    let env = env().await;
    env.create("shared").await;
    pgbench_tables(&env, "shared").await;
    let pw = credential(&env, "shared", "txn", PoolMode::Transaction).await;
    let u = uri(&env, "txn", &pw, "shared");
    // 16 clients with prepared statements on a standard plan (20
    // connections): fine, and the server saw at most the tenant's cap.
    let out = tokio::process::Command::new("pgbench")
        .args([
            "-n", "-c", "16", "-j", "2", "-t", "40", "-M", "prepared", "-S",
        ])
        .arg(&u)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("processed: 640/640"), "{}", text(&out));
    // sqlx (extended protocol, named statements it caches) through the door.
    let mut c = sqlx::PgConnection::connect(&u).await.unwrap();
    for i in 0..20i32 {
        let row = sqlx::query("SELECT $1::int + 1 AS n")
            .bind(i)
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(row.get::<i32, _>("n"), i + 1);
    }
    let mut tx = c.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 7, now())",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    let kept: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgbench_history WHERE delta = 7 AND tid = 1 AND aid = 1",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert_eq!(kept, 0, "a rolled-back insert is not kept");
    c.close().await.unwrap();
}

#[tokio::test]
async fn a_revoked_credential_and_a_suspended_tenant_lose_their_sessions() {
    let env = env().await;
    env.create("gated").await;
    let pw = credential(&env, "gated", "app", PoolMode::Session).await;
    let other = credential(&env, "gated", "other", PoolMode::Transaction).await;
    let t = env.record("gated").await;
    let mut c = sqlx::PgConnection::connect(&uri(&env, "app", &pw, "gated"))
        .await
        .unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(one, 1);
    let mut survivor = sqlx::PgConnection::connect(&uri(&env, "other", &other, "gated"))
        .await
        .unwrap();
    let id = env.registry().app_credentials(t.id).await.unwrap()[0].id;
    env.registry()
        .revoke_app_credential(t.id, id, "test")
        .await
        .unwrap()
        .expect("revoked");
    // The session ends (at the notice; polled with a deadline).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match sqlx::query_scalar::<_, i32>("SELECT 1")
            .fetch_one(&mut c)
            .await
        {
            Err(e) => {
                assert!(e.to_string().contains("revoked"), "{e}");
                break;
            }
            Ok(_) => {
                assert!(Instant::now() < deadline, "the revoked session goes on");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // And it cannot log in again; the other credential still works.
    let out = psql(&uri(&env, "app", &pw, "gated"), &["-c", "SELECT 1"]).await;
    assert!(
        text(&out).contains("password authentication failed"),
        "{}",
        text(&out)
    );
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut survivor)
        .await
        .unwrap();
    assert_eq!(one, 1);

    // Suspended: the open session ends, a new one is refused, saying why.
    let (s, body) = env
        .call(Method::POST, "/admin/v1/tenants/gated/suspend", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match sqlx::query_scalar::<_, i32>("SELECT 1")
            .fetch_one(&mut survivor)
            .await
        {
            Err(e) => {
                assert!(e.to_string().contains("suspended"), "{e}");
                break;
            }
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "the suspended tenant's session goes on"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let out = psql(&uri(&env, "other", &other, "gated"), &["-c", "SELECT 1"]).await;
    assert!(!out.status.success());
    assert!(text(&out).contains("is suspended"), "{}", text(&out));
}

#[tokio::test]
async fn malformed_and_unsupported_openings_are_refused_cleanly() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = env().await;
    env.create("sturdy").await;
    let pw = credential(&env, "sturdy", "app", PoolMode::Session).await;
    let addr = env.pg_addr.unwrap();
    // Garbage, a huge length, protocol 2.0, GSSENC then nothing, a cancel
    // for nobody: each ends without harm, with a FATAL error naming the
    // problem where there is one (an ErrorResponse: 'E', then its fields).
    let openings: [(&[u8], &str); 5] = [
        (b"GET / HTTP/1.1\r\n\r\n", "C08P01"),
        (&[0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0], "C08P01"),
        (&[0, 0, 0, 8, 0, 2, 0, 0], "C0A000"),
        (&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30], "N"),
        (
            &[0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 1, 0, 0, 0, 2],
            "",
        ),
    ];
    // What the front door answers `bytes` with before it closes (within
    // the startup timeout, 10 s, at the latest).
    let answer_to = |bytes: Vec<u8>| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(40), s.read_to_end(&mut buf))
            .await
            .expect("the connection is closed")
            .ok();
        buf
    };
    for (bytes, answer) in openings {
        let buf = answer_to(bytes.to_vec()).await;
        let got = String::from_utf8_lossy(&buf);
        match answer {
            "" => assert!(buf.is_empty(), "{bytes:?}: {got}"),
            "N" => assert_eq!(buf, b"N", "{bytes:?}: {got}"),
            code => assert!(
                buf.first() == Some(&b'E') && got.contains(code) && got.contains("SFATAL"),
                "{bytes:?}: {got}"
            ),
        }
    }
    // A query where the SASL response belongs: a protocol violation, as
    // PostgreSQL answers it (not a failed password).
    let params = b"user\0app\0database\0sturdy\0\0";
    let mut opening = ((8 + params.len()) as i32).to_be_bytes().to_vec();
    opening.extend_from_slice(&196_608i32.to_be_bytes());
    opening.extend_from_slice(params);
    opening.extend_from_slice(b"Q\0\0\0\x0dSELECT 1\0");
    let buf = answer_to(opening).await;
    let got = String::from_utf8_lossy(&buf);
    assert!(
        got.contains("C08P01") && got.contains("expected SASL response"),
        "{got}"
    );

    // A client that connects and says nothing is dropped at the startup
    // timeout, and meanwhile others are served.
    let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let out = psql(&uri(&env, "app", &pw, "sturdy"), &["-c", "SELECT 41 + 1"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
}

/// One address that opens more silent connections than there is room for
/// logins (1,024) fills only its share (`SILO_PG_MAX_LOGINS_PER_ADDRESS`,
/// 256): the rest are refused at once, saying why, and clients from other
/// addresses still log in while they are held.
#[tokio::test]
async fn silent_connections_from_one_address_cannot_hold_back_others_logins() {
    use tokio::io::AsyncReadExt;
    let env = TestEnv::setup()
        // The silent connections are held for the whole test.
        .wire(|w| w.startup_timeout = Duration::from_secs(300))
        .start()
        .await;
    env.create("open").await;
    let pw = credential(&env, "open", "app", PoolMode::Transaction).await;
    let addr = env.pg_addr.unwrap();
    // The kernel holds up to 1,024 connections before silo accepts them
    // (a listening socket's Send-Q, as `ss` shows it, is its backlog), not
    // the 128 that would make a burst like the one below wait a second
    // for SYNs sent again.
    let ss = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{}", addr.port())])
        .output()
        .expect("run ss (scripts/install-deps installs iproute2)");
    let listening = String::from_utf8_lossy(&ss.stdout);
    let backlog = listening.split_whitespace().nth(2);
    assert_eq!(backlog, Some("1024"), "{listening}");
    let share = silo::config::DEFAULT_PG_MAX_LOGINS_PER_ADDRESS as usize;
    let flood = 1_100;
    // From 127.0.0.2 (any 127/8 address is this machine's loopback).
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..flood {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut s = socket.connect(addr).await.expect("connect from 127.0.0.2");
        readers.spawn(async move {
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf).await;
            String::from_utf8_lossy(&buf).into_owned()
        });
    }
    let logging_in = |pools: &serde_json::Value| pools["wire"]["logging_in"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut refused = 0;
    while refused < flood - share {
        let answer = tokio::time::timeout_at(deadline.into(), readers.join_next())
            .await
            .expect("the connections over the address's share are refused at once")
            .expect("a reader")
            .unwrap();
        assert!(
            answer.contains("C53300") && answer.contains("from this address"),
            "{answer}"
        );
        refused += 1;
    }
    let (_, pools) = env.call(Method::GET, "/admin/v1/pools", None).await;
    assert_eq!(logging_in(&pools), share as u64, "{pools}");

    // Meanwhile a client from 127.0.0.1 logs in and is served.
    let out = psql(&uri(&env, "app", &pw, "open"), &["-c", "SELECT 41 + 1"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    let (_, pools) = env.call(Method::GET, "/admin/v1/pools", None).await;
    assert_eq!(logging_in(&pools), share as u64, "still held: {pools}");
    assert!(
        readers.try_join_next().is_none(),
        "a held connection ended early"
    );

    // When they go, the address's room comes back.
    readers.shutdown().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, pools) = env.call(Method::GET, "/admin/v1/pools", None).await;
        if logging_in(&pools) == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "logins never let go: {pools}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let _again = socket.connect(addr).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, pools) = env.call(Method::GET, "/admin/v1/pools", None).await;
        if logging_in(&pools) == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a new connection is not let in: {pools}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rows and `COPY` data larger than `SILO_PG_MAX_MESSAGE_BYTES` come
/// through in parts, byte for byte (not refused, not held whole), by the
/// simple and the extended protocol, in both pool modes; the session and
/// its server connection stay in step for what follows.
#[tokio::test]
async fn rows_larger_than_the_message_limit_come_through_whole() {
    use sqlx::Executor as _;
    let env = TestEnv::setup()
        .wire(|w| w.max_message_bytes = 8192)
        .start()
        .await;
    env.create("wide").await;
    // Both credentials before the first login (the front door caches a
    // tenant's list of them).
    let mut logins = Vec::new();
    for mode in [PoolMode::Transaction, PoolMode::Session] {
        let name = format!("{mode:?}").to_lowercase();
        let pw = credential(&env, "wide", &name, mode).await;
        logins.push(uri(&env, &name, &pw, "wide"));
    }
    for u in logins {
        // Extended protocol (sqlx): rows from 1 kB to 1.6 MB, each its own.
        let mut c = sqlx::PgConnection::connect(&u).await.unwrap();
        let rows: Vec<(i32, String)> = sqlx::query_as(
            "SELECT i, repeat(chr(65 + i % 26), 1000 * i * i) FROM generate_series(1, 40) i",
        )
        .fetch_all(&mut c)
        .await
        .unwrap();
        assert_eq!(rows.len(), 40);
        for (i, text) in &rows {
            let letter = char::from(65 + (*i % 26) as u8);
            assert_eq!(text.len(), (1000 * i * i) as usize, "row {i}");
            assert!(text.chars().all(|ch| ch == letter), "row {i}");
        }
        // Simple protocol, then a statement after it on the same session.
        let many = c
            .fetch_all("SELECT repeat('q', 50000); SELECT 'after'")
            .await
            .unwrap();
        assert_eq!(many[0].get::<String, _>(0).len(), 50_000);
        assert_eq!(many[1].get::<String, _>(0), "after");
        drop(c);

        // psql: a 20 MB row, and COPY data lines of 100 kB.
        let out = psql(&u, &["-c", "SELECT repeat('z', 20000000)"]).await;
        assert!(out.status.success(), "{}", text(&out));
        let got = String::from_utf8_lossy(&out.stdout);
        assert_eq!(got.trim_end().len(), 20_000_000);
        assert!(got.trim_end().bytes().all(|b| b == b'z'));
        let out = psql(
            &u,
            &[
                "-c",
                "COPY (SELECT i, repeat('y', 100000) FROM generate_series(1, 5) i) TO STDOUT",
            ],
        )
        .await;
        assert!(out.status.success(), "{}", text(&out));
        let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(lines.len(), 5);
        for (n, line) in lines.iter().enumerate() {
            assert_eq!(*line, format!("{}\t{}", n + 1, "y".repeat(100_000)));
        }

        // A tenant's notice and error of 20 kB each (over the 8 KiB
        // limit): both reach the client whole, and its session goes on.
        let out = psql(
            &u,
            &[
                "-v",
                "ON_ERROR_STOP=0",
                "-c",
                "DO $$BEGIN RAISE NOTICE 'n%', repeat('n', 20000); END$$",
                "-c",
                "DO $$BEGIN RAISE EXCEPTION 'e%', repeat('e', 20000); END$$",
                "-c",
                "SELECT 'after' || 'wards'",
            ],
        )
        .await;
        let (said, answered) = (
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
        );
        // Not the 20 kB messages, should this fail.
        let brief = || {
            let tail = said.char_indices().rev().nth(300).map_or(0, |(i, _)| i);
            format!("stdout {answered:?}, stderr ends {:?}", &said[tail..])
        };
        assert!(said.contains(&"n".repeat(20_001)), "{}", brief());
        assert!(said.contains(&"e".repeat(20_001)), "{}", brief());
        assert_eq!(answered.lines().last(), Some("afterwards"), "{}", brief());
        let mut c = sqlx::PgConnection::connect(&u).await.unwrap();
        let huge = sqlx::query("DO $$BEGIN RAISE EXCEPTION USING MESSAGE = repeat('m', 30000), ERRCODE = 'P0042'; END$$")
            .execute(&mut c)
            .await
            .unwrap_err();
        let huge = huge.as_database_error().expect("a database error");
        assert_eq!(huge.code().as_deref(), Some("P0042"));
        assert_eq!(huge.message(), "m".repeat(30_000));
        let next: i32 = sqlx::query_scalar("SELECT 7")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(next, 7);
        drop(c);

        // What a client sends is still bounded: COPY data of 20 kB in one
        // message ends its session (sqlx reports the closed connection
        // rather than silo's 54000, which it reads and drops), and nothing
        // of it is written.
        let mut c = sqlx::PgConnection::connect(&u).await.unwrap();
        let mut copy = c
            .copy_in_raw("COPY clinics (name, address) FROM STDIN")
            .await
            .unwrap();
        let line = format!("wide\t{}\n", "w".repeat(20_000));
        let refused = match copy.send(line.as_bytes()).await {
            Ok(_) => copy.finish().await.expect_err("a 20 kB message is refused"),
            Err(e) => e,
        };
        assert!(
            refused.as_database_error().is_none()
                || refused
                    .to_string()
                    .contains("larger than this server allows"),
            "{refused}"
        );
        let mut c = sqlx::PgConnection::connect(&u).await.unwrap();
        let written: i64 = sqlx::query_scalar("SELECT count(*) FROM clinics WHERE name = 'wide'")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(written, 0);
        drop(c);

        // The next client (on the same server connection, in transaction
        // mode) gets its own answer.
        let out = psql(&u, &["-c", "SELECT 41 + 1"]).await;
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    }
}

/// pgbench's per-transaction latencies (µs) from its `-l` logs in `dir`.
fn logged_latencies(dir: &std::path::Path) -> Vec<u64> {
    let mut all: Vec<u64> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("pgbench_log"))
        .flat_map(|e| {
            std::fs::read_to_string(e.path())
                .unwrap()
                .lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse().ok())
                .collect::<Vec<u64>>()
        })
        .collect();
    all.sort_unstable();
    all
}

/// Beside the transactions, as many clients run single reads, which
/// share a server connection (`SILO_PG_SHARED_CONNECTIONS=1`) while the
/// tenant is busy: a move pauses and resumes them too.
#[tokio::test]
async fn a_move_under_pgbench_in_transaction_mode_fails_no_transaction() {
    let env = TestEnv::setup()
        .wire(|w| w.shared_connections = 1)
        .start()
        .await;
    let _second = crate::common::second_server(&env).await;
    crate::common::create_on(&env, "mover", "default").await;
    pgbench_tables(&env, "mover").await;
    // A move replicates updates only of tables with a primary key; the
    // script below does not use pgbench's history table (which has none).
    let t = env.record("mover").await;
    let mut su = sqlx::PgConnection::connect(&env.pg.url(&t.database_name))
        .await
        .unwrap();
    sqlx::query("DROP TABLE pgbench_history")
        .execute(&mut su)
        .await
        .unwrap();
    su.close().await.unwrap();
    let pw = credential(&env, "mover", "txn", PoolMode::Transaction).await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("update.sql");
    std::fs::write(
        &script,
        "\\set aid random(1, 100000)\nBEGIN;\nUPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\nEND;\n",
    )
    .unwrap();
    let bench = tokio::process::Command::new("pgbench")
        .args([
            "-n", "-c", "4", "-j", "2", "-T", "40", "-M", "prepared", "-l", "-f",
        ])
        .arg(&script)
        .arg(uri(&env, "txn", &pw, "mover"))
        .current_dir(dir.path())
        .kill_on_drop(true)
        .output();
    let bench = tokio::spawn(bench);
    let reads = tokio::process::Command::new("pgbench")
        .args(["-n", "-c", "4", "-j", "2", "-T", "40", "-M", "simple", "-S"])
        .arg(uri(&env, "txn", &pw, "mover"))
        .kill_on_drop(true)
        .output();
    let reads = tokio::spawn(reads);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (s, op) = env
        .call(
            Method::POST,
            "/admin/v1/tenants/mover/move",
            Some(serde_json::json!({"server": "second"})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    let id = op["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    let done = loop {
        let (_, body) = env
            .call(Method::GET, &format!("/admin/v1/operations/{id}"), None)
            .await;
        if body["status"] == "succeeded" || body["status"] == "failed" {
            break body;
        }
        assert!(Instant::now() < deadline, "the move did not end: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done["status"], "succeeded", "{done}");
    // The cut-over happened under the traffic, not after it (a move takes
    // seconds; pgbench runs 40).
    assert!(
        !bench.is_finished(),
        "pgbench ended before the move did: its cut-over was not under traffic"
    );
    // Read while its clients are there (the figures go with them).
    let (_, pools) = env.call(Method::GET, "/admin/v1/pools", None).await;
    let shared: u64 = pools["wire"]["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["shared_queries"].as_u64().unwrap())
        .sum();
    assert!(shared > 0, "no read was shared: {pools}");
    let out = bench.await.unwrap().unwrap();
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("number of failed transactions: 0 "), "{said}");
    let out = reads.await.unwrap().unwrap();
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("number of failed transactions: 0 "), "{said}");
    let (_, tenant) = env.call(Method::GET, "/admin/v1/tenants/mover", None).await;
    assert_eq!(tenant["server"], "second", "{tenant}");
    let lat = logged_latencies(dir.path());
    assert!(!lat.is_empty());
    let p99 = lat[(lat.len() * 99).div_ceil(100) - 1];
    println!(
        "move under pgbench: {} transactions, 0 failed; latency p99 {:.1} ms, max {:.1} ms (the pause)",
        lat.len(),
        p99 as f64 / 1000.0,
        *lat.last().unwrap() as f64 / 1000.0
    );
}

/// A self-signed pair for `localhost` in `dir`: (cert, key) paths.
fn tls_pair(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let pair = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, pair.cert.pem()).unwrap();
    std::fs::write(&key, pair.key_pair.serialize_pem()).unwrap();
    (cert, key)
}

#[tokio::test]
async fn tls_is_offered_and_when_required_plain_clients_are_refused() {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
    tls_pair(dir.path());
    let env = TestEnv::setup()
        .wire(|w| {
            let d = DIR.get().unwrap().path();
            w.tls = Some((d.join("cert.pem"), d.join("key.pem")));
            w.require_tls = true;
        })
        .start()
        .await;
    env.create("secure").await;
    let pw = credential(&env, "secure", "app", PoolMode::Transaction).await;
    let addr = env.pg_addr.unwrap();
    let over_tls = format!("postgresql://app:{pw}@{addr}/secure?sslmode=require");
    let out = psql(&over_tls, &["-c", "SELECT 6 * 7"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    // psql's own report of the session: TLS.
    let out = psql(&over_tls, &["-c", "\\conninfo"]).await;
    assert!(text(&out).contains("SSL connection"), "{}", text(&out));
    // Its login bound to silo's certificate (SCRAM-SHA-256-PLUS): libpq
    // refuses to go on otherwise when told to require it.
    let bound = format!("{over_tls}&channel_binding=require");
    let out = psql(&bound, &["-c", "SELECT 6 * 7"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    let wrong =
        format!("postgresql://app:not-{pw}@{addr}/secure?sslmode=require&channel_binding=require");
    let out = psql(&wrong, &["-c", "SELECT 1"]).await;
    assert!(
        text(&out).contains("password authentication failed"),
        "{}",
        text(&out)
    );
    // A client that cannot bind (sqlx) still logs in over TLS.
    let mut c = sqlx::PgConnection::connect(&over_tls).await.unwrap();
    let n: i32 = sqlx::query_scalar("SELECT 6 * 7")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 42);
    let plain = format!("postgresql://app:{pw}@{addr}/secure?sslmode=disable");
    let out = psql(&plain, &["-c", "SELECT 1"]).await;
    assert!(!out.status.success());
    assert!(text(&out).contains("requires TLS"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn one_budget_for_both_front_doors_holds_as_postgresql_counts_it() {
    const BUDGET: i64 = 6;
    let env = env().await;
    sqlx::query("UPDATE db_servers SET max_connections = $1")
        .bind(BUDGET as i32)
        .execute(env.registry().pool())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("sleep.sql");
    std::fs::write(&script, "SELECT pg_sleep(0.003);\n").unwrap();
    let mut benches = Vec::new();
    for i in 0..3 {
        let slug = format!("wire-{i}");
        env.create(&slug).await;
        let pw = credential(&env, &slug, "txn", PoolMode::Transaction).await;
        let u = uri(&env, "txn", &pw, &slug);
        let script = script.clone();
        benches.push(tokio::spawn(async move {
            tokio::process::Command::new("pgbench")
                .args(["-n", "-c", "6", "-j", "2", "-t", "60", "-f"])
                .arg(&script)
                .arg(u)
                .output()
                .await
                .unwrap()
        }));
    }
    for i in 0..3 {
        env.create(&format!("http-{i}")).await;
    }
    let sampler = crate::common::MaxSampler::start(
        &env.admin,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name IN ('silo-router', 'silo-wire')",
    );
    let routed: Vec<_> = (0..12)
        .map(|w| {
            let router = env.router.clone();
            tokio::spawn(async move {
                let mut served = 0;
                for i in 0..20 {
                    let tenant = format!("http-{}", (w + i) % 3);
                    if let Ok(mut conn) = router.acquire(&tenant).await {
                        sqlx::query("SELECT pg_sleep(0.003)")
                            .execute(&mut *conn)
                            .await
                            .unwrap();
                        served += 1;
                    }
                }
                served
            })
        })
        .collect();
    let mut served = 0;
    for r in routed {
        served += r.await.unwrap();
    }
    for b in benches {
        let out = b.await.unwrap();
        assert!(out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("processed: 360/360"), "{}", text(&out));
    }
    let max = sampler.finish().await;
    assert!(
        max <= BUDGET,
        "pg_stat_activity saw {max} connections of silo's two front doors over a budget of {BUDGET}"
    );
    assert!(max > 0);
    assert!(
        served > 0,
        "the router served nothing beside the front door"
    );
}

#[tokio::test]
async fn limits_end_silent_idle_and_oversized_clients_and_cap_a_tenant() {
    use tokio::io::AsyncReadExt;
    let env = TestEnv::setup()
        .wire(|w| {
            // Long enough for real logins on a loaded machine, short
            // enough to watch them end within the polls' deadlines.
            w.startup_timeout = Duration::from_secs(5);
            w.client_idle_timeout = Some(Duration::from_secs(10));
            w.max_message_bytes = 8192;
            w.max_clients_per_tenant = 2;
        })
        .start()
        .await;
    env.create("capped").await;
    let pw = credential(&env, "capped", "app", PoolMode::Transaction).await;
    let u = uri(&env, "app", &pw, "capped");
    let tenant = env.record("capped").await.id;

    // Says nothing: dropped at the startup timeout.
    let mut silent = tokio::net::TcpStream::connect(env.pg_addr.unwrap())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(60), silent.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "a silent client is never dropped");

    // A message over the limit: refused, saying so.
    let big = format!("SELECT '{}'", "x".repeat(10_000));
    let out = psql(&u, &["-c", &big]).await;
    assert!(!out.status.success());
    assert!(text(&out).contains("larger than"), "{}", text(&out));

    // Two clients at most; the figures show them.
    let mut a = sqlx::PgConnection::connect(&u).await.unwrap();
    let mut b = sqlx::PgConnection::connect(&u).await.unwrap();
    let third = sqlx::PgConnection::connect(&u).await;
    let refused = third.expect_err("a third client of the tenant is refused");
    assert!(
        refused
            .to_string()
            .contains("too many connections for tenant"),
        "{refused}"
    );
    let _: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut a)
        .await
        .unwrap();
    let (s, pools) = env.call(Method::GET, "/admin/v1/pools", None).await;
    assert_eq!(s, StatusCode::OK, "{pools}");
    let mine = pools["wire"]["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant_id"] == tenant.to_string())
        .cloned()
        .unwrap_or_else(|| panic!("no figures of the tenant: {pools}"));
    assert_eq!(mine["clients"], 2, "{mine}");
    assert!(mine["transactions"].as_u64().unwrap() >= 1, "{mine}");

    // Idle past the limit: both are ended (watched in the figures, then seen).
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (_, pools) = env.call(Method::GET, "/admin/v1/pools", None).await;
        let gone = !pools["wire"]["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["tenant_id"] == tenant.to_string() && t["clients"].as_u64() > Some(0));
        if gone {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "idle clients are never ended: {pools}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(&mut b)
        .await;
    assert!(after.is_err(), "an idle client ended by silo still answers");
}

/// `psql -c` with extra environment (libpq's `PG*` settings).
async fn psql_with(uri: &str, env: &[(&str, &str)], sql: &str) -> Output {
    tokio::process::Command::new("psql")
        .arg(uri)
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .envs(env.iter().copied())
        .env("PGCONNECT_TIMEOUT", "20")
        .kill_on_drop(true)
        .output()
        .await
        .expect("run psql")
}

#[tokio::test]
async fn transaction_mode_keeps_each_clients_settings_and_leaks_none_to_the_next() {
    let env = env().await;
    env.create("tidy").await;
    let pw = credential(&env, "tidy", "txn", PoolMode::Transaction).await;
    let u = uri(&env, "txn", &pw, "tidy");
    let show = "SELECT current_setting('client_encoding') || ' ' || current_setting('TimeZone') || ' ' || current_setting('statement_timeout') || ' ' || current_setting('search_path') || ' ' || (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory')";
    let plain = [("PGCLIENTENCODING", "UTF8"), ("PGTZ", "UTC")];
    let baseline = psql_with(&u, &plain, show).await;
    assert!(baseline.status.success(), "{}", text(&baseline));
    let baseline = String::from_utf8_lossy(&baseline.stdout).trim().to_owned();
    assert!(baseline.starts_with("UTF8 UTC 0 "), "{baseline}");
    // A client's own settings (libpq sends PGTZ as `timezone`) hold for it...
    let own = psql_with(
        &u,
        &[("PGCLIENTENCODING", "LATIN1"), ("PGTZ", "Asia/Tokyo")],
        "SELECT current_setting('client_encoding') || ' ' || current_setting('TimeZone')",
    )
    .await;
    assert!(own.status.success(), "{}", text(&own));
    assert_eq!(
        String::from_utf8_lossy(&own.stdout).trim(),
        "LATIN1 Asia/Tokyo"
    );
    // ...and what clients change in their sessions stays with them: the next
    // client on the (one, reused) server connection sees none of it.
    for leak in [
        "select 1; set statement_timeout='1ms'",
        "set local work_mem='1MB'; set search_path=pg_catalog",
        "begin; set statement_timeout='2ms'; commit",
        "do $$begin execute 'set statement_timeout=''3ms'''; end$$",
        "select pg_try_advisory_lock(4242)",
        "update pg_settings set setting = '4ms' where name = 'statement_timeout'",
        // A `;` in a comment hid the statement after it.
        "/*;*/set statement_timeout='5ms'",
        "select 1;/*;*/set search_path=pg_catalog",
    ] {
        let out = psql_with(&u, &plain, leak).await;
        assert!(out.status.success(), "{leak}: {}", text(&out));
        let next = psql_with(&u, &plain, show).await;
        assert!(next.status.success(), "{}", text(&next));
        assert_eq!(
            String::from_utf8_lossy(&next.stdout).trim(),
            baseline,
            "after {leak:?}"
        );
    }
}

#[tokio::test]
async fn a_tenant_whose_server_stops_is_refused_alone_and_comes_back() {
    let env = env().await;
    let mut second = crate::common::second_server(&env).await;
    crate::common::create_on(&env, "far", "second").await;
    env.create("near").await;
    let far = uri(
        &env,
        "txn",
        &credential(&env, "far", "txn", PoolMode::Transaction).await,
        "far",
    );
    let near = uri(
        &env,
        "txn",
        &credential(&env, "near", "txn", PoolMode::Transaction).await,
        "near",
    );
    for u in [&far, &near] {
        let out = psql(u, &["-c", "SELECT 1"]).await;
        assert!(out.status.success(), "{}", text(&out));
    }
    second.stop().unwrap();
    // Its idle server connection died with the server: found dead, not used.
    let out = psql(&far, &["-c", "SELECT 1"]).await;
    assert!(!out.status.success());
    assert!(text(&out).contains("unavailable"), "{}", text(&out));
    let out = psql(&near, &["-c", "SELECT 1"]).await;
    assert!(
        out.status.success(),
        "another tenant is affected: {}",
        text(&out)
    );
    second.start_again().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = psql(&far, &["-c", "SELECT 1"]).await;
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "never came back: {}", text(&out));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `silo serve` stopping (SIGTERM) ends its front door's sessions the way
/// PostgreSQL ends its own at a shutdown: a client in the middle of a
/// statement hears `57P01` "terminating connection due to administrator
/// command" rather than a bare reset, and the process still exits cleanly.
#[tokio::test]
async fn a_stopping_silo_tells_its_clients_why_their_sessions_end() {
    let env = TestEnv::setup().start().await;
    env.create("stopping").await;
    let pw = credential(&env, "stopping", "app", PoolMode::Transaction).await;
    let port = silo::embedded::postgres::free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let logs = tempfile::tempdir().unwrap();
    let silo = crate::common::Silo::start_with(
        &env,
        None,
        0,
        &logs.path().join("silo.log"),
        &[("SILO_PG_LISTEN", listen.as_str())],
    )
    .await;
    let uri = format!("postgresql://app:{pw}@{listen}/stopping?sslmode=disable");
    let client = tokio::spawn(async move { psql(&uri, &["-c", "SELECT pg_sleep(60)"]).await });
    // Its statement is running on the tenant's database.
    wait_until_running(&env, "stopping", "SELECT pg_sleep%", None).await;
    let started = Instant::now();
    tokio::task::spawn_blocking(move || silo.stop())
        .await
        .unwrap();
    let out = client.await.unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("terminating connection due to administrator command"),
        "{}",
        text(&out)
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// A client that stops reading cannot keep its session alive: revoking its
/// credential ends the session even while silo is blocked writing it a
/// large result, and the tenant's server connection is let go (revocation
/// terminates no backend on the server: only silo can let it go).
#[tokio::test]
async fn a_client_that_stops_reading_cannot_outlive_its_credential_s_revocation() {
    let env = env().await;
    env.create("stuck").await;
    let pw = credential(&env, "stuck", "app", PoolMode::Session).await;
    // 500 MB of rows, far more than the sockets between them hold.
    let mut psql = std::process::Command::new("psql")
        .arg(uri(&env, "app", &pw, "stuck"))
        .args(["-X", "-A", "-t", "-o", "/dev/null", "-c"])
        .arg("SELECT repeat('x', 1000) FROM generate_series(1, 500000)")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run psql");
    let pid = nix::unistd::Pid::from_raw(psql.id() as i32);
    wait_until_running(&env, "stuck", "SELECT repeat%", None).await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // The result backs up: the tenant's backend waits to write to silo,
    // silo waits to write to psql.
    wait_until_running(&env, "stuck", "SELECT repeat%", Some("ClientWrite")).await;
    let t = env.record("stuck").await;
    let id = env.registry().app_credentials(t.id).await.unwrap()[0].id;
    env.registry()
        .revoke_app_credential(t.id, id, "test")
        .await
        .unwrap()
        .expect("revoked");
    // Every backend of the tenant's database gone (the session's only one).
    let deadline = Instant::now() + Duration::from_secs(20);
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
        .bind(&t.database_name)
        .fetch_one(&env.admin)
        .await
        .unwrap()
        > 0
    {
        assert!(
            Instant::now() < deadline,
            "the revoked session's backend is still held for a client that does not read"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).ok();
    let _ = psql.wait();
}

/// A CA and a certificate it signed for `localhost` and 127.0.0.1, in
/// `dir`, readable by the cluster's user: (CA, certificate, key) paths.
fn signed_pair(dir: &std::path::Path) -> [std::path::PathBuf; 3] {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "silo test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let paths = [
        dir.join("ca.pem"),
        dir.join("server.crt"),
        dir.join("server.key"),
    ];
    std::fs::write(&paths[0], ca.pem()).unwrap();
    std::fs::write(&paths[1], cert.pem()).unwrap();
    std::fs::write(&paths[2], key.serialize_pem()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&paths[2], std::fs::Permissions::from_mode(0o600)).unwrap();
    if nix::unistd::geteuid().is_root() {
        let pg = nix::unistd::User::from_name("postgres").unwrap().unwrap();
        for p in &paths[1..] {
            std::os::unix::fs::chown(p, Some(pg.uid.as_raw()), Some(pg.gid.as_raw())).unwrap();
        }
    }
    paths
}

#[tokio::test]
async fn a_tenant_server_that_accepts_only_tls_is_reached_over_verified_tls() {
    // TCP, not the local socket: the way to a server on another machine.
    let env = TestEnv::setup()
        .router(silo::router::RouterConfig {
            local_sockets: false,
            ..Default::default()
        })
        .wire(|w| w.shared_connections = 1)
        .start()
        .await;
    let pg =
        tokio::task::spawn_blocking(silo::embedded::postgres::EmbeddedPostgres::start_throwaway)
            .await
            .unwrap()
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let [ca, cert, key] = signed_pair(dir.path());
    // TLS on, and every TCP login without it refused.
    let superuser = sqlx::PgPool::connect(&pg.url("postgres")).await.unwrap();
    let hba: String = sqlx::query_scalar("SHOW hba_file")
        .fetch_one(&superuser)
        .await
        .unwrap();
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("hostnossl all all 127.0.0.1/32 reject\n{rules}"),
    )
    .unwrap();
    for sql in [
        format!("ALTER SYSTEM SET ssl_cert_file = '{}'", cert.display()),
        format!("ALTER SYSTEM SET ssl_key_file = '{}'", key.display()),
        "ALTER SYSTEM SET ssl = on".to_owned(),
        "SELECT pg_reload_conf()".to_owned(),
    ] {
        sqlx::query(&sql).execute(&superuser).await.unwrap();
    }
    superuser.close().await;
    let plain = format!("{}?sslmode=disable", pg.url("postgres"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while sqlx::PgConnection::connect(&plain).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the server still takes plain logins"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let verified = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url("postgres"),
        ca.display()
    );
    env.control
        .register_server("vault", &verified, 50, 100)
        .await
        .unwrap();
    env.control.provisioner().refill_all().await.unwrap();
    crate::common::create_on(&env, "locked", "vault").await;

    let watch = sqlx::PgPool::connect(&verified).await.unwrap();
    // The superuser in the tenant's database (advisory locks are per database).
    let tenant_db = env.record("locked").await.database_name;
    let watch_tenant =
        sqlx::PgPool::connect(&verified.replacen("/postgres?", &format!("/{tenant_db}?"), 1))
            .await
            .unwrap();
    for mode in [PoolMode::Transaction, PoolMode::Session] {
        let name = format!("app-{mode:?}").to_lowercase();
        let pw = credential(&env, "locked", &name, mode).await;
        // The statement waits on a lock the test holds, so its backend
        // (silo's connection to the server) is there to be looked at: over
        // TLS, as the server takes no other. (Counting the front door's
        // backends after the fact raced with their pool closing them.)
        let held = watch_tenant.acquire().await;
        let mut held = held.unwrap();
        sqlx::query("SELECT pg_advisory_lock(7)")
            .execute(&mut *held)
            .await
            .unwrap();
        let to = uri(&env, &name, &pw, "locked");
        let run = tokio::spawn(async move {
            psql(&to, &["-c", "SELECT 6 * 7 FROM pg_advisory_lock_shared(7)"]).await
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let ssl = loop {
            let seen: Option<bool> = sqlx::query_scalar(
                "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                  WHERE a.wait_event_type = 'Lock' AND a.query LIKE 'SELECT 6 * 7%'",
            )
            .fetch_optional(&watch)
            .await
            .unwrap();
            if let Some(ssl) = seen {
                break ssl;
            }
            assert!(
                Instant::now() < deadline,
                "{mode:?}: the statement never waited"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(ssl, "{mode:?}: the front door's backend is not over TLS");
        sqlx::query("SELECT pg_advisory_unlock(7)")
            .execute(&mut *held)
            .await
            .unwrap();
        let out = run.await.unwrap();
        assert!(out.status.success(), "{mode:?}: {}", text(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    }

    // Ctrl-C reaches the backend over TLS too.
    let pw = credential(&env, "locked", "canceller", PoolMode::Transaction).await;
    let child = tokio::process::Command::new("psql")
        .arg(uri(&env, "canceller", &pw, "locked"))
        .args(["-X", "-c", "SELECT pg_sleep(60)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%' AND state = 'active'",
        )
        .fetch_one(&watch)
        .await
        .unwrap();
        if running > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "pg_sleep never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("psql ended after its cancel")
        .unwrap();
    assert!(
        text(&out).contains("canceling statement due to user request"),
        "{}",
        text(&out)
    );

    // A shared connection (`SILO_PG_SHARED_CONNECTIONS=1`) over TLS: its
    // clients' reads, pipelined and flushed through TLS, each answered to
    // its own client.
    let u = uri(&env, "canceller", &pw, "locked");
    let mut busy = sqlx::PgConnection::connect(&u).await.unwrap();
    sqlx::Executor::execute(&mut busy, "BEGIN").await.unwrap();
    sqlx::Executor::execute(&mut busy, "SELECT 1")
        .await
        .unwrap();
    let shared = |f: serde_json::Value| f["shared_queries"].as_u64().unwrap_or(0);
    let before = shared(crate::wire_drivers::front_door_figures(&env, "locked").await);
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..8i64 {
        let u = u.clone();
        clients.spawn(async move {
            let mut c = sqlx::PgConnection::connect(&u).await.unwrap();
            for j in 0..30i64 {
                let n = i * 100 + j;
                let sql = format!("SELECT {n}::int8");
                let row = sqlx::Executor::fetch_one(&mut c, sql.as_str())
                    .await
                    .unwrap();
                assert_eq!(row.get::<i64, _>(0), n);
            }
        });
    }
    while let Some(done) = clients.join_next().await {
        done.unwrap();
    }
    let after = shared(crate::wire_drivers::front_door_figures(&env, "locked").await);
    assert!(after > before, "no read was shared over TLS");
    sqlx::Executor::execute(&mut busy, "COMMIT").await.unwrap();
}

/// sqlx's unpersisted queries prepare the unnamed statement in one `Sync`
/// and bind it in the next; in transaction mode the two may be on
/// different server connections, with another client's unnamed statement
/// (or none) on the second.
#[tokio::test(flavor = "multi_thread")]
async fn an_unnamed_statement_bound_in_a_later_sync_is_the_client_s_own() {
    let env = env().await;
    env.create("unnamed").await;
    let pw = credential(&env, "unnamed", "app", PoolMode::Transaction).await;
    let u = uri(&env, "app", &pw, "unnamed");
    let clients: Vec<_> = (0..8i64)
        .map(|k| {
            let u = u.clone();
            tokio::spawn(async move {
                let mut c = sqlx::PgConnection::connect(&u).await.unwrap();
                // Each client's own statement: another's answers differently.
                let sql = format!("SELECT $1::int8 * 1000 + {k}");
                for i in 0..150i64 {
                    let got: i64 = sqlx::query_scalar(&sql)
                        .bind(i)
                        .persistent(false)
                        .fetch_one(&mut c)
                        .await
                        .unwrap_or_else(|e| panic!("client {k}, query {i}: {e}"));
                    assert_eq!(got, i * 1000 + k, "client {k}, query {i}");
                }
                c.close().await.unwrap();
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
}

/// A session-changing statement prepared in one `Sync` (sqlx's persistent
/// statements: `Parse`/`Describe`/`Sync`, then `Bind`/`Execute`/`Sync`)
/// changes the server connection it runs on, which may not be the one it
/// was prepared on: that one is reset before the next client has it.
#[tokio::test]
async fn a_prepared_statement_that_changes_the_session_leaks_nothing_to_the_next_client() {
    let env = env().await;
    env.create("leaky").await;
    let a = credential(&env, "leaky", "a", PoolMode::Transaction).await;
    let b = credential(&env, "leaky", "b", PoolMode::Transaction).await;
    let mut first = sqlx::PgConnection::connect(&uri(&env, "a", &a, "leaky"))
        .await
        .unwrap();
    for _ in 0..3 {
        sqlx::query("SELECT set_config('app.user_id', $1, false)")
            .bind("alice")
            .execute(&mut first)
            .await
            .unwrap();
    }
    let backend = "SELECT pg_backend_pid()";
    let first_pid: i32 = sqlx::raw_sql(backend)
        .fetch_one(&mut first)
        .await
        .unwrap()
        .get(0);
    first.close().await.unwrap();
    // The tenant's one server connection, next client.
    let mut next = sqlx::PgConnection::connect(&uri(&env, "b", &b, "leaky"))
        .await
        .unwrap();
    let seen: Option<String> = sqlx::query_scalar("SELECT current_setting('app.user_id', true)")
        .fetch_one(&mut next)
        .await
        .unwrap();
    let next_pid: i32 = sqlx::raw_sql(backend)
        .fetch_one(&mut next)
        .await
        .unwrap()
        .get(0);
    // The premise: the same backend served both clients.
    assert_eq!(first_pid, next_pid);
    assert!(seen.as_deref().unwrap_or("").is_empty(), "{seen:?}");
}

/// A setting the client changes with `SET` is its own until it changes it
/// again, whichever server connection its next transaction gets: the
/// value the server reported to it is given to that connection too.
#[tokio::test]
async fn a_client_s_own_set_follows_it_across_transactions() {
    let env = env().await;
    env.create("zoned").await;
    let pw = credential(&env, "zoned", "app", PoolMode::Transaction).await;
    let out = psql(
        &uri(&env, "app", &pw, "zoned"),
        &[
            "-c",
            "SET TimeZone = 'Asia/Tokyo'",
            "-c",
            "SET client_encoding = 'LATIN1'",
            "-c",
            "SHOW TimeZone",
            "-c",
            "SHOW client_encoding",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().filter(|l| !l.is_empty()).collect::<Vec<_>>(),
        ["SET", "SET", "Asia/Tokyo", "LATIN1"],
        "{}",
        text(&out)
    );
}

/// `DEALLOCATE` in SQL drops what it drops on PostgreSQL: a statement
/// prepared in SQL leaves the client's protocol statements working, and so
/// does `DISCARD PLANS`; `DEALLOCATE ALL` drops them too, as PostgreSQL
/// does (the next use of one is refused as unknown), and new ones work. A
/// tenant named in capitals is the tenant (slugs are lower case).
#[tokio::test]
async fn sql_deallocate_drops_what_postgresql_drops() {
    let env = env().await;
    env.create("dealer").await;
    let pw = credential(&env, "dealer", "app", PoolMode::Session).await;
    let mut c = sqlx::PgConnection::connect(&uri(&env, "app", &pw, "DEALER"))
        .await
        .unwrap();
    let plus_one = "SELECT $1::int + 1";
    // The first round prepares the statement; each next one follows SQL
    // that drops statements, or none.
    for sql in [
        "SELECT 1",
        "PREPARE mine AS SELECT 1",
        "DEALLOCATE mine",
        "DISCARD PLANS",
    ] {
        sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
        let n: i32 = sqlx::query_scalar(plus_one)
            .bind(41)
            .fetch_one(&mut c)
            .await
            .unwrap_or_else(|e| panic!("after {sql}: {e}"));
        assert_eq!(n, 42);
    }
    // Refused by the server (not in a transaction block, nor in a failed
    // one): nothing is dropped.
    sqlx::raw_sql("BEGIN").execute(&mut c).await.unwrap();
    sqlx::raw_sql("DISCARD ALL")
        .execute(&mut c)
        .await
        .expect_err("DISCARD ALL cannot run in a transaction block");
    sqlx::raw_sql("DEALLOCATE ALL")
        .execute(&mut c)
        .await
        .expect_err("the transaction failed");
    sqlx::raw_sql("ROLLBACK").execute(&mut c).await.unwrap();
    let n: i32 = sqlx::query_scalar(plus_one)
        .bind(41)
        .fetch_one(&mut c)
        .await
        .expect("kept through the refused drops");
    assert_eq!(n, 42);
    sqlx::raw_sql("DEALLOCATE ALL")
        .execute(&mut c)
        .await
        .unwrap();
    let gone = sqlx::query_scalar::<_, i32>(plus_one)
        .bind(41)
        .fetch_one(&mut c)
        .await
        .expect_err("a statement dropped by DEALLOCATE ALL is gone");
    let db = gone.as_database_error().expect("refused by the database");
    assert_eq!(db.code().as_deref(), Some("26000"), "{gone}");
    let n: i32 = sqlx::query_scalar("SELECT $1::int + 2")
        .bind(40)
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 42);
}

/// A client's prepared statements take at most `max_prepared_bytes` of
/// silo (it keeps their text to prepare them on any server connection):
/// past it the session ends saying why, while other clients go on.
/// Statements closed by the protocol (sqlx's cache), deallocated by name in
/// SQL (as Rails and psycopg before libpq 17 evict theirs: answered as
/// PostgreSQL answers) or all at once give their room back.
#[tokio::test]
async fn a_client_s_prepared_statements_are_bounded_and_give_back_their_room() {
    use sqlx::postgres::PgConnectOptions;
    let env = TestEnv::setup()
        .wire(|w| w.max_prepared_bytes = 64 * 1024)
        .start()
        .await;
    env.create("hoarder").await;
    let pw = credential(&env, "hoarder", "app", PoolMode::Transaction).await;
    let u = uri(&env, "app", &pw, "hoarder");
    let keep_all: PgConnectOptions = u
        .parse::<PgConnectOptions>()
        .unwrap()
        .statement_cache_capacity(1000);
    // About 2 kB of text each: 64 kB hold about 30.
    let statement = |i: usize| format!("SELECT {i} AS n /* {} */", "x".repeat(2000));
    async fn run(c: &mut sqlx::PgConnection, sql: &str) -> Result<i32, sqlx::Error> {
        sqlx::query_scalar(sql).fetch_one(c).await
    }

    // Never closed: the session ends once 64 kB are held.
    let mut other = sqlx::PgConnection::connect(&u).await.unwrap();
    let mut hoarder = sqlx::PgConnection::connect_with(&keep_all).await.unwrap();
    let mut refused = None;
    for i in 0..100 {
        match run(&mut hoarder, &statement(i)).await {
            Ok(n) => assert_eq!(n as usize, i),
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (at, e) = refused.expect("a client keeping 200 kB of statements is refused");
    assert!((25..=32).contains(&at), "refused at statement {at}");
    let db = e.as_database_error().expect("said by the front door");
    assert_eq!(db.code().as_deref(), Some("54000"), "{e}");
    assert!(db.message().contains("SILO_PG_MAX_PREPARED_BYTES"), "{e}");
    assert_eq!(run(&mut other, "SELECT 7").await.unwrap(), 7);

    // Closed by the protocol as sqlx's cache of 5 evicts them.
    let mut closing =
        sqlx::PgConnection::connect_with(&keep_all.clone().statement_cache_capacity(5))
            .await
            .unwrap();
    for i in 0..100 {
        assert_eq!(run(&mut closing, &statement(i)).await.unwrap() as usize, i);
    }

    // Deallocated by name in SQL (sqlx numbers its statements from 1).
    let mut dealer = sqlx::PgConnection::connect_with(&keep_all).await.unwrap();
    for i in 0..100 {
        assert_eq!(run(&mut dealer, &statement(i)).await.unwrap() as usize, i);
        let done = sqlx::raw_sql(&format!("DEALLOCATE sqlx_s_{}", i + 1))
            .execute(&mut dealer)
            .await
            .unwrap_or_else(|e| panic!("DEALLOCATE of statement {i}: {e}"));
        assert_eq!(done.rows_affected(), 0);
    }
    // In a failed transaction it is refused, as PostgreSQL refuses it.
    sqlx::raw_sql("BEGIN").execute(&mut dealer).await.unwrap();
    run(&mut dealer, &statement(1000)).await.unwrap();
    sqlx::raw_sql("SELECT 1/0")
        .execute(&mut dealer)
        .await
        .expect_err("division by zero");
    let aborted = sqlx::raw_sql("DEALLOCATE sqlx_s_101")
        .execute(&mut dealer)
        .await
        .expect_err("refused in a failed transaction");
    let db = aborted.as_database_error().unwrap();
    assert_eq!(db.code().as_deref(), Some("25P02"), "{aborted}");
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut dealer)
        .await
        .unwrap();
    // A name the client never prepared goes to the server, which says so.
    let unknown = sqlx::raw_sql("DEALLOCATE nope")
        .execute(&mut dealer)
        .await
        .expect_err("no such statement");
    assert_eq!(
        unknown.as_database_error().unwrap().code().as_deref(),
        Some("26000")
    );

    // All at once, each 20 statements (psycopg does so after a rollback),
    // by the simple protocol and by the extended one (psycopg's pipelines).
    for extended in [false, true] {
        let mut resetter = sqlx::PgConnection::connect_with(&keep_all).await.unwrap();
        for i in 0..100 {
            assert_eq!(run(&mut resetter, &statement(i)).await.unwrap() as usize, i);
            if i % 20 == 19 {
                let done = if extended {
                    sqlx::query("DEALLOCATE ALL")
                        .persistent(false)
                        .execute(&mut resetter)
                        .await
                } else {
                    sqlx::raw_sql("DEALLOCATE ALL").execute(&mut resetter).await
                };
                done.unwrap_or_else(|e| panic!("extended {extended}: {e}"));
            }
        }
    }
}

/// A server connection keeps at most `max_server_statements` prepared
/// statements (PostgreSQL holds each one's plans): past it the least
/// recently used is closed, and prepared again when a client next uses it,
/// in either pool mode, the clients seeing nothing of it.
#[tokio::test]
async fn a_server_connection_keeps_its_few_most_recently_used_statements() {
    use sqlx::postgres::PgConnectOptions;
    let env = TestEnv::setup()
        .wire(|w| w.max_server_statements = 3)
        .start()
        .await;
    env.create("churn").await;
    // Both credentials before the first login (the front door caches a
    // tenant's list of them). Transaction mode first: one client, so one
    // server connection, the one each count below reads.
    let mut logins = Vec::new();
    for (user, mode) in [("txn", PoolMode::Transaction), ("sess", PoolMode::Session)] {
        let pw = credential(&env, "churn", user, mode).await;
        logins.push((mode, uri(&env, user, &pw, "churn")));
    }
    for (mode, u) in logins {
        let opts = u
            .parse::<PgConnectOptions>()
            .unwrap()
            .statement_cache_capacity(100);
        let mut c = sqlx::PgConnection::connect_with(&opts).await.unwrap();
        // Ten statements, round and round: each use after the first
        // three finds its statement closed.
        for round in 0..5 {
            for i in 0..10 {
                let n: i32 = sqlx::query_scalar(&format!("SELECT $1::int + {i}"))
                    .bind(round)
                    .fetch_one(&mut c)
                    .await
                    .unwrap_or_else(|e| panic!("{mode:?}, round {round}, statement {i}: {e}"));
                assert_eq!(n, round + i);
            }
        }
        // What the server connection under this client holds.
        let held: i64 =
            sqlx::raw_sql("SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'silo\\_%'")
                .fetch_one(&mut c)
                .await
                .unwrap()
                .get(0);
        assert!((1..=3).contains(&held), "{mode:?}: {held} statements held");
    }
}

/// A client that goes away while its statement runs (killed, its socket
/// closed by the kernel) leaves no statement running: its backend, and
/// the budget slot it holds, are gone long before the statement would end.
#[tokio::test]
async fn a_client_killed_mid_statement_leaves_nothing_running() {
    let env = env().await;
    env.create("quitter").await;
    let pw = credential(&env, "quitter", "app", PoolMode::Transaction).await;
    let mut child = tokio::process::Command::new("psql")
        .arg(uri(&env, "app", &pw, "quitter"))
        .args(["-X", "-c", "SELECT pg_sleep(120)"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_until_running(&env, "quitter", "SELECT pg_sleep%", None).await;
    child.kill().await.unwrap();
    let database = env.record("quitter").await.database_name;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND query LIKE 'SELECT pg_sleep%'",
        )
        .bind(&database)
        .fetch_one(&env.admin)
        .await
        .unwrap();
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the killed client's statement still runs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The count a `/metrics` text gives `series` (0 when absent).
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Busy-polling through a real session, watched from outside a `silo
/// serve` of its own (one client: nothing else in that process checks out
/// a server connection or stops a spin): a client's statements one after
/// another are read by spins, on both sides, and a server connection
/// that ends mid-wait ends its session cleanly; with
/// `SILO_PG_SPIN_MICROS=0` nothing spins. The window is 10 ms, so an answer delayed on a busy
/// machine still mostly arrives within it.
#[tokio::test]
async fn a_lone_client_is_busy_polled_unless_it_is_turned_off() {
    use crate::common::{Silo, ADMIN_TOKEN};
    let env = TestEnv::setup().start().await;
    env.create("spinner").await;
    let pw = credential(&env, "spinner", "app", PoolMode::Transaction).await;
    let logs = tempfile::tempdir().unwrap();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for micros in ["10000", "0"] {
        let listen = format!(
            "127.0.0.1:{}",
            silo::embedded::postgres::free_port().unwrap()
        );
        let silo = Silo::start_with(
            &env,
            None,
            0,
            &logs.path().join(format!("spin-{micros}.log")),
            &[("SILO_PG_LISTEN", &listen), ("SILO_PG_SPIN_MICROS", micros)],
        )
        .await;
        let u = format!("postgresql://app:{pw}@{listen}/spinner?sslmode=disable");
        let mut c = sqlx::PgConnection::connect(&u).await.unwrap();
        for i in 0..200 {
            let n: i32 = sqlx::query_scalar("SELECT $1::int")
                .bind(i)
                .fetch_one(&mut c)
                .await
                .unwrap();
            assert_eq!(n, i);
        }
        c.close().await.unwrap();
        // A server that ends while the session waits (spins) for its
        // answer: its last word reaches the client, and the next client
        // is served.
        let mut doomed = sqlx::PgConnection::connect(&u).await.unwrap();
        for _ in 0..10 {
            sqlx::query("SELECT 1").execute(&mut doomed).await.unwrap();
        }
        let ended = sqlx::query("SELECT pg_terminate_backend(pg_backend_pid())")
            .execute(&mut doomed)
            .await
            .expect_err("its backend ended");
        assert!(
            ended
                .as_database_error()
                .is_some_and(|e| e.code().as_deref() == Some("57P01")),
            "{ended}"
        );
        let mut next = sqlx::PgConnection::connect(&u).await.unwrap();
        let n: i32 = sqlx::query_scalar("SELECT 7")
            .fetch_one(&mut next)
            .await
            .unwrap();
        assert_eq!(n, 7);
        next.close().await.unwrap();
        let text = reqwest::Client::new()
            .get(format!("{}/metrics", silo.base))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let read = metric(&text, "silo_wire_spins_total{outcome=\"read\"}");
        let all = read
            + metric(&text, "silo_wire_spins_total{outcome=\"missed\"}")
            + metric(&text, "silo_wire_spins_total{outcome=\"busy\"}");
        assert!(
            metric(&text, "silo_wire_transactions_total") >= 200,
            "the statements went through this silo"
        );
        if micros == "0" || cpus < 2 {
            // Off, or one CPU (where silo never spins).
            assert_eq!(
                all, 0,
                "spins with SILO_PG_SPIN_MICROS={micros}, {cpus} CPUs"
            );
        } else {
            // 200 round trips, each a wait for the server's answer and
            // one for the client's next statement: about 400 spins read
            // here, beside a CPU hog too.
            assert!(read >= 100, "{read} of {all} spins read something");
        }
        silo.stop();
    }
}
