//! Guest tests of the two-node cluster (the failover topology of `blockd_tests::cluster::lan`)
//! on the guest's real kernel: every volume attached by blockd's netlink attach
//! (`attach = "kernel"`), so the filesystems sit on `/dev/nbdN` as on a real server. Alpha and
//! beta share one kernel here, so alpha's device is one index and beta's another; on real
//! servers both would be `/dev/nbd0`.
//!
//! A dead server's kernel is gone with it: its `/dev/nbdN`, the filesystem mounted there, its
//! kernel NFS server. Here the two nodes share the guest's one kernel, which would keep all
//! three after the node's processes died: [`kill_node_kernel`] takes them away, as the death
//! of that kernel would, before the survivor is promoted. Without that, beta could not even
//! mount its copy of the mirror's xfs: one kernel refuses a second xfs with the same UUID
//! (a mirror's copies are byte-identical), and mount says "bad superblock".

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use blockd_tests::{
    cluster::{
        failover::step_lines,
        lan::VIP,
        mariadb::{self, DbClient},
        Alpha, Beta, Cluster, NodeId,
    },
    cmd::{cmd, run_timeout, try_run, Background},
    require,
};

/// `peer-timeout` in the guest: the suite's 2 s drops a healthy link under qemu TCG once the
/// NFS writer's stream goes through the mirror (seen: a request unanswered for 2.01 s, then a
/// resync restarted every few seconds and beta Inconsistent when alpha died).
const GUEST_PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// `[failover]` and `[vip]` as the failover tests have them, with the kernel attach and a
/// step deadline for qemu TCG (every program runs several times slower).
fn kernel_failover_toml() -> String {
    let toml = mariadb::failover_toml();
    for key in ["attach = \"fuse\"", "step-timeout = \"60s\""] {
        assert!(toml.contains(key), "failover_toml changed: {toml}");
    }
    toml.replace("attach = \"fuse\"", "attach = \"kernel\"")
        .replace("step-timeout = \"60s\"", "step-timeout = \"300s\"")
}

/// The `/dev/nbdN` blockd on `n` serves `volume` (by the backend identifier it sets).
fn kernel_device(n: NodeId, volume: &str) -> Option<String> {
    let want = format!("blockd:{}:{volume}", n.name());
    (0..16).map(|i| format!("nbd{i}")).find_map(|d| {
        let backend = fs::read_to_string(format!("/sys/block/{d}/backend")).ok()?;
        (backend.trim() == want).then(|| format!("/dev/{d}"))
    })
}

