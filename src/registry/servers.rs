//! Tenant DB servers: where tenant databases live, and how much they may hold.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::FromRow;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Error, Registry, Result};

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
    /// Tenants being moved to the server (unfinished moves): they count
    /// against `max_tenants` from the start of their move.
    #[serde(skip)]
    pub moving_in: i64,
    pub created_at: DateTime<Utc>,
    /// When a health check last ran (from any silo replica).
    pub checked_at: Option<DateTime<Utc>>,
    /// When a health check last succeeded.
    pub last_ok_at: Option<DateTime<Utc>>,
    /// The cluster behind the server (`pg_control_system()`), once known.
    #[serde(skip)]
    pub system_identifier: Option<String>,
    #[serde(skip)]
    pub cluster_port: Option<i32>,
    /// Why the last check failed; `null` once one succeeds. Never holds the URL.
    pub health_error: Option<String>,
}

impl DbServer {
    /// Why this server takes no new tenants, if it does not.
    pub fn refusal(&self) -> Option<String> {
        let used = self.tenant_count + self.moving_in;
        self.refusal_given_room(used < i64::from(self.max_tenants))
    }

    /// [`Self::refusal`], with whether the server has room counted apart
    /// (for a move, by [`Registry::move_has_room`]).
    pub fn refusal_given_room(&self, has_room: bool) -> Option<String> {
        match self.status.as_str() {
            "active" if !has_room => Some(match self.moving_in {
                0 => format!(
                    "it is full ({} of {} tenants)",
                    self.tenant_count, self.max_tenants
                ),
                n => format!(
                    "it is full ({} of {} tenants, {n} more being moved to it)",
                    self.tenant_count, self.max_tenants
                ),
            }),
            "active" => None,
            "unhealthy" => Some(match &self.health_error {
                Some(e) => format!("it is unhealthy (last check: {e})"),
                None => "it is unhealthy".to_owned(),
            }),
            other => Some(format!("it is {other}")),
        }
    }
}

/// A server to register.
pub struct NewServer<'a> {
    pub id: Uuid,
    pub name: &'a str,
    pub admin_url_enc: &'a [u8],
    pub key_id: &'a str,
    pub max_connections: i32,
    pub max_tenants: i32,
    /// `system_identifier` and port of its cluster.
    pub cluster: (&'a str, i32),
}

/// A status change made by a health check: `(before, after)`.
pub type StatusChange = (String, String);

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
        s.status, s.template_version, s.created_at, s.checked_at, s.last_ok_at, s.health_error,
        s.system_identifier, s.cluster_port,
        (SELECT count(*) FROM tenants t WHERE t.server_id = s.id AND t.status <> 'deleted') AS tenant_count,
        (SELECT count(*) FROM operations o JOIN tenants t ON t.id = o.tenant_id
          WHERE o.kind = 'tenant.move' AND o.status IN ('queued', 'pending', 'running')
            AND o.params->>'to_server' = s.id::text
            AND t.server_id <> s.id AND t.status <> 'deleted') AS moving_in
   FROM db_servers s";

/// Whether server `$1` has room for one more tenant: its tenants that are
/// not deleted, and those being moved to it, other than tenant `$2`; a
/// move counts only when its operation's `(created_at, id)` is before `$3`
/// (all of them when `$3` is null).
const HAS_ROOM: &str = "SELECT (SELECT count(*) FROM tenants t
                  WHERE t.server_id = $1 AND t.status <> 'deleted' AND t.id IS DISTINCT FROM $2)
      + (SELECT count(*) FROM operations o JOIN tenants t ON t.id = o.tenant_id
          WHERE o.kind = 'tenant.move' AND o.status IN ('queued', 'pending', 'running')
            AND o.params->>'to_server' = $1::text
            AND t.server_id <> $1 AND t.status <> 'deleted'
            AND t.id IS DISTINCT FROM $2
            AND ($3::uuid IS NULL
                 OR (o.created_at, o.id) < (SELECT created_at, id FROM operations WHERE id = $3)))
      < (SELECT max_tenants FROM db_servers WHERE id = $1)";

