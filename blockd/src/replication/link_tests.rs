//! Tests of the link over real TCP on 127.0.0.1 (design.md §6): handshake, refusals, corruption,
//! timeouts, the one-session rule, and the round trip of a 4 KiB write.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::super::auth::Secrets;
use super::super::handshake::{handshake, PeerHello};
use super::super::record::{self, Channel, Protection};
use super::super::wire::{self, Frame, Message, VolumeParams, PROTOCOL_VERSION};
use super::{bind, start, LinkConfig, LinkError, LinkEvent, Responder, Session, Tuning};

#[path = "link_read_tests.rs"]
mod reads;

const WAIT: Duration = Duration::from_secs(5);

fn config(
    node: &str,
    peer: &str,
    listen: std::net::SocketAddr,
    peer_addr: std::net::SocketAddr,
) -> LinkConfig {
    LinkConfig {
        node: node.into(),
        peer: peer.into(),
        listen,
        peer_addr,
        secrets: Secrets::fixed(b"shared secret"),
        protection: Protection::Encrypt,
        peer_timeout: Duration::from_secs(3),
        volumes: vec![vol("vol0", 1 << 30), vol("vol1", 4 << 20)],
        max_in_flight_bytes: 128 << 20,
    }
}

fn vol(name: &str, size: u64) -> VolumeParams {
    VolumeParams {
        name: name.into(),
        size,
        granularity: 4096,
        al_extent_size: 4 << 20,
        al_extents: 61,
    }
}

fn fast() -> Tuning {
    Tuning {
        higher_dial_delay: Duration::from_millis(50),
        backoff_min: Duration::from_millis(20),
        ..Tuning::default()
    }
}

/// A node of a test: its events, and a token that stops it when dropped.
struct Node {
    rx: mpsc::Receiver<LinkEvent>,
    _stop: tokio_util::sync::DropGuard,
}

/// Configs for alpha and beta on two freshly bound loopback listeners.
fn pair() -> ((LinkConfig, std::net::TcpListener), (LinkConfig, std::net::TcpListener)) {
    let any = "127.0.0.1:0".parse().unwrap();
    let (la, lb) = (bind(any).unwrap(), bind(any).unwrap());
    let (a, b) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    ((config("alpha", "beta", a, b), la), (config("beta", "alpha", b, a), lb))
}

fn run(c: (LinkConfig, std::net::TcpListener), tuning: Tuning) -> Node {
    let token = CancellationToken::new();
    let rx = start(c.0, c.1, tuning, token.clone()).unwrap();
    Node { rx, _stop: token.drop_guard() }
}

async fn next(n: &mut Node) -> LinkEvent {
    tokio::time::timeout(WAIT, n.rx.recv())
        .await
        .expect("no link event in time")
        .expect("link gone")
}

async fn up(n: &mut Node) -> Session {
    match next(n).await {
        LinkEvent::Up(s) => s,
        e => panic!("expected Up, got {e:?}"),
    }
}

async fn refused(n: &mut Node) -> String {
    match next(n).await {
        LinkEvent::Refused { reason } => reason,
        e => panic!("expected Refused, got {e:?}"),
    }
}

/// Answers every request with Ack { 0 } until the node's channel closes.
fn serve(mut n: Node) -> tokio::task::JoinHandle<Node> {
    tokio::spawn(async move {
        while let Some(e) = n.rx.recv().await {
            if let LinkEvent::Request { reply, .. } = e {
                reply.send(Message::Ack { error: 0 });
            }
        }
        n
    })
}

fn write4k() -> Message {
    Message::Write { offset: 4096, data: Bytes::from(vec![0x5A; 4096]) }
}

