//! The statements of deployments (SPEC §15), the same on both backends: a deployment is one row; its replicas one row
//! each by slot, written by the placer (where a replica goes) and by the router a node heartbeats to (what the node
//! reports of it, only while the replica is still placed there).

use llm_router_protocol::{ReplicaState, RuntimeKind};
use uuid::Uuid;

use super::rows::Columns;
use crate::model::deployment::{Deployment, DeploymentSpec, Replica, ReplicaStatus};

/// A deployment's columns, in the order [`deployment`] reads them.
pub const DEPLOYMENT_COLUMNS: &str = "id, name, model, source, sha256, runtime, args, replicas, gpu_memory_bytes, \
     selector_tags, max_concurrency, revision, created_by, created_at, updated_at";

/// A replica's columns, in the order [`replica`] reads them.
pub const REPLICA_COLUMNS: &str = "deployment_id, slot, node_id, placed_at, state, revision, reason, bytes_done, \
     bytes_total, port, pid, restarts, download_ms, start_ms, ready_at, updated_at, gpus";

fn unsigned<T: TryFrom<i64>>(value: Option<i64>) -> Option<T> {
    value.and_then(|v| T::try_from(v).ok())
}

pub(super) fn deployment(row: &impl Columns) -> anyhow::Result<Deployment> {
    let runtime = row.str(5)?;
    let runtime = RuntimeKind::ALL
        .into_iter()
        .find(|kind| kind.as_str() == runtime)
        .ok_or_else(|| anyhow::anyhow!("unknown runtime `{runtime}` in a stored deployment"))?;
    Ok(Deployment {
        id: Uuid::parse_str(row.str(0)?)?,
        name: row.text(1)?,
        spec: DeploymentSpec {
            model: row.text(2)?,
            source: row.text(3)?,
            sha256: row.opt_text(4)?,
            runtime,
            args: serde_json::from_str(row.str(6)?)?,
            replicas: unsigned(Some(row.int(7)?)).unwrap_or(0),
            gpu_memory_bytes: unsigned(row.opt_int(8)?),
            selector_tags: serde_json::from_str(row.str(9)?)?,
            max_concurrency: unsigned(row.opt_int(10)?),
        },
        revision: row.int(11)?,
        created_by: row.text(12)?,
        created_at: row.int(13)?,
        updated_at: row.int(14)?,
    })
}

pub(super) fn replica(row: &impl Columns) -> anyhow::Result<Replica> {
    let state = row.str(4)?;
    let state = ReplicaState::ALL
        .into_iter()
        .find(|s| s.as_str() == state)
        .ok_or_else(|| anyhow::anyhow!("unknown replica state `{state}`"))?;
    Ok(Replica {
        deployment_id: Uuid::parse_str(row.str(0)?)?,
        slot: unsigned(Some(row.int(1)?)).unwrap_or(0),
        node_id: row.opt_str(2)?.map(Uuid::parse_str).transpose()?,
        placed_at: row.opt_int(3)?,
        report: ReplicaStatus {
            state,
            revision: row.int(5)?,
            reason: row.opt_text(6)?,
            bytes_done: unsigned(row.opt_int(7)?),
            bytes_total: unsigned(row.opt_int(8)?),
            port: unsigned(row.opt_int(9)?),
            pid: unsigned(row.opt_int(10)?),
            restarts: unsigned(Some(row.int(11)?)).unwrap_or(0),
            download_ms: unsigned(row.opt_int(12)?),
            start_ms: unsigned(row.opt_int(13)?),
            ready_at: row.opt_int(14)?,
            updated_at: row.int(15)?,
            gpus: row.opt_str(16)?.map(serde_json::from_str).transpose()?,
        },
    })
}

