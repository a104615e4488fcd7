//! The `silo` commands, one module each. Each parses its configuration
//! (typed by [`crate::config`]), then calls the control plane.
//! Exit codes: 0 success, 1 operation failed, 2 bad usage or configuration.

mod backup;
mod demo_data;
mod dev;
mod keys;
mod master_key;
mod migrate;
mod plans;
mod progress;
mod tenants;

pub use dev::{ensure_database, DEV_BUCKET};

use std::process::ExitCode;

use anyhow::Context;

use crate::config::{Cli, Command, ConfigError, ControlArgs};
use crate::control::ControlPlane;
use crate::ops;
use crate::registry::{Operation, TenantRecord};
use crate::startup::{Connection, RunSettings};

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

impl From<crate::registry::Error> for CliError {
    fn from(e: crate::registry::Error) -> Self {
        Self::Failed(e.into())
    }
}

impl From<ops::Error> for CliError {
    fn from(e: ops::Error) -> Self {
        use ops::Error as E;
        match e {
            E::Internal(e) => Self::Failed(e),
            // It was tried and did not work: exit 1.
            E::Unavailable(_) => Self::Failed(anyhow::anyhow!("{e}")),
            // Refused: nothing was done; the request must change (exit 2).
            E::NotFound(_) | E::Invalid(_) | E::Conflict(_) | E::Busy { .. } | E::NotConfigured => {
                Self::Usage(e.to_string())
            }
        }
    }
}

pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Dev(args) => dev::dev(args).await,
        Command::Migrate(cmd) => migrate::migrate(cmd).await,
        Command::Tenants(cmd) => tenants::tenants(cmd).await,
        Command::Backup(cmd) => backup::backup(cmd).await,
        Command::MasterKey(cmd) => master_key::master_key(cmd).await,
        Command::Keys(cmd) => keys::keys(cmd).await,
        Command::Plans(cmd) => plans::plans(cmd).await,
        Command::Reconcile { control, adopt } => reconcile(&control, adopt).await,
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

/// The control plane a command works with: control DB migrated, storage
/// and the tenant schema from the configuration, the default server
/// registered on first start.
async fn connect(control: &ControlArgs, warm_pool_size: u32) -> Result<ControlPlane, CliError> {
    let database_url = control.database_url()?;
    let keyring = control.keyring()?;
    let schema = crate::servers::TenantSchema::load(control.tenant_migrations.as_deref()).await?;
    let storage = crate::backup::Storage::from_args(&control.storage)
        .await
        .context("set up backup storage")?;
    let plane = crate::startup::connect(Connection {
        database_url,
        keyring,
        tenant_server_url: control.tenant_server_url()?,
        schema,
        storage,
        warm_pool_size,
        keep_for: crate::domain::KeepFor::days(control.keep_days),
        work_slots: control.storage.backup_concurrency as usize,
        role_settings: crate::servers::RoleSettings::from_mib(control.tenant_temp_file_limit_mb),
    })
    .await?;
    Ok(plane)
}

/// `silo reconcile [--adopt]`: one pass, printed as JSON; exit 1 if it
/// stopped anywhere or could not do something.
async fn reconcile(control: &ControlArgs, adopt: bool) -> Result<(), CliError> {
    let p = connect(control, 0).await?;
    let adopted = if adopt {
        Some(p.adopt("cli").await.context("adopt tenant databases")?)
    } else {
        None
    };
    let report = p.reconcile_once().await.context("run a reconcile pass")?;
    print_json(&serde_json::json!({"adopt": adopted, "reconcile": report}));
    let skipped = adopted.as_ref().is_some_and(|a| !a.skipped.is_empty());
    if !report.errors.is_empty() || !report.halted.is_empty() || skipped {
        return Err(CliError::Failed(anyhow::anyhow!(
            "reconcile: some of it could not be done (see above)"
        )));
    }
    Ok(())
}

async fn serve(args: crate::config::ServeArgs) -> Result<(), CliError> {
    // Refuse insecure configuration before touching anything.
    let token = args.admin_token()?;
    let metrics_token = args.metrics_token()?;
    args.control.keyring()?;
    args.control.database_url()?;
    let control = connect(&args.control, args.server.warm_pool_size).await?;
    crate::startup::serve(
        control,
        RunSettings::from_args(&args.server, token, metrics_token),
        args.server.listen,
        shutdown_signal(),
        |addr, _| tracing::info!(%addr, "silo serving"),
    )
    .await?;
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

/// A tenant by slug or id; exit 2 if there is none.
async fn find(c: &ControlPlane, tenant: &str) -> Result<TenantRecord, CliError> {
    c.registry()
        .find_tenant(tenant)
        .await
        .context("look up tenant")?
        .ok_or_else(|| CliError::Usage(format!("no tenant '{tenant}'")))
}

/// Wait for this process's background work, then the operation's outcome:
/// an error becomes exit code 1, named by `what`.
async fn finished(c: &ControlPlane, op: uuid::Uuid, what: &str) -> Result<Operation, CliError> {
    c.tasks().close();
    c.tasks().wait().await;
    let op = c
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
