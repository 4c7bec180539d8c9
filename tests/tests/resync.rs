//! Resync after outages and split brain (issue 4, "What it must show"), on the two-node harness
//! (`blockd_tests::cluster`): real daemons in network namespaces, fio and qemu-io as clients,
//! nftables cuts, SIGKILL. Every test ends with byte-identical backing files, and each one
//! checks from the daemons' counters how much the resync really sent:
//!
//! - `resync_bytes`: data payload sent by resyncs (what the bitmap says must travel);
//! - `resync_zero_bytes`: ranges sent as zero requests (holes, zero blocks);
//! - `resync_same_bytes`: ranges skipped because the peer's checksums matched.

use std::{
    os::unix::fs::FileExt,
    thread::sleep,
    time::{Duration, Instant},
};

use blockd_tests::{
    cluster::{
        clients::{self, FioRun},
        differing_blocks, Alpha, Beta, Cluster, NodeId, PEER_TIMEOUT,
    },
    cmd::try_run,
};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn counter(c: &Cluster, n: NodeId, name: &str) -> u64 {
    let v = c.vol(n);
    v["counters"][name].as_u64().unwrap_or_else(|| panic!("counter {name} missing: {v}"))
}

/// Every byte a resync from `n` covered, however it travelled.
fn covered(c: &Cluster, n: NodeId) -> u64 {
    ["resync_bytes", "resync_zero_bytes", "resync_same_bytes"]
        .iter()
        .map(|k| counter(c, n, k))
        .sum()
}

fn is_connected(v: &Value) -> bool {
    ["Connected", "SyncSource", "SyncTarget"].iter().any(|s| v["conn"] == *s)
}

/// Both nodes started with `env`, connected and in sync, alpha Primary.
fn alpha_primary(test: &str, size: &str, env: &[(&str, &str)]) -> Cluster {
    let mut c = Cluster::new(test, size);
    c.start_with_env(Alpha, env);
    c.start_with_env(Beta, env);
    c.wait_in_sync(Duration::from_secs(60));
    promote(&c, Alpha, false);
    c
}

fn promote(c: &Cluster, n: NodeId, force: bool) {
    c.role(n, "primary", force).unwrap_or_else(|e| panic!("role primary on {}: {e}", n.name()));
    c.wait_for(n, "role Primary", Duration::from_secs(10), |v| v["role"] == "Primary");
}

/// Cuts the link and waits until alpha (Primary) has declared its peer gone.
fn disconnect(c: &Cluster) {
    c.cut();
    c.wait_for(Alpha, "peer gone", PEER_TIMEOUT + Duration::from_secs(2), |v| !is_connected(v));
}

/// fio through `n`: `args` plus the nbd engine, to completion.
fn fio(c: &Cluster, n: NodeId, tag: &str, args: &[&str]) -> (u64, u64) {
    clients::fio_run(c.dir(), &c.nbd_uri(n), tag, args)
}

fn blockctl(c: &Cluster, n: NodeId, args: &[&str]) -> blockd_tests::cmd::Output {
    let mut b = c.blockctl(n);
    b.args(args);
    try_run(&mut b, Duration::from_secs(300))
}

