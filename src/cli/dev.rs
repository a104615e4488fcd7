//! `silo dev`: everything on one machine with no setup: a private
//! PostgreSQL cluster, an embedded S3-compatible store, generated keys, two
//! demo clinics, then the same server `silo serve` runs.

use std::path::Path;

use anyhow::Context;

use super::{shutdown_signal, CliError};
use crate::config::{DevArgs, Secret};
use crate::crypto::Keyring;
use crate::domain::{Plan, Slug, TenantName};
use crate::embedded::EmbeddedPostgres;
use crate::provision::CreateTenant;
use crate::startup::{Connection, RunSettings};

/// Demo clinics `silo dev` creates on first start.
const DEMO_CLINICS: [(&str, &str); 2] = [
    ("demo-north", "North Family Clinic"),
    ("demo-south", "South Dental Care"),
];

pub(super) async fn dev(args: DevArgs) -> Result<(), CliError> {
    let dir = args.dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let dir = dir.canonicalize().context("resolve the dev directory")?;
    // One `silo dev` per folder: a second one would stop the first one's
    // PostgreSQL as a leftover. Held until this process ends.
    let _running = hold_dev_dir(&dir)?;
    let pg_dir = dir.join("pg");
    let pg = tokio::task::spawn_blocking(move || EmbeddedPostgres::start_persistent(&pg_dir))
        .await
        .context("start PostgreSQL")?
        .context("start the private PostgreSQL cluster")?;
    let result = dev_with(&args, &dir, &pg).await;
    let mut pg = pg;
    tokio::task::spawn_blocking(move || pg.stop())
        .await
        .context("stop PostgreSQL")?
        .context("stop the private PostgreSQL cluster")?;
    result
}

/// Bucket of the embedded object store in `silo dev`.
pub const DEV_BUCKET: &str = "silo-backups";

async fn dev_with(args: &DevArgs, dir: &Path, pg: &EmbeddedPostgres) -> Result<(), CliError> {
    let master_key = read_or_create(&dir.join("master.key"), Keyring::generate_base64)?;
    let admin_token = read_or_create(&dir.join("admin.token"), || {
        crate::crypto::random_password(40)
    })?;
    let s3_secret = read_or_create(&dir.join("s3.secret"), || {
        crate::crypto::random_password(40)
    })?;
    let s3 = crate::embedded::EmbeddedS3::start(&dir.join("s3"), "silo-dev", &s3_secret)
        .await
        .context("start the embedded object store")?;
    ensure_database(&pg.url("postgres"), "silo_control").await?;
    let mut storage_args =
        crate::config::StorageArgs::from_env().map_err(|e| CliError::Usage(e.to_string()))?;
    storage_args.s3_bucket = Some(DEV_BUCKET.into());
    storage_args.s3_endpoint = Some(s3.endpoint());
    storage_args.s3_force_path_style = true;
    let store_config = crate::backup::StoreConfig {
        bucket: DEV_BUCKET.into(),
        endpoint: Some(s3.endpoint()),
        region: storage_args.s3_region.clone(),
        force_path_style: true,
        checksums: storage_args.s3_checksums,
        static_credentials: Some(("silo-dev".into(), Secret::new(s3_secret))),
    };
    let storage = crate::backup::Storage::connect(&store_config, &storage_args)
        .await
        .context("connect to the embedded object store")?;
    storage
        .store
        .ensure_bucket()
        .await
        .context("create the backup bucket")?;
    let control = crate::startup::connect(Connection {
        database_url: Secret::new(pg.url("silo_control")),
        keyring: Keyring::from_base64(&master_key).map_err(crate::config::ConfigError::from)?,
        tenant_server_url: Some(Secret::new(pg.url("postgres"))),
        schema: crate::servers::TenantSchema::embedded(),
        storage: Some(storage),
        warm_pool_size: args.server.warm_pool_size,
        keep_for: Default::default(),
        work_slots: storage_args.backup_concurrency as usize,
        role_settings: crate::servers::RoleSettings::from_mib(
            crate::config::DEFAULT_TENANT_TEMP_FILE_LIMIT_MB,
        ),
    })
    .await?;
    for (slug, name) in DEMO_CLINICS {
        if control.registry().find_tenant(slug).await?.is_none() {
            let req = CreateTenant {
                slug: Slug::parse(slug).expect("a valid demo slug"),
                name: TenantName::parse(name).expect("a valid demo name"),
                plan: Plan::default_plan(),
                server: None,
            };
            let t = control.provisioner().create(&req, None, "silo-dev").await?;
            super::demo_data::seed(&pg.url(&t.database_name), &t.role_name, name).await?;
        }
    }
    let demo = control
        .registry()
        .find_tenant(DEMO_CLINICS[0].0)
        .await?
        .context("find the demo clinic")?;
    let (demo_token, _) = crate::tokens::mint(
        control.keyring(),
        demo.id,
        demo.token_generation,
        crate::tokens::MAX_TTL_SECONDS,
    );
    // The front door: TLS with a self-signed pair kept in the folder, and a
    // demo app credential whose password is kept there too.
    let mut server = args.server.clone();
    if server.pg_listen.0.is_some() && server.pg_tls_cert.is_none() {
        let (cert, key) = self_signed(&dir.join("tls"))?;
        server.pg_tls_cert = Some(cert);
        server.pg_tls_key = Some(key);
    }
    let demo_password = read_or_create(&dir.join("demo-app.password"), || {
        crate::crypto::random_password(32)
    })?;
    demo_credential(&control, demo.id, &demo_password).await?;
    let banner = |addr: std::net::SocketAddr, pg_addr: Option<std::net::SocketAddr>| {
        println!("silo dev is running (Ctrl-C stops it)");
        println!("  admin API:    http://{addr}/admin/v1/tenants");
        println!("  console:      http://{addr}/console (sign in with the admin token)");
        println!("  API docs:     http://{addr}/docs");
        println!("  metrics:      http://{addr}/metrics (bearer: the admin token)");
        println!("  admin token:  {admin_token}");
        println!("  try:          curl -H 'Authorization: Bearer {admin_token}' http://{addr}/admin/v1/tenants");
        println!(
            "  PostgreSQL:   127.0.0.1:{} (data in {})",
            pg.port(),
            dir.join("pg").display()
        );
        println!(
            "  backups:      embedded S3 at {} (bucket {DEV_BUCKET}, data in {})",
            s3.endpoint(),
            dir.join("s3").display()
        );
        println!(
            "  demo clinics: {}",
            DEMO_CLINICS.map(|(s, _)| s).join(", ")
        );
        println!(
            "  app API:      curl -H 'X-Tenant-ID: {}' -H 'Authorization: Bearer {demo_token}' http://{addr}/api/v1/patients",
            DEMO_CLINICS[0].0
        );
        if let Some(pg_addr) = pg_addr {
            println!(
                "  psql:         psql 'postgresql://{DEMO_APP_USER}:{demo_password}@{pg_addr}/{}?sslmode=require'",
                DEMO_CLINICS[0].0
            );
        }
    };
    crate::startup::serve(
        control,
        RunSettings::from_args(&server, Secret::new(admin_token.clone()), None),
        args.server.listen,
        shutdown_signal(),
        banner,
    )
    .await?;
    Ok(())
}

