//! `node.rs` through the simulator: two real nodes over simulated pipes and model disks, one
//! situation per test, the node's answers asserted (exchange, promote and demote with a peer).

use std::time::Duration;

use tokio::time::sleep;

use super::cluster::{connect, SimNode, PEER_TIMEOUT, SIZE};
use super::disk::Fault;
use super::run::{block_bytes, block_id, BLOCK};
use crate::control::{ConnState, DiskState, ErrorKind, Role, VolumeStatus};
use crate::resync::Resolve;
use crate::storage::AlignedBuf;

struct Pair {
    nodes: [SimNode; 2],
    next: u64,
    _dir: tempfile::TempDir,
}

impl Pair {
    /// alpha and beta running, fresh (all zeroes), not connected yet.
    async fn new() -> Pair {
        crate::volume::META_INLINE.with(|c| c.set(true));
        let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).unwrap();
        let mut nodes =
            [SimNode::new("alpha", "beta", dir.path()), SimNode::new("beta", "alpha", dir.path())];
        for (i, n) in nodes.iter_mut().enumerate() {
            n.start(vec![0; SIZE as usize], i as u64 + 1).await.unwrap();
        }
        Pair { nodes, next: 1, _dir: dir }
    }

    /// A new session between the two (as the link manager's redial), then a while for the
    /// state exchange and any resync.
    async fn link(&mut self) {
        let id = self.next;
        self.next += 1;
        let [a, b] = &mut self.nodes;
        assert!(connect(a.up.as_mut().unwrap(), b.up.as_mut().unwrap(), id, id).await);
        sleep(Duration::from_secs(2)).await;
    }

    /// Both directions held until the session times out on both sides.
    async fn partition(&mut self) {
        for p in &self.nodes[0].up.as_ref().unwrap().pipes {
            p.hold(true);
        }
        sleep(PEER_TIMEOUT * 2).await;
        self.nodes.iter_mut().for_each(SimNode::reap);
    }

    fn status(&self, i: usize) -> VolumeStatus {
        self.nodes[i].up.as_ref().unwrap().volume.status()
    }

    async fn role(&self, i: usize, role: Role, force: bool) -> Result<(), (ErrorKind, String)> {
        self.nodes[i].up.as_ref().unwrap().node.set_role(None, role, force).await
    }

    async fn write(&self, i: usize, block: u64, id: u64) -> Result<(), String> {
        let v = &self.nodes[i].up.as_ref().unwrap().volume;
        let data = AlignedBuf::copy_from(&block_bytes(id, block));
        v.write(block * BLOCK, data, false).await.map_err(|e| e.to_string())
    }

    /// The write id block `block` holds on node `i`'s disk.
    fn holds(&self, i: usize, block: u64) -> u64 {
        block_id(&self.nodes[i].up.as_ref().unwrap().disk.read(block * BLOCK, BLOCK as usize))
    }
}

#[tokio::test(start_paused = true)]
async fn the_exchange_of_fresh_nodes_finds_them_in_sync() {
    let mut p = Pair::new().await;
    p.link().await;
    for i in 0..2 {
        let s = p.status(i);
        assert_eq!(
            (s.conn, s.disk, s.peer_disk),
            (ConnState::Connected, DiskState::UpToDate, Some(DiskState::UpToDate))
        );
        assert_eq!((s.role, s.peer_role), (Role::Secondary, Some(Role::Secondary)));
    }
}

#[tokio::test(start_paused = true)]
async fn a_connected_peer_is_asked_and_a_second_primary_refused() {
    let mut p = Pair::new().await;
    p.link().await;
    p.role(0, Role::Primary, false).await.unwrap();
    assert_eq!(p.status(1).peer_role, Some(Role::Primary), "the peer was told");
    let e = p.role(1, Role::Primary, false).await.unwrap_err();
    assert_eq!(e.0, ErrorKind::PeerPrimary, "{e:?}");
    assert_eq!(p.status(1).role, Role::Secondary);
}

#[tokio::test(start_paused = true)]
async fn without_its_peer_a_node_is_promoted_only_with_force() {
    let p = Pair::new().await;
    let e = p.role(0, Role::Primary, false).await.unwrap_err();
    assert_eq!(e.0, ErrorKind::PeerUnreachable, "{e:?}");
    p.role(0, Role::Primary, true).await.unwrap();
    assert_eq!(p.status(0).role, Role::Primary);
}

