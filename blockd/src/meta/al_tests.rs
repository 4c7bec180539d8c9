//! Tests of the activity log: LRU, pins, transaction pages and recovery from the ring.

use super::*;

fn small(n: u32) -> ActivityLog {
    ActivityLog::new(AlConfig { extent_size: 1 << 20, extents: n }, None).unwrap()
}

#[test]
fn hits_cost_nothing_and_misses_evict_the_least_recently_used() {
    let mut al = small(3);
    let t1 = al.make_hot(0..2).unwrap().expect("miss");
    assert_eq!((t1.seq, t1.made_hot.clone(), t1.evicted.clone()), (1, vec![0, 1], vec![]));
    assert_eq!(al.make_hot(2..3).unwrap().expect("miss").hot, vec![0, 1, 2]);
    assert_eq!(al.make_hot(0..1).unwrap(), None, "hit");
    let t = al.make_hot(5..6).unwrap().expect("miss");
    assert_eq!((t.seq, t.evicted.clone(), t.hot.clone()), (3, vec![1], vec![0, 2, 5]));
}

#[test]
fn pinned_extents_are_never_evicted_and_a_full_log_is_busy() {
    let mut al = small(2);
    al.make_hot(0..2).unwrap();
    al.pin(0..2);
    assert_eq!(al.make_hot(7..8), Err(AlError::Busy));
    assert_eq!(al.hot_extents(), vec![0, 1], "busy changed nothing");
    al.unpin(1..2, 0);
    assert_eq!(al.make_hot(7..8), Err(AlError::Busy), "completed, but flushed nowhere yet");
    assert!(al.waits_for_flush());
    al.flushed(1);
    assert!(!al.waits_for_flush());
    assert_eq!(al.make_hot(7..8).unwrap().expect("miss").evicted, vec![1]);
    assert_eq!(al.make_hot(0..3), Err(AlError::TooWide { wanted: 3, hot: 2 }));
}

/// DRBD's rule: an extent leaves the log only once a flush on both nodes, started after its
/// last write completed, has completed; a flush of that write's own epoch is not enough.
#[test]
fn an_extent_is_evicted_only_after_a_flush_covers_its_last_write() {
    let mut al = small(1);
    al.make_hot(0..1).unwrap();
    al.pin(0..1);
    al.unpin(0..1, 3); // completed while flush epoch 3 was the newest started
    al.flushed(3); // that flush started before the write completed: it may not cover it
    assert_eq!(al.make_hot(1..2), Err(AlError::Busy));
    al.flushed(4);
    assert_eq!(al.make_hot(1..2).unwrap().expect("miss").evicted, vec![0]);
    // Extents recovered from disk had no write in this process: evictable at once.
    let t = Transaction { seq: 9, hot: vec![5], made_hot: vec![], evicted: vec![] };
    let mut al = ActivityLog::new(AlConfig { extent_size: 1 << 20, extents: 1 }, Some(&t)).unwrap();
    assert_eq!(al.make_hot(0..1).unwrap().expect("miss").evicted, vec![5]);
}

#[test]
fn config_is_checked() {
    let c = AlConfig::default();
    assert_eq!((c.extent_size, c.extents), (4 << 20, 512));
    assert!(c.check().is_ok());
    assert!(AlConfig { extents: 0, ..c }.check().is_err());
    assert!(AlConfig { extents: MAX_EXTENTS + 1, ..c }.check().is_err());
    assert!(AlConfig { extents: MAX_EXTENTS, ..c }.check().is_ok());
    assert!(AlConfig { extent_size: 3 << 20, ..c }.check().is_err());
    assert!(AlConfig { extent_size: 1 << 19, ..c }.check().is_err());
    assert_eq!(c.extents_of(0..(4 << 20) + 1), 0..2);
    assert_eq!(c.extents_of(5..5), 0..0);
}

#[test]
fn transaction_round_trips_even_when_full() {
    let hot: Vec<u64> = (0..u64::from(MAX_EXTENTS)).map(|e| e * 3).collect();
    let t = Transaction { seq: 77, hot: hot.clone(), made_hot: vec![9], evicted: vec![4] };
    let back = Transaction::decode(&t.encode()).unwrap();
    assert_eq!(back.hot, hot, "the hot set always fits");
    assert!(back.made_hot.is_empty() && back.evicted.is_empty(), "informational lists cut");
    let t = Transaction { seq: 5, hot: vec![1, 2], made_hot: vec![2], evicted: vec![8] };
    assert_eq!(Transaction::decode(&t.encode()).unwrap(), t);
    assert_eq!(t.slot(), 1);
}

#[test]
fn every_torn_or_flipped_page_is_refused() {
    let t = Transaction { seq: 5, hot: vec![1, 2, 3], made_hot: vec![3], evicted: vec![] };
    let good = t.encode();
    for at in (0..PAGE).step_by(13).chain([PAGE - 1]) {
        let mut bad = good.clone();
        bad[at] ^= 0x04;
        assert!(Transaction::decode(&bad).is_err(), "flip at {at}");
    }
    let mut torn = Box::new([0u8; PAGE]);
    torn[..512].copy_from_slice(&good[..512]);
    assert!(Transaction::decode(&torn).is_err());
    assert!(Transaction::decode(&[0u8; PAGE]).is_err());
}

#[test]
fn recover_takes_the_newest_valid_slot_and_resumes_its_sequence() {
    let mut al = small(4);
    let mut ring: Vec<Box<[u8; PAGE]>> = (0..RING_SLOTS).map(|_| Box::new([0u8; PAGE])).collect();
    assert_eq!(recover(&ring), None);
    for e in 0..6 {
        let t = al.make_hot(e..e + 1).unwrap().unwrap();
        ring[t.slot() as usize] = t.encode();
    }
    let newest = recover(&ring).unwrap();
    assert_eq!((newest.seq, newest.hot.clone()), (6, vec![2, 3, 4, 5]));
    ring[newest.slot() as usize][100] ^= 1;
    let before = recover(&ring).unwrap();
    assert_eq!((before.seq, before.hot.clone()), (5, vec![1, 2, 3, 4]));
    let mut again = ActivityLog::new(al.config(), Some(&before)).unwrap();
    assert_eq!(again.hot_extents(), vec![1, 2, 3, 4]);
    assert_eq!(again.make_hot(9..10).unwrap().unwrap().seq, 6, "overwrites the torn slot");
}
