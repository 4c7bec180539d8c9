//! `blockctl --config FILE [--node NAME] <command>`: the operator's tool. Thin: arguments,
//! configuration, then either one request over the node's control socket (`status`, `role`)
//! or a failover plan (`promote`, `demote`, `swap`: commands/, plan.rs, steps/), or the
//! read-only prerequisite check `init` (commands/init.rs).
//!
//! Exit codes:
//! - 0: done;
//! - 1: failed: the daemon refused, talking to it failed, or a promote step failed and
//!   everything this run had done was undone; swap failed and this node is Primary again;
//!   `init` found something required missing;
//! - 2: usage or configuration error (bad arguments, unreadable or invalid file, unknown node,
//!   `--until` naming no step);
//! - 3: the daemon is not running (nothing listens on the control socket; for `events`, only
//!   with `--exit-on-loss`);
//! - 4: demote (or the rollback of a failed promote) could not finish: the node is still
//!   Primary with part of the stack up. Fix the cause (see the output) and run demote again.

mod commands;
mod plan;
mod render;
mod step;
mod steps;

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use blockd::{
    config::{self, Config},
    control::{Client, ClientError, NodeStatus, Request, Role},
    resync::Resolve,
};
use clap::{Parser, Subcommand, ValueEnum};
use commands::{EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_USAGE};
use serde::Serialize;

use crate::step::Ctx;

/// Operator tool for blockd: status, roles, promote, demote and swap of the whole stack.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The configuration file blockd runs with (it says where the control socket is).
    #[arg(long, short, global = true, value_name = "FILE", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// This node's section in the file; defaults to the host name.
    #[arg(long, global = true, value_name = "NAME")]
    node: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every volume (role, disk, peer, counters) and what failover put in place on this host:
    /// attached devices, mounts, binds, the VIP, each service's health.
    Status {
        /// Print the status as JSON (the daemon's NodeStatus plus a "failover" object).
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Redraw every second, with a progress bar per running resync, until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Low-level role change of this node's volumes (no mount, VIP or services: see promote).
    /// Becoming Primary needs an UpToDate disk and a connected Secondary peer that agrees, or
    /// --force when the peer is really down. Becoming Secondary needs no NBD client connected.
    Role {
        role: RoleArg,
        /// Become Primary although the peer cannot be asked. Only when it is really down: if
        /// it is alive and Primary too, both accept writes and the data splits.
        #[arg(long)]
        force: bool,
        /// Only this volume (default: every volume of the node).
        #[arg(long, value_name = "NAME")]
        volume: Option<String>,
    },
    /// Make this node the primary: check, role, attach/fsck/mount each volume, binds, VIP,
    /// services. A failed step undoes what this run did, in reverse. Running it again is
    /// harmless.
    Promote {
        /// Promote although the peer is not connected. Only when it is really down.
        #[arg(long)]
        force: bool,
        /// Stop after this step ("role", "mount db", "vip", ...), for debugging.
        #[arg(long, value_name = "STEP")]
        until: Option<String>,
        /// Print the plan, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Undo promote, last step first. If a step cannot be undone, stop there: the node stays
    /// Primary (exit code 4).
    Demote {
        /// Stop after undoing this step.
        #[arg(long, value_name = "STEP")]
        until: Option<String>,
        /// Print the plan, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Planned switchover: demote here, wait for the peer to be Connected and UpToDate, promote
    /// it; if it fails, promote here again.
    Swap {
        /// How long to wait for the peer after demoting ("30s", "2m").
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime_arg)]
        wait: Duration,
    },
    /// After a split brain (or with unrelated data): this node's data loses. It must be
    /// Secondary (demote first); at the next handshake, held at once, it becomes the resync
    /// target of the union of both bitmaps (--discard-local) or of the whole device
    /// (--full-sync, the only way with unrelated data).
    Resolve {
        #[arg(long, required_unless_present = "full_sync", conflicts_with = "full_sync")]
        discard_local: bool,
        #[arg(long)]
        full_sync: bool,
        /// Only this volume (default: every volume of the node).
        #[arg(long, value_name = "NAME")]
        volume: Option<String>,
    },
    /// Compare every block with the peer's by checksum while the volume is in use (on the
    /// Primary, in sync); differing blocks are marked out of sync and repaired from here.
    Verify {
        #[arg(long, value_name = "NAME")]
        volume: Option<String>,
    },
    /// Wait until every volume is Connected, both disks UpToDate and nothing out of sync;
    /// shows resync progress on a terminal. Fails at once on StandAlone (split brain...).
    WaitSync {
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime_arg)]
        timeout: Duration,
    },
    /// A live stream of state changes (daemon, role, disk, conn, peer_role, peer_disk, resync,
    /// clients), one line each, the current state first; runs until SIGINT/SIGTERM (exit 0).
    Events(commands::events::EventsArgs),
    /// Automatic failover: promotes this node when its peer is gone and the witness lease is
    /// won; demotes it when it lost the lease while Primary (systemd: blockctl-agent.service).
    Agent(commands::agent::AgentArgs),
    /// Check this node's prerequisites (kernel nbd or FUSE, tools, ports, the secret's mode,
    /// data-dir space, service units, io_uring): one line each, ok / warn / missing, and what
    /// to do. Changes nothing; exits 1 when something required is missing.
    Init,
    /// The web console blockd serves (`[console] listen`): `console token [--rotate]` prints
    /// or replaces the access token its actions need.
    #[command(subcommand)]
    Console(commands::console::ConsoleCommand),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RoleArg {
    Primary,
    Secondary,
}

fn humantime_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).ok_or_else(|| format!("{s:?} is not a duration such as \"30s\" or \"2m\""))
}

