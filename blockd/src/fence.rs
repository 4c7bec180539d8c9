//! Fencing of degraded writes by the witness lease (design.md §7): a Primary that has lost its
//! peer acknowledges a write only while it holds the lease, so two primaries can never both
//! acknowledge writes.
//!
//! ```text
//!   keep_lease (one task per node) ──acquire/renew every term/3──► witness
//!        │ Fence::record(outcome)
//!        ▼
//!   Fence { lease: watch<Option<Held>>, degraded since, lost epoch, last error }
//!        ▲ valid_since(since, now)? / wait(since, ..)
//!   Volume: degraded write done locally, marked out of sync ──► ack only when cleared
//! ```
//!
//! When a degraded write (peer gone, or the mirrored request failed) may be acknowledged, with
//! `cluster.witness` configured. The local write and its out-of-sync mark are already durable;
//! the range lock is released before waiting, so a resync can copy the range meanwhile:
//!
//! | # | situation while the write waits                      | outcome                   |
//! |---|------------------------------------------------------|---------------------------|
//! | 1 | this node's lease is valid by its own clock, and was | acknowledged              |
//! |   | asked for after the node went degraded               |                           |
//! | 2 | the range's out-of-sync bits are clear again         | acknowledged (the peer    |
//! |   | (a resync copied it and the peer flushed it)         | has it durably)           |
//! | 3 | the volume is no longer Primary (demoted)            | fails: EPERM, not acked   |
//! | 4 | this node's epoch was lost to another node           | fails: EIO, not acked     |
//! | 5 | none of these                                        | waits (frozen); reads go  |
//!
//! Why row 1 wants a lease *asked for after* the peer was lost, and asked for *as degraded*:
//! the request says so to the witness, which tells the peer's agent in its answer. The agent
//! promotes automatically only if the old primary's last grant was not degraded (ctl
//! `agent.rs`); a node that acknowledges degraded writes therefore always leaves that trace at
//! the witness, and one that does not lets its peer take over the moment its lease runs out. The first degraded write asks for
//! a renewal at once ([`Fence::went_degraded`]) and waits one round trip.
//!
//! There is no time limit on the wait: an error would be an answer too, and a filesystem that
//! sees EIO goes read-only, while a frozen one resumes when the witness or the peer returns.
//! Row 2 is how "the peer returned" ends a freeze: only once the peer really holds the data.
//!
//! **Lost epochs.** A lease the witness gave to another node meanwhile
//! ([`WitnessError::Superseded`], or a refusal naming another holder after this node held it)
//! is never taken back by a running Primary: the other node may have promoted and written.
//! The same holds when a Primary that never held the lease sees its holder's grants turn from
//! not degraded to degraded (`rival_went_degraded`): that node became a Primary writing
//! without this one (an old Primary whose lease still ran after a switchover, promoted by its
//! agent when the link broke; the simulator's seed 360).
//! Waiting and new degraded writes then fail (row 4): they can never be acknowledged, and
//! failing them lets the filesystem on top be unmounted so that the agent can demote this node.
//! [`Fence::reset`] is called on every role change, and writes mirrored again clear the loss
//! ([`Fence::mirroring`]) once *every* volume has mirrored since: the lease is the node's, and
//! one volume mirroring to a Secondary says nothing of another, which the other node may have
//! promoted and written meanwhile.
//!
//! **What the lease cannot cover.** The check happens right before the reply is queued; a
//! process paused for longer than the lease between the check and the reply's `write(2)` sends
//! a late acknowledgement. The window is microseconds against a lease of seconds.
//!
//! Without `cluster.witness` there is no fence: a degraded write is acknowledged once the new
//! generation is on disk, as before (manual promotion only).

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, MutexGuard,
    },
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    control::LeaseStatus,
    witness::{Lease, LeaseClient, WitnessError},
};

/// How often a waiting write looks again at what is not signalled (row 2 and 3 above).
pub const POLL: Duration = Duration::from_millis(100);

/// How often the lease task asks again after a failure, and looks at the role while no
/// volume is Primary.
const RETRY: Duration = Duration::from_millis(250);

/// This node's lease, as the data path sees it.
#[derive(Debug)]
pub struct Fence {
    witness: SocketAddr,
    lease: watch::Sender<Option<Held>>,
    facts: Mutex<Facts>,
    /// Wakes the lease task: a degraded write needs a lease asked for from now on.
    renew_now: tokio::sync::Notify,
    /// Degraded writes waiting now.
    waiting: AtomicU64,
    /// Volumes of the node: a loss ends once each of them mirrored.
    volumes: usize,
}

