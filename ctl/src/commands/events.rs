//! `blockctl events`: a live stream of state changes, one line each, for operators (text) and
//! scripts (`--json`, one object per line).
//!
//! ```text
//!  every --interval (200ms) ── status over control.sock ──► Watch::observe ──► changes ──► stdout
//!                                  └ unreachable: one "daemon" event, keep polling
//!                                    (--exit-on-loss: exit 3 instead)
//! ```
//!
//! The daemon has no push channel, so this polls: a state that flips and flips back between
//! two polls is not seen. The first poll reports the current state as `initial` events, so a
//! script waiting with `--until role=Primary` does not hang when the node already is.
//!
//! | field       | values (`volume` is null for `daemon` only)                          |
//! |-------------|----------------------------------------------------------------------|
//! | `daemon`    | `running`, `unreachable` (`detail`: the error)                       |
//! | `role`      | `Primary`, `Secondary`                                               |
//! | `disk`      | `UpToDate`, `Outdated`, `Inconsistent`, `Failed`                     |
//! |             | (`detail`: for `Failed`, the error, the operation and the offset)     |
//! | `conn`      | `StandAlone`, `Connecting`, `Connected`, `SyncSource`, `SyncTarget`  |
//! |             | (`detail`: the daemon's `conn_reason`, when it gives one)            |
//! | `peer_role` | as `role`, or null (`none` in text) while not connected              |
//! | `peer_disk` | as `disk`, or null while not connected                               |
//! | `resync`    | `running`, `idle`                                                    |
//! | `clients`   | the number of NBD clients                                            |
//!
//! JSON: `{"timestamp":"2026-01-02T03:04:05.678Z","node":"alpha","volume":"db","field":"role",
//! "from":"Secondary","to":"Primary"}` plus `"initial":true` on the first poll's events and
//! `"detail"` where there is one. Exit: 0 on SIGINT/SIGTERM or once `--until` is seen; 3 with
//! `--exit-on-loss` when the daemon cannot be reached (also at start); 2 for bad arguments.

use std::{collections::BTreeMap, io::Write, process::ExitCode, sync::Arc, time::Duration};

use blockd::control::{Client, NodeStatus, VolumeStatus};
use serde::Serialize;

use super::{chain, EXIT_FAILED, EXIT_NOT_RUNNING};
use crate::step::Ctx;

/// A status request that takes longer than this counts as "unreachable" (a frozen daemon).
const POLL_TIMEOUT: Duration = Duration::from_secs(5);

/// `blockctl events` options.
#[derive(Debug, Clone, clap::Args)]
pub struct EventsArgs {
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
    /// Time between two polls of the daemon ("200ms", "1s").
    #[arg(long, value_name = "DURATION", default_value = "200ms",
          value_parser = crate::humantime_arg)]
    interval: Duration,
    /// Exit 0 once an event sets FIELD to VALUE (e.g. role=Primary, conn=Connected,
    /// peer_role=none); the current state counts.
    #[arg(long, value_name = "FIELD=VALUE", value_parser = parse_until)]
    until: Option<Until>,
    /// Only this volume's events (and the daemon's).
    #[arg(long, value_name = "NAME")]
    volume: Option<String>,
    /// Exit 3 when the daemon cannot be reached, instead of reporting it and polling on.
    #[arg(long)]
    exit_on_loss: bool,
}

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    Daemon,
    Role,
    Disk,
    Conn,
    PeerRole,
    PeerDisk,
    Resync,
    Clients,
}

impl Field {
    const ALL: [Field; 8] = [
        Field::Daemon,
        Field::Role,
        Field::Disk,
        Field::Conn,
        Field::PeerRole,
        Field::PeerDisk,
        Field::Resync,
        Field::Clients,
    ];

    fn name(self) -> &'static str {
        match self {
            Field::Daemon => "daemon",
            Field::Role => "role",
            Field::Disk => "disk",
            Field::Conn => "conn",
            Field::PeerRole => "peer_role",
            Field::PeerDisk => "peer_disk",
            Field::Resync => "resync",
            Field::Clients => "clients",
        }
    }
}

/// `--until FIELD=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Until {
    field: Field,
    value: String,
}

fn parse_until(s: &str) -> Result<Until, String> {
    let (field, value) = s.split_once('=').ok_or("write FIELD=VALUE, e.g. role=Primary")?;
    let field = Field::ALL.into_iter().find(|f| f.name() == field).ok_or_else(|| {
        let names: Vec<&str> = Field::ALL.iter().map(|f| f.name()).collect();
        format!("unknown field {field:?}; fields: {}", names.join(", "))
    })?;
    if value.is_empty() {
        return Err("VALUE is empty (use \"none\" for a peer that is not connected)".into());
    }
    Ok(Until { field, value: value.to_string() })
}

/// One state change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub node: String,
    pub volume: Option<String>,
    pub field: Field,
    pub from: Option<String>,
    pub to: Option<String>,
    /// The first poll's report of the state as it is.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub initial: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Change {
    fn matches(&self, until: &Until) -> bool {
        self.field == until.field && self.to.as_deref().unwrap_or("none") == until.value
    }

    fn text(&self) -> String {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".into());
        let what = match &self.volume {
            Some(v) => format!("{}/{v}", self.node),
            None => self.node.clone(),
        };
        let change = if self.initial {
            format!("{} (initial)", show(&self.to))
        } else {
            format!("{} -> {}", show(&self.from), show(&self.to))
        };
        let detail = self.detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default();
        format!("{what} {} {change}{detail}", self.field.name())
    }
}

/// The values of one volume's fields, in [`Field`] order (without `Daemon`).
type Values = Vec<(Field, Option<String>)>;

