//! One conformance suite run against every engine × I/O mode, engine-level tests of the
//! completion path, and a differential property test (io_uring vs sync vs an in-memory model).
//!
//! Files live in a tempdir under /var/tmp: /tmp may be tmpfs, which has different hole and
//! direct-I/O behaviour from the disks blockd runs on.

use std::{
    fs::File,
    io,
    os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use proptest::prelude::*;
use tempfile::TempDir;
use tokio::sync::oneshot;

use super::{
    fault::{Fault, FaultEngine, OpKind},
    sync::SyncEngine,
    uring::UringEngine,
    AlignedBuf, Allocate, Completion, DirectIo, Engine, EngineKind, Op, SharedBuf, StorageError,
    Store, StoreOptions,
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("blockd-storage-")
        .tempdir_in("/var/tmp")
        .expect("cannot create a tempdir in /var/tmp")
}

/// Deterministic pseudo-random bytes, never zero (so "reads as zero" cannot pass by accident).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&(x | 0x0101_0101_0101_0101).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[derive(Debug, Clone, Copy)]
struct Cfg {
    engine: EngineKind,
    direct: DirectIo,
}

/// A store on a fresh file plus an in-memory model of what the volume must contain.
struct Harness {
    _dir: TempDir,
    path: PathBuf,
    store: Arc<Store>,
    model: Vec<u8>,
}

impl Harness {
    fn new(cfg: Cfg, size: u64) -> Harness {
        let dir = tempdir();
        let path = dir.path().join("vol.img");
        let opts = StoreOptions {
            path: path.clone(),
            size,
            engine: cfg.engine,
            direct: cfg.direct,
            allocate: Allocate::Sparse,
        };
        let store = Store::open(&opts).expect("open store");
        let want_engine = if cfg.engine == EngineKind::Sync { "sync" } else { "io_uring" };
        assert_eq!(store.engine_name(), want_engine);
        assert_eq!(store.is_direct(), cfg.direct == DirectIo::On, "direct I/O mode");
        if !store.is_direct() {
            assert_eq!(store.block_size(), 1, "buffered I/O needs no alignment");
        }
        assert_eq!(store.alloc_unit() % store.block_size(), 0);
        Harness { _dir: dir, path, store: Arc::new(store), model: vec![0; size as usize] }
    }

    async fn write(&mut self, offset: u64, data: &[u8]) {
        self.store.write(offset, AlignedBuf::copy_from(data)).await.expect("write");
        self.model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }

    async fn zero(&mut self, offset: u64, len: u64, punch: bool) {
        self.store.write_zeroes(offset, len, punch).await.expect("write_zeroes");
        self.model[offset as usize..(offset + len) as usize].fill(0);
    }

    /// Reads `offset..offset+len` through the store and compares it with the model.
    async fn check(&self, offset: u64, len: u32) {
        let got = self.store.read(offset, len).await.expect("read");
        let want = &self.model[offset as usize..offset as usize + len as usize];
        if got[..] == want[..] {
            return;
        }
        if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
            panic!("byte {} differs: got {} want {}", offset + i as u64, got[i], want[i]);
        }
        assert_eq!(got.len(), want.len());
    }

    async fn check_all(&self) {
        let size = self.model.len() as u64;
        let mut off = 0;
        while off < size {
            let n = (size - off).min(32 * MIB);
            self.check(off, n as u32).await;
            off += n;
        }
    }

    /// 512-byte sectors allocated to the file, after making delayed allocation visible.
    async fn allocated(&self) -> u64 {
        self.store.flush().await.expect("flush");
        std::fs::metadata(&self.path).expect("stat").blocks()
    }
}

async fn case_small_unaligned(cfg: Cfg) {
    let mut h = Harness::new(cfg, MIB);
    h.write(0, &pattern(1, 64 * KIB as usize)).await;
    for (i, off) in [0, 1, 511, 512, 4095, 4096, 4097, 65535, MIB - 1].into_iter().enumerate() {
        h.write(off, &[i as u8 + 100]).await;
        h.check(off.saturating_sub(600), 1300.min((MIB - off.saturating_sub(600)) as u32)).await;
    }
    for (i, off) in [1, 513, 4093, 8191, 100_001].into_iter().enumerate() {
        h.write(off, &pattern(10 + i as u64, 511)).await;
        h.check(off - 1, 513).await;
    }
    h.write(777, &pattern(20, 10_000)).await;
    h.write(3 * 4096 - 5, &pattern(21, 8192 + 10)).await;
    for (off, len) in [(1, 1), (511, 2), (4095, 4098), (0, 70_000), (777, 10_000)] {
        h.check(off, len).await;
    }
    h.check_all().await;
}

