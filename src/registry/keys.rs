//! Where the control DB keeps values sealed under the master key, and the
//! queries that re-seal them under a new one (`silo master-key rotate`).

use sqlx::{ConnectOptions, Connection, PgConnection};
use uuid::Uuid;

use super::{Registry, Result};

/// The SQL type of a row's id, which is also what its value's associated
/// data is made of: a uuid's 16 bytes, or a text's UTF-8 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowId {
    Uuid,
    Text,
}

/// A column of values sealed under the master key, and the column naming
/// the key id each was sealed under.
#[derive(Debug, Clone, Copy)]
pub struct SealedColumn {
    pub table: &'static str,
    /// The row's id column.
    pub id: &'static str,
    pub id_kind: RowId,
    pub sealed: &'static str,
    pub key_id: &'static str,
    /// Put before the id's bytes to make the associated data the value was
    /// sealed with (it binds the value to its row).
    pub aad_prefix: &'static [u8],
}

const fn column(
    table: &'static str,
    id: &'static str,
    id_kind: RowId,
    sealed: &'static str,
    key_id: &'static str,
    aad_prefix: &'static [u8],
) -> SealedColumn {
    SealedColumn {
        table,
        id,
        id_kind,
        sealed,
        key_id,
        aad_prefix,
    }
}

/// Put before a tenant's id to make the associated data of its reader
/// role's sealed password (so it can never pass for the tenant role's).
pub const READER_AAD_PREFIX: &[u8] = b"silo-reader:";

/// The associated data a tenant's reader password is sealed with.
pub fn reader_aad(tenant: Uuid) -> Vec<u8> {
    [READER_AAD_PREFIX, tenant.as_bytes().as_slice()].concat()
}

/// Every column of the control DB holding a value sealed under the master
/// key: (table, id column, id type, sealed column, key-id column, AAD prefix).
/// A new sealed column is one more line here; the re-seal and `--check`
/// read this table only.
pub const SEALED_COLUMNS: &[SealedColumn] = &[
    // A tenant server's admin URL (servers::ServerPools::register).
    column(
        "db_servers",
        "id",
        RowId::Uuid,
        "admin_url_enc",
        "key_id",
        b"",
    ),
    // A tenant role's password (provision, lifecycle, relocate, restore).
    column("tenants", "id", RowId::Uuid, "password_enc", "key_id", b""),
    // A credential rotation's new password, until promoted (lifecycle).
    column(
        "tenants",
        "id",
        RowId::Uuid,
        "pending_password_enc",
        "pending_key_id",
        b"",
    ),
    // A tenant's backup data key (backup::run, `data_key_context`).
    column(
        "tenants",
        "id",
        RowId::Uuid,
        "backup_key_enc",
        "backup_key_id",
        b"silo-backup-key:",
    ),
    // A tenant reader role's password (provision::readers).
    column(
        "tenants",
        "id",
        RowId::Uuid,
        "reader_password_enc",
        "reader_key_id",
        READER_AAD_PREFIX,
    ),
    // A warm-pool spare role's password (provision::template).
    column(
        "spares",
        "database_name",
        RowId::Text,
        "password_enc",
        "key_id",
        b"",
    ),
];

impl SealedColumn {
    /// `table.column`, as reports name it.
    pub fn name(&self) -> String {
        format!("{}.{}", self.table, self.sealed)
    }

    /// The associated data the value of row `id` was sealed with; `None` if
    /// `id` is not of the column's id type.
    pub fn context(&self, id: &str) -> Option<Vec<u8>> {
        let mut context = self.aad_prefix.to_vec();
        match self.id_kind {
            RowId::Uuid => context.extend_from_slice(Uuid::parse_str(id).ok()?.as_bytes()),
            RowId::Text => context.extend_from_slice(id.as_bytes()),
        }
        Some(context)
    }

    fn id_type(&self) -> &'static str {
        match self.id_kind {
            RowId::Uuid => "uuid",
            RowId::Text => "text",
        }
    }
}

/// A stored sealed value, as read. `Debug` leaves out the ciphertext.
#[derive(Clone)]
pub struct SealedRow {
    /// The row's id, as text.
    pub id: String,
    pub sealed: Vec<u8>,
    pub key_id: Option<String>,
}

impl std::fmt::Debug for SealedRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedRow")
            .field("id", &self.id)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// How many values of `col` are sealed under each key id.
    pub async fn sealed_key_ids(&self, col: &SealedColumn) -> Result<Vec<(Option<String>, i64)>> {
        let sql = format!(
            "SELECT {k}, count(*) FROM {t} WHERE {s} IS NOT NULL GROUP BY {k} ORDER BY {k}",
            k = col.key_id,
            t = col.table,
            s = col.sealed,
        );
        Ok(sqlx::query_as(&sql).fetch_all(&self.pool).await?)
    }

    /// Up to `limit` values of `col` not sealed under `key_id`, in id order,
    /// after row `after` (to page through them).
    pub async fn sealed_not_under(
        &self,
        col: &SealedColumn,
        key_id: &str,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<SealedRow>> {
        let sql = format!(
            "SELECT {id}::text, {s}, {k} FROM {t}
              WHERE {s} IS NOT NULL AND {k} IS DISTINCT FROM $1
                AND ($2::text IS NULL OR {id} > $2::{ty})
              ORDER BY {id} LIMIT $3",
            id = col.id,
            s = col.sealed,
            k = col.key_id,
            t = col.table,
            ty = col.id_type(),
        );
        let rows: Vec<(String, Vec<u8>, Option<String>)> = sqlx::query_as(&sql)
            .bind(key_id)
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, sealed, key_id)| SealedRow { id, sealed, key_id })
            .collect())
    }

    /// A control-DB session of its own for re-sealing values in place.
    pub async fn resealer(&self) -> Result<Resealer> {
        let opts = (*self.pool.connect_options())
            .clone()
            .application_name("silo-rekey");
        let mut conn = opts.connect().await?;
        // Its updates change ciphertexts, never a password: the tenant
        // trigger does not announce them (migration 0011), so no router
        // drops a pool for a re-seal. A lock held elsewhere makes it give
        // up on a row rather than wait for long.
        sqlx::raw_sql("SET silo.resealing = 'on'; SET lock_timeout = '10s'")
            .execute(&mut conn)
            .await?;
        Ok(Resealer { conn })
    }
}

/// A session replacing sealed values in place, one row per statement (each
/// its own transaction: a run killed anywhere leaves every row whole, old or
/// new). Its updates are not announced to routers.
pub struct Resealer {
    conn: PgConnection,
}

impl Resealer {
    /// Store `sealed` under `key_id` as the value of `row`, only if the row
    /// still holds exactly what was read (the same ciphertext under the same
    /// key id). `false` when it changed meanwhile, or is gone.
    pub async fn swap(
        &mut self,
        col: &SealedColumn,
        row: &SealedRow,
        sealed: &[u8],
        key_id: &str,
    ) -> Result<bool> {
        let sql = format!(
            "UPDATE {t} SET {s} = $2, {k} = $3
              WHERE {id} = $1::{ty} AND {s} = $4 AND {k} IS NOT DISTINCT FROM $5",
            t = col.table,
            s = col.sealed,
            k = col.key_id,
            id = col.id,
            ty = col.id_type(),
        );
        let done = sqlx::query(&sql)
            .bind(&row.id)
            .bind(sealed)
            .bind(key_id)
            .bind(&row.sealed)
            .bind(&row.key_id)
            .execute(&mut self.conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn close(self) {
        self.conn.close().await.ok();
    }
}
