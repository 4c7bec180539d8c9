//! Synchronous mirroring between two nodes (issue 3, "What it must show"): two daemons in
//! network namespaces joined by veth (harness: `blockd_tests::cluster`), real clients (fio,
//! qemu-io, python libnbd) on the primary's unix socket.
//!
//! The oracle is design.md §10's: every write a client saw acknowledged is present after a
//! failure, and the two backing files are byte-identical once the nodes are in sync. Tests
//! that rely on "identical" also check that the nodes really stayed (or became) connected, so
//! that a resync cannot hide a divergence and a refusal cannot pass for an idle link.

use std::{
    net::{SocketAddr, TcpListener},
    thread::sleep,
    time::{Duration, Instant},
};

use blockd::replication::{
    noise::{self, Side},
    record::{Channel, Protection},
    wire::{Frame, Message, PROTOCOL_VERSION},
};
use blockd_tests::{
    cluster::{
        clients::{self, FioRun},
        peer::{self, Proxy, Wire},
        write_secret, Alpha, Beta, Cluster, NodeId, PEER_TIMEOUT, PORT, VOL,
    },
    cmd::{cmd, try_run},
    nbd::RawClient,
};
use bytes::Bytes;
use serde_json::Value;

/// How long a connect plus a whole-volume resync of a small volume may take.
const SYNC_TIMEOUT: Duration = Duration::from_secs(40);

/// A cluster with both daemons started (not yet waited for a connection).
fn started(test: &str, size: &str) -> Cluster {
    let mut c = Cluster::new(test, size);
    c.start(Alpha);
    c.start(Beta);
    c
}

/// Both nodes connected and in sync, alpha Primary.
fn alpha_primary(test: &str, size: &str) -> Cluster {
    let c = started(test, size);
    c.wait_in_sync(SYNC_TIMEOUT);
    c.role(Alpha, "primary", false).unwrap_or_else(|e| panic!("role primary on alpha: {e}"));
    c.wait_for(Alpha, "role Primary", Duration::from_secs(10), |v| v["role"] == "Primary");
    c
}

fn counter(c: &Cluster, n: NodeId, name: &str) -> u64 {
    let v = c.vol(n);
    v["counters"][name].as_u64().unwrap_or_else(|| panic!("counter {name} missing: {v}"))
}

fn is_connected(v: &Value) -> bool {
    ["Connected", "SyncSource", "SyncTarget"].iter().any(|s| v["conn"] == *s)
}