async fn case_large(cfg: Cfg) {
    let mut h = Harness::new(cfg, 40 * MIB);
    let big = pattern(2, 32 * MIB as usize);
    h.write(4096, &big).await;
    h.check(4096, 32 * MIB as u32).await;
    h.write(1_000_001, &pattern(3, 32 * MIB as usize)).await;
    h.check(1_000_001, 32 * MIB as u32).await;
    h.check_all().await;
}

async fn case_zeroes(cfg: Cfg, punch: bool) {
    let mut h = Harness::new(cfg, 8 * MIB);
    h.write(MIB, &pattern(4, 4 * MIB as usize)).await;
    let before = h.allocated().await;
    assert!(before >= 4 * MIB / 512, "data must be allocated first ({before} sectors)");
    h.zero(MIB + 100, 4 * MIB - 200, punch).await;
    h.check_all().await;
    let after = h.allocated().await;
    if punch {
        assert!(after + (3 * MIB / 512) < before, "punch must free blocks: {before} -> {after}");
    } else {
        assert!(after >= before, "zeroing without punch must stay allocated: {before} -> {after}");
    }
}

async fn case_zeroes_small(cfg: Cfg) {
    let mut h = Harness::new(cfg, MIB);
    h.write(0, &pattern(5, 128 * KIB as usize)).await;
    let ranges = [(3, 1), (511, 600), (4000, 200), (8192, 4096), (12_000, 9000), (65_535, 65_537)];
    for (i, (off, len)) in ranges.into_iter().enumerate() {
        h.zero(off, len, i % 2 == 0).await;
        h.check(off.saturating_sub(4096), (len + 8192) as u32).await;
    }
    h.zero(0, MIB, false).await;
    h.check_all().await;
}

async fn case_trim(cfg: Cfg) {
    let mut h = Harness::new(cfg, MIB);
    h.write(0, &pattern(6, 256 * KIB as usize)).await;
    let u = u64::from(h.store.alloc_unit());
    // Inside one unit: nothing may change.
    h.store.trim(5000, 100).await.expect("trim");
    h.check_all().await;
    let (off, len) = (1000, 20_000);
    h.store.trim(off, len).await.expect("trim");
    // Punched whole units read as zero (ext4 punches); the partial ones keep their data.
    let (a, e) = (off.next_multiple_of(u), (off + len) / u * u);
    assert!(a < e, "the test range must cover a whole unit");
    h.model[a as usize..e as usize].fill(0);
    h.check_all().await;
    h.store.trim(64 * KIB, 64 * KIB).await.expect("aligned trim");
    h.model[64 * KIB as usize..128 * KIB as usize].fill(0);
    h.check_all().await;
}

async fn case_flush(cfg: Cfg) {
    let mut h = Harness::new(cfg, MIB);
    h.store.flush().await.expect("flush with nothing written");
    h.write(12_345, &pattern(7, 5000)).await;
    h.store.flush().await.expect("flush after a write");
    h.check_all().await;
}

