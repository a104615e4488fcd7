//! Ownership of a tenant server's cluster, written on the cluster itself.
//!
//! A NOLOGIN role [`OWNER_ROLE`] carries, as its comment, the control plane
//! and the server row that own the cluster. Nothing destructive happens on
//! a cluster whose marker names someone else: the same cluster registered
//! twice (another name or host alias), or shared by two control planes,
//! would otherwise see the other's tenants as orphans. A role, because
//! roles are cluster-wide (one marker whatever the database) and need no
//! more than the CREATEROLE silo needs anyway.
//!
//! Tenant databases carry a comment too ([`TenantMark`]): whose they are,
//! and enough of their registry row to register them again if the control
//! DB lost it (restored to an earlier point). Every role of the cluster can
//! read database comments, tenant roles included: only ids are in the
//! clear, the slug, name and plan are sealed with the master key.

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use base64::Engine as _;

use super::{Result, ServerAdmin};
use crate::crypto::Keyring;

/// The marker role on every cluster silo manages.
pub const OWNER_ROLE: &str = "silo_owner";

/// Who owns a cluster: a control plane, as one of its servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub control: Uuid,
    pub server: Uuid,
}

/// A cluster, whatever URL reaches it: its `system_identifier` and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterId {
    pub system_identifier: String,
    pub port: i32,
}

/// What a cluster's marker says, compared with who asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// Marked as this control plane's, as this server.
    Ours,
    /// No marker yet (a server registered before markers, or a crash
    /// between registration and marking).
    Unmarked,
    /// This control plane's, but as another server row: the cluster is
    /// registered twice.
    OtherServer(Uuid),
    /// Another control plane's (a staging and a production silo sharing one cluster).
    OtherControl(Uuid),
    /// A marker silo cannot read: someone else wrote it.
    Unreadable,
}

impl Ownership {
    /// Why silo may not touch the cluster as `server`, if it may not.
    pub fn refusal(&self) -> Option<String> {
        match self {
            Self::Ours | Self::Unmarked => None,
            Self::OtherServer(id) => Some(format!(
                "its cluster is registered already, as server {id}: the same cluster must not be registered twice"
            )),
            Self::OtherControl(id) => Some(format!(
                "its cluster belongs to another silo control plane ({id})"
            )),
            Self::Unreadable => Some(format!(
                "its cluster's ownership marker (role {OWNER_ROLE}) is not silo's"
            )),
        }
    }
}

/// Compare a marker with `expected`.
pub fn judge(marker: Option<Result<Owner, ()>>, expected: Owner) -> Ownership {
    match marker {
        None => Ownership::Unmarked,
        Some(Err(())) => Ownership::Unreadable,
        Some(Ok(o)) if o.control != expected.control => Ownership::OtherControl(o.control),
        Some(Ok(o)) if o.server != expected.server => Ownership::OtherServer(o.server),
        Some(Ok(_)) => Ownership::Ours,
    }
}

/// The cluster `admin` reaches.
pub async fn cluster_id(admin: &ServerAdmin) -> Result<ClusterId> {
    query_cluster(&admin.pool)
        .await
        .map_err(|e| admin.error(None, e))
}

/// The cluster's marker: `None` if there is none, `Some(Err(()))` if it is
/// not one silo wrote.
pub async fn read(admin: &ServerAdmin) -> Result<Option<Result<Owner, ()>>> {
    query_marker(&admin.pool)
        .await
        .map_err(|e| admin.error(None, e))
}

/// The cluster a pool reaches and its marker (for a server not registered yet).
pub async fn identify(db: &PgPool) -> sqlx::Result<(ClusterId, Option<Result<Owner, ()>>)> {
    Ok((query_cluster(db).await?, query_marker(db).await?))
}

async fn query_cluster(db: &PgPool) -> sqlx::Result<ClusterId> {
    let (system_identifier, port): (String, i32) = sqlx::query_as(
        "SELECT system_identifier::text, current_setting('port')::int FROM pg_control_system()",
    )
    .fetch_one(db)
    .await?;
    Ok(ClusterId {
        system_identifier,
        port,
    })
}

async fn query_marker(db: &PgPool) -> sqlx::Result<Option<Result<Owner, ()>>> {
    let comment: Option<Option<String>> = sqlx::query_scalar(
        "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = $1",
    )
    .bind(OWNER_ROLE)
    .fetch_optional(db)
    .await?;
    Ok(comment.map(|c| {
        c.and_then(|c| serde_json::from_str::<Owner>(&c).ok())
            .ok_or(())
    }))
}

/// Whether the cluster is `expected`'s.
pub async fn check(admin: &ServerAdmin, expected: Owner) -> Result<Ownership> {
    Ok(judge(read(admin).await?, expected))
}

