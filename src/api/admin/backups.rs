//! Backups, restores, verification, archival and erasure of tenants' backups.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Extension;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::tenants::resolve;
use crate::api::auth::Actor;
use crate::api::error::{ApiError, ApiResult, Json, OptionalJson, Path, Query};
use crate::api::paging::{next_cursor, page};
use crate::api::responses::{AdminErrors, OptionalJsonBody, QueryErrors};
use crate::api::AppState;
use crate::backup::RestoreTarget;
use crate::domain::Slug;
use crate::registry::{Backup, Operation};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(start_backup, list_backups, erase_backups))
        .routes(routes!(get_backup))
        .routes(routes!(verify_backup))
        .routes(routes!(restore_backup))
        .routes(routes!(archive_tenant))
        .routes(routes!(restore_tenant))
}

const MAX_PAGE: i64 = 500;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct BackupListParams {
    /// 1..=500, default 50.
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BackupPage {
    items: Vec<Backup>,
    next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreBackupBody {
    /// Restore into a new tenant of this slug instead (created from the
    /// backup). It may name the backup's own tenant, never another existing
    /// one (422).
    into_slug: Option<String>,
    /// Replace the data of a tenant that has some (active or suspended):
    /// without it such a restore is refused with 409. The replaced database
    /// is kept aside (`silo_kept_*`) for `SILO_KEEP_DAYS`.
    #[serde(default)]
    overwrite: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreTenantBody {
    /// Backup to restore; default: the tenant's newest succeeded backup.
    backup_id: Option<Uuid>,
    /// Needed to replace the data of an active or suspended tenant (409
    /// without it); an archived one is brought back without it. The
    /// replaced database is kept aside for `SILO_KEEP_DAYS`.
    #[serde(default)]
    overwrite: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Erased {
    /// Backups whose objects were deleted.
    backups_erased: u32,
}

/// Back a tenant up now; answers with the backup to poll: `running`, or
/// `queued` while every work slot of the process (`SILO_BACKUP_CONCURRENCY`)
/// is taken.
#[utoipa::path(post, path = "/tenants/{tenant}/backups", tag = "backups",
    params(("tenant" = String, Path, description = "slug or id")),
    responses((status = 202, body = Backup), AdminErrors, (status = 404, description = "no such tenant"),
        (status = 409, description = "one is running, the tenant cannot be backed up, or storage is not configured")))]
async fn start_backup(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(tenant): Path<String>,
) -> ApiResult<(StatusCode, Json<Backup>)> {
    let t = resolve(&state, &tenant).await?;
    let backup = state
        .control
        .backups()?
        .start_manual(t.id, actor.name())
        .await?;
    Ok((StatusCode::ACCEPTED, Json(backup)))
}

/// A tenant's backups, newest first.
#[utoipa::path(get, path = "/tenants/{tenant}/backups", tag = "backups",
    params(("tenant" = String, Path, description = "slug or id"), BackupListParams),
    responses((status = 200, body = BackupPage), AdminErrors, QueryErrors,
        (status = 404, description = "no such tenant")))]
async fn list_backups(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    Query(params): Query<BackupListParams>,
) -> ApiResult<Json<BackupPage>> {
    let (limit, before) = page(params.limit, params.cursor.as_deref(), MAX_PAGE)?;
    let t = resolve(&state, &tenant).await?;
    let items = state.registry().backups_of(t.id, before, limit).await?;
    let next_cursor = next_cursor(&items, limit, |b| b.id);
    Ok(Json(BackupPage { items, next_cursor }))
}

/// Crypto-shred a deleted tenant's backups: its data key is forgotten and
/// the objects deleted; nothing can read them again.
#[utoipa::path(delete, path = "/tenants/{tenant}/backups", tag = "backups",
    params(("tenant" = String, Path, description = "slug or id")),
    responses((status = 200, body = Erased), AdminErrors, (status = 404, description = "no such tenant"),
        (status = 409, description = "the tenant is not deleted, or storage is not configured")))]
async fn erase_backups(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(tenant): Path<String>,
) -> ApiResult<Json<Erased>> {
    let t = find_any(&state, &tenant).await?;
    let n = state
        .control
        .backups()?
        .erase_backups(t, actor.name())
        .await?;
    Ok(Json(Erased { backups_erased: n }))
}

/// One backup.
#[utoipa::path(get, path = "/backups/{id}", tag = "backups",
    params(("id" = Uuid, Path)),
    responses((status = 200, body = Backup), AdminErrors, (status = 404, description = "no such backup")))]
async fn get_backup(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Backup>> {
    let id = backup_id(&id)?;
    state
        .registry()
        .backup(id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("backup"))
}

/// Restore a backup into a scratch database and compare row counts with
/// those recorded at backup time.
#[utoipa::path(post, path = "/backups/{id}/verify", tag = "backups",
    params(("id" = Uuid, Path)),
    responses((status = 202, body = Operation), AdminErrors, (status = 404, description = "no such backup"),
        (status = 409, description = "the backup cannot be read (not succeeded, or its key erased), \
            or storage is not configured")))]
