//! The write path's side of design.md §4: which ranges may differ from the peer, kept durable by
//! [`meta::Dirty`](crate::meta::Dirty) before any write that could make them differ.
//!
//! ```text
//!  write(r) ─► admit(r) ─┬─ hot extent ─────────────────────────────► go (costs a map lookup)
//!                        ├─ miss: AL transaction (+ victims' pages) ─► commit, in seq order ─► go
//!                        └─ wide (> ¼ of the log): bits of r on disk ─────────────────────────► go
//!            ... local + peer ...
//!  peer failed or absent ─► mark(r)    (memory while r's extents are hot; else its pages on disk)
//!  peer acked ─► transfer log += r     (until the peer's next FLUSH completes; a session
//!                                       already gone marks r instead)
//!  done(r) ─► extents unpinned, tagged with the flush epoch they completed in
//!  flush done on both nodes ─► extents whose writes it covers may be evicted (pages written
//!                              first); wide writes it covers have their bits cleared
//!  log full, only unflushed extents ─► flush on demand (local store + peer), then retry
//!  link lost ─► every range of the transfer log is marked: acked but maybe not durable there
//! ```
//!
//! Why an extent waits for a flush on BOTH nodes (DRBD's `al_complete_io` after the barrier
//! ack): a completed write may sit in a device's volatile cache on either node; a power cut
//! loses it there only, and the replicas then differ where neither bitmap nor log says so. A
//! flush on both that started after the write completed makes it durable everywhere, so the
//! primary's own data is durable before an eviction is recorded, too. Degraded (no session), a
//! local flush covers the log once the transfer log is empty: every write that reached the peer
//! unflushed is marked by then, and marks survive eviction (their pages are written first).
//! A single node keeps no log at all: there is no replica to differ from.
//!
//! Metadata writes are applied one at a time in the order [`Dirty`] issued them (its contract),
//! by whichever waiting task holds the I/O lock; the others queue on that lock. They block (a
//! pwrite and an fdatasync or two) and run on the blocking pool. A failed metadata write means
//! the invariant can no longer be promised: the disk goes `Failed` and writes stop.
//!
//! Only a Primary admits writes through here; a Secondary applies what its Primary sends and
//! keeps no log: the Primary's log already covers every write in flight on both nodes.

