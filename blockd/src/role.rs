//! The role machine of one volume (design.md §7): a pure function [`step`] from a [`State`] and an
//! [`Event`] to the next state and the [`Action`]s the node must perform. No I/O, no tokio, no
//! clock: the node feeds events in, performs the actions (persisting, telling the peer,
//! starting a resync), and logs one line per change using `State`'s `Display`.
//!
//! Safety rules it enforces: only an `UpToDate` node becomes Primary (not even `force` skips
//! that); a connected node becomes Primary only after its peer, being Secondary and not
//! promoting itself, granted it; two connected Primaries, split brain and unrelated data end
//! the session (`Drop`) before any data moves.
//!
//! Every transition, by event (first matching line of each event; "no-op" = unchanged state,
//! no actions). "Up" = `Connected | SyncSource`, "Down" = `StandAlone | Connecting`:
//!
//! | event              | state                            | next state; actions                  |
//! |--------------------|----------------------------------|--------------------------------------|
//! | Promote{force}     | Primary                          | no-op                                |
//! |                    | disk not UpToDate                | Refuse(NotUpToDate(disk))            |
//! |                    | promoting                        | Refuse(PromotionPending)             |
//! |                    | Up, peer Primary                 | Refuse(PeerIsPrimary)                |
//! |                    | Up, peer Secondary or unknown    | promoting; AskPeerPromote            |
//! |                    | SyncTarget                       | Refuse(NotUpToDate(Inconsistent))    |
//! |                    | Down, force                      | Primary; BecomePrimary               |
//! |                    | Down, no force                   | Refuse(PeerUnreachable)              |
//! | Demote             | Secondary                        | no-op                                |
//! |                    | Primary                          | Secondary; BecomeSecondary           |
//! | PeerAnswered{g}    | not promoting                    | no-op (a stale answer)               |
//! |                    | promoting, refused               | not promoting; Refuse(PeerRefused)   |
//! |                    | promoting, granted, not UpToDate | not promoting; Refuse(NotUpToDate)   |
//! |                    | promoting, granted, peer Primary | not promoting; Refuse(PeerIsPrimary) |
//! |                    | promoting, granted, otherwise    | Primary; BecomePrimary               |
//! | PeerAsksPromote    | Primary, or promoting            | AnswerPeer{false}                    |
//! |                    | Secondary, not promoting         | peer Primary; AnswerPeer{true}       |
//! | PeerRoleChanged(r) | Primary, r = Primary             | StandAlone, peer Primary; Drop       |
//! |                    | otherwise                        | peer r                               |
//! | Connected{..}      | see `connected`'s table          | peer set, (*)                        |
//! | Disconnected       | StandAlone                       | peer unknown, (*)                    |
//! |                    | any other conn                   | Connecting, peer unknown, (*)        |
//! | ResyncDone         | SyncSource                       | Connected                            |
//! |                    | SyncTarget, disk Failed          | Connected                            |
//! |                    | SyncTarget, other disk           | Connected, UpToDate; ResyncFinished  |
//! |                    | not SyncSource/SyncTarget        | no-op                                |
//! | DiskFailed         | any                              | disk Failed                          |
//! | DiskReplaced       | Secondary, disk Failed           | disk Inconsistent                    |
//! |                    | otherwise                        | no-op                                |
//!
//! (*) "ends a promotion": if promoting, not any more, and Refuse(PeerUnreachable), so the
//! operator's pending request fails instead of hanging. Disconnected keeps `StandAlone` (a
//! session this node refused stays refused in status; the next `Connected` decides anew) and
//! keeps the disk state: an interrupted resync target stays `Inconsistent`.
//!
//! Known limit: the peer records us as Primary when it grants; if our promotion then fails
//! (disk failed meanwhile), the peer believes so until the session ends.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::resync::SyncDecision;

/// A node's role for a volume. These three types are the core's names for the states of
/// design.md §7; the control API (`blockctl status`) and the link's STATE frame carry them as
/// they are, so their names are part of both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Primary,
    Secondary,
}

/// The local disk's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskState {
    UpToDate,
    Outdated,
    Inconsistent,
    /// A local I/O error happened (`disk_failure` says which): nothing is read from or
    /// written to the disk any more; a Primary serves through its peer. Kept on disk until the
    /// operator's `blockctl resolve` after repairing or replacing it.
    Failed,
}

