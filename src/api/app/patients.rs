//! `/api/v1/patients`: the pattern every clinic resource follows. All SQL runs
//! on the request's own tenant connection ([`TenantDb`]).

use axum::extract::Path;
use axum::http::StatusCode;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::{db_error, TenantDb};
use crate::api::error::{ApiError, ApiResult, Json, Problem, Query};
use crate::api::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_patients, create_patient))
        .routes(routes!(get_patient, update_patient, delete_patient))
}

#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct Patient {
    id: Uuid,
    full_name: String,
    date_of_birth: Option<NaiveDate>,
    email: Option<String>,
    phone: Option<String>,
    notes: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPatient {
    full_name: String,
    date_of_birth: Option<NaiveDate>,
    email: Option<String>,
    phone: Option<String>,
    notes: Option<String>,
}

/// Fields to change; absent fields stay as they are.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatientPatch {
    full_name: Option<String>,
    date_of_birth: Option<NaiveDate>,
    email: Option<String>,
    phone: Option<String>,
    notes: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PageParams {
    /// 1..=200, default 50.
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PatientPage {
    items: Vec<Patient>,
    next_cursor: Option<String>,
}

const COLUMNS: &str = "id, full_name, date_of_birth, email, phone, notes, created_at, updated_at";

/// Patients of the tenant, oldest first.
#[utoipa::path(get, path = "/patients", tag = "patients", params(PageParams,
        ("X-Tenant-ID" = String, Header, description = "tenant slug or id")),
    responses((status = 200, body = PatientPage), (status = 404, body = Problem)))]
async fn list_patients(mut db: TenantDb, Query(p): Query<PageParams>) -> ApiResult<Json<PatientPage>> {
    let (limit, after) = page(&p)?;
    let items: Vec<Patient> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM patients WHERE ($1::uuid IS NULL OR id > $1) ORDER BY id LIMIT $2"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(&mut *db.conn)
    .await
    .map_err(db_error)?;
    let next_cursor = next_cursor(&items, limit, |p| p.id);
    Ok(Json(PatientPage { items, next_cursor }))
}

/// Register a patient.
#[utoipa::path(post, path = "/patients", tag = "patients", request_body = NewPatient,
    params(("X-Tenant-ID" = String, Header, description = "tenant slug or id")),
    responses((status = 201, body = Patient), (status = 422, body = Problem)))]
async fn create_patient(mut db: TenantDb, Json(body): Json<NewPatient>) -> ApiResult<(StatusCode, Json<Patient>)> {
    text("full_name", Some(&body.full_name), 200)?;
    contact(body.email.as_deref(), body.phone.as_deref())?;
    text("notes", body.notes.as_deref(), 10_000)?;
    let patient: Patient = sqlx::query_as(&format!(
        "INSERT INTO patients (id, full_name, date_of_birth, email, phone, notes)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(body.full_name.trim())
    .bind(body.date_of_birth)
    .bind(body.email)
    .bind(body.phone)
    .bind(body.notes)
    .fetch_one(&mut *db.conn)
    .await
    .map_err(db_error)?;
    Ok((StatusCode::CREATED, Json(patient)))
}

/// One patient.
#[utoipa::path(get, path = "/patients/{id}", tag = "patients",
    params(("id" = String, Path), ("X-Tenant-ID" = String, Header, description = "tenant slug or id")),
    responses((status = 200, body = Patient), (status = 404, body = Problem)))]
async fn get_patient(mut db: TenantDb, Path(id): Path<String>) -> ApiResult<Json<Patient>> {
    let id = parse_id(&id, "patient")?;
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM patients WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *db.conn)
        .await
        .map_err(db_error)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("patient"))
}

/// Change a patient.
#[utoipa::path(patch, path = "/patients/{id}", tag = "patients", request_body = PatientPatch,
    params(("id" = String, Path), ("X-Tenant-ID" = String, Header, description = "tenant slug or id")),
    responses((status = 200, body = Patient), (status = 404, body = Problem), (status = 422, body = Problem)))]