/// Mark the cluster as `owner`'s. Creating the role is the claim: of two
/// racing claims one fails (duplicate role) and re-reads the marker.
pub async fn mark(admin: &ServerAdmin, owner: Owner) -> Result<Ownership> {
    let comment = quote_literal(&serde_json::to_string(&owner).expect("owner serializes"));
    let made = admin
        .exec(&format!(
            "CREATE ROLE {OWNER_ROLE} NOLOGIN; COMMENT ON ROLE {OWNER_ROLE} IS {comment}"
        ))
        .await;
    match made {
        Ok(()) => Ok(Ownership::Ours),
        Err(e) if e.is(super::sqlstate::DUPLICATE_OBJECT) => check(admin, owner).await,
        Err(e) => Err(e),
    }
}

/// Mark the cluster as `owner`'s even if the marker names another server of
/// the same control plane (that server row is gone: re-registration).
pub async fn remark(admin: &ServerAdmin, owner: Owner) -> Result<()> {
    let comment = quote_literal(&serde_json::to_string(&owner).expect("owner serializes"));
    admin
        .exec(&format!("COMMENT ON ROLE {OWNER_ROLE} IS {comment}"))
        .await
}

/// What a tenant database's comment says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantMark {
    pub control: Uuid,
    pub tenant: Uuid,
    pub slug: String,
    pub name: String,
    pub plan: String,
}

impl TenantMark {
    /// The mark of tenant `t` of control plane `control`.
    pub fn of(control: Uuid, t: &crate::registry::TenantRecord) -> Self {
        Self {
            control,
            tenant: t.id,
            slug: t.slug.clone(),
            name: t.name.clone(),
            plan: t.plan.as_str().to_owned(),
        }
    }
}

/// A mark as written: ids in the clear, the rest sealed (bound to the
/// tenant's id). Marks written before sealing hold the rest in the clear.
#[derive(Debug, Serialize, Deserialize)]
struct StoredMark {
    control: Uuid,
    tenant: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed: Option<String>,
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    clear: Option<MarkDetails>,
}

#[derive(Debug, Serialize, Deserialize)]
struct MarkDetails {
    slug: String,
    name: String,
    plan: String,
}

/// `COMMENT ON DATABASE` marking `database` as `mark`'s tenant's.
pub fn tenant_mark_sql(database: &str, mark: &TenantMark, keyring: &Keyring) -> String {
    let details = MarkDetails {
        slug: mark.slug.clone(),
        name: mark.name.clone(),
        plan: mark.plan.clone(),
    };
    let plain = serde_json::to_vec(&details).expect("mark serializes");
    let stored = StoredMark {
        control: mark.control,
        tenant: mark.tenant,
        key_id: Some(keyring.key_id().to_owned()),
        sealed: Some(
            base64::engine::general_purpose::STANDARD
                .encode(keyring.seal(&plain, mark.tenant.as_bytes())),
        ),
        clear: None,
    };
    let comment = quote_literal(&serde_json::to_string(&stored).expect("mark serializes"));
    format!("COMMENT ON DATABASE \"{database}\" IS {comment}")
}

/// The comments of `server`'s tenant databases (`silo_t_*`), by database.
pub async fn tenant_comments(
    admin: &ServerAdmin,
) -> Result<std::collections::HashMap<String, Option<String>>> {
    let rows: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT datname::text, shobj_description(oid, 'pg_database')
           FROM pg_database WHERE datname LIKE 'silo\\_t\\_%'",
    )
    .fetch_all(&admin.pool)
    .await
    .map_err(|e| admin.error(None, e))?;
    Ok(rows.into_iter().collect())
}

/// Whether the mark `comment` should be written again as `want`: it is
/// missing, in the clear (written before sealing), names an old slug, name
/// or plan, or is sealed under the key a rotation retires (the keyring's
/// previous one, which `--adopt` could not open once it is gone). A mark
/// this keyring cannot open (sealed by a replica already on a newer key) is
/// left alone, so replicas mid-rotation do not take turns rewriting it.
pub fn mark_needs_refresh(comment: Option<&str>, want: &TenantMark, keyring: &Keyring) -> bool {
    let Some(stored) = comment.and_then(|c| serde_json::from_str::<StoredMark>(c).ok()) else {
        return true;
    };
    let Some(key_id) = stored.key_id.clone() else {
        return true;
    };
    match open_mark(stored, keyring).mark {
        Ok(mark) => mark != *want || keyring.previous_key_id() == Some(key_id.as_str()),
        Err(_) => false,
    }
}

/// A tenant database's mark as read: its ids, and the rest, or why it
/// cannot be read (sealed under a key this keyring does not hold).
pub struct ReadMark {
    pub control: Uuid,
    pub tenant: Uuid,
    pub mark: std::result::Result<TenantMark, String>,
}

