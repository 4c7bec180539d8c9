//! A volume's replication state: the role machine's state, the session writes are mirrored on,
//! the persisted metadata, and the transitions between them.
//!
//! Two locks, always taken in this order when both are needed:
//! - `persisted` (tokio mutex): the metadata and its file. Whoever holds it may change the
//!   state; so transitions are serialised, and a transition's persistence (a new generation, the
//!   `consistent` flag) is on disk before anyone sees the state that depends on it.
//! - `live` (std mutex, never held across an await): what the data path and status read.

use std::sync::Arc;

use tokio::{sync::MutexGuard, task::JoinHandle};

use super::{Volume, VolumeError, VolumeInfo};
use crate::{
    meta::{new_generation, DiskFailure, Generations, Meta, MetaError, MetaFile},
    replication::{LinkError, Message, Session},
    resync::{Progress, Resolve},
    role::{self, Action, ConnState, DiskState, Event, Role},
};

/// Metadata and the file it lives in; the mutex around it is the transition lock.
#[derive(Debug)]
pub(super) struct Persisted {
    pub file: Arc<MetaFile>,
    pub meta: Meta,
    /// A store running on the blocking pool and the metadata it writes: `meta` becomes it
    /// once the store succeeded. Kept here so that a caller that went away mid-store leaves
    /// it to the next holder of the lock ([`Volume::lock_persisted`]), which awaits it before
    /// reading `meta` or starting another store (never two stores at once, never out of order).
    pub pending: Option<(Meta, JoinHandle<Result<(), MetaError>>)>,
}

impl Persisted {
    pub fn new(file: MetaFile, meta: Meta) -> Self {
        Persisted { file: Arc::new(file), meta, pending: None }
    }
}

/// What the data path and status read.
#[derive(Debug)]
pub(super) struct Live {
    pub machine: role::State,
    /// The session writes go to: set while connected, cleared when it ends or is dropped.
    pub session: Option<Session>,
    /// Why the connection is in its state, when refused or dropped.
    pub reason: Option<String>,
    /// The last session was dropped for a split brain and none has come up since.
    pub split_brain: bool,
    pub peer_disk: Option<DiskState>,
    pub resync: Option<Progress>,
    /// A copy of the persisted generations, for status and out-of-sync accounting.
    pub gens: Generations,
    /// `blockctl resolve`: what this node gives up at the next handshake (memory only: a
    /// restarted node needs the operator to say it again).
    pub resolve: Resolve,
    /// Why the disk is `Failed` (the first error); on disk too once `persist_failure` ran.
    pub failure: Option<DiskFailure>,
}

impl Live {
    /// The state a volume starts in; the bool is "this node has moved on without its peer".
    pub fn at_start(info: &VolumeInfo, meta: &Meta) -> (Live, bool) {
        let single = info.peer.is_none();
        let machine = role::State {
            role: if single { Role::Primary } else { Role::Secondary },
            disk: match (meta.flags.failed, meta.flags.consistent) {
                (Some(_), _) => DiskState::Failed,
                (None, true) => DiskState::UpToDate,
                (None, false) => DiskState::Inconsistent,
            },
            conn: if single { ConnState::StandAlone } else { ConnState::Connecting },
            peer_role: None,
            promoting: false,
        };
        let live = Live {
            machine,
            session: None,
            reason: single.then(|| "single-node configuration".to_string()),
            split_brain: false,
            peer_disk: None,
            resync: None,
            gens: meta.gens,
            resolve: Resolve::None,
            failure: meta.flags.failed,
        };
        (live, meta.gens.bitmap != 0)
    }

    /// Bytes that may differ from the peer: what is left of a running resync, else what the
    /// dirty bitmap marks; an `Inconsistent` disk not being resynced does not know (the whole
    /// device, until its source says what it sends).
    pub fn out_of_sync(&self, size: u64, dirty: u64) -> u64 {
        if let Some(p) = &self.resync {
            return p.total.saturating_sub(p.done);
        }
        match self.machine.disk {
            DiskState::Inconsistent => size,
            DiskState::UpToDate | DiskState::Outdated | DiskState::Failed => dirty,
        }
    }
}

