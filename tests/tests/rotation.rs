//! Rotating the cluster secret on a live pair with a witness and agents, by the README's
//! procedure (issue 11): no restart of any daemon, agent or witness, no lost commit, and a
//! failover afterwards under the new secret alone.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use blockd_tests::{
    cluster::{
        agents::{assert_took_over, is_connected, lease_held, lease_toml, spawn_agent_with_env},
        mariadb::{self, DbClient},
        Alpha, Beta, Cluster,
    },
    witness::ClusterWitness,
};

const SYNC: Duration = Duration::from_secs(60);
/// The witness's `--term` and `lease.term` here.
const TERM: &str = "2s";

/// Replaces the secret in `current` by `new`, keeping the old one in `previous` (the README's
/// rotation step for one host).
fn rotate(current: &Path, previous: &Path, new: &[u8]) {
    let old = std::fs::read(current).expect("read the secret");
    blockd_tests::witness::write_secret(previous, &old);
    blockd_tests::witness::write_secret(current, new);
}

/// `(key, value)` pairs as `Command::envs` and `Cluster::start_with_env` take them.
fn env_refs<'a>(e: &'a [(&'static str, String); 2]) -> [(&'static str, &'a str); 2] {
    e.each_ref().map(|(k, v)| (*k, v.as_str()))
}

/// Cuts the replication link until beta sees it down, heals it, waits for the pair to
/// reconnect and resync (the handshake under whatever secrets the nodes hold now).
fn reconnect(c: &Cluster, what: &str) {
    c.add_rule(Alpha, "input", &format!("ip saddr {} drop", Beta.ip()));
    c.add_rule(Beta, "input", &format!("ip saddr {} drop", Alpha.ip()));
    c.wait_for(Beta, "peer gone", SYNC, |v| !is_connected(v));
    c.heal();
    c.wait_for(Beta, what, SYNC, is_connected);
    c.wait_in_sync(SYNC);
}

/// The secret rotated by the README's steps while alpha is Primary and a client commits,
/// each host with its own secret files: the witness first (new secret, old as previous), then
/// alpha, then beta, then the previous files deleted. After each step the link is cut and
/// reconnects (between alpha's and beta's step only because alpha accepts the old secret, as
/// it logs); no daemon, agent or witness restarts. Then alpha dies: beta's agent gets the
/// lease under the new secret alone and promotes beta, and no commit is lost.
#[test]
fn secret_rotation_by_the_readme_steps_needs_no_restart() {
    let mut c = mariadb::cluster_with("agent-rotate", |s| {
        s.cluster_toml = ClusterWitness::cluster_toml();
        s.extra_toml.push_str(&lease_toml(TERM));
    });
    let shared = std::fs::read(c.spec().secret_file).expect("read the shared secret");
    let files = |n: &str| (c.dir().join(format!("{n}.secret")), c.dir().join(format!("{n}.old")));
    let [(a_cur, a_old), (b_cur, b_old), (w_cur, w_old)] = ["alpha", "beta", "witness"].map(files);
    let str = |p: &PathBuf| p.to_str().expect("utf-8 path").to_string();
    let env = |cur: &PathBuf, old: &PathBuf| {
        [
            ("BLOCKD_CLUSTER__SECRET_FILE", str(cur)),
            ("BLOCKD_CLUSTER__PREVIOUS_SECRET_FILE", str(old)),
        ]
    };
    let (a_env, b_env) = (env(&a_cur, &a_old), env(&b_cur, &b_old));
    for (n, cur, e) in [(Alpha, &a_cur, &a_env), (Beta, &b_cur, &b_env)] {
        blockd_tests::witness::write_secret(cur, &shared);
        c.stop(n);
        c.start_with_env(n, &env_refs(e));
    }
    blockd_tests::witness::write_secret(&w_cur, &shared);
    let mut w = ClusterWitness::attach([c.netns(Alpha), c.netns(Beta)], c.dir(), &w_cur);
    w.set_previous_secret(&w_old);
    w.start(TERM);
    c.wait_in_sync(SYNC);
    let agents = [
        spawn_agent_with_env(&c, Alpha, &env_refs(&a_env)),
        spawn_agent_with_env(&c, Beta, &env_refs(&b_env)),
    ];
    c.promote(Alpha, &[]);
    mariadb::wait_select_1(&c, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    c.wait_for(Alpha, "the lease", SYNC, lease_held);
    let pids = [c.pid(Alpha), c.pid(Beta), w.pid(), agents[0].pid(), agents[1].pid()];
    let client = DbClient::start(&c);
    client.wait_acked(0, 20, SYNC).unwrap_or_else(|e| panic!("{e}"));

    let new = b"the cluster's next secret, rotated in\n";
    rotate(&w_cur, &w_old, new);
    rotate(&a_cur, &a_old, new);
    reconnect(&c, "reconnected with alpha rotated, beta not");
    let logs = format!("{}{}", c.log_text(Alpha), c.log_text(Beta));
    assert!(logs.contains("peer authenticated with the previous secret"), "{logs}");
    rotate(&b_cur, &b_old, new);
    reconnect(&c, "reconnected with both rotated");
    for old in [&a_old, &b_old, &w_old] {
        std::fs::remove_file(old).expect("remove a previous secret");
    }
    reconnect(&c, "reconnected under the new secret alone");
    let done = client.read().acked.len();
    client.wait_acked(done, 10, SYNC).unwrap_or_else(|e| panic!("after the rotation: {e}"));
    assert_eq!([c.pid(Alpha), c.pid(Beta), w.pid(), agents[0].pid(), agents[1].pid()], pids);

    c.kill_node(Alpha);
    c.wait_for(Beta, "Primary", Duration::from_secs(90), |v| v["role"] == "Primary");
    let log = assert_took_over(&c, Beta, client);
    eprintln!("{} commits, none lost; agent on beta:\n{}", log.acked.len(), agents[1].log_text());
}