/// Random 4 KiB writes over a whole `mib`-MiB volume (2 jobs, 2 connections, iodepth 16),
/// crc32c verify after the writes, a final flush. Run again with `--verify_only=1`, the
/// same options re-read and check what the first run wrote.
fn verify_job(mib: u64, extra: &[&str]) -> Vec<String> {
    let half = mib / 2;
    let mut v: Vec<String> = ["--rw=randwrite", "--bs=4k", "--iodepth=16", "--numjobs=2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.push(format!("--size={half}m"));
    v.push(format!("--offset_increment={half}m"));
    v.extend(
        ["--verify=crc32c", "--verify_fatal=1", "--end_fsync=1", "--randrepeat=1"]
            .map(String::from),
    );
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The harness itself: namespaces, veth, nftables cut/heal in both and one direction, two
/// daemons that come up Secondary, freeze/thaw/stop/kill by pid, and cleanup on drop.
#[test]
fn harness_namespaces_cut_heal_and_daemons() {
    let names;
    {
        let mut c = started("mirror-harness", "16MiB");
        names = [Alpha, Beta].map(|n| c.netns(n).name().to_string());
        for n in [Alpha, Beta] {
            let v = c.vol(n);
            assert_eq!(v["role"], "Secondary", "{} must start Secondary: {v}", n.name());
            assert!(v["conn"].is_string(), "conn missing: {v}");
        }
        assert!(c.udp_reaches(Alpha, Beta) && c.udp_reaches(Beta, Alpha));
        c.cut();
        assert!(!c.udp_reaches(Alpha, Beta), "cut: alpha still reaches beta");
        assert!(!c.udp_reaches(Beta, Alpha), "cut: beta still reaches alpha");
        c.heal();
        c.cut_one_way(Alpha, Beta);
        assert!(!c.udp_reaches(Alpha, Beta), "one-way cut alpha→beta leaks");
        assert!(c.udp_reaches(Beta, Alpha), "one-way cut alpha→beta blocks beta→alpha");
        c.heal();
        assert!(c.udp_reaches(Alpha, Beta) && c.udp_reaches(Beta, Alpha));

        let pid = c.pid(Alpha);
        c.freeze(Alpha);
        assert_stopped(pid, true);
        c.thaw(Alpha);
        assert_stopped(pid, false);
        c.stop(Alpha);
        c.kill(Beta);
        assert!(!c.is_running(Alpha) && !c.is_running(Beta));
        c.start(Alpha);
        c.freeze(Alpha); // Drop must clean up a frozen daemon too
    }
    for name in names {
        assert!(!std::path::Path::new("/run/netns").join(&name).exists(), "{name} left behind");
    }
}

/// The harness's proxy: transparent until armed, then it flips a byte of the next large record
/// (the receiver must see it fail authentication) and refuses new connections until released.
#[test]
fn harness_proxy_corrupts_one_write() {
    let c = Cluster::new("mirror-proxy", "16MiB");
    let target: SocketAddr = format!("{}:7000", Beta.ip()).parse().expect("addr");
    let listen: SocketAddr = format!("{}:7001", Beta.ip()).parse().expect("addr");
    let server = c.netns(Beta).enter(|| TcpListener::bind(target)).expect("bind target");
    let proxy = Proxy::start(c.netns(Beta), listen, target);
    let dial = || {
        let s = c.netns(Alpha).enter(|| std::net::TcpStream::connect(listen)).expect("dial");
        Wire::from_stream(s)
    };
    let write = |offset| {
        let data = Bytes::from(vec![0x33; 4096]);
        Frame { volume: 0, id: 1, reply: false, msg: Message::Write { offset, data } }
    };
    // Both ends of a record channel with made-up keys, after the two clear frames.
    let start = |client: &mut Wire, end: &mut Wire| {
        let (k1, k2) = ([1u8; 32], [2u8; 32]);
        let p = Protection::Encrypt;
        for _ in 0..2 {
            client.send(&peer::frame(Message::Ping));
            assert_eq!(end.recv(Duration::from_secs(5)).expect("ping").msg, Message::Ping);
        }
        (Channel::new(&k1, &k2, p), Channel::new(&k2, &k1, p))
    };
    let mut client = dial();
    let mut end = Wire::accept(&server, Duration::from_secs(5));
    let (mut tx, mut rx) = start(&mut client, &mut end);
    client.send_sealed(&mut tx, &peer::frame(Message::Ping));
    client.send_sealed(&mut tx, &write(4096));
    assert_eq!(end.recv_sealed(&mut rx, Duration::from_secs(5)).expect("ping").msg, Message::Ping);
    assert_eq!(end.recv_sealed(&mut rx, Duration::from_secs(5)).expect("write"), write(4096));
    proxy.arm();
    client.send_sealed(&mut tx, &peer::frame(Message::Ping));
    client.send_sealed(&mut tx, &write(8192));
    assert_eq!(end.recv_sealed(&mut rx, Duration::from_secs(5)).expect("ping").msg, Message::Ping);
    let got = end.recv_sealed(&mut rx, Duration::from_secs(5));
    let caught = got.as_ref().is_err_and(|e| e.contains("authentication"));
    assert!(caught, "corruption not detected: {got:?}");
    assert!(proxy.corrupted().is_some_and(|n| n > 4096), "{:?}", proxy.corrupted());
    let mut refused = dial();
    assert!(refused.closed_within(Duration::from_secs(5)), "armed proxy must refuse");
    proxy.release();
    let mut again = dial();
    let mut end = Wire::accept(&server, Duration::from_secs(5));
    let (mut tx, mut rx) = start(&mut again, &mut end);
    again.send_sealed(&mut tx, &write(0));
    let got = end.recv_sealed(&mut rx, Duration::from_secs(5));
    assert_eq!(got.expect("write after release"), write(0));
}

/// Waits up to 2 s for the daemon's state in /proc/PID/stat to be (or not be) 'T' (stopped);
/// signals are delivered asynchronously.
fn assert_stopped(pid: u32, stopped: bool) {
    let state = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let after = stat.rfind(')').expect("comm");
        stat[after + 2..].chars().next().expect("state")
    };
    let end = Instant::now() + Duration::from_secs(2);
    while (state() == 'T') != stopped {
        assert!(Instant::now() < end, "pid {pid}: state {} (want stopped={stopped})", state());
        sleep(Duration::from_millis(20));
    }
}

/// fio writes with crc32c verify through the primary; the roles switch (alpha Secondary,
/// then beta Primary); fio `verify_only` through beta passes; alpha, now Secondary, refuses
/// NBD naming beta; the backing files are byte-identical.
#[test]
fn fio_verify_then_role_switch_verify_only_on_beta() {
    let c = alpha_primary("mirror-switch", "64MiB");
    let job = verify_job(64, &[]);
    let (written, read) = clients::fio_run(c.dir(), &c.nbd_uri(Alpha), "write", &strs(&job));
    assert_eq!((written, read), (64 << 20, 64 << 20), "fio must write and verify all 64 MiB");
    assert!(counter(&c, Alpha, "peer_writes") >= 16384, "writes not mirrored: {}", c.vol(Alpha));
    assert_eq!(counter(&c, Alpha, "degraded_writes"), 0, "{}", c.vol(Alpha));

    c.wait_for(Alpha, "no NBD clients", Duration::from_secs(10), |v| v["clients"] == 0);
    c.role(Alpha, "secondary", false).unwrap_or_else(|e| panic!("role secondary on alpha: {e}"));
    c.wait_for(Beta, "peer Secondary", Duration::from_secs(10), |v| v["peer_role"] == "Secondary");
    c.role(Beta, "primary", false).unwrap_or_else(|e| panic!("role primary on beta: {e}"));
    c.wait_for(Beta, "role Primary", Duration::from_secs(10), |v| v["role"] == "Primary");

    assert_refuses_nbd(&c, Alpha, "beta");

    let verify = verify_job(64, &["--verify_only=1"]);
    let (_, read) = clients::fio_run(c.dir(), &c.nbd_uri(Beta), "verify", &strs(&verify));
    assert_eq!(read, 64 << 20, "verify_only must read back all 64 MiB through beta");
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_identical();
}

/// Many overlapping requests in flight from several connections: fio (4 jobs × iodepth 32,
/// random 512 B–16 KiB writes of fresh data in 64 KiB, a flush every 64) and then python libnbd
/// (4 connections × 32 in flight of writes, FUA writes, write-zeroes, trims, flushes). The
/// link never drops, so no resync can paper over a divergence; then the files are identical.
#[test]
fn overlapping_concurrent_writes_stay_identical() {
    let c = alpha_primary("mirror-stress", "16MiB");
    let uri = c.nbd_uri(Alpha);
    let mut fio: Vec<&str> = vec!["--size=64k", "--iodepth=32", "--numjobs=4", "--time_based=1"];
    fio.extend(["--runtime=4", "--rw=randwrite", "--bsrange=512-16k", "--blockalign=512"]);
    fio.extend(["--norandommap=1", "--randrepeat=0", "--refill_buffers=1", "--fsync=64"]);
    let (written, _) = clients::fio_run(c.dir(), &uri, "stress", &fio);
    assert!(written > 1 << 20, "fio wrote only {written} bytes");

    let span = 64 * 1024;
    let mut procs: Vec<_> =
        (1..=4).map(|seed| clients::stress(c.dir(), &uri, seed, 4, 32, span)).collect();
    for p in &mut procs {
        let status = p.wait(Duration::from_secs(60));
        assert!(status.is_some_and(|s| s.success()), "stress client: {status:?}\n{}", p.log_text());
    }
    c.wait_for(Alpha, "no NBD clients", Duration::from_secs(10), |v| v["clients"] == 0);
    for n in [Alpha, Beta] {
        let v = c.vol(n);
        assert_eq!(v["conn"], "Connected", "{}: the link must not have dropped: {v}", n.name());
        assert_eq!(
            v["counters"]["connects"],
            1,
            "{}: reconnected during the stress: {v}",
            n.name()
        );
    }
    let a = c.vol(Alpha);
    assert_eq!(a["counters"]["degraded_writes"], 0, "{a}");
    assert_eq!(a["out_of_sync"], 0, "{a}");
    c.assert_identical();
    let head = std::fs::read(c.backing(Alpha)).expect("read backing");
    assert!(head[..span as usize].iter().any(|&b| b != 0), "the stress left nothing behind");
}

/// The secondary is SIGKILLed while fio writes: fio sees no error; the secondary comes back,
/// the resync runs, the files end identical and fio verify through the primary passes.
#[test]
fn secondary_killed_during_writes_resyncs() {
    let mut c = alpha_primary("mirror-kill-secondary", "64MiB");
    let job = verify_job(64, &["--rate_iops=,2000"]);
    let fio = FioRun::spawn(c.dir(), &c.nbd_uri(Alpha), "write", &strs(&job));
    wait_writes(&c, 1000);
    c.kill(Beta);
    c.wait_for(Alpha, "peer gone", PEER_TIMEOUT + Duration::from_secs(1), |v| !is_connected(v));
    let (written, read) = fio.finish(Duration::from_secs(60));
    assert_eq!((written, read), (64 << 20, 64 << 20), "fio must write and verify all 64 MiB");
    assert!(counter(&c, Alpha, "degraded_writes") > 0, "no degraded write: {}", c.vol(Alpha));

    c.start(Beta);
    c.wait_in_sync(SYNC_TIMEOUT);
    assert!(counter(&c, Alpha, "resync_bytes") > 0, "no resync ran: {}", c.vol(Alpha));
    let verify = verify_job(64, &["--verify_only=1"]);
    clients::fio_run(c.dir(), &c.nbd_uri(Alpha), "verify", &strs(&verify));
    c.assert_identical();
}

/// `n`, a Secondary, must refuse NBD: nbdinfo fails, and the text of the GO error (which
/// nbdinfo 1.14 does not print) names `primary`.
fn assert_refuses_nbd(c: &Cluster, n: NodeId, primary: &str) {
    let info = try_run(&mut cmd("nbdinfo", &["--size", &c.nbd_uri(n)]), Duration::from_secs(20));
    assert_ne!(info.code(), 0, "{}, Secondary, must not serve NBD:\n{info}", n.name());
    let err = RawClient::negotiating(&c.socket(n)).go(VOL, &[]).expect_err("GO must fail");
    let text = String::from_utf8_lossy(&err.data);
    assert!(text.contains(primary), "GO refusal must name the primary {primary}: {text:?}");
}

/// Waits until the primary counted at least `n` more writes than now (the client is writing).
fn wait_writes(c: &Cluster, n: u64) {
    let start = counter(c, Alpha, "writes");
    c.wait_for(Alpha, "writes to flow", Duration::from_secs(20), |v| {
        v["counters"]["writes"].as_u64().is_some_and(|w| w >= start + n)
    });
}

/// The primary is SIGKILLed while a python client writes numbered blocks (32 in flight) and
/// logs each one only after its reply; beta is promoted with `--force`; every logged block
/// reads back, through beta's NBD export, as written.
#[test]
fn primary_killed_acknowledged_writes_survive_on_beta() {
    let mut c = alpha_primary("mirror-kill-primary", "64MiB");
    let (mut writer, log) = clients::acked_writer(c.dir(), &c.nbd_uri(Alpha), 16384, 32);
    wait_writes(&c, 3000);
    c.kill(Alpha);
    let status = writer.wait(Duration::from_secs(30));
    let out = writer.log_text();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(3),
        "the writer must stop on the lost server:\n{out}"
    );
    let rounds = clients::acked_rounds(&log);
    assert!(rounds.len() >= 2000, "only {} blocks acknowledged before the kill", rounds.len());

    c.wait_for(Beta, "peer gone", PEER_TIMEOUT + Duration::from_secs(1), |v| !is_connected(v));
    assert_eq!(c.vol(Beta)["disk"], "UpToDate", "{}", c.vol(Beta));
    c.role(Beta, "primary", true).unwrap_or_else(|e| panic!("role primary --force on beta: {e}"));
    c.wait_for(Beta, "role Primary", Duration::from_secs(10), |v| v["role"] == "Primary");
    let checked = clients::check_acked(&c.socket(Beta), VOL, &rounds);
    eprintln!("{checked} acknowledged blocks read back from beta");
}

