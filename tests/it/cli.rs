//! The `silo` binary: configuration refusals and the tenant commands.

use std::process::{Command, Output};

use crate::common::{TestEnv, ADMIN_TOKEN};

fn silo(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_silo"));
    cmd.args(args);
    for var in [
        "SILO_DATABASE_URL",
        "SILO_MASTER_KEY",
        "SILO_ADMIN_TOKEN",
        "SILO_TENANT_SERVER_URL",
        "SILO_FAILPOINT",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(envs.iter().copied());
    cmd.output().expect("run silo")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn serve_refuses_missing_or_weak_secrets_and_names_them() {
    let good_key = silo::crypto::Keyring::generate_base64();
    let url = "postgres://silo@127.0.0.1:1/silo";
    let cases: [(&[(&str, &str)], &str); 5] = [
        (
            &[("SILO_DATABASE_URL", url), ("SILO_MASTER_KEY", &good_key)],
            "SILO_ADMIN_TOKEN",
        ),
        (
            &[
                ("SILO_DATABASE_URL", url),
                ("SILO_MASTER_KEY", &good_key),
                ("SILO_ADMIN_TOKEN", "short"),
            ],
            "SILO_ADMIN_TOKEN",
        ),
        (
            &[
                ("SILO_DATABASE_URL", url),
                ("SILO_ADMIN_TOKEN", ADMIN_TOKEN),
            ],
            "SILO_MASTER_KEY",
        ),
        (
            &[
                ("SILO_DATABASE_URL", url),
                ("SILO_ADMIN_TOKEN", ADMIN_TOKEN),
                (
                    "SILO_MASTER_KEY",
                    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                ),
            ],
            "SILO_MASTER_KEY",
        ),
        (
            &[
                ("SILO_MASTER_KEY", &good_key),
                ("SILO_ADMIN_TOKEN", ADMIN_TOKEN),
            ],
            "SILO_DATABASE_URL",
        ),
    ];
    for (envs, named) in cases {
        let out = silo(&["serve"], envs);
        assert_eq!(out.status.code(), Some(2), "{envs:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(named),
            "{named} not named in: {}",
            stderr(&out)
        );
        assert!(
            !stderr(&out).contains(&good_key),
            "the key must not be echoed"
        );
    }
    let out = silo(&["no-such-command"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn tenant_commands_work_from_a_shell() {
    let env = TestEnv::start().await;
    let url = env.control_url();
    let envs = [
        ("SILO_DATABASE_URL", url.as_str()),
        ("SILO_MASTER_KEY", env.master_key.as_str()),
    ];
    let run = |args: &[&str]| {
        let (args, envs) = (args.to_vec(), envs);
        let out = silo(&args, &envs);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr(&out),
        )
    };
    let (code, out, err) = run(&[
        "tenants",
        "create",
        "shell-clinic",
        "--name",
        "Shell Clinic",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(created["status"], "active");

    let (code, out, _) = run(&["tenants", "list"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("shell-clinic\tactive"), "{out}");
    let (code, _, _) = run(&["tenants", "create", "shell-clinic", "--name", "Again"]);
    assert_eq!(code, Some(2), "a duplicate is a usage error");
    let (code, _, err) = run(&["tenants", "create", "Bad Slug", "--name", "x"]);
    assert_eq!(code, Some(2), "{err}");
    // A mistyped plan is refused by name, with the valid ones, and nothing is created.
    let (code, _, err) = run(&[
        "tenants",
        "create",
        "typo-clinic",
        "--name",
        "Typo",
        "--plan",
        "premum",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("premum") && err.contains("free, premium, standard"),
        "{err}"
    );
    let (code, _, err) = run(&["tenants", "create", "uuid-like", "--name", "  "]);
    assert_eq!(code, Some(2), "a blank name: {err}");
    let (code, _, _) = run(&["tenants", "show", "typo-clinic"]);
    assert_eq!(code, Some(2), "nothing was created");

    let (code, out, _) = run(&["tenants", "suspend", "shell-clinic"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("\"suspended\""));
    let (code, out, _) = run(&["tenants", "resume", "shell-clinic"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("\"active\""));
    let (code, out, err) = run(&["migrate", "tenants", "--concurrency", "2"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("0 migrated, 0 failed"),
        "everyone is at the latest version: {out}"
    );
    let (code, out, err) = run(&["migrate", "tenants", "--status"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("version 1: 1 tenant(s)"), "{out}");
    let (code, _, _) = run(&["migrate", "tenants", "--concurrency", "0"]);
    assert_eq!(code, Some(2));
    let (code, out, _) = run(&["tenants", "show", "shell-clinic"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("Shell Clinic"));
    let (code, out, err) = run(&["tenants", "delete", "shell-clinic"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"deleted\""));
    let (code, _, _) = run(&["tenants", "show", "shell-clinic"]);
    assert_eq!(code, Some(2), "unknown tenant");
    assert!(env.orphans().await.is_empty());
}

/// `silo dev` as the README runs it, started, stopped (Ctrl-C) and started
/// again on the same folder: the printed app API line works both times (the
/// private cluster keeps its port, so the server URL silo stored stays right).
/// A second `silo dev` on the folder while the first runs is refused.
#[tokio::test]
async fn dev_serves_its_demo_clinic_and_again_after_a_restart() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let dir = tempfile::tempdir().unwrap();
    // PostgreSQL runs as `postgres` when the tests run as root: it must reach its folder.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let dev = [
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--pg-listen",
        "127.0.0.1:0",
        "--dir",
        dir.path().to_str().unwrap(),
    ];
    for round in ["first start", "restart"] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_silo"))
            .args(dev)
            .env_remove("SILO_DATABASE_URL")
            .env_remove("SILO_FAILPOINT")
            .env("SILO_WARM_POOL_SIZE", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start silo dev");
        let stdout = child.stdout.take().unwrap();
        // The banner's app API line: `curl -H 'X-Tenant-ID: …' -H 'Authorization: Bearer …' http://…`.
        // And its psql line, after it: `psql 'postgresql://…?sslmode=require'`
        // (TLS required: the front door's self-signed pair answers).
        let (line, psql) = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
            let app = lines.find(|l| l.trim_start().starts_with("app API:"));
            let psql = lines.find(|l| l.trim_start().starts_with("psql:"));
            (app, psql)
        })
        .await
        .unwrap();
        let line = line.unwrap_or_else(|| panic!("{round}: silo dev printed no app API line"));
        let psql = psql.unwrap_or_else(|| panic!("{round}: silo dev printed no psql line"));
        let uri = psql.split('\'').nth(1).unwrap().to_owned();
        let out = tokio::process::Command::new("psql")
            .arg(&uri)
            .args(["-X", "-A", "-t", "-c", "SELECT 1"])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{round}: the printed psql line failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if round == "first start" {
            // A second `silo dev` on the same folder is refused, and leaves
            // the first one's PostgreSQL alone (it stopped it as a leftover).
            let second = silo(&dev, &[("SILO_WARM_POOL_SIZE", "0")]);
            assert_eq!(second.status.code(), Some(2), "{}", stderr(&second));
            assert!(
                stderr(&second).contains("another `silo dev` is running"),
                "{}",
                stderr(&second)
            );
        }
        let quoted: Vec<&str> = line.split('\'').collect();
        let tenant = quoted[1].strip_prefix("X-Tenant-ID: ").unwrap();
        let auth = quoted[3].strip_prefix("Authorization: ").unwrap();
        let url = line.rsplit(' ').next().unwrap();
        let res = reqwest::Client::new()
            .get(url)
            .header("X-Tenant-ID", tenant)
            .header("Authorization", auth)
            .send()
            .await
            .unwrap();
        let status = res.status();
        let body = res.text().await.unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        let exit = tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status, 200, "{round}: {url} answered {body}");
        assert!(exit.success(), "{round}: silo dev exited {exit} on Ctrl-C");
    }
}

/// `silo backup restore --into` from a shell runs as an operation, as the
/// admin API's does: listed with its outcome, the new tenant serving the
/// backup's data. A CLI killed before the data is in leaves nothing
/// behind once a pass settles it: the tenant it made is deleted and the
/// slug is free.
#[tokio::test(flavor = "multi_thread")]
async fn backup_restore_from_a_shell_runs_as_an_operation_settled_if_killed() {
    let env = TestEnv::setup().storage().start().await;
    env.create("shell-source").await;
    let t = env.record("shell-source").await;
    let mut conn = env.connect_tenant("shell-source").await.unwrap();
    sqlx::query("INSERT INTO clinics (name) VALUES ('from the backup')")
        .execute(&mut conn)
        .await
        .unwrap();
    crate::common::close(conn).await;
    let b = env
        .backups()
        .backup_now(t.id, silo::backup::BackupKind::Manual, None)
        .await
        .unwrap();
    let vars = env.silo_env();
    let envs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let id = b.id.to_string();

    // Killed with the backup in a scratch database, before the swap.
    let mut killed = envs.clone();
    killed.push(("SILO_FAILPOINT", "restore_scratch"));
    let out = silo(&["backup", "restore", &id, "--into", "shell-copy"], &killed);
    assert!(!out.status.success(), "{}", stderr(&out));
    assert_eq!(
        env.record("shell-copy").await.status,
        silo::registry::TenantStatus::Suspended
    );
    // A pass settles it (the dead process's session may take a moment to
    // end on a busy server, and with it the operation's lease), and the
    // delete it started finishes in that pass or the next.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while env
        .registry()
        .find_tenant("shell-copy")
        .await
        .unwrap()
        .is_some()
    {
        assert!(std::time::Instant::now() < deadline, "never settled");
        let out = silo(&["reconcile"], &envs);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let failed = env
        .count("SELECT count(*) FROM operations WHERE kind = 'backup.restore' AND status = 'failed' AND error LIKE '%is being deleted%'")
        .await;
    assert_eq!(failed, 1);

    let out = silo(&["backup", "restore", &id, "--into", "shell-copy"], &envs);
    assert!(out.status.success(), "{}", stderr(&out));
    let restored: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(restored["status"], "active", "{restored}");
    assert_eq!(restored["slug"], "shell-copy", "{restored}");
    let succeeded = env
        .count("SELECT count(*) FROM operations WHERE kind = 'backup.restore' AND status = 'succeeded'")
        .await;
    assert_eq!(succeeded, 1);
    let mut conn = env.connect_tenant("shell-copy").await.unwrap();
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM clinics")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(names, ["from the backup"]);
    crate::common::close(conn).await;
}
