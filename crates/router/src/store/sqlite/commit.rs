//! Group commits: registrations that arrive together share one durable commit, each in its own savepoint; status
//! transitions that arrive together share another (SPEC §10: a storm of 10,000 nodes changing status at once is a
//! few hundred commits, not 10,000).

use sqlx::SqliteConnection;
use tokio::sync::{mpsc, oneshot};

use super::lists::{self, Rows};
use super::nodes::{insert_row, write_events, write_token, write_transitions};
use super::writer::{Writer, WriterPool};
use crate::model::auth::TokenHash;
use crate::model::enrollment::JoinUse;
use crate::model::node::{Node, NodeEvent, NodeLists};
use crate::store::StoreError;
use crate::store::sql::sqlite as sql;

/// The answer when the group commits' task is gone (the store was closed).
fn closed() -> StoreError {
    StoreError::Other(anyhow::anyhow!("the database is closed"))
}

/// Stores a newly registered node, its token and its first events (and counts the use of its join token), and
/// returns once they are committed.
///
/// Registrations that arrive together are committed together (group commit): the node's writes run in a savepoint
/// of a shared transaction, so one refused registration does not affect the others, and the batch pays one durable
/// commit instead of one each.
pub(super) async fn insert_node(
    queue: &mpsc::Sender<InsertJob>,
    node: Node,
    token: TokenHash,
    events: Vec<NodeEvent>,
    join: Option<JoinUse>,
) -> Result<(), StoreError> {
    let (reply, answer) = oneshot::channel();
    queue.send(InsertJob { node, token, events, join, reply }).await.map_err(|_| closed())?;
    answer.await.map_err(|_| closed())?
}

/// A registration waiting for the next group commit.
pub(super) struct InsertJob {
    node: Node,
    token: TokenHash,
    events: Vec<NodeEvent>,
    join: Option<JoinUse>,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

/// Most registrations in one group commit.
const INSERTS_PER_COMMIT: usize = 64;

/// Commits waiting registrations in groups until every sender is gone.
pub(super) async fn group_commits(writer: WriterPool, mut jobs: mpsc::Receiver<InsertJob>) {
    let mut batch = Vec::with_capacity(INSERTS_PER_COMMIT);
    while jobs.recv_many(&mut batch, INSERTS_PER_COMMIT).await > 0 {
        let results = commit_group(&writer, &batch).await;
        for (job, result) in batch.drain(..).zip(results) {
            let _ = job.reply.send(result);
        }
    }
}

/// One result per job. A registration refused (a duplicate, a join token used up meanwhile) is undone alone (its
/// savepoint) and the others stay;
/// any other failure (a full disk, an I/O error) may already have undone the whole transaction inside SQLite, so
/// the group fails as one and every job gets the error: no answer of success for a row that was not committed.
async fn commit_group(pool: &WriterPool, batch: &[InsertJob]) -> Vec<Result<(), StoreError>> {
    let outcome = async {
        let mut writer = Writer::acquire(pool).await?;
        let result = async {
            let mut tx = writer.begin().await?;
            let mut results = Vec::with_capacity(batch.len());
            for job in batch {
                sqlx::query("SAVEPOINT registration").execute(&mut *tx).await?;
                match insert_one(&mut tx, job).await {
                    Ok(()) => {
                        sqlx::query("RELEASE registration").execute(&mut *tx).await?;
                        results.push(Ok(()));
                    }
                    Err(refused @ (StoreError::Duplicate | StoreError::JoinToken(_))) => {
                        sqlx::raw_sql("ROLLBACK TO registration; RELEASE registration").execute(&mut *tx).await?;
                        results.push(Err(refused));
                    }
                    Err(err) => return Err(err),
                }
            }
            tx.commit().await?;
            Ok(results)
        }
        .await;
        writer.finish(result).await
    }
    .await;
    match outcome {
        Ok(results) => results,
        Err(err) => batch.iter().map(|_| Err(err.for_another())).collect(),
    }
}

async fn insert_one(conn: &mut SqliteConnection, job: &InsertJob) -> Result<(), StoreError> {
    insert_row(conn, &job.node).await?;
    if let Some(join) = &job.join {
        sql::use_join_token(conn, join).await?;
    }
    lists::write(conn, &[(job.node.id, &NodeLists::of(&job.node))], Rows::New).await?;
    write_token(conn, job.node.id, job.token, job.node.registered_at).await?;
    write_events(conn, &job.events).await?;
    Ok(())
}

/// Persists a status change with its event and returns once it is committed.
///
/// Transitions that arrive together (heartbeats of many nodes coming back, a sweep marking many offline) are
/// committed together: the batch pays one durable commit instead of one each. A transition cannot be refused the
/// way a registration can, so there are no savepoints: when the commit fails, every transition of the group gets
/// the error and none is kept.
pub(super) async fn record_transition(
    queue: &mpsc::Sender<TransitionJob>,
    node: &Node,
    event: &NodeEvent,
) -> Result<(), StoreError> {
    let (reply, answer) = oneshot::channel();
    queue.send(TransitionJob { node: node.clone(), event: event.clone(), reply }).await.map_err(|_| closed())?;
    answer.await.map_err(|_| closed())?
}

/// A transition waiting for the next group commit.
pub(super) struct TransitionJob {
    node: Node,
    event: NodeEvent,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

/// Most transitions in one group commit.
const TRANSITIONS_PER_COMMIT: usize = 512;

/// Commits waiting transitions in groups until every sender is gone.
pub(super) async fn transition_commits(writer: WriterPool, mut jobs: mpsc::Receiver<TransitionJob>) {
    let mut batch = Vec::with_capacity(TRANSITIONS_PER_COMMIT);
    while jobs.recv_many(&mut batch, TRANSITIONS_PER_COMMIT).await > 0 {
        let outcome = async {
            let mut writer = Writer::acquire(&writer).await?;
            let result = async {
                let mut tx = writer.begin().await?;
                let changes: Vec<(&Node, &NodeEvent)> = batch.iter().map(|job| (&job.node, &job.event)).collect();
                write_transitions(&mut tx, &changes).await?;
                tx.commit().await?;
                Ok(())
            }
            .await;
            writer.finish(result).await
        }
        .await;
        match outcome {
            Ok(()) => {
                for job in batch.drain(..) {
                    let _ = job.reply.send(Ok(()));
                }
            }
            Err(err) => {
                for job in batch.drain(..) {
                    let _ = job.reply.send(Err(err.for_another()));
                }
            }
        }
    }
}