impl Registry {
    /// Register a server; a taken name fails on `db_servers_name_key`, a
    /// cluster registered already on `db_servers_cluster_key`.
    #[tracing::instrument(skip(self, new), fields(name = new.name))]
    pub async fn insert_server(&self, new: &NewServer<'_>) -> Result<()> {
        sqlx::query(
            "INSERT INTO db_servers (id, name, admin_url_enc, key_id, max_connections, max_tenants,
                                     system_identifier, cluster_port)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(new.id)
        .bind(new.name)
        .bind(new.admin_url_enc)
        .bind(new.key_id)
        .bind(new.max_connections)
        .bind(new.max_tenants)
        .bind(new.cluster.0)
        .bind(new.cluster.1)
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(Error::from)
    }

    /// Forget a server registered a moment ago that turned out not to be
    /// ours to register (it holds no tenant yet).
    pub async fn forget_new_server(&self, id: Uuid) -> Result<()> {
        sqlx::query(
            "DELETE FROM db_servers s WHERE id = $1
               AND NOT EXISTS (SELECT 1 FROM tenants t WHERE t.server_id = s.id)
               AND NOT EXISTS (SELECT 1 FROM spares p WHERE p.server_id = s.id)",
        )
        .bind(id)
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(Error::from)
    }

    /// The server registered for this cluster, if one is.
    pub async fn server_by_cluster(
        &self,
        system_identifier: &str,
        port: i32,
    ) -> Result<Option<DbServer>> {
        sqlx::query_as(&format!(
            "{SELECT_SERVER} WHERE s.system_identifier = $1 AND s.cluster_port = $2"
        ))
        .bind(system_identifier)
        .bind(port)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Record the cluster behind a server registered before clusters were
    /// (fails on `db_servers_cluster_key` if another server has it).
    pub async fn set_server_cluster(
        &self,
        id: Uuid,
        system_identifier: &str,
        port: i32,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE db_servers SET system_identifier = $2, cluster_port = $3, updated_at = now()
              WHERE id = $1",
        )
        .bind(id)
        .bind(system_identifier)
        .bind(port)
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(Error::from)
    }

    pub async fn servers(&self) -> Result<Vec<DbServer>> {
        sqlx::query_as(&format!("{SELECT_SERVER} ORDER BY s.created_at, s.id"))
            .fetch_all(&self.pool)
            .await
            .map_err(Error::from)
    }