#[tokio::test]
async fn handshake_success_and_requests_both_ways() {
    let (ca, cb) = pair();
    let (mut a, mut b) = (run(ca, fast()), run(cb, fast()));
    let (sa, sb) = (up(&mut a).await, up(&mut b).await);
    assert_eq!((sa.peer(), sb.peer()), ("beta", "alpha"));
    assert_eq!(sa.epoch(), sb.epoch(), "both sides kept the same connection");
    let call = tokio::spawn({
        let sa = sa.clone();
        async move { sa.call(1, write4k()).await }
    });
    match next(&mut b).await {
        LinkEvent::Request { session, volume, msg, reply } => {
            assert_eq!((session, volume, msg), (sb.id(), 1, write4k()));
            reply.send(Message::Ack { error: 28 });
        }
        e => panic!("expected a request, got {e:?}"),
    }
    assert_eq!(call.await.unwrap().unwrap(), Message::Ack { error: 28 });
    // The other direction, and a STATE answered with a STATE.
    let state = Message::State {
        role: crate::role::Role::Secondary,
        disk: crate::role::DiskState::UpToDate,
        gens: crate::meta::Generations { current: 9, bitmap: 0, history: [0, 0] },
        primary_when_stopped: false,
        dirty: 0,
        resolve: crate::resync::Resolve::None,
    };
    let call = tokio::spawn({
        let (sb, state) = (sb.clone(), state.clone());
        async move { sb.call(0, state).await }
    });
    match next(&mut a).await {
        LinkEvent::Request { msg, reply, .. } => {
            assert_eq!(msg, state);
            reply.send(msg);
        }
        e => panic!("expected a request, got {e:?}"),
    }
    assert_eq!(call.await.unwrap().unwrap(), state);
}

#[tokio::test]
async fn requests_are_delivered_in_arrival_order() {
    let (ca, cb) = pair();
    let (mut a, mut b) = (run(ca, fast()), run(cb, fast()));
    let (sa, _sb) = (up(&mut a).await, up(&mut b).await);
    let calls: Vec<_> = (0..100u64)
        .map(|i| {
            let sa = sa.clone();
            let msg = Message::Trim { offset: i * 4096, len: 4096 };
            // Sequential submission order: each call is queued before the next is spawned.
            let fut = async move { sa.call(0, msg).await };
            tokio::spawn(fut)
        })
        .collect();
    let mut seen = Vec::new();
    while seen.len() < 100 {
        if let LinkEvent::Request { msg: Message::Trim { offset, .. }, reply, .. } =
            next(&mut b).await
        {
            seen.push(offset / 4096);
            drop(reply); // unanswered: the peer gets EIO
        }
    }
    // Spawned tasks run in order on this single-threaded runtime, so the calls were queued in
    // order; the peer must see them in that order.
    assert_eq!(seen, (0..100).collect::<Vec<_>>());
    for c in calls {
        assert_eq!(
            c.await.unwrap().unwrap(),
            Message::Ack { error: 5 },
            "dropped responder answers EIO"
        );
    }
}

#[tokio::test]
async fn wrong_secret_is_refused_on_both_sides() {
    let (ca, mut cb) = pair();
    cb.0.secrets = Secrets::fixed(b"another secret");
    let (mut a, mut b) = (run(ca, fast()), run(cb, fast()));
    for n in [&mut a, &mut b] {
        let r = refused(n).await;
        assert!(r.contains("failed authentication"), "{r}");
        assert!(r.contains("127.0.0.1:"), "names the peer address: {r}");
    }
    // The link keeps retrying (with backoff) and keeps refusing.
    assert!(refused(&mut a).await.contains("failed authentication"));
}

#[tokio::test]
async fn volume_size_mismatch_is_refused_naming_both() {
    let (ca, mut cb) = pair();
    cb.0.volumes[1].size = 8 << 20;
    let (mut a, mut b) = (run(ca, fast()), run(cb, fast()));
    let r = refused(&mut a).await;
    assert!(r.contains("volumes differ") && r.contains("4194304") && r.contains("8388608"), "{r}");
    let r = refused(&mut b).await;
    assert!(r.contains("4194304") && r.contains("8388608"), "{r}");
}

