//! `blockctl agent`: automatic failover (DESIGN §7, §8). Runs on both nodes (systemd unit
//! `blockctl-agent.service`), polls the local daemon, and decides:
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
//! | 3 | Primary                          | -                                      | wait (blockd keeps the lease) |
//! | 4 | Secondary                        | peer connected                         | wait     |
//! | 5 | Secondary                        | no witness configured                  | wait (manual only) |
//! | 6 | Secondary, peer already gone when the agent started | -                   | wait (promote by hand) |
//! | 7 | Secondary, disk not UpToDate     | peer gone                              | wait     |
//! | 8 | Secondary, UpToDate              | peer gone, renewed its lease after the link went down | wait (promote by hand) |
//! | 9 | Secondary, UpToDate              | peer gone; lease refused               | ask again |
//! | 10| Secondary, UpToDate              | peer gone ≥ `cluster.peer-timeout`; lease granted | promote (--force) |
//! | 11| Primary, `failback = "auto"`     | the preferred peer Connected, Secondary, UpToDate, in sync for `failback-delay` | swap |
//!
//! Row 8 is what makes automatic promotion safe: a Primary acknowledges degraded writes only
//! under a lease it asked for after losing its peer (blockd `fence.rs`). The witness's refusal
//! says when the holder's lease ends; one term earlier is when it was last granted. If that is
//! after the link went down (less half a peer-timeout, for the two nodes noticing at slightly
//! different moments), the peer was alive and may have written what this node lacks: only an
//! operator may promote then. A peer that died (or was isolated) renewed nothing after its link
//! went silent, so its lease runs out one term later and this node wins it. The agent asks
//! from the moment the peer is gone, so it sees such a renewal while it still runs: this needs
//! `lease.term` longer than the agent's poll plus the witness's answer, which it always is.
//!
//! Row 2: a thawed or reconnected Primary whose epoch went to the peer fails its waiting
//! degraded writes (never acknowledged), so the demote plan can unmount; its local disk has
//! writes nobody acknowledged, hence `resolve --discard-local` to rejoin as a resync target.
//!
//! Every decision that changes is one line on stdout (the journal) with the facts it used,
//! and is written to `<run-dir>/agent.json` ([`AgentState`]), which `blockctl status` shows.
//! Row 11 (`[agent] failback = "auto"`, `preferred`, `failback-delay`): the swap runs on the
//! Primary, so the agent of the node that is *not* preferred hands the service back, once the
//! preferred one has stayed in sync for the delay; the swap loses nothing (DESIGN §8).
//! Not built: the witness-less `split-brain-check = "ping:ADDR"`; without a witness the agent
//! never promotes.

use std::{
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use blockd::{
    config::Failback,
    control::{Client, ConnState, DiskState, NodeStatus, Request, Role},
    meta::Resolve,
    replication,
    witness::{Lease, LeaseClient, WitnessError},
};

use super::EXIT_FAILED;
use crate::step::Ctx;

/// A status request that takes longer than this counts as "unreachable".
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a failback's swap waits for the peer to be ready (as `blockctl swap --wait`).
const FAILBACK_WAIT: Duration = Duration::from_secs(60);

/// After a failed promote or demote, wait this long before trying again.
const BACKOFF: Duration = Duration::from_secs(10);

/// `blockctl agent` options.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Time between two polls of the daemon ("200ms", "1s").
    #[arg(long, value_name = "DURATION", default_value = "200ms",
          value_parser = crate::humantime_arg)]
    interval: Duration,
}

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
}

/// The agent's memory between polls. Pure: time comes in as arguments.
#[derive(Debug)]
pub struct Agent {
    peer_timeout: Duration,
    witness: bool,
    /// Set at the first poll: the peer was already gone (nothing known about its last moments).
    gone_at_start: Option<bool>,
    /// Since when this Secondary has seen its peer not connected.
    gone_since: Option<Instant>,
    /// The peer renewed its lease after the link went down, around this instant after it.
    peer_alive_after: Option<Duration>,
    /// The lease this node won, while Secondary and waiting for peer-timeout.
    won: Option<Lease>,
    /// No promote or demote before this (after a failure).
    quiet_until: Option<Instant>,
    /// `failback = "auto"` with the peer preferred: swap once it was in sync this long.
    failback: Option<Duration>,
    /// Since when the preferred peer has been connected, Secondary, UpToDate and in sync.
    synced_since: Option<Instant>,
}

