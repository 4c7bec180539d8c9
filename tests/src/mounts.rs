//! How a filesystem reaches blockd on a machine without the kernel nbd module (design.md §10):
//! nbdfuse presents the export as a file, a loop device turns the file into a block device.
//!
//! Both guards undo themselves on drop, also when a test panics. A stuck unmount (the daemon
//! died under a mounted filesystem) falls back to a lazy unmount, and killing nbdfuse aborts
//! the FUSE connection, so teardown cannot hang on I/O that will never complete.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::cmd::{cmd, kill_with_parent, run_quiet, run_timeout, signal, try_run, wait_until};

const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);

/// nbdfuse serving one NBD URI as the file `<mountpoint>/disk`.
pub struct NbdFuse {
    mountpoint: PathBuf,
    log: PathBuf,
    /// The mount namespace (its file) the mount lives in; `None`: the test's own.
    ns: Option<PathBuf>,
    child: Option<Child>,
}

impl NbdFuse {
    /// Mounts `uri` on `mountpoint` (created) and waits until the file is there.
    pub fn attach(mountpoint: &Path, uri: &str) -> NbdFuse {
        NbdFuse::attach_in(mountpoint, uri, None)
    }

    /// [`NbdFuse::attach`] inside the mount namespace bound to `ns` (a node's, see
    /// [`crate::cluster::mountns`]): only processes of that namespace see the file.
    pub fn attach_in(mountpoint: &Path, uri: &str, ns: Option<&Path>) -> NbdFuse {
        crate::require("nbdfuse");
        crate::require("fusermount3");
        ensure_fuse();
        std::fs::create_dir_all(mountpoint).expect("mkdir fuse mountpoint");
        let log = mountpoint.with_extension("nbdfuse.log");
        let pidfile = mountpoint.with_extension("nbdfuse.pid");
        let _ = std::fs::remove_file(&pidfile);
        let logf = File::create(&log).expect("nbdfuse log");
        let ns = ns.map(Path::to_path_buf);
        let mut c = in_ns(ns.as_deref(), "nbdfuse");
        c.arg("-P").arg(&pidfile).arg(mountpoint.join("disk")).arg(uri);
        c.stdin(Stdio::null()).stdout(logf.try_clone().expect("dup")).stderr(logf);
        kill_with_parent(&mut c);
        let child = c.spawn().expect("start nbdfuse");
        let mp = mountpoint.to_path_buf();
        let mut fuse = NbdFuse { mountpoint: mp, log, ns, child: Some(child) };
        fuse.wait_ready(&pidfile);
        fuse
    }