/// The next Up, skipping refusals (a rotation's refused dials).
/// Two nodes linked with `peer_timeout` on both sides, each with its session.
async fn linked_with_peer_timeout(peer_timeout: Duration) -> ((Node, Session), (Node, Session)) {
    let (mut ca, mut cb) = pair();
    ca.0.peer_timeout = peer_timeout;
    cb.0.peer_timeout = peer_timeout;
    let (mut a, mut b) = (run(ca, fast()), run(cb, fast()));
    let (sa, sb) = (up(&mut a).await, up(&mut b).await);
    ((a, sa), (b, sb))
}

async fn up_after_refusals(n: &mut Node) -> Session {
    loop {
        match next(n).await {
            LinkEvent::Up(s) => return s,
            LinkEvent::Refused { .. } => {}
            e => panic!("expected Up, got {e:?}"),
        }
    }
}

/// Halfway through a secret rotation: alpha has the new secret and keeps the old one as the
/// previous; beta has only the old one. Alpha's dials (new secret) are refused, beta's (old)
/// are accepted, so the pair connects. Without the previous secret on alpha it cannot.
#[tokio::test]
async fn rotation_accepts_the_previous_secret() {
    let (new, old): (std::sync::Arc<[u8]>, std::sync::Arc<[u8]>) =
        (std::sync::Arc::from(&b"new secret"[..]), std::sync::Arc::from(&b"old secret"[..]));
    let (mut ca, mut cb) = pair();
    ca.0.secrets = Secrets::Fixed(vec![new.clone(), old.clone()]);
    cb.0.secrets = Secrets::Fixed(vec![old.clone()]);
    let (mut a, mut b) = (run(ca, fast()), run(cb, fast()));
    let (sa, sb) = (up_after_refusals(&mut a).await, up_after_refusals(&mut b).await);
    assert_eq!(sa.epoch(), sb.epoch());
    // Control: the same pair without the previous secret never connects.
    let (mut ca, mut cb) = pair();
    ca.0.secrets = Secrets::Fixed(vec![new]);
    cb.0.secrets = Secrets::Fixed(vec![old]);
    let (mut a, _b) = (run(ca, fast()), run(cb, fast()));
    for _ in 0..4 {
        assert!(refused(&mut a).await.contains("failed authentication"));
    }
}

/// Issue 17: bitmaps of different granularities cannot be merged for a resync.
#[tokio::test]
async fn granularity_mismatch_is_refused_naming_both() {
    let (ca, mut cb) = pair();
    cb.0.volumes[0].granularity = 65536;
    let (mut a, mut b) = (run(ca, fast()), run(cb, fast()));
    for n in [&mut a, &mut b] {
        let r = refused(n).await;
        assert!(r.contains("granularity") && r.contains("vol0"), "{r}");
        assert!(r.contains("4096 bytes") && r.contains("65536 bytes"), "{r}");
    }
}

/// The activity-log geometry travels (and is shown) but need not be equal.
#[tokio::test]
async fn activity_log_geometry_may_differ() {
    let (ca, mut cb) = pair();
    cb.0.volumes[0].al_extents = 7;
    let (mut a, mut b) = (run(ca, fast()), run(cb, fast()));
    let (sa, sb) = (up(&mut a).await, up(&mut b).await);
    assert_eq!(sa.epoch(), sb.epoch());
}

/// `encryption` must be the same on both nodes; the refusal names both settings.
#[tokio::test]
async fn encryption_setting_mismatch_is_refused() {
    let (ca, mut cb) = pair();
    cb.0.protection = Protection::AuthOnly;
    let (mut a, mut b) = (run(ca, fast()), run(cb, fast()));
    for n in [&mut a, &mut b] {
        let r = refused(n).await;
        assert!(r.contains("encryption") && r.contains("\"on\"") && r.contains("\"off\""), "{r}");
    }
}

/// With encryption off, the link works the same (authenticated records).
#[tokio::test]
async fn auth_only_link_carries_requests() {
    let (mut ca, mut cb) = pair();
    ca.0.protection = Protection::AuthOnly;
    cb.0.protection = Protection::AuthOnly;
    let (mut a, b) = (run(ca, fast()), run(cb, fast()));
    let sa = up(&mut a).await;
    let b = serve(b);
    assert_eq!(sa.call(0, write4k()).await.unwrap(), Message::Ack { error: 0 });
    drop(b);
}

