//! The PostgreSQL front door against a direct connection and PgBouncer,
//! driven by `pgbench -S` (select-only, simple protocol) in one run.
//!
//! `cargo bench --bench wire` (seconds per case `SILO_BENCH_SECONDS`,
//! default 10; scale `SILO_BENCH_SCALE`, default 10).
//!
//! One PostgreSQL cluster, one tenant (premium plan: 50 connections). The
//! same pgbench runs three ways, SCRAM-SHA-256 on every path:
//! - **direct**: as the tenant's own role, straight to PostgreSQL;
//! - **silo**: through `SILO_PG_LISTEN` with an app credential in
//!   transaction mode (silo's connections to the server: at most 50);
//! - **pgbouncer**: Debian's PgBouncer in transaction mode, pool size 50,
//!   logging in to the server as the tenant's role (skipped if not installed).
//!
//! Cases: 1 client; 50 clients; a `-C` storm (8 clients, a new connection
//! per transaction). Reported: TPS per path and the ratios silo/direct and
//! silo/pgbouncer.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::{Context, Result};
use silo::config::OptionalAddr;
use silo::domain::{Plan, PoolMode};
use silo::embedded::EmbeddedPostgres;
use support::{control_plane, env_number, init_logging, load_average};

fn main() -> Result<()> {
    init_logging();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// TPS pgbench reports (without the initial connection time), or an error
/// with its output.
async fn pgbench(uri: &str, clients: u32, seconds: u64, reconnect: bool) -> Result<f64> {
    let mut cmd = tokio::process::Command::new("pgbench");
    cmd.args(["-n", "-S", "-M", "simple"])
        .arg("-c")
        .arg(clients.to_string())
        .arg("-j")
        .arg(clients.min(2).to_string())
        .arg("-T")
        .arg(seconds.to_string());
    if reconnect {
        cmd.arg("-C");
    }
    let out = cmd.arg(uri).output().await.context("run pgbench")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !said.contains("number of failed transactions: 0") {
        anyhow::bail!("pgbench failed: {said}");
    }
    said.lines()
        .find_map(|l| {
            let l = l.trim();
            // With -C, the figure that counts includes the reconnections.
            l.strip_prefix("tps = ")
                .filter(|_| {
                    l.contains("without initial connection time")
                        || l.contains("including reconnection times")
                })
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .with_context(|| format!("no TPS in: {said}"))
}

async fn run() -> Result<()> {
    let seconds: u64 = env_number("SILO_BENCH_SECONDS", 10)?;
    let scale: u32 = env_number("SILO_BENCH_SCALE", 10)?;
    println!(
        "wire benchmark: pgbench -S, {seconds} s per case, scale {scale}; load {}",
        load_average()
    );
    let pg = tokio::task::spawn_blocking(EmbeddedPostgres::start_throwaway).await??;
    let (keyring, registry) = control_plane(&pg).await?;
    let control = support::control(&registry, &keyring, 0, None);
    control.ensure_default_server(&pg.url("postgres")).await?;
    let mut req = support::request("bench-wire");
    req.plan = Plan::Premium;
    control.provisioner().create(&req, None, "bench").await?;
    let t = registry
        .find_tenant("bench-wire")
        .await?
        .context("the bench tenant")?;
    let role_password = keyring.open_string(&t.key_id, &t.password_enc, t.id.as_bytes())?;
    let init = tokio::process::Command::new("pgbench")
        .args(["-i", "-q", "-s"])
        .arg(scale.to_string())
        .arg(pg.url(&t.database_name))
        .output()
        .await?;
    anyhow::ensure!(init.status.success(), "pgbench -i failed");
    // The three paths each keep their idle server connections a while:
    // the role's own limit (the plan's 50) must not make one path refuse
    // another's clients. silo still opens at most 50, and PgBouncer's pool is 50.
    let admin = sqlx::PgPool::connect(&pg.url("postgres")).await?;
    sqlx::query(&format!(
        "ALTER ROLE \"{}\" CONNECTION LIMIT -1",
        t.role_name
    ))
    .execute(&admin)
    .await?;
    let app_password = silo::crypto::random_password(32);
    registry
        .create_app_credential(
            t.id,
            "bench",
            false,
            PoolMode::Transaction,
            &silo::servers::scram::verifier(&app_password),
            "bench",
        )
        .await?;
    let wire_port = free_port()?;
    let server = support::SiloServer::start_with(control, 0, |a| {
        a.pg_listen = OptionalAddr(Some(format!("127.0.0.1:{wire_port}").parse().unwrap()));
    })
    .await?;
    let direct = format!(
        "postgresql://{}:{}@127.0.0.1:{}/{}?sslmode=disable",
        t.role_name,
        role_password,
        pg.port(),
        t.database_name
    );
    let silo = format!(
        "postgresql://bench:{app_password}@127.0.0.1:{wire_port}/bench-wire?sslmode=disable"
    );
    // PgBouncer gets the role's password: 1.18 cannot log in to the server
    // with a SCRAM verifier in its auth file ("client authentication did not
    // provide SCRAM keys"), so it checks clients with its own verifier of
    // PostgreSQL's default 4096 iterations (paid by the client at each login).
    let bouncer = start_pgbouncer(&pg, &t.database_name, &t.role_name, &role_password).await;
    let mut paths = vec![("direct", direct), ("silo", silo)];
    match &bouncer {
        Ok((_, port)) => paths.push((
            "pgbouncer",
            format!(
                "postgresql://{}:{role_password}@127.0.0.1:{port}/bench?sslmode=disable",
                t.role_name
            ),
        )),
        Err(e) => println!("pgbouncer skipped: {e:#}"),
    }

    println!(
        "\n{:<22} {:>12} {:>12} {:>12} {:>12} {:>14}",
        "case", "direct tps", "silo tps", "pgbouncer", "silo/direct", "silo/pgbouncer"
    );
    for (case, clients, reconnect) in [
        ("1 client", 1, false),
        ("50 clients", 50, false),
        ("-C storm (8 clients)", 8, true),
    ] {
        let mut tps = Vec::new();
        for (_, uri) in &paths {
            tps.push(pgbench(uri, clients, seconds, reconnect).await?);
        }
        let bouncer = tps.get(2).copied();
        println!(
            "{:<22} {:>12.0} {:>12.0} {:>12} {:>12.2} {:>14}",
            case,
            tps[0],
            tps[1],
            bouncer.map_or("-".into(), |b| format!("{b:.0}")),
            tps[1] / tps[0],
            bouncer.map_or("-".into(), |b| format!("{:.2}", tps[1] / b)),
        );
    }
    if let Ok((mut child, _)) = bouncer {
        let _ = child.kill().await;
    }
    server.stop().await?;
    Ok(())
}

/// PgBouncer in transaction mode, pool size 50, in front of the tenant's
/// database as its role (known to it by its password); the child, and the
/// port it listens on.
async fn start_pgbouncer(
    pg: &EmbeddedPostgres,
    database: &str,
    role: &str,
    password: &str,
) -> Result<(tokio::process::Child, u16)> {
    let bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .context("pgbouncer is not installed")?;
    let dir = tempfile::tempdir()?.keep();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let port = free_port()?;
    let ini = dir.join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]\nbench = host=127.0.0.1 port={} dbname={database} user={role}\n\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = scram-sha-256\nauth_file = {}\npool_mode = transaction\n\
             default_pool_size = 50\nmax_client_conn = 2000\nlogfile = {}\n",
            pg.port(),
            dir.join("users.txt").display(),
            dir.join("pgbouncer.log").display()
        ),
    )?;
    std::fs::write(
        dir.join("users.txt"),
        format!("\"{role}\" \"{password}\"\n"),
    )?;
    for f in ["pgbouncer.ini", "users.txt"] {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644))?;
    }
    let mut cmd = tokio::process::Command::new(bin);
    if nix::unistd::geteuid().is_root() {
        // PgBouncer will not run as root.
        let user = nix::unistd::User::from_name("postgres")?
            .context("the postgres user (PgBouncer will not run as root)")?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
        cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let child = cmd.arg(&ini).kill_on_drop(true).spawn()?;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok((child, port));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("pgbouncer did not start")
}
