//! The event history the console shows: state changes seen by polling the node's own status
//! (the same [`NodeStatus`] the control socket answers), turned into events by a pure
//! [`History::observe`], plus the actions the console ran.
//!
//! | kind          | when (per volume, as this node sees it)                                 |
//! |---------------|-------------------------------------------------------------------------|
//! | `start`       | the first poll: the console started (so did the daemon)                 |
//! | `role`        | this node's role changed                                                |
//! | `failover`    | this node became Primary while its peer, Primary before, was gone: `duration_ms` from the peer's last sign of life (the last poll that saw it Primary and connected: detection included); `cause` the agent's decision when it made one |
//! | `switchover`  | the Primary moved while both were connected (a swap): `duration_ms` from the old Primary's demote to the new one's promote |
//! | `split-brain` | the connection went StandAlone for a split brain                        |
//! | `disk-failed` | the local disk became Failed (`cause`: the operation, errno, offset)    |
//! | `disk`        | any other change of the local disk's state                              |
//! | `conn`        | the connection state changed (`cause`: the daemon's reason)             |
//! | `peer`        | the peer's role or disk changed (from what the link tells)              |
//! | `resync`      | a resync started or finished (`duration_ms` when it finished)          |
//! | `lease-lost`  | this Primary lost the witness lease to another node                     |
//! | `action`      | an action asked through the console: who, from where, and its outcome   |
//!
//! Bounded: the last [`KEEP`] events; the daemon's log has them all.

use std::{
    collections::{HashMap, VecDeque},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::control::{ConnState, DiskState, NodeStatus, Role, VolumeStatus};

/// Events kept.
pub const KEEP: usize = 500;

/// One entry of the history. JSON as shown by `/api/state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Unix time in milliseconds.
    pub at_ms: u64,
    pub kind: &'static str,
    pub volume: Option<String>,
    pub text: String,
    pub duration_ms: Option<u64>,
    pub cause: Option<String>,
}

/// What one poll saw of a volume; what the next poll is compared with.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    role: Role,
    disk: DiskState,
    conn: ConnState,
    peer_role: Option<Role>,
    peer_disk: Option<DiskState>,
    resync: bool,
    lease_lost: bool,
}

impl Seen {
    fn of(v: &VolumeStatus) -> Seen {
        Seen {
            role: v.role,
            disk: v.disk,
            conn: v.conn,
            peer_role: v.peer_role,
            peer_disk: v.peer_disk,
            resync: v.resync.is_some(),
            lease_lost: v.lease.as_ref().is_some_and(|l| l.lost.is_some()),
        }
    }
}

/// Moments a later event measures its duration from, per volume.
#[derive(Debug, Default, Clone)]
struct Marks {
    /// The last poll that saw the peer Primary and connected: its last sign of life.
    peer_primary_alive: Option<u64>,
    /// Set when the peer, Primary before, was seen gone: its last sign of life.
    primary_peer_lost: Option<u64>,
    /// The last poll that saw this node Primary.
    primary_alive: Option<u64>,
    /// The peer went from Primary to Secondary while connected (the first half of a swap):
    /// the last poll that saw it Primary.
    peer_demoted: Option<u64>,
    /// This node went from Primary to Secondary while connected: the last poll that saw it
    /// Primary.
    demoted: Option<u64>,
    resync_started: Option<u64>,
}

/// The history and what it needs to derive the next events.
#[derive(Debug, Default)]
pub struct History {
    events: VecDeque<Event>,
    seen: HashMap<String, Seen>,
    marks: HashMap<String, Marks>,
    started: bool,
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

impl History {
    /// The events, oldest first.
    pub fn events(&self) -> Vec<Event> {
        self.events.iter().cloned().collect()
    }

    pub fn push(&mut self, e: Event) {
        tracing::info!(kind = e.kind, volume = ?e.volume, duration_ms = ?e.duration_ms,
                       cause = ?e.cause, "console event: {}", e.text);
        if self.events.len() == KEEP {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    /// Compares `status` (polled at `at_ms`) with the previous poll and records what changed.
    /// `agent` is the agent's latest decision on this node ("promote: peer gone, lease won"),
    /// the cause of a failover when there is one.
    pub fn observe(&mut self, status: &NodeStatus, at_ms: u64, agent: Option<&str>) {
        if !self.started {
            self.started = true;
            let text = status
                .volumes
                .iter()
                .map(|v| format!("{} {:?} {:?} {:?}", v.name, v.role, v.disk, v.conn))
                .collect::<Vec<_>>()
                .join("; ");
            self.push(event(
                at_ms,
                "start",
                None,
                format!("{} console started: {text}", status.node),
            ));
        }
        for v in &status.volumes {
            let now = Seen::of(v);
            let before = self.seen.insert(v.name.clone(), now.clone());
            let marks = self.marks.entry(v.name.clone()).or_default();
            let ctx = Ctx { node: &status.node, v, at_ms, agent };
            let events = match before.filter(|b| *b != now) {
                Some(before) => changes(&before, &now, marks, &ctx),
                None => Vec::new(),
            };
            // After the changes: they measure from the polls before this one.
            if now.peer_role == Some(Role::Primary) && connected(now.conn) {
                marks.peer_primary_alive = Some(at_ms);
            }
            if now.role == Role::Primary {
                marks.primary_alive = Some(at_ms);
            }
            for e in events {
                self.push(e);
            }
        }
    }
}

/// The facts a change is described with.
struct Ctx<'a> {
    node: &'a str,
    v: &'a VolumeStatus,
    at_ms: u64,
    agent: Option<&'a str>,
}

impl Ctx<'_> {
    fn ev(&self, kind: &'static str, text: String) -> Event {
        event(self.at_ms, kind, Some(self.v.name.clone()), text)
    }