/// A lease, when it was asked for, and whether the request told the witness this node was
/// degraded.
#[derive(Debug, Clone)]
struct Held {
    lease: Lease,
    asked: Instant,
    degraded: bool,
}

/// What status shows besides the lease.
#[derive(Debug, Default)]
struct Facts {
    /// Since when writes complete without the peer (None while mirroring): only a lease asked
    /// for after this instant acknowledges them.
    degraded_since: Option<Instant>,
    /// The epoch this node held when another node got the lease; while set, no new lease.
    lost: Option<u64>,
    /// Volumes (by index) that mirrored a write since `lost` was set.
    mirrored: std::collections::BTreeSet<u16>,
    /// Who the witness last said holds the lease, when it refused.
    holder: Option<String>,
    /// A holder the witness named, while this node was Primary, with a last grant that was
    /// not degraded: if its grants turn degraded, it writes without this node (see `record`).
    rival: Option<String>,
    /// The last failure to obtain or renew the lease.
    error: Option<String>,
}

/// Why a waiting write stopped waiting.
#[derive(Debug, PartialEq, Eq)]
pub enum Cleared<T> {
    /// This node holds a valid lease of this epoch.
    Lease(u64),
    /// The caller's own condition said so.
    Other(T),
    /// This node's epoch went to another node: never acknowledge.
    Lost(u64),
}

impl Fence {
    /// The fence of a node with one volume.
    pub fn new(witness: SocketAddr) -> Fence {
        Fence::for_volumes(witness, 1)
    }

    /// The fence of a node with `volumes` volumes.
    pub fn for_volumes(witness: SocketAddr, volumes: usize) -> Fence {
        Fence {
            volumes: volumes.max(1),
            witness,
            lease: watch::Sender::new(None),
            facts: Mutex::new(Facts::default()),
            renew_now: tokio::sync::Notify::new(),
            waiting: AtomicU64::new(0),
        }
    }

