//! Command line and environment configuration (SPEC §3.1). Every setting is a flag and an environment variable;
//! flags win.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Central router of a GPU inference fleet.
#[derive(Debug, Parser)]
#[command(name = "llm-router", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server: node API, admin API, dashboard.
    Serve(ServeArgs),
}

/// Settings of `llm-router serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address and port to listen on.
    #[arg(long, env = "LLM_ROUTER_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Directory of the database (`router.db`); created if missing. Default: ~/.llm-router
    #[arg(long, env = "LLM_ROUTER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Interval the router asks agents to heartbeat at, in seconds.
    #[arg(long, env = "LLM_ROUTER_HEARTBEAT_INTERVAL_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub heartbeat_interval_secs: u64,

    /// An approved node silent for this long is marked offline, in seconds.
    #[arg(long, env = "LLM_ROUTER_OFFLINE_AFTER_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub offline_after_secs: u64,

    /// How long the registration reachability probe waits for the node's runtime, in milliseconds.
    #[arg(long, env = "LLM_ROUTER_REACHABILITY_TIMEOUT_MS", default_value_t = 3000,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub reachability_timeout_ms: u64,

    /// Skip the registration reachability probe (development only; logged as a warning at start).
    #[arg(long, env = "LLM_ROUTER_NO_REACHABILITY_CHECK", value_parser = clap::builder::BoolishValueParser::new(),
          action = clap::ArgAction::SetTrue)]
    pub no_reachability_check: bool,

    /// Username of the administrator created on first start.
    #[arg(long, env = "LLM_ROUTER_ADMIN_USERNAME", default_value = "admin")]
    pub admin_username: String,

    /// Password of the administrator created on first start; generated and printed once when absent.
    #[arg(long, env = "LLM_ROUTER_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<String>,
}

/// The resolved settings the app is built from.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub heartbeat_interval: Duration,
    pub offline_after: Duration,
    pub reachability_timeout: Duration,
    pub reachability_check: bool,
    pub admin_username: String,
    pub admin_password: Option<String>,
    /// How often heartbeat figures are written behind to the database.
    pub flush_interval: Duration,
    /// How long a dashboard or API session lasts.
    pub session_ttl: Duration,
}

impl Settings {
    /// Settings with the documented defaults, for a given data directory.
    pub fn new(data_dir: PathBuf) -> Self {
        Settings {
            data_dir,
            heartbeat_interval: Duration::from_secs(10),
            offline_after: Duration::from_secs(30),
            reachability_timeout: Duration::from_millis(3000),
            reachability_check: true,
            admin_username: "admin".to_owned(),
            admin_password: None,
            flush_interval: Duration::from_secs(1),
            session_ttl: Duration::from_secs(12 * 3600),
        }
    }

    /// The database file inside the data directory.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("router.db")
    }

    /// How often the offline sweep runs: a tenth of `offline_after`, between 100 ms and 1 s.
    pub fn sweep_interval(&self) -> Duration {
        (self.offline_after / 10).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }
}

impl ServeArgs {
    /// Resolves defaults that depend on the environment (the home directory).
    pub fn into_settings(self) -> anyhow::Result<Settings> {
        let data_dir = match self.data_dir {
            Some(dir) => dir,
            None => {
                let home = std::env::var_os("HOME")
                    .ok_or_else(|| anyhow::anyhow!("HOME is not set: pass --data-dir or LLM_ROUTER_DATA_DIR"))?;
                PathBuf::from(home).join(".llm-router")
            }
        };
        if self.admin_username.trim().is_empty() {
            anyhow::bail!("LLM_ROUTER_ADMIN_USERNAME must not be blank");
        }
        Ok(Settings {
            heartbeat_interval: Duration::from_secs(self.heartbeat_interval_secs),
            offline_after: Duration::from_secs(self.offline_after_secs),
            reachability_timeout: Duration::from_millis(self.reachability_timeout_ms),
            reachability_check: !self.no_reachability_check,
            admin_username: self.admin_username,
            admin_password: self.admin_password,
            ..Settings::new(data_dir)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("llm-router").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_match_the_spec() {
        let Command::Serve(args) = parse(&["serve", "--data-dir", "/tmp/x"]).expect("parse").command;
        assert_eq!(args.listen, "0.0.0.0:8080".parse().expect("addr"));
        let settings = args.into_settings().expect("settings");
        assert_eq!(settings.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(settings.offline_after, Duration::from_secs(30));
        assert_eq!(settings.reachability_timeout, Duration::from_millis(3000));
        assert!(settings.reachability_check);
        assert_eq!(settings.database_path(), PathBuf::from("/tmp/x/router.db"));
    }

    #[test]
    fn rejects_unparsable_values() {
        assert!(parse(&["serve", "--listen", "nowhere"]).is_err());
        assert!(parse(&["serve", "--heartbeat-interval-secs", "0"]).is_err());
        assert!(parse(&["serve", "--offline-after-secs", "soon"]).is_err());
    }

    #[test]
    fn sweep_interval_scales_with_offline_after() {
        let mut settings = Settings::new(PathBuf::from("/tmp"));
        assert_eq!(settings.sweep_interval(), Duration::from_secs(1));
        settings.offline_after = Duration::from_secs(2);
        assert_eq!(settings.sweep_interval(), Duration::from_millis(200));
    }
}