    fn peer(&self) -> &str {
        self.v.peer.as_deref().unwrap_or("the peer")
    }
}

fn event(at_ms: u64, kind: &'static str, volume: Option<String>, text: String) -> Event {
    Event { at_ms, kind, volume, text, duration_ms: None, cause: None }
}

fn connected(c: ConnState) -> bool {
    matches!(c, ConnState::Connected | ConnState::SyncSource | ConnState::SyncTarget)
}

/// The events between two polls of one volume; updates `marks`. Durations run from the last
/// poll that saw the old state to this one, so they are exact to one [`super::WATCH`].
fn changes(before: &Seen, now: &Seen, marks: &mut Marks, c: &Ctx) -> Vec<Event> {
    let mut out = Vec::new();
    let t = c.at_ms;
    if before.peer_role == Some(Role::Primary) && !connected(now.conn) {
        marks.primary_peer_lost = Some(marks.peer_primary_alive.unwrap_or(t));
    }
    if before.peer_role == Some(Role::Primary) && now.peer_role == Some(Role::Secondary) {
        marks.peer_demoted = Some(marks.peer_primary_alive.unwrap_or(t));
    }
    if before.role == Role::Primary && now.role == Role::Secondary {
        marks.demoted = connected(now.conn).then(|| marks.primary_alive.unwrap_or(t));
    }
    if before.conn != now.conn {
        let mut e = c.ev("conn", format!("connection {:?} → {:?}", before.conn, now.conn));
        e.cause.clone_from(&c.v.conn_reason);
        if now.conn == ConnState::StandAlone && c.v.split_brain {
            e.kind = "split-brain";
            e.text = format!("split brain with {}: both wrote since last in sync", c.peer());
        }
        out.push(e);
    }
    out.extend(role_change(before, now, marks, c));
    out.extend(peer_change(before, now, marks, c));
    if before.disk != now.disk {
        let mut e = c.ev("disk", format!("disk {:?} → {:?}", before.disk, now.disk));
        if now.disk == DiskState::Failed {
            e.kind = "disk-failed";
            e.text = format!("{}'s disk failed", c.node);
            e.cause =
                c.v.disk_failure
                    .map(|f| format!("{:?} error {} at offset {}", f.op, f.errno, f.offset));
        }
        out.push(e);
    }
    if before.resync != now.resync {
        out.push(resync_change(now.resync, marks, c));
    }
    if !before.lease_lost && now.lease_lost {
        let holder = c.v.lease.as_ref().and_then(|l| l.holder.clone());
        let mut e = c.ev("lease-lost", format!("{} lost the witness lease", c.node));
        e.cause = holder.map(|h| format!("held by {h}"));
        out.push(e);
    }
    out
}

fn role_change(before: &Seen, now: &Seen, marks: &mut Marks, c: &Ctx) -> Option<Event> {
    if before.role == now.role {
        return None;
    }
    let t = c.at_ms;
    let mut e = c.ev("role", format!("{} became {:?}", c.node, now.role));
    if now.role == Role::Secondary {
        return Some(e);
    }
    if let Some(lost) = marks.primary_peer_lost.take() {
        e.kind = "failover";
        e.text = format!("failover: {} took over from {}", c.node, c.peer());
        e.duration_ms = Some(t.saturating_sub(lost));
        e.cause = Some(c.agent.map_or_else(
            || format!("{} gone; promoted by an operator", c.peer()),
            |a| format!("{} gone; agent: {a}", c.peer()),
        ));
    } else if let Some(demoted) = marks.peer_demoted.take() {
        e.kind = "switchover";
        e.text = format!("switchover: {} → {}", c.peer(), c.node);
        e.duration_ms = Some(t.saturating_sub(demoted));
    }
    Some(e)
}

fn peer_change(before: &Seen, now: &Seen, marks: &mut Marks, c: &Ctx) -> Option<Event> {
    if before.peer_role == now.peer_role && before.peer_disk == now.peer_disk {
        return None;
    }
    let t = c.at_ms;
    let show = |r: Option<Role>, d: Option<DiskState>| match (r, d) {
        (Some(r), Some(d)) => format!("{r:?}/{d:?}"),
        (Some(r), None) => format!("{r:?}"),
        _ => "not connected".to_string(),
    };
    let text = format!(
        "{}: {} → {}",
        c.peer(),
        show(before.peer_role, before.peer_disk),
        show(now.peer_role, now.peer_disk)
    );
    let mut e = c.ev("peer", text);
    if before.peer_role != Some(Role::Primary) && now.peer_role == Some(Role::Primary) {
        if let Some(demoted) = marks.demoted.take() {
            e.kind = "switchover";
            e.text = format!("switchover: {} → {}", c.node, c.peer());
            e.duration_ms = Some(t.saturating_sub(demoted));
        }
    }
    Some(e)
}

fn resync_change(running: bool, marks: &mut Marks, c: &Ctx) -> Event {
    let t = c.at_ms;
    if running {
        marks.resync_started = Some(t);
        let total = c.v.resync.as_ref().map_or(0, |r| r.total);
        return c.ev("resync", format!("resync started ({:?}, {total} bytes)", c.v.conn));
    }
    let mut e = c.ev("resync", "resync finished".to_string());
    e.duration_ms = marks.resync_started.take().map(|s| t.saturating_sub(s));
    e
}

#[cfg(test)]
#[path = "history_tests.rs"]
mod tests;