/// "500ms", "30s", "2m", "1h": a number and one unit (clap only; the config has humantime).
fn parse_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let n: u64 = s[..split].parse().ok()?;
    match &s[split..] {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n.checked_mul(60)?)),
        "h" => Some(Duration::from_secs(n.checked_mul(3600)?)),
        _ => None,
    }
}

/// How long one `status` or `role` request may wait for the daemon.
const TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let args = Args::parse();
    let ctx = match context(&args) {
        Ok(c) => Arc::new(c),
        Err(e) => return fail(&e, EXIT_USAGE),
    };
    let result = match &args.command {
        Command::Status { watch: true, .. } => return commands::sync::watch(&ctx),
        Command::Status { json, .. } => return status(&ctx, *json),
        Command::Resolve { full_sync, volume, .. } => {
            let r = if *full_sync { Resolve::FullSync } else { Resolve::DiscardLocal };
            return commands::sync::resolve(&ctx, r, volume.clone());
        }
        Command::Verify { volume } => return commands::sync::verify(&ctx, volume.clone()),
        Command::WaitSync { timeout } => return commands::sync::wait_sync(&ctx, *timeout),
        Command::Events(events) => return commands::events::run(&ctx, events),
        Command::Agent(agent) => return commands::agent::run(&ctx, agent),
        Command::Role { role, force, volume } => return set_role(&ctx, *role, *force, volume),
        Command::Promote { until, .. } => commands::promote(&ctx, until.as_deref()),
        Command::Demote { until, .. } => commands::demote(&ctx, until.as_deref()),
        Command::Swap { wait } => commands::swap(&ctx, *wait),
        Command::Init => return init(&ctx),
        Command::Console(c) => return commands::console::run(&ctx, c),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.exit_code();
            fail(&e.into(), code)
        }
    }
}

/// The configuration, this node, and the flags the steps read.
fn context(args: &Args) -> anyhow::Result<Ctx> {
    let config = Config::load(&args.config)?;
    let node = config.local_node(args.node.as_deref())?;
    let (dry_run, force) = match &args.command {
        Command::Promote { dry_run, force, .. } => (*dry_run, *force),
        Command::Demote { dry_run, .. } => (*dry_run, false),
        _ => (false, false),
    };
    Ok(Ctx { config, node, dry_run, force })
}

/// `status --json`: the daemon's NodeStatus (its fields at the top level, as before) plus
/// what failover put in place here.
#[derive(Serialize)]
struct FullStatus<'a> {
    #[serde(flatten)]
    node: &'a NodeStatus,
    failover: &'a commands::status::Failover,
    /// `blockctl agent`'s last decision on this node; null if no agent ever ran here.
    agent: Option<&'a commands::agent::AgentState>,
}

fn status(ctx: &Arc<Ctx>, json: bool) -> ExitCode {
    let daemon = Client::connect(&ctx.node.control_socket(), TIMEOUT).and_then(|mut c| c.status());
    let local = commands::status::gather(ctx);
    let node = match daemon {
        Ok(n) => n,
        Err(e) => {
            // What is mounted and running here still matters when the daemon is down.
            print!("{}", render::failover(&local));
            let code = if matches!(e, ClientError::NotRunning { .. }) {
                EXIT_NOT_RUNNING
            } else {
                EXIT_FAILED
            };
            return fail(&e.into(), code);
        }
    };
    let agent = commands::agent::read_state(ctx);
    if json {
        let full = FullStatus { node: &node, failover: &local, agent: agent.as_ref() };
        // Strings, numbers and booleans only: serializing cannot fail.
        println!("{}", serde_json::to_string_pretty(&full).unwrap_or_default());
    } else {
        print!(
            "{}\n{}{}",
            render::status(&node),
            render::failover(&local),
            render::agent(agent.as_ref())
        );
    }
    ExitCode::SUCCESS
}

/// `init`: exit 0 when nothing required is missing, else 1.
fn init(ctx: &Ctx) -> ExitCode {
    if commands::init::init(ctx) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}

fn set_role(ctx: &Ctx, role: RoleArg, force: bool, volume: &Option<String>) -> ExitCode {
    let role = match role {
        RoleArg::Primary => Role::Primary,
        RoleArg::Secondary => Role::Secondary,
    };
    let request = Request::Role { role, force, volume: volume.clone() };
    let result =
        Client::connect(&ctx.node.control_socket(), TIMEOUT).and_then(|mut c| c.call(&request));
    match result {
        Ok(_) => {
            println!("{role:?}");
            ExitCode::SUCCESS
        }
        Err(e @ ClientError::NotRunning { .. }) => fail(&e.into(), EXIT_NOT_RUNNING),
        Err(e) => fail(&e.into(), EXIT_FAILED),
    }
}

/// Prints the whole cause chain on one line.
fn fail(e: &anyhow::Error, code: u8) -> ExitCode {
    eprintln!("blockctl: error: {e:#}");
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        for bad in ["", "s", "30", "1.5s", "3 s", "-1s", "99999999999999999999h"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn cli_parses() {
        let a = Args::try_parse_from(["blockctl", "promote", "--force", "--until", "mount db"])
            .unwrap();
        assert!(matches!(a.command, Command::Promote { force: true, ref until, dry_run: false }
            if until.as_deref() == Some("mount db")));
        let a = Args::try_parse_from(["blockctl", "swap", "--wait", "2m"]).unwrap();
        assert!(matches!(a.command, Command::Swap { wait } if wait == Duration::from_secs(120)));
        assert!(Args::try_parse_from(["blockctl", "demote", "--force"]).is_err());
        assert!(Args::try_parse_from(["blockctl", "swap", "--wait", "soon"]).is_err());
    }
}
