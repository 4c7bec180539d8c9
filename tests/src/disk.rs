//! Disks that fail the way real ones do (design.md §10), as a backing file for blockd:
//!
//! ```text
//!   blockd ── O_DIRECT ──► <dir>/fuse/disk (nbdfuse) ── NBD ──► nbdkit [filters] file <dir>/disk.img
//! ```
//!
//! - `cache`: nbdkit's cache filter in writeback mode holds every write in a volatile cache
//!   until a FLUSH (or FUA) writes it to `disk.img`, like a disk's write cache. SIGKILL of
//!   nbdkit ([`FaultDisk::power_cut`]) loses what was not flushed; [`FaultDisk::power_on`]
//!   serves what `disk.img` kept. Such a disk refuses `FALLOC_FL_PUNCH_HOLE` with EINVAL:
//!   nbdfuse turns a punch into an NBD trim, which the cache filter may ignore (a trim is
//!   advisory), so the range would not read back as zeroes as on a real file; refused, the
//!   caller falls back to writing zeroes (blockd does, for WRITE_ZEROES and TRIM alike; a loop
//!   device sends its write-zeroes as punches, which nbdfuse turns into TRIMs).
//! - `error`: the error filter fails every request with `errno` while the trigger file exists
//!   ([`FaultDisk::fail`] / [`FaultDisk::heal`]).
//! - `pause`: the pause filter holds every request from [`FaultDisk::pause`] to
//!   [`FaultDisk::resume`] (a hung disk).
//! - `delay`: every write, zero and trim waits that long (a slow disk).
//!
//! The guard kills nbdfuse and nbdkit by pid on drop, also when a test panics. Only the data
//! file goes through the fault disk; blockd's `.meta` stays on the test directory's filesystem,
//! whose page cache a SIGKILL does not lose, so a power cut here keeps every metadata write
//! that completed (a real one keeps only the fsynced ones; blockd fsyncs its metadata before it
//! relies on it, which these tests do not check).

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    cmd::{cmd, kill_with_parent, run_timeout, signal, wait_until},
    mounts::NbdFuse,
};

const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Which faults a [`FaultDisk`] can show.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// A volatile write cache that a power cut loses (nbdkit cache filter, writeback).
    pub cache: bool,
    /// Requests fail with this errno name (e.g. "EIO", "ENOSPC") while the trigger file exists.
    pub error: Option<&'static str>,
    /// Requests can be held (pause filter with a control socket).
    pub pause: bool,
    /// Every write, zero and trim is delayed this long (flushes are not: nbdkit 1.32's
    /// delay filter cannot).
    pub delay: Option<Duration>,
}

/// One fault-injecting disk: nbdkit over a plain image, presented as a file by nbdfuse.
pub struct FaultDisk {
    dir: PathBuf,
    size: u64,
    faults: Faults,
    /// The mount namespace (its file) nbdfuse mounts in; `None`: the test's own.
    ns: Option<PathBuf>,
    nbdkit: Option<Child>,
    fuse: Option<NbdFuse>,
}

impl FaultDisk {
    /// Creates `<dir>/disk.img` of `size` bytes (sparse) and serves it.
    pub fn create(dir: &Path, size: u64, faults: Faults) -> FaultDisk {
        crate::require("nbdkit");
        std::fs::create_dir_all(dir).expect("mkdir fault disk dir");
        let image = dir.join("disk.img");
        let f = std::fs::File::create(&image).expect("create disk.img");
        f.set_len(size).expect("size disk.img");
        FaultDisk::serve(dir, size, faults, None)
    }

    /// A fault disk holding a copy of `from` (say a node's backing file, while its daemon is
    /// stopped), its file mounted in the mount namespace bound to `ns` (a node of a
    /// [`crate::cluster::Cluster::with_lan`] cluster: blockd there sees it, the test does not).
    /// nbdkit runs in the test's namespaces: a node's `kill_node` leaves it to
    /// [`FaultDisk::power_cut`].
    pub fn on_node(dir: &Path, from: &Path, faults: Faults, ns: &Path) -> FaultDisk {
        crate::require("nbdkit");
        std::fs::create_dir_all(dir).expect("mkdir fault disk dir");
        let image = dir.join("disk.img");
        let mut cp = cmd("cp", &["--sparse=always"]);
        run_timeout(cp.arg(from).arg(&image), Duration::from_secs(120));
        let size = std::fs::metadata(&image).expect("stat disk.img").len();
        FaultDisk::serve(dir, size, faults, Some(ns.to_path_buf()))
    }

