//! Command line and environment configuration of the agent (SPEC §5). Every setting is a flag and an environment
//! variable; flags win. [`Cli`] is what clap parses; [`Config`] is the checked, resolved form the agent runs on.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use reqwest::Url;

use crate::gpu::Detection;

/// Agent of a GPU machine: detects its GPUs, registers the machine with llm-router and sends heartbeats with
/// metrics and the runtime's models.
///
/// The node id and token are kept in the state directory; a restarted agent reuses them, so an approved node comes
/// back online without a new approval. Logs go to stderr; `LLM_NODE_LOG` sets their filter (default `info`).
/// Exit status: 0 after SIGINT/SIGTERM, 3 when the machine has no GPU, 1 for any other fatal error.
#[derive(Debug, Clone, Parser)]
#[command(name = "llm-node", version, about, long_about)]
pub struct Cli {
    /// Base URL of the router, e.g. https://router.example:8443 (or http:// on a trusted network)
    #[arg(long, env = "LLM_ROUTER_URL", required_unless_present = "check")]
    pub router_url: Option<String>,

    /// Base URL of the local OpenAI-compatible runtime (llama.cpp server, vLLM, Ollama), plain HTTP. Its port
    /// (80 when the URL names none) is the runtime port announced to the router.
    #[arg(long, env = "LLM_NODE_RUNTIME_URL", default_value = "http://127.0.0.1:8000")]
    pub runtime_url: String,

    /// Address the router should reach this machine at. Default: the address the router sees the agent connect
    /// from.
    #[arg(long, env = "LLM_NODE_IP")]
    pub ip: Option<IpAddr>,

    /// Machine name announced to the router. Default: the host name.
    #[arg(long, env = "LLM_NODE_NAME")]
    pub name: Option<String>,

    /// Directory where the node id and token are kept (file `node.json`, mode 0600). Default: ~/.llm-node
    #[arg(long, env = "LLM_NODE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// A CA certificate (PEM) to trust for the router's HTTPS besides the system's roots: a private CA.
    #[arg(long, env = "LLM_NODE_CA_CERT")]
    pub ca_cert: Option<PathBuf>,

    /// A join token (`llmj_…`) from the router's administrator: the node joins with the token's tags and, when the
    /// token auto-approves, approved at once. Required by a router in `--registration-mode token`.
    #[arg(long, env = "LLM_NODE_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,

    /// Tags announced to the router, comma separated, e.g. `rack-3,fast-disk`.
    #[arg(long, env = "LLM_NODE_TAGS", value_delimiter = ',')]
    pub tags: Vec<String>,

    /// How GPUs are found: `auto` tries NVML (the NVIDIA driver library) and then the `nvidia-smi` command.
    #[arg(long, env = "LLM_NODE_GPU_DETECTION", value_enum, default_value_t = Detection::Auto)]
    pub gpu_detection: Detection,

    /// Runtimes this node serves, comma separated (e.g. `llama_cpp`, `vllm`, `ollama`). Default: what the
    /// runtime reveals about itself.
    #[arg(long, env = "LLM_NODE_SUPPORTED_RUNTIMES", value_delimiter = ',')]
    pub supported_runtimes: Vec<String>,

    /// Version of the runtime announced to the router. Default: what the runtime reveals, else `unknown`.
    #[arg(long, env = "LLM_NODE_RUNTIME_VERSION")]
    pub runtime_version: Option<String>,

    /// Run the models the router assigns to this node (SPEC §15 deployments): download them into the model cache,
    /// start their runtimes as child processes, restart them when they die, stop what is no longer assigned. The
    /// node is then registered with the forwarding port (`--serve-port`), which sends each request to the runtime
    /// serving its model, and anything else to `--runtime-url`.
    #[arg(long, env = "LLM_NODE_MANAGE_RUNTIMES")]
    pub manage_runtimes: bool,

    /// With `--manage-runtimes`: the port the agent listens on (all addresses) and announces to the router as the
    /// runtime port; it forwards each `/v1` request by its `model` to the local replica serving it, else to
    /// `--runtime-url`.
    #[arg(long, env = "LLM_NODE_SERVE_PORT", default_value_t = 8090,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub serve_port: u16,