/// Cuts the link with `cut` while fio writes through alpha: alpha goes degraded within
/// peer-timeout + 1 s, writes go on (degraded), the link heals, the resync runs, identical.
fn cut_during_writes(test: &str, cut: impl Fn(&Cluster)) {
    let c = alpha_primary(test, "64MiB");
    let job = verify_job(64, &["--rate_iops=,1000"]);
    let fio = FioRun::spawn(c.dir(), &c.nbd_uri(Alpha), "write", &strs(&job));
    wait_writes(&c, 500);
    cut(&c);
    let cut_at = Instant::now();
    let limit = PEER_TIMEOUT + Duration::from_secs(1);
    let v = c.wait_for(Alpha, "degraded (peer declared gone)", limit, |v| !is_connected(v));
    eprintln!("alpha degraded {:?} after the cut: {v}", cut_at.elapsed());
    assert_eq!(v["role"], "Primary", "{v}");
    let before = counter(&c, Alpha, "writes");
    c.wait_for(Alpha, "degraded writes", Duration::from_secs(5), |v| {
        v["counters"]["degraded_writes"].as_u64() > Some(0)
            && v["counters"]["writes"].as_u64() > Some(before + 100)
    });
    c.heal();
    c.wait_in_sync(SYNC_TIMEOUT);
    let (written, _) = fio.finish(Duration::from_secs(90));
    assert_eq!(written, 64 << 20, "fio must write all 64 MiB");
    c.wait_in_sync(SYNC_TIMEOUT);
    assert!(counter(&c, Alpha, "resync_bytes") > 0, "no resync ran: {}", c.vol(Alpha));
    c.assert_identical();
}

