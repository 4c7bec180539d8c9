//! The command lines: invalid configurations make `blockd` exit 2 with a message that names
//! the key (design.md §9), and `blockctl status` without a daemon fails clearly and quickly.

use std::{fs, time::Duration};

use blockd_tests::{
    cmd::{bin, try_run},
    Output, TestDir,
};

/// Runs `blockd --config <file with text> args...`; it must exit by itself (it never gets
/// to serving with an invalid configuration).
fn blockd_with(test: &str, config: &str, args: &[&str]) -> Output {
    let dir = TestDir::new(test);
    let data = dir.subdir("data");
    let run = dir.subdir("run");
    let text =
        config.replace("@DATA@", data.to_str().unwrap()).replace("@RUN@", run.to_str().unwrap());
    let path = dir.path().join("blockd.toml");
    fs::write(&path, text).expect("write config");
    let mut c = std::process::Command::new(bin("blockd"));
    c.arg("--config").arg(&path).args(args);
    try_run(&mut c, Duration::from_secs(20))
}

const NODE: &str = "[node.alpha]\ndata-dir = \"@DATA@\"\nrun-dir = \"@RUN@\"\n\n";

fn assert_exit2_naming(out: &Output, needles: &[&str]) {
    assert_eq!(out.code(), 2, "invalid configuration must exit 2:\n{out}");
    for n in needles {
        assert!(out.stderr.contains(n), "the error must name {n:?}:\n{out}");
    }
}

#[test]
fn missing_config_file() {
    let dir = TestDir::new("cli-missing");
    let path = dir.path().join("nope.toml");
    let mut c = std::process::Command::new(bin("blockd"));
    c.arg("--config").arg(&path);
    let out = try_run(&mut c, Duration::from_secs(20));
    assert_exit2_naming(&out, &["nope.toml"]);
}

#[test]
fn bad_size() {
    let cfg = format!("{NODE}[[volume]]\nname = \"vol\"\nsize = \"12 potatoes\"\n");
    let out = blockd_with("cli-bad-size", &cfg, &["--node", "alpha"]);
    assert_exit2_naming(&out, &["size", "12 potatoes"]);
}

#[test]
fn duplicate_volume() {
    let vol = "[[volume]]\nname = \"dupvol\"\nsize = \"8MiB\"\n\n";
    let out = blockd_with("cli-dup-volume", &format!("{NODE}{vol}{vol}"), &["--node", "alpha"]);
    assert_exit2_naming(&out, &["dupvol"]);
}

#[test]
fn unknown_node() {
    let cfg = format!("{NODE}[[volume]]\nname = \"vol\"\nsize = \"8MiB\"\n");
    let out = blockd_with("cli-unknown-node", &cfg, &["--node", "gamma"]);
    assert_exit2_naming(&out, &["gamma"]);
}

#[test]
fn unknown_key() {
    let cfg = format!("{NODE}bogus-key = 1\n[[volume]]\nname = \"vol\"\nsize = \"8MiB\"\n");
    let out = blockd_with("cli-unknown-key", &cfg, &["--node", "alpha"]);
    assert_exit2_naming(&out, &["bogus-key"]);
}

#[test]
fn unknown_storage_engine() {
    let cfg = format!(
        "{NODE}[[volume]]\nname = \"vol\"\nsize = \"8MiB\"\n\n[storage]\nengine = \"warp\"\n"
    );
    let out = blockd_with("cli-bad-engine", &cfg, &["--node", "alpha"]);
    assert_exit2_naming(&out, &["engine", "warp"]);
}

#[test]
fn blockctl_status_without_daemon() {
    let dir = TestDir::new("cli-no-daemon");
    let (data, run) = (dir.subdir("data"), dir.subdir("run"));
    let cfg =
        NODE.replace("@DATA@", data.to_str().unwrap()).replace("@RUN@", run.to_str().unwrap());
    let path = dir.path().join("blockd.toml");
    fs::write(&path, format!("{cfg}[[volume]]\nname = \"vol\"\nsize = \"8MiB\"\n"))
        .expect("config");
    let mut c = std::process::Command::new(bin("blockctl"));
    c.arg("--config").arg(&path).args(["--node", "alpha", "status"]);
    let out = try_run(&mut c, Duration::from_secs(20));
    assert_eq!(out.code(), 3, "status without a daemon exits 3 (not running):\n{out}");
    assert!(out.stderr.contains("control"), "the error must say what it could not reach:\n{out}");
    // What this node has mounted, attached and started is still shown (the daemon may have
    // crashed under a mounted filesystem), but nothing that only the daemon knows.
    assert!(out.stdout.contains("failover state here"), "local state is shown:\n{out}");
    for daemon_only in ["volume vol", "role", "disk", "conn"] {
        assert!(!out.stdout.contains(daemon_only), "no {daemon_only:?} without a daemon:\n{out}");
    }
}
