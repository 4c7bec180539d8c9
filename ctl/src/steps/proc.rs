//! Processes the steps start and stop by pid: whether one is still alive, and the SIGTERM →
//! SIGKILL escalation. A pid is only ever signalled together with the start time recorded
//! when it was started (`/proc/PID/stat` field 22), so a pid reused by an unrelated process
//! after a reboot or a long uptime is never killed.

use std::{
    fs, thread,
    time::{Duration, Instant},
};

use nix::{
    sys::{
        signal::{kill, Signal},
        wait::{waitpid, WaitPidFlag},
    },
    unistd::Pid,
};
use serde::{Deserialize, Serialize};

/// A process as recorded at start: pid and start time (clock ticks since boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proc {
    pub pid: u32,
    pub start_time: Option<u64>,
}

impl Proc {
    /// The process `pid` as it is now (its start time read from /proc).
    pub fn of(pid: u32) -> Proc {
        Proc { pid, start_time: start_time(pid) }
    }

    /// True while the recorded process runs: same pid, same start time, not a zombie.
    pub fn alive(&self) -> bool {
        reap(self.pid);
        match stat(self.pid) {
            Some((state, start)) => {
                state != 'Z' && !matches!(self.start_time, Some(t) if t != start)
            }
            None => false,
        }
    }

    /// Sends `sig` if the recorded process is still the one running.
    pub fn signal(&self, sig: Signal) {
        if self.alive() {
            if let Ok(pid) = i32::try_from(self.pid) {
                let _ = kill(Pid::from_raw(pid), sig);
            }
        }
    }

    /// Waits until the process is gone, at most `within`. True when it is.
    pub fn wait_gone(&self, within: Duration) -> bool {
        let end = Instant::now() + within;
        while self.alive() {
            if Instant::now() >= end {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// SIGTERM, `grace` to exit, then SIGKILL and up to 5 s more. True when it is gone.
    pub fn terminate(&self, grace: Duration) -> bool {
        self.signal(Signal::SIGTERM);
        if self.wait_gone(grace) {
            return true;
        }
        self.signal(Signal::SIGKILL);
        self.wait_gone(Duration::from_secs(5))
    }
}

/// Collects the exit status if `pid` is our own child (else ECHILD, ignored), so a process
/// this `blockctl` started and killed does not linger as a zombie that looks alive.
fn reap(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
    }
}

/// Start time of `pid`, clock ticks since boot.
pub fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|(_, t)| t)
}

/// State letter and start time from `/proc/PID/stat`. The command name (field 2) may hold
/// spaces and parentheses, so the fields are counted from the last ')'.
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `rest` starts at field 3 (state); the start time is field 22.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// The command name of `pid` (`/proc/PID/comm`), for messages.
pub fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    #[test]
    fn terminate_escalates_to_kill() {
        // A shell that ignores SIGTERM: only SIGKILL ends it.
        let mut child = Command::new("sh")
            .args(["-c", "trap '' TERM; while :; do sleep 0.1; done"])
            .spawn()
            .unwrap();
        let p = Proc::of(child.id());
        assert!(p.alive() && p.start_time.is_some());
        thread::sleep(Duration::from_millis(100)); // let the trap be installed
        let started = Instant::now();
        assert!(p.terminate(Duration::from_millis(300)));
        assert!(!p.alive());
        assert!(started.elapsed() >= Duration::from_millis(300), "SIGTERM must not have worked");
        let _ = child.wait(); // reaped by alive() already: ECHILD
    }

    #[test]
    fn a_reused_pid_is_not_ours() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let mut p = Proc::of(child.id());
        p.start_time = p.start_time.map(|t| t + 1);
        assert!(!p.alive(), "another start time is another process");
        p.signal(Signal::SIGKILL);
        assert!(child.try_wait().unwrap().is_none(), "must not have been signalled");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
