//! A node's persistent mount namespace, and finding (by namespace, never by name) every
//! process that runs "on" a node.
//!
//! Real servers mount the same paths (/var/lib/mysql, /srv/nfs): each node gets its own mount
//! namespace, persisted by `unshare --mount=FILE` on a private bind mount of the test
//! directory (a namespace file may not live on a shared mount: it could end up inside
//! itself). Every command run on a node goes through `nsenter --net=... --mount=FILE`, and
//! whatever it starts (nbdfuse, mariadbd, ganesha, a detached gratuitous-ARP child) inherits
//! both namespaces. So "the processes of a node" are exactly those whose /proc/PID/ns/mnt or
//! /proc/PID/ns/net is the node's: that is how cleanup and `kill_node` find them, including
//! daemons that forked away from anything the harness could hold a pid of.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::cmd::{cmd, run_quiet, run_timeout, signal, try_run, Output};

/// How long one mount-namespace command (mount, umount, unshare) may take.
const NS_TIMEOUT: Duration = Duration::from_secs(30);

/// Tmpfs mounts every node gets at creation: per-node runtime directories, as on a real
/// server (the host's own /run/mysqld and /srv must not be shared by the two nodes).
const NODE_TMPFS: &[&str] = &["/run/mysqld", "/run/ganesha", "/srv"];

/// Lazily unmounts, deepest first, every FUSE mount and every filesystem on a loop or NBD
/// device in the namespace it runs in (mountinfo: the fields after "-" are type and source).
const DROP_INHERITED: &str = r#"awk '{ for (i = 7; i < NF; i++) if ($i == "-") break;
  if ($(i+1) ~ /^fuse/ || $(i+2) ~ /^\/dev\/(loop|nbd)/) print $5 }' /proc/self/mountinfo |
  sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
"#;

/// One node's mount namespace, bound to `file` (see the module doc). Dropping it kills the
/// node's processes, unmounts what was mounted inside since creation and releases the file.
pub struct MountNs {
    file: PathBuf,
    net: PathBuf,
    /// Mount ids present right after creation: cleanup unmounts everything else.
    baseline: BTreeSet<u64>,
}

impl MountNs {
    /// Creates the namespace file `dir/<name>` (dir must be a private mount), the namespace
    /// itself, and inside it: sysfs of the node's network namespace (as `ip netns exec` does)
    /// and tmpfs mounts on /run/mysqld, /run/ganesha and /srv, with /srv/nfs as a mount point.
    pub fn create(dir: &Path, name: &str, netns: &str) -> MountNs {
        let file = dir.join(name);
        fs::write(&file, b"").unwrap_or_else(|e| panic!("create {}: {e}", file.display()));
        let mut unshare = cmd("unshare", &["--propagation", "private"]);
        unshare.arg(format!("--mount={}", file.display())).arg("true");
        run_timeout(&mut unshare, NS_TIMEOUT);
        let net = Path::new("/run/netns").join(netns);
        let mut ns = MountNs { file, net, baseline: BTreeSet::new() };
        ns.baseline = ns.mounts().into_iter().map(|(id, _)| id).collect();
        // The new namespace starts with a copy of every host mount, other tests' FUSE and
        // loop-device filesystems included, and (private propagation) the host's later
        // umounts do not reach the copies: each would keep another test's filesystem alive
        // after its umount, to lose its unwritten data at the detach (blockctl's demote
        // refuses to detach under one, see ctl/src/steps/elsewhere.rs). Dropped at once.
        let mut script = String::from(DROP_INHERITED);
        script.push_str("set -e; mount -t sysfs sysfs /sys; ");
        for dir in NODE_TMPFS {
            script.push_str(&format!("mkdir -p {dir}; mount -t tmpfs -o mode=0755 tmpfs {dir}; "));
        }
        script.push_str("mkdir -p /srv/nfs");
        ns.sh(&script).assert_success();
        ns.baseline = ns.mounts().into_iter().map(|(id, _)| id).collect();
        ns
    }

