//! Health of the Primary's stack for `blockctl agent` (SafeKit checkers, Pacemaker
//! `on-fail`): pure, time as arguments; the agent probes, this decides.
//!
//! ```text
//!  probe every HEALTH_INTERVAL ── (step, healthy) ──► Health::observe ──► nothing | Restart | Move
//! ```
//!
//! | # | probe of one step (service, mount)                     | action                    |
//! |---|--------------------------------------------------------|---------------------------|
//! | 1 | never healthy since this node became Primary           | nothing (not armed: a promote still starting, or broken from the start) |
//! | 2 | healthy                                                | nothing; a failure ends   |
//! | 3 | failing for less than `restart-after`                  | nothing yet               |
//! | 4 | failing for `restart-after`, fewer than `max-restarts` restarts within `restart-window` | restart it in place |
//! | 5 | failing for `restart-after`, `max-restarts` restarts within the window | move the stack to the peer (the agent swaps if the peer is ready, else restarts again) |
//!
//! Row 1 keeps the agent from restarting a service while an operator's promote is still
//! bringing it up, and from looping on one that never worked (promote reported that). Until
//! every step has been seen healthy once ([`Health::settled`]), the agent probes at every
//! poll rather than every [`HEALTH_INTERVAL`]: a service that died within a second of its
//! promote finishing was otherwise never seen healthy, hence never restarted.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use crate::config::AgentConfig;

/// How often the agent probes the Primary's services and mounts.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// What to do about a failing step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Restart step `.0` ("service mariadb", "mount db") in place; `.1` says why.
    Restart(String, String),
    /// It keeps failing: move the stack to the peer; says why.
    Move(String, String),
}

/// The failures seen during one Primary term.
#[derive(Debug)]
pub struct Health {
    restart_after: Duration,
    max_restarts: u32,
    window: Duration,
    /// Steps seen healthy at least once since this node became Primary.
    armed: HashSet<String>,
    /// Since when each armed step has been failing.
    failing: HashMap<String, Instant>,
    /// When each step was restarted, within the window.
    restarts: HashMap<String, Vec<Instant>>,
    /// Every step of the last probes was armed.
    settled: bool,
}

impl Health {
    pub fn new(c: &AgentConfig) -> Health {
        Health {
            restart_after: c.restart_after,
            max_restarts: c.max_restarts,
            window: c.restart_window,
            armed: HashSet::new(),
            failing: HashMap::new(),
            restarts: HashMap::new(),
            settled: false,
        }
    }

    /// Every step probed last has been seen healthy since this node became Primary: probing
    /// every [`HEALTH_INTERVAL`] is enough from now on.
    pub fn settled(&self) -> bool {
        self.settled
    }

    /// Checking is on (`restart-after` is not "0s").
    pub fn enabled(&self) -> bool {
        !self.restart_after.is_zero()
    }

    /// This node is not Primary (or became it again): everything starts over.
    pub fn reset(&mut self) {
        self.armed.clear();
        self.failing.clear();
        self.restarts.clear();
        self.settled = false;
    }

    /// The probes taken at `now`: the first step that needs an action, if any.
    pub fn observe(&mut self, probes: &[(String, bool)], now: Instant) -> Option<Action> {
        let mut action = None;
        for (name, healthy) in probes {
            if *healthy {
                self.armed.insert(name.clone());
                self.failing.remove(name);
                continue;
            }
            if !self.armed.contains(name) {
                continue;
            }
            let since = *self.failing.entry(name.clone()).or_insert(now);
            let failed = now - since;
            if failed < self.restart_after || action.is_some() {
                continue;
            }
            let recent = self.restarts.entry(name.clone()).or_default();
            recent.retain(|t| now - *t < self.window);
            let why = format!(
                "{name} failing for {:.1} s after {} restart(s) within {:?}",
                failed.as_secs_f64(),
                recent.len(),
                self.window
            );
            action = Some(if recent.len() >= self.max_restarts as usize {
                Action::Move(name.clone(), why)
            } else {
                Action::Restart(name.clone(), why)
            });
        }
        self.settled = probes.iter().all(|(name, _)| self.armed.contains(name));
        action
    }

    /// Step `name` was restarted at `now` (it counts toward `max-restarts`).
    pub fn restarted(&mut self, name: &str, now: Instant) {
        self.restarts.entry(name.to_string()).or_default().push(now);
        self.failing.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> Health {
        let c = AgentConfig {
            restart_after: Duration::from_secs(3),
            max_restarts: 2,
            restart_window: Duration::from_secs(60),
            ..AgentConfig::default()
        };
        Health::new(&c)
    }

    fn probe(ok: bool) -> Vec<(String, bool)> {
        vec![("mount db".into(), true), ("service mariadb".into(), ok)]
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn never_healthy_is_never_restarted() {
        let (mut h, t0) = (health(), Instant::now());
        for i in 0..100 {
            assert_eq!(h.observe(&probe(false), t0 + secs(i)), None);
            assert!(!h.settled(), "the service was never seen healthy");
        }
    }

    #[test]
    fn settled_once_every_step_was_healthy() {
        let (mut h, t0) = (health(), Instant::now());
        assert!(!h.settled(), "nothing probed yet");
        h.observe(&probe(false), t0);
        assert!(!h.settled(), "the mount is armed, the service not yet");
        h.observe(&probe(true), t0 + secs(1));
        assert!(h.settled());
        h.observe(&probe(false), t0 + secs(2));
        assert!(h.settled(), "a failure of an armed step keeps it settled");
        h.reset();
        assert!(!h.settled(), "a new Primary term starts over");
    }

    #[test]
    fn a_failing_service_is_restarted_then_moved_to_the_peer() {
        let (mut h, t0) = (health(), Instant::now());
        assert!(h.enabled());
        assert_eq!(h.observe(&probe(true), t0), None);
        assert_eq!(h.observe(&probe(false), t0 + secs(1)), None, "failing 0 s");
        assert_eq!(h.observe(&probe(false), t0 + secs(3)), None, "failing 2 s");
        let Some(Action::Restart(name, why)) = h.observe(&probe(false), t0 + secs(4)) else {
            panic!("want a restart")
        };
        assert_eq!(name, "service mariadb");
        assert!(why.contains("failing for 3.0 s after 0 restart(s)"), "{why}");
        h.restarted(&name, t0 + secs(5));
        // A brief failure after it came back is not counted yet.
        assert_eq!(h.observe(&probe(true), t0 + secs(6)), None);
        assert_eq!(h.observe(&probe(false), t0 + secs(7)), None);
        assert!(matches!(h.observe(&probe(false), t0 + secs(10)), Some(Action::Restart(..))));
        h.restarted(&name, t0 + secs(11));
        h.observe(&probe(true), t0 + secs(12));
        h.observe(&probe(false), t0 + secs(13));
        match h.observe(&probe(false), t0 + secs(16)) {
            Some(Action::Move(n, why)) => {
                assert_eq!(n, "service mariadb");
                assert!(why.contains("after 2 restart(s)"), "{why}");
            }
            a => panic!("want a move, got {a:?}"),
        }
        // Restarts older than the window no longer count.
        assert!(matches!(h.observe(&probe(false), t0 + secs(80)), Some(Action::Restart(..))));
        h.reset();
        assert_eq!(h.observe(&probe(false), t0 + secs(90)), None, "disarmed after a reset");
    }

    #[test]
    fn zero_restart_after_turns_checking_off() {
        let c = AgentConfig { restart_after: Duration::ZERO, ..AgentConfig::default() };
        assert!(!Health::new(&c).enabled());
    }
}
