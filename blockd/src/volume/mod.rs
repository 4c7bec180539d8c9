//! One volume on this node: the write path, where "when is a write acknowledged" is decided.
//!
//! ```text
//!  NBD request ─► bounds ─► interval lock (block-widened, FIFO among overlaps) ─┬─► Store (local)
//!                                                                              └─► peer (Session)
//!                          reply ◄── both completed (or peer gone: generation rotated first) ◄┘
//! ```
//!
//! Durability, as acknowledged to the NBD client:
//! - WRITE, WRITE_ZEROES, TRIM: the local store completed it (direct I/O: it reached the device)
//!   AND, when the peer is connected, the peer acknowledged that its write completed. A peer ack
//!   means "written", not "durable": the peer's device cache may still lose it.
//! - FLUSH: `fdatasync` completed locally and on the peer, covering every write acknowledged
//!   before the FLUSH arrived. FUA on a WRITE: that write is durable on both (`RWF_DSYNC` here,
//!   `WriteFua` on the peer, one round trip); FUA on WRITE_ZEROES / TRIM: the request, then a
//!   FLUSH.
//! - Degraded (peer gone, or never connected since this node moved on): the write completes
//!   locally only, and only after this node's new generation is on disk (design.md §5), so a later
//!   handshake is guaranteed to see that the peer needs a resync. With a witness configured,
//!   also only while this node holds the lease, or once a resync gave the peer the range
//!   (`crate::fence`); until then it waits, with the range lock released.
//!
//! Ordering: every write-type request holds an exclusive lock on its range, widened to the
//! backing's block size, for the whole of its execution on BOTH nodes (the lock is released only
//! after the peer's ack). Overlapping writes therefore reach the peer one after the other, in
//! the order they were applied here, and a resync block (which takes the same lock) can never
//! overwrite a newer write on the peer. The lock also keeps read-modify-write of partial blocks
//! from losing a neighbour's bytes.

mod counters;
mod failure;
mod locks;
mod peer;
#[cfg(test)]
mod probe;
mod replica;
mod state;
mod track;
mod wide;

use std::{
    io,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, OnceLock,
    },
    time::Instant,
};

use counters::AtomicCounters;
pub use locks::{IntervalLocks, RangeGuard};
pub use state::Transition;
#[cfg(test)]
pub(crate) use track::META_INLINE;

use crate::{
    control::VolumeStatus,
    fence::{Cleared, Fence},
    meta::{AlConfig, Dirty, DiskFailure, DiskOp, Meta, MetaError, MetaFile},
    replication::Message,
    resync::Resolve,
    role::{self, ConnState, Role},
    storage::{AlignedBuf, ReadBuf, SharedBuf, Store},
};

/// Why a request on a volume failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The request does not fit inside the volume; nothing was touched.
    #[error("request {offset}+{len} is beyond the end of the volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The backing store failed (the disk is now `Failed`), or it had failed before, and the
    /// peer could not serve the request either.
    #[error("I/O error on the backing store")]
    Io(#[source] io::Error),
    /// The new generation could not be persisted, so a write the peer does not have cannot be
    /// acknowledged.
    #[error("cannot record the new generation")]
    Metadata(#[source] MetaError),
    /// A write-type request reached a node that is not Primary; nothing was touched.
    #[error("this node is not Primary for the volume")]
    NotPrimary,
    /// The dirty bitmap or activity log could not be read or written: a write that might
    /// differ from the peer could not be recorded, so it is not acknowledged.
    #[error("cannot record the dirty bitmap / activity log")]
    DirtyLog(#[source] io::Error),
    /// A degraded write was done here but can never be acknowledged: this node's witness lease
    /// (`epoch`) went to another node, which may be Primary now.
    #[error("lease epoch {epoch} was lost to another node: not acknowledging a degraded write")]
    Fenced { epoch: u64 },
}

impl VolumeError {
    /// True when the backing store ran out of space ([`crate::errno::is_no_space`]).
    pub fn is_no_space(&self) -> bool {
        matches!(self, VolumeError::Io(e) if crate::errno::is_no_space(e))
    }
}

/// Why this node does not serve the volume to NBD clients right now.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NotServing {
    #[error("volume {volume} is Secondary on node {node}; the primary is {}",
        primary.as_deref().unwrap_or("unknown (no connected peer is Primary)"))]
    Secondary { volume: String, node: String, primary: Option<String> },
}

