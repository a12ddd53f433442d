//! [`DeploymentStore`] on SQLite: deployments and their replicas, with the statements of `store/deploy_sql.rs`.

use uuid::Uuid;

use super::{SqliteStore, write_tx};
use crate::model::deployment::{Deployment, Replica};
use crate::store::deploy_sql::sqlite as sql;
use crate::store::{DeploymentStore, StoreResult};

impl DeploymentStore for SqliteStore {
    fn deployments(&self) -> StoreResult<'_, (Vec<Deployment>, Vec<Replica>)> {
        Box::pin(async move { sql::deployments(&mut *self.reader().await?).await })
    }

    fn insert_deployment<'a>(&'a self, deployment: &'a Deployment) -> StoreResult<'a, ()> {
        Box::pin(async move { write_tx!(self, |tx| sql::insert_deployment(tx, deployment)) })
    }

    fn update_deployment<'a>(&'a self, deployment: &'a Deployment) -> StoreResult<'a, bool> {
        Box::pin(async move { write_tx!(self, |tx| sql::update_deployment(tx, deployment)) })
    }

    fn delete_deployment(&self, id: Uuid) -> StoreResult<'_, bool> {
        Box::pin(async move { write_tx!(self, |tx| sql::delete_deployment(tx, id)) })
    }

    fn place_replicas<'a>(&'a self, replicas: &'a [Replica]) -> StoreResult<'a, ()> {
        Box::pin(async move { write_tx!(self, |tx| sql::place_replicas(tx, replicas)) })
    }

    fn report_replicas<'a>(&'a self, replicas: &'a [Replica]) -> StoreResult<'a, ()> {
        Box::pin(async move { write_tx!(self, |tx| sql::report_replicas(tx, replicas)) })
    }
}
