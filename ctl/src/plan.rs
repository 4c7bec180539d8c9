//! The plan engine: runs an ordered list of [`Step`]s forwards (promote) or backwards (demote),
//! in the manner of drbd-reactor's promoter.
//!
//! ```text
//!  promote:  for each step:  check ──done──► skip (not ours to undo)
//!                              └─not done─► apply ──ok──► next
//!                                             └─error/timeout─► undo this step, then every
//!                                                               step this run applied, in
//!                                                               reverse; stop at a failing undo
//!  demote:   for each step, last first:  undo ──error─► stop: the steps before it stay
//! ```
//!
//! The `role` step comes first in the list (after the pre-flight), so demote undoes it last: if
//! anything above it cannot be stopped, the node stays Primary and the peer cannot take over
//! while the filesystem may still be mounted here. A failed apply is undone too, because an
//! apply may half-happen (a service started that never became healthy) and `undo` succeeds when
//! the effect is absent.
//!
//! Every check, apply and undo runs on a thread of its own, bounded by the step's `timeout()`.
//! At the deadline the engine stops waiting and reports [`StepError::Timeout`]; it cannot stop
//! the thread, which may still run (a hung `mount` in the kernel) until blockctl exits. The
//! rollback that follows is what makes the node consistent again.

use std::{
    sync::{
        mpsc::{self, RecvTimeoutError},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use crate::step::{Ctx, Step, StepError};

/// Steps are shared with the thread that runs them, hence `Arc`.
pub type StepRef = Arc<dyn Step>;

/// Why a plan did not complete.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// `--until` named a step the plan does not have.
    #[error("no step {name:?} in the plan; its steps are: {steps}")]
    UnknownStep { name: String, steps: String },
    /// A promote step failed; it and every step this run applied were undone.
    #[error("step {step:?} failed (undone: {})", list(undone))]
    RolledBack {
        step: String,
        undone: Vec<String>,
        #[source]
        source: StepError,
    },
    /// A promote step failed and undoing failed too: the rollback stopped there, and the steps
    /// before `undo_step` (the role among them) are still in place.
    #[error(
        "step {step:?} failed ({error}), then undoing {undo_step:?} failed: rollback stopped, \
         the steps before it are still in place"
    )]
    RollbackStopped {
        step: String,
        /// Boxed, as is `source`: two step errors would make every `Result` of the plan large.
        error: Box<StepError>,
        undo_step: String,
        #[source]
        source: Box<StepError>,
    },
    /// A demote undo failed; the steps before it, the role first, were not undone.
    #[error("demote stopped at step {step:?}; the node is still Primary")]
    DemoteStopped {
        step: String,
        #[source]
        source: StepError,
    },
}

impl PlanError {
    /// True when the node may be left Primary with part of the stack up (exit code 4).
    pub fn left_primary(&self) -> bool {
        matches!(self, PlanError::RollbackStopped { .. } | PlanError::DemoteStopped { .. })
    }
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "nothing".into()
    } else {
        names.join(", ")
    }
}

/// An ordered list of steps.
pub struct Plan {
    steps: Vec<StepRef>,
}

/// What a step did on the way up.
enum Up {
    AlreadyDone,
    Applied,
}

/// Where a step failed on the way up: a failed check changed nothing, a failed apply may have.
enum UpError {
    Check(StepError),
    Apply(StepError),
}

impl Plan {
    pub fn new(steps: Vec<StepRef>) -> Plan {
        Plan { steps }
    }

    /// The steps' names, in promote order.
    #[cfg(test)]
    pub fn names(&self) -> Vec<String> {
        self.steps.iter().map(|s| s.name()).collect()
    }

    /// How many steps of `order` to run: all, or up to and including `until`.
    fn count_until(order: &[&StepRef], until: Option<&str>) -> Result<usize, PlanError> {
        let Some(name) = until else { return Ok(order.len()) };
        match order.iter().position(|s| s.name() == name) {
            Some(i) => Ok(i + 1),
            None => Err(PlanError::UnknownStep {
                name: name.to_string(),
                steps: order.iter().map(|s| s.name()).collect::<Vec<_>>().join(", "),
            }),
        }
    }