    pub async fn server(&self, id: Uuid) -> Result<Option<DbServer>> {
        sqlx::query_as(&format!("{SELECT_SERVER} WHERE s.id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::from)
    }

    pub async fn server_by_name(&self, name: &str) -> Result<Option<DbServer>> {
        sqlx::query_as(&format!("{SELECT_SERVER} WHERE s.name = $1"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::from)
    }

    /// The active, not full server with the most headroom: the smallest share
    /// of its tenant capacity used, then the most connections per tenant.
    pub async fn least_loaded_server(&self) -> Result<Option<DbServer>> {
        sqlx::query_as(&format!(
            "SELECT * FROM ({SELECT_SERVER} WHERE s.status = 'active') x
              WHERE tenant_count + moving_in < max_tenants
              ORDER BY (tenant_count + moving_in)::float8 / max_tenants,
                       max_connections::float8 / (tenant_count + moving_in + 1) DESC,
                       created_at, id
              LIMIT 1"
        ))
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Whether server `server` has room for one more tenant, counted under
    /// a lock on its row held until `tx` ends: whoever counts next waits
    /// for what `tx` adds. `tenant` and `move_op`: see [`HAS_ROOM`].
    pub(crate) async fn has_room_in(
        tx: &mut sqlx::PgConnection,
        server: Uuid,
        tenant: Option<Uuid>,
        move_op: Option<Uuid>,
    ) -> Result<bool> {
        // Not `FOR UPDATE`: that would also wait for (and hold up) the
        // foreign-key checks of rows naming the server, a move's switch.
        sqlx::query("SELECT 1 FROM db_servers WHERE id = $1 FOR NO KEY UPDATE")
            .bind(server)
            .execute(&mut *tx)
            .await?;
        Ok(sqlx::query_scalar::<_, Option<bool>>(HAS_ROOM)
            .bind(server)
            .bind(tenant)
            .bind(move_op)
            .fetch_one(&mut *tx)
            .await?
            .unwrap_or(false))
    }

    /// Whether the move `op` of `tenant` may go on to `server`: the
    /// server's tenants and the moves to it started before this one leave
    /// room. Two moves started at once cannot both fill its last place, nor
    /// a move and a create (which counts every unfinished move).
    pub async fn move_has_room(&self, server: Uuid, tenant: Uuid, op: Uuid) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let room = Self::has_room_in(&mut tx, server, Some(tenant), Some(op)).await?;
        tx.commit().await?;
        Ok(room)
    }

    /// Change a server's status or limits; `None` leaves a field as it is.
    /// Returns the server, or `None` if no server has that name.
    #[tracing::instrument(skip(self))]
    pub async fn update_server(
        &self,
        name: &str,
        status: Option<&str>,
        max_connections: Option<i32>,
        max_tenants: Option<i32>,
    ) -> Result<Option<DbServer>> {
        let id: Option<Uuid> = sqlx::query_scalar(
            "UPDATE db_servers
                SET status = coalesce($2, status),
                    max_connections = coalesce($3, max_connections),
                    max_tenants = coalesce($4, max_tenants),
                    updated_at = now()
              WHERE name = $1
             RETURNING id",
        )
        .bind(name)
        .bind(status)
        .bind(max_connections)
        .bind(max_tenants)
        .fetch_optional(&self.pool)
        .await?;
        match id {
            Some(id) => self.server(id).await,
            None => Ok(None),
        }
    }

    /// A server's admin URL, sealed again (a changed login password).
    pub async fn set_server_admin_url(
        &self,
        id: Uuid,
        sealed: &[u8],
        key_id: &str,
    ) -> Result<Option<DbServer>> {
        sqlx::query("UPDATE db_servers SET admin_url_enc = $2, key_id = $3, updated_at = now() WHERE id = $1")
            .bind(id)
            .bind(sealed)
            .bind(key_id)
            .execute(&self.pool)
            .await?;
        self.server(id).await
    }

    /// Record a passed health check: an `unhealthy` server becomes `active`
    /// again (`draining` stays). Safe to run from several replicas at once.
    pub async fn record_server_ok(&self, id: Uuid) -> Result<Option<StatusChange>> {
        sqlx::query_as(
            "UPDATE db_servers s
                SET checked_at = now(), last_ok_at = now(), health_error = NULL,
                    status = CASE WHEN old.status = 'unhealthy' THEN 'active' ELSE old.status END,
                    updated_at = CASE WHEN old.status = 'unhealthy' THEN now() ELSE s.updated_at END
               FROM (SELECT id, status FROM db_servers WHERE id = $1 FOR UPDATE) old
              WHERE s.id = old.id
             RETURNING old.status, s.status",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::from)
    }

    /// Record a failed health check. An `active` server becomes `unhealthy`
    /// once no check has passed for `unhealthy_after` (counted from its
    /// registration if none ever has). Safe to run from several replicas at once.
    pub async fn record_server_failure(
        &self,
        id: Uuid,
        error: &str,
        unhealthy_after: std::time::Duration,
    ) -> Result<Option<StatusChange>> {
        sqlx::query_as(
            "UPDATE db_servers s
                SET checked_at = now(), health_error = $2,
                    status = CASE WHEN old.failing THEN 'unhealthy' ELSE old.status END,
                    updated_at = CASE WHEN old.failing THEN now() ELSE s.updated_at END
               FROM (SELECT id, status,
                            status = 'active'
                              AND coalesce(last_ok_at, created_at) < now() - make_interval(secs => $3)
                              AS failing
                       FROM db_servers WHERE id = $1 FOR UPDATE) old
              WHERE s.id = old.id
             RETURNING old.status, s.status",
        )
        .bind(id)
        .bind(error)
        .bind(unhealthy_after.as_secs_f64())
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::from)
    }

    pub async fn set_template_version(&self, id: Uuid, version: Option<i64>) -> Result<()> {
        sqlx::query("UPDATE db_servers SET template_version = $2, updated_at = now() WHERE id = $1")
            .bind(id)
            .bind(version)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(Error::from)
    }
}
