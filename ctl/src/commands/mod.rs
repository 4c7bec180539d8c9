//! The failover commands (design.md §8): `promote`, `demote` and `swap`, built on the plan engine
//! (plan.rs) with the steps of steps/ and the two control-socket steps of [`node`].
//!
//! The plan, in promote order (demote undoes it last first, without the pre-flight):
//!
//! ```text
//!  check                      pre-flight over the control socket (promote only)
//!  role                       blockd → Primary             undo: → Secondary
//!  attach V, fsck V, mount V  per [[volume]] with a mount, volume by volume
//!  bind T                     per [[bind]], in order
//!  vip                        when [vip] is configured
//!  service S                  per [[service]], in order
//! ```
//!
//! `role` comes before everything that uses the device and is undone after everything, so a
//! demote that cannot stop a service or unmount leaves the node Primary: the peer cannot be
//! promoted while the filesystem may still be mounted here.

pub mod agent;
mod agent_state;
pub mod console;
pub mod events;
#[cfg(test)]
mod fake;
pub mod init;
pub mod node;
pub mod status;
pub mod sync;

use std::{
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use blockd::{
    config::Config,
    control::{Client, ClientError, DiskState, Reply, Request},
};

use crate::{
    plan::{with_timeout, Plan, PlanError, StepRef},
    step::Ctx,
    steps::{attach::Attach, fsck::Fsck, mount, services::Service, vip::Vip},
};

/// Exit codes of blockctl (also listed in main.rs's doc).
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_NOT_RUNNING: u8 = 3;
pub const EXIT_LEFT_PRIMARY: u8 = 4;

/// An error and its causes on one line, as blockctl prints errors ("a: b: c").
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

/// The peer's promote runs up to 600 s on its side (blockd's RUN_PROMOTE_TIMEOUT); wait a
/// little longer for its answer.
const PEER_PROMOTE_WAIT: Duration = Duration::from_secs(620);

/// Pause between two status polls while waiting for the peer.
const POLL: Duration = Duration::from_millis(200);

/// Why a failover command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Its message already says "blockd is not running".
    #[error(transparent)]
    NotRunning(ClientError),
    #[error("cannot ask the daemon")]
    Control(#[source] ClientError),
    #[error("{0}")]
    Usage(String),
    /// Swap did not complete; the node was promoted here again.
    #[error("swap failed: {0}; this node is Primary again")]
    SwapBack(String),
}

impl CommandError {
    /// The documented exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            CommandError::Plan(PlanError::UnknownStep { .. }) | CommandError::Usage(_) => {
                EXIT_USAGE
            }
            CommandError::Plan(e) if e.left_primary() => EXIT_LEFT_PRIMARY,
            CommandError::NotRunning(_) => EXIT_NOT_RUNNING,
            _ => EXIT_FAILED,
        }
    }
}

/// Room above a step's own deadlines, so that the step's precise error ("e2fsck: no result
/// after 60s") arrives before the engine's generic timeout.
const MARGIN: Duration = Duration::from_secs(5);

/// The plan's steps after the pre-flight: role first, services last.
///
/// Each step is bounded by the larger of its own `timeout()` and what the configuration asks
/// of it: `[failover] step-timeout` (the deadline steps give their commands) for every step;
/// for a service, its start (command, then health check) or stop (command, wait, then
/// SIGTERM/SIGKILL escalation), each up to twice its `timeout` plus the escalation's grace.
fn stack(config: &Config) -> Vec<StepRef> {
    let floor = config.failover.step_timeout + MARGIN;
    let mut steps: Vec<StepRef> = vec![Arc::new(node::RoleStep)];
    for v in config.volume.iter().filter(|v| v.mount.is_some()) {
        steps.push(Arc::new(Attach::new(&v.name)));
        steps.push(Arc::new(Fsck::new(&v.name)));
        steps.push(Arc::new(mount::Mount::new(&v.name)));
    }
    for (i, b) in config.bind.iter().enumerate() {
        steps.push(Arc::new(mount::Bind::new(i).named(&b.target)));
    }
    if config.vip.is_some() {
        steps.push(Arc::new(Vip::new()));
    }
    let mut steps: Vec<StepRef> = steps.into_iter().map(|s| at_least(s, floor)).collect();
    for (i, s) in config.service.iter().enumerate() {
        let need = s.deadline(&config.failover) * 2 + SERVICE_GRACE + MARGIN;
        steps.push(at_least(Arc::new(Service::new(i).named(&s.name)), need.max(floor)));
    }
    steps
}

