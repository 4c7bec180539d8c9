//! The decision table of `blockctl agent`, automatic failover (design.md §7, §8): pure, time
//! as arguments. The agent (ctl's `commands/agent.rs`, systemd unit `blockctl-agent.service`,
//! on both nodes) polls the local daemon, asks the witness and acts; this module decides (and
//! the simulator, `sim/`, drives the same code):
//!
//! ```text
//!  every --interval ── status ──► Agent::observe ──► Wait | Ask | Demote
//!                                        ▲               │ Ask: LeaseClient ──► witness
//!                                        └── Agent::answer(grant / refusal) ──► Wait | Promote
//! ```
//!
//! | # | this node                        | peer / witness                         | decision |
//! |---|----------------------------------|----------------------------------------|----------|
//! | 1 | daemon unreachable               | -                                      | wait     |
//! | 2 | Primary, lease epoch lost        | peer not connected                     | demote, then resolve --discard-local |
//! | 2b| Secondary, demoted by row 2      | peer not connected again yet           | wait (rejoin and resync first) |
//! | 3 | Primary                          | -                                      | wait (blockd keeps the lease) |
//! | 4 | Secondary                        | peer connected                         | wait     |
//! | 5 | Secondary                        | no witness configured                  | wait (manual only) |
//! | 6 | Secondary, peer already gone when the agent started | -                   | wait (promote by hand) |
//! | 7 | Secondary, disk not UpToDate     | peer gone                              | wait     |
//! | 8 | Secondary, UpToDate              | peer gone; the witness says the peer's last grant was degraded (or cannot say) | wait (promote by hand) |
//! | 9 | Secondary, UpToDate              | peer gone; lease refused, peer's last grant not degraded | ask again |
//! | 10| Secondary, UpToDate              | peer gone; lease granted, previous holder not degraded | promote (--force) |
//! | 11| Primary, `failback = "auto"`     | the preferred peer Connected, Secondary, UpToDate, in sync for `failback-delay` | swap |
//! | 12| Primary, local disk Failed       | peer Connected, Secondary, UpToDate    | swap (the peer serves from its own disk) |
//! | 12b| Primary, a service or mount failing (`health.rs`) | -                   | restart it in place; after `max-restarts`, swap if the peer is ready |
//! | 13| Secondary, stack up here (VIP, mount, attach) | -                         | tear it down (demote plan) |
//! | 14| Secondary, tore down a stale stack, UpToDate | peer Connected, Secondary, UpToDate | promote here (resume) |
//!
//! Rows 13 and 14 are a blockd that died under a running stack and was restarted (systemd's
//! `Restart=`): it comes back Secondary while the VIP, the mounts and the services are still
//! up on a device that is gone. The agent tears that stack down (so the VIP is free for the
//! peer); if the peer took over meanwhile (it won the lease), that is all; if the restarted
//! daemon reconnected first, both nodes are Secondary and the peer waits (connected), so this
//! node, which was Primary, promotes again once in sync. Either way exactly one Primary, no
//! operator.
//!
//! Rows 8 to 10 make automatic promotion both safe and fast. A Primary acknowledges writes
//! without its peer only under a lease it asked for *as degraded* after losing the peer
//! (blockd `fence.rs`), and the witness tells the other node whether the holder's last grant
//! was degraded (`witness/lease.rs`). The agent asks from the moment replication reports the
//! peer gone and every poll after, so it sees every grant the peer gets while its lease still
//! runs: a peer that renewed as degraded may have written what this node lacks, and only an
//! operator may promote then. A peer that died, froze, or was cut off renewed nothing as
//! degraded; its lease runs out at most one term after its last renewal (while the peer
//! timeout runs, not after it), and the grant that follows says so: promote at once. Nothing
//! here depends on when this node's poll noticed the loss, so no kill order is misjudged.
//!
//! Row 2: a thawed or reconnected Primary whose epoch went to the peer fails its waiting
//! degraded writes (never acknowledged), so the demote plan can unmount; its local disk has
//! writes nobody acknowledged, hence `resolve --discard-local` to rejoin as a resync target.
//!
//! Every decision that changes is one line on stdout (the journal) with the facts it used,
//! and is written to `<run-dir>/agent.json` (ctl's `AgentState`), which `blockctl status` shows.
//! Row 11 (`[agent] failback = "auto"`, `preferred`, `failback-delay`): the swap runs on the
//! Primary, so the agent of the node that is *not* preferred hands the service back, once the
//! preferred one has stayed in sync for the delay; the swap loses nothing (design.md §8).
//! Not built: the witness-less `split-brain-check = "ping:ADDR"`; without a witness the agent
//! never promotes.

