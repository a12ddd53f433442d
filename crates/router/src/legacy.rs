//! Import of the JSON-file era's `nodes.json` (SPEC §4).
//!
//! The file is read and parsed before anything else happens; a corrupt file stops the start and is left as it
//! is. Entries become nodes that count as approved, start `offline` and have no token, so their agents register
//! again and take them over (SPEC §2.1 step 3). The import is one transaction and idempotent; only after it commits
//! is the file renamed to `nodes.json.migrated`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use llm_router_protocol::{GpuDevice, NodeStatus};
use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::clock::Millis;
use crate::model::node::{Node, NodeEvent};

/// Name of the legacy file inside the data directory.
pub const FILE_NAME: &str = "nodes.json";
/// What the file is renamed to once imported.
pub const MIGRATED_NAME: &str = "nodes.json.migrated";
/// Who approved an imported node, as shown in `approved_by`.
pub const IMPORT_ACTOR: &str = "nodes.json import";

/// One entry of the legacy file. Fields the old format could omit are optional; an entry missing what a node needs
/// is skipped and named in the log, while a field of the wrong type makes the whole file corrupt.
#[derive(Debug, Deserialize)]
struct LegacyEntry {
    id: Option<String>,
    machine_name: Option<String>,
    ip_address: Option<String>,
    runtime_version: Option<String>,
    runtime_port: Option<i64>,
    registered_at: Option<String>,
    last_seen: Option<String>,
    custom_name: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    notes: Option<String>,
    #[serde(default)]
    loaded_models: Vec<Value>,
    gpu_devices: Option<Vec<LegacyGpu>>,
    gpu_count: Option<i64>,
    gpu_model: Option<String>,
}

#[derive(Debug, Deserialize)]
struct LegacyGpu {
    model: String,
    #[serde(default = "one")]
    count: i64,
    memory: Option<u64>,
}

fn one() -> i64 {
    1
}

/// The parsed legacy file: nodes to import, and entries left out with the reason.
#[derive(Debug)]
pub struct LegacyFile {
    pub path: PathBuf,
    pub nodes: Vec<Node>,
    pub skipped: Vec<String>,
}

impl LegacyFile {
    /// The event recorded for each imported node.
    pub fn event(node: &Node, now: Millis) -> NodeEvent {
        NodeEvent::new(node.id, now, None, NodeStatus::Offline.as_str(), "imported from nodes.json")
    }

    /// Renames the imported file so the next start does not read it again.
    pub fn mark_migrated(&self) -> anyhow::Result<()> {
        let target = self.path.with_file_name(MIGRATED_NAME);
        std::fs::rename(&self.path, &target)
            .with_context(|| format!("renaming {} to {}", self.path.display(), target.display()))
    }
}

/// Reads `nodes.json` from the data directory, if there is one. A file that is not a JSON array of objects is an
/// error naming the file and what is wrong; the file is not touched.
pub fn read(data_dir: &Path, now: Millis) -> anyhow::Result<Option<LegacyFile>> {
    let path = data_dir.join(FILE_NAME);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("reading legacy {}", path.display())),
    };
    let entries: Vec<Value> = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "legacy {} is corrupt (expected a JSON array of nodes); fix or move it, then start again",
            path.display()
        )
    })?;
    let mut nodes = Vec::new();
    let mut skipped = Vec::new();
    for (position, raw) in entries.into_iter().enumerate() {
        let label = raw
            .get("machine_name")
            .and_then(Value::as_str)
            .map_or_else(|| format!("entry #{position}"), |name| format!("`{name}` (entry #{position})"));
        let entry: LegacyEntry = serde_json::from_value(raw).with_context(|| {
            format!("legacy {} is corrupt: {label} does not have the nodes.json shape", path.display())
        })?;
        match convert(entry, now) {
            Ok(node) => nodes.push(node),
            Err(why) => skipped.push(format!("{label}: {why}")),
        }
    }
    Ok(Some(LegacyFile { path, nodes, skipped }))
}