    /// Brings every step (up to `until`) into place. On failure, undoes what this run did.
    pub fn promote(&self, ctx: &Arc<Ctx>, until: Option<&str>) -> Result<(), PlanError> {
        let order: Vec<&StepRef> = self.steps.iter().collect();
        let order = &order[..Self::count_until(&order, until)?];
        if ctx.dry_run {
            for step in order {
                ctx.say(format!("would run {}: {}", step.name(), step.describe(ctx)));
            }
            return Ok(());
        }
        let mut applied: Vec<&StepRef> = Vec::new();
        for step in order {
            match bring_up(step, ctx) {
                Ok(Up::Applied) => applied.push(step),
                Ok(Up::AlreadyDone) => {}
                Err(UpError::Check(e)) => return Err(roll_back(ctx, step, e, applied)),
                Err(UpError::Apply(e)) => {
                    applied.push(step);
                    return Err(roll_back(ctx, step, e, applied));
                }
            }
        }
        Ok(())
    }

    /// Undoes every step (down to `until`), last first; stops at the first failure.
    pub fn demote(&self, ctx: &Arc<Ctx>, until: Option<&str>) -> Result<(), PlanError> {
        let order: Vec<&StepRef> = self.steps.iter().rev().collect();
        let order = &order[..Self::count_until(&order, until)?];
        if ctx.dry_run {
            for step in order {
                ctx.say(format!("would undo {} (undoes: {})", step.name(), step.describe(ctx)));
            }
            return Ok(());
        }
        for step in order {
            if let Err(source) = take_down(step, ctx) {
                ctx.say("demote stopped: the steps before this one are left in place");
                return Err(PlanError::DemoteStopped { step: step.name(), source });
            }
        }
        Ok(())
    }
}

/// check, then apply unless already done; one line at the start and one at the end.
fn bring_up(step: &StepRef, ctx: &Arc<Ctx>) -> Result<Up, UpError> {
    let name = step.name();
    ctx.say(format!("{name}: {}", step.describe(ctx)));
    let start = Instant::now();
    let done = bounded(step, ctx, "check", |s, c| s.check(c)).map_err(|e| {
        ctx.say(format!("{name}: check FAILED after {}: {e}", secs(start)));
        UpError::Check(e)
    })?;
    if done {
        ctx.say(format!("{name}: already done ({})", secs(start)));
        return Ok(Up::AlreadyDone);
    }
    match bounded(step, ctx, "apply", |s, c| s.apply(c)) {
        Ok(()) => {
            ctx.say(format!("{name}: ok in {}", secs(start)));
            Ok(Up::Applied)
        }
        Err(e) => {
            ctx.say(format!("{name}: FAILED after {}: {e}", secs(start)));
            Err(UpError::Apply(e))
        }
    }
}

/// undo, with its start and end lines.
fn take_down(step: &StepRef, ctx: &Arc<Ctx>) -> Result<(), StepError> {
    let name = step.name();
    ctx.say(format!("undo {name}"));
    let start = Instant::now();
    let result = bounded(step, ctx, "undo", |s, c| s.undo(c));
    match &result {
        Ok(()) => ctx.say(format!("undo {name}: ok in {}", secs(start))),
        Err(e) => ctx.say(format!("undo {name}: FAILED after {}: {e}", secs(start))),
    }
    result
}

/// Undoes `applied` last first after `failed` went wrong with `error`.
fn roll_back(
    ctx: &Arc<Ctx>,
    failed: &StepRef,
    error: StepError,
    applied: Vec<&StepRef>,
) -> PlanError {
    ctx.say(format!("rolling back {} step(s)", applied.len()));
    let mut undone = Vec::new();
    for step in applied.into_iter().rev() {
        if let Err(source) = take_down(step, ctx) {
            ctx.say("rollback stopped: the steps before this one are left in place");
            return PlanError::RollbackStopped {
                step: failed.name(),
                error: Box::new(error),
                undo_step: step.name(),
                source: Box::new(source),
            };
        }
        undone.push(step.name());
    }
    PlanError::RolledBack { step: failed.name(), undone, source: error }
}

