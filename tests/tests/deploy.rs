//! Production deployment (issue 7): the systemd protocol as the real `blockd` binary speaks
//! it (a unix datagram socket stands in for systemd as `NOTIFY_SOCKET`), the unit files
//! checked by `systemd-analyze verify` (scripts/verify-units), the Debian package built,
//! installed into this machine with dpkg and purged again, and `blockctl init` on this
//! machine compared with what the machine really has.

use std::{
    fs,
    os::unix::net::{UnixDatagram, UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use blockd_tests::{
    cmd::{bin, kill_with_parent, run_quiet, run_timeout, signal, try_run, wait_until},
    Node, Output,
};

/// Held by the tests that install the package into this machine or look at what is
/// installed (units, drop-ins): tests of one binary run in parallel threads, and `blockctl
/// init` must not see the package's drop-ins appear half-way through.
static SYSTEM: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn lock_system() -> std::sync::MutexGuard<'static, ()> {
    SYSTEM.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The repository root (scripts/, systemd/).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the repo").to_path_buf()
}

/// The directory the built binaries are in (what `bin` finds).
fn bin_dir() -> PathBuf {
    bin("blockd").parent().expect("a directory").to_path_buf()
}

/// Plays systemd's side of `sd_notify`: a datagram socket in the test's directory.
struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
}

impl Notify {
    fn bind(dir: &Path) -> Notify {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        Notify { sock, path }
    }

    /// The next datagram's lines, or None after `timeout`.
    fn recv(&self, timeout: Duration) -> Option<Vec<String>> {
        self.sock.set_read_timeout(Some(timeout)).expect("timeout");
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).lines().map(str::to_string).collect())
    }

    /// Datagrams until one contains `line`; the ones before it are returned with it.
    fn until(&self, line: &str, timeout: Duration) -> Vec<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(msg) = self.recv(left.max(Duration::from_millis(1))) else {
                panic!("no {line} within {timeout:?}; received {seen:?}");
            };
            let done = msg.iter().any(|l| l == line);
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }
}

/// Starts the real blockd of `node` with `env`, output to the node's log; killed with the test.
fn spawn_blockd(node: &Node, env: &[(&str, String)]) -> Child {
    let log = fs::File::create(&node.log).expect("log");
    let mut c = Command::new(bin("blockd"));
    c.arg("--config").arg(&node.config).args(["--node", "alpha"]);
    c.env_remove("NOTIFY_SOCKET").env_remove("WATCHDOG_USEC").env_remove("WATCHDOG_PID");
    c.envs(env.iter().map(|(k, v)| (k, v)));
    c.stdin(Stdio::null()).stdout(log.try_clone().expect("dup")).stderr(log);
    kill_with_parent(&mut c);
    c.spawn().expect("start blockd")
}

/// SIGTERM and the exit status (0 expected), with the log in the panic otherwise.
fn stop(node: &Node, mut child: Child) {
    signal(child.id(), libc::SIGTERM);
    let status = wait_until(&mut child, Instant::now() + Duration::from_secs(30));
    if status.is_none() {
        signal(child.id(), libc::SIGKILL);
        let _ = child.wait();
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "blockd after SIGTERM: {status:?}\n{}",
        node.log_text()
    );
}

