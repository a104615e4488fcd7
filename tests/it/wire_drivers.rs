//! Real drivers from PyPI and npm, unmodified, through the PostgreSQL front
//! door: psycopg 3 and node-postgres each run `tests/drivers/crud.{py,js}`
//! (inserts, reads, updates and deletes, statements prepared on the
//! server, a transaction committed and two rolled back, four connections
//! at once) in session and in transaction pool mode, and the data they
//! leave is checked in the tenant's database. The four connections get two
//! server connections: in transaction mode they share them, each client's
//! prepared statements following it from one to the other; in session
//! mode two wait for the first two to finish. `scripts/install-deps`
//! installs the pinned drivers into `.tools`.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use silo::domain::PoolMode;
use silo::router::RouterConfig;

use crate::common::TestEnv;
use crate::wire::{credential, uri};

/// Where `scripts/install-deps` puts the drivers.
const TOOLS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.tools");
/// The driver scripts.
const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/drivers");

/// What one run of either script leaves under its tag, per worker (four
/// workers): 20 rows inserted, the 4 with `n % 5 = 0` deleted, 2 committed.
const WORKERS: i64 = 4;
const ROWS_LEFT: i64 = WORKERS * (20 - 4 + 2);

/// Replicas said to share the server: each one's cap on a tenant's server
/// connections is the plan's limit over this, 2 for a standard tenant.
const REPLICAS: u32 = 10;

/// A generous bound on one run (it takes about a second).
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug)]
enum Driver {
    /// psycopg 3 (`psycopg[binary]`), in the venv `.tools/pydrivers`.
    Psycopg,
    /// node-postgres (`pg`), in `.tools/node/node_modules`.
    NodePg,
}

impl Driver {
    /// The stamp `scripts/install-deps` writes once the driver is installed.
    fn stamp(self) -> PathBuf {
        PathBuf::from(TOOLS).join(match self {
            Driver::Psycopg => "pydrivers/.requirements-sha256",
            Driver::NodePg => "node/.package-sha256",
        })
    }

    /// Fail, saying what to do, unless the driver is installed.
    fn ensure_installed(self) {
        let pins = match self {
            Driver::Psycopg => "the version pinned in scripts/requirements-pydrivers.txt",
            Driver::NodePg => "the version locked in scripts/node-drivers",
        };
        assert!(
            self.stamp().is_file(),
            "{self:?} is not installed (no {}): run scripts/install-deps (it installs {pins} \
             into .tools)",
            self.stamp().display()
        );
    }

    /// The command running this driver's script.
    fn command(self) -> tokio::process::Command {
        self.ensure_installed();
        let tools = PathBuf::from(TOOLS);
        let scripts = PathBuf::from(SCRIPTS);
        match self {
            Driver::Psycopg => {
                let mut cmd = tokio::process::Command::new(tools.join("pydrivers/bin/python"));
                cmd.arg(scripts.join("crud.py"));
                cmd
            }
            Driver::NodePg => {
                let mut cmd = tokio::process::Command::new("node");
                cmd.arg(scripts.join("crud.js"))
                    .env("NODE_PATH", tools.join("node/node_modules"));
                cmd
            }
        }
    }

    /// Run the script against `uri`, its rows tagged `tag`.
    async fn run(self, uri: &str, tag: &str) -> Output {
        let mut cmd = self.command();
        cmd.arg(uri).arg(tag).kill_on_drop(true);
        let out = tokio::time::timeout(RUN_TIMEOUT, cmd.output())
            .await
            .unwrap_or_else(|_| panic!("{self:?} still running after {RUN_TIMEOUT:?}"));
        out.unwrap_or_else(|e| {
            panic!("run {self:?} (scripts/install-deps installs what it needs): {e}")
        })
    }
}

/// The scripts' table in `slug`'s database, made by the server's superuser
/// (tenant roles may not create tables; the tenant's default privileges
/// give its role the rows, and the identity column's sequence).
async fn notes_table(env: &TestEnv, slug: &str) {
    use sqlx::Connection as _;
    let t = env.record(slug).await;
    let mut c = sqlx::PgConnection::connect(&env.pg.url(&t.database_name))
        .await
        .unwrap();
    sqlx::query(
        "CREATE TABLE notes (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            tag text NOT NULL,
            worker int NOT NULL,
            n int NOT NULL,
            body text NOT NULL
        )",
    )
    .execute(&mut c)
    .await
    .unwrap();
}

