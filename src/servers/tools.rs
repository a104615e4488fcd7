//! `pg_dump` and `pg_restore`: found on the machine, checked against the
//! server's version, and given the admin connection through libpq's
//! environment variables (never on the command line, where `ps` shows it).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use anyhow::Context;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

/// libpq connection settings for a server's admin login, as environment
/// variables. `Debug` shows no values.
#[derive(Clone)]
pub struct LibpqEnv(Arc<Vec<(&'static str, String)>>);

impl std::fmt::Debug for LibpqEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LibpqEnv(<redacted>)")
    }
}

impl LibpqEnv {
    /// From a `postgres://user:password@host:port/db?sslmode=...` URL.
    pub fn from_url(url: &str) -> anyhow::Result<Self> {
        let u = url::Url::parse(url).map_err(|_| anyhow::anyhow!("not a valid postgres:// URL"))?;
        let decode = percent_decode;
        let mut vars = Vec::new();
        if let Some(host) = u.host_str() {
            vars.push(("PGHOST", host.trim_matches(['[', ']']).to_owned()));
        }
        if let Some(port) = u.port() {
            vars.push(("PGPORT", port.to_string()));
        }
        if !u.username().is_empty() {
            vars.push(("PGUSER", decode(u.username())));
        }
        if let Some(pw) = u.password() {
            vars.push(("PGPASSWORD", decode(pw)));
        }
        for (k, v) in u.query_pairs() {
            let var = match k.as_ref() {
                "sslmode" => "PGSSLMODE",
                "sslrootcert" => "PGSSLROOTCERT",
                "sslcert" => "PGSSLCERT",
                "sslkey" => "PGSSLKEY",
                "host" => "PGHOST",
                "port" => "PGPORT",
                "user" => "PGUSER",
                "password" => "PGPASSWORD",
                _ => continue,
            };
            vars.retain(|(name, _)| *name != var);
            vars.push((var, v.into_owned()));
        }
        Ok(Self(Arc::new(vars)))
    }

    /// The same login as a libpq connection string for `database`, e.g. for
    /// `CREATE SUBSCRIPTION`. It holds the password: never log it.
    pub fn conninfo(&self, database: &str) -> String {
        let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
        let mut parts: Vec<String> = self
            .0
            .iter()
            .filter_map(|(var, v)| {
                let key = match *var {
                    "PGHOST" => "host",
                    "PGPORT" => "port",
                    "PGUSER" => "user",
                    "PGPASSWORD" => "password",
                    "PGSSLMODE" => "sslmode",
                    "PGSSLROOTCERT" => "sslrootcert",
                    "PGSSLCERT" => "sslcert",
                    "PGSSLKEY" => "sslkey",
                    _ => return None,
                };
                Some(format!("{key}={}", quote(v)))
            })
            .collect();
        parts.push(format!("dbname={}", quote(database)));
        parts.join(" ")
    }

    fn apply(&self, cmd: &mut Command) {
        // Only the admin URL decides where the tools connect: no PG* variable
        // of silo's own environment leaks in.
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("PG") {
                cmd.env_remove(var);
            }
        }
        for (k, v) in self.0.iter() {
            cmd.env(k, v);
        }
        cmd.env("PGAPPNAME", "silo-backup");
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The PostgreSQL client tools silo runs.
#[derive(Clone, Debug)]
pub struct PgTools {
    bindir: PathBuf,
}

impl PgTools {
    /// `dir`, or the machine's newest PostgreSQL binaries.
    pub fn find(dir: Option<&Path>) -> anyhow::Result<Self> {
        let bindir = match dir {
            Some(d) => d.to_owned(),
            None => crate::embedded::postgres::find_bindir()
                .context("find pg_dump (set SILO_PG_BIN_DIR)")?,
        };
        anyhow::ensure!(
            bindir.join("pg_dump").exists() && bindir.join("pg_restore").exists(),
            "no pg_dump and pg_restore in {}",
            bindir.display()
        );
        Ok(Self { bindir })
    }

    /// `pg_dump --version`, e.g. `pg_dump (PostgreSQL) 15.8`, and its major version.
    pub async fn dump_version(&self) -> anyhow::Result<(String, u32)> {
        let out = Command::new(self.bindir.join("pg_dump"))
            .arg("--version")
            .output()
            .await
            .context("run pg_dump --version")?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let major = text
            .split_whitespace()
            .last()
            .and_then(|v| v.split(['.', ' ']).next())
            .and_then(|m| m.parse().ok())
            .with_context(|| format!("read the version of pg_dump from '{text}'"))?;
        Ok((text, major))
    }

