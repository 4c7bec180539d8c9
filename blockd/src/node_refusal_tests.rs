//! What the operator is told when a split brain refuses a request (design.md §5, §7): the
//! control API's `SplitBrain` kind, which `blockctl` prints, not "the peer is unreachable".

use std::{path::PathBuf, sync::Arc};

use tempfile::TempDir;

use super::*;
use crate::{
    nbd::testkit,
    role::{DiskState, SPLIT_BRAIN},
};

const SIZE: u64 = 1 << 20;

/// A two-node volume of node alpha, Secondary, without a session.
fn node(dir: &TempDir) -> (Arc<Node>, Arc<Volume>) {
    let v = testkit::volume(dir, "v", SIZE, Role::Secondary);
    let cfg = ResyncConfig::default();
    let n = Node::new(
        "alpha".into(),
        Some("beta".into()),
        vec![Arc::clone(&v)],
        PathBuf::new(),
        cfg,
        None,
    );
    (n, v)
}

/// The handshake with the peer found a split brain: the volume goes StandAlone.
async fn split(v: &Volume, peer_role: Role) {
    let decision = SyncDecision::SplitBrain;
    let event = Event::Connected { peer_role, peer_disk: DiskState::UpToDate, decision };
    let t = v.transition(event, None).await.unwrap();
    let said = |r: &str| r.starts_with(SPLIT_BRAIN);
    assert!(
        matches!(&t.actions[..], [Action::Drop { reason, split_brain: true }] if said(reason)),
        "{t:?}"
    );
    assert_eq!(v.machine().conn, ConnState::StandAlone);
    assert!(v.split_brain());
}

#[tokio::test]
async fn promote_after_a_split_brain_is_refused_as_split_brain() {
    let dir = tempfile::tempdir().unwrap();
    let (n, v) = node(&dir);
    // Before any handshake the peer is merely unreachable.
    let before = n.set_role(None, Role::Primary, false).await.unwrap_err();
    assert_eq!(before.0, ErrorKind::PeerUnreachable, "{before:?}");
    split(&v, Role::Primary).await;
    let (kind, message) = n.set_role(None, Role::Primary, false).await.unwrap_err();
    assert_eq!(kind, ErrorKind::SplitBrain, "{message}");
    assert!(message.contains("resolve --discard-local"), "says what to do: {message}");
    assert_eq!(v.machine().role, Role::Secondary, "not promoted");
    // The operator may still decide to go on alone.
    n.set_role(None, Role::Primary, true).await.unwrap();
    assert_eq!(v.machine().role, Role::Primary);
}

#[tokio::test]
async fn verify_after_a_split_brain_is_refused_as_split_brain() {
    let dir = tempfile::tempdir().unwrap();
    let (n, v) = node(&dir);
    n.set_role(None, Role::Primary, true).await.unwrap();
    let (kind, _) = n.verify(None).await.unwrap_err();
    assert_eq!(kind, ErrorKind::NotPrimary, "not connected: the old refusal");
    split(&v, Role::Primary).await;
    let (kind, message) = n.verify(None).await.unwrap_err();
    assert_eq!(kind, ErrorKind::SplitBrain, "{message}");
}

/// A later handshake that finds no split brain clears it.
#[tokio::test]
async fn a_clean_handshake_clears_the_split_brain() {
    let dir = tempfile::tempdir().unwrap();
    let (_n, v) = node(&dir);
    split(&v, Role::Secondary).await;
    let event = Event::Connected {
        peer_role: Role::Secondary,
        peer_disk: DiskState::UpToDate,
        decision: SyncDecision::InSync,
    };
    v.transition(event, None).await.unwrap();
    assert!(!v.split_brain(), "{:?}", v.status().conn_reason);
}

/// A refused connection attempt after the split brain (say, the peer restarted with another
/// key) replaces the reason status shows, not the split brain: promotion is still refused.
#[tokio::test]
async fn a_later_refusal_keeps_the_split_brain() {
    let dir = tempfile::tempdir().unwrap();
    let (n, v) = node(&dir);
    split(&v, Role::Secondary).await;
    v.note_refused("authentication failed");
    let s = v.status();
    assert_eq!(s.conn_reason.as_deref(), Some("authentication failed"));
    assert!(s.split_brain && v.split_brain());
    let (kind, _) = n.set_role(None, Role::Primary, false).await.unwrap_err();
    assert_eq!(kind, ErrorKind::SplitBrain);
}
