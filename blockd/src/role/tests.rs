//! Tests of the role machine: every (state, event) pair against the transition table,
//! invariants over all pairs, and two simulated nodes exchanging promotion messages.

use super::*;
use ConnState::{Connected, Connecting, StandAlone, SyncSource, SyncTarget};
use DiskState::{Failed, Inconsistent, Outdated, UpToDate};
use Role::{Primary, Secondary};

const ROLES: [Role; 2] = [Primary, Secondary];
const DISKS: [DiskState; 4] = [UpToDate, Outdated, Inconsistent, Failed];
const CONNS: [ConnState; 5] = [StandAlone, Connecting, Connected, SyncSource, SyncTarget];
const DECISIONS: [SyncDecision; 5] = [
    SyncDecision::InSync,
    SyncDecision::Source,
    SyncDecision::Target,
    SyncDecision::SplitBrain,
    SyncDecision::Unrelated,
];

/// Every state the fields can express (240), possible or not: `step` must answer them all.
fn all_states() -> Vec<State> {
    let mut v = Vec::new();
    for role in ROLES {
        for disk in DISKS {
            for conn in CONNS {
                for peer_role in [None, Some(Primary), Some(Secondary)] {
                    for promoting in [false, true] {
                        v.push(State { role, disk, conn, peer_role, promoting });
                    }
                }
            }
        }
    }
    v
}

fn connected_events() -> Vec<Event> {
    let mut v = Vec::new();
    for peer_role in ROLES {
        for peer_disk in DISKS {
            for decision in DECISIONS {
                v.push(Event::Connected { peer_role, peer_disk, decision });
            }
        }
    }
    v
}

fn all_events() -> Vec<Event> {
    let mut v = vec![
        Event::Promote { force: false },
        Event::Promote { force: true },
        Event::Demote,
        Event::PeerAnswered { granted: false },
        Event::PeerAnswered { granted: true },
        Event::PeerAsksPromote,
        Event::PeerRoleChanged(Primary),
        Event::PeerRoleChanged(Secondary),
        Event::Disconnected,
        Event::ResyncDone,
        Event::DiskFailed,
        Event::DiskReplaced,
    ];
    v.extend(connected_events());
    v
}

type Outcome = (State, Vec<Action>);
type When = Box<dyn Fn(&State, &Event) -> bool>;
type Then = Box<dyn Fn(&State, &Event) -> Outcome>;

/// One line of the transition table: the class of (state, event) it covers and what must
/// come out. The `when`s of one event's rows partition all (state, event) pairs.
struct Row {
    class: &'static str,
    when: When,
    then: Then,
}

fn row(
    class: &'static str,
    when: impl Fn(&State, &Event) -> bool + 'static,
    then: impl Fn(&State, &Event) -> Outcome + 'static,
) -> Row {
    Row { class, when: Box::new(when), then: Box::new(then) }
}

/// Drop reasons are prose; the table checks that a Drop happens (and whether it is a split
/// brain), other tests its words.
fn norm((s, actions): Outcome) -> Outcome {
    let actions = actions
        .into_iter()
        .map(|a| match a {
            Action::Drop { split_brain, .. } => Action::Drop { reason: String::new(), split_brain },
            other => other,
        })
        .collect();
    (s, actions)
}

/// Runs every state against every event of `events`: each pair falls in exactly one row,
/// `step` gives that row's outcome, and every row is reached.
fn check(events: &[Event], rows: &[Row]) {
    let mut hits = vec![0usize; rows.len()];
    for s in all_states() {
        for e in events {
            let matching: Vec<usize> = (0..rows.len()).filter(|&i| (rows[i].when)(&s, e)).collect();
            assert_eq!(matching.len(), 1, "{s:?} {e:?} matches rows {matching:?}");
            let r = &rows[matching[0]];
            hits[matching[0]] += 1;
            assert_eq!(norm(step(&s, e)), norm((r.then)(&s, e)), "{}: {s:?} {e:?}", r.class);
        }
    }
    for (r, n) in rows.iter().zip(hits) {
        assert!(n > 0, "row {:?} never reached", r.class);
    }
}