/// The connection to the peer, for one volume (design.md §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnState {
    /// Not connected and not trying: single node, or refused (split brain, unrelated data,
    /// both Primary, mismatched volume). `conn_reason` says why.
    StandAlone,
    /// Waiting for the replication link to come up.
    Connecting,
    /// Connected and in sync: writes are mirrored.
    Connected,
    /// Connected; this node sends a resync to the peer (writes are mirrored too).
    SyncSource,
    /// Connected; this node receives a resync and is `Inconsistent` until it completes.
    SyncTarget,
}

/// What the machine knows about one volume on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    pub role: Role,
    pub disk: DiskState,
    pub conn: ConnState,
    /// The peer's role, while a session is up and the peer has said it.
    pub peer_role: Option<Role>,
    /// We asked the peer's permission to become Primary and wait for its answer.
    pub promoting: bool,
}

/// Something that happened: an operator request, a peer message, a link or disk change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The operator asks for Primary; `force` allows it without a reachable peer.
    Promote { force: bool },
    /// The operator asks for Secondary (the node checked "no NBD clients" before).
    Demote,
    /// The answer to our `AskPeerPromote`.
    PeerAnswered { granted: bool },
    /// The peer wants to become Primary.
    PeerAsksPromote,
    /// The peer tells us its new role.
    PeerRoleChanged(Role),
    /// A session is up and both nodes exchanged their states; `decision` is
    /// [`resync::decide`](crate::resync::decide) of my and the peer's generations.
    Connected { peer_role: Role, peer_disk: DiskState, decision: SyncDecision },
    /// The session ended.
    Disconnected,
    /// The resync this node takes part in completed.
    ResyncDone,
    /// A local I/O error.
    DiskFailed,
    /// The operator replaced or repaired a Failed disk: its contents are unknown.
    DiskReplaced,
}

/// What the node must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send AskPromote to the peer; its answer comes back as `PeerAnswered`.
    AskPeerPromote,
    /// Answer the peer's AskPromote.
    AnswerPeer { granted: bool },
    /// Persist primary_when_stopped, rotate the generation if not connected, tell the peer.
    BecomePrimary,
    /// Flush both nodes, persist, tell the peer.
    BecomeSecondary,
    /// Start sending a resync to the peer.
    StartResyncSource,
    /// Prepare to receive a resync: persist `consistent = false` BEFORE the first resync write.
    StartResyncTarget,
    /// The resync into this node completed: persist the adopted generations and `consistent`.
    ResyncFinished,
    /// The operator's request fails with this.
    Refuse(Refusal),
    /// Go StandAlone: close the session and log (and show in status) the reason;
    /// `split_brain` when both nodes wrote since they were last in sync, which the operator
    /// must resolve (status: `split_brain`; operations that need the peer are refused as
    /// `SplitBrain`, `node.rs`).
    Drop { reason: String, split_brain: bool },
}

/// Why an operator's role change was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the local disk is {0:?}, not UpToDate")]
    NotUpToDate(DiskState),
    #[error("the peer is unreachable (--force promotes without it)")]
    PeerUnreachable,
    #[error("the peer is Primary")]
    PeerIsPrimary,
    #[error("a promotion is already pending")]
    PromotionPending,
    #[error("the peer refused the promotion")]
    PeerRefused,
}

impl State {
    /// A state with no session information: peer role unknown, no promotion pending.
    pub fn new(role: Role, disk: DiskState, conn: ConnState) -> State {
        State { role, disk, conn, peer_role: None, promoting: false }
    }
}

/// "Primary/UpToDate/Connected", for the node's one log line per change.
impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}/{:?}/{:?}", self.role, self.disk, self.conn)?;
        if self.promoting {
            f.write_str(" (promoting)")?;
        }
        Ok(())
    }
}