pub mod health;

use std::time::{Duration, Instant};

use crate::{
    config::AgentConfig,
    control::{ConnState, DiskState, NodeStatus, Role},
    witness::{Granted, WitnessError},
};
use health::{Action, Health, HEALTH_INTERVAL};

/// After a failed promote or demote, wait this long before trying again.
const BACKOFF: Duration = Duration::from_secs(10);

/// What to do after a poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing; the text says why (logged when it changes).
    Wait(String),
    /// Ask the witness for the lease (the answer goes to [`Agent::answer`]).
    Ask,
    /// Run the promote plan (with --force: the peer is unreachable).
    Promote(String),
    /// Run the demote plan, then give up the local data at the next handshake.
    Demote(String),
    /// `blockctl swap`: hand the service back to the preferred peer (failback).
    Failback(String),
    /// `blockctl swap`: this Primary cannot serve well (its disk failed, or a step keeps
    /// failing); the peer can. `.0` is the reason the tally counts it under.
    Swap(String, String),
    /// The demote plan on a Secondary: tear down a stack left up by a daemon that restarted.
    Recover(String),
    /// Restart plan step `.0` in place (health, row 12b); `.1` says why.
    Restart(String, String),
    /// The promote plan (not forced): this node was Primary, tore its stale stack down, and
    /// nobody is Primary.
    Resume(String),
}

/// The agent's memory between polls. Pure: time comes in as arguments.
#[derive(Debug)]
pub struct Agent {
    witness: bool,
    /// Set at the first poll: the peer was already gone (nothing known about its last moments).
    gone_at_start: Option<bool>,
    /// Row 2 ran: this node gave up its local changes and must resync from the peer before
    /// anything else (set until the peer is connected again).
    rejoining: bool,
    /// Since when this Secondary has seen its peer not connected.
    gone_since: Option<Instant>,
    /// The witness said the peer's last grant was degraded (or could not say): why no
    /// automatic promotion until the peer is connected again.
    peer_degraded: Option<String>,
    /// No promote or demote before this (after a failure).
    quiet_until: Option<Instant>,
    /// `failback = "auto"` with the peer preferred: swap once it was in sync this long.
    failback: Option<Duration>,
    /// Since when the preferred peer has been connected, Secondary, UpToDate and in sync.
    synced_since: Option<Instant>,
    /// The stack steps up here (set before each poll of a Secondary, see [`Agent::stack`]).
    stack_up: Vec<String>,
    /// A stale stack was torn down here: promote again if nobody else is Primary (row 14).
    resume: bool,
    /// When the lease the witness refused runs out: the next ask goes then, not a whole poll
    /// interval later (the grant is what the failover waits for).
    lease_ends: Option<Instant>,
    /// Health of the Primary's services and mounts (row 12b), when enabled.
    health: Option<Health>,
    /// The latest health probes, consumed by the next poll of a Primary.
    probes: Vec<(String, bool)>,
}

impl Agent {
    pub fn new(witness: bool) -> Agent {
        Agent {
            witness,
            gone_at_start: None,
            rejoining: false,
            gone_since: None,
            peer_degraded: None,
            quiet_until: None,
            failback: None,
            synced_since: None,
            stack_up: Vec::new(),
            resume: false,
            lease_ends: None,
            health: None,
            probes: Vec::new(),
        }
    }

    /// Checks the Primary's services and mounts (row 12b) as `[agent]` says.
    pub fn with_health(mut self, c: &AgentConfig) -> Agent {
        let h = Health::new(c);
        self.health = h.enabled().then_some(h);
        self
    }