fn convert(entry: LegacyEntry, now: Millis) -> Result<Node, String> {
    let id = entry.id.as_deref().and_then(|id| Uuid::parse_str(id).ok()).ok_or("no valid id")?;
    let machine_name = entry.machine_name.filter(|n| !n.trim().is_empty()).ok_or("no machine name")?;
    let ip: IpAddr = entry.ip_address.as_deref().and_then(|ip| ip.parse().ok()).ok_or("no valid IP address")?;
    let runtime_port = entry
        .runtime_port
        .and_then(|port| u16::try_from(port).ok())
        .filter(|port| *port >= 1)
        .ok_or("no valid runtime port")?;
    let gpu_devices: Vec<GpuDevice> = match (entry.gpu_devices, entry.gpu_model) {
        (Some(devices), _) if !devices.is_empty() => devices
            .into_iter()
            .filter(|gpu| !gpu.model.trim().is_empty() && gpu.count >= 1)
            .map(|gpu| GpuDevice { model: gpu.model, count: gpu.count, memory_bytes: gpu.memory, uuids: None })
            .collect(),
        (_, Some(model)) if !model.trim().is_empty() => {
            vec![GpuDevice {
                model,
                count: entry.gpu_count.filter(|c| *c >= 1).unwrap_or(1),
                memory_bytes: None,
                uuids: None,
            }]
        }
        _ => Vec::new(),
    };
    if gpu_devices.is_empty() {
        return Err("no GPU".to_owned());
    }
    let registered_at = entry.registered_at.as_deref().and_then(parse_time).unwrap_or(now);
    Ok(Node {
        id,
        machine_name,
        ip_address: ip.to_canonical().to_string(),
        runtime_port,
        runtime_version: entry.runtime_version.filter(|v| !v.trim().is_empty()).unwrap_or_else(|| "unknown".into()),
        status: NodeStatus::Offline,
        display_name: entry.custom_name.filter(|n| !n.trim().is_empty()),
        notes: entry.notes.filter(|n| !n.trim().is_empty()),
        gpu_devices,
        supported_runtimes: Vec::new(),
        // Only model ids carry over; the old file's ready_models held counters, not ids.
        loaded_models: entry.loaded_models.into_iter().filter_map(|m| m.as_str().map(str::to_owned)).collect(),
        ready_models: Vec::new(),
        tags: entry.tags.into_iter().filter(|t| !t.trim().is_empty()).collect(),
        figures: None,
        registered_at,
        approved_at: Some(registered_at),
        approved_by: Some(IMPORT_ACTOR.to_owned()),
        join_token: None,
        cordoned: false,
        max_concurrency: None,
        conditions: Default::default(),
        last_seen_at: entry.last_seen.as_deref().and_then(parse_time),
    })
}

fn parse_time(text: &str) -> Option<Millis> {
    let at = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_with_and_without_fractions() {
        assert_eq!(parse_time("1970-01-01T00:00:01.5Z"), Some(1_500));
        assert_eq!(parse_time("2025-12-01T07:00:00Z"), Some(1_764_572_400_000));
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn a_gpu_model_alone_becomes_one_device_group() {
        let entry: LegacyEntry = serde_json::from_value(serde_json::json!({
            "id": "5d6e7f80-91a2-4b3c-8d4e-5f6a7b8c9d0e", "machine_name": "m", "ip_address": "fd00::1:5",
            "runtime_port": 8080, "gpu_model": "Apple M2 Ultra"
        }))
        .expect("entry");
        let node = convert(entry, 0).expect("node");
        assert_eq!(
            node.gpu_devices,
            vec![GpuDevice { model: "Apple M2 Ultra".into(), count: 1, memory_bytes: None, uuids: None }]
        );
        assert_eq!(node.runtime_version, "unknown");
    }
}