/// The transition function: the next state and the actions for `e` in state `s`.
pub fn step(s: &State, e: &Event) -> (State, Vec<Action>) {
    match *e {
        Event::Promote { force } => promote(s, force),
        Event::Demote => demote(s),
        Event::PeerAnswered { granted } => peer_answered(s, granted),
        Event::PeerAsksPromote => peer_asks_promote(s),
        Event::PeerRoleChanged(r) => peer_role_changed(s, r),
        Event::Connected { peer_role, peer_disk, decision } => {
            connected(s, peer_role, peer_disk, decision)
        }
        Event::Disconnected => disconnected(s),
        Event::ResyncDone => resync_done(s),
        Event::DiskFailed => (State { disk: DiskState::Failed, ..*s }, vec![]),
        Event::DiskReplaced => match (s.role, s.disk) {
            (Role::Secondary, DiskState::Failed) => {
                (State { disk: DiskState::Inconsistent, ..*s }, vec![])
            }
            (Role::Primary, _)
            | (
                Role::Secondary,
                DiskState::UpToDate | DiskState::Outdated | DiskState::Inconsistent,
            ) => unchanged(s),
        },
    }
}

/// The connection as a promotion sees it.
enum Link {
    /// `StandAlone | Connecting`: no peer to ask.
    Down,
    /// `Connected | SyncSource`: the peer must grant.
    Up,
    /// `SyncTarget`: this node's data is incomplete.
    Receiving,
}

fn link(c: ConnState) -> Link {
    match c {
        ConnState::StandAlone | ConnState::Connecting => Link::Down,
        ConnState::Connected | ConnState::SyncSource => Link::Up,
        ConnState::SyncTarget => Link::Receiving,
    }
}

fn unchanged(s: &State) -> (State, Vec<Action>) {
    (*s, vec![])
}

fn refuse(s: &State, r: Refusal) -> (State, Vec<Action>) {
    (*s, vec![Action::Refuse(r)])
}

fn promote(s: &State, force: bool) -> (State, Vec<Action>) {
    match s.role {
        Role::Primary => unchanged(s),
        Role::Secondary => match s.disk {
            DiskState::UpToDate => promote_up_to_date(s, force),
            d @ (DiskState::Outdated | DiskState::Inconsistent | DiskState::Failed) => {
                refuse(s, Refusal::NotUpToDate(d))
            }
        },
    }
}

/// A Secondary with an UpToDate disk asks for Primary.
fn promote_up_to_date(s: &State, force: bool) -> (State, Vec<Action>) {
    match s.promoting {
        true => refuse(s, Refusal::PromotionPending),
        false => promote_ask_or_force(s, force),
    }
}

/// No promotion pending: ask the peer, or go ahead without one when forced.
fn promote_ask_or_force(s: &State, force: bool) -> (State, Vec<Action>) {
    match (link(s.conn), force) {
        (Link::Up, true | false) => match s.peer_role {
            Some(Role::Primary) => refuse(s, Refusal::PeerIsPrimary),
            Some(Role::Secondary) | None => {
                (State { promoting: true, ..*s }, vec![Action::AskPeerPromote])
            }
        },
        (Link::Receiving, true | false) => refuse(s, Refusal::NotUpToDate(DiskState::Inconsistent)),
        (Link::Down, true) => (State { role: Role::Primary, ..*s }, vec![Action::BecomePrimary]),
        (Link::Down, false) => refuse(s, Refusal::PeerUnreachable),
    }
}

fn demote(s: &State) -> (State, Vec<Action>) {
    match s.role {
        Role::Secondary => unchanged(s),
        Role::Primary => (State { role: Role::Secondary, ..*s }, vec![Action::BecomeSecondary]),
    }
}

fn peer_answered(s: &State, granted: bool) -> (State, Vec<Action>) {
    let done = State { promoting: false, ..*s };
    match (s.promoting, granted) {
        (false, true | false) => unchanged(s),
        (true, false) => (done, vec![Action::Refuse(Refusal::PeerRefused)]),
        (true, true) => match (s.disk, s.peer_role) {
            (
                d @ (DiskState::Outdated | DiskState::Inconsistent | DiskState::Failed),
                Some(Role::Primary | Role::Secondary) | None,
            ) => (done, vec![Action::Refuse(Refusal::NotUpToDate(d))]),
            // The peer said it became Primary after all: its grant cannot stand.
            (DiskState::UpToDate, Some(Role::Primary)) => {
                (done, vec![Action::Refuse(Refusal::PeerIsPrimary)])
            }
            (DiskState::UpToDate, Some(Role::Secondary) | None) => {
                (State { role: Role::Primary, ..done }, vec![Action::BecomePrimary])
            }
        },
    }
}

