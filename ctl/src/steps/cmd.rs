//! Running the external commands of the steps: each printed before it runs, bounded by a
//! deadline (the whole process group is killed when it passes), its output captured so an
//! error can say what the command answered.
//!
//! Two ways to run: [`Cmd::output`] waits for the command and captures stdout/stderr;
//! [`Cmd::spawn_detached`] starts a long-lived process in its own session (`setsid`) with its
//! output in a log file, so `blockctl` may exit while it keeps running (nbdfuse, a service's
//! `start` command).

use std::{
    fmt,
    fs::{File, OpenOptions},
    io::Read,
    os::unix::process::{CommandExt, ExitStatusExt},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{mpsc, Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{killpg, Signal},
    unistd::Pid,
};

use crate::step::{Ctx, StepError};

/// How often a running command is polled for its exit.
const POLL: Duration = Duration::from_millis(20);

/// After the command exits, how long its output pipes may stay open (a background child of a
/// shell holds them) before the output read so far is taken as all of it.
const PIPE_GRACE: Duration = Duration::from_millis(500);

/// Deadline of a command that has none of its own and runs without a configuration.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);

/// One external command: program, arguments, deadline.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: String,
    args: Vec<String>,
    /// Its own; `None` is `[failover] step-timeout` (60 s where no configuration is at hand).
    deadline: Option<Duration>,
}

/// What a finished command printed, and how it ended.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The exit code, or `None` when a signal ended the command.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// stderr, else stdout, trimmed: what to show when the command failed.
    pub fn message(&self) -> String {
        let text = if self.stderr.trim().is_empty() { &self.stdout } else { &self.stderr };
        let how = match (self.status.code(), self.status.signal()) {
            (Some(c), _) => format!("exit {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            _ => "ended".to_string(),
        };
        match text.trim() {
            "" => how,
            t => format!("{how}: {t}"),
        }
    }
}

impl Cmd {
    /// `program` with no arguments, bounded by `[failover] step-timeout`.
    pub fn new(program: impl Into<String>) -> Cmd {
        Cmd { program: program.into(), args: Vec::new(), deadline: None }
    }

    /// `sh -c COMMAND`: the configured commands of services and health checks.
    pub fn shell(command: &str) -> Cmd {
        Cmd::new("sh").arg("-c").arg(command)
    }

    pub fn arg(mut self, a: impl AsRef<std::ffi::OsStr>) -> Cmd {
        self.args.push(a.as_ref().to_string_lossy().into_owned());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(mut self, a: I) -> Cmd {
        for s in a {
            self = self.arg(s);
        }
        self
    }

    /// Longest the command may run before it is killed (its whole process group).
    pub fn deadline(mut self, d: Duration) -> Cmd {
        self.deadline = Some(d);
        self
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args);
        c
    }

    /// Runs and requires exit 0; the error names the command and quotes its output.
    pub fn run(&self, ctx: &Ctx) -> Result<Output, StepError> {
        let out = self.output(ctx)?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(StepError::Command { what: self.to_string(), detail: out.message() })
        }
    }

    /// Prints the command, runs it, and returns its output whatever the exit code.
    pub fn output(&self, ctx: &Ctx) -> Result<Output, StepError> {
        ctx.say(format_args!("run: {self}"));
        self.output_within(self.deadline.unwrap_or(ctx.config.failover.step_timeout))
    }

    /// [`Cmd::output`] without printing: for polls (health checks) that were announced once.
    pub fn output_quiet(&self) -> Result<Output, StepError> {
        self.output_within(self.deadline.unwrap_or(DEFAULT_DEADLINE))
    }

    fn output_within(&self, deadline: Duration) -> Result<Output, StepError> {
        let mut c = self.command();
        // Own process group, so a timeout kills the shell and whatever it started.
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        let mut child = c.spawn().map_err(|e| self.not_started(e))?;
        let (tx, rx) = mpsc::channel();
        let stdout = Collector::start(child.stdout.take(), &tx);
        let stderr = Collector::start(child.stderr.take(), &tx);
        drop(tx);
        let status = self.wait(&mut child, deadline)?;
        // Both readers done (their pipes closed), or the grace is over: a background child
        // of the command still holds them, and what was read so far is the output.
        let grace = Instant::now() + PIPE_GRACE;
        while rx.recv_timeout(grace.saturating_duration_since(Instant::now())).is_ok() {}
        let (stdout, stderr) = (stdout.text(), stderr.text());
        Ok(Output { status, stdout, stderr })
    }

    /// Waits for the child until the deadline, then kills its process group.
    fn wait(&self, child: &mut Child, deadline: Duration) -> Result<ExitStatus, StepError> {
        let end = Instant::now() + deadline;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() >= end => {
                    kill_group(child.id());
                    let _ = child.wait();
                    return Err(StepError::Timeout { what: self.to_string(), after: deadline });
                }
                Ok(None) => thread::sleep(POLL),
                Err(e) => return Err(self.not_started(e)),
            }
        }
    }

    /// Starts the command in a session of its own (`setsid`: no controlling terminal, so
    /// the operator's logout or `blockctl`'s exit does not take it down), stdin from
    /// /dev/null, stdout and stderr appended to `log`. Returns the child, whose pid is the
    /// command's own: `setsid` execs it in place (it forks only when already a group leader,
    /// which a freshly spawned child is not).
    pub fn spawn_detached(&self, ctx: &Ctx, log: &Path) -> Result<Child, StepError> {
        ctx.say(format_args!("run: {self} (detached, output in {})", log.display()));
        let open = || OpenOptions::new().create(true).append(true).open(log);
        let (out, err) = match (open(), open()) {
            (Ok(o), Ok(e)) => (o, e),
            (Err(e), _) | (_, Err(e)) => {
                return Err(StepError::Other(format!("cannot open {}: {e}", log.display())))
            }
        };
        let mut c = Command::new("setsid");
        c.arg(&self.program).args(&self.args);
        c.stdin(Stdio::null()).stdout(out).stderr(err);
        c.spawn().map_err(|e| self.not_started(e))
    }

    fn not_started(&self, e: std::io::Error) -> StepError {
        StepError::Command { what: self.to_string(), detail: format!("cannot run: {e}") }
    }
}

