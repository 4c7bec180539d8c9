//! The operator MODEL: what a careful administrator does, and nothing cleverer.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::timeout;

use super::run::{lock, World};
use crate::control::{ConnState, DiskState, ErrorKind, Role};
use crate::resync::Resolve;

const WAIT: Duration = Duration::from_secs(8);
const OPERATOR_LATER: Duration = Duration::from_secs(30);

impl World {
    /// Keeps one Primary, promoting only a node that holds the newest data (with --force only
    /// when its peer is powered off), the lower name first; moves the service off a Failed
    /// disk and replaces a Failed Secondary's disk.
    pub(super) async fn operator(&mut self) {
        self.observe_newest();
        for i in 0..2 {
            let failed = self.nodes[i].up.as_ref().is_some_and(|u| {
                let m = u.volume.machine();
                m.disk == DiskState::Failed && m.role == Role::Secondary
            });
            if failed {
                self.replace_disk(i).await;
            }
        }
        if let Some(p) = self.primary() {
            self.move_off_failed(p).await;
            return;
        }
        for i in 0..2 {
            let Some(up) = self.nodes[i].up.as_ref() else { continue };
            let m = up.volume.machine();
            if !self.newest.contains(&i) || m.disk != DiskState::UpToDate {
                continue;
            }
            let peer_off = self.nodes[1 - i].up.is_none();
            if !peer_off && m.conn != ConnState::Connected {
                continue;
            }
            if peer_off && self.witness.is_some() && !self.operator_may_force(1 - i) {
                // Automatic failover is the agent's; the operator steps in only later.
                continue;
            }
            let node = Arc::clone(&up.node);
            let r = timeout(WAIT, node.set_role(None, Role::Primary, peer_off)).await;
            let name = self.nodes[i].name;
            let how = if peer_off { "promote --force" } else { "promote" };
            match r {
                Ok(Ok(())) => self.note(format!("operator: {how} {name}: ok")),
                Ok(Err((_, why))) => self.note(format!("operator: {how} {name}: refused: {why}")),
                Err(_) => self.note(format!("operator: {how} {name}: no answer")),
            }
            return;
        }
    }

    /// With a witness the operator forces a promotion only once the peer has been off for
    /// [`OPERATOR_LATER`] (the agent promotes sooner when the witness allows it).
    fn operator_may_force(&self, off: usize) -> bool {
        self.off_since[off].is_some_and(|t| t.elapsed() >= OPERATOR_LATER)
    }

    /// A Failed Secondary's disk is replaced: blockd stopped (a power cut), started on the
    /// repaired disk, and `blockctl resolve` before it connects (a full resync target).
    async fn replace_disk(&mut self, i: usize) {
        let name = self.nodes[i].name;
        let Some((image, _, _)) = self.nodes[i].power_cut(&mut self.rng) else { return };
        let seed = self.rng.next();
        if let Err(e) = self.nodes[i].start(image, seed).await {
            self.note(format!("operator: replace the disk of {name}: restart failed: {e}"));
            return;
        }
        let Some(up) = self.nodes[i].up.as_ref() else { return };
        let r = up.node.resolve(None, Resolve::DiscardLocal).await;
        self.note(format!(
            "operator: replace the disk of {name}, resolve: {:?}",
            r.map_err(|e| e.1)
        ));
    }

    /// A Primary whose disk is Failed hands the service to its peer once that is Connected,
    /// Secondary and UpToDate (the agent's row 12).
    async fn move_off_failed(&mut self, p: usize) {
        let (Some(a), Some(b)) = (self.nodes[p].up.as_ref(), self.nodes[1 - p].up.as_ref()) else {
            return;
        };
        let (ma, mb) = (a.volume.machine(), b.volume.machine());
        if ma.disk != DiskState::Failed
            || ma.conn != ConnState::Connected
            || mb.disk != DiskState::UpToDate
            || *lock(&self.pending) > 0
        {
            return;
        }
        self.newest = BTreeSet::from([1 - p]);
        self.switch(p, "swap off a Failed disk").await;
    }

    /// A planned switchover, when in sync: demote the Primary, promote its peer.
    pub(super) async fn swap(&mut self) {
        let Some(p) = self.primary() else { return };
        if !self.in_sync() || *lock(&self.pending) > 0 {
            return;
        }
        self.switch(p, "swap").await;
    }

    async fn switch(&mut self, p: usize, what: &str) {
        let (Some(a), Some(b)) = (self.nodes[p].up.as_ref(), self.nodes[1 - p].up.as_ref()) else {
            return;
        };
        let (from, to) = (Arc::clone(&a.node), Arc::clone(&b.node));
        let demoted = timeout(WAIT, from.set_role(None, Role::Secondary, false)).await;
        let promoted = match demoted {
            Ok(Ok(())) => timeout(WAIT, to.set_role(None, Role::Primary, false)).await,
            _ => Ok(Err((ErrorKind::Internal, "demote failed".into()))),
        };
        let names = (self.nodes[p].name, self.nodes[1 - p].name);
        self.note(format!(
            "operator: {what} {} -> {}: {:?}",
            names.0,
            names.1,
            promoted.map(|r| r.map_err(|e| e.1))
        ));
    }
}