fn same(s: &State, _: &Event) -> Outcome {
    (*s, vec![])
}

fn refused(s: &State, r: Refusal) -> Outcome {
    (*s, vec![Action::Refuse(r)])
}

fn up(c: ConnState) -> bool {
    matches!(c, Connected | SyncSource)
}

fn force_of(e: &Event) -> bool {
    matches!(e, Event::Promote { force: true })
}

fn granted_of(e: &Event) -> bool {
    matches!(e, Event::PeerAnswered { granted: true })
}

fn ready(s: &State) -> bool {
    s.role == Secondary && s.disk == UpToDate && !s.promoting
}

#[test]
fn promote_every_state() {
    check(
        &[Event::Promote { force: false }, Event::Promote { force: true }],
        &[
            row("Primary", |s, _| s.role == Primary, same),
            row(
                "Secondary, disk not UpToDate",
                |s, _| s.role == Secondary && s.disk != UpToDate,
                |s, _| refused(s, Refusal::NotUpToDate(s.disk)),
            ),
            row(
                "promoting",
                |s, _| s.role == Secondary && s.disk == UpToDate && s.promoting,
                |s, _| refused(s, Refusal::PromotionPending),
            ),
            row(
                "Up, peer Primary",
                |s, _| ready(s) && up(s.conn) && s.peer_role == Some(Primary),
                |s, _| refused(s, Refusal::PeerIsPrimary),
            ),
            row(
                "Up, peer Secondary or unknown",
                |s, _| ready(s) && up(s.conn) && s.peer_role != Some(Primary),
                |s, _| (State { promoting: true, ..*s }, vec![Action::AskPeerPromote]),
            ),
            row(
                "SyncTarget",
                |s, _| ready(s) && s.conn == SyncTarget,
                |s, _| refused(s, Refusal::NotUpToDate(Inconsistent)),
            ),
            row(
                "Down, force",
                |s, e| ready(s) && matches!(s.conn, StandAlone | Connecting) && force_of(e),
                |s, _| (State { role: Primary, ..*s }, vec![Action::BecomePrimary]),
            ),
            row(
                "Down, no force",
                |s, e| ready(s) && matches!(s.conn, StandAlone | Connecting) && !force_of(e),
                |s, _| refused(s, Refusal::PeerUnreachable),
            ),
        ],
    );
}

#[test]
fn demote_every_state() {
    check(
        &[Event::Demote],
        &[
            row("Secondary", |s, _| s.role == Secondary, same),
            row(
                "Primary",
                |s, _| s.role == Primary,
                |s, _| (State { role: Secondary, ..*s }, vec![Action::BecomeSecondary]),
            ),
        ],
    );
}

#[test]
fn peer_answered_every_state() {
    let done = |s: &State| State { promoting: false, ..*s };
    check(
        &[Event::PeerAnswered { granted: false }, Event::PeerAnswered { granted: true }],
        &[
            row("not promoting (stale)", |s, _| !s.promoting, same),
            row(
                "promoting, refused",
                |s, e| s.promoting && !granted_of(e),
                move |s, _| (done(s), vec![Action::Refuse(Refusal::PeerRefused)]),
            ),
            row(
                "promoting, granted, disk not UpToDate",
                |s, e| s.promoting && granted_of(e) && s.disk != UpToDate,
                move |s, _| (done(s), vec![Action::Refuse(Refusal::NotUpToDate(s.disk))]),
            ),
            row(
                "promoting, granted, UpToDate, peer Primary",
                |s, e| {
                    s.promoting
                        && granted_of(e)
                        && s.disk == UpToDate
                        && s.peer_role == Some(Primary)
                },
                move |s, _| (done(s), vec![Action::Refuse(Refusal::PeerIsPrimary)]),
            ),
            row(
                "promoting, granted, UpToDate, peer not Primary",
                |s, e| {
                    s.promoting
                        && granted_of(e)
                        && s.disk == UpToDate
                        && s.peer_role != Some(Primary)
                },
                move |s, _| (State { role: Primary, ..done(s) }, vec![Action::BecomePrimary]),
            ),
        ],
    );
}

