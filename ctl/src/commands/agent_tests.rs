//! The agent's decisions, one test per row of the table in agent.rs, with time as arguments.

use std::time::{Duration, Instant};

use blockd::{
    control::{ConnState, DiskState, LeaseStatus, NodeStatus, Role},
    witness::{Lease, WitnessError},
};

use super::{Agent, Decision};
use crate::commands::fake::volume;

const PEER_TIMEOUT: Duration = Duration::from_secs(3);
const TERM: Duration = Duration::from_secs(10);

fn node(role: Role, disk: DiskState, conn: ConnState) -> NodeStatus {
    let peer_role = matches!(conn, ConnState::Connected).then_some(Role::Primary);
    let v = volume(disk, conn, role, peer_role);
    NodeStatus { node: "b".into(), version: "0".into(), volumes: vec![v] }
}

fn lease(epoch: u64) -> Lease {
    Lease {
        epoch,
        term: TERM,
        valid_until: tokio::time::Instant::from_std(Instant::now() + TERM - TERM / 10),
    }
}

fn refused(holder: &str, retry_after: Duration) -> WitnessError {
    WitnessError::Refused { holder: Some(holder.into()), epoch: 1, retry_after }
}

fn waits(d: &Decision, words: &str) {
    match d {
        Decision::Wait(w) => assert!(w.contains(words), "want {words:?} in {w:?}"),
        other => panic!("want Wait({words:?}), got {other:?}"),
    }
}

/// An agent that saw the peer connected, then gone at `t0`.
fn agent_peer_gone(t0: Instant) -> Agent {
    let mut a = Agent::new(PEER_TIMEOUT, true);
    waits(
        &a.observe(Ok(&node(Role::Secondary, DiskState::UpToDate, ConnState::Connected)), t0),
        "peer connected",
    );
    a
}

fn gone() -> NodeStatus {
    node(Role::Secondary, DiskState::UpToDate, ConnState::Connecting)
}

#[test]
fn row1_unreachable_daemon_waits() {
    let mut a = Agent::new(PEER_TIMEOUT, true);
    waits(&a.observe(Err("not running"), Instant::now()), "daemon unreachable");
}

#[test]
fn rows2_3_primary_waits_unless_its_lease_was_lost() {
    let t = Instant::now();
    let mut a = agent_peer_gone(t);
    let mut s = node(Role::Primary, DiskState::UpToDate, ConnState::Connecting);
    waits(&a.observe(Ok(&s), t), "blockd keeps the lease");
    s.volumes[0].lease = Some(LeaseStatus {
        witness: "w".into(),
        holder: Some("a".into()),
        epoch: Some(3),
        valid_for_ms: 0,
        lost: Some(3),
        error: None,
    });
    match a.observe(Ok(&s), t) {
        Decision::Demote(f) => assert!(f.contains("epoch 3 lost to a"), "{f}"),
        d => panic!("want Demote, got {d:?}"),
    }
    // After a failed demote: backing off, not hammering.
    a.failed(t);
    waits(&a.observe(Ok(&s), t + Duration::from_secs(1)), "blockd keeps the lease");
    assert!(matches!(a.observe(Ok(&s), t + Duration::from_secs(11)), Decision::Demote(_)));
    // Connected again: the peer is there, nothing to demote for.
    s.volumes[0].conn = ConnState::Connected;
    waits(&a.observe(Ok(&s), t), "blockd keeps the lease");
}

#[test]
fn rows4_to_7_secondary_waits() {
    let t = Instant::now();
    let mut a = agent_peer_gone(t);
    waits(
        &a.observe(Ok(&node(Role::Secondary, DiskState::UpToDate, ConnState::Connected)), t),
        "peer connected",
    );
    let mut manual = Agent::new(PEER_TIMEOUT, false);
    manual.observe(Ok(&node(Role::Secondary, DiskState::UpToDate, ConnState::Connected)), t);
    waits(&manual.observe(Ok(&gone()), t + TERM * 10), "no witness configured");
    let mut late = Agent::new(PEER_TIMEOUT, true);
    waits(&late.observe(Ok(&gone()), t), "already gone when the agent started");
    waits(&late.observe(Ok(&gone()), t + TERM * 10), "already gone when the agent started");
    let s = node(Role::Secondary, DiskState::Outdated, ConnState::Connecting);
    waits(&a.observe(Ok(&s), t + TERM), "disk of v is Outdated");
}