/// Read the marks of tenant databases: `(database, mark)`; databases with no
/// mark (made before marks, or by someone else) are left out.
pub async fn tenant_marks(
    admin: &ServerAdmin,
    keyring: &Keyring,
) -> Result<Vec<(String, ReadMark)>> {
    Ok(tenant_comments(admin)
        .await?
        .into_iter()
        .filter_map(|(db, c)| {
            let stored: StoredMark = serde_json::from_str(&c?).ok()?;
            Some((db, open_mark(stored, keyring)))
        })
        .collect())
}

fn open_mark(stored: StoredMark, keyring: &Keyring) -> ReadMark {
    let details = match (stored.clear, &stored.key_id, &stored.sealed) {
        (_, Some(key_id), Some(sealed)) => base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .map_err(|_| "its mark is not valid base64".to_owned())
            .and_then(|bytes| {
                keyring
                    .open(key_id, &bytes, stored.tenant.as_bytes())
                    .map_err(|e| format!("its mark cannot be opened: {e}"))
            })
            .and_then(|plain| {
                serde_json::from_slice::<MarkDetails>(&plain)
                    .map_err(|_| "its mark is not silo's".to_owned())
            }),
        (Some(clear), _, _) => Ok(clear),
        _ => Err("its mark holds neither sealed nor clear details".to_owned()),
    };
    ReadMark {
        control: stored.control,
        tenant: stored.tenant,
        mark: details.map(|d| TenantMark {
            control: stored.control,
            tenant: stored.tenant,
            slug: d.slug,
            name: d.name,
            plan: d.plan,
        }),
    }
}

/// What silo wrote on something it set aside: when it may drop it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptMark {
    /// Unix seconds after which the reconciler drops it; `None`: never.
    pub drop_after: Option<i64>,
}

/// A SQL string literal (standard strings: only `'` needs doubling).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_is_judged_against_who_asks() {
        let (c1, c2, s1, s2) = (
            Uuid::from_u128(1),
            Uuid::from_u128(2),
            Uuid::from_u128(3),
            Uuid::from_u128(4),
        );
        let me = Owner {
            control: c1,
            server: s1,
        };
        let rows = [
            (None, Ownership::Unmarked),
            (Some(Err(())), Ownership::Unreadable),
            (Some(Ok(me)), Ownership::Ours),
            (
                Some(Ok(Owner {
                    control: c1,
                    server: s2,
                })),
                Ownership::OtherServer(s2),
            ),
            (
                Some(Ok(Owner {
                    control: c2,
                    server: s1,
                })),
                Ownership::OtherControl(c2),
            ),
        ];
        for (marker, want) in rows {
            assert_eq!(judge(marker, me), want);
            assert_eq!(
                judge(marker, me).refusal().is_none(),
                matches!(want, Ownership::Ours | Ownership::Unmarked)
            );
        }
    }

    #[test]
    fn a_tenant_mark_names_nobody_in_the_clear_and_reads_back() {
        let keyring = Keyring::from_base64(&Keyring::generate_base64()).unwrap();
        let mark = TenantMark {
            control: Uuid::from_u128(1),
            tenant: Uuid::from_u128(2),
            slug: "north-clinic".into(),
            name: "North Dental O'Brien".into(),
            plan: "premium".into(),
        };
        let sql = tenant_mark_sql("silo_t_x", &mark, &keyring);
        for clear in ["north-clinic", "North Dental", "premium"] {
            assert!(!sql.contains(clear), "{clear} in {sql}");
        }
        let comment = sql
            .split_once(" IS '")
            .unwrap()
            .1
            .trim_end_matches('\'')
            .replace("''", "'");
        let read = |c: &str, k: &Keyring| open_mark(serde_json::from_str(c).unwrap(), k);
        let back = read(&comment, &keyring);
        assert_eq!((back.control, back.tenant), (mark.control, mark.tenant));
        assert_eq!(back.mark.unwrap(), mark);
        // Another master key: the ids, and why the rest cannot be read.
        let other = Keyring::from_base64(&Keyring::generate_base64()).unwrap();
        let sealed_away = read(&comment, &other);
        assert_eq!(sealed_away.tenant, mark.tenant);
        assert!(sealed_away.mark.is_err());
        // Moved onto another tenant's database: its seal is bound to its id.
        let moved = comment.replace(&mark.tenant.to_string(), &Uuid::from_u128(3).to_string());
        assert!(read(&moved, &keyring).mark.is_err());
        // A mark written before sealing still reads.
        let legacy = serde_json::json!({
            "control": mark.control, "tenant": mark.tenant,
            "slug": "north-clinic", "name": "North Dental O'Brien", "plan": "premium",
        })
        .to_string();
        assert_eq!(read(&legacy, &keyring).mark.unwrap(), mark);
    }

    #[test]
    fn literals_double_their_quotes() {
        assert_eq!(
            quote_literal(r#"{"name":"O'Brien \ co"}"#),
            r#"'{"name":"O''Brien \ co"}'"#
        );
    }
}
