//! The failover topology: both nodes and a client on one Ethernet segment, each node with
//! its own mount namespace.
//!
//! ```text
//!            netns <stem>-s: bridge br0 (legs la, lb, lc)
//!          ┌──────────────┼───────────────┐
//!   <stem>-a bd0           <stem>-b bd0          <stem>-c bd0
//!   10.99.0.1/24          10.99.0.2/24         10.99.0.10/24 (the client)
//!   (+ VIP 10.99.0.100)   (+ VIP on beta)
//!   mount ns <dir>/ns/alpha   mount ns <dir>/ns/beta
//! ```
//!
//! A bridge rather than a veth pair, so that the VIP really moves between two MAC addresses
//! and the client's neighbour entry shows whose it is. The client has no mount namespace of
//! its own: it only talks to the VIP (MariaDB, NFS, ping).

use std::{
    fs,
    io::Read,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use super::{
    loops::LoopTracker,
    mountns::{self, MountNs},
    netns::{self, Netns},
    NodeId,
};
use crate::cmd::{cmd, run_quiet, run_timeout, try_run, Output};

/// The client namespace's address.
pub const CLIENT_IP: &str = "10.99.0.10";
/// The virtual IP the failover moves, and its prefix length.
pub const VIP: &str = "10.99.0.100";
pub const VIP_CIDR: &str = "10.99.0.100/24";
/// Interface of every namespace on the segment (the node's `[vip] interface`).
pub const IFACE: &str = netns::VETH;

const IP_TIMEOUT: Duration = Duration::from_secs(20);
const PING: &str = include_str!("ping.py");

/// The switch, the client and the per-node mount namespaces; see the module doc.
pub struct Lan {
    /// Dropped first (fields drop in order): kills node processes, unmounts inside.
    mnt: Vec<MountNs>,
    client: Netns,
    switch: Netns,
    /// The private bind mount holding the namespace files.
    ns_dir: PathBuf,
    test_dir: PathBuf,
    /// Inodes of the nodes' network namespaces, for the client-side process scan.
    node_nets: Vec<PathBuf>,
    /// The loop devices the nodes attached on files of this test (dropped last).
    loops: LoopTracker,
}

impl Lan {
    /// Builds the segment for the two node namespaces `nodes` (alpha, beta), addresses them,
    /// and creates their mount namespaces under `test_dir/ns`.
    pub fn create(stem: &str, nodes: [&Netns; 2], test_dir: &Path) -> Lan {
        crate::require("nsenter");
        crate::require("unshare");
        let switch = Netns::create(&format!("{stem}-s"));
        let client = Netns::create(&format!("{stem}-c"));
        let ns_dir = test_dir.join("ns");
        fs::create_dir_all(&ns_dir).expect("mkdir ns dir");
        let mut lan = Lan {
            mnt: Vec::new(),
            client,
            switch,
            ns_dir: PathBuf::new(),
            test_dir: test_dir.to_path_buf(),
            loops: LoopTracker::start(test_dir),
            node_nets: nodes.iter().map(|n| Path::new("/run/netns").join(n.name())).collect(),
        };
        run_timeout(cmd("mount", &["--bind"]).arg(&ns_dir).arg(&ns_dir), IP_TIMEOUT);
        lan.ns_dir = ns_dir.clone();
        run_timeout(cmd("mount", &["--make-private"]).arg(&ns_dir), IP_TIMEOUT);
        lan.switch.ip(&["link", "add", "br0", "type", "bridge"]);
        lan.switch.ip(&["link", "set", "br0", "up"]);
        let legs = [(nodes[0], "la", "10.99.0.1/24"), (nodes[1], "lb", "10.99.0.2/24")];
        for (ns, leg, addr) in legs {
            lan.plug(ns, leg, addr);
        }
        let client_addr = format!("{CLIENT_IP}/24");
        lan.plug(&lan.client, "lc", &client_addr);
        for (ns, name) in nodes.iter().zip(["alpha", "beta"]) {
            lan.mnt.push(MountNs::create(&ns_dir, name, ns.name()));
        }
        lan
    }

    /// A veth from `ns` (as [`IFACE`], addressed `addr`) to the bridge (as `leg`).
    fn plug(&self, ns: &Netns, leg: &str, addr: &str) {
        let add = [
            "link",
            "add",
            IFACE,
            "netns",
            ns.name(),
            "type",
            "veth",
            "peer",
            "name",
            leg,
            "netns",
            self.switch.name(),
        ];
        run_timeout(&mut cmd("ip", &add), IP_TIMEOUT);
        self.switch.ip(&["link", "set", leg, "master", "br0", "up"]);
        ns.ip(&["addr", "add", addr, "dev", IFACE]);
        ns.ip(&["link", "set", IFACE, "up"]);
    }

    pub fn mount_ns(&self, n: NodeId) -> &MountNs {
        &self.mnt[n as usize]
    }

    pub fn client_netns(&self) -> &Netns {
        &self.client
    }

    /// A command running `program` in the client namespace (nsenter execs it).
    pub fn client_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.client.name())).arg(program);
        c
    }

    /// `sh -c script` in the client namespace, bounded by `timeout`.
    pub fn client(&self, script: &str, timeout: Duration) -> Output {
        let mut c = self.client_command("sh");
        c.args(["-c", script]);
        try_run(&mut c, timeout)
    }

    /// Whether `addr` answers an ICMP echo from the client within about `secs` seconds.
    pub fn ping(&self, addr: &str, secs: u32) -> bool {
        let mut c = self.client_command(super::clients::PYTHON);
        c.args(["-c", PING, addr, &secs.to_string()]);
        try_run(&mut c, Duration::from_secs(u64::from(secs) + 10)).status.success()
    }

    /// Connects from the client to `addr:port` and returns the first bytes the server sends
    /// (MariaDB greets with its version), or the error.
    pub fn tcp_greeting(&self, addr: &str, port: u16) -> Result<Vec<u8>, String> {
        let to: SocketAddr = format!("{addr}:{port}").parse().map_err(|e| format!("{e}"))?;
        self.client.enter(|| {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))
                .map_err(|e| format!("connect {to}: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 256];
            let n = s.read(&mut buf).map_err(|e| format!("read from {to}: {e}"))?;
            buf.truncate(n);
            Ok(buf)
        })
    }

    /// The MAC address of `ns`'s [`IFACE`].
    pub fn mac(ns: &Netns) -> String {
        let mut c = cmd("ip", &["-n", ns.name(), "-j", "link", "show", "dev", IFACE]);
        let out = run_timeout(&mut c, IP_TIMEOUT);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("ip -j link JSON");
        v[0]["address"].as_str().unwrap_or_else(|| panic!("no MAC in {}", out.stdout)).into()
    }

    /// The client's neighbour entry for `addr`: (lladdr, state), if it has one.
    pub fn client_neighbour(&self, addr: &str) -> Option<(String, String)> {
        let mut c = cmd("ip", &["-n", self.client.name(), "-j", "neigh", "show", addr]);
        let out = run_timeout(&mut c, IP_TIMEOUT);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
        let e = v.as_array()?.first()?;
        let mac = e["lladdr"].as_str()?.to_string();
        let state = e["state"].as_array().and_then(|s| s.first()).and_then(|s| s.as_str());
        Some((mac, state.unwrap_or("").to_string()))
    }

    /// Whether `ns` holds [`VIP`] on [`IFACE`].
    pub fn holds_vip(ns: &Netns) -> bool {
        let mut c = cmd("ip", &["-n", ns.name(), "-4", "-o", "addr", "show", "dev", IFACE]);
        let out = run_timeout(&mut c, IP_TIMEOUT);
        out.stdout.split_whitespace().any(|w| w == VIP_CIDR)
    }

    /// Loop devices attached on files of this test under `under` (a node's directory) and
    /// still bound, even once their backing path is gone ([`LoopTracker`]).
    pub fn loops_under(&self, under: &Path) -> Vec<String> {
        self.loops.devices(under)
    }

    /// Detaches the loop devices of [`Lan::loops_under`]`(under)`; never panics.
    pub fn detach_loops(&self, under: &Path) {
        self.loops.detach(under);
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // Processes first (so nothing holds the mounts), then the loop devices (while their
        // backing files still have their paths), then the mounts inside each namespace.
        for m in &self.mnt {
            m.kill_all();
        }
        let client_net = Path::new("/run/netns").join(self.client.name());
        let mut inodes: Vec<u64> = self.node_nets.iter().map(|p| mountns::ns_inode(p)).collect();
        inodes.push(mountns::ns_inode(&client_net));
        for pid in mountns::pids_in(&inodes) {
            crate::cmd::signal(pid, libc::SIGKILL);
        }
        self.loops.detach(&self.test_dir);
        self.mnt.clear();
        // A device that was still mounted was only marked for autoclear: detach it for good
        // now that the mounts are gone.
        self.loops.detach(&self.test_dir);
        if !self.ns_dir.as_os_str().is_empty() {
            let _ = run_quiet(cmd("umount", &["-l"]).arg(&self.ns_dir), IP_TIMEOUT);
        }
        // `client` and `switch` drop next: deleting them deletes the veths and the bridge.
    }
}
