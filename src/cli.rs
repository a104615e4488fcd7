//! The `silo` commands. Each parses its configuration, then calls the library.
//! Exit codes: 0 success, 1 operation failed, 2 bad usage or configuration.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{app, AppState};
use crate::config::{
    check_admin_token, BackupCommand, Cli, Command, ConfigError, ControlArgs, DevArgs,
    MigrateCommand, Secret, ServerArgs, TenantsCommand,
};
use crate::crypto::Keyring;
use crate::embedded::EmbeddedPostgres;
use crate::provision::{CreateTenant, ProvisionConfig, ProvisionError, Provisioner, DEFAULT_PLAN};
use crate::registry::{Registry, TenantStatus};
use crate::router::{RouterConfig, TenantRouter};

/// How long shutdown waits for in-flight requests and background tasks.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(30);

/// A command failed: how to exit, after saying why.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Usage(String),
    #[error("failed to {0:#}")]
    Failed(#[from] anyhow::Error),
}

impl From<sqlx::Error> for CliError {
    fn from(e: sqlx::Error) -> Self {
        Self::Failed(anyhow::Error::new(e).context("query the control database"))
    }
}

impl From<crate::backup::BackupError> for CliError {
    fn from(e: crate::backup::BackupError) -> Self {
        use crate::backup::BackupError as B;
        match e {
            B::Internal(e) => Self::Failed(e),
            B::NotConfigured | B::NotFound(_) | B::Invalid(_) => Self::Usage(e.to_string()),
            other => Self::Failed(anyhow::anyhow!("{other}")),
        }
    }
}

impl From<ProvisionError> for CliError {
    fn from(e: ProvisionError) -> Self {
        match e {
            ProvisionError::Internal(e) => Self::Failed(e),
            other => Self::Usage(other.to_string()),
        }
    }
}

pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Dev(args) => dev(args).await,
        Command::Migrate(cmd) => migrate(cmd).await,
        Command::Tenants(cmd) => tenants(cmd).await,
        Command::Backup(cmd) => backup(cmd).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            match e {
                CliError::Config(_) | CliError::Usage(_) => ExitCode::from(2),
                CliError::Failed(_) => ExitCode::from(1),
            }
        }
    }
}

/// Connect to the control DB, apply its migrations, and build a provisioner.
async fn connect(
    control: &ControlArgs,
    server: Option<&ServerArgs>,
) -> Result<Provisioner, CliError> {
    let url = control.database_url()?;
    let keyring = control.keyring()?;
    let registry = Registry::connect_lazy(url)?;
    registry
        .migrate()
        .await
        .context("apply control database migrations")?;
    let config = ProvisionConfig {
        warm_pool_size: server.map_or(0, |s| s.warm_pool_size),
    };
    let migrator =
        crate::migrate::load_tenant_migrator(control.tenant_migrations.as_deref()).await?;
    let provisioner = Provisioner::new(registry, keyring, config).with_migrator(migrator);
    if let Some(storage) = crate::backup::Storage::from_args(&control.storage)
        .await
        .context("set up backup storage")?
    {
        provisioner.set_storage(storage);
    }
    let tenant_server = control
        .tenant_server_url
        .as_ref()
        .map_or(url, Secret::expose);
    provisioner.ensure_default_server(tenant_server).await?;
    Ok(provisioner)
}

async fn serve(args: crate::config::ServeArgs) -> Result<(), CliError> {
    // Refuse insecure configuration before touching anything.
    let token = check_admin_token(args.admin_token.as_ref())?.to_owned();
    args.control.keyring()?;
    args.control.database_url()?;
    let provisioner = connect(&args.control, Some(&args.server)).await?;
    run_server(
        provisioner,
        Secret::new(token),
        &args.server,
        shutdown_signal(),
        |addr| {
            tracing::info!(%addr, "silo serving");
        },
    )
    .await
}