/// The app credential of the demo clinic `silo dev` prints a `psql` line for.
const DEMO_APP_USER: &str = "demo";

/// The demo app credential, with `password` (made, or given it again: the
/// password file is what counts).
async fn demo_credential(
    control: &crate::control::ControlPlane,
    tenant: uuid::Uuid,
    password: &str,
) -> anyhow::Result<()> {
    let verifier = crate::servers::scram::verifier(password);
    let registry = control.registry();
    let existing = registry
        .app_credentials(tenant)
        .await?
        .into_iter()
        .find(|c| c.name == DEMO_APP_USER);
    match existing {
        Some(c) => {
            registry
                .rotate_app_credential(tenant, c.id, &verifier, "silo-dev")
                .await?;
        }
        None => {
            registry
                .create_app_credential(
                    tenant,
                    DEMO_APP_USER,
                    false,
                    crate::domain::PoolMode::Session,
                    &verifier,
                    "silo-dev",
                )
                .await?;
        }
    }
    Ok(())
}

/// A self-signed certificate for `localhost` and 127.0.0.1 under `dir`
/// (made on first use): the front door's TLS in `silo dev`.
fn self_signed(dir: &Path) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    use std::os::unix::fs::OpenOptionsExt;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let pair = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .context("make a self-signed certificate")?;
    std::fs::write(&cert, pair.cert.pem()).with_context(|| format!("write {}", cert.display()))?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&key)
        .with_context(|| format!("write {}", key.display()))?;
    std::io::Write::write_all(&mut f, pair.key_pair.serialize_pem().as_bytes())
        .with_context(|| format!("write {}", key.display()))?;
    Ok((cert, key))
}

fn read_or_create(path: &Path, make: impl FnOnce() -> String) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(s) = std::fs::read_to_string(path) {
        return Ok(s.trim().to_owned());
    }
    let value = make();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    std::io::Write::write_all(&mut f, value.as_bytes())?;
    Ok(value)
}

/// Create `name` on the server behind `admin_url` unless it exists, closed to PUBLIC.
pub async fn ensure_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    use sqlx::{ConnectOptions, Connection};
    let mut conn = crate::servers::admin_options(admin_url)?
        .connect()
        .await
        .context("connect to PostgreSQL")?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        // Only silo's own login reaches the control database, never a tenant role.
        // (Two statements: CREATE DATABASE cannot share a multi-command string.)
        sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .with_context(|| format!("create database {name}"))?;
        sqlx::raw_sql(&format!(
            "REVOKE CONNECT, TEMPORARY ON DATABASE \"{name}\" FROM PUBLIC"
        ))
        .execute(&mut conn)
        .await
        .with_context(|| format!("close database {name} to PUBLIC"))?;
    }
    conn.close().await.ok();
    Ok(())
}

/// Take the folder's `silo-dev.lock` (an exclusive `flock`, let go by the
/// system when this process ends however it ends), or refuse: another
/// `silo dev` is running on the folder.
fn hold_dev_dir(dir: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>, CliError> {
    use nix::fcntl::{Flock, FlockArg};
    let path = dir.join("silo-dev.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(held) => Ok(held),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(CliError::Usage(format!(
            "another `silo dev` is running on {} (it holds {}): stop it first, or give this one another --dir",
            dir.display(),
            path.display()
        ))),
        Err((_, e)) => Err(anyhow::Error::new(e)
            .context(format!("lock {}", path.display()))
            .into()),
    }
}
