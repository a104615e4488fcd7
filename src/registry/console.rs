//! What the admin console needs beyond the admin API's own reads: tenants
//! searched, filtered and sorted a page at a time; the fleet's figures
//! (operations in flight, backups that failed lately); and its sessions,
//! shared by every replica (`console_sessions`: hashes only, no secret).

use chrono::{DateTime, Utc};
use sqlx::FromRow;
use uuid::Uuid;

use super::{Error, Operation, Registry, Result, TenantStatus};

/// The order of a tenant listing; ties (and the cursor) go by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TenantSort {
    /// Oldest first (ids are UUIDv7).
    #[default]
    Created,
    Slug,
    Name,
}

impl TenantSort {
    pub const ALL: [TenantSort; 3] = [Self::Created, Self::Slug, Self::Name];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Slug => "slug",
            Self::Name => "name",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// The column sorted on (a constant: never text from a request).
    fn column(self) -> &'static str {
        match self {
            Self::Created => "id",
            Self::Slug => "slug",
            Self::Name => "name",
        }
    }
}

/// Which tenants to list; `None` is any. Deleted tenants are left out
/// unless `status` asks for them.
#[derive(Debug, Default, Clone)]
pub struct TenantQuery<'a> {
    /// Part of the slug or the name, case-insensitive.
    pub search: Option<&'a str>,
    pub status: Option<TenantStatus>,
    pub plan: Option<&'a str>,
    pub server: Option<&'a str>,
    pub sort: TenantSort,
    /// The last tenant of the previous page.
    pub after: Option<Uuid>,
    pub limit: i64,
}

/// A tenant as a listing shows it.
#[derive(Debug, Clone, FromRow)]
pub struct TenantListed {
    pub id: Uuid,
    pub slug: String,
    pub name: String,
    pub plan: String,
    pub status: TenantStatus,
    pub server: String,
    pub created_at: DateTime<Utc>,
    pub last_backup_at: Option<DateTime<Utc>>,
}

/// A backup that failed, with its tenant's slug.
#[derive(Debug, Clone, FromRow)]
pub struct FailedBackup {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub slug: String,
    pub kind: String,
    pub error: Option<String>,
    pub started_at: DateTime<Utc>,
}

/// A console session as stored: who signed in, by the hash of their token.
#[derive(Debug, Clone, FromRow)]
pub struct ConsoleSession {
    /// `bootstrap` or `key`.
    pub kind: String,
    pub token_hash: Vec<u8>,
    pub expires_at: DateTime<Utc>,
}

