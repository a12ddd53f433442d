//! Checks on what nodes send (SPEC §2.1 steps 1–2, §2.2), turning wire types into validated values.
//!
//! Shape errors name the offending field (400 `invalid_request`); a missing or unusable GPU list is its own
//! answer (403 `gpu_required`), checked after the shape so a malformed body never reads as "no GPU".

use std::net::{IpAddr, SocketAddr};

use llm_router_protocol::{GpuDevice, HeartbeatRequest, RegisterRequest};
use uuid::Uuid;

use super::node::{NodeMetrics, PackedMetrics};
use crate::error::{ApiError, ApiResult, bad_request};

/// Longest accepted machine name, in characters.
pub const MAX_NAME_CHARS: usize = 255;
/// Longest accepted free-text item (model id, tag, runtime name, version), in characters.
pub const MAX_ITEM_CHARS: usize = 512;
/// Most entries accepted in any list.
pub const MAX_LIST_LEN: usize = 1024;

/// A registration that passed steps 1 and 2.
#[derive(Debug, Clone)]
pub struct Registration {
    pub machine_name: String,
    pub ip_address: String,
    pub runtime_port: u16,
    pub runtime_version: String,
    pub gpu_devices: Vec<GpuDevice>,
    pub supported_runtimes: Vec<String>,
    pub loaded_models: Vec<String>,
    /// True when the request carried `loaded_models`; otherwise the probe may fill them.
    pub loaded_models_given: bool,
    pub ready_models: Vec<String>,
    /// `None` when the request did not carry tags: a re-registration then keeps the node's tags.
    pub tags: Option<Vec<String>>,
}

impl Registration {
    /// The peer the reachability probe contacts.
    pub fn runtime_addr(&self) -> ApiResult<SocketAddr> {
        let ip: IpAddr = self
            .ip_address
            .parse()
            .map_err(|_| bad_request(format!("`ip_address`: `{}` is not an IP address.", self.ip_address)))?;
        Ok(SocketAddr::new(ip, self.runtime_port))
    }
}

/// A heartbeat that passed validation.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub node_id: Uuid,
    pub metrics: PackedMetrics,
    pub loaded_models: Vec<String>,
    pub ready_models: Vec<String>,
}

/// Steps 1 (shape and values, 400) and 2 (GPU required, 403) of SPEC §2.1. `peer` stands in for a missing address.
pub fn registration(req: RegisterRequest, peer: IpAddr) -> ApiResult<Registration> {
    let machine_name = req.machine_name;
    if machine_name.trim().is_empty() {
        return Err(bad_request("`machine_name` must not be blank."));
    }
    if machine_name.chars().count() > MAX_NAME_CHARS {
        return Err(bad_request(format!("`machine_name` must be at most {MAX_NAME_CHARS} characters.")));
    }
    let ip_address = match req.ip_address {
        Some(text) => {
            let ip: IpAddr = text
                .trim()
                .parse()
                .map_err(|_| bad_request(format!("`ip_address`: `{text}` is not an IPv4 or IPv6 address literal.")))?;
            canonical(ip).to_string()
        }
        None => canonical(peer).to_string(),
    };
    let runtime_port = u16::try_from(req.runtime_port)
        .ok()
        .filter(|port| *port >= 1)
        .ok_or_else(|| bad_request(format!("`runtime_port` must be between 1 and 65535, not {}.", req.runtime_port)))?;
    let runtime_version = item("runtime_version", req.runtime_version)?;
    let supported_runtimes = list("supported_runtimes", req.supported_runtimes)?;
    let loaded_models_given = req.loaded_models.is_some();
    let loaded_models = list("loaded_models", req.loaded_models)?;
    let ready_models = list("ready_models", req.ready_models)?;
    let tags = req.tags.map(|tags| list("tags", Some(tags))).transpose()?;
    let gpu_devices = req.gpu_devices.unwrap_or_default();
    if gpu_devices.len() > MAX_LIST_LEN {
        return Err(bad_request(format!("`gpu_devices` has more than {MAX_LIST_LEN} entries.")));
    }
    if let Some(gpu) = gpu_devices.iter().find(|gpu| gpu.model.chars().count() > MAX_ITEM_CHARS) {
        return Err(bad_request(format!(
            "`gpu_devices`: model names are at most {MAX_ITEM_CHARS} characters ({} is longer).",
            gpu.model.chars().take(40).collect::<String>()
        )));
    }
    // Step 2: only machines with at least one usable GPU may join the fleet.
    if gpu_devices.is_empty() {
        return Err(ApiError::GpuRequired(
            "This router accepts only machines with a GPU, and `gpu_devices` is empty or missing.".to_owned(),
        ));
    }
    if let Some((i, gpu)) = gpu_devices.iter().enumerate().find(|(_, gpu)| gpu.count < 1 || gpu.model.trim().is_empty())
    {
        let why = if gpu.count < 1 { format!("a count of {}", gpu.count) } else { "a blank model".to_owned() };
        return Err(ApiError::GpuRequired(format!(
            "`gpu_devices[{i}]` has {why}; every GPU entry needs a model and a count of at least 1."
        )));
    }
    Ok(Registration {
        machine_name,
        ip_address,
        runtime_port,
        runtime_version,
        gpu_devices,
        supported_runtimes,
        loaded_models,
        loaded_models_given,
        ready_models,
        tags,
    })
}

