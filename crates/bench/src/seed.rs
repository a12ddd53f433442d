//! Fills a router database with a large fleet without HTTP, through the router library's own storage code
//! (`SqliteStore::import_nodes`): the same schema, the same encodings of lists and figures, the same writer of a
//! node's lists as a running router. The router must not be running.
//!
//! Two fleets: the mixed one of `bench startup` (a share pending and offline, secrets nobody holds), and the
//! approved one of `bench seed` (nearly all online, every node's id and token derived from its number, so that
//! `bench pulse` can heartbeat as any of them without registering).

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use llm_router::model::auth::TokenHash;
use llm_router::model::figures::{NodeFigures, PackedFigures};
use llm_router::model::node::{Node, NodeEvent};
use llm_router::store::sqlite::SqliteStore;
use llm_router::store::{NewNode, NodeStore};
use llm_router_protocol::NodeStatus;
use serde::Serialize;
use uuid::Uuid;

use crate::cli::SeedArgs;
use crate::fleet::{self, MODELS};

/// Nodes per transaction: bounds the seeder's memory, not the router's.
const NODES_PER_TRANSACTION: usize = 10_000;

const DAY_MS: i64 = 24 * 3600 * 1000;

/// How many of the seeded nodes end up in each status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusMix {
    pub online: usize,
    pub offline: usize,
    pub pending: usize,
}

/// Which fleet to seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetKind {
    /// 5 % pending, 25 % offline, 70 % online; random ids and tokens nobody holds (`bench startup`).
    Mixed,
    /// One node in [`PENDING_EVERY`] pending, every other one online; ids and tokens from [`node_id`] and
    /// [`node_token`] (`bench seed`, then `bench pulse`).
    Approved,
}

/// In the approved fleet, nodes 0, `PENDING_EVERY`, 2 × `PENDING_EVERY`... wait for approval.
pub const PENDING_EVERY: usize = 1000;

impl FleetKind {
    /// The status of seeded node `i`.
    pub fn status_of(self, i: usize) -> NodeStatus {
        match self {
            FleetKind::Mixed => match i % 20 {
                0 => NodeStatus::Pending,
                1..=5 => NodeStatus::Offline,
                _ => NodeStatus::Online,
            },
            FleetKind::Approved if i.is_multiple_of(PENDING_EVERY) => NodeStatus::Pending,
            FleetKind::Approved => NodeStatus::Online,
        }
    }
}

/// The id of node `i` of the approved fleet: a well-formed version 4 UUID whose last 48 bits are `i`.
pub fn node_id(i: usize) -> Uuid {
    Uuid::from_u128(0x5eed_0000_0000_4000_8000_0000_0000_0000 | (i as u128 & 0xffff_ffff_ffff))
}

/// The token of node `i` of the approved fleet: shaped like a token the router hands out (prefix and 64 hex
/// digits), but derived from `i`, so it is known to whoever knows the fleet's size. A benchmark fleet only.
pub fn node_token(i: usize) -> String {
    format!("llmn_5eed{i:060x}")
}