fn wide(value: Option<u64>) -> Option<i64> {
    value.map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

/// Binds a deployment's columns, in [`DEPLOYMENT_COLUMNS`]' order, as `$1`…`$15`.
macro_rules! bind_deployment {
    ($query:expr, $d:expr) => {{
        let d: &Deployment = $d;
        let spec = &d.spec;
        $query
            .bind(d.id.to_string())
            .bind(d.name.clone())
            .bind(spec.model.clone())
            .bind(spec.source.clone())
            .bind(spec.sha256.clone())
            .bind(spec.runtime.as_str())
            .bind(serde_json::to_string(&spec.args)?)
            .bind(i64::from(spec.replicas))
            .bind(wide(spec.gpu_memory_bytes))
            .bind(serde_json::to_string(&spec.selector_tags)?)
            .bind(spec.max_concurrency.map(i64::from))
            .bind(d.revision)
            .bind(d.created_by.clone())
            .bind(d.created_at)
            .bind(d.updated_at)
    }};
}

/// Binds a replica's columns, in [`REPLICA_COLUMNS`]' order, as `$1`…`$17`.
macro_rules! bind_replica {
    ($query:expr, $r:expr) => {{
        let r: &Replica = $r;
        let s = &r.report;
        $query
            .bind(r.deployment_id.to_string())
            .bind(i64::from(r.slot))
            .bind(r.node_id.map(|id| id.to_string()))
            .bind(r.placed_at)
            .bind(s.state.as_str())
            .bind(s.revision)
            .bind(s.reason.clone())
            .bind(wide(s.bytes_done))
            .bind(wide(s.bytes_total))
            .bind(s.port.map(i64::from))
            .bind(s.pid.map(i64::from))
            .bind(i64::from(s.restarts))
            .bind(wide(s.download_ms))
            .bind(wide(s.start_ms))
            .bind(s.ready_at)
            .bind(s.updated_at)
            .bind(s.gpus.as_ref().map(serde_json::to_string).transpose()?)
    }};
}

/// Defines the deployment statements for one backend: `$conn` its connection.
macro_rules! deploy_statements {
    ($conn:ty) => {
        use uuid::Uuid;

        use super::{DEPLOYMENT_COLUMNS, REPLICA_COLUMNS, wide};
        use crate::model::deployment::{Deployment, Replica};
        use crate::store::StoreError;

        type Conn = $conn;

        /// Every deployment, by name, and every replica row.
        pub async fn deployments(conn: &mut Conn) -> Result<(Vec<Deployment>, Vec<Replica>), StoreError> {
            let sql = format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments ORDER BY name");
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&mut *conn).await?;
            let deployments = rows.iter().map(super::deployment).collect::<anyhow::Result<_>>()?;
            let sql = format!("SELECT {REPLICA_COLUMNS} FROM deployment_replicas ORDER BY deployment_id, slot");
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&mut *conn).await?;
            let replicas = rows.iter().map(super::replica).collect::<anyhow::Result<_>>()?;
            Ok((deployments, replicas))
        }

        /// Stores a new deployment; [`StoreError::Duplicate`] when its name is taken.
        pub async fn insert_deployment(conn: &mut Conn, d: &Deployment) -> Result<(), StoreError> {
            let sql = format!(
                "INSERT INTO deployments ({DEPLOYMENT_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
            );
            bind_deployment!(sqlx::query(sqlx::AssertSqlSafe(sql)), d).execute(conn).await?;
            Ok(())
        }

        /// Rewrites a deployment whole; `false` when there is none with its id.
        pub async fn update_deployment(conn: &mut Conn, d: &Deployment) -> Result<bool, StoreError> {
            let sql = "UPDATE deployments SET name = $2, model = $3, source = $4, sha256 = $5, runtime = $6, \
                       args = $7, replicas = $8, gpu_memory_bytes = $9, selector_tags = $10, max_concurrency = $11, \
                       revision = $12, created_by = $13, created_at = $14, updated_at = $15 WHERE id = $1";
            let done = bind_deployment!(sqlx::query(sql), d).execute(&mut *conn).await?;
            // Slots past a lowered count go with the change that lowered it.
            sqlx::query("DELETE FROM deployment_replicas WHERE deployment_id = $1 AND slot >= $2")
                .bind(d.id.to_string())
                .bind(i64::from(d.spec.replicas))
                .execute(conn)
                .await?;
            Ok(done.rows_affected() == 1)
        }

        /// Removes a deployment and its replicas; `false` when there was none with this id.
        pub async fn delete_deployment(conn: &mut Conn, id: Uuid) -> Result<bool, StoreError> {
            sqlx::query("DELETE FROM deployment_replicas WHERE deployment_id = $1")
                .bind(id.to_string())
                .execute(&mut *conn)
                .await?;
            let done = sqlx::query("DELETE FROM deployments WHERE id = $1").bind(id.to_string()).execute(conn).await?;
            Ok(done.rows_affected() == 1)
        }

        /// Writes replica rows whole (where the placer put them), for deployments that still exist.
        pub async fn place_replicas(conn: &mut Conn, replicas: &[Replica]) -> Result<(), StoreError> {
            for r in replicas {
                let sql = format!(
                    "INSERT INTO deployment_replicas ({REPLICA_COLUMNS}) \
                     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17 \
                     WHERE EXISTS (SELECT 1 FROM deployments WHERE id = $1 AND replicas > $2) \
                     ON CONFLICT (deployment_id, slot) DO UPDATE SET node_id = excluded.node_id, \
                     placed_at = excluded.placed_at, state = excluded.state, revision = excluded.revision, \
                     reason = excluded.reason, bytes_done = excluded.bytes_done, bytes_total = excluded.bytes_total, \
                     port = excluded.port, pid = excluded.pid, restarts = excluded.restarts, \
                     download_ms = excluded.download_ms, start_ms = excluded.start_ms, ready_at = excluded.ready_at, \
                     updated_at = excluded.updated_at, gpus = excluded.gpus"
                );
                bind_replica!(sqlx::query(sqlx::AssertSqlSafe(sql)), r).execute(&mut *conn).await?;
            }
            Ok(())
        }

        /// Writes what nodes reported of their replicas, each only while it is still placed on that node.
        pub async fn report_replicas(conn: &mut Conn, replicas: &[Replica]) -> Result<(), StoreError> {
            for r in replicas {
                let sql = "UPDATE deployment_replicas SET state = $5, revision = $6, reason = $7, bytes_done = $8, \
                           bytes_total = $9, port = $10, pid = $11, restarts = $12, download_ms = $13, start_ms = $14, \
                           ready_at = $15, updated_at = $16, gpus = $17 \
                           WHERE deployment_id = $1 AND slot = $2 AND node_id = $3 AND placed_at = $4";
                bind_replica!(sqlx::query(sql), r).execute(&mut *conn).await?;
            }
            Ok(())
        }

    };
}

/// The deployment statements on SQLite.
pub mod sqlite {
    deploy_statements!(sqlx::SqliteConnection);
}

/// The deployment statements on PostgreSQL.
pub mod postgres {
    deploy_statements!(sqlx::PgConnection);
}