    fn facts(&self) -> MutexGuard<'_, Facts> {
        self.facts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lease held now, if it is valid at `now` and may acknowledge degraded writes (asked
    /// for after the node went degraded).
    pub fn valid(&self, now: Instant) -> Option<Lease> {
        let since = self.facts().degraded_since;
        self.valid_since(since, now)
    }

    /// The lease held now, if valid at `now` and, for a degraded write (`since` set), asked
    /// for as degraded at or after `since`: the witness then knows this node may acknowledge
    /// writes its peer lacks, and tells the peer's agent (`witness/lease.rs`).
    pub fn valid_since(&self, since: Option<Instant>, now: Instant) -> Option<Lease> {
        let held = self.lease.borrow();
        let h = held.as_ref().filter(|h| h.lease.is_valid(now))?;
        since.map_or(true, |s| h.degraded && h.asked >= s).then(|| h.lease.clone())
    }

    /// When a request to the witness starts, and whether it says "degraded": read together
    /// under the lock, so a lease asked for before [`went_degraded`](Self::went_degraded)
    /// never carries the flag and one asked for after it always does.
    pub fn asking(&self) -> (Instant, bool) {
        let f = self.facts();
        (Instant::now(), f.degraded_since.is_some())
    }

    /// The lease last obtained (maybe expired, maybe asked for before the node went degraded).
    pub fn held(&self) -> Option<Lease> {
        self.lease.borrow().as_ref().map(|h| h.lease.clone())
    }

    /// A write completes without the peer at `now`: returns since when this node has been
    /// degraded (`now`, the first time after mirroring; the lease task then asks at once). Only
    /// a lease asked for at or after that instant acknowledges the write.
    pub fn went_degraded(&self, now: Instant) -> Instant {
        let mut f = self.facts();
        if let Some(since) = f.degraded_since {
            return since;
        }
        f.degraded_since = Some(now);
        drop(f);
        self.renew_now.notify_one();
        now
    }

    /// The peer acknowledged a write of volume `volume`: the next degraded write starts a new
    /// episode. Writes of an earlier episode still waiting keep their own `since`. A lost
    /// epoch is forgotten once every volume mirrored since the loss: the peer takes a volume's
    /// writes only as its connected Secondary whose handshake found no split brain, so whoever
    /// held the lease meanwhile did not write that volume as Primary.
    ///
    /// The end of a degraded episode is told to the witness at once (a renewal not degraded):
    /// until then its record says this node's last grant was degraded, and a peer that loses
    /// this node in that window (it just resynced, and this node dies) may not promote
    /// without an operator. Waiting for the next scheduled renewal left that window open for
    /// up to a third of the term.
    pub fn mirroring(&self, volume: u16) {
        let mut f = self.facts();
        if f.degraded_since.take().is_some() {
            self.renew_now.notify_one();
        }
        if f.lost.is_none() {
            return;
        }
        f.mirrored.insert(volume);
        if f.mirrored.len() < self.volumes {
            return;
        }
        f.mirrored.clear();
        if let Some(epoch) = f.lost.take() {
            tracing::info!(
                epoch,
                "mirroring again with the peer as Secondary: the loss of \
                lease epoch {epoch} no longer fences this node"
            );
            f.error = None;
        }
    }

    /// True once another node held the lease after this one: nothing more until [`reset`].
    ///
    /// [`reset`]: Self::reset
    pub fn is_lost(&self) -> bool {
        self.facts().lost.is_some()
    }

    /// Degraded writes waiting now.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Waits until this node holds a valid lease, or `other` returns something (checked at
    /// once, then every [`POLL`] and whenever the lease changes). Never errors: the caller's
    /// condition decides when to give up.
    pub async fn wait<T>(
        &self,
        since: Option<Instant>,
        mut other: impl FnMut() -> Option<T>,
    ) -> Cleared<T> {
        let mut rx = self.lease.subscribe();
        let mut counted = None;
        loop {
            rx.borrow_and_update();
            if let Some(epoch) = self.facts().lost {
                return Cleared::Lost(epoch);
            }
            if let Some(l) = self.valid_since(since, Instant::now()) {
                return Cleared::Lease(l.epoch);
            }
            if let Some(t) = other() {
                return Cleared::Other(t);
            }
            if counted.is_none() {
                counted = Some(Waiting::new(&self.waiting));
            }
            // The sender lives as long as `self`: `changed` cannot fail while we borrow it.
            let _ = tokio::time::timeout(POLL, rx.changed()).await;
        }
    }

    /// Records the outcome of asking the witness at `asked` (as `degraded` or not, see
    /// [`asking`](Self::asking)); returns how long until asking again.
    pub fn record(
        &self,
        outcome: Result<Lease, WitnessError>,
        asked: Instant,
        degraded: bool,
    ) -> Duration {
        let now = Instant::now();
        let mut f = self.facts();
        match outcome {
            Ok(lease) if f.lost.is_none() => {
                let next = lease.term / 3;
                if self.held().map(|h| h.epoch) != Some(lease.epoch) {
                    tracing::info!(epoch = lease.epoch, witness = %self.witness,
                        "holding the witness lease, epoch {}, valid for {:?}",
                        lease.epoch, lease.remaining(now));
                }
                f.error = None;
                f.holder = None;
                drop(f);
                self.lease.send_replace(Some(Held { lease, asked, degraded }));
                next
            }
            Ok(lease) => {
                // Granted after a loss: the other node's term ran out, but it may have written.
                f.error = Some(format!(
                    "epoch {} was lost to another node; not writing on epoch {} before a role change",
                    f.lost.unwrap_or_default(),
                    lease.epoch
                ));
                RETRY
            }
            Err(WitnessError::Superseded { had, now: lease }) => {
                tracing::error!(had, now = lease.epoch, witness = %self.witness,
                    "the witness lease was lost: another node held it since epoch {had}; \
                     degraded writes stay frozen until this node's role changes");
                f.lost = Some(had);
                f.mirrored.clear();
                f.error = Some(format!("lease epoch {had} lost to another node"));
                self.lease.send_replace(None);
                RETRY
            }
            Err(e) => {
                if let WitnessError::Refused { holder, epoch, degraded, .. } = &e {
                    f.holder.clone_from(holder);
                    if self.held().is_some() {
                        // Someone else holds it: whatever this node had is over.
                        f.lost = self.held().map(|l| l.epoch);
                        f.mirrored.clear();
                        self.lease.send_replace(None);
                    } else if rival_went_degraded(&mut f, holder.as_deref(), *degraded) {
                        tracing::error!(epoch, witness = %self.witness,
                            "the holder of lease epoch {epoch} went on as a degraded Primary \
                             while this node was Primary: it writes without us; degraded \
                             writes stay frozen until this node's role changes");
                        f.lost = Some(*epoch);
                        f.mirrored.clear();
                    }
                }
                let text = e.to_string();
                if f.error.as_deref() != Some(&text) {
                    tracing::warn!(witness = %self.witness, "no lease: {text}");
                }
                f.error = Some(text);
                RETRY
            }
        }
    }

    /// The role changed: the lease and any loss are forgotten; the lease task asks afresh at
    /// once (a new Primary should not wait a third of a term for its lease).
    pub fn reset(&self) {
        *self.facts() = Facts::default();
        self.lease.send_replace(None);
        self.renew_now.notify_one();
    }

    /// For status.
    pub fn status(&self, node: &str, now: Instant) -> LeaseStatus {
        let valid = self.valid(now);
        let f = self.facts();
        LeaseStatus {
            witness: self.witness.to_string(),
            holder: match &valid {
                Some(_) => Some(node.to_string()),
                None => f.holder.clone(),
            },
            epoch: self.held().map(|l| l.epoch),
            valid_for_ms: valid.map_or(0, |l| l.remaining(now).as_millis() as u64),
            lost: f.lost,
            error: f.error.clone(),
        }
    }

    /// Why degraded writes would wait now (None when the lease is valid).
    pub fn frozen_reason(&self, now: Instant) -> Option<String> {
        if self.valid(now).is_some() {
            return None;
        }
        let f = self.facts();
        let why = f.error.as_deref().unwrap_or("no lease obtained yet");
        Some(format!(
            "no peer and no valid witness lease ({why}); {} writes waiting",
            self.waiting()
        ))
    }
}

/// Counts one waiting write while it lives.
struct Waiting<'a>(&'a AtomicU64);

