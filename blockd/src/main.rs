//! `blockd --config FILE [--node NAME]`: the daemon. Thin: arguments, logging, configuration,
//! runtime, then [`blockd::daemon::run`].
//!
//! `blockd witness --listen ADDR --state FILE --secret FILE [--term DURATION]`: the lease
//! witness for a third host (design.md §7), [`blockd::witness::run`] on a single-threaded
//! runtime. It reads no configuration file: that host has no volumes, only the secret.
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
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Serves file-backed volumes over NBD, mirrored between two servers.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// The configuration file (TOML; keys overridable by BLOCKD_* variables).
    #[arg(long, short, value_name = "FILE", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// This node's section in the file; defaults to the host name.
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the lease witness (for a third host; no volumes, no configuration file).
    Witness(WitnessArgs),
}

#[derive(Debug, clap::Args)]
struct WitnessArgs {
    /// "ADDR:PORT" to listen on, e.g. 10.0.0.3:7790.
    #[arg(long, value_name = "ADDR")]
    listen: std::net::SocketAddr,
    /// The state file (holder and epoch, rewritten atomically); its directory must exist.
    #[arg(long, value_name = "FILE")]
    state: PathBuf,
    /// The cluster's shared secret file (the nodes' `cluster.secret-file`, mode 0600).
    #[arg(long, value_name = "FILE")]
    secret: PathBuf,
    /// During a secret rotation, the secret being replaced (mode 0600): accepted as well. A
    /// missing file is skipped. Both files are read again for every request.
    #[arg(long, value_name = "FILE")]
    previous_secret: Option<PathBuf>,
    /// How long a lease lasts without renewal ("10s", "500ms"); announced to the nodes.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_term)]
    term: std::time::Duration,
}

/// Terms outside this range are refused: shorter ones cannot survive a network hiccup, longer
/// ones make a failover wait too long.
const TERM_RANGE: std::ops::RangeInclusive<std::time::Duration> =
    std::time::Duration::from_millis(100)..=std::time::Duration::from_secs(3600);

fn parse_term(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("not a duration ({e})"))?;
    if !TERM_RANGE.contains(&d) {
        return Err("must be from 100ms to 1h".into());
    }
    Ok(d)
}

/// Exit code of a usage or configuration error (clap uses 2 for usage errors too).
const EXIT_CONFIG: u8 = 2;
/// Exit code of any other error.
const EXIT_RUNTIME: u8 = 1;

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging();
    if let Some(Command::Witness(w)) = args.command {
        return witness(w);
    }
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

fn witness(args: WitnessArgs) -> ExitCode {
    let secrets = blockd::replication::Secrets::Files {
        current: args.secret,
        previous: args.previous_secret,
    };
    if let Err(e) = secrets.load() {
        return fail(&e.into(), EXIT_CONFIG);
    }
    let cfg = blockd::witness::ServerConfig {
        listen: args.listen,
        state: args.state,
        term: args.term,
        secrets,
    };
    let run = || -> anyhow::Result<()> {
        // One thread: the witness answers two nodes every few seconds and should stay small.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        runtime.block_on(async {
            let stop = stop_signal().context("cannot install signal handlers")?;
            blockd::witness::run(cfg, stop).await?;
            tracing::info!("witness stopped");
            Ok(())
        })
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e, EXIT_RUNTIME),
    }
}

/// Completes on the first SIGTERM or SIGINT.
fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The witness's `--term` default is the nodes' `lease.term` default: with neither given,
    /// the nodes accept the witness's grants.
    #[test]
    fn the_witness_term_defaults_to_the_nodes_lease_term() {
        let args = ["blockd", "witness", "--listen", "127.0.0.1:7790", "--state", "s"];
        let args = Args::try_parse_from(args.into_iter().chain(["--secret", "f"])).unwrap();
        let Some(Command::Witness(w)) = args.command else { panic!("not the witness") };
        assert_eq!(w.term, blockd::witness::DEFAULT_TERM);
        assert_eq!(w.term, blockd::config::LeaseConfig::default().term);
    }
}
