//! `/api/v1/appointments`: a patient seen at a clinic, optionally by a staff
//! member, over a time range. The clinic, patient and staff member must exist
//! in the same tenant (foreign keys, answered 422); the range must end after it
//! starts (`appointments_ends_after_start`, also checked here when both ends
//! are given, so a PATCH moving one end is still refused by the database).

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::common::{
    delete_row, next_cursor, not_null, one_of, page_of, parse_id, text, Clearable,
};
use super::{TenantDb, TenantHeader};
use crate::api::error::{ApiError, ApiResult, Json, Path, Query};
use crate::api::responses::{AppErrors, JsonBody, QueryErrors};
use crate::api::AppState;

/// The statuses the schema's `appointments_status_check` allows.
const STATUSES: [&str; 5] = [
    "scheduled",
    "checked_in",
    "completed",
    "cancelled",
    "no_show",
];

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_appointments, create_appointment))
        .routes(routes!(
            get_appointment,
            update_appointment,
            delete_appointment
        ))
}

#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct Appointment {
    id: Uuid,
    clinic_id: Uuid,
    patient_id: Uuid,
    staff_id: Option<Uuid>,
    starts_at: DateTime<Utc>,
    ends_at: DateTime<Utc>,
    /// One of `scheduled`, `checked_in`, `completed`, `cancelled`, `no_show`.
    status: String,
    reason: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAppointment {
    /// A clinic of this tenant.
    clinic_id: Uuid,
    /// A patient of this tenant.
    patient_id: Uuid,
    /// A staff member of this tenant.
    staff_id: Option<Uuid>,
    /// RFC 3339.
    starts_at: DateTime<Utc>,
    /// RFC 3339, after `starts_at`.
    ends_at: DateTime<Utc>,
    /// Default `scheduled`.
    status: Option<String>,
    reason: Option<String>,
}

/// Fields to change; absent fields stay as they are. `null` clears
/// `staff_id` and `reason`; for any other field it is refused (422).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AppointmentPatch {
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = Uuid)]
    clinic_id: Option<Uuid>,
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = Uuid)]
    patient_id: Option<Uuid>,
    #[serde(default)]
    #[schema(value_type = Option<Uuid>)]
    staff_id: Clearable<Uuid>,
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = DateTime<Utc>)]
    starts_at: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = DateTime<Utc>)]
    ends_at: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = String)]
    status: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    reason: Clearable<String>,
}

/// Paging and filters; filters combine with AND, pages follow `id`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AppointmentParams {
    /// 1..=200, default 50.
    limit: Option<i64>,
    /// `next_cursor` of the previous page (with the same filters).
    cursor: Option<String>,
    /// Only appointments starting at or after this instant (RFC 3339).
    from: Option<DateTime<Utc>>,
    /// Only appointments starting before this instant (RFC 3339).
    to: Option<DateTime<Utc>>,
    /// Only this patient's appointments.
    patient_id: Option<Uuid>,
    /// Only this staff member's appointments.
    staff_id: Option<Uuid>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AppointmentPage {
    items: Vec<Appointment>,
    next_cursor: Option<String>,
}

const COLUMNS: &str =
    "id, clinic_id, patient_id, staff_id, starts_at, ends_at, status, reason, created_at, updated_at";

/// Appointments of the tenant, oldest booking first, optionally filtered.
#[utoipa::path(get, path = "/appointments", tag = "appointments", params(AppointmentParams, TenantHeader),
    responses((status = 200, body = AppointmentPage), AppErrors, QueryErrors))]
async fn list_appointments(
    mut db: TenantDb,
    Query(p): Query<AppointmentParams>,
) -> ApiResult<Json<AppointmentPage>> {
    let (limit, after) = page_of(p.limit, p.cursor.as_deref())?;
    if let (Some(from), Some(to)) = (p.from, p.to) {
        if from > to {
            return Err(ApiError::invalid("from must not be after to"));
        }
    }
    let items: Vec<Appointment> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM appointments
          WHERE ($1::uuid IS NULL OR id > $1)
            AND ($2::timestamptz IS NULL OR starts_at >= $2)
            AND ($3::timestamptz IS NULL OR starts_at < $3)
            AND ($4::uuid IS NULL OR patient_id = $4)
            AND ($5::uuid IS NULL OR staff_id = $5)
          ORDER BY id LIMIT $6"
    ))
    .bind(after)
    .bind(p.from)
    .bind(p.to)
    .bind(p.patient_id)
    .bind(p.staff_id)
    .bind(limit)
    .fetch_all(&mut *db.conn)
    .await
    .map_err(|e| db.fail(e))?;
    let next_cursor = next_cursor(&items, limit, |a| a.id);
    Ok(Json(AppointmentPage { items, next_cursor }))
}