/// Disconnect, write a known 1% of a 4 GiB volume through the primary (each 64 KiB block
/// once: fio's random map), reconnect: the data the resync sends is the dirtied bytes, within
/// 10%, and nothing of the other 99% is read, sent or compared.
#[test]
fn one_percent_dirty_resyncs_only_what_was_written() {
    let c = alpha_primary("resync-1pct", "4GiB", &[]);
    disconnect(&c);
    let dirtied = 41 * MIB; // 1% of 4 GiB, rounded to whole 64 KiB blocks
    let io_size = format!("--io_size={dirtied}");
    let (written, _) = fio(
        &c,
        Alpha,
        "dirty",
        &["--rw=randwrite", "--bs=64k", "--size=4g", &io_size, "--iodepth=8", "--randseed=7"],
    );
    assert_eq!(written, dirtied);
    let v = c.vol(Alpha);
    assert_eq!(
        v["out_of_sync"].as_u64(),
        Some(dirtied),
        "the bitmap marks exactly the writes: {v}"
    );
    c.heal();
    let started = Instant::now();
    c.wait_in_sync(Duration::from_secs(120));
    let (data, all) = (counter(&c, Alpha, "resync_bytes"), covered(&c, Alpha));
    eprintln!(
        "resync of {dirtied} dirty bytes: {data} data bytes, {all} covered, {:?}",
        started.elapsed()
    );
    assert!(data <= dirtied + dirtied / 10, "sent {data} data bytes for {dirtied} dirtied");
    assert!(data >= dirtied * 9 / 10, "sent only {data} of {dirtied} dirtied bytes");
    assert!(all <= dirtied + dirtied / 10, "covered {all} bytes for {dirtied} dirtied");
    c.assert_identical();
}

/// Random 4 KiB writes over the first 160 MiB (two jobs of 80 MiB side by side), crc32c
/// verified, plus `last` (`--end_fsync=1` to write, `--verify_only=1` to check them again).
fn verify_job(last: &str) -> [&str; 10] {
    [
        "--rw=randwrite",
        "--bs=4k",
        "--size=80m",
        "--iodepth=8",
        "--numjobs=2",
        "--offset_increment=80m",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randrepeat=1",
        last,
    ]
}

/// Resync under a concurrent fio verify load (the resync slowed to 16 MiB/s so that the two
/// overlap): fio's verify passes, the files end identical.
#[test]
fn resync_under_concurrent_verify_load() {
    let env = [("BLOCKD_RESYNC__MAX_RATE", "16MiB")];
    let c = alpha_primary("resync-load", "256MiB", &env);
    disconnect(&c);
    fio(&c, Alpha, "fill", &["--rw=write", "--bs=1m", "--size=96m", "--offset=128m"]);
    c.heal();
    c.wait_for(Alpha, "resync running", Duration::from_secs(20), |v| v["conn"] == "SyncSource");
    let load = FioRun::spawn(c.dir(), &c.nbd_uri(Alpha), "load", &verify_job("--end_fsync=1"));
    let during = c.vol(Alpha);
    let (written, read) = load.finish(Duration::from_secs(180));
    assert!(written > 0 && read == written, "fio verify: wrote {written}, verified {read}");
    eprintln!("status while fio ran: {during}");
    c.wait_in_sync(Duration::from_secs(120));
    assert!(
        counter(&c, Alpha, "resync_bytes") >= 90 * MIB,
        "the 96 MiB written alone were resynced"
    );
    fio(&c, Alpha, "verify-again", &verify_job("--verify_only=1"));
    c.assert_identical();
}