/// What a transition left for the node to do: the actions that need the peer or the operator.
#[derive(Debug, Default)]
pub struct Transition {
    pub actions: Vec<Action>,
}

impl Volume {
    /// Steps the role machine with `event` and performs the actions that are this volume's own
    /// (persisting metadata, a new generation, resync bookkeeping). `session` is the session the
    /// event belongs to (for `Connected`). Returns the actions left for the caller.
    pub async fn transition(
        &self,
        event: Event,
        session: Option<&Session>,
    ) -> Result<Transition, VolumeError> {
        let mut p = self.lock_persisted().await;
        let (before, actions) = {
            let mut live = self.live();
            let before = live.machine;
            let (after, actions) = role::step(&before, &event);
            live.machine = after;
            (before, actions)
        };
        self.log_change(&before, &event);
        let mut left = Vec::new();
        for action in actions {
            match action {
                Action::BecomePrimary => {
                    self.persist_with(&mut p, |m| m.flags.primary_when_stopped = true).await?;
                    if !self.connected_in_sync() {
                        // Promoted without a peer: a new generation before any write
                        // (design.md §5).
                        self.rotate(&mut p).await?;
                    }
                    left.push(Action::BecomePrimary);
                }
                Action::BecomeSecondary => {
                    // Nothing is in flight (demote flushed with no clients): the log's bits go
                    // to the bitmap and the log empties, so a later crash adds nothing.
                    self.track.retire().await.map_err(|e| self.dirty_log_failed(e))?;
                    self.persist_with(&mut p, |m| m.flags.primary_when_stopped = false).await?;
                    left.push(Action::BecomeSecondary);
                }
                Action::StartResyncTarget => {
                    self.persist_with(&mut p, |m| m.flags.consistent = false).await?;
                    let mut live = self.live();
                    // The total is the source's to say; until then, what this side knows.
                    live.resync = Some(Progress::new(self.track.dirty_bytes()));
                    drop(live);
                    self.target_ready.send_replace(session.map_or(0, Session::id));
                }
                Action::StartResyncSource => {
                    self.live().resync = Some(Progress::new(self.track.dirty_bytes()));
                    left.push(Action::StartResyncSource);
                }
                Action::Drop { reason, split_brain } => {
                    let mut live = self.live();
                    live.reason = Some(reason.clone());
                    live.split_brain = split_brain;
                    live.session = None;
                    left.push(Action::Drop { reason, split_brain });
                }
                other => left.push(other),
            }
        }
        self.after_transition(&event, session);
        Ok(Transition { actions: left })
    }

