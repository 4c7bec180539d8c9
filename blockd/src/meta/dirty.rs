//! [`Dirty`]: the dirty bitmap and the activity log together, keeping design.md §4's invariant
//!
//! > on-disk bitmap ∪ on-disk activity-log extents ⊇ every range that may differ between nodes
//!
//! by handing the caller, as a [`MetaWrite`], exactly what must be durable before it may go on:
//!
//! ```text
//!  before_write(r) ─┬─ every extent of r hot and durable ───────────────▶ Go: write data now
//!                   ├─ a miss: victims' dirty bitmap pages, flush,
//!                   │          AL transaction, flush ───────────────────▶ Persist(mw), then data
//!                   ├─ hot, but its transaction not yet durable ────────▶ After(seq)
//!                   └─ every hot extent has a write in flight ─────────▶ Busy: retry later
//!  write_done(r, epoch) the write completed; its extents may be evicted once data_flushed
//!                       reports a flush of a later epoch done on both nodes (DRBD's rule)
//!  mark_out_of_sync(r)  bits in memory (the AL covers them until eviction writes them), or a
//!                       MetaWrite of their pages when r is not hot
//!  after_crash_of_primary()  AL extents → bitmap pages, flush, empty AL transaction, flush
//!  flush()              changed bitmap pages (clean shutdown, periodic, after clear_synced)
//! ```
//!
//! Why each step is enough: a write into extent E starts only once a transaction naming E is
//! durable, so anything in flight is covered by the log. Bits set in memory for E are covered by
//! the log while E is hot; E leaves the log only in a transaction written after E's bitmap pages
//! were made durable (flush in between, since caches reorder). Pinned extents (writes in flight)
//! are never evicted, nor extents whose completed writes no flush on both nodes has covered yet:
//! such a write may still be in one node's volatile cache, and a power cut loses it there only.
//! Cleared bits may be lost by a crash: that only overstates what differs.
//!
//! Contract for the caller: apply MetaWrites in `seq` order, one at a time, each followed by
//! [`Dirty::persisted`]; a MetaWrite that fails to apply leaves the metadata untrustworthy, and
//! the volume's disk must go `Failed` (no further writes).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use super::al::{self, ActivityLog, AlError, Transaction};
use super::bitmap::{Bitmap, BitmapError, Ranges, PAGE};
use super::format::Areas;

/// Extents made hot ahead of a sequential stream (see [`Dirty::make_hot`]).
const AHEAD: u64 = 4;

/// Byte-addressed I/O on the metadata file; a trait so tests can use a disk that crashes.
pub trait MetaIo {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at `offset`; not durable until [`flush`](Self::flush).
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
}

/// [`MetaIo`] on the metadata file: pwrite, and fdatasync for `flush`.
#[derive(Debug)]
pub struct FileIo {
    file: File,
}

impl FileIo {
    pub fn new(file: File) -> FileIo {
        FileIo { file }
    }
}

