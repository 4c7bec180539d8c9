//! The write path's side of DESIGN §4: which ranges may differ from the peer, kept durable by
//! [`meta::Dirty`](crate::meta::Dirty) before any write that could make them differ.
//!
//! ```text
//!  write(r) ─► admit(r) ─┬─ hot extent ─────────────────────────────► go (costs a map lookup)
//!                        ├─ miss: AL transaction (+ victims' pages) ─► commit, in seq order ─► go
//!                        └─ wide (> ¼ of the log): bits of r on disk ─────────────────────────► go
//!            ... local + peer ...
//!  peer failed or absent ─► mark(r)    (memory while r's extents are hot; else its pages on disk)
//!  peer acked ─► transfer log += r     (until the peer's next FLUSH completes)
//!  done(r) ─► extents unpinned (may be evicted: their pages are written first)
//!  link lost ─► every range of the transfer log is marked: acked but maybe not durable there
//! ```
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
    io,
    ops::Range,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::Notify;

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
    /// Set once a metadata write failed: nothing may be admitted any more.
    broken: bool,
}

/// Dirty bitmap + activity log of one volume, and the order their writes reach the disk in.
#[derive(Debug)]
pub(super) struct Tracker {
    inner: Mutex<Inner>,
    io: tokio::sync::Mutex<IoSlot>,
    /// A write finished: extents may have become evictable.
    freed: Notify,
    /// The extents a crash recovery added to the bitmap (in this process's life): they may
    /// well be identical on the peer, so a resync compares checksums there first.
    crash: Mutex<Vec<Range<u64>>>,
    /// Counts marks (bits set because a range may differ): a resync clears the ranges it
    /// copied only if no mark happened since it copied them.
    marks: std::sync::atomic::AtomicU64,
}