    /// Whether health probes are due, the last ones taken at `last`: every poll until each
    /// step has been seen healthy once (see `health.rs`), then every [`HEALTH_INTERVAL`].
    pub fn probe_due(&self, last: Option<Instant>, now: Instant) -> bool {
        let Some(h) = &self.health else { return false };
        !h.settled() || last.map_or(true, |t| now - t >= HEALTH_INTERVAL)
    }

    /// Probes taken before this poll (`commands::health_probes`).
    pub fn probed(&mut self, probes: Vec<(String, bool)>) {
        self.probes = probes;
    }

    /// A restart of `step` (row 12b) was carried out.
    pub fn restarted(&mut self, step: &str, now: Instant) {
        if let Some(h) = &mut self.health {
            h.restarted(step, now);
        }
    }

    /// The parts of the stack up on this node now (`commands::stack_up`), for rows 13, 14.
    pub fn stack(&mut self, up: Vec<String>) {
        self.stack_up = up;
    }

    /// Row 2 succeeded: demoted, local changes given up; wait for the peer (see `rejoining`).
    pub fn demoted(&mut self) {
        self.rejoining = true;
    }

    /// Row 13 succeeded: the stale stack is down.
    pub fn recovered(&mut self) {
        self.stack_up.clear();
        self.resume = true;
    }

    /// Hands the service back to the peer (the preferred node) once it has been in sync for
    /// `delay` (`failback = "auto"`).
    pub fn with_failback(mut self, delay: Duration) -> Agent {
        self.failback = Some(delay);
        self
    }

    /// Rows 1 to 9 of the table (up to asking).
    pub fn observe(&mut self, status: Result<&NodeStatus, &str>, now: Instant) -> Decision {
        let s = match status {
            Ok(s) => s,
            Err(e) => return Decision::Wait(format!("daemon unreachable: {e}")),
        };
        let connected = !s.volumes.is_empty()
            && s.volumes.iter().all(|v| {
                matches!(
                    v.conn,
                    ConnState::Connected | ConnState::SyncSource | ConnState::SyncTarget
                )
            });
        self.gone_at_start.get_or_insert(!connected);
        if connected {
            self.gone_since = None;
            self.peer_degraded = None;
            self.gone_at_start = Some(false);
            self.rejoining = false;
        }
        let primary = s.volumes.iter().any(|v| v.role == Role::Primary);
        if let (false, Some(h)) = (primary, &mut self.health) {
            h.reset();
        }
        let quiet = self.quiet_until.is_some_and(|t| now < t);
        if s.volumes.iter().any(|v| v.role == Role::Primary) {
            self.gone_since = Some(now); // the clock starts again if this node steps down
            self.resume = false;
            let lost = s
                .volumes
                .iter()
                .find_map(|v| v.lease.as_ref().and_then(|l| l.lost.map(|e| (e, l.holder.clone()))));
            return match lost {
                Some((epoch, holder)) if !connected && !quiet => Decision::Demote(format!(
                    "Primary, lease epoch {epoch} lost to {}, peer not connected",
                    holder.as_deref().unwrap_or("the peer")
                )),
                _ => self.primary(s, now, quiet),
            };
        }
        if !self.stack_up.is_empty() {
            if quiet {
                return Decision::Wait(
                    "Secondary, stale stack up: backing off after a failure".into(),
                );
            }
            return Decision::Recover(format!(
                "Secondary, but {} still up here (the daemon restarted under a running stack)",
                self.stack_up.join(", ")
            ));
        }
        if connected {
            return self.resume(s, quiet);
        }
        if !self.witness {
            return Decision::Wait(
                "Secondary, peer gone, no witness configured: promotion is manual".into(),
            );
        }
        if self.rejoining {
            // The peer holds what this node just gave up; until the handshake that resyncs it
            // the witness would only say what the peer did meanwhile (degraded, surely).
            return Decision::Wait(
                "Secondary, demoted with its local changes given up: rejoining the peer first \
                 (if it never returns, only an operator may promote here)"
                    .into(),
            );
        }
        if self.gone_at_start == Some(true) {
            return Decision::Wait(
                "Secondary, peer already gone when the agent started: promote by hand".into(),
            );
        }
        if let Some(v) = s.volumes.iter().find(|v| v.disk != DiskState::UpToDate) {
            return Decision::Wait(format!(
                "Secondary, peer gone, disk of {} is {:?}",
                v.name, v.disk
            ));
        }
        let since = *self.gone_since.get_or_insert(now);
        if let Some(why) = &self.peer_degraded {
            return Decision::Wait(format!(
                "Secondary, peer gone {:.1} s, but {why}: it may have written without us; \
                 promote by hand",
                (now - since).as_secs_f64()
            ));
        }
        if quiet {
            return Decision::Wait("Secondary, peer gone: backing off after a failure".into());
        }
        Decision::Ask
    }

