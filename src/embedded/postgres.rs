//! A private PostgreSQL cluster started from the machine's own server binaries.
//!
//! Used by `silo dev` (kept under `./.silo/pg` between runs) and by the tests
//! (a throwaway cluster per test). No crate fits: the maintained ones download
//! server builds at run time, which fails offline and never runs as root. This
//! module finds `initdb`/`pg_ctl` on the machine, and when running as root it
//! runs them as the `postgres` user (PostgreSQL refuses to run as root).
//!
//! The server listens on a free loopback port only, with its own socket
//! directory, and password (SCRAM) authentication for the superuser `silo`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use rand::distributions::{Alphanumeric, DistString};

/// Superuser created by `initdb` in every embedded cluster.
pub const SUPERUSER: &str = "silo";

/// How the cluster should be tuned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync on: what `silo dev` uses, data survives a power cut.
    Durable,
    /// fsync and full-page writes off: fast throwaway clusters for tests.
    Throwaway,
}

/// A running private cluster. `stop()` (or dropping it) shuts it down.
pub struct EmbeddedPostgres {
    root: PathBuf,
    bindir: PathBuf,
    port: u16,
    password: String,
    run_as: Option<(u32, u32)>,
    /// Server options given to `pg_ctl -o`.
    opts: String,
    stopped: bool,
    /// Removed after stop for throwaway clusters.
    _tempdir: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for EmbeddedPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedPostgres")
            .field("root", &self.root)
            .field("port", &self.port)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl EmbeddedPostgres {
    /// Start (creating on first use) a cluster whose files live under `root`.
    /// `root/data` holds the data directory, `root/password` the superuser password.
    pub fn start_persistent(root: &Path) -> anyhow::Result<Self> {
        Self::start_at(root.to_path_buf(), Durability::Durable, None)
    }

    /// Start a new cluster in a temporary directory, removed on stop, tuned
    /// for speed over durability (tests).
    pub fn start_throwaway() -> anyhow::Result<Self> {
        Self::start_temp(Durability::Throwaway)
    }

    /// Start a new cluster in a temporary directory, removed on stop.
    pub fn start_temp(durability: Durability) -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("silo-pg-")
            .tempdir_in(std::env::temp_dir())
            .context("create temporary directory for PostgreSQL")?;
        let root = tmp.path().to_path_buf();
        Self::start_at(root, durability, Some(tmp))
    }

    fn start_at(
        root: PathBuf,
        durability: Durability,
        tempdir: Option<tempfile::TempDir>,
    ) -> anyhow::Result<Self> {
        let bindir = find_bindir()?;
        let run_as = postgres_user_if_root()?;
        std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
        let data = root.join("data");
        let password_file = root.join("password");

        let password = if data.join("PG_VERSION").exists() {
            std::fs::read_to_string(&password_file)
                .with_context(|| format!("read {}", password_file.display()))?
                .trim()
                .to_owned()
        } else {
            let password = Alphanumeric.sample_string(&mut rand::thread_rng(), 32);
            init_cluster(&bindir, &root, &data, &password, run_as)?;
            write_private(&password_file, &password)?;
            password
        };

        stop_leftover(&bindir, &data, run_as);
        let port = if tempdir.is_some() {
            free_port()?
        } else {
            kept_port(&root.join("port"))?
        };
        let sock = root.join("sock");
        std::fs::create_dir_all(&sock)?;
        if let Some((uid, gid)) = run_as {
            chown_tree(&root, uid, gid)?;
        }
        // Unix socket paths are limited to ~107 bytes; fall back to TCP only.
        let sock_opt = if sock.as_os_str().len() < 90 {
            format!("-k {}", sock.display())
        } else {
            "-c unix_socket_directories=''".to_owned()
        };
        let mut opts = format!(
            "-p {port} -h 127.0.0.1 {sock_opt} -c max_connections=400 -c shared_buffers=64MB -c wal_level=logical"
        );
        if durability == Durability::Throwaway {
            opts.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        let log = root.join("postgres.log");
        let status = pg_command(&bindir, "pg_ctl", run_as)
            .arg("start")
            .arg("-w")
            .arg("-t")
            .arg("60")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .arg("-o")
            .arg(&opts)
            .stdout(std::process::Stdio::null())
            .status()
            .context("run pg_ctl start")?;
        if !status.success() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(15).collect();
            bail!(
                "PostgreSQL did not start ({status}); last log lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(Self {
            root,
            bindir,
            port,
            password,
            run_as,
            opts,
            stopped: false,
            _tempdir: tempdir,
        })
    }

