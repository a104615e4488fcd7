//! Helpers shared by the clinic resources: paging by id, path ids, text and
//! contact checks, closed sets of values, and deletes that answer 409 while a
//! row is still referred to.

use axum::http::StatusCode;
use serde::{Deserialize, Deserializer};
use utoipa::IntoParams;
use uuid::Uuid;

use super::TenantDb;
use crate::api::error::{ApiError, ApiResult};

/// Largest page of the app API's lists.
const MAX_PAGE: i64 = 200;

/// Paging of the plain lists (every resource without filters).
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PageParams {
    /// 1..=200, default 50.
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// Page size and cursor from list parameters.
pub(super) fn page(p: &PageParams) -> ApiResult<(i64, Option<Uuid>)> {
    page_of(p.limit, p.cursor.as_deref())
}

pub(super) fn page_of(limit: Option<i64>, cursor: Option<&str>) -> ApiResult<(i64, Option<Uuid>)> {
    crate::api::paging::page(limit, cursor, MAX_PAGE)
}

pub(super) use crate::api::paging::next_cursor;

/// A field a `PATCH` may clear: absent (left as it is), `null` (cleared),
/// or a new value. Its field needs `#[serde(default)]`.
#[derive(Debug, Default)]
pub(super) enum Clearable<T> {
    #[default]
    Keep,
    Clear,
    Set(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Clearable<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Option::<T>::deserialize(d)?.map_or(Self::Clear, Self::Set))
    }
}

impl<T> Clearable<T> {
    /// Whether the patch names the field (with a value or `null`).
    pub(super) fn given(&self) -> bool {
        !matches!(self, Self::Keep)
    }

    /// The new value, if the patch gives one.
    pub(super) fn value(&self) -> Option<&T> {
        match self {
            Self::Set(v) => Some(v),
            _ => None,
        }
    }

    pub(super) fn into_value(self) -> Option<T> {
        match self {
            Self::Set(v) => Some(v),
            _ => None,
        }
    }
}

impl Clearable<String> {
    pub(super) fn text(&self) -> Option<&str> {
        self.value().map(String::as_str)
    }
}

/// For a field a `PATCH` may change but not clear (`#[serde(default,
/// deserialize_with = "not_null")]`): `null` is refused (422) rather than
/// read as "leave it".
pub(super) fn not_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// A path id; anything that is not a UUID cannot exist, so 404.
pub(super) fn parse_id(id: &str, what: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found(what))
}

/// Optional text: when present, 1..=max characters, no control characters.
pub(super) fn text(field: &str, value: Option<&str>, max: usize) -> ApiResult<()> {
    match value {
        Some(v)
            if v.trim().is_empty()
                || v.chars().count() > max
                || v.chars().any(|c| c.is_control() && c != '\n') =>
        {
            Err(ApiError::invalid(format!(
                "{field} must be 1 to {max} characters with no control characters"
            )))
        }
        _ => Ok(()),
    }
}

pub(super) fn contact(email: Option<&str>, phone: Option<&str>) -> ApiResult<()> {
    if let Some(e) = email {
        let ok = e.len() <= 254
            && !e.chars().any(char::is_control)
            && e.split_once('@')
                .is_some_and(|(a, b)| !a.is_empty() && b.contains('.'));
        if !ok {
            return Err(ApiError::invalid("email is not an email address"));
        }
    }
    text("phone", phone, 40)
}

/// Optional value from a closed set; the answer names the set.
pub(super) fn one_of(field: &str, value: Option<&str>, allowed: &[&str]) -> ApiResult<()> {
    match value {
        Some(v) if !allowed.contains(&v) => Err(ApiError::invalid(format!(
            "{field} must be one of {}",
            allowed.join(", ")
        ))),
        _ => Ok(()),
    }
}

/// A plan limit on a table's rows: its table, the plan's field and what a
/// row is, for the answer.
pub(super) struct RowLimit {
    pub table: &'static str,
    pub field: &'static str,
    pub what: &'static str,
}

/// Run `insert` (an `INSERT … RETURNING`) unless the tenant has its plan's
/// `max` rows in the limit's table already: 422 naming the limit then.
/// Inserts under a limit run in a transaction that first takes a
/// transaction-scoped advisory lock (one per table), so concurrent
/// requests count one after the other and the limit holds exactly.
pub(super) async fn insert_within<'q, T>(
    db: &mut TenantDb,
    limit: &RowLimit,
    max: Option<i32>,
    insert: sqlx::query::QueryAs<'q, sqlx::Postgres, T, sqlx::postgres::PgArguments>,
) -> ApiResult<T>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let Some(max) = max else {
        return insert
            .fetch_one(&mut *db.conn)
            .await
            .map_err(|e| db.fail(e));
    };
    let attempt = async {
        let mut tx = sqlx::Connection::begin(&mut *db.conn).await?;
        let rows: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM (SELECT pg_advisory_xact_lock(hashtext('silo.plan_limit.{}'))) l, {}",
            limit.table, limit.table
        ))
        .fetch_one(&mut *tx)
        .await?;
        if rows >= i64::from(max) {
            return Ok(None); // rolled back on drop
        }
        let row = insert.fetch_one(&mut *tx).await?;
        tx.commit().await?;
        Ok(Some(row))
    };
    match attempt.await {
        Ok(Some(row)) => Ok(row),
        Ok(None) => Err(ApiError::invalid(format!(
            "the tenant's plan allows at most {max} {} ({}); remove one or move the tenant to a larger plan",
            limit.what, limit.field
        ))),
        Err(e) => Err(db.fail(e)),
    }
}

/// `DELETE FROM table WHERE id = $1`: 204, 404 when absent, 409 while referred to.
pub(super) async fn delete_row(
    db: &mut TenantDb,
    table: &'static str,
    id: Uuid,
    what: &str,
) -> ApiResult<StatusCode> {
    let done = sqlx::query(&format!("DELETE FROM {table} WHERE id = $1"))
        .bind(id)
        .execute(&mut *db.conn)
        .await
        .map_err(
            |e| match e.as_database_error().and_then(|d| d.code()).as_deref() {
                Some("23503") => ApiError::Conflict(format!("the {what} is still referred to")),
                _ => db.fail(e),
            },
        )?;
    if done.rows_affected() == 0 {
        return Err(ApiError::not_found(what));
    }
    Ok(StatusCode::NO_CONTENT)
}