/// The primary is SIGKILLed during random writes over the whole volume; beta is promoted and
/// writes more; alpha returns as Secondary. The resync covers alpha's activity-log extents
/// (8 × 4 MiB here) plus beta's bitmap and nothing more, and with checksums only the blocks
/// that really differ travel.
#[test]
fn primary_crash_resyncs_activity_log_plus_peer_bitmap_by_checksum() {
    let extents = 8u64;
    let env = [("BLOCKD_RESYNC__ACTIVITY_LOG_EXTENTS", "8")];
    let mut c = alpha_primary("resync-crash", "256MiB", &env);
    let job = [
        "--rw=randwrite",
        "--bs=4k",
        "--size=256m",
        "--iodepth=16",
        "--time_based=1",
        // Long enough for a loaded machine: the load ends with alpha's kill, not with fio.
        "--runtime=150",
        "--randseed=3",
    ];
    let mut load = FioRun::spawn(c.dir(), &c.nbd_uri(Alpha), "load", &job);
    // Enough writes that the 8-extent log has turned over several times (64 extents in all).
    c.wait_for(Alpha, "writes", Duration::from_secs(150), |v| {
        v["counters"]["peer_writes"].as_u64() > Some(5_000)
    });
    c.kill(Alpha);
    let _ = load.bg.wait(Duration::from_secs(30));
    c.wait_for(Beta, "peer gone", PEER_TIMEOUT + Duration::from_secs(2), |v| !is_connected(v));
    promote(&c, Beta, true);
    fio(
        &c,
        Beta,
        "after",
        &["--rw=randwrite", "--bs=64k", "--size=256m", "--io_size=8m", "--randseed=9"],
    );
    let beta_dirty = c.vol(Beta)["out_of_sync"].as_u64().expect("out_of_sync");
    assert!((8 * MIB..=9 * MIB).contains(&beta_dirty), "beta's bitmap: {beta_dirty}");
    // What really differs, with alpha down and beta idle.
    let differ = differing_blocks(&c.backing(Alpha), &c.backing(Beta)).len() as u64 * 4096;
    c.start_with_env(Alpha, &env);
    c.wait_in_sync(Duration::from_secs(120));
    let (data, all, same) = (
        counter(&c, Beta, "resync_bytes"),
        covered(&c, Beta),
        counter(&c, Beta, "resync_same_bytes"),
    );
    eprintln!("differing {differ} bytes, beta dirty {beta_dirty}; resync sent {data} data, covered {all}, {same} same");
    let al = extents * 4 * MIB;
    assert!(
        all <= al + beta_dirty,
        "covered {all} > activity log {al} + beta's bitmap {beta_dirty}"
    );
    assert!(same > 0, "the crashed primary's extents were not compared by checksum");
    assert!(data <= differ + MIB, "sent {data} data bytes for {differ} that really differ");
    assert!(data >= differ, "sent {data} < {differ} differing bytes");
    c.assert_identical();
}

/// The secondary SIGKILLed and restarted, then stopped cleanly and restarted, while the
/// primary writes: each time only what was written meanwhile is resynced, never the device.
#[test]
fn secondary_restarts_do_not_resync_the_whole_device() {
    let size = 512 * MIB;
    let mut c = alpha_primary("resync-secondary", "512MiB", &[]);
    let write = ["--rw=randwrite", "--bs=4k", "--size=512m", "--io_size=4m", "--iodepth=4"];
    for (round, kill) in [(1, true), (2, false)] {
        let before = covered(&c, Alpha);
        if kill {
            c.kill(Beta);
        } else {
            c.stop(Beta);
        }
        c.wait_for(Alpha, "peer gone", PEER_TIMEOUT + Duration::from_secs(2), |v| !is_connected(v));
        fio(&c, Alpha, &format!("while-away-{round}"), &write);
        c.start(Beta);
        c.wait_in_sync(Duration::from_secs(60));
        let sent = covered(&c, Alpha) - before;
        eprintln!(
            "round {round} ({}): resync covered {sent} bytes",
            if kill { "SIGKILL" } else { "clean stop" }
        );
        assert!(sent > 0 && sent <= 5 * MIB, "round {round}: covered {sent} of {size} bytes");
    }
    c.assert_identical();
}

