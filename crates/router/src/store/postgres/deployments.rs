//! [`DeploymentStore`] on PostgreSQL: deployments and their replicas, with the statements of
//! `store/deploy_sql.rs`. Several routers read them back every second; one of them places.

use uuid::Uuid;

use super::PgStore;
use crate::model::deployment::{Deployment, Replica};
use crate::store::deploy_sql::postgres as sql;
use crate::store::{DeploymentStore, StoreResult};

impl DeploymentStore for PgStore {
    fn deployments(&self) -> StoreResult<'_, (Vec<Deployment>, Vec<Replica>)> {
        Box::pin(self.gated(async move { sql::deployments(&mut *self.pool.acquire().await?).await }))
    }

    fn insert_deployment<'a>(&'a self, deployment: &'a Deployment) -> StoreResult<'a, ()> {
        Box::pin(self.gated(async move { sql::insert_deployment(&mut *self.pool.acquire().await?, deployment).await }))
    }

    fn update_deployment<'a>(&'a self, deployment: &'a Deployment) -> StoreResult<'a, bool> {
        Box::pin(self.gated(async move {
            let mut tx = self.pool.begin().await?;
            let updated = sql::update_deployment(&mut tx, deployment).await?;
            tx.commit().await?;
            Ok(updated)
        }))
    }

    fn delete_deployment(&self, id: Uuid) -> StoreResult<'_, bool> {
        Box::pin(self.gated(async move {
            let mut tx = self.pool.begin().await?;
            let deleted = sql::delete_deployment(&mut tx, id).await?;
            tx.commit().await?;
            Ok(deleted)
        }))
    }

    fn place_replicas<'a>(&'a self, replicas: &'a [Replica]) -> StoreResult<'a, ()> {
        Box::pin(self.gated(async move {
            let mut tx = self.pool.begin().await?;
            sql::place_replicas(&mut tx, replicas).await?;
            tx.commit().await?;
            Ok(())
        }))
    }

    fn report_replicas<'a>(&'a self, replicas: &'a [Replica]) -> StoreResult<'a, ()> {
        Box::pin(self.gated(async move {
            let mut tx = self.pool.begin().await?;
            sql::report_replicas(&mut tx, replicas).await?;
            tx.commit().await?;
            Ok(())
        }))
    }
}