fn values(v: &VolumeStatus) -> Values {
    let name = |d: &dyn std::fmt::Debug| Some(format!("{d:?}"));
    vec![
        (Field::Role, name(&v.role)),
        (Field::Disk, name(&v.disk)),
        (Field::Conn, name(&v.conn)),
        (Field::PeerRole, v.peer_role.as_ref().and_then(|r| name(r))),
        (Field::PeerDisk, v.peer_disk.as_ref().and_then(|d| name(d))),
        (Field::Resync, Some(if v.resync.is_some() { "running" } else { "idle" }.into())),
        (Field::Clients, Some(v.clients.to_string())),
    ]
}

/// What the stream has seen so far; turns each poll into the changes since the last one.
/// The volumes' values survive an unreachable daemon, so its return shows what changed.
#[derive(Debug, Default)]
pub struct Watch {
    daemon: Option<&'static str>,
    volumes: Option<BTreeMap<String, Values>>,
}

impl Watch {
    /// The changes `polled` brings; `node` names this node when the daemon cannot say.
    pub fn observe(&mut self, node: &str, polled: Result<&NodeStatus, String>) -> Vec<Change> {
        let status = match polled {
            Ok(s) => s,
            Err(detail) => return self.daemon_is("unreachable", node, Some(detail)),
        };
        let mut out = self.daemon_is("running", &status.node, None);
        let initial = self.volumes.is_none();
        let now: BTreeMap<String, Values> =
            status.volumes.iter().map(|v| (v.name.clone(), values(v))).collect();
        let before = self.volumes.take().unwrap_or_default();
        let names: std::collections::BTreeSet<&String> = before.keys().chain(now.keys()).collect();
        for name in names {
            let vol = status.volumes.iter().find(|v| v.name == *name);
            let reason = vol.and_then(|v| v.conn_reason.clone());
            let failure = vol.and_then(|v| v.disk_failure.map(|f| f.to_string()));
            let old = before.get(name);
            let new = now.get(name);
            for field in Field::ALL.into_iter().skip(1) {
                let get = |vals: Option<&Values>| {
                    vals.and_then(|vs| vs.iter().find(|(f, _)| *f == field)?.1.clone())
                };
                let (from, to) = (get(old), get(new));
                if from == to && (old.is_some() || new.is_none()) {
                    continue;
                }
                out.push(Change {
                    node: status.node.clone(),
                    volume: Some(name.clone()),
                    field,
                    from,
                    to,
                    initial,
                    detail: match field {
                        Field::Conn => reason.clone(),
                        Field::Disk => failure.clone(),
                        _ => None,
                    },
                });
            }
        }
        self.volumes = Some(now);
        out
    }

    fn daemon_is(
        &mut self,
        state: &'static str,
        node: &str,
        detail: Option<String>,
    ) -> Vec<Change> {
        if self.daemon == Some(state) {
            return Vec::new();
        }
        let initial = self.daemon.is_none();
        let from = self.daemon.replace(state).map(str::to_string);
        vec![Change {
            node: node.to_string(),
            volume: None,
            field: Field::Daemon,
            from,
            to: Some(state.to_string()),
            initial,
            detail,
        }]
    }
}

/// One output line: the change with its time first.
#[derive(Serialize)]
struct Line<'a> {
    timestamp: String,
    #[serde(flatten)]
    change: &'a Change,
}

/// Runs the stream until a signal, `--until`, or (with `--exit-on-loss`) a lost daemon.
pub fn run(ctx: &Arc<Ctx>, args: &EventsArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blockctl: error: cannot start the event loop: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let code = rt.block_on(stream(Arc::clone(ctx), args.clone()));
    // A status request still blocked in its thread must not hold the exit up.
    rt.shutdown_background();
    ExitCode::from(code)
}

async fn stream(ctx: Arc<Ctx>, args: EventsArgs) -> u8 {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) =
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(t), Ok(i)) => (t, i),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("blockctl: error: cannot install signal handlers: {e}");
                return EXIT_FAILED;
            }
        };
    tokio::select! {
        code = poll_loop(ctx, args) => code,
        _ = term.recv() => 0,
        _ = int.recv() => 0,
    }
}

async fn poll_loop(ctx: Arc<Ctx>, args: EventsArgs) -> u8 {
    let socket = ctx.node.control_socket();
    let mut watch = Watch::default();
    loop {
        let path = socket.clone();
        let polled = tokio::task::spawn_blocking(move || {
            Client::connect(&path, POLL_TIMEOUT).and_then(|mut c| c.status()).map_err(|e| chain(&e))
        })
        .await
        .unwrap_or_else(|e| Err(format!("status request failed: {e}")));
        let lost = polled.is_err();
        for change in watch.observe(&ctx.node.name, polled.as_ref().map_err(String::clone)) {
            if args.volume.as_ref().is_some_and(|v| change.volume.as_ref().is_some_and(|c| c != v))
            {
                continue;
            }
            if !print(&change, args.json) {
                return 0; // stdout closed (`| head`): nobody is listening any more
            }
            if args.until.as_ref().is_some_and(|u| change.matches(u)) {
                return 0;
            }
        }
        if lost && args.exit_on_loss {
            return EXIT_NOT_RUNNING;
        }
        tokio::time::sleep(args.interval).await;
    }
}

/// Writes one line; false when stdout is gone.
fn print(change: &Change, json: bool) -> bool {
    let timestamp = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let line = if json {
        // Strings and booleans only: serializing cannot fail.
        serde_json::to_string(&Line { timestamp, change }).unwrap_or_default()
    } else {
        format!("{timestamp} {}", change.text())
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}

#[cfg(test)]
mod tests;
