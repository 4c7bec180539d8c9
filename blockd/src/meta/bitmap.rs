//! The dirty bitmap (design.md §4): one bit per `granularity` bytes of the volume, set while that
//! range may differ from the peer. Pure: it lives in memory as `u64` words and knows which of its
//! [`PAGE`]-byte pages changed since they were last handed out for writing; `dirty.rs` decides
//! when pages go to disk.
//!
//! ```text
//!  bit b  covers bytes [b·g, (b+1)·g) of the volume (the last one may be cut short by the size)
//!  word w holds bits 64w..64w+63, bit b at (1 << b % 64), stored little-endian
//!  page p holds words 512p..512p+511 = bits 32768p..: 128 MiB of volume at g = 4 KiB
//! ```
//!
//! Pages carry no crc on purpose: a page torn by a crash holds, bit for bit, either its old or
//! its new value, and both are safe (the old value plus the activity log covers everything, the
//! new one is what memory held). A crc would turn a torn page into "128 MiB dirty".

use std::ops::Range;

/// Bytes of one bitmap page, the unit of bitmap I/O.
pub const PAGE: usize = 4096;
const WORDS_PER_PAGE: usize = PAGE / 8;
const BITS_PER_PAGE: u64 = PAGE as u64 * 8;
const MIN_GRANULARITY: u32 = 4096;
const MAX_GRANULARITY: u32 = 1 << 20;

/// Why a bitmap cannot be built or combined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    #[error("bitmap granularity {0} is not a power of two in 4 KiB..1 MiB")]
    Granularity(u32),
    #[error("bitmaps of {ours} bytes / {our_g} and {theirs} bytes / {their_g} cannot be united")]
    Geometry { ours: u64, our_g: u32, theirs: u64, their_g: u32 },
    #[error("bitmap page {page} is past the last page {last}")]
    Page { page: usize, last: usize },
}

/// A volume's dirty bitmap in memory, with the set of pages changed since last written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    size: u64,
    shift: u32,
    /// Number of bits: `ceil(size / granularity)`. Bits past it are always 0.
    bits: u64,
    words: Vec<u64>,
    /// One bit per page: set when the page changed in memory since it was last handed out.
    dirty_pages: Vec<u64>,
    /// Number of set bits, kept so that `dirty_bytes` is O(1) (status polls it).
    set_bits: u64,
}