impl Agent {
    pub fn new(peer_timeout: Duration, witness: bool) -> Agent {
        Agent {
            peer_timeout,
            witness,
            gone_at_start: None,
            gone_since: None,
            peer_alive_after: None,
            won: None,
            quiet_until: None,
            failback: None,
            synced_since: None,
        }
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
            self.peer_alive_after = None;
            self.won = None;
            self.gone_at_start = Some(false);
        }
        let quiet = self.quiet_until.is_some_and(|t| now < t);
        if s.volumes.iter().any(|v| v.role == Role::Primary) {
            self.gone_since = Some(now); // the clock starts again if this node steps down
            let lost = s
                .volumes
                .iter()
                .find_map(|v| v.lease.as_ref().and_then(|l| l.lost.map(|e| (e, l.holder.clone()))));
            return match lost {
                Some((epoch, holder)) if !connected && !quiet => Decision::Demote(format!(
                    "Primary, lease epoch {epoch} lost to {}, peer not connected",
                    holder.as_deref().unwrap_or("the peer")
                )),
                _ => self.failback(s, now, quiet),
            };
        }
        if connected {
            return Decision::Wait("Secondary, peer connected".into());
        }
        if !self.witness {
            return Decision::Wait(
                "Secondary, peer gone, no witness configured: promotion is manual".into(),
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
        if let Some(after) = self.peer_alive_after {
            return Decision::Wait(format!(
                "Secondary, peer gone {:.1} s, but it renewed its lease {:.1} s after the link \
                 went down: it may have written without us; promote by hand",
                (now - since).as_secs_f64(),
                after.as_secs_f64()
            ));
        }
        if quiet {
            return Decision::Wait("Secondary, peer gone: backing off after a failure".into());
        }
        match &self.won {
            Some(l) if now - since >= self.peer_timeout && l.is_valid(now.into()) => {
                Decision::Promote(self.promote_facts(l, now))
            }
            _ => Decision::Ask,
        }
    }

    /// Rows 8 to 10: the witness's answer to [`Decision::Ask`] at `asked` (its `term`).
    pub fn answer(
        &mut self,
        result: Result<Lease, WitnessError>,
        term: Duration,
        peer: &str,
        now: Instant,
    ) -> Decision {
        let since = self.gone_since.unwrap_or(now);
        match result {
            Ok(l) => {
                self.won = Some(l.clone());
                if now - since >= self.peer_timeout {
                    Decision::Promote(self.promote_facts(&l, now))
                } else {
                    Decision::Wait(format!(
                        "Secondary, peer gone {:.1} s, lease epoch {} won; promoting at {:.1} s",
                        (now - since).as_secs_f64(),
                        l.epoch,
                        self.peer_timeout.as_secs_f64()
                    ))
                }
            }
            Err(WitnessError::Refused { holder, epoch, retry_after }) => {
                // The holder's lease ends at now + retry_after; it was granted one term before.
                let granted = (now + retry_after).checked_sub(term).unwrap_or(now);
                let slack = self.peer_timeout / 2;
                if holder.as_deref() == Some(peer) && granted + slack > since {
                    let after = granted.saturating_duration_since(since);
                    self.peer_alive_after = Some(after);
                }
                Decision::Wait(format!(
                    "Secondary, peer gone {:.1} s, lease epoch {epoch} held by {} for {:.1} s more",
                    (now - since).as_secs_f64(),
                    holder.as_deref().unwrap_or("nobody yet (witness restarting)"),
                    retry_after.as_secs_f64()
                ))
            }
            Err(e) => Decision::Wait(format!(
                "Secondary, peer gone {:.1} s, no lease: {e}",
                (now - since).as_secs_f64()
            )),
        }
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

    fn promote_facts(&self, l: &Lease, now: Instant) -> String {
        let since = self.gone_since.unwrap_or(now);
        format!(
            "Secondary, UpToDate, peer gone {:.1} s (peer-timeout {:.1} s), lease epoch {} won",
            (now - since).as_secs_f64(),
            self.peer_timeout.as_secs_f64(),
            l.epoch
        )
    }

    /// A promote or demote failed: nothing more for a while.
    pub fn failed(&mut self, now: Instant) {
        self.quiet_until = Some(now + BACKOFF);
        self.won = None;
    }
}

/// What the agent last decided, for `blockctl status` (`<run-dir>/agent.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    pub pid: u32,
    /// "wait", then "promote", "demote" or "failback" and their outcome: "promoted",
    /// "demoted", "failed-back", or "<kind>-failed".
    pub decision: String,
    /// The facts the decision used.
    pub detail: String,
    /// When it was decided (RFC 3339).
    pub since: String,
    /// Whether the process still runs (filled in by [`read_state`]).
    #[serde(default)]
    pub running: bool,
}

fn state_path(ctx: &Ctx) -> std::path::PathBuf {
    ctx.node.settings.run_dir.join("agent.json")
}

/// Replaces the state file (atomically); a failure is logged, not fatal.
fn write_state(ctx: &Ctx, decision: &str, detail: &str) {
    let state = AgentState {
        pid: std::process::id(),
        decision: decision.into(),
        detail: detail.into(),
        since: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        running: true,
    };
    let path = state_path(ctx);
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string(&state).unwrap_or_default();
    if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)) {
        ctx.say(format!("agent: cannot write {}: {e}", path.display()));
    }
}

