//! The checker: the invariants asserted after every step (the module doc lists them).

use super::run::{lock, World, BLOCK};
use crate::control::{ConnState, DiskState, Role};

impl World {
    pub(super) fn check(&mut self) -> Result<(), String> {
        self.observe_newest();
        let primaries = (0..2)
            .filter(|&i| {
                self.nodes[i].up.as_ref().is_some_and(|u| u.volume.machine().role == Role::Primary)
            })
            .count();
        // With a witness an old Primary may stay Primary, its degraded writes frozen, after
        // the peer's agent promoted (it acknowledges nothing: invariant 5 checks that).
        if primaries > 1 && self.witness.is_none() {
            return Err("two running Primaries".into());
        }
        if *lock(&self.pending) == 0 {
            self.check_pair()?;
        }
        self.check_primary()
    }

    /// Invariants 1 and 4: between the two running disks, with no client request in flight.
    fn check_pair(&self) -> Result<(), String> {
        let (Some(a), Some(b)) = (self.nodes[0].up.as_ref(), self.nodes[1].up.as_ref()) else {
            return Ok(());
        };
        let Some(at) = a.disk.first_difference(&b.disk, BLOCK as usize) else { return Ok(()) };
        let describe = |at: u64| {
            let (x, y) = (a.disk.block_id(at, BLOCK), b.disk.block_id(at, BLOCK));
            format!("block {at} differs: alpha has w{x}, beta has w{y}")
        };
        if self.in_sync() {
            return Err(format!("both in sync, but {}", describe(at as u64)));
        }
        // An Inconsistent disk says on disk that all of it may differ.
        let inconsistent =
            [a, b].iter().any(|u| u.volume.machine().disk == DiskState::Inconsistent);
        if inconsistent {
            return Ok(());
        }
        for block in a.disk.differences(&b.disk, BLOCK as usize, at) {
            let range = block * BLOCK..(block + 1) * BLOCK;
            if !a.volume.marks_cover(range.clone()) && !b.volume.marks_cover(range) {
                return Err(format!(
                    "{}, and neither node's bitmap or activity log covers it",
                    describe(block)
                ));
            }
        }
        Ok(())
    }

    /// Invariant 2: every write acknowledged before a completed flush is on the Primary.
    fn check_primary(&self) -> Result<(), String> {
        let Some(p) = self.serving_primary() else { return Ok(()) };
        let Some(mut up) = self.nodes[p].up.as_ref() else { return Ok(()) };
        if up.volume.machine().disk == DiskState::Failed {
            // A Failed Primary serves from its peer: its own disk lags by design (marked).
            match self.nodes[1 - p].up.as_ref() {
                Some(peer) if up.volume.machine().conn == ConnState::Connected => up = peer,
                _ => return Ok(()),
            }
        }
        for (&block, &want) in &self.required {
            let got = up.disk.block_id(block, BLOCK);
            let later = self.issued.get(&block).is_some_and(|ids| ids.contains(&got));
            if got < want || !later {
                return Err(format!(
                    "Primary {} lost block {block}: w{want} was acknowledged and flushed, the disk has w{got}",
                    self.nodes[p].name
                ));
            }
        }
        Ok(())
    }

    /// The Primary that acknowledges writes: without a witness the one Primary; with one, a
    /// Primary that is connected or holds a valid lease. An old Primary whose degraded writes
    /// are frozen (no lease) may stay Primary beside a promoted peer and serves reads that may
    /// be stale (design.md §7, "reads go on"; the simulator's seed 360): not checked here.
    pub(super) fn serving_primary(&self) -> Option<usize> {
        (0..2).find(|&i| {
            self.nodes[i].up.as_ref().is_some_and(|u| {
                let m = u.volume.machine();
                let lease = || {
                    let now = tokio::time::Instant::now();
                    u.node.fence().is_some_and(|f| f.valid(now).is_some())
                };
                m.role == Role::Primary
                    && (self.witness.is_none() || m.conn == ConnState::Connected || lease())
            })
        })
    }

    /// Who holds every acknowledged write: the Primary, and a peer in sync with it.
    pub(super) fn observe_newest(&mut self) {
        let Some(p) = self.primary() else { return };
        let mut newest = std::collections::BTreeSet::from([p]);
        if self.in_sync() {
            newest.insert(1 - p);
        }
        let failed = self.nodes[p].up.as_ref().is_some_and(|u| {
            let m = u.volume.machine();
            m.disk == DiskState::Failed && m.conn == ConnState::Connected
        });
        if failed {
            // A Failed Primary writes to its peer only.
            newest = std::collections::BTreeSet::from([1 - p]);
        }
        self.newest = newest;
    }

    /// Both running, Connected, UpToDate, nothing out of sync, no resync.
    pub(super) fn in_sync(&self) -> bool {
        self.nodes.iter().all(|n| {
            n.up.as_ref().is_some_and(|u| {
                let s = u.volume.status();
                s.conn == ConnState::Connected
                    && s.disk == DiskState::UpToDate
                    && s.peer_disk == Some(DiskState::UpToDate)
                    && s.out_of_sync == 0
                    && s.resync.is_none()
            })
        })
    }
}
