//! Tests of [`Dirty`]: the ordering of metadata writes, crash recovery, and design.md §4's
//! invariant under random writes, evictions, flushes, crashes (unflushed writes dropped in any
//! subset, one torn, power cut in the middle of a metadata write) and recoveries, against a
//! model.

use std::collections::BTreeSet;
use std::ops::Range;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestError, TestRng, TestRunner};

use super::*;
use crate::meta::al::AlConfig;

const SIZE: u64 = 512 << 20;
const G: u64 = 4096;
const EXT: u64 = 1 << 20;

/// A disk with a volatile write cache: writes are durable only after a flush; a crash keeps any
/// subset of the unflushed ones and may tear one; a power cut can be planned after n I/O calls.
#[derive(Debug, Clone)]
struct MemIo {
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
    cut_after: Option<usize>,
    /// Every call, for ordering checks: (offset, len) of a write, or None for a flush.
    log: Vec<Option<(u64, usize)>>,
}

impl MemIo {
    fn new(len: u64) -> MemIo {
        MemIo { durable: vec![0; len as usize], pending: Vec::new(), cut_after: None, log: vec![] }
    }

    fn tick(&mut self) -> io::Result<()> {
        match self.cut_after {
            Some(0) => Err(io::Error::other("power cut")),
            Some(n) => {
                self.cut_after = Some(n - 1);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Power loss: unflushed write `i` survives if bit `i % 64` of `keep`; the last one that does
    /// not survive is torn after `tear` bytes when `tear` is given.
    fn crash(&mut self, keep: u64, tear: Option<u16>) {
        let pending = std::mem::take(&mut self.pending);
        let last_lost = (0..pending.len()).rev().find(|i| keep & (1 << (i % 64)) == 0);
        for (i, (off, data)) in pending.into_iter().enumerate() {
            let n = match (keep & (1 << (i % 64)) != 0, tear) {
                (true, _) => data.len(),
                (false, Some(t)) if Some(i) == last_lost => usize::from(t) % data.len(),
                (false, _) => 0,
            };
            self.durable[off as usize..off as usize + n].copy_from_slice(&data[..n]);
        }
        self.cut_after = None;
    }
}

impl MetaIo for MemIo {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let (at, len) = (offset as usize, buf.len());
        buf.copy_from_slice(&self.durable[at..at + len]);
        for (off, data) in &self.pending {
            let (s, e) = ((*off as usize).max(at), (*off as usize + data.len()).min(at + len));
            if s < e {
                buf[s - at..e - at].copy_from_slice(&data[s - *off as usize..e - *off as usize]);
            }
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.tick()?;
        self.log.push(Some((offset, buf.len())));
        self.pending.push((offset, buf.to_vec()));
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tick()?;
        self.log.push(None);
        for (off, data) in std::mem::take(&mut self.pending) {
            self.durable[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }
}

fn areas(hot: u32) -> Areas {
    Areas::layout(SIZE, G as u32, AlConfig { extent_size: EXT, extents: hot })
}

fn open(io: &mut MemIo, hot: u32) -> Dirty {
    Dirty::open(io, areas(hot), SIZE, G as u32).expect("open")
}

fn persist(d: &mut Dirty, io: &mut MemIo, mw: MetaWrite) {
    mw.apply(io).expect("apply");
    d.persisted(mw.seq()).expect("in order");
}

#[test]
fn a_hit_costs_nothing_and_a_miss_writes_one_flushed_transaction() {
    let mut io = MemIo::new(areas(4).end());
    let mut d = open(&mut io, 4);
    let Admit::Persist(mw) = d.before_write(0..4096).unwrap() else { panic!("miss expected") };
    persist(&mut d, &mut io, mw);
    assert_eq!(io.log, vec![Some((areas(4).al_offset + PAGE as u64, PAGE)), None]);
    let before = io.log.len();
    assert!(matches!(d.before_write(EXT - 10..EXT).unwrap(), Admit::Go));
    assert_eq!(io.log.len(), before, "a hit wrote nothing");
}

/// Issue 13: a sequential stream makes the next extents hot with its miss, so it pays one
/// transaction per five extents after its first; random writes (not continuing the last one)
/// do not.
#[test]
fn a_sequential_stream_makes_extents_hot_ahead_in_one_transaction() {
    let mut io = MemIo::new(areas(64).end());
    let mut d = open(&mut io, 64);
    let mut transactions = 0;
    for i in 0..10 * EXT / 65536 {
        let (off, len) = (i * 65536, 65536);
        let admit = d.before_write(off..off + len).unwrap();
        if let Admit::Persist(mw) = admit {
            transactions += 1;
            persist(&mut d, &mut io, mw);
        }
        d.write_done(off..off + len, 0);
    }
    assert_eq!(transactions, 3, "10 extents written in order: misses at extents 0, 1 and 6");
    // Not sequential: a miss brings its own extent only.
    let far = 20 * EXT;
    assert!(matches!(d.before_write(far..far + 4096).unwrap(), Admit::Persist(_)));
    assert_eq!(d.hot_extents().len(), 12, "0..=10 for the stream, and the random one");
}

/// design.md §4: "before an extent is evicted from the log, its bitmap bits are written out".
#[test]
fn eviction_writes_the_victims_pages_then_flushes_then_the_transaction() {
    let a = areas(1);
    let mut io = MemIo::new(a.end());
    let mut d = open(&mut io, 1);
    let Admit::Persist(mw) = d.before_write(0..4096).unwrap() else { panic!() };
    persist(&mut d, &mut io, mw);
    assert!(d.mark_out_of_sync(0..4096).is_none(), "hot: the log covers the bit");
    assert!(matches!(d.before_write(5 * EXT..5 * EXT + 1).unwrap(), Admit::Busy));
    d.write_done(0..4096, 0);
    assert!(matches!(d.before_write(5 * EXT..5 * EXT + 1).unwrap(), Admit::Busy), "unflushed");
    assert!(d.waits_for_flush());
    d.data_flushed(1);
    io.log.clear();
    let Admit::Persist(mw) = d.before_write(5 * EXT..5 * EXT + 1).unwrap() else { panic!() };
    persist(&mut d, &mut io, mw);
    let al_slot = a.al_offset + 2 * PAGE as u64;
    assert_eq!(io.log, vec![Some((a.bitmap_offset, PAGE)), None, Some((al_slot, PAGE)), None]);
    let reopened = open(&mut io, 1);
    assert_eq!(reopened.ranges_from(0).collect::<Vec<_>>(), vec![0..4096]);
    assert_eq!(reopened.hot_extents(), vec![5]);
}

/// design.md §4: "after a crash of the primary, its activity-log extents are added to its bitmap".
#[test]
fn after_crash_of_primary_logged_extents_join_the_bitmap_and_the_log_empties() {
    let mut io = MemIo::new(areas(8).end());
    let mut d = open(&mut io, 8);
    for r in [0..10, 3 * EXT..3 * EXT + 5] {
        if let Admit::Persist(mw) = d.before_write(r).unwrap() {
            persist(&mut d, &mut io, mw);
        }
    }
    io.crash(0, None);
    let mut d = open(&mut io, 8);
    assert_eq!(d.hot_extents(), vec![0, 3]);
    let mw = d.after_crash_of_primary().expect("something to move");
    persist(&mut d, &mut io, mw);
    let want = vec![0..EXT, 3 * EXT..4 * EXT];
    assert_eq!(d.ranges_from(0).collect::<Vec<_>>(), want);
    let mut again = open(&mut io, 8);
    assert!(again.hot_extents().is_empty());
    assert_eq!(again.ranges_from(0).collect::<Vec<_>>(), want);
    assert!(again.after_crash_of_primary().is_none());
}

#[test]
fn concurrent_writers_wait_for_an_unpersisted_transaction_and_order_is_enforced() {
    let mut io = MemIo::new(areas(4).end());
    let mut d = open(&mut io, 4);
    let Admit::Persist(first) = d.before_write(0..1).unwrap() else { panic!() };
    assert!(matches!(d.before_write(1..2).unwrap(), Admit::After(s) if s == first.seq()));
    let Admit::Persist(second) = d.before_write(EXT..EXT + 1).unwrap() else { panic!() };
    assert!(matches!(d.persisted(second.seq()), Err(DirtyError::OutOfOrder { .. })));
    persist(&mut d, &mut io, first);
    assert!(matches!(d.before_write(2..3).unwrap(), Admit::Go));
    persist(&mut d, &mut io, second);
}

#[test]
fn out_of_sync_outside_the_log_needs_its_pages_written_and_flush_writes_only_changes() {
    let mut io = MemIo::new(areas(4).end());
    let mut d = open(&mut io, 4);
    let mw = d.mark_out_of_sync(300 << 20..(300 << 20) + 1).expect("cold range");
    assert_eq!(mw.bytes(), PAGE as u64);
    persist(&mut d, &mut io, mw);
    assert!(d.flush().is_none(), "nothing changed since");
    d.clear_synced(0..SIZE);
    assert_eq!(d.dirty_bytes(), 0);
    let mw = d.flush().expect("the cleared page");
    assert_eq!(mw.bytes(), PAGE as u64);
    persist(&mut d, &mut io, mw);
    assert_eq!(open(&mut io, 4).dirty_bytes(), 0);
}

#[test]
fn too_short_bitmap_area_is_refused() {
    let mut io = MemIo::new(areas(4).end());
    let short = Areas { bitmap_len: PAGE as u64, ..areas(4) };
    assert!(matches!(
        Dirty::open(&mut io, short, SIZE, G as u32),
        Err(DirtyError::BitmapTooShort { .. })
    ));
}

/// A metadata file written before the areas existed gets them, and they survive reopen and
/// later superblock stores.
#[test]
fn file_without_areas_gets_them_and_keeps_them() {
    use crate::meta::MetaFile;
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("v.meta");
    let (mf, meta) = MetaFile::open_or_create(&path, SIZE, "alpha", true).expect("create");
    assert_eq!(mf.areas(), None);
    let (a, mut fio) = mf.open_areas(&meta, AlConfig::default()).expect("areas");
    let mut d = Dirty::open(&mut fio, a, SIZE, meta.granularity).expect("dirty");
    let Admit::Persist(mw) = d.before_write(9 << 20..10 << 20).unwrap() else { panic!() };
    mw.apply(&mut fio).expect("apply");
    d.persisted(mw.seq()).unwrap();
    mf.store(&meta).expect("store keeps the areas");
    drop((mf, fio));
    let (mf, meta) = MetaFile::open_or_create(&path, SIZE, "alpha", false).expect("reopen");
    assert_eq!(mf.areas(), Some(a));
    let (_, mut fio) =
        mf.open_areas(&meta, AlConfig { extents: 7, ..AlConfig::default() }).unwrap();
    let d = Dirty::open(&mut fio, a, SIZE, meta.granularity).expect("dirty again");
    assert_eq!(d.hot_extents(), vec![2]);
}

// ---- the property test -------------------------------------------------------------------

const HOT: u32 = 3;

#[derive(Debug, Clone)]
enum Op {
    /// A write into extent `ext` (of 10, so the 3-extent log both hits and evicts).
    Write {
        ext: u64,
        off: u64,
        len: u64,
        degraded: bool,
        done: bool,
        cut: Option<u8>,
    },
    /// The oldest write in flight completes; `degraded`: the peer never acknowledged it.
    Done {
        degraded: bool,
    },
    Flush {
        cut: Option<u8>,
    },
    /// A data flush completed on both nodes: completed writes are durable everywhere.
    DataFlush,
    /// Resync (or the peer's ack) made a range clean; never one under a write in flight.
    Sync {
        start: u64,
        len: u64,
    },
    /// A difference found anywhere (verify, transfer log of a lost link).
    Mark {
        start: u64,
        len: u64,
        cut: Option<u8>,
    },
    Crash {
        keep: u64,
        tear: Option<u16>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let cut = proptest::option::weighted(0.15, 0..4u8);
    prop_oneof![
        6 => (0..10u64, 0..EXT, 1..(300u64 << 10), any::<bool>(), any::<bool>(), cut.clone())
            .prop_map(|(ext, off, len, degraded, done, cut)| Op::Write { ext, off, len, degraded, done, cut }),
        3 => any::<bool>().prop_map(|degraded| Op::Done { degraded }),
        1 => cut.clone().prop_map(|cut| Op::Flush { cut }),
        1 => Just(Op::DataFlush),
        1 => (0..12 * EXT, 1..(2 * EXT)).prop_map(|(start, len)| Op::Sync { start, len }),
        1 => (0..SIZE, 1..(64u64 << 10), cut).prop_map(|(start, len, cut)| Op::Mark { start, len, cut }),
        1 => (any::<u64>(), proptest::option::of(any::<u16>())).prop_map(|(keep, tear)| Op::Crash { keep, tear }),
    ]
}

/// The model: granules that may differ because they were marked, and writes in flight.
struct Harness {
    io: MemIo,
    d: Dirty,
    /// Granule numbers.
    marked: BTreeSet<u64>,
    in_flight: Vec<Range<u64>>,
    /// Completed writes no data flush on both nodes has covered yet: a power cut may leave
    /// them on one node only, so they may differ too.
    unflushed: Vec<Range<u64>>,
    /// Data flush epoch (see `Tracker`): writes complete in it, a flush covers the earlier ones.
    epoch: u64,
    mutant: Mutant,
    /// Crash parameters after a planned power cut.
    rng: u64,
}

impl Harness {
    fn new(mutant: Mutant) -> Harness {
        let mut io = MemIo::new(areas(HOT).end());
        let mut d = open(&mut io, HOT);
        d.mutant = mutant;
        let marked = BTreeSet::new();
        let (in_flight, unflushed) = (Vec::new(), Vec::new());
        let rng = 0x9e37_79b9_7f4a_7c15;
        Harness { io, d, marked, in_flight, unflushed, epoch: 0, mutant, rng }
    }

    fn mark(&mut self, r: Range<u64>) {
        let end = r.end.min(SIZE);
        self.marked.extend(r.start / G..end.div_ceil(G));
    }

    /// Applies `mw` with a power cut planned after `cut` I/O calls; on a cut, crashes and
    /// recovers, and returns false.
    fn apply(&mut self, mw: MetaWrite, cut: Option<u8>) -> Result<bool, TestCaseError> {
        self.io.cut_after = cut.map(usize::from);
        let r = mw.apply(&mut self.io);
        self.io.cut_after = None;
        if r.is_err() {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let (keep, tear) = (self.rng, Some((self.rng >> 20) as u16));
            self.crash(keep, tear)?;
            return Ok(false);
        }
        self.d.persisted(mw.seq()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        Ok(true)
    }

    fn write(&mut self, r: Range<u64>, degraded: bool, done: bool, cut: Option<u8>) -> TestResult {
        loop {
            match self.d.before_write(r.clone()).map_err(|e| TestCaseError::fail(e.to_string()))? {
                Admit::Go => break,
                Admit::Persist(mw) => {
                    if !self.apply(mw, cut)? {
                        return Ok(()); // cut before the data write could start
                    }
                    break;
                }
                Admit::After(s) => {
                    return Err(TestCaseError::fail(format!("after {s} in serial use")))
                }
                Admit::Busy if self.in_flight.is_empty() && !self.d.waits_for_flush() => {
                    return Err(TestCaseError::fail("busy, idle, nothing to flush"))
                }
                Admit::Busy if self.in_flight.is_empty() => self.data_flush(),
                Admit::Busy => self.done(false)?,
            }
        }
        self.in_flight.push(r.clone());
        if degraded {
            self.mark(r.clone());
            prop_assert!(self.d.mark_out_of_sync(r).is_none(), "pinned range not hot");
        }
        if done {
            self.done(false)?;
        }
        Ok(())
    }

    fn done(&mut self, degraded: bool) -> TestResult {
        if self.in_flight.is_empty() {
            return Ok(());
        }
        let r = self.in_flight.remove(0);
        if degraded {
            self.mark(r.clone());
            prop_assert!(self.d.mark_out_of_sync(r.clone()).is_none(), "pinned range not hot");
        }
        self.d.write_done(r.clone(), self.epoch);
        self.unflushed.push(r);
        Ok(())
    }

    /// A flush starts (new epoch) and completes on both nodes.
    fn data_flush(&mut self) {
        self.epoch += 1;
        self.unflushed.clear();
        self.d.data_flushed(self.epoch);
    }

    fn sync(&mut self, start: u64, len: u64) {
        let r = start..(start + len).min(SIZE);
        let overlaps = |w: &Range<u64>| w.start < r.end && r.start < w.end;
        if self.in_flight.iter().any(overlaps) {
            return; // interval-locked against the write in flight
        }
        // An unflushed write stays in `unflushed`: copying it makes it no more durable.
        self.d.clear_synced(r.clone());
        let (first, last) = (r.start.div_ceil(G), r.end / G);
        if first >= last {
            return;
        }
        let gone: Vec<u64> = self.marked.range(first..last).copied().collect();
        for g in gone {
            self.marked.remove(&g);
        }
    }

    /// The heart: after the crash, what the disk says covers what may differ; after recovery
    /// (itself possibly cut once) the bitmap alone covers it.
    fn crash(&mut self, keep: u64, tear: Option<u16>) -> TestResult {
        self.io.crash(keep, tear);
        for w in std::mem::take(&mut self.in_flight) {
            self.mark(w); // a write in flight at a crash may have reached one node only
        }
        for w in std::mem::take(&mut self.unflushed) {
            self.mark(w); // completed, but maybe in one node's volatile cache only
        }
        self.recover(keep, tear, Some((keep % 5) as usize))
    }

    /// Opens what the crash left and runs the primary's recovery, which may itself be cut once.
    fn recover(&mut self, keep: u64, tear: Option<u16>, cut: Option<usize>) -> TestResult {
        self.d = open(&mut self.io, HOT);
        self.d.mutant = self.mutant;
        self.check_covered("after crash")?;
        if let Some(mw) = self.d.after_crash_of_primary() {
            self.io.cut_after = cut;
            let r = mw.apply(&mut self.io);
            self.io.cut_after = None;
            if r.is_err() {
                self.io.crash(keep.rotate_left(7), tear);
                return self.recover(keep, tear, None);
            }
            self.d.persisted(mw.seq()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        prop_assert!(self.d.hot_extents().is_empty(), "log not emptied by recovery");
        self.check_covered("after recovery")
    }

    fn check_covered(&self, when: &str) -> TestResult {
        let hot = self.d.hot_extents();
        for &g in &self.marked {
            let off = g * G;
            let covered =
                self.d.bitmap().test(off..off + 1) || hot.binary_search(&(off / EXT)).is_ok();
            prop_assert!(
                covered,
                "{when}: granule at {off:#x} may differ but is neither dirty nor hot"
            );
        }
        Ok(())
    }
}

type TestResult = Result<(), TestCaseError>;

fn run_ops(mutant: Mutant, ops: Vec<Op>) -> TestResult {
    let mut h = Harness::new(mutant);
    for op in ops {
        match op {
            Op::Write { ext, off, len, degraded, done, cut } => {
                let start = ext * EXT + off;
                h.write(start..start + len, degraded, done, cut)?;
            }
            Op::Done { degraded } => h.done(degraded)?,
            Op::Flush { cut } => {
                if let Some(mw) = h.d.flush() {
                    h.apply(mw, cut)?;
                }
            }
            Op::DataFlush => h.data_flush(),
            Op::Sync { start, len } => h.sync(start, len),
            Op::Mark { start, len, cut } => {
                let r = start..start + len;
                match h.d.mark_out_of_sync(r.clone()) {
                    None => h.mark(r),
                    Some(mw) => {
                        if h.apply(mw, cut)? {
                            h.mark(r);
                        }
                    }
                }
            }
            Op::Crash { keep, tear } => h.crash(keep, tear)?,
        }
    }
    h.crash(0, Some(100))
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op(), 1..120)
}

proptest! {
    #![proptest_config(Config { cases: 200, ..Config::default() })]

    /// design.md §4's invariant under random writes, evictions, flushes, crashes and recoveries.
    #[test]
    fn bitmap_and_log_cover_every_range_that_may_differ(ops in ops()) {
        run_ops(Mutant::None, ops)?;
    }
}

/// Runs the property with a deliberately broken `Dirty`: it must fail.
fn mutant_is_caught(mutant: Mutant) -> bool {
    let config =
        Config { cases: 400, max_shrink_iters: 0, failure_persistence: None, ..Config::default() };
    let rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
    let mut runner = TestRunner::new_with_rng(config, rng);
    matches!(runner.run(&ops(), |ops| run_ops(mutant, ops)), Err(TestError::Fail(..)))
}

#[test]
fn the_property_catches_a_transaction_that_is_not_flushed() {
    assert!(mutant_is_caught(Mutant::NoAlFlush));
}

#[test]
fn the_property_catches_an_eviction_without_its_bitmap_pages() {
    assert!(mutant_is_caught(Mutant::NoEvictPages));
}

/// Issue 17: an extent evicted once its write completed, before a flush made it durable on
/// both nodes; a power cut then leaves a difference nothing records.
#[test]
fn the_property_catches_an_eviction_of_unflushed_writes() {
    assert!(mutant_is_caught(Mutant::EvictUnflushed));
}

/// Bitmap pages written but never flushed: a crash may drop them while the log moved on.
#[test]
fn the_property_catches_a_missing_flush_between_pages_and_transaction() {
    assert!(mutant_is_caught(Mutant::NoPageFlush));
}