    /// Session bookkeeping once a transition is done: which session writes go to.
    fn after_transition(&self, event: &Event, session: Option<&Session>) {
        let mut live = self.live();
        match event {
            Event::Connected { peer_disk, .. } => {
                live.peer_disk = Some(*peer_disk);
                if matches!(
                    live.machine.conn,
                    ConnState::Connected | ConnState::SyncSource | ConnState::SyncTarget
                ) {
                    live.session = session.cloned();
                    live.reason = None;
                    live.split_brain = false;
                    self.counters.connects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Event::Disconnected => {
                live.session = None;
                live.peer_disk = None;
                live.resync = None;
                self.target_ready.send_replace(0);
            }
            _ => {}
        }
    }

    /// The link to the peer ended (`session`, if this volume had it): steps `Disconnected`, and
    /// a Primary moves on to a new generation at once, so that the next handshake, whatever
    /// happens in between, sees that the peer needs a resync.
    pub async fn disconnected(&self, session: u64) -> Result<Transition, VolumeError> {
        let stale = self.live().session.as_ref().is_some_and(|s| s.id() != session);
        if stale {
            return Ok(Transition::default());
        }
        let t = self.transition(Event::Disconnected, None).await?;
        if self.live().machine.role == Role::Primary {
            self.ensure_moved_on().await?;
            // Acknowledged by the peer but maybe not durable there: may differ.
            self.track.link_lost().await.map_err(|e| self.dirty_log_failed(e))?;
        }
        Ok(t)
    }

    /// The resync this node sent has been applied by the peer: it is in sync again.
    pub(super) async fn finish_resync_source(&self) -> Result<Transition, VolumeError> {
        {
            let mut p = self.lock_persisted().await;
            self.persist_with(&mut p, |m| m.gens.sync_done_source()).await?;
            self.moved_on.store(false, std::sync::atomic::Ordering::Release);
            let mut live = self.live();
            live.resync = None;
            // The target adopted this node's generations and is consistent again: status (and
            // `blockctl swap`, which checks it) must not keep the handshake's `Inconsistent`.
            live.peer_disk = Some(DiskState::UpToDate);
        }
        // Everything acknowledged without the peer is on it now: the degraded episode ends
        // as after a mirrored write (and the witness hears so at once), also on an idle volume.
        if let Some(f) = self.fence.get() {
            f.mirroring(self.index());
        }
        self.transition(Event::ResyncDone, None).await
    }

    /// The resync this node received is complete: adopt the source's generations, and only
    /// then (durably) call the data consistent.
    pub(super) async fn finish_resync_target(
        &self,
        source: &Generations,
    ) -> Result<Transition, VolumeError> {
        {
            let mut p = self.lock_persisted().await;
            // The source copied the union of both bitmaps: nothing marked here differs now.
            self.track.clear(0..self.size());
            self.flush_bitmap().await?;
            self.persist_with(&mut p, |m| {
                m.gens.sync_done_target(source);
                m.flags.consistent = true;
            })
            .await?;
            let mut live = self.live();
            live.resync = None;
            self.target_ready.send_replace(0);
            live.resolve = Resolve::None;
        }
        self.transition(Event::ResyncDone, None).await
    }

    /// Records an orderly stop (`clean_shutdown`) or, at start, that the node is running.
    pub async fn mark_clean(&self, clean: bool) -> Result<(), VolumeError> {
        let mut p = self.lock_persisted().await;
        self.persist_with(&mut p, |m| m.flags.clean_shutdown = clean).await
    }

    /// A connection attempt was refused (authentication, version, volume mismatch): status
    /// shows why while no session is up.
    pub fn note_refused(&self, reason: &str) {
        self.counters.link_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut live = self.live();
        if live.session.is_none() {
            live.reason = Some(reason.to_string());
        }
    }

    /// The last handshake found a split brain (status: `split_brain`); until the operator
    /// resolves it (the next session that comes up) the volume stays StandAlone.
    pub fn split_brain(&self) -> bool {
        self.live().split_brain
    }

    /// Generations and flags for the state exchange with the peer.
    pub async fn local_state(&self) -> (role::State, Generations, bool) {
        let p = self.lock_persisted().await;
        (self.machine(), p.meta.gens, p.meta.flags.primary_when_stopped)
    }

    /// Where an application write goes: `Some(session)` to the peer as well (this node is
    /// Primary and connected, in sync or sending a resync), `None` here only. Refused unless
    /// this node is Primary: a Secondary takes writes from its peer alone (a client that
    /// slipped in while the node was being demoted must not write behind the peer's back).
    pub(super) fn route(&self) -> Result<Option<Session>, VolumeError> {
        let live = self.live();
        if live.machine.role != Role::Primary {
            return Err(VolumeError::NotPrimary);
        }
        let mirroring = matches!(live.machine.conn, ConnState::Connected | ConnState::SyncSource);
        Ok(live.session.as_ref().filter(|s| mirroring && s.is_open()).cloned())
    }

    fn connected_in_sync(&self) -> bool {
        let live = self.live();
        live.session.is_some() && matches!(live.machine.conn, ConnState::Connected)
    }

    pub(super) async fn call_peer(
        &self,
        session: &Session,
        msg: Message,
    ) -> Result<Message, LinkError> {
        session.call(self.index(), msg).await
    }

    /// Judges the peer's answer to a mirrored request: `Ok(true)` when the peer has it.
    /// Anything but a clean ack means the peer may not: the session is closed and the request
    /// completes degraded (`Ok(false)`), after the new generation is on disk.
    pub(super) async fn peer_done(
        &self,
        session: &Session,
        result: Result<Message, LinkError>,
    ) -> Result<bool, VolumeError> {
        match result {
            Ok(Message::Ack { error: 0 }) => return Ok(true),
            Ok(Message::Ack { error }) => {
                session.close(&format!("peer failed a mirrored request (error {error})"));
            }
            Ok(other) => session.close(&format!("peer answered a mirrored request with {other:?}")),
            Err(_) => {} // the session is already gone
        }
        self.counters.degraded_writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.ensure_moved_on().await.map(|()| false)
    }

    /// A write completed without the peer: make sure the new generation is on disk first.
    pub(super) async fn degraded_write(&self) -> Result<(), VolumeError> {
        if self.info.peer.is_none() {
            return Ok(()); // single node: there is no peer to be out of sync with
        }
        self.counters.degraded_writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.ensure_moved_on().await
    }

    /// Rotates to a new generation unless this node has already moved on (design.md §5).
    async fn ensure_moved_on(&self) -> Result<(), VolumeError> {
        if self.moved_on.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let mut p = self.lock_persisted().await;
        self.rotate(&mut p).await
    }

    /// `bitmap ← current, current ← new` if not done yet, durably.
    async fn rotate(&self, p: &mut MutexGuard<'_, Persisted>) -> Result<(), VolumeError> {
        if p.meta.gens.bitmap != 0 {
            self.moved_on.store(true, std::sync::atomic::Ordering::Release);
            return Ok(());
        }
        let new = new_generation();
        self.persist_with(p, |m| m.gens.rotate(new)).await?;
        self.moved_on.store(true, std::sync::atomic::Ordering::Release);
        tracing::warn!(
            volume = %self.name(),
            "writing without the peer: new generation {new:016x} (peer stays at {:016x})",
            p.meta.gens.bitmap
        );
        Ok(())
    }

    /// The transition lock, with any store a cancelled caller left behind settled first (see
    /// [`Persisted::pending`]; a failed one leaves `meta` as it was, as if never tried).
    pub(super) async fn lock_persisted(&self) -> MutexGuard<'_, Persisted> {
        let mut p = self.persisted.lock().await;
        if let Err(e) = self.settle(&mut p).await {
            tracing::error!(volume = %self.name(), error = %e, "an abandoned metadata store failed");
        }
        p
    }

    /// Changes the metadata with `f` and stores it durably; memory follows only on success.
    /// The write and fsync run on the blocking pool (meta/file.rs), not on this async thread;
    /// the caller holds the transition lock until they are done, so nothing that depends on
    /// the new state is seen or done before it is on disk.
    pub(super) async fn persist_with(
        &self,
        p: &mut MutexGuard<'_, Persisted>,
        f: impl FnOnce(&mut Meta),
    ) -> Result<(), VolumeError> {
        self.settle(p).await?;
        let mut next = p.meta.clone();
        f(&mut next);
        let (file, stored) = (Arc::clone(&p.file), next.clone());
        p.pending = Some((next, super::track::spawn_meta(move || file.store(&stored))));
        self.settle(p).await
    }

    /// Awaits the pending store, if any (cancel-safe: it stays pending until it has finished),
    /// and makes `meta` follow it on success.
    async fn settle(&self, p: &mut MutexGuard<'_, Persisted>) -> Result<(), VolumeError> {
        let Some((_, handle)) = p.pending.as_mut() else { return Ok(()) };
        let done = handle.await;
        let Some((next, _)) = p.pending.take() else { return Ok(()) };
        match done {
            Ok(Ok(())) => {
                p.meta = next;
                self.live().gens = p.meta.gens;
                Ok(())
            }
            Ok(Err(e)) => Err(VolumeError::Metadata(e)),
            Err(join) => Err(VolumeError::Metadata(MetaError::Write {
                path: p.file.path().to_path_buf(),
                source: std::io::Error::other(join),
            })),
        }
    }

    /// One line per change of state (STYLE.md).
    pub(super) fn log_change(&self, before: &role::State, event: &Event) {
        let live = self.live();
        if *before != live.machine {
            tracing::info!(
                volume = %self.name(),
                "{before} -> {} on {event:?}, generation {:016x}",
                live.machine,
                live.gens.current
            );
        }
    }
}
