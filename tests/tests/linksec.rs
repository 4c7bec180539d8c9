//! The replication link against an attacker on its network (issue 11): real daemons in the
//! harness's namespaces, an attacker dialing from its own address (10.99.0.66, added to
//! alpha's veth) with the harness's raw frame tools, and no knowledge of the secret.
//!
//! The oracle: no session is replaced (each node's `connects` counter stays), nothing the
//! attacker sent is applied (the backing files), the pair stays Connected and keeps
//! mirroring, and each attempt is logged with its source and counted (`link_refused`).

use std::{
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use blockd::replication::wire::{self, Frame, Header, Message};
use blockd_tests::{
    cluster::{
        netns::VETH,
        peer::{Fault, Proxy, Wire},
        Alpha, Beta, Cluster, NodeId, PORT,
    },
    cmd::{cmd, run_timeout, signal, status_kib, Background},
    pattern,
};
use bytes::Bytes;

const ATTACKER: &str = "10.99.0.66";
const SYNC_TIMEOUT: Duration = Duration::from_secs(40);
const WAIT: Duration = Duration::from_secs(5);

/// A cluster with alpha Primary and in sync, and the attacker's address on alpha's veth.
fn connected(test: &str, prepare: impl FnOnce(&mut Cluster)) -> Cluster {
    let mut c = Cluster::new(test, "16MiB");
    c.netns(Alpha).ip(&["addr", "add", &format!("{ATTACKER}/24"), "dev", VETH]);
    prepare(&mut c);
    c.start(Alpha);
    c.start(Beta);
    c.wait_in_sync(SYNC_TIMEOUT);
    c.role(Alpha, "primary", false).unwrap_or_else(|e| panic!("role primary on alpha: {e}"));
    c
}

/// A TCP connection from the attacker's address to `to`'s replication port.
fn dial(c: &Cluster, to: NodeId) -> Wire {
    let target: SocketAddr = format!("{}:{PORT}", to.ip()).parse().expect("addr");
    let source: SocketAddr = format!("{ATTACKER}:0").parse().expect("addr");
    let stream = c.netns(Alpha).enter(|| -> std::io::Result<TcpStream> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.bind(&source.into())?;
        s.connect_timeout(&target.into(), WAIT)?;
        Ok(s.into())
    });
    Wire::from_stream(stream.unwrap_or_else(|e| panic!("attacker dial {target}: {e}")))
}

/// As [`connected`], with alpha's link to beta through a [`Proxy`] in beta's namespace; beta's
/// own dials are reset, so the proxied connection is the session.
fn proxied(test: &str) -> (Cluster, Proxy) {
    let proxy_addr = format!("{}:7790", Beta.ip());
    let mut proxy = None;
    let c = connected(test, |c| {
        let mut spec = c.spec();
        spec.replication[1] = proxy_addr.clone();
        let alpha_cfg = c.dir().join("alpha.toml");
        c.write_config(&alpha_cfg, &spec);
        c.use_config(Alpha, &alpha_cfg);
        let rule = format!("ip daddr {} tcp dport {PORT} reject with tcp reset", Alpha.ip());
        c.add_rule(Beta, "output", &rule);
        let target = format!("{}:{PORT}", Beta.ip()).parse().expect("addr");
        proxy = Some(Proxy::start(c.netns(Beta), proxy_addr.parse().expect("addr"), target));
    });
    (c, proxy.expect("proxy"))
}

fn counter(c: &Cluster, n: NodeId, name: &str) -> u64 {
    let v = c.vol(n);
    v["counters"][name].as_u64().unwrap_or_else(|| panic!("counter {name} missing: {v}"))
}

/// Both nodes' (connects, link_refused).
fn counters(c: &Cluster) -> [(u64, u64); 2] {
    [Alpha, Beta].map(|n| (counter(c, n, "connects"), counter(c, n, "link_refused")))
}

