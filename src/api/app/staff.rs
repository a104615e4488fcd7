//! `/api/v1/staff`: the people who work at a tenant's clinics. A staff member's
//! clinic must exist in the same tenant (a foreign key, answered 422); emails
//! are unique per tenant regardless of case (`staff_email_key`, answered 409).

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::common::{
    contact, delete_row, insert_within, next_cursor, not_null, one_of, page, parse_id, text,
    Clearable, PageParams, RowLimit,
};
use super::{TenantDb, TenantHeader};
use crate::api::error::{ApiError, ApiResult, Json, Path, Query};
use crate::api::responses::{AppErrors, JsonBody, QueryErrors};
use crate::api::AppState;

/// The roles the schema's `staff_role_check` allows.
const ROLES: [&str; 5] = ["doctor", "nurse", "receptionist", "admin", "other"];

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_staff, create_staff))
        .routes(routes!(get_staff, update_staff, delete_staff))
}

#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct Staff {
    id: Uuid,
    clinic_id: Option<Uuid>,
    full_name: String,
    /// One of `doctor`, `nurse`, `receptionist`, `admin`, `other`.
    role: String,
    email: Option<String>,
    active: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewStaff {
    /// A clinic of this tenant.
    clinic_id: Option<Uuid>,
    full_name: String,
    /// One of `doctor`, `nurse`, `receptionist`, `admin`, `other`.
    role: String,
    email: Option<String>,
    /// Default `true`.
    active: Option<bool>,
}

/// Fields to change; absent fields stay as they are. `null` clears
/// `clinic_id` and `email`; for any other field it is refused (422).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StaffPatch {
    #[serde(default)]
    #[schema(value_type = Option<Uuid>)]
    clinic_id: Clearable<Uuid>,
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = String)]
    full_name: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = String)]
    role: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    email: Clearable<String>,
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = bool)]
    active: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StaffPage {
    items: Vec<Staff>,
    next_cursor: Option<String>,
}

/// The plan's `max_staff`: staff rows of the tenant, active or not.
const LIMIT: RowLimit = RowLimit {
    table: "staff",
    field: "max_staff",
    what: "staff members",
};

const COLUMNS: &str = "id, clinic_id, full_name, role, email, active, created_at, updated_at";

/// Staff of the tenant, oldest first.
#[utoipa::path(get, path = "/staff", tag = "staff", params(PageParams, TenantHeader),
    responses((status = 200, body = StaffPage), AppErrors, QueryErrors))]
async fn list_staff(mut db: TenantDb, Query(p): Query<PageParams>) -> ApiResult<Json<StaffPage>> {
    let (limit, after) = page(&p)?;
    let items: Vec<Staff> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM staff WHERE ($1::uuid IS NULL OR id > $1) ORDER BY id LIMIT $2"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(&mut *db.conn)
    .await
    .map_err(|e| db.fail(e))?;
    let next_cursor = next_cursor(&items, limit, |s| s.id);
    Ok(Json(StaffPage { items, next_cursor }))
}

/// Add a staff member.
#[utoipa::path(post, path = "/staff", tag = "staff", request_body = NewStaff,
    params(TenantHeader),
    responses((status = 201, body = Staff), AppErrors, JsonBody,
        (status = 409, description = "a staff member has this email (regardless of case)"),
        (status = 422, description = "a value is invalid, `clinic_id` names no clinic of the tenant, \
            or the tenant has as many staff members as its plan allows (`max_staff`)")))]
async fn create_staff(
    mut db: TenantDb,
    Json(body): Json<NewStaff>,
) -> ApiResult<(StatusCode, Json<Staff>)> {
    check(
        Some(&body.full_name),
        Some(&body.role),
        body.email.as_deref(),
    )?;
    let sql = format!(
        "INSERT INTO staff (id, clinic_id, full_name, role, email, active)
         VALUES ($1, $2, $3, $4, $5, COALESCE($6, true)) RETURNING {COLUMNS}"
    );
    let insert = sqlx::query_as(&sql)
        .bind(Uuid::now_v7())
        .bind(body.clinic_id)
        .bind(body.full_name.trim())
        .bind(body.role)
        .bind(body.email)
        .bind(body.active);
    let max = db.tenant.limits.max_staff;
    let staff: Staff = insert_within(&mut db, &LIMIT, max, insert).await?;
    Ok((StatusCode::CREATED, Json(staff)))
}

/// One staff member.
#[utoipa::path(get, path = "/staff/{id}", tag = "staff",
    params(("id" = String, Path), TenantHeader),
    responses((status = 200, body = Staff), AppErrors,
        (status = 404, description = "no such staff member, or no such tenant")))]
async fn get_staff(mut db: TenantDb, Path(id): Path<String>) -> ApiResult<Json<Staff>> {
    let id = parse_id(&id, "staff member")?;
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM staff WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *db.conn)
        .await
        .map_err(|e| db.fail(e))?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("staff member"))
}

/// Change a staff member.
#[utoipa::path(patch, path = "/staff/{id}", tag = "staff", request_body = StaffPatch,
    params(("id" = String, Path), TenantHeader),
    responses((status = 200, body = Staff), AppErrors, JsonBody,
        (status = 404, description = "no such staff member, or no such tenant"),
        (status = 409, description = "a staff member has this email (regardless of case)"),
        (status = 422, description = "a value is invalid, or `clinic_id` names no clinic of the tenant")))]
async fn update_staff(
    mut db: TenantDb,
    Path(id): Path<String>,
    Json(body): Json<StaffPatch>,
) -> ApiResult<Json<Staff>> {
    let id = parse_id(&id, "staff member")?;
    check(
        body.full_name.as_deref(),
        body.role.as_deref(),
        body.email.text(),
    )?;
    sqlx::query_as(&format!(
        "UPDATE staff SET clinic_id = CASE WHEN $2 THEN $3 ELSE clinic_id END,
                full_name = COALESCE($4, full_name), role = COALESCE($5, role),
                email = CASE WHEN $6 THEN $7 ELSE email END, active = COALESCE($8, active),
                updated_at = now()
          WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(body.clinic_id.given())
    .bind(body.clinic_id.into_value())
    .bind(body.full_name.as_deref().map(str::trim))
    .bind(body.role)
    .bind(body.email.given())
    .bind(body.email.into_value())
    .bind(body.active)
    .fetch_optional(&mut *db.conn)
    .await
    .map_err(|e| db.fail(e))?
    .map(Json)
    .ok_or_else(|| ApiError::not_found("staff member"))
}

/// Remove a staff member (their appointments keep no staff member).
#[utoipa::path(delete, path = "/staff/{id}", tag = "staff",
    params(("id" = String, Path), TenantHeader),
    responses((status = 204), AppErrors,
        (status = 404, description = "no such staff member, or no such tenant")))]
async fn delete_staff(mut db: TenantDb, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id = parse_id(&id, "staff member")?;
    delete_row(&mut db, "staff", id, "staff member").await
}

fn check(full_name: Option<&str>, role: Option<&str>, email: Option<&str>) -> ApiResult<()> {
    text("full_name", full_name, 200)?;
    one_of("role", role, &ROLES)?;
    contact(email, None)
}