#[test]
fn link_cut_both_ways_during_writes() {
    cut_during_writes("mirror-cut", Cluster::cut);
}

/// Only the primary's packets are lost: alpha still hears beta until beta gives up.
#[test]
fn link_cut_primary_to_secondary_during_writes() {
    cut_during_writes("mirror-cut-a2b", |c| c.cut_one_way(Alpha, Beta));
}

/// Only the secondary's packets (acks, pongs) are lost: beta still receives and applies.
#[test]
fn link_cut_secondary_to_primary_during_writes() {
    cut_during_writes("mirror-cut-b2a", |c| c.cut_one_way(Beta, Alpha));
}

/// Starts alpha alone, promotes it with `--force` and writes 1 MiB of 0xa5 at 0 with
/// qemu-io, so that any connection would make alpha a resync source towards beta.
fn alpha_with_data(test: &str) -> Cluster {
    let mut c = Cluster::new(test, "64MiB");
    c.start(Alpha);
    c.role(Alpha, "primary", true).unwrap_or_else(|e| panic!("role primary --force on alpha: {e}"));
    c.qemu_io(Alpha, "write -P 0xa5 0 1M");
    c
}

/// For a few peer timeouts the nodes must not connect; then at least one node's
/// `conn_reason`, and a line of its log, must contain one of `words` (case-insensitive).
fn assert_refused(c: &Cluster, words: &[&str]) {
    let end = Instant::now() + 3 * PEER_TIMEOUT;
    while Instant::now() < end {
        for n in [Alpha, Beta] {
            let v = c.vol(n);
            assert!(!is_connected(&v), "{} connected although it must refuse: {v}", n.name());
        }
        sleep(Duration::from_millis(200));
    }
    let says = |s: &str| words.iter().any(|w| s.to_lowercase().contains(w));
    let explained = [Alpha, Beta].into_iter().find_map(|n| {
        let reason = c.vol(n)["conn_reason"].as_str().unwrap_or("").to_string();
        let line = warnings(c, n).into_iter().find(|l| says(l));
        line.filter(|_| says(&reason)).map(|l| (n.name(), reason, l))
    });
    let Some((node, reason, line)) = explained else {
        panic!(
            "neither node's conn_reason and log explain the refusal with {words:?}:\n alpha: {}\n beta: {}",
            c.vol(Alpha),
            c.vol(Beta)
        );
    };
    eprintln!("{node}: conn_reason {reason:?}\n{node}: log {line}");
}

