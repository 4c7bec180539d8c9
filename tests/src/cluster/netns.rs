//! Network namespaces, the veth pair between them and the nftables rules that cut it.
//!
//! Everything here runs `ip` and `nft` as root and is undone by [`Netns`]'s `Drop`: deleting a
//! namespace deletes the veth end inside it (and with it the peer end) and every nftables
//! table it holds, so no rule or interface can outlive the test.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use crate::cmd::{cmd, run_quiet, run_timeout};

/// Name of the veth end inside each namespace. Interfaces are created directly inside their
/// namespaces, so both ends can share it and no name ever appears in the root namespace.
pub const VETH: &str = "bd0";

/// The nftables table the harness owns in each namespace; `heal` deletes it whole.
pub const TABLE: &str = "blockdtest";

/// How long one `ip`/`nft` invocation may take.
const IP_TIMEOUT: Duration = Duration::from_secs(20);

/// Distinguishes the namespaces of several clusters in one test process.
static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// A fresh namespace-name stem for this process: `bd-<pid>-<n>`.
pub fn unique_stem() -> String {
    let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    format!("bd-{}-{n}", std::process::id())
}

/// One named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `name` with its loopback up. A namespace of that name can only be a leftover of
    /// an earlier process with our pid that was killed before its cleanup: it is replaced.
    pub fn create(name: &str) -> Netns {
        if std::path::Path::new("/run/netns").join(name).exists() {
            eprintln!("removing stale network namespace {name}");
            let _ = run_quiet(&mut cmd("ip", &["netns", "del", name]), IP_TIMEOUT);
        }
        run_timeout(&mut cmd("ip", &["netns", "add", name]), IP_TIMEOUT);
        let ns = Netns { name: name.to_string() };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`; panics unless it succeeds.
    pub fn ip(&self, args: &[&str]) {
        let mut c = cmd("ip", &["-n", &self.name]);
        run_timeout(c.args(args), IP_TIMEOUT);
    }

    /// A command that runs `program` inside the namespace (`ip netns exec` execs it, so the
    /// child's pid is the program's own).
    pub fn command(&self, program: &std::ffi::OsStr) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs one nftables script (commands separated by `;`) in the namespace.
    pub fn nft(&self, script: &str) {
        let mut c = cmd("ip", &["netns", "exec", &self.name, "nft", script]);
        run_timeout(&mut c, IP_TIMEOUT);
    }

    /// Adds `rule` to chain `input` or `output` of the harness's table, creating both.
    pub fn add_rule(&self, chain: &str, rule: &str) {
        self.nft(&format!(
            "add table inet {TABLE}; \
             add chain inet {TABLE} input {{ type filter hook input priority 0; policy accept; }}; \
             add chain inet {TABLE} output {{ type filter hook output priority 0; policy accept; }}; \
             add rule inet {TABLE} {chain} {rule}"
        ));
    }

    /// Deletes the harness's table if it exists; never panics (also used in `Drop`).
    pub fn clear_rules(&self) {
        let list = cmd("ip", &["netns", "exec", &self.name, "nft", "list", "tables"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if list.lines().any(|l| l.trim() == format!("table inet {TABLE}")) {
            let del = format!("delete table inet {TABLE}");
            let mut c = cmd("ip", &["netns", "exec", &self.name, "nft", &del]);
            if let Some(out) = run_quiet(&mut c, IP_TIMEOUT) {
                if !out.status.success() {
                    eprintln!("cleanup: {out}");
                }
            }
        }
    }

    /// Runs `f` on a new thread that joins this namespace first, for servers that run while
    /// the test goes on (a proxy's accept loop).
    pub fn spawn<F: FnOnce() + Send + 'static>(&self, f: F) -> std::thread::JoinHandle<()> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            join(&path);
            f()
        })
    }

    /// Runs `f` on a new thread that has joined this namespace, and returns its result.
    /// Sockets created by `f` stay in the namespace whichever thread uses them later, which is
    /// how a test plays a fake peer or a proxy on the replication network.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                join(&path);
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

/// Moves the calling thread (only it) into the namespace at `path`. Callers are threads the
/// harness spawned for this purpose, which end when their work in the namespace is done.
fn join(path: &str) {
    let ns = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns(2) on an fd we own; CLONE_NEWNET changes only the calling thread's network
    // namespace (allowed in a multi-threaded process) and touches no memory of ours.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.clear_rules();
        if let Some(out) = run_quiet(&mut cmd("ip", &["netns", "del", &self.name]), IP_TIMEOUT) {
            if !out.status.success() {
                eprintln!("cleanup: {out}");
            }
        }
    }
}

/// Joins `a` and `b` with a veth pair created directly inside them ([`VETH`] on both sides),
/// addresses the ends with `addr_a`/`addr_b` (CIDR) and brings them up.
pub fn link(a: &Netns, b: &Netns, addr_a: &str, addr_b: &str) {
    let add = [
        "link", "add", VETH, "netns", &a.name, "type", "veth", "peer", "name", VETH, "netns",
        &b.name,
    ];
    run_timeout(&mut cmd("ip", &add), IP_TIMEOUT);
    for (ns, addr) in [(a, addr_a), (b, addr_b)] {
        ns.ip(&["addr", "add", addr, "dev", VETH]);
        ns.ip(&["link", "set", VETH, "up"]);
    }
}