/// Serve the API and run background jobs until `shutdown` resolves.
pub async fn run_server(
    provisioner: Provisioner,
    admin_token: Secret,
    args: &ServerArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_listen: impl FnOnce(std::net::SocketAddr),
) -> Result<(), CliError> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    on_listen(listener.local_addr().context("read listen address")?);
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    crate::jobs::spawn(
        &provisioner,
        Duration::from_secs(args.reconcile_interval.max(1)),
        Duration::from_secs(args.scheduler_tick.max(1)),
        Duration::from_secs(args.health_interval.max(1)),
        &token,
        &tracker,
    );
    let router = TenantRouter::new(
        provisioner.registry().clone(),
        provisioner.keyring().clone(),
        RouterConfig {
            replicas: args.replicas,
            ..RouterConfig::default()
        },
    );
    router.spawn_maintenance(&token, &tracker);
    let state = AppState {
        provisioner: provisioner.clone(),
        router,
        admin_token: Arc::new(admin_token),
        metrics: crate::telemetry::metrics_handle(),
        app_domain: args.app_domain.as_deref().map(Arc::from),
    };
    let stop = token.clone();
    axum::serve(listener, app(state))
        .with_graceful_shutdown(async move {
            shutdown.await;
            stop.cancel();
        })
        .await
        .context("serve HTTP")?;
    token.cancel();
    tracker.close();
    provisioner.tasks().close();
    let drained = async {
        tracker.wait().await;
        provisioner.tasks().wait().await;
    };
    if tokio::time::timeout(SHUTDOWN_DEADLINE, drained)
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not stop within the shutdown deadline");
    }
    tracing::info!("silo stopped");
    Ok(())
}

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

/// Demo clinics `silo dev` creates on first start.
const DEMO_CLINICS: [(&str, &str); 2] = [
    ("demo-north", "North Family Clinic"),
    ("demo-south", "South Dental Care"),
];

