//! Tests of the metadata file: round trip, damage, crashes simulated by partial writes.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::*;
use crate::storage::{Allocate, DirectIo, EngineKind, Store, StoreOptions};

const SIZE: u64 = 64 << 20;

struct Dir {
    _tmp: tempfile::TempDir,
    meta: PathBuf,
}

fn dir() -> Dir {
    let tmp = tempfile::tempdir().expect("tempdir");
    let meta = tmp.path().join("vol0.meta");
    Dir { _tmp: tmp, meta }
}

fn open(path: &Path) -> Result<(MetaFile, Meta), MetaError> {
    MetaFile::open_or_create(path, SIZE, "alpha", false)
}

/// Overwrites `bytes` at `offset` of the file, as a crash or a disk might have left them.
fn scribble(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).expect("open for scribbling");
    f.write_all_at(bytes, offset).expect("scribble");
}

fn changed(meta: &Meta, current: u64) -> Meta {
    let mut m = meta.clone();
    m.gens.rotate(current);
    m.flags.primary_when_stopped = !m.flags.primary_when_stopped;
    m
}

#[test]
fn create_on_a_fresh_backing_is_zeroes() {
    let d = dir();
    let (_, meta) = MetaFile::open_or_create(&d.meta, SIZE, "alpha", true).expect("create");
    assert_eq!(meta.gens, Generations::new(ZEROES));
    assert_eq!(meta.size, SIZE);
    assert_eq!(meta.node, "alpha");
    assert_eq!(meta.granularity, DEFAULT_GRANULARITY);
    assert!(meta.flags.consistent && meta.flags.clean_shutdown && !meta.flags.primary_when_stopped);
    assert_eq!(meta.disk_state(), DiskState::UpToDate);
    let mode = std::fs::metadata(&d.meta).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(!tmp_path(&d.meta).exists());
}

#[test]
fn create_on_an_existing_backing_is_a_random_generation() {
    let (a, b) = (dir(), dir());
    let (_, ma) = open(&a.meta).expect("create a");
    let (_, mb) = open(&b.meta).expect("create b");
    assert!(ma.gens.current > ZEROES && mb.gens.current > ZEROES);
    assert_ne!(ma.gens.current, mb.gens.current);
    assert_eq!((ma.gens.bitmap, ma.gens.history), (0, [0, 0]));
}

#[test]
fn round_trip_through_both_slots() {
    let d = dir();
    let (mf, mut meta) = open(&d.meta).expect("create");
    for i in 0..5 {
        meta = changed(&meta, 100 + i);
        meta.flags.consistent = i % 2 == 0;
        mf.store(&meta).expect("store");
        let (_, read) = open(&d.meta).expect("reopen");
        assert_eq!(read, meta, "after store {i}");
    }
    assert_eq!(meta.disk_state(), DiskState::UpToDate);
    drop(mf);
    let (mf, read) = open(&d.meta).expect("reopen");
    assert_eq!(read, meta);
    // Stores through a reopened file continue the sequence (they do not overwrite the newest).
    let next = changed(&meta, 200);
    mf.store(&next).expect("store after reopen");
    assert_eq!(open(&d.meta).expect("reopen").1, next);
}

#[test]
fn inconsistent_flag_survives_and_means_inconsistent() {
    let d = dir();
    let (mf, mut meta) = open(&d.meta).expect("create");
    meta.flags.consistent = false;
    mf.store(&meta).expect("store");
    assert_eq!(open(&d.meta).expect("reopen").1.disk_state(), DiskState::Inconsistent);
}

/// Damage to both slots is detected, and the error names the file.
#[test]
fn crc_corruption_is_detected_and_names_the_path() {
    let d = dir();
    let (mf, meta) = open(&d.meta).expect("create");
    mf.store(&changed(&meta, 50)).expect("store");
    drop(mf);
    scribble(&d.meta, 1000, b"rot");
    scribble(&d.meta, SLOT as u64 + 1000, b"rot");
    let err = open(&d.meta).expect_err("both slots damaged");
    assert!(matches!(err, MetaError::BadCrc { .. }), "{err:?}");
    assert!(err.to_string().contains(&d.meta.display().to_string()), "{err}");
}

/// One damaged slot: the other one is used (and the newest valid one at that).
#[test]
fn one_damaged_slot_falls_back_to_the_other() {
    let d = dir();
    let (mf, meta) = open(&d.meta).expect("create");
    let m2 = changed(&meta, 50);
    mf.store(&m2).expect("store seq 2 (slot 0)");
    scribble(&d.meta, SLOT as u64 + 100, b"rot");
    assert_eq!(open(&d.meta).expect("slot 0 is intact").1, m2);
}

/// A crash in the middle of `store` (simulated: only the first sector of the new superblock
/// reached the disk) leaves the previous version readable; the next store works.
#[test]
fn crash_during_store_leaves_the_old_version_readable() {
    let d = dir();
    let (mf, meta) = open(&d.meta).expect("create");
    let old = changed(&meta, 50);
    mf.store(&old).expect("store seq 2");
    drop(mf);
    let new = changed(&old, 51);
    let torn = format::encode(&new, 3);
    scribble(&d.meta, slot_offset(3), &torn[..512]);
    let (mf, read) = open(&d.meta).expect("reopen after torn write");
    assert_eq!(read, old);
    mf.store(&new).expect("store again");
    assert_eq!(open(&d.meta).expect("reopen").1, new);
}

