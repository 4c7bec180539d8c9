use super::*;
use crate::control::{Counters, LeaseStatus};

fn vol(role: Role, conn: ConnState, peer_role: Option<Role>) -> VolumeStatus {
    VolumeStatus {
        name: "vol".into(),
        size: 1 << 20,
        role,
        disk: DiskState::UpToDate,
        disk_failure: None,
        clients: 0,
        socket: String::new(),
        backing: String::new(),
        engine: "sync".into(),
        direct_io: false,
        conn,
        conn_reason: None,
        split_brain: false,
        peer: Some("beta".into()),
        peer_role,
        peer_disk: peer_role.map(|_| DiskState::UpToDate),
        out_of_sync: 0,
        resync: None,
        generation: String::new(),
        counters: Counters::default(),
        frozen: None,
        lease: None,
        latency: Default::default(),
    }
}

fn node(v: VolumeStatus) -> NodeStatus {
    NodeStatus { node: "alpha".into(), version: "0".into(), volumes: vec![v] }
}

fn kinds(h: &History) -> Vec<&'static str> {
    h.events().iter().map(|e| e.kind).collect()
}

#[test]
fn failover_is_measured_from_the_primary_peers_last_sign_of_life() {
    let mut h = History::default();
    let (sec, pri) = (Role::Secondary, Role::Primary);
    h.observe(&node(vol(sec, ConnState::Connected, Some(pri))), 1_000, None);
    h.observe(&node(vol(sec, ConnState::Connected, Some(pri))), 1_500, None);
    h.observe(&node(vol(sec, ConnState::Connecting, None)), 3_500, None);
    h.observe(&node(vol(pri, ConnState::Connecting, None)), 6_500, Some("promote: lease won"));
    let e = h.events().into_iter().find(|e| e.kind == "failover").expect("a failover event");
    assert_eq!(e.duration_ms, Some(5_000), "from the last poll that saw beta alive");
    assert_eq!(e.text, "failover: alpha took over from beta");
    assert_eq!(e.cause.as_deref(), Some("beta gone; agent: promote: lease won"));
    assert_eq!(kinds(&h), ["start", "conn", "peer", "failover"]);
}

#[test]
fn swap_is_a_switchover_with_its_duration_on_both_sides() {
    let (sec, pri, c) = (Role::Secondary, Role::Primary, ConnState::Connected);
    // Seen from the old Primary: demoted, then the peer became Primary.
    let mut h = History::default();
    h.observe(&node(vol(pri, c, Some(sec))), 0, None);
    h.observe(&node(vol(pri, c, Some(sec))), 500, None);
    h.observe(&node(vol(sec, c, Some(sec))), 1_000, None);
    h.observe(&node(vol(sec, c, Some(pri))), 3_000, None);
    let e = h.events().into_iter().find(|e| e.kind == "switchover").unwrap();
    assert_eq!((e.text.as_str(), e.duration_ms), ("switchover: alpha → beta", Some(2_500)));
    // Both halves within one poll: measured from the last poll that saw alpha Primary.
    let mut h = History::default();
    h.observe(&node(vol(pri, c, Some(sec))), 0, None);
    h.observe(&node(vol(sec, c, Some(pri))), 500, None);
    let e = h.events().into_iter().find(|e| e.kind == "switchover").unwrap();
    assert_eq!(e.duration_ms, Some(500));
    // Seen from the new one: the peer demoted, then this node was promoted.
    let mut h = History::default();
    h.observe(&node(vol(sec, c, Some(pri))), 0, None);
    h.observe(&node(vol(sec, c, Some(sec))), 1_000, None);
    h.observe(&node(vol(pri, c, Some(sec))), 1_700, None);
    let e = h.events().into_iter().find(|e| e.kind == "switchover").unwrap();
    assert_eq!((e.text.as_str(), e.duration_ms), ("switchover: beta → alpha", Some(1_700)));
    let mut h = History::default();
    h.observe(&node(vol(sec, c, Some(pri))), 0, None);
    h.observe(&node(vol(pri, c, Some(sec))), 500, None);
    let e = h.events().into_iter().find(|e| e.kind == "switchover").unwrap();
    assert_eq!((e.text.as_str(), e.duration_ms), ("switchover: beta → alpha", Some(500)));
}

#[test]
fn split_brain_disk_failure_resync_and_lease_loss_are_named() {
    let mut h = History::default();
    let base = vol(Role::Primary, ConnState::Connected, Some(Role::Secondary));
    h.observe(&node(base.clone()), 0, None);
    let mut v = base.clone();
    v.conn = ConnState::StandAlone;
    v.peer_role = None;
    v.peer_disk = None;
    v.conn_reason = Some("split brain: both nodes wrote".into());
    v.split_brain = true;
    v.disk = DiskState::Failed;
    v.lease = Some(LeaseStatus {
        witness: "w".into(),
        holder: Some("beta".into()),
        epoch: Some(3),
        valid_for_ms: 0,
        lost: Some(3),
        error: None,
    });
    h.observe(&node(v), 100, None);
    let k = kinds(&h);
    for want in ["split-brain", "disk-failed", "lease-lost", "peer"] {
        assert!(k.contains(&want), "{want} in {k:?}");
    }
    let mut h = History::default();
    h.observe(&node(base.clone()), 0, None);
    let mut v = base.clone();
    v.resync = Some(crate::control::ResyncProgress { total: 10, done: 0, rate: 0 });
    h.observe(&node(v), 1_000, None);
    h.observe(&node(base), 4_000, None);
    let last = h.events().pop().unwrap();
    assert_eq!(
        (last.kind, last.text.as_str(), last.duration_ms),
        ("resync", "resync finished", Some(3_000))
    );
}

#[test]
fn the_history_is_bounded() {
    let mut h = History::default();
    for i in 0..(KEEP as u64 + 5) {
        h.push(event(i, "action", None, i.to_string()));
    }
    let e = h.events();
    assert_eq!(e.len(), KEEP);
    assert_eq!(e[0].text, "5");
}
