//! `blockctl agent`: automatic failover (design.md §7, §8). Runs on both nodes (systemd unit
//! `blockctl-agent.service`): polls the local daemon, asks the witness when the decision table
//! says so, and carries the decision out (promote, demote, swap, restart, ...). The table and
//! its reasons are pure code in the core, `blockd::agent` (the simulator drives it too); the
//! tests of each row are `agent_tests.rs`.

use std::{
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

pub use blockd::agent::{Agent, Decision};
use blockd::{
    config::Failback,
    control::{Client, ConnState, NodeStatus, Request, Role},
    replication,
    resync::Resolve,
    witness::LeaseClient,
};

pub use super::agent_state::{read_state, AgentState};
use super::{
    agent_state::{write_state, Tally},
    EXIT_FAILED,
};
use crate::step::Ctx;

/// A status request that takes longer than this counts as "unreachable".
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a failback's swap waits for the peer to be ready (as `blockctl swap --wait`).
const FAILBACK_WAIT: Duration = Duration::from_secs(60);

/// `blockctl agent` options.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Time between two polls of the daemon ("200ms", "1s").
    #[arg(long, value_name = "DURATION", default_value = "200ms",
          value_parser = crate::humantime_arg)]
    interval: Duration,
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

/// The witness client, when `cluster.witness` is configured. Like the daemon's, it reads
/// `secret-file` again for every request, so a secret rotation needs no restart of the agent;
/// a file that cannot be read stops the start.
fn lease_client(ctx: &Ctx) -> Result<Option<LeaseClient>, String> {
    let Some(addr) = ctx.config.cluster.witness else { return Ok(None) };
    let path = ctx.config.cluster.secret_file.clone().unwrap_or_default();
    let secrets = replication::Secrets::Files { current: path.clone(), previous: None };
    secrets
        .load()
        .map_err(|e| format!("cannot read the cluster secret {}: {e}", path.display()))?;
    let settings = ctx.config.lease.client_settings();
    Ok(Some(LeaseClient::with_secrets(addr, &ctx.node.name, secrets, settings)))
}

async fn agent_loop(ctx: Arc<Ctx>, interval: Duration, client: Option<LeaseClient>) {
    let c = &ctx.config;
    let peer = c.node.keys().find(|n| **n != ctx.node.name).cloned().unwrap_or_default();
    let mut agent = Agent::new(client.is_some()).with_health(&c.agent);
    let mut probed_at: Option<Instant> = None;
    // (Primary, peer connected) at the last poll that answered.
    let mut seen: Option<(bool, bool)> = None;
    if c.agent.failback == Failback::Auto && c.agent.preferred.as_deref() == Some(peer.as_str()) {
        agent = agent.with_failback(c.agent.failback_delay);
    }
    let mut journal = Journal { last: String::new(), tally: Tally::resumed(&ctx) };
    ctx.say(format!(
        "agent: started (witness {}, peer-timeout {:?}, lease term {:?})",
        c.cluster.witness.map_or("none".into(), |a| a.to_string()),
        c.cluster.peer_timeout,
        c.lease.term
    ));
    loop {
        let cx = Arc::clone(&ctx);
        let probe = agent.probe_due(probed_at, Instant::now());
        let (polled, up, probes) = tokio::task::spawn_blocking(move || poll(&cx, probe))
            .await
            .unwrap_or_else(|e| (Err(format!("status request failed: {e}")), Vec::new(), None));
        agent.stack(up);
        let now_seen = polled.as_ref().ok().map(primary_and_connected);
        if let (Some((true, false)), Some((true, true))) = (seen, now_seen) {
            let cx = Arc::clone(&ctx);
            let _ = tokio::task::spawn_blocking(move || reannounce(&cx)).await;
        }
        seen = now_seen.or(seen);
        if let Some(p) = probes {
            probed_at = Some(Instant::now());
            agent.probed(p);
        }
        let mut decision = agent.observe(polled.as_ref().map_err(String::as_str), Instant::now());
        if decision == Decision::Ask {
            if let Some(client) = &client {
                // A Secondary asking acknowledged nothing alone: not degraded.
                let result = client.ask(false).await;
                decision = agent.answer(result, &peer, Instant::now());
            }
        }
        act(&ctx, &mut agent, decision, &mut journal).await;
        tokio::time::sleep(agent.next_poll(interval, Instant::now())).await;
    }
}

/// Whether this node is Primary of any volume, and whether all its volumes have their peer.
fn primary_and_connected(s: &NodeStatus) -> (bool, bool) {
    let primary = s.volumes.iter().any(|v| v.role == Role::Primary);
    let connected = !s.volumes.is_empty()
        && s.volumes.iter().all(|v| {
            matches!(v.conn, ConnState::Connected | ConnState::SyncSource | ConnState::SyncTarget)
        });
    (primary, connected)
}

/// The peer came back while this node is Primary: it may be the old primary returning with
/// the VIP still on its interface (a thawed node answers ARP for it until its agent demotes
/// it), so the VIP is announced again and neighbours that cached its MAC come back here.
fn reannounce(ctx: &Ctx) {
    match crate::steps::vip::Vip::new().reannounce(ctx) {
        Ok(true) => ctx.say("agent: peer back: VIP announced again"),
        Ok(false) => {}
        Err(e) => ctx.say(format!("agent: peer back: VIP not announced again: {e}")),
    }
}

