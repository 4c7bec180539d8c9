//! Families the alert rules need beyond [`super::render`]'s: split brain, the witness lease,
//! frozen writes, and `blockctl agent`'s tally from `<run-dir>/agent.json` (restarts per
//! step, swaps per reason), which only the agent knows and blockd exports for it.
//!
//! | family                                  | type    | extra label | value                 |
//! |-----------------------------------------|---------|-------------|-----------------------|
//! | `blockd_volume_split_brain`             | gauge   |             | 1 while StandAlone for a split brain |
//! | `blockd_volume_writes_frozen`           | gauge   |             | 1 while degraded writes wait for the lease |
//! | `blockd_volume_lease_valid_seconds`     | gauge   |             | this node's lease left (witness only) |
//! | `blockd_volume_lease_lost`              | gauge   |             | 1 once this Primary lost its lease (witness only) |
//! | `blockd_agent_up`                       | gauge   |             | 1 while the agent process runs (0: ran, stopped) |
//! | `blockd_agent_restarts_total`           | counter | `step`      | in-place restarts     |
//! | `blockd_agent_swaps_total`              | counter | `reason`    | swaps to the peer     |
//!
//! The agent families are absent when no agent ever ran on the node (no agent.json).

use std::{collections::BTreeMap, fmt::Write, path::Path};

use serde::Deserialize;

use super::escape_label;
use crate::control::{ConnState, NodeStatus, VolumeStatus};

/// The part of `agent.json` exported (the agent writes more).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct AgentFile {
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub decision: String,
    #[serde(default)]
    pub detail: String,
    #[serde(default)]
    pub since: String,
    #[serde(default)]
    pub restarts: BTreeMap<String, u64>,
    #[serde(default)]
    pub swaps: BTreeMap<String, u64>,
}

impl AgentFile {
    /// `<run_dir>/agent.json`, if the agent ever wrote one.
    pub fn read(run_dir: &Path) -> Option<AgentFile> {
        let text = std::fs::read_to_string(run_dir.join("agent.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Whether the process that wrote it still runs.
    pub fn running(&self) -> bool {
        self.pid != 0 && Path::new("/proc").join(self.pid.to_string()).exists()
    }
}

type Value = fn(&VolumeStatus) -> Option<f64>;

const VOLUME: &[(&str, &str, Value)] = &[
    (
        "blockd_volume_split_brain",
        "1 while the volume is StandAlone because of a split brain.",
        |v| Some(f64::from(u8::from(v.conn == ConnState::StandAlone && v.split_brain))),
    ),
    ("blockd_volume_writes_frozen", "1 while degraded writes wait for the witness lease.", |v| {
        Some(f64::from(u8::from(v.frozen.is_some())))
    }),
    (
        "blockd_volume_lease_valid_seconds",
        "How long this node's witness lease is still valid.",
        |v| v.lease.as_ref().map(|l| l.valid_for_ms as f64 / 1000.0),
    ),
    (
        "blockd_volume_lease_lost",
        "1 once this Primary lost its witness lease to another node.",
        |v| v.lease.as_ref().map(|l| f64::from(u8::from(l.lost.is_some()))),
    ),
];

/// Everything `GET /metrics` serves: [`super::render`] then this module's families, with
/// the agent's tally read from `run_dir`.
pub fn full(status: &NodeStatus, run_dir: &Path) -> String {
    let mut text = super::render(status);
    text.push_str(&render(status, AgentFile::read(run_dir).as_ref()));
    text
}

/// The families of the module doc as Prometheus text.
pub fn render(status: &NodeStatus, agent: Option<&AgentFile>) -> String {
    let mut out = String::new();
    let node = escape_label(&status.node);
    for (name, help, value) in VOLUME {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for v in &status.volumes {
            if let Some(x) = value(v) {
                let volume = escape_label(&v.name);
                let _ = writeln!(out, "{name}{{node=\"{node}\",volume=\"{volume}\"}} {x}");
            }
        }
    }
    let Some(a) = agent else { return out };
    let up = "blockd_agent_up";
    let _ =
        writeln!(out, "# HELP {up} 1 while blockctl agent runs on this node.\n# TYPE {up} gauge");
    let _ = writeln!(out, "{up}{{node=\"{node}\"}} {}", u8::from(a.running()));
    let tallies = [
        (
            "blockd_agent_restarts_total",
            "In-place restarts by the agent, by step.",
            "step",
            &a.restarts,
        ),
        (
            "blockd_agent_swaps_total",
            "Swaps to the peer by the agent, by reason.",
            "reason",
            &a.swaps,
        ),
    ];
    for (name, help, label, counts) in tallies {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (key, n) in counts {
            let key = escape_label(key);
            let _ = writeln!(out, "{name}{{node=\"{node}\",{label}=\"{key}\"}} {n}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_tally_is_rendered_per_step_and_reason() {
        let status = NodeStatus { node: "alpha".into(), version: "0".into(), volumes: vec![] };
        assert!(!render(&status, None).contains("blockd_agent"), "no agent, no families");
        let a = AgentFile {
            pid: std::process::id(),
            restarts: [("service mariadb".to_string(), 3)].into(),
            swaps: [("disk-failed".to_string(), 1)].into(),
            ..AgentFile::default()
        };
        let text = render(&status, Some(&a));
        assert!(text.contains("blockd_agent_up{node=\"alpha\"} 1\n"), "{text}");
        assert!(text
            .contains("blockd_agent_restarts_total{node=\"alpha\",step=\"service mariadb\"} 3\n"));
        assert!(
            text.contains("blockd_agent_swaps_total{node=\"alpha\",reason=\"disk-failed\"} 1\n")
        );
    }
}
