//! Tenant DB servers: where tenant databases live, and how much they may hold.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::FromRow;
use utoipa::ToSchema;
use uuid::Uuid;

use super::Registry;

/// A registered tenant DB server. The admin URL stays sealed in `admin_url_enc`.
#[derive(Clone, FromRow, Serialize, ToSchema)]
pub struct DbServer {
    pub id: Uuid,
    pub name: String,
    #[serde(skip)]
    pub admin_url_enc: Vec<u8>,
    #[serde(skip)]
    pub key_id: String,
    /// Most connections silo opens to this server, over all tenant pools.
    pub max_connections: i32,
    /// Most tenant databases this server may hold.
    pub max_tenants: i32,
    pub status: String,
    /// Tenant schema version of the template database, once built.
    pub template_version: Option<i64>,
    /// Tenants on the server that are not deleted.
    pub tenant_count: i64,
    pub created_at: DateTime<Utc>,
}

impl std::fmt::Debug for DbServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbServer")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("template_version", &self.template_version)
            .finish_non_exhaustive()
    }
}

const SELECT_SERVER: &str = "SELECT s.id, s.name, s.admin_url_enc, s.key_id, s.max_connections, s.max_tenants,
        s.status, s.template_version, s.created_at,
        (SELECT count(*) FROM tenants t WHERE t.server_id = s.id AND t.status <> 'deleted') AS tenant_count
   FROM db_servers s";

impl Registry {
    /// Register a server; a taken name fails on `db_servers_name_key`.
    #[tracing::instrument(skip(self, admin_url_enc))]
    pub async fn insert_server(
        &self,
        id: Uuid,
        name: &str,
        admin_url_enc: &[u8],
        key_id: &str,
        max_connections: i32,
        max_tenants: i32,
    ) -> sqlx::Result<()> {
        sqlx::query(
            "INSERT INTO db_servers (id, name, admin_url_enc, key_id, max_connections, max_tenants)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id)
        .bind(name)
        .bind(admin_url_enc)
        .bind(key_id)
        .bind(max_connections)
        .bind(max_tenants)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    pub async fn servers(&self) -> sqlx::Result<Vec<DbServer>> {
        sqlx::query_as(&format!("{SELECT_SERVER} ORDER BY s.created_at, s.id"))
            .fetch_all(&self.pool)
            .await
    }

    pub async fn server(&self, id: Uuid) -> sqlx::Result<Option<DbServer>> {
        sqlx::query_as(&format!("{SELECT_SERVER} WHERE s.id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
    }

    pub async fn server_by_name(&self, name: &str) -> sqlx::Result<Option<DbServer>> {
        sqlx::query_as(&format!("{SELECT_SERVER} WHERE s.name = $1"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await
    }

    /// The active server with the most free tenant capacity that is not full.
    pub async fn least_loaded_server(&self) -> sqlx::Result<Option<DbServer>> {
        sqlx::query_as(&format!(
            "SELECT * FROM ({SELECT_SERVER} WHERE s.status = 'active') x
              WHERE tenant_count < max_tenants
              ORDER BY tenant_count::float8 / max_tenants, created_at LIMIT 1"
        ))
        .fetch_optional(&self.pool)
        .await
    }

    pub async fn set_template_version(&self, id: Uuid, version: Option<i64>) -> sqlx::Result<()> {
        sqlx::query("UPDATE db_servers SET template_version = $2, updated_at = now() WHERE id = $1")
            .bind(id)
            .bind(version)
            .execute(&self.pool)
            .await
            .map(|_| ())
    }
}
