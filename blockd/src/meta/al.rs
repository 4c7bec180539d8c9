//! The activity log (design.md §4): the set of "hot" extents a primary may be writing into, kept
//! on disk so that after a crash of the primary only those extents need resync.
//!
//! In memory: up to `extents` hot extents in LRU order, each with a pin count (writes in flight
//! into it) and the flush epoch of its last completed write. An extent is evicted only when it
//! has no write in flight AND a flush that completed on both nodes covers its last write
//! (DRBD's rule): a completed write may still sit in either node's volatile cache, and a power
//! cut then loses it on one node only, so until that flush its extent must stay in the log.
//! On disk: a ring of [`RING_SLOTS`] one-page transactions; transaction `seq` lives in slot
//! `seq % RING_SLOTS`.
//!
//! ```text
//!  off  len  field
//!    0    8  magic "BLKDALTX"
//!    8    8  sequence number (the valid slot with the highest one is the log)
//!   16    4  number of hot extents n (<= MAX_EXTENTS)
//!   20    4  number of extents made hot by this transaction h
//!   24    4  number of extents evicted by this transaction e
//!   28    4  reserved (0)
//!   32 4·n   the hot extent numbers after this transaction (u32 each)
//!  ..  4·h   the extents it made hot   } informational (logs, tests): cut to what fits
//!  ..  4·e   the extents it evicted     } after the hot set, which always fits
//! 4092    4  crc32 of bytes 0..4092
//! ```
//!
//! Each transaction carries the whole hot set, not only its change: a page write costs the same
//! either way, and then recovery is "the newest valid slot", with no replay and no way for a torn
//! older slot to hide an extent. A torn newest slot fails its crc and the one before is used;
//! that one names a superset of what was safe to write into (the torn transaction's new extents
//! saw no write yet, and whatever it evicted had its bitmap bits durable before it was written).

use std::collections::HashMap;
use std::ops::Range;

use super::bitmap::PAGE;

/// Transactions in the on-disk ring. Two would do (newest and the one before); four leave room
/// for a damaged slot.
pub const RING_SLOTS: u32 = 4;
/// Default extent size: 4 MiB (design.md §4).
pub const DEFAULT_EXTENT_SIZE: u64 = 4 << 20;
/// Default number of hot extents: 512 (design.md §4), 2 GiB of hot volume.
pub const DEFAULT_EXTENTS: u32 = 512;
/// Most hot extents one transaction page holds: (4096 - 32 header - 4 crc) / 4 bytes each.
pub const MAX_EXTENTS: u32 = ((PAGE - HEADER - 4) / 4) as u32;

const MAGIC: &[u8; 8] = b"BLKDALTX";
const HEADER: usize = 32;
const CRC_AT: usize = PAGE - 4;
const MIN_EXTENT_SIZE: u64 = 1 << 20;
const MAX_EXTENT_SIZE: u64 = 1 << 30;

/// Errors of the activity log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AlError {
    #[error("activity-log extent size {0} is not a power of two in 1 MiB..1 GiB")]
    ExtentSize(u64),
    #[error("activity-log extent count {0} is not in 1..={MAX_EXTENTS}")]
    Extents(u32),
    #[error("a write over {wanted} extents cannot fit a log of {hot} hot extents")]
    TooWide { wanted: u64, hot: u32 },
    /// Every hot extent has a write in flight: retry once one completes.
    #[error("all hot extents have writes in flight")]
    Busy,
    #[error("transaction slot: {0}")]
    Decode(&'static str),
}

/// Shape of an activity log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlConfig {
    /// Bytes per extent (power of two, 1 MiB..1 GiB).
    pub extent_size: u64,
    /// Hot extents kept (1..=[`MAX_EXTENTS`]).
    pub extents: u32,
}

impl Default for AlConfig {
    fn default() -> Self {
        AlConfig { extent_size: DEFAULT_EXTENT_SIZE, extents: DEFAULT_EXTENTS }
    }
}

impl AlConfig {
    /// Refuses a shape the on-disk format cannot hold.
    pub fn check(&self) -> Result<(), AlError> {
        let s = self.extent_size;
        if !s.is_power_of_two() || !(MIN_EXTENT_SIZE..=MAX_EXTENT_SIZE).contains(&s) {
            return Err(AlError::ExtentSize(s));
        }
        if self.extents == 0 || self.extents > MAX_EXTENTS {
            return Err(AlError::Extents(self.extents));
        }
        Ok(())
    }

    /// Extents touched by byte range `range` (empty for an empty range).
    pub fn extents_of(&self, range: Range<u64>) -> Range<u64> {
        if range.start >= range.end {
            return 0..0;
        }
        range.start / self.extent_size..range.end.div_ceil(self.extent_size)
    }
}