    /// With `--manage-runtimes`: where downloaded models are kept, one file per sha256. Default: <state-dir>/models
    #[arg(long, env = "LLM_NODE_MODEL_CACHE_DIR")]
    pub model_cache_dir: Option<PathBuf>,

    /// With `--manage-runtimes`: llama.cpp's `llama-server`, for `llama_cpp` deployments. Default: `llama-server`
    /// on PATH.
    #[arg(long, env = "LLM_NODE_LLAMA_SERVER")]
    pub llama_server: Option<PathBuf>,

    /// With `--manage-runtimes`: a Python interpreter with llama-cpp-python's server (`llama_cpp.server`), for
    /// `llama_cpp` deployments when there is no `llama-server`.
    #[arg(long, env = "LLM_NODE_LLAMA_CPP_PYTHON")]
    pub llama_cpp_python: Option<PathBuf>,

    /// With `--manage-runtimes`: vLLM's `vllm` command, for `vllm` deployments. Default: `vllm` on PATH.
    #[arg(long, env = "LLM_NODE_VLLM")]
    pub vllm: Option<PathBuf>,

    /// With `--manage-runtimes`: how long a started runtime may take to serve its model before it counts as failed
    /// and is started again, in seconds.
    #[arg(long, env = "LLM_NODE_RUNTIME_START_TIMEOUT_SECS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub runtime_start_timeout_secs: u64,

    /// Detect GPUs and the runtime, print what would be announced to the router, and exit.
    #[arg(long)]
    pub check: bool,

    /// First retry delay while the router is unreachable, in milliseconds.
    #[arg(long, env = "LLM_NODE_BACKOFF_BASE_MS", default_value_t = 1000, hide = true,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub backoff_base_ms: u64,

    /// Longest retry delay while the router is unreachable, in milliseconds.
    #[arg(long, env = "LLM_NODE_BACKOFF_MAX_MS", default_value_t = 60_000, hide = true,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub backoff_max_ms: u64,

    /// Retry delay after the router refused the node (403, 409, 422, other 4xx), in milliseconds.
    #[arg(long, env = "LLM_NODE_REFUSED_RETRY_MS", default_value_t = 30_000, hide = true,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub refused_retry_ms: u64,
}

/// The checked settings the agent runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub router_url: Url,
    pub runtime_url: Url,
    /// Port of the runtime, from `runtime_url`.
    pub runtime_port: u16,
    /// The runtime port announced to the router: `runtime_port`, or the forwarding port with `--manage-runtimes`.
    pub announced_port: u16,
    pub ip: Option<IpAddr>,
    pub machine_name: String,
    pub state_dir: PathBuf,
    pub tags: Vec<String>,
    /// Sent with registrations as `X-Join-Token`.
    pub join_token: Option<Secret>,
    /// A CA (PEM) trusted for the router's certificate besides the system's roots.
    pub ca_cert: Option<PathBuf>,
    pub gpu_detection: Detection,
    pub supported_runtimes: Vec<String>,
    pub runtime_version: Option<String>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub refused_retry: Duration,
    /// Time limit of one call to the router.
    pub router_timeout: Duration,
    /// Time limit of one call to the runtime.
    pub runtime_timeout: Duration,
    /// The deployments' settings, with `--manage-runtimes`.
    pub manage: Option<ManageConfig>,
}

/// How the agent runs the replicas the router assigns it (`--manage-runtimes`, SPEC §15).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManageConfig {
    /// The forwarding port, announced to the router as the runtime port.
    pub serve_port: u16,
    pub model_cache_dir: PathBuf,
    /// Where each runtime's output goes: `<state_dir>/runtimes`.
    pub log_dir: PathBuf,
    /// Given by flag; when absent, looked up on PATH.
    pub llama_server: Option<PathBuf>,
    pub llama_cpp_python: Option<PathBuf>,
    pub vllm: Option<PathBuf>,
    pub start_timeout: Duration,
}