/// Book an appointment.
#[utoipa::path(post, path = "/appointments", tag = "appointments", request_body = NewAppointment,
    params(TenantHeader),
    responses((status = 201, body = Appointment), AppErrors, JsonBody,
        (status = 422, description = "a value is invalid, `ends_at` is not after `starts_at`, or an id names nothing of the tenant")))]
async fn create_appointment(
    mut db: TenantDb,
    Json(body): Json<NewAppointment>,
) -> ApiResult<(StatusCode, Json<Appointment>)> {
    check(
        Some(body.starts_at),
        Some(body.ends_at),
        body.status.as_deref(),
        body.reason.as_deref(),
    )?;
    let appointment: Appointment = sqlx::query_as(&format!(
        "INSERT INTO appointments (id, clinic_id, patient_id, staff_id, starts_at, ends_at, status, reason)
         VALUES ($1, $2, $3, $4, $5, $6, COALESCE($7, 'scheduled'), $8) RETURNING {COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(body.clinic_id)
    .bind(body.patient_id)
    .bind(body.staff_id)
    .bind(body.starts_at)
    .bind(body.ends_at)
    .bind(body.status)
    .bind(body.reason)
    .fetch_one(&mut *db.conn)
    .await
    .map_err(|e| db.fail(e))?;
    Ok((StatusCode::CREATED, Json(appointment)))
}

/// One appointment.
#[utoipa::path(get, path = "/appointments/{id}", tag = "appointments",
    params(("id" = String, Path), TenantHeader),
    responses((status = 200, body = Appointment), AppErrors,
        (status = 404, description = "no such appointment, or no such tenant")))]
async fn get_appointment(mut db: TenantDb, Path(id): Path<String>) -> ApiResult<Json<Appointment>> {
    let id = parse_id(&id, "appointment")?;
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM appointments WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *db.conn)
        .await
        .map_err(|e| db.fail(e))?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("appointment"))
}

/// Change an appointment: move it, reassign it, or record what happened.
#[utoipa::path(patch, path = "/appointments/{id}", tag = "appointments", request_body = AppointmentPatch,
    params(("id" = String, Path), TenantHeader),
    responses((status = 200, body = Appointment), AppErrors, JsonBody,
        (status = 404, description = "no such appointment, or no such tenant"),
        (status = 422, description = "a value is invalid, `ends_at` is not after `starts_at`, or an id names nothing of the tenant")))]
async fn update_appointment(
    mut db: TenantDb,
    Path(id): Path<String>,
    Json(body): Json<AppointmentPatch>,
) -> ApiResult<Json<Appointment>> {
    let id = parse_id(&id, "appointment")?;
    check(
        body.starts_at,
        body.ends_at,
        body.status.as_deref(),
        body.reason.text(),
    )?;
    sqlx::query_as(&format!(
        "UPDATE appointments SET clinic_id = COALESCE($2, clinic_id), patient_id = COALESCE($3, patient_id),
                staff_id = CASE WHEN $4 THEN $5 ELSE staff_id END, starts_at = COALESCE($6, starts_at),
                ends_at = COALESCE($7, ends_at), status = COALESCE($8, status),
                reason = CASE WHEN $9 THEN $10 ELSE reason END,
                updated_at = now()
          WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(body.clinic_id)
    .bind(body.patient_id)
    .bind(body.staff_id.given())
    .bind(body.staff_id.into_value())
    .bind(body.starts_at)
    .bind(body.ends_at)
    .bind(body.status)
    .bind(body.reason.given())
    .bind(body.reason.into_value())
    .fetch_optional(&mut *db.conn)
    .await
    .map_err(|e| db.fail(e))?
    .map(Json)
    .ok_or_else(|| ApiError::not_found("appointment"))
}

/// Remove an appointment (its invoices keep no appointment).
#[utoipa::path(delete, path = "/appointments/{id}", tag = "appointments",
    params(("id" = String, Path), TenantHeader),
    responses((status = 204), AppErrors,
        (status = 404, description = "no such appointment, or no such tenant")))]
async fn delete_appointment(mut db: TenantDb, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id = parse_id(&id, "appointment")?;
    delete_row(&mut db, "appointments", id, "appointment").await
}

fn check(
    starts_at: Option<DateTime<Utc>>,
    ends_at: Option<DateTime<Utc>>,
    status: Option<&str>,
    reason: Option<&str>,
) -> ApiResult<()> {
    if let (Some(start), Some(end)) = (starts_at, ends_at) {
        if end <= start {
            return Err(ApiError::invalid("ends_at must be after starts_at"));
        }
    }
    one_of("status", status, &STATUSES)?;
    text("reason", reason, 2000)
}
