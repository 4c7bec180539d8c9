//! On-disk metadata of a volume (design.md §4, §5): superblock, flags, generations. The resync
//! decision taken from two nodes' generations is `crate::resync::decide`.
//!
//! - [`Generations`] and its transitions ([`Generations::rotate`], the `sync_done_*` pair): how a
//!   node records which data it holds, relative to its peer.
//! - [`MetaFile`] (in `file.rs`): the durable superblock, `<data-dir>/<volume>.meta`, and the
//!   [`Areas`] after it that hold the bitmap and the activity log.
//! - [`Bitmap`] (`bitmap.rs`): the dirty bitmap in memory, page by page; pure.
//! - [`ActivityLog`] (`al.rs`): the hot extents, LRU, and their on-disk transactions; pure.
//! - [`Dirty`] (`dirty.rs`): both together, enforcing "on-disk bitmap ∪ activity-log extents ⊇
//!   every range that may differ" by telling the write path what to persist first.
//!
//! Nothing here knows about sockets or tokio; [`MetaFile::store`] blocks and is meant for
//! `spawn_blocking`.

mod al;
mod bitmap;
mod dirty;
mod file;
mod format;

use serde::{Deserialize, Serialize};

pub use al::{
    ActivityLog, AlConfig, AlError, Transaction, DEFAULT_EXTENTS, DEFAULT_EXTENT_SIZE, MAX_EXTENTS,
};
pub use bitmap::{Bitmap, BitmapError, Ranges};
pub use dirty::{Admit, Dirty, DirtyError, FileIo, MetaIo, MetaWrite};
pub use file::{MetaError, MetaFile};
pub use format::{
    Areas, DiskFailure, DiskOp, Flags, Meta, DEFAULT_GRANULARITY, FORMAT_VERSION, NODE_MAX,
};

/// The generation of a backing that blockd itself just created sparse: "all zeroes, never
/// written". Two nodes that both start from a freshly created backing hold the same data without
/// copying a byte, so they share this id and the handshake finds them in sync.
/// [`new_generation`] never returns it, nor 0 ("none").
pub const ZEROES: u64 = 1;

/// Generation ids of a volume on one node (design.md §5). 0 means "none".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Generations {
    /// The generation the data on this node belongs to.
    pub current: u64,
    /// The generation the peer was at when this node started writing without it (0: none).
    pub bitmap: u64,
    /// Older generations, newest first.
    pub history: [u64; 2],
}

impl Generations {
    /// Generations of a volume whose data is of generation `current` and nothing else known.
    pub fn new(current: u64) -> Generations {
        Generations { current, bitmap: 0, history: [0, 0] }
    }

    /// A primary that lost its peer, or was promoted without one, starts a new generation:
    ///
    /// - `bitmap == 0` (it was in sync with the peer, which holds `current`): `bitmap ← current`,
    ///   so the handshake can later tell "the peer is where I was when I went on alone".
    /// - `bitmap != 0` (already ahead of the peer): `bitmap` stays, since the peer still holds
    ///   that generation and the dirty bitmap still covers every change since it; the
    ///   current id moves into `history` (`history[1] ← history[0]`, `history[0] ← current`)
    ///   because a peer may hold it after all: a resync that the target committed but whose end
    ///   the source never persisted (a crash in between) leaves exactly that.
    /// - then `current ← new`.
    pub fn rotate(&mut self, new: u64) {
        if self.bitmap == 0 {
            self.bitmap = self.current;
        } else {
            self.history = [self.current, self.history[0]];
        }
        self.current = new;
    }

    /// Resync finished on the source (the target acknowledged the end): the peer now holds
    /// `current` too, so the bitmap's generation becomes history and `bitmap ← 0`.
    /// Idempotent: with `bitmap == 0` nothing changes (no 0 is pushed into the history).
    pub fn sync_done_source(&mut self) {
        if self.bitmap != 0 {
            self.history = [self.bitmap, self.history[0]];
            self.bitmap = 0;
        }
    }

    /// Resync finished on the target: adopt the source's generations, as they are once the
    /// source has run [`sync_done_source`](Self::sync_done_source), whether `source` was taken
    /// before or after it. Both nodes then hold equal generations and the next handshake finds
    /// them in sync.
    pub fn sync_done_target(&mut self, source: &Generations) {
        let mut done = *source;
        done.sync_done_source();
        *self = done;
    }

