//! `bench`: load and start-up benchmarks of llm-router (SPEC §7), run against the real router binary. See
//! `docs/performance.md` for the commands and what each mode measures.

mod affinity;
mod balance;
mod bodies;
mod cli;
mod connections;
mod fairness;
mod fleet;
mod heartbeat;
mod http;
mod limits;
mod logins;
mod openloop;
mod placement;
mod postgres;
mod probe;
mod procfs;
mod proxy;
mod pulse;
mod register;
mod router;
mod seed;
mod sse;
mod standin;
mod startup;
mod stats;
mod storm;
mod usage;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use serde::Serialize;

use crate::cli::{Cli, Mode};
use crate::router::RouterSpec;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let open_files = procfs::raise_open_file_limit()?;
    let connections = match &cli.mode {
        Mode::Heartbeat(args) => Some(if args.connection_per_node { args.nodes } else { args.connections }),
        Mode::Storm(args) => Some(args.connections),
        Mode::Connections(args) => Some(args.half_open),
        // Each worker holds a connection to the router and one to every stand-in.
        Mode::Proxy(args) => Some(args.connections * (args.nodes + 1) * 2),
        Mode::Balance(args) => Some(args.clients * 2),
        Mode::Affinity(args) => Some(args.connections * 4),
        // The flood's senders and the single key's, each with a connection to the router and the router's to the node.
        Mode::Fairness(args) => Some((args.backlog + args.max_concurrency as usize + 2) * 2),
        Mode::Pulse(args) => Some(args.connections),
        Mode::Limits(args) => Some(args.routers() * (limits::WORKERS + 4) * 2),
        _ => None,
    };
    if let Some(connections) = connections {
        // The router and the bench each hold one socket per connection, plus their own files.
        let needed = connections as u64 + 256;
        if open_files < needed {
            eprintln!(
                "warning: the open-file limit is {open_files}; {needed} or more is needed for this many connections"
            );
        }
    }
    // The modes that work on a data directory or a router of the caller's, or on the library alone, without
    // starting one.
    match &cli.mode {
        Mode::Seed(args) => {
            return runtime(&cli)?.block_on(async { output(cli.json, &seed::run(args).await?, seed::print) });
        }
        Mode::Placement(args) => {
            return output(cli.json, &placement::run(args)?, placement::print);
        }
        Mode::Pulse(args) => {
            return runtime(&cli)?
                .block_on(async { output(cli.json, &pulse::run(args, stop_signal()).await?, pulse::print) });
        }
        _ => {}
    }
    let binary = match cli.router_bin.clone() {
        Some(path) => path,
        None => router::default_binary()?,
    };
    let data = tempfile::Builder::new().prefix("llm-router-bench-").tempdir().context("creating a data directory")?;
    let password = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let spec = RouterSpec::new(binary, data.path(), password)?;
    let runtime = runtime(&cli)?;
    let result = runtime.block_on(async {
        match &cli.mode {
            Mode::Heartbeat(args) => output(cli.json, &heartbeat::run(&spec, args).await?, heartbeat::print),
            Mode::Storm(args) => output(cli.json, &storm::run(&spec, args).await?, storm::print),
            Mode::Startup(args) => output(cli.json, &startup::run(&spec, args).await?, startup::print),
            Mode::Register(args) => output(cli.json, &register::run(&spec, args).await?, register::print),
            Mode::Probe(args) => output(cli.json, &probe::run(&spec, args).await?, probe::print),
            Mode::Logins(args) => output(cli.json, &logins::run(&spec, args).await?, logins::print),
            Mode::Connections(args) => output(cli.json, &connections::run(&spec, args).await?, connections::print),
            Mode::Proxy(args) => output(cli.json, &proxy::run(&spec, args).await?, proxy::print),
            Mode::Balance(args) => output(cli.json, &balance::run(&spec, args).await?, balance::print),
            Mode::Affinity(args) => output(cli.json, &affinity::run(&spec, args).await?, affinity::print),
            Mode::Fairness(args) => output(cli.json, &fairness::run(&spec, args).await?, fairness::print),
            Mode::Bodies(args) => output(cli.json, &bodies::run(&spec, args).await?, bodies::print),
            Mode::Usage(args) => output(cli.json, &usage::run(&spec, args).await?, usage::print),
            Mode::Limits(args) => output(cli.json, &limits::run(&spec, args).await?, limits::print),
            Mode::Seed(_) | Mode::Pulse(_) | Mode::Placement(_) => unreachable!("handled before a router is set up"),
        }
    });
    if cli.keep_data {
        eprintln!("data directory kept: {}", data.keep().display());
    }
    result
}

fn runtime(cli: &Cli) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(cli.client_threads))
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Completes on SIGTERM or Ctrl-C (SIGINT), so that a mode stopped by its caller still reports.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let terminate = async {
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        () = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn output<T: Serialize>(json: bool, report: &T, print: fn(&T)) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        print(report);
    }
    Ok(())
}