fn peer_asks_promote(s: &State) -> (State, Vec<Action>) {
    match (s.role, s.promoting) {
        (Role::Primary, true | false) | (Role::Secondary, true) => {
            (*s, vec![Action::AnswerPeer { granted: false }])
        }
        (Role::Secondary, false) => (
            State { peer_role: Some(Role::Primary), ..*s },
            vec![Action::AnswerPeer { granted: true }],
        ),
    }
}

fn peer_role_changed(s: &State, r: Role) -> (State, Vec<Action>) {
    let next = State { peer_role: Some(r), ..*s };
    match (s.role, r) {
        (Role::Primary, Role::Primary) => drop_session(next, "both nodes are Primary"),
        (Role::Primary, Role::Secondary) | (Role::Secondary, Role::Primary | Role::Secondary) => {
            (next, vec![])
        }
    }
}

/// How the reason of a split brain's `Drop` begins (status shows it as `conn_reason`).
pub const SPLIT_BRAIN: &str = "split brain: both nodes wrote since they were last in sync";

/// Ends the session: StandAlone, and the reason for the node to log and show.
fn drop_session(s: State, reason: &str) -> (State, Vec<Action>) {
    let drop = Action::Drop { reason: reason.to_owned(), split_brain: false };
    (State { conn: ConnState::StandAlone, ..s }, vec![drop])
}

/// Ends the session for a split brain: StandAlone until the operator resolves it.
fn split_brain(s: State, reason: &str) -> (State, Vec<Action>) {
    let drop = Action::Drop { reason: reason.to_owned(), split_brain: true };
    (State { conn: ConnState::StandAlone, ..s }, vec![drop])
}

/// A session came up and the states were exchanged. The peer's role is recorded and a pending
/// promotion ends (its answer belonged to the previous session). Then, first match wins:
///
/// | condition                                      | result                                      |
/// |------------------------------------------------|---------------------------------------------|
/// | both Primary, `SplitBrain`                     | Drop "split brain: ..."                     |
/// | both Primary                                   | Drop "both nodes are Primary"               |
/// | a Secondary's disk is Failed (mine or peer's)  | Drop: it can take no writes nor a resync    |
/// | `InSync`, I am Inconsistent, the peer UpToDate | as `Target` below                           |
/// | `InSync`, I am UpToDate, the peer Inconsistent | as `Source` below                           |
/// | `InSync` otherwise                             | Connected                                   |
/// | `Source`, the peer is Primary                  | Drop (a Primary never receives)             |
/// | `Source`, my disk not UpToDate                 | Drop (nothing sound to send)                |
/// | `Source`                                       | SyncSource; StartResyncSource               |
/// | `Target`, I am Primary                         | Drop (a Primary never receives)             |
/// | `Target`, the peer's disk not UpToDate         | Drop (nothing sound to receive)             |
/// | `Target`                                       | SyncTarget, Inconsistent; StartResyncTarget |
/// | `SplitBrain`                                   | Drop "split brain: ..."                     |
/// | `Unrelated`                                    | Drop "unrelated data: ..."                  |
///
/// The `InSync` rows cover an interrupted resync whose generations already match (one node
/// still flagged Inconsistent); every row mirrors its counterpart on the peer, so both sides
/// reach the same conclusion.
fn connected(
    s: &State,
    peer_role: Role,
    peer_disk: DiskState,
    decision: SyncDecision,
) -> (State, Vec<Action>) {
    let (next, mut actions) = end_promotion(State { peer_role: Some(peer_role), ..*s });
    let (next, more) = match (s.role, peer_role) {
        // The split brain is what the operator must fix (it outlives a demotion): say it.
        (Role::Primary, Role::Primary) if decision == SyncDecision::SplitBrain => {
            split_brain(next, &format!("{SPLIT_BRAIN} (both are Primary)"))
        }
        (Role::Primary, Role::Primary) => drop_session(next, "both nodes are Primary"),
        // A Failed disk is never written again, not even by a resync, until the operator
        // replaced it (DRBD's detach); a Failed Primary goes on serving through its peer.
        (Role::Secondary, _) if s.disk == DiskState::Failed => drop_session(
            next,
            "this node's disk is Failed: repair or replace it, then blockctl resolve --full-sync",
        ),
        (_, Role::Secondary) if peer_disk == DiskState::Failed => {
            drop_session(next, "the peer's disk is Failed")
        }
        (Role::Primary, Role::Secondary) | (Role::Secondary, Role::Primary | Role::Secondary) => {
            match decision {
                SyncDecision::InSync => match settle(s.disk, peer_disk) {
                    Settle::Nothing => (State { conn: ConnState::Connected, ..next }, vec![]),
                    Settle::Send => become_source(next, peer_role),
                    Settle::Receive => become_target(next, peer_disk),
                },
                SyncDecision::Source => become_source(next, peer_role),
                SyncDecision::Target => become_target(next, peer_disk),
                SyncDecision::SplitBrain => split_brain(next, SPLIT_BRAIN),
                SyncDecision::Unrelated => drop_session(
                    next,
                    "unrelated data: the nodes share no generation (needs an explicit full sync)",
                ),
            }
        }
    };
    actions.extend(more);
    (next, actions)
}