/// Run `tests/drivers/<script>` with the venv's Python and `args`, with
/// `envs` set; what it said, once it ended.
async fn python(script: &str, args: &[&str], envs: &[(&str, &str)]) -> Output {
    Driver::Psycopg.ensure_installed();
    let mut cmd = tokio::process::Command::new(PathBuf::from(TOOLS).join("pydrivers/bin/python"));
    cmd.arg(PathBuf::from(SCRIPTS).join(script))
        .args(args)
        .envs(envs.iter().copied())
        .kill_on_drop(true);
    tokio::time::timeout(RUN_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{script} still running after {RUN_TIMEOUT:?}"))
        .unwrap()
}

/// The script succeeded, its last line `want`.
fn assert_said(out: &Output, want: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.lines().last() == Some(want),
        "{}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The front door's figures of `slug` (`GET /admin/v1/pools`), as JSON
/// (null while it has neither clients nor server connections).
pub(crate) async fn front_door_figures(env: &TestEnv, slug: &str) -> serde_json::Value {
    let t = env.record(slug).await;
    let (_, pools) = env
        .call(axum::http::Method::GET, "/admin/v1/pools", None)
        .await;
    pools["wire"]["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["tenant_id"] == t.id.to_string())
        .cloned()
        .unwrap_or_default()
}

/// Of those: server connections in use and idle.
async fn server_connections(env: &TestEnv, slug: &str) -> (Option<u64>, Option<u64>) {
    let tenant = front_door_figures(env, slug).await;
    (
        tenant["server_in_use"].as_u64(),
        tenant["server_idle"].as_u64(),
    )
}

/// Run `driver`'s script once per pool mode, each with its own credential
/// and tag; check what it said and what it left.
async fn runs_clean_in_both_pool_modes(driver: Driver) {
    driver.ensure_installed();
    let env = TestEnv::setup()
        .router(RouterConfig {
            replicas: REPLICAS,
            ..RouterConfig::default()
        })
        .wire(|_| {})
        .start()
        .await;
    assert_eq!(
        20 / REPLICAS as i32, // the standard seed plan
        2,
        "two server connections for the four workers"
    );
    env.create("drivers").await;
    notes_table(&env, "drivers").await;
    let mut failures = Vec::new();
    for (user, mode) in [("sess", PoolMode::Session), ("txn", PoolMode::Transaction)] {
        let pw = credential(&env, "drivers", user, mode).await;
        let out = driver.run(&uri(&env, user, &pw, "drivers"), user).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().unwrap_or_default();
        if !out.status.success() || last != format!("ok {ROWS_LEFT}") {
            failures.push(format!(
                "{driver:?} in {mode:?} mode: {}\n{stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    // The premise: the front door held at most two server connections.
    let t = env.record("drivers").await;
    let backends: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND usename = $2",
    )
    .bind(&t.database_name)
    .bind(&t.role_name)
    .fetch_one(&env.admin)
    .await
    .unwrap();
    assert!((1..=2).contains(&backends), "{backends} server connections");

    // Per tag: rows left; upper-cased by the update (even n, less the
    // deleted 0 and 10: 8 a worker); committed in the transaction; changed
    // by the last statement; none of the rolled-back ones (n >= 200).
    let mut c = env.connect_tenant("drivers").await.unwrap();
    let left: Vec<(String, i64, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT tag, count(*),
                count(*) FILTER (WHERE body LIKE 'NOTE %'),
                count(*) FILTER (WHERE body = 'committed'),
                count(*) FILTER (WHERE body = 'note 1!'),
                count(*) FILTER (WHERE n >= 200)
         FROM notes GROUP BY tag ORDER BY tag",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    let want = |tag: &str| {
        (
            tag.to_owned(),
            ROWS_LEFT,
            WORKERS * 8,
            WORKERS * 2,
            WORKERS,
            0,
        )
    };
    assert_eq!(left, vec![want("sess"), want("txn")], "{driver:?}");
}

#[tokio::test]
async fn psycopg_runs_crud_prepared_statements_and_transactions_in_both_pool_modes() {
    runs_clean_in_both_pool_modes(Driver::Psycopg).await;
}

#[tokio::test]
async fn node_pg_runs_crud_prepared_statements_and_transactions_in_both_pool_modes() {
    runs_clean_in_both_pool_modes(Driver::NodePg).await;
}

/// libpq's `COPY FROM STDIN` by the extended protocol (psycopg 3's libpq
/// binding, `tests/drivers/copy_extended.py`) in transaction mode:
/// PostgreSQL ignores the `Sync` libpq sends after the `Execute`. The
/// session must not wait for an answer to it: it would keep its server
/// connection between transactions (closing it when the client leaves,
/// as its state is unknown) and misplace what it hides from the client.
#[tokio::test]
async fn an_extended_protocol_copy_keeps_the_session_in_step() {
    Driver::Psycopg.ensure_installed();
    let env = TestEnv::setup().wire(|_| {}).start().await;
    env.create("copier").await;
    let t = env.record("copier").await;
    {
        use sqlx::Connection as _;
        let mut c = sqlx::PgConnection::connect(&env.pg.url(&t.database_name))
            .await
            .unwrap();
        sqlx::query("CREATE TABLE copied (n int NOT NULL)")
            .execute(&mut c)
            .await
            .unwrap();
    }
    let pw = credential(&env, "copier", "txn", PoolMode::Transaction).await;
    let out = python("copy_extended.py", &[&uri(&env, "txn", &pw, "copier")], &[]).await;
    assert_said(&out, "ok 300");
    // The client gone between transactions: its server connection went
    // back to the tenant's pool (it is closed at once otherwise).
    assert_eq!(server_connections(&env, "copier").await, (Some(0), Some(1)));
}

/// psycopg 3 on the system's libpq (pure Python, libpq before 17) evicts
/// the statements it prepared with SQL `DEALLOCATE name`, and after a
/// rollback drops them all with `DEALLOCATE ALL` (Rails does the same), in
/// transaction mode: each is answered as PostgreSQL answers it (silo's
/// server connections know the statement by silo's name, not psycopg's),
/// and gives back its room under a `max_prepared_bytes` that 60 statements
/// of 2 kB kept would pass (`tests/drivers/evict.py`).
#[tokio::test]
async fn psycopg_evicting_statements_in_sql_keeps_working_in_transaction_mode() {
    Driver::Psycopg.ensure_installed();
    let env = TestEnv::setup()
        .wire(|w| w.max_prepared_bytes = 64 * 1024)
        .start()
        .await;
    env.create("evictor").await;
    let pw = credential(&env, "evictor", "txn", PoolMode::Transaction).await;
    let out = python(
        "evict.py",
        &[&uri(&env, "txn", &pw, "evictor")],
        &[("PSYCOPG_IMPL", "python")],
    )
    .await;
    assert_said(&out, "ok 120");
}

/// More statements prepared in one pipeline (psycopg 3's pipeline mode,
/// one `Sync`) than a server connection may keep, in transaction mode:
/// all answer, and the connection is closed down to its cap before the
/// client's next transaction has it; run again by name, the closed ones
/// are prepared again; and a client idle after a pipeline holds no server
/// connection (`tests/drivers/pipeline.py`).
#[tokio::test]
async fn a_pipeline_of_more_statements_than_a_connection_keeps_is_trimmed_to_its_cap() {
    Driver::Psycopg.ensure_installed();
    let env = TestEnv::setup()
        .wire(|w| w.max_server_statements = 5)
        .start()
        .await;
    env.create("piper").await;
    let pw = credential(&env, "piper", "txn", PoolMode::Transaction).await;
    let mut cmd = tokio::process::Command::new(PathBuf::from(TOOLS).join("pydrivers/bin/python"));
    cmd.arg(PathBuf::from(SCRIPTS).join("pipeline.py"))
        .arg(uri(&env, "txn", &pw, "piper"))
        .arg("5")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    let first = tokio::time::timeout(RUN_TIMEOUT, lines.next_line())
        .await
        .expect("the pipeline script says it is idle")
        .unwrap();
    if first.as_deref() != Some("idle") {
        let out = child.wait_with_output().await.unwrap();
        panic!(
            "{first:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Idle between transactions after a pipeline (psycopg sends a `Flush`
    // after its `Sync`, which may come after the answer): no server
    // connection in use, the one it had back in the pool.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let held = server_connections(&env, "piper").await;
        if held == (Some(0), Some(1)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "an idle pipeline client holds its server connection: (in use, idle) {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::io::AsyncWriteExt::write_all(&mut stdin, b"go\n")
        .await
        .unwrap();
    let last = tokio::time::timeout(RUN_TIMEOUT, lines.next_line())
        .await
        .expect("the pipeline script ends")
        .unwrap()
        .unwrap_or_default();
    let status = child.wait().await.unwrap();
    assert!(status.success(), "{status}: {last}");
    let held: u32 = last
        .strip_prefix("ok ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{last}"));
    assert!((1..=5).contains(&held), "{held} statements held");
}