impl<'a> Waiting<'a> {
    fn new(c: &'a AtomicU64) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        Waiting(c)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A refusal while Primary and holding nothing: the holder's last grant was `degraded`.
/// True when a holder first seen renewing as not degraded now renews as degraded: it became a
/// Primary writing without its peer (this node) while this node was Primary, e.g. an old
/// Primary whose lease still ran after a switchover and whose agent promoted it when the link
/// broke (the simulator's seed 360). Its writes are not here: this node must never acknowledge
/// degraded writes on a later epoch of its own, as if its data were the newest. A holder
/// degraded from the first refusal on went degraded before this node's role change: the
/// operator promoted this node knowing it (or the agent did, seeing it was not).
fn rival_went_degraded(f: &mut Facts, holder: Option<&str>, degraded: Option<bool>) -> bool {
    let Some(holder) = holder else { return false };
    match degraded {
        Some(false) => {
            f.rival = Some(holder.to_string());
            false
        }
        Some(true) => f.rival.as_deref() == Some(holder),
        None => false,
    }
}

/// Keeps this node's lease while `primary()` says a volume is Primary: renews every third of
/// the term, retries every [`RETRY`] after a failure. A Secondary holds nothing (the agent
/// asks for itself before promoting). Returns when `token` is cancelled.
pub async fn keep_lease<F, Fut>(
    fence: &Fence,
    client: LeaseClient,
    primary: impl Fn() -> bool,
    ask: F,
    token: CancellationToken,
) where
    F: Fn(LeaseClient, Option<Lease>, bool) -> Fut,
    Fut: Future<Output = Result<Lease, WitnessError>>,
{
    loop {
        let next = if !primary() {
            if fence.held().is_some() || fence.is_lost() {
                tracing::info!("no volume is Primary: the witness lease is no longer needed");
                fence.reset();
            }
            RETRY
        } else if fence.is_lost() {
            RETRY
        } else {
            let (asked, degraded) = fence.asking();
            let outcome = ask(client.clone(), fence.held(), degraded).await;
            fence.record(outcome, asked, degraded)
        };
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(next) => {}
            () = fence.renew_now.notified() => {}
        }
    }
}

/// What [`keep_lease`] asks with on a real node: renew what is held, else acquire; saying
/// whether this node is degraded.
pub async fn ask_witness(
    client: LeaseClient,
    held: Option<Lease>,
    degraded: bool,
) -> Result<Lease, WitnessError> {
    match held {
        Some(l) => client.renew_as(&l, degraded).await,
        None => client.ask(degraded).await.map(|g| g.lease),
    }
}

#[cfg(test)]
mod tests;
