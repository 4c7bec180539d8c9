//! `blockctl agent` on the harness's nodes, and the checks the automatic-failover tests share
//! (`tests/agent.rs`, `tests/rotation.rs`).

use serde_json::Value;

use std::time::Duration;

use super::{
    mariadb,
    mariadb::{ClientLog, DbClient},
    Cluster, NodeId,
};
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

/// After a failover to `n`: it holds the lease, MariaDB answers through the VIP, the client
/// commits again; then the client stops and every id it saw acknowledged is in the table.
pub fn assert_took_over(c: &Cluster, n: NodeId, client: DbClient) -> ClientLog {
    let v = c.wait_for(n, "its lease", Duration::from_secs(60), lease_held);
    assert_eq!(v["lease"]["holder"], n.name(), "{v:#}");
    mariadb::wait_select_1(c, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    let done = client.read().acked.len();
    client.wait_acked(done, 10, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    let log = client.stop();
    assert_no_lost_commit(c, &log);
    log
}