/// The agent's last state on this node, if an agent ever ran here.
pub fn read_state(ctx: &Ctx) -> Option<AgentState> {
    let text = std::fs::read_to_string(state_path(ctx)).ok()?;
    let mut s: AgentState = serde_json::from_str(&text).ok()?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(s.pid).ok()?);
    s.running = nix::sys::signal::kill(pid, None).is_ok();
    Some(s)
}

/// Runs the agent until SIGTERM/SIGINT.
pub fn run(ctx: &Arc<Ctx>, args: &AgentArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blockctl: error: cannot start the agent's event loop: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let client = match lease_client(ctx) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("blockctl: error: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let code = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) =
            (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            eprintln!("blockctl: error: cannot install signal handlers");
            return EXIT_FAILED;
        };
        tokio::select! {
            () = agent_loop(Arc::clone(ctx), args.interval, client) => 0,
            _ = term.recv() => 0,
            _ = int.recv() => 0,
        }
    });
    rt.shutdown_background();
    ExitCode::from(code)
}

/// The witness client, when `cluster.witness` is configured.
fn lease_client(ctx: &Ctx) -> Result<Option<LeaseClient>, String> {
    let Some(addr) = ctx.config.cluster.witness else { return Ok(None) };
    let path = ctx.config.cluster.secret_file.clone().unwrap_or_default();
    let secret = replication::load_secret(&path)
        .map_err(|e| format!("cannot read the cluster secret {}: {e}", path.display()))?;
    let settings = ctx.config.lease.client_settings();
    Ok(Some(LeaseClient::new(addr, &ctx.node.name, secret, settings)))
}

