//! `[lease]`: how a node uses the lease witness named by `cluster.witness` (design.md §7). Read by
//! whoever asks the witness (the agent, the degraded-write fencing); the witness itself takes
//! its term on the command line (`blockd witness --term`) and announces it in every grant.
//!
//! ```text
//!   node:  sent ─── timeout ───► answer         valid_until = sent + term - margin
//!          ├──────────────────── term - margin ──────────┤
//! ```
//!
//! `timeout + margin` must stay below `term`, or a lease that took the whole timeout to arrive
//! would already be over.

use std::time::Duration;

use serde::Deserialize;

use super::{validate::Problems, values, Config};
use crate::witness::{ClientSettings, DEFAULT_TERM};

/// Terms outside this range are refused (the same range `blockd witness --term` accepts).
const MIN_TERM: Duration = Duration::from_millis(100);
const MAX_TERM: Duration = Duration::from_secs(3600);

/// `[lease]`: the node's side of the witness lease. Ignored unless `cluster.witness` is set.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LeaseConfig {
    /// The witness's `--term` (default "2s"): a witness announcing another term is refused,
    /// so both sides agree on how long a silent primary keeps its lease.
    #[serde(default = "default_term", deserialize_with = "values::duration")]
    pub term: Duration,
    /// Taken off the term on this node, for a clock running slower than the witness's
    /// (default a tenth of the term).
    #[serde(default, deserialize_with = "values::duration_opt")]
    pub margin: Option<Duration>,
    /// A whole request to the witness (connect, authenticate, answer) must finish within this
    /// (default "1s": a Primary whose witness link hiccups retries within the term).
    #[serde(default = "default_timeout", deserialize_with = "values::duration")]
    pub timeout: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig { term: default_term(), margin: None, timeout: default_timeout() }
    }
}

fn default_term() -> Duration {
    DEFAULT_TERM
}

fn default_timeout() -> Duration {
    Duration::from_secs(1)
}

impl LeaseConfig {
    /// The margin in effect: `margin`, else a tenth of the term.
    pub fn margin(&self) -> Duration {
        self.margin.unwrap_or(self.term / 10)
    }

    /// What a [`crate::witness::LeaseClient`] of this node takes.
    pub fn client_settings(&self) -> ClientSettings {
        ClientSettings { term: Some(self.term), margin: Some(self.margin()), timeout: self.timeout }
    }
}

impl Config {
    pub(super) fn check_lease(&self, p: &mut Problems) {
        let l = &self.lease;
        if !(MIN_TERM..=MAX_TERM).contains(&l.term) {
            p.add("lease.term", Some(show(l.term)), "must be from 100ms to 1h");
        }
        if l.timeout.is_zero() {
            p.add("lease.timeout", Some(show(l.timeout)), "must be more than 0");
        }
        if l.margin() + l.timeout >= l.term {
            let key = if l.margin.is_some() { "lease.margin" } else { "lease.timeout" };
            let value = if l.margin.is_some() { l.margin() } else { l.timeout };
            let why = format!(
                "margin ({}) plus timeout ({}) must be less than the term ({}): a lease could \
                 arrive already expired",
                humantime::format_duration(l.margin()),
                humantime::format_duration(l.timeout),
                humantime::format_duration(l.term)
            );
            p.add(key, Some(show(value)), why);
        }
    }
}

fn show(d: Duration) -> String {
    format!("{:?}", humantime::format_duration(d).to_string())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{load, SINGLE};
    use super::*;

    #[track_caller]
    fn refused(text: &str, key: &str, value: &str) {
        let err = load(text).expect_err("must be refused").to_string();
        assert!(err.contains(key) && err.contains(value), "want {key} = {value} in: {err}");
    }

    #[test]
    fn lease_defaults() {
        let c = load(SINGLE).unwrap();
        assert_eq!(c.lease, LeaseConfig::default());
        assert_eq!(c.lease.term, Duration::from_secs(2));
        assert_eq!(c.lease.margin(), Duration::from_millis(200));
        let s = c.lease.client_settings();
        assert_eq!(s.term, Some(Duration::from_secs(2)));
        let want = (Some(Duration::from_millis(200)), Duration::from_secs(1));
        assert_eq!((s.margin, s.timeout), want);
    }

    #[test]
    fn lease_keys_parse() {
        let text = format!(
            "[cluster]\nwitness = \"10.0.0.3:7790\"\n\
             [lease]\nterm = \"30s\"\nmargin = \"5s\"\ntimeout = \"1s\"\n{SINGLE}"
        );
        let c = load(&text).unwrap();
        assert_eq!(c.cluster.witness, Some("10.0.0.3:7790".parse().unwrap()));
        assert_eq!(c.lease.term, Duration::from_secs(30));
        assert_eq!(c.lease.margin(), Duration::from_secs(5));
        assert_eq!(c.lease.timeout, Duration::from_secs(1));
    }

    #[test]
    fn example_file_shows_the_defaults() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/blockd.toml.example");
        let c = Config::load_with_env(&path, "BLOCKDTEST_UNSET_").unwrap();
        assert_eq!(c.lease, LeaseConfig::default());
    }

    #[test]
    fn bad_lease_values_are_named() {
        refused(&format!("[lease]\nterm = \"50ms\"\n{SINGLE}"), "lease.term", "\"50ms\"");
        refused(&format!("[lease]\nterm = \"2h\"\n{SINGLE}"), "lease.term", "\"2h\"");
        refused(&format!("[lease]\nterm = \"soon\"\n{SINGLE}"), "lease.term", "\"soon\"");
        refused(&format!("[lease]\ntimeout = \"0s\"\n{SINGLE}"), "lease.timeout", "\"0s\"");
        let t = format!("[lease]\nterm = \"2s\"\ntimeout = \"2s\"\n{SINGLE}");
        refused(&t, "lease.timeout", "less than the term (2s)");
        let t = format!("[lease]\nterm = \"10s\"\nmargin = \"9s\"\n{SINGLE}");
        refused(&t, "lease.margin", "\"9s\"");
        refused(&format!("[lease]\nrenew = \"1s\"\n{SINGLE}"), "lease.renew", "unknown key");
    }
}