use std::{
    collections::{BTreeMap, VecDeque},
    future::Future,
    io,
    ops::Range,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::Notify;

use super::wide::WideWrites;
use crate::meta::{Admit, Dirty, FileIo, MetaIo, MetaWrite};

/// Why the dirty tracking failed; the volume reports it as [`super::VolumeError::DirtyLog`].
pub(super) type TrackResult<T> = Result<T, io::Error>;

#[derive(Debug)]
struct Inner {
    dirty: Dirty,
    /// Issued MetaWrites not yet applied, by seq (issued under the same lock, so a committer
    /// always finds the next one here).
    queue: BTreeMap<u64, MetaWrite>,
    /// Ranges the peer acknowledged since the start of the last completed peer flush, tagged
    /// with the flush epoch they belong to.
    transfer: VecDeque<(u64, Range<u64>)>,
    epoch: u64,
    /// The newest epoch whose flush covered the log (both nodes, or degraded with nothing
    /// in the transfer log): lets concurrent on-demand flushes coalesce.
    covered: u64,
    /// Wide writes in flight and done: their bits are cleared only once a flush on both covers
    /// them (until then a power cut may lose them on one node); a mark keeps its granules.
    wide: WideWrites,
    /// Set once a metadata write failed: nothing may be admitted any more.
    broken: bool,
}

/// Dirty bitmap + activity log of one volume, and the order their writes reach the disk in.
#[derive(Debug)]
pub(super) struct Tracker {
    inner: Mutex<Inner>,
    io: tokio::sync::Mutex<IoSlot>,
    /// A write finished or a flush covered the log: extents may have become evictable.
    freed: Notify,
    /// One on-demand flush at a time; the others wait for it and use its result.
    log_flush: tokio::sync::Mutex<()>,
    /// The extents a crash recovery added to the bitmap (in this process's life): they may
    /// well be identical on the peer, so a resync compares checksums there first.
    crash: Mutex<Vec<Range<u64>>>,
    /// Counts marks (bits set because a range may differ): a resync clears the ranges it
    /// copied only if no mark happened since it copied them.
    marks: std::sync::atomic::AtomicU64,
    /// MetaWrites made durable (status counter `meta_writes`).
    applied: std::sync::atomic::AtomicU64,
}

impl Tracker {
    pub fn new(dirty: Dirty, io: FileIo) -> Tracker {
        Tracker {
            inner: Mutex::new(Inner {
                dirty,
                queue: BTreeMap::new(),
                transfer: VecDeque::new(),
                epoch: 0,
                covered: 0,
                wide: WideWrites::default(),
                broken: false,
            }),
            io: tokio::sync::Mutex::new(IoSlot { file: Arc::new(Mutex::new(io)), running: None }),
            freed: Notify::new(),
            log_flush: tokio::sync::Mutex::new(()),
            crash: Mutex::new(Vec::new()),
            marks: std::sync::atomic::AtomicU64::new(0),
            applied: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads or changes the bitmap and log under their lock (never across an await).
    pub fn with<T>(&self, f: impl FnOnce(&mut Dirty) -> T) -> T {
        f(&mut self.inner().dirty)
    }

    /// Waits until a write into `range` is covered on disk (design.md §4), pinning its extents
    /// until [`done`](Self::done). Returns whether the range was "wide" (marked in the bitmap
    /// instead of the log; `done` is then a no-op and the caller hands it to
    /// [`wide_done`](Self::wide_done) once both nodes have the write). When the log is full of
    /// extents that only wait for a flush, `flush` (local store + peer) runs on demand.
    pub async fn admit<E, Fut>(
        &self,
        range: Range<u64>,
        flush: impl Fn() -> Fut,
    ) -> Result<bool, AdmitError<E>>
    where
        Fut: Future<Output = Result<(), E>>,
    {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let (admit, wide) = self.try_admit(range.clone()).map_err(AdmitError::Log)?;
            match admit {
                Step::Go => return Ok(wide),
                Step::After(seq) => {
                    self.commit(seq).await.map_err(AdmitError::Log)?;
                    return Ok(wide);
                }
                Step::Busy { flush_helps: true, covered } => {
                    if !self.flush_on_demand(covered, &flush).await.map_err(AdmitError::Flush)? {
                        freed.await; // the flush covered nothing (peer lost): wait for that
                    }
                }
                // Every hot extent has a write in flight: wait for one to finish.
                Step::Busy { flush_helps: false, .. } => freed.await,
            }
        }
    }

    /// One attempt of [`admit`](Self::admit), under the lock. The bool: the range is wide.
    fn try_admit(&self, range: Range<u64>) -> TrackResult<(Step, bool)> {
        let mut inner = self.inner();
        if inner.broken {
            return Err(broken());
        }
        if inner.dirty.is_wide(range.clone()) {
            let Inner { dirty, wide, .. } = &mut *inner;
            let g = u64::from(dirty.bitmap().granularity());
            wide.admit(range.clone(), g, |gr| dirty.bitmap().test(gr));
            self.marks.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            // Its own claim keeps other wide writes from taking these bits back early.
            let mw = inner.dirty.mark_out_of_sync(range);
            let step = mw.map_or(Step::Go, |mw| Step::After(Self::enqueue(&mut inner, mw)));
            return Ok((step, true));
        }
        let step = match inner.dirty.before_write(range).map_err(io::Error::other)? {
            Admit::Go => Step::Go,
            Admit::Persist(mw) => Step::After(Self::enqueue(&mut inner, mw)),
            Admit::After(seq) => Step::After(seq),
            Admit::Busy => {
                Step::Busy { flush_helps: inner.dirty.waits_for_flush(), covered: inner.covered }
            }
        };
        Ok((step, false))
    }

    /// Runs `flush` unless another on-demand flush covered the log since `covered` was read.
    /// Returns whether the log is covered further than `covered` now.
    async fn flush_on_demand<E, Fut>(
        &self,
        covered: u64,
        flush: &impl Fn() -> Fut,
    ) -> Result<bool, E>
    where
        Fut: Future<Output = Result<(), E>>,
    {
        let _one = self.log_flush.lock().await;
        if self.inner().covered == covered {
            flush().await?;
        }
        Ok(self.inner().covered > covered)
    }

    /// A write admitted by [`admit`](Self::admit) (not wide) finished on every node it went to,
    /// or was marked: its extents may be evicted once a flush on both nodes covers it.
    pub fn done(&self, range: Range<u64>) {
        let mut inner = self.inner();
        let epoch = inner.epoch;
        inner.dirty.write_done(range, epoch);
        drop(inner);
        self.freed.notify_waiters();
    }

    /// A wide write reached both nodes: its bits are cleared once a flush on both covers it.
    pub fn wide_done(&self, range: Range<u64>) {
        let mut inner = self.inner();
        let epoch = inner.epoch;
        inner.wide.done(&range, epoch);
    }

    /// A wide write ended, done or not: if not done, its bits stay (it claims nothing more).
    pub fn wide_release(&self, range: &Range<u64>) {
        self.inner().wide.release(range);
    }

    /// `range` may differ from the peer. Returns once that survives a crash.
    pub async fn mark(&self, range: Range<u64>) -> TrackResult<()> {
        self.marks.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let seq = {
            let mut inner = self.inner();
            match Self::mark_locked(&mut inner, range) {
                Some(mw) => Self::enqueue(&mut inner, mw),
                None => return Ok(()),
            }
        };
        self.commit(seq).await
    }

    /// Sets `range`'s bits; no wide write takes its granules' bits back (the mark must outlive
    /// them). The MetaWrite, if any, makes the mark durable.
    fn mark_locked(inner: &mut Inner, range: Range<u64>) -> Option<MetaWrite> {
        let g = u64::from(inner.dirty.bitmap().granularity());
        inner.wide.marked(&range, g);
        inner.dirty.mark_out_of_sync(range)
    }

    /// `range` is the same on both nodes now (a resync copied it). In memory; [`flush`](Self::flush) writes it back, and losing it only overstates.
    pub fn clear(&self, range: Range<u64>) {
        self.inner().dirty.clear_synced(range);
    }

    /// How many marks happened so far (see the `marks` field).
    pub fn marks(&self) -> u64 {
        self.marks.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Writes the changed bitmap pages back.
    pub async fn flush(&self) -> TrackResult<()> {
        let seq = {
            let mut inner = self.inner();
            match inner.dirty.flush() {
                Some(mw) => Self::enqueue(&mut inner, mw),
                None => return Ok(()),
            }
        };
        self.commit(seq).await
    }

    /// Demoted: see [`Dirty::retire_log`].
    pub async fn retire(&self) -> TrackResult<()> {
        let seq = {
            let mut inner = self.inner();
            match inner.dirty.retire_log() {
                Some(mw) => Self::enqueue(&mut inner, mw),
                None => return Ok(()),
            }
        };
        self.commit(seq).await
    }

    /// After a crash of this node while Primary: the log's extents join the bitmap (blocking;
    /// at start, before anything is served). Returns the bytes they added.
    pub fn recover_after_crash(&self) -> TrackResult<u64> {
        let mut inner = self.inner();
        let before = inner.dirty.dirty_bytes();
        let size = inner.dirty.areas().al.extent_size;
        let hot: Vec<Range<u64>> =
            inner.dirty.hot_extents().into_iter().map(|e| e * size..(e + 1) * size).collect();
        let Some(mw) = inner.dirty.after_crash_of_primary() else {
            return Ok(0);
        };
        let seq = mw.seq();
        {
            let io = self.io.try_lock().map_err(|_| io::Error::other("metadata busy at start"))?;
            let mut file = io.file.lock().unwrap_or_else(|p| p.into_inner());
            mw.apply(&mut *file)?;
        }
        inner.dirty.persisted(seq).map_err(io::Error::other)?;
        *self.crash.lock().unwrap_or_else(|p| p.into_inner()) = hot;
        Ok(inner.dirty.dirty_bytes() - before)
    }

    /// See the `crash` field.
    pub fn crash_ranges(&self) -> Vec<Range<u64>> {
        self.crash.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A resync made the crash's ranges equal on both nodes.
    pub fn forget_crash(&self) {
        self.crash.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// MetaWrites made durable so far.
    pub fn meta_writes(&self) -> u64 {
        self.applied.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes marked out of sync.
    pub fn dirty_bytes(&self) -> u64 {
        self.inner().dirty.dirty_bytes()
    }

    /// The peer acknowledged a write into `range` (not yet durable there until its next
    /// flush, which the node asks for at least once a second while writes happen). `open`
    /// tells whether the session is still up: once it is gone, [`link_lost`](Self::link_lost)
    /// may have drained the transfer log already, so the range is marked instead.
    pub async fn acked(&self, range: Range<u64>, open: impl FnOnce() -> bool) -> TrackResult<()> {
        {
            let mut inner = self.inner();
            // Checked under the lock link_lost drains under: an open session here means the
            // drain (which runs after the session closed) is still to come.
            if open() {
                let epoch = inner.epoch;
                inner.transfer.push_back((epoch, range));
                return Ok(());
            }
        }
        self.mark(range).await
    }

    /// A flush (of the peer, the store, or both) starts: returns its epoch for
    /// [`flushed`](Self::flushed) or [`flushed_here`](Self::flushed_here).
    pub fn flush_started(&self) -> u64 {
        let mut inner = self.inner();
        inner.epoch += 1;
        inner.epoch
    }

    /// The flush of `epoch` completed on both nodes: what was acknowledged and completed before
    /// it started is durable on both. The transfer log forgets it, the log's extents may go,
    /// and covered wide writes' bits are cleared.
    pub fn flushed(&self, epoch: u64) {
        let mut inner = self.inner();
        while inner.transfer.front().is_some_and(|(e, _)| *e < epoch) {
            inner.transfer.pop_front();
        }
        for r in inner.wide.covered(epoch) {
            inner.dirty.clear_synced(r);
        }
        Self::cover(&mut inner, epoch);
        drop(inner);
        self.freed.notify_waiters();
    }

    /// The flush of `epoch` completed here, with no session: it covers the log only once the
    /// transfer log is empty (everything the peer acknowledged unflushed is marked by then).
    pub fn flushed_here(&self, epoch: u64) {
        let mut inner = self.inner();
        if inner.transfer.is_empty() {
            Self::cover(&mut inner, epoch);
            drop(inner);
            self.freed.notify_waiters();
        }
    }

    fn cover(inner: &mut Inner, epoch: u64) {
        inner.dirty.data_flushed(epoch);
        inner.covered = inner.covered.max(epoch);
    }

    /// The link is gone: every acknowledged range the peer may not have made durable becomes
    /// out of sync (design.md §3's transfer log). Drained and marked under one lock, so that no
    /// eviction in between writes the pages without those bits.
    pub async fn link_lost(&self) -> TrackResult<()> {
        let last = {
            let mut inner = self.inner();
            let ranges: Vec<Range<u64>> = inner.transfer.drain(..).map(|(_, r)| r).collect();
            let mut last = None;
            for r in coalesce(ranges) {
                self.marks.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                if let Some(mw) = Self::mark_locked(&mut inner, r) {
                    last = Some(Self::enqueue(&mut inner, mw));
                }
            }
            // Wide writes not covered by a flush on both: their bits stay.
            inner.wide.link_lost();
            last
        };
        self.freed.notify_waiters();
        match last {
            Some(seq) => self.commit(seq).await,
            None => Ok(()),
        }
    }

    fn enqueue(inner: &mut Inner, mw: MetaWrite) -> u64 {
        let seq = mw.seq();
        inner.queue.insert(seq, mw);
        seq
    }

    /// Returns once MetaWrite `seq` is durable, applying queued ones in order meanwhile.
    /// Cancel-safe: a caller dropped while its write is being applied (a resync stopped by
    /// its peer's death, say) leaves the write in `running`, and the next holder of the I/O
    /// lock completes its bookkeeping, so the next write is not "out of order".
    async fn commit(&self, seq: u64) -> TrackResult<()> {
        // Whoever holds the I/O lock applies everything queued; a later holder finds its own
        // write already applied, or applies what is left.
        let mut io = self.io.lock().await;
        loop {
            if let Some((s, handle)) = io.running.as_mut() {
                let s = *s;
                let applied = handle.await.map_err(io::Error::other).and_then(|r| r);
                io.running = None;
                let mut inner = self.inner();
                let persisted =
                    applied.and_then(|()| inner.dirty.persisted(s).map_err(io::Error::other));
                if let Err(e) = persisted {
                    inner.broken = true;
                    return Err(e);
                }
                self.applied.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let next = {
                let mut inner = self.inner();
                if inner.dirty.durable() >= seq {
                    return Ok(());
                }
                if inner.broken {
                    return Err(broken());
                }
                inner.queue.pop_first()
            };
            let Some((s, mw)) = next else {
                return Err(io::Error::other(format!("metadata write {seq} was never queued")));
            };
            let file = Arc::clone(&io.file);
            let handle = spawn_meta(move || {
                let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
                mw.apply(&mut *file as &mut dyn MetaIo)
            });
            io.running = Some((s, handle));
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Set by the simulator (`crate::sim`) on its threads: metadata writes run as ordinary
    /// tasks, so a schedule's order of events never depends on the blocking pool's threads.
    pub(crate) static META_INLINE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs a metadata write on the blocking pool (in the simulator: see [`META_INLINE`]).
pub(super) fn spawn_meta<F, T>(f: F) -> tokio::task::JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    #[cfg(test)]
    if META_INLINE.with(std::cell::Cell::get) {
        return tokio::spawn(async move { f() });
    }
    tokio::task::spawn_blocking(f)
}

/// The metadata file, and the write being applied to it on the blocking pool (if any): kept
/// under the I/O lock so that its completion is accounted even if its caller went away.
#[derive(Debug)]
struct IoSlot {
    file: Arc<Mutex<FileIo>>,
    running: Option<(u64, tokio::task::JoinHandle<io::Result<()>>)>,
}

/// One attempt to admit a write.
enum Step {
    Go,
    /// Once MetaWrite `seq` is durable.
    After(u64),
    /// The log is full; `flush_helps` when some extent only waits for a flush. `covered`: the
    /// flush epoch that covered the log when this was decided.
    Busy {
        flush_helps: bool,
        covered: u64,
    },
}

/// Why [`Tracker::admit`] failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum AdmitError<E> {
    #[error("dirty bitmap / activity log")]
    Log(#[source] io::Error),
    #[error("flush on demand of a full activity log")]
    Flush(#[source] E),
}

fn broken() -> io::Error {
    io::Error::other("an earlier dirty-bitmap or activity-log write failed")
}

/// Sorted, merged ranges (overlapping or touching).
fn coalesce(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{AlConfig, MetaFile};

    const SIZE: u64 = 64 << 20;

    fn open(dir: &tempfile::TempDir, created: bool) -> Tracker {
        let path = dir.path().join("v.meta");
        let (file, meta) = MetaFile::open_or_create(&path, SIZE, "alpha", created).unwrap();
        let (areas, mut io) = file.open_areas(&meta, AlConfig::default()).unwrap();
        Tracker::new(Dirty::open(&mut io, areas, SIZE, meta.granularity).unwrap(), io)
    }

    fn dirty(t: &Tracker) -> Vec<Range<u64>> {
        t.with(|d| d.ranges_from(0).collect())
    }

    /// design.md §3's transfer log: a peer ack is "written", not "durable". When the link is lost,
    /// every range acknowledged since the start of the last completed peer flush becomes out of
    /// sync, on disk; what that flush covered does not.
    #[tokio::test]
    async fn link_loss_marks_what_the_peer_acked_since_its_last_completed_flush() {
        let dir = tempfile::tempdir().unwrap();
        let t = open(&dir, true);
        t.acked(0..4096, up).await.unwrap(); // covered by the flush below
        let epoch = t.flush_started();
        t.acked(8192..12288, up).await.unwrap(); // acknowledged while the flush runs
        t.flushed(epoch);
        t.acked(1 << 20..(1 << 20) + 4096, up).await.unwrap();
        assert!(dirty(&t).is_empty(), "acks alone mark nothing");
        t.link_lost().await.unwrap();
        let want = vec![8192..12288, 1 << 20..(1 << 20) + 4096];
        assert_eq!(dirty(&t), want);
        drop(t);
        assert_eq!(dirty(&open(&dir, false)), want, "the marks are on disk");
    }

    /// Finding 3 of issue 17: a resync whose peer died was dropped while its bitmap write was
    /// on the blocking pool; that write's completion was never accounted, so the next metadata
    /// write was "out of order" and failed a healthy disk. A dropped commit must not break the
    /// next one.
    #[tokio::test]
    async fn a_commit_dropped_while_applying_does_not_break_the_next_one() {
        use futures::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let t = open(&dir, true);
        let file = Arc::clone(&t.io.lock().await.file);
        {
            // Holds the file: the first write's apply blocks until the caller is gone.
            let _held = file.lock().unwrap();
            assert!(t.mark(0..4096).now_or_never().is_none(), "the apply must be pending");
        }
        t.mark(32 << 20..(32 << 20) + 4096).await.unwrap();
        t.flush().await.unwrap();
        let want = vec![0..4096, 32 << 20..(32 << 20) + 4096];
        assert_eq!(dirty(&t), want);
        drop(t);
        assert_eq!(dirty(&open(&dir, false)), want, "both marks are on disk");
    }

    fn up() -> bool {
        true
    }

    /// A log of `extents` 1 MiB extents (the shape is fixed when `created`).
    fn small(dir: &tempfile::TempDir, created: bool, extents: u32) -> Tracker {
        let path = dir.path().join("v.meta");
        let (file, meta) = MetaFile::open_or_create(&path, SIZE, "alpha", created).unwrap();
        let cfg = AlConfig { extent_size: 1 << 20, extents };
        let (areas, mut io) = file.open_areas(&meta, cfg).unwrap();
        Tracker::new(Dirty::open(&mut io, areas, SIZE, meta.granularity).unwrap(), io)
    }

    /// Issue 17: an ack that arrives after `link_lost` drained the transfer log (the session
    /// died meanwhile) must mark its range, not land in a log nobody drains any more.
    #[tokio::test]
    async fn an_ack_of_a_dead_session_marks_its_range() {
        let dir = tempfile::tempdir().unwrap();
        let t = open(&dir, true);
        t.link_lost().await.unwrap();
        t.acked(4096..8192, || false).await.unwrap();
        assert_eq!(dirty(&t), vec![4096..8192], "marked at once");
        t.link_lost().await.unwrap();
        drop(t);
        assert_eq!(dirty(&open(&dir, false)), vec![4096..8192], "and on disk");
    }

    /// DRBD's rule through the tracker: a completed write keeps its extent in the log until a
    /// flush on both nodes covers it; a full log of such extents flushes on demand, and the
    /// writers waiting for room share one flush.
    #[tokio::test]
    async fn a_full_log_flushes_on_demand_before_it_evicts() {
        let dir = tempfile::tempdir().unwrap();
        let t = small(&dir, true, 1);
        let flushes = std::sync::atomic::AtomicU32::new(0);
        let flush = || async {
            flushes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let epoch = t.flush_started();
            t.flushed(epoch);
            Ok::<(), io::Error>(())
        };
        assert!(!t.admit(0..4096, flush).await.unwrap());
        t.done(0..4096);
        assert_eq!(flushes.load(std::sync::atomic::Ordering::Relaxed), 0);
        // Extent 0's write is unflushed: extent 1 may only replace it after a flush.
        t.admit(1 << 20..(1 << 20) + 4096, flush).await.unwrap();
        assert_eq!(flushes.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(t.with(|d| d.hot_extents()), vec![1]);
        t.done(1 << 20..(1 << 20) + 4096);
        // A flush that did not cover (the peer failed it) is not taken for one: the writer
        // waits, here for a flush some other task completes.
        let none = || async { Ok::<(), io::Error>(()) };
        let blocked = t.admit(0..4096, none);
        tokio::pin!(blocked);
        assert!(futures::poll!(blocked.as_mut()).is_pending());
        let epoch = t.flush_started();
        t.flushed(epoch);
        blocked.await.unwrap();
        assert_eq!(t.with(|d| d.hot_extents()), vec![0]);
    }

    /// Degraded, a local flush covers the log only once the transfer log is empty.
    #[tokio::test]
    async fn a_local_flush_covers_the_log_only_without_unmarked_acks() {
        let dir = tempfile::tempdir().unwrap();
        let t = small(&dir, true, 1);
        let never = || async { Err::<(), _>(io::Error::other("no flush expected")) };
        t.admit(0..4096, never).await.unwrap();
        t.acked(0..4096, up).await.unwrap();
        t.done(0..4096);
        let epoch = t.flush_started();
        t.flushed_here(epoch);
        assert!(t.with(|d| d.waits_for_flush()), "the peer may not have it durably");
        t.link_lost().await.unwrap(); // marks it
        let epoch = t.flush_started();
        t.flushed_here(epoch);
        assert!(!t.with(|d| d.waits_for_flush()));
        t.admit(1 << 20..(1 << 20) + 1, never).await.unwrap();
        drop(t); // a crash: only what is on disk is left
        assert_eq!(dirty(&small(&dir, false, 1)), vec![0..4096], "the mark went to disk");
    }

    /// Issue 17: a wide write's bits (its durable mark) stay until a flush on both nodes covers
    /// it, and a mark overlapping it in between keeps its own for good.
    #[tokio::test]
    async fn a_wide_write_is_cleared_only_after_a_flush_on_both_covers_it() {
        let dir = tempfile::tempdir().unwrap();
        let t = small(&dir, true, 4);
        let never = || async { Err::<(), _>(io::Error::other("no flush expected")) };
        let wide = 0..(3 << 20);
        assert!(t.admit(wide.clone(), never).await.unwrap(), "wide: over a quarter of the log");
        t.wide_done(wide.clone());
        t.flush().await.unwrap(); // a bitmap write-back while the data is not durable
        drop(t); // a power cut
        let t = small(&dir, false, 4);
        assert_eq!(dirty(&t), vec![wide.clone()], "its mark survived");
        assert!(t.admit(wide.clone(), never).await.unwrap());
        let epoch = t.flush_started();
        t.wide_done(wide.clone());
        t.flushed(epoch);
        assert_eq!(dirty(&t), vec![wide.clone()], "that flush started before it completed");
        let epoch = t.flush_started();
        t.flushed(epoch);
        assert!(dirty(&t).is_empty(), "covered on both: cleared");
        assert!(t.admit(wide.clone(), never).await.unwrap());
        t.wide_done(wide.clone());
        t.mark(4096..8192).await.unwrap();
        let epoch = t.flush_started();
        t.flushed(epoch);
        assert_eq!(dirty(&t), vec![4096..8192], "a mark in between keeps its bits");
    }

    /// A wide write with edges inside granules (ext4 with 1 KiB blocks): once covered, no
    /// bit is left (the edge granules stayed marked for good before: out of sync while
    /// Connected, and no resync to clear them).
    #[tokio::test]
    async fn an_unaligned_wide_write_leaves_no_bit_once_covered() {
        let dir = tempfile::tempdir().unwrap();
        let t = small(&dir, true, 4);
        let never = || async { Err::<(), _>(io::Error::other("no flush expected")) };
        let wide = 1024..(3 << 20) + 1024;
        assert!(t.admit(wide.clone(), never).await.unwrap());
        t.wide_done(wide.clone());
        t.wide_release(&wide);
        let epoch = t.flush_started();
        t.flushed(epoch);
        assert!(dirty(&t).is_empty(), "left marked: {:?}", dirty(&t));
    }

    #[test]
    fn coalesce_merges_overlapping_and_touching() {
        assert_eq!(coalesce(vec![10..20, 0..5, 5..8, 15..30, 40..41]), vec![0..8, 10..30, 40..41]);
        assert!(coalesce(vec![]).is_empty());
    }
}
