//! Two blockd nodes, "alpha" and "beta", each in its own network namespace, joined by veth.
//!
//! ```text
//!   netns bd-<pid>-<n>-a                      netns bd-<pid>-<n>-b
//!   blockd --node alpha                       blockd --node beta
//!   10.99.0.1:7789  ── bd0 ═════ veth ═════ bd0 ──  10.99.0.2:7789
//!        │   nftables table inet blockdtest (cut / cut_one_way / heal)  │
//!   <dir>/alpha/run/vol.sock                  <dir>/beta/run/vol.sock
//!            └──────── NBD clients and blockctl in the root namespace ────────┘
//! ```
//!
//! Unix sockets are not isolated by network namespaces, so NBD clients (fio, qemu-io, python
//! libnbd) and `blockctl` run in the root namespace; only the replication link crosses the
//! veth, which is what `cut`, `cut_one_way` and `heal` act on. Both nodes read ONE config
//! file, as in production (design.md §9); a test that needs the nodes to disagree (volume size,
//! addresses) writes a second file with [`Cluster::write_config`].
//!
//! [`Cluster::with_lan`] is the failover variant (module [`lan`]): the nodes and a client
//! namespace on a bridge, and each node in a mount namespace of its own ([`mountns`]) where
//! its daemon, its `blockctl` and [`Cluster::run_on`] run, so both nodes mount the same paths
//! as real servers do. [`failover`] adds what failover tests do to such a cluster
//! (`kill_node`, `promote`, `check_clean`, `prepare_filesystem`); [`mariadb`] and
//! [`ganesha`] are the services on the mirror and their clients.
//!
//! [`Cluster`] is a guard: its `Drop` kills both daemons by pid, deletes the nftables tables
//! and the namespaces (which deletes the veth), prints both daemons' logs when the test is
//! panicking, and removes the directory (kept when the test failed and `BLOCKD_TEST_KEEP` is
//! set). Two-node tests are serialized within a test binary (one lock): they measure timeouts
//! and run fio, and a 2-core machine running several of them at once would make both flaky.

pub mod agents;
pub mod clients;
pub mod failover;
pub mod files;
pub mod ganesha;
pub mod lan;
pub mod loops;
pub mod mariadb;
pub mod mountns;
pub mod netns;
pub mod peer;