/// Row 8: the peer renewed after the link went down: never automatic.
#[test]
fn row8_a_peer_that_renewed_after_the_link_went_down_is_never_overruled() {
    let t0 = Instant::now();
    let mut a = agent_peer_gone(t0);
    assert_eq!(a.observe(Ok(&gone()), t0), Decision::Ask);
    // Asked 1 s later: the peer's lease ends in 9.5 s, so it was granted 0.5 s after t0.
    let t1 = t0 + Duration::from_secs(1);
    waits(&a.answer(Err(refused("a", Duration::from_millis(9500))), TERM, "a", t1), "held by a");
    let d = a.observe(Ok(&gone()), t0 + TERM * 3);
    waits(&d, "it renewed its lease");
    waits(&d, "promote by hand");
}

/// Rows 9 and 10: a dead peer's lease runs out; the agent wins it and promotes only after
/// peer-timeout.
#[test]
fn rows9_10_a_dead_peers_lease_runs_out_and_the_agent_promotes() {
    let t0 = Instant::now();
    let mut a = agent_peer_gone(t0);
    assert_eq!(a.observe(Ok(&gone()), t0), Decision::Ask);
    // Last renewed 4 s before the link was declared down (isolated for peer-timeout first).
    let t1 = t0 + Duration::from_millis(200);
    let before = TERM - Duration::from_millis(4200);
    waits(&a.answer(Err(refused("a", before)), TERM, "a", t1), "held by a for 5.8 s more");
    assert_eq!(a.observe(Ok(&gone()), t1), Decision::Ask, "keeps asking");
    // Witness unreachable: says so, keeps asking.
    let down = WitnessError::Timeout { addr: "127.0.0.1:1".parse().unwrap(), after: TERM };
    waits(&a.answer(Err(down), TERM, "a", t1), "did not answer");
    // Won before peer-timeout: holds it, promotes once peer-timeout has passed.
    let t2 = t0 + Duration::from_secs(2);
    waits(&a.answer(Ok(lease(2)), TERM, "a", t2), "lease epoch 2 won; promoting at");
    match a.observe(Ok(&gone()), t0 + PEER_TIMEOUT) {
        Decision::Promote(f) => {
            assert!(f.contains("peer gone 3.0 s") && f.contains("epoch 2 won"), "{f}")
        }
        d => panic!("want Promote, got {d:?}"),
    }
    // Won after peer-timeout: promotes at once.
    let mut b = agent_peer_gone(t0);
    b.observe(Ok(&gone()), t0);
    assert!(matches!(b.answer(Ok(lease(2)), TERM, "a", t0 + TERM), Decision::Promote(_)));
    // A failed promote backs off, then asks again.
    b.failed(t0 + TERM);
    waits(&b.observe(Ok(&gone()), t0 + TERM + Duration::from_secs(1)), "backing off");
    assert_eq!(b.observe(Ok(&gone()), t0 + TERM * 3), Decision::Ask);
}

/// A refusal naming nobody (a restarted witness's quiet term) is not the peer renewing.
#[test]
fn a_restarting_witness_is_not_a_live_peer() {
    let t0 = Instant::now();
    let mut a = agent_peer_gone(t0);
    a.observe(Ok(&gone()), t0);
    let quiet = WitnessError::Refused { holder: None, epoch: 4, retry_after: TERM };
    waits(&a.answer(Err(quiet), TERM, "a", t0 + Duration::from_secs(1)), "witness restarting");
    assert_eq!(a.observe(Ok(&gone()), t0 + Duration::from_secs(2)), Decision::Ask);
}

/// Row 11: with failback to the peer, a Primary swaps once the peer stayed in sync for the
/// delay; a peer that drops out of sync starts the delay again; without failback, never.
#[test]
fn row11_failback_waits_for_the_preferred_peer_to_stay_in_sync() {
    let t0 = Instant::now();
    let delay = Duration::from_secs(5);
    let mut a = Agent::new(PEER_TIMEOUT, true).with_failback(delay);
    let mut s = node(Role::Primary, DiskState::UpToDate, ConnState::Connected);
    s.volumes[0].peer_role = Some(Role::Secondary);
    waits(&a.observe(Ok(&s), t0), "in sync for 0.0 s; failback at 5.0 s");
    let mut behind = s.clone();
    behind.volumes[0].out_of_sync = 4096;
    waits(&a.observe(Ok(&behind), t0 + Duration::from_secs(4)), "not in sync");
    waits(&a.observe(Ok(&s), t0 + Duration::from_secs(5)), "in sync for 0.0 s");
    match a.observe(Ok(&s), t0 + Duration::from_secs(10)) {
        Decision::Failback(f) => assert!(f.contains("in sync for 5.0 s"), "{f}"),
        d => panic!("want Failback, got {d:?}"),
    }
    // A failed swap (this node Primary again) backs off.
    a.failed(t0 + Duration::from_secs(10));
    waits(&a.observe(Ok(&s), t0 + Duration::from_secs(16)), "failback at");
    let mut manual = Agent::new(PEER_TIMEOUT, true);
    waits(&manual.observe(Ok(&s), t0 + TERM * 100), "blockd keeps the lease");
}
