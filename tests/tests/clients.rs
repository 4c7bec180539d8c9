//! blockd driven by real third-party NBD clients: nbdinfo, qemu-io, qemu-img, nbdcopy, fio.
//! The counters in `blockctl status --json` must follow what the clients did.

use std::{fs, time::Duration};

use blockd_tests::{
    cmd::{cmd, try_run},
    pattern, require, run, run_timeout, Node,
};
use serde_json::Value;

const VOL: &str = "vol";

fn nbdinfo(args: &[&str], uri: &str) -> blockd_tests::Output {
    let mut c = cmd("nbdinfo", args);
    try_run(c.arg(uri), Duration::from_secs(30))
}

/// nbdinfo: LIST names the export, the JSON fields match the contract (size, flags, block
/// sizes), and `--can`/`--is` exit codes say true (0) and false (2) correctly.
#[test]
fn nbdinfo_sees_the_contract() {
    require("nbdinfo");
    let node = Node::started("clients-nbdinfo", &[(VOL, "64MiB")], "");
    let uri = node.uri(VOL);
    let list = nbdinfo(&["--list"], &node.uri(""));
    list.assert_success();
    assert!(list.stdout.contains("export=\"vol\""), "LIST does not name the volume:\n{list}");

    let out = nbdinfo(&["--json"], &uri);
    out.assert_success();
    let json: Value = serde_json::from_str(&out.stdout).expect("nbdinfo --json");
    let e = &json["exports"][0];
    assert_eq!(e["export-name"], VOL, "{json}");
    assert_eq!(e["export-size"], 64u64 << 20, "{json}");
    assert_eq!(e["is_read_only"], false, "{json}");
    for key in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"] {
        assert_eq!(e[key], true, "{key} in {json}");
    }
    assert_eq!(e["block_size_minimum"], 1, "{json}");
    assert_eq!(e["block_size_preferred"], 4096, "{json}");
    assert_eq!(e["block_size_maximum"], 32u64 << 20, "{json}");

    for can in ["flush", "fua", "trim", "zero", "multi-conn", "write", "connect"] {
        assert_eq!(nbdinfo(&["--can", can], &uri).code(), 0, "--can {can} should be true");
    }
    assert_eq!(nbdinfo(&["--is", "read-only"], &uri).code(), 2, "--is read-only must be false");
    let size = nbdinfo(&["--size"], &uri);
    assert_eq!(size.assert_success().stdout.trim(), (64u64 << 20).to_string());
    let default = nbdinfo(&["--size"], &node.uri(""));
    assert_eq!(default.assert_success().stdout.trim(), (64u64 << 20).to_string(), "export \"\"");
}

/// Runs qemu-io with `-c` commands on `target` (an NBD URI or a raw file). qemu-io exits
/// non-zero when a command fails, including a `read -P` pattern mismatch.
fn qemu_io(target: &str, cmds: &[&str]) -> blockd_tests::Output {
    let mut c = cmd("qemu-io", &["-f", "raw"]);
    c.arg(target);
    for command in cmds {
        c.args(["-c", command]);
    }
    let out = run(&mut c);
    assert!(!out.stdout.contains("failed") && !out.stderr.contains("failed"), "qemu-io:\n{out}");
    out
}

/// The writes both the qemu-io test and the qemu-img comparison apply: plain, unaligned,
/// parallel (aio), write-zeroes, discard (then zeroed, since trimmed data is undefined),
/// FUA, flush.
const WRITES: &[&str] = &[
    "write -P 0xa1 0 1M",
    "write -P 0xc3 12345 4321",
    "aio_write -P 0x11 4M 64k",
    "aio_write -P 0x22 4160k 64k",
    "aio_write -P 0x33 4224k 4k",
    "aio_write -P 0x44 4228k 3k",
    "aio_flush",
    "write -z 512k 128k",
    "write -P 0x55 8M 1M",
    "discard 8M 1M",
    "write -z 8M 1M",
    "write -f -P 0xd4 16M 256k",
    "flush",
];

/// What [`WRITES`] left behind, checked with `read -P` including unaligned ranges.
const READS: &[&str] = &[
    "read -P 0xa1 0 12345",
    "read -P 0xa1 16666 507622",
    "read -P 0 512k 128k",
    "read -P 0xa1 640k 384k",
    "read -P 0xa1 1 511",
    "read -P 0xa1 4095 3",
    "read -P 0xa1 12344 1",
    "read -P 0xc3 12345 4321",
    "read -P 0xa1 16666 1",
    "read -P 0x11 4M 64k",
    "read -P 0x22 4160k 64k",
    "read -P 0x33 4224k 4k",
    "read -P 0x44 4228k 3k",
    "read -P 0 8M 1M",
    "read -P 0xd4 16M 256k",
    "read -P 0xd4 16777217 4097",
    "read -P 0 63M 1M",
];