use std::{
    fs::{self, File, OpenOptions},
    io::{Read, Write},
    os::unix::{fs::OpenOptionsExt, net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use serde_json::Value;

pub use netns::Netns;

use crate::cmd::{bin, kill_with_parent, run_timeout, signal, try_run, wait_until};

/// The volume every cluster has (config `[[volume]]` index 0).
pub const VOL: &str = "vol";
/// The replication port of both nodes.
pub const PORT: u16 = 7789;
/// `peer-timeout` of the shared config: short, so that failure tests are quick, and still
/// long enough for a loaded 2-core machine not to drop a healthy link.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a daemon gets to open its control socket, or to exit after SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// One two-node test at a time per test binary (see the module doc).
static SERIAL: Mutex<()> = Mutex::new(());

/// One of the two nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeId {
    Alpha,
    Beta,
}

pub use NodeId::{Alpha, Beta};

impl NodeId {
    pub fn name(self) -> &'static str {
        match self {
            Alpha => "alpha",
            Beta => "beta",
        }
    }

    pub fn other(self) -> NodeId {
        match self {
            Alpha => Beta,
            Beta => Alpha,
        }
    }

    /// The node's address on the veth (without prefix length).
    pub fn ip(self) -> &'static str {
        match self {
            Alpha => "10.99.0.1",
            Beta => "10.99.0.2",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What a config file says; [`Cluster::spec`] is the shared file's, tests change a copy.
#[derive(Debug, Clone)]
pub struct Spec {
    pub secret_file: PathBuf,
    pub peer_timeout: Duration,
    /// `replication` of alpha and beta, as written in the file.
    pub replication: [String; 2],
    pub size: String,
    /// The volume's name ([`VOL`] unless a failover test names it, e.g. "db").
    pub volume: String,
    /// Extra keys of the `[[volume]]` table, verbatim (`filesystem = "ext4"` ...).
    pub volume_toml: String,
    /// Tables appended after the volume, verbatim (`[vip]`, `[[service]]`, ...).
    pub extra_toml: String,
    /// Extra keys of the `[cluster]` table, verbatim (`witness = "..."`).
    pub cluster_toml: String,
}

/// Per-node files and process.
struct Daemon {
    id: NodeId,
    config: PathBuf,
    data_dir: PathBuf,
    run_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// The two-node guard; see the module doc.
pub struct Cluster {
    nodes: [Daemon; 2],
    netns: Vec<Netns>,
    /// The bridge, client and mount namespaces of [`Cluster::with_lan`]; before `netns` in
    /// drop order, since it kills what runs in the node namespaces.
    lan: Option<lan::Lan>,
    spec: Spec,
    dir: Option<tempfile::TempDir>,
    _serial: MutexGuard<'static, ()>,
}

impl Cluster {
    /// Both namespaces, the veth, the shared config and secret for a `size` volume (e.g.
    /// "64MiB"); no daemon is started yet.
    pub fn new(test: &str, size: &str) -> Cluster {
        let c = Cluster::build(test, size, |_| {});
        netns::link(&c.netns[0], &c.netns[1], "10.99.0.1/24", "10.99.0.2/24");
        c
    }

    /// The failover topology (module [`lan`]): both nodes and a client namespace on a bridge,
    /// each node in its own mount namespace, where the daemon, `blockctl` and
    /// [`Cluster::run_on`] run. `configure` adjusts the shared config (volume name,
    /// filesystem, `[vip]`, services) before it is written.
    pub fn with_lan(test: &str, size: &str, configure: impl FnOnce(&mut Spec)) -> Cluster {
        let mut c = Cluster::build(test, size, configure);
        let stem = c.netns[0].name().trim_end_matches("-a").to_string();
        let root = c.dir().to_path_buf();
        c.lan = Some(lan::Lan::create(&stem, [&c.netns[0], &c.netns[1]], &root));
        c
    }

    fn build(test: &str, size: &str, configure: impl FnOnce(&mut Spec)) -> Cluster {
        crate::require("ip");
        crate::require("nft");
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::Builder::new()
            .prefix(&format!("blockd-test-{test}-"))
            .tempdir_in("/var/tmp")
            .expect("create test dir under /var/tmp");
        let root = dir.path().to_path_buf();
        let nodes = [Alpha, Beta].map(|id| Daemon::new(id, &root));
        let spec = Spec {
            secret_file: root.join("secret"),
            peer_timeout: PEER_TIMEOUT,
            replication: [Alpha, Beta].map(|n| format!("{}:{PORT}", n.ip())),
            size: size.to_string(),
            volume: VOL.to_string(),
            volume_toml: String::new(),
            extra_toml: String::new(),
            cluster_toml: String::new(),
        };
        let mut c =
            Cluster { nodes, netns: Vec::new(), lan: None, spec, dir: Some(dir), _serial: serial };
        configure(&mut c.spec);
        write_secret(&c.spec.secret_file, 32);
        c.write_config(&root.join("blockd.toml"), &c.spec.clone());
        let stem = netns::unique_stem();
        // Pushed one by one: if the second fails, Drop still deletes the first.
        c.netns.push(Netns::create(&format!("{stem}-a")));
        c.netns.push(Netns::create(&format!("{stem}-b")));
        c
    }

    /// The test's private directory (scratch files, fio state, extra configs).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir present until drop").path()
    }

    /// The shared config's contents as a [`Spec`], for variants.
    pub fn spec(&self) -> Spec {
        self.spec.clone()
    }

    pub fn netns(&self, n: NodeId) -> &Netns {
        &self.netns[n.index()]
    }

    /// Writes `spec` as a config file at `path` (every node reads its own section).
    pub fn write_config(&self, path: &Path, spec: &Spec) {
        let mut toml = format!(
            "[cluster]\nsecret-file = \"{}\"\npeer-timeout = \"{}ms\"\n{}\n",
            spec.secret_file.display(),
            spec.peer_timeout.as_millis(),
            spec.cluster_toml
        );
        for d in &self.nodes {
            toml.push_str(&format!(
                "[node.{}]\nreplication = \"{}\"\ndata-dir = \"{}\"\nrun-dir = \"{}\"\n\n",
                d.id.name(),
                spec.replication[d.id.index()],
                d.data_dir.display(),
                d.run_dir.display()
            ));
        }
        toml.push_str(&format!(
            "[[volume]]\nname = \"{}\"\nsize = \"{}\"\n",
            spec.volume, spec.size
        ));
        toml.push_str(&spec.volume_toml);
        toml.push('\n');
        toml.push_str(&spec.extra_toml);
        fs::write(path, toml).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Makes `n` (its daemon and its blockctl) use the config file at `path` from now on.
    pub fn use_config(&mut self, n: NodeId, path: &Path) {
        self.nodes[n.index()].config = path.to_path_buf();
    }

    pub fn config(&self, n: NodeId) -> &Path {
        &self.nodes[n.index()].config
    }

    /// Starts `n`'s daemon in its namespace and waits for its control socket.
    pub fn start(&mut self, n: NodeId) {
        self.start_with_env(n, &[]);
    }

    /// [`Cluster::start`] with extra environment (e.g. `BLOCKD_CLUSTER__SECRET_FILE`).
    pub fn start_with_env(&mut self, n: NodeId, env: &[(&str, &str)]) {
        let d = &mut self.nodes[n.index()];
        assert!(d.child.is_none(), "{} already running", n.name());
        let mut log = OpenOptions::new().create(true).append(true).open(&d.log).expect("log");
        writeln!(log, "===== blockd start {env:?} =====").expect("write log");
        let blockd = bin("blockd");
        let mut c = match &self.lan {
            Some(lan) => lan.mount_ns(n).command(&blockd),
            None => self.netns[n.index()].command(blockd.as_os_str()),
        };
        c.arg("--config").arg(&d.config).arg("--node").arg(n.name());
        crate::without_test_knobs(&mut c)
            .env("NO_COLOR", "1")
            .env("BLOCKD_STORAGE__ALLOCATE", crate::TEST_ALLOCATE)
            .envs(env.iter().copied())
            .stdin(Stdio::null());
        c.stdout(log.try_clone().expect("dup log")).stderr(log);
        kill_with_parent(&mut c);
        d.child = Some(c.spawn().unwrap_or_else(|e| panic!("cannot start {c:?}: {e}")));
        d.wait_control_socket();
        d.check_exe(&blockd);
    }

    /// SIGTERM; panics (with the log) unless the daemon exits 0 in time. Thaws it first.
    pub fn stop(&mut self, n: NodeId) {
        let d = &mut self.nodes[n.index()];
        let mut child = d.child.take().unwrap_or_else(|| panic!("{} is not running", n.name()));
        signal(child.id(), libc::SIGCONT);
        signal(child.id(), libc::SIGTERM);
        let Some(status) = wait_until(&mut child, Instant::now() + STOP_TIMEOUT) else {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
            panic!("{} did not exit within {STOP_TIMEOUT:?} of SIGTERM", n.name());
        };
        assert!(status.success(), "{} exited with {status} after SIGTERM", n.name());
    }

    /// SIGKILL, then reaps the process.
    pub fn kill(&mut self, n: NodeId) {
        let d = &mut self.nodes[n.index()];
        let mut child = d.child.take().unwrap_or_else(|| panic!("{} is not running", n.name()));
        signal(child.id(), libc::SIGKILL);
        let _ = child.wait();
    }

    /// SIGSTOP: the process stays, its sockets stay open, nothing answers.
    pub fn freeze(&mut self, n: NodeId) {
        signal(self.pid(n), libc::SIGSTOP);
    }

    /// SIGCONT after [`Cluster::freeze`].
    pub fn thaw(&mut self, n: NodeId) {
        signal(self.pid(n), libc::SIGCONT);
    }

    /// The daemon's pid (blockd's own: `ip netns exec` execs it).
    pub fn pid(&self, n: NodeId) -> u32 {
        self.nodes[n.index()].child.as_ref().map(Child::id).expect("daemon running")
    }

    /// Whether `n`'s daemon is still alive.
    pub fn is_running(&mut self, n: NodeId) -> bool {
        let d = &mut self.nodes[n.index()];
        d.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Drops every packet between the nodes, both directions.
    pub fn cut(&self) {
        self.cut_one_way(Alpha, Beta);
        self.cut_one_way(Beta, Alpha);
    }

    /// Drops every packet from `from` to `to`, on arrival at `to`: the sender sees no local
    /// error, exactly as when a switch in between black-holes them.
    pub fn cut_one_way(&self, from: NodeId, to: NodeId) {
        assert_ne!(from, to, "cut_one_way needs two different nodes");
        self.netns(to).add_rule("input", &format!("iifname \"{}\" drop", netns::VETH));
    }

    /// Removes every rule [`Cluster::cut`], [`Cluster::cut_one_way`] or
    /// [`Cluster::add_rule`] installed.
    pub fn heal(&self) {
        for ns in &self.netns {
            ns.clear_rules();
        }
    }

    /// Adds an nftables rule to chain `input` or `output` of `n`'s table (removed by heal).
    pub fn add_rule(&self, n: NodeId, chain: &str, rule: &str) {
        self.netns(n).add_rule(chain, rule);
    }

    /// Whether a UDP datagram sent from `from`'s address reaches `to`'s (waits 500 ms): the
    /// harness's own check that `cut`, `cut_one_way` and `heal` do what they say.
    pub fn udp_reaches(&self, from: NodeId, to: NodeId) -> bool {
        use std::net::UdpSocket;
        let bind = |n: NodeId| UdpSocket::bind((n.ip(), 0)).expect("bind UDP");
        let rx = self.netns(to).enter(|| bind(to));
        let tx = self.netns(from).enter(|| bind(from));
        let dest = rx.local_addr().expect("local addr");
        tx.send_to(b"blockd-test", dest).expect("send UDP");
        rx.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
        let mut buf = [0u8; 32];
        matches!(rx.recv_from(&mut buf), Ok((11, src)) if src == tx.local_addr().expect("addr"))
    }

    /// A `blockctl --config F --node NAME` command for `n`, arguments still to add.
    /// With [`Cluster::with_lan`] it runs on the node (its namespaces), as an operator would.
    pub fn blockctl(&self, n: NodeId) -> std::process::Command {
        let mut c = match &self.lan {
            Some(lan) => lan.mount_ns(n).command(bin("blockctl")),
            None => std::process::Command::new(bin("blockctl")),
        };
        crate::without_test_knobs(&mut c);
        c.arg("--config").arg(self.config(n)).arg("--node").arg(n.name());
        c
    }

    /// `blockctl role primary|secondary [--force]`: Ok, or Err with what it printed.
    pub fn role(&self, n: NodeId, role: &str, force: bool) -> Result<(), String> {
        let mut c = self.blockctl(n);
        c.args(["role", role]);
        if force {
            c.arg("--force");
        }
        let out = try_run(&mut c, Duration::from_secs(30));
        match out.status.success() {
            true => Ok(()),
            false => Err(format!("{}{}", out.stderr, out.stdout)),
        }
    }

    /// `blockctl status --json` of `n`, parsed.
    pub fn status(&self, n: NodeId) -> Value {
        let mut c = self.blockctl(n);
        let out = run_timeout(c.args(["status", "--json"]), Duration::from_secs(20));
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("blockctl status --json is not JSON ({e}):\n{out}"))
    }

    /// The status of the volume on `n` (`volumes[0]`: role, disk, conn, out_of_sync, ...).
    pub fn vol(&self, n: NodeId) -> Value {
        let status = self.status(n);
        let v = &status["volumes"][0];
        assert!(v.is_object(), "no volume in {}'s status: {status}", n.name());
        v.clone()
    }

    /// Polls `n`'s volume status every 50 ms until `pred` holds and returns that status;
    /// panics naming `what` and the last status after `timeout`.
    pub fn wait_for(
        &self,
        n: NodeId,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let timeout = crate::cmd::vm_scaled(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.vol(n);
            if pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{}: timed out after {timeout:?} waiting for {what}; last status: {v:#}",
                n.name()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until both nodes are Connected, UpToDate, with nothing out of sync.
    pub fn wait_in_sync(&self, timeout: Duration) {
        for n in [Alpha, Beta] {
            self.wait_for(n, "Connected, UpToDate, in sync", timeout, |v| {
                v["conn"] == "Connected" && v["disk"] == "UpToDate" && v["out_of_sync"] == 0
            });
        }
    }

    /// `nbd+unix:///vol?socket=<run-dir of n>/vol.sock`.
    pub fn nbd_uri(&self, n: NodeId) -> String {
        format!("nbd+unix:///{}?socket={}", self.spec.volume, self.socket(n).display())
    }

    pub fn socket(&self, n: NodeId) -> PathBuf {
        self.nodes[n.index()].run_dir.join(format!("{}.sock", self.spec.volume))
    }

    pub fn backing(&self, n: NodeId) -> PathBuf {
        self.nodes[n.index()].data_dir.join(format!("{}.img", self.spec.volume))
    }

    /// Makes `n`'s backing (`<data-dir>/<volume>.img`) a symlink to `file`, e.g. a
    /// [`crate::disk::FaultDisk`]'s; call it before the daemon first starts.
    pub fn use_backing(&self, n: NodeId, file: &Path) {
        let link = self.backing(n);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(file, &link)
            .unwrap_or_else(|e| panic!("symlink {} -> {}: {e}", link.display(), file.display()));
    }

    /// Runs one qemu-io command on `n`'s export; it must succeed.
    pub fn qemu_io(&self, n: NodeId, command: &str) {
        let mut q = crate::cmd::cmd("qemu-io", &["-f", "raw", &self.nbd_uri(n), "-c", command]);
        let out = try_run(&mut q, Duration::from_secs(30));
        assert!(
            out.status.success() && !out.stdout.contains("failed"),
            "qemu-io {command}:\n{out}"
        );
    }

    /// `len` bytes of `n`'s backing file at `offset`.
    pub fn backing_at(&self, n: NodeId, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let f = fs::File::open(self.backing(n)).expect("open backing");
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).expect("read backing");
        buf
    }

    pub fn run_dir(&self, n: NodeId) -> &Path {
        &self.nodes[n.index()].run_dir
    }

    pub fn log_text(&self, n: NodeId) -> String {
        self.nodes[n.index()].log_text()
    }

    /// Compares the two backing files byte for byte (call it once writes are quiesced).
    #[track_caller]
    pub fn assert_identical(&self) {
        let (a, b) = (self.backing(Alpha), self.backing(Beta));
        if let Some(diff) = compare_files(&a, &b) {
            panic!("backing files differ: {diff}\n  {}\n  {}", a.display(), b.display());
        }
    }
}

impl Daemon {
    fn new(id: NodeId, root: &Path) -> Daemon {
        let base = root.join(id.name());
        let (data_dir, run_dir) = (base.join("data"), base.join("run"));
        for d in [&data_dir, &run_dir] {
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        }
        let log = root.join(format!("{}.log", id.name()));
        Daemon { id, config: root.join("blockd.toml"), data_dir, run_dir, log, child: None }
    }

    fn wait_control_socket(&mut self) {
        let sock = self.run_dir.join("control.sock");
        // Longer in the VM tier's guest (see `node::start_timeout`).
        let deadline = Instant::now() + START_TIMEOUT.max(crate::node::start_timeout());
        while UnixStream::connect(&sock).is_err() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok()?) {
                self.child = None;
                panic!("{} exited during start-up ({status})", self.id.name());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not open {}",
                self.id.name(),
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pid we hold must be blockd's own, not that of an `ip` wrapper: signals go to it.
    fn check_exe(&self, blockd: &Path) {
        let pid = self.child.as_ref().map(Child::id).expect("started");
        let exe = fs::read_link(format!("/proc/{pid}/exe")).expect("read /proc/PID/exe");
        // A concurrent `cargo build` may have replaced the file since: " (deleted)".
        let exe = exe.to_string_lossy().trim_end_matches(" (deleted)").to_string();
        let want = fs::canonicalize(blockd).expect("canonical blockd path");
        assert_eq!(Path::new(&exe), want, "pid {pid} is not blockd itself");
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for d in &mut self.nodes {
            if let Some(mut child) = d.child.take() {
                signal(child.id(), libc::SIGKILL);
                let _ = child.wait();
            }
        }
        let failed = std::thread::panicking();
        if failed {
            for d in &self.nodes {
                eprintln!(
                    "----- {} log ({}) -----\n{}",
                    d.id.name(),
                    d.log.display(),
                    d.log_text()
                );
            }
        }
        // Lan::drop kills what runs on the nodes, detaches their loop devices, unmounts inside
        // their mount namespaces and deletes the bridge and client namespaces.
        self.lan = None;
        // Netns::drop deletes the harness's nftables table, then the namespace and its veth.
        self.netns.clear();
        let dir = self.dir.take().expect("dropped once");
        if failed && std::env::var_os("BLOCKD_TEST_KEEP").is_some() {
            eprintln!("keeping {}", dir.keep().display());
        }
    }
}

/// Writes `len` random bytes to `path` with mode 0600 (the daemon refuses looser modes).
pub fn write_secret(path: &Path, len: usize) {
    let mut secret = vec![0u8; len];
    File::open("/dev/urandom").and_then(|mut r| r.read_exact(&mut secret)).expect("urandom");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(&secret).expect("write secret");
}

/// `None` when the files are byte-identical; else a description of the first differences.
pub fn compare_files(a: &Path, b: &Path) -> Option<String> {
    let (la, lb) = (len_of(a), len_of(b));
    if la != lb {
        return Some(format!("sizes differ: {la} vs {lb} bytes"));
    }
    let blocks = differing_blocks(a, b);
    (!blocks.is_empty()).then(|| {
        let first: Vec<String> = blocks.iter().take(8).map(|o| format!("{o:#x}")).collect();
        format!("{} differing 4 KiB blocks, first at {}", blocks.len(), first.join(", "))
    })
}

fn len_of(p: &Path) -> u64 {
    fs::metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display())).len()
}

/// Offsets of the 4 KiB blocks that differ between two files of the same length.
pub fn differing_blocks(a: &Path, b: &Path) -> Vec<u64> {
    const CHUNK: usize = 1 << 20;
    let open = |p: &Path| File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a), open(b));
    let len = len_of(a).min(len_of(b));
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let (mut offset, mut blocks) = (0u64, Vec::new());
    while offset < len {
        let n = CHUNK.min((len - offset) as usize);
        fa.read_exact(&mut ba[..n]).expect("read backing");
        fb.read_exact(&mut bb[..n]).expect("read backing");
        for (i, (x, y)) in ba[..n].chunks(4096).zip(bb[..n].chunks(4096)).enumerate() {
            if x != y {
                blocks.push(offset + (i as u64) * 4096);
            }
        }
        offset += n as u64;
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The "identical" oracle must see a one-byte difference and a size difference.
    #[test]
    fn compare_files_finds_any_difference() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let data = crate::pattern(5, 3 << 20);
        fs::write(&a, &data).expect("write a");
        fs::write(&b, &data).expect("write b");
        assert_eq!(compare_files(&a, &b), None);
        let mut changed = data.clone();
        changed[(2 << 20) + 4097] ^= 1;
        fs::write(&b, &changed).expect("write b");
        let diff = compare_files(&a, &b).expect("one byte differs");
        assert!(diff.contains("1 differing 4 KiB blocks, first at 0x201000"), "{diff}");
        fs::write(&b, &data[..data.len() - 512]).expect("write b");
        assert!(compare_files(&a, &b).is_some_and(|d| d.contains("sizes differ")));
    }
}