async fn agent_loop(ctx: Arc<Ctx>, interval: Duration, client: Option<LeaseClient>) {
    let c = &ctx.config;
    let peer = c.node.keys().find(|n| **n != ctx.node.name).cloned().unwrap_or_default();
    let mut agent = Agent::new(c.cluster.peer_timeout, client.is_some());
    if c.agent.failback == Failback::Auto && c.agent.preferred.as_deref() == Some(peer.as_str()) {
        agent = agent.with_failback(c.agent.failback_delay);
    }
    let mut last = String::new();
    ctx.say(format!(
        "agent: started (witness {}, peer-timeout {:?}, lease term {:?})",
        c.cluster.witness.map_or("none".into(), |a| a.to_string()),
        c.cluster.peer_timeout,
        c.lease.term
    ));
    loop {
        let path = ctx.node.control_socket();
        let polled = tokio::task::spawn_blocking(move || {
            Client::connect(&path, STATUS_TIMEOUT)
                .and_then(|mut c| c.status())
                .map_err(|e| super::chain(&e))
        })
        .await
        .unwrap_or_else(|e| Err(format!("status request failed: {e}")));
        let mut decision = agent.observe(polled.as_ref().map_err(String::as_str), Instant::now());
        if decision == Decision::Ask {
            if let Some(client) = &client {
                let result = client.acquire().await;
                decision = agent.answer(result, c.lease.term, &peer, Instant::now());
            }
        }
        act(&ctx, &mut agent, decision, &mut last).await;
        tokio::time::sleep(interval).await;
    }
}

/// Logs the decision (when it changed) and carries it out.
async fn act(ctx: &Arc<Ctx>, agent: &mut Agent, decision: Decision, last: &mut String) {
    let (kind, facts) = match decision {
        Decision::Ask => return,
        Decision::Wait(why) => {
            // Numbers change every poll: log when the words do.
            let words: String = why.chars().filter(|c| !c.is_ascii_digit() && *c != '.').collect();
            if words != *last {
                ctx.say(format!("agent: wait: {why}"));
                write_state(ctx, "wait", &why);
                *last = words;
            }
            return;
        }
        Decision::Promote(facts) => ("promote", facts),
        Decision::Demote(facts) => ("demote", facts),
        Decision::Failback(facts) => ("failback", facts),
    };
    ctx.say(format!("agent: {}: {facts}", kind.to_uppercase()));
    write_state(ctx, kind, &facts);
    last.clear();
    let started = Instant::now();
    let c = Arc::clone(ctx);
    let r = match kind {
        "promote" => tokio::task::spawn_blocking(move || promote_forced(&c)).await,
        "failback" => {
            tokio::task::spawn_blocking(move || {
                super::swap(&c, FAILBACK_WAIT).map_err(|e| e.to_string())
            })
            .await
        }
        _ => tokio::task::spawn_blocking(move || demote_and_discard(&c)).await,
    };
    let outcome = match r {
        Ok(Ok(())) => Ok(format!("{} in {:.2} s", done(kind), started.elapsed().as_secs_f64())),
        Ok(Err(e)) => Err(format!("{kind} failed: {e}")),
        Err(e) => Err(format!("{kind} did not finish: {e}")),
    };
    let (decision, text) = match outcome {
        Ok(text) => (done(kind).to_string(), text),
        Err(text) => {
            agent.failed(Instant::now());
            (format!("{kind}-failed"), text)
        }
    };
    ctx.say(format!("agent: {text}"));
    write_state(ctx, &decision, &format!("{facts}; {text}"));
}

/// The state after `kind` succeeded.
fn done(kind: &str) -> &'static str {
    match kind {
        "promote" => "promoted",
        "demote" => "demoted",
        _ => "failed-back",
    }
}

/// The promote plan with --force (the peer is unreachable; the lease was won).
fn promote_forced(ctx: &Ctx) -> Result<(), String> {
    let forced = Arc::new(Ctx {
        config: ctx.config.clone(),
        node: ctx.node.clone(),
        dry_run: false,
        force: true,
    });
    super::promote(&forced, None).map_err(|e| format!("{e} (undone)"))
}

/// The demote plan, then `resolve --discard-local`: this node's writes since the split were
/// never acknowledged (its lease was lost), so the peer's data wins.
fn demote_and_discard(ctx: &Arc<Ctx>) -> Result<(), String> {
    super::demote(ctx, None).map_err(|e| e.to_string())?;
    let request = Request::Resolve { resolve: Resolve::DiscardLocal, volume: None };
    Client::connect(&ctx.node.control_socket(), STATUS_TIMEOUT)
        .and_then(|mut cl| cl.call(&request))
        .map(|_| ())
        .map_err(|e| format!("resolve --discard-local: {e}"))
}

#[cfg(test)]
#[path = "agent_tests.rs"]
mod tests;
