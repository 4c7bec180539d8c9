//! A lease witness host and its nodes, each in its own network namespace:
//!
//! ```text
//!            netns <stem>-w: bridge br0 10.78.0.1/24, `blockd witness` on 10.78.0.1:7790
//!          ┌──────────────┴──────────────┐ (legs l0, l1)
//!   <stem>-n0 bd0 10.78.0.2/24     <stem>-n1 bd0 10.78.0.3/24
//! ```
//!
//! The nodes are plain namespaces: a test asks the witness from them with the library's
//! [`LeaseClient`] on a thread that joined the namespace ([`Netns::enter`]). The witness is a
//! real `blockd witness` process, killed by pid on drop; deleting the namespaces removes every
//! interface.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitStatus,
    sync::Arc,
    time::Duration,
};

use blockd::witness::{ClientSettings, Lease, LeaseClient, WitnessError};

use crate::{
    cluster::netns::{self, Netns},
    cmd::{bin, cmd, run_timeout, signal, wait_for, Background},
    TestDir,
};

/// Where the witness listens.
pub const WITNESS_ADDR: &str = "10.78.0.1:7790";

const IP_TIMEOUT: Duration = Duration::from_secs(20);

/// The witness namespace, the node namespaces, and the witness process when it runs.
pub struct WitnessNet {
    /// Dropped first: the process dies before its namespace goes.
    process: Option<Background>,
    starts: u32,
    nodes: Vec<Netns>,
    witness: Netns,
    pub state: PathBuf,
    pub secret: PathBuf,
    // Last: the directory (logs, state) outlives everything that writes to it.
    dir: TestDir,
}

