use super::*;
use crate::{
    role::{DiskState, Event},
    storage::StoreOptions,
};

const SIZE: u64 = 1 << 20;

/// A volume on a fresh sparse file; with `peer`, the two-node start state (Secondary).
pub(super) fn volume(dir: &tempfile::TempDir, peer: Option<&str>) -> Volume {
    let path = dir.path().join("v.img");
    let opts = StoreOptions::sparse_sync(path.clone(), SIZE);
    let store = Store::open(&opts).unwrap();
    let (file, meta) =
        MetaFile::open_or_create(&dir.path().join("v.meta"), SIZE, "alpha", store.created())
            .unwrap();
    let info = VolumeInfo {
        name: "v".into(),
        index: 0,
        node: "alpha".into(),
        peer: peer.map(str::to_string),
        socket: dir.path().join("v.sock"),
        backing: path,
    };
    Volume::open(info, store, meta, file, AlConfig::default()).unwrap()
}

fn stored(dir: &tempfile::TempDir) -> Meta {
    MetaFile::open_or_create(&dir.path().join("v.meta"), SIZE, "alpha", false).unwrap().1
}

pub(super) fn data(byte: u8, len: usize) -> AlignedBuf {
    AlignedBuf::copy_from(&vec![byte; len])
}

#[tokio::test]
async fn secondary_refuses_writes_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let v = volume(&dir, Some("beta"));
    assert_eq!(v.machine().role, Role::Secondary);
    assert!(matches!(v.write(0, data(7, 4096), false).await, Err(VolumeError::NotPrimary)));
    assert!(matches!(v.write_zeroes(0, 4096, true, false).await, Err(VolumeError::NotPrimary)));
    assert!(matches!(v.trim(0, 4096, false).await, Err(VolumeError::NotPrimary)));
    let on_disk = std::fs::read(dir.path().join("v.img")).unwrap();
    assert!(on_disk.iter().all(|&b| b == 0), "nothing may be written");
    assert_eq!(stored(&dir).gens, v.lock_persisted().await.meta.gens, "no rotation");
    assert_eq!(stored(&dir).gens.bitmap, 0);
}

#[tokio::test]
async fn single_node_writes_never_rotate_the_generation() {
    let dir = tempfile::tempdir().unwrap();
    let v = volume(&dir, None);
    let before = stored(&dir).gens;
    v.write(4096, data(1, 4096), true).await.unwrap();
    assert_eq!(stored(&dir).gens, before);
    assert_eq!(v.status().counters.degraded_writes, 0);
    assert_eq!(v.status().conn, ConnState::StandAlone);
}

/// design.md §5: a node promoted without its peer starts a new generation, on disk, before it
/// acknowledges anything; the peer's generation is kept as `bitmap`.
#[tokio::test]
async fn forced_primary_persists_a_new_generation_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let v = volume(&dir, Some("beta"));
    let old = stored(&dir).gens.current;
    let refused = v.transition(Event::Promote { force: false }, None).await.unwrap();
    assert!(refused.actions.iter().any(|a| matches!(a, crate::role::Action::Refuse(_))));
    assert_eq!(v.machine().role, Role::Secondary, "no peer and no --force: refused");
    v.transition(Event::Promote { force: true }, None).await.unwrap();
    assert_eq!(v.machine().role, Role::Primary);
    let m = stored(&dir);
    assert_eq!(m.gens.bitmap, old, "the peer's generation is remembered");
    assert_ne!(m.gens.current, old, "a new generation");
    assert!(m.flags.primary_when_stopped);
    v.write(0, data(9, 4096), false).await.unwrap();
    assert_eq!(stored(&dir).gens, m.gens, "one rotation per lost peer, not per write");
    assert_eq!(v.status().counters.degraded_writes, 1);
    assert_eq!(v.status().out_of_sync, 4096, "exactly the degraded write is out of sync");
}

