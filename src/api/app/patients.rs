//! `/api/v1/patients`: the pattern every clinic resource follows. All SQL runs
//! on the request's own tenant connection ([`TenantDb`]).

use axum::http::StatusCode;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::common::{
    contact, delete_row, insert_within, next_cursor, not_null, page, parse_id, text, Clearable,
    PageParams, RowLimit,
};
use super::{TenantDb, TenantHeader};
use crate::api::error::{ApiError, ApiResult, Json, Path, Query};
use crate::api::responses::{AppErrors, JsonBody, QueryErrors};
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

/// Fields to change; absent fields stay as they are. `null` clears
/// `date_of_birth`, `email`, `phone` and `notes`; for any other field it is refused (422).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatientPatch {
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = String)]
    full_name: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<NaiveDate>)]
    date_of_birth: Clearable<NaiveDate>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    email: Clearable<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    phone: Clearable<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    notes: Clearable<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PatientPage {
    items: Vec<Patient>,
    next_cursor: Option<String>,
}

/// The plan's `max_patients`: patient rows of the tenant.
const LIMIT: RowLimit = RowLimit {
    table: "patients",
    field: "max_patients",
    what: "patients",
};

const COLUMNS: &str = "id, full_name, date_of_birth, email, phone, notes, created_at, updated_at";

/// Patients of the tenant, oldest first.
#[utoipa::path(get, path = "/patients", tag = "patients", params(PageParams, TenantHeader),
    responses((status = 200, body = PatientPage), AppErrors, QueryErrors))]
async fn list_patients(
    mut db: TenantDb,
    Query(p): Query<PageParams>,
) -> ApiResult<Json<PatientPage>> {
    let (limit, after) = page(&p)?;
    let items: Vec<Patient> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM patients WHERE ($1::uuid IS NULL OR id > $1) ORDER BY id LIMIT $2"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(&mut *db.conn)
    .await
    .map_err(|e| db.fail(e))?;
    let next_cursor = next_cursor(&items, limit, |p| p.id);
    Ok(Json(PatientPage { items, next_cursor }))
}

/// Register a patient.
#[utoipa::path(post, path = "/patients", tag = "patients", request_body = NewPatient,
    params(TenantHeader),
    responses((status = 201, body = Patient), AppErrors, JsonBody,
        (status = 422, description = "a value is invalid, or the tenant has as many patients \
            as its plan allows (`max_patients`)")))]
async fn create_patient(
    mut db: TenantDb,
    Json(body): Json<NewPatient>,
) -> ApiResult<(StatusCode, Json<Patient>)> {
    text("full_name", Some(&body.full_name), 200)?;
    contact(body.email.as_deref(), body.phone.as_deref())?;
    text("notes", body.notes.as_deref(), 10_000)?;
    let sql = format!(
        "INSERT INTO patients (id, full_name, date_of_birth, email, phone, notes)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {COLUMNS}"
    );
    let insert = sqlx::query_as(&sql)
        .bind(Uuid::now_v7())
        .bind(body.full_name.trim())
        .bind(body.date_of_birth)
        .bind(body.email)
        .bind(body.phone)
        .bind(body.notes);
    let max = db.tenant.limits.max_patients;
    let patient: Patient = insert_within(&mut db, &LIMIT, max, insert).await?;
    Ok((StatusCode::CREATED, Json(patient)))
}

/// One patient.
#[utoipa::path(get, path = "/patients/{id}", tag = "patients",
    params(("id" = String, Path), TenantHeader),
    responses((status = 200, body = Patient), AppErrors,
        (status = 404, description = "no such patient, or no such tenant")))]
async fn get_patient(mut db: TenantDb, Path(id): Path<String>) -> ApiResult<Json<Patient>> {
    let id = parse_id(&id, "patient")?;
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM patients WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *db.conn)
        .await
        .map_err(|e| db.fail(e))?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("patient"))
}

/// Change a patient.
#[utoipa::path(patch, path = "/patients/{id}", tag = "patients", request_body = PatientPatch,
    params(("id" = String, Path), TenantHeader),
    responses((status = 200, body = Patient), AppErrors, JsonBody,
        (status = 404, description = "no such patient, or no such tenant"),
        (status = 422, description = "a value is invalid")))]
async fn update_patient(
    mut db: TenantDb,
    Path(id): Path<String>,
    Json(body): Json<PatientPatch>,
) -> ApiResult<Json<Patient>> {
    let id = parse_id(&id, "patient")?;
    text("full_name", body.full_name.as_deref(), 200)?;
    contact(body.email.text(), body.phone.text())?;
    text("notes", body.notes.text(), 10_000)?;
    sqlx::query_as(&format!(
        "UPDATE patients SET full_name = COALESCE($2, full_name),
                date_of_birth = CASE WHEN $3 THEN $4 ELSE date_of_birth END,
                email = CASE WHEN $5 THEN $6 ELSE email END,
                phone = CASE WHEN $7 THEN $8 ELSE phone END,
                notes = CASE WHEN $9 THEN $10 ELSE notes END,
                updated_at = now()
          WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(body.full_name.as_deref().map(str::trim))
    .bind(body.date_of_birth.given())
    .bind(body.date_of_birth.into_value())
    .bind(body.email.given())
    .bind(body.email.into_value())
    .bind(body.phone.given())
    .bind(body.phone.into_value())
    .bind(body.notes.given())
    .bind(body.notes.into_value())
    .fetch_optional(&mut *db.conn)
    .await
    .map_err(|e| db.fail(e))?
    .map(Json)
    .ok_or_else(|| ApiError::not_found("patient"))
}

/// Remove a patient (refused while appointments or invoices refer to them).
#[utoipa::path(delete, path = "/patients/{id}", tag = "patients",
    params(("id" = String, Path), TenantHeader),
    responses((status = 204), AppErrors,
        (status = 404, description = "no such patient, or no such tenant"),
        (status = 409, description = "appointments or invoices still refer to the patient")))]
async fn delete_patient(mut db: TenantDb, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id = parse_id(&id, "patient")?;
    delete_row(&mut db, "patients", id, "patient").await
}
