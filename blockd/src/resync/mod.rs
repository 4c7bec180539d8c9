//! The resync, whole (design.md §5): the decision at the handshake, the source that copies, the
//! target that applies, and the narrow handle both work through.
//!
//! ```text
//!  node::exchange ─ State ⇄ State ─► decide::plan [pure] ─► role::step (Connected)
//!     │                                               Source │            │ Target
//!     ▼                                                      ▼            ▼
//!  node::perform ─► source::run ───── GetBitmap ────────► target::serve (bitmap part)
//!                   plan: mine ∪ peer's ∪ all (full)      (Inconsistent flag on disk first:
//!                   copy: ResyncData / ResyncZero ──────►  target_ready)  lock, write, clear bits
//!                         GetSums (checksum mode) ──────►  sums of the chunk
//!                   checkpoint: Flush both, clear bits ─►  (Flush) data, then bitmap, durable
//!                   ResyncDone{gens} ───────────────────► target::finish: adopt gens, consistent
//!                   Replica::finish_source
//!  blockctl verify ─► verify::run (GetSums, Write of what differs)
//! ```
//!
//! The handle, [`Replica`], is a trait that `Volume` implements (`volume/replica.rs`): exactly
//! what a resync needs from a volume (its interval lock, its store's read and flush with their
//! error accounting, the peer write path for resync blocks, the dirty bitmap, "is the application
//! busy", progress, and the generations at the end), nothing of the write path's fields. A trait
//! rather than a struct of borrowed fields because several of these are the volume's own
//! behaviour, not data (an I/O error fails the disk; a bitmap error fails it too; the end of a
//! resync is a transition under the volume's metadata lock), and because the resync code, generic
//! over it, can then only call what the trait lists. It is crate-private and has one
//! implementor, so its `async fn`s need no `Send` bounds: callers see the concrete futures.

mod decide;
mod holes;
mod source;
mod target;
mod verify;

use std::{ops::Range, path::Path, time::Instant};

use bytes::Bytes;

pub use decide::{decide, plan, Plan, Resolve, Side, SyncDecision};
pub(crate) use source::run;
pub(crate) use target::{finish, flushed, serve, Served};
pub(crate) use verify::run as verify;

use crate::{
    config::ChecksumMode,
    control::ResyncProgress,
    meta::{Bitmap, DirtyError, Generations},
    replication::Session,
    storage::ReadBuf,
    volume::{RangeGuard, Transition, VolumeError},
};

/// How a resync is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncOptions {
    /// Copy the whole device (an unrelated peer, `resolve --full-sync`).
    pub full: bool,
    /// The peer's bitmap marks something: fetch it and copy the union.
    pub peer_dirty: bool,
    /// Bytes per second; 0 = no ceiling.
    pub max_rate: u64,
    pub checksum: ChecksumMode,
}

/// Why a resync (or a verify) this node was running stopped.
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error("local I/O failed")]
    Local(#[source] VolumeError),
    #[error("the peer did not apply the resync: {0}")]
    Peer(String),
    #[error("this node is not connected and Primary")]
    NotReady,
}

/// A running resync's progress, on either side (status shows it).
#[derive(Debug, Clone)]
pub struct Progress {
    pub total: u64,
    pub done: u64,
    pub started: Instant,
}

impl Progress {
    pub fn new(total: u64) -> Self {
        Progress { total, done: 0, started: Instant::now() }
    }

    pub fn report(&self) -> ResyncProgress {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        ResyncProgress {
            total: self.total,
            done: self.done,
            rate: (self.done as f64 / secs) as u64,
        }
    }
}

/// The volume's resync counters (`blockctl status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tally {
    /// Bytes sent as `ResyncData`.
    ResyncData,
    /// Bytes sent as `ResyncZero` (holes, all-zero chunks).
    ResyncZero,
    /// Bytes the checksums found equal on the peer: not sent.
    ResyncSame,
    /// Bytes `verify` found different and repaired.
    VerifyDiffered,
}