/// The parts of [`stack`] up on this node, by step name: attach and mount of each volume and
/// the VIP. The role is the daemon's, and services are left out (their checks may run
/// commands). On a Secondary these are what a daemon that restarted under a running stack left
/// behind; the agent tears them down.
pub fn stack_up(ctx: &Ctx) -> Vec<String> {
    let c = &ctx.config;
    let mut steps: Vec<StepRef> = Vec::new();
    for v in c.volume.iter().filter(|v| v.mount.is_some()) {
        steps.push(Arc::new(Attach::new(&v.name)));
        steps.push(Arc::new(mount::Mount::new(&v.name)));
    }
    if c.vip.is_some() {
        steps.push(Arc::new(Vip::new()));
    }
    steps.iter().filter(|s| s.check(ctx).unwrap_or(false)).map(|s| s.name()).collect()
}

/// The Primary's health probes (`health.rs`): each volume's mount and each service, by step
/// name, and whether its check passes now.
pub fn health_probes(ctx: &Ctx) -> Vec<(String, bool)> {
    let c = &ctx.config;
    let mut steps: Vec<StepRef> = Vec::new();
    for v in c.volume.iter().filter(|v| v.mount.is_some()) {
        steps.push(Arc::new(mount::Mount::new(&v.name)));
    }
    for (i, s) in c.service.iter().enumerate() {
        steps.push(Arc::new(Service::new(i).named(&s.name)));
    }
    steps.iter().map(|s| (s.name(), s.check(ctx).unwrap_or(false))).collect()
}

/// Restarts plan step `step` in place on the Primary: undoes it and what comes after it, then
/// promotes again (the steps still up are "already done"). A mount restarts from its attach.
pub fn restart_step(ctx: &Arc<Ctx>, step: &str) -> Result<(), CommandError> {
    let from = match step.strip_prefix("mount ") {
        Some(volume) => format!("attach {volume}"),
        None => step.to_string(),
    };
    ctx.say(format!("restart {step}: undo from {from}, then promote again"));
    demote_plan(&ctx.config).demote(ctx, Some(&from))?;
    promote(ctx, None)
}

/// What a service stop may add after its deadline: the SIGTERM → SIGKILL escalation.
const SERVICE_GRACE: Duration = Duration::from_secs(15);

/// `step`, bounded by at least `limit`.
fn at_least(step: StepRef, limit: Duration) -> StepRef {
    if step.timeout() >= limit {
        step
    } else {
        with_timeout(step, limit)
    }
}

/// promote's plan: the pre-flight, then [`stack`].
pub fn promote_plan(config: &Config) -> Plan {
    let mut steps: Vec<StepRef> = vec![Arc::new(node::Check)];
    steps.extend(stack(config));
    Plan::new(steps)
}

/// demote's plan: [`stack`] (undone last first); a pre-flight has nothing to undo.
pub fn demote_plan(config: &Config) -> Plan {
    Plan::new(stack(config))
}

/// Fails with exit code 3 when nothing listens on the control socket (a dry run needs no
/// daemon).
fn require_daemon(ctx: &Ctx) -> Result<(), CommandError> {
    if ctx.dry_run {
        return Ok(());
    }
    match Client::connect(&ctx.node.control_socket(), Duration::from_secs(5)) {
        Ok(_) => Ok(()),
        Err(e @ ClientError::NotRunning { .. }) => Err(CommandError::NotRunning(e)),
        Err(e) => Err(CommandError::Control(e)),
    }
}