/// After an attack: each of `nodes` counted a refusal and logged one naming the attacker's
/// address and `words`; no session was replaced and both are still Connected.
fn assert_refused_and_still_connected(
    c: &Cluster,
    before: [(u64, u64); 2],
    nodes: &[NodeId],
    words: &str,
) {
    for &n in nodes {
        let i = usize::from(n == Beta);
        c.wait_for(n, "the refusal counted", WAIT, |v| {
            v["counters"]["link_refused"].as_u64().is_some_and(|r| r > before[i].1)
        });
        let log = c.log_text(n);
        let line =
            log.lines().find(|l| l.contains(" WARN ") && l.contains(ATTACKER) && l.contains(words));
        let line = line.unwrap_or_else(|| {
            panic!("{} logged no refusal from {ATTACKER} with {words:?}:\n{log}", n.name())
        });
        eprintln!("{}: {line}", n.name());
    }
    for n in [Alpha, Beta] {
        let v = c.vol(n);
        assert_eq!(v["conn"], "Connected", "{}: {v}", n.name());
        assert_eq!(
            counter(c, n, "connects"),
            before[usize::from(n == Beta)].0,
            "{}: a session was replaced",
            n.name()
        );
    }
}

/// The attacker dials both nodes, hands each the other's HELLO (a relay of the two real
/// nodes), then injects a well-formed WRITE into both: both refuse before authentication,
/// nothing is written, the real session survives and still mirrors.
#[test]
fn spliced_connections_with_an_injected_write_are_refused() {
    let c = connected("linksec-splice", |_| {});
    c.qemu_io(Alpha, "write -P 0x11 0 64k");
    let before = counters(&c);
    let (mut a, mut b) = (dial(&c, Alpha), dial(&c, Beta));
    let ha = a.recv(WAIT).expect("alpha's HELLO");
    let hb = b.recv(WAIT).expect("beta's HELLO");
    assert!(matches!(&ha.msg, Message::Hello { node, .. } if node == "alpha"), "{ha:?}");
    a.send(&hb);
    b.send(&ha);
    let data = Bytes::from(vec![0x66; 4096]);
    let write =
        Frame { volume: 0, id: 1, reply: false, msg: Message::Write { offset: 8 << 20, data } };
    a.send(&write);
    b.send(&write);
    assert!(a.closed_within(WAIT) && b.closed_within(WAIT), "the nodes must drop both connections");
    assert_refused_and_still_connected(&c, before, &[Alpha, Beta], "before authentication");
    for n in [Alpha, Beta] {
        assert_eq!(
            c.backing_at(n, 8 << 20, 4096),
            vec![0; 4096],
            "{} applied the injected write",
            n.name()
        );
    }
    c.qemu_io(Alpha, "write -P 0x22 1M 4k");
    assert_eq!(
        c.backing_at(Beta, 1 << 20, 4096),
        vec![0x22; 4096],
        "the real session must still mirror"
    );
}

/// A proxy records alpha's side of the real session (handshake, a WRITE of 0x33); alpha then
/// overwrites the block with 0x44. The recording replayed into a new connection to beta is
/// refused (its first record does not open under the new handshake's keys): beta still has
/// 0x44, the session is the same. The recording never shows the data in clear.
#[test]
fn a_recorded_session_replayed_into_a_new_connection_is_refused() {
    let (c, proxy) = proxied("linksec-replay");
    c.qemu_io(Alpha, "write -P 0x33 2M 4k");
    let recorded = proxy.recorded();
    assert!(recorded.len() > 4096, "nothing recorded: {} bytes", recorded.len());
    assert!(!recorded.windows(64).any(|w| w == [0x33; 64]), "the WRITE crossed the proxy in clear");
    c.qemu_io(Alpha, "write -P 0x44 2M 4k");
    assert_eq!(c.backing_at(Beta, 2 << 20, 4096), vec![0x44; 4096]);
    let before = counters(&c);
    let mut r = dial(&c, Beta);
    // The handshake and the first records are what matter; the rest would only fill the
    // socket of a connection beta has closed.
    r.send_raw(&recorded[..recorded.len().min(64 << 10)]);
    assert!(r.closed_within(WAIT), "beta must drop the replayed connection");
    assert_refused_and_still_connected(&c, before, &[Beta], "failed authentication");
    assert_eq!(
        c.backing_at(Beta, 2 << 20, 4096),
        vec![0x44; 4096],
        "the replayed WRITE was applied"
    );
}