fn qemu_io_ops(test: &str, storage: &str) {
    require("qemu-io");
    let node = Node::started(test, &[(VOL, "64MiB")], storage);
    let uri = node.uri(VOL);
    qemu_io(&uri, WRITES);
    qemu_io(&uri, READS);
    // A check that should fail must fail: proves the pattern checks above can.
    let wrong = try_run(
        &mut cmd("qemu-io", &["-f", "raw", &uri, "-c", "read -P 0xa2 0 4k"]),
        Duration::from_secs(30),
    );
    assert_ne!(wrong.code(), 0, "reading a wrong pattern must fail qemu-io:\n{wrong}");
    let c = node.volume_status(VOL)["counters"].clone();
    for key in ["writes", "reads", "flushes", "trims", "zeroes"] {
        assert!(c[key].as_u64() > Some(0), "counter {key} did not move: {c}");
    }
    assert!(c["bytes_written"].as_u64() >= Some((1 << 20) + 4321 + 64 * 1024 * 2 + 7168), "{c}");
    assert_eq!(c["errors"], 0, "{c}");
}

#[test]
fn qemu_io_default_engine() {
    qemu_io_ops("clients-qemu-io", "");
}

#[test]
fn qemu_io_sync_engine() {
    qemu_io_ops("clients-qemu-io-sync", "[storage]\nengine = \"sync\"\n");
}

/// qemu-img compare: the same qemu-io writes applied to a local file and to blockd leave
/// identical images; a one-byte difference is detected (so the comparison can fail).
#[test]
fn qemu_img_compare_with_local_file() {
    require("qemu-img");
    require("qemu-io");
    let node = Node::started("clients-compare", &[(VOL, "64MiB")], "");
    let local = node.dir().path().join("local.img");
    fs::File::create(&local).and_then(|f| f.set_len(64 << 20)).expect("local image");
    let local = local.to_str().expect("utf-8 path").to_string();
    qemu_io(&node.uri(VOL), WRITES);
    qemu_io(&local, WRITES);
    let compare = || {
        let mut c = cmd("qemu-img", &["compare", "-f", "raw", "-F", "raw", &local]);
        try_run(c.arg(node.uri(VOL)), Duration::from_secs(60))
    };
    let same = compare();
    assert_eq!(same.code(), 0, "images differ:\n{same}");
    qemu_io(&local, &["write -P 0x01 33554433 1"]);
    let differ = compare();
    assert_eq!(differ.code(), 1, "a one-byte difference must be found:\n{differ}");
}

/// nbdcopy: random file → blockd → file; the SHA-256 of both files is equal.
#[test]
fn nbdcopy_round_trip() {
    require("nbdcopy");
    require("sha256sum");
    let node = Node::started("clients-nbdcopy", &[(VOL, "32MiB")], "");
    let dir = node.dir().path();
    let (input, output) = (dir.join("in.bin"), dir.join("out.bin"));
    fs::write(&input, pattern(42, 32 << 20)).expect("write input");
    run(cmd("nbdcopy", &[&input]).arg(node.uri(VOL)));
    run(cmd("nbdcopy", &[&node.uri(VOL)]).arg(&output));
    let sums = run(&mut cmd("sha256sum", &[&input, &output]));
    let hashes: Vec<&str> =
        sums.stdout.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(hashes.len(), 2, "{sums}");
    assert_eq!(hashes[0], hashes[1], "nbdcopy round trip changed the data:\n{sums}");
    assert!(node.counter(VOL, "bytes_written") >= 32 << 20);
    assert!(node.counter(VOL, "bytes_read") >= 32 << 20);
}

