//! Metrics: the node's status as Prometheus text (exposition format 0.0.4), served on
//! `GET /metrics` by [`http`], and the lock-free latency histograms the volumes record into.
//!
//! ```text
//!  Volume::read/write/... ── record(elapsed) ──► Latencies (histogram.rs, atomics)
//!                                                     │ snapshot
//!  scraper ── GET /metrics ──► http ──► status() ──► NodeStatus ──► render() ──► text
//!                                      (the control socket's Status answer, same function)
//! ```
//!
//! Rendering starts from the same [`NodeStatus`] `blockctl status` shows, so the two can never
//! disagree. Every sample carries `node` and `volume` labels. The families:
//!
//! | family                                         | type      | extra label     |
//! |------------------------------------------------|-----------|-----------------|
//! | `blockd_build_info`                            | gauge (1) | `version`       |
//! | `blockd_volume_size_bytes`                     | gauge     |                 |
//! | `blockd_volume_role`, `blockd_volume_peer_role`| gauge 0/1 | `role`          |
//! | `blockd_volume_disk_state`, `..._peer_disk_state` | gauge 0/1 | `state`      |
//! | `blockd_volume_connection_state`               | gauge 0/1 | `state`         |
//! | `blockd_volume_disk_failure_info` (Failed only) | gauge (1) | `op`, `errno`, `offset` |
//! | `blockd_volume_clients`                        | gauge     |                 |
//! | `blockd_volume_out_of_sync_bytes`              | gauge     |                 |
//! | `blockd_volume_resync_{active,total_bytes,done_bytes,rate_bytes_per_second}` | gauge | |
//! | `blockd_volume_requests_total`                 | counter   | `kind`          |
//! | `blockd_volume_{read,written}_bytes_total`, `..._errors_total`, ... | counter |   |
//! | `blockd_volume_request_duration_seconds`       | histogram | `kind`          |
//!
//! State families list every state, 1 for the current one and 0 for the others, so an alert
//! can say `blockd_volume_disk_state{state="UpToDate"} == 0`. The peer's role and disk are all
//! 0 while it is not connected. The witness lease is not reported here yet
//! (`blockctl status` shows it).

pub mod health;
pub mod histogram;
pub mod http;

use std::fmt::{Display, Write};

pub use histogram::{Histogram, HistogramSnapshot, Latencies, LatencySnapshot};

use crate::control::{ConnState, DiskState, NodeStatus, Role, VolumeStatus};

/// The `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every state, in the order rendered. A state missing here (a new variant) is still rendered
/// when it is the current one; it just lacks its 0 sample otherwise.
const ROLES: [Role; 2] = [Role::Primary, Role::Secondary];
const DISKS: [DiskState; 4] =
    [DiskState::UpToDate, DiskState::Outdated, DiskState::Inconsistent, DiskState::Failed];
const CONNS: [ConnState; 5] = [
    ConnState::StandAlone,
    ConnState::Connecting,
    ConnState::Connected,
    ConnState::SyncSource,
    ConnState::SyncTarget,
];

type Value = fn(&VolumeStatus) -> u64;

/// Plain per-volume gauges: name, help, value.
const GAUGES: &[(&str, &str, Value)] = &[
    ("blockd_volume_size_bytes", "Size of the volume.", |v| v.size),
    ("blockd_volume_clients", "NBD clients in the transmission phase.", |v| u64::from(v.clients)),
    (
        "blockd_volume_out_of_sync_bytes",
        "Bytes that may differ between the nodes (what a resync has still to copy).",
        |v| v.out_of_sync,
    ),
    ("blockd_volume_resync_active", "1 while a resync runs.", |v| u64::from(v.resync.is_some())),
    (
        "blockd_volume_resync_total_bytes",
        "Bytes the running resync covers in all (0 when none runs).",
        |v| v.resync.as_ref().map_or(0, |r| r.total),
    ),
    (
        "blockd_volume_resync_done_bytes",
        "Bytes the running resync has covered (0 when none runs).",
        |v| v.resync.as_ref().map_or(0, |r| r.done),
    ),
    (
        "blockd_volume_resync_rate_bytes_per_second",
        "Rate of the running resync over the last few seconds (0 when none runs).",
        |v| v.resync.as_ref().map_or(0, |r| r.rate),
    ),
];

