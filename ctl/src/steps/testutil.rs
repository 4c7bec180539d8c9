//! Helpers of the steps' tests: a context from TOML text, a root check, network namespaces.

use std::{path::Path, process::Command};

use blockd::config::Config;

use crate::step::Ctx;

/// A context from a configuration text (written to a temporary file, since configs load
/// from files); the file's single node is this node. A file without volumes gets a small
/// one, since a configuration must serve something.
pub fn ctx_for(toml: &str) -> Ctx {
    let toml = &if toml.contains("[[volume]]") {
        toml.to_string()
    } else {
        format!("{toml}\n[[volume]]\nname = \"unused\"\nsize = \"1MiB\"\n")
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("blockd.toml");
    std::fs::write(&path, toml).expect("write config");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("config: {e}\n{toml}"));
    let node = config.local_node(None).expect("single node");
    Ctx { config, node, dry_run: false, force: false }
}

/// These tests change the host (mounts, loop devices, namespaces): they need root, and say
/// so loudly instead of passing without testing anything.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (it mounts, attaches, adds namespaces)"
    );
}

/// Runs a setup command of a test, panicking with its output when it fails.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("run sh");
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace made by a test, deleted on drop (also when the test fails).
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// `ip netns add blk-<tag>-<pid>` (unique per test process and tag), loopback up.
    pub fn new(tag: &str) -> NetNs {
        let name = format!("blk-{tag}-{}", std::process::id());
        sh(&format!("ip netns add {name} && ip -n {name} link set lo up"));
        NetNs { name }
    }

    /// Moves the calling thread into the namespace (only this thread: other tests go on in
    /// their own). Threads and processes it starts afterwards are in it too.
    pub fn enter(&self) {
        let f = std::fs::File::open(Path::new("/run/netns").join(&self.name)).expect("open netns");
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    }

    /// Runs `ip -n NS ARGS` and returns its output.
    pub fn ip(&self, args: &str) -> String {
        sh(&format!("ip -n {} {args}", self.name))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A binary of this workspace (`blockd`), next to the test binary's directory, like the
/// integration tests find theirs.
pub fn bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("test binary lives in target/*/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first with `cargo build --workspace --bins`",
        path.display()
    );
    path
}
