//! The loop devices a failover test's nodes created, remembered by device, so that cleanup
//! detaches exactly those even after their backing file's path is gone.
//!
//! `blockctl promote` attaches the mirror as a loop device on nbdfuse's file, inside a node's
//! mount namespace. Once that FUSE mount is lazily unmounted (a reboot of the node, the
//! namespace's cleanup, a demote that gave up), `/sys/block/loopN/loop/backing_file` no
//! longer names the test directory but `/nbd` (the path inside the detached mount): a scan by
//! path misses it and the device stays bound to a dead file
//! forever. So a [`LoopTracker`] samples the loop devices while their paths are still whole,
//! and keeps each as (device, `diskseq`): the kernel gives a device a new `diskseq` every time
//! a file is attached to it, so a device detached and reused by another test afterwards has a
//! different one and is never touched. Never by name pattern: `/nbd` devices of other tests
//! look the same.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::cmd::{cmd, run_quiet};

/// How often the sampler looks: a promote keeps its device for far longer than this.
const SAMPLE: Duration = Duration::from_millis(100);
const LOSETUP_TIMEOUT: Duration = Duration::from_secs(20);

/// A loop device as first seen: its backing file then, and its attachment's sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    backing: PathBuf,
    diskseq: u64,
}

type Table = Arc<Mutex<BTreeMap<String, Seen>>>;

/// Samples the loop devices backed by files under `dir` every [`SAMPLE`] until dropped.
pub struct LoopTracker {
    dir: PathBuf,
    seen: Table,
    stop: Arc<AtomicBool>,
    sampler: Option<JoinHandle<()>>,
}

impl LoopTracker {
    pub fn start(dir: &Path) -> LoopTracker {
        let (seen, stop) = (Table::default(), Arc::new(AtomicBool::new(false)));
        let (d, s, st) = (dir.to_path_buf(), Arc::clone(&seen), Arc::clone(&stop));
        let sampler = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                record(&d, &s);
                std::thread::sleep(SAMPLE);
            }
        });
        LoopTracker { dir: dir.to_path_buf(), seen, stop, sampler: Some(sampler) }
    }

    /// The tracked devices whose backing file was under `under` (`/dev/loopN`), still bound
    /// to the attachment first seen; records the current ones first.
    pub fn devices(&self, under: &Path) -> Vec<String> {
        record(&self.dir, &self.seen);
        let seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let ours = seen.iter().filter(|(_, s)| s.backing.starts_with(under));
        ours.filter(|(dev, s)| still_bound(dev, s.diskseq))
            .map(|(d, _)| format!("/dev/{d}"))
            .collect()
    }

    /// Detaches every tracked device of [`LoopTracker::devices`]`(under)`; never panics. A
    /// device still mounted is only marked for autoclear by the kernel: it goes when the
    /// mount does.
    pub fn detach(&self, under: &Path) {
        for dev in self.devices(under) {
            match run_quiet(&mut cmd("losetup", &["-d", &dev]), LOSETUP_TIMEOUT) {
                Some(o) if o.status.success() => {}
                Some(o) => eprintln!("cleanup: {o}"),
                None => eprintln!("cleanup: losetup -d {dev} did not finish"),
            }
        }
    }
}

impl Drop for LoopTracker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.sampler.take() {
            let _ = t.join();
        }
    }
}

/// Adds the loop devices now backed by a file under `dir` to `seen` (a device re-attached
/// under `dir` replaces its older record).
fn record(dir: &Path, seen: &Table) {
    let Ok(entries) = fs::read_dir("/sys/block") else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let backing = fs::read_to_string(e.path().join("loop/backing_file")).unwrap_or_default();
        let backing = PathBuf::from(backing.trim());
        let Some(diskseq) = diskseq(&name) else { continue };
        if backing.starts_with(dir) {
            let mut seen = seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            seen.insert(name, Seen { backing, diskseq });
        }
    }
}

fn diskseq(dev: &str) -> Option<u64> {
    fs::read_to_string(format!("/sys/block/{dev}/diskseq")).ok()?.trim().parse().ok()
}

/// `dev` is bound to a file, and it is still the attachment numbered `seq`.
fn still_bound(dev: &str, seq: u64) -> bool {
    Path::new(&format!("/sys/block/{dev}/loop/backing_file")).exists() && diskseq(dev) == Some(seq)
}
