//! Paging by id, shared by every list of the admin and app APIs: a page size
//! within bounds and an opaque cursor (the last id of the previous page).

use uuid::Uuid;

use crate::api::error::{ApiError, ApiResult};

/// Page size when a request names none.
pub const DEFAULT_LIMIT: i64 = 50;

/// Page size (1..=`max`, default [`DEFAULT_LIMIT`]) and cursor from list parameters.
pub fn page(limit: Option<i64>, cursor: Option<&str>, max: i64) -> ApiResult<(i64, Option<Uuid>)> {
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=max).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit must be between 1 and {max}"
        )));
    }
    let after = cursor
        .map(|c| {
            Uuid::parse_str(c)
                .map_err(|_| ApiError::invalid("cursor is not a cursor this API returned"))
        })
        .transpose()?;
    Ok((limit, after))
}

/// The cursor of the next page, if this page was full.
pub fn next_cursor<T>(items: &[T], limit: i64, id: impl Fn(&T) -> Uuid) -> Option<String> {
    (items.len() as i64 == limit)
        .then(|| items.last().map(|t| id(t).to_string()))
        .flatten()
}
