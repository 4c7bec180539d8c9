//! `blockctl --config FILE [--node NAME] <command>`: the operator's tool. Thin: arguments,
//! configuration, one request over the node's control socket, output.
//!
//! Exit codes:
//! - 0: done;
//! - 1: the daemon refused the request, or talking to it failed;
//! - 2: usage or configuration error (bad arguments, unreadable or invalid file, unknown node);
//! - 3: the daemon is not running (nothing listens on the control socket).

mod render;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use blockd::{
    config::{self, Config},
    control::{Client, ClientError, Request, Role},
};
use clap::{Parser, Subcommand, ValueEnum};

/// Operator tool for blockd: status and roles now; promote and demote to come.
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
    /// Role, disk state, clients and counters of every volume on this node.
    Status {
        /// Print the status as JSON (the control socket's NodeStatus), for scripts.
        #[arg(long)]
        json: bool,
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
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RoleArg {
    Primary,
    Secondary,
}

/// How long one request may wait for the daemon.
const TIMEOUT: Duration = Duration::from_secs(10);

const EXIT_FAILED: u8 = 1;
const EXIT_CONFIG: u8 = 2;
const EXIT_NOT_RUNNING: u8 = 3;

fn main() -> ExitCode {
    let args = Args::parse();
    let socket = match control_socket(&args) {
        Ok(s) => s,
        Err(e) => return fail(&e, EXIT_CONFIG),
    };
    match run(&args.command, &socket) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ ClientError::NotRunning { .. }) => fail(&e.into(), EXIT_NOT_RUNNING),
        Err(e) => fail(&e.into(), EXIT_FAILED),
    }
}

fn control_socket(args: &Args) -> anyhow::Result<PathBuf> {
    let config = Config::load(&args.config)?;
    Ok(config.local_node(args.node.as_deref())?.control_socket())
}

fn run(command: &Command, socket: &std::path::Path) -> Result<(), ClientError> {
    let mut client = Client::connect(socket, TIMEOUT)?;
    match command {
        Command::Status { json } => {
            let status = client.status()?;
            if *json {
                // NodeStatus holds strings and numbers only: serializing it cannot fail.
                println!("{}", serde_json::to_string_pretty(&status).unwrap_or_default());
            } else {
                print!("{}", render::status(&status));
            }
        }
        Command::Role { role, force, volume } => {
            let role = match role {
                RoleArg::Primary => Role::Primary,
                RoleArg::Secondary => Role::Secondary,
            };
            client.call(&Request::Role { role, force: *force, volume: volume.clone() })?;
            println!("{role:?}");
        }
    }
    Ok(())
}

/// Prints the whole cause chain on one line.
fn fail(e: &anyhow::Error, code: u8) -> ExitCode {
    eprintln!("blockctl: error: {e:#}");
    ExitCode::from(code)
}
