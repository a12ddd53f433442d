//! What a registration and a heartbeat carry once they passed validation (`crate::validate`).

use std::net::{IpAddr, SocketAddr};

use llm_router_protocol::GpuDevice;
use uuid::Uuid;

use super::figures::NodeFigures;

/// A registration that passed steps 1 and 2 of SPEC §2.1.
#[derive(Debug, Clone)]
pub struct Registration {
    pub machine_name: String,
    /// The canonical text of an IP address.
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
    /// The peer the reachability probe contacts; `None` only if `ip_address` is not an address.
    pub fn runtime_addr(&self) -> Option<SocketAddr> {
        let ip: IpAddr = self.ip_address.parse().ok()?;
        Some(SocketAddr::new(ip, self.runtime_port))
    }
}

/// A heartbeat that passed validation.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub node_id: Uuid,
    pub figures: NodeFigures,
    pub loaded_models: Vec<String>,
    pub ready_models: Vec<String>,
}