/// A crash while creating the file, between writing the temp file and the rename: no metadata
/// file exists yet, and the next start creates it again over the partial temp file.
#[test]
fn crash_during_create_leaves_a_temp_file_that_is_replaced() {
    let d = dir();
    std::fs::write(tmp_path(&d.meta), b"partial superbl").expect("partial temp");
    let (_, meta) = MetaFile::open_or_create(&d.meta, SIZE, "alpha", true).expect("create");
    assert_eq!(meta.gens.current, ZEROES);
    assert!(!tmp_path(&d.meta).exists());
    assert_eq!(open(&d.meta).expect("reopen").1, meta);
}

/// A partial temp file next to an existing metadata file (the crash happened before a rename
/// that would have replaced it): the existing version is read, the temp file removed.
#[test]
fn partial_temp_file_beside_metadata_leaves_the_old_version_readable() {
    let d = dir();
    let (mf, meta) = open(&d.meta).expect("create");
    let old = changed(&meta, 70);
    mf.store(&old).expect("store");
    drop(mf);
    let half = format::encode(&changed(&old, 71), 0);
    std::fs::write(tmp_path(&d.meta), &half[..SLOT / 2]).expect("partial temp");
    assert_eq!(open(&d.meta).expect("reopen").1, old);
    assert!(!tmp_path(&d.meta).exists());
}

#[test]
fn other_volume_size_is_refused() {
    let d = dir();
    open(&d.meta).expect("create");
    let err = MetaFile::open_or_create(&d.meta, SIZE * 2, "alpha", false).expect_err("size");
    match &err {
        MetaError::SizeMismatch { path, stored, expected } => {
            assert_eq!((path, *stored, *expected), (&d.meta, SIZE, SIZE * 2));
        }
        other => panic!("want SizeMismatch, got {other:?}"),
    }
    assert!(err.to_string().contains(&d.meta.display().to_string()));
}

#[test]
fn truncated_file_is_refused() {
    let d = dir();
    open(&d.meta).expect("create");
    OpenOptions::new().write(true).open(&d.meta).expect("open").set_len(5000).expect("truncate");
    let err = open(&d.meta).expect_err("truncated");
    assert!(matches!(err, MetaError::Truncated { len: 5000, .. }), "{err:?}");
    assert!(err.to_string().contains(&d.meta.display().to_string()));
}

#[test]
fn unknown_format_version_is_refused() {
    let d = dir();
    open(&d.meta).expect("create");
    // A newer blockd rewrote slot 1 in its format; slot 0 is still a valid version 1.
    scribble(&d.meta, SLOT as u64 + 8, &7u32.to_le_bytes());
    let err = open(&d.meta).expect_err("version 7");
    assert!(matches!(err, MetaError::UnknownVersion { version: 7, .. }), "{err:?}");
    assert!(err.to_string().contains(&d.meta.display().to_string()));
}

#[test]
fn not_a_metadata_file_is_bad_magic() {
    let d = dir();
    std::fs::write(&d.meta, vec![0xa5u8; 2 * SLOT]).expect("write junk");
    let err = open(&d.meta).expect_err("junk");
    assert!(matches!(err, MetaError::BadMagic { .. }), "{err:?}");
}

/// Metadata describing data whose backing was just created empty would claim that data.
#[test]
fn metadata_for_a_recreated_backing_is_refused() {
    let d = dir();
    open(&d.meta).expect("create");
    let err = MetaFile::open_or_create(&d.meta, SIZE, "alpha", true).expect_err("recreated");
    assert!(matches!(err, MetaError::BackingRecreated { .. }), "{err:?}");
}

#[test]
fn store_refuses_a_bad_node_name_and_keeps_the_old_version() {
    let d = dir();
    let (mf, meta) = open(&d.meta).expect("create");
    let bad = Meta { node: "n".repeat(format::NODE_MAX + 1), ..meta.clone() };
    let err = mf.store(&bad).expect_err("long name");
    assert!(matches!(err, MetaError::Invalid { .. }), "{err:?}");
    assert_eq!(open(&d.meta).expect("reopen").1, meta);
}

#[test]
fn concurrent_stores_leave_one_complete_version() {
    let d = dir();
    let (mf, meta) = open(&d.meta).expect("create");
    let mf = Arc::new(mf);
    let written: Vec<Meta> = (0..4)
        .flat_map(|t| (0..5).map(move |i| (t, i)))
        .map(|(t, i)| changed(&meta, 1000 + t * 10 + i))
        .collect();
    std::thread::scope(|s| {
        for chunk in written.chunks(5) {
            let mf = Arc::clone(&mf);
            s.spawn(move || chunk.iter().for_each(|m| mf.store(m).expect("store")));
        }
    });
    let (_, read) = open(&d.meta).expect("reopen");
    assert!(written.contains(&read), "read back a version nobody wrote: {read:?}");
}

/// The storage side of `created_backing`: `Store::created` says whether `open` made the file.
#[test]
fn store_created_tells_a_new_backing_from_an_existing_one() {
    let d = dir();
    let img = d.meta.with_extension("img");
    let opts = StoreOptions {
        path: img,
        size: 1 << 20,
        engine: EngineKind::Sync,
        direct: DirectIo::Off,
        allocate: Allocate::Sparse,
    };
    assert!(Store::open(&opts).expect("create backing").created());
    assert!(!Store::open(&opts).expect("reopen backing").created());
}