/// `%text%` for `ILIKE`, with the pattern characters in `text` taken literally.
fn contains_pattern(text: &str) -> String {
    let mut p = String::with_capacity(text.len() + 2);
    p.push('%');
    for c in text.chars() {
        if matches!(c, '\\' | '%' | '_') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

impl Registry {
    /// One page of tenants matching `q`, in its order, after its cursor.
    pub async fn search_tenants(&self, q: &TenantQuery<'_>) -> Result<Vec<TenantListed>> {
        let col = q.sort.column();
        sqlx::query_as(&format!(
            "SELECT t.id, t.slug, t.name, t.plan::text AS plan, t.status, s.name AS server,
                    t.created_at, t.last_backup_at
               FROM tenants t JOIN db_servers s ON s.id = t.server_id
              WHERE ($1::text IS NULL OR t.slug ILIKE $1 OR t.name ILIKE $1)
                AND (CASE WHEN $2::text IS NULL THEN t.status <> 'deleted' ELSE t.status = $2 END)
                AND ($3::text IS NULL OR t.plan::text = $3)
                AND ($4::text IS NULL OR s.name = $4)
                AND ($5::uuid IS NULL
                     OR (t.{col}, t.id) > (SELECT c.{col}, c.id FROM tenants c WHERE c.id = $5))
              ORDER BY t.{col}, t.id LIMIT $6"
        ))
        .bind(q.search.map(contains_pattern))
        .bind(q.status.map(TenantStatus::as_str))
        .bind(q.plan)
        .bind(q.server)
        .bind(q.after)
        .bind(q.limit)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// The plans tenants are on, for a filter's choices.
    pub async fn plans_in_use(&self) -> Result<Vec<String>> {
        sqlx::query_scalar("SELECT DISTINCT plan::text FROM tenants ORDER BY 1")
            .fetch_all(&self.pool)
            .await
            .map_err(Error::from)
    }

    /// Operations not yet ended (queued, pending or running), newest first.
    pub async fn running_operations(&self, limit: i64) -> Result<Vec<Operation>> {
        sqlx::query_as(
            "SELECT id, kind, tenant_id, status, progress, error, result, created_at, updated_at
               FROM operations WHERE status IN ('queued', 'pending', 'running')
              ORDER BY created_at DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// A tenant's operations, newest first.
    pub async fn operations_of(&self, tenant: Uuid, limit: i64) -> Result<Vec<Operation>> {
        sqlx::query_as(
            "SELECT id, kind, tenant_id, status, progress, error, result, created_at, updated_at
               FROM operations WHERE tenant_id = $1 ORDER BY created_at DESC LIMIT $2",
        )
        .bind(tenant)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// The newest operation of a kind, if any (the fleet migration's state).
    pub async fn latest_operation(
        &self,
        kind: crate::domain::OperationKind,
    ) -> Result<Option<Operation>> {
        sqlx::query_as(
            "SELECT id, kind, tenant_id, status, progress, error, result, created_at, updated_at
               FROM operations WHERE kind = $1 ORDER BY created_at DESC LIMIT 1",
        )
        .bind(kind)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Backups that failed since `since`, newest first.
    pub async fn failed_backups_since(
        &self,
        since: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<FailedBackup>> {
        sqlx::query_as(
            "SELECT b.id, b.tenant_id, t.slug, b.kind, b.error, b.started_at
               FROM backups b JOIN tenants t ON t.id = b.tenant_id
              WHERE b.status = 'failed' AND b.started_at >= $1
              ORDER BY b.started_at DESC LIMIT $2",
        )
        .bind(since)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }
}

impl Registry {
    /// Record a new console session until `expires_at`; expired sessions
    /// are cleared on the way.
    pub async fn open_console_session(
        &self,
        id_hash: &[u8; 32],
        kind: &str,
        token_hash: &[u8; 32],
        expires_at: DateTime<Utc>,
    ) -> Result<()> {
        sqlx::query("DELETE FROM console_sessions WHERE expires_at < now()")
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "INSERT INTO console_sessions (id_hash, kind, token_hash, expires_at)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(&id_hash[..])
        .bind(kind)
        .bind(&token_hash[..])
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The live console session whose cookie hashes to `id_hash`.
    pub async fn console_session(&self, id_hash: &[u8; 32]) -> Result<Option<ConsoleSession>> {
        sqlx::query_as(
            "SELECT kind, token_hash, expires_at FROM console_sessions
              WHERE id_hash = $1 AND expires_at > now()",
        )
        .bind(&id_hash[..])
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// End a console session (signing out), on every replica at once.
    pub async fn close_console_session(&self, id_hash: &[u8; 32]) -> Result<()> {
        sqlx::query("DELETE FROM console_sessions WHERE id_hash = $1")
            .bind(&id_hash[..])
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_search_takes_pattern_characters_literally() {
        for (text, pattern) in [
            ("north", "%north%"),
            ("50%", "%50\\%%"),
            ("a_b", "%a\\_b%"),
            ("c:\\x", "%c:\\\\x%"),
        ] {
            assert_eq!(contains_pattern(text), pattern, "{text}");
        }
    }

    #[test]
    fn sorts_parse_back_from_their_names() {
        for s in TenantSort::ALL {
            assert_eq!(TenantSort::parse(s.as_str()), Some(s));
        }
        assert_eq!(TenantSort::parse("id; DROP TABLE tenants"), None);
    }
}