/// Validates a heartbeat's figures: percentages within 0..=100, finite numbers, bounded lists.
pub fn heartbeat(req: HeartbeatRequest) -> ApiResult<Heartbeat> {
    percent("cpu_usage", req.cpu_usage)?;
    percent("memory_usage", req.memory_usage)?;
    let gpus = req.gpus.unwrap_or_default();
    if gpus.len() > MAX_LIST_LEN {
        return Err(bad_request(format!("`gpus` has more than {MAX_LIST_LEN} entries.")));
    }
    for (i, gpu) in gpus.iter().enumerate() {
        percent(&format!("gpus[{i}].utilization"), gpu.utilization)?;
        if gpu.temperature_c.is_some_and(|t| !t.is_finite() || !(-100.0..=300.0).contains(&t)) {
            return Err(bad_request(format!("`gpus[{i}].temperature_c` must be a temperature in °C.")));
        }
        if gpu.model.as_ref().is_some_and(|m| m.chars().count() > MAX_ITEM_CHARS) {
            return Err(bad_request(format!("`gpus[{i}].model` is longer than {MAX_ITEM_CHARS} characters.")));
        }
    }
    let metrics = NodeMetrics {
        cpu_usage: req.cpu_usage,
        memory_usage: req.memory_usage,
        gpus,
        active_requests: req.active_requests,
    };
    Ok(Heartbeat {
        node_id: req.node_id,
        loaded_models: list("loaded_models", req.loaded_models)?,
        ready_models: list("ready_models", req.ready_models)?,
        metrics: PackedMetrics::pack(&metrics),
    })
}

/// Validates the fields an administrator edits; `None` means "not given".
pub fn optional_text(field: &str, value: Option<String>, max_chars: usize) -> ApiResult<Option<String>> {
    match value {
        Some(text) if text.chars().count() > max_chars => {
            Err(bad_request(format!("`{field}` must be at most {max_chars} characters.")))
        }
        Some(text) if text.trim().is_empty() => Ok(None),
        other => Ok(other),
    }
}

/// A list of non-blank strings, each at most [`MAX_ITEM_CHARS`], at most [`MAX_LIST_LEN`] entries.
pub fn list(field: &str, values: Option<Vec<String>>) -> ApiResult<Vec<String>> {
    let values = values.unwrap_or_default();
    if values.len() > MAX_LIST_LEN {
        return Err(bad_request(format!("`{field}` has more than {MAX_LIST_LEN} entries.")));
    }
    values.into_iter().enumerate().map(|(i, value)| item(&format!("{field}[{i}]"), value)).collect()
}

fn item(field: &str, value: String) -> ApiResult<String> {
    if value.trim().is_empty() {
        return Err(bad_request(format!("`{field}` must not be blank.")));
    }
    if value.chars().count() > MAX_ITEM_CHARS {
        return Err(bad_request(format!("`{field}` must be at most {MAX_ITEM_CHARS} characters.")));
    }
    Ok(value)
}