/// Seeded node `i` with its token and history: the registration, and the approval for approved nodes.
fn new_node(kind: FleetKind, i: usize, now: i64, with_metrics: bool) -> NewNode {
    let status = kind.status_of(i);
    let approved = status != NodeStatus::Pending;
    let registered_at = now - 30 * DAY_MS + (i as i64 % 1000) * 60_000;
    let approved_at = approved.then_some(registered_at + 3_600_000);
    let last_seen_at = if status == NodeStatus::Offline { now - 6 * 3600 * 1000 } else { now - (i as i64 % 10) * 1000 };
    let metrics = NodeFigures {
        cpu_usage: Some((i % 90) as f64 + 5.5),
        memory_usage: Some((i % 70) as f64 + 20.25),
        gpus: fleet::gpu_metrics(i),
        active_requests: Some((i % 17) as u64),
        load: None,
    };
    let models: Vec<String> = MODELS.iter().map(|m| (*m).to_owned()).collect();
    let node = Node {
        id: match kind {
            FleetKind::Mixed => Uuid::new_v4(),
            FleetKind::Approved => node_id(i),
        },
        machine_name: fleet::machine_name(i),
        ip_address: fleet::ip_address(i),
        runtime_port: 8000,
        runtime_version: "vllm 0.8.5".to_owned(),
        status,
        display_name: i.is_multiple_of(10).then(|| format!("Rack {} node {}", i % 40, i)),
        notes: None,
        gpu_devices: fleet::gpu_devices(),
        supported_runtimes: vec!["vllm".to_owned(), "llama_cpp".to_owned()],
        loaded_models: models.clone(),
        ready_models: models,
        tags: fleet::tags(i),
        figures: with_metrics.then(|| PackedFigures::pack(&metrics)),
        registered_at,
        approved_at,
        approved_by: approved.then(|| "admin".to_owned()),
        join_token: None,
        cordoned: false,
        max_concurrency: None,
        conditions: Default::default(),
        last_seen_at: Some(last_seen_at),
    };
    let registered = NodeEvent::new(node.id, registered_at, None, NodeStatus::Pending.as_str(), "registered");
    let approval = approved_at.map(|at| {
        NodeEvent::new(node.id, at, Some(NodeStatus::Pending), NodeStatus::Online.as_str(), "approved")
            .by(Some("admin"))
    });
    let token = match kind {
        // A secret nobody holds: the start-up bench sends no heartbeat.
        FleetKind::Mixed => TokenHash::of(&Uuid::new_v4().to_string()),
        FleetKind::Approved => TokenHash::of(&node_token(i)),
    };
    NewNode { node, token: Some(token), events: std::iter::once(registered).chain(approval).collect() }
}

/// Adds `count` nodes with their lists, token and events to the database at `path` (created and migrated if
/// needed). `with_metrics`: every node carries the figures of a last heartbeat (8 GPUs), as a fleet that has been
/// running does.
pub async fn seed(path: &Path, kind: FleetKind, count: usize, with_metrics: bool) -> anyhow::Result<StatusMix> {
    let store = SqliteStore::open(path).await.with_context(|| format!("opening {} to seed it", path.display()))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default();
    let mut mix = StatusMix::default();
    let mut first = 0;
    while first < count {
        let last = (first + NODES_PER_TRANSACTION).min(count);
        let nodes: Vec<NewNode> = (first..last).map(|i| new_node(kind, i, now, with_metrics)).collect();
        let added =
            NodeStore::import_nodes(&store, &nodes).await.with_context(|| format!("adding nodes {first}..{last}"))?;
        anyhow::ensure!(added.len() == nodes.len(), "nodes {first}..{last}: only {} of them were new", added.len());
        for new in &nodes {
            match new.node.status {
                NodeStatus::Online => mix.online += 1,
                NodeStatus::Offline => mix.offline += 1,
                _ => mix.pending += 1,
            }
        }
        first = last;
    }
    store.close().await;
    Ok(mix)
}

/// What `bench seed` reports.
#[derive(Debug, Serialize)]
pub struct SeedReport {
    pub database: PathBuf,
    pub nodes: usize,
    pub online: usize,
    pub pending: usize,
    pub seed_secs: f64,
}

/// `bench seed`: the approved fleet, with heartbeat figures, into `router.db` of the data directory.
pub async fn run(args: &SeedArgs) -> anyhow::Result<SeedReport> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating the data directory {}", args.data_dir.display()))?;
    let database = args.data_dir.join("router.db");
    let started = Instant::now();
    let mix = seed(&database, FleetKind::Approved, args.nodes, true).await?;
    Ok(SeedReport {
        database,
        nodes: args.nodes,
        online: mix.online,
        pending: mix.pending,
        seed_secs: started.elapsed().as_secs_f64(),
    })
}

