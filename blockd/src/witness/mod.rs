//! The lease witness (design.md §7): `blockd witness` on a third host, and the nodes' client.
//!
//! ```text
//!   alpha ── LeaseClient ──┐                         ┌── lease table (lease.rs, pure)
//!                          ├─ TCP, HMAC (proto.rs) ─► server.rs
//!   beta  ── LeaseClient ──┘                         └── state file (state.rs, fsync'd)
//! ```
//!
//! The witness grants a lease for an epoch to one node at a time, for a term; the holder renews
//! it; another node gets it (with the next epoch) only once a term passed without renewal; a
//! restarted witness gives it to nobody new for one full term. The client counts the lease from
//! before it asked, minus a margin, so a node's lease always ends before the witness would give
//! it to the other node (`client.rs`). Nodes use it to fence degraded writes and to promote.
//!
//! - [`lease`]: the lease table, `request(node, now) -> Grant | Refused`. Pure; no I/O.
//! - [`proto`]: the four-frame exchange, versioned, authenticated both ways. Pure.
//! - `frames` (private): whole frames on a stream.
//! - [`state`]: the state file, replaced atomically and fsync'd.
//! - [`server`]: `blockd witness`: listener, connections, persistence before answering.
//! - [`client`]: [`LeaseClient`] and [`Lease`] for the nodes.
//!
//! The witness holds no data and no volumes; nothing here touches storage or the peer link.

pub mod client;
mod frames;
pub mod lease;
pub mod proto;
pub mod server;
pub mod state;

pub use client::{ClientSettings, Granted, Lease, LeaseClient, WitnessError};
pub use frames::FrameError;
pub use server::{run, ServerConfig, ServerError};

/// The term when `--term` (or `lease.term`) is not given: a failed primary's lease runs out
/// at most this long after its last renewal (a Primary renews every third of it), which is
/// most of the automatic failover time. 2 s: the lease runs out 1.3–2 s after a kill, inside
/// the 2 s replication peer-timeout that a power cut costs anyway, so kill → service back is
/// that plus the promote plan, well within 5 s; a primary cut off from everything for up to
/// about 1.3 s keeps its lease (a longer total outage of the primary is a failover).
pub const DEFAULT_TERM: std::time::Duration = std::time::Duration::from_secs(2);