/// The last `max` bytes of a log file, for error messages about detached processes.
pub fn log_tail(log: &Path, max: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(log) {
        let _ = f.read_to_string(&mut text);
    }
    let start = text.len().saturating_sub(max);
    let start = (start..text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len());
    text[start..].trim().to_string()
}

fn kill_group(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// The output read so far from one of a child's pipes, by a thread of its own that signals
/// on a channel when the pipe closes.
#[derive(Default)]
struct Collector(Arc<Mutex<Vec<u8>>>);

impl Collector {
    fn start<R: Read + Send + 'static>(pipe: Option<R>, done: &mpsc::Sender<()>) -> Collector {
        let buf = Arc::new(Mutex::new(Vec::new()));
        if let Some(mut pipe) = pipe {
            let (shared, done) = (Arc::clone(&buf), done.clone());
            thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                    shared.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&chunk[..n]);
                }
                let _ = done.send(());
            });
        }
        Collector(buf)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

impl fmt::Display for Cmd {
    /// The command as an operator would type it: arguments with spaces or quotes are quoted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.program)?;
        for a in &self.args {
            let plain = !a.is_empty()
                && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c));
            if plain {
                write!(f, " {a}")?;
            } else {
                write!(f, " '{}'", a.replace('\'', r"'\''"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::testutil::ctx_for;

    #[test]
    fn output_is_captured_and_failure_quoted() {
        let ctx = ctx_for("[node.a]\n");
        let out = Cmd::shell("echo out; echo err >&2; exit 3").output(&ctx).unwrap();
        assert_eq!(
            (out.code(), out.stdout.as_str(), out.stderr.as_str()),
            (Some(3), "out\n", "err\n")
        );
        let err = Cmd::shell("echo nope >&2; exit 1").run(&ctx).unwrap_err().to_string();
        assert!(err.contains("exit 1: nope") && err.starts_with("sh -c"), "{err}");
        assert!(Cmd::new("/nonexistent/prog").run(&ctx).is_err());
    }

    #[test]
    fn deadline_kills_the_group() {
        let ctx = ctx_for("[node.a]\n");
        let started = Instant::now();
        // The background sleep holds the pipes: without the group kill and the grace this
        // would wait 30 s.
        let err = Cmd::shell("sleep 30 & sleep 30")
            .deadline(Duration::from_millis(300))
            .output(&ctx)
            .unwrap_err();
        assert!(matches!(err, StepError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }

    /// The deadline of a command without its own is the configured step-timeout, so an
    /// operator whose mount replays a long log can raise it (a fixed 60 s failed a mount of
    /// xfs under qemu TCG that needed 61-82 s).
    #[test]
    fn step_timeout_bounds_a_command_without_its_own_deadline() {
        let ctx = ctx_for("[node.a]\n\n[failover]\nstep-timeout = \"1s\"\n");
        let started = Instant::now();
        let err = Cmd::new("sleep").arg("30").output(&ctx).unwrap_err();
        assert!(matches!(err, StepError::Timeout { after, .. } if after == Duration::from_secs(1)));
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        let long = ctx_for("[node.a]\n\n[failover]\nstep-timeout = \"90s\"\n");
        let out = Cmd::shell("sleep 1; echo done").run(&long).unwrap();
        assert_eq!(out.stdout, "done\n");
    }

    #[test]
    fn background_child_does_not_block_output() {
        let ctx = ctx_for("[node.a]\n");
        let started = Instant::now();
        let out = Cmd::shell("sleep 5 & echo $!").run(&ctx).unwrap();
        let pid: u32 = out.stdout.trim().parse().unwrap();
        crate::steps::proc::Proc::of(pid).terminate(Duration::from_secs(1));
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    }

    #[test]
    fn display_quotes_what_needs_it() {
        let c = Cmd::new("mount").args(["-o", "noatime,x", "/dev/loop0", "/a b", "it's"]);
        assert_eq!(c.to_string(), r"mount -o noatime,x /dev/loop0 '/a b' 'it'\''s'");
    }
}
