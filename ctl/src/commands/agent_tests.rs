//! The agent's decisions, one test per row of the table in agent.rs, with time as arguments.

use std::time::{Duration, Instant};

use blockd::{
    control::{ConnState, DiskState, LeaseStatus, NodeStatus, Role},
    witness::{Granted, Lease, WitnessError},
};

use super::{Agent, Decision};
use crate::commands::fake::volume;

const TERM: Duration = Duration::from_secs(3);
const MS: Duration = Duration::from_millis(1);

fn node(role: Role, disk: DiskState, conn: ConnState) -> NodeStatus {
    let peer_role = matches!(conn, ConnState::Connected).then_some(Role::Primary);
    let v = volume(disk, conn, role, peer_role);
    NodeStatus { node: "b".into(), version: "0".into(), volumes: vec![v] }
}

/// A grant of `epoch`; the witness says whether the previous holder's last grant was degraded.
fn granted(epoch: u64, prev_degraded: Option<bool>) -> Result<Granted, WitnessError> {
    let valid_until = tokio::time::Instant::from_std(Instant::now() + TERM - TERM / 10);
    Ok(Granted { lease: Lease { epoch, term: TERM, valid_until }, prev_degraded })
}

fn refused(holder: &str, retry_after: Duration, degraded: Option<bool>) -> WitnessError {
    WitnessError::Refused { holder: Some(holder.into()), epoch: 1, retry_after, degraded }
}

#[track_caller]
fn promotes(d: &Decision, words: &str) {
    match d {
        Decision::Promote(f) => assert!(f.contains(words), "want {words:?} in {f:?}"),
        other => panic!("want Promote({words:?}), got {other:?}"),
    }
}

fn waits(d: &Decision, words: &str) {
    match d {
        Decision::Wait(w) => assert!(w.contains(words), "want {words:?} in {w:?}"),
        other => panic!("want Wait({words:?}), got {other:?}"),
    }
}

