//! Files on the filesystem a node mounted from the mirror, written by `file_writer.py`: new
//! versions of 200 files, each fsync'ed and atomically renamed into place, logged once durable.
//! The log (in the test directory, outside the mirror) is the oracle of "every fsync'ed file
//! survives a power cut and a failover"; the check runs on whichever node mounts it next.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{clients::PYTHON, Cluster, NodeId};
use crate::cmd::{try_run, Background};

const FILE_WRITER: &str = include_str!("file_writer.py");

/// `file_writer.py write` running on a node.
pub struct FileWriter {
    bg: Background,
    log: PathBuf,
    stop: PathBuf,
}

fn script(c: &Cluster) -> PathBuf {
    let path = c.dir().join("file_writer.py");
    fs::write(&path, FILE_WRITER).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

impl FileWriter {
    /// Starts writing under `root` (a directory on the filesystem mounted on `n`).
    pub fn start(c: &Cluster, n: NodeId, root: &str, seed: u64) -> FileWriter {
        let dir = c.dir();
        let (log, stop) = (dir.join("file_writer.log"), dir.join("file_writer.stop"));
        let _ = fs::remove_file(&stop);
        let mut cmd = c.lan().mount_ns(n).command(PYTHON);
        cmd.arg(script(c)).arg("write").arg(root).arg(&log).arg(&stop).arg(seed.to_string());
        let bg = Background::spawn(&mut cmd, &dir.join("file_writer.out"));
        FileWriter { bg, log, stop }
    }

    /// Versions logged durable so far.
    pub fn durable(&self) -> usize {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().filter(|l| l.starts_with("D ")).count()
    }

    /// Waits until at least `n` versions are durable; panics with the writer's output if not.
    pub fn wait_durable(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.durable() < n {
            assert!(
                Instant::now() < deadline,
                "{} versions durable after {timeout:?}, wanted {n}: {}",
                self.durable(),
                self.bg.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// After the node died: waits for the writer to be gone (it was one of the node's
    /// processes). Returns the log.
    pub fn killed(mut self) -> PathBuf {
        fs::write(&self.stop, b"").expect("write stop file");
        let _ = self.bg.wait(Duration::from_secs(30));
        self.log.clone()
    }
}

/// Runs `file_writer.py check` on `n` against `root` (mounted there): every durable version
/// is there. Returns its summary line; panics with the mismatches.
pub fn check_files(c: &Cluster, n: NodeId, root: &str, log: &Path) -> String {
    let mut cmd = c.lan().mount_ns(n).command(PYTHON);
    cmd.arg(script(c)).arg("check").arg(root).arg(log);
    let out = try_run(&mut cmd, Duration::from_secs(120));
    assert!(out.status.success(), "fsync'ed files lost on {}:\n{out}", n.name());
    out.stdout.trim().to_string()
}