/// Per-volume counters without a `kind` label.
const COUNTERS: &[(&str, &str, Value)] = &[
    ("blockd_volume_read_bytes_total", "Bytes returned by successful reads.", |v| {
        v.counters.bytes_read
    }),
    ("blockd_volume_written_bytes_total", "Payload bytes stored by successful writes.", |v| {
        v.counters.bytes_written
    }),
    ("blockd_volume_errors_total", "Requests failed by an I/O error of the backing store.", |v| {
        v.counters.errors
    }),
    (
        "blockd_volume_peer_writes_total",
        "Writes, zeroes and trims acknowledged by the peer.",
        |v| v.counters.peer_writes,
    ),
    ("blockd_volume_peer_sent_bytes_total", "Payload bytes sent to the peer for writes.", |v| {
        v.counters.peer_bytes
    }),
    (
        "blockd_volume_degraded_writes_total",
        "Writes completed locally only because the peer was gone.",
        |v| v.counters.degraded_writes,
    ),
    ("blockd_volume_resync_sent_bytes_total", "Bytes sent by resyncs from this node.", |v| {
        v.counters.resync_bytes
    }),
    ("blockd_volume_connects_total", "Times the replication link came up for this volume.", |v| {
        v.counters.connects
    }),
    (
        "blockd_volume_link_refused_total",
        "Replication connections refused (authentication, version, volumes, too many handshakes).",
        |v| v.counters.link_refused,
    ),
];

/// Requests by kind: the `kind` label and its counter.
const REQUESTS: &[(&str, Value)] = &[
    ("read", |v| v.counters.reads),
    ("write", |v| v.counters.writes),
    ("write_zeroes", |v| v.counters.zeroes),
    ("trim", |v| v.counters.trims),
    ("flush", |v| v.counters.flushes),
];

/// The whole node as Prometheus text, ending with a newline.
pub fn render(status: &NodeStatus) -> String {
    let mut out = Out::default();
    let node = status.node.as_str();
    out.family("blockd_build_info", "gauge", "The daemon's version (value 1).");
    out.sample("blockd_build_info", &[("node", node), ("version", &status.version)], 1);
    for (name, help, value) in GAUGES {
        out.per_volume(status, name, "gauge", help, |out, labels, v| {
            out.sample(name, labels, value(v));
        });
    }
    states(&mut out, status);
    out.per_volume(status, FAILURE, "gauge", FAILURE_HELP, |out, labels, v| {
        let Some(f) = v.disk_failure else { return };
        let (op, errno, offset) =
            (format!("{:?}", f.op), f.errno.to_string(), f.offset.to_string());
        let l = with(labels, "op", &op);
        let l = with(&l, "errno", &errno);
        out.sample(FAILURE, &with(&l, "offset", &offset), 1);
    });
    out.per_volume(
        status,
        "blockd_volume_requests_total",
        "counter",
        REQUESTS_HELP,
        |out, l, v| {
            for (kind, value) in REQUESTS {
                out.sample("blockd_volume_requests_total", &with(l, "kind", kind), value(v));
            }
        },
    );
    for (name, help, value) in COUNTERS {
        out.per_volume(status, name, "counter", help, |out, labels, v| {
            out.sample(name, labels, value(v));
        });
    }
    out.per_volume(status, DURATION, "histogram", DURATION_HELP, |out, labels, v| {
        for (kind, h) in v.latency.kinds() {
            out.histogram(DURATION, &with(labels, "kind", kind), h);
        }
    });
    out.0
}

const FAILURE: &str = "blockd_volume_disk_failure_info";
const FAILURE_HELP: &str =
    "Why the disk is Failed (value 1): the first error's operation, errno and offset.";
const REQUESTS_HELP: &str = "Requests completed successfully, by kind (flush includes FUA's).";
const DURATION: &str = "blockd_volume_request_duration_seconds";
const DURATION_HELP: &str =
    "Latency of successful requests as the NBD client sees it (peer ack included), by kind.";

