//! The node: its volumes and the link to its peer. Turns link events and operator requests into
//! role-machine events, and performs what the machine asks for that needs the peer, a task or
//! the operator (`perform`, the one place; the volume does its own metadata in `transition`).
//!
//! ```text
//!  link events ──► dispatcher (one task, in order) ─┬─ Up: spawn the state exchange
//!                                                   ├─ Down: every volume Disconnected (a Primary
//!                                                   │        moves on to a new generation) — before
//!                                                   │        the next Up is looked at
//!                                                   ├─ State / AskPromote / RoleChanged / ResyncDone:
//!                                                   │        answered in order, never waiting on the peer
//!                                                   └─ Write / Zero / Trim / Flush / Resync*: own task each
//!  blockctl role ──► promote / demote (may ask the peer, from the caller's task)
//! ```
//!
//! Nothing on the dispatcher waits for the peer: both nodes run one, and a dispatcher waiting
//! for a reply that the other dispatcher must produce would deadlock the pair.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::ResyncConfig,
    control::{ConnState, ErrorKind, Role, Verified},
    errno,
    fence::Fence,
    replication::{LinkEvent, Message, Responder, Session},
    resync::{self, Resolve, ResyncOptions, SyncDecision},
    role::{Action, Event, Refusal},
    swap::run_promote,
    volume::{Transition, Volume},
};

/// How often a Primary flushes its peer while writes happen, so that peer-acknowledged writes
/// become durable there within this bound even if the client never flushes (design.md §3).
const PEER_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// A refused operator request: a kind blockctl can branch on, and a message.
pub type Refused = (ErrorKind, String);

/// Where [`Node::perform`] runs, which bounds what it may do.
#[derive(Debug)]
enum At<'a> {
    /// After a handshake on `session` (with the resync's options), or answering the peer's
    /// request on the dispatcher: nothing here may wait for the peer.
    Link { session: &'a Session, resync: Option<ResyncOptions> },
    /// The operator's task (promote, demote): may ask the peer and wait for it.
    Operator,
}

/// What performing a transition came to, for whoever stepped it.
#[derive(Debug, Default)]
struct Performed {
    /// `Refuse`: the operator's request fails with this.
    refused: Option<Refusal>,
    /// `AnswerPeer`: the answer to the peer's `AskPromote`.
    granted: bool,
    /// Stepping the peer's answer in could not be recorded.
    failed: Option<crate::volume::VolumeError>,
}

/// This node's volumes and its peer link.
#[derive(Debug)]
pub struct Node {
    name: String,
    peer: Option<String>,
    volumes: Vec<Arc<Volume>>,
    /// The link's current session, whatever the volumes' states.
    session: Mutex<Option<Session>>,
    /// The configuration file this daemon runs with: the peer's `RunPromote` runs
    /// `blockctl --config <it> --node <name> promote`.
    config_path: PathBuf,
    /// Rate ceiling and checksum mode of resyncs this node sends.
    resync: ResyncConfig,
    /// The witness lease degraded writes need (with `cluster.witness`); reset on role changes.
    fence: Option<Arc<Fence>>,
}

impl Node {
    pub fn new(
        name: String,
        peer: Option<String>,
        volumes: Vec<Arc<Volume>>,
        config_path: PathBuf,
        resync: ResyncConfig,
        fence: Option<Arc<Fence>>,
    ) -> Arc<Node> {
        if let Some(f) = &fence {
            volumes.iter().for_each(|v| v.set_fence(Arc::clone(f)));
        }
        let session = Mutex::new(None);
        Arc::new(Node { name, peer, volumes, session, config_path, resync, fence })
    }

    /// The witness fence, when configured.
    pub fn fence(&self) -> Option<&Arc<Fence>> {
        self.fence.as_ref()
    }

