//! Tests of the dirty bitmap: rounding rules, ranges, page tracking, and a model check.

use proptest::prelude::*;

use super::*;

const K4: u64 = 4096;

#[test]
fn set_widens_outward_and_clear_narrows_inward() {
    let mut b = Bitmap::new(1 << 20, 4096).unwrap();
    b.set(100..K4 + 1);
    assert_eq!(b.ranges_from(0).collect::<Vec<_>>(), vec![0..2 * K4]);
    b.clear(1..2 * K4);
    assert_eq!(b.ranges_from(0).collect::<Vec<_>>(), vec![0..K4], "partial granule 0 stays");
    b.clear(0..K4 - 1);
    assert!(b.test(0..1));
    b.clear(0..K4);
    assert_eq!(b.dirty_bytes(), 0);
}

#[test]
fn short_last_granule_counts_its_real_bytes_and_clears_at_the_end() {
    let size = 3 * K4 + 512;
    let mut b = Bitmap::new(size, 4096).unwrap();
    b.set(size - 1..size);
    assert_eq!(b.dirty_bytes(), 512);
    assert_eq!(b.ranges_from(0).collect::<Vec<_>>(), vec![3 * K4..size]);
    b.clear(3 * K4..size);
    assert_eq!(b.dirty_bytes(), 0);
    b.set(0..u64::MAX);
    assert_eq!(b.dirty_bytes(), size);
}

#[test]
fn ranges_from_merges_and_starts_at_offset() {
    let mut b = Bitmap::new(64 << 20, 65536).unwrap();
    b.set(0..65536 * 3);
    b.set(1 << 20..(1 << 20) + 1);
    let all: Vec<_> = b.ranges_from(0).collect();
    assert_eq!(all, vec![0..3 * 65536, 1 << 20..(1 << 20) + 65536]);
    let resumed: Vec<_> = b.ranges_from(70000).collect();
    assert_eq!(resumed, vec![70000..3 * 65536, 1 << 20..(1 << 20) + 65536]);
    assert_eq!(b.ranges_from(2 << 20).count(), 0);
}

#[test]
fn bad_granularity_and_geometry_are_errors() {
    assert_eq!(Bitmap::new(1, 2048), Err(BitmapError::Granularity(2048)));
    assert_eq!(Bitmap::new(1, 3 << 12), Err(BitmapError::Granularity(3 << 12)));
    assert!(Bitmap::new(1, 2 << 20).is_err());
    let mut a = Bitmap::new(1 << 30, 4096).unwrap();
    assert!(a.union(&Bitmap::new(1 << 30, 8192).unwrap()).is_err());
    assert!(a.union(&Bitmap::new(1 << 29, 4096).unwrap()).is_err());
    assert!(a.take_page(a.pages()).is_err());
}

#[test]
fn only_changed_pages_are_dirty_and_take_page_cleans_them() {
    // 4 KiB granules, 128 MiB per page: a 1 GiB volume has 8 pages.
    let mut b = Bitmap::new(1 << 30, 4096).unwrap();
    assert_eq!(b.pages(), 8);
    assert_eq!(Bitmap::bytes_for(1 << 30, 4096), 8 * PAGE as u64);
    b.set(300 << 20..(300 << 20) + 1);
    assert_eq!(b.dirty_pages(), vec![2]);
    assert_eq!(b.pages_of(127 << 20..129 << 20), 0..2);
    let bytes = b.take_page(2).unwrap();
    assert!(b.dirty_pages().is_empty());
    b.set(300 << 20..(300 << 20) + 1);
    assert!(b.dirty_pages().is_empty(), "setting a set bit changes nothing");
    let mut fresh = Bitmap::new(1 << 30, 4096).unwrap();
    fresh.load_page(2, &bytes).unwrap();
    assert_eq!(fresh.ranges_from(0).collect::<Vec<_>>(), vec![300 << 20..(300 << 20) + 4096]);
}

#[test]
fn load_page_ignores_bits_past_the_end() {
    let mut b = Bitmap::new(10 * K4, 4096).unwrap();
    b.load_page(0, &[0xff; PAGE]).unwrap();
    assert_eq!(b.dirty_bytes(), 10 * K4);
    assert_eq!(b.ranges_from(0).collect::<Vec<_>>(), vec![0..10 * K4]);
}