    fn serve(dir: &Path, size: u64, faults: Faults, ns: Option<PathBuf>) -> FaultDisk {
        let dir = dir.to_path_buf();
        let mut disk = FaultDisk { dir, size, faults, ns, nbdkit: None, fuse: None };
        disk.power_on();
        disk
    }

    /// The file blockd uses as its backing (the nbdfuse file).
    pub fn file(&self) -> PathBuf {
        self.dir.join("fuse").join("disk")
    }

    /// The image under the filters: what survives a power cut.
    pub fn image(&self) -> PathBuf {
        self.dir.join("disk.img")
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The power cut: nbdkit gets SIGKILL (its unflushed cache is gone), then nbdfuse is
    /// torn down. Kill blockd at the same moment (before or right after) for a node's power cut.
    pub fn power_cut(&mut self) {
        if let Some(mut child) = self.nbdkit.take() {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
        }
        self.fuse = None;
    }

    /// Serves the image again (after [`FaultDisk::power_cut`]), with the same faults armed.
    pub fn power_on(&mut self) {
        assert!(self.nbdkit.is_none(), "fault disk already powered");
        let socket = self.dir.join("nbdkit.sock");
        let _ = std::fs::remove_file(&socket);
        let log = std::fs::File::create(self.dir.join("nbdkit.log")).expect("nbdkit log");
        let mut c = self.nbdkit_command(&socket);
        c.stdin(Stdio::null()).stdout(log.try_clone().expect("dup")).stderr(log);
        kill_with_parent(&mut c);
        let mut child = c.spawn().expect("start nbdkit");
        let deadline = Instant::now() + START_TIMEOUT;
        while !socket.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("nbdkit exited ({status}):\n{}", self.nbdkit_log());
            }
            assert!(Instant::now() < deadline, "nbdkit not ready:\n{}", self.nbdkit_log());
            std::thread::sleep(Duration::from_millis(20));
        }
        self.nbdkit = Some(child);
        let uri = format!("nbd+unix:///?socket={}", socket.display());
        self.fuse = Some(NbdFuse::attach_in(&self.dir.join("fuse"), &uri, self.ns.as_deref()));
    }

    fn nbdkit_command(&self, socket: &Path) -> Command {
        let mut c = Command::new("nbdkit");
        c.arg("--foreground").arg("--exit-with-parent").arg("-U").arg(socket);
        // Filters apply outermost first: a paused or failing disk holds or fails requests
        // before they reach the cache; the delay sits in front of the cache too.
        if self.faults.pause {
            c.arg("--filter=pause");
        }
        assert!(
            !(self.faults.cache && self.faults.error.is_some()),
            "a fault disk has either a cache or an error trigger (one error filter)"
        );
        if self.faults.error.is_some() || self.faults.cache {
            c.arg("--filter=error");
        }
        if self.faults.delay.is_some() {
            c.arg("--filter=delay");
        }
        if self.faults.cache {
            c.arg("--filter=cache");
        }
        c.arg("file").arg(self.image());
        if self.faults.cache {
            c.arg("cache=writeback").arg("error-trim=EINVAL").arg("error-trim-rate=100%");
        }
        if let Some(errno) = self.faults.error {
            c.arg(format!("error={errno}")).arg("error-rate=100%");
            c.arg(format!("error-file={}", self.trigger().display()));
        }
        if self.faults.pause {
            c.arg(format!("pause-control={}", self.pause_socket().display()));
        }
        if let Some(d) = self.faults.delay {
            let ms = format!("{}ms", d.as_millis());
            // nbdkit 1.32 (Debian 12) has no delay-flush.
            for key in ["delay-write", "delay-zero", "delay-trim"] {
                c.arg(format!("{key}={ms}"));
            }
        }
        c
    }

    fn trigger(&self) -> PathBuf {
        self.dir.join("error.trigger")
    }

    fn pause_socket(&self) -> PathBuf {
        self.dir.join("pause.sock")
    }

    /// From now on every request fails with the configured errno.
    pub fn fail(&self) {
        assert!(self.faults.error.is_some(), "fault disk has no error filter");
        std::fs::write(self.trigger(), b"").expect("create error trigger");
    }

    /// Requests succeed again.
    pub fn heal(&self) {
        let _ = std::fs::remove_file(self.trigger());
    }

    /// Holds every request that arrives from now on (returns once requests already in flight
    /// have completed).
    pub fn pause(&self) {
        self.pause_command(b'p');
    }

    /// Lets held and new requests through.
    pub fn resume(&self) {
        self.pause_command(b'r');
    }

    fn pause_command(&self, c: u8) {
        assert!(self.faults.pause, "fault disk has no pause filter");
        let mut s = UnixStream::connect(self.pause_socket()).expect("connect pause socket");
        s.set_read_timeout(Some(START_TIMEOUT)).expect("timeout");
        s.write_all(&[c]).expect("send pause command");
        let mut reply = [0u8; 1];
        s.read_exact(&mut reply).expect("pause filter reply");
        assert_eq!(
            reply[0],
            c.to_ascii_uppercase(),
            "pause filter answered {:?}",
            reply[0] as char
        );
    }

    pub fn nbdkit_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nbdkit.log")).unwrap_or_default()
    }
}

