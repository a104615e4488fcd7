//! Migrating every tenant database: bounded fan-out, a result per tenant.

use std::sync::Arc;

use anyhow::Context;
use tokio::sync::Semaphore;

use crate::provision::Provisioner;
use crate::registry::TenantStatus;

impl Provisioner {
    /// Apply tenant migrations to every active or suspended tenant (or only
    /// `only`), at most `concurrency` at a time, each over its own short-lived
    /// admin connection. One tenant's failure does not stop the others.
    pub async fn migrate_tenants(
        &self,
        only: Option<&str>,
        concurrency: usize,
    ) -> anyhow::Result<Vec<(String, Result<i64, String>)>> {
        let reg = self.registry();
        let tenants = match only {
            Some(t) => vec![reg
                .find_tenant(t)
                .await?
                .with_context(|| format!("find tenant '{t}'"))?],
            None => {
                reg.tenants_in(&[TenantStatus::Active, TenantStatus::Suspended])
                    .await?
            }
        };
        let permits = Arc::new(Semaphore::new(concurrency.max(1)));
        let mut set = tokio::task::JoinSet::new();
        for t in tenants {
            let (p, permits) = (self.clone(), permits.clone());
            set.spawn(async move {
                let _permit = permits
                    .acquire_owned()
                    .await
                    .expect("semaphore is never closed");
                let outcome = async {
                    let admin = p.admin_for(&t).await?;
                    let db = admin
                        .single_pool(&t.database_name)
                        .await
                        .context("connect to tenant database")?;
                    let migrated = super::migrate_tenant_database(&db).await;
                    db.close().await;
                    let v = migrated?;
                    p.registry().set_schema_version(t.id, v).await?;
                    anyhow::Ok(v)
                }
                .await
                .map_err(|e| format!("{e:#}"));
                (t.slug, outcome)
            });
        }
        let mut results = Vec::new();
        while let Some(done) = set.join_next().await {
            results.push(done.context("join a tenant migration task")?);
        }
        results.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(results)
    }
}