/// The role, disk and connection families: one sample per known state, 1 for the current.
fn states(out: &mut Out, status: &NodeStatus) {
    let roles: Vec<String> = ROLES.iter().map(|r| format!("{r:?}")).collect();
    let disks: Vec<String> = DISKS.iter().map(|d| format!("{d:?}")).collect();
    let conns: Vec<String> = CONNS.iter().map(|c| format!("{c:?}")).collect();
    let families = [
        StateFamily {
            name: "blockd_volume_role",
            help: "This node's role (1 = current).",
            label: "role",
            all: &roles,
            current: |v| Some(format!("{:?}", v.role)),
        },
        StateFamily {
            name: "blockd_volume_disk_state",
            help: "The local disk's state (1 = current).",
            label: "state",
            all: &disks,
            current: |v| Some(format!("{:?}", v.disk)),
        },
        StateFamily {
            name: "blockd_volume_connection_state",
            help: "The connection to the peer (1 = current).",
            label: "state",
            all: &conns,
            current: |v| Some(format!("{:?}", v.conn)),
        },
        StateFamily {
            name: "blockd_volume_peer_role",
            help: "The peer's role while connected (all 0 otherwise).",
            label: "role",
            all: &roles,
            current: |v| v.peer_role.map(|r| format!("{r:?}")),
        },
        StateFamily {
            name: "blockd_volume_peer_disk_state",
            help: "The peer's disk state while connected (all 0 otherwise).",
            label: "state",
            all: &disks,
            current: |v| v.peer_disk.map(|d| format!("{d:?}")),
        },
    ];
    for f in families {
        out.per_volume(status, f.name, "gauge", f.help, |out, labels, v| {
            let now = (f.current)(v);
            let extra = now.as_ref().filter(|n| !f.all.contains(n));
            for state in f.all.iter().chain(extra) {
                let value = u64::from(now.as_ref() == Some(state));
                out.sample(f.name, &with(labels, f.label, state), value);
            }
        });
    }
}

/// A one-hot family: every state of `all` (plus the current one if `all` lacks it).
struct StateFamily<'a> {
    name: &'static str,
    help: &'static str,
    label: &'static str,
    all: &'a [String],
    /// The volume's state now; `None`: unknown, every sample is 0.
    current: fn(&VolumeStatus) -> Option<String>,
}

/// `labels` plus one more.
fn with<'a>(
    labels: &[(&'a str, &'a str)],
    key: &'a str,
    value: &'a str,
) -> Vec<(&'a str, &'a str)> {
    let mut l = labels.to_vec();
    l.push((key, value));
    l
}

/// The text being built.
#[derive(Default)]
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    /// A family whose samples come from each volume, labelled `node` and `volume`.
    fn per_volume(
        &mut self,
        status: &NodeStatus,
        name: &str,
        kind: &str,
        help: &str,
        mut samples: impl FnMut(&mut Out, &[(&str, &str)], &VolumeStatus),
    ) {
        self.family(name, kind, help);
        for v in &status.volumes {
            samples(self, &[("node", &status.node), ("volume", &v.name)], v);
        }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape_label(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    /// `_bucket{le=...}` per bound (cumulative) and `+Inf`, then `_sum` (seconds) and `_count`.
    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        let bucket = format!("{name}_bucket");
        for (le, count) in h.cumulative() {
            let le = le.map_or_else(|| "+Inf".to_string(), seconds);
            self.sample(&bucket, &with(labels, "le", &le), count);
        }
        self.sample(&format!("{name}_sum"), labels, seconds(h.sum_ns));
        self.sample(&format!("{name}_count"), labels, h.count);
    }
}

/// Nanoseconds as exact decimal seconds without trailing zeros: 16000 → "0.000016".
fn seconds(ns: u64) -> String {
    let (s, frac) = (ns / 1_000_000_000, ns % 1_000_000_000);
    if frac == 0 {
        return s.to_string();
    }
    let digits = format!("{frac:09}");
    format!("{s}.{}", digits.trim_end_matches('0'))
}

/// A label value: backslash, double quote and line feed escaped (format 0.0.4).
pub(crate) fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// HELP text: backslash and line feed escaped (quotes stay as they are).
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests;