    /// Start `pg_dump -Fc` of `database` at `snapshot`, its output on stdout.
    pub fn spawn_dump(
        &self,
        env: &LibpqEnv,
        database: &str,
        snapshot: &str,
    ) -> anyhow::Result<Child> {
        // A tenant being moved carries the move's publication and fence table: not its data.
        self.spawn_dump_with(
            env,
            database,
            &[
                "--exclude-schema=silo_move",
                &format!("--snapshot={snapshot}"),
            ],
        )
    }

    /// Start `pg_dump -Fc --schema-only` of `database` (for a move), its output on stdout.
    pub fn spawn_schema_dump(&self, env: &LibpqEnv, database: &str) -> anyhow::Result<Child> {
        self.spawn_dump_with(env, database, &["--schema-only"])
    }

    fn spawn_dump_with(
        &self,
        env: &LibpqEnv,
        database: &str,
        extra: &[&str],
    ) -> anyhow::Result<Child> {
        let mut cmd = Command::new(self.bindir.join("pg_dump"));
        env.apply(&mut cmd);
        cmd.args([
            "--format=custom",
            "--no-password",
            "--no-publications",
            "--no-subscriptions",
        ])
        .args(extra)
        .arg(format!("--dbname={database}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
        cmd.spawn().context("start pg_dump")
    }

    /// Start `pg_restore` into `database`, reading the dump from stdin. Objects
    /// are owned by the admin login; privileges are granted by silo afterwards.
    pub fn spawn_restore(&self, env: &LibpqEnv, database: &str) -> anyhow::Result<Child> {
        let mut cmd = Command::new(self.bindir.join("pg_restore"));
        env.apply(&mut cmd);
        cmd.args([
            "--no-owner",
            "--no-privileges",
            "--exit-on-error",
            "--single-transaction",
            "--no-password",
        ])
        .arg(format!("--dbname={database}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
        cmd.spawn().context("start pg_restore")
    }
}

/// The tool's own error lines, for an error message that is stored and shown:
/// `CONTEXT`/`DETAIL` lines and the SQL a failed command ran (which can
/// quote tenant data) are left out, and the whole is capped at 1 KiB.
pub fn error_lines(stderr: &str) -> String {
    let mut out = String::new();
    for line in stderr.lines() {
        let l = line.trim();
        if l.is_empty()
            || l.starts_with("CONTEXT:")
            || l.starts_with("DETAIL:")
            || l.starts_with("LINE ")
            || l.contains("Command was:")
        {
            continue;
        }
        if out.len() + l.len() > 1024 {
            break;
        }
        if !out.is_empty() {
            out.push_str("; ");
        }
        out.push_str(l);
    }
    if out.is_empty() {
        "no message".into()
    } else {
        out
    }
}

/// Collect the last few KiB a child writes to stderr, for its error message.
pub fn capture_stderr(child: &mut Child) -> tokio::task::JoinHandle<String> {
    let stderr = child.stderr.take();
    tokio::spawn(async move {
        let Some(mut stderr) = stderr else {
            return String::new();
        };
        let mut tail: Vec<u8> = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            tail.extend_from_slice(&buf[..n]);
            if tail.len() > 8192 {
                tail.drain(..tail.len() - 4096);
            }
        }
        String::from_utf8_lossy(&tail).trim().to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_env_takes_every_part_of_the_url_and_decodes_the_password() {
        let env = LibpqEnv::from_url(
            "postgres://ad%40min:p%2Fw%25d@db.example:6543/postgres?sslmode=require",
        )
        .unwrap();
        let get = |k: &str| env.0.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(get("PGHOST").as_deref(), Some("db.example"));
        assert_eq!(get("PGPORT").as_deref(), Some("6543"));
        assert_eq!(get("PGUSER").as_deref(), Some("ad@min"));
        assert_eq!(get("PGPASSWORD").as_deref(), Some("p/w%d"));
        assert_eq!(get("PGSSLMODE").as_deref(), Some("require"));
        assert!(!format!("{env:?}").contains("p/w"));
        assert_eq!(
            env.conninfo("silo_t_1"),
            "host='db.example' port='6543' user='ad@min' password='p/w%d' sslmode='require' dbname='silo_t_1'"
        );
        let quoted = LibpqEnv::from_url("postgres://u:it%27s%5Cx@h/db").unwrap();
        assert!(quoted.conninfo("d").contains(r"password='it\'s\\x'"));
    }
}