/// design.md §4 through the volume: a degraded write's mark survives a crash (the activity log
/// covers it while only in memory, and recovery turns the log into bits); a clean stop
/// writes the bits themselves; a demotion empties the log so a later crash adds nothing.
#[tokio::test]
async fn out_of_sync_marks_survive_crash_clean_stop_and_demotion() {
    let dir = tempfile::tempdir().unwrap();
    let v = volume(&dir, Some("beta"));
    v.mark_clean(false).await.unwrap();
    v.transition(Event::Promote { force: true }, None).await.unwrap();
    v.write(8192, data(3, 4096), false).await.unwrap();
    v.write_zeroes(65536, 8192, false, false).await.unwrap();
    assert_eq!(v.dirty_bytes(), 3 * 4096);
    drop(v); // a crash: no clean stop recorded, bits only in memory
    let v = volume(&dir, Some("beta"));
    // The whole hot extent (the 1 MiB volume is inside the first 4 MiB extent) is due.
    assert_eq!(v.dirty_bytes(), SIZE, "the log's extent joined the bitmap");
    assert_eq!(v.status().out_of_sync, SIZE);
    // Recovery emptied the log: a second crash adds nothing more, and the bits stay.
    drop(v);
    let v = volume(&dir, Some("beta"));
    assert_eq!(v.dirty_bytes(), SIZE);

    // A fresh volume: write degraded, demote, crash: only the written granule is due.
    let dir = tempfile::tempdir().unwrap();
    let v = volume(&dir, Some("beta"));
    v.mark_clean(false).await.unwrap();
    v.transition(Event::Promote { force: true }, None).await.unwrap();
    v.write(4096, data(3, 4096), false).await.unwrap();
    v.transition(Event::Demote, None).await.unwrap();
    drop(v);
    let v = volume(&dir, Some("beta"));
    assert_eq!(v.dirty_bytes(), 4096, "demotion wrote the bits and emptied the log");

    // Clean stop: bits written by flush_bitmap, no recovery needed.
    v.mark_clean(false).await.unwrap();
    v.transition(Event::Promote { force: true }, None).await.unwrap();
    v.write(0, data(4, 4096), false).await.unwrap();
    v.flush_bitmap().await.unwrap();
    v.mark_clean(true).await.unwrap();
    drop(v);
    let v = volume(&dir, Some("beta"));
    assert_eq!(v.dirty_bytes(), 2 * 4096);
}

#[tokio::test]
async fn inconsistent_disk_is_never_promoted() {
    let dir = tempfile::tempdir().unwrap();
    let v = volume(&dir, Some("beta"));
    {
        let mut p = v.lock_persisted().await;
        v.persist_with(&mut p, |m| m.flags.consistent = false).await.unwrap();
    }
    let v = volume(&dir, Some("beta")); // restart: reads the flag back
    assert_eq!(v.machine().disk, DiskState::Inconsistent);
    v.transition(Event::Promote { force: true }, None).await.unwrap();
    assert_eq!(v.machine().role, Role::Secondary, "not even with --force");
}

/// A caller that goes away while its metadata store runs on the blocking pool (here a select
/// that takes its other branch once the store started) leaves the store pending; the next
/// holder of the transition lock awaits it, and memory then says what the disk says
/// (state.rs, `Persisted::pending`).
#[tokio::test]
async fn a_store_abandoned_mid_write_is_settled_by_the_next_lock_holder() {
    let dir = tempfile::tempdir().unwrap();
    let v = volume(&dir, Some("beta"));
    // The store's first poll finds the fsync still running, in practice always; a few tries
    // so that a blocking thread that was faster cannot make the test pass without the case.
    for _ in 0..10 {
        v.mark_clean(false).await.unwrap();
        let abandoned = tokio::select! {
            biased;
            r = v.mark_clean(true) => { r.unwrap(); false }
            () = std::future::ready(()) => true,
        };
        if !abandoned {
            continue;
        }
        assert!(v.persisted.try_lock().unwrap().pending.is_some(), "left pending, not lost");
        let p = v.lock_persisted().await;
        assert!(p.pending.is_none());
        assert!(p.meta.flags.clean_shutdown, "memory follows the finished store");
        assert!(stored(&dir).flags.clean_shutdown, "and the disk has it");
        return;
    }
    panic!("no store was still running when its caller went away");
}
