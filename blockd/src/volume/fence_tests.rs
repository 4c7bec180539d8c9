//! The write path under the witness fence (`crate::fence`): a degraded write is done and marked
//! here, but acknowledged only with a valid lease, or once its range was copied, or failed when
//! the volume is demoted; reads never wait.

use std::{sync::Arc, time::Duration};

use super::{
    tests::{data, volume},
    *,
};
use crate::{
    fence::Fence,
    role::Event,
    witness::{Lease, WitnessError},
};

const TERM: Duration = Duration::from_secs(3);

/// A forced Primary whose peer is gone, fenced by a fence that holds no lease yet.
async fn fenced_primary(dir: &tempfile::TempDir) -> (Arc<Volume>, Arc<Fence>) {
    let v = Arc::new(volume(dir, Some("beta")));
    let fence = Arc::new(Fence::new("127.0.0.1:7790".parse().unwrap()));
    v.set_fence(Arc::clone(&fence));
    v.transition(Event::Promote { force: true }, None).await.unwrap();
    (v, fence)
}

fn grant(f: &Fence, epoch: u64) {
    let now = tokio::time::Instant::now();
    f.record(Ok(Lease { epoch, term: TERM, valid_until: now + TERM - TERM / 10 }), now, true);
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn degraded_write_waits_for_the_lease_and_reads_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let (v, fence) = fenced_primary(&dir).await;
    let down = WitnessError::Timeout { addr: "127.0.0.1:7790".parse().unwrap(), after: TERM };
    fence.record(Err(down), tokio::time::Instant::now(), true);
    let w = tokio::spawn({
        let v = Arc::clone(&v);
        async move { v.write(0, data(5, 4096), false).await }
    });
    settle().await;
    assert!(!w.is_finished(), "no lease, no peer: not acknowledged");
    let st = v.status();
    let why = st.frozen.expect("status says frozen");
    assert!(why.contains("did not answer") && why.contains("1 writes waiting"), "{why}");
    assert_eq!(st.lease.expect("lease shown").valid_for_ms, 0);
    // The data is on the local disk and marked, and reads (of it, too) are served meanwhile.
    let r = v.read(0, 4096).await.unwrap();
    assert!(r.iter().all(|&b| b == 5));
    assert_eq!(v.dirty_bytes(), 4096);
    // A second write to the same range is not blocked behind the first's range lock.
    let w2 = tokio::spawn({
        let v = Arc::clone(&v);
        async move { v.write(0, data(6, 4096), false).await }
    });
    settle().await;
    assert!(v.status().frozen.unwrap().contains("2 writes waiting"));
    grant(&fence, 1);
    w.await.unwrap().unwrap();
    w2.await.unwrap().unwrap();
    assert!(v.status().frozen.is_none());
    // With the lease valid, degraded writes complete at once.
    v.write(8192, data(7, 4096), false).await.unwrap();
}

#[tokio::test]
async fn a_range_copied_to_the_peer_clears_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let (v, _fence) = fenced_primary(&dir).await;
    let w = tokio::spawn({
        let v = Arc::clone(&v);
        async move { v.write(4096, data(1, 4096), false).await }
    });
    settle().await;
    assert!(!w.is_finished());
    // What a resync does once the peer flushed the copied range.
    v.track.clear(0..8192);
    settle().await;
    assert!(w.is_finished(), "the peer has it: acknowledged");
    w.await.unwrap().unwrap();
}

#[tokio::test]
async fn demotion_fails_waiting_writes_unacknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (v, _fence) = fenced_primary(&dir).await;
    let w = tokio::spawn({
        let v = Arc::clone(&v);
        async move { v.write(0, data(1, 4096), false).await }
    });
    settle().await;
    v.transition(Event::Demote, None).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), w).await.expect("ends").unwrap();
    assert!(matches!(r, Err(VolumeError::NotPrimary)), "{r:?}");
}

#[tokio::test]
async fn without_a_fence_degraded_writes_complete_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let v = volume(&dir, Some("beta"));
    v.transition(Event::Promote { force: true }, None).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), v.write(0, data(1, 4096), false))
        .await
        .expect("not fenced")
        .unwrap();
    assert!(v.status().frozen.is_none() && v.status().lease.is_none());
}

#[tokio::test]
async fn a_lost_epoch_fails_waiting_and_new_degraded_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (v, fence) = fenced_primary(&dir).await;
    grant(&fence, 3);
    tokio::time::sleep(TERM).await; // expired by the local clock: the next write waits
    let w = tokio::spawn({
        let v = Arc::clone(&v);
        async move { v.write(0, data(1, 4096), false).await }
    });
    settle().await;
    assert!(!w.is_finished());
    let now = tokio::time::Instant::now();
    let refused = WitnessError::Refused {
        holder: Some("beta".into()),
        epoch: 4,
        retry_after: TERM,
        degraded: None,
    };
    fence.record(Err(refused), now, true);
    let r = tokio::time::timeout(Duration::from_secs(5), w).await.expect("ends").unwrap();
    assert!(matches!(r, Err(VolumeError::Fenced { epoch: 3 })), "{r:?}");
    let r = v.write(4096, data(1, 4096), false).await;
    assert!(matches!(r, Err(VolumeError::Fenced { epoch: 3 })), "{r:?}");
    assert_eq!(v.status().lease.unwrap().lost, Some(3));
}
