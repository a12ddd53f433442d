//! `llm-node`, the agent that runs on every GPU machine of an llm-router fleet (SPEC §5).
//!
//! It detects the machine's GPUs ([`gpu`]), registers the machine with the router ([`client`]), keeps the node's
//! id and token ([`identity`]) and sends heartbeats with host, GPU and runtime figures, the runtime's own load
//! included ([`runtime`], [`agent`]). With `--manage-runtimes` it also runs the models the router assigns to the
//! node ([`deploy`]) and forwards the node's requests to them.
//! [`run`] is the whole program; the binary only parses the command line and waits for a signal.

pub mod agent;
pub mod client;
pub mod config;
pub mod deploy;
pub mod gpu;
pub mod identity;
pub mod runtime;

use std::future::Future;

pub use config::{Cli, Config};

/// Why the agent stopped without being asked to.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    NoGpu(#[from] gpu::NoGpuFound),
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Agent(#[from] agent::AgentError),
}

impl Error {
    /// Process exit status for this error: 3 when no GPU was found (so a service manager can be told not to
    /// restart a machine that has none), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::NoGpu(_) => 3,
            _ => 1,
        }
    }
}

/// Run the agent until `shutdown` completes (then `Ok`) or a fatal error.
///
/// With `--check`, print what would be announced to the router (the registration, and the GPU figures and runtime
/// load of a heartbeat) and return instead of running.
pub async fn run(cli: Cli, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let check = cli.check;
    let host_name = sysinfo::System::host_name().ok().filter(|h| !h.trim().is_empty());
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty()).map(Into::into);
    let config = cli.resolve(host_name, home)?;

    let runtime = runtime::Runtime::new(config.runtime_url.clone(), config.runtime_timeout)?;
    let ca_pem = match &config.ca_cert {
        Some(path) => Some(std::fs::read(path).map_err(|err| {
            config::ConfigError::new(format!("--ca-cert (LLM_NODE_CA_CERT): cannot read {}: {err}", path.display()))
        })?),
        None => None,
    };
    let router = client::RouterClient::new(config.router_url.clone(), config.router_timeout, ca_pem.as_deref())?
        .with_join_token(config.join_token.as_ref().map(|secret| secret.0.clone()));

    let mut shutdown = std::pin::pin!(shutdown);
    let (probe, first_sample) = tokio::select! {
        found = gpu::detect(config.gpu_detection) => found?,
        () = &mut shutdown => return Ok(()),
    };
    tracing::info!(
        source = probe.name(),
        gpus = first_sample.len(),
        models = %first_sample.iter().map(|g| g.model.as_str()).collect::<Vec<_>>().join(", "),
        "GPUs found"
    );

    let launchers = match &config.manage {
        Some(manage) => {
            let found = deploy::launch::Launchers::discover(manage).await;
            let names = found.managed_names();
            if names.is_empty() {
                tracing::warn!(
                    "--manage-runtimes: no runtime can be started here (no llama-server on PATH or --llama-server, \
                     no --llama-cpp-python, no vllm on PATH or --vllm); the node announces none and gets no \
                     deployments"
                );
            } else {
                tracing::info!(runtimes = %names.join(", "), "runtimes this node starts for deployments");
            }
            Some(found)
        }
        None => None,
    };
    let managed_names = launchers.as_ref().map(|l| l.managed_names()).unwrap_or_default();

    if check {
        let models = runtime.models().await.unwrap_or_else(|e| {
            tracing::warn!(cause = %e, "runtime unreachable");
            Vec::new()
        });
        let detected = runtime.detect().await;
        let load = runtime::load::LoadProbe::new().sample(&runtime).await;
        let request = agent::build_registration(&config, &first_sample, models, detected, &managed_names);
        let announced = serde_json::json!({
            "registration": request,
            "heartbeat_gpus": gpu::to_metrics(&first_sample),
            "heartbeat_load": load,
        });
        let json = serde_json::to_string_pretty(&announced).unwrap_or_else(|e| format!("cannot encode: {e}"));
        println!("{json}");
        return Ok(());
    }

    let managed = match (&config.manage, launchers) {
        (Some(manage), Some(launchers)) => Some(start_deployments(manage, launchers, &runtime).await?),
        _ => None,
    };
    let mut agent = agent::Agent::new(config, router, runtime, probe, first_sample);
    if let Some((deployments, _)) = &managed {
        agent = agent.with_deployments(deployments.clone(), managed_names);
    }
    let result = tokio::select! {
        result = agent.run() => match result {
            Err(e) => Err(e.into()),
            Ok(never) => match never {},
        },
        () = shutdown => {
            tracing::info!("stopping");
            Ok(())
        }
    };
    if let Some((deployments, forwarding)) = managed {
        forwarding.abort();
        deployments.shutdown().await;
    }
    result
}

/// Listen on the forwarding port and make the supervisor of the node's replicas (`--manage-runtimes`).
async fn start_deployments(
    manage: &config::ManageConfig,
    launchers: deploy::launch::Launchers,
    runtime: &runtime::Runtime,
) -> Result<(deploy::Deployments, tokio::task::JoinHandle<()>), Error> {
    let listener =
        tokio::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, manage.serve_port)).await.map_err(|e| {
            config::ConfigError::new(format!(
                "--serve-port (LLM_NODE_SERVE_PORT): cannot listen on port {}: {e}",
                manage.serve_port
            ))
        })?;
    let downloads = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(30))
        .read_timeout(std::time::Duration::from_secs(120))
        .build()?;
    let probe = reqwest::Client::builder().timeout(std::time::Duration::from_secs(2)).build()?;
    let deployments = deploy::Deployments::new(deploy::supervise::Context {
        fetcher: deploy::fetch::Fetcher::new(downloads, manage.model_cache_dir.clone()),
        launchers,
        log_dir: manage.log_dir.clone(),
        timing: deploy::supervise::Timing::new(manage.start_timeout),
        probe,
        gpus: deploy::gpus::Gpus::default(),
    });
    tracing::info!(
        port = manage.serve_port,
        cache = %manage.model_cache_dir.display(),
        "forwarding port open: requests go to the replica serving their model, else to --runtime-url"
    );
    let forwarder = std::sync::Arc::new(deploy::forward::Forwarder::new(deployments.clone(), runtime.clone()));
    Ok((deployments, tokio::spawn(forwarder.serve(listener))))
}