    fn wait_ready(&mut self, pidfile: &Path) {
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        while !std::fs::read_to_string(pidfile).is_ok_and(|s| !s.trim().is_empty()) {
            let child = self.child.as_mut().expect("child");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                panic!("nbdfuse exited ({status}) before it was ready:\n{}", self.log_text());
            }
            assert!(Instant::now() < deadline, "nbdfuse not ready:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut test = in_ns(self.ns.as_deref(), "test");
        test.arg("-f").arg(self.file());
        let found = run_quiet(&mut test, MOUNT_TIMEOUT).is_some_and(|o| o.status.success());
        assert!(found, "{} missing after nbdfuse start", self.file().display());
    }

    /// The file that stands for the NBD export.
    pub fn file(&self) -> PathBuf {
        self.mountpoint.join("disk")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Unmounts and waits for nbdfuse to exit 0 (it flushes and disconnects on the way out).
    pub fn detach(mut self) {
        let mut umount = in_ns(self.ns.as_deref(), "fusermount3");
        run_timeout(umount.arg("-u").arg(&self.mountpoint), MOUNT_TIMEOUT);
        let mut child = self.child.take().expect("nbdfuse running");
        let status = wait_until(&mut child, Instant::now() + MOUNT_TIMEOUT);
        let Some(status) = status else {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
            panic!("nbdfuse did not exit after fusermount3 -u:\n{}", self.log_text());
        };
        assert!(status.success(), "nbdfuse exited with {status}:\n{}", self.log_text());
    }
}

impl Drop for NbdFuse {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let mut umount = in_ns(self.ns.as_deref(), "fusermount3");
        let out = run_quiet(umount.args(["-u", "-z"]).arg(&self.mountpoint), MOUNT_TIMEOUT);
        if !out.is_some_and(|o| o.status.success()) {
            let mut lazy = in_ns(self.ns.as_deref(), "umount");
            let _ = run_quiet(lazy.arg("-l").arg(&self.mountpoint), MOUNT_TIMEOUT);
        }
        if wait_until(&mut child, Instant::now() + Duration::from_secs(5)).is_none() {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("----- nbdfuse log -----\n{}", self.log_text());
        }
    }
}

/// `program` in the mount namespace bound to `ns` (nsenter execs it: the pid is the
/// program's own), or in the test's own namespace.
fn in_ns(ns: Option<&Path>, program: &str) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--mount={}", ns.display())).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Loads the fuse module if /dev/fuse is missing; panics if that does not help.
fn ensure_fuse() {
    if !Path::new("/dev/fuse").exists() {
        let _ = try_run(&mut cmd("modprobe", &["fuse"]), MOUNT_TIMEOUT);
    }
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse missing (modprobe fuse failed)");
}

/// A loop device on a file, optionally with its filesystem mounted.
pub struct LoopMount {
    dev: String,
    mountpoint: Option<PathBuf>,
}

impl LoopMount {
    /// `losetup --find --show file`.
    pub fn attach(file: &Path) -> LoopMount {
        crate::require("losetup");
        let out = run_timeout(cmd("losetup", &["--find", "--show"]).arg(file), MOUNT_TIMEOUT);
        let dev = out.stdout.trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed no device:\n{out}");
        LoopMount { dev, mountpoint: None }
    }

    /// The block device, e.g. `/dev/loop3`.
    pub fn dev(&self) -> &str {
        &self.dev
    }

    /// Mounts the device on `dir` (created) with `options` (`-o` value, may be empty).
    pub fn mount(&mut self, dir: &Path, options: &str) {
        assert!(self.mountpoint.is_none(), "already mounted");
        std::fs::create_dir_all(dir).expect("mkdir mountpoint");
        let mut c = cmd("mount", &[&self.dev]);
        c.arg(dir);
        if !options.is_empty() {
            c.args(["-o", options]);
        }
        run_timeout(&mut c, MOUNT_TIMEOUT);
        self.mountpoint = Some(dir.to_path_buf());
    }

    /// Unmounts (a clean unmount: the filesystem flushes everything to the device).
    pub fn umount(&mut self) {
        let dir = self.mountpoint.take().expect("mounted");
        run_timeout(&mut cmd("umount", &[&dir]), MOUNT_TIMEOUT);
    }

    /// Unmounts if mounted, then detaches the loop device, asserting both succeed.
    pub fn detach(mut self) {
        if self.mountpoint.is_some() {
            self.umount();
        }
        run_timeout(&mut cmd("losetup", &["-d", &self.dev]), MOUNT_TIMEOUT);
        self.dev.clear();
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if let Some(dir) = self.mountpoint.take() {
            let out = run_quiet(&mut cmd("umount", &[&dir]), MOUNT_TIMEOUT);
            if !out.is_some_and(|o| o.status.success()) {
                eprintln!("umount {} failed, unmounting lazily", dir.display());
                let _ = run_quiet(cmd("umount", &["-l"]).arg(&dir), MOUNT_TIMEOUT);
            }
        }
        if !self.dev.is_empty() {
            let _ = run_quiet(&mut cmd("losetup", &["-d", &self.dev]), MOUNT_TIMEOUT);
        }
    }
}