#[test]
fn peer_asks_promote_every_state() {
    check(
        &[Event::PeerAsksPromote],
        &[
            row(
                "Primary or promoting",
                |s, _| s.role == Primary || s.promoting,
                |s, _| (*s, vec![Action::AnswerPeer { granted: false }]),
            ),
            row(
                "Secondary, not promoting",
                |s, _| s.role == Secondary && !s.promoting,
                |s, _| {
                    let next = State { peer_role: Some(Primary), ..*s };
                    (next, vec![Action::AnswerPeer { granted: true }])
                },
            ),
        ],
    );
}

#[test]
fn peer_role_changed_every_state() {
    let role_of = |e: &Event| match e {
        Event::PeerRoleChanged(r) => *r,
        other => panic!("not a role change: {other:?}"),
    };
    check(
        &[Event::PeerRoleChanged(Primary), Event::PeerRoleChanged(Secondary)],
        &[
            row(
                "both Primary",
                move |s, e| s.role == Primary && role_of(e) == Primary,
                |s, _| {
                    let next = State { conn: StandAlone, peer_role: Some(Primary), ..*s };
                    (next, vec![Action::Drop { reason: String::new(), split_brain: false }])
                },
            ),
            row(
                "otherwise",
                move |s, e| !(s.role == Primary && role_of(e) == Primary),
                move |s, e| (State { peer_role: Some(role_of(e)), ..*s }, vec![]),
            ),
        ],
    );
}

/// The direction once equal generations meet an unfinished resync (see `connected`).
fn effective(d: SyncDecision, mine: DiskState, peer: DiskState) -> SyncDecision {
    match (d, mine, peer) {
        (SyncDecision::InSync, Inconsistent, UpToDate) => SyncDecision::Target,
        (SyncDecision::InSync, UpToDate, Inconsistent) => SyncDecision::Source,
        (d, _, _) => d,
    }
}

/// (peer role, peer disk, effective decision) of a Connected event.
fn conn_of(s: &State, e: &Event) -> (Role, DiskState, SyncDecision) {
    match *e {
        Event::Connected { peer_role, peer_disk, decision } => {
            (peer_role, peer_disk, effective(decision, s.disk, peer_disk))
        }
        other => panic!("not Connected: {other:?}"),
    }
}

/// The state after a Connected event before its outcome, and the promotion's refusal.
fn connected_base(s: &State, e: &Event) -> Outcome {
    let (peer_role, _, _) = conn_of(s, e);
    let next = State { peer_role: Some(peer_role), promoting: false, ..*s };
    let refusal = if s.promoting { vec![Action::Refuse(Refusal::PeerUnreachable)] } else { vec![] };
    (next, refusal)
}

fn connected_to(conn: ConnState, disk: Option<DiskState>, action: Option<Action>) -> Then {
    Box::new(move |s, e| {
        let (next, mut actions) = connected_base(s, e);
        actions.extend(action.clone());
        (State { conn, disk: disk.unwrap_or(next.disk), ..next }, actions)
    })
}

fn dropped(s: &State, e: &Event) -> Outcome {
    dropped_as(s, e, false)
}

fn dropped_split(s: &State, e: &Event) -> Outcome {
    dropped_as(s, e, true)
}

fn dropped_as(s: &State, e: &Event, split_brain: bool) -> Outcome {
    let (next, mut actions) = connected_base(s, e);
    actions.push(Action::Drop { reason: String::new(), split_brain });
    (State { conn: StandAlone, ..next }, actions)
}

/// Both Primary: a split brain when the generations say so, else a plain drop.
fn both_primary(s: &State, e: &Event) -> Outcome {
    dropped_as(s, e, conn_of(s, e).2 == SyncDecision::SplitBrain)
}

