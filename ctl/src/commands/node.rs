//! The two steps that talk to this node's daemon over the control socket: `check` (the
//! pre-flight of promote) and `role` (blockd → Primary; undone: → Secondary).

use std::time::Duration;

use blockd::control::{Client, ConnState, DiskState, NodeStatus, Request, Role, VolumeStatus};

use crate::step::{Ctx, Step, StepError};

/// Reads and writes on the control socket wait this long. A role change asks the peer, which
/// answers within the cluster's peer-timeout; this leaves room for it.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(20);

/// `check`: refuses a promotion that would lose data or split the cluster.
///
/// apply (not check: so the pre-flight gets its own log line and duration) asks the daemon for
/// its status and refuses when a local disk is not UpToDate, when the peer is Primary, or when
/// the peer is not connected, unless `--force`. A node that is Primary on every volume passes:
/// promote again is a no-op there, even after a forced failover with the peer still gone.
/// undo does nothing.
#[derive(Debug)]
pub struct Check;

impl Step for Check {
    fn name(&self) -> String {
        "check".into()
    }

    fn describe(&self, _: &Ctx) -> String {
        "status over the control socket: local disks UpToDate, peer not Primary, peer \
         connected (or --force)"
            .into()
    }

    fn check(&self, _: &Ctx) -> Result<bool, StepError> {
        Ok(false)
    }

    fn apply(&self, ctx: &Ctx) -> Result<(), StepError> {
        let status = status(ctx)?;
        if all_primary(&status) {
            ctx.say("check: already Primary on every volume");
            return Ok(());
        }
        for v in &status.volumes {
            preflight(ctx, v)?;
        }
        Ok(())
    }

    fn undo(&self, _: &Ctx) -> Result<(), StepError> {
        Ok(())
    }

    fn timeout(&self) -> Duration {
        CONTROL_TIMEOUT + Duration::from_secs(5)
    }
}

/// The pre-flight of one volume.
fn preflight(ctx: &Ctx, v: &VolumeStatus) -> Result<(), StepError> {
    let refuse = |why: String| Err(StepError::Other(format!("volume {}: {why}", v.name)));
    if v.disk != DiskState::UpToDate {
        return refuse(format!("the local disk is {:?}, not UpToDate", v.disk));
    }
    if v.peer_role == Some(Role::Primary) {
        return refuse(format!("the peer {} is Primary: demote it first", peer(v)));
    }
    if ctx.config.is_single_node() || connected(v) {
        return Ok(());
    }
    if v.split_brain && !ctx.force {
        return refuse(format!(
            "split brain with the peer {}: both nodes wrote since they were last in sync. On \
             the node whose changes lose: blockctl demote, then blockctl resolve \
             --discard-local; or promote --force to go on alone",
            peer(v)
        ));
    }
    if !ctx.force {
        return refuse(format!(
            "the peer {} is not connected ({:?}); if it is really down, promote --force",
            peer(v),
            v.conn
        ));
    }
    ctx.say(format!(
        "check: FORCED: volume {} promoted although the peer {} is not connected ({:?})",
        v.name,
        peer(v),
        v.conn
    ));
    Ok(())
}

/// The replication link is up for `v` (resyncing from here counts: writes are mirrored).
pub fn connected(v: &VolumeStatus) -> bool {
    matches!(v.conn, ConnState::Connected | ConnState::SyncSource)
}

fn peer(v: &VolumeStatus) -> &str {
    v.peer.as_deref().unwrap_or("(none)")
}

fn all_primary(s: &NodeStatus) -> bool {
    !s.volumes.is_empty() && s.volumes.iter().all(|v| v.role == Role::Primary)
}

/// `role`: the daemon makes every volume Primary (undo: Secondary).
#[derive(Debug)]
pub struct RoleStep;

impl Step for RoleStep {
    fn name(&self) -> String {
        "role".into()
    }

    fn describe(&self, ctx: &Ctx) -> String {
        let force = if ctx.force { ", force" } else { "" };
        format!("control socket: role Primary{force} (undo: role Secondary)")
    }

    fn check(&self, ctx: &Ctx) -> Result<bool, StepError> {
        Ok(all_primary(&status(ctx)?))
    }

    fn apply(&self, ctx: &Ctx) -> Result<(), StepError> {
        // On a single node the daemon has no peer to ask and promotes without --force.
        set_role(ctx, Role::Primary, ctx.force)
    }

    fn undo(&self, ctx: &Ctx) -> Result<(), StepError> {
        set_role(ctx, Role::Secondary, false)
    }