/// An agent that saw the peer connected, then gone at `t0`.
fn agent_peer_gone(t0: Instant) -> Agent {
    let mut a = Agent::new(true);
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
    let mut a = Agent::new(true);
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

/// After row 2 (demoted, local changes given up) the node neither asks the witness nor asks
/// for an operator while it reconnects: it waits for the peer (issue 16: the thawed node's
/// agent said "promote by hand" during the handshake that resynced it).
#[test]
fn row2_a_demoted_node_rejoins_before_anything_else() {
    let t = Instant::now();
    let mut a = agent_peer_gone(t);
    a.demoted();
    let standalone = node(Role::Secondary, DiskState::UpToDate, ConnState::StandAlone);
    for i in 0..20 {
        let d = a.observe(Ok(&standalone), t + MS * (100 * i));
        waits(&d, "rejoining the peer first");
        assert!(!matches!(&d, Decision::Wait(w) if w.contains("by hand")), "{d:?}");
    }
    let connected = node(Role::Secondary, DiskState::UpToDate, ConnState::Connected);
    waits(&a.observe(Ok(&connected), t + TERM), "peer connected");
    assert_eq!(a.observe(Ok(&gone()), t + TERM * 2), Decision::Ask, "an ordinary Secondary again");
}

#[test]
fn rows4_to_7_secondary_waits() {
    let t = Instant::now();
    let mut a = agent_peer_gone(t);
    waits(
        &a.observe(Ok(&node(Role::Secondary, DiskState::UpToDate, ConnState::Connected)), t),
        "peer connected",
    );
    let mut manual = Agent::new(false);
    manual.observe(Ok(&node(Role::Secondary, DiskState::UpToDate, ConnState::Connected)), t);
    waits(&manual.observe(Ok(&gone()), t + TERM * 10), "no witness configured");
    let mut late = Agent::new(true);
    waits(&late.observe(Ok(&gone()), t), "already gone when the agent started");
    waits(&late.observe(Ok(&gone()), t + TERM * 10), "already gone when the agent started");
    let s = node(Role::Secondary, DiskState::Outdated, ConnState::Connecting);
    waits(&a.observe(Ok(&s), t + TERM), "disk of v is Outdated");
}

/// Row 8: the peer renewed as degraded after losing us: never automatic, however long.
#[test]
fn row8_a_peer_that_renewed_as_degraded_is_never_overruled() {
    let t0 = Instant::now();
    let mut a = agent_peer_gone(t0);
    assert_eq!(a.observe(Ok(&gone()), t0), Decision::Ask);
    let t1 = t0 + Duration::from_millis(200);
    let no = a.answer(Err(refused("a", TERM, Some(true))), "a", t1);
    waits(&no, "renewed its lease (epoch 1) as degraded");
    waits(&no, "promote by hand");
    // It stops asking (a grant would fence a peer that may hold the only copy).
    let d = a.observe(Ok(&gone()), t0 + TERM * 10);
    waits(&d, "promote by hand");
    // Connected again: forgotten.
    a.observe(Ok(&node(Role::Secondary, DiskState::UpToDate, ConnState::Connected)), t0);
    assert_eq!(a.observe(Ok(&gone()), t0 + TERM * 11), Decision::Ask);
    // A grant that follows a degraded (or unknown) holder: not automatic either.
    for flag in [Some(true), None] {
        let mut b = agent_peer_gone(t0);
        b.observe(Ok(&gone()), t0);
        waits(&b.answer(granted(2, flag), "a", t0 + TERM), "promote by hand");
        waits(&b.observe(Ok(&gone()), t0 + TERM * 2), "promote by hand");
    }
    // A witness that cannot say (an old one): as if degraded.
    let mut c = agent_peer_gone(t0);
    c.observe(Ok(&gone()), t0);
    waits(&c.answer(Err(refused("a", TERM, None)), "a", t1), "degraded unknown");
}

/// Rows 9 and 10: a dead peer's lease runs out; the agent wins it and promotes at once, with
/// no peer-timeout of its own after the loss (detection and expiry overlap).
#[test]
fn rows9_10_a_dead_peers_lease_runs_out_and_the_agent_promotes_at_once() {
    let t0 = Instant::now();
    let mut a = agent_peer_gone(t0);
    assert_eq!(a.observe(Ok(&gone()), t0), Decision::Ask);
    let t1 = t0 + Duration::from_millis(200);
    let d = a.answer(Err(refused("a", Duration::from_millis(1800), Some(false))), "a", t1);
    waits(&d, "held by a for 1.8 s more, not degraded");
    assert_eq!(a.observe(Ok(&gone()), t1), Decision::Ask, "keeps asking");
    // Witness unreachable: says so, keeps asking.
    let down = WitnessError::Timeout { addr: "127.0.0.1:1".parse().unwrap(), after: TERM };
    waits(&a.answer(Err(down), "a", t1), "did not answer");
    assert_eq!(a.observe(Ok(&gone()), t1), Decision::Ask);
    promotes(&a.answer(granted(2, Some(false)), "a", t0 + 2 * TERM / 3), "epoch 2 won");
    // A failed promote backs off, then asks again.
    a.failed(t0 + TERM);
    waits(&a.observe(Ok(&gone()), t0 + TERM + Duration::from_secs(1)), "backing off");
    assert_eq!(a.observe(Ok(&gone()), t0 + TERM * 10), Decision::Ask);
}

/// Finding 2 of issue 16: the primary's processes are killed while its link is up, so the FIN
/// arrives at once, and its last (ordinary) renewal came 0.8 s before. The old agent judged
/// "renewed after the link went down" from its own poll's time and refused forever. Now the
/// witness says the renewal was not degraded: promote as soon as it runs out.
#[test]
fn fin_before_the_link_goes_down_promotes_when_the_lease_runs_out() {
    let term = Duration::from_secs(2);
    let t0 = Instant::now(); // the poll that saw the FIN; the last renewal was at t0 - 0.8 s
    let mut a = agent_peer_gone(t0 - Duration::from_millis(200));
    assert_eq!(a.observe(Ok(&gone()), t0), Decision::Ask);
    let left = term - Duration::from_millis(800);
    waits(&a.answer(Err(refused("a", left, Some(false))), "a", t0), "not degraded");
    let mut t = t0;
    while t < t0 + left {
        t += Duration::from_millis(200);
        assert_eq!(a.observe(Ok(&gone()), t), Decision::Ask, "asks every poll");
        let r = t0 + left - t.min(t0 + left);
        if !r.is_zero() {
            waits(&a.answer(Err(refused("a", r, Some(false))), "a", t), "promoting when");
        }
    }
    promotes(&a.answer(granted(2, Some(false)), "a", t), "not degraded");
    // The same with the link taken down first (a power cut): no FIN, peer-timeout later.
    let mut b = agent_peer_gone(t0);
    let t2 = t0 + Duration::from_secs(2);
    assert_eq!(b.observe(Ok(&gone()), t2), Decision::Ask);
    promotes(&b.answer(granted(2, Some(false)), "a", t2 + MS), "epoch 2 won");
}

/// The ask after a refusal goes when the refused lease runs out, not a poll interval later.
#[test]
fn the_next_ask_goes_when_the_refused_lease_runs_out() {
    let t0 = Instant::now();
    let poll = Duration::from_millis(200);
    let mut a = agent_peer_gone(t0);
    assert_eq!(a.next_poll(poll, t0), poll, "nothing refused yet");
    let left = Duration::from_millis(30);
    waits(&a.answer(Err(refused("a", left, Some(false))), "a", t0), "not degraded");
    assert_eq!(a.next_poll(poll, t0 + MS), Duration::from_millis(34));
    assert_eq!(a.next_poll(poll, t0 + MS), poll, "once");
    waits(&a.answer(Err(refused("a", poll * 5, Some(false))), "a", t0), "not degraded");
    assert_eq!(a.next_poll(poll, t0), poll, "never longer than the interval");
}

/// An alive primary cut off from us but not from the witness keeps renewing, not degraded
/// (it has no writes): never promoted over, asked again every poll.
#[test]
fn a_cut_off_primary_that_keeps_renewing_is_never_promoted_over() {
    let t0 = Instant::now();
    let mut a = agent_peer_gone(t0);
    for i in 1..100u32 {
        let t = t0 + i * Duration::from_millis(200);
        assert_eq!(a.observe(Ok(&gone()), t), Decision::Ask);
        let left = TERM - (i % 5) * Duration::from_millis(200);
        waits(&a.answer(Err(refused("a", left, Some(false))), "a", t), "held by a");
    }
}

/// A refusal naming nobody (a restarted witness's quiet term) is not the peer renewing.
#[test]
fn a_restarting_witness_is_not_a_live_peer() {
    let t0 = Instant::now();
    let mut a = agent_peer_gone(t0);
    a.observe(Ok(&gone()), t0);
    let quiet =
        WitnessError::Refused { holder: None, epoch: 4, retry_after: TERM, degraded: Some(false) };
    waits(&a.answer(Err(quiet), "a", t0 + Duration::from_secs(1)), "witness restarting");
    assert_eq!(a.observe(Ok(&gone()), t0 + Duration::from_secs(2)), Decision::Ask);
}

/// Row 12: a Primary whose local disk failed (it serves through its peer) moves the stack to
/// the peer once the peer is connected, Secondary and UpToDate; not before; backs off after a
/// failed swap.
#[test]
fn row12_a_primary_with_a_failed_disk_swaps_to_a_ready_peer() {
    let t0 = Instant::now();
    let mut a = Agent::new(true);
    let mut s = node(Role::Primary, DiskState::Failed, ConnState::Connected);
    s.volumes[0].peer_role = Some(Role::Secondary);
    s.volumes[0].peer_disk = Some(DiskState::Inconsistent);
    waits(&a.observe(Ok(&s), t0), "disk of v Failed, serving through the peer; peer not ready");
    s.volumes[0].peer_disk = Some(DiskState::UpToDate);
    match a.observe(Ok(&s), t0) {
        Decision::Swap(r, f) => {
            assert_eq!(r, "disk-failed");
            assert!(f.contains("local disk of v Failed"), "{f}");
        }
        d => panic!("want Swap, got {d:?}"),
    }
    a.failed(t0);
    waits(&a.observe(Ok(&s), t0 + Duration::from_secs(1)), "backing off after a failed swap");
    assert!(matches!(a.observe(Ok(&s), t0 + Duration::from_secs(11)), Decision::Swap(..)));
    // A healthy Primary: no swap.
    let mut ok = s.clone();
    ok.volumes[0].disk = DiskState::UpToDate;
    waits(&a.observe(Ok(&ok), t0 + Duration::from_secs(20)), "blockd keeps the lease");
}

/// Row 11: with failback to the peer, a Primary swaps once the peer stayed in sync for the
/// delay; a peer that drops out of sync starts the delay again; without failback, never.
#[test]
fn row11_failback_waits_for_the_preferred_peer_to_stay_in_sync() {
    let t0 = Instant::now();
    let delay = Duration::from_secs(5);
    let mut a = Agent::new(true).with_failback(delay);
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
    let mut manual = Agent::new(true);
    waits(&manual.observe(Ok(&s), t0 + TERM * 100), "blockd keeps the lease");
}

/// Rows 13 and 14: a daemon that restarted under a running stack comes back Secondary with
/// the VIP and the mount still up here: the agent tears them down; if the peer took over, that
/// is all; if both are Secondary and in sync, this node promotes again.
#[test]
fn rows13_14_a_stale_stack_is_torn_down_and_the_node_resumes_if_nobody_is_primary() {
    let t0 = Instant::now();
    let mut a = agent_peer_gone(t0);
    a.stack(vec!["mount db".into(), "vip".into()]);
    let mut both = node(Role::Secondary, DiskState::UpToDate, ConnState::Connected);
    both.volumes[0].peer_role = Some(Role::Secondary);
    match a.observe(Ok(&both), t0) {
        Decision::Recover(f) => assert!(f.contains("mount db, vip still up here"), "{f}"),
        d => panic!("want Recover, got {d:?}"),
    }
    // A failed teardown backs off.
    a.failed(t0);
    waits(&a.observe(Ok(&both), t0 + Duration::from_secs(1)), "backing off");
    a.recovered();
    a.stack(Vec::new());
    let mut syncing = both.clone();
    syncing.volumes[0].disk = DiskState::Inconsistent;
    syncing.volumes[0].conn = ConnState::SyncTarget;
    waits(&a.observe(Ok(&syncing), t0 + Duration::from_secs(11)), "promoting here once in sync");
    match a.observe(Ok(&both), t0 + Duration::from_secs(12)) {
        Decision::Resume(f) => assert!(f.contains("nobody is Primary"), "{f}"),
        d => panic!("want Resume, got {d:?}"),
    }
    // Once Primary, the resume is over; a later plain Secondary does not promote on its own.
    let mut p = both.clone();
    p.volumes[0].role = Role::Primary;
    a.observe(Ok(&p), t0 + Duration::from_secs(13));
    waits(&a.observe(Ok(&both), t0 + Duration::from_secs(14)), "peer connected");
    // The peer took over instead: nothing more to do.
    let mut b = agent_peer_gone(t0);
    b.recovered();
    let mut peer_primary = both.clone();
    peer_primary.volumes[0].peer_role = Some(Role::Primary);
    waits(&b.observe(Ok(&peer_primary), t0), "it took over");
    waits(&b.observe(Ok(&both), t0 + Duration::from_secs(1)), "Secondary, peer connected");
    // Without a stale stack a connected Secondary never promotes.
    let mut c = agent_peer_gone(t0);
    waits(&c.observe(Ok(&both), t0 + TERM * 10), "Secondary, peer connected");
}

/// Row 12b: a Primary's service that fails for `restart-after` is restarted in place; after
/// `max-restarts` within the window the stack moves to a ready peer (swap); with the peer not
/// ready it is restarted again instead.
#[test]
fn row12b_a_failing_service_is_restarted_then_swapped_to_the_peer() {
    let t0 = Instant::now();
    let cfg = blockd::config::AgentConfig { max_restarts: 1, ..Default::default() };
    let mut a = Agent::new(true).with_health(&cfg);
    assert!(a.probe_due(None, t0));
    let mut s = node(Role::Primary, DiskState::UpToDate, ConnState::Connected);
    s.volumes[0].peer_role = Some(Role::Secondary);
    let probes = |ok: bool| vec![("service mariadb".to_string(), ok)];
    let at = |n: u64| t0 + Duration::from_secs(n);
    // Until the service was seen healthy once, every poll probes (a promote just finished:
    // a service that dies at once must still be seen up first, or it is never restarted).
    a.probed(probes(false));
    waits(&a.observe(Ok(&s), t0), "blockd keeps the lease");
    assert!(a.probe_due(Some(t0), t0 + MS * 100), "not settled: probe at the next poll");
    a.probed(probes(true));
    waits(&a.observe(Ok(&s), at(0)), "blockd keeps the lease");
    assert!(!a.probe_due(Some(at(0)), at(0) + MS * 100), "settled: every HEALTH_INTERVAL");
    assert!(a.probe_due(Some(at(0)), at(1)));
    a.probed(probes(false));
    waits(&a.observe(Ok(&s), at(1)), "blockd keeps the lease");
    a.probed(probes(false));
    match a.observe(Ok(&s), at(4)) {
        Decision::Restart(step, why) => {
            assert_eq!(step, "service mariadb");
            assert!(why.contains("restarting it in place"), "{why}");
        }
        d => panic!("want Restart, got {d:?}"),
    }
    a.restarted("service mariadb", at(5));
    a.probed(probes(true));
    a.observe(Ok(&s), at(6));
    a.probed(probes(false));
    a.observe(Ok(&s), at(7));
    // The peer is not ready: restart again rather than move.
    let mut behind = s.clone();
    behind.volumes[0].peer_disk = Some(DiskState::Inconsistent);
    a.probed(probes(false));
    match a.observe(Ok(&behind), at(10)) {
        Decision::Restart(_, why) => assert!(why.contains("peer is not ready"), "{why}"),
        d => panic!("want Restart, got {d:?}"),
    }
    a.probed(probes(false));
    match a.observe(Ok(&s), at(11)) {
        Decision::Swap(r, why) => {
            assert_eq!(r, "health: service mariadb");
            assert!(why.contains("service mariadb failing"), "{why}");
        }
        d => panic!("want Swap, got {d:?}"),
    }
    // Without probes in a poll nothing is decided about health.
    waits(&a.observe(Ok(&s), at(12)), "blockd keeps the lease");
}
