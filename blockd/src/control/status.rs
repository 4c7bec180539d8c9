//! What `blockctl status` shows, as sent over the control socket. Names of roles and states are
//! exactly those of design.md §7, so scripts can rely on them.

use serde::{Deserialize, Serialize};

pub use crate::meta::{DiskFailure, DiskOp};
use crate::metrics::LatencySnapshot;
/// The role machine's names, defined in the core ([`crate::role`]) and re-exported here, the API
/// `blockctl` reads them from.
pub use crate::role::{ConnState, DiskState, Role};

/// Progress of a running resync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncProgress {
    /// Bytes the resync has to cover in all.
    pub total: u64,
    /// Bytes covered so far.
    pub done: u64,
    /// Bytes per second over the last few seconds.
    pub rate: u64,
}

/// The witness lease as this node sees it (design.md §7); only with `cluster.witness`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseStatus {
    /// The witness's address.
    pub witness: String,
    /// Who holds the lease: this node while its lease is valid, else whom the witness named
    /// when it last refused (None: unknown).
    #[serde(default)]
    pub holder: Option<String>,
    /// The epoch this node last held (maybe expired).
    #[serde(default)]
    pub epoch: Option<u64>,
    /// How long this node's lease is still valid, by its own clock; 0 when it holds none.
    #[serde(default)]
    pub valid_for_ms: u64,
    /// The epoch this node lost to another node while Primary: degraded writes stay frozen
    /// until its role changes.
    #[serde(default)]
    pub lost: Option<u64>,
    /// The last failure to obtain or renew the lease.
    #[serde(default)]
    pub error: Option<String>,
}

/// Per-volume counters, each incremented on the path named in its doc.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// NBD READ requests completed successfully.
    pub reads: u64,
    /// NBD WRITE requests completed successfully.
    pub writes: u64,
    /// Bytes returned by successful reads.
    pub bytes_read: u64,
    /// Bytes stored by successful writes (payload bytes, not zeroes).
    pub bytes_written: u64,
    /// FLUSH requests plus the flushes FUA implied.
    pub flushes: u64,
    /// TRIM requests completed.
    pub trims: u64,
    /// WRITE_ZEROES requests completed.
    pub zeroes: u64,
    /// Requests that failed with an I/O error from the backing store.
    pub errors: u64,
    /// Writes, zeroes and trims acknowledged by the peer.
    #[serde(default)]
    pub peer_writes: u64,
    /// Payload bytes sent to the peer for application writes.
    #[serde(default)]
    pub peer_bytes: u64,
    /// Writes completed locally only, because the peer was gone (degraded mode).
    #[serde(default)]
    pub degraded_writes: u64,
    /// Payload bytes sent as data by resyncs from this node.
    #[serde(default)]
    pub resync_bytes: u64,
    /// Bytes resyncs from this node covered with zero requests (holes, zero blocks).
    #[serde(default)]
    pub resync_zero_bytes: u64,
    /// Bytes resyncs from this node skipped because the peer's checksums matched.
    #[serde(default)]
    pub resync_same_bytes: u64,
    /// Bytes `blockctl verify` found different on the peer (and repaired).
    #[serde(default)]
    pub verify_differed: u64,
    /// Times the replication link came up for this volume.
    #[serde(default)]
    pub connects: u64,
    /// Replication connections refused: failed authentication, another version or volume
    /// set, too many handshakes in progress from one source.
    #[serde(default)]
    pub link_refused: u64,
    /// Metadata writes made durable (activity-log transactions, bitmap pages): what the dirty
    /// tracking costs the disk (issue 13's "metadata writes per GiB").
    #[serde(default)]
    pub meta_writes: u64,
}

/// One volume on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    pub role: Role,
    pub disk: DiskState,
    /// Why the disk is `Failed`: the first error, the operation and the offset.
    #[serde(default)]
    pub disk_failure: Option<DiskFailure>,
    /// NBD connections currently in the transmission phase.
    pub clients: u32,
    /// The NBD unix socket clients connect to.
    pub socket: String,
    /// Backing file or device.
    pub backing: String,
    /// "io_uring" or "sync".
    pub engine: String,
    pub direct_io: bool,
    /// Connection to the peer; `StandAlone` on a single node.
    pub conn: ConnState,
    /// Why the connection is what it is, when that is not obvious (refusals, split brain).
    #[serde(default)]
    pub conn_reason: Option<String>,
    /// StandAlone since a handshake found a split brain (both nodes wrote since they were last
    /// in sync): the operator resolves it (`blockctl resolve`). Cleared when a session comes up.
    #[serde(default)]
    pub split_brain: bool,
    /// The peer's name, on a two-node setup.
    #[serde(default)]
    pub peer: Option<String>,
    /// The peer's role and disk state, while connected.
    #[serde(default)]
    pub peer_role: Option<Role>,
    #[serde(default)]
    pub peer_disk: Option<DiskState>,
    /// Bytes that may differ between the nodes (what a resync has still to copy).
    #[serde(default)]
    pub out_of_sync: u64,
    /// The running resync, if any.
    #[serde(default)]
    pub resync: Option<ResyncProgress>,
    /// The current generation id, hex (design.md §5).
    #[serde(default)]
    pub generation: String,
    pub counters: Counters,
    /// Why degraded writes wait instead of completing (a Primary without its peer and without
    /// a valid witness lease); None when writes complete.
    #[serde(default)]
    pub frozen: Option<String>,
    /// The witness lease, when `cluster.witness` is configured.
    #[serde(default)]
    pub lease: Option<LeaseStatus>,
    /// Latency histograms of successful requests, per kind; empty from an older daemon.
    #[serde(default)]
    pub latency: LatencySnapshot,
}

/// Everything `status` reports for one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub version: String,
    pub volumes: Vec<VolumeStatus>,
}
