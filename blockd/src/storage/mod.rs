//! Backing storage: a regular file (created sparse) or a block device, behind one trait.
//!
//! ```text
//!  Volume ──► Store (alignment: read-modify-write, edge zeroing, fallbacks)
//!               │  Op + oneshot::Sender<Completion>
//!               ▼
//!            Engine ── io_uring (uring.rs) | blocking threads (sync.rs)
//!               │  exactly one Completion per Op, buffer handed back
//!               ▼
//!            backing file / disk (O_DIRECT when it supports it)
//! ```
//!
//! Engines only ever see ops aligned to the backing's logical block; [`Store`] turns any byte
//! range into such ops. Every engine reports completions the same way, so tests can run one
//! conformance suite against all of them.

mod backing;
pub mod buf;
pub mod fault;
mod store;
pub mod sync;
#[cfg(test)]
mod tests;
pub mod uring;

use std::io;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

pub use buf::{AlignedBuf, Filler, SharedBuf};
pub use store::{ReadBuf, Store, StoreOptions};

/// One operation on the backing store. Offsets and lengths given to an [`Engine`] are aligned
/// to the store's block size and buffers to its memory alignment; [`Store`] guarantees it.
#[derive(Debug)]
pub enum Op {
    /// Fill `buf` (all of it) from `offset`.
    Read { offset: u64, buf: AlignedBuf },
    /// Write all of `buf` at `offset`. `durable`: the completion means the data is on stable
    /// storage (`RWF_DSYNC`: a FUA write on a device, write + flush where it has no FUA); it
    /// says nothing of other writes. The buffer may be shared (with the peer's frame): the
    /// engine only reads it, and lets go of its share at the completion.
    Write { offset: u64, buf: SharedBuf, durable: bool },
    /// `fdatasync` (or the device flush): every completed write is on stable storage.
    Flush,
    /// Deallocate; the range reads as zeroes afterwards (`FALLOC_FL_PUNCH_HOLE|KEEP_SIZE`).
    PunchHole { offset: u64, len: u64 },
    /// Zero and keep allocated (`FALLOC_FL_ZERO_RANGE|KEEP_SIZE`, or `BLKZEROOUT`-like on devices).
    ZeroRange { offset: u64, len: u64 },
}

impl Op {
    /// A read's buffer: what an engine hands back in its [`Completion`].
    pub fn into_buf(self) -> Option<AlignedBuf> {
        match self {
            Op::Read { buf, .. } => Some(buf),
            Op::Write { .. } | Op::Flush | Op::PunchHole { .. } | Op::ZeroRange { .. } => None,
        }
    }

    /// Bytes a read or write moves (0 for the others).
    pub fn payload_len(&self) -> usize {
        match self {
            Op::Read { buf, .. } => buf.len(),
            Op::Write { buf, .. } => buf.len(),
            Op::Flush | Op::PunchHole { .. } | Op::ZeroRange { .. } => 0,
        }
    }
}

/// The one completion path. Whatever happened, a read's buffer comes back with it: the engine
/// owns it only between `submit` and this completion.
#[derive(Debug)]
pub struct Completion {
    pub result: io::Result<()>,
    pub buf: Option<AlignedBuf>,
}

/// An I/O engine. `submit` never blocks on the I/O itself.
pub trait Engine: Send + Sync + std::fmt::Debug + 'static {
    /// Starts `op`; `done` receives exactly one [`Completion`] (dropped only if the receiver is).
    fn submit(&self, op: Op, done: oneshot::Sender<Completion>);
    /// "io_uring" or "sync", for status and logs.
    fn name(&self) -> &'static str;
}

impl dyn Engine {
    /// Submits `op` and waits for its completion.
    pub async fn run(&self, op: Op) -> Completion {
        let (tx, rx) = oneshot::channel();
        self.submit(op, tx);
        rx.await.unwrap_or_else(|_| Completion {
            result: Err(io::Error::other("storage engine dropped a request")),
            buf: None,
        })
    }
}

/// Which engine to use (`[storage] engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// io_uring, falling back to sync (logged once) when the kernel refuses io_uring.
    #[default]
    Auto,
    IoUring,
    Sync,
}

/// Whether to open the backing with `O_DIRECT` (`[storage] direct-io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirectIo {
    /// Direct when the backing supports it (not on tmpfs); buffered is logged as a fallback.
    #[default]
    Auto,
    On,
    Off,
}

/// How a missing backing file is created (`[storage] allocate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Allocate {
    /// Every block reserved at creation (`fallocate`): a full filesystem cannot fail a write
    /// later, it fails the creation now.
    #[default]
    Full,
    /// A sparse file: blocks are allocated as they are written, and a write can fail with
    /// ENOSPC when the filesystem fills up (which fails the disk).
    Sparse,
}

/// Errors opening a backing store.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot create backing file {path}")]
    Create {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open backing {path}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("backing {path} is {actual} bytes but the volume size is {expected} bytes")]
    SizeMismatch { path: std::path::PathBuf, actual: u64, expected: u64 },
    #[error("backing {path}: {what}")]
    Unsupported { path: std::path::PathBuf, what: String },
    #[error("cannot start the io_uring engine")]
    Uring(#[source] io::Error),
    #[error("cannot start the sync engine's threads")]
    Threads(#[source] io::Error),
}
