//! Spare databases of the warm pool: cloned ahead of time, renamed into a tenant.

use sqlx::FromRow;
use uuid::Uuid;

use super::Registry;

#[derive(Debug, Clone, FromRow)]
pub struct Spare {
    pub database_name: String,
    pub server_id: Uuid,
    pub schema_version: i64,
}

impl Registry {
    /// Record a spare that exists and is ready.
    pub async fn insert_spare(
        &self,
        server: Uuid,
        database: &str,
        schema_version: i64,
    ) -> sqlx::Result<()> {
        sqlx::query(
            "INSERT INTO spares (database_name, server_id, schema_version) VALUES ($1, $2, $3)",
        )
        .bind(database)
        .bind(server)
        .bind(schema_version)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// Take the oldest spare at `schema_version` off the pool. The caller now
    /// owns the database; if it dies before renaming it, the sweep drops it.
    pub async fn claim_spare(
        &self,
        server: Uuid,
        schema_version: i64,
    ) -> sqlx::Result<Option<String>> {
        // Lazy commit: if lost, the row points at a renamed database and the
        // sweep removes it (see `begin_lazy`).
        let mut tx = self.begin_lazy().await?;
        let name = sqlx::query_scalar(
            "DELETE FROM spares WHERE database_name = (
                SELECT database_name FROM spares WHERE server_id = $1 AND schema_version = $2
                 ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING database_name",
        )
        .bind(server)
        .bind(schema_version)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(name)
    }

    pub async fn spares(&self, server: Uuid) -> sqlx::Result<Vec<Spare>> {
        sqlx::query_as(
            "SELECT database_name, server_id, schema_version FROM spares WHERE server_id = $1",
        )
        .bind(server)
        .fetch_all(&self.pool)
        .await
    }

    pub async fn delete_spare(&self, database: &str) -> sqlx::Result<()> {
        sqlx::query("DELETE FROM spares WHERE database_name = $1")
            .bind(database)
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    /// Spares ready across all servers.
    pub async fn spare_count(&self) -> sqlx::Result<i64> {
        sqlx::query_scalar("SELECT count(*) FROM spares")
            .fetch_one(&self.pool)
            .await
    }
}
