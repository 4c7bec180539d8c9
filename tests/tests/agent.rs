//! Automatic failover without split brain (issue 6): the witness fence in blockd and
//! `blockctl agent`, on the two-node harness plus a witness in its own namespace
//! ([`ClusterWitness`]: the witness network is separate from the replication link and the
//! LAN, so each can be cut on its own).
//!
//! Oracles: the acknowledged-writes log of `acked_writer.py` (raw NBD) and of `db_client.py`
//! (MariaDB commits through the VIP): every acknowledged write must be on the node that is
//! Primary at the end; and once resynced, both backing files are identical.
//!
//! Timing figures are printed with eprintln (`cargo test -- --nocapture` shows them).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use blockd_tests::{
    cluster::{
        agents::{
            self, assert_no_lost_commit, assert_took_over, is_connected, lease_held, spawn_agent,
        },
        clients::{acked_rounds, acked_writer, check_acked},
        lan::IFACE,
        mariadb::{self, DbClient},
        Alpha, Beta, Cluster, NodeId,
    },
    cmd::Background,
    nbd::RawClient,
    witness::{ClusterWitness, WITNESS_IFACE},
};
use serde_json::Value;

const SYNC: Duration = Duration::from_secs(60);
/// The lease term of these tests (the witness's `--term` and `lease.term`).
const TERM: &str = "2s";
const TERM_D: Duration = Duration::from_secs(2);

/// `[lease]` matching [`TERM`]: renewals every 667 ms, a request bounded by 500 ms.
fn lease_toml() -> String {
    agents::lease_toml(TERM)
}

fn lines(path: &PathBuf) -> usize {
    std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0)
}

fn frozen(v: &Value) -> bool {
    v["frozen"].is_string()
}

