//! `blockd --config FILE [--node NAME]`: the daemon. Thin: arguments, logging, configuration,
//! runtime, then [`blockd::daemon::run`].
//!
//! Exit codes:
//! - 0: stopped cleanly (SIGTERM/SIGINT, every volume flushed);
//! - 1: runtime error (a socket in use, a backing store that cannot be opened, a failed final
//!   flush, ...);
//! - 2: usage or configuration error (bad arguments, unreadable or invalid file, unknown node).
//!
//! Logs go to stderr; `BLOCKD_LOG` is the filter (`info` by default, e.g. `blockd=debug`).

use std::{io::IsTerminal, path::PathBuf, process::ExitCode};

use anyhow::Context;
use blockd::config::{self, Config};
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Serves file-backed volumes over NBD, mirrored between two servers.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The configuration file (TOML; keys overridable by BLOCKD_* variables).
    #[arg(long, short, value_name = "FILE", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// This node's section in the file; defaults to the host name.
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
}

/// Exit code of a usage or configuration error (clap uses 2 for usage errors too).
const EXIT_CONFIG: u8 = 2;
/// Exit code of any other error.
const EXIT_RUNTIME: u8 = 1;

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging();
    let (config, node) = match load(&args) {
        Ok(loaded) => loaded,
        Err(e) => return fail(&e, EXIT_CONFIG),
    };
    match serve(config, node) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e, EXIT_RUNTIME),
    }
}

fn load(args: &Args) -> anyhow::Result<(Config, config::LocalNode)> {
    let config = Config::load(&args.config)?;
    let node = config.local_node(args.node.as_deref())?;
    Ok((config, node))
}

fn serve(config: Config, node: config::LocalNode) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("blockd")
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(blockd::daemon::run(config, node));
    // Connections that outlived the drain must not hold up the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    Ok(result?)
}

/// Prints the whole cause chain, one line: "error: cannot serve volume v: ...: Permission denied".
fn fail(e: &anyhow::Error, code: u8) -> ExitCode {
    eprintln!("blockd: error: {e:#}");
    ExitCode::from(code)
}

fn init_logging() {
    let (filter, bad) = match EnvFilter::try_from_env("BLOCKD_LOG") {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new("info"), std::env::var("BLOCKD_LOG").ok().map(|v| (v, e))),
    };
    // Colours only on a terminal: journald and log files would show the escape codes.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    if let Some((value, e)) = bad {
        tracing::warn!("ignoring BLOCKD_LOG={value:?}: {e}");
    }
}