/// READY=1 comes only once both the NBD socket and the control socket accept; the watchdog
/// pings at half of WATCHDOG_USEC; SIGTERM sends STOPPING=1 before the exit.
#[test]
fn notify_ready_watchdog_and_stopping() {
    let node =
        Node::new("notify", &[("vol", "1MiB"), ("two", "1MiB")], "[daemon]\nmlock = false\n");
    let notify = Notify::bind(node.dir().path());
    let env = [
        ("NOTIFY_SOCKET", notify.path.display().to_string()),
        ("WATCHDOG_USEC", "400000".to_string()),
    ];
    let child = spawn_blockd(&node, &env);
    let before = notify.until("READY=1", Duration::from_secs(20));
    // Checked at once: READY must not come before the sockets are there.
    for sock in [node.control_socket(), node.socket("vol"), node.socket("two")] {
        assert!(UnixStream::connect(&sock).is_ok(), "READY=1 before {} accepts", sock.display());
    }
    let ready = before.last().expect("the READY datagram");
    assert!(ready.contains(&"STATUS=serving 2 volumes".to_string()), "{ready:?}");
    assert!(!before.iter().flatten().any(|l| l == "WATCHDOG=1" || l == "STOPPING=1"), "{before:?}");

    // 0.4 s watchdog: a ping every 0.2 s, so ~10 in 2 s (at least 6 on a busy machine).
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_secs(2) {
        if let Some(msg) = notify.recv(Duration::from_millis(500)) {
            assert_eq!(msg, ["WATCHDOG=1"], "only pings while serving");
            pings += 1;
        }
    }
    assert!((6..=12).contains(&pings), "{pings} watchdog pings in 2 s at a 0.4 s watchdog");

    signal(child.id(), libc::SIGTERM);
    let msgs = notify.until("STOPPING=1", Duration::from_secs(10));
    let stopping = msgs.last().expect("the STOPPING datagram");
    assert!(stopping.contains(&"STATUS=shutting down".to_string()), "{stopping:?}");
    stop(&node, child);
}

/// Without NOTIFY_SOCKET nothing is sent and nothing fails; a WATCHDOG_PID naming another
/// process (systemd watches a parent that forked us) means no pings.
#[test]
fn notify_is_silent_when_not_asked() {
    let node = Node::new("notify-off", &[("vol", "1MiB")], "[daemon]\nmlock = false\n");
    let notify = Notify::bind(node.dir().path());
    let env = [
        ("NOTIFY_SOCKET", notify.path.display().to_string()),
        ("WATCHDOG_USEC", "200000".to_string()),
        ("WATCHDOG_PID", "1".to_string()),
    ];
    let child = spawn_blockd(&node, &env);
    notify.until("READY=1", Duration::from_secs(20));
    let extra = notify.recv(Duration::from_secs(1));
    assert!(extra.is_none(), "pings for a watchdog that is not ours: {extra:?}");
    stop(&node, child);
    assert_eq!(notify.until("STOPPING=1", Duration::from_secs(1)).len(), 1, "only STOPPING");

    // No NOTIFY_SOCKET at all: the daemon serves and stops as always, the socket hears nothing.
    let child = spawn_blockd(&node, &[]);
    blockd_tests::cmd::wait_for("control socket", Duration::from_secs(20), || {
        UnixStream::connect(node.control_socket()).is_ok()
    });
    stop(&node, child);
    assert!(notify.recv(Duration::from_millis(300)).is_none(), "sent without NOTIFY_SOCKET");
}

fn verify_units(args: &[&str]) -> Output {
    blockd_tests::require("systemd-analyze");
    let mut c = Command::new(repo().join("scripts/verify-units"));
    c.args(args);
    try_run(&mut c, Duration::from_secs(120))
}

/// Every unit and drop-in of systemd/ passes `systemd-analyze verify` (with the built
/// binaries at the ExecStart= paths), and the check does fail on a broken unit.
#[test]
fn units_verify() {
    let _system = lock_system();
    let dir = bin_dir();
    let out = verify_units(&["--bin-dir", dir.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{out}");
    for unit in ["blockd.service", "blockctl-agent.service", "blockd-witness.service"] {
        assert!(out.stdout.contains(&format!("ok   {unit}\n")), "{unit} not checked:\n{out}");
    }
    for d in fs::read_dir(repo().join("systemd/dropins")).expect("dropins") {
        let name =
            d.expect("entry").file_name().to_string_lossy().trim_end_matches(".d").to_string();
        assert!(out.stdout.contains(&format!("ok   {name} + blockd.conf")), "{name}:\n{out}");
    }
    // The same check against a directory without the binaries must fail.
    let empty = tempfile::tempdir().expect("tempdir");
    let bad = verify_units(&["--bin-dir", empty.path().to_str().expect("utf-8")]);
    assert!(!bad.status.success(), "verify-units passed without binaries:\n{bad}");
}

/// Purges the package on drop, also when the test fails half-way.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        // run_quiet: a panic while unwinding would abort the whole test binary.
        let mut purge = Command::new("dpkg");
        purge.args(["-P", "blockd"]);
        match run_quiet(&mut purge, Duration::from_secs(120)) {
            Some(out) if !out.status.success() => {
                eprintln!("cleanup: dpkg -P blockd failed:\n{out}")
            }
            _ => {}
        }
    }
}

