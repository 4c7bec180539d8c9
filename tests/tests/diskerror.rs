//! Disk errors (issue 17), DRBD's `on-io-error=detach` as the model, with real faults: EIO from
//! nbdkit's error filter behind nbdfuse (`FaultDisk`, a trigger file), ENOSPC from a data-dir
//! on a 40 MiB ext4 with a 64 MiB sparse volume. During fio verify through the Primary:
//! - on the Primary's disk: fio sees no error (writes go to the peer, reads come from it), the
//!   stack moves to the peer (`blockctl swap`, what the agent does), the disk stays Failed
//!   across a restart of its blockd;
//! - on the Secondary's disk: the Primary goes on degraded, the Secondary says why.
//!
//! In both cases the repaired disk comes back by a full resync (`blockctl resolve
//! --full-sync`): both backing files byte-identical, `blockctl verify` 0 differences.

use std::{path::Path, time::Duration};

use blockd_tests::{
    cluster::{clients, Alpha, Beta, Cluster, NodeId},
    cmd::{cmd, run_timeout, try_run},
    disk::{FaultDisk, Faults},
    LoopMount,
};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// fio's job: random 4 KiB writes over `mib` MiB, crc32c verify after the writes, a final
/// flush. With `--verify_only=1` the same options re-read and check what a first run wrote.
fn verify_job(mib: u64, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> =
        ["--rw=randwrite", "--bs=4k", "--iodepth=16", "--verify=crc32c", "--verify_fatal=1"]
            .map(String::from)
            .to_vec();
    v.extend(["--end_fsync=1", "--randrepeat=1"].map(String::from));
    v.push(format!("--size={mib}m"));
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn blockctl(c: &Cluster, n: NodeId, args: &[&str]) -> blockd_tests::cmd::Output {
    let mut b = c.blockctl(n);
    b.args(args);
    try_run(&mut b, Duration::from_secs(120))
}

/// Both nodes up and in sync, alpha Primary; `disk` (if any) is `n`'s backing.
fn pair(test: &str, size: &str, disk: Option<(NodeId, &FaultDisk)>) -> Cluster {
    let mut c = Cluster::new(test, size);
    if let Some((n, d)) = disk {
        c.use_backing(n, &d.file());
    }
    c.start(Alpha);
    c.start(Beta);
    if let Some((n, _)) = disk {
        // The fault disk existed before blockd: unrelated to a backing blockd created.
        let out = blockctl(&c, n.other(), &["resolve", "--full-sync"]);
        assert_eq!(out.code(), 0, "resolve on {}:\n{out}", n.other().name());
    }
    c.wait_in_sync(SYNC_TIMEOUT);
    c.role(Alpha, "primary", false).unwrap_or_else(|e| panic!("role primary on alpha: {e}"));
    c.wait_for(Alpha, "role Primary", Duration::from_secs(10), |v| v["role"] == "Primary");
    c
}

/// Waits until `n` has completed at least `writes` NBD writes (the load is under way).
fn wait_writes(c: &Cluster, n: NodeId, writes: u64) {
    c.wait_for(n, "writes under way", Duration::from_secs(60), |v| {
        v["counters"]["writes"].as_u64().is_some_and(|w| w >= writes)
    });
}

/// `n`'s disk is Failed, and status says why: the operation and errno.
fn assert_failed(c: &Cluster, n: NodeId, errno: u64) -> Value {
    let v = c.vol(n);
    assert_eq!(v["disk"], "Failed", "{}: {v}", n.name());
    let f = &v["disk_failure"];
    assert_eq!(f["errno"], errno, "{}: the failure must say why: {v}", n.name());
    assert!(f["op"].is_string() && f["offset"].is_u64(), "{v}");
    v
}

/// After the disk was repaired: `resolve --full-sync` on `n` (Secondary) makes it the target
/// of a full resync; then both files are identical and an online verify finds nothing.
fn bring_back(c: &Cluster, n: NodeId, size: u64) {
    let out = blockctl(c, n, &["resolve", "--full-sync"]);
    assert_eq!(out.code(), 0, "resolve on {}:\n{out}", n.name());
    c.wait_in_sync(SYNC_TIMEOUT);
    let v = c.vol(n);
    assert_eq!(v["disk"], "UpToDate", "{v}");
    assert!(v["disk_failure"].is_null(), "{v}");
    let primary = n.other();
    let covered: u64 = ["resync_bytes", "resync_zero_bytes", "resync_same_bytes"]
        .iter()
        .map(|k| c.vol(primary)["counters"][k].as_u64().unwrap_or(0))
        .sum();
    assert!(covered >= size, "a replaced disk needs a full resync: {covered} of {size} bytes");
    c.assert_identical();
    let out = blockctl(c, primary, &["verify"]);
    assert_eq!(out.code(), 0, "verify:\n{out}");
    assert!(out.stdout.contains(", 0 bytes differed"), "verify must find nothing:\n{out}");
}

/// A pair whose `node` has a fault disk of `size` that starts failing with EIO in the middle
/// of a 32 MiB fio verify job on alpha; asserts fio wrote and verified all of it. The scratch
/// directory holds the fault disk: keep it until the cluster is gone.
fn eio_during_fio_verify(
    test: &str,
    node: NodeId,
    size: u64,
) -> (tempfile::TempDir, FaultDisk, Cluster) {
    let scratch = tempfile::Builder::new().prefix("blockd-diskerr-").tempdir_in("/var/tmp");
    let scratch = scratch.expect("scratch dir");
    let disk = FaultDisk::create(&scratch.path().join(node.name()), size, faults("EIO"));
    let c = pair(test, "64MiB", Some((node, &disk)));
    let job = verify_job(32, &[]);
    let fio = clients::FioRun::spawn(c.dir(), &c.nbd_uri(Alpha), "write", &strs(&job));
    wait_writes(&c, Alpha, 500);
    disk.fail();
    let (written, read) = fio.finish(Duration::from_secs(180));
    assert_eq!((written, read), (32 * MIB, 32 * MIB), "fio must write and verify all 32 MiB");
    (scratch, disk, c)
}

/// EIO on the Primary's disk in the middle of fio verify: fio sees no error (writes are
/// acknowledged once beta has them, reads come from beta), alpha's disk is Failed with why;
/// `swap` moves the stack to beta, where fio verify_only passes; alpha stays Failed across a
/// restart (even with the disk healed), and comes back by a full resync.
#[test]
fn eio_on_the_primary_is_served_by_the_peer_and_comes_back_by_a_full_resync() {
    const SIZE: u64 = 64 * MIB;
    let (_scratch, disk, mut c) = eio_during_fio_verify("diskerror-eio-primary", Alpha, SIZE);
    let v = assert_failed(&c, Alpha, 5);
    let text = blockctl(&c, Alpha, &["status"]);
    assert!(text.stdout.contains("Failed: Input/output error"), "status says why:\n{text}");
    let events = blockctl(&c, Alpha, &["events", "--json", "--until", "disk=Failed"]);
    assert!(
        events.stdout.contains("\"Failed\"") && events.stdout.contains("Input/output"),
        "the disk event carries why:\n{events}"
    );
    assert!(v["out_of_sync"].as_u64().unwrap_or(0) > 0, "the failed ranges are marked: {v}");
    assert_eq!(c.vol(Alpha)["role"], "Primary");

    // What the agent does: the stack moves to the peer.
    c.wait_for(Alpha, "no NBD clients", Duration::from_secs(10), |v| v["clients"] == 0);
    let out = blockctl(&c, Alpha, &["swap"]);
    assert_eq!(out.code(), 0, "swap:\n{out}");
    c.wait_for(Beta, "role Primary", Duration::from_secs(10), |v| v["role"] == "Primary");
    let verify = verify_job(32, &["--verify_only=1"]);
    let (_, read) = clients::fio_run(c.dir(), &c.nbd_uri(Beta), "verify", &strs(&verify));
    assert_eq!(read, 32 * MIB, "verify_only must read back all 32 MiB through beta");

    disk.heal();
    c.stop(Alpha);
    c.start(Alpha);
    c.wait_for(Alpha, "refused as Failed", Duration::from_secs(10), |v| {
        v["conn_reason"].as_str().is_some_and(|r| r.contains("Failed"))
    });
    assert_failed(&c, Alpha, 5);
    bring_back(&c, Alpha, SIZE);
}

/// EIO on the Secondary's disk in the middle of fio verify: fio sees no error, alpha marks
/// and goes on degraded with its own disk UpToDate; beta's disk is Failed and its status says
/// why; still Failed after a restart; back by a full resync.
#[test]
fn eio_on_the_secondary_degrades_the_primary_and_comes_back_by_a_full_resync() {
    const SIZE: u64 = 64 * MIB;
    let (_scratch, disk, mut c) = eio_during_fio_verify("diskerror-eio-secondary", Beta, SIZE);
    let a = c.vol(Alpha);
    assert_eq!((a["disk"].as_str(), a["role"].as_str()), (Some("UpToDate"), Some("Primary")));
    assert!(a["counters"]["degraded_writes"].as_u64().unwrap_or(0) > 0, "{a}");
    assert!(a["out_of_sync"].as_u64().unwrap_or(0) > 0, "alpha marks what beta lacks: {a}");
    assert_failed(&c, Beta, 5);
    c.wait_for(Beta, "says why", Duration::from_secs(10), |v| {
        v["conn_reason"].as_str().is_some_and(|r| r.contains("disk is Failed"))
    });

    disk.heal();
    c.stop(Beta);
    c.start(Beta);
    assert_failed(&c, Beta, 5);
    bring_back(&c, Beta, SIZE);
    let verify = verify_job(32, &["--verify_only=1"]);
    let (_, read) = clients::fio_run(c.dir(), &c.nbd_uri(Alpha), "verify", &strs(&verify));
    assert_eq!(read, 32 * MIB);
}

/// Finding 2 of issue 17: alpha's data-dir with 40 MiB free (an ext4 on a loop device, a
/// balloon file taking the rest), a 64 MiB sparse volume, fio
/// writing and verifying 60 MiB: the filesystem fills up. Before the fix fio got ENOSPC and the
/// replicas differed while alpha said UpToDate and 0 out of sync. Now: fio sees no error, the
/// disk is Failed (ENOSPC), the stack moves to beta; after the filesystem is given room the
/// disk comes back by a full resync.
#[test]
fn enospc_on_the_primary_fails_the_disk_and_loses_nothing() {
    const SIZE: u64 = 64 * MIB;
    let (mut c, small, job) = filled("diskerror-enospc", Alpha);
    assert_failed(&c, Alpha, 28);

    c.wait_for(Alpha, "no NBD clients", Duration::from_secs(10), |v| v["clients"] == 0);
    let out = blockctl(&c, Alpha, &["swap"]);
    assert_eq!(out.code(), 0, "swap:\n{out}");
    c.wait_for(Beta, "role Primary", Duration::from_secs(10), |v| v["role"] == "Primary");
    let verify = [&job[..], &["--verify_only=1"]].concat();
    let (_, read) = clients::fio_run(c.dir(), &c.nbd_uri(Beta), "verify", &verify);
    assert_eq!(read, 60 * MIB);

    // The repair: blockd stopped, room made on the filesystem.
    c.stop(Alpha);
    small.make_room();
    c.start_with_env(Alpha, &[("BLOCKD_STORAGE__ALLOCATE", "sparse")]);
    assert_failed(&c, Alpha, 28);
    bring_back(&c, Alpha, SIZE);
    c.stop(Alpha);
    drop(small);
}

/// ENOSPC on the Secondary's disk (its data-dir with 40 MiB free for the 64 MiB sparse
/// volume) during fio verify through alpha: fio sees no error, alpha goes on degraded with its
/// disk UpToDate, beta is Failed (ENOSPC) across a restart and comes back by a full resync
/// once the filesystem has room.
#[test]
fn enospc_on_the_secondary_degrades_the_primary_and_loses_nothing() {
    const SIZE: u64 = 64 * MIB;
    let (mut c, small, job) = filled("diskerror-enospc-secondary", Beta);
    let a = c.vol(Alpha);
    assert_eq!(a["disk"], "UpToDate", "the peer's error must not fail alpha's disk: {a}");
    assert!(a["out_of_sync"].as_u64().unwrap_or(0) > 0, "alpha marks what beta lacks: {a}");
    assert_failed(&c, Beta, 28);

    c.stop(Beta);
    small.make_room();
    c.start_with_env(Beta, &[("BLOCKD_STORAGE__ALLOCATE", "sparse")]);
    assert_failed(&c, Beta, 28);
    bring_back(&c, Beta, SIZE);
    let verify = [&job[..], &["--verify_only=1"]].concat();
    let (_, read) = clients::fio_run(c.dir(), &c.nbd_uri(Alpha), "verify", &verify);
    assert_eq!(read, 60 * MIB);
    c.stop(Beta);
    drop(small);
}

/// A sparse volume on `n` whose data-dir has 40 MiB free for 64 MiB (what finding 2 had),
/// alpha Primary and in sync, and fio's job written and verified through alpha: 60 MiB of
/// 64 KiB sequential writes, with no error (asserted). Returns the job for a verify_only run.
fn filled(test: &str, n: NodeId) -> (Cluster, SmallFs, Vec<&'static str>) {
    let mut c = Cluster::new(test, "64MiB");
    let data_dir = c.backing(n).parent().expect("data dir").to_path_buf();
    let small = SmallFs::mount(&c.dir().join("small.ext4"), 40 * MIB, &data_dir);
    for m in [Alpha, Beta] {
        c.start_with_env(m, &[("BLOCKD_STORAGE__ALLOCATE", "sparse")]);
    }
    c.wait_in_sync(SYNC_TIMEOUT);
    c.role(Alpha, "primary", false).unwrap_or_else(|e| panic!("role primary on alpha: {e}"));
    c.wait_for(Alpha, "role Primary", Duration::from_secs(10), |v| v["role"] == "Primary");
    let job = ["--rw=write", "--bs=64k", "--size=60m", "--iodepth=4", "--verify=crc32c"];
    let job = [&job[..], &["--verify_fatal=1", "--end_fsync=1"]].concat();
    let (written, read) = clients::fio_run(c.dir(), &c.nbd_uri(Alpha), "fill", &job);
    assert_eq!((written, read), (60 * MIB, 60 * MIB), "fio must write and verify all 60 MiB");
    (c, small, job)
}

fn faults(errno: &'static str) -> Faults {
    Faults { error: Some(errno), ..Faults::default() }
}

/// An ext4 on a loop device mounted on a directory, most of it taken by a balloon file so
/// that `room` bytes are left; unmounted and detached on drop.
struct SmallFs {
    _mount: LoopMount,
    balloon: std::path::PathBuf,
}

impl SmallFs {
    fn mount(image: &Path, room: u64, dir: &Path) -> SmallFs {
        let f = std::fs::File::create(image).expect("create fs image");
        f.set_len(128 * MIB).expect("size fs image");
        run_timeout(cmd("mkfs.ext4", &["-q", "-F"]).arg(image), Duration::from_secs(30));
        let mut l = LoopMount::attach(image);
        l.mount(dir, "");
        let out =
            run_timeout(cmd("stat", &["-f", "-c", "%a %S"]).arg(dir), Duration::from_secs(10));
        let n: Vec<u64> = out.stdout.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        let free = n[0] * n[1];
        assert!(free > room, "the filesystem has only {free} bytes free");
        let balloon = dir.join("balloon");
        let len = (free - room).to_string();
        run_timeout(cmd("fallocate", &["-l", &len]).arg(&balloon), Duration::from_secs(30));
        SmallFs { _mount: l, balloon }
    }

    /// The repair: room made (the balloon goes).
    fn make_room(&self) {
        std::fs::remove_file(&self.balloon).expect("remove balloon");
    }
}
