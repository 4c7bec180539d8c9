//! A private test directory and a guard around one `blockd` process.

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::cmd::{self, bin, kill_with_parent, run_timeout, signal, wait_until};

/// Time blockd gets to come up (sockets accepting) or to shut down after SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// The same inside the VM tier's guest (tests/vm/run sets IN_BLOCKD_VM): under qemu TCG,
/// `mlockall` of the debug binary alone reads ~100 MB through 9p.
const VM_START_TIMEOUT: Duration = Duration::from_secs(240);

pub(crate) fn start_timeout() -> Duration {
    match std::env::var_os("IN_BLOCKD_VM") {
        Some(_) => VM_START_TIMEOUT,
        None => START_TIMEOUT,
    }
}
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A directory private to one test under /var/tmp (not /tmp: that may be tmpfs, where
/// direct I/O is impossible and the daemon would test its fallback instead of its main path).
/// Removed on drop unless `BLOCKD_TEST_KEEP=1`.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
}

impl TestDir {
    pub fn new(test: &str) -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("blockd-test-{test}-"))
            .tempdir_in("/var/tmp")
            .expect("create test dir under /var/tmp");
        TestDir { dir: Some(dir) }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("test dir present until drop").path()
    }

    /// `path()/name`, created as a directory.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let p = self.path().join(name);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        p
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let dir = self.dir.take().expect("dropped once");
        if std::env::var("BLOCKD_TEST_KEEP").as_deref() == Ok("1") {
            eprintln!("keeping {}", dir.keep().display());
        }
    }
}

/// One single-node `blockd`: its config, its data and run directories, and its process.
///
/// Drop kills the daemon by pid if it is still running and, when the test is panicking, prints
/// the daemon's log so the failure shows what the daemon said.
pub struct Node {
    pub name: String,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub log: PathBuf,
    volumes: Vec<(String, u64)>,
    child: Option<Child>,
    // Last field: dropped after the daemon has been killed in `Drop::drop`.
    dir: TestDir,
}

impl Node {
    /// Writes a single-node config with `volumes` (`(name, size)`, e.g. `("vol", "64MiB")`)
    /// and `extra` TOML appended verbatim (e.g. a `[storage]` table). Does not start blockd.
    pub fn new(test: &str, volumes: &[(&str, &str)], extra: &str) -> Node {
        let dir = TestDir::new(test);
        let (data_dir, run_dir) = (dir.subdir("data"), dir.subdir("run"));
        let config = dir.path().join("blockd.toml");
        let mut toml = format!(
            "[node.alpha]\ndata-dir = \"{}\"\nrun-dir = \"{}\"\n\n",
            data_dir.display(),
            run_dir.display()
        );
        for (name, size) in volumes {
            toml.push_str(&format!("[[volume]]\nname = \"{name}\"\nsize = \"{size}\"\n\n"));
        }
        toml.push_str(extra);
        fs::write(&config, toml).expect("write config");
        let volumes = volumes.iter().map(|(n, s)| (n.to_string(), crate::parse_size(s))).collect();
        let log = dir.path().join("blockd.log");
        Node { name: "alpha".into(), config, data_dir, run_dir, log, volumes, child: None, dir }
    }

    /// [`Node::new`] followed by [`Node::start`].
    pub fn started(test: &str, volumes: &[(&str, &str)], extra: &str) -> Node {
        let mut node = Node::new(test, volumes, extra);
        node.start();
        node
    }

    /// The test's private directory, for scratch files and mount points.
    pub fn dir(&self) -> &TestDir {
        &self.dir
    }

    pub fn size(&self, volume: &str) -> u64 {
        self.volumes.iter().find(|(n, _)| n == volume).map(|(_, s)| *s).expect("known volume")
    }

    pub fn socket(&self, volume: &str) -> PathBuf {
        self.run_dir.join(format!("{volume}.sock"))
    }

    pub fn control_socket(&self) -> PathBuf {
        self.run_dir.join("control.sock")
    }

