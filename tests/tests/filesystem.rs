//! A real filesystem on blockd, reached the way this machine allows (nbdfuse → loop,
//! design.md §10), and the daemon's orderly shutdown: SIGTERM finishes in-flight requests,
//! flushes and exits 0, and whatever was written before it is there after a restart.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use blockd_tests::{
    assert_bytes_eq, assert_read,
    cmd::{cmd, try_run, wait_for},
    nbd::{self, RawClient},
    pattern, require, run, run_timeout, Background, LoopMount, NbdFuse, Node,
};

const VOL: &str = "vol";

/// The files the ext4 test writes: (relative path, seed, size).
fn files() -> Vec<(String, u64, usize)> {
    let mut v: Vec<(String, u64, usize)> = (0..16u64)
        .map(|i| (format!("d{}/f{i}", i % 4), 1000 + i, 1 + (i as usize * 131_071) % (2 << 20)))
        .collect();
    v.push(("big.bin".into(), 7, 24 << 20));
    v
}

fn require_fs_tools() {
    for tool in ["nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount"] {
        require(tool);
    }
    require("sha256sum");
}

/// `e2fsck -fn`: forced full check, no changes; exit 0 means clean.
fn fsck_clean(dev: &str) {
    let out = try_run(&mut cmd("e2fsck", &["-fn", dev]), Duration::from_secs(120));
    assert_eq!(out.code(), 0, "e2fsck -fn found problems:\n{out}");
}

fn write_files(mnt: &Path) {
    for (rel, seed, size) in files() {
        let path = mnt.join(&rel);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, pattern(seed, size)).unwrap_or_else(|e| panic!("write {rel}: {e}"));
    }
    let names: Vec<String> = files().into_iter().map(|(rel, _, _)| rel).collect();
    let sums = run(cmd("sha256sum", &names).current_dir(mnt));
    fs::write(mnt.join("SHA256SUMS"), &sums.stdout).expect("write SHA256SUMS");
}