async fn dev(args: DevArgs) -> Result<(), CliError> {
    let dir = args.dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let dir = dir.canonicalize().context("resolve the dev directory")?;
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
    let control = ControlArgs {
        database_url: Some(Secret::new(pg.url("silo_control"))),
        master_key: Some(Secret::new(master_key)),
        tenant_server_url: Some(Secret::new(pg.url("postgres"))),
        tenant_migrations: None,
        storage: crate::config::StorageArgs::default(),
    };
    let provisioner = connect(&control, Some(&args.server)).await?;
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
    provisioner.set_storage(storage);
    for (slug, name) in DEMO_CLINICS {
        if provisioner.registry().find_tenant(slug).await?.is_none() {
            let req = CreateTenant {
                slug: slug.into(),
                name: name.into(),
                plan: DEFAULT_PLAN.into(),
                server: None,
            };
            provisioner.create(&req, None, "silo-dev").await?;
        }
    }
    let demo = provisioner
        .registry()
        .find_tenant(DEMO_CLINICS[0].0)
        .await?
        .context("find the demo clinic")?;
    let (demo_token, _) = crate::tokens::mint(
        provisioner.keyring(),
        demo.id,
        crate::tokens::MAX_TTL_SECONDS,
    );
    let banner = |addr: std::net::SocketAddr| {
        println!("silo dev is running (Ctrl-C stops it)");
        println!("  admin API:    http://{addr}/admin/v1/tenants");
        println!("  API docs:     http://{addr}/docs");
        println!("  metrics:      http://{addr}/metrics");
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
    };
    run_server(
        provisioner,
        Secret::new(admin_token.clone()),
        &args.server,
        shutdown_signal(),
        banner,
    )
    .await
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
    let mut conn = crate::provision::servers::admin_options(admin_url)?
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

async fn migrate(cmd: MigrateCommand) -> Result<(), CliError> {
    match cmd {
        MigrateCommand::Control { control } => {
            let registry = Registry::connect_lazy(control.database_url()?)?;
            registry
                .migrate()
                .await
                .context("apply control database migrations")?;
            println!("control database is at the latest migration");
            Ok(())
        }
        MigrateCommand::Tenants {
            control,
            concurrency,
            tenant,
            dry_run,
            status,
        } => {
            if concurrency == Some(0) {
                return Err(CliError::Usage("--concurrency must be at least 1".into()));
            }
            let provisioner = connect(&control, None).await?;
            if status {
                return migration_status(&provisioner).await;
            }
            let options = crate::migrate::FleetOptions {
                concurrency,
                tenant,
                dry_run,
            };
            let run = provisioner
                .start_fleet_migration(options, "cli")
                .await
                .map_err(|e| match e {
                    crate::migrate::FleetStartError::Internal(e) => CliError::Failed(e),
                    other => CliError::Usage(other.to_string()),
                })?;
            println!(
                "migrating tenants to version {} (operation {})",
                provisioner.latest_version(),
                run.operation.id
            );
            let progress = FleetProgressView::new();
            let report = run
                .run(&provisioner, |result, counts| {
                    let failed =
                        matches!(result.outcome, crate::migrate::TenantOutcome::Failed { .. });
                    progress.update(&result.slug, failed, counts)
                })
                .await?;
            progress.finish();
            if dry_run {
                for slug in &report.pending {
                    println!("  would migrate: {slug}");
                }
                println!("{} tenant(s) would be migrated", report.would_migrate);
                return Ok(());
            }
            println!(
                "{} migrated, {} failed, in {:.1}s",
                report.migrated,
                report.failed.len(),
                report.seconds
            );
            for f in &report.failed {
                if let crate::migrate::TenantOutcome::Failed { error } = &f.outcome {
                    println!("  {}: {error}", f.slug);
                }
            }
            if !report.failed.is_empty() {
                return Err(CliError::Failed(anyhow::anyhow!(
                    "migrate {} tenant(s); re-run to retry only those",
                    report.failed.len()
                )));
            }
            Ok(())
        }
    }
}

/// `silo migrate tenants --status`: tenants per schema version, and who is behind.
async fn migration_status(p: &Provisioner) -> Result<(), CliError> {
    let latest = p.latest_version();
    println!("latest tenant schema version: {latest}");
    for (version, count) in p.registry().schema_versions().await? {
        let v = version.map_or("unknown".to_owned(), |v| v.to_string());
        let mark = if version == Some(latest) {
            ""
        } else {
            "  (behind)"
        };
        println!("  version {v}: {count} tenant(s){mark}");
    }
    let behind = p.registry().tenants_behind(latest, None).await?;
    for t in behind.iter().take(50) {
        println!("  behind: {} at {:?}", t.slug, t.schema_version);
    }
    if behind.len() > 50 {
        println!("  ... and {} more", behind.len() - 50);
    }
    Ok(())
}

/// A progress bar on a terminal; plain log lines otherwise (CI, pipes).
struct FleetProgressView {
    bar: Option<indicatif::ProgressBar>,
}

impl FleetProgressView {
    fn new() -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} tenants, {msg} [{elapsed}, {per_sec}]",
                )
                .expect("valid template"),
            );
            bar
        });
        Self { bar }
    }

    /// One tenant done (`failed` or not); `counts` so far.
    fn update(&self, slug: &str, failed: bool, counts: crate::migrate::FleetProgress) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(counts.total as u64);
                bar.set_position(counts.done as u64);
                bar.set_message(format!("{} failed, {} left", counts.failed, counts.left));
                if failed {
                    bar.println(format!("{slug}: failed"));
                }
            }
            None => {
                if failed || counts.done % 50 == 0 || counts.left == 0 {
                    eprintln!(
                        "{} done, {} failed, {} left{}",
                        counts.done,
                        counts.failed,
                        counts.left,
                        if failed {
                            format!(" ({slug} failed)")
                        } else {
                            String::new()
                        }
                    );
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

async fn tenants(cmd: TenantsCommand) -> Result<(), CliError> {
    match cmd {
        TenantsCommand::Create {
            control,
            slug,
            name,
            plan,
            server,
        } => {
            crate::api::validate_slug(&slug).map_err(|e| CliError::Usage(e.to_string()))?;
            let p = connect(&control, None).await?;
            let req = CreateTenant {
                slug,
                name,
                plan: plan.unwrap_or_else(|| DEFAULT_PLAN.into()),
                server,
            };
            let t = p.create(&req, None, "cli").await?;
            print_json(&t.view());
        }
        TenantsCommand::List { control, status } => {
            let status = status
                .map(|s| {
                    TenantStatus::parse(&s)
                        .ok_or_else(|| CliError::Usage(format!("unknown status '{s}'")))
                })
                .transpose()?;
            let p = connect(&control, None).await?;
            let mut after = None;
            loop {
                let page = p
                    .registry()
                    .list_tenants(status, after, 500)
                    .await
                    .context("list tenants")?;
                for t in &page {
                    println!(
                        "{}\t{}\t{}\t{}",
                        t.slug,
                        t.status.as_str(),
                        t.server_name,
                        t.name
                    );
                }
                match page.last() {
                    Some(last) if page.len() == 500 => after = Some(last.id),
                    _ => break,
                }
            }
        }
        TenantsCommand::Show { control, tenant } => {
            let p = connect(&control, None).await?;
            print_json(&find(&p, &tenant).await?.view());
        }
        TenantsCommand::Suspend { control, tenant } => {
            let p = connect(&control, None).await?;
            let t = find(&p, &tenant).await?;
            print_json(&p.suspend(t.id, "cli").await?.view());
        }
        TenantsCommand::Resume { control, tenant } => {
            let p = connect(&control, None).await?;
            let t = find(&p, &tenant).await?;
            print_json(&p.resume(t.id, "cli").await?.view());
        }
        TenantsCommand::Archive { control, tenant } => {
            let p = connect(&control, None).await?;
            let t = find(&p, &tenant).await?;
            let op = p.start_archive(t.id, "cli").await?;
            eprintln!(
                "archiving {} (operation {}): final backup, verify, drop",
                t.slug, op.id
            );
            finished(&p, op.id, "archive tenant").await?;
            print_json(
                &p.registry()
                    .tenant(t.id)
                    .await?
                    .context("read tenant")?
                    .view(),
            );
        }
        TenantsCommand::Move {
            control,
            tenant,
            to,
        } => {
            let p = connect(&control, None).await?;
            let t = find(&p, &tenant).await?;
            let op = p.start_move(t.id, &to, "cli").await?;
            eprintln!(
                "moving {} to {to} (operation {}): copy, cut-over, drop the source",
                t.slug, op.id
            );
            let op = finished(&p, op.id, "move tenant").await?;
            print_json(&op.result);
        }
        TenantsCommand::Restore {
            control,
            tenant,
            backup,
        } => {
            let p = connect(&control, None).await?;
            let t = find(&p, &tenant).await?;
            let b = match backup {
                Some(id) => id,
                None => {
                    p.registry()
                        .latest_good_backup(t.id)
                        .await?
                        .ok_or_else(|| {
                            CliError::Usage(format!("tenant '{tenant}' has no succeeded backup"))
                        })?
                        .id
                }
            };
            let t = restore_with_progress(&p, b, crate::backup::RestoreTarget::InPlace).await?;
            print_json(&t.view());
        }
        TenantsCommand::Delete { control, tenant } => {
            let p = connect(&control, None).await?;
            let t = find(&p, &tenant).await?;
            p.start_delete(t.id, "cli").await?;
            p.tasks().close();
            p.tasks().wait().await;
            let t = p
                .registry()
                .tenant(t.id)
                .await
                .context("read tenant")?
                .context("read tenant")?;
            if t.status != TenantStatus::Deleted {
                return Err(CliError::Failed(anyhow::anyhow!(
                    "delete tenant: {}",
                    t.last_error.unwrap_or_else(|| "unknown error".into())
                )));
            }
            print_json(&t.view());
        }
    }
    Ok(())
}

async fn find(p: &Provisioner, tenant: &str) -> Result<crate::registry::TenantRecord, CliError> {
    p.registry()
        .find_tenant(tenant)
        .await
        .context("look up tenant")?
        .ok_or_else(|| CliError::Usage(format!("no tenant '{tenant}'")))
}

/// Wait for this process's background work, then the operation's outcome:
/// an error becomes exit code 1, named by `what`.
async fn finished(
    p: &Provisioner,
    op: uuid::Uuid,
    what: &str,
) -> Result<crate::registry::Operation, CliError> {
    p.tasks().close();
    p.tasks().wait().await;
    let op = p
        .registry()
        .operation(op)
        .await?
        .context("read the operation")?;
    match &op.error {
        Some(error) => Err(CliError::Failed(anyhow::anyhow!("{what}: {error}"))),
        None => Ok(op),
    }
}

fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

async fn backup(cmd: BackupCommand) -> Result<(), CliError> {
    use crate::backup::{BackupKind, RestoreTarget};
    match cmd {
        BackupCommand::Run {
            control,
            tenant: Some(tenant),
            ..
        } => {
            let p = connect(&control, None).await?;
            p.storage_or_err()?;
            let t = find(&p, &tenant).await?;
            let bar = bytes_bar(None, &format!("backing up {}", t.slug));
            let progress = bar.clone().map(|bar| {
                std::sync::Arc::new(move |n: u64| bar.set_position(n)) as crate::backup::Progress
            });
            let b = p.backup_now(t.id, BackupKind::Manual, progress).await;
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            let b = b?;
            p.prune_backups(t.id).await?;
            print_json(&b);
        }
        BackupCommand::Run { control, .. } => {
            let p = connect(&control, None).await?;
            let storage = p.storage_or_err()?;
            let tenants = p.registry().schedulable_tenants().await?;
            let view = FleetProgressView::new();
            let total = tenants.len();
            let sem =
                std::sync::Arc::new(tokio::sync::Semaphore::new(storage.settings.concurrency));
            let mut set = tokio::task::JoinSet::new();
            for t in tenants {
                let permit = sem.clone().acquire_owned().await.expect("semaphore open");
                let p = p.clone();
                set.spawn(async move {
                    let _permit = permit;
                    let outcome = p.backup_now(t.id, BackupKind::Manual, None).await;
                    if outcome.is_ok() {
                        p.prune_backups(t.id).await.ok();
                    }
                    (t.slug, outcome)
                });
            }
            let (mut done, mut failed) = (0, Vec::new());
            while let Some(joined) = set.join_next().await {
                let (slug, outcome) = joined.context("join a backup task")?;
                done += 1;
                let ok = outcome.is_ok();
                if let Err(e) = outcome {
                    failed.push(format!("{slug}: {e}"));
                }
                view.update(
                    &slug,
                    !ok,
                    crate::migrate::FleetProgress {
                        total,
                        done,
                        failed: failed.len(),
                        left: total - done,
                    },
                );
            }
            view.finish();
            println!("{} backed up, {} failed", done - failed.len(), failed.len());
            for f in &failed {
                println!("  {f}");
            }
            if !failed.is_empty() {
                return Err(CliError::Failed(anyhow::anyhow!(
                    "back up {} tenant(s)",
                    failed.len()
                )));
            }
        }
        BackupCommand::List { control, tenant } => {
            let p = connect(&control, None).await?;
            let tenants = match tenant {
                Some(t) => vec![find(&p, &t).await?],
                None => p
                    .registry()
                    .list_tenants(None, None, 10_000)
                    .await
                    .context("list tenants")?,
            };
            for t in tenants {
                for b in p.registry().backups_of(t.id, None, 1000).await? {
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}",
                        b.id,
                        t.slug,
                        b.kind,
                        b.status,
                        b.started_at.format("%Y-%m-%d %H:%M:%S"),
                        b.size_bytes.map_or("-".into(), |s| s.to_string())
                    );
                }
            }
        }
        BackupCommand::Verify { control, id } => {
            let p = connect(&control, None).await?;
            p.storage_or_err()?;
            let size = p.registry().backup(id).await?.and_then(|b| b.size_bytes);
            let bar = bytes_bar(size, "verifying");
            let progress = bar.clone().map(|bar| {
                std::sync::Arc::new(move |n: u64| bar.set_position(n)) as crate::backup::Progress
            });
            let report = p.verify_backup(id, progress).await;
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            let report = report?;
            print_json(&report);
            if !report.ok {
                return Err(CliError::Failed(anyhow::anyhow!(
                    "verify backup {id}: {}",
                    report.mismatches.join("; ")
                )));
            }
        }
        BackupCommand::Restore { control, id, into } => {
            let p = connect(&control, None).await?;
            if let Some(slug) = &into {
                crate::api::validate_slug(slug).map_err(|e| CliError::Usage(e.to_string()))?;
            }
            let target = into.map_or(RestoreTarget::InPlace, RestoreTarget::IntoSlug);
            let t = restore_with_progress(&p, id, target).await?;
            print_json(&t.view());
        }
    }
    Ok(())
}

