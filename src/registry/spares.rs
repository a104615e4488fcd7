//! Spare databases of the warm pool: cloned ahead of time, renamed into a tenant.

use sqlx::FromRow;
use uuid::Uuid;

use super::{Error, Registry, Result};

#[derive(Clone, FromRow)]
pub struct Spare {
    pub database_name: String,
    pub server_id: Uuid,
    pub schema_version: i64,
    /// Its login role, ready and verified (None for spares made before roles came with them).
    pub role_name: Option<String>,
    pub password_enc: Option<Vec<u8>>,
    pub key_id: Option<String>,
    /// Its database's privileges are its role's alone (false: granted
    /// through the legacy shared group; the sweep replaces it).
    pub own_privileges: bool,
}

impl std::fmt::Debug for Spare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spare")
            .field("database_name", &self.database_name)
            .field("role_name", &self.role_name)
            .field("schema_version", &self.schema_version)
            .finish_non_exhaustive()
    }
}

const SPARE_COLUMNS: &str =
    "database_name, server_id, schema_version, role_name, password_enc, key_id, own_privileges";

impl Registry {
    /// Record a spare that exists and is ready: database cloned, role
    /// created, granted and verified.
    pub async fn insert_spare(&self, spare: &Spare) -> Result<()> {
        sqlx::query(
            "INSERT INTO spares (database_name, server_id, schema_version, role_name, password_enc, key_id, own_privileges, grants_version)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&spare.database_name)
        .bind(spare.server_id)
        .bind(spare.schema_version)
        .bind(&spare.role_name)
        .bind(&spare.password_enc)
        .bind(&spare.key_id)
        .bind(spare.own_privileges)
        .bind(super::tenants::GRANTS_VERSION)
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(Error::from)
    }

    /// Spares recorded on every server but this one.
    pub async fn spares_not_on(&self, server: Uuid) -> Result<Vec<Spare>> {
        sqlx::query_as(&format!(
            "SELECT {SPARE_COLUMNS} FROM spares WHERE server_id <> $1"
        ))
        .bind(server)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Take the oldest ready spare at `schema_version` off the pool. The
    /// caller now owns its database and role; if it dies before renaming
    /// them, the sweep drops both.
    pub async fn claim_spare(&self, server: Uuid, schema_version: i64) -> Result<Option<Spare>> {
        // Lazy commit: if lost, the row points at renamed objects and the
        // sweep removes it (see `begin_lazy`).
        let mut tx = self.begin_lazy().await?;
        let spare = sqlx::query_as(&format!(
            "DELETE FROM spares WHERE database_name = (
                SELECT database_name FROM spares
                 WHERE server_id = $1 AND schema_version = $2 AND role_name IS NOT NULL
                   AND own_privileges
                 ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING {SPARE_COLUMNS}"
        ))
        .bind(server)
        .bind(schema_version)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(spare)
    }

    pub async fn spares(&self, server: Uuid) -> Result<Vec<Spare>> {
        sqlx::query_as(&format!(
            "SELECT {SPARE_COLUMNS} FROM spares WHERE server_id = $1"
        ))
        .bind(server)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)
    }

    pub async fn delete_spare(&self, database: &str) -> Result<()> {
        sqlx::query("DELETE FROM spares WHERE database_name = $1")
            .bind(database)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(Error::from)
    }

    /// Spares ready across all servers.
    pub async fn spare_count(&self) -> Result<i64> {
        sqlx::query_scalar("SELECT count(*) FROM spares")
            .fetch_one(&self.pool)
            .await
            .map_err(Error::from)
    }
}
