//! A peer whose disk hangs, is slow, or is flooded (issue 17, "hung peers, bounded memory"), on
//! the two-node harness with real faults: beta's backing is a [`FaultDisk`] (nbdkit's pause
//! or delay filter behind nbdfuse). Every test ends with both nodes in sync, the backing files
//! byte-identical and `blockctl verify` finding 0 differences. The same hung disk under the
//! Primary shows that a stop whose drain could not finish is not recorded as clean.

use std::time::{Duration, Instant};

use blockd_tests::{
    cluster::{clients::FioRun, Alpha, Beta, Cluster, NodeId, PEER_TIMEOUT},
    cmd::{cmd, signal, try_run, Background, Output},
    disk::{FaultDisk, Faults},
};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn blockctl(c: &Cluster, n: NodeId, args: &[&str]) -> Output {
    let mut b = c.blockctl(n);
    b.args(args);
    try_run(&mut b, Duration::from_secs(300))
}

fn counter(v: &Value, name: &str) -> u64 {
    v["counters"][name].as_u64().unwrap_or_else(|| panic!("counter {name} missing: {v}"))
}

/// A cluster whose beta runs on a fault disk of `size` bytes, alpha Primary and in sync.
///
/// Both nodes first start on fresh (all-zero) files, in sync; then beta's file is replaced by
/// the fault disk, zero too, so the pair is still in sync without a full resync.
fn on_fault_disk(
    test: &str,
    size: u64,
    faults: Faults,
    env: &[(&str, &str)],
) -> (Cluster, FaultDisk) {
    let mut c = Cluster::new(test, &format!("{}MiB", size / MIB));
    c.start_with_env(Alpha, env);
    c.start_with_env(Beta, env);
    c.wait_in_sync(Duration::from_secs(60));
    c.stop(Beta);
    let disk = FaultDisk::create(&c.dir().join("beta-disk"), size, faults);
    c.use_backing(Beta, &disk.file());
    c.start_with_env(Beta, env);
    c.wait_in_sync(Duration::from_secs(60));
    c.role(Alpha, "primary", false).expect("promote alpha");
    c.wait_for(Alpha, "role Primary", Duration::from_secs(10), |v| v["role"] == "Primary");
    (c, disk)
}

/// qemu-io through alpha's socket running `commands`; returns how long it took.
fn qemu_io(c: &Cluster, commands: &[&str]) -> Duration {
    let mut q = cmd("qemu-io", &["-f", "raw"]);
    for command in commands {
        q.args(["-c", command]);
    }
    q.arg(c.nbd_uri(Alpha));
    let t0 = Instant::now();
    let out = try_run(&mut q, Duration::from_secs(30));
    out.assert_success();
    t0.elapsed()
}

/// The end state every test here checks: in sync, byte-identical, verify finds nothing.
fn assert_converged(c: &Cluster) {
    c.wait_in_sync(Duration::from_secs(120));
    c.assert_identical();
    let out = blockctl(c, Alpha, &["verify"]);
    out.assert_success();
    assert!(out.stdout.contains(", 0 bytes differed"), "verify found differences:\n{out}");
}

fn reads_back(c: &Cluster, offset: u64, pattern: u8) {
    let cmdline = format!("read -P {pattern:#x} {offset} 4k");
    qemu_io(c, &[&cmdline]);
}

/// Beta's disk hangs while the pair is in sync: alpha's write and flush complete degraded
/// within peer-timeout + 1 s (the peer is dropped although its reader still pongs); once the
/// disk resumes the pair reconnects, resyncs, and is identical.
#[test]
fn hung_peer_disk_costs_at_most_peer_timeout() {
    let faults = Faults { pause: true, ..Faults::default() };
    let (c, disk) = on_fault_disk("hung-peer", 64 * MIB, faults, &[]);
    qemu_io(&c, &["write -P 0x11 0 64k", "flush"]);
    let before = counter(&c.vol(Alpha), "connects");

    disk.pause();
    let took = qemu_io(&c, &["write -P 0x5a 8m 4k", "flush"]);
    assert!(
        took <= PEER_TIMEOUT + Duration::from_secs(1),
        "a write with a hung peer disk took {took:?} (peer-timeout {PEER_TIMEOUT:?})"
    );
    let v = c.wait_for(Alpha, "peer dropped", Duration::from_secs(5), |v| v["conn"] != "Connected");
    assert!(v["out_of_sync"].as_u64().unwrap_or(0) >= 4096, "the write is marked: {v:#}");
    // Alpha reconnects meanwhile (beta's link still answers) and starts a resync, which
    // hangs too: a write may again wait for one peer-timeout, never longer.
    let took = qemu_io(&c, &["write -P 0x6b 16m 4k", "flush"]);
    assert!(took <= PEER_TIMEOUT + Duration::from_secs(1), "a later write took {took:?}");

    disk.resume();
    assert_converged(&c);
    let v = c.vol(Alpha);
    assert!(counter(&v, "connects") > before, "the pair reconnected: {v:#}");
    reads_back(&c, 8 * MIB, 0x5a);
    reads_back(&c, 16 * MIB, 0x6b);
}

