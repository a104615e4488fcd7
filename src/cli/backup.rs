//! `silo backup`: backups from a shell, with progress.

use anyhow::Context;

use super::progress::{bytes_bar, FleetProgressView};
use super::tenants::restore_with_progress;
use super::{connect, find, print_json, CliError};
use crate::config::BackupCommand;

pub(super) async fn backup(cmd: BackupCommand) -> Result<(), CliError> {
    use crate::backup::{BackupKind, RestoreTarget};
    match cmd {
        BackupCommand::Run {
            control,
            tenant: Some(tenant),
            ..
        } => {
            let c = connect(&control, 0).await?;
            let p = c.backups()?;
            let t = find(&c, &tenant).await?;
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
            let c = connect(&control, 0).await?;
            let p = c.backups()?;
            let tenants = c.registry().schedulable_tenants().await?;
            let view = FleetProgressView::new();
            let total = tenants.len();
            let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(p.settings().concurrency));
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
            let p = connect(&control, 0).await?;
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
            let c = connect(&control, 0).await?;
            let p = c.backups()?;
            let size = c.registry().backup(id).await?.and_then(|b| b.size_bytes);
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
        BackupCommand::Restore {
            control,
            id,
            into,
            overwrite,
        } => {
            let p = connect(&control, 0).await?;
            let target = into.map_or(RestoreTarget::InPlace, RestoreTarget::IntoSlug);
            let t = restore_with_progress(&p, id, target, overwrite).await?;
            print_json(&t.view());
        }
    }
    Ok(())
}