/// What one poll found.
type Polled = (Result<NodeStatus, String>, Vec<String>, Option<Vec<(String, bool)>>);

/// The daemon's status; on a Secondary, what of the stack is up here (rows 13 and 14); on a
/// Primary, when `probe`, the health probes (row 12b).
fn poll(ctx: &Ctx, probe: bool) -> Polled {
    let status = Client::connect(&ctx.node.control_socket(), STATUS_TIMEOUT)
        .and_then(|mut c| c.status())
        .map_err(|e| super::chain(&e));
    let primary = status.as_ref().is_ok_and(|s| s.volumes.iter().any(|v| v.role == Role::Primary));
    let up = if status.is_ok() && !primary { super::stack_up(ctx) } else { Vec::new() };
    let probes = (probe && primary).then(|| super::health_probes(ctx));
    (status, up, probes)
}

/// What the agent keeps for its log and its state file between decisions.
struct Journal {
    /// The words of the last wait logged (see [`act`]).
    last: String,
    tally: Tally,
}

/// Logs the decision (when it changed) and carries it out.
async fn act(ctx: &Arc<Ctx>, agent: &mut Agent, decision: Decision, journal: &mut Journal) {
    let mut swap_reason = None;
    let (kind, facts) = match decision {
        Decision::Ask => return,
        Decision::Wait(why) => {
            // Numbers change every poll: log when the words do.
            let words: String = why.chars().filter(|c| !c.is_ascii_digit() && *c != '.').collect();
            if words != journal.last {
                ctx.say(format!("agent: wait: {why}"));
                write_state(ctx, &journal.tally, "wait", &why);
                journal.last = words;
            }
            return;
        }
        Decision::Promote(facts) => ("promote", facts),
        Decision::Demote(facts) => ("demote", facts),
        Decision::Failback(facts) => {
            swap_reason = Some("failback".to_string());
            ("failback", facts)
        }
        Decision::Swap(reason, facts) => {
            swap_reason = Some(reason);
            ("swap", facts)
        }
        Decision::Recover(facts) => ("recover", facts),
        Decision::Resume(facts) => ("resume", facts),
        Decision::Restart(step, facts) => {
            restart(ctx, agent, &step, &facts, &mut journal.tally).await;
            journal.last.clear();
            return;
        }
    };
    ctx.say(format!("agent: {}: {facts}", kind.to_uppercase()));
    write_state(ctx, &journal.tally, kind, &facts);
    journal.last.clear();
    let started = Instant::now();
    let c = Arc::clone(ctx);
    let r = match kind {
        "promote" => tokio::task::spawn_blocking(move || promote_forced(&c)).await,
        "recover" => {
            tokio::task::spawn_blocking(move || super::demote(&c, None).map_err(|e| e.to_string()))
                .await
        }
        "resume" => {
            tokio::task::spawn_blocking(move || {
                super::promote(&c, None).map_err(|e| format!("{e} (undone)"))
            })
            .await
        }
        "failback" | "swap" => {
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
        Ok(text) => {
            match kind {
                "recover" => agent.recovered(),
                "demote" => agent.demoted(),
                _ => {}
            }
            if let Some(reason) = &swap_reason {
                journal.tally.swapped(reason);
            }
            (done(kind).to_string(), text)
        }
        Err(text) => {
            agent.failed(Instant::now());
            (format!("{kind}-failed"), text)
        }
    };
    ctx.say(format!("agent: {text}"));
    write_state(ctx, &journal.tally, &decision, &format!("{facts}; {text}"));
}

/// Row 12b: restarts `step` in place and records the outcome.
async fn restart(ctx: &Arc<Ctx>, agent: &mut Agent, step: &str, facts: &str, tally: &mut Tally) {
    ctx.say(format!("agent: RESTART {step}: {facts}"));
    write_state(ctx, tally, "restart", facts);
    let started = Instant::now();
    let (c, name) = (Arc::clone(ctx), step.to_string());
    let r = tokio::task::spawn_blocking(move || super::restart_step(&c, &name)).await;
    let (state, text) = match r {
        Ok(Ok(())) => {
            agent.restarted(step, Instant::now());
            tally.restarted(step);
            ("restarted", format!("restarted {step} in {:.2} s", started.elapsed().as_secs_f64()))
        }
        Ok(Err(e)) => ("restart-failed", format!("restart of {step} failed: {e}")),
        Err(e) => ("restart-failed", format!("restart of {step} did not finish: {e}")),
    };
    if state != "restarted" {
        agent.failed(Instant::now());
    }
    ctx.say(format!("agent: {text}"));
    write_state(ctx, tally, state, &format!("{facts}; {text}"));
}

/// The state after `kind` succeeded.
fn done(kind: &str) -> &'static str {
    match kind {
        "promote" => "promoted",
        "demote" => "demoted",
        "swap" => "swapped",
        "recover" => "recovered",
        "resume" => "resumed",
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
