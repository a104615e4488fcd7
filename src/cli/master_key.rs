//! `silo master-key rotate`: re-seal every stored secret under
//! `SILO_MASTER_KEY`, opening what an older key sealed with
//! `SILO_MASTER_KEY_PREVIOUS`. A thin shell over [`crate::rekey`].

use anyhow::Context;

use super::CliError;
use crate::config::{MasterKeyCommand, Secret};
use crate::crypto::Keyring;
use crate::registry::Registry;
use crate::rekey::{self, KeyCount, Options};

/// Failures listed one per line; the rest are counted.
const LISTED_FAILURES: usize = 20;

pub(super) async fn master_key(cmd: MasterKeyCommand) -> Result<(), CliError> {
    match cmd {
        MasterKeyCommand::Rotate { check, batch_size } => {
            let database_url = Secret::required("SILO_DATABASE_URL")?;
            let keyring = crate::config::master_keyring()?;
            let registry = Registry::connect_lazy(database_url.expose())?;
            registry
                .migrate()
                .await
                .context("apply control database migrations")?;
            if check {
                self::check(&registry, &keyring).await
            } else {
                rotate(&registry, &keyring, batch_size).await
            }
        }
    }
}

/// What each key id is to this keyring.
fn role(keyring: &Keyring, key_id: Option<&str>) -> &'static str {
    match key_id {
        Some(k) if k == keyring.key_id() => "current",
        Some(k) if Some(k) == keyring.previous_key_id() => "previous",
        _ => "unknown",
    }
}

fn not_current<'a>(keyring: &Keyring, counts: &'a [KeyCount]) -> Vec<&'a KeyCount> {
    counts
        .iter()
        .filter(|c| c.key_id.as_deref() != Some(keyring.key_id()))
        .collect()
}

/// Count stored secrets per key id; exit 1 if any is not under the current key.
async fn check(registry: &Registry, keyring: &Keyring) -> Result<(), CliError> {
    let counts = rekey::census(registry).await?;
    for c in &counts {
        println!(
            "{}\t{}\t{}\t{}",
            c.column,
            c.key_id.as_deref().unwrap_or("-"),
            c.rows,
            role(keyring, c.key_id.as_deref())
        );
    }
    let left: i64 = not_current(keyring, &counts).iter().map(|c| c.rows).sum();
    let total: i64 = counts.iter().map(|c| c.rows).sum();
    println!(
        "{} stored secrets, {} under the current key {}, {left} under other keys",
        total,
        total - left,
        keyring.key_id()
    );
    if left > 0 {
        return Err(CliError::Failed(anyhow::anyhow!(
            "check the master key: {left} stored secrets are not under SILO_MASTER_KEY yet; run `silo master-key rotate` with SILO_MASTER_KEY_PREVIOUS set to the old key"
        )));
    }
    Ok(())
}

async fn rotate(registry: &Registry, keyring: &Keyring, batch_size: u32) -> Result<(), CliError> {
    // Without the old key nothing pending can be opened: say so up front.
    if keyring.previous_key_id().is_none() {
        let counts = rekey::census(registry).await?;
        let others = not_current(keyring, &counts);
        if !others.is_empty() {
            let rows: i64 = others.iter().map(|c| c.rows).sum();
            let mut ids: Vec<&str> = others
                .iter()
                .map(|c| c.key_id.as_deref().unwrap_or("-"))
                .collect();
            ids.sort_unstable();
            ids.dedup();
            return Err(CliError::Usage(format!(
                "{rows} stored secrets are sealed under master key id(s) {}, and SILO_MASTER_KEY_PREVIOUS is not set: set it to the key being rotated away from (SILO_MASTER_KEY is the new key, id {})",
                ids.join(", "),
                keyring.key_id()
            )));
        }
    }
    eprintln!(
        "re-sealing stored secrets under master key {}{}",
        keyring.key_id(),
        keyring
            .previous_key_id()
            .map(|p| format!(" (opening those under {p})"))
            .unwrap_or_default()
    );
    let report = rekey::rotate(registry, keyring, Options { batch_size }, |p| {
        eprintln!(
            "{}: {} of {} re-sealed, {} failed",
            p.column, p.resealed, p.to_do, p.failed
        );
    })
    .await?;
    println!(
        "{} re-sealed, {} already current, {} failed",
        report.resealed,
        report.already_current,
        report.failed.len()
    );
    if report.changed_meanwhile > 0 {
        println!(
            "{} changed by another process while being re-sealed (looked at again)",
            report.changed_meanwhile
        );
    }
    for f in report.failed.iter().take(LISTED_FAILURES) {
        println!("  {} id {}: {}", f.column, f.id, f.reason);
    }
    if report.failed.len() > LISTED_FAILURES {
        println!("  ... and {} more", report.failed.len() - LISTED_FAILURES);
    }
    let left = report.remaining_rows();
    for c in &report.remaining {
        println!(
            "still under key {}: {} of {}",
            c.key_id.as_deref().unwrap_or("-"),
            c.rows,
            c.column
        );
    }
    if !report.failed.is_empty() || left > 0 {
        return Err(CliError::Failed(anyhow::anyhow!(
            "re-seal every stored secret: {} could not be opened, {left} remain under other keys; fix or restore the named rows, then run again",
            report.failed.len()
        )));
    }
    println!(
        "every stored secret is under master key {}; SILO_MASTER_KEY_PREVIOUS may be removed once no token signed with it is needed (tokens live at most 7 days)",
        keyring.key_id()
    );
    Ok(())
}
