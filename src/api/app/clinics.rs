//! `/api/v1/clinics`: the locations of one tenant's clinic group. Names are
//! unique per tenant regardless of case (`clinics_name_key`, answered 409).

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::common::{
    contact, delete_row, next_cursor, not_null, page, parse_id, text, Clearable, PageParams,
};
use super::{TenantDb, TenantHeader};
use crate::api::error::{ApiError, ApiResult, Json, Path, Query};
use crate::api::responses::{AppErrors, JsonBody, QueryErrors};
use crate::api::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_clinics, create_clinic))
        .routes(routes!(get_clinic, update_clinic, delete_clinic))
}

#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct Clinic {
    id: Uuid,
    name: String,
    address: Option<String>,
    phone: Option<String>,
    /// IANA time zone name, such as `Europe/Berlin`.
    timezone: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewClinic {
    name: String,
    address: Option<String>,
    phone: Option<String>,
    /// IANA time zone name; default `UTC`.
    timezone: Option<String>,
}

/// Fields to change; absent fields stay as they are. `null` clears
/// `address` and `phone`; for any other field it is refused (422).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClinicPatch {
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = String)]
    name: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    address: Clearable<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    phone: Clearable<String>,
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = String)]
    timezone: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClinicPage {
    items: Vec<Clinic>,
    next_cursor: Option<String>,
}

const COLUMNS: &str = "id, name, address, phone, timezone, created_at, updated_at";

/// Clinics of the tenant, oldest first.
#[utoipa::path(get, path = "/clinics", tag = "clinics", params(PageParams, TenantHeader),
    responses((status = 200, body = ClinicPage), AppErrors, QueryErrors))]
async fn list_clinics(
    mut db: TenantDb,
    Query(p): Query<PageParams>,
) -> ApiResult<Json<ClinicPage>> {
    let (limit, after) = page(&p)?;
    let items: Vec<Clinic> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM clinics WHERE ($1::uuid IS NULL OR id > $1) ORDER BY id LIMIT $2"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(&mut *db.conn)
    .await
    .map_err(|e| db.fail(e))?;
    let next_cursor = next_cursor(&items, limit, |c| c.id);
    Ok(Json(ClinicPage { items, next_cursor }))
}

/// Open a clinic.
#[utoipa::path(post, path = "/clinics", tag = "clinics", request_body = NewClinic,
    params(TenantHeader),
    responses((status = 201, body = Clinic), AppErrors, JsonBody,
        (status = 409, description = "a clinic has this name (regardless of case)"),
        (status = 422, description = "a value is invalid, such as a `timezone` that is not an IANA name")))]
async fn create_clinic(
    mut db: TenantDb,
    Json(body): Json<NewClinic>,
) -> ApiResult<(StatusCode, Json<Clinic>)> {
    check(
        Some(&body.name),
        body.address.as_deref(),
        body.phone.as_deref(),
        body.timezone.as_deref(),
    )?;
    known_timezone(&mut db, body.timezone.as_deref()).await?;
    let clinic: Clinic = sqlx::query_as(&format!(
        "INSERT INTO clinics (id, name, address, phone, timezone)
         VALUES ($1, $2, $3, $4, COALESCE($5, 'UTC')) RETURNING {COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(body.name.trim())
    .bind(body.address)
    .bind(body.phone)
    .bind(body.timezone)
    .fetch_one(&mut *db.conn)
    .await
    .map_err(|e| db.fail(e))?;
    Ok((StatusCode::CREATED, Json(clinic)))
}

/// One clinic.
#[utoipa::path(get, path = "/clinics/{id}", tag = "clinics",
    params(("id" = String, Path), TenantHeader),
    responses((status = 200, body = Clinic), AppErrors,
        (status = 404, description = "no such clinic, or no such tenant")))]
async fn get_clinic(mut db: TenantDb, Path(id): Path<String>) -> ApiResult<Json<Clinic>> {
    let id = parse_id(&id, "clinic")?;
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM clinics WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *db.conn)
        .await
        .map_err(|e| db.fail(e))?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("clinic"))
}

/// Change a clinic.
#[utoipa::path(patch, path = "/clinics/{id}", tag = "clinics", request_body = ClinicPatch,
    params(("id" = String, Path), TenantHeader),
    responses((status = 200, body = Clinic), AppErrors, JsonBody,
        (status = 404, description = "no such clinic, or no such tenant"),
        (status = 409, description = "a clinic has this name (regardless of case)"),
        (status = 422, description = "a value is invalid, such as a `timezone` that is not an IANA name")))]