    /// The TCP port the cluster listens on (127.0.0.1 only).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory holding the server binaries that started this cluster.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// A superuser connection URL for `database`.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    /// Stop the server (fast shutdown: open sessions are disconnected).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let status = pg_command(&self.bindir, "pg_ctl", self.run_as)
            .arg("stop")
            .arg("-w")
            .arg("-m")
            .arg("fast")
            .arg("-D")
            .arg(self.root.join("data"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .context("run pg_ctl stop")?;
        if !status.success() {
            bail!("pg_ctl stop failed: {status}");
        }
        Ok(())
    }

    /// Start the cluster again after `stop()`, on the same port (outage tests).
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        let status = pg_command(&self.bindir, "pg_ctl", self.run_as)
            .arg("start")
            .arg("-w")
            .arg("-D")
            .arg(self.root.join("data"))
            .arg("-l")
            .arg(self.root.join("postgres.log"))
            .arg("-o")
            .arg(&self.opts)
            .stdout(std::process::Stdio::null())
            .status()
            .context("run pg_ctl start")?;
        if !status.success() {
            bail!("PostgreSQL did not start again: {status}");
        }
        self.stopped = false;
        Ok(())
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("failed to stop embedded PostgreSQL: {e:#}");
        }
    }
}

fn init_cluster(
    bindir: &Path,
    root: &Path,
    data: &Path,
    password: &str,
    run_as: Option<(u32, u32)>,
) -> anyhow::Result<()> {
    let pwfile = root.join("initdb.pw");
    write_private(&pwfile, password)?;
    if let Some((uid, gid)) = run_as {
        chown_tree(root, uid, gid)?;
    }
    let out = pg_command(bindir, "initdb", run_as)
        .arg("-D")
        .arg(data)
        .arg("-U")
        .arg(SUPERUSER)
        .arg("--pwfile")
        .arg(&pwfile)
        .arg("--auth=scram-sha-256")
        .arg("--encoding=UTF8")
        .arg("--locale=C")
        .arg("-N")
        .output()
        .context("run initdb")?;
    std::fs::remove_file(&pwfile).ok();
    if !out.status.success() {
        bail!(
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A server still running in `data` (left by a killed `silo dev`) is stopped,
/// so this start gets a known port and password.
fn stop_leftover(bindir: &Path, data: &Path, run_as: Option<(u32, u32)>) {
    if !data.join("postmaster.pid").exists() {
        return;
    }
    let running = pg_command(bindir, "pg_ctl", run_as)
        .arg("status")
        .arg("-D")
        .arg(data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if running {
        let _ = pg_command(bindir, "pg_ctl", run_as)
            .args(["stop", "-w", "-m", "fast", "-D"])
            .arg(data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn pg_command(bindir: &Path, program: &str, run_as: Option<(u32, u32)>) -> Command {
    let mut cmd = Command::new(bindir.join(program));
    // The server must not inherit a locale the cluster does not have.
    cmd.env("LC_ALL", "C");
    cmd.env_remove("PGDATA");
    if let Some((uid, gid)) = run_as {
        cmd.uid(uid).gid(gid);
        cmd.env("HOME", "/tmp");
        cmd.current_dir("/");
    }
    cmd
}

/// Locate the directory holding `initdb` and `pg_ctl`: `PG_BINDIR`, then
/// `pg_config --bindir`, then `/usr/lib/postgresql/<newest>/bin`, then PATH.
pub fn find_bindir() -> anyhow::Result<PathBuf> {
    let has_tools = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        let dir = PathBuf::from(dir);
        if has_tools(&dir) {
            return Ok(dir);
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_tools(&dir) {
            return Ok(dir);
        }
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<(u32, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                Some((v, e.path().join("bin")))
            })
            .filter(|(_, d)| has_tools(d))
            .collect();
        versions.sort();
        if let Some((_, dir)) = versions.pop() {
            return Ok(dir);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_tools(&dir) {
                return Ok(dir);
            }
        }
    }
    bail!(
        "PostgreSQL server binaries (initdb, pg_ctl) not found; install them \
         (Debian: apt-get install postgresql) or set PG_BINDIR"
    )
}

/// When running as root, the uid/gid of the `postgres` user to run the server as.
fn postgres_user_if_root() -> anyhow::Result<Option<(u32, u32)>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let user = nix::unistd::User::from_name("postgres")
        .context("look up the postgres user")?
        .context(
            "running as root, PostgreSQL must run as the 'postgres' user, which does not exist \
             (Debian: apt-get install postgresql creates it)",
        )?;
    Ok(Some((user.uid.as_raw(), user.gid.as_raw())))
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))?;
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            if entry.file_type()?.is_symlink() {
                continue;
            }
            chown_tree(&entry.path(), uid, gid)?;
        }
    }
    Ok(())
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    std::io::Write::write_all(&mut f, contents.as_bytes())?;
    Ok(())
}

/// The port a persistent cluster listened on last time (a free one the first
/// time, remembered in `file`): the URLs silo stored for it (its server's
/// admin URL) stay right across restarts.
fn kept_port(file: &Path) -> anyhow::Result<u16> {
    let Ok(kept) = std::fs::read_to_string(file) else {
        let port = free_port()?;
        std::fs::write(file, port.to_string())
            .with_context(|| format!("write {}", file.display()))?;
        return Ok(port);
    };
    let port: u16 = kept
        .trim()
        .parse()
        .with_context(|| format!("{} does not hold a port number", file.display()))?;
    std::net::TcpListener::bind(("127.0.0.1", port)).with_context(|| {
        format!(
            "the private PostgreSQL cluster listens on 127.0.0.1:{port} (kept in {}), and another program holds that port now: stop that program, then start again",
            file.display()
        )
    })?;
    Ok(port)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    Ok(listener.local_addr()?.port())
}
