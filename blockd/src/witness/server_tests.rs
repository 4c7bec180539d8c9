//! The server's exchange driven over in-memory streams with paused time: authentication,
//! versions, persistence before answering, and the quiet term after a restart.

use std::net::{Ipv4Addr, SocketAddr};

use tokio::io::duplex;

use super::*;
use crate::witness::{lease::Record, proto::VERSION};

const TERM: Duration = Duration::from_secs(10);
const PEER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 1);

fn secret(s: &str) -> Arc<[u8]> {
    s.as_bytes().into()
}

/// During a rotation the witness accepts the new and the previous secret and signs each
/// answer with the secret its request used; a third secret is still refused.
#[tokio::test(start_paused = true)]
async fn rotation_accepts_the_previous_secret_and_answers_under_it() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = crate::replication::Secrets::Fixed(vec![secret("new"), secret("old")]);
    let shared = Arc::new(Shared::open(&dir.path().join("state"), TERM, secrets).unwrap());
    for (node, key) in [("alpha", "new"), ("alpha", "old")] {
        let (answer, nonce) = ask(&shared, node, key.as_bytes()).await;
        let Message::Answer { reply, proof } = answer else { panic!("{key}: {answer:?}") };
        let signed = proto::answer_nonce(&nonce, &reply);
        assert!(auth::verify(key.as_bytes(), &signed, node, WITNESS_ID, &proof), "{key}");
    }
    let (answer, _) = ask(&shared, "alpha", b"other").await;
    assert!(matches!(answer, Message::Denied { .. }), "{answer:?}");
}

/// Plays an old node by hand: HELLO, CHALLENGE, REQUEST (proof with `key`), then the answer.
async fn ask(shared: &Arc<Shared>, node: &str, key: &[u8]) -> (Message, [u8; 32]) {
    ask_flagged(shared, node, key, None).await
}

/// [`ask`] with a REQUEST2 when `degraded` is given (its proof covers the flag).
async fn ask_flagged(
    shared: &Arc<Shared>,
    node: &str,
    key: &[u8],
    degraded: Option<bool>,
) -> (Message, [u8; 32]) {
    let (mut c, s) = duplex(4096);
    let server = {
        let shared = Arc::clone(shared);
        tokio::spawn(async move { serve(&shared, s, PEER).await })
    };
    let nonce = [9u8; 32];
    let mut buf = Vec::new();
    frames::send(&mut c, &Message::Hello { node: node.into(), nonce }).await.unwrap();
    let Message::Challenge { nonce: challenge } = frames::recv(&mut c, &mut buf).await.unwrap()
    else {
        panic!("no challenge")
    };
    let signed = degraded.map_or(challenge, |d| proto::request_nonce(&challenge, d));
    let proof = auth::mac(key, &signed, node, WITNESS_ID);
    frames::send(&mut c, &Message::Request { proof, degraded }).await.unwrap();
    let answer = frames::recv(&mut c, &mut buf).await.unwrap();
    let _ = server.await;
    (answer, nonce)
}

fn open(dir: &tempfile::TempDir) -> Arc<Shared> {
    Arc::new(
        Shared::open(
            &dir.path().join("state"),
            TERM,
            crate::replication::Secrets::fixed(b"s3cret"),
        )
        .unwrap(),
    )
}

#[tokio::test(start_paused = true)]
async fn grant_is_signed_and_persisted_before_it_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let shared = open(&dir);
    let (answer, nonce) = ask(&shared, "alpha", b"s3cret").await;
    let Message::Answer { reply, proof } = answer else { panic!("{answer:?}") };
    let want = Reply::Grant {
        holder: "alpha".into(),
        epoch: 1,
        term: TERM,
        expires_in: TERM,
        prev_degraded: None,
    };
    assert_eq!(reply, want, "an old node's request gets the old answer");
    let signed = proto::answer_nonce(&nonce, &reply);
    assert!(auth::verify(b"s3cret", &signed, "alpha", WITNESS_ID, &proof));
    let on_disk = state::load(&dir.path().join("state")).unwrap();
    let rec = Record { epoch: 1, holder: Some("alpha".into()), term: TERM, degraded: None };
    assert_eq!(on_disk, Some(rec));
}

