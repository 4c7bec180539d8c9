//! `<run-dir>/agent.json`: what `blockctl agent` last decided, and its tally of the actions
//! taken without an operator (in-place restarts per step, swaps per reason), which
//! `blockctl status` shows (and `status --json` carries, for monitoring).
//!
//! The tally survives restarts of the agent: a new agent starts from the file's counts, so
//! "mariadb was restarted 5 times today" stays true across an agent upgrade. Removing the
//! file (or the run directory, at boot) starts over.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::step::Ctx;

/// What the agent last decided, for `blockctl status` (`<run-dir>/agent.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    pub pid: u32,
    /// "wait", then "promote", "demote", "failback", "swap", "restart"... and their outcome:
    /// "promoted", "demoted", "failed-back", "swapped", "restarted", or "<kind>-failed".
    pub decision: String,
    /// The facts the decision used.
    pub detail: String,
    /// When it was decided (RFC 3339).
    pub since: String,
    /// Whether the process still runs (filled in by [`read_state`]).
    #[serde(default)]
    pub running: bool,
    /// Successful in-place restarts, by step ("service mariadb", "mount db").
    #[serde(default)]
    pub restarts: BTreeMap<String, u64>,
    /// Successful swaps to the peer, by reason: "disk-failed", "failback", or
    /// "health: <step>" (the step that kept failing after its restarts).
    #[serde(default)]
    pub swaps: BTreeMap<String, u64>,
}

/// The counts [`write_state`] records; see the module doc.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    pub restarts: BTreeMap<String, u64>,
    pub swaps: BTreeMap<String, u64>,
}

impl Tally {
    /// The counts of the agent that ran here before, if any.
    pub fn resumed(ctx: &Ctx) -> Tally {
        let s = read_state(ctx).unwrap_or_default();
        Tally { restarts: s.restarts, swaps: s.swaps }
    }

    pub fn restarted(&mut self, step: &str) {
        *self.restarts.entry(step.to_string()).or_default() += 1;
    }

    pub fn swapped(&mut self, reason: &str) {
        *self.swaps.entry(reason.to_string()).or_default() += 1;
    }
}

fn state_path(ctx: &Ctx) -> std::path::PathBuf {
    ctx.node.settings.run_dir.join("agent.json")
}

/// Replaces the state file (atomically); a failure is logged, not fatal.
pub fn write_state(ctx: &Ctx, tally: &Tally, decision: &str, detail: &str) {
    let state = AgentState {
        pid: std::process::id(),
        decision: decision.into(),
        detail: detail.into(),
        since: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        running: true,
        restarts: tally.restarts.clone(),
        swaps: tally.swaps.clone(),
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