/// The last start of `n`'s daemon, from its log.
fn last_start_log(c: &Cluster, n: NodeId) -> String {
    let log = c.log_text(n);
    log.rsplit("===== blockd start").next().unwrap_or_default().to_string()
}

/// The clean-shutdown flag of `n`'s superblock (`<data-dir>/<volume>.meta`: two 4 KiB slots,
/// the one with the higher sequence number is current; flags at byte 36, clean = 4; see
/// blockd/src/meta/format.rs).
fn recorded_clean(c: &Cluster, n: NodeId) -> bool {
    let meta = std::fs::read(c.backing(n).with_extension("meta")).expect("read .meta");
    let le = |b: &[u8], off: usize, len: usize| {
        b[off..off + len].iter().rev().fold(0u64, |v, &x| (v << 8) | u64::from(x))
    };
    let current = [&meta[..4096], &meta[4096..8192]]
        .into_iter()
        .filter(|slot| &slot[..8] == b"BLKDMETA")
        .max_by_key(|slot| le(slot, 16, 8))
        .expect("a superblock slot");
    le(current, 36, 4) & 4 != 0
}

/// A stop whose drain could not finish is not recorded as clean: beta (Primary) has a write
/// held by its own hung disk when it gets SIGTERM, and a second SIGTERM ends the drain with
/// the write still in flight. The disk comes back during the final flush, which then
/// succeeds: only the unfinished drain says the stop was not orderly. The next start treats
/// the volume as crashed (the activity log's extents go into the bitmap); the pair converges.
#[test]
fn stop_with_a_request_in_flight_is_not_recorded_clean() {
    let faults = Faults { pause: true, ..Faults::default() };
    let (mut c, disk) = on_fault_disk("unclean-stop", 64 * MIB, faults, &[]);
    c.role(Alpha, "secondary", false).expect("demote alpha");
    c.role(Beta, "primary", false).expect("promote beta");
    c.wait_for(Beta, "role Primary", Duration::from_secs(10), |v| v["role"] == "Primary");
    c.stop(Beta);
    assert!(recorded_clean(&c, Beta), "an orderly stop is recorded as clean");
    c.start(Beta);
    c.wait_in_sync(Duration::from_secs(60));
    c.role(Beta, "primary", false).expect("promote beta");

    disk.pause();
    let mut q = cmd("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 8m 4k"]);
    q.arg(c.nbd_uri(Beta));
    let mut writer = Background::spawn(&mut q, &c.dir().join("inflight-write.log"));
    // Long enough for qemu-io to connect and send its write.
    std::thread::sleep(Duration::from_millis(1500));
    signal(c.pid(Beta), libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_secs(2));
            disk.resume();
        });
        c.stop(Beta); // the second SIGTERM: the drain stops waiting for the connection
    });
    let _ = writer.wait(Duration::from_secs(10));
    let stopped = last_start_log(&c, Beta);
    assert!(
        stopped.contains("again: not waiting for connections tasks=1"),
        "the drain was meant to end with the write in flight:\n{stopped}"
    );
    assert!(stopped.contains("INFO blockd::daemon: stopped"), "{stopped}");
    assert!(!recorded_clean(&c, Beta), "a stop with a write in flight was recorded as clean");

    c.start(Beta);
    c.wait_in_sync(Duration::from_secs(120));
    c.role(Alpha, "primary", false).expect("promote alpha");
    assert_converged(&c);
}