/// REQUEST2: the holder's degraded flag is persisted before the answer and reported to the
/// other node; a flag flipped in flight fails the proof.
#[tokio::test(start_paused = true)]
async fn the_degraded_flag_is_authenticated_persisted_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let shared = open(&dir);
    let load = || state::load(&dir.path().join("state")).unwrap().unwrap();
    let (a, _) = ask_flagged(&shared, "alpha", b"s3cret", Some(false)).await;
    assert!(matches!(
        a,
        Message::Answer { reply: Reply::Grant { prev_degraded: Some(false), .. }, .. }
    ));
    assert_eq!(load().degraded, Some(false));
    let (a, _) = ask_flagged(&shared, "beta", b"s3cret", Some(false)).await;
    assert!(matches!(
        a,
        Message::Answer { reply: Reply::Refused { degraded: Some(false), .. }, .. }
    ));
    ask_flagged(&shared, "alpha", b"s3cret", Some(true)).await;
    assert_eq!(load().degraded, Some(true), "on disk before it was answered");
    let (a, _) = ask_flagged(&shared, "beta", b"s3cret", Some(false)).await;
    assert!(matches!(
        a,
        Message::Answer { reply: Reply::Refused { degraded: Some(true), .. }, .. }
    ));
    // An old node's request is answered without the flag.
    let (a, _) = ask(&shared, "beta", b"s3cret").await;
    assert!(matches!(a, Message::Answer { reply: Reply::Refused { degraded: None, .. }, .. }));
    // A proof over "not degraded" sent with the flag set: denied.
    let (mut c, s) = duplex(4096);
    let server = {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move { serve(&shared, s, PEER).await })
    };
    let mut buf = Vec::new();
    frames::send(&mut c, &Message::Hello { node: "alpha".into(), nonce: [1; 32] }).await.unwrap();
    let Message::Challenge { nonce } = frames::recv(&mut c, &mut buf).await.unwrap() else {
        panic!("no challenge")
    };
    let proof = auth::mac(b"s3cret", &proto::request_nonce(&nonce, true), "alpha", WITNESS_ID);
    frames::send(&mut c, &Message::Request { proof, degraded: Some(false) }).await.unwrap();
    let answer = frames::recv(&mut c, &mut buf).await.unwrap();
    assert!(matches!(answer, Message::Denied { .. }), "{answer:?}");
    assert!(server.await.unwrap().is_err());
}

#[tokio::test(start_paused = true)]
async fn wrong_secret_is_denied_and_grants_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let shared = open(&dir);
    let (answer, _) = ask(&shared, "alpha", b"guess").await;
    let Message::Denied { reason } = answer else { panic!("{answer:?}") };
    assert!(reason.contains("authentication failed"), "{reason}");
    // beta gets epoch 1: alpha's attempt left no trace.
    let (answer, _) = ask(&shared, "beta", b"s3cret").await;
    assert!(matches!(answer, Message::Answer { reply: Reply::Grant { epoch: 1, .. }, .. }));
}

#[tokio::test(start_paused = true)]
async fn other_protocol_version_is_denied_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let shared = open(&dir);
    let (mut c, s) = duplex(4096);
    let server = tokio::spawn(async move { serve(&shared, s, PEER).await });
    let mut hello = proto::encode(&Message::Hello { node: "alpha".into(), nonce: [0; 32] });
    hello[8] = VERSION + 1;
    tokio::io::AsyncWriteExt::write_all(&mut c, &hello).await.unwrap();
    let Message::Denied { reason } = frames::recv(&mut c, &mut Vec::new()).await.unwrap() else {
        panic!("not denied")
    };
    assert!(reason.contains(&format!("version {}", VERSION + 1)), "{reason}");
    assert!(server.await.unwrap().is_err());
}

#[tokio::test(start_paused = true)]
async fn restart_from_state_file_waits_a_term_for_anyone_new() {
    let dir = tempfile::tempdir().unwrap();
    let shared = open(&dir);
    assert!(matches!(ask(&shared, "alpha", b"s3cret").await.0, Message::Answer { .. }));
    drop(shared);
    // Restarted: beta is refused for a whole term; alpha may renew its epoch meanwhile.
    let started = Instant::now();
    let shared = open(&dir);
    let (answer, _) = ask(&shared, "beta", b"s3cret").await;
    let Message::Answer { reply: Reply::Refused { holder, epoch, retry_after, .. }, .. } = answer
    else {
        panic!("{answer:?}")
    };
    assert_eq!((holder.as_deref(), epoch, retry_after), (Some("alpha"), 1, TERM));
    tokio::time::sleep(TERM - Duration::from_millis(1)).await;
    assert!(matches!(
        ask(&shared, "beta", b"s3cret").await.0,
        Message::Answer { reply: Reply::Refused { .. }, .. }
    ));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(Instant::now() - started, TERM);
    let (answer, _) = ask(&shared, "beta", b"s3cret").await;
    assert!(matches!(answer, Message::Answer { reply: Reply::Grant { epoch: 2, .. }, .. }));
}

#[tokio::test(start_paused = true)]
async fn unwritable_state_denies_the_grant() {
    let dir = tempfile::tempdir().unwrap();
    let shared = open(&dir);
    // The state file's directory disappears: a new epoch cannot be persisted, so none is given.
    std::fs::remove_dir_all(dir.path()).unwrap();
    let (answer, _) = ask(&shared, "alpha", b"s3cret").await;
    let Message::Denied { reason } = answer else { panic!("{answer:?}") };
    assert!(reason.contains("cannot write witness state file"), "{reason}");
}
