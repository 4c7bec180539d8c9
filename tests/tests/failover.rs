//! Failover of the whole stack (issue 5, "What it must show"): `blockctl promote`, `demote`
//! and `swap` on the two-node harness with a bridge and a client namespace
//! (`Cluster::with_lan`): ext4 on the mirror, the VIP, MariaDB started by a `start` command,
//! nfs-ganesha, real clients (the `mariadb` CLI, `nfs-cp`, ICMP echo) in the client
//! namespace.
//!
//! The oracle of "no commit lost" is the client's log: an id is logged only after the
//! server answered the statement that follows its INSERT (autocommit), so every logged id
//! must be in the table afterwards, whichever node serves it.
//!
//! Timing figures (promote duration by step, kill → `SELECT 1` through the VIP) are printed
//! with eprintln; `cargo test -- --nocapture` shows them.

use std::time::{Duration, Instant};

use blockd_tests::{
    cluster::{
        failover::step_lines,
        ganesha,
        lan::{Lan, IFACE, VIP, VIP_CIDR},
        mariadb::{self, ClientLog, DbClient, DATADIR},
        Alpha, Beta, Cluster, NodeId,
    },
    cmd::{cmd, run_timeout, Background},
    nbd::RawClient,
};
use serde_json::Value;

const SYNC: Duration = Duration::from_secs(60);

fn is_connected(v: &Value) -> bool {
    ["Connected", "SyncSource", "SyncTarget"].iter().any(|s| v["conn"] == *s)
}

/// Promotes `n`, prints the per-step timing, waits for `SELECT 1` through the VIP.
fn promote_ready(c: &Cluster, n: NodeId, extra: &[&str]) {
    let (out, took) = c.promote(n, extra);
    eprintln!("promote {} {extra:?}: {:.2} s in all; steps:", n.name(), took.as_secs_f64());
    for l in step_lines(&out) {
        eprintln!("  {l}");
    }
    mariadb::wait_select_1(c, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("after promote on {}: {e}{}", n.name(), c.diag(n)));
}

/// What `findmnt` says is mounted at `path` on `n`: "FSTYPE SOURCE", or "" when nothing.
fn mounted(c: &Cluster, n: NodeId, path: &str) -> String {
    let out = c.run_on(n, &format!("findmnt -n -o FSTYPE,SOURCE --mountpoint {path}"));
    out.stdout.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The pid in MariaDB's pid file on `n` ("" when none).
fn mariadb_pid(c: &Cluster, n: NodeId) -> String {
    c.run_on(n, "cat /run/mysqld/mysqld.pid 2>/dev/null").stdout.trim().to_string()
}

/// Kills `from` (whole node), waits for the survivor to see its peer gone, and force-promotes
/// it. Returns (kill → peer seen gone, promote wall time, kill → SELECT 1 through the VIP).
fn fail_over(c: &mut Cluster, from: NodeId) -> (Duration, Duration, Duration) {
    let to = from.other();
    let t0 = Instant::now();
    c.kill_node(from);
    c.wait_for(to, "peer gone", Duration::from_secs(30), |v| !is_connected(v));
    let detect = t0.elapsed();
    let (out, promote) = c.promote(to, &["--force"]);
    eprintln!("promote --force on {}: {:.2} s; steps:", to.name(), promote.as_secs_f64());
    for l in step_lines(&out) {
        eprintln!("  {l}");
    }
    let answered = mariadb::wait_select_1(c, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("after failover to {}: {e}{}", to.name(), c.diag(to)));
    let total = answered - t0;
    eprintln!(
        "failover {}→{}: peer seen gone after {:.2} s, promote {:.2} s, kill → SELECT 1 \
         through the VIP {:.2} s",
        from.name(),
        to.name(),
        detect.as_secs_f64(),
        promote.as_secs_f64(),
        total.as_secs_f64()
    );
    (detect, promote, total)
}

/// The harness itself: bridge and client namespace, per-node mount namespaces (isolated
/// /run/mysqld), the MariaDB datadir prepared on the mirror leaving both nodes clean,
/// `kill_node` (processes found by namespace, link down), and cleanup of all of it on drop.
#[test]
fn harness_lan_mount_namespaces_kill_node_and_cleanup() {
    let (names, dir);
    {
        let mut c = mariadb::cluster("fo-harness");
        names = [c.netns(Alpha).name().to_string(), c.lan().client_netns().name().to_string()];
        dir = c.dir().to_path_buf();
        for n in [Alpha, Beta] {
            assert!(c.lan().ping(n.ip(), 5), "client cannot ping {}", n.name());
            c.check_clean(n, Duration::ZERO).unwrap_or_else(|e| panic!("after set-up: {e}"));
            assert_eq!(c.vol(n)["role"], "Secondary");
        }
        c.run_on(Alpha, "touch /run/mysqld/only-on-alpha").assert_success();
        let seen = c.run_on(Beta, "test -e /run/mysqld/only-on-alpha");
        assert!(!seen.status.success(), "beta sees alpha's /run/mysqld");
        assert_ne!(Lan::mac(c.netns(Alpha)), Lan::mac(c.netns(Beta)));
        let mut sh = c.lan().mount_ns(Alpha).command("sh");
        sh.args(["-c", "sleep 600 & sleep 600"]);
        let mut bg = Background::spawn(&mut sh, &dir.join("sleeper.log"));
        blockd_tests::cmd::wait_for("two sleepers", Duration::from_secs(10), || {
            c.node_processes(Alpha).len() >= 2
        });
        c.kill_node(Alpha);
        assert!(bg.wait(Duration::from_secs(5)).is_some(), "kill_node left a process");
        assert!(c.node_processes(Alpha).is_empty(), "{:?}", c.node_processes(Alpha));
        assert!(!c.lan().ping(Alpha.ip(), 2), "alpha still answers after kill_node");
    }
    for name in names {
        assert!(!std::path::Path::new("/run/netns").join(&name).exists(), "{name} left behind");
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!mountinfo.contains(dir.to_str().expect("utf-8")), "mounts left under {dir:?}");
}

/// (device name, diskseq) of each loop device bound now.
fn bound_loops() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/block").expect("/sys/block").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("loop") && e.path().join("loop/backing_file").exists() {
            let seq = std::fs::read_to_string(e.path().join("diskseq")).unwrap_or_default();
            out.push((name, seq.trim().to_string()));
        }
    }
    out
}