impl Tracker {
    pub fn new(dirty: Dirty, io: FileIo) -> Tracker {
        Tracker {
            inner: Mutex::new(Inner {
                dirty,
                queue: BTreeMap::new(),
                transfer: VecDeque::new(),
                epoch: 0,
                broken: false,
            }),
            io: tokio::sync::Mutex::new(IoSlot { file: Arc::new(Mutex::new(io)), running: None }),
            freed: Notify::new(),
            crash: Mutex::new(Vec::new()),
            marks: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads or changes the bitmap and log under their lock (never across an await).
    pub fn with<T>(&self, f: impl FnOnce(&mut Dirty) -> T) -> T {
        f(&mut self.inner().dirty)
    }

    /// Waits until a write into `range` is covered on disk (DESIGN §4), pinning its extents
    /// until [`done`](Self::done). Returns whether the range was "wide" (marked in the bitmap
    /// instead of the log; `done` is then a no-op and the caller clears the bits once both
    /// nodes have the write).
    pub async fn admit(&self, range: Range<u64>) -> TrackResult<bool> {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            // `None`: go; `Some(Some(seq))`: once metadata write `seq` is durable; `Some(None)`:
            // busy. The bool: the range is wide.
            let (admit, wide) = {
                let mut inner = self.inner();
                if inner.broken {
                    return Err(broken());
                }
                if inner.dirty.is_wide(range.clone()) {
                    self.marks.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    let mw = inner.dirty.mark_out_of_sync(range.clone());
                    (Some(mw.map(|mw| Self::enqueue(&mut inner, mw))), true)
                } else {
                    let admit =
                        match inner.dirty.before_write(range.clone()).map_err(io::Error::other)? {
                            Admit::Go => None,
                            Admit::Persist(mw) => Some(Some(Self::enqueue(&mut inner, mw))),
                            Admit::After(seq) => Some(Some(seq)),
                            Admit::Busy => Some(None),
                        };
                    (admit, false)
                }
            };
            match admit {
                None => return Ok(wide),
                Some(Some(seq)) => {
                    self.commit(seq).await?;
                    return Ok(wide);
                }
                Some(None) if wide => return Ok(true),
                // Every hot extent has a write in flight: wait for one to finish.
                Some(None) => freed.await,
            }
        }
    }

    /// A write admitted by [`admit`](Self::admit) (not wide) finished on every node it went to,
    /// or was marked: its extents may be evicted again.
    pub fn done(&self, range: Range<u64>) {
        self.inner().dirty.write_done(range);
        self.freed.notify_waiters();
    }

    /// `range` may differ from the peer. Returns once that survives a crash.
    pub async fn mark(&self, range: Range<u64>) -> TrackResult<()> {
        self.marks.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let seq = {
            let mut inner = self.inner();
            match inner.dirty.mark_out_of_sync(range) {
                Some(mw) => Self::enqueue(&mut inner, mw),
                None => return Ok(()),
            }
        };
        self.commit(seq).await
    }

    /// `range` is the same on both nodes now (a resync copied it, or a wide write reached
    /// both). In memory; [`flush`](Self::flush) writes it back, and losing it only overstates.
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

    /// Bytes marked out of sync.
    pub fn dirty_bytes(&self) -> u64 {
        self.inner().dirty.dirty_bytes()
    }

    /// The peer acknowledged a write into `range` (not yet durable there until its next
    /// flush, which the node asks for at least once a second while writes happen).
    pub fn acked(&self, range: Range<u64>) {
        let mut inner = self.inner();
        let epoch = inner.epoch;
        inner.transfer.push_back((epoch, range));
    }

    /// A peer flush starts: returns its epoch for [`flushed`](Self::flushed).
    pub fn flush_started(&self) -> u64 {
        let mut inner = self.inner();
        inner.epoch += 1;
        inner.epoch
    }

    /// The peer flush of `epoch` completed: what was acknowledged before it started is durable
    /// on the peer.
    pub fn flushed(&self, epoch: u64) {
        let mut inner = self.inner();
        while inner.transfer.front().is_some_and(|(e, _)| *e < epoch) {
            inner.transfer.pop_front();
        }
    }

    /// The link is gone: every acknowledged range the peer may not have made durable becomes
    /// out of sync (DESIGN §3's transfer log).
    pub async fn link_lost(&self) -> TrackResult<()> {
        let ranges: Vec<Range<u64>> = {
            let mut inner = self.inner();
            inner.transfer.drain(..).map(|(_, r)| r).collect()
        };
        for r in coalesce(ranges) {
            self.mark(r).await?;
        }
        Ok(())
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
            let handle = tokio::task::spawn_blocking(move || {
                let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
                mw.apply(&mut *file as &mut dyn MetaIo)
            });
            io.running = Some((s, handle));
        }
    }
}

/// The metadata file, and the write being applied to it on the blocking pool (if any): kept
/// under the I/O lock so that its completion is accounted even if its caller went away.
#[derive(Debug)]
struct IoSlot {
    file: Arc<Mutex<FileIo>>,
    running: Option<(u64, tokio::task::JoinHandle<io::Result<()>>)>,
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

    /// DESIGN §3's transfer log: a peer ack is "written", not "durable". When the link is lost,
    /// every range acknowledged since the start of the last completed peer flush becomes out of
    /// sync, on disk; what that flush covered does not.
    #[tokio::test]
    async fn link_loss_marks_what_the_peer_acked_since_its_last_completed_flush() {
        let dir = tempfile::tempdir().unwrap();
        let t = open(&dir, true);
        t.acked(0..4096); // covered by the flush below
        let epoch = t.flush_started();
        t.acked(8192..12288); // acknowledged while the flush runs: not covered
        t.flushed(epoch);
        t.acked(1 << 20..(1 << 20) + 4096);
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

    #[test]
    fn coalesce_merges_overlapping_and_touching() {
        assert_eq!(coalesce(vec![10..20, 0..5, 5..8, 15..30, 40..41]), vec![0..8, 10..30, 40..41]);
        assert!(coalesce(vec![]).is_empty());
    }
}
