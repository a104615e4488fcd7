//! `/admin/v1/migrations/tenants`: fleet migrations and who is behind.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Extension;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::auth::Actor;
use crate::api::error::{ApiError, ApiResult, Json};
use crate::api::responses::{AdminErrors, JsonBody};
use crate::api::AppState;
use crate::migrate::{FleetOptions, MAX_CONCURRENCY};
use crate::registry::Operation;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(start_migration, migration_status))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartMigration {
    /// Tenants migrated at once (1..=32); default from the servers' budgets.
    concurrency: Option<usize>,
    /// Only this tenant (slug or id).
    tenant: Option<String>,
    /// Report who would be migrated; change nothing.
    #[serde(default)]
    dry_run: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VersionCount {
    schema_version: Option<i64>,
    tenants: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MigrationStatus {
    latest_version: i64,
    versions: Vec<VersionCount>,
    /// Slugs of tenants behind the latest version (first 500).
    behind: Vec<String>,
}

/// Migrate every tenant database to the latest schema, as an operation.
#[utoipa::path(post, path = "/migrations/tenants", tag = "migrations", request_body = StartMigration,
    responses((status = 202, body = Operation), AdminErrors, JsonBody,
        (status = 409, description = "a fleet migration is running; `operation_id` names it"),
        (status = 422, description = "the body does not fit, `concurrency` is out of range, or \
            `tenant` names no tenant")))]
async fn start_migration(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Json(body): Json<StartMigration>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    if body
        .concurrency
        .is_some_and(|c| !(1..=MAX_CONCURRENCY).contains(&c))
    {
        return Err(ApiError::invalid(format!(
            "concurrency must be between 1 and {MAX_CONCURRENCY}"
        )));
    }
    let options = FleetOptions {
        concurrency: body.concurrency,
        tenant: body.tenant,
        dry_run: body.dry_run,
    };
    let run = state.control.fleet().start(options, actor.name()).await?;
    let operation = run.operation.clone();
    let control = state.control.clone();
    state.control.tasks().spawn(async move {
        if let Err(e) = control.run_fleet(run, |_, _| {}).await {
            tracing::error!("failed to run a fleet migration: {e:#}");
        }
    });
    Ok((StatusCode::ACCEPTED, Json(operation)))
}

/// Tenants per schema version, and who is behind.
#[utoipa::path(get, path = "/migrations/tenants", tag = "migrations",
    responses((status = 200, body = MigrationStatus), AdminErrors))]
async fn migration_status(State(state): State<AppState>) -> ApiResult<Json<MigrationStatus>> {
    let latest = state.control.latest_version();
    let versions = state
        .registry()
        .schema_versions()
        .await?
        .into_iter()
        .map(|(schema_version, tenants)| VersionCount {
            schema_version,
            tenants,
        })
        .collect();
    let behind = state
        .registry()
        .tenants_behind(latest, None)
        .await?
        .into_iter()
        .take(500)
        .map(|t| t.slug)
        .collect();
    Ok(Json(MigrationStatus {
        latest_version: latest,
        versions,
        behind,
    }))
}