/// Not both Primary, and a Secondary of the two (me or the peer) has a Failed disk.
fn failed_secondary(s: &State, e: &Event) -> bool {
    let (pr, pd, _) = conn_of(s, e);
    let both = s.role == Primary && pr == Primary;
    !both && ((s.role == Secondary && s.disk == Failed) || (pr == Secondary && pd == Failed))
}

fn connected_row(
    class: &'static str,
    when: impl Fn(&State, Role, DiskState, SyncDecision) -> bool + 'static,
    then: Then,
) -> Row {
    let both = |s: &State, e: &Event| s.role == Primary && conn_of(s, e).0 == Primary;
    Row {
        class,
        when: Box::new(move |s, e| {
            let (pr, pd, d) = conn_of(s, e);
            !both(s, e) && !failed_secondary(s, e) && when(s, pr, pd, d)
        }),
        then,
    }
}

#[test]
fn connected_every_state_and_decision() {
    use SyncDecision::{InSync, Source, SplitBrain, Target, Unrelated};
    let both = |s: &State, e: &Event| s.role == Primary && conn_of(s, e).0 == Primary;
    let rows = [
        Row { class: "both Primary", when: Box::new(both), then: Box::new(both_primary) },
        row("a Secondary's disk is Failed", failed_secondary, dropped),
        connected_row("in sync", |_, _, _, d| d == InSync, connected_to(Connected, None, None)),
        connected_row(
            "Source, peer Primary",
            |_, pr, _, d| d == Source && pr == Primary,
            Box::new(dropped),
        ),
        connected_row(
            "Source, my disk not UpToDate",
            |s, pr, _, d| d == Source && pr == Secondary && s.disk != UpToDate,
            Box::new(dropped),
        ),
        connected_row(
            "Source",
            |s, pr, _, d| d == Source && pr == Secondary && s.disk == UpToDate,
            connected_to(SyncSource, None, Some(Action::StartResyncSource)),
        ),
        connected_row(
            "Target, I am Primary",
            |s, _, _, d| d == Target && s.role == Primary,
            Box::new(dropped),
        ),
        connected_row(
            "Target, peer disk not UpToDate",
            |s, _, pd, d| d == Target && s.role == Secondary && pd != UpToDate,
            Box::new(dropped),
        ),
        connected_row(
            "Target",
            |s, _, pd, d| d == Target && s.role == Secondary && pd == UpToDate,
            connected_to(SyncTarget, Some(Inconsistent), Some(Action::StartResyncTarget)),
        ),
        connected_row("split brain", |_, _, _, d| d == SplitBrain, Box::new(dropped_split)),
        connected_row("unrelated", |_, _, _, d| d == Unrelated, Box::new(dropped)),
    ];
    check(&connected_events(), &rows);
}

#[test]
fn disconnected_every_state() {
    let ended = |s: &State, conn: ConnState| {
        let next = State { conn, peer_role: None, promoting: false, ..*s };
        let refusal =
            if s.promoting { vec![Action::Refuse(Refusal::PeerUnreachable)] } else { vec![] };
        (next, refusal)
    };
    check(
        &[Event::Disconnected],
        &[
            row("StandAlone", |s, _| s.conn == StandAlone, move |s, _| ended(s, StandAlone)),
            row("any other", |s, _| s.conn != StandAlone, move |s, _| ended(s, Connecting)),
        ],
    );
}

#[test]
fn resync_done_every_state() {
    check(
        &[Event::ResyncDone],
        &[
            row(
                "SyncSource",
                |s, _| s.conn == SyncSource,
                |s, _| (State { conn: Connected, ..*s }, vec![]),
            ),
            row(
                "SyncTarget, disk Failed",
                |s, _| s.conn == SyncTarget && s.disk == Failed,
                |s, _| (State { conn: Connected, ..*s }, vec![]),
            ),
            row(
                "SyncTarget",
                |s, _| s.conn == SyncTarget && s.disk != Failed,
                |s, _| {
                    let next = State { conn: Connected, disk: UpToDate, ..*s };
                    (next, vec![Action::ResyncFinished])
                },
            ),
            row(
                "not resyncing",
                |s, _| matches!(s.conn, StandAlone | Connecting | Connected),
                same,
            ),
        ],
    );
}

