//! What failover tests do to a [`Cluster::with_lan`] cluster: run commands on a node or on
//! the client, kill a whole node, run `blockctl promote/demote/swap`, prepare a filesystem
//! on the mirror, and check that a node is clean (no mounts, loop devices, VIP, processes).

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use super::{
    lan::{Lan, IFACE},
    Cluster, NodeId,
};
use crate::{
    cmd::{run_timeout, signal, try_run, Output},
    disk::FaultDisk,
};

/// Bound of one `blockctl promote/demote/swap` (a plan of steps each bounded by 60 s).
pub const PLAN_TIMEOUT: Duration = Duration::from_secs(300);
/// Connect plus resync of a small volume.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

impl Cluster {
    /// The bridge/client/mount-namespace part; panics for a plain [`Cluster::new`].
    pub fn lan(&self) -> &Lan {
        self.lan.as_ref().expect("a Cluster::with_lan cluster")
    }

    /// `sh -c script` on node `n` (its network and mount namespaces); any exit status.
    pub fn run_on(&self, n: NodeId, script: &str) -> Output {
        self.lan().mount_ns(n).sh(script)
    }

    /// `sh -c script` in the client namespace; any exit status.
    pub fn client(&self, script: &str) -> Output {
        self.lan().client(script, Duration::from_secs(60))
    }

    /// A node failure: SIGKILL of the daemon and of every other process on the node
    /// (nbdfuse, mariadbd, ganesha, helpers: found by namespace, see [`super::mountns`]),
    /// after its link went down. Mounts stay behind, as after a power cut; cleanup removes them.
    pub fn kill_node(&mut self, n: NodeId) {
        // Link first, as in a power cut: no FIN or RST of the dying processes gets out.
        self.netns(n).ip(&["link", "set", IFACE, "down"]);
        self.kill_processes(n);
    }

    /// SIGKILL of every process on `n` with its link left up: the kernel closes their sockets,
    /// so the peer sees a FIN at once (`kill -9` of everything, or an OOM massacre).
    pub fn kill_processes(&mut self, n: NodeId) {
        if let Some(child) = self.nodes[n.index()].child.as_ref() {
            signal(child.id(), libc::SIGKILL);
        }
        self.lan().mount_ns(n).kill_all();
        if self.nodes[n.index()].child.is_some() {
            self.kill(n);
        }
    }

    /// A power cut of `n`, whose backing is `disk`: its link goes down (nothing more gets
    /// out), blockd and the disk's nbdkit get SIGKILL (what the disk had not flushed is
    /// gone), then every other process on the node. Mounts stay, as after a kill_node.
    pub fn power_cut_node(&mut self, n: NodeId, disk: &mut FaultDisk) {
        self.netns(n).ip(&["link", "set", IFACE, "down"]);
        self.kill(n);
        disk.power_cut();
        self.kill_processes(n);
    }

    /// Power back on after [`Cluster::power_cut_node`]: the reboot's cleanup, the disk, blockd.
    pub fn power_on_node(&mut self, n: NodeId, disk: &mut FaultDisk) {
        self.reboot_node(n);
        disk.power_on();
        self.start(n);
    }

    /// [`Cluster::assert_identical`] run on `n`, whose backing may be a fault disk mounted in
    /// its mount namespace only ([`FaultDisk::on_node`]).
    #[track_caller]
    pub fn assert_identical_on(&self, n: NodeId) {
        let (a, b) = (self.backing(super::Alpha), self.backing(super::Beta));
        let out = self.run_on(n, &format!("cmp {} {}", a.display(), b.display()));
        assert!(out.status.success(), "backing files differ (cmp on {}):\n{out}", n.name());
    }