/// Waits until the acked log grows by `n` lines past `from`; panics after `timeout`.
fn wait_acks(log: &PathBuf, from: usize, n: usize, timeout: Duration, what: &str) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let now = lines(log);
        if now >= from + n {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {now} acks, wanted {} within {timeout:?}",
            from + n
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// design.md §7 in blockd alone (no agent): a Primary that loses its peer completes degraded
/// writes only while it holds the lease. Witness down while mirroring: nothing changes.
/// Peer and witness both gone: writes wait (none acknowledged, for seconds), reads go on,
/// status says frozen and why. The witness back (the peer still cut): writes complete.
/// The peer back: resync, identical backing files, every acknowledged write there.
#[test]
fn isolated_primary_freezes_writes_until_the_lease_returns() {
    let mut c = Cluster::new("agent-fence", "16MiB");
    let mut spec = c.spec();
    spec.cluster_toml = ClusterWitness::cluster_toml();
    spec.extra_toml = lease_toml();
    let config = c.dir().join("witness.toml");
    c.write_config(&config, &spec);
    let mut w = ClusterWitness::attach([c.netns(Alpha), c.netns(Beta)], c.dir(), &spec.secret_file);
    w.start(TERM);
    for n in [Alpha, Beta] {
        c.use_config(n, &config);
        c.start(n);
    }
    c.wait_in_sync(SYNC);
    c.role(Alpha, "primary", false).unwrap();
    let v = c.wait_for(Alpha, "the lease", SYNC, lease_held);
    assert_eq!(v["lease"]["holder"], "alpha", "{v:#}");
    assert!(c.vol(Beta)["lease"]["valid_for_ms"] == 0, "a Secondary holds no lease");

    let (mut writer, log) = acked_writer(c.dir(), &c.nbd_uri(Alpha), 64, 4);
    wait_acks(&log, 0, 200, SYNC, "before anything");

    // Witness down while both nodes are up: mirrored writes need no lease.
    w.kill();
    std::thread::sleep(TERM_D * 2);
    let v = c.vol(Alpha);
    assert!(!frozen(&v) && !lease_held(&v), "mirroring, lease expired, not frozen: {v:#}");
    wait_acks(&log, lines(&log), 200, Duration::from_secs(10), "witness down, peer up");
    w.start(TERM);
    c.wait_for(Alpha, "the lease again", SYNC, lease_held);

    // Peer and witness gone.
    let cut_at = Instant::now();
    w.kill();
    c.cut();
    let v = c.wait_for(Alpha, "frozen", SYNC, frozen);
    eprintln!("cut → frozen in status: {:.2} s; {}", cut_at.elapsed().as_secs_f64(), v["frozen"]);
    assert!(v["frozen"].as_str().unwrap().contains("no valid witness lease"), "{v:#}");
    std::thread::sleep(Duration::from_millis(500)); // a reply already on its way is logged
    let at_freeze = lines(&log);
    std::thread::sleep(TERM_D * 2);
    assert_eq!(lines(&log), at_freeze, "a write was acknowledged while frozen");
    let v = c.vol(Alpha);
    assert_eq!(v["role"], "Primary");
    assert!(v["frozen"].as_str().unwrap().contains("writes waiting"), "{v:#}");
    // Reads are served meanwhile (a second client; the writer's requests wait).
    let (mut reader, _) = RawClient::transmission(&c.socket(Alpha), &spec.volume);
    reader.read(0, 4096).unwrap_or_else(|e| panic!("READ while frozen failed: NBD error {e}"));

    // The witness returns (the peer stays cut): the lease is renewed, the waiting writes and
    // new ones complete degraded.
    w.start(TERM);
    let resumed = Instant::now();
    let v = c.wait_for(Alpha, "not frozen", SYNC, |v| !frozen(v));
    wait_acks(&log, at_freeze, 100, Duration::from_secs(20), "witness back");
    eprintln!(
        "witness back → writes acknowledged again in {:.2} s",
        resumed.elapsed().as_secs_f64()
    );
    assert!(lease_held(&v), "{v:#}");
    assert!(v["counters"]["degraded_writes"].as_u64().unwrap() > 0);

    // The peer returns: resync; stop writing; everything acknowledged is on both.
    c.heal();
    c.wait_for(Beta, "connected", SYNC, |v| v["conn"] == "Connected" || v["conn"] == "SyncTarget");
    drop(reader);
    stop_writer(&mut writer);
    c.wait_in_sync(SYNC);
    let rounds = acked_rounds(&log);
    let checked = check_acked(&c.socket(Alpha), &spec.volume, &rounds);
    c.assert_identical();
    eprintln!(
        "{} acknowledged writes, {checked} blocks checked, backing files identical",
        lines(&log)
    );
    let logs = c.log_text(Alpha);
    assert!(logs.contains("holding the witness lease"), "{logs}");
}

/// Stops `acked_writer.py` (SIGKILL: it logs only completed writes, so its log stays exact).
fn stop_writer(w: &mut Background) {
    blockd_tests::cmd::signal(w.pid(), libc::SIGKILL);
    w.wait(Duration::from_secs(10));
}

/// The MariaDB cluster with a witness and agents on both nodes, alpha promoted by hand.
fn mariadb_with_agents(test: &str) -> (Cluster, ClusterWitness, [Background; 2]) {
    mariadb_with_agents_and(test, "")
}

/// [`mariadb_with_agents`] with `extra` tables in the config (e.g. `[agent]`).
fn mariadb_with_agents_and(test: &str, extra: &str) -> (Cluster, ClusterWitness, [Background; 2]) {
    let c = mariadb::cluster_with(test, |s| {
        s.cluster_toml = ClusterWitness::cluster_toml();
        s.extra_toml.push_str(&lease_toml());
        s.extra_toml.push_str(extra);
    });
    let mut w =
        ClusterWitness::attach([c.netns(Alpha), c.netns(Beta)], c.dir(), &c.spec().secret_file);
    w.start(TERM);
    c.wait_in_sync(SYNC);
    let agents = [spawn_agent(&c, Alpha), spawn_agent(&c, Beta)];
    c.promote(Alpha, &[]);
    mariadb::wait_select_1(&c, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    c.wait_for(Alpha, "the lease", SYNC, lease_held);
    (c, w, agents)
}

/// Witness down while both nodes run: nothing changes, nor when it returns. Then the
/// primary node dies (all processes, link down): beta's agent waits for alpha's lease to run
/// out, wins it, promotes; MariaDB answers through the VIP; no acknowledged commit is lost.
#[test]
fn agent_promotes_beta_when_alpha_dies_and_ignores_a_witness_outage() {
    let (mut c, mut w, agents) = mariadb_with_agents("agent-kill");
    let client = DbClient::start(&c);
    client.wait_acked(0, 30, SYNC).unwrap_or_else(|e| panic!("{e}"));

    w.kill();
    std::thread::sleep(TERM_D * 3);
    let done = client.read().acked.len();
    client
        .wait_acked(done, 20, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("witness down: {e}"));
    assert_eq!(
        (c.vol(Alpha)["role"].clone(), c.vol(Beta)["role"].clone()),
        ("Primary".into(), "Secondary".into())
    );
    w.start(TERM);
    std::thread::sleep(TERM_D * 2);
    assert_eq!(
        (c.vol(Alpha)["role"].clone(), c.vol(Beta)["role"].clone()),
        ("Primary".into(), "Secondary".into())
    );
    c.wait_for(Alpha, "the lease again", SYNC, lease_held);

    let t0 = Instant::now();
    c.kill_node(Alpha);
    let answered = mariadb::wait_select_1(&c, Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("{e}\nagent beta:\n{}{}", agents[1].log_text(), c.diag(Beta)));
    let took = answered - t0;
    eprintln!("kill alpha → SELECT 1 through the VIP (agent on beta): {:.2} s", took.as_secs_f64());
    let v = c.vol(Beta);
    assert_eq!(v["role"], "Primary", "{v:#}");
    assert_eq!(v["lease"]["holder"], "beta", "{v:#}");
    let agent_log = agents[1].log_text();
    assert!(agent_log.contains("agent: PROMOTE"), "{agent_log}");
    let done = client.read().acked.len();
    client.wait_acked(done, 20, SYNC).unwrap_or_else(|e| panic!("{e}"));
    let log = client.stop();
    assert_no_lost_commit(&c, &log);
    eprintln!("{} commits acknowledged, none lost; agent on beta:\n{agent_log}", log.acked.len());
}

/// The primary node is isolated from its peer, the LAN and the witness (its interfaces stay
/// up inside, nothing gets through): its writes freeze (status says so), beta's agent wins the
/// lease once alpha's ran out and promotes. Healed: alpha learns its epoch was lost, fails the
/// frozen writes (never acknowledged), its agent demotes it and gives up its local changes;
/// it rejoins as Secondary and resyncs. No acknowledged commit is lost; once beta is demoted
/// too, both backing files are identical.
#[test]
fn isolated_primary_freezes_beta_takes_over_alpha_rejoins_as_secondary() {
    let (c, _w, agents) = mariadb_with_agents("agent-isolate");
    let client = DbClient::start(&c);
    client.wait_acked(0, 30, SYNC).unwrap_or_else(|e| panic!("{e}"));

    let t0 = Instant::now();
    c.netns(Alpha).ip(&["link", "set", IFACE, "down"]);
    ClusterWitness::cut(c.netns(Alpha));
    let v = c.wait_for(Alpha, "frozen", SYNC, frozen);
    eprintln!("isolation → alpha frozen: {:.2} s ({})", t0.elapsed().as_secs_f64(), v["frozen"]);
    let answered = mariadb::wait_select_1(&c, Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("{e}\nagent beta:\n{}{}", agents[1].log_text(), c.diag(Beta)));
    eprintln!(
        "isolation → SELECT 1 on beta through the VIP: {:.2} s",
        (answered - t0).as_secs_f64()
    );
    let v = c.vol(Beta);
    assert_eq!(
        (v["role"].as_str(), v["lease"]["holder"].as_str()),
        (Some("Primary"), Some("beta"))
    );
    assert!(frozen(&c.vol(Alpha)), "alpha must still be frozen: {:#}", c.vol(Alpha));
    let done = client.read().acked.len();
    client.wait_acked(done, 20, SYNC).unwrap_or_else(|e| panic!("{e}"));

    // Heal: alpha sees the lease went to beta, its agent demotes it, it resyncs from beta.
    let healed = Instant::now();
    c.heal();
    c.netns(Alpha).ip(&["link", "set", IFACE, "up"]);
    c.wait_for(Alpha, "Secondary, resynced from beta", Duration::from_secs(180), |v| {
        v["role"] == "Secondary" && v["conn"] == "Connected" && v["disk"] == "UpToDate"
    });
    eprintln!("heal → alpha Secondary and in sync: {:.2} s", healed.elapsed().as_secs_f64());
    let alog = agents[0].log_text();
    assert!(alog.contains("agent: DEMOTE") && alog.contains("lost to beta"), "{alog}");
    let done = client.read().acked.len();
    client.wait_acked(done, 10, SYNC).unwrap_or_else(|e| panic!("{e}"));
    let log = client.stop();
    assert_no_lost_commit(&c, &log);
    eprintln!("{} commits acknowledged, none lost; agent on alpha:\n{alog}", log.acked.len());
    c.blockctl_run(Beta, &["demote"]).assert_success();
    c.wait_in_sync(SYNC);
    c.assert_identical();
}

/// How a failover case takes the Primary node down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kill {
    /// Every process SIGKILLed, link up: the peer sees a FIN at once (issue 16, finding 2).
    /// The kernel keeps the VIP and the mounts; 2 s later blockd and the agent start again,
    /// as systemd's `Restart=` with `RestartSec=2s` would, and the agent tears the stale
    /// stack down.
    ProcessesLinkUp,
    /// blockd alone SIGKILLed (MariaDB, mounts, VIP left in place) and started again 2 s later
    /// (issue 16, finding 3); the agent keeps running.
    BlockdRestart,
    /// Link down, then every process (a power cut): the peer sees silence.
    PowerCut,
    /// Every process SIGSTOPped (the whole node frozen) until the peer took over; then thawed.
    Freeze,
}

/// The MariaDB cluster with a witness and agents, every timing at the product's defaults
/// (`cluster.peer-timeout`, `[lease]`, the witness's `--term`), alpha promoted by hand.
fn defaults_with_agents(test: &str) -> (Cluster, ClusterWitness, [Background; 2]) {
    let c = mariadb::cluster_with(test, |s| {
        s.cluster_toml = ClusterWitness::cluster_toml();
        s.peer_timeout = blockd::config::ClusterConfig::default().peer_timeout;
    });
    let mut w =
        ClusterWitness::attach([c.netns(Alpha), c.netns(Beta)], c.dir(), &c.spec().secret_file);
    w.start(&format!("{}ms", blockd::witness::DEFAULT_TERM.as_millis()));
    c.wait_in_sync(SYNC);
    let agents = [spawn_agent(&c, Alpha), spawn_agent(&c, Beta)];
    c.promote(Alpha, &[]);
    mariadb::wait_select_1(&c, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    c.wait_for(Alpha, "the lease", SYNC, lease_held);
    (c, w, agents)
}

/// A liveness bound only (the figures go to `bench/failover`): far above the 8 s target.
const LIVENESS: Duration = Duration::from_secs(20);

/// `runs` automatic failovers with the default timings on one cluster, alternating: the
/// Primary node goes down as `kill` says, the agent on the other promotes it with no operator;
/// the downed node comes back (reboot and restart, or thaw), rejoins as Secondary, resyncs;
/// next. One client inserts throughout; every acknowledged commit must be there at the end,
/// and after each run exactly one node is Primary. Returns each kill → `SELECT 1` through the
/// VIP; prints it and kill → next commit as `failover <case> run N: ...` (bench/failover).
fn failover_series(test: &str, kill: Kill, runs: usize) -> Vec<Duration> {
    let (mut c, _w, agents) = defaults_with_agents(test);
    let mut agents = agents.map(Some);
    let client = DbClient::start(&c);
    let mut times = Vec::new();
    let mut from = Alpha;
    for run in 0..runs {
        let to = from.other();
        let done = client.read().acked.len();
        client.wait_acked(done, 10, SYNC).unwrap_or_else(|e| panic!("run {run}: {e}"));
        let done = client.read().acked.len();
        let (to_log, killed) = (c.log_text(to).len(), utc_now());
        let t0 = Instant::now();
        let frozen = take_down(&mut c, from, kill, &mut agents);
        let answered = mariadb::wait_select_1(&c, LIVENESS).unwrap_or_else(|e| {
            let logs: Vec<String> = agents.iter().flatten().map(|a| a.log_text()).collect();
            let (to_d, from_d, net) = (c.diag(to), c.diag(from), c.net_diag());
            panic!(
                "run {run}: {e}\nagents:\n{}{to_d}{from_d}{net}\n{:#}",
                logs.join("\n"),
                c.vol(to)
            )
        });
        client.wait_acked(done, 1, LIVENESS).unwrap_or_else(|e| panic!("run {run}: {e}"));
        let committed = t0.elapsed();
        if committed > Duration::from_secs(5) {
            // Not an oracle: where the time went, for the bench's slow runs (the agents' log
            // has no timestamps; the survivor's blockd log has).
            for a in agents.iter().flatten() {
                let log = a.log_text();
                let tail: Vec<&str> = log.lines().rev().take(12).collect();
                eprintln!(
                    "slow run {run}, agent log tail:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            let log = c.log_text(to);
            let since: Vec<&str> = log[to_log.min(log.len())..]
                .lines()
                .filter(|l| {
                    ["link down", "witness lease", "Promote", "no lease"]
                        .iter()
                        .any(|w| l.contains(w))
                })
                .collect();
            eprintln!(
                "slow run {run}: killed at {killed} UTC; {} since:\n{}",
                to.name(),
                since.join("\n")
            );
        }
        times.push(answered - t0);
        eprintln!(
            "failover {kill:?} run {run}: {} down: select {:.2} s commit {:.2} s",
            from.name(),
            times[run].as_secs_f64(),
            committed.as_secs_f64()
        );
        bring_back(&mut c, from, kill, &frozen, &mut agents);
        from = one_primary_in_sync(&c, run);
        for a in agents.iter().flatten() {
            // A restarted agent may wait "by hand" for a moment (its peer was gone when it
            // started); what it decided last must not ask for an operator.
            let log = a.log_text();
            let last = log.lines().rfind(|l| l.contains("agent: ")).unwrap_or_default();
            assert!(!last.contains("by hand"), "run {run}: an operator is asked for:\n{log}");
        }
    }
    let log = client.stop();
    assert_no_lost_commit(&c, &log);
    eprintln!("{kill:?}: {runs} failovers, {} commits acknowledged, none lost", log.acked.len());
    times
}

/// The time of day now, UTC, as blockd's log writes it ("14:20:08.951").
fn utc_now() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let s = t.as_secs() % 86_400;
    format!("{:02}:{:02}:{:02}.{:03}", s / 3600, s / 60 % 60, s % 60, t.subsec_millis())
}

/// Waits until one node is Primary and the other a Connected, UpToDate Secondary; returns the
/// Primary. Panics after two minutes. (A thawed node is StandAlone for a moment: both were
/// Primary until its agent demotes it and gives up its local writes.)
fn one_primary_in_sync(c: &Cluster, run: usize) -> NodeId {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (a, b) = (c.vol(Alpha), c.vol(Beta));
        for (p, s, n) in [(&a, &b, Alpha), (&b, &a, Beta)] {
            let synced = s["conn"] == "Connected" && s["disk"] == "UpToDate";
            if p["role"] == "Primary" && s["role"] == "Secondary" && synced {
                return n;
            }
        }
        assert!(Instant::now() < deadline, "run {run}: not one Primary in sync:\n{a:#}\n{b:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Node `n`'s LAN and witness links `up` or `down`.
fn links(c: &Cluster, n: NodeId, state: &str) {
    for iface in [WITNESS_IFACE, IFACE] {
        c.netns(n).ip(&["link", "set", iface, state]);
    }
}

/// What systemd's `RestartSec=2s` waits before starting a failed unit again.
const RESTART_SEC: Duration = Duration::from_secs(2);

/// Takes `n` down as `kill` says; returns the pids it froze (empty unless [`Kill::Freeze`]).
fn take_down(
    c: &mut Cluster,
    n: NodeId,
    kill: Kill,
    agents: &mut [Option<Background>; 2],
) -> Vec<u32> {
    match kill {
        Kill::ProcessesLinkUp => {
            c.kill_processes(n);
            agents[n as usize] = None; // killed with the rest
            std::thread::sleep(RESTART_SEC);
            c.start(n);
            agents[n as usize] = Some(spawn_agent(c, n));
        }
        Kill::BlockdRestart => {
            c.kill(n);
            std::thread::sleep(RESTART_SEC);
            c.start(n);
        }
        Kill::PowerCut => {
            // Every link at once, the witness's first: a dying primary that still reached the
            // witness could renew as degraded, which the peer must (and does) treat as "may
            // have acknowledged alone" — not a power cut.
            links(c, n, "down");
            c.kill_node(n);
        }
        Kill::Freeze => {
            let pids = c.lan().mount_ns(n).pids();
            for &p in &pids {
                blockd_tests::cmd::signal(p, libc::SIGSTOP);
            }
            // A frozen node's kernel is frozen too: it answers nothing, not even ARP for the
            // VIP (which a SIGSTOP alone would leave answered).
            links(c, n, "down");
            return pids;
        }
    }
    Vec::new()
}

/// After [`take_down`]: thaws what was frozen (its agent demotes it), or reboots a node that
/// lost power and starts its daemon and agent again; restarted ones are back already.
fn bring_back(
    c: &mut Cluster,
    n: NodeId,
    kill: Kill,
    frozen: &[u32],
    agents: &mut [Option<Background>; 2],
) {
    if kill == Kill::Freeze {
        links(c, n, "up");
    }
    for &p in frozen {
        blockd_tests::cmd::signal(p, libc::SIGCONT);
    }
    if kill != Kill::PowerCut {
        return;
    }
    agents[n as usize] = None; // killed with the node
    c.reboot_node(n);
    c.netns(n).ip(&["link", "set", WITNESS_IFACE, "up"]);
    c.start(n);
    agents[n as usize] = Some(spawn_agent(c, n));
}

fn report(what: &str, mut times: Vec<Duration>) {
    times.sort();
    let secs: Vec<String> = times.iter().map(|d| format!("{:.2}", d.as_secs_f64())).collect();
    eprintln!(
        "{what}: kill → SELECT 1 through the VIP over {} runs: {secs:?} s; median {:.2} s, max {:.2} s",
        times.len(),
        times[times.len() / 2].as_secs_f64(),
        times[times.len() - 1].as_secs_f64()
    );
}

/// The failover matrix (issue 16), default timings, 5 runs each: every process killed with
/// the link up (the FIN arrives first).
#[test]
fn matrix_processes_killed_link_up() {
    report("processes killed, link up", failover_series("agent-mx-fin", Kill::ProcessesLinkUp, 5));
}

/// blockd alone SIGKILLed under a running stack and restarted 2 s later.
#[test]
fn matrix_blockd_killed_and_restarted() {
    report("blockd restarted", failover_series("agent-mx-restart", Kill::BlockdRestart, 5));
}

/// Link down first, then every process (a power cut).
#[test]
fn matrix_power_cut() {
    report("power cut", failover_series("agent-mx-cut", Kill::PowerCut, 5));
}

/// The whole node SIGSTOPped until the peer took over (longer than the lease), then thawed:
/// it demotes itself and rejoins.
#[test]
fn matrix_node_frozen_then_thawed() {
    report("node frozen", failover_series("agent-mx-freeze", Kill::Freeze, 5));
}

/// 20 automatic failovers in a row with the default timings, alternating power cuts of alpha
/// and beta with a resync in between: no acknowledged commit lost, one Primary after each.
#[test]
fn twenty_failovers_in_a_row_lose_nothing() {
    report("20 failovers", failover_series("agent-twenty", Kill::PowerCut, 20));
}

/// The replication link is cut, both nodes still reach the witness (and the client reaches
/// alpha): alpha keeps the lease and keeps committing; beta's agent sees alpha renew after
/// the link went down and does not promote. Exactly one Primary; healed, nothing is lost.
#[test]
fn replication_cut_with_witness_reachable_keeps_one_primary() {
    let (c, _w, agents) = mariadb_with_agents("agent-cut");
    let client = DbClient::start(&c);
    client.wait_acked(0, 30, SYNC).unwrap_or_else(|e| panic!("{e}"));
    c.add_rule(Alpha, "input", &format!("ip saddr {} drop", Beta.ip()));
    c.add_rule(Beta, "input", &format!("ip saddr {} drop", Alpha.ip()));
    c.wait_for(Beta, "peer gone", SYNC, |v| !is_connected(v));
    let done = client.read().acked.len();
    client.wait_acked(done, 30, SYNC).unwrap_or_else(|e| panic!("cut: {e}"));
    std::thread::sleep(TERM_D * 4);
    let (a, b) = (c.vol(Alpha), c.vol(Beta));
    assert_eq!((a["role"].as_str(), b["role"].as_str()), (Some("Primary"), Some("Secondary")));
    assert!(!frozen(&a) && lease_held(&a), "alpha writes degraded under its lease: {a:#}");
    assert!(a["counters"]["degraded_writes"].as_u64().unwrap() > 0);
    let blog = agents[1].log_text();
    assert!(blog.contains("renewed its lease") && blog.contains("promote by hand"), "{blog}");
    assert!(!blog.contains("PROMOTE"), "{blog}");
    c.heal();
    c.wait_in_sync(SYNC);
    let log = client.stop();
    assert_no_lost_commit(&c, &log);
    eprintln!("{} commits acknowledged, none lost; agent on beta:\n{blog}", log.acked.len());
}

/// The witness restarts right after the primary node died: it grants nobody new for one
/// term, so beta's lease (and promotion) comes no earlier than a term after the restart;
/// then beta takes over and nothing is lost.
#[test]
fn witness_restart_mid_failover_grants_no_second_lease_within_a_term() {
    let (mut c, mut w, agents) = mariadb_with_agents("agent-wrestart");
    let client = DbClient::start(&c);
    client.wait_acked(0, 30, SYNC).unwrap_or_else(|e| panic!("{e}"));
    c.kill_node(Alpha);
    w.kill();
    w.start(TERM);
    let restarted = Instant::now();
    c.wait_for(Beta, "Primary", Duration::from_secs(90), |v| v["role"] == "Primary");
    let after = restarted.elapsed();
    eprintln!("witness restart → beta Primary: {:.2} s (term {TERM})", after.as_secs_f64());
    assert!(after >= TERM_D, "beta promoted {after:?} after the restart, within a term");
    assert_took_over(&c, Beta, client);
    let wlog = w.logs();
    eprintln!("agent on beta:\n{}", agents[1].log_text());
    assert!(wlog.contains("beta"), "{wlog}");
}

/// The primary node freezes (every process SIGSTOPped, its links silent) for longer than
/// the lease, then thaws: beta took over meanwhile; thawed alpha finds its epoch lost, fails
/// what was waiting (nothing acknowledged after beta's promotion: every commit the client
/// saw acknowledged is on beta), its agent demotes it, and it rejoins as Secondary.
#[test]
fn frozen_primary_thaws_into_a_secondary() {
    let (c, _w, agents) = mariadb_with_agents("agent-freeze");
    let client = DbClient::start(&c);
    client.wait_acked(0, 30, SYNC).unwrap_or_else(|e| panic!("{e}"));
    let pids = c.lan().mount_ns(Alpha).pids();
    for &p in &pids {
        blockd_tests::cmd::signal(p, libc::SIGSTOP);
    }
    c.netns(Alpha).ip(&["link", "set", IFACE, "down"]);
    c.netns(Alpha).ip(&["link", "set", WITNESS_IFACE, "down"]);
    let t0 = Instant::now();
    mariadb::wait_select_1(&c, Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("{e}\nagent beta:\n{}{}", agents[1].log_text(), c.diag(Beta)));
    eprintln!("freeze → SELECT 1 on beta: {:.2} s", t0.elapsed().as_secs_f64());
    std::thread::sleep(TERM_D);
    let acked_before_thaw = client.read().acked.len();
    c.netns(Alpha).ip(&["link", "set", IFACE, "up"]);
    c.netns(Alpha).ip(&["link", "set", WITNESS_IFACE, "up"]);
    for &p in &pids {
        blockd_tests::cmd::signal(p, libc::SIGCONT);
    }
    let thawed = Instant::now();
    c.wait_for(Alpha, "Secondary, resynced from beta", Duration::from_secs(180), |v| {
        v["role"] == "Secondary" && v["conn"] == "Connected" && v["disk"] == "UpToDate"
    });
    eprintln!("thaw → alpha Secondary and in sync: {:.2} s", thawed.elapsed().as_secs_f64());
    assert_eq!(c.vol(Beta)["role"], "Primary");
    let alog = agents[0].log_text();
    assert!(alog.contains("agent: DEMOTE"), "{alog}");
    client.wait_acked(acked_before_thaw, 10, SYNC).unwrap_or_else(|e| panic!("{e}"));
    let log = client.stop();
    assert_no_lost_commit(&c, &log);
    let a = c.log_text(Alpha);
    assert!(a.contains("lease was lost") || a.contains("no lease"), "{a}");
    eprintln!("{} commits acknowledged, none lost; agent on alpha:\n{alog}", log.acked.len());
}

/// `failback = "auto"`, alpha preferred: alpha dies, beta takes over; alpha returns, resyncs,
/// and once it stayed in sync for `failback-delay` beta's agent swaps the service back to it.
/// Nothing acknowledged is lost.
#[test]
fn failback_auto_returns_the_service_to_the_preferred_node() {
    let extra = "[agent]\nfailback = \"auto\"\npreferred = \"alpha\"\nfailback-delay = \"3s\"\n\n";
    let (mut c, _w, agents) = mariadb_with_agents_and("agent-failback", extra);
    let mut agents = agents.map(Some);
    let client = DbClient::start(&c);
    client.wait_acked(0, 30, SYNC).unwrap_or_else(|e| panic!("{e}"));
    c.kill_node(Alpha);
    agents[0] = None;
    mariadb::wait_select_1(&c, Duration::from_secs(90)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.vol(Beta)["role"], "Primary");
    let done = client.read().acked.len();
    client.wait_acked(done, 20, SYNC).unwrap_or_else(|e| panic!("{e}"));

    c.reboot_node(Alpha);
    c.start(Alpha);
    agents[0] = Some(spawn_agent(&c, Alpha));
    let back = Instant::now();
    c.wait_for(Alpha, "in sync again", Duration::from_secs(120), |v| {
        v["conn"] == "Connected" && v["disk"] == "UpToDate" && v["out_of_sync"] == 0
    });
    let synced = back.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.vol(Alpha)["role"] != "Primary" {
        let log = |i: usize| agents[i].as_ref().map(|a| a.log_text()).unwrap_or_default();
        assert!(
            Instant::now() < deadline,
            "no failback within 60 s; alpha {:#}\nbeta {:#}\nagent alpha:\n{}\nagent beta:\n{}",
            c.vol(Alpha),
            c.vol(Beta),
            log(0),
            log(1)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    mariadb::wait_select_1(&c, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "alpha back: in sync after {:.2} s, serving again after {:.2} s (failback-delay 3 s)",
        synced.as_secs_f64(),
        back.elapsed().as_secs_f64()
    );
    assert!(back.elapsed() >= synced + Duration::from_secs(3), "swapped before the delay");
    assert_eq!(c.vol(Beta)["role"], "Secondary");
    // The swap returns once alpha's promote (which already serves) reported back.
    let blog = || agents[1].as_ref().map(|a| a.log_text()).unwrap_or_default();
    let deadline = Instant::now() + SYNC;
    while !blog().contains("failed-back in") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let blog = blog();
    assert!(blog.contains("agent: FAILBACK") && blog.contains("failed-back in"), "{blog}");
    let done = client.read().acked.len();
    client.wait_acked(done, 20, SYNC).unwrap_or_else(|e| panic!("{e}"));
    let log = client.stop();
    assert_no_lost_commit(&c, &log);
    eprintln!("{} commits acknowledged, none lost; agent on beta:\n{blog}", log.acked.len());
}

/// SIGKILL of mariadbd on node `n` (its pidfile), nothing else.
fn kill_mariadbd(c: &Cluster, n: NodeId) {
    c.run_on(n, "kill -9 $(cat /run/mysqld/mysqld.pid)").assert_success();
}

/// Waits until `agent`'s log has `n` lines containing `what`.
fn wait_log_count(agent: &Background, what: &str, n: usize) {
    let deadline = Instant::now() + LIVENESS * 2;
    while agent.log_text().matches(what).count() < n {
        assert!(Instant::now() < deadline, "no {n} × {what:?}:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The tally of `blockctl status --json`'s `agent` on `n` (`agent.json`): `restarts` or
/// `swaps`, once `key` has reached `want` (Err with the state after 20 s).
fn wait_tally(c: &Cluster, n: NodeId, field: &str, key: &str, want: u64) -> Result<(), String> {
    let deadline = Instant::now() + LIVENESS;
    loop {
        let mut cmd = c.blockctl(n);
        cmd.args(["status", "--json"]);
        let out = blockd_tests::cmd::try_run(&mut cmd, Duration::from_secs(30));
        let v: Value = serde_json::from_str(&out.stdout).unwrap_or_default();
        let got = v["agent"][field][key].as_u64();
        if got == Some(want) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "agent {field}[{key:?}] is {got:?}, want {want}: {:#}",
                v["agent"]
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// mariadbd alone SIGKILLed, default timings (issue 16): the agent restarts it in place
/// (`restart-after`), twice; the third time it dies within the window, the agent moves the
/// stack to the peer (swap). Every acknowledged commit is there, one Primary in sync; the
/// agent's tally (`blockctl status`) counts both restarts and the swap with its reason.
#[test]
fn mariadbd_killed_is_restarted_in_place_then_moved_when_it_keeps_dying() {
    let (c, _w, agents) = defaults_with_agents("agent-mx-mariadbd");
    let client = DbClient::start(&c);
    for i in 1..=2 {
        let done = client.read().acked.len();
        client.wait_acked(done, 5, SYNC).unwrap_or_else(|e| panic!("{e}"));
        let t0 = Instant::now();
        kill_mariadbd(&c, Alpha);
        wait_log_count(&agents[0], "agent: restarted service mariadb", i);
        let done = client.read().acked.len();
        client.wait_acked(done, 1, LIVENESS).unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "mariadbd kill {i} → commit (restarted in place): {:.2} s",
            t0.elapsed().as_secs_f64()
        );
        assert_eq!(c.vol(Alpha)["role"], "Primary", "restarted in place");
        wait_tally(&c, Alpha, "restarts", "service mariadb", i as u64)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let done = client.read().acked.len();
    client.wait_acked(done, 5, SYNC).unwrap_or_else(|e| panic!("{e}"));
    let t0 = Instant::now();
    kill_mariadbd(&c, Alpha);
    c.wait_for(Beta, "Primary (swapped)", LIVENESS * 3, |v| v["role"] == "Primary");
    assert_eq!(one_primary_in_sync(&c, 3), Beta, "moved to the peer");
    let done = client.read().acked.len();
    client.wait_acked(done, 1, LIVENESS).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("mariadbd kill 3 → commit on beta (swap): {:.2} s", t0.elapsed().as_secs_f64());
    let alog = agents[0].log_text();
    assert!(alog.contains("agent: SWAP") && alog.contains("after 2 restart(s)"), "{alog}");
    let why = "health: service mariadb";
    wait_tally(&c, Alpha, "swaps", why, 1).unwrap_or_else(|e| panic!("{e}\n{alog}"));
    let log = client.stop();
    assert_no_lost_commit(&c, &log);
}
