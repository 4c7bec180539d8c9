//! systemd readiness and watchdog (`Type=notify`, `WatchdogSec=`), over the `sd_notify`
//! datagram protocol.
//!
//! ```text
//!  start ──► every <volume>.sock bound, control.sock up ──► READY=1, STATUS=serving ...
//!              └─► watchdog task: WATCHDOG=1 every WATCHDOG_USEC / 2
//!  SIGTERM ──► STOPPING=1 ──► drain, flush ──► exit
//! ```
//!
//! Every call is a no-op when `NOTIFY_SOCKET` is unset (started by hand, by the tests, or by a
//! unit that is not `Type=notify`), so the daemon never depends on systemd. A notification
//! that cannot be sent is logged and otherwise ignored: systemd then times the start out or
//! fires the watchdog, which is the right outcome for a daemon that cannot reach it.
//!
//! The watchdog ping comes from a task on the daemon's runtime: if the runtime stops making
//! progress (every worker stuck), the pings stop and systemd restarts blockd
//! (`Restart=on-failure` covers `WatchdogSec=` timeouts). Half the interval is what
//! `sd_watchdog_enabled(3)` recommends.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::task::JoinHandle;

/// Tells systemd the daemon is ready, with a one-line status for `systemctl status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd the daemon is shutting down (drain and flush may take a while).
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

/// Updates the status line `systemctl status` shows.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Starts the watchdog pings when systemd asked for them (`WATCHDOG_USEC` set, and
/// `WATCHDOG_PID`, if set, naming this process). Must be called inside a tokio runtime; the
/// returned guard stops the pings when dropped.
pub fn watchdog() -> Watchdog {
    let Some(interval) = watchdog_interval() else { return Watchdog(None) };
    let every = interval / 2;
    tracing::info!("systemd watchdog: {interval:?}, pinging every {every:?}");
    Watchdog(Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    })))
}

/// The running watchdog task, if any; aborted on drop.
#[derive(Debug)]
pub struct Watchdog(Option<JoinHandle<()>>);

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// `WATCHDOG_USEC` as a duration, with libsystemd's rules: absent, zero or unparsable means
/// no watchdog; a `WATCHDOG_PID` that names another process (a parent that was notified and
/// forked us) means the watchdog is not ours.
fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok()?;
    let pid = std::env::var("WATCHDOG_PID").ok();
    parse_watchdog(&usec, pid.as_deref(), std::process::id())
}

fn parse_watchdog(usec: &str, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec.trim().parse().ok().filter(|u| *u > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != me {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// Sends `states` to `NOTIFY_SOCKET` (nothing when unset). The variable is kept: the
/// watchdog needs it later, and with `NotifyAccess=main` systemd ignores what children send.
fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_rules_follow_libsystemd() {
        let d = Some(Duration::from_millis(500));
        assert_eq!(parse_watchdog("500000", None, 7), d, "no WATCHDOG_PID: ours");
        assert_eq!(parse_watchdog("500000", Some("7"), 7), d, "our pid");
        assert_eq!(parse_watchdog("500000", Some("8"), 7), None, "another process's");
        assert_eq!(parse_watchdog("500000", Some("x"), 7), None);
        assert_eq!(parse_watchdog("0", None, 7), None, "0 disables it");
        assert_eq!(parse_watchdog("soon", None, 7), None);
    }
}