/// `n`'s WARN and ERROR log lines, with the test directory's path cut out (its name, e.g.
/// "mirror-secret-…", must not pass for an explanation).
fn warnings(c: &Cluster, n: NodeId) -> Vec<String> {
    let dir = c.dir().display().to_string();
    let log = c.log_text(n);
    let lines = log.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR "));
    lines.map(|l| l.replace(&dir, "<dir>")).collect()
}

/// Beta's backing file must still be all zeroes, alpha's data intact.
fn assert_untouched(c: &Cluster) {
    let beta = std::fs::read(c.backing(Beta)).expect("read beta's backing");
    let touched = beta.iter().position(|&b| b != 0);
    assert_eq!(touched, None, "beta's backing was written although the link was refused");
    c.qemu_io(Alpha, "read -P 0xa5 0 1M");
}

/// Positive control after a refusal: beta restarted with the shared config connects, the
/// resync copies alpha's data, the files end identical.
fn control_connects(c: &mut Cluster) {
    c.start(Beta);
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_identical();
}

/// Beta started with another secret (env override): never connected, the refusal is logged
/// and in status, beta's data untouched; with the right secret the same nodes connect.
#[test]
fn wrong_secret_is_refused() {
    let mut c = alpha_with_data("mirror-secret");
    let other = c.dir().join("other-secret");
    write_secret(&other, 32);
    let env = [("BLOCKD_CLUSTER__SECRET_FILE", other.to_str().expect("utf-8 path"))];
    c.start_with_env(Beta, &env);
    assert_refused(&c, &["authenticat", "secret"]);
    assert_untouched(&c);
    c.stop(Beta);
    control_connects(&mut c);
}