#[tokio::test(start_paused = true)]
async fn demote_flushes_both_and_the_peer_promotes_without_force() {
    let mut p = Pair::new().await;
    p.link().await;
    p.role(0, Role::Primary, false).await.unwrap();
    p.write(0, 7, 1).await.unwrap();
    p.role(0, Role::Secondary, false).await.unwrap();
    assert_eq!(p.status(1).peer_role, Some(Role::Secondary));
    p.role(1, Role::Primary, false).await.unwrap();
    assert_eq!(p.holds(1, 7), 1, "the new Primary has the write");
    // The demote's flush made it durable on beta: a power cut there keeps it.
    let (image, _, _) = p.nodes[1].power_cut(&mut super::Rng::new(3)).unwrap();
    assert_eq!(block_id(&image[7 * BLOCK as usize..]), 1);
}

#[tokio::test(start_paused = true)]
async fn after_a_partition_the_exchange_makes_the_primary_the_source() {
    let mut p = Pair::new().await;
    p.link().await;
    p.role(0, Role::Primary, false).await.unwrap();
    p.partition().await;
    assert_eq!(p.status(0).conn, ConnState::Connecting);
    p.write(0, 3, 1).await.unwrap(); // degraded: marked, new generation
    assert!(p.status(0).out_of_sync > 0);
    assert_eq!(p.holds(1, 3), 0);
    p.link().await;
    sleep(Duration::from_secs(3)).await;
    let (a, b) = (p.status(0), p.status(1));
    assert_eq!((a.conn, b.conn), (ConnState::Connected, ConnState::Connected));
    assert_eq!((a.out_of_sync, b.disk), (0, DiskState::UpToDate));
    assert_eq!(p.holds(1, 3), 1, "the resync copied the degraded write");
}

#[tokio::test(start_paused = true)]
async fn a_split_brain_copies_nothing_until_one_side_discards() {
    let mut p = Pair::new().await;
    p.link().await;
    p.role(0, Role::Primary, false).await.unwrap();
    p.partition().await;
    p.role(1, Role::Primary, true).await.unwrap();
    p.write(0, 5, 1).await.unwrap();
    p.write(1, 5, 2).await.unwrap();
    p.link().await;
    for i in 0..2 {
        assert_ne!(p.status(i).conn, ConnState::Connected, "split brain: not replicating");
    }
    assert_eq!((p.holds(0, 5), p.holds(1, 5)), (1, 2), "nothing copied");
    p.role(1, Role::Secondary, false).await.unwrap();
    p.nodes[1].up.as_ref().unwrap().node.resolve(None, Resolve::DiscardLocal).await.unwrap();
    p.nodes.iter_mut().for_each(SimNode::reap);
    p.link().await;
    sleep(Duration::from_secs(3)).await;
    assert_eq!(p.status(1).conn, ConnState::Connected);
    assert_eq!(p.status(1).out_of_sync, 0);
    assert_eq!(p.holds(1, 5), 1, "beta took alpha's data");
}

/// A resync's checkpoint where both flushes fail (the peer's and this node's own): the local
/// failure is this node's to account for even though the peer's answered first. Its disk is
/// Failed: what it sent may never have reached its platter, so no bit may clear on its word.
#[tokio::test(start_paused = true)]
async fn a_checkpoint_whose_flushes_both_fail_fails_the_source_disk_too() {
    let mut p = Pair::new().await;
    p.link().await;
    p.role(0, Role::Primary, false).await.unwrap();
    p.partition().await;
    p.write(0, 3, 1).await.unwrap();
    p.nodes[0].up.as_ref().unwrap().volume.flush().await.unwrap();
    for n in &p.nodes {
        n.up.as_ref().unwrap().disk.fault(Fault::FlushErrors);
    }
    p.link().await;
    sleep(Duration::from_secs(3)).await;
    let (a, b) = (p.status(0), p.status(1));
    assert_eq!(b.disk, DiskState::Failed, "the target's flush failed: {b:?}");
    assert_eq!(a.disk, DiskState::Failed, "the source's own flush failed too: {a:?}");
    assert!(a.out_of_sync > 0, "no bit cleared on a failed checkpoint: {a:?}");
}