/// A test that panics with the stack up on a node (nbdfuse, loop device, ext4, MariaDB) after
/// the FUSE file's mount went away under the loop device (as a reboot's lazy unmount leaves
/// it: the backing path reads `/nbd` then, nothing names the test directory) leaves no loop
/// device of its own bound: the harness detaches what it saw attached, by device and
/// attachment (issue 16: full runs leaked `/nbd` loop devices).
#[test]
fn a_panic_with_the_stack_up_leaves_no_loop_device_bound() {
    let mut ours = Vec::new();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let c = mariadb::cluster("fo-panic");
        c.promote(Alpha, &[]);
        let devs: Vec<String> = c.loops(Alpha).iter().map(|d| d.replace("/dev/", "")).collect();
        ours = bound_loops().into_iter().filter(|(d, _)| devs.contains(d)).collect();
        let fuse = c.dir().join("alpha/run/attach").join(mariadb::VOLUME);
        c.run_on(Alpha, &format!("umount -l {}", fuse.display())).assert_success();
        for (dev, _) in &ours {
            let path = std::fs::read_to_string(format!("/sys/block/{dev}/loop/backing_file"));
            assert!(!path.unwrap_or_default().contains("blockd-test"), "{dev} still names it");
        }
        assert!(!ours.is_empty(), "promote attached no loop device");
        panic!("on purpose, with the stack up");
    }));
    assert!(r.is_err(), "the body panics");
    blockd_tests::cmd::wait_for("the test's loop devices detached", SYNC, || {
        bound_loops().iter().all(|l| !ours.contains(l))
    });
}

/// "N failed connects; lost sessions: [...]" for the test log.
fn failure_summary(log: &ClientLog) -> String {
    let connects = log.failures.iter().filter(|f| !f.statement).count();
    let sessions: Vec<String> = log
        .failures
        .iter()
        .filter(|f| f.statement)
        .map(|f| format!("id {} after {} commits: {}", f.id, f.ok_on_conn, f.detail))
        .collect();
    format!("{connects} failed connection attempts; lost sessions: {sessions:#?}")
}

