//! A power cut of the Primary and a failover to its peer, with a filesystem and a database on
//! the mirror (issue 17, "What it must show": ext4 with `e2fsck -fn` clean and MariaDB with
//! every committed row, each after a primary power cut and a failover).
//!
//! The failover harness (`Cluster::with_lan`: a bridge, a client namespace, a mount namespace
//! per node). Alpha's backing is a [`FaultDisk`] with a volatile write cache, mounted in
//! alpha's mount namespace ([`FaultDisk::on_node`]); its power cut is [`Cluster::
//! power_cut_node`]: the link goes down, blockd and nbdkit get SIGKILL (the unflushed cache
//! is gone), then every other process on alpha. Beta is force-promoted by `blockctl promote
//! --force` (as `kill_primary_then_force_promote_keeps_every_commit` does). Then alpha powers
//! on and resyncs as the target; once beta is demoted (nothing writes) both are in sync, the
//! backing files are byte-identical (`cmp` on alpha, where its disk is mounted) and `blockctl
//! verify` finds 0 differences.
//!
//! The moment of the cut is seeded: `BLOCKD_POWERCUT_SEED` (default 17), printed.

use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use blockd_tests::{
    cluster::{
        failover::step_lines,
        files::{check_files, FileWriter},
        mariadb::{self, DbClient, DATADIR},
        Alpha, Beta, Cluster, NodeId, Spec,
    },
    disk::{FaultDisk, Faults},
};
use serde_json::Value;

const SYNC: Duration = Duration::from_secs(120);
/// Where the ext4 test mounts its volume (/srv is a tmpfs of each node).
const MOUNT: &str = "/srv/data";
/// A small activity log (4 extents of 1 MiB) over a 128 MiB filesystem: the journal, the
/// inode tables and the files' blocks spread over many more extents than it holds, so
/// extents leave it (on demand, after a flush on both nodes) all the time.
const SMALL_LOG: &str = "[resync]\nactivity-log-extents = 4\nactivity-log-extent-size = \"1MiB\"\n";

fn is_connected(v: &Value) -> bool {
    ["Connected", "SyncSource", "SyncTarget"].iter().any(|s| v["conn"] == *s)
}

/// 0.5 to 3 s after the load is under way, from `BLOCKD_POWERCUT_SEED`.
fn cut_delay(test: &str) -> Duration {
    let seed = std::env::var("BLOCKD_POWERCUT_SEED").ok().and_then(|v| v.parse().ok());
    let seed: u64 = seed.unwrap_or(17);
    let ms = 500 + seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) % 2500;
    eprintln!("{test}: seed {seed}, power cut {ms} ms into the load");
    Duration::from_millis(ms)
}

/// Both nodes stopped in sync; alpha's backing becomes a fault disk holding the same bytes
/// (copied while alpha is stopped), so the pair is in sync again without a resync.
fn alpha_on_fault_disk(c: &mut Cluster) -> FaultDisk {
    c.wait_in_sync(SYNC);
    c.stop(Alpha);
    let ns = c.lan().mount_ns(Alpha).file().to_path_buf();
    let faults = Faults { cache: true, ..Faults::default() };
    let disk = FaultDisk::on_node(&c.dir().join("alpha-disk"), &c.backing(Alpha), faults, &ns);
    c.use_backing(Alpha, &disk.file());
    c.start(Alpha);
    c.wait_in_sync(SYNC);
    disk
}

/// Alpha loses power; beta sees its peer gone and is force-promoted (the whole stack).
fn power_cut_and_fail_over(c: &mut Cluster, disk: &mut FaultDisk) {
    c.power_cut_node(Alpha, disk);
    c.wait_for(Beta, "peer gone", Duration::from_secs(30), |v| !is_connected(v));
    promote(c, Beta, &["--force"]);
}

fn promote(c: &Cluster, n: NodeId, extra: &[&str]) {
    let (out, took) = c.promote(n, extra);
    eprintln!("promote {} {extra:?}: {:.2} s; steps:", n.name(), took.as_secs_f64());
    for l in step_lines(&out) {
        eprintln!("  {l}");
    }
}

/// Alpha powers on and resyncs from beta; beta is demoted so that nothing writes, then both
/// are in sync, `cmp` finds the images identical and verify (beta Primary again, nothing
/// mounted) finds 0 differences.
fn resync_and_compare(c: &mut Cluster, disk: &mut FaultDisk) {
    let t = Instant::now();
    c.power_on_node(Alpha, disk);
    c.wait_in_sync(SYNC);
    let resynced = |n: NodeId| c.vol(n)["counters"]["resync_bytes"].as_u64().unwrap_or(0);
    eprintln!(
        "alpha back in sync after {:.1} s; resync bytes: alpha {}, beta {}",
        t.elapsed().as_secs_f64(),
        resynced(Alpha),
        resynced(Beta)
    );
    let out = c.blockctl_run(Beta, &["demote"]);
    assert!(out.status.success(), "demote on beta:\n{out}{}", c.diag(Beta));
    c.wait_in_sync(SYNC);
    c.assert_identical_on(Alpha);
    c.role(Beta, "primary", false).unwrap_or_else(|e| panic!("role primary on beta: {e}"));
    let out = c.blockctl_run(Beta, &["verify"]);
    assert!(out.status.success() && out.stdout.contains(", 0 bytes differed"), "verify:\n{out}");
}