#[tokio::test]
async fn wrong_protocol_version_is_refused() {
    let (ca, _) = pair();
    let addr = ca.0.listen;
    let mut a = run(ca, Tuning { higher_dial_delay: WAIT * 10, ..fast() });
    let mut s = TcpStream::connect(addr).await.unwrap();
    let hello = Message::Hello {
        version: PROTOCOL_VERSION + 1,
        node: "beta".into(),
        instance: 1,
        encrypt: true,
    };
    s.write_all(&wire::encode(&Frame { volume: 0, id: 0, reply: false, msg: hello }))
        .await
        .unwrap();
    let r = refused(&mut a).await;
    let (theirs, ours) = (PROTOCOL_VERSION + 1, PROTOCOL_VERSION);
    assert!(
        r.contains(&format!("protocol version {theirs}")) && r.contains(&format!("speaks {ours}")),
        "{r}"
    );
}

#[tokio::test]
async fn unknown_node_name_is_refused() {
    let (ca, cb) = pair();
    let mut c = cb.0.clone();
    c.node = "gamma".into();
    let mut a = run(ca, fast());
    let r = fake_peer(&c).await.map(|_| ());
    assert!(r.is_err());
    let reason = refused(&mut a).await;
    assert!(reason.contains("'gamma'") && reason.contains("'beta'"), "{reason}");
}

/// A fake peer's end of an authenticated connection.
struct Fake {
    s: TcpStream,
    buf: BytesMut,
    ch: Channel,
}

impl Fake {
    async fn send(&mut self, f: &Frame) {
        let rec = self.ch.tx.seal(f).unwrap();
        self.s.write_all(&rec).await.unwrap();
    }
}

/// Connects to `cfg.peer_addr` and completes a valid handshake as `cfg.node`.
async fn fake_peer(cfg: &LinkConfig) -> Result<(Fake, PeerHello), String> {
    let mut s = TcpStream::connect(cfg.peer_addr).await.map_err(|e| e.to_string())?;
    let mut buf = BytesMut::new();
    let (h, ch) = handshake(&mut s, &mut buf, cfg, 77, cfg.peer_addr, true)
        .await
        .map_err(|e| e.to_string())?;
    Ok((Fake { s, buf, ch }, h))
}

#[tokio::test]
async fn corrupted_frame_drops_the_session_and_is_never_applied() {
    let (ca, cb) = pair();
    let mut a = run(ca, Tuning { higher_dial_delay: WAIT * 10, ..fast() });
    // The fake beta is the higher-named node: alpha's READY comes inside the session.
    let (mut f, hello) = fake_peer(&cb.0).await.unwrap();
    assert_eq!(hello.epoch, Some(1));
    let sa = up(&mut a).await;
    let good = Frame { volume: 0, id: 1, reply: false, msg: write4k() };
    f.send(&good).await;
    let mut bad = f.ch.tx.seal(&Frame { id: 2, ..good.clone() }).unwrap().to_vec();
    bad[record::LEN_LEN + wire::HEADER_LEN + 2048] ^= 0x01;
    f.s.write_all(&bad).await.unwrap();
    match next(&mut a).await {
        LinkEvent::Request { msg, reply, .. } => {
            assert_eq!(msg, write4k());
            drop(reply);
        }
        e => panic!("expected the good write, got {e:?}"),
    }
    match next(&mut a).await {
        LinkEvent::Down { session, reason } => {
            assert_eq!(session, sa.id());
            assert!(reason.contains("failed authentication"), "{reason}");
        }
        e => panic!("the corrupted write must not be delivered: {e:?}"),
    }
    assert!(!sa.is_open());
}

