//! `silo tenants`: the admin operations on tenants from a shell.

use anyhow::Context;

use super::progress::bytes_bar;
use super::{connect, find, finished, print_json, CliError};
use crate::backup::{Progress, RestoreTarget};
use crate::config::TenantsCommand;
use crate::control::ControlPlane;
use crate::provision::CreateTenant;
use crate::registry::{TenantRecord, TenantStatus};

pub(super) async fn tenants(cmd: TenantsCommand) -> Result<(), CliError> {
    match cmd {
        TenantsCommand::Create {
            control,
            slug,
            name,
            plan,
            server,
        } => {
            let p = connect(&control, 0).await?;
            let req = CreateTenant {
                slug,
                name,
                plan: plan.unwrap_or_else(crate::domain::Plan::default_plan),
                server,
            };
            let t = p.provisioner().create(&req, None, "cli").await?;
            print_json(&t.view());
        }
        TenantsCommand::List { control, status } => {
            let status = status
                .map(|s| {
                    TenantStatus::parse(&s)
                        .ok_or_else(|| CliError::Usage(format!("unknown status '{s}'")))
                })
                .transpose()?;
            let p = connect(&control, 0).await?;
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
            let p = connect(&control, 0).await?;
            print_json(&find(&p, &tenant).await?.view());
        }
        TenantsCommand::Suspend { control, tenant } => {
            let p = connect(&control, 0).await?;
            let t = find(&p, &tenant).await?;
            print_json(&p.provisioner().suspend(t.id, "cli").await?.view());
        }
        TenantsCommand::Resume { control, tenant } => {
            let p = connect(&control, 0).await?;
            let t = find(&p, &tenant).await?;
            print_json(&p.provisioner().resume(t.id, "cli").await?.view());
        }
        TenantsCommand::Archive { control, tenant } => {
            let p = connect(&control, 0).await?;
            let t = find(&p, &tenant).await?;
            let op = p.backups()?.start_archive(t.id, "cli").await?;
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
            let p = connect(&control, 0).await?;
            let t = find(&p, &tenant).await?;
            let op = p.mover().start_move(t.id, to.as_str(), "cli").await?;
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
            overwrite,
        } => {
            let p = connect(&control, 0).await?;
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
            let t = restore_with_progress(&p, b, RestoreTarget::InPlace, overwrite).await?;
            print_json(&t.view());
        }
        TenantsCommand::Delete { control, tenant } => {
            let p = connect(&control, 0).await?;
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

/// Restore with a byte counter on a terminal. It runs as an operation
/// (as the admin API's restore does), so a restore whose process is killed
/// is settled by any silo's sweep, and shows in `GET /admin/v1/operations`.
pub(super) async fn restore_with_progress(
    p: &ControlPlane,
    backup: uuid::Uuid,
    target: RestoreTarget,
    overwrite: bool,
) -> Result<TenantRecord, CliError> {
    p.backups()?;
    let size = p
        .registry()
        .backup(backup)
        .await?
        .and_then(|b| b.size_bytes);
    let bar = bytes_bar(size, "restoring");
    let progress = bar
        .clone()
        .map(|bar| std::sync::Arc::new(move |n: u64| bar.set_position(n)) as Progress);
    let ended = match p
        .start_restore(backup, target, overwrite, "cli", progress)
        .await
    {
        Ok(op) => p.wait_operation(op.id).await,
        Err(e) => Err(e),
    };
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let op = ended?;
    let restored = op
        .result
        .as_ref()
        .and_then(|r| r["tenant_id"].as_str())
        .and_then(|id| uuid::Uuid::parse_str(id).ok());
    match (op.status, restored) {
        (crate::registry::OperationStatus::Succeeded, Some(id)) => p
            .registry()
            .tenant(id)
            .await?
            .ok_or_else(|| CliError::Failed(anyhow::anyhow!("find the restored tenant {id}"))),
        _ => Err(CliError::Failed(anyhow::anyhow!(
            "restore backup {backup} (operation {}): {}",
            op.id,
            op.error.as_deref().unwrap_or("it did not finish")
        ))),
    }
}