impl MetaIo for FileIo {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Errors of the dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("dirty bitmap")]
    Bitmap(#[source] BitmapError),
    #[error("activity log")]
    Al(#[source] AlError),
    #[error("cannot read the dirty bitmap and activity log")]
    Read(#[source] io::Error),
    #[error("metadata holds {have} bytes of bitmap, the volume needs {need}")]
    BitmapTooShort { have: u64, need: u64 },
    #[error("a volume of {size} bytes has more activity-log extents than fit in 32 bits")]
    TooManyExtents { size: u64 },
    #[error("metadata write {got} persisted out of order (next is {next})")]
    OutOfOrder { got: u64, next: u64 },
}

/// What must be durable, in this order, before the write path may go on.
#[derive(Debug)]
pub struct MetaWrite {
    seq: u64,
    /// Bitmap pages (file offset, bytes), written and flushed before `al`.
    pages: Vec<(u64, Box<[u8; PAGE]>)>,
    /// An activity-log transaction (file offset, bytes), written and flushed last.
    al: Option<(u64, Box<[u8; PAGE]>)>,
    /// Both true outside the mutation tests.
    flush_pages: bool,
    flush_al: bool,
}

impl MetaWrite {
    /// Its place in the order MetaWrites must be applied in.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Bytes it writes (for counters).
    pub fn bytes(&self) -> u64 {
        ((self.pages.len() + usize::from(self.al.is_some())) * PAGE) as u64
    }

    /// Pages, flush, transaction, flush. The first flush keeps a transaction that evicts an
    /// extent from reaching the disk before that extent's bits; the second is what the data
    /// write waits for.
    pub fn apply(&self, io: &mut dyn MetaIo) -> io::Result<()> {
        for (offset, page) in &self.pages {
            io.write_at(*offset, &page[..])?;
        }
        if !self.pages.is_empty() && self.flush_pages {
            io.flush()?;
        }
        if let Some((offset, page)) = &self.al {
            io.write_at(*offset, &page[..])?;
            if self.flush_al {
                io.flush()?;
            }
        }
        Ok(())
    }
}

/// What [`Dirty::before_write`] allows.
#[derive(Debug)]
pub enum Admit {
    /// Every extent is hot and durable: start the data write. The hit cost nothing.
    Go,
    /// Apply this (in seq order), call [`Dirty::persisted`], then start the data write.
    Persist(MetaWrite),
    /// The extents are hot through a MetaWrite not yet persisted: start once `persisted(seq)`.
    After(u64),
    /// Every hot extent has a write in flight: nothing changed, retry after a `write_done`.
    Busy,
}

/// Test-only faults that break the invariant, so the property test can show it catches them.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mutant {
    None,
    /// The AL transaction is written but not flushed before the data write.
    NoAlFlush,
    /// Eviction does not write the victim's bitmap pages first.
    NoEvictPages,
    /// No flush between the bitmap pages and the transaction that evicts their extent.
    NoPageFlush,
    /// Extents are evicted once their writes completed, flushed or not (issue 17's bug).
    EvictUnflushed,
}

/// The dirty bitmap and activity log of one volume on this node.
#[derive(Debug)]
pub struct Dirty {
    bitmap: Bitmap,
    al: ActivityLog,
    areas: Areas,
    /// Seq of the last MetaWrite handed out, and of the last one persisted.
    issued: u64,
    durable: u64,
    /// AL transaction seq → the MetaWrite carrying it, while that is not persisted.
    pending: BTreeMap<u64, u64>,
    /// End of the last range admitted: a write starting there continues a sequential stream.
    last_end: u64,
    #[cfg(test)]
    pub(super) mutant: Mutant,
}

impl Dirty {
    /// Reads the bitmap and the activity log of a volume of `size` bytes from `areas`. The
    /// recovered hot extents stay hot; a crashed primary calls
    /// [`after_crash_of_primary`](Self::after_crash_of_primary) next.
    pub fn open(
        io: &mut dyn MetaIo,
        areas: Areas,
        size: u64,
        granularity: u32,
    ) -> Result<Dirty, DirtyError> {
        let mut bitmap = Bitmap::new(size, granularity).map_err(DirtyError::Bitmap)?;
        let need = Bitmap::bytes_for(size, granularity);
        if areas.bitmap_len < need {
            return Err(DirtyError::BitmapTooShort { have: areas.bitmap_len, need });
        }
        if size.div_ceil(areas.al.extent_size) > u64::from(u32::MAX) {
            return Err(DirtyError::TooManyExtents { size });
        }
        let mut page = Box::new([0u8; PAGE]);
        for p in 0..bitmap.pages() {
            io.read_at(areas.bitmap_offset + (p * PAGE) as u64, &mut page[..])
                .map_err(DirtyError::Read)?;
            bitmap.load_page(p, &page).map_err(DirtyError::Bitmap)?;
        }
        let mut ring = Vec::with_capacity(areas.al_slots as usize);
        for s in 0..u64::from(areas.al_slots) {
            let mut slot = Box::new([0u8; PAGE]);
            io.read_at(areas.al_offset + s * PAGE as u64, &mut slot[..])
                .map_err(DirtyError::Read)?;
            ring.push(slot);
        }
        let al = ActivityLog::new(areas.al, al::recover(&ring).as_ref()).map_err(DirtyError::Al)?;
        Ok(Dirty::from_parts(bitmap, al, areas))
    }

    fn from_parts(bitmap: Bitmap, al: ActivityLog, areas: Areas) -> Dirty {
        Dirty {
            bitmap,
            al,
            areas,
            issued: 0,
            durable: 0,
            pending: BTreeMap::new(),
            last_end: 0,
            #[cfg(test)]
            mutant: Mutant::None,
        }
    }

    /// True when a write into `range` would take more than a quarter of the log's extents:
    /// such writes (a discard of the whole device, say) mark their range in the bitmap durably
    /// instead of through the log, so they never flush the log of everything else.
    pub fn is_wide(&self, range: Range<u64>) -> bool {
        let e = self.extents_of(range);
        e.end - e.start > u64::from(self.areas.al.extents / 4).max(1)
    }

    /// What must happen before a data write into `range` may start; see [`Admit`]. On `Go`,
    /// `Persist` and `After` the range's extents are pinned until [`write_done`](Self::write_done).
    pub fn before_write(&mut self, range: Range<u64>) -> Result<Admit, DirtyError> {
        let extents = self.extents_of(range.clone());
        if extents.is_empty() {
            return Ok(Admit::Go);
        }
        #[cfg(test)]
        {
            self.al.ignore_flushes = self.mutant == Mutant::EvictUnflushed;
        }
        let sequential = range.start == self.last_end && range.start > 0;
        self.last_end = range.end;
        let tx = match self.make_hot(extents.clone(), sequential) {
            Ok(tx) => tx,
            Err(AlError::Busy) => return Ok(Admit::Busy),
            Err(e) => return Err(DirtyError::Al(e)),
        };
        self.al.pin(extents.clone());
        if let Some(tx) = tx {
            return Ok(Admit::Persist(self.transaction_write(&tx)));
        }
        let carried_by = self.pending.get(&self.al.made_hot_by(extents)).copied();
        Ok(match carried_by {
            Some(seq) if seq > self.durable => Admit::After(seq),
            _ => Admit::Go,
        })
    }

    /// Makes `extents` hot; a miss of a `sequential` stream also makes the next [`AHEAD`]
    /// extents hot in the same transaction (one page either way), so the stream pays one
    /// transaction per `AHEAD + 1` extents instead of one per extent, each in series. Extents
    /// made hot early are only more of the log (evictable at once: nothing was written there).
    /// When the longer range does not fit, just `extents`.
    fn make_hot(
        &mut self,
        extents: Range<u64>,
        sequential: bool,
    ) -> Result<Option<Transaction>, AlError> {
        let last = self.extents_of(0..self.bitmap.size()).end;
        let ahead = extents.start..(extents.end + AHEAD).min(last);
        let wide = ahead.end - ahead.start > u64::from(self.areas.al.extents / 4).max(1);
        if sequential && !wide && extents.clone().any(|e| !self.al.is_hot(e)) {
            if let Ok(tx) = self.al.make_hot(ahead) {
                return Ok(tx);
            }
        }
        self.al.make_hot(extents)
    }

    /// The data write into `range` completed (on every node it went to, or was marked out of
    /// sync) in flush epoch `epoch`: its extents may be evicted once a flush of a later epoch
    /// completed on both nodes ([`data_flushed`](Self::data_flushed)).
    pub fn write_done(&mut self, range: Range<u64>, epoch: u64) {
        self.al.unpin(self.extents_of(range), epoch);
    }

    /// A data flush of `epoch` completed on both nodes: what completed before it started is
    /// durable on both, so its extents may leave the log.
    pub fn data_flushed(&mut self, epoch: u64) {
        self.al.flushed(epoch);
    }

    /// A `Busy` log would free up by a data flush (not only by writes completing).
    pub fn waits_for_flush(&self) -> bool {
        self.al.waits_for_flush()
    }

    /// The seq of the last MetaWrite reported [`persisted`](Self::persisted) (0: none).
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// MetaWrite `seq` is durable. They must be reported in order.
    pub fn persisted(&mut self, seq: u64) -> Result<(), DirtyError> {
        if seq != self.durable + 1 || seq > self.issued {
            return Err(DirtyError::OutOfOrder { got: seq, next: self.durable + 1 });
        }
        self.durable = seq;
        self.pending.retain(|_, m| *m > seq);
        Ok(())
    }

    /// `range` differs from the peer (a degraded write, the transfer log of a lost link, a
    /// verify mismatch). In memory while its extents are hot (the log covers it); otherwise the
    /// returned MetaWrite of its pages must be applied for the mark to survive a crash.
    pub fn mark_out_of_sync(&mut self, range: Range<u64>) -> Option<MetaWrite> {
        self.bitmap.set(range.clone());
        if self.extents_of(range.clone()).all(|e| self.al.is_hot(e)) {
            return None;
        }
        let pages = self.take_pages(self.bitmap.pages_of(range));
        Some(self.meta_write(pages, None))
    }

    /// After a crash of this node while primary (at start, before any write): every extent of
    /// the log may differ, so its bits join the bitmap; then the log is emptied, after the
    /// bitmap pages are durable. None when the log was empty.
    pub fn after_crash_of_primary(&mut self) -> Option<MetaWrite> {
        let hot = self.al.hot_extents();
        if hot.is_empty() {
            return None;
        }
        let size = self.areas.al.extent_size;
        for e in hot {
            self.bitmap.set(e * size..(e + 1) * size);
        }
        let pages = self.take_pages(0..self.bitmap.pages());
        let tx = self.al.clear();
        Some(self.meta_write(pages, Some(&tx)))
    }

    /// This node stops writing as Primary (demoted, nothing in flight): the bits of its hot
    /// extents are written out, then the log is emptied, so that a later crash as Secondary
    /// adds nothing to the bitmap. None when the log is already empty.
    pub fn retire_log(&mut self) -> Option<MetaWrite> {
        if self.al.hot_extents().is_empty() {
            return None;
        }
        let pages = self.take_pages(0..self.bitmap.pages());
        let tx = self.al.clear();
        Some(self.meta_write(pages, Some(&tx)))
    }

    /// The bitmap pages changed in memory, to write back (None: nothing changed).
    pub fn flush(&mut self) -> Option<MetaWrite> {
        let pages = self.take_pages(0..self.bitmap.pages());
        (!pages.is_empty()).then(|| self.meta_write(pages, None))
    }

    /// `range` is in sync again (resync copied it): its whole granules become clean, in
    /// memory; [`flush`](Self::flush) writes that back, and losing it only overstates.
    pub fn clear_synced(&mut self, range: Range<u64>) {
        self.bitmap.clear(range);
    }

    /// Adds another bitmap (the peer's, for a resync of the union).
    pub fn union(&mut self, other: &Bitmap) -> Result<(), DirtyError> {
        self.bitmap.union(other).map_err(DirtyError::Bitmap)
    }

    /// Bytes marked out of sync.
    pub fn dirty_bytes(&self) -> u64 {
        self.bitmap.dirty_bytes()
    }

    /// Dirty ranges from `offset` on, in offset order.
    pub fn ranges_from(&self, offset: u64) -> Ranges<'_> {
        self.bitmap.ranges_from(offset)
    }

    pub fn bitmap(&self) -> &Bitmap {
        &self.bitmap
    }

    /// Hot extents of the activity log, ascending (extent `e` is bytes `e·size..(e+1)·size`).
    pub fn hot_extents(&self) -> Vec<u64> {
        self.al.hot_extents()
    }

    pub fn areas(&self) -> Areas {
        self.areas
    }

    fn extents_of(&self, range: Range<u64>) -> Range<u64> {
        let end = range.end.min(self.bitmap.size());
        self.areas.al.extents_of(range.start..end)
    }

    /// The MetaWrite of a transaction: first the evicted extents' changed bitmap pages.
    fn transaction_write(&mut self, tx: &Transaction) -> MetaWrite {
        let size = self.areas.al.extent_size;
        let mut pages = Vec::new();
        #[cfg(test)]
        let evicted = if self.mutant == Mutant::NoEvictPages { &[][..] } else { &tx.evicted[..] };
        #[cfg(not(test))]
        let evicted = &tx.evicted[..];
        for &e in evicted {
            let of = self.bitmap.pages_of(e * size..(e + 1) * size);
            pages.extend(self.take_pages(of));
        }
        let mw = self.meta_write(pages, Some(tx));
        self.pending.insert(tx.seq, mw.seq);
        mw
    }

    fn take_pages(&mut self, pages: Range<usize>) -> Vec<(u64, Box<[u8; PAGE]>)> {
        let mut out = Vec::new();
        for p in pages {
            if !self.bitmap.page_is_dirty(p) {
                continue;
            }
            if let Ok(bytes) = self.bitmap.take_page(p) {
                out.push((self.areas.bitmap_offset + (p * PAGE) as u64, bytes));
            }
        }
        out
    }

    fn meta_write(
        &mut self,
        pages: Vec<(u64, Box<[u8; PAGE]>)>,
        tx: Option<&Transaction>,
    ) -> MetaWrite {
        self.issued += 1;
        let al = tx.map(|t| (self.areas.al_offset + u64::from(t.slot()) * PAGE as u64, t.encode()));
        #[cfg(test)]
        let (flush_pages, flush_al) =
            (self.mutant != Mutant::NoPageFlush, self.mutant != Mutant::NoAlFlush);
        #[cfg(not(test))]
        let (flush_pages, flush_al) = (true, true);
        MetaWrite { seq: self.issued, pages, al, flush_pages, flush_al }
    }
}

#[cfg(test)]
#[path = "dirty_tests.rs"]
mod tests;