/// Runs `op` on a thread and waits at most `step.timeout()` for it. On timeout the thread is
/// left running (it cannot be stopped from outside); its late result is dropped.
fn bounded<T: Send + 'static>(
    step: &StepRef,
    ctx: &Arc<Ctx>,
    what: &str,
    op: fn(&dyn Step, &Ctx) -> Result<T, StepError>,
) -> Result<T, StepError> {
    let limit = step.timeout();
    // Capacity 1: the thread's send never blocks, even when nobody waits any more.
    let (tx, rx) = mpsc::sync_channel(1);
    let (s, c) = (Arc::clone(step), Arc::clone(ctx));
    thread::Builder::new()
        .name(format!("step-{what}"))
        .spawn(move || {
            let _ = tx.send(op(&*s, &c));
        })
        .map_err(|e| {
            StepError::Other(format!("{} {what}: cannot start a thread: {e}", step.name()))
        })?;
    match rx.recv_timeout(limit) {
        Ok(result) => result,
        Err(RecvTimeoutError::Timeout) => {
            Err(StepError::Timeout { what: format!("{} {what}", step.name()), after: limit })
        }
        Err(RecvTimeoutError::Disconnected) => {
            Err(StepError::Other(format!("{} {what}: the step panicked", step.name())))
        }
    }
}

/// "0.42 s": the duration since `start`, for the end-of-step line.
fn secs(start: Instant) -> String {
    format!("{:.2} s", start.elapsed().as_secs_f64())
}

/// A bound for quick checks outside a plan (status): `step.check` within `limit`.
pub fn check_within(step: &StepRef, ctx: &Arc<Ctx>, limit: Duration) -> Result<bool, StepError> {
    bounded(&with_timeout(Arc::clone(step), limit), ctx, "check", |s, c| s.check(c))
}

/// `step` bounded by `limit` instead of its own `timeout()`: for the plan builder, which
/// knows deadlines from the configuration that a step's `timeout()` cannot see.
pub fn with_timeout(step: StepRef, limit: Duration) -> StepRef {
    Arc::new(Limited { inner: step, limit })
}

/// A step with another timeout, for [`with_timeout`].
struct Limited {
    inner: StepRef,
    limit: Duration,
}

impl Step for Limited {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn describe(&self, ctx: &Ctx) -> String {
        self.inner.describe(ctx)
    }
    fn check(&self, ctx: &Ctx) -> Result<bool, StepError> {
        self.inner.check(ctx)
    }
    fn apply(&self, ctx: &Ctx) -> Result<(), StepError> {
        self.inner.apply(ctx)
    }
    fn undo(&self, ctx: &Ctx) -> Result<(), StepError> {
        self.inner.undo(ctx)
    }
    fn timeout(&self) -> Duration {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    };

    use blockd::config::Config;

    use super::*;

    /// What the fake steps did, in order: "apply b", "undo a", ...
    type Log = Arc<Mutex<Vec<String>>>;

    /// A step whose effect is a flag; it can be told to fail or to hang.
    struct Fake {
        name: &'static str,
        log: Log,
        done: AtomicBool,
        fail_check: bool,
        fail_apply: bool,
        fail_undo: bool,
        hang: Option<Duration>,
    }

    impl Fake {
        fn new(name: &'static str, log: &Log) -> Fake {
            Fake {
                name,
                log: Arc::clone(log),
                done: AtomicBool::new(false),
                fail_check: false,
                fail_apply: false,
                fail_undo: false,
                hang: None,
            }
        }
        fn note(&self, what: &str) {
            self.log.lock().unwrap().push(format!("{what} {}", self.name));
        }
    }

    impl Step for Fake {
        fn name(&self) -> String {
            self.name.into()
        }
        fn describe(&self, _: &Ctx) -> String {
            format!("set {}", self.name)
        }
        fn check(&self, _: &Ctx) -> Result<bool, StepError> {
            self.note("check");
            if self.fail_check {
                return Err(StepError::Other(format!("{} cannot tell", self.name)));
            }
            Ok(self.done.load(Ordering::SeqCst))
        }
        fn apply(&self, _: &Ctx) -> Result<(), StepError> {
            self.note("apply");
            if let Some(d) = self.hang {
                thread::sleep(d);
            }
            if self.fail_apply {
                return Err(StepError::Command { what: self.name.into(), detail: "exit 1".into() });
            }
            self.done.store(true, Ordering::SeqCst);
            Ok(())
        }
        fn undo(&self, _: &Ctx) -> Result<(), StepError> {
            self.note("undo");
            if self.fail_undo {
                return Err(StepError::Other(format!("{} is busy", self.name)));
            }
            self.done.store(false, Ordering::SeqCst);
            Ok(())
        }
        fn timeout(&self) -> Duration {
            Duration::from_millis(if self.hang.is_some() { 100 } else { 5000 })
        }
    }

