//! `llm-router`: parses the configuration and hands over to the library.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use llm_router::config::{Cli, Command};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            // --help and --version
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            let rendered = err.to_string();
            eprintln!("{}", rendered.lines().next().unwrap_or("error: invalid arguments"));
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LLM_ROUTER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    // jemalloc gives memory freed after a burst (large request bodies, a start-up's temporaries) back to the system
    // from a thread of its own within seconds, rather than on the next allocation of the thread that freed it, or
    // never: the C allocator kept a burst of large bodies for good.
    if let Err(err) = tikv_jemalloc_ctl::background_thread::write(true) {
        eprintln!("warning: jemalloc's background thread did not start ({err}); freed memory is returned later");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match cli.command {
        Command::Serve(args) => runtime.block_on(llm_router::app::run(*args)),
        Command::Migrate(args) => runtime.block_on(llm_router::store::migrate::run(&args.from, &args.to)),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the context and its causes.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// jemalloc: less memory per allocation than the C allocator for the fleet's many small ones, faster start-up, and
/// memory returned after a burst (docs/performance.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