/// A record dropped, duplicated or reordered on the way (the fake peer plays the relay): the
/// session ends at that record, which is never delivered; the ones before it are.
#[tokio::test]
async fn dropped_duplicated_or_reordered_records_end_the_session() {
    for case in ["dropped", "duplicated", "reordered"] {
        let (ca, cb) = pair();
        let mut a = run(ca, Tuning { higher_dial_delay: WAIT * 10, ..fast() });
        let (mut f, _) = fake_peer(&cb.0).await.unwrap();
        let sa = up(&mut a).await;
        let recs: Vec<_> = (1..=3u64)
            .map(|id| f.ch.tx.seal(&Frame { volume: 0, id, reply: false, msg: write4k() }).unwrap())
            .collect();
        let order: &[usize] = match case {
            "dropped" => &[0, 2],
            "duplicated" => &[0, 0, 1],
            _ => &[0, 2, 1],
        };
        for &i in order {
            f.s.write_all(&recs[i]).await.unwrap();
        }
        match next(&mut a).await {
            LinkEvent::Request { msg, .. } => assert_eq!(msg, write4k(), "{case}"),
            e => panic!("{case}: expected the first write, got {e:?}"),
        }
        match next(&mut a).await {
            LinkEvent::Down { session, reason } => {
                assert_eq!(session, sa.id(), "{case}");
                assert!(reason.contains("failed authentication"), "{case}: {reason}");
            }
            e => panic!("{case}: the changed stream must end the session: {e:?}"),
        }
    }
}

/// Fills the socket so that direct writes go partial and the writer task must finish them
/// (`skip`), then checks that the fake peer receives every frame intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_survive_a_full_socket() {
    let (ca, cb) = pair();
    let mut a = run(ca, Tuning { higher_dial_delay: WAIT * 10, ..fast() });
    let (mut f, _) = fake_peer(&cb.0).await.unwrap();
    let sa = up(&mut a).await;
    // The first call is alone, so it is written directly; 16 MiB cannot fit in the socket
    // buffer, so the direct write is partial and the writer task must finish it.
    let call = |i: u8, len: usize| {
        let sa = sa.clone();
        let msg = Message::Write { offset: u64::from(i) << 20, data: Bytes::from(vec![i; len]) };
        tokio::spawn(async move { sa.call(0, msg).await })
    };
    let mut calls = vec![call(0, 16 << 20)];
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The rest queue behind it; the content of each frame names its call.
    calls.extend((1..40u8).map(|i| call(i, if i % 3 == 0 { 100 } else { 1 << 20 })));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 40 {
        let fr = read_frame(&mut f).await;
        if let Message::Write { offset, data } = &fr.msg {
            let i = (offset >> 20) as u8;
            assert!(data.iter().all(|&b| b == i), "frame {i} intact");
            assert!(seen.insert(i), "frame {i} once");
            let ack = Frame { volume: 0, id: fr.id, reply: true, msg: Message::Ack { error: 0 } };
            f.send(&ack).await;
        }
    }
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap(), Message::Ack { error: 0 });
    }
}

async fn read_frame(f: &mut Fake) -> Frame {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(fr) = f.ch.rx.open(&mut f.buf, record::MAX_BODY).expect("valid record") {
            return fr;
        }
        let read = f.s.read_buf(&mut f.buf);
        let n = tokio::time::timeout(WAIT, read).await.expect("frame in time").unwrap();
        assert_ne!(n, 0, "connection closed");
    }
}

