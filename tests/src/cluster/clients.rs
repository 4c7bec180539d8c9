//! The clients two-node tests drive a primary with: fio (nbd engine) and three python libnbd
//! scripts, `stress.py` (overlapping concurrent requests), `acked_writer.py` (the oracle of
//! "every acknowledged write survives": it logs a write only after its reply) and
//! `flush_writer.py` (the oracle of a power cut: what a completed FLUSH covered survives).
//!
//! They all run in the root namespace: the NBD sockets are unix sockets.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;

use crate::{
    cmd::{cmd, run_timeout, Background},
    nbd::RawClient,
};

/// The interpreter with the libnbd bindings (`import nbd`); a pyenv `python3` on PATH may not
/// have them.
pub const PYTHON: &str = "/usr/bin/python3";

const ACKED_WRITER: &str = include_str!("acked_writer.py");
const STRESS: &str = include_str!("stress.py");
const FLUSH_WRITER: &str = include_str!("flush_writer.py");

/// A fio command against `uri`: nbd engine, JSON output to `<dir>/<tag>.json`, verify state
/// and other files in `dir`. `args` are the job's options (`--rw=...`, ...).
pub fn fio(dir: &Path, uri: &str, tag: &str, args: &[&str]) -> (Command, PathBuf) {
    crate::require("fio");
    let json = dir.join(format!("{tag}.json"));
    let mut c = cmd("fio", &[format!("--name={tag}"), "--ioengine=nbd".into()]);
    c.arg(format!("--uri={uri}")).args(args);
    c.args(["--output-format=json", "--verify_state_save=0"]);
    c.arg(format!("--output={}", json.display())).current_dir(dir);
    (c, json)
}

/// Runs a fio job to completion; panics unless fio exits 0 and every job reports error 0.
/// Returns the bytes written and read by all jobs.
pub fn fio_run(dir: &Path, uri: &str, tag: &str, args: &[&str]) -> (u64, u64) {
    let (mut c, json) = fio(dir, uri, tag, args);
    run_timeout(&mut c, Duration::from_secs(120));
    fio_result(&json)
}

/// A fio job running in the background (log in `<dir>/<tag>.log`).
pub struct FioRun {
    pub bg: Background,
    json: PathBuf,
}

impl FioRun {
    pub fn spawn(dir: &Path, uri: &str, tag: &str, args: &[&str]) -> FioRun {
        let (mut c, json) = fio(dir, uri, tag, args);
        let bg = Background::spawn(&mut c, &dir.join(format!("{tag}.log")));
        FioRun { bg, json }
    }

    /// Waits for fio; panics unless it exits 0 with no job error. Returns (written, read).
    pub fn finish(mut self, timeout: Duration) -> (u64, u64) {
        let status = self.bg.wait(timeout);
        let log = self.bg.log_text();
        let out = fs::read_to_string(&self.json).unwrap_or_default();
        assert!(
            status.is_some_and(|s| s.success()),
            "fio ended with {status:?} (None = still running after {timeout:?}):\n{log}\n{out}"
        );
        fio_result(&self.json)
    }
}

/// Parses fio's JSON output; panics on any job error. Returns (bytes written, bytes read).
pub fn fio_result(json: &Path) -> (u64, u64) {
    let text = fs::read_to_string(json).unwrap_or_else(|e| panic!("{}: {e}", json.display()));
    // fio may print notes before the JSON object.
    let start = text.find('{').unwrap_or_else(|| panic!("no JSON in fio output:\n{text}"));
    let v: Value = serde_json::from_str(&text[start..])
        .unwrap_or_else(|e| panic!("fio output is not JSON ({e}):\n{text}"));
    let jobs = v["jobs"].as_array().unwrap_or_else(|| panic!("no jobs in fio output:\n{text}"));
    let (mut written, mut read) = (0, 0);
    for job in jobs {
        assert_eq!(job["error"], 0, "fio job {} failed: {job}", job["jobname"]);
        written += job["write"]["io_bytes"].as_u64().unwrap_or(0);
        read += job["read"]["io_bytes"].as_u64().unwrap_or(0);
    }
    (written, read)
}

