//! What `blockctl status` shows, as sent over the control socket. Names of roles and states are
//! exactly those of DESIGN §7, so scripts can rely on them.

use serde::{Deserialize, Serialize};

/// A node's role for a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Primary,
    Secondary,
}

/// The local disk's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskState {
    UpToDate,
    Outdated,
    Inconsistent,
    /// A local I/O error happened; the error went to the client as EIO.
    Failed,
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
}

/// One volume on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    pub role: Role,
    pub disk: DiskState,
    /// NBD connections currently in the transmission phase.
    pub clients: u32,
    /// The NBD unix socket clients connect to.
    pub socket: String,
    /// Backing file or device.
    pub backing: String,
    /// "io_uring" or "sync".
    pub engine: String,
    pub direct_io: bool,
    pub counters: Counters,
}

/// Everything `status` reports for one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub version: String,
    pub volumes: Vec<VolumeStatus>,
}