/// FUA writes (`RWF_DSYNC` per piece), aligned and unaligned, land like plain ones.
async fn case_durable_write(cfg: Cfg) {
    let mut h = Harness::new(cfg, MIB);
    for (off, len, seed) in [(0u64, 4096usize, 1u64), (12_345, 5000, 2), (65_536 + 7, 100, 3)] {
        let data = pattern(seed, len);
        h.store.write_with(off, AlignedBuf::copy_from(&data), true).await.expect("FUA write");
        h.model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    h.check_all().await;
}

async fn case_concurrent(cfg: Cfg) {
    let mut h = Harness::new(cfg, MIB);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200u64 {
        // Disjoint lock spans: each op stays inside its own 4 KiB block.
        let off = (i % 200) * 4096 + (i % 7) * 100;
        let data = pattern(100 + i, 3000);
        h.model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        let store = Arc::clone(&h.store);
        tasks.spawn(async move {
            store.write(off, AlignedBuf::copy_from(&data)).await?;
            if i % 50 == 0 {
                store.flush().await?;
            }
            Ok::<_, io::Error>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("task").expect("concurrent write");
    }
    for i in 0..200u64 {
        let (store, want) = (Arc::clone(&h.store), h.model[i as usize * 4096..][..4096].to_vec());
        tasks.spawn(async move {
            let got = store.read(i * 4096, 4096).await?;
            assert_eq!(&got[..], &want[..], "block {i}");
            Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("task").expect("concurrent read");
    }
    h.check_all().await;
}

async fn case_edges(cfg: Cfg) {
    let mut h = Harness::new(cfg, MIB);
    let s = &h.store;
    assert!(s.read(MIB, 0).await.expect("empty read").is_empty());
    s.write(MIB, AlignedBuf::zeroed(0)).await.expect("empty write");
    s.write_zeroes(MIB, 0, true).await.expect("empty zeroes");
    s.trim(0, 0).await.expect("empty trim");
    let beyond = |r: io::Result<()>| r.expect_err("beyond the end").kind();
    assert_eq!(
        s.read(MIB - 1, 2).await.expect_err("read beyond").kind(),
        io::ErrorKind::InvalidInput
    );
    assert_eq!(beyond(s.write(MIB, AlignedBuf::zeroed(1)).await), io::ErrorKind::InvalidInput);
    assert_eq!(beyond(s.write_zeroes(u64::MAX, 2, true).await), io::ErrorKind::InvalidInput);
    assert_eq!(beyond(s.trim(1, u64::MAX).await), io::ErrorKind::InvalidInput);
    let span = s.lock_span(u64::MAX - 1, 10);
    assert!(span.start < u64::MAX && span.end == u64::MAX);
    h.write(MIB - 3, &[1, 2, 3]).await;
    h.check_all().await;
}

async fn case_reopen(cfg: Cfg) {
    let mut h = Harness::new(cfg, MIB);
    h.write(4097, &pattern(8, 9000)).await;
    h.store.flush().await.expect("flush");
    let opts = StoreOptions {
        path: h.path.clone(),
        size: MIB,
        engine: cfg.engine,
        direct: cfg.direct,
        allocate: Allocate::Sparse,
    };
    h.store = Arc::new(Store::open(&opts).expect("reopen"));
    h.check_all().await;
}

macro_rules! conformance {
    ($($name:ident: $engine:expr, $direct:expr;)*) => {$(
        mod $name {
            use super::*;
            const CFG: Cfg = Cfg { engine: $engine, direct: $direct };
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn small_unaligned() { case_small_unaligned(CFG).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn large_32mib() { case_large(CFG).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn zeroes_punch() { case_zeroes(CFG, true).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn zeroes_keep_allocated() { case_zeroes(CFG, false).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn zeroes_small() { case_zeroes_small(CFG).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn trim_rounds_inward() { case_trim(CFG).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn flush() { case_flush(CFG).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn durable_write() { case_durable_write(CFG).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_200() { case_concurrent(CFG).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn zero_length_and_bounds() { case_edges(CFG).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn reopen_keeps_data() { case_reopen(CFG).await }
        }
    )*};
}

conformance! {
    sync_buffered: EngineKind::Sync, DirectIo::Off;
    sync_direct: EngineKind::Sync, DirectIo::On;
    uring_buffered: EngineKind::IoUring, DirectIo::Off;
    uring_direct: EngineKind::IoUring, DirectIo::On;
}

fn opts(path: PathBuf, size: u64) -> StoreOptions {
    StoreOptions {
        path,
        size,
        engine: EngineKind::Auto,
        direct: DirectIo::Auto,
        allocate: Allocate::Sparse,
    }
}

#[tokio::test]
async fn open_creates_a_sparse_private_file() {
    let dir = tempdir();
    let path = dir.path().join("new.img");
    let store = Store::open(&opts(path.clone(), 64 * MIB)).expect("open");
    let m = std::fs::metadata(&path).expect("stat");
    assert_eq!(m.len(), 64 * MIB);
    assert_eq!(m.blocks(), 0, "created sparse");
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    assert_eq!(store.engine_name(), "io_uring", "Auto must pick io_uring where the kernel has it");
    assert!(store.is_direct(), "Auto must pick direct I/O on ext4/xfs");
}

#[tokio::test]
async fn open_refuses_a_size_mismatch_naming_the_path() {
    let dir = tempdir();
    let path = dir.path().join("small.img");
    std::fs::write(&path, vec![0u8; 1000]).expect("write");
    let err = Store::open(&opts(path.clone(), 4096)).expect_err("size mismatch");
    assert!(matches!(err, StorageError::SizeMismatch { actual: 1000, expected: 4096, .. }));
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
}

#[tokio::test]
async fn open_without_parent_dir_names_the_path() {
    let dir = tempdir();
    let path = dir.path().join("missing").join("vol.img");
    let err = Store::open(&opts(path.clone(), 4096)).expect_err("no parent dir");
    assert!(matches!(err, StorageError::Create { .. }), "{err:?}");
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
}

#[tokio::test]
async fn open_refuses_a_directory() {
    let dir = tempdir();
    let err = Store::open(&opts(dir.path().to_path_buf(), 4096)).expect_err("a directory");
    assert!(matches!(err, StorageError::Unsupported { .. }), "{err:?}");
}

#[tokio::test]
async fn direct_falls_back_when_size_is_not_block_aligned() {
    let dir = tempdir();
    let path = dir.path().join("odd.img");
    let store = Store::open(&opts(path.clone(), 1000)).expect("Auto falls back to buffered");
    assert!(!store.is_direct());
    let on = StoreOptions { direct: DirectIo::On, ..opts(path, 1000) };
    assert!(matches!(Store::open(&on), Err(StorageError::Unsupported { .. })));
}

#[test]
fn outside_a_runtime_auto_uses_sync_and_io_uring_is_an_error() {
    let dir = tempdir();
    let path = dir.path().join("vol.img");
    let store = Store::open(&opts(path.clone(), MIB)).expect("Auto falls back");
    assert_eq!(store.engine_name(), "sync");
    let uring = StoreOptions { engine: EngineKind::IoUring, ..opts(path, MIB) };
    assert!(matches!(Store::open(&uring), Err(StorageError::Uring(_))));
}

/// A loop device, detached on drop (also when the test fails).
struct Loop(String);

impl Loop {
    fn attach(file: &std::path::Path, sector: u32) -> Loop {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", "--sector-size", &sector.to_string()])
            .arg(file)
            .output()
            .expect("losetup must be installed (util-linux) and the tests run as root");
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        Loop(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Block devices: size from BLKGETSIZE64, direct-I/O block from BLKSSZGET (512 and 4096).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_device_backing() {
    let dir = tempdir();
    for sector in [512u32, 4096] {
        let file = dir.path().join(format!("dev{sector}.img"));
        File::create(&file).and_then(|f| f.set_len(8 * MIB)).expect("image");
        let dev = Loop::attach(&file, sector);
        let mut o = StoreOptions { direct: DirectIo::On, ..opts(PathBuf::from(&dev.0), 16 * MIB) };
        let err = Store::open(&o).expect_err("device smaller than the volume");
        assert!(matches!(err, StorageError::SizeMismatch { actual, .. } if actual == 8 * MIB));
        o.size = 4 * MIB;
        let store = Store::open(&o).expect("open device");
        assert_eq!((store.block_size(), store.is_direct()), (sector, true));
        let data = pattern(u64::from(sector), 10_000);
        store.write(777, AlignedBuf::copy_from(&data)).await.expect("write");
        assert_eq!(&store.read(777, 10_000).await.expect("read")[..], &data[..]);
        store.write_zeroes(1000, 5000, true).await.expect("zeroes");
        let got = store.read(777, 10_000).await.expect("read");
        // 777 + 223 = 1000 and 1000 + 5000 = 6000: zeroes exactly at got[223..5223].
        assert!(got[223..5223].iter().all(|&b| b == 0) && got[..223] == data[..223]);
        assert_eq!(got[5223..], data[5223..]);
        store.trim(0, 4 * MIB).await.expect("trim");
        store.flush().await.expect("flush");
    }
}

/// Submits `op` and waits for its one completion.
async fn run(engine: &dyn Engine, op: Op) -> Completion {
    let (tx, rx) = oneshot::channel();
    engine.submit(op, tx);
    tokio::time::timeout(Duration::from_secs(10), rx).await.expect("completion").expect("sent")
}

/// Both real engines report a failed write (its buffer intact) and a short read (its buffer back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_engines_return_buffers_on_error() {
    let dir = tempdir();
    let path = dir.path().join("ro.img");
    std::fs::write(&path, vec![7u8; 6000]).expect("write");
    let ro = Arc::new(File::open(&path).expect("open read-only"));
    let engines: [Arc<dyn Engine>; 2] = [
        Arc::new(SyncEngine::new(Arc::clone(&ro), 2).expect("sync")),
        Arc::new(UringEngine::new(ro).expect("io_uring")),
    ];
    for e in engines {
        // A write's buffer is shared, not handed back: the engine lets go of its share.
        let buf = SharedBuf::from(AlignedBuf::copy_from(&[9; 4096]));
        let c = run(&*e, Op::Write { offset: 0, buf: buf.clone(), durable: false }).await;
        assert_eq!(
            c.result.expect_err("write on a read-only fd").raw_os_error(),
            Some(libc::EBADF)
        );
        assert!(c.buf.is_none(), "{}", e.name());
        assert_eq!(buf.as_slice(), &[9; 4096], "{}", e.name());
        // 8192 bytes from a 6000-byte file: a short read, then end of file.
        let c = run(&*e, Op::Read { offset: 0, buf: AlignedBuf::zeroed(8192) }).await;
        assert_eq!(c.result.expect_err("read past EOF").kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(c.buf.expect("buffer back").as_slice()[..6000], [7; 6000], "{}", e.name());
    }
}

#[tokio::test]
async fn fault_engine_fails_a_write_and_lets_its_buffer_go() {
    let h = Harness::new(Cfg { engine: EngineKind::Sync, direct: DirectIo::Off }, MIB);
    let store = Arc::into_inner(h.store).expect("sole owner");
    let fault = Arc::new(FaultEngine::new(Arc::new(
        SyncEngine::new(
            Arc::new(File::options().read(true).write(true).open(&h.path).expect("open")),
            1,
        )
        .expect("sync"),
    )));
    fault.fail(Fault { kind: OpKind::Write, range: Some(8192..12288), errno: libc::EIO });
    let c = run(
        &*fault,
        Op::Write { offset: 8192, buf: AlignedBuf::copy_from(&[5; 100]).into(), durable: false },
    )
    .await;
    assert_eq!(c.result.expect_err("injected").raw_os_error(), Some(libc::EIO));
    assert!(c.buf.is_none(), "a write has no buffer to hand back");
    let c = run(
        &*fault,
        Op::Write { offset: 0, buf: AlignedBuf::copy_from(&[5; 100]).into(), durable: false },
    )
    .await;
    c.result.expect("outside the faulty range");
    // Through a store: the error reaches the caller, and healing makes it work again.
    let shared = Arc::clone(&fault);
    let store = store.map_engine(move |_| shared);
    let err = store.write(9000, AlignedBuf::copy_from(&[1; 10])).await.expect_err("injected");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert_eq!(fault.injected(), 2);
    fault.heal();
    store.write(9000, AlignedBuf::copy_from(&[1; 10])).await.expect("healed");
    assert_eq!(&store.read(9000, 10).await.expect("read")[..], &[1; 10]);
}

/// Where the backing cannot zero or punch, write_zeroes and trim write zeroes (a trim's
/// units read as zeroes on every backing, so the replicas agree).
#[tokio::test]
async fn unsupported_fallocate_falls_back() {
    let mut h = Harness::new(Cfg { engine: EngineKind::IoUring, direct: DirectIo::On }, 4 * MIB);
    h.write(0, &pattern(9, 4 * MIB as usize)).await;
    let fault = Arc::new(FaultEngine::new(Arc::new(
        UringEngine::new(Arc::new(
            File::options().read(true).write(true).open(&h.path).expect("open"),
        ))
        .expect("io_uring"),
    )));
    for kind in [OpKind::PunchHole, OpKind::ZeroRange] {
        fault.fail(Fault { kind, range: None, errno: libc::EOPNOTSUPP });
    }
    let shared = Arc::clone(&fault);
    h.store = Arc::new(Arc::into_inner(h.store).expect("sole owner").map_engine(move |_| shared));
    h.zero(100, 3 * MIB, true).await;
    h.zero(3 * MIB + 5, MIB - 10, false).await;
    h.check_all().await;
    h.write(0, &pattern(10, 4 * MIB as usize)).await;
    h.store.trim(0, 4 * MIB).await.expect("trim");
    h.model.fill(0);
    assert!(fault.injected() >= 3);
    h.check_all().await;
}

/// Dropping the io_uring engine with ops in flight neither frees their buffers early nor
/// hangs, and stops the reaper: the ring (holding a clone of the file) is torn down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uring_drop_with_ops_in_flight() {
    let mut h = Harness::new(Cfg { engine: EngineKind::Sync, direct: DirectIo::On }, 16 * MIB);
    h.write(0, &pattern(11, 16 * MIB as usize)).await;
    // Direct reads of allocated data go to the disk, so they are still in flight at the drop.
    let file = File::options().read(true).custom_flags(libc::O_DIRECT).open(&h.path);
    let file = Arc::new(file.expect("open"));
    let engine = UringEngine::new(Arc::clone(&file)).expect("io_uring");
    let mut rxs = Vec::new();
    for i in 0..64u64 {
        let (tx, rx) = oneshot::channel();
        engine.submit(
            Op::Read { offset: i * 256 * KIB, buf: AlignedBuf::zeroed(256 * KIB as usize) },
            tx,
        );
        rxs.push(rx);
    }
    drop(engine);
    for rx in rxs {
        let r = tokio::time::timeout(Duration::from_secs(10), rx).await.expect("no hang");
        if let Ok(c) = r {
            c.result.expect("a completed read succeeded");
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while Arc::strong_count(&file) > 1 {
        assert!(tokio::time::Instant::now() < deadline, "the reaper kept the ring alive");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// The differential property test. Trim's content is undefined by contract, but this store
// always punches the whole allocation units inside the range and ext4/xfs read holes as
// zeroes, so the model zeroes exactly those units: that checks the inward rounding too.
const PROP_SIZE: u64 = 256 * KIB;

#[derive(Debug, Clone)]
enum Action {
    Write { off: u64, len: u64, seed: u64 },
    Zero { off: u64, len: u64, punch: bool },
    Trim { off: u64, len: u64 },
    Read { off: u64, len: u64 },
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..PROP_SIZE, 1..=40 * KIB).prop_map(|(off, len)| (off, len.min(PROP_SIZE - off)))
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => (range(), any::<u64>())
            .prop_map(|((off, len), seed)| Action::Write { off, len, seed }),
        1 => (range(), any::<bool>())
            .prop_map(|((off, len), punch)| Action::Zero { off, len, punch }),
        1 => range().prop_map(|(off, len)| Action::Trim { off, len }),
        2 => range().prop_map(|(off, len)| Action::Read { off, len }),
    ]
}

async fn differential(actions: Vec<Action>) -> Result<(), TestCaseError> {
    let mut a = Harness::new(Cfg { engine: EngineKind::IoUring, direct: DirectIo::On }, PROP_SIZE);
    let b = Harness::new(Cfg { engine: EngineKind::Sync, direct: DirectIo::Off }, PROP_SIZE);
    let u = u64::from(a.store.alloc_unit());
    prop_assert_eq!(u, u64::from(b.store.alloc_unit()));
    for act in actions {
        match act {
            Action::Write { off, len, seed } => {
                let data = pattern(seed, len as usize);
                b.store.write(off, AlignedBuf::copy_from(&data)).await.expect("write b");
                a.write(off, &data).await;
            }
            Action::Zero { off, len, punch } => {
                b.store.write_zeroes(off, len, punch).await.expect("zero b");
                a.zero(off, len, punch).await;
            }
            Action::Trim { off, len } => {
                a.store.trim(off, len).await.expect("trim a");
                b.store.trim(off, len).await.expect("trim b");
                let (s, e) = (off.next_multiple_of(u), (off + len) / u * u);
                if s < e {
                    a.model[s as usize..e as usize].fill(0);
                }
            }
            Action::Read { off, len } => {
                let ra = a.store.read(off, len as u32).await.expect("read a");
                let rb = b.store.read(off, len as u32).await.expect("read b");
                prop_assert_eq!(&ra[..], &rb[..], "engines differ at {}+{}", off, len);
                prop_assert_eq!(&ra[..], &a.model[off as usize..(off + len) as usize]);
            }
        }
    }
    a.store.flush().await.expect("flush a");
    b.store.flush().await.expect("flush b");
    let (fa, fb) = (std::fs::read(&a.path).expect("a"), std::fs::read(&b.path).expect("b"));
    prop_assert!(fa == fb, "final files differ");
    prop_assert!(fa == a.model, "final file differs from the model");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    #[test]
    fn uring_and_sync_agree_with_the_model(actions in prop::collection::vec(action(), 1..24)) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(differential(actions))?;
    }
}

/// The NBD server spawns store calls as tasks: their futures must be `Send`.
#[test]
fn store_futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let dir = tempdir();
    let store = Store::open(&StoreOptions {
        engine: EngineKind::Sync,
        ..opts(dir.path().join("vol.img"), MIB)
    })
    .expect("open");
    assert_send(&store.read(0, 1));
    assert_send(&store.write(1, AlignedBuf::zeroed(1)));
    assert_send(&store.write_zeroes(1, 1, true));
    assert_send(&store.trim(0, 1));
    assert_send(&store.flush());
}

/// Dropping the sync engine stops (joins) its worker threads.
#[test]
fn sync_engine_drop_stops_its_threads() {
    let dir = tempdir();
    let file = Arc::new(File::create(dir.path().join("f")).expect("create"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let engine = SyncEngine::new(Arc::clone(&file), 4).expect("sync");
        drop(engine);
        // Only this clone is left once every worker has exited and dropped its own.
        let _ = tx.send(Arc::strong_count(&file));
    });
    let left = rx.recv_timeout(Duration::from_secs(10)).expect("drop returned");
    assert_eq!(left, 1, "worker threads still hold the file");
}

/// More ops at once than the SQ (256) and the CQ (512) hold: they queue and all complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uring_more_ops_than_the_ring_holds() {
    let mut h = Harness::new(Cfg { engine: EngineKind::Sync, direct: DirectIo::On }, 8 * MIB);
    h.write(0, &pattern(12, 8 * MIB as usize)).await;
    let file = File::options().read(true).custom_flags(libc::O_DIRECT).open(&h.path);
    let engine = UringEngine::new(Arc::new(file.expect("open"))).expect("io_uring");
    let rxs: Vec<_> = (0..1500u64)
        .map(|i| {
            let (tx, rx) = oneshot::channel();
            let offset = (i % 2048) * 4096;
            engine.submit(Op::Read { offset, buf: AlignedBuf::zeroed(4096) }, tx);
            (offset as usize, rx)
        })
        .collect();
    for (offset, rx) in rxs {
        let c = tokio::time::timeout(Duration::from_secs(10), rx).await.expect("no hang");
        let c = c.expect("completed");
        c.result.expect("read");
        assert_eq!(c.buf.expect("buffer").as_slice(), &h.model[offset..offset + 4096]);
    }
}

/// Issue 17: a backing blockd creates is allocated in full unless asked for a sparse one.
#[test]
fn new_backing_files_are_allocated_in_full_unless_sparse() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempdir();
    for (allocate, want_full) in [(Allocate::Full, true), (Allocate::Sparse, false)] {
        let path = dir.path().join(format!("{allocate:?}.img"));
        let store = Store::open(&StoreOptions { allocate, ..opts(path.clone(), 8 * MIB) });
        assert!(store.expect("open").created());
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.len(), 8 * MIB);
        assert_eq!(m.blocks() * 512 >= 8 * MIB, want_full, "{allocate:?}: {} blocks", m.blocks());
    }
}
