//! `service <name>`: one `[[service]]`, started after the mounts and the VIP, stopped before
//! them. Either a systemd unit (`systemctl start`/`stop`, systemd escalates on stop itself),
//! or `start`/`stop` shell commands where there is no systemd: `start` runs detached in a
//! session of its own so `blockctl` may exit while the service runs.
//!
//! Healthy = the `check` passes (`tcp://HOST:PORT` connects, or `exec:CMD` exits 0); without
//! a check, the unit is active or the pidfile's process runs. Start waits for health until
//! the service's `timeout` (unless `wait = false`); stop waits until the check fails and the
//! pidfile's process is gone, then escalates to SIGTERM and SIGKILL of that pid: a hung
//! database must not keep the volume's mount busy.

use std::{
    fs,
    net::{TcpStream, ToSocketAddrs},
    path::PathBuf,
    process::Child,
    thread,
    time::{Duration, Instant},
};

use blockd::config::{HealthCheck, ServiceConfig};

use super::{cmd::log_tail, cmd::Cmd, mkdir, proc::Proc, run_dir};
use crate::step::{Ctx, Step, StepError};

/// Pause between two health checks while waiting for a service to come up or go down: a
/// failover waits for the service's first success, so a coarse poll adds to every one of
/// them (a TCP connect to the local port, or the check command, is cheap next to it).
const POLL: Duration = Duration::from_millis(50);

/// One probe may take this long (a TCP connect to a dead address, a slow check command).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs one health check once, quietly (it is polled).
pub fn healthy(check: &HealthCheck) -> bool {
    match check {
        HealthCheck::Tcp { host, port } => (host.as_str(), *port)
            .to_socket_addrs()
            .map(|addrs| {
                addrs.into_iter().any(|a| TcpStream::connect_timeout(&a, PROBE_TIMEOUT).is_ok())
            })
            .unwrap_or(false),
        HealthCheck::Exec(cmd) => {
            Cmd::shell(cmd).deadline(PROBE_TIMEOUT).output_quiet().is_ok_and(|o| o.status.success())
        }
    }
}

/// The check as written in the configuration, for messages.
fn show(check: &HealthCheck) -> String {
    match check {
        HealthCheck::Tcp { host, port } => format!("tcp://{host}:{port}"),
        HealthCheck::Exec(cmd) => format!("exec:{cmd}"),
    }
}

/// `service <name>`: `[[service]]` entry `index`.
#[derive(Debug)]
pub struct Service {
    index: usize,
    /// For `name()`, which has no configuration to look the name up in.
    label: String,
}

impl Service {
    /// Named "service INDEX" until [`Service::named`] gives it the configured name.
    pub fn new(index: usize) -> Service {
        Service { index, label: index.to_string() }
    }

    /// Names the step after the service ("service mariadb"), for `--until` and the log.
    pub fn named(mut self, name: &str) -> Service {
        self.label = name.to_string();
        self
    }

    fn spec<'a>(&self, ctx: &'a Ctx) -> Result<&'a ServiceConfig, StepError> {
        ctx.config.service.get(self.index).ok_or_else(|| {
            StepError::Other(format!("no service[{}] in the configuration", self.index))
        })
    }

    fn log(&self, ctx: &Ctx, s: &ServiceConfig) -> PathBuf {
        run_dir(ctx).join("services").join(format!("{}.log", s.name))
    }

    /// The pidfile's process, if the file names a running one.
    fn main_process(s: &ServiceConfig) -> Option<Proc> {
        let text = fs::read_to_string(s.pidfile.as_ref()?).ok()?;
        let p = Proc::of(text.trim().parse().ok()?);
        p.alive().then_some(p)
    }

    /// Healthy now: the check passes; without one, the unit is active or the pidfile runs.
    fn is_up(&self, ctx: &Ctx, s: &ServiceConfig) -> bool {
        if let Some(check) = &s.check {
            return healthy(check);
        }
        if let Some(unit) = &s.unit {
            return Cmd::new("systemctl")
                .args(["is-active", "--quiet", unit])
                .output_quiet()
                .is_ok_and(|o| o.status.success());
        }
        let _ = ctx;
        Self::main_process(s).is_some()
    }

    /// Still running: healthy, or its pidfile's process alive.
    fn is_running(&self, ctx: &Ctx, s: &ServiceConfig) -> bool {
        self.is_up(ctx, s) || Self::main_process(s).is_some()
    }

    /// Polls until healthy or the deadline; a detached `start` that exits non-zero first
    /// fails at once, with its log.
    fn wait_up(
        &self,
        ctx: &Ctx,
        s: &ServiceConfig,
        mut child: Option<Child>,
    ) -> Result<(), StepError> {
        let after = s.deadline(&ctx.config.failover);
        let end = Instant::now() + after;
        if let Some(check) = &s.check {
            ctx.say(format_args!("waiting for {} to pass (up to {after:?})", show(check)));
        }
        loop {
            if self.is_up(ctx, s) {
                return Ok(());
            }
            if let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                if !status.success() {
                    let log = log_tail(&self.log(ctx, s), 2000);
                    let detail = format!("start command failed ({status}): {log}");
                    return Err(StepError::Command { what: format!("service {}", s.name), detail });
                }
                child = None;
            }
            if Instant::now() >= end {
                return Err(StepError::Timeout {
                    what: format!("service {} health check", s.name),
                    after,
                });
            }
            thread::sleep(POLL);
        }
    }

    /// After the stop: waits until the service is down, then escalates on the pidfile pid.
    fn wait_down(&self, ctx: &Ctx, s: &ServiceConfig) -> Result<(), StepError> {
        let end = Instant::now() + s.deadline(&ctx.config.failover);
        while self.is_running(ctx, s) && Instant::now() < end {
            thread::sleep(POLL);
        }
        if let Some(p) = Self::main_process(s) {
            ctx.say(format_args!(
                "service {} still runs: SIGTERM, then SIGKILL, pid {}",
                s.name, p.pid
            ));
            if !p.terminate(Duration::from_secs(10)) {
                return Err(StepError::Other(format!(
                    "service {}: pid {} survives SIGKILL",
                    s.name, p.pid
                )));
            }
        }
        if s.check.as_ref().is_some_and(healthy) {
            let what = format!("service {}", s.name);
            return Err(StepError::Other(format!(
                "{what}: still answers its health check after the stop"
            )));
        }
        Ok(())
    }
}

