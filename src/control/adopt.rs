//! `silo reconcile --adopt`: register again the tenants whose databases
//! exist but whose registry rows are gone (a control DB restored to a point
//! before they were created). The reconciler keeps such databases and
//! reports them; adopting needs an operator's word, because only they know
//! the registry lost rows rather than someone else creating databases.
//!
//! A tenant database says whose it is in its comment (written when it is
//! made: control plane, tenant id, slug, name, plan). An adopted tenant gets
//! a new password (the old one was sealed in the lost row), is `active`, and
//! its privileges are regranted by the next reconcile pass.

use anyhow::Context;
use serde::Serialize;
use uuid::Uuid;

use super::ControlPlane;
use crate::domain::{Plan, Slug, TenantName};
use crate::registry::{DbServer, NewTenant};
use crate::servers::owner::{self, TenantMark};
use crate::servers::{names, roles, ServerAdmin};

/// What an adoption did.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct AdoptReport {
    /// `slug (database on server)` of each tenant registered again.
    pub adopted: Vec<String>,
    /// Databases left as they are, and why.
    pub skipped: Vec<String>,
}

impl ControlPlane {
    /// Register again every tenant database this control plane made that
    /// the registry has no row for, on every server it owns.
    pub async fn adopt(&self, actor: &str) -> anyhow::Result<AdoptReport> {
        let mut report = AdoptReport::default();
        let control = self.registry().control_id().await?;
        for server in self.registry().servers().await? {
            let admin = self.servers().admin(&server)?;
            let me = owner::Owner {
                control,
                server: server.id,
            };
            if let Some(why) = owner::check(&admin, me).await?.refusal() {
                report
                    .skipped
                    .push(format!("server {}: {why}", server.name));
                continue;
            }
            let marks = owner::tenant_marks(&admin, self.keyring()).await?;
            let ids: Vec<Uuid> = marks.iter().map(|(_, m)| m.tenant).collect();
            let known: std::collections::HashSet<Uuid> = self
                .registry()
                .tenant_states(&ids)
                .await?
                .into_iter()
                .map(|(id, ..)| id)
                .collect();
            for (database, mark) in marks {
                if known.contains(&mark.tenant) {
                    continue;
                }
                if mark.control != control {
                    report.skipped.push(format!(
                        "{database} on {}: made by another control plane ({})",
                        server.name, mark.control
                    ));
                    continue;
                }
                if names::tenant_of_database(&database) != Some(mark.tenant) {
                    report.skipped.push(format!(
                        "{database} on {}: its name and its mark disagree",
                        server.name
                    ));
                    continue;
                }
                let mark = match mark.mark {
                    Ok(mark) => mark,
                    Err(why) => {
                        report
                            .skipped
                            .push(format!("{database} on {}: {why}", server.name));
                        continue;
                    }
                };
                let adopted = self
                    .registry()
                    .with_tenant_lock(mark.tenant, || {
                        self.adopt_one(&server, &admin, &database, &mark, actor)
                    })
                    .await;
                match adopted {
                    Ok(()) => {
                        tracing::info!(tenant_id = %mark.tenant, slug = mark.slug, database, "adopted a tenant database the registry had lost");
                        report
                            .adopted
                            .push(format!("{} ({database} on {})", mark.slug, server.name));
                    }
                    Err(e) => report
                        .skipped
                        .push(format!("{database} on {}: {e:#}", server.name)),
                }
            }
        }
        Ok(report)
    }

    async fn adopt_one(
        &self,
        server: &DbServer,
        admin: &ServerAdmin,
        database: &str,
        mark: &TenantMark,
        actor: &str,
    ) -> anyhow::Result<()> {
        let slug = Slug::parse(&mark.slug).map_err(|e| anyhow::anyhow!("its slug: {e}"))?;
        let name = TenantName::parse(&mark.name).map_err(|e| anyhow::anyhow!("its name: {e}"))?;
        // Its plan, if it still exists; else the default one.
        let named = Plan::parse(&mark.plan).map_err(|e| anyhow::anyhow!("its plan: {e}"))?;
        let plan = match self.registry().plan(&named).await? {
            Some(p) => p,
            None => self
                .registry()
                .plan(&Plan::default_plan())
                .await?
                .context("the default plan is gone")?,
        };
        if let Some(other) = self.registry().find_tenant(slug.as_str()).await? {
            anyhow::bail!(
                "slug '{slug}' belongs to another tenant now ({}); rename that one first",
                other.id
            );
        }
        let (_, role) = names::tenant_names(mark.tenant);
        let schema_version = schema_version(admin, database).await?;
        // The old password was sealed in the row that was lost: a new one.
        let password = crate::crypto::random_password(32);
        roles::create_role(admin, &role, database, &password, plan.connection_limit)
            .await
            .context("reset the tenant role's password and grants")?;
        let sealed = self
            .keyring()
            .seal(password.as_bytes(), mark.tenant.as_bytes());
        self.registry()
            .adopt_tenant(
                &NewTenant {
                    id: mark.tenant,
                    slug: &slug,
                    name: &name,
                    plan: plan.name.clone(),
                    server_id: server.id,
                    database_name: database,
                    role_name: &role,
                    password_enc: &sealed,
                    key_id: self.keyring().key_id(),
                },
                schema_version,
                actor,
                serde_json::json!({"slug": slug, "server": server.name, "database": database}),
            )
            .await
            .context("register the tenant")?;
        Ok(())
    }
}

/// The newest tenant migration applied to `database`, if any is.
pub(super) async fn schema_version(
    admin: &ServerAdmin,
    database: &str,
) -> anyhow::Result<Option<i64>> {
    let db = admin.single_pool(database).await?;
    let version = sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
        .fetch_one(&db)
        .await;
    db.close().await;
    match version {
        Ok(v) => Ok(v),
        // No migrations table: an empty database.
        Err(e) if crate::servers::sqlstate::is(&e, "42P01") => Ok(None),
        Err(e) => Err(admin.error(Some(database), e)).context("read its schema version"),
    }
}