/// A secret setting: `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// A setting that cannot be used, with a sentence saying which and why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    pub fn new(message: String) -> Self {
        ConfigError(message)
    }
}

impl Cli {
    /// Check the parsed flags and fill in defaults that need the machine (host name, home directory).
    ///
    /// `host_name` and `home` are passed in so the defaults can be tested without touching the machine.
    pub fn resolve(self, host_name: Option<String>, home: Option<PathBuf>) -> Result<Config, ConfigError> {
        let router_url = match self.router_url.as_deref() {
            Some(raw) => parse_url("--router-url (LLM_ROUTER_URL)", raw, Schemes::HttpOrHttps)?,
            // Only `--check` runs without a router; it never talks to it.
            None => parse_url("--router-url", "http://127.0.0.1:8080", Schemes::HttpOrHttps)?,
        };
        let runtime_url = parse_url("--runtime-url (LLM_NODE_RUNTIME_URL)", &self.runtime_url, Schemes::Http)?;
        let runtime_port = runtime_url.port_or_known_default().ok_or_else(|| {
            ConfigError(format!("--runtime-url `{runtime_url}` has no port and no default port for its scheme"))
        })?;

        let machine_name = match self.name.or(host_name) {
            Some(name) => name.trim().to_owned(),
            None => {
                return Err(ConfigError(
                    "the host name could not be read; set the machine name with --name (LLM_NODE_NAME)".into(),
                ));
            }
        };
        if machine_name.is_empty() || machine_name.chars().count() > 255 {
            return Err(ConfigError(
                "the machine name (--name, LLM_NODE_NAME) must be 1 to 255 characters and not blank".into(),
            ));
        }

        let state_dir = match self.state_dir.or_else(|| home.map(|h| h.join(".llm-node"))) {
            Some(dir) => dir,
            None => {
                return Err(ConfigError(
                    "no home directory is known; set the state directory with --state-dir (LLM_NODE_STATE_DIR)".into(),
                ));
            }
        };

        let runtime_version = self.runtime_version.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        if self.backoff_max_ms < self.backoff_base_ms {
            return Err(ConfigError("--backoff-max-ms must not be below --backoff-base-ms".into()));
        }

        let manage = if self.manage_runtimes {
            let runtime_is_local = runtime_url.host_str().is_some_and(|host| {
                matches!(host, "localhost" | "0.0.0.0" | "[::]" | "[::1]")
                    || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified())
                    || self.ip.is_some_and(|ip| host.trim_matches(['[', ']']).parse::<IpAddr>() == Ok(ip))
            });
            if runtime_is_local && self.serve_port == runtime_port {
                return Err(ConfigError(format!(
                    "--serve-port (LLM_NODE_SERVE_PORT) {} is the port of --runtime-url `{runtime_url}`: the agent \
                     forwards to that runtime on this machine, so it must listen on another port",
                    self.serve_port
                )));
            }
            Some(ManageConfig {
                serve_port: self.serve_port,
                model_cache_dir: self.model_cache_dir.unwrap_or_else(|| state_dir.join("models")),
                log_dir: state_dir.join("runtimes"),
                llama_server: self.llama_server,
                llama_cpp_python: self.llama_cpp_python,
                vllm: self.vllm,
                start_timeout: Duration::from_secs(self.runtime_start_timeout_secs),
            })
        } else {
            None
        };

        Ok(Config {
            // With --manage-runtimes the router reaches the node through the agent's forwarding port.
            announced_port: manage.as_ref().map_or(runtime_port, |m| m.serve_port),
            router_url,
            runtime_url,
            runtime_port,
            ip: self.ip,
            machine_name,
            state_dir,
            tags: clean_list(self.tags),
            join_token: self.join_token.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).map(Secret),
            ca_cert: self.ca_cert,
            gpu_detection: self.gpu_detection,
            supported_runtimes: clean_list(self.supported_runtimes),
            runtime_version,
            backoff_base: Duration::from_millis(self.backoff_base_ms),
            backoff_max: Duration::from_millis(self.backoff_max_ms),
            refused_retry: Duration::from_millis(self.refused_retry_ms),
            router_timeout: Duration::from_secs(10),
            runtime_timeout: Duration::from_secs(3),
            manage,
        })
    }
}

