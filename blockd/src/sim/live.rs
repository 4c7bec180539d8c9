//! Invariant 6, liveness: at the end of a witness schedule nobody is left without a Primary
//! that the agents could have made on their own. The witness is healed (running, reachable
//! from both nodes), nothing else changes (a node that is off stays off, a partition stays),
//! no new fault comes and no operator acts; time runs for up to [`QUIET`]. Then a Primary
//! that acknowledges writes (connected, or holding the lease) must exist, unless every running
//! node has one of the reasons below to refuse. The reasons are the contract's (design.md §7,
//! the agent's table in `agent/mod.rs`), read from the nodes' states, the witness's lease
//! record and what each agent has seen, never from what the agent decided:
//!
//! | reason                                                        | why promoting is wrong   |
//! |---------------------------------------------------------------|--------------------------|
//! | its disk is not UpToDate (Inconsistent, Outdated, Failed)     | it may lack written data |
//! | the peer's last grant from the witness was asked as degraded, or it got one since this node's agent last saw it connected | the peer may have acknowledged writes this node lacks (row 8) |
//! | its agent started with the peer already gone and has not seen it since | nothing known of the peer's last moments (row 6) |
//! | it demoted itself giving up its changes and has not rejoined  | the peer holds what it gave up |
//! | it is connected to its peer, both Secondary                   | the agent promotes only a node that lost its peer (or, row 14, one whose stack it tore down) |
//!
//! Row 2 is stricter than safety needs (`SIM_SEED=528`): a Primary cut off from the witness
//! while degraded, then reconnected and resynced, keeps "degraded" as its last grant until it
//! renews; if it dies first, its peer, in sync a moment ago, waits for an operator.
//! The last row is the one exception that is a policy, not a safety rule: a swap whose second
//! half never ran leaves both Secondary for the operator.

use std::time::Duration;

use tokio::time::Instant;

use super::run::{lock, World};
use crate::control::{ConnState, DiskState};

/// Long enough for a dead holder's lease to run out ([`super::witness::TERM`]), a restarted
/// witness's quiet term, and an agent's back-off after a failed action (10 s).
const QUIET: Duration = Duration::from_secs(20);

impl World {
    pub(super) async fn liveness(&mut self) -> Result<(), String> {
        let Some(w) = self.witness.clone() else { return Ok(()) };
        w.cut(0, false);
        w.cut(1, false);
        if !w.running() {
            w.start()?;
        }
        self.note("liveness: witness running and reachable; no new faults, no operator".into());
        let start = Instant::now();
        while start.elapsed() < QUIET {
            self.settle(Duration::from_millis(250)).await;
            if let Some(p) = self.serving_primary() {
                let s = self.state();
                self.note(format!("liveness: {} is Primary {s}", self.nodes[p].name));
                return Ok(());
            }
        }
        let excuses: Vec<(usize, Option<String>)> =
            (0..2).filter(|&i| self.nodes[i].up.is_some()).map(|i| (i, self.excuse(i))).collect();
        let s = self.state();
        if let Some((i, _)) = excuses.iter().find(|(_, e)| e.is_none()) {
            return Err(format!(
                "liveness: nobody acknowledges writes after {QUIET:?} without faults, but {} \
                 has no reason to refuse {s}",
                self.nodes[*i].name
            ));
        }
        let why: Vec<String> = excuses
            .into_iter()
            .map(|(i, e)| format!("{}: {}", self.nodes[i].name, e.unwrap_or_default()))
            .collect();
        self.note(format!("liveness: nobody Primary, as required ({}) {s}", why.join("; ")));
        Ok(())
    }

    /// Why running node `i` must not become Primary on its own (the module doc's table).
    fn excuse(&self, i: usize) -> Option<String> {
        let up = self.nodes[i].up.as_ref()?;
        let m = up.volume.machine();
        if m.disk != DiskState::UpToDate {
            return Some(format!("its disk is {:?}", m.disk));
        }
        let peer = self.nodes[1 - i].name;
        let seen = *lock(&self.nodes[i].agent_facts);
        if self.witness.as_ref().is_some_and(|w| w.last_degraded(1 - i)) {
            return Some(format!("{peer}'s last grant from the witness was asked as degraded"));
        }
        let degraded = self.witness.as_ref().and_then(|w| w.degraded_at(1 - i));
        if degraded.is_some_and(|at| at >= seen.since) {
            return Some(format!("{peer} got a degraded grant since this node last saw it"));
        }
        if seen.alone_since_start {
            return Some("its agent started with the peer gone".into());
        }
        if seen.gave_up_changes {
            return Some("it gave up its changes and has not rejoined".into());
        }
        let connected =
            matches!(m.conn, ConnState::Connected | ConnState::SyncSource | ConnState::SyncTarget);
        connected.then(|| "connected to its peer, both Secondary".into())
    }
}