/// Beta's config says 32 MiB instead of 64: refused, both sizes named, nothing copied; with
/// the same size (beta's files removed) they connect.
#[test]
fn different_volume_size_is_refused() {
    let mut c = alpha_with_data("mirror-size");
    let mut spec = c.spec();
    spec.size = "32MiB".into();
    let beta_cfg = c.dir().join("beta.toml");
    c.write_config(&beta_cfg, &spec);
    c.use_config(Beta, &beta_cfg);
    c.start(Beta);
    assert_refused(&c, &["size", "volumes differ"]);
    let reasons = format!("{} {}", c.vol(Alpha)["conn_reason"], c.vol(Beta)["conn_reason"]);
    let named = |alts: &[&str]| alts.iter().any(|s| reasons.contains(s));
    assert!(named(&["32MiB", "32 MiB", "33554432"]), "beta's size not named: {reasons}");
    assert!(named(&["64MiB", "64 MiB", "67108864"]), "alpha's size not named: {reasons}");
    assert_untouched(&c);
    c.stop(Beta);
    let data = c.backing(Beta).parent().expect("data dir").to_path_buf();
    std::fs::remove_dir_all(&data).and_then(|()| std::fs::create_dir(&data)).expect("reset beta");
    let shared = c.config(Alpha).to_path_buf();
    c.use_config(Beta, &shared);
    control_connects(&mut c);
}

/// Two connected nodes: while alpha is Primary, `role primary` on beta is refused, with and
/// without `--force`; roles and connection stay as they were.
#[test]
fn second_primary_is_refused() {
    let c = alpha_primary("mirror-two-primaries", "16MiB");
    c.wait_for(Beta, "peer Primary", Duration::from_secs(10), |v| v["peer_role"] == "Primary");
    for force in [false, true] {
        let err = c.role(Beta, "primary", force).expect_err("beta must not become Primary");
        assert!(
            err.to_lowercase().contains("primary"),
            "refusal (force={force}) must say why: {err}"
        );
    }
    let (a, b) = (c.vol(Alpha), c.vol(Beta));
    assert_eq!((&a["role"], &b["role"]), (&"Primary".into(), &"Secondary".into()), "{a}\n{b}");
    assert!(a["conn"] == "Connected" && b["conn"] == "Connected", "{a}\n{b}");
    assert_refuses_nbd(&c, Beta, "alpha");
}