    fn ctx(dry_run: bool) -> Arc<Ctx> {
        let path = std::env::temp_dir().join(format!(
            "blockctl-plan-test-{}-{:?}.toml",
            std::process::id(),
            thread::current().id()
        ));
        std::fs::write(
            &path,
            "[node.a]\nrun-dir = \"/nonexistent\"\n[[volume]]\nname = \"v\"\nsize = 4096\n",
        )
        .unwrap();
        let config = Config::load(&path);
        let _ = std::fs::remove_file(&path);
        let config = config.unwrap();
        let node = config.local_node(None).unwrap();
        Arc::new(Ctx { config, node, dry_run, force: false })
    }

    /// A plan of fakes named by `names`, `tweak` adjusting them before they are shared.
    fn plan(
        names: &[&'static str],
        log: &Log,
        tweak: impl Fn(&mut Fake),
    ) -> (Plan, Vec<Arc<Fake>>) {
        let fakes: Vec<Arc<Fake>> = names
            .iter()
            .map(|n| {
                let mut f = Fake::new(n, log);
                tweak(&mut f);
                Arc::new(f)
            })
            .collect();
        let steps = fakes.iter().map(|f| Arc::clone(f) as StepRef).collect();
        (Plan::new(steps), fakes)
    }

    fn taken(log: &Log) -> Vec<String> {
        std::mem::take(&mut *log.lock().unwrap())
    }

    #[test]
    fn promote_checks_then_applies_in_order() {
        let log = Log::default();
        let (p, fakes) = plan(&["role", "mount", "vip"], &log, |_| {});
        p.promote(&ctx(false), None).unwrap();
        let want =
            ["check role", "apply role", "check mount", "apply mount", "check vip", "apply vip"];
        assert_eq!(taken(&log), want);
        assert!(fakes.iter().all(|f| f.done.load(Ordering::SeqCst)));
    }

    #[test]
    fn promote_twice_applies_nothing_the_second_time() {
        let log = Log::default();
        let (p, _) = plan(&["role", "mount"], &log, |_| {});
        let c = ctx(false);
        p.promote(&c, None).unwrap();
        taken(&log);
        p.promote(&c, None).unwrap();
        assert_eq!(taken(&log), ["check role", "check mount"]);
    }

    #[test]
    fn failed_apply_undoes_it_and_what_this_run_applied_in_reverse() {
        let log = Log::default();
        let (p, fakes) = plan(&["pre", "role", "mount", "vip", "svc"], &log, |f| {
            f.fail_apply = f.name == "vip";
            f.done = AtomicBool::new(f.name == "pre");
        });
        let err = p.promote(&ctx(false), None).unwrap_err();
        let want = [
            "check pre",
            "check role",
            "apply role",
            "check mount",
            "apply mount",
            "check vip",
            "apply vip",
            "undo vip",
            "undo mount",
            "undo role",
        ];
        assert_eq!(taken(&log), want, "pre was already done: not ours to undo; svc never ran");
        match &err {
            PlanError::RolledBack { step, undone, .. } => {
                assert_eq!(step, "vip");
                assert_eq!(undone, &["vip", "mount", "role"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(!err.left_primary());
        assert!(fakes[0].done.load(Ordering::SeqCst), "pre left as it was");
        assert!(fakes[1..].iter().all(|f| !f.done.load(Ordering::SeqCst)));
    }

    #[test]
    fn failed_check_undoes_only_the_steps_before_it() {
        let log = Log::default();
        let (p, _) = plan(&["role", "mount"], &log, |f| f.fail_check = f.name == "mount");
        let err = p.promote(&ctx(false), None).unwrap_err();
        assert_eq!(taken(&log), ["check role", "apply role", "check mount", "undo role"]);
        assert!(matches!(err, PlanError::RolledBack { ref undone, .. } if undone == &["role"]));
    }

    #[test]
    fn hung_apply_times_out_and_rolls_back() {
        let log = Log::default();
        let (p, _) = plan(&["role", "fsck"], &log, |f| {
            f.hang = (f.name == "fsck").then_some(Duration::from_secs(3))
        });
        let start = Instant::now();
        let err = p.promote(&ctx(false), None).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(2), "waited {:?}", start.elapsed());
        let PlanError::RolledBack { step, source, .. } = &err else { panic!("{err:?}") };
        assert_eq!(step, "fsck");
        assert!(
            matches!(source, StepError::Timeout { after, .. } if *after == Duration::from_millis(100))
        );
        let log = taken(&log);
        assert!(log.ends_with(&["undo fsck".into(), "undo role".into()]), "{log:?}");
    }

    #[test]
    fn until_stops_after_the_named_step() {
        let log = Log::default();
        let (p, fakes) = plan(&["role", "mount", "vip"], &log, |_| {});
        p.promote(&ctx(false), Some("mount")).unwrap();
        assert_eq!(taken(&log), ["check role", "apply role", "check mount", "apply mount"]);
        assert!(!fakes[2].done.load(Ordering::SeqCst));
        p.demote(&ctx(false), Some("mount")).unwrap();
        assert_eq!(taken(&log), ["undo vip", "undo mount"]);
        assert!(fakes[0].done.load(Ordering::SeqCst), "role kept");
    }

    #[test]
    fn until_an_unknown_step_is_refused_before_anything_runs() {
        let log = Log::default();
        let (p, _) = plan(&["role", "mount"], &log, |_| {});
        let err = p.promote(&ctx(false), Some("vipp")).unwrap_err().to_string();
        assert!(err.contains("\"vipp\"") && err.contains("role, mount"), "{err}");
        assert!(p.demote(&ctx(false), Some("x")).is_err());
        assert!(taken(&log).is_empty());
    }

    #[test]
    fn dry_run_touches_nothing() {
        let log = Log::default();
        let (p, _) = plan(&["role", "mount"], &log, |_| {});
        p.promote(&ctx(true), None).unwrap();
        p.demote(&ctx(true), None).unwrap();
        assert!(taken(&log).is_empty());
    }

    #[test]
    fn demote_undoes_everything_in_reverse() {
        let log = Log::default();
        let (p, fakes) = plan(&["role", "mount", "vip"], &log, |f| f.done = AtomicBool::new(true));
        p.demote(&ctx(false), None).unwrap();
        assert_eq!(taken(&log), ["undo vip", "undo mount", "undo role"]);
        assert!(fakes.iter().all(|f| !f.done.load(Ordering::SeqCst)));
        p.demote(&ctx(false), None).unwrap();
        assert_eq!(taken(&log).len(), 3, "demote twice is harmless");
    }

    #[test]
    fn demote_stops_at_the_first_failure_and_keeps_the_role() {
        let log = Log::default();
        let (p, fakes) = plan(&["role", "mount", "vip"], &log, |f| {
            f.done = AtomicBool::new(true);
            f.fail_undo = f.name == "mount";
        });
        let err = p.demote(&ctx(false), None).unwrap_err();
        assert_eq!(taken(&log), ["undo vip", "undo mount"]);
        assert!(matches!(&err, PlanError::DemoteStopped { step, .. } if step == "mount"));
        assert!(err.left_primary());
        assert!(err.to_string().contains("still Primary"), "{err}");
        assert!(fakes[0].done.load(Ordering::SeqCst) && fakes[1].done.load(Ordering::SeqCst));
    }

    #[test]
    fn failing_undo_stops_the_rollback() {
        let log = Log::default();
        let (p, _) = plan(&["role", "mount", "svc"], &log, |f| {
            f.fail_apply = f.name == "svc";
            f.fail_undo = f.name == "mount";
        });
        let err = p.promote(&ctx(false), None).unwrap_err();
        let log = taken(&log);
        assert!(log.ends_with(&["undo svc".into(), "undo mount".into()]), "{log:?}");
        assert!(!log.contains(&"undo role".into()), "role kept while mount is up: {log:?}");
        assert!(
            matches!(&err, PlanError::RollbackStopped { undo_step, .. } if undo_step == "mount")
        );
        assert!(err.left_primary());
    }
}