/// Writes one of the bundled python scripts into `dir` and returns its path.
fn script(dir: &Path, name: &str, text: &str) -> PathBuf {
    crate::require_root();
    assert!(Path::new(PYTHON).is_file(), "{PYTHON} (with the libnbd bindings) is required");
    let path = dir.join(name);
    fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// Starts `stress.py` against `uri` (see the script for the request mix).
pub fn stress(dir: &Path, uri: &str, seed: u64, secs: u32, depth: u32, span: u64) -> Background {
    let py = script(dir, "stress.py", STRESS);
    let mut c = Command::new(PYTHON);
    c.arg(py).arg(uri);
    c.args([seed.to_string(), secs.to_string(), depth.to_string(), span.to_string()]);
    Background::spawn(&mut c, &dir.join(format!("stress-{seed}.log")))
}

/// Starts `acked_writer.py`; the acknowledged writes go to the returned log path.
pub fn acked_writer(dir: &Path, uri: &str, nblocks: u64, depth: u32) -> (Background, PathBuf) {
    let py = script(dir, "acked_writer.py", ACKED_WRITER);
    let log = dir.join("acked.log");
    let mut c = Command::new(PYTHON);
    c.arg(py).arg(uri).arg(&log).args([nblocks.to_string(), depth.to_string()]);
    (Background::spawn(&mut c, &dir.join("acked_writer.out")), log)
}

/// The content `acked_writer.py` writes to `block` in round `round`.
pub fn acked_block(round: u64, block: u64) -> Vec<u8> {
    format!("R{round:06}B{block:08}").repeat(256).into_bytes()
}

/// The last acknowledged round of each block, from the writer's log. A torn last line (the
/// writer was killed mid-write) cannot happen: the writer is never killed before it exits.
pub fn acked_rounds(log: &Path) -> BTreeMap<u64, u64> {
    let text = fs::read_to_string(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    let mut last = BTreeMap::new();
    for line in text.lines() {
        let mut it = line.split(' ').map(|n| n.parse::<u64>().ok());
        let (Some(Some(round)), Some(Some(block)), None) = (it.next(), it.next(), it.next()) else {
            panic!("bad line {line:?} in {}", log.display());
        };
        let r = last.entry(block).or_insert(round);
        *r = (*r).max(round);
    }
    last
}

/// Reads every block of `rounds` through NBD on `socket` and checks it holds its last
/// acknowledged round, or the next one (which may have been in flight at the crash).
/// Returns how many blocks were checked.
pub fn check_acked(socket: &Path, export: &str, rounds: &BTreeMap<u64, u64>) -> usize {
    let (mut client, _) = RawClient::transmission(socket, export);
    let mut bad = Vec::new();
    for (&block, &round) in rounds {
        let data = client
            .read(block * 4096, 4096)
            .unwrap_or_else(|e| panic!("READ of block {block} failed with NBD error {e}"));
        if data != acked_block(round, block) && data != acked_block(round + 1, block) {
            let head = String::from_utf8_lossy(&data[..16]).into_owned();
            bad.push(format!("block {block}: acknowledged round {round}, holds {head:?}"));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} acknowledged blocks lost or wrong; first: {:#?}",
        bad.len(),
        rounds.len(),
        &bad[..bad.len().min(10)]
    );
    rounds.len()
}

/// What `flush_writer.py` is asked to do (see the script).
#[derive(Debug, Clone, Copy)]
pub struct FlushLoad {
    pub seed: u64,
    pub secs: u32,
    pub nblocks: u64,
    pub depth: u32,
    pub flush_every: u32,
}

/// Starts `flush_writer.py` against `uri`; its log of acks and flushes is the returned path.
pub fn flush_writer(dir: &Path, uri: &str, tag: &str, load: FlushLoad) -> (Background, PathBuf) {
    let py = script(dir, "flush_writer.py", FLUSH_WRITER);
    let log = dir.join(format!("{tag}.acks"));
    let mut c = Command::new(PYTHON);
    c.arg(py).arg(uri).arg(&log);
    let FlushLoad { seed, secs, nblocks, depth, flush_every } = load;
    c.args(
        [seed, u64::from(secs), nblocks, u64::from(depth), u64::from(flush_every)]
            .map(|n| n.to_string()),
    );
    (Background::spawn(&mut c, &dir.join(format!("{tag}.out"))), log)
}

/// What a power cut must not lose, from a `flush_writer.py` log: per block, the newest write
/// acknowledged before the last completed flush was sent. Also returns (writes acknowledged,
/// flushes completed).
pub fn flushed_floor(log: &Path) -> (BTreeMap<u64, u64>, u64, u64) {
    let text = fs::read_to_string(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    let (mut acked, mut at_send, mut floor) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    let (mut writes, mut flushes) = (0, 0);
    // The last line may be torn (the writer is killed by the power cut): ignore what fails.
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        match (f.first().copied(), n(1), n(2), f.len()) {
            (Some("W"), Some(seq), Some(block), 3) => {
                acked.insert(block, seq);
                writes += 1;
            }
            (Some("S"), Some(id), None, 2) => {
                at_send.insert(id, acked.clone());
            }
            (Some("F"), Some(id), None, 2) => {
                floor = at_send.remove(&id).unwrap_or_else(|| panic!("flush {id} never sent"));
                at_send.retain(|&k, _| k > id);
                flushes += 1;
            }
            _ => {}
        }
    }
    (floor, writes, flushes)
}

/// Reads every block of `floor` through NBD on `socket`: each must hold its floor write or a
/// later write of the same block. Returns how many blocks were checked.
pub fn check_flushed(socket: &Path, export: &str, floor: &BTreeMap<u64, u64>) -> usize {
    let (mut client, _) = RawClient::transmission(socket, export);
    let mut bad = Vec::new();
    for (&block, &seq) in floor {
        let data = client
            .read(block * 4096, 4096)
            .unwrap_or_else(|e| panic!("READ of block {block} failed with NBD error {e}"));
        let tag = String::from_utf8_lossy(&data[..32]).into_owned();
        let held = tag
            .strip_prefix('Q')
            .and_then(|t| t.split_once('B'))
            .and_then(|(s, b)| Some((s.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
        let whole = data.chunks(32).all(|c| c == &data[..32]);
        if !whole || !held.is_some_and(|(s, b)| b == block && s >= seq) {
            bad.push(format!("block {block}: flushed write {seq}, holds {tag:?}"));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} flushed blocks lost or wrong; first: {:#?}",
        bad.len(),
        floor.len(),
        &bad[..bad.len().min(10)]
    );
    floor.len()
}