/// [`Cluster::kill_node`] of `n` (link down, every process SIGKILLed), then what the death of
/// its kernel would take with it (see the module doc), in the order that keeps anything of the
/// dead node from reaching a disk: `volume`'s `/dev/nbdN` disconnected (NBD_DISCONNECT, its
/// queued and later requests fail at once: no write of the dead node gets anywhere, and
/// nothing waits for the dead-connection timeout), its kernel NFS server stopped in its network
/// namespace (threads, exports, open files), every mount it added unmounted; returns once the
/// kernel has let go of the filesystem (`/sys/fs/{xfs,ext4}/nbdN` gone).
fn kill_node_kernel(c: &mut Cluster, n: NodeId, volume: &str, nfs: bool) {
    let dev = kernel_device(n, volume);
    c.kill_node(n);
    let t = Instant::now();
    let mut steps = Vec::new();
    if let Some(dev) = &dev {
        let out = try_run(&mut cmd("nbd-client", &["-d", dev]), Duration::from_secs(60));
        assert!(out.status.success(), "disconnect {dev} of the dead {}:\n{out}", n.name());
        steps.push(format!("{dev} disconnected {:.1} s", t.elapsed().as_secs_f64()));
    }
    if nfs {
        let stop = c.run_on(n, &format!("{} stop", nfs_server_script().display()));
        assert!(stop.status.success(), "nfs-server stop on the dead {}:\n{stop}", n.name());
        steps.push(format!(
            "NFS server stopped {:.1} s:\n{}",
            t.elapsed().as_secs_f64(),
            stop.stdout
        ));
    }
    c.lan().mount_ns(n).unmount_added();
    steps.push(format!("mounts detached {:.1} s", t.elapsed().as_secs_f64()));
    if let Some(dev) = dev {
        let name = dev.trim_start_matches("/dev/").to_string();
        let gone = || {
            ["xfs", "ext4"].iter().all(|fs| !Path::new(&format!("/sys/fs/{fs}/{name}")).exists())
        };
        let deadline = Instant::now() + Duration::from_secs(300);
        while !gone() {
            assert!(
                Instant::now() < deadline,
                "the dead {}'s filesystem on {dev} is still there ({steps:?}):\n{}",
                n.name(),
                dmesg_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        steps.push(format!("filesystem gone {:.1} s", t.elapsed().as_secs_f64()));
    }
    eprintln!("{} dead, its kernel's leftovers removed: {steps:#?}", n.name());
}

/// Fewer bytes in flight on `dev` for qemu TCG on a loaded host: the kernel gives every
/// request REQUEST_TIMEOUT (30 s) and then drops blockd's socket for good (seen twice here:
/// mkfs.xfs's 32 MiB writes, 128 deep, through a mirror doing ~1 MB/s; "Connection timed out",
/// then EIO after the dead-connection timeout). 16 requests of at most 1 MiB fit in 30 s.
fn tcg_queue_limits(dev: &str) {
    let q = format!("/sys/block/{}/queue", dev.trim_start_matches("/dev/"));
    for (key, value) in [("max_sectors_kb", "1024"), ("nr_requests", "16")] {
        let path = format!("{q}/{key}");
        if let Err(e) = fs::write(&path, value) {
            eprintln!("{path} = {value}: {e}");
        }
    }
}

/// The guest kernel's last log lines, for a failure message.
fn dmesg_tail() -> String {
    let out = try_run(&mut cmd("dmesg", &[] as &[&str]), Duration::from_secs(20));
    let lines: Vec<&str> = out.stdout.lines().collect();
    format!("--- dmesg (last 40 lines) ---\n{}", lines[lines.len().saturating_sub(40)..].join("\n"))
}

/// Runs `body`, then (also when it panicked) removes what a node left in the shared kernel
/// (see the module doc), before the cluster's own cleanup unmounts.
fn with_kernel_cleanup(c: &mut Cluster, volume: &str, nfs: bool, body: impl FnOnce(&mut Cluster)) {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(c)));
    for n in [Alpha, Beta] {
        if let Some(dev) = kernel_device(n, volume) {
            // NBD_DISCONNECT (allowed on a netlink device): what is queued fails at once.
            let _ = try_run(&mut cmd("nbd-client", &["-d", &dev]), Duration::from_secs(60));
        }
        if nfs {
            c.run_on(n, &format!("{} stop >/dev/null 2>&1", nfs_server_script().display()));
        }
    }
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn nfs_server_script() -> PathBuf {
    repo().join("tests/vm/nfs-server")
}

/// MariaDB on `/dev/nbdN`: a client commits through the VIP, alpha dies (link down, every
/// process SIGKILLed), `promote --force` on beta; every acknowledged commit is there (the
/// oracle of the failover tests), and the committed ids have no gap.
#[test]
#[ignore = "runs inside the VM: vm_kernel_tier boots it"]
fn guest_mariadb_failover_on_nbd() {
    super::guest_kernel();
    require("mariadbd");
    let mut c = mariadb::cluster_with("vm-db", |s| {
        let service = mariadb::service_toml(&mariadb::start_command(""), "300s");
        s.extra_toml = kernel_failover_toml() + &service;
        s.peer_timeout = GUEST_PEER_TIMEOUT;
    });
    with_kernel_cleanup(&mut c, mariadb::VOLUME, false, mariadb_failover);
}

fn mariadb_failover(c: &mut Cluster) {
    let (out, took) = c.promote(Alpha, &[]);
    eprintln!("promote on alpha: {:.1} s; steps: {:#?}", took.as_secs_f64(), step_lines(&out));
    let dev = kernel_device(Alpha, mariadb::VOLUME).expect("alpha's /dev/nbdN");
    let src = c.run_on(Alpha, &format!("findmnt -n -o SOURCE {}", mariadb::DATADIR));
    assert_eq!(src.stdout.trim(), dev, "the datadir is on blockd's netlink device");
    mariadb::wait_select_1(c, Duration::from_secs(300)).unwrap_or_else(|e| panic!("{e}"));
    let client = DbClient::start(c);
    client.wait_acked(0, 20, Duration::from_secs(300)).unwrap_or_else(|e| panic!("{e}"));
    let before = client.read().acked.len();
    kill_node_kernel(c, Alpha, mariadb::VOLUME, false);
    c.wait_for(Beta, "peer gone", Duration::from_secs(120), |v| v["conn"] != "Connected");
    let t = Instant::now();
    let (out, _) = c.promote(Beta, &["--force"]);
    eprintln!("promote --force on beta: steps: {:#?}", step_lines(&out));
    let dev = kernel_device(Beta, mariadb::VOLUME).expect("beta's /dev/nbdN");
    let src = c.run_on(Beta, &format!("findmnt -n -o SOURCE {}", mariadb::DATADIR));
    assert_eq!(src.stdout.trim(), dev, "beta's datadir is on its netlink device");
    client.wait_acked(before, 20, Duration::from_secs(300)).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("promote → 20 more commits: {:.1} s", t.elapsed().as_secs_f64());
    let log = client.stop();
    let ids = mariadb::assert_no_lost_commit(c, &log);
    eprintln!(
        "MariaDB on /dev/nbdN: {} commits acknowledged ({before} before the kill), all {} rows \
         present after the failover",
        log.acked.len(),
        ids.len()
    );
}

/// The NFS volume: xfs on /srv/nfs, its state directory bound to /var/lib/nfs, as in
/// docs/k3s.md §4; 384 MiB (xfs wants 300 MB at least) for up to ~200 MiB of files.
const NFS_VOLUME: &str = "nfs";
const NFS_SIZE: &str = "384MiB";
const NFS_MOUNT: &str = "/srv/nfs";
const NFS_EXPORT: &str = "/srv/nfs/k8s";
const NFS_STATE: &str = "/srv/nfs/.nfs-state";

/// The fenced block after `<!-- blockd-test: NAME` in docs/k3s.md (the doc is the config).
fn doc_block(name: &str) -> String {
    let path = repo().join("docs/k3s.md");
    let doc = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let marker = format!("<!-- blockd-test: {name}");
    let at = doc.find(&marker).unwrap_or_else(|| panic!("docs/k3s.md has no {marker} marker"));
    let rest = &doc[at..];
    let body = &rest[rest.find("\n```").expect("a fenced block after the marker") + 4..];
    let body = &body[body.find('\n').expect("fence line") + 1..];
    body[..body.find("\n```").expect("closing fence")].to_string() + "\n"
}

/// The NFS service as the doc configures it, started and stopped by what nfs-server.service
/// runs (tests/vm/nfs-server: the guest has no systemd), checked where the doc checks it.
fn nfs_configure(spec: &mut blockd_tests::cluster::Spec) {
    let script = nfs_server_script();
    spec.volume = NFS_VOLUME.to_string();
    spec.peer_timeout = GUEST_PEER_TIMEOUT;
    spec.size = NFS_SIZE.to_string();
    spec.volume_toml = format!("filesystem = \"xfs\"\nmount = \"{NFS_MOUNT}\"\n");
    spec.extra_toml = kernel_failover_toml()
        + &format!(
            "[[bind]]\nsource = \"{NFS_STATE}\"\ntarget = \"/var/lib/nfs\"\n\n\
             [[service]]\nname = \"nfs-server\"\nstart = \"{s} start\"\nstop = \"{s} stop\"\n\
             check = \"tcp://{VIP}:2049\"\ntimeout = \"120s\"\n\n",
            s = script.display()
        );
}

/// Both nodes get the doc's /etc/exports (with the test network) and its [nfsd] settings
/// added to this machine's /etc/nfs.conf, bound over the files in their mount namespaces.
fn nfs_node_files(c: &Cluster) {
    let exports = doc_block("exports").replace("10.0.0.0/24", "10.99.0.0/24");
    assert!(exports.contains("fsid=1"), "the doc's export has a fixed fsid: {exports}");
    // The guest's / is 9p, which nfsd cannot export, not even as the NFSv4 pseudo root that
    // mountd builds above an export; a real server's / can. So here the export is the root
    // (fsid=0, still fixed) and the client mounts VIP:/ instead of VIP:/srv/nfs/k8s.
    let exports = exports.replace("fsid=1", "fsid=0");
    let conf = fs::read_to_string("/etc/nfs.conf").unwrap_or_default() + &doc_block("nfs.conf");
    let (e, n) = (c.dir().join("exports"), c.dir().join("nfs.conf"));
    fs::write(&e, exports).expect("write exports");
    fs::write(&n, conf).expect("write nfs.conf");
    for node in [Alpha, Beta] {
        let binds = format!(
            "mount --bind {} /etc/exports && mount --bind {} /etc/nfs.conf",
            e.display(),
            n.display()
        );
        c.run_on(node, &binds).assert_success();
    }
}

/// docs/k3s.md's first promote, as written there: attach, mkfs.xfs on /dev/nbdN, mount, the
/// export and state directories (the state copied from /var/lib/nfs), then the whole plan.
fn nfs_first_promote(c: &Cluster) {
    c.wait_in_sync(Duration::from_secs(120));
    let attach = c.blockctl_run(Alpha, &["promote", "--until", "attach nfs"]);
    assert!(attach.status.success(), "promote --until attach:\n{attach}{}", c.diag(Alpha));
    let dev = kernel_device(Alpha, NFS_VOLUME).expect("alpha's /dev/nbdN");
    tcg_queue_limits(&dev);
    // -K: no discard of the whole device first (a TRIM of every block through the mirror).
    let mut mkfs = c.lan().mount_ns(Alpha).command("mkfs.xfs");
    mkfs.args(["-q", "-f", "-K", &dev]);
    run_timeout(&mut mkfs, Duration::from_secs(300));
    let mount = c.blockctl_run(Alpha, &["promote", "--until", "mount nfs"]);
    assert!(mount.status.success(), "promote --until mount:\n{mount}{}", c.diag(Alpha));
    let prep = format!(
        "mkdir -p {NFS_STATE} {NFS_EXPORT} && cp -a /var/lib/nfs/. {NFS_STATE}/ && \
         findmnt -n -o SOURCE,FSTYPE {NFS_MOUNT}"
    );
    let out = c.run_on(Alpha, &prep);
    assert_eq!(out.stdout.split_whitespace().collect::<Vec<_>>(), [dev.as_str(), "xfs"], "{out}");
    let (out, took) = c.promote(Alpha, &[]);
    eprintln!(
        "promote (nfs) on alpha: {:.1} s; steps: {:#?}",
        took.as_secs_f64(),
        step_lines(&out)
    );
}

/// The kernel NFS server on the mirror: the kernel NFSv4.2 client (hard mount, in a mount
/// namespace of the client's network namespace) writes files of 1 KiB to 64 MiB through the
/// VIP while alpha dies; `promote --force` on beta; every file the client closed has its size
/// and checksum on beta's filesystem, and the writer goes on. The longest single write,
/// fsync or close is the client's stall, reported with a timeline from the kill.
///
/// Three passes in a row (2026-12-03, host load 3-6, ~350 s of guest time each): kill →
/// promote done 61.5 / 67.4 / 62.2 s, longest stall 94.7 / 92.0 / 87.6 s. The stall is a
/// 64 MiB file's write-back already running 6-12 s before the kill, the time no server
/// answers (~20 s of it this test's removal of the dead kernel's leftovers, which a real
/// failover does not have; ~10 s until beta drops the link, its peer-timeout; ~30 s of
/// `promote --force` under TCG, the NFS server's start 10 s of it), then 13-17 s from the new
/// server to the call's end: the client's reconnect to the VIP, its reclaim within the 10 s
/// grace, and the uncommitted part of the file sent again.
#[test]
#[ignore = "runs inside the VM: vm_kernel_tier boots it"]
fn guest_kernel_nfs_failover() {
    super::guest_kernel();
    for tool in ["rpc.nfsd", "rpc.mountd", "nfsdcld", "exportfs", "mount.nfs4", "mkfs.xfs"] {
        require(tool);
    }
    let mut c = Cluster::with_lan("vm-nfs", NFS_SIZE, nfs_configure);
    nfs_node_files(&c);
    c.start(Alpha);
    c.start(Beta);
    with_kernel_cleanup(&mut c, NFS_VOLUME, true, nfs_failover);
}

/// The client's longest single write, fsync or close: how long, and when (Unix time) it began
/// and ended.
#[derive(Debug, Default, Clone, Copy)]
struct Stall {
    secs: f64,
    from: f64,
    to: f64,
}

/// The client's files: `name → (size, sha256)` of every `closed` line, and the last stall.
fn closed_files(log: &Path) -> (Vec<(String, u64, String)>, Stall) {
    let text = fs::read_to_string(log).unwrap_or_default();
    let mut files = Vec::new();
    let mut stall = Stall::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let (head, times) = f.split_at(f.len().saturating_sub(3));
        if let [secs, from, to] = times {
            let num = |v: &str| v.parse().unwrap_or(0.0);
            stall = Stall { secs: num(secs), from: num(from), to: num(to) };
        }
        if let ["closed", name, size, sum] = head {
            files.push((name.to_string(), size.parse().unwrap_or(0), sum.to_string()));
        }
    }
    (files, stall)
}

