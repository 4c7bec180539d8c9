//! The resync commands (design.md §5): `resolve`, `verify`, `wait-sync` and `status --watch`. Each
//! is one request to this node's daemon, or a poll of its status.
//!
//! "In sync" for `wait-sync`: every volume Connected (not resyncing), both disks UpToDate and
//! nothing out of sync. A volume that went StandAlone (split brain, unrelated data, both
//! Primary) will not get there by waiting: `wait-sync` fails at once with the reason.

use std::{
    collections::HashMap,
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

use blockd::{
    control::{
        Client, ClientError, ConnState, DiskState, NodeStatus, Reply, Request, VolumeStatus,
    },
    resync::Resolve,
};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{chain, EXIT_FAILED, EXIT_NOT_RUNNING};
use crate::{render, step::Ctx};

/// How often `wait-sync` and `status --watch` ask.
const POLL: Duration = Duration::from_millis(200);
/// A control request's deadline; verify reads the whole device, so it gets much longer.
const TIMEOUT: Duration = Duration::from_secs(10);
const VERIFY_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// How long `resolve` waits for the new handshake.
const RESOLVE_WAIT: Duration = Duration::from_secs(30);

/// `blockctl resolve --discard-local | --full-sync [--volume V]`: returns once the new
/// handshake has happened (the volumes left StandAlone), or fails with the reason they stayed.
pub fn resolve(ctx: &Ctx, resolve: Resolve, volume: Option<String>) -> ExitCode {
    let request = Request::Resolve { resolve, volume: volume.clone() };
    if let Err(code) = call(ctx, &request, TIMEOUT) {
        return code;
    }
    let what = match resolve {
        Resolve::DiscardLocal => "discard-local",
        Resolve::FullSync => "full-sync",
        Resolve::None => "none",
    };
    println!("{what}: this node gives up its data at the next handshake; reconnecting");
    let deadline = Instant::now() + RESOLVE_WAIT;
    loop {
        let node = match status(ctx) {
            Ok(n) => n,
            Err(code) => return code,
        };
        let named = |v: &&VolumeStatus| volume.as_deref().map_or(true, |n| n == v.name);
        let stuck: Vec<&VolumeStatus> =
            node.volumes.iter().filter(named).filter(|v| v.conn == ConnState::StandAlone).collect();
        if stuck.is_empty() {
            for v in node.volumes.iter().filter(named) {
                println!("{}: {:?}, {:?}; follow with: blockctl wait-sync", v.name, v.conn, v.disk);
            }
            return ExitCode::SUCCESS;
        }
        if Instant::now() >= deadline {
            for v in stuck {
                eprintln!(
                    "blockctl: error: volume {} is still StandAlone: {}",
                    v.name,
                    v.conn_reason.as_deref().unwrap_or("no reason given")
                );
            }
            return ExitCode::from(EXIT_FAILED);
        }
        thread::sleep(POLL);
    }
}

/// `blockctl verify [--volume V]`: prints, per volume, what was compared and repaired. Exit 0
/// whether or not something differed (it was repaired); 1 if the verify could not finish.
pub fn verify(ctx: &Ctx, volume: Option<String>) -> ExitCode {
    match call(ctx, &Request::Verify { volume }, VERIFY_TIMEOUT) {
        Ok(Reply::Verified(list)) => {
            for v in list {
                println!(
                    "{}: compared {} ({} bytes), {} bytes differed{}",
                    v.volume,
                    render::human(v.compared),
                    v.compared,
                    v.differed,
                    if v.differed > 0 { " and were repaired from this node" } else { "" }
                );
            }
            ExitCode::SUCCESS
        }
        Ok(other) => {
            eprintln!("blockctl: error: unexpected answer {other:?}");
            ExitCode::from(EXIT_FAILED)
        }
        Err(code) => code,
    }
}

/// `blockctl wait-sync [--timeout D]`: waits until every volume is in sync, with a progress
/// bar per resync on a terminal.
pub fn wait_sync(ctx: &Ctx, timeout: Duration) -> ExitCode {
    let deadline = Instant::now() + timeout;
    let mut bars = Bars::new();
    loop {
        let node = match status(ctx) {
            Ok(n) => n,
            Err(code) => return code,
        };
        bars.update(&node);
        if let Some(v) = node.volumes.iter().find(|v| v.conn == ConnState::StandAlone) {
            bars.clear();
            eprintln!(
                "blockctl: error: volume {} is StandAlone: {}",
                v.name,
                v.conn_reason.as_deref().unwrap_or("no reason given")
            );
            return ExitCode::from(EXIT_FAILED);
        }
        if node.volumes.iter().all(in_sync) {
            bars.clear();
            println!("in sync");
            return ExitCode::SUCCESS;
        }
        if Instant::now() >= deadline {
            bars.clear();
            let late: Vec<String> = node
                .volumes
                .iter()
                .filter(|v| !in_sync(v))
                .map(|v| {
                    format!(
                        "{} ({:?}, {:?}, {} out of sync)",
                        v.name, v.conn, v.disk, v.out_of_sync
                    )
                })
                .collect();
            eprintln!("blockctl: error: not in sync after {timeout:?}: {}", late.join(", "));
            return ExitCode::from(EXIT_FAILED);
        }
        thread::sleep(POLL);
    }
}

/// `blockctl status --watch`: the status redrawn, with a progress bar per resync, until
/// interrupted.
pub fn watch(ctx: &Ctx) -> ExitCode {
    let mut bars = Bars::new();
    loop {
        match status(ctx) {
            Ok(node) => {
                bars.update(&node);
                let _ = bars.multi.println(render::status(&node));
            }
            Err(code) => return code,
        }
        thread::sleep(Duration::from_secs(1));
    }
}

/// Connected, both UpToDate, nothing out of sync.
pub fn in_sync(v: &VolumeStatus) -> bool {
    v.peer.is_some()
        && v.conn == ConnState::Connected
        && v.disk == DiskState::UpToDate
        && v.peer_disk == Some(DiskState::UpToDate)
        && v.out_of_sync == 0
}

/// One progress bar per volume being resynced.
struct Bars {
    multi: MultiProgress,
    bars: HashMap<String, ProgressBar>,
}

impl Bars {
    fn new() -> Bars {
        // Drawn only on a terminal: in a script or a log, wait-sync prints one line at the end.
        Bars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            bars: HashMap::new(),
        }
    }

    fn update(&mut self, node: &NodeStatus) {
        for v in &node.volumes {
            let Some(r) = &v.resync else {
                if let Some(bar) = self.bars.remove(&v.name) {
                    bar.finish_and_clear();
                }
                continue;
            };
            let bar = self.bars.entry(v.name.clone()).or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new(r.total));
                let style =
                    ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar());
                bar.set_style(style.progress_chars("=> "));
                bar.set_prefix(format!("{} {:?}", v.name, v.conn));
                bar
            });
            bar.set_length(r.total);
            bar.set_position(r.done.min(r.total));
            let eta = r.total.saturating_sub(r.done).checked_div(r.rate);
            bar.set_message(format!(
                "{}/s, ETA {}",
                render::human(r.rate),
                eta.map_or("?".to_string(), |s| format!("{s} s"))
            ));
        }
    }

    fn clear(&mut self) {
        for (_, bar) in self.bars.drain() {
            bar.finish_and_clear();
        }
    }
}

fn status(ctx: &Ctx) -> Result<NodeStatus, ExitCode> {
    match call(ctx, &Request::Status, TIMEOUT) {
        Ok(Reply::Status(n)) => Ok(n),
        Ok(other) => {
            eprintln!("blockctl: error: unexpected answer {other:?}");
            Err(ExitCode::from(EXIT_FAILED))
        }
        Err(code) => Err(code),
    }
}

/// One request; on failure the error is printed and the exit code returned.
fn call(ctx: &Ctx, request: &Request, timeout: Duration) -> Result<Reply, ExitCode> {
    let result =
        Client::connect(&ctx.node.control_socket(), timeout).and_then(|mut c| c.call(request));
    result.map_err(|e| {
        eprintln!("blockctl: error: {}", chain(&e));
        match e {
            ClientError::NotRunning { .. } => ExitCode::from(EXIT_NOT_RUNNING),
            _ => ExitCode::from(EXIT_FAILED),
        }
    })
}