    /// `id` is one of the (non-zero) history entries.
    pub fn history_has(&self, id: u64) -> bool {
        id != 0 && self.history.contains(&id)
    }
}

/// A fresh random generation id: never 0 ("none") nor [`ZEROES`].
///
/// From the OS random source (getrandom); should that ever fail, from std's randomly keyed
/// hasher over the time and process id, which is still unique enough for an id compared only
/// with the peer's handful of ids.
pub fn new_generation() -> u64 {
    loop {
        let id = getrandom::u64().unwrap_or_else(|_| fallback_random());
        if id > ZEROES {
            return id;
        }
    }
}

fn fallback_random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    h.write_u128(now.map(|d| d.as_nanos()).unwrap_or_default());
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resync::{decide, SyncDecision};

    #[test]
    fn new_generation_is_never_none_nor_zeroes_and_varies() {
        let ids: std::collections::HashSet<u64> = (0..1000).map(|_| new_generation()).collect();
        assert!(ids.iter().all(|&id| id > ZEROES));
        assert_eq!(ids.len(), 1000, "1000 random u64s collided");
        assert_ne!(fallback_random(), fallback_random());
    }

    /// design.md §5: "bitmap ← current (if bitmap is 0), current ← new random".
    #[test]
    fn rotate_in_sync_moves_current_to_bitmap() {
        let mut g = Generations { current: 10, bitmap: 0, history: [5, 4] };
        g.rotate(11);
        assert_eq!(g, Generations { current: 11, bitmap: 10, history: [5, 4] });
    }

    #[test]
    fn rotate_ahead_keeps_bitmap_and_shifts_current_into_history() {
        let mut g = Generations { current: 11, bitmap: 10, history: [5, 4] };
        g.rotate(12);
        assert_eq!(g, Generations { current: 12, bitmap: 10, history: [11, 5] });
    }

    #[test]
    fn sync_done_source_moves_bitmap_to_history_once() {
        let mut g = Generations { current: 11, bitmap: 10, history: [5, 4] };
        g.sync_done_source();
        assert_eq!(g, Generations { current: 11, bitmap: 0, history: [10, 5] });
        g.sync_done_source();
        assert_eq!(g, Generations { current: 11, bitmap: 0, history: [10, 5] });
    }

    #[test]
    fn sync_done_target_adopts_source_before_or_after_its_own_done() {
        let source = Generations { current: 11, bitmap: 10, history: [5, 4] };
        let mut before = Generations::new(10);
        before.sync_done_target(&source);
        let mut done = source;
        done.sync_done_source();
        let mut after = Generations::new(10);
        after.sync_done_target(&done);
        assert_eq!(before, done);
        assert_eq!(after, done);
        assert_eq!(decide(&before, &done), SyncDecision::InSync);
    }

    /// The whole cycle: in sync, the primary goes on alone, the peer returns, resync, in sync.
    #[test]
    fn lifecycle_disconnect_resync_reconnect() {
        let mut a = Generations::new(ZEROES);
        let mut b = Generations::new(ZEROES);
        assert_eq!(decide(&a, &b), SyncDecision::InSync);
        a.rotate(new_generation());
        assert_eq!(decide(&a, &b), SyncDecision::Source);
        assert_eq!(decide(&b, &a), SyncDecision::Target);
        a.sync_done_source();
        b.sync_done_target(&a);
        assert_eq!(decide(&a, &b), SyncDecision::InSync);
        // Both go on alone from there (partition, both forced Primary): split brain.
        let (mut a2, mut b2) = (a, b);
        a2.rotate(new_generation());
        b2.rotate(new_generation());
        assert_eq!(decide(&a2, &b2), SyncDecision::SplitBrain);
    }

    /// The crash window `rotate` guards against: the target committed the end of a resync, the
    /// source crashed before persisting its own end, then went on alone once more.
    #[test]
    fn rotate_after_unpersisted_sync_done_still_finds_the_peer() {
        let mut a = Generations { current: 11, bitmap: 10, history: [0, 0] };
        let mut b = Generations::new(10);
        b.sync_done_target(&a);
        assert_eq!(decide(&a, &b), SyncDecision::InSync);
        a.rotate(12);
        assert_eq!(decide(&a, &b), SyncDecision::Source);
    }
}