/// Now, Unix time in seconds (the writer's clock: both run in the guest).
fn unix_now() -> f64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(0.0, |d| d.as_secs_f64())
}

fn wait_closed(
    log: &Path,
    at_least: usize,
    timeout: Duration,
    writer: &mut Background,
    diag: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    while closed_files(log).0.len() < at_least {
        assert!(!writer.has_exited(), "the NFS writer ended:\n{}{}", writer.log_text(), diag());
        assert!(Instant::now() < deadline, "{at_least} files not closed in {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The NFS writer in the client: a private mount namespace with the hard NFSv4.2 mount. The
/// writer is the process started (exec): killed on a failure, it takes the namespace and so
/// the mount with it, even when no server answers any more.
fn nfs_writer(c: &Cluster) -> (Background, PathBuf, PathBuf) {
    let (mnt, log, stop) =
        (c.dir().join("nfs-client"), c.dir().join("nfs.log"), c.dir().join("nfs.stop"));
    fs::create_dir_all(&mnt).expect("mkdir client mount point");
    let writer = repo().join("tests/vm/nfs-writer.py");
    let script = format!(
        "set -e; i=0; until mount -t nfs4 -o vers=4.2,hard {VIP}:/ {m}; do \
         i=$((i+1)); [ $i -lt 30 ] || exit 1; sleep 2; done; \
         exec {py} {w} {m} {l} {s} 7",
        m = mnt.display(),
        py = blockd_tests::cluster::clients::PYTHON,
        w = writer.display(),
        l = log.display(),
        s = stop.display()
    );
    let mut sh = c.lan().client_command("unshare");
    sh.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    (Background::spawn(&mut sh, &c.dir().join("nfs-writer.out")), log, stop)
}

/// The server's exports, export cache and helper logs on `n`, for a failure message.
fn nfs_diag(c: &Cluster, n: NodeId) -> String {
    let d = "exportfs -v; cat /proc/net/rpc/nfsd.export/content; \
             tail -n 20 /run/blockd-nfs-server/*.log";
    let out = c.run_on(n, d);
    format!("\n--- {} NFS server ---\n{}{}", n.name(), out.stdout, out.stderr)
}

/// Prints nfsdcld's client records: `TABLE:ROWS` of each `rec-EPOCH` table, then the grace
/// table's current and recovery epochs.
const NFSDCLD_RECORDS: &str = r#"import sqlite3
d = sqlite3.connect("file:/var/lib/nfs/nfsdcld/main.sqlite?mode=ro", uri=True)
q = "select name from sqlite_master where name like 'rec-%'"
tables = [r[0] for r in d.execute(q)]
count = lambda t: d.execute('select count(*) from "%s"' % t).fetchone()[0]
print(*["%s:%d" % (t, count(t)) for t in tables], "grace", *d.execute("select current, recovery from grace").fetchone())
"#;

/// nfsdcld's client records on `n`, read from its state directory (on the mirror).
fn nfsdcld_records(c: &Cluster, n: NodeId) -> String {
    let script = c.dir().join("nfsdcld-records.py");
    fs::write(&script, NFSDCLD_RECORDS).expect("write nfsdcld-records.py");
    let py = blockd_tests::cluster::clients::PYTHON;
    let out = c.run_on(n, &format!("{py} {}", script.display()));
    assert!(out.status.success(), "nfsdcld's database on {}:\n{out}", n.name());
    out.stdout.trim().to_string()
}

/// What docs/k3s.md §5 promises of the NFS service on `n`, the new primary: lease and grace
/// 10 s, `/var/lib/nfs` the bind from the mirror (`dev`), the export's fixed fsid.
fn check_nfs_service(c: &Cluster, n: NodeId, dev: &str) {
    let times = c.run_on(n, "cat /proc/fs/nfsd/nfsv4leasetime /proc/fs/nfsd/nfsv4gracetime");
    assert_eq!(times.stdout.split_whitespace().collect::<Vec<_>>(), ["10", "10"], "{times}");
    let state = c.run_on(n, "findmnt -n -o SOURCE /var/lib/nfs");
    assert_eq!(state.stdout.trim(), format!("{dev}[/.nfs-state]"), "/var/lib/nfs on {}", n.name());
    let exports = c.run_on(n, "exportfs -v");
    assert!(exports.stdout.contains("fsid=0"), "the export's fsid on {}:\n{exports}", n.name());
}

/// When (Unix time) the NFS server on `n` was first seen out of grace (polled after the
/// promote, so an upper bound): its `v4_end_grace` reads
/// `Y` once the grace time is up or every client it knows from `/var/lib/nfs` has reclaimed.
fn grace_end(c: &Cluster, n: NodeId) -> f64 {
    let poll = "for i in $(seq 600); do [ \"$(cat /proc/fs/nfsd/v4_end_grace)\" = Y ] && break; \
                sleep 0.1; done; cat /proc/fs/nfsd/v4_end_grace; date +%s.%N";
    let out = c.run_on(n, poll);
    let words: Vec<&str> = out.stdout.split_whitespace().collect();
    assert_eq!(
        words.first(),
        Some(&"Y"),
        "grace period on {} not over after 60 s:\n{out}",
        n.name()
    );
    words.get(1).and_then(|t| t.parse().ok()).unwrap_or(0.0)
}

/// The planned switchover's order on `n` (`demote --dry-run`, what `swap` undoes first): the
/// NFS server is stopped before the VIP goes, and the VIP before the filesystem is unmounted.
fn check_demote_order(c: &Cluster, n: NodeId) {
    let out = c.blockctl_run(n, &["demote", "--dry-run"]);
    assert!(out.status.success(), "demote --dry-run:\n{out}");
    let text = format!("{}{}", out.stdout, out.stderr);
    let at = |step: &str| {
        let line = format!("would undo {step} ");
        text.find(&line).unwrap_or_else(|| panic!("no {line:?} in the demote plan:\n{text}"))
    };
    let (service, vip, mount) = (at("service nfs-server"), at("vip"), at("mount nfs"));
    assert!(service < vip && vip < mount, "demote order: service, vip, mount:\n{text}");
}

fn nfs_failover(c: &mut Cluster) {
    let mut at = vec![("test start", unix_now())];
    nfs_first_promote(c);
    check_demote_order(c, Alpha);
    at.push(("alpha serving NFS", unix_now()));
    let (mut writer, log, stop) = nfs_writer(c);
    wait_closed(&log, 4, Duration::from_secs(600), &mut writer, || nfs_diag(c, Alpha));
    let records = nfsdcld_records(c, Alpha);
    eprintln!("nfsdcld on alpha, before the kill: {records}");
    assert!(records.split(' ').any(|t| t.starts_with("rec-") && !t.ends_with(":0")), "{records}");
    // Killed in sync, as the failover tests do: what beta has is then everything acknowledged.
    c.wait_in_sync(Duration::from_secs(300));
    let (before, stall_before) = closed_files(&log);
    let kill = unix_now();
    at.push(("kill", kill));
    kill_node_kernel(c, Alpha, NFS_VOLUME, true);
    at.push(("alpha's kernel leftovers removed", unix_now()));
    let killed = closed_files(&log).0.len().max(before.len());
    c.wait_for(Beta, "peer gone", Duration::from_secs(120), |v| v["conn"] != "Connected");
    at.push(("beta sees the peer gone", unix_now()));
    let (out, _) = c.promote(Beta, &["--force"]);
    at.push(("promote --force done", unix_now()));
    eprintln!("promote --force (nfs) on beta: steps: {:#?}", step_lines(&out));
    let dev = kernel_device(Beta, NFS_VOLUME).expect("beta's /dev/nbdN");
    tcg_queue_limits(&dev);
    check_nfs_service(c, Beta, &dev);
    at.push(("beta's grace period seen over (first poll)", grace_end(c, Beta)));
    let diag = || format!("{}{}{}", nfs_diag(c, Beta), c.diag(Beta), dmesg_tail());
    wait_closed(&log, killed + 1, Duration::from_secs(900), &mut writer, diag);
    at.push(("first file closed after the kill", unix_now()));
    wait_closed(&log, killed + 3, Duration::from_secs(900), &mut writer, diag);
    at.push(("3 files closed after the kill", unix_now()));
    eprintln!("nfsdcld on beta: {}", nfsdcld_records(c, Beta));
    fs::write(&stop, b"").expect("write stop file");
    let status = writer.wait(Duration::from_secs(900));
    assert!(status.is_some_and(|s| s.success()), "NFS writer:\n{}", writer.log_text());
    let (files, stall) = closed_files(&log);
    check_files_on(c, Beta, &files);
    at.push(("files checked on beta", unix_now()));
    let bytes: u64 = files.iter().map(|f| f.1).sum();
    eprintln!(
        "kernel NFS: {} files ({} MiB) closed, {killed} before the kill, all with their size \
         and sha256 on beta; the client's longest single write, fsync or close: {:.1} s \
         ({:.1} s before the kill)",
        files.len(),
        bytes >> 20,
        stall.secs,
        stall_before.secs
    );
    at.extend([("the longest call began", stall.from), ("the longest call ended", stall.to)]);
    at.sort_by(|x, y| x.1.total_cmp(&y.1));
    let lines: Vec<String> =
        at.iter().map(|(what, t)| format!("  {:+7.1} s  {what}", t - kill)).collect();
    eprintln!("timeline (seconds from the kill):\n{}", lines.join("\n"));
}

/// Every closed file has its size and sha256 in the export on `n`.
fn check_files_on(c: &Cluster, n: NodeId, files: &[(String, u64, String)]) {
    let mut check = String::new();
    for (name, _, _) in files {
        check.push_str(&format!(
            "stat -c '%s' {NFS_EXPORT}/{name}; sha256sum < {NFS_EXPORT}/{name}\n"
        ));
    }
    let out = c.run_on(n, &check);
    let got: Vec<&str> = out.stdout.split_whitespace().filter(|w| *w != "-").collect();
    for (i, (name, size, sum)) in files.iter().enumerate() {
        let (gs, gh) = (got.get(2 * i).copied(), got.get(2 * i + 1).copied());
        assert_eq!(gs, Some(size.to_string().as_str()), "{name}: size on {}\n{out}", n.name());
        assert_eq!(gh, Some(sum.as_str()), "{name}: sha256 on {}", n.name());
    }
}