/// On the way from alpha to beta, one record of a 64 KiB WRITE has a bit flipped, or is
/// dropped, sent twice, or sent after the record that follows it: beta's session dies at the
/// first record that does not open in sequence, with a warning that says so, and applies
/// nothing out of sequence (of a duplicate, the first copy is the real record: applied at
/// most once); alpha goes on degraded; once the proxy lets the nodes reconnect, the resync leaves
/// both files identical. Each fault in turn on the same pair.
#[test]
fn a_record_flipped_dropped_duplicated_or_reordered_kills_the_session_unapplied() {
    let (c, proxy) = proxied("linksec-tamper");
    let faults = [Fault::Flip, Fault::Drop, Fault::Duplicate, Fault::Reorder];
    for (at, fault) in (4u64..).map(|m| m << 20).zip(faults) {
        let connects = counter(&c, Beta, "connects");
        let warned = c.log_text(Beta).matches("failed authentication").count();
        proxy.arm_with(fault);
        c.qemu_io(Alpha, &format!("write -P 0x5a {at} 64k"));
        assert!(proxy.corrupted().is_some(), "{fault:?}: no large record passed the proxy");
        c.wait_for(Beta, "the session dropped", SYNC_TIMEOUT, |v| v["conn"] != "Connected");
        let now = c.log_text(Beta).matches("failed authentication").count();
        assert!(now > warned, "{fault:?}: beta logged no authentication failure");
        // A record that never opened is never applied. Of a duplicate the first copy is the
        // real record: applied, or not yet when the second copy ended the session (then it
        // was not acknowledged either, and the resync below brings it).
        let applied = c.backing_at(Beta, at, 65536);
        let whole = |b: u8| applied.iter().all(|&x| x == b);
        let fine = whole(0) || (fault == Fault::Duplicate && whole(0x5a));
        assert!(fine, "{fault:?}: beta holds {:?}... at {at}", &applied[..16]);
        if fault != Fault::Duplicate {
            let a = c.wait_for(Alpha, "degraded", SYNC_TIMEOUT, |v| v["conn"] != "Connected");
            assert!(a["out_of_sync"].as_u64() >= Some(65536), "{fault:?}: not out of sync: {a}");
        }
        proxy.release();
        c.wait_in_sync(SYNC_TIMEOUT);
        assert!(counter(&c, Beta, "connects") > connects, "{fault:?}: no new session");
        assert_eq!(c.backing_at(Beta, at, 65536), vec![0x5a; 65536], "{fault:?}: not repaired");
        c.assert_identical();
        eprintln!("{fault:?}: session dropped unapplied, resynced, identical");
    }
}