    /// After [`Cluster::kill_node`], what a reboot of `n` would clear: the mounts and loop
    /// devices left behind, /run/mysqld, the VIP on its interface; then its link comes up. The
    /// daemon is not started.
    pub fn reboot_node(&self, n: NodeId) {
        let lan = self.lan();
        lan.mount_ns(n).kill_all();
        lan.mount_ns(n).unmount_added();
        // By device (the FUSE files' paths went with the mounts): see `loops.rs`.
        lan.detach_loops(&self.dir().join(n.name()));
        let script = format!(
            "rm -rf /run/mysqld/* ; ip addr del {} dev {IFACE} 2>/dev/null; true",
            super::lan::VIP_CIDR
        );
        self.run_on(n, &script);
        self.netns(n).ip(&["link", "set", IFACE, "up"]);
    }

    /// `blockctl <args>` on `n`, with any exit status; its output is echoed to stderr so the
    /// per-step lines ("ok in 0.42 s") show in the test log.
    pub fn blockctl_run(&self, n: NodeId, args: &[&str]) -> Output {
        let mut c = self.blockctl(n);
        c.args(args).env("NO_COLOR", "1").stdin(Stdio::null());
        let out = try_run(&mut c, PLAN_TIMEOUT);
        eprintln!(
            "----- {} on {} ({}) -----\n{}{}",
            args.join(" "),
            n.name(),
            out.status,
            out.stdout,
            out.stderr
        );
        out
    }

    /// `blockctl promote [extra]` on `n`; panics with the output unless it exits 0. Returns
    /// the output and the wall time.
    pub fn promote(&self, n: NodeId, extra: &[&str]) -> (Output, Duration) {
        let mut args = vec!["promote"];
        args.extend_from_slice(extra);
        let t = Instant::now();
        let out = self.blockctl_run(n, &args);
        let took = t.elapsed();
        assert!(out.status.success(), "promote on {} failed:\n{out}{}", n.name(), self.diag(n));
        (out, took)
    }

    /// Node-side diagnostics for a failure message: mounts, loops, processes, MariaDB log.
    pub fn diag(&self, n: NodeId) -> String {
        let lan = self.lan();
        let log = self.run_on(n, "tail -n 30 /run/mysqld/error.log 2>/dev/null; tail -n 20 /run/ganesha/ganesha.log 2>/dev/null");
        format!(
            "\n--- {} diagnostics ---\nadded mounts: {:?}\nloops: {:?}\nprocesses: {}\nVIP here: {}\n{}",
            n.name(),
            lan.mount_ns(n).added_mounts(),
            self.loops(n),
            self.describe_pids(n),
            Lan::holds_vip(self.netns(n)),
            log.stdout
        )
    }

    /// Network diagnostics for a failure through the VIP: the client's neighbour entries,
    /// link counters and TCP sockets; each node's addresses, listening sockets, neighbours and
    /// nftables ruleset.
    pub fn net_diag(&self) -> String {
        let client = self.client("ip neigh; ip -s link show dev bd0; ss -tni; nft list ruleset");
        let mut text = format!("\n--- client network ---\n{}{}", client.stdout, client.stderr);
        for n in [super::Alpha, super::Beta] {
            let out = self
                .run_on(n, "ip addr show dev bd0; ip neigh; ss -tlni; ss -tni; nft list ruleset");
            text.push_str(&format!("\n--- {} network ---\n{}{}", n.name(), out.stdout, out.stderr));
        }
        text
    }

    /// Loop devices on files of node `n` (its attach or prepare directories).
    pub fn loops(&self, n: NodeId) -> Vec<String> {
        self.lan().loops_under(&self.dir().join(n.name()))
    }

    /// Processes on `n` other than its daemon, with their command lines.
    pub fn node_processes(&self, n: NodeId) -> Vec<(u32, String)> {
        let daemon = self.nodes[n.index()].child.as_ref().map(std::process::Child::id);
        let pids = self.lan().mount_ns(n).pids().into_iter().filter(|p| Some(*p) != daemon);
        pids.map(|p| {
            let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (p, cmdline.trim().to_string())
        })
        .collect()
    }

    fn describe_pids(&self, n: NodeId) -> String {
        format!("{:?}", self.node_processes(n))
    }