#[test]
fn disk_failed_every_state() {
    check(
        &[Event::DiskFailed],
        &[row("any", |_, _| true, |s, _| (State { disk: Failed, ..*s }, vec![]))],
    );
}

#[test]
fn disk_replaced_every_state() {
    check(
        &[Event::DiskReplaced],
        &[
            row(
                "Secondary, Failed",
                |s, _| s.role == Secondary && s.disk == Failed,
                |s, _| (State { disk: Inconsistent, ..*s }, vec![]),
            ),
            row("otherwise", |s, _| s.role == Primary || s.disk != Failed, same),
        ],
    );
}

fn both_primary_connected(s: &State) -> bool {
    s.role == Primary
        && s.peer_role == Some(Primary)
        && matches!(s.conn, Connected | SyncSource | SyncTarget)
}

/// Properties of every (state, event) pair, whatever the table says.
#[test]
fn invariants_hold_for_every_state_and_event() {
    for s in all_states() {
        for e in all_events() {
            let (n, actions) = step(&s, &e);
            let ctx = format!("{s:?} {e:?} -> {n:?} {actions:?}");
            if s.role == Secondary && n.role == Primary {
                assert!(s.disk == UpToDate && n.disk == UpToDate, "promoted: {ctx}");
                assert_eq!(actions, vec![Action::BecomePrimary], "{ctx}");
            }
            if s.role == Primary && n.role == Secondary {
                assert_eq!(actions, vec![Action::BecomeSecondary], "{ctx}");
            }
            assert!(!both_primary_connected(&n) || both_primary_connected(&s), "{ctx}");
            let sane = |x: &State| !x.promoting || x.role == Secondary;
            assert!(!sane(&s) || sane(&n), "{ctx}");
            for a in &actions {
                match a {
                    Action::Refuse(_) => assert!(
                        matches!(e, Event::Promote { .. }) || s.promoting,
                        "refusal of nothing: {ctx}"
                    ),
                    Action::Drop { reason, .. } => {
                        assert!(n.conn == StandAlone && !reason.is_empty(), "{ctx}")
                    }
                    Action::StartResyncTarget => assert!(
                        n.conn == SyncTarget && n.disk == Inconsistent && n.role == Secondary,
                        "{ctx}"
                    ),
                    Action::StartResyncSource => assert!(n.conn == SyncSource, "{ctx}"),
                    _ => {}
                }
            }
            // The one other way: a replaced disk waits for its full resync as Inconsistent.
            if n.disk == Inconsistent && s.disk != Inconsistent && e != Event::DiskReplaced {
                assert!(actions.contains(&Action::StartResyncTarget), "{ctx}");
            }
        }
    }
}

fn connected_secondary() -> State {
    State { peer_role: Some(Secondary), ..State::new(Secondary, UpToDate, Connected) }
}

#[test]
fn drop_reasons_say_why() {
    let s = connected_secondary();
    let reason = |peer_role, decision| {
        let e = Event::Connected { peer_role, peer_disk: UpToDate, decision };
        match step(&s, &e).1.last() {
            Some(Action::Drop { reason, .. }) => reason.clone(),
            other => panic!("no drop: {other:?}"),
        }
    };
    assert!(reason(Secondary, SyncDecision::SplitBrain).starts_with("split brain"));
    assert!(reason(Secondary, SyncDecision::Unrelated).starts_with("unrelated data"));
    let p = State { role: Primary, ..s };
    let e = Event::Connected {
        peer_role: Primary,
        peer_disk: UpToDate,
        decision: SyncDecision::InSync,
    };
    let plain = Action::Drop { reason: "both nodes are Primary".into(), split_brain: false };
    assert_eq!(step(&p, &e).1, vec![plain]);
}

