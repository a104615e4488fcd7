//! `silo keys`: named admin keys from a shell. Needs only
//! `SILO_DATABASE_URL` (no master key: a key's token is hashed, not
//! sealed), so the first key of a fresh install can be made before any
//! `silo serve` runs. Audited as `cli`.

use anyhow::Context;

use super::{print_json, CliError};
use crate::config::{KeysCommand, Secret};
use crate::crypto::AdminKeyToken;
use crate::registry::{KeyExpiry, Registry, LIVE_KEY_NAME_INDEX};

/// The audit log's actor of what these commands do.
const ACTOR: &str = "cli";

pub(super) async fn keys(cmd: KeysCommand) -> Result<(), CliError> {
    let database_url = Secret::required("SILO_DATABASE_URL")?;
    let registry = Registry::connect_lazy(database_url.expose())?;
    registry
        .migrate()
        .await
        .context("apply control database migrations")?;
    match cmd {
        KeysCommand::Create {
            name,
            role,
            expires_in_days,
        } => {
            let issued = AdminKeyToken::generate();
            let key = registry
                .create_admin_key(name.as_str(), role, &issued.hash, expires_in_days, ACTOR)
                .await
                .map_err(|e| {
                    if e.is_unique_violation(LIVE_KEY_NAME_INDEX) {
                        CliError::Usage(format!(
                            "a live admin key is named '{name}'; revoke it first or pick another name"
                        ))
                    } else {
                        CliError::Failed(anyhow::Error::from(e).context("create the admin key"))
                    }
                })?;
            print_json(&serde_json::json!({
                "id": key.id,
                "name": key.name,
                "role": key.role,
                "created_at": key.created_at,
                "created_by": key.created_by,
                "last_used_at": key.last_used_at,
                "expires_at": key.expires_at,
                "token": issued.token,
            }));
            eprintln!(
                "the token is shown only now (silo keeps a SHA-256 of it): use it as \
                 `Authorization: Bearer <token>` on /admin/v1"
            );
        }
        KeysCommand::List => {
            let keys = registry.admin_keys().await.context("list admin keys")?;
            let now = chrono::Utc::now();
            for k in &keys {
                let last = k.last_used_at.map_or("-".to_owned(), |t| t.to_rfc3339());
                let expires = match k.expires_at {
                    None => "-".to_owned(),
                    Some(t) if t <= now => format!("expired {}", t.to_rfc3339()),
                    Some(t) => t.to_rfc3339(),
                };
                println!(
                    "{}\t{}\t{}\t{}\t{last}\t{expires}",
                    k.name,
                    k.role,
                    k.created_at.to_rfc3339(),
                    k.created_by
                );
            }
        }
        KeysCommand::Expire { name, in_days, .. } => {
            match registry
                .set_admin_key_expiry(name.as_str(), in_days, ACTOR)
                .await
                .context("change the admin key's expiry")?
            {
                KeyExpiry::Set(key) => match key.expires_at {
                    Some(t) => println!("admin key {name} expires {}", t.to_rfc3339()),
                    None => println!("admin key {name} does not expire"),
                },
                KeyExpiry::NoSuchKey => {
                    return Err(CliError::Usage(format!("no live admin key is named '{name}'")))
                }
                KeyExpiry::Expired => {
                    return Err(CliError::Usage(format!(
                        "admin key '{name}' has expired and stays refused: make a new key (and revoke this one to free its name)"
                    )))
                }
            }
        }
        KeysCommand::Revoke { name } => {
            registry
                .revoke_admin_key(name.as_str(), ACTOR)
                .await
                .context("revoke the admin key")?
                .ok_or_else(|| CliError::Usage(format!("no live admin key is named '{name}'")))?;
            println!("revoked admin key {name}");
        }
    }
    Ok(())
}