impl Step for Service {
    fn name(&self) -> String {
        format!("service {}", self.label)
    }

    fn describe(&self, ctx: &Ctx) -> String {
        let Ok(s) = self.spec(ctx) else { return format!("no service[{}]", self.index) };
        let start = match (&s.unit, &s.start) {
            (Some(u), _) => format!("systemctl start {u}"),
            (None, Some(c)) => format!("sh -c {c:?} (detached)"),
            (None, None) => "nothing to start".into(),
        };
        match (&s.check, s.wait) {
            (Some(c), true) => format!(
                "{start}; wait for {} (up to {:?})",
                show(c),
                s.deadline(&ctx.config.failover)
            ),
            _ => start,
        }
    }

    /// Healthy now; for a service not waited on (`wait = false`), running is enough: it
    /// may take minutes to become healthy, and starting it again would start a second copy.
    fn check(&self, ctx: &Ctx) -> Result<bool, StepError> {
        let s = self.spec(ctx)?;
        Ok(self.is_up(ctx, s) || (!s.wait && Self::main_process(s).is_some()))
    }

    fn apply(&self, ctx: &Ctx) -> Result<(), StepError> {
        let s = self.spec(ctx)?;
        let deadline = s.deadline(&ctx.config.failover);
        let child = match (&s.unit, &s.start) {
            (Some(unit), _) => {
                Cmd::new("systemctl").args(["start", unit]).deadline(deadline).run(ctx)?;
                None
            }
            (None, Some(start)) => {
                mkdir(&run_dir(ctx).join("services"))?;
                Some(Cmd::shell(start).spawn_detached(ctx, &self.log(ctx, s))?)
            }
            (None, None) => {
                return Err(StepError::Other(format!(
                    "service {}: no unit and no start command",
                    s.name
                )))
            }
        };
        if !s.wait {
            ctx.say(format_args!("service {} started, not waited on (wait = false)", s.name));
            return Ok(());
        }
        let result = self.wait_up(ctx, s, child);
        if result.is_err() {
            // The plan does not undo a step whose apply failed: stop what was started.
            let _ = self.undo(ctx);
        }
        result
    }

    fn undo(&self, ctx: &Ctx) -> Result<(), StepError> {
        let s = self.spec(ctx)?;
        let deadline = s.deadline(&ctx.config.failover);
        if let Some(unit) = &s.unit {
            // systemd stops the unit's processes itself, escalating to SIGKILL after its own
            // TimeoutStopSec; an inactive unit stops without error.
            Cmd::new("systemctl")
                .args(["stop", unit])
                .deadline(deadline + Duration::from_secs(10))
                .run(ctx)?;
        } else if !self.is_running(ctx, s) {
            return Ok(());
        } else if let Some(stop) = &s.stop {
            mkdir(&run_dir(ctx).join("services"))?;
            let out = Cmd::shell(stop).deadline(deadline).output(ctx)?;
            if !out.status.success() {
                ctx.say(format_args!("stop command failed ({}): escalating", out.message()));
            }
        }
        self.wait_down(ctx, s)
    }