    /// The namespace file (`nsenter --mount=` takes it).
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// A command running `program` on the node (both namespaces; nsenter execs it, so the
    /// child's pid is the program's own).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.net.display()));
        c.arg(format!("--mount={}", self.file.display()));
        c.arg(program);
        c
    }

    /// `sh -c script` on the node; returns whatever it exited with (panics on timeout).
    pub fn sh(&self, script: &str) -> Output {
        let mut c = self.command("sh");
        c.args(["-c", script]);
        try_run(&mut c, NS_TIMEOUT)
    }

    /// (mount id, mount point) of every mount in the namespace, in mount order.
    pub fn mounts(&self) -> Vec<(u64, String)> {
        let mut c = self.command("cat");
        c.arg("/proc/self/mountinfo");
        let out = run_timeout(&mut c, NS_TIMEOUT);
        parse_mountinfo(&out.stdout)
    }

    /// Mount points mounted in the namespace since it was set up (attach, mounts, binds).
    pub fn added_mounts(&self) -> Vec<String> {
        let mounts = self.mounts().into_iter();
        mounts.filter(|(id, _)| !self.baseline.contains(id)).map(|(_, mp)| mp).collect()
    }

    /// Every process on the node: its mount or network namespace is the node's.
    pub fn pids(&self) -> Vec<u32> {
        pids_in(&[ns_inode(&self.file), ns_inode(&self.net)])
    }

    /// SIGKILL every process on the node until none is left (a dying daemon may fork or be
    /// reaped late); gives up after 10 s and says so.
    pub fn kill_all(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                eprintln!("cleanup: processes {pids:?} survive SIGKILL on {}", self.file.display());
                return;
            }
            for pid in pids {
                signal(pid, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Unmounts (lazily, innermost first) everything mounted since set-up. Never panics.
    pub fn unmount_added(&self) {
        let Some(out) = run_quiet(&mut self.mountinfo_cmd(), NS_TIMEOUT) else { return };
        let added: Vec<String> = parse_mountinfo(&out.stdout)
            .into_iter()
            .filter(|(id, _)| !self.baseline.contains(id))
            .map(|(_, mp)| mp)
            .collect();
        for mp in added.iter().rev() {
            let mut c = self.command("umount");
            c.args(["-l", mp]);
            if let Some(o) = run_quiet(&mut c, NS_TIMEOUT) {
                if !o.status.success() {
                    eprintln!("cleanup: {o}");
                }
            }
        }
    }

    fn mountinfo_cmd(&self) -> Command {
        let mut c = self.command("cat");
        c.arg("/proc/self/mountinfo");
        c
    }
}

impl Drop for MountNs {
    fn drop(&mut self) {
        self.kill_all();
        self.unmount_added();
        let _ = run_quiet(&mut cmd("umount", &[&self.file]), NS_TIMEOUT);
    }
}

/// (mount id, mount point) of each line of a mountinfo file.
fn parse_mountinfo(text: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.split(' ');
        let id = f.next().and_then(|s| s.parse().ok());
        let mp = f.nth(3).map(unescape);
        if let (Some(id), Some(mp)) = (id, mp) {
            out.push((id, mp));
        }
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// The inode of a namespace (a /run/netns file or a mount-namespace file); 0 if unreadable.
pub fn ns_inode(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.ino()).unwrap_or(0)
}

/// Pids (other than ours) whose mount or network namespace is one of `inodes`.
pub fn pids_in(inodes: &[u64]) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    let mut pids = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let inside = ["mnt", "net"].iter().any(|kind| {
            let link = fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap_or_default();
            let link = link.to_string_lossy();
            let ino = link.split('[').nth(1).and_then(|s| s.trim_end_matches(']').parse().ok());
            ino.is_some_and(|i: u64| i != 0 && inodes.contains(&i))
        });
        if inside {
            pids.push(pid);
        }
    }
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse() {
        let text = "22 1 0:21 / /proc rw - proc proc rw\n\
                    90 45 7:3 / /var/lib/my\\040sql rw,relatime - ext4 /dev/loop3 rw\n";
        let got = parse_mountinfo(text);
        assert_eq!(got, vec![(22, "/proc".into()), (90, "/var/lib/my sql".into())]);
    }
}
