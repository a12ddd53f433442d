//! Registrations (SPEC §2.1 steps 1–2) and heartbeats (SPEC §2.2), checked and turned into `model::input`; the
//! address rules of SPEC §9 that keep the reachability probe away from addresses that can never be a node.

use std::net::{IpAddr, Ipv6Addr};

use llm_router_protocol::{GpuMetrics, HeartbeatRequest, RegisterRequest, RuntimeLoad};

use super::{
    Checked, Invalid, MAX_ACTIVE_REQUESTS, MAX_ERROR_COUNT, MAX_GPU_COUNT, MAX_ITEM_CHARS, MAX_LIST_LEN,
    MAX_NAME_CHARS, MAX_POWER_WATTS, MAX_THROTTLE_REASON_CHARS, MAX_THROTTLE_REASONS, Text, bad_request, gpu_uuid,
    item, list, memory, percent, text,
};
use crate::model::figures::NodeFigures;
use crate::model::input::{Heartbeat, Registration};

/// Steps 1 (shape and values, 400) and 2 (GPU required, 403) of SPEC §2.1. `peer` stands in for a missing address;
/// either way the address rules of SPEC §9 apply, link-local addresses only when `allow_link_local` is set.
pub fn registration(req: RegisterRequest, peer: IpAddr, allow_link_local: bool) -> Checked<Registration> {
    let machine_name = req.machine_name;
    if machine_name.trim().is_empty() {
        return Err(bad_request("`machine_name` must not be blank."));
    }
    if machine_name.chars().count() > MAX_NAME_CHARS {
        return Err(bad_request(format!("`machine_name` must be at most {MAX_NAME_CHARS} characters.")));
    }
    text("machine_name", &machine_name, Text::Line)?;
    let given = req.ip_address.is_some();
    let ip = match req.ip_address {
        Some(text) => text.trim().parse().map_err(|_| {
            bad_request(format!("`ip_address`: `{}` is not an IPv4 or IPv6 address literal.", text.escape_debug()))
        })?,
        None => peer,
    };
    let ip = canonical(ip);
    node_address(ip, allow_link_local).map_err(|why| {
        let source =
            if given { "" } else { " (the request has no `ip_address`, so the router took the connection's address)" };
        bad_request(format!("`ip_address`: {ip}{source} {why}."))
    })?;
    let ip_address = ip.to_string();
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
    for (i, gpu) in gpu_devices.iter().enumerate() {
        if gpu.model.chars().count() > MAX_ITEM_CHARS {
            return Err(bad_request(format!("`gpu_devices[{i}].model` must be at most {MAX_ITEM_CHARS} characters.")));
        }
        text(format_args!("gpu_devices[{i}].model"), &gpu.model, Text::Line)?;
        if gpu.count > MAX_GPU_COUNT {
            return Err(bad_request(format!(
                "`gpu_devices[{i}].count` must be at most {MAX_GPU_COUNT}, not {}.",
                gpu.count
            )));
        }
        memory(format_args!("gpu_devices[{i}].memory_bytes"), gpu.memory_bytes)?;
        if let Some(uuids) = &gpu.uuids {
            if i64::try_from(uuids.len()).ok() != Some(gpu.count) {
                return Err(bad_request(format!(
                    "`gpu_devices[{i}].uuids` has {} entries but `count` is {}; send one uuid per GPU, or none.",
                    uuids.len(),
                    gpu.count
                )));
            }
            for (j, uuid) in uuids.iter().enumerate() {
                gpu_uuid(format_args!("gpu_devices[{i}].uuids[{j}]"), uuid)?;
            }
        }
    }
    // Step 2: only machines with at least one usable GPU may join the fleet.
    if gpu_devices.is_empty() {
        return Err(Invalid::GpuRequired(
            "This router accepts only machines with a GPU, and `gpu_devices` is empty or missing.".to_owned(),
        ));
    }
    if let Some((i, gpu)) = gpu_devices.iter().enumerate().find(|(_, gpu)| gpu.count < 1 || gpu.model.trim().is_empty())
    {
        let why = if gpu.count < 1 { format!("a count of {}", gpu.count) } else { "a blank model".to_owned() };
        return Err(Invalid::GpuRequired(format!(
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

/// Validates a heartbeat's figures: percentages within 0..=100, finite and bounded numbers, printable and bounded
/// lists.
pub fn heartbeat(req: HeartbeatRequest) -> Checked<Heartbeat> {
    percent("cpu_usage", req.cpu_usage)?;
    percent("memory_usage", req.memory_usage)?;
    if let Some(active) = req.active_requests.filter(|n| *n > MAX_ACTIVE_REQUESTS) {
        return Err(bad_request(format!("`active_requests` must be at most {MAX_ACTIVE_REQUESTS}, not {active}.")));
    }
    if let Some(load) = &req.load {
        runtime_load(load)?;
    }
    let gpus = req.gpus.unwrap_or_default();
    if gpus.len() > MAX_LIST_LEN {
        return Err(bad_request(format!("`gpus` has more than {MAX_LIST_LEN} entries.")));
    }
    for (i, gpu) in gpus.iter().enumerate() {
        if i64::from(gpu.index) >= MAX_GPU_COUNT {
            return Err(bad_request(format!("`gpus[{i}].index` must be below {MAX_GPU_COUNT}, not {}.", gpu.index)));
        }
        percent(format_args!("gpus[{i}].utilization"), gpu.utilization)?;
        if gpu.temperature_c.is_some_and(|t| !t.is_finite() || !(-100.0..=300.0).contains(&t)) {
            return Err(bad_request(format!("`gpus[{i}].temperature_c` must be a temperature in °C.")));
        }
        memory(format_args!("gpus[{i}].memory_used_bytes"), gpu.memory_used_bytes)?;
        memory(format_args!("gpus[{i}].memory_total_bytes"), gpu.memory_total_bytes)?;
        if let Some(model) = &gpu.model {
            if model.chars().count() > MAX_ITEM_CHARS {
                return Err(bad_request(format!("`gpus[{i}].model` is longer than {MAX_ITEM_CHARS} characters.")));
            }
            text(format_args!("gpus[{i}].model"), model, Text::Line)?;
        }
        gpu_health(i, gpu)?;
    }
    let metrics = NodeFigures {
        cpu_usage: req.cpu_usage,
        memory_usage: req.memory_usage,
        gpus,
        active_requests: req.active_requests,
        load: req.load,
    };
    Ok(Heartbeat {
        node_id: req.node_id,
        loaded_models: list("loaded_models", req.loaded_models)?,
        ready_models: list("ready_models", req.ready_models)?,
        figures: metrics,
    })
}

/// The runtime's own load (SPEC §13): counts of requests within [`MAX_ACTIVE_REQUESTS`], the KV cache's share in
/// use within 0..=1.
fn runtime_load(load: &RuntimeLoad) -> Checked<()> {
    for (name, count) in [("load.running", load.running), ("load.waiting", load.waiting)] {
        if let Some(count) = count.filter(|n| u64::from(*n) > MAX_ACTIVE_REQUESTS) {
            return Err(bad_request(format!("`{name}` must be at most {MAX_ACTIVE_REQUESTS}, not {count}.")));
        }
    }
    if load.kv_cache_usage.is_some_and(|share| !share.is_finite() || !(0.0..=1.0).contains(&share)) {
        return Err(bad_request("`load.kv_cache_usage` must be a share between 0 and 1."));
    }
    Ok(())
}

/// The health figures of heartbeat GPU `i` (SPEC §10): uuid, error counts, power, throttle reasons.
fn gpu_health(i: usize, gpu: &GpuMetrics) -> Checked<()> {
    if let Some(uuid) = &gpu.uuid {
        gpu_uuid(format_args!("gpus[{i}].uuid"), uuid)?;
    }
    if let Some(count) = gpu.ecc_uncorrected.filter(|n| *n > MAX_ERROR_COUNT) {
        return Err(bad_request(format!(
            "`gpus[{i}].ecc_uncorrected` must be at most {MAX_ERROR_COUNT}, not {count}."
        )));
    }
    if gpu.xid == Some(0) {
        return Err(bad_request(format!("`gpus[{i}].xid` must be an XID error number (1 or more), not 0.")));
    }
    if let Some(watts) = gpu.power_watts.filter(|w| !w.is_finite() || !(0.0..=MAX_POWER_WATTS).contains(w)) {
        return Err(bad_request(format!(
            "`gpus[{i}].power_watts` must be a power in watts between 0 and {MAX_POWER_WATTS}, not {watts}."
        )));
    }
    if let Some(reasons) = &gpu.throttle_reasons {
        if reasons.len() > MAX_THROTTLE_REASONS {
            return Err(bad_request(format!(
                "`gpus[{i}].throttle_reasons` has more than {MAX_THROTTLE_REASONS} entries."
            )));
        }
        for (j, reason) in reasons.iter().enumerate() {
            if reason.trim().is_empty() || reason.chars().count() > MAX_THROTTLE_REASON_CHARS {
                return Err(bad_request(format!(
                    "`gpus[{i}].throttle_reasons[{j}]` must be 1 to {MAX_THROTTLE_REASON_CHARS} characters and not \
                     blank."
                )));
            }
            text(format_args!("gpus[{i}].throttle_reasons[{j}]"), reason, Text::Line)?;
        }
    }
    Ok(())
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) are checked, stored, shown and probed as plain IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// The IPv6 address of the cloud instance metadata service (AWS); its IPv4 one is link-local.
const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);

/// The address rules of SPEC §9 for an address in canonical form: why it can never be a node's, or be one only with
/// `--allow-link-local-nodes`. Loopback stays allowed, for a router and a node on one machine.
fn node_address(ip: IpAddr, allow_link_local: bool) -> Result<(), String> {
    let never = match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => Some("is the unspecified address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("is the broadcast address"),
        IpAddr::V4(v4) if v4.is_multicast() => Some("is a multicast address"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("is the unspecified address"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("is a multicast address"),
        _ => None,
    };
    if let Some(what) = never {
        return Err(format!("{what}, which can never be a node's; send the address the router reaches the runtime at"));
    }
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80 || v6 == METADATA_V6,
    };
    if link_local && !allow_link_local {
        return Err("is link-local (169.254.0.0/16, fe80::/10, or a cloud metadata address); the router accepts such \
                    nodes only when started with --allow-link-local-nodes"
            .to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use llm_router_protocol::GpuDevice;
    use uuid::Uuid;

    use super::*;
    use crate::validate::MAX_MEMORY_BYTES;

    fn request() -> RegisterRequest {
        RegisterRequest {
            machine_name: "gpu-1".into(),
            ip_address: None,
            runtime_port: 8000,
            runtime_version: "b4000".into(),
            gpu_devices: Some(vec![GpuDevice { model: "NVIDIA L4".into(), count: 2, memory_bytes: None, uuids: None }]),
            supported_runtimes: None,
            loaded_models: None,
            ready_models: None,
            tags: None,
        }
    }

    fn peer() -> IpAddr {
        "::ffff:10.1.2.3".parse().expect("ip")
    }

    fn code(result: Checked<Registration>) -> &'static str {
        match result.map(|_| ()).expect_err("should fail") {
            Invalid::Field(_) => "invalid_request",
            Invalid::GpuRequired(_) => "gpu_required",
        }
    }

    #[test]
    fn missing_address_uses_the_canonical_peer() {
        let reg = registration(request(), peer(), false).expect("valid");
        assert_eq!(reg.ip_address, "10.1.2.3");
        assert!(!reg.loaded_models_given);
        assert_eq!(reg.tags, None);
    }

    #[test]
    fn bad_values_name_their_field() {
        let mut r = request();
        r.machine_name = "  ".into();
        assert_eq!(code(registration(r, peer(), false)), "invalid_request");
        let mut r = request();
        r.runtime_port = 0;
        let err = registration(r, peer(), false).expect_err("port 0");
        assert!(err.to_string().contains("runtime_port"));
        let mut r = request();
        r.runtime_port = 65536;
        assert_eq!(code(registration(r, peer(), false)), "invalid_request");
        let mut r = request();
        r.ip_address = Some("10.0.0.300".into());
        assert!(registration(r, peer(), false).expect_err("ip").to_string().contains("ip_address"));
        let mut r = request();
        r.machine_name = "x".repeat(256);
        assert_eq!(code(registration(r, peer(), false)), "invalid_request");
        let mut r = request();
        r.tags = Some(vec!["ok".into(), "".into()]);
        assert!(registration(r, peer(), false).expect_err("tag").to_string().contains("tags[1]"));
    }

    #[test]
    fn gpu_rules_answer_gpu_required() {
        let mut r = request();
        r.gpu_devices = None;
        assert_eq!(code(registration(r, peer(), false)), "gpu_required");
        let mut r = request();
        r.gpu_devices = Some(vec![]);
        assert_eq!(code(registration(r, peer(), false)), "gpu_required");
        let mut r = request();
        r.gpu_devices = Some(vec![GpuDevice { model: "A".into(), count: 0, memory_bytes: None, uuids: None }]);
        assert_eq!(code(registration(r, peer(), false)), "gpu_required");
        let mut r = request();
        r.gpu_devices = Some(vec![GpuDevice { model: " ".into(), count: 1, memory_bytes: None, uuids: None }]);
        assert_eq!(code(registration(r, peer(), false)), "gpu_required");
    }

    #[test]
    fn a_bad_field_wins_over_a_missing_gpu() {
        let mut r = request();
        r.gpu_devices = None;
        r.runtime_version = "".into();
        assert_eq!(code(registration(r, peer(), false)), "invalid_request");
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
            load: None,
            replicas: None,
        };
        assert!(heartbeat(hb(55.5)).is_ok());
        assert!(heartbeat(hb(100.1)).expect_err("over").to_string().contains("cpu_usage"));
        assert!(heartbeat(hb(-1.0)).is_err());
        assert!(heartbeat(hb(f64::NAN)).is_err());
    }

    #[test]
    fn runtime_load_is_bounded() {
        let hb = |load: RuntimeLoad| HeartbeatRequest {
            node_id: Uuid::nil(),
            cpu_usage: None,
            memory_usage: None,
            gpus: None,
            loaded_models: None,
            ready_models: None,
            active_requests: None,
            load: Some(load),
            replicas: None,
        };
        let fine = RuntimeLoad { running: Some(3), waiting: Some(0), kv_cache_usage: Some(0.42) };
        assert_eq!(heartbeat(hb(fine)).expect("fine").figures.load, Some(fine));
        let many = RuntimeLoad { waiting: Some(2_000_000), ..fine };
        assert!(heartbeat(hb(many)).expect_err("many").to_string().contains("load.waiting"));
        for share in [1.5, -0.1, f64::NAN] {
            let odd = RuntimeLoad { kv_cache_usage: Some(share), ..fine };
            assert!(heartbeat(hb(odd)).expect_err("share").to_string().contains("kv_cache_usage"));
        }
    }

    fn with_ip(ip: &str, allow_link_local: bool) -> Checked<Registration> {
        let mut r = request();
        r.ip_address = Some(ip.into());
        registration(r, peer(), allow_link_local)
    }

    #[test]
    fn addresses_that_can_never_be_a_node_are_refused_in_every_form() {
        for ip in ["0.0.0.0", "::", "224.0.0.1", "239.255.255.250", "ff02::1", "255.255.255.255", "::ffff:0.0.0.0"] {
            let err = with_ip(ip, true).expect_err(ip);
            assert!(matches!(err, Invalid::Field(_)), "{ip}");
            assert!(err.to_string().contains("`ip_address`"), "{ip}: {err}");
        }
        for ip in ["::ffff:255.255.255.255", "::ffff:224.0.0.1"] {
            assert!(with_ip(ip, true).expect_err(ip).to_string().contains("can never be a node"), "{ip}");
        }
    }

    #[test]
    fn link_local_and_metadata_addresses_need_the_flag() {
        for ip in ["169.254.169.254", "169.254.1.2", "fe80::1", "febf::1", "::ffff:169.254.169.254", "fd00:ec2::254"] {
            let err = with_ip(ip, false).expect_err(ip);
            assert!(err.to_string().contains("--allow-link-local-nodes"), "{ip}: {err}");
            assert!(with_ip(ip, true).is_ok(), "{ip} with the flag");
        }
        assert_eq!(with_ip("::ffff:169.254.1.2", true).expect("flag").ip_address, "169.254.1.2");
        // Neighbours of the blocks are ordinary addresses.
        for ip in ["169.255.0.1", "fec0::1", "fd00:ec2::253", "127.0.0.1", "::1", "10.0.0.1", "2001:db8::1"] {
            assert!(with_ip(ip, false).is_ok(), "{ip}");
        }
    }

    #[test]
    fn the_peer_address_obeys_the_same_rules() {
        let link_local: IpAddr = "::ffff:169.254.7.7".parse().expect("ip");
        let err = registration(request(), link_local, false).expect_err("link-local peer");
        assert!(err.to_string().contains("169.254.7.7") && err.to_string().contains("connection"), "{err}");
        assert_eq!(registration(request(), link_local, true).expect("flag").ip_address, "169.254.7.7");
        let mapped: IpAddr = "::ffff:0.0.0.0".parse().expect("ip");
        assert!(registration(request(), mapped, true).is_err());
    }

    #[test]
    fn control_characters_are_refused_naming_the_field() {
        for (field, bad) in [("machine_name", "gpu\u{1b}[31m"), ("runtime_version", "v1\r\n"), ("tags[0]", "a\u{7f}")] {
            let mut r = request();
            match field {
                "machine_name" => r.machine_name = bad.into(),
                "runtime_version" => r.runtime_version = bad.into(),
                _ => r.tags = Some(vec![bad.into()]),
            }
            let err = registration(r, peer(), false).expect_err(field);
            assert!(err.to_string().contains(&format!("`{field}`")), "{err}");
        }
        assert!(text("notes", "line one\n\tline two", Text::Lines).is_ok());
        assert!(text("notes", "line one\r\nline two", Text::Lines).is_err());
        assert!(text("name", "tab\there", Text::Line).is_err());
        // Non-ASCII text, C1 controls included, is not what SPEC §9 refuses.
        assert!(text("name", "Grafikkarte für Ünïcode \u{85} 🚀", Text::Line).is_ok());
        let err = text("name", "ab\u{0}", Text::Line).expect_err("NUL");
        assert!(err.to_string().contains("U+0000 at character 3"), "{err}");
    }

    #[test]
    fn gpu_numbers_are_bounded() {
        let mut r = request();
        r.gpu_devices =
            Some(vec![GpuDevice { model: "A".into(), count: MAX_GPU_COUNT + 1, memory_bytes: None, uuids: None }]);
        assert!(registration(r, peer(), false).expect_err("count").to_string().contains("gpu_devices[0].count"));
        let mut r = request();
        r.gpu_devices = Some(vec![GpuDevice {
            model: "A".into(),
            count: MAX_GPU_COUNT,
            memory_bytes: Some(MAX_MEMORY_BYTES + 1),
            uuids: None,
        }]);
        assert!(registration(r, peer(), false).expect_err("memory").to_string().contains("memory_bytes"));
        let mut r = request();
        r.gpu_devices = Some(vec![GpuDevice {
            model: "A".into(),
            count: MAX_GPU_COUNT,
            memory_bytes: Some(MAX_MEMORY_BYTES),
            uuids: None,
        }]);
        assert!(registration(r, peer(), false).is_ok());
    }
}
