//! The fence with paused time: when a waiting write clears, and how the lease task reacts to
//! each answer of the witness.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
};

use super::*;
use crate::witness::ClientSettings;

const TERM: Duration = Duration::from_secs(3);

fn addr() -> SocketAddr {
    "127.0.0.1:7790".parse().unwrap()
}

fn lease(epoch: u64, from: Instant) -> Lease {
    Lease { epoch, term: TERM, valid_until: from + TERM - TERM / 10 }
}

fn down() -> WitnessError {
    WitnessError::Timeout { addr: addr(), after: Duration::from_secs(1) }
}

fn refused(holder: &str) -> WitnessError {
    WitnessError::Refused {
        holder: Some(holder.into()),
        epoch: 9,
        retry_after: TERM,
        degraded: None,
    }
}

/// Row 1 and the lease's end by this node's own clock.
#[tokio::test(start_paused = true)]
async fn a_valid_lease_clears_at_once_and_ends_by_the_local_clock() {
    let f = Fence::new(addr());
    let now = Instant::now();
    assert_eq!(f.record(Ok(lease(4, now)), now, false), TERM / 3, "renew every third of the term");
    assert_eq!(f.wait(None, || None::<()>).await, Cleared::Lease(4));
    assert!(f.frozen_reason(Instant::now()).is_none());
    tokio::time::advance(TERM - TERM / 10 - Duration::from_millis(1)).await;
    assert!(f.valid(Instant::now()).is_some(), "still valid 1 ms before its end");
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(f.valid(Instant::now()).is_none(), "over at sent + term - margin");
    let why = f.frozen_reason(Instant::now()).expect("frozen");
    assert!(why.contains("no valid witness lease"), "{why}");
}

/// Row 4 then 1: a write waits (counted) until a lease arrives, however long.
#[tokio::test(start_paused = true)]
async fn a_write_waits_without_a_lease_until_one_is_granted() {
    let f = Arc::new(Fence::new(addr()));
    assert_eq!(f.record(Err(down()), Instant::now(), false), RETRY);
    let waiter = tokio::spawn({
        let f = Arc::clone(&f);
        async move { f.wait(None, || None::<()>).await }
    });
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(!waiter.is_finished(), "nothing acknowledged without a lease");
    assert_eq!(f.waiting(), 1);
    let why = f.frozen_reason(Instant::now()).unwrap();
    assert!(why.contains("did not answer") && why.contains("1 writes waiting"), "{why}");
    f.record(Ok(lease(7, Instant::now())), Instant::now(), false);
    assert_eq!(waiter.await.unwrap(), Cleared::Lease(7));
    assert_eq!(f.waiting(), 0);
}

/// Rows 2 and 3: the caller's condition (range copied, or demoted) ends the wait.
#[tokio::test(start_paused = true)]
async fn the_callers_condition_ends_the_wait_within_a_poll() {
    let f = Arc::new(Fence::new(addr()));
    let copied = Arc::new(AtomicBool::new(false));
    let waiter = tokio::spawn({
        let (f, copied) = (Arc::clone(&f), Arc::clone(&copied));
        async move { f.wait(None, || copied.load(Ordering::SeqCst).then_some("copied")).await }
    });
    tokio::time::sleep(POLL * 10).await;
    assert!(!waiter.is_finished());
    copied.store(true, Ordering::SeqCst);
    tokio::time::sleep(POLL).await;
    assert!(waiter.is_finished(), "seen within one poll");
    assert_eq!(waiter.await.unwrap(), Cleared::Other("copied"));
}

/// An expired lease does not clear a write; its renewal does.
#[tokio::test(start_paused = true)]
async fn an_expired_lease_does_not_clear_but_its_renewal_does() {
    let f = Arc::new(Fence::new(addr()));
    f.record(Ok(lease(2, Instant::now())), Instant::now(), false);
    tokio::time::advance(TERM).await;
    let waiter = tokio::spawn({
        let f = Arc::clone(&f);
        async move { f.wait(None, || None::<()>).await }
    });
    tokio::time::sleep(TERM * 5).await;
    assert!(!waiter.is_finished());
    f.record(Ok(lease(2, Instant::now())), Instant::now(), false);
    assert_eq!(waiter.await.unwrap(), Cleared::Lease(2));
}

/// Lost epochs: superseded or refused while holding, no later grant is used before a reset.
#[tokio::test(start_paused = true)]
async fn a_lost_epoch_freezes_until_the_role_changes() {
    for loss in ["superseded", "refused"] {
        let f = Fence::new(addr());
        let now = Instant::now();
        f.record(Ok(lease(3, now)), now, false);
        let err = match loss {
            "superseded" => WitnessError::Superseded { had: 3, now: lease(5, now) },
            _ => refused("beta"),
        };
        f.record(Err(err), now, false);
        assert!(f.is_lost(), "{loss}");
        assert!(f.valid(now).is_none(), "{loss}: the lease is gone at once");
        f.record(Ok(lease(6, now)), now, false);
        assert!(f.valid(now).is_none(), "{loss}: a later grant is not taken back");
        let s = f.status("alpha", now);
        assert_eq!(s.lost, Some(3), "{loss}");
        f.mirroring(0);
        assert!(!f.is_lost(), "{loss}: mirroring to a Secondary peer again ends the loss");
        f.record(Err(refused("beta")), now, false);
        assert!(!f.is_lost(), "{loss}: refused while holding nothing is no loss");
        f.record(Ok(lease(6, now)), now, false);
        f.record(Err(refused("beta")), now, false);
        assert!(f.is_lost());
        f.reset();
        assert!(!f.is_lost());
        f.record(Ok(lease(6, now)), now, false);
        assert_eq!(f.valid(now).map(|l| l.epoch), Some(6), "{loss}: fresh after a role change");
    }
}