    /// `nbd+unix:///<volume>?socket=...`; `""` gives the default export's URI.
    pub fn uri(&self, volume: &str) -> String {
        let sock = self.socket(if volume.is_empty() { &self.volumes[0].0 } else { volume });
        format!("nbd+unix:///{volume}?socket={}", sock.display())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts blockd and waits until the control socket and every volume socket accept.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "blockd already running");
        let mut log = OpenOptions::new().create(true).append(true).open(&self.log).expect("log");
        writeln!(log, "===== blockd start =====").expect("write log");
        let mut c = Command::new(bin("blockd"));
        c.arg("--config").arg(&self.config).arg("--node").arg(&self.name);
        crate::without_test_knobs(&mut c).env("NO_COLOR", "1").stdin(Stdio::null());
        c.env("BLOCKD_STORAGE__ALLOCATE", crate::TEST_ALLOCATE);
        c.stdout(log.try_clone().expect("dup log")).stderr(log);
        kill_with_parent(&mut c);
        let child = c.spawn().unwrap_or_else(|e| panic!("cannot start blockd: {e}"));
        self.child = Some(child);
        let mut sockets = vec![self.control_socket()];
        sockets.extend(self.volumes.iter().map(|(n, _)| self.socket(n)));
        let deadline = Instant::now() + start_timeout();
        for sock in sockets {
            while UnixStream::connect(&sock).is_err() {
                if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok()?) {
                    self.child = None;
                    panic!("blockd exited during start-up ({status}):\n{}", self.log_text());
                }
                assert!(
                    Instant::now() < deadline,
                    "blockd did not accept on {} within {:?}:\n{}",
                    sock.display(),
                    start_timeout(),
                    self.log_text()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGTERM, then waits; panics (with the log) unless blockd exits 0 in time.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("blockd is running");
        signal(child.id(), libc::SIGTERM);
        let status = wait_until(&mut child, Instant::now() + STOP_TIMEOUT);
        let Some(status) = status else {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
            panic!("blockd did not exit within {STOP_TIMEOUT:?} of SIGTERM:\n{}", self.log_text());
        };
        assert!(
            status.success(),
            "blockd exited with {status} after SIGTERM:\n{}",
            self.log_text()
        );
    }

    /// SIGKILL, then reaps the process.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("blockd is running");
        signal(child.id(), libc::SIGKILL);
        let _ = child.wait();
    }

    /// Whether the daemon process is still alive (not exited).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// A `blockctl` command for this node, arguments still to add.
    pub fn blockctl(&self) -> Command {
        let mut c = Command::new(bin("blockctl"));
        crate::without_test_knobs(&mut c);
        c.arg("--config").arg(&self.config).arg("--node").arg(&self.name);
        c
    }

    /// `blockctl status --json`, parsed.
    pub fn status(&self) -> Value {
        let out = run_timeout(self.blockctl().args(["status", "--json"]), Duration::from_secs(20));
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("blockctl status --json is not JSON ({e}):\n{out}"))
    }

    /// The status object of one volume.
    pub fn volume_status(&self, volume: &str) -> Value {
        let status = self.status();
        let vols = status["volumes"].as_array().unwrap_or_else(|| panic!("no volumes: {status}"));
        vols.iter()
            .find(|v| v["name"] == volume)
            .unwrap_or_else(|| panic!("volume {volume} not in status: {status}"))
            .clone()
    }

    /// One counter of one volume (`reads`, `writes`, `bytes_written`, ...).
    pub fn counter(&self, volume: &str, name: &str) -> u64 {
        let v = self.volume_status(volume);
        v["counters"][name].as_u64().unwrap_or_else(|| panic!("counter {name} missing: {v}"))
    }

    /// Waits until no NBD client of `volume` is in the transmission phase any more, i.e. the
    /// daemon has seen every earlier connection end.
    pub fn wait_no_clients(&self, volume: &str) {
        cmd::wait_for("clients to reach 0", Duration::from_secs(20), || {
            self.volume_status(volume)["clients"].as_u64() == Some(0)
        });
    }

    /// Reads `len` bytes at `offset` of the backing file directly (daemon stopped or flushed).
    pub fn backing_bytes(&self, volume: &str, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let path = self.data_dir.join(format!("{volume}.img"));
        let f = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).expect("read backing file");
        buf
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("----- blockd log ({}) -----\n{}", self.log.display(), self.log_text());
        }
    }
}