/// What a volume is made of, besides its store and metadata.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub name: String,
    /// Index in the configuration's volume list: the volume's id on the replication link.
    pub index: u16,
    /// This node's name, for messages.
    pub node: String,
    /// The peer's name on a two-node setup; `None` on a single node.
    pub peer: Option<String>,
    /// The NBD unix socket, for status.
    pub socket: PathBuf,
    /// Backing file or device, for status.
    pub backing: PathBuf,
}

/// One volume as seen on this node.
#[derive(Debug)]
pub struct Volume {
    info: VolumeInfo,
    store: Store,
    locks: IntervalLocks,
    counters: AtomicCounters,
    clients: AtomicU32,
    /// What the data path and status read; changed only under `persisted` (see state.rs).
    live: Mutex<state::Live>,
    /// Metadata and its file; holding this lock is what serialises state transitions.
    persisted: tokio::sync::Mutex<state::Persisted>,
    /// Mirrors `meta.gens.bitmap != 0`: this node has moved on without its peer. Lets the
    /// degraded write path skip the metadata lock once the rotation is on disk.
    moved_on: AtomicBool,
    /// The dirty bitmap and activity log (design.md §4).
    track: track::Tracker,
    /// When the last application write-type request started, in µs since `opened` (tokio's
    /// clock: the simulator's paused time), so that a resync can yield to a busy application.
    last_app_write: AtomicU64,
    opened: tokio::time::Instant,
    /// The witness lease degraded writes need, when `cluster.witness` is configured.
    fence: OnceLock<Arc<Fence>>,
    /// The session whose resync this node, as target, is ready to receive (its `Inconsistent`
    /// flag is on disk); 0 for none. Set under `persisted`; resync blocks wait on it
    /// (`crate::resync::target`).
    target_ready: tokio::sync::watch::Sender<u64>,
}

impl Volume {
    /// A volume in its start-up state: Primary on a single node, else Secondary and Connecting;
    /// disk `Inconsistent` if an interrupted resync left it so, else `UpToDate`. Opens the
    /// dirty bitmap and activity log (laid out with `al` if the file has none yet) and, after a
    /// crash (no clean stop recorded), adds the log's extents to the bitmap (design.md §4). Blocks
    /// on metadata I/O: call at start.
    pub fn open(
        info: VolumeInfo,
        store: Store,
        meta: Meta,
        file: MetaFile,
        al: AlConfig,
    ) -> Result<Self, VolumeError> {
        let (areas, mut io) = file.open_areas(&meta, al).map_err(VolumeError::Metadata)?;
        let dirty = Dirty::open(&mut io, areas, meta.size, meta.granularity)
            .map_err(|e| VolumeError::DirtyLog(io::Error::other(e)))?;
        let track = track::Tracker::new(dirty, io);
        if !meta.flags.clean_shutdown {
            let added = track.recover_after_crash().map_err(VolumeError::DirtyLog)?;
            if added > 0 {
                tracing::warn!(volume = %info.name, bytes = added,
                    "not stopped cleanly: the activity log's extents are marked out of sync");
            }
        }
        let (live, moved_on) = state::Live::at_start(&info, &meta);
        Ok(Volume {
            info,
            store,
            locks: IntervalLocks::default(),
            counters: AtomicCounters::default(),
            clients: AtomicU32::new(0),
            live: Mutex::new(live),
            persisted: tokio::sync::Mutex::new(state::Persisted::new(file, meta)),
            moved_on: AtomicBool::new(moved_on),
            track,
            last_app_write: AtomicU64::new(0),
            opened: tokio::time::Instant::now(),
            fence: OnceLock::new(),
            target_ready: tokio::sync::watch::Sender::new(0),
        })
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// From now on, degraded writes are acknowledged only under `fence` (set once, at start).
    pub fn set_fence(&self, fence: Arc<Fence>) {
        if self.fence.set(fence).is_err() {
            tracing::warn!(volume = %self.name(), "fence already set; keeping the first");
        }
    }

    /// The volume's id on the replication link.
    pub fn index(&self) -> u16 {
        self.info.index
    }

    /// Size in bytes, as exported.
    pub fn size(&self) -> u64 {
        self.store.size()
    }

    /// The dirty bitmap's granularity and the activity log's shape, as the metadata fixed them.
    pub fn tracking(&self) -> (u32, crate::meta::AlConfig) {
        self.track.with(|d| (d.bitmap().granularity(), d.areas().al))
    }

    /// The backing's block size: requests aligned to it avoid read-modify-write.
    pub fn block_size(&self) -> u32 {
        self.store.block_size()
    }

    /// Ok when this node may serve the volume to NBD clients: it is Primary.
    pub fn check_serving(&self) -> Result<(), NotServing> {
        let live = self.live();
        match live.machine.role {
            Role::Primary => Ok(()),
            Role::Secondary => Err(NotServing::Secondary {
                volume: self.info.name.clone(),
                node: self.info.node.clone(),
                primary: (live.machine.peer_role == Some(Role::Primary))
                    .then(|| self.info.peer.clone())
                    .flatten(),
            }),
        }
    }

    /// Registers an NBD client, unless `max` are already connected. The count drops with the guard.
    pub fn add_client(self: &Arc<Self>, max: u32) -> Option<ClientGuard> {
        self.clients
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| ClientGuard(Arc::clone(self)))
    }