/// One activity-log record: what must be durable before the first write into `made_hot`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub seq: u64,
    /// Every hot extent after this transaction, in no particular order.
    pub hot: Vec<u64>,
    pub made_hot: Vec<u64>,
    pub evicted: Vec<u64>,
}

impl Transaction {
    /// The slot of the ring this transaction goes to.
    pub fn slot(&self) -> u32 {
        (self.seq % u64::from(RING_SLOTS)) as u32
    }

    /// The page as written to disk. Extent numbers are stored as u32: `Dirty` refuses volumes
    /// with more extents than that.
    pub fn encode(&self) -> Box<[u8; PAGE]> {
        let mut b = Box::new([0u8; PAGE]);
        b[0..8].copy_from_slice(MAGIC);
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        let lists = [&self.hot, &self.made_hot, &self.evicted];
        let mut at = HEADER;
        for (i, list) in lists.into_iter().enumerate() {
            let fit = list.len().min((CRC_AT - at) / 4);
            b[16 + 4 * i..20 + 4 * i].copy_from_slice(&(fit as u32).to_le_bytes());
            for &e in &list[..fit] {
                b[at..at + 4].copy_from_slice(&(e as u32).to_le_bytes());
                at += 4;
            }
        }
        let crc = crc32fast::hash(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a ring slot; an empty (all-zero) or torn slot is an error, not a panic.
    pub fn decode(b: &[u8; PAGE]) -> Result<Transaction, AlError> {
        if &b[0..8] != MAGIC {
            return Err(AlError::Decode("no transaction"));
        }
        if crc32fast::hash(&b[..CRC_AT]) != u32_at(b, CRC_AT) {
            return Err(AlError::Decode("bad crc (torn write?)"));
        }
        let counts = [u32_at(b, 16), u32_at(b, 20), u32_at(b, 24)].map(|c| c as usize);
        if HEADER + 4 * counts.iter().sum::<usize>() > CRC_AT {
            return Err(AlError::Decode("extent counts overflow the page"));
        }
        let mut at = HEADER;
        let mut lists = counts.map(|n| {
            let l = (0..n).map(|i| u64::from(u32_at(b, at + 4 * i))).collect::<Vec<_>>();
            at += 4 * n;
            l
        });
        let seq = u64::from_le_bytes(b[8..16].try_into().unwrap_or_default());
        Ok(Transaction {
            seq,
            hot: std::mem::take(&mut lists[0]),
            made_hot: std::mem::take(&mut lists[1]),
            evicted: std::mem::take(&mut lists[2]),
        })
    }
}

/// The newest valid transaction among the ring's slots, or None for a log never written.
pub fn recover(slots: &[Box<[u8; PAGE]>]) -> Option<Transaction> {
    slots.iter().filter_map(|s| Transaction::decode(s).ok()).max_by_key(|t| t.seq)
}

#[derive(Debug, Clone)]
struct Hot {
    last_use: u64,
    /// Writes in flight into this extent.
    pins: u32,
    /// The transaction that made it hot (to tell whether that is durable yet).
    seq: u64,
    /// Flush epoch of the last completed write into it (None: none since it became hot);
    /// durable on both nodes once a flush of a later epoch completed.
    written: Option<u64>,
}

impl Hot {
    /// May leave the log: nothing in flight, and every completed write flushed on both nodes.
    fn evictable(&self, covered: u64) -> bool {
        self.pins == 0 && self.written.map_or(true, |w| w < covered)
    }
}

/// The hot set in memory: LRU plus pins.
#[derive(Debug, Clone)]
pub struct ActivityLog {
    cfg: AlConfig,
    hot: HashMap<u64, Hot>,
    clock: u64,
    next_seq: u64,
    /// Writes of an epoch below this are durable on both nodes (see [`Self::flushed`]).
    covered: u64,
    /// Test-only: evict extents whose writes are not flushed yet (the bug of issue 17).
    #[cfg(test)]
    pub(super) ignore_flushes: bool,
}

impl ActivityLog {
    /// The log as recovered from disk: `last` is `al::recover`'s result. Recovered extents stay
    /// hot (they are on disk, so keeping them costs nothing and is safe).
    pub fn new(cfg: AlConfig, last: Option<&Transaction>) -> Result<ActivityLog, AlError> {
        cfg.check()?;
        let mut log = ActivityLog {
            cfg,
            hot: HashMap::new(),
            clock: 0,
            next_seq: 1,
            covered: 0,
            #[cfg(test)]
            ignore_flushes: false,
        };
        if let Some(t) = last {
            log.next_seq = t.seq + 1;
            for &e in t.hot.iter().take(cfg.extents as usize) {
                log.clock += 1;
                log.hot.insert(e, Hot { last_use: log.clock, pins: 0, seq: t.seq, written: None });
            }
        }
        Ok(log)
    }

    pub fn config(&self) -> AlConfig {
        self.cfg
    }

    /// Hot extents, ascending.
    pub fn hot_extents(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.hot.keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn is_hot(&self, extent: u64) -> bool {
        self.hot.contains_key(&extent)
    }

    /// The highest sequence of the transactions that made `extents` hot (all must be hot).
    pub fn made_hot_by(&self, extents: Range<u64>) -> u64 {
        extents.filter_map(|e| self.hot.get(&e).map(|h| h.seq)).max().unwrap_or(0)
    }

    /// Makes `extents` hot and uses them (LRU). A hit costs nothing and returns None. A miss
    /// evicts least recently used evictable extents (see [`Hot::evictable`]) and returns the
    /// transaction to persist before the first write into the new extents (the caller persists
    /// the victims' bitmap pages before it). Too few victims: [`AlError::Busy`], and nothing
    /// changed; [`waits_for_flush`](Self::waits_for_flush) then says whether a flush would help.
    pub fn make_hot(&mut self, extents: Range<u64>) -> Result<Option<Transaction>, AlError> {
        let wanted = extents.end - extents.start;
        if wanted > u64::from(self.cfg.extents) {
            return Err(AlError::TooWide { wanted, hot: self.cfg.extents });
        }
        let misses: Vec<u64> = extents.clone().filter(|e| !self.hot.contains_key(e)).collect();
        let room = self.cfg.extents as usize - self.hot.len();
        let victims = self.victims(misses.len().saturating_sub(room), &extents);
        let victims = victims.ok_or(AlError::Busy)?;
        for e in extents {
            self.clock += 1;
            let (clock, seq) = (self.clock, self.next_seq);
            self.hot
                .entry(e)
                .or_insert(Hot { last_use: 0, pins: 0, seq, written: None })
                .last_use = clock;
        }
        if misses.is_empty() {
            return Ok(None);
        }
        for v in &victims {
            self.hot.remove(v);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        Ok(Some(Transaction { seq, hot: self.hot_extents(), made_hot: misses, evicted: victims }))
    }

    /// A transaction emptying the log (after its extents went into the bitmap).
    pub fn clear(&mut self) -> Transaction {
        let evicted = self.hot_extents();
        self.hot.clear();
        let seq = self.next_seq;
        self.next_seq += 1;
        Transaction { seq, hot: Vec::new(), made_hot: Vec::new(), evicted }
    }

    /// Counts a write in flight into each of `extents` (all hot).
    pub fn pin(&mut self, extents: Range<u64>) {
        for e in extents {
            if let Some(h) = self.hot.get_mut(&e) {
                h.pins += 1;
            }
        }
    }

    /// A write into `extents` completed during flush epoch `epoch`: no longer in flight, but
    /// not evictable before a flush of a later epoch completed on both nodes.
    pub fn unpin(&mut self, extents: Range<u64>, epoch: u64) {
        for e in extents {
            if let Some(h) = self.hot.get_mut(&e) {
                h.pins = h.pins.saturating_sub(1);
                h.written = Some(h.written.map_or(epoch, |w| w.max(epoch)));
            }
        }
    }

    /// A flush of `epoch` completed on both nodes (or, degraded, here: see `Tracker`): every
    /// write completed in an earlier epoch is durable wherever it went.
    pub fn flushed(&mut self, epoch: u64) {
        self.covered = self.covered.max(epoch);
    }

    /// Some extent has nothing in flight but waits for a flush before it may be evicted: a
    /// busy log frees up by flushing, not only by writes completing.
    pub fn waits_for_flush(&self) -> bool {
        self.hot.values().any(|h| h.pins == 0 && !h.evictable(self.covered))
    }

    fn may_evict(&self, h: &Hot) -> bool {
        #[cfg(test)]
        if self.ignore_flushes {
            return h.pins == 0;
        }
        h.evictable(self.covered)
    }

    /// `n` least recently used evictable extents outside `keep`, or None if there are fewer.
    fn victims(&self, n: usize, keep: &Range<u64>) -> Option<Vec<u64>> {
        if n == 0 {
            return Some(Vec::new());
        }
        let mut free: Vec<(u64, u64)> = self
            .hot
            .iter()
            .filter(|(e, h)| self.may_evict(h) && !keep.contains(e))
            .map(|(&e, h)| (h.last_use, e))
            .collect();
        if free.len() < n {
            return None;
        }
        free.sort_unstable();
        Some(free[..n].iter().map(|&(_, e)| e).collect())
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

#[cfg(test)]
#[path = "al_tests.rs"]
mod tests;