async fn update_patient(mut db: TenantDb, Path(id): Path<String>, Json(body): Json<PatientPatch>) -> ApiResult<Json<Patient>> {
    let id = parse_id(&id, "patient")?;
    text("full_name", body.full_name.as_deref(), 200)?;
    contact(body.email.as_deref(), body.phone.as_deref())?;
    text("notes", body.notes.as_deref(), 10_000)?;
    sqlx::query_as(&format!(
        "UPDATE patients SET full_name = COALESCE($2, full_name), date_of_birth = COALESCE($3, date_of_birth),
                email = COALESCE($4, email), phone = COALESCE($5, phone), notes = COALESCE($6, notes),
                updated_at = now()
          WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(body.full_name.as_deref().map(str::trim))
    .bind(body.date_of_birth)
    .bind(body.email)
    .bind(body.phone)
    .bind(body.notes)
    .fetch_optional(&mut *db.conn)
    .await
    .map_err(db_error)?
    .map(Json)
    .ok_or_else(|| ApiError::not_found("patient"))
}

/// Remove a patient (refused while appointments or invoices refer to them).
#[utoipa::path(delete, path = "/patients/{id}", tag = "patients",
    params(("id" = String, Path), ("X-Tenant-ID" = String, Header, description = "tenant slug or id")),
    responses((status = 204), (status = 404, body = Problem), (status = 409, body = Problem)))]
async fn delete_patient(mut db: TenantDb, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id = parse_id(&id, "patient")?;
    delete_row(&mut db, "patients", id, "patient").await
}

// ---- shared by the clinic resources ----

/// Page size and cursor from list parameters.
pub(super) fn page(p: &PageParams) -> ApiResult<(i64, Option<Uuid>)> {
    page_of(p.limit, p.cursor.as_deref())
}

pub(super) fn page_of(limit: Option<i64>, cursor: Option<&str>) -> ApiResult<(i64, Option<Uuid>)> {
    let limit = limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::invalid("limit must be between 1 and 200"));
    }
    let after = cursor
        .map(|c| Uuid::parse_str(c).map_err(|_| ApiError::invalid("cursor is not a cursor this API returned")))
        .transpose()?;
    Ok((limit, after))
}

/// The cursor of the next page, if this page was full.
pub(super) fn next_cursor<T>(items: &[T], limit: i64, id: impl Fn(&T) -> Uuid) -> Option<String> {
    (items.len() as i64 == limit).then(|| items.last().map(|t| id(t).to_string())).flatten()
}

/// A path id; anything that is not a UUID cannot exist, so 404.
pub(super) fn parse_id(id: &str, what: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found(what))
}

/// Optional text: when present, 1..=max characters, no control characters.
pub(super) fn text(field: &str, value: Option<&str>, max: usize) -> ApiResult<()> {
    match value {
        Some(v) if v.trim().is_empty() || v.chars().count() > max || v.chars().any(|c| c.is_control() && c != '\n') => Err(
            ApiError::invalid(format!("{field} must be 1 to {max} characters with no control characters")),
        ),
        _ => Ok(()),
    }
}

pub(super) fn contact(email: Option<&str>, phone: Option<&str>) -> ApiResult<()> {
    if let Some(e) = email {
        let ok = e.len() <= 254 && e.split_once('@').is_some_and(|(a, b)| !a.is_empty() && b.contains('.'));
        if !ok {
            return Err(ApiError::invalid("email is not an email address"));
        }
    }
    text("phone", phone, 40)
}

/// `DELETE FROM table WHERE id = $1`: 204, 404 when absent, 409 while referred to.
pub(super) async fn delete_row(db: &mut TenantDb, table: &'static str, id: Uuid, what: &str) -> ApiResult<StatusCode> {
    let done = sqlx::query(&format!("DELETE FROM {table} WHERE id = $1"))
        .bind(id)
        .execute(&mut *db.conn)
        .await
        .map_err(|e| match e.as_database_error().and_then(|d| d.code()).as_deref() {
            Some("23503") => ApiError::Conflict(format!("the {what} is still referred to")),
            _ => db_error(e),
        })?;
    if done.rows_affected() == 0 {
        return Err(ApiError::not_found(what));
    }
    Ok(StatusCode::NO_CONTENT)
}