async fn verify_backup(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    let id = backup_id(&id)?;
    let op = state.control.backups()?.start_verify(id).await?;
    state
        .registry()
        .audit(
            actor.name(),
            "backup.verify",
            op.tenant_id,
            serde_json::json!({"backup_id": id, "operation": op.id}),
        )
        .await?;
    Ok((StatusCode::ACCEPTED, Json(op)))
}

/// Restore a backup into its tenant (replacing its database; the tenant keeps
/// serving its current one until the swap) or into `into_slug`.
#[utoipa::path(post, path = "/backups/{id}/restore", tag = "backups", request_body = Option<RestoreBackupBody>,
    params(("id" = Uuid, Path)),
    responses((status = 202, body = Operation), AdminErrors, OptionalJsonBody,
        (status = 404, description = "no such backup"),
        (status = 409, description = "the backup cannot be restored now, storage is not configured, \
            or the target tenant holds data and the body does not say `\"overwrite\": true`"),
        (status = 422, description = "the body does not fit, or `into_slug` is not a slug or names \
            another existing tenant than the backup's")))]
async fn restore_backup(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
    OptionalJson(body): OptionalJson<RestoreBackupBody>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    let id = backup_id(&id)?;
    let (into, overwrite) = body.map_or((None, false), |b| (b.into_slug, b.overwrite));
    let target = match into {
        Some(slug) => RestoreTarget::IntoSlug(Slug::parse(&slug)?),
        None => RestoreTarget::InPlace,
    };
    let op = state
        .control
        .start_restore(id, target, overwrite, actor.name(), None)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(op)))
}

/// Archive a tenant: final backup, verified, then database and role dropped.
#[utoipa::path(post, path = "/tenants/{tenant}/archive", tag = "backups",
    params(("tenant" = String, Path, description = "slug or id")),
    responses((status = 202, body = Operation), AdminErrors, (status = 404, description = "no such tenant"),
        (status = 409, description = "the tenant cannot be archived now, or storage is not configured")))]
async fn archive_tenant(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(tenant): Path<String>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    let t = resolve(&state, &tenant).await?;
    let op = state
        .control
        .backups()?
        .start_archive(t.id, actor.name())
        .await?;
    state.router.invalidate(t.id).await;
    Ok((StatusCode::ACCEPTED, Json(op)))
}

/// Restore a tenant from a backup (default: its newest): an archived tenant
/// comes back `active` at the latest schema; an active one gets its data
/// replaced.
#[utoipa::path(post, path = "/tenants/{tenant}/restore", tag = "backups", request_body = Option<RestoreTenantBody>,
    params(("tenant" = String, Path, description = "slug or id")),
    responses((status = 202, body = Operation), AdminErrors, OptionalJsonBody,
        (status = 404, description = "no such tenant, or no such backup"),
        (status = 409, description = "the tenant has no succeeded backup or cannot be restored now, \
            storage is not configured, or it holds data and the body does not say `\"overwrite\": true`"),
        (status = 422, description = "the body does not fit, or `backup_id` names another tenant's backup")))]
async fn restore_tenant(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(tenant): Path<String>,
    OptionalJson(body): OptionalJson<RestoreTenantBody>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    let t = resolve(&state, &tenant).await?;
    let reg = state.registry();
    let (backup_id, overwrite) = body.map_or((None, false), |b| (b.backup_id, b.overwrite));
    let backup = match backup_id {
        Some(id) => {
            let b = reg
                .backup(id)
                .await?
                .ok_or_else(|| ApiError::not_found("backup"))?;
            if b.tenant_id != t.id {
                return Err(ApiError::invalid("backup_id names another tenant's backup"));
            }
            b
        }
        None => reg
            .latest_good_backup(t.id)
            .await?
            .ok_or_else(|| ApiError::Conflict("the tenant has no succeeded backup".into()))?,
    };
    let op = state
        .control
        .start_restore(
            backup.id,
            RestoreTarget::InPlace,
            overwrite,
            actor.name(),
            None,
        )
        .await?;
    Ok((StatusCode::ACCEPTED, Json(op)))
}

fn backup_id(raw: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found("backup"))
}

/// A tenant by slug or id, deleted ones included (erasure is for those).
async fn find_any(state: &AppState, slug_or_id: &str) -> ApiResult<Uuid> {
    if let Ok(id) = Uuid::parse_str(slug_or_id) {
        if state.registry().tenant(id).await?.is_some() {
            return Ok(id);
        }
    }
    Ok(resolve(state, slug_or_id).await?.id)
}