    /// Rows 8 to 10: the witness's answer to [`Decision::Ask`].
    pub fn answer(
        &mut self,
        result: Result<Granted, WitnessError>,
        peer: &str,
        now: Instant,
    ) -> Decision {
        let gone = (now - self.gone_since.unwrap_or(now)).as_secs_f64();
        match result {
            Ok(Granted { lease, prev_degraded: Some(false) }) => Decision::Promote(format!(
                "Secondary, UpToDate, peer gone {gone:.1} s, lease epoch {} won, the previous \
                 holder's last grant was not degraded",
                lease.epoch
            )),
            Ok(Granted { lease, prev_degraded }) => {
                let why = match prev_degraded {
                    Some(_) => "the previous holder's last grant was degraded",
                    None => "the witness does not say whether the previous holder was degraded",
                };
                self.peer_degraded = Some(format!("lease epoch {} won, {why}", lease.epoch));
                self.observe_again(now)
            }
            Err(WitnessError::Refused { holder, epoch, retry_after, degraded }) => {
                let held_by_peer = holder.as_deref() == Some(peer);
                if held_by_peer && degraded != Some(false) {
                    let how = if degraded.is_some() { "as degraded" } else { "(degraded unknown)" };
                    self.peer_degraded =
                        Some(format!("it renewed its lease (epoch {epoch}) {how} after losing us"));
                    return self.observe_again(now);
                }
                self.lease_ends = Some(now + retry_after);
                Decision::Wait(format!(
                    "Secondary, peer gone {gone:.1} s, lease epoch {epoch} held by {} for {:.1} s \
                     more, not degraded: promoting when it runs out",
                    holder.as_deref().unwrap_or("nobody yet (witness restarting)"),
                    retry_after.as_secs_f64()
                ))
            }
            Err(e) => Decision::Wait(format!("Secondary, peer gone {gone:.1} s, no lease: {e}")),
        }
    }

    /// How long to sleep before the next poll: `interval`, or less when a refused lease runs
    /// out sooner (a few milliseconds after, so that the witness has let it go).
    pub fn next_poll(&mut self, interval: Duration, now: Instant) -> Duration {
        const AFTER: Duration = Duration::from_millis(5);
        match self.lease_ends.take() {
            Some(end) => (end.saturating_duration_since(now) + AFTER).min(interval),
            None => interval,
        }
    }

    /// The wait that row 8 says, with the reason just recorded.
    fn observe_again(&self, now: Instant) -> Decision {
        let since = self.gone_since.unwrap_or(now);
        Decision::Wait(format!(
            "Secondary, peer gone {:.1} s, but {}: it may have written without us; promote by hand",
            (now - since).as_secs_f64(),
            self.peer_degraded.as_deref().unwrap_or("")
        ))
    }

    /// Row 12b: what the latest probes call for.
    fn health_action(&mut self, now: Instant, peer_ready: bool, quiet: bool) -> Option<Decision> {
        let probes = std::mem::take(&mut self.probes);
        let action = self.health.as_mut()?.observe(&probes, now)?;
        if quiet {
            return None;
        }
        Some(match action {
            Action::Move(step, why) if peer_ready => Decision::Swap(
                format!("health: {step}"),
                format!("Primary, {why}: moving the stack to the peer"),
            ),
            Action::Move(step, why) => Decision::Restart(
                step,
                format!("Primary, {why}; the peer is not ready to take over: restarting it"),
            ),
            Action::Restart(step, why) => {
                Decision::Restart(step, format!("Primary, {why}: restarting it in place"))
            }
        })
    }

