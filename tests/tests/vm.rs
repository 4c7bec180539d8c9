//! The VM tier: the real kernel path (DESIGN §10) that this machine's kernel cannot run, because
//! it has no `nbd` module. `vm_kernel_tier` boots Debian's kernel under qemu (TCG) with
//! virtme-ng (`tests/vm/run`, which fetches and caches both through `tests/vm/setup`); the guest
//! sees this machine's files, so it runs this very test binary again, as root, with the
//! `guest_*` tests selected. Those are `#[ignore]`d on the host: they need the guest's kernel
//! (`modprobe nbd` fails here, loudly).
//!
//! One boot runs every guest test (a boot costs ~15 s even on an idle machine); the host test
//! passes only when every one of them passed in the guest.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use blockd_tests::{
    cmd::{cmd, require, require_root, run_timeout, try_run},
    Node,
};

const VOL: &str = "vol";

/// The guest tests one boot runs; each must pass.
const GUEST_TESTS: &[&str] = &["guest_nbd_client_ext4_xfs_fio"];

/// Bound of the whole guest run (boot, every guest test, power-off) on a loaded 2-core host.
const VM_TIMEOUT: Duration = Duration::from_secs(1500);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

#[test]
fn vm_kernel_tier() {
    require_root();
    let exe = std::env::current_exe().expect("test binary path");
    let mut c = cmd(repo().join("tests/vm/run").to_str().expect("utf-8 path"), &["--"]);
    c.arg(&exe).args(["--ignored", "--exact", "--test-threads=1", "--nocapture"]);
    c.args(GUEST_TESTS);
    let t = Instant::now();
    let out = try_run(&mut c, VM_TIMEOUT);
    eprintln!("VM tier: guest run took {:.0} s\n{}", t.elapsed().as_secs_f64(), out.stdout);
    let summary = format!("test result: ok. {} passed; 0 failed", GUEST_TESTS.len());
    assert!(
        out.status.success() && out.stdout.contains(&summary),
        "guest tests failed ({}):\n{out}",
        out.status
    );
}

/// Inside the guest: the kernel's nbd module, or a loud failure on the host.
fn guest_kernel() {
    assert_eq!(
        std::env::var("IN_BLOCKD_VM").as_deref(),
        Ok("1"),
        "guest_* tests run inside the VM; run vm_kernel_tier instead"
    );
    run_timeout(&mut cmd("modprobe", &["nbd", "nbds_max=4"]), Duration::from_secs(60));
    for tool in ["nbd-client", "fio", "mkfs.ext4", "mkfs.xfs", "e2fsck", "xfs_repair"] {
        require(tool);
    }
}

/// mkfs on `dev`, mount, fio writes and verifies a file at QD32, umount, fsck clean.
fn filesystem_round(dev: &str, fs: &str, mnt: &Path) {
    let mkfs = if fs == "xfs" { ["mkfs.xfs", "-q", "-f"] } else { ["mkfs.ext4", "-q", "-F"] };
    run_timeout(&mut cmd(mkfs[0], &[mkfs[1], mkfs[2], dev]), Duration::from_secs(300));
    std::fs::create_dir_all(mnt).expect("mkdir mountpoint");
    run_timeout(&mut cmd("mount", &[dev, mnt.to_str().expect("utf-8")]), Duration::from_secs(120));
    let file = mnt.join("fio.dat");
    let mut f = cmd("fio", &["--name=verify", "--ioengine=libaio", "--direct=1", "--iodepth=32"]);
    f.args(["--rw=randwrite", "--bsrange=4k-64k", "--size=48m", "--verify=crc32c"]);
    f.args(["--do_verify=1", "--verify_fatal=1", "--randrepeat=0"]);
    f.arg(format!("--filename={}", file.display()));
    let fio = try_run(&mut f, Duration::from_secs(600));
    let umount =
        try_run(&mut cmd("umount", &[mnt.to_str().expect("utf-8")]), Duration::from_secs(120));
    assert!(fio.status.success(), "fio verify on {fs} over {dev} failed:\n{fio}");
    assert!(umount.status.success(), "umount {}:\n{umount}", mnt.display());
    let fsck = if fs == "xfs" {
        try_run(&mut cmd("xfs_repair", &["-n", dev]), Duration::from_secs(300))
    } else {
        try_run(&mut cmd("e2fsck", &["-fn", dev]), Duration::from_secs(300))
    };
    assert_eq!(fsck.code(), 0, "{fs} on {dev} not clean after fio:\n{fsck}");
    eprintln!("{fs} on {dev}: mkfs, mount, fio verify QD32, umount, fsck clean");
}

/// The fallback attach: nbd-client connects /dev/nbd0 to blockd's unix socket; ext4 and xfs
/// both survive a fio verify run and fsck clean; `nbd-client -d` disconnects.
#[test]
#[ignore = "runs inside the VM: vm_kernel_tier boots it"]
fn guest_nbd_client_ext4_xfs_fio() {
    guest_kernel();
    let node = Node::started("vm-nbd-client", &[(VOL, "320MiB")], "");
    let sock = node.socket(VOL);
    let mut attach = cmd("nbd-client", &["-unix", sock.to_str().expect("utf-8"), "-N", VOL]);
    attach.arg("/dev/nbd0");
    run_timeout(&mut attach, Duration::from_secs(60));
    let mnt = node.dir().path().join("mnt");
    for fs in ["ext4", "xfs"] {
        filesystem_round("/dev/nbd0", fs, &mnt);
    }
    run_timeout(&mut cmd("nbd-client", &["-d", "/dev/nbd0"]), Duration::from_secs(60));
    assert!(node.counter(VOL, "flushes") > 0, "the filesystems' flushes must reach blockd");
}
