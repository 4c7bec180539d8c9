//! `[agent]`: what `blockctl agent` does beyond failing over (README "Automatic failover").
//!
//! ```text
//!   failback = "auto", preferred = "alpha", failback-delay = "60s"
//!   beta Primary ── alpha Connected, UpToDate, nothing out of sync for failback-delay ──► swap
//! ```
//!
//! The swap runs on the Primary (only it can demote itself), so it is the non-preferred node's
//! agent that hands the service back; the planned switchover loses nothing (design.md §8).
//!
//! Health (SafeKit checkers, Pacemaker `on-fail`): on the Primary the agent checks each
//! `[[service]]` (its `check`, else its unit or pidfile) and each volume's mount every second;
//! one that fails for `restart-after` is restarted in place (a mount: the whole stack); one that
//! fails again after `max-restarts` restarts within `restart-window` moves the stack to the
//! peer (swap), when the peer is ready to take it.

use std::time::Duration;

use serde::Deserialize;

use super::{validate::Problems, values, Config};

/// Whether the service goes back to the preferred node on its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Failback {
    /// Only an operator's `blockctl swap` moves the service back.
    #[default]
    Manual,
    /// The agent on the other node swaps once the preferred node is back in sync.
    Auto,
}

/// `[agent]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AgentConfig {
    /// "manual" (default) or "auto".
    #[serde(default)]
    pub failback: Failback,
    /// The node that should be Primary when both are healthy (required for "auto").
    #[serde(default)]
    pub preferred: Option<String>,
    /// How long the preferred node must stay connected, UpToDate and in sync before the swap
    /// (default "60s"): a node that flaps does not get the service back.
    #[serde(default = "default_delay", deserialize_with = "values::duration")]
    pub failback_delay: Duration,
    /// A service or mount of the Primary failing its check this long is restarted (default
    /// "3s"); "0s" turns health checking off.
    #[serde(default = "default_restart_after", deserialize_with = "values::duration")]
    pub restart_after: Duration,
    /// Restarts within `restart-window` before the next failure moves the stack to the peer
    /// (default 2).
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// The window `max-restarts` counts in (default "60s").
    #[serde(default = "default_delay", deserialize_with = "values::duration")]
    pub restart_window: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            failback: Failback::Manual,
            preferred: None,
            failback_delay: default_delay(),
            restart_after: default_restart_after(),
            max_restarts: default_max_restarts(),
            restart_window: default_delay(),
        }
    }
}

fn default_delay() -> Duration {
    Duration::from_secs(60)
}
fn default_restart_after() -> Duration {
    Duration::from_secs(3)
}
fn default_max_restarts() -> u32 {
    2
}

impl Config {
    pub(super) fn check_agent(&self, p: &mut Problems) {
        let a = &self.agent;
        if let Some(name) = &a.preferred {
            if !self.node.contains_key(name) {
                p.add("agent.preferred", Some(format!("{name:?}")), "names no [node.NAME] section");
            }
        }
        if a.failback == Failback::Auto && a.preferred.is_none() {
            p.add("agent.failback", Some("\"auto\"".into()), "needs agent.preferred");
        }
        if a.failback == Failback::Auto && self.cluster.witness.is_none() {
            p.add(
                "agent.failback",
                Some("\"auto\"".into()),
                "needs cluster.witness (without it the agent does not act on its own)",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{load, SINGLE};
    use super::*;

    #[test]
    fn agent_defaults_to_manual_failback() {
        let c = load(SINGLE).unwrap();
        assert_eq!(c.agent, AgentConfig::default());
        assert_eq!(c.agent.failback, Failback::Manual);
    }

    #[test]
    fn example_file_shows_the_defaults() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/blockd.toml.example");
        let c = Config::load_with_env(&path, "BLOCKDTEST_UNSET_").unwrap();
        assert_eq!(c.agent, AgentConfig::default());
    }

    #[test]
    fn agent_keys_parse_and_are_checked() {
        let name = "alpha"; // SINGLE's node
        let text = format!(
            "[cluster]\nwitness = \"10.0.0.3:7790\"\n\
             [agent]\nfailback = \"auto\"\npreferred = \"{name}\"\nfailback-delay = \"5s\"\n{SINGLE}"
        );
        let c = load(&text).unwrap();
        assert_eq!(c.agent.failback, Failback::Auto);
        assert_eq!(c.agent.preferred.as_deref(), Some(name));
        assert_eq!(c.agent.failback_delay, Duration::from_secs(5));
        let t = format!(
            "[agent]\nrestart-after = \"1s\"\nmax-restarts = 0\nrestart-window = \"10s\"\n{SINGLE}"
        );
        let h = load(&t).unwrap().agent;
        let want = (Duration::from_secs(1), 0, Duration::from_secs(10));
        assert_eq!((h.restart_after, h.max_restarts, h.restart_window), want);
        let bad = |t: &str, want: &str| {
            let e = load(t).expect_err("refused").to_string();
            assert!(e.contains(want), "want {want:?} in {e}");
        };
        bad(&format!("[agent]\nfailback = \"auto\"\n{SINGLE}"), "needs agent.preferred");
        bad(&format!("[agent]\npreferred = \"nobody\"\n{SINGLE}"), "agent.preferred = \"nobody\"");
        bad(&format!("[agent]\nfailback = \"sometimes\"\n{SINGLE}"), "sometimes");
        let t = format!("[agent]\nfailback = \"auto\"\npreferred = \"{name}\"\n{SINGLE}");
        bad(&t, "needs cluster.witness");
    }
}