/// The report for people.
pub fn print(report: &SeedReport) {
    println!(
        "seed: {} nodes ({} online, {} pending, with heartbeat figures) written into {} in {:.1} s",
        report.nodes,
        report.online,
        report.pending,
        report.database.display(),
        report.seed_secs
    );
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use sqlx::sqlite::SqliteConnectOptions;
    use sqlx::{Connection, SqliteConnection};

    use super::*;

    #[test]
    fn status_mix_is_mostly_online() {
        let mix: Vec<NodeStatus> = (0..20).map(|i| FleetKind::Mixed.status_of(i)).collect();
        assert_eq!(mix.iter().filter(|s| **s == NodeStatus::Pending).count(), 1);
        assert_eq!(mix.iter().filter(|s| **s == NodeStatus::Offline).count(), 5);
        assert_eq!(mix.iter().filter(|s| **s == NodeStatus::Online).count(), 14);
    }

    #[test]
    fn nodes_carry_what_a_running_fleet_has() {
        let new = new_node(FleetKind::Mixed, 1, 1_700_000_000_000, true);
        let figures = new.node.figures.as_ref().and_then(PackedFigures::unpack).expect("figures");
        assert_eq!(figures.gpus.len(), 8);
        assert_eq!(new.node.gpu_devices.len(), fleet::GPU_GROUPS.len());
        assert_eq!(new.node.approved_by.as_deref(), Some("admin"));
        assert_eq!(new.events.len(), 2, "registered, then approved");
        let bare = new_node(FleetKind::Mixed, 0, 0, false);
        assert!(bare.node.approved_at.is_none() && bare.node.figures.is_none());
        assert_eq!(bare.events.len(), 1);
    }

    #[test]
    fn the_approved_fleet_is_online_but_for_a_few_pending_with_derived_credentials() {
        let statuses: Vec<NodeStatus> = (0..3000).map(|i| FleetKind::Approved.status_of(i)).collect();
        assert_eq!(statuses.iter().filter(|s| **s == NodeStatus::Pending).count(), 3);
        assert_eq!(statuses.iter().filter(|s| **s == NodeStatus::Online).count(), 2997);

        let ids: std::collections::HashSet<Uuid> = (0..100_000).map(node_id).collect();
        assert_eq!(ids.len(), 100_000, "ids are distinct");
        assert_eq!(node_id(70_000).get_version_num(), 4);
        assert_eq!(node_id(70_000).to_string(), "5eed0000-0000-4000-8000-000000011170");
        let token = node_token(70_000);
        assert!(token.starts_with("llmn_") && token.len() == 5 + 64, "{token}");

        let new = new_node(FleetKind::Approved, 70_001, 1_700_000_000_000, true);
        assert_eq!(new.node.id, node_id(70_001));
        assert_eq!(new.token, Some(TokenHash::of(&node_token(70_001))));
        assert_eq!(new.node.machine_name, "gpu-node-070001");
        assert_eq!(new.node.status, NodeStatus::Online);
    }

    #[tokio::test]
    async fn seeds_every_table_of_the_router_schema() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("router.db");
        // More than one transaction's worth would be slow here; several nodes per status are enough.
        let count = 1007;
        let mix = seed(&path, FleetKind::Mixed, count, true).await.expect("seed");
        assert_eq!(mix.online + mix.offline + mix.pending, count);
        assert_eq!(mix.pending, count.div_ceil(20));

        let options = SqliteConnectOptions::from_str("sqlite://").expect("options").filename(&path);
        let mut conn = SqliteConnection::connect_with(&options).await.expect("open");
        for (table, per_node) in [
            ("nodes", 1),
            ("node_gpu_devices", 2),
            ("node_loaded_models", 4),
            ("node_supported_runtimes", 2),
            ("node_tags", 2),
            ("node_tokens", 1),
        ] {
            let sql = format!("SELECT COUNT(*) FROM {table}");
            let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(&mut conn).await.expect("count");
            assert_eq!(n as usize, count * per_node, "{table}");
        }
        let events: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM node_events").fetch_one(&mut conn).await.expect("count");
        assert_eq!(events as usize, count + mix.online + mix.offline);
        let copies: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM nodes WHERE lists IS NOT NULL")
            .fetch_one(&mut conn)
            .await
            .expect("count");
        assert_eq!(copies as usize, count, "every row carries the copy of its lists");
        conn.close().await.expect("close");

        // The router's own loader reads back what was seeded.
        let store = SqliteStore::open(&path).await.expect("reopen");
        let loaded = store.load_nodes().await.expect("load");
        assert_eq!(loaded.len(), count);
        assert!(loaded.iter().all(|(node, token)| token.is_some() && node.ready_models.len() == MODELS.len()));
        store.close().await;
    }
}