/// promote on alpha: ext4 mounted from the mirror, the VIP answering ping and TCP from the
/// client, MariaDB answering `SELECT 1` through the VIP. promote again: no change, exit 0.
#[test]
fn promote_mounts_adds_vip_and_starts_mariadb() {
    let c = mariadb::cluster("fo-promote");
    assert_eq!(mounted(&c, Alpha, DATADIR), "", "nothing mounted before promote");
    promote_ready(&c, Alpha, &[]);

    assert_eq!(c.vol(Alpha)["role"], "Primary");
    let m = mounted(&c, Alpha, DATADIR);
    assert!(m.starts_with("ext4 /dev/loop"), "{DATADIR} on alpha: {m:?}");
    let loops = c.loops(Alpha);
    assert_eq!(loops.len(), 1, "one loop device on the mirror's nbdfuse file: {loops:?}");
    assert!(m.ends_with(&loops[0]), "mounted from {m:?}, the test's loop device is {loops:?}");
    assert!(Lan::holds_vip(c.netns(Alpha)) && !Lan::holds_vip(c.netns(Beta)));
    assert!(c.lan().ping(VIP, 5), "VIP does not answer ping from the client");
    let greeting = c.lan().tcp_greeting(VIP, 3306).unwrap_or_else(|e| panic!("TCP: {e}"));
    let text = String::from_utf8_lossy(&greeting);
    assert!(text.contains("MariaDB"), "port 3306 through the VIP greets with {text:?}");
    assert_eq!(mounted(&c, Beta, DATADIR), "", "beta must not mount anything");

    let before = (c.lan().mount_ns(Alpha).added_mounts(), loops, mariadb_pid(&c, Alpha));
    let again = c.blockctl_run(Alpha, &["promote"]);
    assert!(again.status.success(), "second promote must exit 0:\n{again}");
    let after = (c.lan().mount_ns(Alpha).added_mounts(), c.loops(Alpha), mariadb_pid(&c, Alpha));
    assert_eq!(before, after, "second promote changed mounts, loop devices or mariadbd");
    assert!(!after.2.is_empty(), "mariadbd has no pid file");
    assert!(Lan::holds_vip(c.netns(Alpha)));
    mariadb::wait_select_1(&c, Duration::from_secs(5)).unwrap_or_else(|e| panic!("{e}"));
}

