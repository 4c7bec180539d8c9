//! One step of a promote or demote plan (design.md §8): `check`, `apply`, `undo`, each idempotent.
//!
//! The plan engine (plan.rs) runs steps in order, skips those whose `check` says they are
//! already done, bounds each `apply`/`undo` by the step's `timeout`, and on failure undoes, in
//! reverse, the steps this run applied. Demote is the same list run through `undo` in reverse.
//! Steps print what they run (through [`Ctx::say`]), so an operator can follow a failover.

use std::{fmt, time::Duration};

use blockd::config::{Config, LocalNode};

/// Why a step failed. The message says what was run and what it answered.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// A command exited non-zero or could not be started.
    #[error("{what}: {detail}")]
    Command { what: String, detail: String },
    /// The step did not finish within its timeout.
    #[error("{what}: no result after {after:?}")]
    Timeout { what: String, after: Duration },
    /// Anything else, in words.
    #[error("{0}")]
    Other(String),
}

/// What every step may read: the configuration, this node, and how to report.
#[derive(Debug)]
pub struct Ctx {
    pub config: Config,
    pub node: LocalNode,
    /// Print what would run, change nothing.
    pub dry_run: bool,
    /// The operator passed `--force` (checks that would refuse are overridden, loudly).
    pub force: bool,
}

impl Ctx {
    /// One line of progress for the operator (stdout), prefixed with the node's name.
    pub fn say(&self, msg: impl fmt::Display) {
        println!("[{}] {msg}", self.node.name);
    }
}

/// A step of the failover sequence.
pub trait Step: Send + Sync {
    /// Short name, used by `--until` and in logs: "attach mariadb", "vip", "service nfs".
    fn name(&self) -> String;
    /// What `apply` runs, for `--dry-run` and for the log.
    fn describe(&self, ctx: &Ctx) -> String;
    /// True when the step's effect is already in place (so `apply` is skipped and the step is
    /// not undone if a later step fails).
    fn check(&self, ctx: &Ctx) -> Result<bool, StepError>;
    /// Puts the effect in place. Must be safe to run again after a partial failure.
    fn apply(&self, ctx: &Ctx) -> Result<(), StepError>;
    /// Removes the effect (escalating where the step says so). Succeeds when already absent.
    fn undo(&self, ctx: &Ctx) -> Result<(), StepError>;
    /// Longest an `apply` or `undo` may take.
    fn timeout(&self) -> Duration {
        Duration::from_secs(60)
    }
}
