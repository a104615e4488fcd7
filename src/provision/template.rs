//! The template database and the warm pool of each server.
//!
//! `silo_template` is kept at the latest tenant migration, with connections
//! disallowed so nobody can hold it open and block a clone, and closed to
//! PUBLIC from the moment it exists (a session in it could plant rows every
//! future tenant is cloned with). It grants nothing to any tenant role. Spares are clones
//! of it, recorded in the registry once they exist; claiming one is a row
//! delete plus a rename, which is why a warm create takes milliseconds.

use anyhow::Context;
use uuid::Uuid;

use super::Provisioner;
use crate::registry::{DbServer, Spare};
use crate::servers::names::{SPARE_DB_PREFIX, SPARE_ROLE_PREFIX, TEMPLATE_DB};
use crate::servers::roles::{self, database_exists};
use crate::servers::{schema, ServerAdmin};

/// The comment a template built with per-tenant privileges carries; one
/// without it (built before) is rebuilt.
/// A spare role's connection limit until a tenant takes it (then its plan's).
const SPARE_CONNECTION_LIMIT: i32 = 5;

const TEMPLATE_MARK: &str = "silo template: no privilege for any tenant role";

/// The template exists, was built closed and with per-tenant privileges, and
/// PUBLIC may not connect to it.
async fn template_sealed(admin: &ServerAdmin) -> anyhow::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_database d
                         WHERE d.datname = $1 AND shobj_description(d.oid, 'pg_database') = $2
                           AND NOT has_database_privilege('public', d.oid, 'CONNECT'))",
    )
    .bind(TEMPLATE_DB)
    .bind(TEMPLATE_MARK)
    .fetch_one(&admin.pool)
    .await
    .map_err(|e| admin.error(None, e).into())
}

impl Provisioner {
    /// Rebuild the server's template if it is missing or behind. Caller holds
    /// the server's maintenance lock.
    pub async fn ensure_template(
        &self,
        server: &DbServer,
        admin: &ServerAdmin,
    ) -> anyhow::Result<()> {
        let latest = self.inner.schema.latest_version();
        // `>=`: during a rolling deploy an older replica must not undo a newer template.
        if server.template_version >= Some(latest) && template_sealed(admin).await? {
            return Ok(());
        }
        tracing::info!(server = %server.name, version = latest, "building template database");
        // Nobody clones a template that is being rebuilt.
        self.registry()
            .set_template_version(server.id, None)
            .await?;
        if database_exists(admin, TEMPLATE_DB).await? {
            admin
                .exec(&format!(
                    "ALTER DATABASE {TEMPLATE_DB} WITH IS_TEMPLATE false"
                ))
                .await
                .context("unmark the old template database")?;
            roles::drop_database(admin, TEMPLATE_DB)
                .await
                .context("drop the old template database")?;
        }
        // Born closed: nobody but silo ever connects to it.
        roles::create_database(admin, TEMPLATE_DB, None, "")
            .await
            .context("create the template database")?;
        admin
            .exec(&roles::database_grants(TEMPLATE_DB, None))
            .await
            .context("close the template database to PUBLIC")?;
        let db = admin
            .single_pool(TEMPLATE_DB)
            .await
            .context("connect to the template database")?;
        let migrated = self.inner.schema.apply(&db, None).await;
        db.close().await;
        migrated?;
        let foreign = roles::foreign_sessions(admin, TEMPLATE_DB, None).await?;
        anyhow::ensure!(
            foreign.is_empty(),
            "seal the template database: sessions of other roles are inside ({})",
            foreign.join(", ")
        );
        admin
            .exec(&format!(
                "ALTER DATABASE {TEMPLATE_DB} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false;
                 COMMENT ON DATABASE {TEMPLATE_DB} IS '{TEMPLATE_MARK}'"
            ))
            .await
            .context("seal the template database")?;
        self.registry()
            .set_template_version(server.id, Some(latest))
            .await?;
        Ok(())
    }