/// Inserts through the VIP; alpha dies (all its processes SIGKILLed, link down); `promote
/// --force` on beta; every acknowledged id is there, the client reconnects and carries on,
/// and the client's neighbour entry for the VIP holds beta's MAC (the gratuitous ARP
/// arrived: the entry is pinned to alpha's MAC as REACHABLE just before the promote, so only
/// an ARP from beta can change it within seconds).
#[test]
fn kill_primary_then_force_promote_keeps_every_commit() {
    let mut c = mariadb::cluster("fo-kill");
    promote_ready(&c, Alpha, &[]);
    let client = DbClient::start(&c);
    client.wait_acked(0, 50, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    let (amac, bmac) = (Lan::mac(c.netns(Alpha)), Lan::mac(c.netns(Beta)));
    assert_ne!(amac, bmac);

    let t0 = Instant::now();
    c.kill_node(Alpha);
    c.wait_for(Beta, "peer gone", Duration::from_secs(30), |v| !is_connected(v));
    let client_ns = c.lan().client_netns().name().to_string();
    let pin = ["-n", &client_ns, "neigh", "replace", VIP, "lladdr", &amac, "dev", IFACE];
    run_timeout(&mut cmd("ip", &[&pin[..], &["nud", "reachable"]].concat()), SYNC);
    let acked_at_kill = client.read().acked.len();
    let (out, took) = c.promote(Beta, &["--force"]);
    eprintln!("promote --force on beta: {:.2} s; steps:", took.as_secs_f64());
    for l in step_lines(&out) {
        eprintln!("  {l}");
    }
    let neigh = c.lan().client_neighbour(VIP);
    assert!(
        neigh.as_ref().is_some_and(|(mac, _)| *mac == bmac),
        "client's neighbour entry for the VIP: {neigh:?}, beta's MAC {bmac}, alpha's {amac}"
    );
    let answered = mariadb::wait_select_1(&c, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}{}", c.diag(Beta)));
    eprintln!("kill → SELECT 1 through the VIP: {:.2} s", (answered - t0).as_secs_f64());
    assert_eq!(c.vol(Beta)["role"], "Primary");
    assert!(mounted(&c, Beta, DATADIR).starts_with("ext4 /dev/loop"));

    client.wait_acked(acked_at_kill, 30, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    let log = client.stop();
    let ids = mariadb::assert_no_lost_commit(&c, &log);
    eprintln!(
        "{} commits acknowledged ({acked_at_kill} before the kill), {} rows; {}",
        log.acked.len(),
        ids.len(),
        failure_summary(&log)
    );
}

/// swap alpha→beta→alpha while the client inserts: no commit fails once the client has
/// reconnected (a session that connected never fails its first commit), nothing is lost.
#[test]
fn swap_under_load_loses_nothing() {
    let c = mariadb::cluster("fo-swap");
    promote_ready(&c, Alpha, &[]);
    let client = DbClient::start(&c);
    client.wait_acked(0, 30, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    for (from, to) in [(Alpha, Beta), (Beta, Alpha)] {
        let t = Instant::now();
        let out = c.blockctl_run(from, &["swap"]);
        assert!(out.status.success(), "swap on {} failed:\n{out}{}", from.name(), c.diag(to));
        let acked = client.read().acked.len();
        client.wait_acked(acked, 30, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("swap {}→{}: {:.2} s, steps:", from.name(), to.name(), t.elapsed().as_secs_f64());
        for l in step_lines(&out) {
            eprintln!("  {l}");
        }
        assert_eq!(c.vol(to)["role"], "Primary");
        assert_eq!(c.vol(from)["role"], "Secondary");
        assert!(Lan::holds_vip(c.netns(to)));
        c.check_clean(from, Duration::from_secs(3)).unwrap_or_else(|e| panic!("{e}"));
    }
    let log = client.stop();
    assert!(log.ended, "client did not finish cleanly");
    eprintln!("{} commits acknowledged; {}", log.acked.len(), failure_summary(&log));
    let after_reconnect: Vec<_> =
        log.failures.iter().filter(|f| f.statement && f.ok_on_conn == 0).collect();
    assert!(after_reconnect.is_empty(), "commits failed after reconnect: {after_reconnect:#?}");
    let sessions_lost = log.failures.iter().filter(|f| f.statement && f.ok_on_conn > 0).count();
    assert!(sessions_lost <= 2, "{sessions_lost} sessions lost for 2 swaps: {:#?}", log.failures);
    mariadb::assert_no_lost_commit(&c, &log);
}

/// Each failure injected in turn (fsck, mount, MariaDB start, VIP held elsewhere) makes
/// promote exit non-zero naming the step, undo what it did, and leave alpha Secondary with
/// no mount, loop device, VIP or process; after all of them a clean promote still works.
#[test]
fn failed_step_rolls_back_and_leaves_node_clean() {
    let mut c = mariadb::cluster("fo-inject");
    let results = vec![
        ("fsck", inject_fsck(&c)),
        ("mount", inject_with_config(&mut c, "mount", mount_on_a_file)),
        ("mariadb", inject_with_config(&mut c, "mariadb", service_exits)),
        ("vip", inject_vip_held(&c)),
    ];
    for (what, r) in &results {
        eprintln!(
            "injected {what} failure: {}",
            r.as_ref().map_or_else(|e| e.clone(), |_| "ok".into())
        );
    }
    let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(failed.is_empty(), "{} of 4 injections misbehaved: {failed:#?}", failed.len());
    promote_ready(&c, Alpha, &[]);
}

/// Runs promote on alpha, expecting it to fail in `step`; then alpha must be Secondary and
/// clean.
fn expect_failed_promote(c: &Cluster, step: &str) -> Result<(), String> {
    let out = c.blockctl_run(Alpha, &["promote"]);
    if out.status.success() {
        let diag = c.diag(Alpha);
        let _ = c.blockctl_run(Alpha, &["demote"]);
        return Err(format!("promote succeeded despite the {step} failure{diag}"));
    }
    let text = format!("{}{}", out.stdout, out.stderr);
    let mut problems = Vec::new();
    if !text.contains(step) {
        problems.push(format!("output does not name the failing step {step:?}"));
    }
    let role = c.vol(Alpha)["role"].clone();
    if role != "Secondary" {
        problems.push(format!("role is {role} after the rollback"));
    }
    if let Err(e) = c.check_clean(Alpha, Duration::from_secs(3)) {
        problems.push(e);
    }
    match problems.is_empty() {
        true => Ok(()),
        false => Err(format!("{}\n{out}", problems.join("; "))),
    }
}

/// Breaks the ext4 superblock's magic through NBD (alpha briefly Primary, nothing mounted):
/// `e2fsck -p` does not try backup superblocks, it exits 8. Restored afterwards.
fn inject_fsck(c: &Cluster) -> Result<(), String> {
    let original = rewrite_block0(c, |b| {
        b[1024 + 56] = 0;
        b[1024 + 57] = 0;
    });
    let r = expect_failed_promote(c, "fsck");
    rewrite_block0(c, |b| *b = original.clone());
    r
}

/// Applies `f` to the first 4 KiB of the volume (through alpha, made Primary for it) and
/// returns what was there before; both nodes are in sync and Secondary afterwards.
fn rewrite_block0(c: &Cluster, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    c.wait_in_sync(SYNC);
    c.role(Alpha, "primary", false).unwrap_or_else(|e| panic!("role primary: {e}"));
    {
        let (mut nbd, _) = RawClient::transmission(&c.socket(Alpha), mariadb::VOLUME);
        let before = nbd.read(0, 4096).unwrap_or_else(|e| panic!("READ error {e}"));
        let mut block = before.clone();
        f(&mut block);
        assert_eq!(nbd.write(0, &block), 0, "WRITE of block 0 failed");
        assert_eq!(nbd.flush(), 0, "FLUSH failed");
        drop(nbd);
        c.wait_for(Alpha, "no NBD clients", SYNC, |v| v["clients"] == 0);
        c.role(Alpha, "secondary", false).unwrap_or_else(|e| panic!("role secondary: {e}"));
        c.wait_in_sync(SYNC);
        before
    }
}

/// A config variant for alpha's blockctl (`tweak` edits the spec), one failed promote,
/// then the original config again.
fn inject_with_config(
    c: &mut Cluster,
    step: &str,
    tweak: fn(&Cluster, &mut blockd_tests::cluster::Spec),
) -> Result<(), String> {
    let original = c.config(Alpha).to_path_buf();
    let mut spec = c.spec();
    tweak(c, &mut spec);
    let variant = c.dir().join(format!("blockd-{step}.toml"));
    c.write_config(&variant, &spec);
    c.use_config(Alpha, &variant);
    let r = expect_failed_promote(c, step);
    c.use_config(Alpha, &original);
    r
}

/// The mount point is a regular file.
fn mount_on_a_file(c: &Cluster, spec: &mut blockd_tests::cluster::Spec) {
    let file = c.dir().join("mount-point-is-a-file");
    std::fs::write(&file, b"not a directory").expect("write file");
    spec.volume_toml = format!("filesystem = \"ext4\"\nmount = \"{}\"\n", file.display());
}

/// mariadbd refuses an unknown option and exits at once; the health check never passes.
fn service_exits(_: &Cluster, spec: &mut blockd_tests::cluster::Spec) {
    let start = mariadb::start_command("--no-such-option-for-this-test");
    spec.extra_toml = mariadb::failover_toml() + &mariadb::service_toml(&start, "10s");
}

/// The client namespace holds the VIP already.
fn inject_vip_held(c: &Cluster) -> Result<(), String> {
    let client = c.lan().client_netns();
    client.ip(&["addr", "add", VIP_CIDR, "dev", IFACE]);
    let r = expect_failed_promote(c, "vip");
    client.ip(&["addr", "del", VIP_CIDR, "dev", IFACE]);
    r
}

/// demote while a process that ignores SIGTERM has its cwd and an open file on the mount:
/// the unmount escalates (SIGTERM, then SIGKILL of the holders) and the node ends clean.
#[test]
fn demote_kills_holders_of_the_mount() {
    let c = mariadb::cluster("fo-holder");
    promote_ready(&c, Alpha, &[]);
    let mut sh = c.lan().mount_ns(Alpha).command("sh");
    let hold = format!(
        "trap '' TERM; cd {DATADIR} && exec 3<{DATADIR}/ibdata1; while :; do sleep 1; done"
    );
    sh.args(["-c", &hold]);
    let mut holder = Background::spawn(&mut sh, &c.dir().join("holder.log"));
    let pid = holder.pid();
    blockd_tests::cmd::wait_for("holder in the datadir", Duration::from_secs(10), || {
        std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|p| p.ends_with("mysql"))
    });

    let out = c.blockctl_run(Alpha, &["demote"]);
    assert!(out.status.success(), "demote failed:\n{out}{}", c.diag(Alpha));
    let status = holder.wait(Duration::from_secs(10));
    assert!(status.is_some(), "the holder survived demote");
    assert_eq!(c.vol(Alpha)["role"], "Secondary");
    c.check_clean(Alpha, Duration::from_secs(3)).unwrap_or_else(|e| panic!("{e}"));
}

/// NFS for real: ganesha on the mirror; files written with `nfs-cp` through the VIP before
/// alpha dies read back identical through the VIP from beta.
#[test]
fn nfs_files_survive_failover() {
    let mut c = ganesha::cluster("fo-nfs");
    let (out, took) = c.promote(Alpha, &[]);
    eprintln!(
        "promote (nfs) on alpha: {:.2} s; steps: {:#?}",
        took.as_secs_f64(),
        step_lines(&out)
    );
    let m = mounted(&c, Alpha, ganesha::STATE_TARGET);
    assert!(m.starts_with("ext4 /dev/loop"), "state bind on alpha: {m:?}");
    // libnfs 4.0's nfs-cp fails NFSv4 writes of a few KiB and more against ganesha 4.3
    // ("Failed to write to dest file"): several small files instead of one big one.
    let files: Vec<(String, Vec<u8>)> =
        (0..4).map(|i| (format!("f{i}.bin"), blockd_tests::pattern(100 + i, 1500))).collect();
    let wait = Duration::from_secs(60);
    for (name, data) in &files {
        ganesha::put(&c, name, data, wait)
            .unwrap_or_else(|e| panic!("nfs-cp to {name}: {e}{}", c.diag(Alpha)));
    }
    for (name, data) in &files {
        let got = ganesha::get(&c, name, wait).unwrap_or_else(|e| panic!("nfs-cp {name}: {e}"));
        blockd_tests::assert_bytes_eq(&got, data, &format!("{name} before failover"));
    }

    c.kill_node(Alpha);
    c.wait_for(Beta, "peer gone", Duration::from_secs(30), |v| !is_connected(v));
    let t = Instant::now();
    let (out, _) = c.promote(Beta, &["--force"]);
    eprintln!("promote --force (nfs) on beta: steps: {:#?}", step_lines(&out));
    for (name, data) in &files {
        let got = ganesha::get(&c, name, Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("nfs-cp {name} after failover: {e}{}", c.diag(Beta)));
        blockd_tests::assert_bytes_eq(&got, data, &format!("{name} after failover"));
    }
    eprintln!("promote → files read back through the VIP: {:.2} s", t.elapsed().as_secs_f64());
}

/// Failover time (kill → `SELECT 1` through the VIP) over 5 runs, median and max. Slow:
/// a fresh cluster per run.
#[test]
#[ignore]
fn failover_time_five_runs() {
    let mut totals = Vec::new();
    for run in 0..5 {
        let mut c = mariadb::cluster(&format!("fo-time{run}"));
        promote_ready(&c, Alpha, &[]);
        let (_, _, total) = fail_over(&mut c, Alpha);
        totals.push(total);
    }
    totals.sort();
    let secs: Vec<String> = totals.iter().map(|d| format!("{:.2}", d.as_secs_f64())).collect();
    eprintln!(
        "failover kill → SELECT 1 over 5 runs: {secs:?} s; median {:.2} s, max {:.2} s",
        totals[2].as_secs_f64(),
        totals[4].as_secs_f64()
    );
}

/// The harness: a filesystem another test has mounted on the host (here a loop-mounted ext4
/// image) when a node's mount namespace is made is not copied into it; such a copy would keep
/// that filesystem alive after its owner unmounts it (see `MountNs::create`).
#[test]
fn node_namespaces_do_not_keep_other_tests_mounts() {
    let host = tempfile::Builder::new().prefix("blockd-inherit-").tempdir_in("/var/tmp");
    let host = host.expect("tempdir");
    let (img, mnt) = (host.path().join("img"), host.path().join("mnt"));
    let setup = format!(
        "truncate -s 16M {0} && mkfs.ext4 -q {0} && mkdir {1} && mount -o loop {0} {1}",
        img.display(),
        mnt.display()
    );
    run_timeout(&mut cmd("sh", &["-c", &setup]), Duration::from_secs(30));
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let c = Cluster::with_lan("failover-inherit", "16MiB", |_| {});
    let inside = c.lan().mount_ns(Alpha).sh("cat /proc/self/mountinfo");
    let point = format!(" {} ", mnt.display());
    assert!(!inside.stdout.contains(&point), "the node kept a copy of {point}:\n{}", inside.stdout);
    let host_view = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(host_view.contains(&point), "the host mount must still be there");
}
