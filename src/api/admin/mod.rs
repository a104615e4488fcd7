//! The admin API, `/admin/v1`; each resource owns its routes.

mod app_credentials;
mod backups;
mod keys;
mod migrations;
mod operations;
mod plans;
mod pools;
mod servers;
mod tenants;
mod usage;

use utoipa_axum::router::OpenApiRouter;

use super::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(tenants::router())
        .merge(app_credentials::router())
        .merge(operations::router())
        .merge(servers::router())
        .merge(pools::router())
        .merge(migrations::router())
        .merge(backups::router())
        .merge(keys::router())
        .merge(plans::router())
        .merge(usage::router())
}