    fn timeout(&self) -> Duration {
        CONTROL_TIMEOUT + Duration::from_secs(5)
    }
}

fn set_role(ctx: &Ctx, role: Role, force: bool) -> Result<(), StepError> {
    ctx.say(format!("control: role {role:?}{}", if force { " --force" } else { "" }));
    client(ctx)?
        .call(&Request::Role { role, force, volume: None })
        .map(drop)
        .map_err(|e| control_error(&e))
}

/// This node's status over its control socket.
pub fn status(ctx: &Ctx) -> Result<NodeStatus, StepError> {
    client(ctx)?.status().map_err(|e| control_error(&e))
}

fn client(ctx: &Ctx) -> Result<Client, StepError> {
    Client::connect(&ctx.node.control_socket(), CONTROL_TIMEOUT).map_err(|e| control_error(&e))
}

/// The error and its causes on one line.
pub fn control_error(e: &dyn std::error::Error) -> StepError {
    StepError::Other(format!("control socket: {}", super::chain(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::testutil::ctx_for;

    const TWO: &str = "[cluster]\nsecret-file = \"/s\"\n\
        [node.a]\nreplication = \"127.0.0.1:1\"\n[node.b]\nreplication = \"127.0.0.1:2\"\n\
        [[volume]]\nname = \"v\"\nsize = 4096\n";

    fn vol(disk: DiskState, conn: ConnState, peer_role: Option<Role>) -> VolumeStatus {
        super::super::fake::volume(disk, conn, Role::Secondary, peer_role)
    }

    fn two_nodes(force: bool) -> Ctx {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, TWO).unwrap();
        let config = blockd::config::Config::load(&path).unwrap();
        let node = config.local_node(Some("a")).unwrap();
        Ctx { config, node, dry_run: false, force }
    }

    #[test]
    fn preflight_refuses_a_disk_not_up_to_date() {
        let err =
            preflight(&two_nodes(true), &vol(DiskState::Outdated, ConnState::Connected, None));
        assert!(err.unwrap_err().to_string().contains("Outdated"));
    }

    #[test]
    fn preflight_refuses_a_primary_peer_even_forced() {
        let v = vol(DiskState::UpToDate, ConnState::Connected, Some(Role::Primary));
        let err = preflight(&two_nodes(true), &v).unwrap_err().to_string();
        assert!(err.contains("peer b is Primary"), "{err}");
    }

    #[test]
    fn preflight_needs_force_without_the_peer() {
        let v = vol(DiskState::UpToDate, ConnState::Connecting, None);
        let err = preflight(&two_nodes(false), &v).unwrap_err().to_string();
        assert!(err.contains("--force") && err.contains("Connecting"), "{err}");
        assert!(preflight(&two_nodes(true), &v).is_ok());
        let ok = vol(DiskState::UpToDate, ConnState::Connected, Some(Role::Secondary));
        assert!(preflight(&two_nodes(false), &ok).is_ok());
    }

    #[test]
    fn preflight_names_a_split_brain() {
        let mut v = vol(DiskState::UpToDate, ConnState::StandAlone, Some(Role::Primary));
        v.peer_role = None;
        v.conn_reason = Some(format!("{} (both are Primary)", blockd::role::SPLIT_BRAIN));
        v.split_brain = true;
        let err = preflight(&two_nodes(false), &v).unwrap_err().to_string();
        assert!(err.contains("split brain") && err.contains("resolve --discard-local"), "{err}");
        assert!(preflight(&two_nodes(true), &v).is_ok(), "--force goes on alone");
    }

    #[test]
    fn single_node_needs_no_peer() {
        let ctx = ctx_for("[node.a]\n[[volume]]\nname = \"v\"\nsize = 4096\n");
        let v = vol(DiskState::UpToDate, ConnState::StandAlone, None);
        assert!(preflight(&ctx, &v).is_ok());
    }

    #[test]
    fn without_a_daemon_the_steps_fail_cleanly() {
        let ctx = ctx_for("[node.a]\nrun-dir = \"/nonexistent/blockctl\"\n[[volume]]\nname = \"v\"\nsize = 4096\n");
        let err = Check.apply(&ctx).unwrap_err().to_string();
        assert!(err.contains("control socket") && err.contains("/nonexistent/blockctl"), "{err}");
        assert!(RoleStep.check(&ctx).is_err());
        assert!(Check.undo(&ctx).is_ok(), "the pre-flight has nothing to undo");
    }
}