/// Refused without holding anything: not a loss, the holder is shown.
#[tokio::test(start_paused = true)]
async fn refused_before_holding_names_the_holder() {
    let f = Fence::new(addr());
    let now = Instant::now();
    f.record(Err(refused("beta")), now, false);
    assert!(!f.is_lost());
    let s = f.status("alpha", now);
    assert_eq!(s.holder.as_deref(), Some("beta"));
    assert_eq!((s.epoch, s.valid_for_ms), (None, 0));
    f.record(Ok(lease(1, now)), now, false);
    let s = f.status("alpha", now);
    assert_eq!((s.holder.as_deref(), s.epoch), (Some("alpha"), Some(1)));
    assert_eq!(s.valid_for_ms, (TERM - TERM / 10).as_millis() as u64);
}

/// A holder that renewed as not degraded while this node was Primary, then as degraded, is
/// writing without this node: a loss (the simulator's seed 360). Degraded from the start (it
/// was degraded before this node was promoted): not a loss, the lease follows when it ends.
#[tokio::test(start_paused = true)]
async fn a_holder_turning_degraded_while_this_node_is_primary_is_a_loss() {
    let refused_as = |degraded| WitnessError::Refused {
        holder: Some("alpha".into()),
        epoch: 1,
        retry_after: TERM,
        degraded: Some(degraded),
    };
    let now = Instant::now();
    let f = Fence::new(addr());
    f.record(Err(refused_as(false)), now, true);
    assert!(!f.is_lost(), "an old Primary's lease still running after a switchover");
    f.record(Err(refused_as(true)), now, true);
    assert!(f.is_lost(), "it went on as a degraded Primary");
    f.record(Ok(lease(2, now)), now, true);
    assert!(f.valid(now).is_none(), "no later epoch acknowledges anything");
    f.reset();
    assert!(!f.is_lost(), "a role change starts afresh");

    let f = Fence::new(addr());
    f.record(Err(refused_as(true)), now, true);
    f.record(Err(refused_as(true)), now, true);
    assert!(!f.is_lost(), "degraded before this node was promoted: the operator's choice");
    f.record(Ok(lease(2, now)), now, true);
    assert!(f.valid(now).is_some());
}

/// The lease task: asks every third of the term while Primary, nothing while Secondary, and
/// forgets the lease when the node is no longer Primary.
#[tokio::test(start_paused = true)]
async fn keep_lease_renews_only_while_primary() {
    let f = Arc::new(Fence::new(addr()));
    let primary = Arc::new(AtomicBool::new(true));
    let asked = Arc::new(AtomicU32::new(0));
    let witness_up = Arc::new(AtomicBool::new(true));
    let client = LeaseClient::new(addr(), "alpha", Arc::from(&b"s"[..]), ClientSettings::default());
    let token = CancellationToken::new();
    let task = tokio::spawn({
        let (f, primary, asked, up, token) = (
            Arc::clone(&f),
            Arc::clone(&primary),
            Arc::clone(&asked),
            Arc::clone(&witness_up),
            token.clone(),
        );
        async move {
            let ask = move |_c: LeaseClient, held: Option<Lease>, _degraded: bool| {
                asked.fetch_add(1, Ordering::SeqCst);
                let up = up.load(Ordering::SeqCst);
                async move {
                    match up {
                        true => Ok(lease(held.map_or(1, |l| l.epoch), Instant::now())),
                        false => Err(down()),
                    }
                }
            };
            keep_lease(&f, client, || primary.load(Ordering::SeqCst), ask, token).await;
        }
    });
    tokio::time::sleep(TERM * 3 + Duration::from_millis(10)).await;
    assert_eq!(asked.load(Ordering::SeqCst), 10, "at 0, 1s, ..., 9s");
    assert!(f.valid(Instant::now()).is_some());
    // The witness goes away: the lease runs out by the local clock, writes would wait.
    witness_up.store(false, Ordering::SeqCst);
    tokio::time::sleep(TERM).await;
    assert!(f.valid(Instant::now()).is_none());
    assert!(f.frozen_reason(Instant::now()).is_some());
    witness_up.store(true, Ordering::SeqCst);
    tokio::time::sleep(RETRY).await;
    assert!(f.valid(Instant::now()).is_some(), "renewed within one retry of its return");
    primary.store(false, Ordering::SeqCst);
    tokio::time::sleep(TERM).await;
    assert!(f.held().is_none(), "a Secondary holds nothing");
    let before = asked.load(Ordering::SeqCst);
    tokio::time::sleep(TERM * 10).await;
    assert_eq!(asked.load(Ordering::SeqCst), before, "a Secondary never asks");
    token.cancel();
    task.await.unwrap();
}