fn dpkg_installed(pkg: &str) -> bool {
    let out = try_run(
        Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]),
        Duration::from_secs(30),
    );
    out.stdout.contains("install ok installed")
}

/// scripts/build-deb builds the package from the built binaries; dpkg installs it into this
/// machine; the installed binaries run, the installed units verify, the example config is a
/// conffile; dpkg -P removes every file again.
#[test]
fn debian_package_builds_installs_and_runs() {
    let _system = lock_system();
    blockd_tests::require("dpkg-deb");
    assert!(!dpkg_installed("blockd"), "package blockd is already installed here; remove it first");
    let out_dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let mut build = Command::new(repo().join("scripts/build-deb"));
    build.arg("--bin-dir").arg(bin_dir()).arg("--out").arg(out_dir.path());
    let built = run_timeout(&mut build, Duration::from_secs(600));
    let deb = built.stdout.trim().to_string();
    assert!(deb.ends_with("_amd64.deb") || deb.ends_with(".deb"), "{built}");

    let _installed = Installed;
    run_timeout(Command::new("dpkg").args(["-i", &deb]), Duration::from_secs(300));
    assert!(dpkg_installed("blockd"));
    let version = format!(" {}\n", env!("CARGO_PKG_VERSION"));
    for b in ["blockd", "blockctl"] {
        let out = run_timeout(
            Command::new(format!("/usr/bin/{b}")).arg("--version"),
            Duration::from_secs(30),
        );
        assert_eq!(out.stdout, format!("{b}{version}"), "{out}");
    }
    let conffiles = run_timeout(
        Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "blockd"]),
        Duration::from_secs(30),
    );
    for f in ["/etc/blockd/blockd.toml.example", "/etc/blockd/witness.env"] {
        assert!(conffiles.stdout.contains(f), "{f} is not a conffile:\n{conffiles}");
        assert!(Path::new(f).is_file(), "{f} not installed");
    }
    let files = run_timeout(Command::new("dpkg").args(["-L", "blockd"]), Duration::from_secs(30));
    for f in [
        "/lib/systemd/system/blockd.service",
        "/lib/systemd/system/mariadb.service.d/blockd.conf",
        "/usr/share/doc/blockd/k3s.md",
    ] {
        assert!(files.stdout.lines().any(|l| l == f), "{f} not in the package:\n{files}");
    }
    let verified = verify_units(&["--installed"]);
    assert!(verified.status.success(), "installed units:\n{verified}");
    assert!(verified.stdout.contains("ok   blockd.service (installed)"), "{verified}");

    drop(_installed);
    assert!(!dpkg_installed("blockd"), "still installed after dpkg -P");
    assert!(!Path::new("/usr/bin/blockd").exists(), "/usr/bin/blockd left after purge");
    assert!(!Path::new("/etc/blockd/blockd.toml.example").exists(), "conffile left after purge");
}