    fn timeout(&self) -> Duration {
        // The service's own deadline is in the configuration, which `timeout` cannot see:
        // the plan bounds the step by the larger of this and `ServiceConfig::deadline`.
        Duration::from_secs(120)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::testutil::{ctx_for, require_root, NetNs};

    /// A context with one service (`extra` = its keys after `name`), a private run
    /// directory, and the calling thread in a fresh network namespace (its own loopback, so
    /// ports are free and nothing else answers).
    fn setup(tag: &str, extra: &str) -> (Ctx, NetNs, tempfile::TempDir) {
        require_root();
        let ns = NetNs::new(tag);
        ns.enter();
        let run = tempfile::tempdir().unwrap();
        let text = format!(
            "[node.a]\nrun-dir = \"{}\"\n[[service]]\nname = \"svc\"\n{extra}\n",
            run.path().display()
        )
        .replace("PIDFILE", &run.path().join("svc.pid").display().to_string());
        (ctx_for(&text), ns, run)
    }

    fn pid_of(run: &tempfile::TempDir) -> Proc {
        Proc::of(fs::read_to_string(run.path().join("svc.pid")).unwrap().trim().parse().unwrap())
    }

    #[test]
    fn start_command_waits_for_tcp_and_stop_ends_it() {
        let (ctx, _ns, run) = setup(
            "svct",
            "start = \"python3 -m http.server 8000 --bind 127.0.0.1 & echo $! > PIDFILE\"\n\
             stop = \"kill $(cat PIDFILE)\"\ncheck = \"tcp://127.0.0.1:8000\"\n\
             pidfile = \"PIDFILE\"\ntimeout = \"20s\"",
        );
        let svc = Service::new(0).named("svc");
        assert_eq!(svc.name(), "service svc");
        assert!(!svc.check(&ctx).unwrap());
        svc.apply(&ctx).unwrap();
        assert!(svc.check(&ctx).unwrap(), "healthy once apply returns");
        let server = pid_of(&run);
        assert!(server.alive());
        svc.undo(&ctx).unwrap();
        assert!(!svc.check(&ctx).unwrap() && !server.alive());
        svc.undo(&ctx).unwrap(); // stopped already: fine
    }

    #[test]
    fn stop_escalates_to_kill_of_the_pidfile_pid() {
        // The service ignores SIGTERM and its stop command does nothing. (The check skips
        // zombies: PID 1 of a test sandbox may not reap the orphan once it is killed.)
        let (ctx, _ns, run) = setup(
            "svck",
            "start = \"sh -c 'trap \\\"\\\" TERM; while :; do sleep 0.2; done' & echo $! > PIDFILE\"\n\
             stop = \"true\"\ncheck = \"exec:! grep -qs Z /proc/$(cat PIDFILE)/stat && test -e /proc/$(cat PIDFILE)\"\n\
             pidfile = \"PIDFILE\"\ntimeout = \"1s\"",
        );
        let svc = Service::new(0);
        svc.apply(&ctx).unwrap();
        let p = pid_of(&run);
        assert!(svc.check(&ctx).unwrap() && p.alive());
        let started = Instant::now();
        svc.undo(&ctx).unwrap();
        assert!(!p.alive() && !svc.check(&ctx).unwrap());
        // 1 s of waiting for the stop, 10 s of SIGTERM grace, then SIGKILL.
        assert!(started.elapsed() >= Duration::from_secs(10), "{:?}", started.elapsed());
    }

    #[test]
    fn failed_start_fails_fast_with_its_output() {
        let (ctx, _ns, _run) =
            setup("svcf", "start = \"echo no datadir >&2; exit 3\"\nstop = \"true\"\ncheck = \"tcp://127.0.0.1:8001\"\ntimeout = \"30s\"");
        let started = Instant::now();
        let err = Service::new(0).apply(&ctx).unwrap_err().to_string();
        assert!(err.contains("start command failed") && err.contains("no datadir"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }

    #[test]
    fn unhealthy_start_times_out_and_is_stopped() {
        let (ctx, _ns, run) = setup(
            "svcu",
            "start = \"sleep 1000 & echo $! > PIDFILE\"\nstop = \"true\"\ncheck = \"tcp://127.0.0.1:8002\"\n\
             pidfile = \"PIDFILE\"\ntimeout = \"1s\"",
        );
        let err = Service::new(0).apply(&ctx).unwrap_err();
        assert!(matches!(err, StepError::Timeout { .. }), "{err}");
        assert!(!pid_of(&run).alive(), "the failed start is stopped again");
    }

    #[test]
    fn wait_false_does_not_wait() {
        let (ctx, _ns, run) = setup(
            "svcw",
            "start = \"sleep 1000 & echo $! > PIDFILE\"\nstop = \"kill $(cat PIDFILE)\"\n\
             check = \"tcp://127.0.0.1:8003\"\npidfile = \"PIDFILE\"\nwait = false\ntimeout = \"5s\"",
        );
        let svc = Service::new(0);
        let started = Instant::now();
        svc.apply(&ctx).unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        thread::sleep(Duration::from_millis(200));
        let p = pid_of(&run);
        assert!(p.alive());
        assert!(svc.check(&ctx).unwrap(), "running counts as done when not waited on");
        svc.undo(&ctx).unwrap();
        assert!(!p.alive() && !svc.check(&ctx).unwrap());
    }
}