fn percent(field: &str, value: Option<f64>) -> ApiResult<()> {
    match value {
        Some(v) if !v.is_finite() || !(0.0..=100.0).contains(&v) => {
            Err(bad_request(format!("`{field}` must be a percentage between 0 and 100, not {v}.")))
        }
        _ => Ok(()),
    }
}

/// IPv4-mapped IPv6 peers (`::ffff:10.0.0.1`) are shown and probed as plain IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> RegisterRequest {
        RegisterRequest {
            machine_name: "gpu-1".into(),
            ip_address: None,
            runtime_port: 8000,
            runtime_version: "b4000".into(),
            gpu_devices: Some(vec![GpuDevice { model: "NVIDIA L4".into(), count: 2, memory_bytes: None }]),
            supported_runtimes: None,
            loaded_models: None,
            ready_models: None,
            tags: None,
        }
    }

    fn peer() -> IpAddr {
        "::ffff:10.1.2.3".parse().expect("ip")
    }

    fn code(result: ApiResult<Registration>) -> &'static str {
        result.map(|_| ()).expect_err("should fail").status_and_code().1
    }

    #[test]
    fn missing_address_uses_the_canonical_peer() {
        let reg = registration(request(), peer()).expect("valid");
        assert_eq!(reg.ip_address, "10.1.2.3");
        assert!(!reg.loaded_models_given);
        assert_eq!(reg.tags, None);
    }

    #[test]
    fn bad_values_name_their_field() {
        let mut r = request();
        r.machine_name = "  ".into();
        assert_eq!(code(registration(r, peer())), "invalid_request");
        let mut r = request();
        r.runtime_port = 0;
        let err = registration(r, peer()).expect_err("port 0");
        assert!(err.to_string().contains("runtime_port"));
        let mut r = request();
        r.runtime_port = 65536;
        assert_eq!(code(registration(r, peer())), "invalid_request");
        let mut r = request();
        r.ip_address = Some("10.0.0.300".into());
        assert!(registration(r, peer()).expect_err("ip").to_string().contains("ip_address"));
        let mut r = request();
        r.machine_name = "x".repeat(256);
        assert_eq!(code(registration(r, peer())), "invalid_request");
        let mut r = request();
        r.tags = Some(vec!["ok".into(), "".into()]);
        assert!(registration(r, peer()).expect_err("tag").to_string().contains("tags[1]"));
    }

    #[test]
    fn gpu_rules_answer_gpu_required() {
        let mut r = request();
        r.gpu_devices = None;
        assert_eq!(code(registration(r, peer())), "gpu_required");
        let mut r = request();
        r.gpu_devices = Some(vec![]);
        assert_eq!(code(registration(r, peer())), "gpu_required");
        let mut r = request();
        r.gpu_devices = Some(vec![GpuDevice { model: "A".into(), count: 0, memory_bytes: None }]);
        assert_eq!(code(registration(r, peer())), "gpu_required");
        let mut r = request();
        r.gpu_devices = Some(vec![GpuDevice { model: " ".into(), count: 1, memory_bytes: None }]);
        assert_eq!(code(registration(r, peer())), "gpu_required");
    }

    #[test]
    fn a_bad_field_wins_over_a_missing_gpu() {
        let mut r = request();
        r.gpu_devices = None;
        r.runtime_version = "".into();
        assert_eq!(code(registration(r, peer())), "invalid_request");
    }

    #[test]
    fn heartbeat_percentages_are_bounded() {
        let hb = |cpu: f64| HeartbeatRequest {
            node_id: Uuid::nil(),
            cpu_usage: Some(cpu),
            memory_usage: None,
            gpus: None,
            loaded_models: None,
            ready_models: None,
            active_requests: None,
        };
        assert!(heartbeat(hb(55.5)).is_ok());
        assert!(heartbeat(hb(100.1)).expect_err("over").to_string().contains("cpu_usage"));
        assert!(heartbeat(hb(-1.0)).is_err());
        assert!(heartbeat(hb(f64::NAN)).is_err());
    }
}