/// `which`, done here independently of blockctl: PATH plus the sbin directories.
fn which(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    std::env::split_paths(&path).chain(extra).any(|d| {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(d.join(tool)).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

const UNIT_DIRS: [&str; 4] = [
    "/etc/systemd/system",
    "/run/systemd/system",
    "/lib/systemd/system",
    "/usr/lib/systemd/system",
];

fn unit_installed(unit: &str) -> bool {
    UNIT_DIRS.iter().any(|d| Path::new(d).join(unit).exists())
}

/// A drop-in of `unit` with ConditionPathIsMountPoint=, found with grep.
fn unit_guarded(unit: &str) -> bool {
    let dirs: Vec<String> = UNIT_DIRS.iter().map(|d| format!("{d}/{unit}.d")).collect();
    let mut c = Command::new("sh");
    c.args(["-c", "grep -ls '^ConditionPathIsMountPoint=' \"$@\" 2>/dev/null", "grep"]);
    c.args(dirs.iter().map(|d| format!("{d}/*.conf")));
    !try_run(&mut c, Duration::from_secs(10)).stdout.trim().is_empty()
}

/// Whether this machine lets blockd use io_uring: a real blockd with `engine = "io-uring"`
/// (no fallback) either comes up or exits.
fn io_uring_usable() -> bool {
    let node = Node::new(
        "init-uring",
        &[("vol", "1MiB")],
        "[daemon]\nmlock = false\n[storage]\nengine = \"io-uring\"\n",
    );
    let mut child = spawn_blockd(&node, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if UnixStream::connect(node.control_socket()).is_ok() {
            stop(&node, child);
            return true;
        }
        if child.try_wait().ok().flatten().is_some() || Instant::now() > deadline {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `blockctl init` output as (level, what) pairs, and the whole output.
fn init(config: &Path) -> (Vec<(String, String)>, Output) {
    let mut c = Command::new(bin("blockctl"));
    c.arg("--config").arg(config).args(["--node", "alpha", "init"]);
    let out = try_run(&mut c, Duration::from_secs(60));
    let lines = out
        .stdout
        .lines()
        .filter_map(|l| {
            let (level, rest) = l.split_once(' ')?;
            let what = rest.trim_start().split_once(": ")?.0;
            ["ok", "warn", "missing"]
                .contains(&level)
                .then(|| (level.to_string(), what.to_string()))
        })
        .collect();
    (lines, out)
}

fn pair(level: &str, what: &str) -> (String, String) {
    (level.to_string(), what.to_string())
}

fn level(ok: bool, otherwise: &str) -> &str {
    if ok {
        "ok"
    } else {
        otherwise
    }
}

/// blockctl init on this machine lists exactly what is present and missing: every expected
/// line is computed here from the machine itself (files, PATH, a real blockd on io_uring),
/// not written down. Then a wrong secret mode and a port held by another process are
/// reported missing, and a port held by blockd itself is fine.
#[test]
fn init_reports_this_machine() {
    let _system = lock_system();
    let dir = blockd_tests::TestDir::new("init");
    let (data, run) = (dir.subdir("data"), dir.subdir("run"));
    let secret = dir.path().join("secret");
    fs::write(&secret, "s3cret-s3cret").expect("secret");
    let chmod = |mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&secret, fs::Permissions::from_mode(mode)).expect("chmod");
    };
    chmod(0o600);
    let port =
        std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr");
    let config = dir.path().join("blockd.toml");
    let text = format!(
        "[cluster]\nsecret-file = \"{secret}\"\n\
         [node.alpha]\nreplication = \"{port}\"\ndata-dir = \"{data}\"\nrun-dir = \"{run}\"\n\
         [node.beta]\nreplication = \"127.0.0.2:7789\"\n\
         [daemon]\nmlock = false\n\
         [[volume]]\nname = \"db\"\nsize = \"8MiB\"\nfilesystem = \"ext4\"\nmount = \"/var/lib/mysql\"\n\
         [[volume]]\nname = \"nfs\"\nsize = \"8MiB\"\nfilesystem = \"xfs\"\nmount = \"/srv/nfs\"\n\
         [vip]\naddress = \"10.0.0.100/24\"\ninterface = \"eth0\"\n\
         [[service]]\nname = \"mariadb\"\nunit = \"mariadb.service\"\n\
         [[service]]\nname = \"nfs-server\"\nunit = \"nfs-server.service\"\n\
         [[service]]\nname = \"absent\"\nunit = \"blockd-test-absent.service\"\n\
         [[service]]\nname = \"ganesha\"\nstart = \"ganesha.nfsd -F\"\nstop = \"true\"\n\
         [[service]]\nname = \"bogus\"\nstart = \"blockd-test-no-such-program --x\"\nstop = \"true\"\n",
        secret = secret.display(),
        data = data.display(),
        run = run.display(),
    );
    fs::write(&config, text).expect("config");

    let nbd = Path::new("/sys/module/nbd").exists();
    let mut want = vec![pair(level(nbd, "warn"), "kernel nbd")];
    // With the module, attach = "auto" is blockd's own netlink attach: no tool to check.
    if !nbd {
        want.push(pair(level(Path::new("/dev/fuse").exists(), "missing"), "fuse"));
        for t in ["nbdfuse", "fusermount3", "losetup"] {
            want.push(pair(level(which(t), "missing"), t));
        }
    }
    for (t, absent) in [
        ("mount", "missing"),
        ("umount", "missing"),
        ("e2fsck", "missing"),
        ("xfs_repair", "warn"),
        ("systemctl", "missing"),
        ("ip", "warn"),
    ] {
        want.push(pair(level(which(t), absent), t));
    }
    want.push(pair("ok", "control socket"));
    want.push(pair("ok", &format!("replication {port}")));
    want.push(pair("ok", &format!("secret {}", secret.display())));
    want.push(pair("ok", &format!("data-dir {}", data.display()))); // 16 MiB fit anywhere
    for (name, unit) in [
        ("mariadb", "mariadb.service"),
        ("nfs-server", "nfs-server.service"),
        ("absent", "blockd-test-absent.service"),
    ] {
        let installed = unit_installed(unit);
        want.push(pair(level(installed, "missing"), &format!("service {name}")));
        if installed {
            want.push(pair(level(unit_guarded(unit), "warn"), &format!("service {name} at boot")));
        }
    }
    want.push(pair(level(which("ganesha.nfsd"), "missing"), "service ganesha"));
    want.push(pair("missing", "service bogus"));
    want.push(pair(level(io_uring_usable(), "warn"), "io_uring"));

    let (got, out) = init(&config);
    assert_eq!(got, want, "blockctl init on this machine:\n{out}");
    assert_eq!(
        out.code(),
        1,
        "something required is missing (the absent unit, the bogus program):\n{out}"
    );

    // A secret readable by others and the replication port taken by this test process.
    chmod(0o644);
    let held = std::net::TcpListener::bind(port).expect("hold the port");
    let (got, out) = init(&config);
    let secret_line = pair("missing", &format!("secret {}", secret.display()));
    let port_line = pair("missing", &format!("replication {port}"));
    assert!(got.contains(&secret_line) && got.contains(&port_line), "{out}");
    assert!(out.stdout.contains("mode 0644"), "{out}");
    assert!(
        out.stdout.contains(&format!("(pid {})", std::process::id())),
        "names the holder:\n{out}"
    );
    drop(held);

    // The same port held by blockd itself (running with this config) is as it should be.
    chmod(0o600);
    let mut c = Command::new(bin("blockd"));
    c.arg("--config").arg(&config).args(["--node", "alpha"]);
    let mut daemon = blockd_tests::Background::spawn(&mut c, &dir.path().join("blockd.log"));
    blockd_tests::cmd::wait_for("blockd's control socket", Duration::from_secs(20), || {
        UnixStream::connect(run.join("control.sock")).is_ok()
    });
    let (got, out) = init(&config);
    assert!(got.contains(&pair("ok", &format!("replication {port}"))), "{out}");
    assert!(out.stdout.contains("held by blockd"), "{out}");
    assert!(out.stdout.contains("blockd is running"), "{out}");
    signal(daemon.pid(), libc::SIGTERM);
    assert!(
        daemon.wait(Duration::from_secs(30)).is_some_and(|s| s.success()),
        "{}",
        daemon.log_text()
    );
}