    /// Writes, zeroes and trims the peer has acknowledged (flushes are not counted).
    pub fn peer_writes(&self) -> u64 {
        self.counters.peer_writes.load(Ordering::Relaxed)
    }

    /// NBD clients connected now.
    pub fn clients(&self) -> u32 {
        self.clients.load(Ordering::Acquire)
    }

    /// Reads are served locally (design.md §3); from the peer once the local disk is `Failed`
    /// (DRBD's detach: the application sees no error while the peer is there).
    pub async fn read(&self, offset: u64, len: u32) -> Result<ReadBuf, VolumeError> {
        let start = Instant::now();
        self.check_range(offset, u64::from(len))?;
        let local = match self.detached() {
            false => self.io(DiskOp::Read, offset, self.store.read(offset, len).await).await,
            true => Err(self.failed_error()),
        };
        let buf = match local {
            Ok(buf) => buf,
            Err(e) => self.read_from_peer(offset, len).await.ok_or(e)?,
        };
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_read.fetch_add(u64::from(len), Ordering::Relaxed);
        self.counters.latency.read.record(start.elapsed());
        Ok(buf)
    }

    /// Writes `data` at `offset` here and on the peer; with `fua`, durably on both in the same
    /// one round trip: `RWF_DSYNC` here, `WriteFua` to the peer (which writes it the same way),
    /// not a write plus a flush of the whole device on both.
    pub async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), VolumeError> {
        let start = Instant::now();
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        self.mirrored(DiskOp::Write, offset, len, len, |mirror| {
            // One buffer for both: the local engine and the peer's frame only read it, and it
            // is freed when the later of the two lets go (no copy of the payload for the peer).
            let data = SharedBuf::from(data);
            let msg = mirror.then(|| match fua {
                true => Message::WriteFua { offset, data: data.bytes() },
                false => Message::Write { offset, data: data.bytes() },
            });
            (self.store.write_with(offset, data, fua), msg)
        })
        .await?;
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_written.fetch_add(len, Ordering::Relaxed);
        self.counters.latency.write.record(start.elapsed());
        Ok(())
    }

    /// Makes `offset..offset+len` read as zeroes, here and on the peer. `punch` allows
    /// deallocating (NBD without NO_HOLE); otherwise the range stays allocated.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        punch: bool,
        fua: bool,
    ) -> Result<(), VolumeError> {
        let start = Instant::now();
        self.check_range(offset, len)?;
        self.mirrored(DiskOp::WriteZeroes, offset, len, 0, |mirror| {
            let msg = mirror.then_some(Message::WriteZeroes { offset, len, punch });
            (self.store.write_zeroes(offset, len, punch), msg)
        })
        .await?;
        if fua {
            self.flush().await?;
        }
        self.counters.zeroes.fetch_add(1, Ordering::Relaxed);
        self.counters.latency.write_zeroes.record(start.elapsed());
        Ok(())
    }

    /// Discards `offset..offset+len` here and on the peer (a hint: contents are undefined
    /// until rewritten).
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        let start = Instant::now();
        self.check_range(offset, len)?;
        self.mirrored(DiskOp::Trim, offset, len, 0, |mirror| {
            (self.store.trim(offset, len), mirror.then_some(Message::Trim { offset, len }))
        })
        .await?;
        if fua {
            self.flush().await?;
        }
        self.counters.trims.fetch_add(1, Ordering::Relaxed);
        self.counters.latency.trim.record(start.elapsed());
        Ok(())
    }

    /// Returns once every write completed before the call is on stable storage here and, when
    /// connected, on the peer.
    pub async fn flush(&self) -> Result<(), VolumeError> {
        let start = Instant::now();
        if !self.flush_both().await? {
            self.fenced(None).await?;
        }
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        self.counters.latency.flush.record(start.elapsed());
        Ok(())
    }

    /// The store's flush and, when mirroring, the peer's, reported to the dirty tracking (what
    /// they cover may leave the activity log). False: the peer failed it, now degraded.
    async fn flush_both(&self) -> Result<bool, VolumeError> {
        let epoch = self.track.flush_started();
        let failed = self.detached();
        let route = self.route();
        let primary = route.is_ok();
        // A Secondary flushes its own store only (at shutdown, say); its peer flushes itself.
        let Some(session) = route.ok().flatten() else {
            if failed {
                // A Primary with neither its disk nor its peer cannot make anything durable; a
                // Secondary whose disk is Failed wrote nothing to it since: nothing to flush.
                return if primary { Err(self.failed_error()) } else { Ok(true) };
            }
            self.io(DiskOp::Flush, 0, self.store.flush().await).await?;
            self.track.flushed_here(epoch);
            return Ok(true);
        };
        let local = async {
            match failed {
                true => Ok(()),
                false => self.store.flush().await,
            }
        };
        // The peer's first, as for writes (`mirrored`).
        let (remote, local) = tokio::join!(self.call_peer(&session, Message::Flush), local);
        // A failed local flush fails the disk; the peer's copy is what counts then.
        let local = self.io(DiskOp::Flush, 0, local).await;
        let peer = self.peer_done(&session, remote).await?;
        if !peer && (failed || local.is_err()) {
            return Err(local.err().unwrap_or_else(|| self.failed_error()));
        }
        if peer {
            // What both acknowledged before this flush is durable on both now (or, with this
            // disk Failed, on the peer, which is the only copy that counts).
            self.track.flushed(epoch);
        }
        Ok(peer)
    }

    /// Waits until a write into `range` is covered by the dirty tracking (see
    /// [`track::Tracker::admit`]); a full log is flushed on demand. Returns whether it is wide.
    async fn admit(&self, range: std::ops::Range<u64>) -> Result<bool, VolumeError> {
        let flush = || async { self.flush_both().await.map(drop) };
        match self.track.admit(range, flush).await {
            Ok(wide) => Ok(wide),
            Err(track::AdmitError::Log(e)) => Err(self.dirty_log_failed(e)),
            Err(track::AdmitError::Flush(e)) => Err(e),
        }
    }

    /// Every write-type request: under the range lock, `prepare(mirroring)` gives the local
    /// operation and, when mirroring, the peer's request; both run together and the result
    /// comes once both are done. Without the peer, the local completion is acknowledged only
    /// after the new generation is on disk. `bytes` is the payload, for the counters.
    async fn mirrored<F>(
        &self,
        op: DiskOp,
        offset: u64,
        len: u64,
        bytes: u64,
        prepare: impl FnOnce(bool) -> (F, Option<Message>),
    ) -> Result<(), VolumeError>
    where
        F: std::future::Future<Output = io::Result<()>>,
    {
        let lock = self.locks.lock(self.store.lock_span(offset, len)).await;
        let session = self.route()?;
        self.note_app_write();
        let range = offset..offset + len;
        // Single node: there is no peer to differ from, so nothing to track.
        let tracked = self.info.peer.is_some();
        let wide = match tracked {
            true => self.admit(range.clone()).await?,
            false => false,
        };
        let pinned = tracked && !wide;
        let admitted = Admitted { track: &self.track, range: range.clone(), pinned, wide };
        let failed = self.detached();
        let (local, msg) = prepare(session.is_some());
        let Some((session, msg)) = session.zip(msg) else {
            let done = match failed {
                true => Err(self.failed_error()),
                false => self.io(op, offset, local.await).await,
            };
            if tracked {
                // Done here, or maybe partly (an error): may differ from the peer either way.
                self.mark(range.clone()).await?;
            }
            done?;
            self.degraded_write().await?;
            // Done and marked here: the range is free for others (a resync) while it waits.
            drop((admitted, lock));
            return self.fenced(Some(range)).await;
        };
        // A Failed disk is not written any more: the peer's copy is the only one.
        let local = async move { (!failed).then_some(local.await) };
        // The peer's request is polled first, so it is on the wire before the local submit
        // (an `io_uring_enter` that kicks the disk): the peer's path is the longer one.
        let (remote, local) = tokio::join!(self.call_peer(&session, msg), local);
        let local = match local {
            Some(r) => self.io(op, offset, r).await.err(),
            None => Some(self.failed_error()),
        };
        if let Some(err) = local {
            return self.local_failed(&session, remote, range, bytes, err).await;
        }
        if self.peer_done(&session, remote).await? {
            if let Some(f) = self.fence.get() {
                f.mirroring(self.index());
            }
            self.count_peer_write(bytes);
            let acked = self.track.acked(range.clone(), || session.is_open()).await;
            acked.map_err(|e| self.dirty_log_failed(e))?;
            if wide {
                // Marked on disk before it started; both nodes have it, not yet durably.
                self.track.wide_done(range);
            }
        } else {
            self.mark(range.clone()).await?;
            drop((admitted, lock));
            self.fenced(Some(range)).await?;
        }
        Ok(())
    }

    /// The peer acknowledged a write of `bytes` payload bytes.
    fn count_peer_write(&self, bytes: u64) {
        self.counters.peer_writes.fetch_add(1, Ordering::Relaxed);
        self.counters.peer_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A degraded request is done here (and a write's `range` marked out of sync): returns when
    /// it may be acknowledged under the witness fence (table in `crate::fence`); without a
    /// witness, at once.
    async fn fenced(&self, range: Option<std::ops::Range<u64>>) -> Result<(), VolumeError> {
        let Some(fence) = self.fence.get().filter(|_| self.info.peer.is_some()) else {
            return Ok(());
        };
        let now = tokio::time::Instant::now();
        let since = Some(fence.went_degraded(now));
        if fence.valid_since(since, now).is_some() {
            return Ok(());
        }
        tracing::debug!(volume = %self.name(), "degraded request waits for the witness lease");
        let cleared = fence
            .wait(since, || {
                if self.live().machine.role != Role::Primary {
                    return Some(Err(VolumeError::NotPrimary));
                }
                let copied = range
                    .as_ref()
                    .is_some_and(|r| !self.track.with(|d| d.bitmap().test(r.clone())));
                copied.then_some(Ok(()))
            })
            .await;
        match cleared {
            Cleared::Lease(_) => Ok(()),
            Cleared::Other(r) => r,
            Cleared::Lost(epoch) => Err(VolumeError::Fenced { epoch }),
        }
    }

    /// `range` may differ from the peer: recorded so that it survives a crash.
    async fn mark(&self, range: std::ops::Range<u64>) -> Result<(), VolumeError> {
        self.track.mark(range).await.map_err(|e| self.dirty_log_failed(e))
    }

    /// The invariant can no longer be kept: the disk is `Failed` (nothing more is written).
    fn dirty_log_failed(&self, e: io::Error) -> VolumeError {
        let errno = crate::errno::raw(&e);
        let err = VolumeError::DirtyLog(e);
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        // In memory only: the metadata file is what failed (and the caller may hold its lock).
        self.disk_failed(DiskFailure { op: DiskOp::Metadata, errno, offset: 0 }, &err);
        err
    }

    fn note_app_write(&self) {
        let now = self.opened.elapsed().as_micros() as u64;
        self.last_app_write.store(now.max(1), Ordering::Relaxed);
    }

    /// An application write started within `window`.
    pub(super) fn app_busy(&self, window: std::time::Duration) -> bool {
        let last = self.last_app_write.load(Ordering::Relaxed);
        let now = self.opened.elapsed().as_micros() as u64;
        last != 0 && now.saturating_sub(last) < window.as_micros() as u64
    }

    /// Writes the changed dirty-bitmap pages back (at a clean stop, after a resync).
    pub async fn flush_bitmap(&self) -> Result<(), VolumeError> {
        self.track.flush().await.map_err(|e| self.dirty_log_failed(e))
    }

    /// Bytes this node's dirty bitmap marks.
    pub fn dirty_bytes(&self) -> u64 {
        self.track.dirty_bytes()
    }

    /// The operator's `blockctl resolve` for the next handshake.
    pub fn resolve(&self) -> Resolve {
        self.live().resolve
    }

    pub fn set_resolve(&self, r: Resolve) {
        self.live().resolve = r;
    }

    pub fn status(&self) -> VolumeStatus {
        let live = self.live();
        let gens = live.gens.current;
        VolumeStatus {
            name: self.info.name.clone(),
            size: self.size(),
            role: live.machine.role,
            disk: live.machine.disk,
            disk_failure: live.failure,
            clients: self.clients.load(Ordering::Relaxed),
            socket: self.info.socket.display().to_string(),
            backing: self.info.backing.display().to_string(),
            engine: self.store.engine_name().to_string(),
            direct_io: self.store.is_direct(),
            conn: live.machine.conn,
            conn_reason: live.reason.clone(),
            split_brain: live.split_brain,
            peer: self.info.peer.clone(),
            peer_role: live.machine.peer_role,
            peer_disk: live.peer_disk,
            out_of_sync: live.out_of_sync(self.size(), self.track.dirty_bytes()),
            resync: live.resync.as_ref().map(crate::resync::Progress::report),
            generation: format!("{gens:016x}"),
            counters: self.counters.snapshot(self.track.meta_writes()),
            frozen: self.frozen(&live),
            lease: self.fence.get().map(|f| f.status(&self.info.node, tokio::time::Instant::now())),
            latency: self.counters.latency.snapshot(),
        }
    }

    /// Why degraded writes would wait now: a Primary that is not mirroring, without a valid
    /// lease (only with a witness).
    fn frozen(&self, live: &state::Live) -> Option<String> {
        let fence = self.fence.get().filter(|_| self.info.peer.is_some())?;
        let mirroring = matches!(live.machine.conn, ConnState::Connected | ConnState::SyncSource)
            && live.session.as_ref().is_some_and(|s| s.is_open());
        if live.machine.role != Role::Primary || (mirroring && fence.waiting() == 0) {
            return None;
        }
        fence.frozen_reason(tokio::time::Instant::now())
    }

    /// The role machine's state now.
    pub fn machine(&self) -> role::State {
        self.live().machine
    }

    fn live(&self) -> MutexGuard<'_, state::Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Overflow-safe bounds check (NBD-NOTES §2.6): `offset + len` is never computed.
    fn check_range(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        let size = self.size();
        if offset > size || len > size - offset {
            return Err(VolumeError::OutOfRange { offset, len, size });
        }
        Ok(())
    }
}

/// Unpins an admitted write's extents when the write is over, whatever its outcome.
struct Admitted<'a> {
    track: &'a track::Tracker,
    range: std::ops::Range<u64>,
    pinned: bool,
    wide: bool,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if self.pinned {
            self.track.done(self.range.clone());
        }
        if self.wide {
            self.track.wide_release(&self.range);
        }
    }
}

/// Holds one of a volume's client slots.
#[derive(Debug)]
pub struct ClientGuard(Arc<Volume>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
#[path = "fence_tests.rs"]
mod fence_tests;

#[cfg(test)]
mod tests;