/// `blockctl promote`.
pub fn promote(ctx: &Arc<Ctx>, until: Option<&str>) -> Result<(), CommandError> {
    require_daemon(ctx)?;
    let start = Instant::now();
    promote_plan(&ctx.config).promote(ctx, until)?;
    if !ctx.dry_run {
        ctx.say(format!("promote: done in {:.2} s", start.elapsed().as_secs_f64()));
    }
    Ok(())
}

/// `blockctl demote`.
pub fn demote(ctx: &Arc<Ctx>, until: Option<&str>) -> Result<(), CommandError> {
    require_daemon(ctx)?;
    let start = Instant::now();
    if let Err(e) = demote_plan(&ctx.config).demote(ctx, until) {
        if e.left_primary() {
            ctx.say("demote could not finish: this node is STILL PRIMARY; fix the cause and run demote again");
        }
        return Err(e.into());
    }
    if !ctx.dry_run {
        ctx.say(format!("demote: done in {:.2} s", start.elapsed().as_secs_f64()));
    }
    Ok(())
}

/// `blockctl swap`: demote here, wait for the peer to be connected and UpToDate, ask it to
/// promote; if it cannot, promote here again. No write is lost: this node's demote stops the
/// services and unmounts (flushing) while the peer mirrors every write, and the peer promotes
/// only once it is UpToDate.
pub fn swap(ctx: &Arc<Ctx>, wait: Duration) -> Result<(), CommandError> {
    if ctx.config.is_single_node() {
        return Err(CommandError::Usage("swap needs a two-node configuration".into()));
    }
    require_daemon(ctx)?;
    // Before demoting: a peer that cannot take over now will not after, and the service
    // would be down for nothing.
    if let Err(why) = peer_ready(ctx) {
        return Err(CommandError::Usage(format!("swap refused before demoting: {why}")));
    }
    let start = Instant::now();
    ctx.say("swap: demote here");
    demote(ctx, None)?;
    let result = wait_for_peer(ctx, wait).and_then(|()| peer_promote(ctx));
    match result {
        Ok(()) => {
            ctx.say(format!("swap: done in {:.2} s", start.elapsed().as_secs_f64()));
            Ok(())
        }
        Err(why) => {
            ctx.say(format!("swap: {why}; promoting here again"));
            promote(ctx, None)?;
            Err(CommandError::SwapBack(why))
        }
    }
}

/// Ok when, by this daemon's status (which carries the peer's states), every volume is
/// connected to a peer whose disk is UpToDate.
fn peer_ready(ctx: &Ctx) -> Result<(), String> {
    let status = node::status(ctx).map_err(|e| e.to_string())?;
    for v in &status.volumes {
        if !node::connected(v) || v.peer_disk != Some(DiskState::UpToDate) {
            return Err(format!(
                "volume {}: peer {} is {:?} with disk {:?}, not Connected and UpToDate",
                v.name,
                v.peer.as_deref().unwrap_or("(none)"),
                v.conn,
                v.peer_disk
            ));
        }
    }
    Ok(())
}

/// Polls [`peer_ready`] until it holds or `wait` passes.
fn wait_for_peer(ctx: &Ctx, wait: Duration) -> Result<(), String> {
    ctx.say(format!("swap: waiting up to {wait:?} for the peer to be Connected and UpToDate"));
    let end = Instant::now() + wait;
    loop {
        match peer_ready(ctx) {
            Ok(()) => return Ok(()),
            Err(why) if Instant::now() >= end => return Err(why),
            Err(_) => thread::sleep(POLL),
        }
    }
}