/// Both nodes made Primary while partitioned, each writes, the link heals: split brain on
/// both, in status and logs, nothing copied, nothing changed. `resolve --discard-local` on
/// beta makes it identical to alpha, copying only the ranges either side wrote.
#[test]
fn split_brain_is_reported_then_resolved_by_discard_local() {
    let c = alpha_primary("resync-split", "256MiB", &[]);
    disconnect(&c);
    c.wait_for(Beta, "peer gone", PEER_TIMEOUT + Duration::from_secs(2), |v| !is_connected(v));
    promote(&c, Beta, true);
    fio(&c, Alpha, "a", &["--rw=write", "--bs=1m", "--size=8m", "--offset=16m"]);
    fio(&c, Beta, "b", &["--rw=write", "--bs=1m", "--size=4m", "--offset=100m"]);
    let files =
        |c: &Cluster| [Alpha, Beta].map(|n| std::fs::read(c.backing(n)).expect("read backing"));
    let before = files(&c);
    c.heal();
    for n in [Alpha, Beta] {
        let v = c.wait_for(n, "StandAlone: split brain", Duration::from_secs(20), |v| {
            v["conn"] == "StandAlone"
                && v["split_brain"] == true
                && v["conn_reason"].as_str().is_some_and(|r| r.contains("split brain"))
        });
        eprintln!("{}: {v}", n.name());
        assert!(c.log_text(n).contains("split brain"), "{} must log the split brain", n.name());
    }
    sleep(Duration::from_secs(2));
    assert!(before == files(&c), "no data may change while split");
    assert_eq!(covered(&c, Alpha) + covered(&c, Beta), 0, "nothing may be copied");
    // Resolving is refused on a Primary.
    let refused = blockctl(&c, Beta, &["resolve", "--discard-local"]);
    assert_ne!(refused.code(), 0, "resolve on a Primary must fail:\n{refused}");
    c.role(Beta, "secondary", false).expect("demote beta");
    // What needs the peer is refused as a split brain (the control API's kind), not as an
    // unreachable peer.
    let promote = c.role(Beta, "primary", false).expect_err("no promotion while split");
    assert!(promote.contains("(SplitBrain)"), "{promote}");
    let verify = blockctl(&c, Alpha, &["verify"]);
    assert_ne!(verify.code(), 0, "verify while split must fail:\n{verify}");
    assert!(verify.to_string().contains("(SplitBrain)"), "{verify}");
    blockctl(&c, Beta, &["resolve", "--discard-local"]).assert_success();
    blockctl(&c, Beta, &["wait-sync", "--timeout", "60s"]).assert_success();
    c.wait_in_sync(Duration::from_secs(60));
    for n in [Alpha, Beta] {
        assert_eq!(c.vol(n)["split_brain"], false, "{}: resolved", n.name());
    }
    let sent = covered(&c, Alpha);
    eprintln!("resolve copied {sent} bytes");
    assert!((12 * MIB..=13 * MIB).contains(&sent), "copied {sent}: the union is 8 + 4 MiB");
    c.assert_identical();
}

/// A byte changed directly in beta's backing file is found by `blockctl verify` (while fio
/// writes elsewhere) and repaired.
#[test]
fn verify_finds_and_repairs_a_changed_byte() {
    let c = alpha_primary("resync-verify", "128MiB", &[]);
    fio(&c, Alpha, "fill", &["--rw=write", "--bs=1m", "--size=32m"]);
    // Behind blockd's back: one byte of beta's copy, in the middle of the written range.
    let offset = 20 * MIB + 12345;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(c.backing(Beta)).expect("open");
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).expect("read");
    f.write_all_at(&[b[0] ^ 0x5a], offset).expect("write");
    f.sync_all().expect("sync");
    assert!(differing_blocks(&c.backing(Alpha), &c.backing(Beta)).len() == 1);
    let load = FioRun::spawn(
        c.dir(),
        &c.nbd_uri(Alpha),
        "load",
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--size=32m",
            "--offset=64m",
            "--time_based=1",
            "--runtime=5",
        ],
    );
    let out = blockctl(&c, Alpha, &["verify"]);
    out.assert_success();
    assert!(out.stdout.contains("4096 bytes differed"), "verify must find one 4 KiB block:\n{out}");
    load.finish(Duration::from_secs(60));
    c.wait_in_sync(Duration::from_secs(30));
    c.assert_identical();
    assert_eq!(counter(&c, Alpha, "verify_differed"), 4096);
    let again = blockctl(&c, Alpha, &["verify"]);
    assert!(again.stdout.contains(", 0 bytes differed"), "a second verify finds nothing:\n{again}");
}