impl Bitmap {
    /// An all-clean bitmap for a volume of `size` bytes.
    pub fn new(size: u64, granularity: u32) -> Result<Bitmap, BitmapError> {
        if !granularity.is_power_of_two()
            || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity)
        {
            return Err(BitmapError::Granularity(granularity));
        }
        let shift = granularity.trailing_zeros();
        let bits = size.div_ceil(u64::from(granularity));
        let pages = pages_for_bits(bits);
        Ok(Bitmap {
            size,
            shift,
            bits,
            words: vec![0; pages * WORDS_PER_PAGE],
            dirty_pages: vec![0; pages.div_ceil(64)],
            set_bits: 0,
        })
    }

    /// Bytes of the on-disk bitmap of a volume: whole pages.
    pub fn bytes_for(size: u64, granularity: u32) -> u64 {
        let bits = size.div_ceil(u64::from(granularity.max(1)));
        (pages_for_bits(bits) * PAGE) as u64
    }

    /// Volume size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u32 {
        1 << self.shift
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.words.len() / WORDS_PER_PAGE
    }

    /// Marks `range` dirty, widened outward to whole granules: a partial granule may differ.
    pub fn set(&mut self, range: Range<u64>) {
        let g = u64::from(self.granularity());
        let end = range.end.min(self.size);
        if range.start >= end {
            return;
        }
        let bits = range.start >> self.shift..end.div_ceil(g);
        self.apply(bits, true);
    }

    /// Marks `range` clean, narrowed inward to whole granules: a granule only partly known to be
    /// in sync stays dirty. The volume's last, short granule counts as whole when `range` reaches
    /// the end of the volume.
    pub fn clear(&mut self, range: Range<u64>) {
        let g = u64::from(self.granularity());
        let first = range.start.div_ceil(g);
        let last = if range.end >= self.size { self.bits } else { range.end >> self.shift };
        if first < last {
            self.apply(first..last, false);
        }
    }

    /// Whether any byte of `range` is dirty.
    pub fn test(&self, range: Range<u64>) -> bool {
        let end = range.end.min(self.size);
        if range.start >= end {
            return false;
        }
        let last = end.div_ceil(u64::from(self.granularity()));
        self.scan(range.start >> self.shift, last, |w| w).is_some()
    }

    /// Dirty bytes: set bits times the granularity, the last granule cut at the volume's end.
    pub fn dirty_bytes(&self) -> u64 {
        let g = u64::from(self.granularity());
        let mut bytes = self.set_bits * g;
        if self.bits > 0 && self.bit(self.bits - 1) {
            bytes -= self.bits * g - self.size;
        }
        bytes
    }

    /// Dirty ranges in offset order, adjacent granules merged, starting at `offset` (the first
    /// range is cut to start there): what a resync resumed at `offset` still has to copy.
    pub fn ranges_from(&self, offset: u64) -> Ranges<'_> {
        Ranges { map: self, next_bit: offset >> self.shift, from: offset }
    }

    /// Adds every dirty bit of `other` (same size and granularity), e.g. the peer's bitmap when
    /// this node becomes the target of their union after a split brain.
    pub fn union(&mut self, other: &Bitmap) -> Result<(), BitmapError> {
        if other.size != self.size || other.shift != self.shift {
            return Err(BitmapError::Geometry {
                ours: self.size,
                our_g: self.granularity(),
                theirs: other.size,
                their_g: other.granularity(),
            });
        }
        for (i, (w, o)) in self.words.iter_mut().zip(&other.words).enumerate() {
            let new = *w | o;
            if new != *w {
                self.set_bits += u64::from((new ^ *w).count_ones());
                *w = new;
                self.dirty_pages[i / WORDS_PER_PAGE / 64] |= 1 << (i / WORDS_PER_PAGE % 64);
            }
        }
        Ok(())
    }

    /// Length of the bitmap's bytes as [`bytes_at`](Self::bytes_at) serves them.
    pub fn byte_len(&self) -> u64 {
        self.words.len() as u64 * 8
    }

    /// Up to `max` bytes of the bitmap from byte `offset` on (little-endian words, as on
    /// disk), for sending to the peer; empty past the end. `offset` is rounded down to a word.
    pub fn bytes_at(&self, offset: u64, max: usize) -> Vec<u8> {
        let first = (offset / 8) as usize;
        let count = (max / 8).max(1);
        self.words.iter().skip(first).take(count).flat_map(|w| w.to_le_bytes()).collect()
    }

    /// ORs in bytes that [`bytes_at`](Self::bytes_at) produced at `offset` on a bitmap of the
    /// same geometry. Bits past the volume's end and bytes past the bitmap are ignored, so a
    /// peer cannot make this node count bytes that do not exist.
    pub fn or_bytes(&mut self, offset: u64, bytes: &[u8]) {
        let first = (offset / 8) as usize;
        for (i, chunk) in bytes.chunks_exact(8).enumerate() {
            let at = first + i;
            if at >= self.words.len() {
                return;
            }
            let mut v = [0u8; 8];
            v.copy_from_slice(chunk);
            let old = self.words[at];
            let new = old | (u64::from_le_bytes(v) & self.valid_mask(at));
            if new != old {
                self.set_bits += u64::from((new ^ old).count_ones());
                self.words[at] = new;
                let page = at / WORDS_PER_PAGE;
                self.dirty_pages[page / 64] |= 1 << (page % 64);
            }
        }
    }

    /// Pages of the bitmap that hold the bits of byte range `range`.
    pub fn pages_of(&self, range: Range<u64>) -> Range<usize> {
        let end = range.end.min(self.size);
        if range.start >= end {
            return 0..0;
        }
        let g = u64::from(self.granularity());
        let first = (range.start >> self.shift) / BITS_PER_PAGE;
        let last = (end.div_ceil(g) - 1) / BITS_PER_PAGE;
        first as usize..last as usize + 1
    }

    /// Whether `page` changed in memory since it was last handed out by [`take_page`].
    ///
    /// [`take_page`]: Self::take_page
    pub fn page_is_dirty(&self, page: usize) -> bool {
        page < self.pages() && self.dirty_pages[page / 64] & (1 << (page % 64)) != 0
    }

    /// The pages changed in memory, in order.
    pub fn dirty_pages(&self) -> Vec<usize> {
        (0..self.pages()).filter(|&p| self.page_is_dirty(p)).collect()
    }

    /// The bytes of `page` as they go to disk, and the page counted clean: the caller now owns
    /// getting them there. Out-of-range pages are an error, not a panic.
    pub fn take_page(&mut self, page: usize) -> Result<Box<[u8; PAGE]>, BitmapError> {
        let words = self.page_words(page)?;
        let mut out = Box::new([0u8; PAGE]);
        for (chunk, w) in out.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        self.dirty_pages[page / 64] &= !(1 << (page % 64));
        Ok(out)
    }

    /// Loads `page` from its on-disk bytes (at open). Bits past the volume's end are ignored,
    /// so a damaged tail cannot make `dirty_bytes` count bytes that do not exist.
    pub fn load_page(&mut self, page: usize, bytes: &[u8; PAGE]) -> Result<(), BitmapError> {
        self.page_words(page)?;
        for (i, chunk) in bytes.chunks_exact(8).enumerate() {
            let at = page * WORDS_PER_PAGE + i;
            let mut v = [0u8; 8];
            v.copy_from_slice(chunk);
            let new = u64::from_le_bytes(v) & self.valid_mask(at);
            self.set_bits -= u64::from(self.words[at].count_ones());
            self.set_bits += u64::from(new.count_ones());
            self.words[at] = new;
        }
        Ok(())
    }

    fn page_words(&self, page: usize) -> Result<&[u64], BitmapError> {
        let last = self.pages().saturating_sub(1);
        if page >= self.pages() {
            return Err(BitmapError::Page { page, last });
        }
        Ok(&self.words[page * WORDS_PER_PAGE..(page + 1) * WORDS_PER_PAGE])
    }

    /// The bits of word `at` that lie inside the volume.
    fn valid_mask(&self, at: usize) -> u64 {
        let first = at as u64 * 64;
        match self.bits.saturating_sub(first) {
            0 => 0,
            n if n >= 64 => u64::MAX,
            n => (1 << n) - 1,
        }
    }

    fn bit(&self, b: u64) -> bool {
        self.words[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    /// Sets or clears bits `bits`, word by word, counting and marking the pages that changed.
    fn apply(&mut self, bits: Range<u64>, set: bool) {
        let mut b = bits.start;
        while b < bits.end {
            let w = (b / 64) as usize;
            let lo = b % 64;
            let n = (bits.end - b).min(64 - lo);
            let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << lo };
            let old = self.words[w];
            let new = if set { old | mask } else { old & !mask };
            if new != old {
                self.words[w] = new;
                let changed = u64::from((new ^ old).count_ones());
                self.set_bits = if set { self.set_bits + changed } else { self.set_bits - changed };
                let page = w / WORDS_PER_PAGE;
                self.dirty_pages[page / 64] |= 1 << (page % 64);
            }
            b += n;
        }
    }

    /// The first set bit at or after `from`.
    fn next_set(&self, from: u64) -> Option<u64> {
        self.scan(from, self.bits, |w| w)
    }

    /// The first clear bit at or after `from` (or `bits`).
    fn next_clear(&self, from: u64) -> u64 {
        self.scan(from, self.bits, |w| !w).unwrap_or(self.bits)
    }

    /// The first bit in `from..to` for which `f(word)` has a 1, word by word.
    fn scan(&self, from: u64, to: u64, f: impl Fn(u64) -> u64) -> Option<u64> {
        let to = to.min(self.bits);
        if from >= to {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut word = f(self.words[w]) & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                let b = w as u64 * 64 + u64::from(word.trailing_zeros());
                return (b < to).then_some(b);
            }
            w += 1;
            if w as u64 * 64 >= to {
                return None;
            }
            word = f(self.words[w]);
        }
    }
}

/// Iterator of [`Bitmap::ranges_from`].
#[derive(Debug)]
pub struct Ranges<'a> {
    map: &'a Bitmap,
    next_bit: u64,
    from: u64,
}

impl Iterator for Ranges<'_> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        loop {
            let first = self.map.next_set(self.next_bit)?;
            let end = self.map.next_clear(first);
            self.next_bit = end;
            let shift = self.map.shift;
            let start = (first << shift).max(self.from);
            let stop = (end << shift).min(self.map.size);
            // Empty when `from` lies at or past the end of the last (short) granule's run.
            if start < stop {
                return Some(start..stop);
            }
        }
    }
}

fn pages_for_bits(bits: u64) -> usize {
    (bits.div_ceil(BITS_PER_PAGE) as usize).max(1)
}

#[cfg(test)]
#[path = "bitmap_tests.rs"]
mod tests;