#[test]
fn union_adds_the_other_side_and_marks_pages() {
    let mut a = Bitmap::new(1 << 30, 4096).unwrap();
    let mut b = Bitmap::new(1 << 30, 4096).unwrap();
    a.set(0..K4);
    b.set(K4..2 * K4);
    b.set(900 << 20..(900 << 20) + 1);
    a.take_page(0).unwrap();
    a.union(&b).unwrap();
    assert_eq!(a.dirty_bytes(), 3 * K4);
    assert_eq!(a.dirty_pages(), vec![0, 7]);
}

fn op() -> impl Strategy<Value = (bool, u64, u64)> {
    (any::<bool>(), 0..300_000u64, 1..40_000u64)
}

proptest! {
    /// Against a byte-per-granule model: every set/clear leaves the same bits, byte count and
    /// ranges.
    #[test]
    fn matches_a_granule_model(ops in proptest::collection::vec(op(), 1..60), from in 0..300_000u64) {
        let size = 290_000u64;
        let g = 4096u64;
        let mut b = Bitmap::new(size, 4096).unwrap();
        let mut model = vec![false; size.div_ceil(g) as usize];
        for (set, start, len) in ops {
            let end = (start + len).min(size);
            if set {
                b.set(start..start + len);
                for (i, m) in model.iter_mut().enumerate() {
                    let (gs, ge) = (i as u64 * g, (i as u64 + 1) * g);
                    *m |= start < end && gs < end && ge > start;
                }
            } else {
                b.clear(start..start + len);
                for (i, m) in model.iter_mut().enumerate() {
                    let (gs, ge) = (i as u64 * g, ((i as u64 + 1) * g).min(size));
                    *m &= !(gs >= start && ge <= start + len);
                }
            }
        }
        let bytes: u64 = model.iter().enumerate().filter(|(_, m)| **m)
            .map(|(i, _)| ((i as u64 + 1) * g).min(size) - i as u64 * g).sum();
        prop_assert_eq!(b.dirty_bytes(), bytes);
        let listed: u64 = b.ranges_from(0).map(|r| r.end - r.start).sum();
        prop_assert_eq!(listed, bytes);
        for r in b.ranges_from(from) {
            prop_assert!(r.start >= from && r.start < r.end);
            for i in r.start / g..r.end.div_ceil(g) {
                prop_assert!(model[i as usize]);
            }
        }
        for (i, m) in model.iter().enumerate() {
            prop_assert_eq!(b.test(i as u64 * g..i as u64 * g + 1), *m);
        }
    }
}

/// What one node serialises for its peer, the peer ORs into a bitmap of the same geometry, in
/// chunks of any size: the union, with nothing past the volume's end.
#[test]
fn bytes_round_trip_in_chunks_into_a_union() {
    let size = 40 * K4 * 64 + 512;
    let mut a = Bitmap::new(size, 4096).unwrap();
    a.set(K4..3 * K4);
    a.set(size - 1..size);
    let mut b = Bitmap::new(size, 4096).unwrap();
    b.set(10 * K4..11 * K4);
    let mut off = 0;
    while off < a.byte_len() {
        let chunk = a.bytes_at(off, 24);
        b.or_bytes(off, &chunk);
        off += chunk.len() as u64;
    }
    let mut want = a.clone();
    want.union(&Bitmap::new(size, 4096).unwrap()).unwrap();
    want.set(10 * K4..11 * K4);
    assert_eq!(b.ranges_from(0).collect::<Vec<_>>(), want.ranges_from(0).collect::<Vec<_>>());
    assert_eq!(b.dirty_bytes(), 2 * K4 + K4 + 512);
    // A hostile peer's all-ones bytes cannot count bytes past the end, nor write past the map.
    let mut c = Bitmap::new(size, 4096).unwrap();
    c.or_bytes(0, &vec![0xff; 1 << 20]);
    assert_eq!(c.dirty_bytes(), size);
    assert!(a.bytes_at(a.byte_len(), 64).is_empty());
}