/// The HELLO a fake "beta" sends.
fn fake_hello(version: u16) -> Message {
    Message::Hello { version, node: "beta".into(), instance: 0x7e57, encrypt: true }
}

/// A fake beta answers alpha's dial with a HELLO of the next protocol version followed by a
/// WRITE: alpha closes the connection, says why in its log and status, and writes nothing. The
/// same fake peer speaking alpha's version with the right secret gets through the handshake
/// (READY), so the version alone made the difference.
#[test]
fn wrong_protocol_version_is_refused() {
    let mut c = Cluster::new("mirror-version", "16MiB");
    c.start(Alpha);
    let size = 16u64 << 20;
    let addr: SocketAddr = format!("{}:{PORT}", Beta.ip()).parse().expect("addr");
    let listener = c.netns(Beta).enter(|| TcpListener::bind(addr)).expect("listen as beta");
    let mut w = Wire::accept(&listener, Duration::from_secs(10));
    let (ours, next) = (PROTOCOL_VERSION, PROTOCOL_VERSION + 1);
    w.send(&peer::frame(fake_hello(next)));
    let data = Bytes::from(vec![0x5a; 4096]);
    w.send(&Frame { volume: 0, id: 1, reply: false, msg: Message::Write { offset: 0, data } });
    assert!(
        w.closed_within(Duration::from_secs(5)),
        "alpha must close a version-{next} connection"
    );
    let v = c.wait_for(Alpha, "conn_reason naming the version", Duration::from_secs(5), |v| {
        v["conn_reason"].as_str().is_some_and(|r| r.to_lowercase().contains("version"))
    });
    assert!(!is_connected(&v), "{v}");
    let warned = warnings(&c, Alpha);
    let line = warned.iter().find(|l| l.contains(&format!("version {next}")));
    let line = line.unwrap_or_else(|| panic!("no warning names version {next}: {warned:#?}"));
    eprintln!("alpha: log {line}");
    let backing = std::fs::read(c.backing(Alpha)).expect("read alpha's backing");
    assert!(backing.iter().all(|&b| b == 0), "alpha applied data from a refused peer");

    // Control: alpha's own version and the right secret get to READY.
    let secret = std::fs::read(&c.spec().secret_file).expect("secret");
    let mut w = Wire::accept(&listener, Duration::from_secs(10));
    w.send(&peer::frame(fake_hello(ours)));
    let mut ch = fake_responder(&mut w, &secret, ours);
    let params = w.recv_sealed(&mut ch, Duration::from_secs(5)).expect("alpha's PARAMS");
    let Message::Params { volumes } = params.msg else { panic!("expected PARAMS, got {params:?}") };
    assert_eq!((volumes.len(), volumes[0].name.as_str(), volumes[0].size), (1, VOL, size));
    w.send_sealed(&mut ch, &peer::frame(Message::Params { volumes }));
    let ready = w.recv_sealed(&mut ch, Duration::from_secs(5));
    assert!(matches!(ready, Ok(Frame { msg: Message::Ready { .. }, .. })), "got {ready:?}");
}

/// Plays beta's side of the Noise handshake on a connection alpha dialed (beta's HELLO sent):
/// reads alpha's HELLO and message 1, answers it under `secret`.
fn fake_responder(w: &mut Wire, secret: &[u8], version: u16) -> Channel {
    let hello = w.recv_no_ping(Duration::from_secs(5)).expect("alpha's HELLO");
    let Message::Hello { version: v, node, instance, encrypt } = hello.msg else {
        panic!("expected alpha's HELLO, got {hello:?}");
    };
    assert_eq!((v, node.as_str(), encrypt), (version, "alpha", true));
    let alpha = Side { node: "alpha", instance };
    let prologue = noise::prologue(version, true, alpha, Side { node: "beta", instance: 0x7e57 });
    let m1 = w.recv(Duration::from_secs(5)).expect("alpha's NOISE");
    let Message::Noise { msg } = m1.msg else { panic!("expected NOISE, got {m1:?}") };
    let secrets = [std::sync::Arc::from(secret)];
    let (m2, ch, _) = noise::respond(&secrets, &prologue, &msg, Protection::Encrypt)
        .expect("alpha's message 1 verifies under the cluster secret");
    w.send(&peer::frame(Message::Noise { msg: m2.into() }));
    ch
}