impl Drop for FaultDisk {
    fn drop(&mut self) {
        if self.faults.pause && self.nbdkit.is_some() {
            // A held request would keep nbdfuse's unmount waiting.
            if let Ok(mut s) = UnixStream::connect(self.pause_socket()) {
                let _ = s.write_all(b"r");
            }
        }
        self.fuse = None;
        if let Some(mut child) = self.nbdkit.take() {
            signal(child.id(), libc::SIGKILL);
            if wait_until(&mut child, Instant::now() + Duration::from_secs(5)).is_none() {
                let _ = child.wait();
            }
            if std::thread::panicking() {
                eprintln!("----- nbdkit log -----\n{}", self.nbdkit_log());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};

    use super::*;

    fn open_direct(path: &Path) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .expect("open fault disk O_DIRECT")
    }

    /// 4 KiB aligned for O_DIRECT.
    fn block(byte: u8) -> Vec<u8> {
        let layout = std::alloc::Layout::from_size_align(4096, 4096).expect("layout");
        let mut v = vec![byte; 8192];
        let off = v.as_ptr().align_offset(layout.align());
        v.drain(..off);
        v.truncate(4096);
        v
    }

    fn read_image(disk: &FaultDisk, off: u64) -> Vec<u8> {
        let f = std::fs::File::open(disk.image()).expect("open image");
        let mut buf = vec![0u8; 4096];
        f.read_exact_at(&mut buf, off).expect("read image");
        buf
    }

    #[test]
    fn power_cut_keeps_flushed_writes_and_loses_the_rest() {
        crate::require_root();
        let dir = crate::TestDir::new("faultdisk-cut");
        let mut disk =
            FaultDisk::create(dir.path(), 1 << 20, Faults { cache: true, ..Faults::default() });
        let f = open_direct(&disk.file());
        f.write_all_at(&block(0xaa), 0).expect("write 0");
        f.sync_data().expect("fdatasync");
        f.write_all_at(&block(0xbb), 4096).expect("write 4096");
        drop(f);
        disk.power_cut();
        assert_eq!(read_image(&disk, 0), vec![0xaa; 4096], "flushed write lost");
        assert_eq!(read_image(&disk, 4096), vec![0; 4096], "unflushed write survived");
        disk.power_on();
        let mut buf = block(0);
        open_direct(&disk.file()).read_exact_at(&mut buf, 0).expect("read after power on");
        assert_eq!(buf, vec![0xaa; 4096]);
    }

    #[test]
    fn error_trigger_fails_writes_until_healed() {
        crate::require_root();
        let dir = crate::TestDir::new("faultdisk-eio");
        let faults = Faults { error: Some("EIO"), ..Faults::default() };
        let disk = FaultDisk::create(dir.path(), 1 << 20, faults);
        let f = open_direct(&disk.file());
        f.write_all_at(&block(1), 0).expect("healthy write");
        disk.fail();
        let err = f.write_all_at(&block(2), 0).expect_err("write on a failed disk");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        disk.heal();
        f.write_all_at(&block(3), 0).expect("write after heal");
    }
}
