//! The peer's side of the write path over a real link on 127.0.0.1.

use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::super::tests::{data, volume};
use crate::replication::{link, LinkConfig, LinkEvent, Message, Session, Tuning};

fn config(node: &str, peer: &str, a: std::net::SocketAddr, b: std::net::SocketAddr) -> LinkConfig {
    LinkConfig {
        node: node.into(),
        peer: peer.into(),
        listen: a,
        peer_addr: b,
        secrets: crate::replication::Secrets::fixed(b"shared secret"),
        protection: crate::replication::record::Protection::Encrypt,
        peer_timeout: Duration::from_secs(3),
        volumes: vec![crate::replication::wire::VolumeParams {
            name: "v".into(),
            size: 1 << 20,
            granularity: 4096,
            al_extent_size: 4 << 20,
            al_extents: 61,
        }],
        max_in_flight_bytes: 128 << 20,
    }
}

/// A live session as beta sees it (alpha's link runs as long as the guards live).
async fn beta_session() -> (Session, [DropGuard; 2]) {
    let any = "127.0.0.1:0".parse().unwrap();
    let (la, lb) = (link::bind(any).unwrap(), link::bind(any).unwrap());
    let (a, b) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let tuning = Tuning { higher_dial_delay: Duration::from_millis(50), ..Tuning::default() };
    let (ta, tb) = (CancellationToken::new(), CancellationToken::new());
    let _a = link::start(config("alpha", "beta", a, b), la, tuning.clone(), ta.clone()).unwrap();
    let mut rb = link::start(config("beta", "alpha", b, a), lb, tuning, tb.clone()).unwrap();
    let up = tokio::time::timeout(Duration::from_secs(5), rb.recv()).await.unwrap();
    let Some(LinkEvent::Up(s)) = up else { panic!("expected Up, got {up:?}") };
    (s, [ta.drop_guard(), tb.drop_guard()])
}

/// A write of a session that ended while it waited for its range lock is not applied: the
/// next session's resync may have written the range meanwhile (issue 17).
#[tokio::test]
async fn a_write_of_an_ended_session_is_not_applied_after_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let v = volume(&dir, Some("alpha"));
    let (session, _links) = beta_session().await;
    let lock = v.locks.lock(v.store.lock_span(0, 4096)).await;
    let stale = Message::Write { offset: 0, data: Bytes::from(vec![0xAA; 4096]) };
    let apply = v.apply_peer(&session, stale);
    tokio::pin!(apply);
    // Waiting for the lock.
    assert!(tokio::time::timeout(Duration::from_millis(100), &mut apply).await.is_err());
    session.close("link lost");
    // What the next session's resync writes meanwhile, under the same lock.
    v.store.write(0, data(0xBB, 4096)).await.unwrap();
    drop(lock);
    assert_eq!(apply.await, Message::Ack { error: 5 }, "not applied, not acknowledged");
    let now = v.store.read(0, 4096).await.unwrap();
    assert!(now.iter().all(|&b| b == 0xBB), "the stale write landed on newer data");
}

/// The Primary's FUA reaches a Secondary as `WriteFua`: applied (unaligned too) and acked like
/// a plain write (issue 13). That it is durable is shown end to end in tests/tests/powercut.rs.
#[tokio::test]
async fn a_fua_write_from_the_primary_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let v = volume(&dir, Some("alpha"));
    let (session, _links) = beta_session().await;
    let msg = Message::WriteFua { offset: 4096 + 10, data: Bytes::from(vec![0x5C; 5000]) };
    assert_eq!(v.apply_peer(&session, msg).await, Message::Ack { error: 0 });
    let now = v.store.read(4096, 5020).await.unwrap();
    assert!(now[..10].iter().all(|&b| b == 0) && now[5010..].iter().all(|&b| b == 0));
    assert!(now[10..5010].iter().all(|&b| b == 0x5C), "the FUA write's bytes");
}