/// Trim every entry and drop empty ones and repeats, keeping the order given.
fn clean_list(items: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        let item = item.trim();
        if !item.is_empty() && !out.iter().any(|seen| seen == item) {
            out.push(item.to_owned());
        }
    }
    out
}

/// Which schemes a URL may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Schemes {
    /// The local runtime: plain HTTP.
    Http,
    /// The router: HTTPS, or plain HTTP on a trusted network.
    HttpOrHttps,
}

/// Parse a base URL with one of the `allowed` schemes.
fn parse_url(what: &str, raw: &str, allowed: Schemes) -> Result<Url, ConfigError> {
    let url = Url::parse(raw.trim()).map_err(|e| ConfigError(format!("{what}: `{raw}` is not a URL: {e}")))?;
    match (url.scheme(), allowed) {
        ("http", _) | ("https", Schemes::HttpOrHttps) => {}
        ("https", Schemes::Http) => {
            return Err(ConfigError(format!(
                "{what}: `{raw}` uses https; the runtime beside the agent is reached over plain http://"
            )));
        }
        (other, Schemes::Http) => {
            return Err(ConfigError(format!("{what}: `{raw}` has scheme `{other}`; expected http://")));
        }
        (other, Schemes::HttpOrHttps) => {
            return Err(ConfigError(format!("{what}: `{raw}` has scheme `{other}`; expected https:// or http://")));
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError(format!("{what}: `{raw}` names no host")));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut all = vec!["llm-node"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).expect("flags parse")
    }

    fn resolve(args: &[&str]) -> Result<Config, ConfigError> {
        cli(args).resolve(Some("gpu-host-1".into()), Some(PathBuf::from("/home/op")))
    }

    #[test]
    fn defaults_come_from_the_machine() {
        let config = resolve(&["--router-url", "http://10.0.0.1:8080"]).expect("valid");
        assert_eq!(config.machine_name, "gpu-host-1");
        assert_eq!(config.state_dir, PathBuf::from("/home/op/.llm-node"));
        assert_eq!(config.runtime_url.as_str(), "http://127.0.0.1:8000/");
        assert_eq!(config.runtime_port, 8000);
        assert_eq!(config.gpu_detection, Detection::Auto);
        assert!(config.tags.is_empty());
        assert_eq!(config.backoff_max, Duration::from_secs(60));
    }

    #[test]
    fn runtime_port_defaults_by_scheme() {
        let config = resolve(&["--router-url", "http://r:1", "--runtime-url", "http://127.0.0.1"]).expect("valid");
        assert_eq!(config.runtime_port, 80);
    }

    #[test]
    fn lists_are_split_trimmed_and_deduplicated() {
        let config = resolve(&[
            "--router-url",
            "http://r:1",
            "--tags",
            "rack-3, fast-disk,,rack-3",
            "--supported-runtimes",
            "vllm",
        ])
        .expect("valid");
        assert_eq!(config.tags, vec!["rack-3", "fast-disk"]);
        assert_eq!(config.supported_runtimes, vec!["vllm"]);
    }

    #[test]
    fn flags_override_machine_defaults() {
        let config = resolve(&[
            "--router-url",
            "http://r:1",
            "--name",
            "box",
            "--state-dir",
            "/var/lib/llm-node",
            "--gpu-detection",
            "nvidia-smi",
            "--ip",
            "192.168.1.20",
        ])
        .expect("valid");
        assert_eq!(config.machine_name, "box");
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/llm-node"));
        assert_eq!(config.gpu_detection, Detection::NvidiaSmi);
        assert_eq!(config.ip, Some("192.168.1.20".parse().expect("ip")));
    }

    #[test]
    fn bad_values_are_refused_with_the_setting_named() {
        let https = resolve(&["--router-url", "https://r:8443"]).expect("https to the router");
        assert_eq!(https.router_url.as_str(), "https://r:8443/");
        let err = resolve(&["--router-url", "http://r", "--runtime-url", "https://127.0.0.1:8000"])
            .expect_err("https to the runtime refused");
        assert!(err.to_string().contains("--runtime-url"), "{err}");
        let err = resolve(&["--router-url", "ftp://r"]).expect_err("ftp refused");
        assert!(err.to_string().contains("https://"), "{err}");
        let err = resolve(&["--router-url", "not a url"]).expect_err("refused");
        assert!(err.to_string().contains("--router-url"), "{err}");
        let err = resolve(&["--router-url", "http://r", "--name", "  "]).expect_err("blank name refused");
        assert!(err.to_string().contains("--name"), "{err}");
        assert!(Cli::try_parse_from(["llm-node", "--router-url", "http://r", "--ip", "nope"]).is_err());
        assert!(Cli::try_parse_from(["llm-node", "--router-url", "http://r", "--gpu-detection", "amd"]).is_err());
    }

    #[test]
    fn managing_runtimes_announces_the_forwarding_port() {
        let plain = resolve(&["--router-url", "http://r:1"]).expect("valid");
        assert_eq!(plain.manage, None);
        assert_eq!(plain.announced_port, 8000);

        let config = resolve(&["--router-url", "http://r:1", "--manage-runtimes", "--vllm", "/opt/vllm/bin/vllm"])
            .expect("valid");
        let manage = config.manage.expect("managed");
        assert_eq!(config.announced_port, 8090);
        assert_eq!(config.runtime_port, 8000);
        assert_eq!(manage.serve_port, 8090);
        assert_eq!(manage.model_cache_dir, PathBuf::from("/home/op/.llm-node/models"));
        assert_eq!(manage.log_dir, PathBuf::from("/home/op/.llm-node/runtimes"));
        assert_eq!(manage.vllm, Some(PathBuf::from("/opt/vllm/bin/vllm")));
        assert_eq!(manage.start_timeout, Duration::from_secs(600));

        let config = resolve(&[
            "--router-url",
            "http://r:1",
            "--manage-runtimes",
            "--serve-port",
            "9000",
            "--model-cache-dir",
            "/data/models",
            "--runtime-start-timeout-secs",
            "30",
        ])
        .expect("valid");
        let manage = config.manage.expect("managed");
        assert_eq!(config.announced_port, 9000);
        assert_eq!(manage.model_cache_dir, PathBuf::from("/data/models"));
        assert_eq!(manage.start_timeout, Duration::from_secs(30));
    }

    #[test]
    fn the_forwarding_port_cannot_be_the_local_runtimes() {
        for runtime in ["http://127.0.0.1:8090", "http://localhost:8090", "http://[::1]:8090"] {
            let err = resolve(&["--router-url", "http://r:1", "--manage-runtimes", "--runtime-url", runtime])
                .expect_err("same port refused");
            assert!(err.to_string().contains("--serve-port"), "{err}");
        }
        // The same port on another machine is no clash, nor is it without --manage-runtimes.
        resolve(&["--router-url", "http://r:1", "--manage-runtimes", "--runtime-url", "http://10.0.0.9:8090"])
            .expect("another host");
        resolve(&["--router-url", "http://r:1", "--runtime-url", "http://127.0.0.1:8090"]).expect("not managed");
        assert!(Cli::try_parse_from(["llm-node", "--check", "--serve-port", "0"]).is_err());
    }

    #[test]
    fn router_url_is_required_unless_checking() {
        assert!(Cli::try_parse_from(["llm-node"]).is_err());
        assert!(Cli::try_parse_from(["llm-node", "--check"]).is_ok());
    }

    #[test]
    fn missing_host_name_and_home_need_flags() {
        let err = cli(&["--router-url", "http://r"]).resolve(None, Some("/h".into())).expect_err("no name");
        assert!(err.to_string().contains("--name"), "{err}");
        let err = cli(&["--router-url", "http://r"]).resolve(Some("n".into()), None).expect_err("no home");
        assert!(err.to_string().contains("--state-dir"), "{err}");
    }
}