/// Asks the peer, through this node's daemon, to run its promote plan; prints its output.
fn peer_promote(ctx: &Ctx) -> Result<(), String> {
    ctx.say("swap: asking the peer to promote");
    let mut client = Client::connect(&ctx.node.control_socket(), PEER_PROMOTE_WAIT)
        .map_err(|e| node::control_error(&e).to_string())?;
    match client.call(&Request::PeerPromote) {
        Ok(Reply::PeerPromoted { code, output }) => {
            for line in output.lines() {
                ctx.say(format!("  peer| {line}"));
            }
            match code {
                0 => Ok(()),
                c => Err(format!("the peer's promote failed (exit code {c})")),
            }
        }
        Ok(other) => Err(format!("unexpected answer to peer-promote: {other:?}")),
        Err(e) => Err(node::control_error(&e).to_string()),
    }
}

#[cfg(test)]
mod tests {
    use blockd::control::{ConnState, Role};

    use super::*;
    use crate::steps::testutil::ctx_for;

    const FULL: &str = r#"
        [node.a]
        [[volume]]
        name = "db"
        size = 4096
        filesystem = "ext4"
        mount = "/srv/db"
        [[volume]]
        name = "raw"
        size = 4096
        [[volume]]
        name = "nfs"
        size = 4096
        filesystem = "xfs"
        mount = "/srv/nfs"
        [[bind]]
        source = "/srv/nfs/state"
        target = "/var/lib/nfs"
        [vip]
        address = "10.9.9.9/24"
        interface = "eth0"
        [[service]]
        name = "mariadb"
        start = "a"
        stop = "b"
        [[service]]
        name = "nfs"
        unit = "nfs.service"
    "#;

    #[test]
    fn promote_plan_order() {
        let ctx = ctx_for(FULL);
        let want = [
            "check",
            "role",
            "attach db",
            "fsck db",
            "mount db",
            "attach nfs",
            "fsck nfs",
            "mount nfs",
            "bind /var/lib/nfs",
            "vip",
            "service mariadb",
            "service nfs",
        ];
        assert_eq!(promote_plan(&ctx.config).names(), want);
        assert_eq!(demote_plan(&ctx.config).names(), want[1..], "demote: no pre-flight");
    }

    #[test]
    fn steps_are_bounded_by_the_configured_deadlines() {
        let text = FULL.replace("name = \"mariadb\"", "name = \"mariadb\"\ntimeout = \"300s\"");
        let ctx = ctx_for(&format!("[failover]\nstep-timeout = \"200s\"\n{text}"));
        let plan = stack(&ctx.config);
        let bound = |name: &str| plan.iter().find(|s| s.name() == name).map(|s| s.timeout());
        assert_eq!(bound("attach db"), Some(Duration::from_secs(205)), "step-timeout + margin");
        assert_eq!(bound("fsck db"), Some(Duration::from_secs(600)), "fsck's own is longer");
        assert_eq!(bound("service mariadb"), Some(Duration::from_secs(620)), "2 × 300 + 20");
        assert_eq!(bound("service nfs"), Some(Duration::from_secs(420)), "2 × 200 + 20");
    }

    #[test]
    fn minimal_plan_is_check_and_role() {
        let ctx = ctx_for("[node.a]\n[[volume]]\nname = \"v\"\nsize = 4096\n");
        assert_eq!(promote_plan(&ctx.config).names(), ["check", "role"]);
    }

    #[test]
    fn exit_codes() {
        let unknown = PlanError::UnknownStep { name: "x".into(), steps: String::new() };
        assert_eq!(CommandError::from(unknown).exit_code(), EXIT_USAGE);
        let stopped = PlanError::DemoteStopped {
            step: "mount db".into(),
            source: crate::step::StepError::Other("busy".into()),
        };
        assert_eq!(CommandError::from(stopped).exit_code(), EXIT_LEFT_PRIMARY);
        let rolled = PlanError::RolledBack {
            step: "vip".into(),
            undone: vec![],
            source: crate::step::StepError::Other("x".into()),
        };
        assert_eq!(CommandError::from(rolled).exit_code(), EXIT_FAILED);
        assert_eq!(CommandError::SwapBack("x".into()).exit_code(), EXIT_FAILED);
    }