    /// Err listing what is left on `n` beyond its daemon: mounts made since set-up, loop
    /// devices of this test, the VIP, processes. Waits up to `grace` for stragglers.
    pub fn check_clean(&self, n: NodeId, grace: Duration) -> Result<(), String> {
        let deadline = Instant::now() + grace;
        loop {
            let mut dirt = Vec::new();
            let mounts = self.lan().mount_ns(n).added_mounts();
            if !mounts.is_empty() {
                dirt.push(format!("mounts {mounts:?}"));
            }
            let loops = self.loops(n);
            if !loops.is_empty() {
                dirt.push(format!("loop devices {loops:?}"));
            }
            if Lan::holds_vip(self.netns(n)) {
                dirt.push("the VIP".to_string());
            }
            let procs = self.node_processes(n);
            if !procs.is_empty() {
                dirt.push(format!("processes {procs:?}"));
            }
            if dirt.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("{} is not clean: {}", n.name(), dirt.join("; ")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Writes a filesystem on the volume through `n` and runs `body` (sh) with it mounted at
    /// `mount` on `n`: `n` becomes Primary, nbdfuse + loop + mkfs.ext4 + mount are done by
    /// hand here (not by blockctl; 4 KiB blocks, so the kernel attach's 4 KiB logical block
    /// size can mount it too, with the 4 MiB journal of a 1 KiB-block filesystem this small,
    /// not the 16 MiB one 4 KiB blocks bring: the tests' volumes are small), then everything
    /// is undone, `n` goes back to Secondary and both nodes are waited for in sync. Panics
    /// with the script's output on failure.
    pub fn prepare_filesystem(&self, n: NodeId, mount: &str, body: &str) {
        self.wait_in_sync(SYNC_TIMEOUT);
        self.role(n, "primary", false).unwrap_or_else(|e| panic!("role primary: {e}"));
        let script = self.on_loop_device_sh(
            n,
            "prep",
            &format!(
                r#"mkfs.ext4 -q -F -b 4096 -J size=4 -E nodiscard $DEV
mount $DEV {mount}
( set -e
{body}
) || {{ st=$?; umount {mount}; exit $st; }}
umount {mount}"#
            ),
        );
        let mut c = self.lan().mount_ns(n).command("sh");
        c.args(["-c", &script]);
        run_timeout(&mut c, Duration::from_secs(300));
        self.role(n, "secondary", false).unwrap_or_else(|e| panic!("role secondary: {e}"));
        self.wait_in_sync(SYNC_TIMEOUT);
    }
}

impl Cluster {
    /// A shell script for `n`'s mount namespace that gives `body` the volume as the loop device
    /// `$DEV`, through an nbdfuse of its own under `<test dir>/<node>/<name>`, then detaches both
    /// (waiting for nbdfuse to exit) whatever `body` returned, and exits with `body`'s status.
    pub fn on_loop_device_sh(&self, n: NodeId, name: &str, body: &str) -> String {
        format!(
            r#"set -e
F={fuse}; mkdir -p $F
nbdfuse -P $F.pid $F/disk '{uri}' >$F.log 2>&1 &
i=0; while [ ! -s $F.pid ]; do i=$((i+1)); [ $i -lt 300 ] || {{ cat $F.log; exit 1; }}; sleep 0.1; done
DEV=$(losetup --find --show --direct-io=on $F/disk)
st=0
( set -e
{body}
) || st=$?
losetup -d $DEV
fusermount3 -u $F
PID=$(cat $F.pid); i=0; while kill -0 $PID 2>/dev/null; do i=$((i+1)); [ $i -lt 300 ] || exit 1; sleep 0.1; done
exit $st
"#,
            fuse = self.dir().join(n.name()).join(name).display(),
            uri = self.nbd_uri(n),
        )
    }
}

/// The per-step lines of a plan's output ("... ok in 0.42 s", failures), for the timing
/// figures the tests print.
pub fn step_lines(out: &Output) -> Vec<String> {
    out.stdout
        .lines()
        .chain(out.stderr.lines())
        .filter(|l| {
            ["ok in ", "FAILED after ", "done in ", "already done"].iter().any(|k| l.contains(k))
        })
        .map(str::to_string)
        .collect()
}