    /// True while any volume is Primary here: the node then keeps the witness lease.
    pub fn any_primary(&self) -> bool {
        self.volumes.iter().any(|v| v.machine().role == Role::Primary)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn volumes(&self) -> &[Arc<Volume>] {
        &self.volumes
    }

    fn session(&self) -> Option<Session> {
        self.session.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_session(&self, s: Option<Session>) {
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// Handles link events until the link's channel closes or `token` is cancelled.
    pub async fn run_link(
        self: Arc<Self>,
        mut events: mpsc::Receiver<LinkEvent>,
        tracker: TaskTracker,
        token: CancellationToken,
    ) {
        tracker.spawn(Arc::clone(&self).flush_peer_periodically(token.clone()));
        loop {
            let event = tokio::select! {
                () = token.cancelled() => return,
                e = events.recv() => match e { Some(e) => e, None => return },
            };
            match event {
                LinkEvent::Up(s) => {
                    tracing::info!(peer = %s.peer(), session = s.id(), "replication link up");
                    self.set_session(Some(s.clone()));
                    tracker.spawn(Arc::clone(&self).exchange(s));
                }
                LinkEvent::Down { session, reason } => self.link_down(session, &reason).await,
                LinkEvent::Request { session, volume, msg, reply } => {
                    self.request(&tracker, session, volume, msg, reply).await;
                }
                LinkEvent::Refused { reason } => {
                    // The link logs refusals, once a minute per source.
                    tracing::debug!("replication connection refused: {reason}");
                    self.volumes.iter().for_each(|v| v.note_refused(&reason));
                }
            }
        }
    }

    async fn link_down(&self, session: u64, reason: &str) {
        tracing::warn!(session, "replication link down: {reason}");
        if self.session().is_some_and(|s| s.id() == session) {
            self.set_session(None);
        }
        for v in &self.volumes {
            if let Err(e) = v.disconnected(session).await {
                tracing::error!(volume = %v.name(), error = %e, "cannot record the lost peer");
            }
        }
    }

    /// The state exchange of design.md §5 for every volume, then the decision from generations,
    /// bitmaps and the operator's `resolve` ([`resync::plan`]).
    async fn exchange(self: Arc<Self>, s: Session) {
        for v in &self.volumes {
            let mine = state_message(v).await;
            let Message::State { role, gens, primary_when_stopped, dirty, resolve, .. } = mine
            else {
                continue;
            };
            let theirs = match s.call(v.index(), mine).await {
                Ok(m @ Message::State { .. }) => m,
                other => {
                    tracing::warn!(volume = %v.name(), "state exchange failed: {other:?}");
                    s.close("state exchange failed");
                    return;
                }
            };
            let Message::State {
                role: peer_role,
                disk: peer_disk,
                gens: peer_gens,
                primary_when_stopped: peer_pws,
                dirty: peer_dirty,
                resolve: peer_resolve,
            } = theirs
            else {
                continue;
            };
            let me = resync::Side {
                name: &self.name,
                dirty: dirty > 0,
                primary: role == Role::Primary,
                primary_when_stopped,
                resolve,
            };
            let them = resync::Side {
                name: s.peer(),
                dirty: peer_dirty > 0,
                primary: peer_role == Role::Primary,
                primary_when_stopped: peer_pws,
                resolve: peer_resolve,
            };
            let plan = resync::plan(&gens, me, &peer_gens, them);
            tracing::info!(
                volume = %v.name(),
                "generations: mine {gens:x?}, peer's {peer_gens:x?}; dirty: mine {dirty}, \
                 peer's {peer_dirty}; resolve: mine {resolve:?}, peer's {peer_resolve:?} -> {plan:?}"
            );
            if plan.decision == SyncDecision::SplitBrain {
                tracing::error!(volume = %v.name(),
                    "split brain: both nodes wrote since they were last in sync; nothing is \
                     copied. On the node whose changes lose: blockctl demote, then \
                     blockctl resolve --discard-local");
            }
            let opts = ResyncOptions {
                full: plan.full,
                peer_dirty: peer_dirty > 0,
                max_rate: self.resync.max_rate.bytes(),
                checksum: self.resync.checksum,
            };
            let event = Event::Connected { peer_role, peer_disk, decision: plan.decision };
            match v.transition(event, Some(&s)).await {
                Ok(t) => {
                    let link = At::Link { session: &s, resync: Some(opts) };
                    // A link-side transition refuses nothing (that is the operator's).
                    let _ = self.perform(v, t, link).await;
                }
                Err(e) => {
                    tracing::error!(volume = %v.name(), error = %e, "cannot record the connection");
                    s.close("metadata update failed");
                }
            }
        }
    }

    /// The one performer of the role machine's actions that need the peer, a task or the
    /// operator (design.md §7); the volume's own (metadata, its live state) were done by
    /// [`Volume::transition`] under its lock, before it returned what is left here. An
    /// `AskPeerPromote` asks the peer and steps its answer in, whose actions follow in turn.
    async fn perform(&self, v: &Arc<Volume>, t: Transition, at: At<'_>) -> Performed {
        let mut done = Performed::default();
        let mut actions: std::collections::VecDeque<Action> = t.actions.into();
        while let Some(action) = actions.pop_front() {
            match (action, &at) {
                (Action::Refuse(r), _) => {
                    done.refused = Some(r);
                    return done;
                }
                (Action::AnswerPeer { granted }, _) => done.granted = granted,
                (Action::Drop { reason, .. }, _) => {
                    tracing::error!(volume = %v.name(), "not replicating: {reason}");
                }
                (Action::StartResyncSource, At::Link { session, resync: Some(opts) }) => {
                    self.start_resync(v, session, *opts);
                }
                (Action::AskPeerPromote, At::Operator) => {
                    let granted = self.ask_peer_promote(v).await;
                    match v.transition(Event::PeerAnswered { granted }, None).await {
                        Ok(t) => actions.extend(t.actions),
                        Err(e) => done.failed = Some(e),
                    }
                }
                (a @ (Action::BecomePrimary | Action::BecomeSecondary), At::Operator) => {
                    let role = match a {
                        Action::BecomePrimary => Role::Primary,
                        _ => Role::Secondary,
                    };
                    if let Some(s) = self.session() {
                        // Best effort: the peer also learns the role at the next state exchange.
                        let _ = s.call(v.index(), Message::RoleChanged(role)).await;
                    }
                }
                (a @ (Action::StartResyncSource | Action::AskPeerPromote), _)
                | (a @ (Action::BecomePrimary | Action::BecomeSecondary), _) => {
                    // The role machine asks these only after a handshake (a resync) or of the
                    // operator (the peer): never from a peer's request, which the dispatcher
                    // answers without waiting on the peer.
                    tracing::error!(volume = %v.name(), "{a:?} cannot be performed here ({at:?})");
                }
                (other, _) => tracing::debug!(volume = %v.name(), "no action needed for {other:?}"),
            }
        }
        done
    }

    /// Sends the resync the handshake decided, in a task of its own; a failure closes the
    /// session (reconnecting decides again and resumes from the bitmap).
    fn start_resync(&self, v: &Arc<Volume>, s: &Session, opts: ResyncOptions) {
        let (v, s) = (Arc::clone(v), s.clone());
        tokio::spawn(async move {
            if let Err(e) = resync::run(&*v, &s, opts).await {
                tracing::warn!(volume = %v.name(), error = %e, "resync stopped");
                s.close("resync failed");
            }
        });
    }

    /// `AskPromote` to the peer: granted only by a `PromoteAnswer` saying so.
    async fn ask_peer_promote(&self, v: &Volume) -> bool {
        match self.session() {
            Some(s) => matches!(
                s.call(v.index(), Message::AskPromote).await,
                Ok(Message::PromoteAnswer { granted: true })
            ),
            None => false,
        }
    }

    /// A request from the peer. Data requests run in their own task; the rest are answered in
    /// order, here.
    async fn request(
        &self,
        tracker: &TaskTracker,
        session: u64,
        index: u16,
        msg: Message,
        reply: Responder,
    ) {
        let (Some(v), Some(s)) =
            (self.volumes.get(usize::from(index)), self.session().filter(|s| s.id() == session))
        else {
            reply.send(Message::Ack { error: errno::EINVAL });
            return;
        };
        let v = Arc::clone(v);
        let answer = match msg {
            Message::State { .. } => state_message(&v).await,
            Message::AskPromote => {
                let granted = match v.transition(Event::PeerAsksPromote, None).await {
                    Ok(t) => {
                        self.perform(&v, t, At::Link { session: &s, resync: None }).await.granted
                    }
                    Err(_) => false,
                };
                Message::PromoteAnswer { granted }
            }
            Message::RoleChanged(role) => {
                match v.transition(Event::PeerRoleChanged(role), None).await {
                    Ok(t) => {
                        self.perform(&v, t, At::Link { session: &s, resync: None }).await;
                        ack_of(Ok(()))
                    }
                    Err(e) => ack_of::<()>(Err(e)),
                }
            }
            Message::ResyncDone { gens } => ack_of(resync::finish(&*v, &gens).await),
            Message::RunPromote => {
                let (config, name) = (self.config_path.clone(), self.name.clone());
                tracker.spawn(async move { reply.send(run_promote(&config, &name).await) });
                return;
            }
            data => {
                tracker.spawn(async move { reply.send(v.apply_peer(&s, data).await) });
                return;
            }
        };
        reply.send(answer);
    }

    /// `blockctl role`: every volume (or the one named) becomes `role`.
    pub async fn set_role(
        &self,
        volume: Option<&str>,
        role: Role,
        force: bool,
    ) -> Result<(), Refused> {
        let targets: Vec<&Arc<Volume>> = match volume {
            Some(name) => {
                vec![self.volumes.iter().find(|v| v.name() == name).ok_or_else(|| {
                    (ErrorKind::NotFound, format!("no volume named {name} on node {}", self.name))
                })?]
            }
            None => self.volumes.iter().collect(),
        };
        let changes = targets.iter().any(|v| v.machine().role != role);
        for v in targets {
            match role {
                Role::Primary => self.promote(v, force).await?,
                Role::Secondary => self.demote(v).await?,
            }
        }
        if let Some(f) = self.fence.as_ref().filter(|_| changes) {
            // A new role starts with a fresh lease: a lost epoch blocks only the old Primary
            // (asking for the role it already has, or a refused change, does not clear it).
            f.reset();
        }
        Ok(())
    }

    async fn promote(&self, v: &Arc<Volume>, force: bool) -> Result<(), Refused> {
        // A single node has no peer to ask or to split from: nothing to force.
        let force = force || self.peer.is_none();
        if force && self.peer.is_some() {
            tracing::warn!(volume = %v.name(), "promotion with --force requested by the operator");
        }
        let t = v.transition(Event::Promote { force }, None).await.map_err(internal)?;
        self.finish_role_change(v, t).await
    }

    async fn demote(&self, v: &Arc<Volume>) -> Result<(), Refused> {
        if v.machine().role == Role::Secondary {
            return Ok(());
        }
        let clients = v.clients();
        if clients > 0 {
            return Err((
                ErrorKind::InUse,
                format!(
                    "volume {} has {clients} NBD clients connected; disconnect them first",
                    v.name()
                ),
            ));
        }
        // Everything acknowledged so far becomes durable on both nodes before the role goes.
        v.flush().await.map_err(internal)?;
        let t = v.transition(Event::Demote, None).await.map_err(internal)?;
        self.finish_role_change(v, t).await
    }

    /// The operator's role change performed: a refusal or a failure is the request's answer.
    async fn finish_role_change(&self, v: &Arc<Volume>, t: Transition) -> Result<(), Refused> {
        let done = self.perform(v, t, At::Operator).await;
        if let Some(e) = done.failed {
            return Err(internal(e));
        }
        done.refused.map_or(Ok(()), |r| Err(refusal(v, r)))
    }

    /// `blockctl resolve`: the named volume (or every one) gives up its data at the next
    /// handshake, which is held at once by reconnecting the link. Refused on a Primary (demote
    /// first: a Primary never receives) and while the volume replicates normally. A `Failed`
    /// disk (repaired or replaced by now) becomes `Inconsistent` with every byte marked: the
    /// target of a full resync, whichever option was given.
    pub async fn resolve(&self, volume: Option<&str>, resolve: Resolve) -> Result<(), Refused> {
        let targets = self.targets(volume)?;
        for v in &targets {
            let m = v.machine();
            if m.role == Role::Primary {
                return Err((
                    ErrorKind::NotPrimary,
                    format!(
                        "volume {} is Primary here: demote it before giving up its data",
                        v.name()
                    ),
                ));
            }
            if matches!(
                m.conn,
                ConnState::Connected | ConnState::SyncSource | ConnState::SyncTarget
            ) {
                return Err((
                    ErrorKind::Busy,
                    format!(
                        "volume {} is {:?} with its peer: there is nothing to resolve",
                        v.name(),
                        m.conn
                    ),
                ));
            }
        }
        for v in &targets {
            tracing::warn!(volume = %v.name(), "operator: resolve {resolve:?} at the next handshake");
            v.replace_disk().await.map_err(internal)?;
            v.set_resolve(resolve);
        }
        if let Some(s) = self.session() {
            s.close("resolve requested: reconnecting for a new handshake");
        }
        Ok(())
    }

    /// `blockctl verify`: every volume named (or all), one after the other.
    pub async fn verify(&self, volume: Option<&str>) -> Result<Vec<Verified>, Refused> {
        let mut out = Vec::new();
        for v in self.targets(volume)? {
            let m = v.machine();
            if v.split_brain() {
                return Err(split_brain(&v, "verify needs the peer in sync"));
            }
            if m.role != Role::Primary || m.conn != ConnState::Connected {
                return Err((
                    ErrorKind::NotPrimary,
                    format!(
                        "volume {}: verify runs on the Primary while Connected and in sync (now {m})",
                        v.name()
                    ),
                ));
            }
            let (compared, differed) = resync::verify(&*v).await.map_err(|e| {
                (ErrorKind::PeerUnreachable, format!("volume {}: verify stopped: {e}", v.name()))
            })?;
            out.push(Verified { volume: v.name().to_string(), compared, differed });
        }
        Ok(out)
    }

    fn targets(&self, volume: Option<&str>) -> Result<Vec<Arc<Volume>>, Refused> {
        match volume {
            Some(name) => Ok(vec![Arc::clone(
                self.volumes.iter().find(|v| v.name() == name).ok_or_else(|| {
                    (ErrorKind::NotFound, format!("no volume named {name} on node {}", self.name))
                })?,
            )]),
            None => Ok(self.volumes.clone()),
        }
    }

    /// `blockctl swap`: asks the connected peer to run its promote plan and waits for it.
    pub async fn peer_promote(&self) -> Result<(i32, String), Refused> {
        let s = self
            .session()
            .ok_or_else(|| (ErrorKind::PeerUnreachable, "the peer is not connected".to_string()))?;
        match s.call(0, Message::RunPromote).await {
            Ok(Message::PromoteResult { code, output }) => Ok((code, output)),
            Ok(other) => Err((ErrorKind::Internal, format!("the peer answered {other:?}"))),
            Err(e) => Err((ErrorKind::PeerUnreachable, format!("the peer went away: {e}"))),
        }
    }

    /// Flushes the peer once a second while writes happen (design.md §3, transfer log).
    async fn flush_peer_periodically(self: Arc<Self>, token: CancellationToken) {
        let mut seen: Vec<u64> = vec![0; self.volumes.len()];
        let mut tick = tokio::time::interval(PEER_FLUSH_INTERVAL);
        loop {
            tokio::select! {
                () = token.cancelled() => return,
                _ = tick.tick() => {}
            }
            for (v, seen) in self.volumes.iter().zip(seen.iter_mut()) {
                let written = v.peer_writes();
                if written != *seen && v.machine().role == Role::Primary {
                    *seen = written;
                    if let Err(e) = v.flush().await {
                        tracing::warn!(volume = %v.name(), error = %e, "periodic flush failed");
                    }
                }
            }
        }
    }
}

/// This node's side of the state exchange for `v`.
async fn state_message(v: &Volume) -> Message {
    let (state, gens, pws) = v.local_state().await;
    Message::State {
        role: state.role,
        disk: state.disk,
        gens,
        primary_when_stopped: pws,
        dirty: v.dirty_bytes(),
        resolve: v.resolve(),
    }
}

fn ack_of<T>(r: Result<T, crate::volume::VolumeError>) -> Message {
    Message::Ack { error: if r.is_ok() { errno::OK } else { errno::EIO } }
}

fn internal(e: crate::volume::VolumeError) -> Refused {
    (
        ErrorKind::Internal,
        format!("{e}: {}", std::error::Error::source(&e).map_or(String::new(), |s| s.to_string())),
    )
}

/// A request refused because the volume is StandAlone for a split brain.
fn split_brain(v: &Volume, what: &str) -> Refused {
    (
        ErrorKind::SplitBrain,
        format!(
            "volume {}: split brain ({what}): both nodes wrote since they were last in sync. On \
             the node whose changes lose: blockctl demote, then blockctl resolve --discard-local; \
             or promote --force to go on alone",
            v.name()
        ),
    )
}

fn refusal(v: &Volume, r: Refusal) -> Refused {
    let name = v.name();
    match r {
        Refusal::NotUpToDate(disk) => (
            ErrorKind::Inconsistent,
            format!("volume {name}: the local disk is {disk:?}, not UpToDate; refusing to promote"),
        ),
        // Connected, but the handshake refused the peer: not "unreachable".
        Refusal::PeerUnreachable if v.split_brain() => split_brain(v, "refusing to promote"),
        Refusal::PeerUnreachable => (
            ErrorKind::PeerUnreachable,
            format!(
                "volume {name}: the peer is not connected; use --force only if it is really down"
            ),
        ),
        Refusal::PeerIsPrimary | Refusal::PeerRefused => (
            ErrorKind::PeerPrimary,
            format!("volume {name}: the peer is Primary (or refused); demote it first"),
        ),
        Refusal::PromotionPending => {
            (ErrorKind::Busy, format!("volume {name}: a promotion is already in progress"))
        }
    }
}

#[cfg(test)]
#[path = "node_refusal_tests.rs"]
mod refusal_tests;