/// A proxy between the nodes flips one byte in the payload of a WRITE: beta detects it (crc),
/// drops the link and never applies it; alpha completes the write degraded; once the proxy
/// lets the nodes reconnect, the resync brings the right data and the files are identical. A
/// write before the corruption passes the proxy intact (the proxy is transparent).
#[test]
fn corrupted_frame_is_detected_and_never_applied() {
    let mut c = Cluster::new("mirror-corrupt", "16MiB");
    let proxy_addr = format!("{}:7790", Beta.ip());
    let mut spec = c.spec();
    spec.replication[1] = proxy_addr.clone();
    let alpha_cfg = c.dir().join("alpha.toml");
    c.write_config(&alpha_cfg, &spec);
    c.use_config(Alpha, &alpha_cfg);
    // Beta's own dials to alpha are reset: the proxied connection is the only one.
    c.add_rule(
        Beta,
        "output",
        &format!("ip daddr {} tcp dport {PORT} reject with tcp reset", Alpha.ip()),
    );
    let target = format!("{}:{PORT}", Beta.ip()).parse().expect("addr");
    let proxy = Proxy::start(c.netns(Beta), proxy_addr.parse().expect("addr"), target);
    c.start(Alpha);
    c.start(Beta);
    c.wait_in_sync(SYNC_TIMEOUT);
    c.role(Alpha, "primary", false).unwrap_or_else(|e| panic!("role primary on alpha: {e}"));

    c.qemu_io(Alpha, "write -P 0x11 1M 64k");
    assert_eq!(c.backing_at(Beta, 1 << 20, 65536), vec![0x11; 65536], "proxy not transparent");
    proxy.arm();
    c.qemu_io(Alpha, "write -P 0x5a 4M 4k");
    let corrupted = proxy.corrupted();
    assert!(
        corrupted.is_some_and(|n| n > 4096),
        "the proxy did not corrupt the WRITE: {corrupted:?}"
    );
    c.wait_for(Beta, "link dropped", Duration::from_secs(5), |v| !is_connected(v));
    let warned = warnings(&c, Beta);
    let line = warned.iter().find(|l| l.contains("failed authentication"));
    let line =
        line.unwrap_or_else(|| panic!("no warning of beta says authentication: {warned:#?}"));
    eprintln!("beta: log {line}");
    assert_eq!(c.backing_at(Beta, 4 << 20, 4096), vec![0; 4096], "corrupted WRITE applied");
    let a = c.wait_for(Alpha, "degraded", PEER_TIMEOUT, |v| !is_connected(v));
    assert!(a["out_of_sync"].as_u64() >= Some(4096), "the write must be out of sync: {a}");

    proxy.release();
    c.wait_in_sync(SYNC_TIMEOUT);
    assert_eq!(c.backing_at(Beta, 4 << 20, 4096), vec![0x5a; 4096], "resync did not repair");
    c.assert_identical();
}

/// design.md §3: the primary flushes its peer once a second while writes happen, so acked writes
/// become durable there; once writes stop, so do those flushes (a flush is not a write).
#[test]
fn periodic_peer_flush_follows_writes_and_stops_when_idle() {
    let c = alpha_primary("mirror-idle-flush", "16MiB");
    // A write without a client FLUSH: only the periodic flush can make it durable on beta.
    let mut q =
        cmd("qemu-io", &["-f", "raw", "-t", "none", &c.nbd_uri(Alpha), "-c", "write -P 7 0 64k"]);
    let out = try_run(&mut q, Duration::from_secs(30));
    assert_eq!(out.code(), 0, "{out}");
    assert!(counter(&c, Alpha, "peer_writes") >= 1);
    sleep(Duration::from_millis(2500)); // two flush periods after the write
    let settled = counter(&c, Alpha, "flushes");
    assert!(settled >= 1, "the write was followed by a peer flush: {}", c.vol(Alpha));
    sleep(Duration::from_millis(3500));
    assert_eq!(
        counter(&c, Alpha, "flushes"),
        settled,
        "no flushes without writes: {}",
        c.vol(Alpha)
    );
}