/// Row 1's second half: a lease asked for before the node went degraded does not acknowledge
/// its degraded writes (the peer could not tell it from a dead node's); the lease task asks
/// again at once, and a lease asked for afterwards does. Mirroring again starts a new episode.
#[tokio::test(start_paused = true)]
async fn only_a_lease_asked_after_going_degraded_counts() {
    let f = Arc::new(Fence::new(addr()));
    let asked = Arc::new(AtomicU32::new(0));
    let flags = Arc::new(std::sync::Mutex::new(Vec::new()));
    let client = LeaseClient::new(addr(), "alpha", Arc::from(&b"s"[..]), ClientSettings::default());
    let token = CancellationToken::new();
    let task = tokio::spawn({
        let (f, asked, token) = (Arc::clone(&f), Arc::clone(&asked), token.clone());
        let flags = Arc::clone(&flags);
        async move {
            let ask = move |_c: LeaseClient, _held: Option<Lease>, degraded: bool| {
                asked.fetch_add(1, Ordering::SeqCst);
                flags.lock().unwrap().push(degraded);
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await; // the round trip
                    Ok(lease(1, Instant::now() - Duration::from_millis(20)))
                }
            };
            keep_lease(&f, client, || true, ask, token).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    assert!(f.valid(Instant::now()).is_some(), "mirroring: any valid lease");
    let since = f.went_degraded(Instant::now());
    assert_eq!(f.went_degraded(Instant::now() + POLL), since, "one episode, one start");
    assert!(f.valid_since(Some(since), Instant::now()).is_none(), "asked before: no");
    assert!(f.frozen_reason(Instant::now()).is_some());
    let cleared = f.wait(Some(since), || None::<()>).await;
    assert_eq!(cleared, Cleared::Lease(1));
    assert_eq!(asked.load(Ordering::SeqCst), 2, "asked again at once, not a third term later");
    assert_eq!(*flags.lock().unwrap(), [false, true], "told the witness it is degraded");
    assert!(Instant::now() - since < Duration::from_millis(100), "one round trip");
    f.mirroring(0);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let next = f.went_degraded(Instant::now());
    assert!(next > since, "a new episode");
    assert!(f.valid_since(Some(next), Instant::now()).is_none());
    // A lease asked for at the same instant but without the flag never acknowledges.
    let (at, _) = f.asking();
    f.record(Ok(lease(1, at)), at, false);
    assert!(f.valid_since(Some(next), at).is_none(), "not asked as degraded: no");
    f.record(Ok(lease(1, at)), at, true);
    assert!(f.valid_since(Some(next), at).is_some(), "asked as degraded after it: yes");
    token.cancel();
    task.await.unwrap();
}

/// The end of a degraded episode reaches the witness at once, not a third of the term later:
/// a peer that loses this node right after its resync must not read a stale "degraded" there
/// (issue 16: the power cut right after a resync that needed an operator).
#[tokio::test(start_paused = true)]
async fn mirroring_again_is_told_to_the_witness_at_once() {
    let f = Arc::new(Fence::new(addr()));
    let flags = Arc::new(std::sync::Mutex::new(Vec::new()));
    let client = LeaseClient::new(addr(), "alpha", Arc::from(&b"s"[..]), ClientSettings::default());
    let token = CancellationToken::new();
    let task = tokio::spawn({
        let (f, token, flags) = (Arc::clone(&f), token.clone(), Arc::clone(&flags));
        async move {
            let ask = move |_c: LeaseClient, _held: Option<Lease>, degraded: bool| {
                flags.lock().unwrap().push(degraded);
                async move { Ok(lease(1, Instant::now())) }
            };
            keep_lease(&f, client, || true, ask, token).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    f.went_degraded(Instant::now());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(*flags.lock().unwrap(), [false, true]);
    f.mirroring(0);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(*flags.lock().unwrap(), [false, true, false], "renewed as not degraded at once");
    f.mirroring(0);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(flags.lock().unwrap().len(), 3, "no renewal per mirrored write");
    token.cancel();
    task.await.unwrap();
}

/// The lease is the node's: one volume mirroring again does not end a loss for another, which
/// the other node may have promoted and written; once every volume mirrored, it ends.
#[tokio::test(start_paused = true)]
async fn a_loss_ends_only_once_every_volume_mirrored() {
    let f = Fence::for_volumes(addr(), 2);
    let now = Instant::now();
    f.record(Ok(lease(3, now)), now, false);
    f.record(Err(refused("beta")), now, false);
    assert!(f.is_lost());
    f.mirroring(0);
    f.mirroring(0);
    assert!(f.is_lost(), "volume 1 has not mirrored: still fenced");
    let cleared = f.wait(None, || None::<()>).await;
    assert_eq!(cleared, Cleared::Lost(3), "volume 1's degraded writes still fail");
    f.mirroring(1);
    assert!(!f.is_lost(), "both mirrored since the loss");
}