#[tokio::test]
async fn silent_peer_times_out() {
    let (mut ca, cb) = pair();
    ca.0.peer_timeout = Duration::from_millis(400);
    let mut a = run(ca, Tuning { higher_dial_delay: WAIT * 10, ..fast() });
    let (_f, _) = fake_peer(&cb.0).await.unwrap();
    let sa = up(&mut a).await;
    // From here on only timers matter: let tokio's clock jump.
    tokio::time::pause();
    let t0 = tokio::time::Instant::now();
    match next(&mut a).await {
        LinkEvent::Down { session, reason } => {
            assert_eq!((session, reason.as_str()), (sa.id(), "peer timeout"));
        }
        e => panic!("expected Down, got {e:?}"),
    }
    assert!(t0.elapsed() >= Duration::from_millis(390), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn idle_session_stays_up_through_heartbeats() {
    let ((_a, sa), (_b, sb)) = linked_with_peer_timeout(Duration::from_millis(500)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(sa.is_open() && sb.is_open(), "{:?} {:?}", sa.reason(), sb.reason());
}

#[tokio::test]
async fn close_fails_pending_and_later_calls() {
    let (ca, cb) = pair();
    let (mut a, mut b) = (run(ca, fast()), run(cb, fast()));
    let (sa, sb) = (up(&mut a).await, up(&mut b).await);
    let pending = tokio::spawn({
        let sa = sa.clone();
        async move { sa.call(0, Message::Flush).await }
    });
    let LinkEvent::Request { reply, .. } = next(&mut b).await else { panic!("expected a request") };
    sa.close("operator said so");
    assert!(matches!(pending.await.unwrap(), Err(LinkError::LinkDown)));
    assert!(matches!(sa.call(0, Message::Flush).await, Err(LinkError::LinkDown)));
    drop(reply);
    tokio::time::timeout(WAIT, sa.closed()).await.unwrap();
    match next(&mut b).await {
        LinkEvent::Down { session, reason } => {
            assert_eq!(session, sb.id());
            assert!(reason.contains("operator said so"), "{reason}");
        }
        e => panic!("expected Down, got {e:?}"),
    }
    // And the link comes back by itself.
    assert!(matches!(next(&mut a).await, LinkEvent::Down { .. }));
    let (sa2, sb2) = (up(&mut a).await, up(&mut b).await);
    assert_eq!(sa2.epoch(), sb2.epoch());
    assert!(sa2.epoch() > sa.epoch());
}

/// Drains events for `d`, returning (ups - downs, last Up session).
async fn settle(n: &mut Node, d: Duration) -> (i32, Option<Session>) {
    let (mut count, mut last) = (0, None);
    let end = tokio::time::Instant::now() + d;
    while let Ok(Some(e)) = tokio::time::timeout_at(end, n.rx.recv()).await {
        match e {
            LinkEvent::Up(s) => {
                count += 1;
                last = Some(s);
            }
            LinkEvent::Down { .. } => count -= 1,
            e => panic!("unexpected {e:?}"),
        }
    }
    (count, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_dial_leaves_exactly_one_session() {
    for _ in 0..5 {
        let (ca, cb) = pair();
        let both_now = Tuning { higher_dial_delay: Duration::ZERO, ..fast() };
        let (mut a, mut b) = (run(ca, both_now.clone()), run(cb, both_now));
        let ((na, la), (nb, lb)) = tokio::join!(
            settle(&mut a, Duration::from_millis(500)),
            settle(&mut b, Duration::from_millis(500))
        );
        assert_eq!((na, nb), (1, 1), "exactly one session up on each side");
        let (la, lb) = (la.unwrap(), lb.unwrap());
        assert!(la.is_open() && lb.is_open());
        assert_eq!(la.epoch(), lb.epoch(), "the same connection on both sides");
    }
}

/// A config for `node` listening on a fresh loopback port, dialing `peer_addr`.
fn fresh(
    node: &str,
    peer: &str,
    peer_addr: std::net::SocketAddr,
) -> (LinkConfig, std::net::TcpListener) {
    let l = bind("127.0.0.1:0".parse().unwrap()).unwrap();
    (config(node, peer, l.local_addr().unwrap(), peer_addr), l)
}

#[tokio::test]
async fn restarted_peer_replaces_the_session_on_either_side() {
    let (ca, cb) = pair();
    let a_addr = ca.0.listen;
    let (mut a, mut b) = (run(ca, fast()), run(cb, fast()));
    let (sa, _sb) = (up(&mut a).await, up(&mut b).await);
    // A new beta instance appears while the old one still holds the session with alpha.
    let cb2 = fresh("beta", "alpha", a_addr);
    let b2_addr = cb2.0.listen;
    let mut b2 = run(cb2, Tuning { higher_dial_delay: Duration::ZERO, ..fast() });
    let sb2 = up(&mut b2).await;
    match next(&mut a).await {
        LinkEvent::Down { session, reason } => {
            assert_eq!((session, reason.as_str()), (sa.id(), "peer restarted"));
        }
        e => panic!("expected Down, got {e:?}"),
    }
    let sa2 = up(&mut a).await;
    assert_eq!(sa2.epoch(), sb2.epoch());
    assert!(!sa.is_open() && sa2.is_open());
    drop(b);
    // Now a new alpha instance: its epochs start over, and beta must still take it.
    let mut a2 = run(fresh("alpha", "beta", b2_addr), fast());
    assert_eq!(up(&mut a2).await.epoch(), 1, "a new alpha instance starts its epochs over");
    match next(&mut b2).await {
        LinkEvent::Down { session, reason } => {
            assert_eq!((session, reason.as_str()), (sb2.id(), "peer restarted"));
        }
        e => panic!("expected Down, got {e:?}"),
    }
    assert_eq!(up(&mut b2).await.epoch(), 1);
    assert!(matches!(next(&mut a).await, LinkEvent::Down { .. }), "old alpha lost its session");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Round trip of a mirrored 4 KiB write, each node in its own multi-threaded runtime as two
/// daemons would be, next to the floor: plain TCP ping-pong between the same two runtimes.
/// Alternating rounds, best p50 of each, because the machine is shared.
#[test]
#[ignore = "benchmark: cargo test --release -p blockd --lib round_trip -- --ignored --nocapture"]
fn round_trip_4k_write() {
    let (rt_a, rt_b) = (runtime(), runtime());
    let (ca, cb) = pair();
    let mut b = rt_b.block_on(async { run(cb, Tuning::default()) });
    let (sa, _a) = rt_a.block_on(async {
        let mut a = run(ca, Tuning::default());
        (up(&mut a).await, a)
    });
    rt_b.block_on(async { up(&mut b).await });
    let _server = rt_b.spawn(async move { serve(b).await });
    let addr = rt_b.block_on(raw_server());
    let raw = rt_a.block_on(raw_client(addr));
    let data = Bytes::from(vec![0x33u8; 4096]);
    for round in 0..5 {
        let link = rt_a.block_on(qd1(5_000, || {
            let (sa, data) = (sa.clone(), data.clone());
            async move {
                let r = sa.call(0, Message::Write { offset: 0, data }).await.unwrap();
                assert_eq!(r, Message::Ack { error: 0 });
            }
        }));
        let tcp = rt_a.block_on(qd1(5_000, || raw.clone().round_trip()));
        println!("round {round}: link 4 KiB write QD1 {link} | raw TCP 4 KiB ping-pong {tcp}");
    }
    let rate = rt_a.block_on(qd32(&sa, &data));
    println!("link 4 KiB write QD32: {rate:.0} calls/s");
}

/// Runs `n` calls one after the other; returns "p50 .. p99 ..".
async fn qd1<F: std::future::Future<Output = ()>>(n: usize, mut f: impl FnMut() -> F) -> String {
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = std::time::Instant::now();
        f().await;
        lat.push(t.elapsed());
    }
    lat.sort_unstable();
    format!("p50 {:?} p99 {:?}", lat[n / 2], lat[n * 99 / 100])
}

async fn qd32(sa: &Session, data: &Bytes) -> f64 {
    let t = std::time::Instant::now();
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (sa, data) = (sa.clone(), data.clone());
            tokio::spawn(async move {
                for _ in 0..2000 {
                    sa.call(0, Message::Write { offset: 0, data: data.clone() }).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (32.0 * 2000.0) / t.elapsed().as_secs_f64()
}

/// The floor: 4 KiB one way and 8 bytes back, TCP_NODELAY.
async fn raw_server() -> std::net::SocketAddr {
    use tokio::io::AsyncReadExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut b = vec![0u8; 4096];
        while s.read_exact(&mut b).await.is_ok() {
            if s.write_all(&[0u8; 8]).await.is_err() {
                break;
            }
        }
    });
    addr
}

/// A connected raw client; each round trip sends 4 KiB and reads 8 bytes.
#[derive(Clone)]
struct Raw(std::sync::Arc<tokio::sync::Mutex<TcpStream>>);

impl Raw {
    async fn round_trip(self) {
        use tokio::io::AsyncReadExt;
        let mut s = self.0.lock().await;
        s.write_all(&[1u8; 4096]).await.unwrap();
        s.read_exact(&mut [0u8; 8]).await.unwrap();
    }
}

async fn raw_client(addr: std::net::SocketAddr) -> Raw {
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    Raw(std::sync::Arc::new(tokio::sync::Mutex::new(s)))
}

/// design.md §3: a peer that keeps answering pings but not a request (its disk hangs) is dropped
/// after `peer_timeout`, and the call fails so that the caller's link-loss path marks it.
#[tokio::test]
async fn unanswered_request_drops_a_peer_that_still_pongs() {
    let ((mut a, sa), (mut b, _sb)) = linked_with_peer_timeout(Duration::from_millis(400)).await;
    tokio::time::pause();
    let t0 = tokio::time::Instant::now();
    let call = tokio::spawn({
        let sa = sa.clone();
        async move { sa.call(0, write4k()).await }
    });
    // Held, never answered: the request's "disk" hangs; b's reader still pongs.
    let LinkEvent::Request { reply: _held, .. } = next(&mut b).await else {
        panic!("expected a request")
    };
    match next(&mut a).await {
        LinkEvent::Down { session, reason } => {
            assert_eq!(session, sa.id());
            assert!(reason.contains("unanswered"), "{reason}");
        }
        e => panic!("expected Down, got {e:?}"),
    }
    assert!(matches!(call.await.unwrap(), Err(LinkError::LinkDown)));
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(390), "{waited:?}");
    assert!(waited < Duration::from_millis(600), "{waited:?}");
}

/// `RunPromote` has no deadline: the peer answers once a whole promote plan ran.
#[tokio::test]
async fn run_promote_waits_longer_than_peer_timeout() {
    let ((_a, sa), (mut b, _sb)) = linked_with_peer_timeout(Duration::from_millis(400)).await;
    tokio::time::pause();
    let call = tokio::spawn({
        let sa = sa.clone();
        async move { sa.call(0, Message::RunPromote).await }
    });
    let LinkEvent::Request { reply, .. } = next(&mut b).await else { panic!("expected a request") };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(sa.is_open(), "{:?}", sa.reason());
    let done = Message::PromoteResult { code: 0, output: String::new() };
    reply.send(done.clone());
    assert_eq!(call.await.unwrap().unwrap(), done);
}

/// Bounded memory: the peer's requests hold their bytes until answered; beyond the budget the
/// reader stops (nothing more is delivered), and a request larger than the whole budget still
/// runs once it can take all of it.
#[tokio::test]
async fn peer_requests_beyond_the_budget_wait_until_answered() {
    let (ca, mut cb) = pair();
    cb.0.max_in_flight_bytes = 64 << 10;
    let (mut a, mut b) = (run(ca, fast()), run(cb, fast()));
    let (sa, _sb) = (up(&mut a).await, up(&mut b).await);
    let write = |len: usize| Message::Write { offset: 0, data: Bytes::from(vec![7; len]) };
    let calls: Vec<_> = [40 << 10, 40 << 10, 200 << 10]
        .into_iter()
        .map(|len| {
            let (sa, msg) = (sa.clone(), write(len));
            let call = tokio::spawn(async move { sa.call(0, msg).await });
            (len, call)
        })
        .collect();
    let mut held = Vec::new();
    for (len, _) in &calls {
        let LinkEvent::Request { msg: Message::Write { data, .. }, reply, .. } = next(&mut b).await
        else {
            panic!("expected a write")
        };
        assert_eq!(data.len(), *len);
        // Real time on purpose: nothing may arrive while the budget is spent.
        let early = tokio::time::timeout(Duration::from_millis(300), b.rx.recv()).await;
        assert!(early.is_err(), "a request was delivered beyond the budget");
        held.push(reply);
        held.drain(..).for_each(|r: Responder| r.send(Message::Ack { error: 0 }));
    }
    for (_, call) in calls {
        assert_eq!(call.await.unwrap().unwrap(), Message::Ack { error: 0 });
    }
}