/// `tcpdump -w` on beta's end of the veth while alpha writes 1 MiB of a recognisable
/// pseudo-random pattern: with encryption on, none of 16 64-byte samples of it is in the
/// capture; with "off" they are (the search can find them, so the "on" result means something).
#[test]
fn a_capture_of_the_link_shows_the_data_only_with_encryption_off() {
    let data = pattern(0x11c4, 1 << 20);
    let samples: Vec<&[u8]> = (0..16).map(|k| &data[k * 65536 + 1000..k * 65536 + 1064]).collect();
    for (encryption, visible) in [("on", false), ("off", true)] {
        let c = connected(&format!("linksec-capture-{encryption}"), |c| {
            let mut spec = c.spec();
            spec.cluster_toml = format!("encryption = \"{encryption}\"\n");
            let shared = c.config(Alpha).to_path_buf();
            c.write_config(&shared, &spec);
        });
        let file = c.dir().join("pattern.bin");
        std::fs::write(&file, &data).expect("write the pattern file");
        let pcap = c.dir().join("link.pcap");
        let mut dump = c.netns(Beta).command("tcpdump".as_ref());
        dump.args(["-i", VETH, "-U", "-B", "32768", "-s", "0", "-w"]).arg(&pcap).args([
            "tcp",
            "port",
            &PORT.to_string(),
        ]);
        let mut dump = Background::spawn(&mut dump, &c.dir().join("tcpdump.log"));
        let listening = (0..50).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            dump.log_text().contains("listening on")
        });
        assert!(listening, "tcpdump did not start: {}", dump.log_text());
        let uri = c.nbd_uri(Alpha);
        run_timeout(
            &mut cmd("nbdcopy", &[file.to_str().expect("utf-8 path"), &uri]),
            Duration::from_secs(30),
        );
        assert_eq!(c.backing_at(Beta, 0, 4096), data[..4096], "the pattern must reach beta");
        std::thread::sleep(Duration::from_millis(300));
        signal(dump.pid(), libc::SIGINT);
        dump.wait(Duration::from_secs(5));
        let captured = std::fs::read(&pcap).expect("read the capture");
        assert!(captured.len() > 512 << 10, "capture too small: {} bytes", captured.len());
        let found = samples.iter().filter(|s| captured.windows(64).any(|w| w == **s)).count();
        eprintln!(
            "encryption = {encryption}: {found} of 16 samples in {} captured bytes",
            captured.len()
        );
        if visible {
            assert!(found >= 8, "with encryption off the data must be in the capture: {found}/16");
        } else {
            assert_eq!(found, 0, "with encryption on no sample may be in the capture");
        }
    }
}

/// Unauthenticated connections that announce and send 32 MiB frames (a WRITE after the HELLO,
/// four at a time, three rounds): beta refuses each from its header, and the peak of its
/// resident memory (VmHWM, which also catches memory freed again) grows by less than one such
/// frame.
#[test]
fn unauthenticated_big_frames_leave_the_secondarys_memory_flat() {
    let c = connected("linksec-rss", |_| {});
    let pid = c.pid(Beta);
    let before = status_kib(pid, "VmHWM:");
    let hello = Message::Hello {
        version: wire::PROTOCOL_VERSION,
        node: "alpha".into(),
        instance: 9,
        encrypt: true,
    };
    let header = wire::encode_header(&Header {
        magic: wire::MAGIC,
        version: wire::PROTOCOL_VERSION,
        kind: wire::kind::WRITE,
        length: wire::MAX_DATA as u64,
        payload_len: wire::MAX_DATA as u32,
        ..Header::default()
    });
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..3 {
        let conns: Vec<Wire> = (0..4).map(|_| dial(&c, Beta)).collect();
        let sent: Vec<_> = conns
            .into_iter()
            .map(|mut w| {
                let (hello, header, chunk) = (hello.clone(), header, chunk.clone());
                std::thread::spawn(move || {
                    w.send(&Frame { volume: 0, id: 0, reply: false, msg: hello });
                    let mut sent = 0;
                    let mut go = w.try_send_raw(&header).is_ok();
                    while go && sent < wire::MAX_DATA {
                        go = w.try_send_raw(&chunk).is_ok();
                        sent += chunk.len();
                    }
                    w.closed_within(WAIT)
                })
            })
            .collect();
        for t in sent {
            assert!(t.join().expect("attacker thread"), "beta must close the connection");
        }
    }
    let after = status_kib(pid, "VmHWM:");
    eprintln!("beta's peak VmRSS {before} KiB before, {after} KiB after");
    assert!(after < before + 16 * 1024, "beta's memory grew from {before} to {after} KiB");
    assert_eq!(c.vol(Beta)["conn"], "Connected");
}