/// What a resync needs from a volume; see the module doc.
pub(crate) trait Replica {
    /// The volume's name, for logs.
    fn name(&self) -> &str;
    /// The volume's id on the replication link.
    fn index(&self) -> u16;
    fn size(&self) -> u64;
    /// Overflow-safe bounds check of a request.
    fn check_range(&self, offset: u64, len: u64) -> Result<(), VolumeError>;
    /// The backing file or device (holes are looked up in it).
    fn backing(&self) -> &Path;

    /// The application's interval lock on the range, block-widened (design.md §3).
    async fn lock(&self, offset: u64, len: u64) -> RangeGuard<'_>;
    /// A read of the local store, accounted: an error fails the disk (design.md §3).
    async fn read_local(&self, offset: u64, len: u32) -> Result<ReadBuf, VolumeError>;
    /// A flush of the local store, accounted the same way: a failed flush may have lost what
    /// was cached, and the kernel says so only once.
    async fn flush_local(&self) -> Result<(), VolumeError>;
    /// A resync block written here as the peer's writes are, under the lock, while `session`
    /// lives.
    async fn write_from_peer(
        &self,
        session: &Session,
        offset: u64,
        data: Bytes,
    ) -> Result<(), VolumeError>;
    /// A resync zero range, the same way (punching holes is allowed).
    async fn zero_from_peer(
        &self,
        session: &Session,
        offset: u64,
        len: u64,
    ) -> Result<(), VolumeError>;

    /// A copy of the dirty bitmap as it is now.
    fn bitmap(&self) -> Bitmap;
    /// Up to `max` bytes of the dirty bitmap from `offset`, for the peer's `GetBitmap`.
    fn bitmap_part(&self, offset: u64, max: usize) -> Vec<u8>;
    /// The first dirty run at or after `offset`.
    fn next_dirty(&self, offset: u64) -> Option<Range<u64>>;
    /// Marks everything `peer` marks (in memory; [`Replica::flush_bitmap`] writes it).
    fn union(&self, peer: &Bitmap) -> Result<(), DirtyError>;
    /// The ranges only this node's crash recovery marked.
    fn crash_ranges(&self) -> Vec<Range<u64>>;
    fn forget_crash(&self);
    /// A count of marks so far: a bit marked after a copy started must not be cleared by it.
    fn marks(&self) -> u64;
    fn clear(&self, range: Range<u64>);
    fn dirty_bytes(&self) -> u64;
    /// `range` may differ from the peer, durably.
    async fn mark(&self, range: Range<u64>) -> Result<(), VolumeError>;
    /// Writes the changed bitmap pages back.
    async fn flush_bitmap(&self) -> Result<(), VolumeError>;

    /// An application write started within `window`: the resync yields.
    fn app_busy(&self, window: std::time::Duration) -> bool;
    /// The session application writes are mirrored on, if this node is Primary and mirroring.
    fn mirror_session(&self) -> Option<Session>;
    /// Changes the running resync's progress, if one runs.
    fn progress(&self, f: impl FnOnce(&mut Progress));
    /// A resync runs on this volume (either side).
    fn resyncing(&self) -> bool;
    fn count(&self, tally: Tally, bytes: u64);
    /// The session whose resync this node, as target, may apply (its `Inconsistent` flag is on
    /// disk); 0 for none.
    fn target_ready(&self) -> tokio::sync::watch::Receiver<u64>;

    /// This node's generations, as persisted.
    async fn generations(&self) -> Generations;
    /// The peer applied this node's resync: `sync_done_source`, durably, then `ResyncDone`.
    async fn finish_source(&self) -> Result<Transition, VolumeError>;
    /// This node received the whole resync: the bitmap cleared, the source's generations
    /// adopted and the data called consistent, durably, then `ResyncDone`.
    async fn finish_target(&self, source: &Generations) -> Result<Transition, VolumeError>;
}
