//! `blockctl agent` on the harness's nodes, and the checks the automatic-failover tests share
//! (`tests/agent.rs`, `tests/rotation.rs`).

use serde_json::Value;

use super::{mariadb, mariadb::ClientLog, Cluster, NodeId};
use crate::cmd::{bin, Background};

/// `[lease]` for a witness started with `--term term`: renewals every third of it, a request
/// bounded by 500 ms.
pub fn lease_toml(term: &str) -> String {
    format!("[lease]\nterm = \"{term}\"\ntimeout = \"500ms\"\n\n")
}

/// `blockctl agent` on node `n` (in its mount namespace: its promote mounts there).
pub fn spawn_agent(c: &Cluster, n: NodeId) -> Background {
    spawn_agent_with_env(c, n, &[])
}

/// [`spawn_agent`] with `BLOCKD_*` overrides of the config in its environment.
pub fn spawn_agent_with_env(c: &Cluster, n: NodeId, env: &[(&str, &str)]) -> Background {
    let mut cmd = c.lan().mount_ns(n).command(bin("blockctl"));
    cmd.arg("--config").arg(c.config(n)).args(["--node", n.name(), "agent", "--interval", "100ms"]);
    cmd.env("NO_COLOR", "1").envs(env.iter().copied());
    Background::spawn(&mut cmd, &c.dir().join(format!("agent-{}.log", n.name())))
}

/// The volume's status says it holds a valid witness lease.
pub fn lease_held(v: &Value) -> bool {
    v["lease"]["valid_for_ms"].as_u64().unwrap_or(0) > 0
}

/// The volume's status says its peer is connected (in sync or resyncing).
pub fn is_connected(v: &Value) -> bool {
    ["Connected", "SyncSource", "SyncTarget"].iter().any(|s| v["conn"] == *s)
}

/// Every acknowledged id is in the table (through the VIP, on whoever is Primary).
pub fn assert_no_lost_commit(c: &Cluster, log: &ClientLog) {
    let ids = mariadb::ids(c);
    let lost: Vec<u64> = log.acked.iter().filter(|id| !ids.contains(id)).copied().collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged ids missing: {:?}",
        lost.len(),
        log.acked.len(),
        &lost[..lost.len().min(10)]
    );
}
