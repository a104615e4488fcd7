//! `silo migrate`: the control schema, and fleet migrations of every tenant.

use anyhow::Context;

use super::progress::FleetProgressView;
use super::{connect, CliError};
use crate::config::MigrateCommand;
use crate::control::ControlPlane;
use crate::registry::Registry;

pub(super) async fn migrate(cmd: MigrateCommand) -> Result<(), CliError> {
    match cmd {
        MigrateCommand::Control { control } => {
            let registry = Registry::connect_lazy(control.database_url()?.expose())?;
            registry
                .migrate()
                .await
                .map_err(|e| anyhow::anyhow!(e).context("apply control database migrations"))?;
            registry
                .close_to_public()
                .await
                .context("close the control database to PUBLIC")?;
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
            let c = connect(&control, 0).await?;
            if status {
                return migration_status(&c).await;
            }
            let options = crate::migrate::FleetOptions {
                concurrency,
                tenant,
                dry_run,
            };
            let run = c.fleet().start(options, "cli").await?;
            println!(
                "migrating tenants to version {} (operation {})",
                c.latest_version(),
                run.operation.id
            );
            let progress = FleetProgressView::new();
            let report = c
                .run_fleet(run, |result, counts| {
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
async fn migration_status(p: &ControlPlane) -> Result<(), CliError> {
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
