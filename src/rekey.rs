//! Master-key rotation: every value the control DB holds sealed under an
//! older master key (tenant passwords, server admin URLs, spare passwords,
//! backup data keys: [`SEALED_COLUMNS`]) is opened with the keyring's
//! previous key and sealed again under the current one.
//!
//! What it promises:
//! - the plaintext never changes, so nothing outside the control DB does
//!   (tenant roles, routers' pools, backups in the store);
//! - rows are read in small batches in id order and each is replaced only if
//!   it still holds what was read (compare-and-set on the ciphertext and its
//!   key id), one row per transaction: a run killed anywhere leaves every row
//!   whole and the next run picks up what is left; a replica writing the same
//!   row meanwhile wins, and the row is looked at again;
//! - a row that does not open is reported by table, column and id (never
//!   its value), and the rest go on.

use std::collections::BTreeSet;

use anyhow::Context;
use serde::Serialize;

use crate::crypto::Keyring;
use crate::failpoint;
use crate::registry::{Registry, SealedColumn, SEALED_COLUMNS};

/// Passes over a column while rows changed under the re-seal: a row written
/// meanwhile by a replica still sealing under the old key is tried again.
const MAX_PASSES: usize = 3;

/// How a rotation runs.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Rows read and re-sealed per batch.
    pub batch_size: u32,
}

/// How many values of a column are sealed under one key id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyCount {
    /// `table.column`.
    pub column: String,
    pub key_id: Option<String>,
    pub rows: i64,
}

/// A value that could not be re-sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// `table.column`.
    pub column: String,
    /// The row's id.
    pub id: String,
    pub key_id: Option<String>,
    pub reason: String,
}

/// What a rotation did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The key everything is now sealed under.
    pub key_id: String,
    pub resealed: u64,
    /// Values already under the current key when the run started.
    pub already_current: u64,
    /// Times a row changed between read and write (written by another
    /// process meanwhile); each was looked at again.
    pub changed_meanwhile: u64,
    pub failed: Vec<Failure>,
    /// Values not under the current key after the run (failed ones, or
    /// ones written meanwhile under an old key).
    pub remaining: Vec<KeyCount>,
}

impl Report {
    /// Values still not under the current key.
    pub fn remaining_rows(&self) -> i64 {
        self.remaining.iter().map(|c| c.rows).sum()
    }
}

/// Where a rotation is, after each batch.
#[derive(Debug, Clone)]
pub struct Progress {
    /// `table.column` being re-sealed.
    pub column: String,
    pub resealed: u64,
    pub failed: u64,
    /// Values not under the current key when the run started.
    pub to_do: u64,
}

/// Per column, how many values are sealed under each key id.
pub async fn census(registry: &Registry) -> anyhow::Result<Vec<KeyCount>> {
    let mut out = Vec::new();
    for col in SEALED_COLUMNS {
        let counts = registry
            .sealed_key_ids(col)
            .await
            .with_context(|| format!("count the values of {}", col.name()))?;
        out.extend(counts.into_iter().map(|(key_id, rows)| KeyCount {
            column: col.name(),
            key_id,
            rows,
        }));
    }
    Ok(out)
}

/// Re-seal every value not under `keyring`'s current key, opening it with
/// whichever of its keys sealed it. Errors only when the control DB fails;
/// values that do not open are in the report's `failed`.
pub async fn rotate(
    registry: &Registry,
    keyring: &Keyring,
    options: Options,
    progress: impl Fn(&Progress),
) -> anyhow::Result<Report> {
    let current = keyring.key_id().to_owned();
    let before = census(registry).await?;
    let mut report = Report {
        key_id: current.clone(),
        already_current: before
            .iter()
            .filter(|c| c.key_id.as_deref() == Some(current.as_str()))
            .map(|c| c.rows as u64)
            .sum(),
        ..Report::default()
    };
    let to_do = before
        .iter()
        .filter(|c| c.key_id.as_deref() != Some(current.as_str()))
        .map(|c| c.rows as u64)
        .sum();
    let mut session = registry
        .resealer()
        .await
        .context("open a control database session for re-sealing")?;
    let mut result = Ok(());
    for col in SEALED_COLUMNS {
        result = reseal_column(
            col,
            registry,
            &mut session,
            keyring,
            options,
            &mut report,
            &|r: &Report| {
                progress(&Progress {
                    column: col.name(),
                    resealed: r.resealed,
                    failed: r.failed.len() as u64,
                    to_do,
                })
            },
        )
        .await
        .with_context(|| format!("re-seal {}", col.name()));
        if result.is_err() {
            break;
        }
    }
    session.close().await;
    result?;
    report.remaining = census(registry)
        .await?
        .into_iter()
        .filter(|c| c.key_id.as_deref() != Some(current.as_str()))
        .collect();
    Ok(report)
}

async fn reseal_column(
    col: &SealedColumn,
    registry: &Registry,
    session: &mut crate::registry::Resealer,
    keyring: &Keyring,
    options: Options,
    report: &mut Report,
    progress: &dyn Fn(&Report),
) -> anyhow::Result<()> {
    let current = keyring.key_id();
    let mut failed: BTreeSet<String> = BTreeSet::new();
    for _ in 0..MAX_PASSES {
        let mut after: Option<String> = None;
        let mut changed = 0;
        loop {
            let rows = registry
                .sealed_not_under(
                    col,
                    current,
                    after.as_deref(),
                    i64::from(options.batch_size),
                )
                .await?;
            let Some(last) = rows.last() else { break };
            after = Some(last.id.clone());
            for row in &rows {
                if failed.contains(&row.id) {
                    continue;
                }
                let resealed = match (&row.key_id, col.context(&row.id)) {
                    (None, _) => Err("no key id is recorded next to it".to_owned()),
                    (_, None) => Err("its id is malformed".to_owned()),
                    (Some(key_id), Some(context)) => keyring
                        .reseal(key_id, &row.sealed, &context)
                        .map_err(|e| e.to_string()),
                };
                match resealed {
                    Ok(sealed) => {
                        if session.swap(col, row, &sealed, current).await? {
                            report.resealed += 1;
                        } else {
                            changed += 1;
                        }
                    }
                    Err(reason) => {
                        failed.insert(row.id.clone());
                        report.failed.push(Failure {
                            column: col.name(),
                            id: row.id.clone(),
                            key_id: row.key_id.clone(),
                            reason,
                        });
                    }
                }
            }
            progress(report);
            failpoint::hit("master_key_batch");
        }
        report.changed_meanwhile += changed;
        if changed == 0 {
            break;
        }
    }
    Ok(())
}