/// With equal generations, which side (if any) still has to be completed.
enum Settle {
    Nothing,
    Send,
    Receive,
}

fn settle(mine: DiskState, peer: DiskState) -> Settle {
    use DiskState::{Failed, Inconsistent, Outdated, UpToDate};
    match (mine, peer) {
        (Inconsistent, UpToDate) => Settle::Receive,
        (UpToDate, Inconsistent) => Settle::Send,
        (
            UpToDate | Outdated | Inconsistent | Failed,
            UpToDate | Outdated | Inconsistent | Failed,
        ) => Settle::Nothing,
    }
}

fn become_source(next: State, peer_role: Role) -> (State, Vec<Action>) {
    match peer_role {
        Role::Primary => drop_session(next, "the peer is Primary but this node has the newer data"),
        Role::Secondary => match next.disk {
            DiskState::UpToDate => {
                (State { conn: ConnState::SyncSource, ..next }, vec![Action::StartResyncSource])
            }
            d @ (DiskState::Outdated | DiskState::Inconsistent | DiskState::Failed) => {
                drop_session(next, &format!("this node has the newer data but its disk is {d:?}"))
            }
        },
    }
}

fn become_target(next: State, peer_disk: DiskState) -> (State, Vec<Action>) {
    match next.role {
        Role::Primary => drop_session(next, "this node is Primary but the peer has the newer data"),
        Role::Secondary => match peer_disk {
            DiskState::UpToDate => (
                State { conn: ConnState::SyncTarget, disk: DiskState::Inconsistent, ..next },
                vec![Action::StartResyncTarget],
            ),
            d @ (DiskState::Outdated | DiskState::Inconsistent | DiskState::Failed) => {
                drop_session(next, &format!("the peer has the newer data but its disk is {d:?}"))
            }
        },
    }
}

/// A pending promotion cannot be answered any more: it fails as "peer unreachable".
fn end_promotion(s: State) -> (State, Vec<Action>) {
    match s.promoting {
        true => (State { promoting: false, ..s }, vec![Action::Refuse(Refusal::PeerUnreachable)]),
        false => (s, vec![]),
    }
}

fn disconnected(s: &State) -> (State, Vec<Action>) {
    let conn = match s.conn {
        ConnState::StandAlone => ConnState::StandAlone,
        ConnState::Connecting
        | ConnState::Connected
        | ConnState::SyncSource
        | ConnState::SyncTarget => ConnState::Connecting,
    };
    end_promotion(State { conn, peer_role: None, ..*s })
}

fn resync_done(s: &State) -> (State, Vec<Action>) {
    let connected = State { conn: ConnState::Connected, ..*s };
    match s.conn {
        ConnState::SyncSource => (connected, vec![]),
        ConnState::SyncTarget => match s.disk {
            // The resync's writes failed here: nothing to mark UpToDate.
            DiskState::Failed => (connected, vec![]),
            DiskState::UpToDate | DiskState::Outdated | DiskState::Inconsistent => {
                (State { disk: DiskState::UpToDate, ..connected }, vec![Action::ResyncFinished])
            }
        },
        ConnState::StandAlone | ConnState::Connecting | ConnState::Connected => unchanged(s),
    }
}

#[cfg(test)]
mod tests;