/// Beta's disk is slow (20 ms per write and flush): writes slow down, but the peer is never
/// dropped: no new connection, no degraded write, Connected throughout.
#[test]
fn slow_peer_disk_slows_writes_but_drops_nothing() {
    let faults = Faults { delay: Some(Duration::from_millis(20)), ..Faults::default() };
    let (c, _disk) = on_fault_disk("slow-peer", 64 * MIB, faults, &[]);
    let before = c.vol(Alpha);
    let load = FioRun::spawn(
        c.dir(),
        &c.nbd_uri(Alpha),
        "slow",
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=32m",
            "--time_based=1",
            "--runtime=8",
            "--fsync=16",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        let v = c.vol(Alpha);
        assert_eq!(v["conn"], "Connected", "the slow peer was dropped: {v:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (written, _) = load.finish(Duration::from_secs(60));
    assert!(written > 0);
    let after = c.vol(Alpha);
    assert_eq!(counter(&after, "connects"), counter(&before, "connects"), "no reconnect");
    assert_eq!(counter(&after, "degraded_writes"), counter(&before, "degraded_writes"));
    assert_eq!(counter(&after, "errors"), 0);
    // 20 ms per write on the peer: a 4 KiB write round trip cannot be faster than that.
    let took = qemu_io(&c, &["write -P 0x33 0 4k"]);
    assert!(took >= Duration::from_millis(20), "{took:?}");
    assert_converged(&c);
    assert!(!c.log_text(Alpha).contains("unanswered"), "alpha dropped its peer");
}

/// `VmRSS` and `VmHWM` of a process, in bytes.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name)).expect("field in status");
        let kib: u64 = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("kB");
        kib << 10
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The Secondary's ceiling in this test. The README's bound for it: idle RSS plus the ceiling
/// plus 32 MiB x (2 + worker threads) (the frame the reader holds, the one it is reading, and
/// one copy into an aligned buffer per worker thread).
const FLOOD_CEILING: u64 = 32 * MIB;

/// Six fio connections with 32 MiB writes at queue depth 4 on alpha (each connection may hold
/// 128 MiB in flight: 768 MiB in all) against a beta whose disk is slowed, so frames pile up at
/// beta: its RSS stays under the stated bound. Then in sync and identical.
#[test]
fn flood_of_32mib_writes_keeps_secondary_memory_bounded() {
    let faults = Faults { delay: Some(Duration::from_millis(2)), ..Faults::default() };
    let ceiling = format!("{}MiB", FLOOD_CEILING / MIB);
    let env = [
        ("BLOCKD_CLUSTER__MAX_IN_FLIGHT_BYTES", ceiling.as_str()),
        ("BLOCKD_NBD__MAX_IN_FLIGHT_BYTES", "128MiB"),
        // Frames queue for seconds at the slow peer: that is back-pressure, not a hang.
        ("BLOCKD_CLUSTER__PEER_TIMEOUT", "30s"),
    ];
    let (c, _disk) = on_fault_disk("flood", 256 * MIB, faults, &env);
    let beta = c.pid(Beta);
    let (idle, _) = rss(beta);
    let load = FioRun::spawn(
        c.dir(),
        &c.nbd_uri(Alpha),
        "flood",
        &[
            "--rw=randwrite",
            "--bs=32m",
            "--iodepth=4",
            "--numjobs=6",
            "--size=256m",
            "--time_based=1",
            "--runtime=15",
        ],
    );
    let mut peak_seen = 0;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        peak_seen = peak_seen.max(rss(beta).0);
        std::thread::sleep(Duration::from_millis(100));
    }
    let (written, _) = load.finish(Duration::from_secs(300));
    let (_, hwm) = rss(beta);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let bound = idle + FLOOD_CEILING + 32 * MIB * (2 + threads);
    eprintln!(
        "flood: {} MiB written; beta idle RSS {} MiB, peak RSS seen {} MiB, VmHWM {} MiB, \
         bound {} MiB",
        written / MIB,
        idle / MIB,
        peak_seen / MIB,
        hwm / MIB,
        bound / MIB
    );
    assert!(written >= 256 * MIB, "the flood wrote only {written} bytes");
    assert_eq!(c.vol(Alpha)["conn"], "Connected", "back-pressure, not a drop");
    assert!(hwm <= bound, "beta's VmHWM {hwm} exceeds the bound {bound}");
    assert_converged(&c);
}