/// fio with the nbd engine: 2 jobs (2 connections) at separate offsets, iodepth 32,
/// random 4k writes verified with crc32c, then a flush. Counters must cover what fio did.
#[test]
fn fio_verify_two_connections() {
    require("fio");
    let node = Node::started("clients-fio", &[(VOL, "64MiB")], "");
    let json_path = node.dir().path().join("fio.json");
    let mut c = cmd("fio", &["--name=verify", "--ioengine=nbd", "--rw=randwrite", "--bs=4k"]);
    c.args(["--iodepth=32", "--numjobs=2", "--size=16m", "--offset_increment=16m"]);
    c.args(["--verify=crc32c", "--verify_fatal=1", "--end_fsync=1", "--output-format=json"]);
    c.arg(format!("--uri={}", node.uri(VOL))).arg(format!("--output={}", json_path.display()));
    // fio saves verify state files in its working directory: keep them in the test's.
    c.arg("--verify_state_save=0").current_dir(node.dir().path());
    run_timeout(&mut c, Duration::from_secs(180));
    let text = fs::read_to_string(&json_path).expect("fio json");
    let json: Value = serde_json::from_str(&text).expect("fio wrote JSON");
    let jobs = json["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 2, "{text}");
    let mut written = 0;
    for job in jobs {
        assert_eq!(job["error"], 0, "fio job failed: {job}");
        written += job["write"]["io_bytes"].as_u64().expect("io_bytes");
    }
    assert_eq!(written, 32 << 20, "fio must have written both 16 MiB ranges");
    let counters = node.volume_status(VOL)["counters"].clone();
    let get = |k: &str| counters[k].as_u64().unwrap_or_else(|| panic!("{k}: {counters}"));
    assert!(get("writes") >= 8192, "{counters}");
    assert!(get("bytes_written") >= written, "{counters}");
    assert!(get("reads") >= 8192 && get("bytes_read") >= written, "verify reads: {counters}");
    assert!(get("flushes") > 0, "end_fsync must reach blockd as a flush: {counters}");
    assert_eq!(get("errors"), 0, "{counters}");
}

/// The status JSON has every field of the contract, with the volume's facts.
#[test]
fn status_json_fields() {
    let node = Node::started("clients-status", &[(VOL, "64MiB"), ("second", "8MiB")], "");
    let status = node.status();
    assert_eq!(status["node"], "alpha", "{status}");
    assert!(status["version"].is_string(), "{status}");
    let v = node.volume_status(VOL);
    assert_eq!(v["size"], 64u64 << 20, "{v}");
    assert_eq!(v["role"], "Primary", "{v}");
    assert_eq!(v["disk"], "UpToDate", "{v}");
    assert_eq!(v["clients"], 0, "{v}");
    assert_eq!(v["socket"], node.socket(VOL).to_str().unwrap(), "{v}");
    assert!(v["backing"].as_str().is_some_and(|b| b.ends_with("vol.img")), "{v}");
    assert!(["io_uring", "sync"].contains(&v["engine"].as_str().unwrap_or("")), "{v}");
    assert!(v["direct_io"].is_boolean(), "{v}");
    for key in ["reads", "writes", "bytes_read", "bytes_written", "flushes", "trims", "zeroes"] {
        assert_eq!(v["counters"][key], 0, "fresh volume, {key}: {v}");
    }
    assert_eq!(node.volume_status("second")["size"], 8u64 << 20);
    let backing = fs::metadata(node.data_dir.join("vol.img")).expect("backing file vol.img");
    assert_eq!(backing.len(), 64 << 20, "backing file size");
    use std::os::unix::fs::MetadataExt;
    assert!(backing.blocks() * 512 < 64 << 20, "backing file must be created sparse");
    let human = run(node.blockctl().arg("status"));
    assert!(human.stdout.contains(VOL) && human.stdout.contains("second"), "{human}");
}

/// The counters count exactly the requests a raw client sent: successful ones only, bytes
/// by payload, errors only for I/O errors (a refused out-of-range write is not one).
#[test]
fn counters_follow_requests_exactly() {
    use blockd_tests::nbd::{self, RawClient};
    let node = Node::started("clients-counters", &[(VOL, "16MiB")], "");
    let (mut c, _) = RawClient::transmission(&node.socket(VOL), VOL);
    for i in 0..3u64 {
        assert_eq!(c.write(i * 8192, &pattern(i, 4096 + i as usize)), 0);
    }
    assert!(c.read(0, 4096).is_ok() && c.read(1, 1000).is_ok());
    assert_eq!(c.flush(), 0);
    assert_eq!(c.call(0, nbd::CMD_TRIM, 1 << 20, 1 << 20, &[]).error(), 0);
    assert_eq!(c.call(0, nbd::CMD_WRITE_ZEROES, 2 << 20, 4096, &[]).error(), 0);
    assert_eq!(c.write(16 << 20, &[1; 512]), nbd::ENOSPC);
    let v = node.volume_status(VOL);
    assert_eq!(v["clients"], 1, "one client connected: {v}");
    let want = serde_json::json!({
        "reads": 2, "writes": 3, "bytes_read": 5096, "bytes_written": 3 * 4096 + 3,
        "flushes": 1, "trims": 1, "zeroes": 1, "errors": 0,
        // A single node has no peer: nothing mirrored, nothing degraded.
        "peer_writes": 0, "peer_bytes": 0, "degraded_writes": 0, "resync_bytes": 0, "connects": 0,
        "resync_zero_bytes": 0, "resync_same_bytes": 0, "verify_differed": 0, "link_refused": 0,
        "meta_writes": 0
    });
    assert_eq!(v["counters"], want, "counters after known requests: {v}");
}