impl WitnessNet {
    /// Builds the star for `nodes` nodes and writes a secret file (mode 0600). Starts nothing.
    pub fn create(test: &str, nodes: usize) -> WitnessNet {
        crate::require_root();
        let dir = TestDir::new(test);
        let stem = netns::unique_stem();
        let witness = Netns::create(&format!("{stem}-w"));
        witness.ip(&["link", "add", "br0", "type", "bridge"]);
        witness.ip(&["addr", "add", "10.78.0.1/24", "dev", "br0"]);
        witness.ip(&["link", "set", "br0", "up"]);
        let nodes: Vec<Netns> = (0..nodes)
            .map(|i| {
                let ns = Netns::create(&format!("{stem}-n{i}"));
                plug(&witness, &ns, &format!("l{i}"), &format!("10.78.0.{}/24", i + 2));
                ns
            })
            .collect();
        let secret = dir.path().join("secret");
        write_secret(&secret, b"the cluster's secret\n");
        let state = dir.path().join("witness.state");
        WitnessNet { process: None, starts: 0, nodes, witness, state, secret, dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts `blockd witness --term term` and waits until it listens
    /// (its log says so), or panics with the log if it exits first.
    pub fn start(&mut self, term: &str) {
        let bg = self.spawn(term);
        wait_listening(&bg);
        self.process = Some(bg);
    }

    /// Starts the witness and waits for it to exit within `timeout`: its status and log.
    pub fn start_expecting_exit(&mut self, term: &str, timeout: Duration) -> (ExitStatus, String) {
        let mut bg = self.spawn(term);
        let status = bg.wait(timeout);
        let log = bg.log_text();
        (status.unwrap_or_else(|| panic!("witness still running after {timeout:?}:\n{log}")), log)
    }

    fn spawn(&mut self, term: &str) -> Background {
        assert!(self.process.is_none(), "one witness at a time");
        self.starts += 1;
        let log = self.dir.path().join(format!("witness-{}.log", self.starts));
        let mut c = self.witness.command(bin("blockd").as_os_str());
        c.args(["witness", "--listen", WITNESS_ADDR, "--term", term]);
        c.arg("--state").arg(&self.state).arg("--secret").arg(&self.secret);
        c.env("BLOCKD_LOG", "blockd=debug");
        Background::spawn(&mut c, &log)
    }

    /// The running witness's pid.
    pub fn pid(&self) -> u32 {
        self.process.as_ref().expect("witness running").pid()
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&mut self) {
        let mut bg = self.process.take().expect("witness running");
        signal(bg.pid(), libc::SIGKILL);
        bg.wait(Duration::from_secs(10));
    }

    /// SIGTERM; asserts a clean exit.
    pub fn stop(&mut self) {
        let mut bg = self.process.take().expect("witness running");
        signal(bg.pid(), libc::SIGTERM);
        let status = bg.wait(Duration::from_secs(10));
        assert!(status.is_some_and(|s| s.success()), "witness exit {status:?}:\n{}", bg.log_text());
    }

    /// Everything every start of the witness logged.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|i| std::fs::read_to_string(self.dir().join(format!("witness-{i}.log"))))
            .filter_map(Result::ok)
            .collect()
    }

    /// `(VmRSS, RssAnon)` of the running witness in KiB, from /proc: all resident memory, and
    /// the part that is the process's own (heap, stacks) rather than pages of the binary.
    pub fn memory_kib(&self) -> (u64, u64) {
        crate::cmd::memory_kib(self.pid())
    }

    /// A client for node `name` with `secret`, as node `i` would build it.
    pub fn client(&self, name: &str, secret: &[u8]) -> LeaseClient {
        let addr: SocketAddr = WITNESS_ADDR.parse().expect("address");
        let settings = ClientSettings { timeout: Duration::from_secs(5), ..Default::default() };
        LeaseClient::new(addr, name, Arc::from(secret), settings)
    }

    /// `client.acquire()` from node `i`'s namespace.
    pub fn acquire(&self, i: usize, client: &LeaseClient) -> Result<Lease, WitnessError> {
        self.nodes[i].enter(|| runtime().block_on(client.acquire()))
    }

    /// `client.renew(held)` from node `i`'s namespace.
    pub fn renew(
        &self,
        i: usize,
        client: &LeaseClient,
        held: &Lease,
    ) -> Result<Lease, WitnessError> {
        self.nodes[i].enter(|| runtime().block_on(client.renew(held)))
    }
}

/// True once our child `pid` has exited (it stays a zombie until reaped).
/// Waits until the witness's log says it listens; panics with the log if it exits first.
fn wait_listening(bg: &Background) {
    let pid = bg.pid();
    let mut exited = false;
    wait_for("the witness to listen", Duration::from_secs(20), || {
        exited = is_zombie(pid);
        exited || std::fs::read_to_string(&bg.log).unwrap_or_default().contains("witness listening")
    });
    assert!(!exited, "witness exited:\n{}", bg.log_text());
}

fn is_zombie(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // "pid (comm) S ...": the state follows the last ')'.
    stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

/// A veth from `ns` (as `bd0`, addressed `addr`) to the witness's bridge (as `leg`).
fn plug(witness: &Netns, ns: &Netns, leg: &str, addr: &str) {
    plug_as(witness, ns, netns::VETH, leg, addr);
}

/// A veth from `ns` (as `iface`, addressed `addr`) to the witness's bridge (as `leg`).
fn plug_as(witness: &Netns, ns: &Netns, iface: &str, leg: &str, addr: &str) {
    let add = [
        "link",
        "add",
        iface,
        "netns",
        ns.name(),
        "type",
        "veth",
        "peer",
        "name",
        leg,
        "netns",
        witness.name(),
    ];
    run_timeout(&mut cmd("ip", &add), IP_TIMEOUT);
    witness.ip(&["link", "set", leg, "master", "br0", "up"]);
    ns.ip(&["addr", "add", addr, "dev", iface]);
    ns.ip(&["link", "set", iface, "up"]);
}

/// A witness for the two nodes of a [`crate::cluster::Cluster`], on a network of its own:
///
/// ```text
///            netns <stem>-w: bridge br0 10.78.0.1/24, `blockd witness` on 10.78.0.1:7790
///          ┌──────────────┴──────────────┐
///   alpha's netns wt0 10.78.0.2/24   beta's netns wt0 10.78.0.3/24
/// ```
///
/// Separate from the replication link (and the LAN of `with_lan`), so a test can cut a node
/// from its peer, from the witness, or from both ([`ClusterWitness::cut`]). The process is
/// killed by pid on drop, the namespace deleted (taking the veths with it).
pub struct ClusterWitness {
    process: Option<Background>,
    starts: u32,
    ns: Netns,
    state: PathBuf,
    secret: PathBuf,
    previous: Option<PathBuf>,
    dir: PathBuf,
}

/// The interface of a node's leg to the witness.
pub const WITNESS_IFACE: &str = "wt0";

impl ClusterWitness {
    /// Plugs both node namespaces into a new witness namespace; `secret` is the cluster's
    /// secret file, `dir` where the state file and logs go. Starts nothing.
    pub fn attach(nodes: [&Netns; 2], dir: &Path, secret: &Path) -> ClusterWitness {
        let ns = Netns::create(&format!("{}-w", netns::unique_stem()));
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.ip(&["addr", "add", "10.78.0.1/24", "dev", "br0"]);
        ns.ip(&["link", "set", "br0", "up"]);
        let w = ClusterWitness {
            process: None,
            starts: 0,
            ns,
            state: dir.join("witness.state"),
            secret: secret.to_path_buf(),
            previous: None,
            dir: dir.to_path_buf(),
        };
        for (i, n) in nodes.iter().enumerate() {
            plug_as(&w.ns, n, WITNESS_IFACE, &format!("w{i}"), &format!("10.78.0.{}/24", i + 2));
        }
        w
    }

    /// The `[cluster]` key that points the nodes at this witness.
    pub fn cluster_toml() -> String {
        format!("witness = \"{WITNESS_ADDR}\"\n")
    }

    /// Makes the next starts pass `--previous-secret path` (for a rotation: the file need not
    /// exist yet; the witness reads it for every request).
    pub fn set_previous_secret(&mut self, path: &Path) {
        self.previous = Some(path.to_path_buf());
    }

    /// Starts `blockd witness --term term` and waits until it listens.
    pub fn start(&mut self, term: &str) {
        assert!(self.process.is_none(), "one witness at a time");
        self.starts += 1;
        let log = self.dir.join(format!("witness-{}.log", self.starts));
        let mut c = self.ns.command(bin("blockd").as_os_str());
        c.args(["witness", "--listen", WITNESS_ADDR, "--term", term]);
        c.arg("--state").arg(&self.state).arg("--secret").arg(&self.secret);
        if let Some(p) = &self.previous {
            c.arg("--previous-secret").arg(p);
        }
        c.env("BLOCKD_LOG", "blockd=debug");
        let bg = Background::spawn(&mut c, &log);
        wait_listening(&bg);
        self.process = Some(bg);
    }

    /// The running witness's pid.
    pub fn pid(&self) -> u32 {
        self.process.as_ref().expect("witness running").pid()
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&mut self) {
        let mut bg = self.process.take().expect("witness running");
        signal(bg.pid(), libc::SIGKILL);
        bg.wait(Duration::from_secs(10));
    }

    /// Drops everything `n`'s namespace receives from the witness network (nftables in `n`;
    /// removed by `Cluster::heal`, which clears the node's table).
    pub fn cut(node: &Netns) {
        node.add_rule("input", &format!("iifname \"{WITNESS_IFACE}\" drop"));
    }

    /// Everything every start of the witness logged.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|i| std::fs::read_to_string(self.dir.join(format!("witness-{i}.log"))))
            .filter_map(Result::ok)
            .collect()
    }
}

impl Drop for ClusterWitness {
    fn drop(&mut self) {
        // The process before its namespace (Background kills by pid on drop).
        self.process.take();
    }
}

/// Writes a secret file with mode 0600, as `load_secret` demands.
pub fn write_secret(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, bytes).expect("write secret");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod secret");
}