    /// A two-node context whose control socket is served by the fake daemon in `state`.
    fn with_fake(
        state: fake::State,
    ) -> (Arc<Ctx>, Arc<std::sync::Mutex<fake::State>>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().display().to_string();
        let text = format!(
            "[cluster]\nsecret-file = \"/s\"\n[node.a]\nreplication = \"127.0.0.1:1\"\n\
             run-dir = \"{run}\"\n[node.b]\nreplication = \"127.0.0.1:2\"\n\
             [[volume]]\nname = \"v\"\nsize = 4096\n"
        );
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        let config = Config::load(&path).unwrap();
        let node = config.local_node(Some("a")).unwrap();
        let state = Arc::new(std::sync::Mutex::new(state));
        fake::serve(&node.control_socket(), Arc::clone(&state));
        (Arc::new(Ctx { config, node, dry_run: false, force: false }), state, dir)
    }

    fn asked(state: &std::sync::Mutex<fake::State>) -> Vec<String> {
        let mut s = state.lock().unwrap();
        let mut asked = std::mem::take(&mut s.asked);
        asked.dedup(); // polls repeat "status"
        asked
    }

    #[test]
    fn promote_asks_for_primary_and_twice_is_harmless() {
        let (ctx, state, _dir) = with_fake(fake::State::default());
        promote(&ctx, None).unwrap();
        assert_eq!(asked(&state), ["status", "role Primary"]);
        promote(&ctx, None).unwrap();
        assert_eq!(asked(&state), ["status"], "already Primary: nothing asked");
    }

    #[test]
    fn promote_refuses_when_the_peer_is_primary() {
        let (ctx, state, _dir) =
            with_fake(fake::State { peer_role: Some(Role::Primary), ..Default::default() });
        let err = promote(&ctx, None).unwrap_err();
        assert_eq!(err.exit_code(), EXIT_FAILED);
        assert!(format!("{:#}", anyhow::Error::from(err)).contains("peer b is Primary"));
        assert!(!asked(&state).contains(&"role Primary".to_string()));
    }

    #[test]
    fn swap_demotes_then_the_peer_promotes() {
        let (ctx, state, _dir) =
            with_fake(fake::State { role: Role::Primary, ..Default::default() });
        swap(&ctx, Duration::from_secs(5)).unwrap();
        assert_eq!(asked(&state), ["status", "role Secondary", "status", "peer-promote"]);
        assert_eq!(state.lock().unwrap().role, Role::Secondary);
    }

    #[test]
    fn swap_promotes_here_again_when_the_peer_cannot() {
        let (ctx, state, _dir) = with_fake(fake::State {
            role: Role::Primary,
            peer_promote_code: 1,
            ..Default::default()
        });
        let err = swap(&ctx, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, CommandError::SwapBack(_)), "{err:?}");
        assert_eq!(err.exit_code(), EXIT_FAILED);
        let want = ["status", "role Secondary", "status", "peer-promote", "status", "role Primary"];
        assert_eq!(asked(&state), want);
        assert_eq!(state.lock().unwrap().role, Role::Primary);
    }

    #[test]
    fn swap_refuses_before_demoting_without_a_ready_peer() {
        let (ctx, state, _dir) = with_fake(fake::State {
            role: Role::Primary,
            conn: ConnState::Connecting,
            ..Default::default()
        });
        let err = swap(&ctx, Duration::from_secs(1)).unwrap_err();
        assert_eq!(err.exit_code(), EXIT_USAGE);
        assert_eq!(asked(&state), ["status"], "nothing demoted");
    }

    #[test]
    fn promote_without_a_daemon_exits_3() {
        let ctx = Arc::new(ctx_for(
            "[node.a]\nrun-dir = \"/nonexistent/blockctl\"\n[[volume]]\nname = \"v\"\nsize = 4096\n",
        ));
        assert_eq!(promote(&ctx, None).unwrap_err().exit_code(), EXIT_NOT_RUNNING);
        assert_eq!(demote(&ctx, None).unwrap_err().exit_code(), EXIT_NOT_RUNNING);
    }
}