/// A resync interrupted twice, by a link cut and then by killing the target, completes without
/// starting over: the data sent in all is far less than three passes would be.
#[test]
fn resync_interrupted_twice_resumes() {
    let env = [("BLOCKD_RESYNC__MAX_RATE", "24MiB")];
    let mut c = alpha_primary("resync-resume", "256MiB", &env);
    disconnect(&c);
    let dirty = 128 * MIB;
    fio(&c, Alpha, "fill", &["--rw=write", "--bs=1m", "--size=128m"]);
    c.heal();
    let progressed = |c: &Cluster, min: u64| {
        c.wait_for(Alpha, "resync progress", Duration::from_secs(60), |v| {
            v["resync"]["done"].as_u64().is_some_and(|d| d >= min)
        })
    };
    progressed(&c, 64 * MIB);
    disconnect(&c);
    let left = c.vol(Alpha)["out_of_sync"].as_u64().expect("out_of_sync");
    eprintln!("after the cut: {left} bytes left");
    // Checkpoints come every 0.5 s (12 MiB at this rate) plus what was in flight: at least
    // half of the 64 MiB copied must have been kept.
    assert!(left <= dirty - 32 * MIB, "a cut must keep what was copied: {left} left");
    c.heal();
    progressed(&c, 32 * MIB);
    c.kill(Beta);
    c.wait_for(Alpha, "peer gone", PEER_TIMEOUT + Duration::from_secs(2), |v| !is_connected(v));
    let left2 = c.vol(Alpha)["out_of_sync"].as_u64().expect("out_of_sync");
    eprintln!("after killing the target: {left2} bytes left");
    assert!(left2 < left, "progress since the cut must be kept: {left2} >= {left}");
    assert_eq!(c.vol(Alpha)["disk"], "UpToDate");
    c.start_with_env(Beta, &env);
    assert_eq!(c.vol(Beta)["disk"], "Inconsistent", "an interrupted target stays Inconsistent");
    c.wait_in_sync(Duration::from_secs(60));
    let sent = counter(&c, Alpha, "resync_bytes");
    eprintln!("{dirty} dirty bytes, {sent} sent over three connections");
    // From the start each time: 128 + 64 + 96 MiB at least (2.25×).
    assert!(sent < dirty + dirty / 2, "sent {sent} for {dirty} dirty: resumed from the start?");
    c.assert_identical();
}

/// Unrelated data (alpha's backing existed before blockd, beta's is new): both refuse and say
/// so; `resolve --full-sync` on beta copies the whole device, the holes of alpha's sparse
/// backing as zero requests (SEEK_DATA), so only the data alpha really holds travels as data.
#[test]
fn unrelated_data_needs_full_sync_which_skips_holes() {
    let mut c = Cluster::new("resync-unrelated", "256MiB");
    let backing = c.backing(Alpha);
    std::fs::create_dir_all(backing.parent().expect("data dir")).expect("data dir");
    let f = std::fs::File::create(&backing).expect("create alpha's backing");
    f.set_len(256 * MIB).expect("size");
    let data: Vec<u8> = (0..8 * MIB).map(|i| (i % 251) as u8 + 1).collect();
    f.write_all_at(&data, 100 * MIB).expect("write");
    f.sync_all().expect("sync");
    c.start(Alpha);
    c.start(Beta);
    for n in [Alpha, Beta] {
        c.wait_for(n, "StandAlone: unrelated data", Duration::from_secs(20), |v| {
            v["conn"] == "StandAlone"
                && v["conn_reason"].as_str().is_some_and(|r| r.contains("unrelated"))
        });
    }
    let refused = blockctl(&c, Beta, &["resolve", "--discard-local"]);
    assert_ne!(refused.code(), 0, "discard-local cannot answer unrelated data:\n{refused}");
    blockctl(&c, Beta, &["resolve", "--full-sync"]).assert_success();
    c.wait_in_sync(Duration::from_secs(60));
    let (data_sent, zero) =
        (counter(&c, Alpha, "resync_bytes"), counter(&c, Alpha, "resync_zero_bytes"));
    eprintln!("full sync: {data_sent} bytes as data, {zero} as zero requests");
    assert_eq!(data_sent + zero, 256 * MIB, "a full sync covers the device");
    assert!(data_sent <= 9 * MIB, "only alpha's 8 MiB of data may travel as data: {data_sent}");
    c.assert_identical();
}