    /// Row 14: after tearing down a stale stack, promote again while nobody is Primary.
    fn resume(&mut self, s: &NodeStatus, quiet: bool) -> Decision {
        if !self.resume {
            return Decision::Wait("Secondary, peer connected".into());
        }
        if s.volumes.iter().any(|v| v.peer_role == Some(Role::Primary)) {
            self.resume = false;
            return Decision::Wait("Secondary, peer connected and Primary: it took over".into());
        }
        let ready = s.volumes.iter().all(|v| {
            v.conn == ConnState::Connected
                && v.disk == DiskState::UpToDate
                && v.peer_disk == Some(DiskState::UpToDate)
        });
        if !ready || quiet {
            return Decision::Wait(
                "Secondary, stale stack torn down, nobody Primary: promoting here once in sync"
                    .into(),
            );
        }
        Decision::Resume(
            "Secondary, stale stack torn down, peer Connected and Secondary, both UpToDate: \
             nobody is Primary"
                .into(),
        )
    }

    /// Rows 3, 11 and 12 for a Primary that still holds its epoch.
    fn primary(&mut self, s: &NodeStatus, now: Instant, quiet: bool) -> Decision {
        let peer_ready = s.volumes.iter().all(|v| {
            v.conn == ConnState::Connected
                && v.peer_role == Some(Role::Secondary)
                && v.peer_disk == Some(DiskState::UpToDate)
        });
        let failed =
            s.volumes.iter().find(|v| v.role == Role::Primary && v.disk == DiskState::Failed);
        let Some(v) = failed else {
            return match self.health_action(now, peer_ready, quiet) {
                Some(d) => d,
                None => self.failback(s, now, quiet),
            };
        };
        if !peer_ready || quiet {
            return Decision::Wait(format!(
                "Primary, local disk of {} Failed, serving through the peer; {}",
                v.name,
                if quiet {
                    "backing off after a failed swap"
                } else {
                    "peer not ready to take over"
                }
            ));
        }
        Decision::Swap(
            "disk-failed".into(),
            format!(
                "Primary, local disk of {} Failed; peer Connected, Secondary, UpToDate: moving \
                 the stack to it",
                v.name
            ),
        )
    }

    /// Row 11: a Primary whose preferred peer is back and in sync for `failback-delay` swaps.
    fn failback(&mut self, s: &NodeStatus, now: Instant, quiet: bool) -> Decision {
        let Some(delay) = self.failback else {
            return Decision::Wait("Primary: blockd keeps the lease".into());
        };
        let in_sync = s.volumes.iter().all(|v| {
            v.conn == ConnState::Connected
                && v.peer_role == Some(Role::Secondary)
                && v.peer_disk == Some(DiskState::UpToDate)
                && v.out_of_sync == 0
        });
        if !in_sync {
            self.synced_since = None;
            return Decision::Wait("Primary: preferred peer not in sync; no failback yet".into());
        }
        let since = *self.synced_since.get_or_insert(now);
        let for_ = now - since;
        if for_ < delay || quiet {
            return Decision::Wait(format!(
                "Primary: preferred peer in sync for {:.1} s; failback at {:.1} s",
                for_.as_secs_f64(),
                delay.as_secs_f64()
            ));
        }
        self.synced_since = None;
        Decision::Failback(format!(
            "Primary, preferred peer Connected, Secondary, UpToDate, in sync for {:.1} s \
             (failback-delay {:.1} s)",
            for_.as_secs_f64(),
            delay.as_secs_f64()
        ))
    }

    /// A promote or demote failed: nothing more for a while.
    pub fn failed(&mut self, now: Instant) {
        self.quiet_until = Some(now + BACKOFF);
    }
}
