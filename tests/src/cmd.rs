//! Binaries, required tools and running commands with a timeout.
//!
//! Every helper panics with the full command line, exit status, stdout and stderr, because a
//! failing integration test is only useful if its message says what the tool saw.

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

/// Default time a helper command may take. Generous: the machine has 2 cores shared by tests
/// that run in parallel, and a hung command must still end the test rather than the suite.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Path of a binary built by this workspace (`blockd`, `blockctl`).
///
/// Integration tests run as `target/<profile>/deps/<test>-<hash>`, so the binaries sit two
/// levels up. They are not built for us (they belong to other packages): the test command
/// (`scripts/test`) runs `cargo build --workspace --bins` first.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("test binary lives in target/*/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` \
         (scripts/test does this)",
        path.display()
    );
    path
}

/// Panics unless `tool` is on PATH. Tests needing a tool fail loudly without it (design.md §10);
/// `.ci/install-deps` installs every one of them.
pub fn require(tool: &str) {
    require_root();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|d| d.join(tool).is_file());
    assert!(found, "required tool `{tool}` is not on PATH: run .ci/install-deps (as root)");
}

/// Panics unless running as root: loop devices, mounts and FUSE need it.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "these tests need root (loop devices, mounts, FUSE); run as root");
}

/// What a finished command produced.
#[derive(Debug)]
pub struct Output {
    pub cmdline: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The exit code; panics (with the output) if the command died from a signal.
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or_else(|| panic!("killed by a signal:\n{self}"))
    }

    /// Panics with everything the command printed unless it exited 0.
    pub fn assert_success(&self) -> &Self {
        assert!(self.status.success(), "command failed:\n{self}");
        self
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "$ {}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline, self.status, self.stdout, self.stderr
        )
    }
}

/// Builds a `Command` from a program and its arguments.
pub fn cmd<S: AsRef<std::ffi::OsStr>>(program: &str, args: &[S]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// Runs `c` with [`DEFAULT_TIMEOUT`] and panics unless it exits 0.
pub fn run(c: &mut Command) -> Output {
    run_timeout(c, DEFAULT_TIMEOUT)
}

/// Runs `c` with `timeout` and panics unless it exits 0.
pub fn run_timeout(c: &mut Command, timeout: Duration) -> Output {
    let out = try_run(c, timeout);
    out.assert_success();
    out
}

/// Runs `c` with `timeout`; returns whatever exit status it had. Panics only on a timeout
/// (after killing the command) or if it cannot be started.
pub fn try_run(c: &mut Command, timeout: Duration) -> Output {
    execute(c, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// For teardown in `Drop`, which must never panic (a panic while unwinding aborts): like
/// [`try_run`], but a command that cannot start or times out is reported on stderr and
/// yields `None`.
pub fn run_quiet(c: &mut Command, timeout: Duration) -> Option<Output> {
    execute(c, timeout).map_err(|e| eprintln!("cleanup: {e}")).ok()
}

/// `timeout` as it applies here: inside the VM tier's guest (tests/vm/run sets IN_BLOCKD_VM)
/// five times longer, since under qemu TCG every program runs several times slower and the
/// first start of a debug binary reads ~100 MB through 9p. Behaviour checks stay the same.
pub fn vm_scaled(timeout: Duration) -> Duration {
    match std::env::var_os("IN_BLOCKD_VM") {
        Some(_) => timeout * 5,
        None => timeout,
    }
}

fn execute(c: &mut Command, timeout: Duration) -> Result<Output, String> {
    let timeout = vm_scaled(timeout);
    let cmdline = format!("{c:?}");
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().map_err(|e| format!("cannot start {cmdline}: {e}"))?;
    let stdout = collect(child.stdout.take());
    let stderr = collect(child.stderr.take());
    match wait_until(&mut child, Instant::now() + timeout) {
        Some(status) => {
            let (stdout, stderr) = (stdout.finish(), stderr.finish());
            Ok(Output { cmdline, status, stdout, stderr })
        }
        None => {
            let _ = child.kill();
            // A process in uninterruptible sleep (I/O to a dead device) may outlive SIGKILL;
            // give up on it rather than hang the test.
            let _ = wait_until(&mut child, Instant::now() + Duration::from_secs(5));
            Err(format!(
                "timed out after {timeout:?}: {cmdline}\n--- stdout so far ---\n{}\n\
                 --- stderr so far ---\n{}",
                stdout.snapshot(),
                stderr.snapshot()
            ))
        }
    }
}

/// Polls `child` until it exits or `deadline` passes (then `None`, child left running).
pub fn wait_until(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() >= deadline => return None,
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            // Only EINTR-like transient errors are possible for our own child; keep polling.
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Err(_) => return None,
        }
    }
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let timeout = vm_scaled(timeout);
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A pipe drained by a thread into a shared buffer, so that a timed-out command's partial
/// output can still be shown while a grandchild may hold the pipe open.
struct Collector {
    buf: Arc<Mutex<Vec<u8>>>,
    thread: Option<thread::JoinHandle<()>>,
}

fn collect<R: Read + Send + 'static>(pipe: Option<R>) -> Collector {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let thread = pipe.map(|mut pipe| {
        let buf = Arc::clone(&buf);
        thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                buf.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(&chunk[..n]);
            }
        })
    });
    Collector { buf, thread }
}

impl Collector {
    fn snapshot(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    fn finish(mut self) -> String {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.snapshot()
    }
}

/// Sends `sig` to `pid`. Processes are only ever signalled by the pid the harness started.
/// `(VmRSS, RssAnon)` of process `pid` in KiB, from /proc: all resident memory, and the part
/// that is the process's own (heap, stacks) rather than pages of the binary.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    (status_kib(pid, "VmRSS:"), status_kib(pid, "RssAnon:"))
}

/// One `... kB` field of /proc/PID/status (`"VmHWM:"`: the peak of VmRSS).
pub fn status_kib(pid: u32, name: &str) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let line = status.lines().find(|l| l.starts_with(name)).expect("status field");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number")
}

pub fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) takes plain integers; signalling a pid we spawned (or one that already
    // exited and is still our unreaped child, so the pid cannot be reused) has no memory effects.
    let rc = unsafe { libc::kill(pid, sig) };
    assert!(
        rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH),
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// Makes a child started by `c` get SIGKILL if the thread that spawned it exits, so a test
/// process killed from outside leaves no daemon or FUSE server behind.
pub fn kill_with_parent(c: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and calls only prctl(2), which is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        c.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A long-running helper process (e.g. a fio writer) with its output in a log file, killed by
/// pid on drop if it is still running.
pub struct Background {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Background {
    pub fn spawn(c: &mut Command, log: &Path) -> Background {
        let f = std::fs::File::create(log).expect("create log");
        c.stdin(Stdio::null()).stdout(f.try_clone().expect("dup log")).stderr(f);
        kill_with_parent(c);
        let child = c.spawn().unwrap_or_else(|e| panic!("cannot start {c:?}: {e}"));
        Background { child: Some(child), log: log.to_path_buf() }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits up to `timeout` for the exit status; kills the process if it does not come.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let status = wait_until(&mut child, Instant::now() + vm_scaled(timeout));
        if status.is_none() {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
        }
        status
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process has exited (or was waited for already).
    pub fn has_exited(&mut self) -> bool {
        !self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
        }
    }
}