    /// Clone up to `batch` spares towards `warm_pool_size` at the latest version.
    /// Caller holds the server's maintenance lock. Returns how many it made.
    pub async fn refill_warm_pool(
        &self,
        server: &DbServer,
        admin: &ServerAdmin,
        batch: usize,
    ) -> anyhow::Result<u32> {
        let latest = self.inner.schema.latest_version();
        let want = self.inner.config.warm_pool_size as usize;
        if want == 0 || server.template_version != Some(latest) {
            return Ok(0);
        }
        let have = self
            .registry()
            .spares(server.id)
            .await?
            .iter()
            .filter(|s| s.schema_version == latest && s.role_name.is_some() && s.own_privileges)
            .count();
        let mut made = 0;
        for _ in (have..want).take(batch) {
            self.make_spare(server, admin, latest).await?;
            made += 1;
        }
        Ok(made)
    }

    /// Clone one spare: database, its login role with CONNECT on it only, and a
    /// verified login, so that taking it later is one rename of both. Recorded
    /// last: until then, the sweep owns whatever a crash leaves.
    async fn make_spare(
        &self,
        server: &DbServer,
        admin: &ServerAdmin,
        version: i64,
    ) -> anyhow::Result<()> {
        let hex = Uuid::new_v4().simple().to_string();
        let database = format!("{SPARE_DB_PREFIX}{hex}");
        let role = format!("{SPARE_ROLE_PREFIX}{hex}");
        roles::create_database(admin, &database, Some(TEMPLATE_DB), "")
            .await
            .context("clone a spare database")?;
        let password = crate::crypto::random_password(32);
        roles::create_role(admin, &role, &database, &password, SPARE_CONNECTION_LIMIT)
            .await
            .context("create the spare's role")?;
        let db = admin
            .single_pool(&database)
            .await
            .context("connect to the spare database")?;
        let granted = schema::grant(&db, Some(&role)).await;
        db.close().await;
        granted?;
        roles::verify_login(admin, &database, &role, &password)
            .await
            .context("verify the spare's role can log in")?;
        let foreign = roles::foreign_sessions(admin, &database, Some(&role)).await?;
        anyhow::ensure!(
            foreign.is_empty(),
            "verify the spare: sessions of other roles are inside ({})",
            foreign.join(", ")
        );
        let sealed = self
            .keyring()
            .seal(password.as_bytes(), database.as_bytes());
        self.registry()
            .insert_spare(&Spare {
                database_name: database,
                server_id: server.id,
                schema_version: version,
                role_name: Some(role),
                password_enc: Some(sealed),
                key_id: Some(self.keyring().key_id().to_owned()),
                own_privileges: true,
            })
            .await?;
        Ok(())
    }

    /// Wait until a spare is taken (`true`) or `timeout` passes (`false`).
    pub async fn spare_taken(&self, timeout: std::time::Duration) -> bool {
        tokio::time::timeout(timeout, self.inner.spare_taken.notified())
            .await
            .is_ok()
    }

    /// Fill every active server's warm pool now (template first). Skips a server whose
    /// maintenance lock another task or replica holds.
    pub async fn refill_all(&self) -> anyhow::Result<u32> {
        self.refill(usize::MAX).await
    }

    /// As [`Self::refill_all`], but at most `batch` clones per server, so a
    /// caller can stop between batches (shutdown) or yield to creates.
    pub async fn refill(&self, batch: usize) -> anyhow::Result<u32> {
        let mut made = 0;
        for server in self.registry().servers().await? {
            // Draining and unhealthy servers get no new tenants, so no spares;
            // and a server that is down must not hold up the others' refill.
            if server.status != "active" {
                continue;
            }
            let Some(lock) = self.registry().try_lock_server(server.id).await? else {
                continue;
            };
            let result = async {
                let admin = self.inner.servers.admin(&server)?;
                self.ensure_template(&server, &admin).await?;
                let server = self
                    .registry()
                    .server(server.id)
                    .await?
                    .context("re-read server")?;
                self.refill_warm_pool(&server, &admin, batch).await
            }
            .await;
            lock.release().await;
            made +=
                result.with_context(|| format!("refill warm pool of server {}", server.name))?;
        }
        let spares = self.registry().spare_count().await?;
        metrics::gauge!("silo_warm_pool_spares").set(spares as f64);
        Ok(made)
    }
}