async fn restore_with_progress(
    p: &Provisioner,
    backup: uuid::Uuid,
    target: crate::backup::RestoreTarget,
) -> Result<crate::registry::TenantRecord, CliError> {
    p.storage_or_err()?;
    let size = p
        .registry()
        .backup(backup)
        .await?
        .and_then(|b| b.size_bytes);
    let bar = bytes_bar(size, "restoring");
    let progress = bar.clone().map(|bar| {
        std::sync::Arc::new(move |n: u64| bar.set_position(n)) as crate::backup::Progress
    });
    let t = p.restore_backup(backup, target, "cli", progress).await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    Ok(t?)
}

/// A bytes progress bar on a terminal (`None` off a terminal).
fn bytes_bar(total: Option<i64>, what: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        eprintln!("{what}...");
        return None;
    }
    let bar = match total {
        Some(n) => indicatif::ProgressBar::new(n.max(0) as u64),
        None => indicatif::ProgressBar::new_spinner(),
    };
    let template = if total.is_some() {
        "{msg} {bar:40} {bytes}/{total_bytes} [{elapsed}, {bytes_per_sec}]"
    } else {
        "{spinner} {msg} {bytes} [{elapsed}, {bytes_per_sec}]"
    };
    bar.set_style(indicatif::ProgressStyle::with_template(template).expect("valid template"));
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    Some(bar)
}