/// ext4 through the new Primary's own nbdfuse and loop device, before anything mounts it:
/// the journal replayed (what a mount does first), then `e2fsck -fn` must find it clean.
fn fsck_on(c: &Cluster, n: NodeId) {
    // The journal replay may report that it changed the filesystem (1); then the forced
    // read-only check alone decides.
    let body = "st=0
e2fsck -y -E journal_only $DEV || st=$?
[ $st -le 1 ] || exit $st
e2fsck -fn $DEV";
    let script = c.on_loop_device_sh(n, "fsck", body);
    let out = c.run_on(n, &script);
    assert!(out.status.success(), "e2fsck -fn after the power cut on {}:\n{out}", n.name());
    eprintln!("e2fsck -fn on {}: clean", n.name());
}

fn ext4_cluster(test: &str) -> Cluster {
    for tool in ["nbdfuse", "mkfs.ext4", "e2fsck", "losetup"] {
        blockd_tests::require(tool);
    }
    let mut c = Cluster::with_lan(test, "128MiB", |s: &mut Spec| {
        s.volume_toml = format!("filesystem = \"ext4\"\nmount = \"{MOUNT}\"\n");
        s.extra_toml = mariadb::failover_toml() + SMALL_LOG;
    });
    for n in [Alpha, Beta] {
        c.run_on(n, &format!("mkdir -p {MOUNT}")).assert_success();
    }
    c.start(Alpha);
    c.start(Beta);
    c.prepare_filesystem(Alpha, MOUNT, &format!("mkdir {MOUNT}/files"));
    c
}

/// ext4 on the mirror, fsync'ed files being written on alpha; alpha's power is cut; beta
/// takes over: the journal replays, `e2fsck -fn` is clean and every fsync'ed file is there.
/// Alpha comes back as the resync target: identical, verify 0.
#[test]
fn ext4_after_a_primary_power_cut_and_failover_is_clean_and_keeps_fsynced_files() {
    let test = "pcfo-ext4";
    let mut c = ext4_cluster(test);
    let mut disk = alpha_on_fault_disk(&mut c);
    promote(&c, Alpha, &[]);
    let root = format!("{MOUNT}/files");
    let writer = FileWriter::start(&c, Alpha, &root, 17);
    writer.wait_durable(20, Duration::from_secs(60));
    sleep(cut_delay(test));
    power_cut_and_fail_over_fsck_first(&mut c, &mut disk);
    let durable = writer.durable();
    let log = writer.killed();
    let checked = check_files(&c, Beta, &root, &log);
    eprintln!("{durable} versions durable before the cut; on beta: {checked}");
    resync_and_compare(&mut c, &mut disk);
}

/// [`power_cut_and_fail_over`] with the fsck of the filesystem before beta's promote
/// mounts it (promote's own `e2fsck -p` would repair quietly what `-fn` is to find).
fn power_cut_and_fail_over_fsck_first(c: &mut Cluster, disk: &mut FaultDisk) {
    c.power_cut_node(Alpha, disk);
    c.wait_for(Beta, "peer gone", Duration::from_secs(30), |v| !is_connected(v));
    c.role(Beta, "primary", true).unwrap_or_else(|e| panic!("role primary --force on beta: {e}"));
    fsck_on(c, Beta);
    promote(c, Beta, &["--force"]);
}

/// MariaDB on the mirror, the logging client committing through the VIP; alpha's power is
/// cut; beta takes over: every acknowledged commit is in the table. Alpha comes back as the
/// resync target: identical, verify 0.
#[test]
fn mariadb_after_a_primary_power_cut_and_failover_keeps_every_commit() {
    let test = "pcfo-mariadb";
    let mut c = mariadb::cluster(test);
    let mut disk = alpha_on_fault_disk(&mut c);
    promote(&c, Alpha, &[]);
    mariadb::wait_select_1(&c, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    let client = DbClient::start(&c);
    client.wait_acked(0, 50, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    sleep(cut_delay(test));
    power_cut_and_fail_over(&mut c, &mut disk);
    let acked_at_cut = client.read().acked.len();
    mariadb::wait_select_1(&c, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("after failover: {e}{}", c.diag(Beta)));
    assert!(c.run_on(Beta, &format!("mountpoint -q {DATADIR}")).status.success());
    client.wait_acked(acked_at_cut, 30, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    let log = client.stop();
    let ids = mariadb::assert_no_lost_commit(&c, &log);
    eprintln!(
        "{} commits acknowledged ({acked_at_cut} before the cut), {} rows on beta",
        log.acked.len(),
        ids.len()
    );
    resync_and_compare(&mut c, &mut disk);
}