fn check_files(mnt: &Path) {
    run(cmd("sha256sum", &["-c", "--strict", "SHA256SUMS"]).current_dir(mnt));
    for (rel, seed, size) in files() {
        let got = fs::read(mnt.join(&rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"));
        assert_bytes_eq(&got, &pattern(seed, size), &rel);
    }
}

/// nbdfuse + loop device on the node's volume.
fn attach(node: &Node, name: &str) -> (NbdFuse, LoopMount, PathBuf) {
    let fuse = NbdFuse::attach(&node.dir().path().join(format!("{name}-fuse")), &node.uri(VOL));
    let lp = LoopMount::attach(&fuse.file());
    (fuse, lp, node.dir().path().join(format!("{name}-mnt")))
}

/// ext4 through nbdfuse and loop: mkfs, files with checksums, clean fsck; then SIGTERM
/// (exit 0), restart, and the files and a clean fsck are still there.
#[test]
fn ext4_survives_sigterm_and_restart() {
    require_fs_tools();
    let mut node = Node::started("fs-ext4", &[(VOL, "256MiB")], "");
    let (fuse, mut lp, mnt) = attach(&node, "first");
    run(&mut cmd("mkfs.ext4", &["-q", "-F", lp.dev()]));
    lp.mount(&mnt, "");
    write_files(&mnt);
    lp.umount();
    fsck_clean(lp.dev());
    lp.detach();
    fuse.detach();
    assert!(node.counter(VOL, "flushes") > 0, "umount must have flushed through to blockd");

    node.stop();
    node.start();

    let (fuse, mut lp, mnt) = attach(&node, "second");
    fsck_clean(lp.dev());
    lp.mount(&mnt, "ro");
    check_files(&mnt);
    lp.detach();
    fuse.detach();
}

/// SIGTERM while fio writes over 2 connections at iodepth 32: blockd finishes what is in
/// flight and exits 0 in time, data outside fio's range is intact after a restart, and the
/// restarted daemon serves a fresh client.
#[test]
fn sigterm_with_fio_writer_running() {
    require("fio");
    let mut node = Node::started("fs-sigterm-fio", &[(VOL, "64MiB")], "");
    let guard = pattern(77, 1 << 20);
    let (mut c, _) = RawClient::transmission(&node.socket(VOL), VOL);
    assert_eq!(c.write(48 << 20, &guard), 0);
    drop(c);

    let mut f = cmd("fio", &["--name=load", "--ioengine=nbd", "--rw=randwrite", "--bs=4k"]);
    f.args(["--iodepth=32", "--numjobs=2", "--size=16m", "--offset_increment=16m"]);
    f.args(["--time_based=1", "--runtime=60"]).arg(format!("--uri={}", node.uri(VOL)));
    f.current_dir(node.dir().path());
    let mut fio = Background::spawn(&mut f, &node.dir().path().join("fio.log"));
    wait_for("fio writes to reach blockd", Duration::from_secs(30), || {
        node.counter(VOL, "writes") > 200
    });
    node.stop();
    let fio_status = fio.wait(Duration::from_secs(30));
    assert!(fio_status.is_some(), "fio kept running after blockd exited:\n{}", fio.log_text());

    node.start();
    let (mut c, _) = RawClient::transmission(&node.socket(VOL), VOL);
    assert_read(c.read(48 << 20, 1 << 20), &guard, "data outside fio's range");
    assert_eq!(c.write(0, &pattern(78, 4096)), 0, "restarted daemon takes writes");
}

/// xfs through nbdfuse and loop (the other filesystem design.md §9 names): mkfs (xfs wants at
/// least 300 MiB), files with checksums, a remount read-only, and `xfs_repair -n` clean.
#[test]
fn xfs_mkfs_and_mount() {
    require_fs_tools();
    require("mkfs.xfs");
    require("xfs_repair");
    let node = Node::started("fs-xfs", &[(VOL, "320MiB")], "");
    let (fuse, mut lp, mnt) = attach(&node, "xfs");
    run_timeout(&mut cmd("mkfs.xfs", &["-q", "-f", lp.dev()]), Duration::from_secs(180));
    lp.mount(&mnt, "");
    write_files(&mnt);
    lp.umount();
    lp.mount(&mnt, "ro");
    check_files(&mnt);
    lp.umount();
    run(&mut cmd("xfs_repair", &["-n", lp.dev()]));
    lp.detach();
    fuse.detach();
}

/// SIGTERM with 64 writes (half FUA) in flight on one connection: every reply that comes is a success
/// (or ESHUTDOWN, NBD-NOTES §2.8), blockd exits 0, and every acknowledged write is there
/// after a restart.
#[test]
fn sigterm_keeps_acknowledged_writes() {
    blockd_tests::require_root();
    let mut node = Node::started("fs-sigterm-acked", &[(VOL, "64MiB")], "");
    const CHUNK: u64 = 256 << 10;
    let mut c = RawClient::transmission(&node.socket(VOL), VOL).0;
    let mut burst = Vec::new();
    for i in 0..64u64 {
        // Every other write with FUA: slower (a sync each), so more are in flight at SIGTERM.
        let flags = if i % 2 == 0 { nbd::CMD_FLAG_FUA } else { 0 };
        burst.extend(nbd::request_header(flags, nbd::CMD_WRITE, i, i * CHUNK, CHUNK as u32));
        burst.extend(pattern(500 + i, CHUNK as usize));
    }
    c.send(&burst);
    node.stop();
    let mut acked = Vec::new();
    while let Some(reply) = c.read_reply_or_close(0) {
        match reply.error() {
            0 => acked.push(reply.cookie()),
            108 => {}
            e => panic!("write answered with error {e} during shutdown: {reply:?}"),
        }
    }
    node.start();
    let mut c = RawClient::transmission(&node.socket(VOL), VOL).0;
    for i in &acked {
        let want = pattern(500 + i, CHUNK as usize);
        assert_read(c.read(i * CHUNK, CHUNK as u32), &want, &format!("acked write {i}"));
    }
    eprintln!("{} of 64 writes acknowledged before the shutdown", acked.len());
}

/// After SIGKILL (stale sockets left behind), blockd starts again and serves what was
/// written and flushed before.
#[test]
fn restart_after_sigkill() {
    blockd_tests::require_root();
    let mut node = Node::started("fs-sigkill", &[(VOL, "16MiB")], "");
    let data = pattern(31, 1 << 20);
    let mut c = RawClient::transmission(&node.socket(VOL), VOL).0;
    assert_eq!(c.write(3 << 20, &data), 0);
    assert_eq!(c.flush(), 0);
    node.kill();
    drop(c);
    node.start();
    let mut c = RawClient::transmission(&node.socket(VOL), VOL).0;
    assert_read(c.read(3 << 20, 1 << 20), &data, "flushed data after SIGKILL and restart");
    assert_bytes_eq(&node.backing_bytes(VOL, 3 << 20, 1 << 20), &data, "backing file");
}
