//! A tenant's reader role where a move or a restore makes the tenant's
//! role and database anew (see `provision::readers` for what it is).

use anyhow::Context;

use super::{schema, ServerAdmin};
use crate::crypto::Keyring;
use crate::registry::{reader_aad, TenantRecord};

/// The reader password of `t`, if it has a reader.
pub fn reader_password(keyring: &Keyring, t: &TenantRecord) -> anyhow::Result<Option<String>> {
    match (&t.reader_password_enc, &t.reader_key_id) {
        (Some(sealed), Some(key_id)) => Ok(Some(
            keyring
                .open_string(key_id, sealed, &reader_aad(t.id))
                .context("open the reader password")?,
        )),
        _ => Ok(None),
    }
}

/// Where a move or a restore has just made `t`'s role and database (on the
/// server of `admin`, database `database`): its reader too, if it has one.
pub async fn follow_reader(
    keyring: &Keyring,
    admin: &ServerAdmin,
    t: &TenantRecord,
    database: &str,
) -> anyhow::Result<()> {
    if let Some(password) = reader_password(keyring, t)? {
        schema::ensure_reader(
            admin,
            database,
            &t.role_name,
            &password,
            t.limits.connection_limit,
        )
        .await
        .context("make the tenant's reader role")?;
    }
    Ok(())
}