async fn update_clinic(
    mut db: TenantDb,
    Path(id): Path<String>,
    Json(body): Json<ClinicPatch>,
) -> ApiResult<Json<Clinic>> {
    let id = parse_id(&id, "clinic")?;
    check(
        body.name.as_deref(),
        body.address.text(),
        body.phone.text(),
        body.timezone.as_deref(),
    )?;
    known_timezone(&mut db, body.timezone.as_deref()).await?;
    sqlx::query_as(&format!(
        "UPDATE clinics SET name = COALESCE($2, name),
                address = CASE WHEN $3 THEN $4 ELSE address END,
                phone = CASE WHEN $5 THEN $6 ELSE phone END,
                timezone = COALESCE($7, timezone), updated_at = now()
          WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(body.name.as_deref().map(str::trim))
    .bind(body.address.given())
    .bind(body.address.into_value())
    .bind(body.phone.given())
    .bind(body.phone.into_value())
    .bind(body.timezone)
    .fetch_optional(&mut *db.conn)
    .await
    .map_err(|e| db.fail(e))?
    .map(Json)
    .ok_or_else(|| ApiError::not_found("clinic"))
}

/// Close a clinic (refused while appointments refer to it; its staff keep no clinic).
#[utoipa::path(delete, path = "/clinics/{id}", tag = "clinics",
    params(("id" = String, Path), TenantHeader),
    responses((status = 204), AppErrors,
        (status = 404, description = "no such clinic, or no such tenant"),
        (status = 409, description = "appointments still refer to the clinic")))]
async fn delete_clinic(mut db: TenantDb, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id = parse_id(&id, "clinic")?;
    delete_row(&mut db, "clinics", id, "clinic").await
}

fn check(
    name: Option<&str>,
    address: Option<&str>,
    phone: Option<&str>,
    timezone: Option<&str>,
) -> ApiResult<()> {
    text("name", name, 200)?;
    text("address", address, 500)?;
    contact(None, phone)?;
    match timezone {
        Some(tz) if !plausible_timezone(tz) => Err(ApiError::invalid(
            "timezone must be an IANA time zone name such as Europe/Berlin or UTC",
        )),
        _ => Ok(()),
    }
}

/// A zone PostgreSQL knows (its time zone database decides, the one the
/// clinic's times are read in), after [`plausible_timezone`] kept out
/// the POSIX forms it also takes.
async fn known_timezone(db: &mut TenantDb, tz: Option<&str>) -> ApiResult<()> {
    let Some(tz) = tz else {
        return Ok(());
    };
    match sqlx::query("SELECT now() AT TIME ZONE $1")
        .bind(tz)
        .execute(&mut *db.conn)
        .await
    {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("22023") => {
            Err(ApiError::invalid(format!(
                "timezone {tz:?} is not a time zone this database knows"
            )))
        }
        Err(e) => Err(db.fail(e)),
    }
}

/// Shaped like an IANA zone name (`UTC`, `America/Argentina/Buenos_Aires`,
/// `Etc/GMT+5`): up to 64 ASCII letters, digits, `/`, `_`, `-`, `+`, starting
/// with a letter, with no empty path segment. Whether the zone exists in any
/// particular tz database is not checked.
fn plausible_timezone(tz: &str) -> bool {
    tz.len() <= 64
        && tz.starts_with(|c: char| c.is_ascii_alphabetic())
        && tz
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'+'))
        && tz.split('/').all(|segment| !segment.is_empty())
}

#[cfg(test)]
mod tests {
    use super::plausible_timezone;

    #[test]
    fn timezones_must_look_like_iana_names() {
        for ok in [
            "UTC",
            "Europe/Berlin",
            "America/Argentina/Buenos_Aires",
            "Etc/GMT+5",
            "America/Port-au-Prince",
        ] {
            assert!(plausible_timezone(ok), "{ok}");
        }
        for bad in [
            "",
            "/UTC",
            "Europe/",
            "Europe//Berlin",
            "5UTC",
            "Europe/Berlin ",
            "Zürich",
            "a;b",
            &"A".repeat(65),
        ] {
            assert!(!plausible_timezone(bad), "{bad}");
        }
    }
}