#[test]
fn display_is_role_disk_conn() {
    assert_eq!(State::new(Primary, UpToDate, Connected).to_string(), "Primary/UpToDate/Connected");
    let s = State { promoting: true, ..State::new(Secondary, UpToDate, SyncSource) };
    assert_eq!(s.to_string(), "Secondary/UpToDate/SyncSource (promoting)");
    assert_eq!(
        Refusal::NotUpToDate(Inconsistent).to_string(),
        "the local disk is Inconsistent, not UpToDate"
    );
}

/// Messages between two simulated nodes, each direction in order (one TCP session).
#[derive(Debug, Clone, Copy)]
enum Msg {
    Ask,
    Answer(bool),
    Role(Role),
}

struct Pair {
    nodes: [State; 2],
    /// `wire[i]`: in flight from node i to node 1 - i.
    wire: [std::collections::VecDeque<Msg>; 2],
}

impl Pair {
    fn apply(&mut self, i: usize, e: Event) {
        let (next, actions) = step(&self.nodes[i], &e);
        self.nodes[i] = next;
        for a in actions {
            let msg = match a {
                Action::AskPeerPromote => Msg::Ask,
                Action::AnswerPeer { granted } => Msg::Answer(granted),
                Action::BecomePrimary => Msg::Role(Primary),
                Action::BecomeSecondary => Msg::Role(Secondary),
                _ => continue,
            };
            self.wire[i].push_back(msg);
        }
    }

    fn deliver(&mut self, from: usize) {
        let Some(msg) = self.wire[from].pop_front() else { return };
        let e = match msg {
            Msg::Ask => Event::PeerAsksPromote,
            Msg::Answer(granted) => Event::PeerAnswered { granted },
            Msg::Role(r) => Event::PeerRoleChanged(r),
        };
        self.apply(1 - from, e);
    }
}

proptest::proptest! {
    /// design.md §7 "only one primary at a time": two connected nodes, any interleaving of
    /// operator requests (with or without force) and message deliveries, never both Primary.
    #[test]
    fn two_connected_nodes_never_both_primary(ops in proptest::collection::vec(0u8..8, 1..80)) {
        let mut p = Pair { nodes: [connected_secondary(); 2], wire: Default::default() };
        for op in ops {
            let i = usize::from(op & 1);
            match op >> 1 {
                0 => p.apply(i, Event::Promote { force: false }),
                1 => p.apply(i, Event::Promote { force: true }),
                2 => p.apply(i, Event::Demote),
                _ => p.deliver(i),
            }
            proptest::prop_assert!(
                !(p.nodes[0].role == Primary && p.nodes[1].role == Primary),
                "both Primary: {:?}", p.nodes
            );
        }
    }
}

/// The promotion handshake end to end, and the second promotion refused (issue 3).
#[test]
fn promoting_the_second_node_is_refused() {
    let mut p = Pair { nodes: [connected_secondary(); 2], wire: Default::default() };
    p.apply(0, Event::Promote { force: false });
    p.deliver(0); // Ask reaches node 1, which grants
    p.deliver(1); // the grant reaches node 0
    assert_eq!(p.nodes[0].role, Primary);
    p.deliver(0); // RoleChanged(Primary)
    assert_eq!(p.nodes[1].peer_role, Some(Primary));
    let (_, actions) = step(&p.nodes[1], &Event::Promote { force: true });
    assert_eq!(actions, vec![Action::Refuse(Refusal::PeerIsPrimary)]);
}

/// Both ask at once: both refuse each other, neither is Primary.
#[test]
fn simultaneous_promotions_both_fail() {
    let mut p = Pair { nodes: [connected_secondary(); 2], wire: Default::default() };
    p.apply(0, Event::Promote { force: false });
    p.apply(1, Event::Promote { force: false });
    for _ in 0..2 {
        p.deliver(0);
        p.deliver(1);
    }
    assert!(p.nodes.iter().all(|n| n.role == Secondary && !n.promoting), "{:?}", p.nodes);
}
