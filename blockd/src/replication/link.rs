//! The link actor (design.md §6): one manager task owns the listener, the dialing and the choice of
//! the one live session; each session owns its socket (`session.rs`). The node sees only
//! [`LinkEvent`]s and cloneable [`Session`] handles.
//!
//! Which connection survives: both nodes listen, and both may dial. The lower-named node dials at
//! once whenever it has no session; the higher-named one only after [`Tuning::higher_dial_delay`]
//! without one, so simultaneous dials are rare. After authentication the lower-named node alone
//! decides: the newest authenticated connection always becomes its session (a node only dials or
//! is dialed when the other side has lost its session, so the older one is stale), and it tells
//! the other side with READY carrying an epoch that grows with each adoption (and drops a new
//! connection while a session with the same peer process is open). The higher-named
//! node adopts a connection on READY unless it already has a session from the same peer instance
//! with a higher epoch (READYs of two connections may arrive out of order). So both sides end
//! with the same connection, and a restarted peer (new instance) always replaces the old session.
//!
//! Requests from the peer reach the node as [`LinkEvent::Request`] on one bounded channel, in
//! arrival order. The node must not wait for a `Session::call` reply while it holds up that
//! channel: the reply is read by the same reader that is blocked on the full channel.
//!
//! Socket options: TCP_NODELAY (every frame is latency-bound), keepalive, and
//! TCP_USER_TIMEOUT = peer-timeout so that unacknowledged data to a black-holed peer fails the
//! socket in the same time the heartbeat would notice silence.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::auth::Secrets;
use super::handshake::{self, HandshakeError, PeerHello};
use super::record::{Channel, Protection};
use super::session::{self as sess, SessionParams};
pub use super::session::{Responder, Session};
use super::wire::{Frame, Message, VolumeParams};
use crate::accept::{self, Full, OnCancel, Policy};

/// Everything the link needs from the config.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// This node's name.
    pub node: String,
    /// The peer's name; a connection from any other name is refused.
    pub peer: String,
    /// Where this node listens (its `replication` address).
    pub listen: SocketAddr,
    /// Where the peer listens.
    pub peer_addr: SocketAddr,
    /// The shared secrets (current, and during a rotation the previous one).
    pub secrets: Secrets,
    /// `[cluster] encryption`: records encrypted, or authenticated only.
    pub protection: Protection,
    /// No frame for this long declares the peer gone.
    pub peer_timeout: Duration,
    /// Volume names, sizes and tracking geometry, in config order; names, sizes and bitmap
    /// granularities must equal the peer's.
    pub volumes: Vec<VolumeParams>,
    /// Payload bytes of the peer's requests held at once before the link stops reading
    /// (`cluster.max-in-flight-bytes`; see `session.rs`).
    pub max_in_flight_bytes: usize,
}

/// Timing knobs; the defaults are the design's, tests shorten them.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// How long the higher-named node waits without a session before dialing.
    pub higher_dial_delay: Duration,
    /// First reconnect delay, doubled after each failure up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Capacity of the event channel: requests queue here in arrival order.
    pub event_queue: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            higher_dial_delay: Duration::from_secs(1),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            event_queue: 1024,
        }
    }
}

/// Errors of the link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the link")]
    Start(#[source] super::auth::AuthError),
    /// The session ended before the reply came (or had already ended).
    #[error("the replication link is down")]
    LinkDown,
}

/// What the link tells the node.
#[derive(Debug)]
pub enum LinkEvent {
    /// A session is up (handshake and authentication done). At most one is up at a time; a
    /// `Down` for the previous one always comes first.
    Up(Session),
    /// The session ended; its pending calls have failed with LinkDown.
    Down { session: u64, reason: String },
    /// A request from the peer, in arrival order; answer with `reply.send(msg)`.
    Request { session: u64, volume: u16, msg: Message, reply: Responder },
    /// A connection was refused (authentication, version, volumes, wrong node): for logs and
    /// status. The link keeps retrying with backoff.
    Refused { reason: String },
}

/// Binds the replication listener (SO_REUSEADDR, so a restarted node can bind at once).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, LinkError> {
    let err = |source| LinkError::Bind { addr, source };
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(err)?;
    sock.set_reuse_address(true).map_err(err)?;
    sock.bind(&addr.into()).map_err(err)?;
    sock.listen(16).map_err(err)?;
    sock.set_nonblocking(true).map_err(err)?;
    Ok(sock.into())
}

/// Binds `cfg.listen` now (an error if it cannot be bound) and starts the link; must be called
/// inside a tokio runtime.
pub fn spawn(
    cfg: LinkConfig,
    shutdown: CancellationToken,
) -> Result<mpsc::Receiver<LinkEvent>, LinkError> {
    let listener = bind(cfg.listen)?;
    start(cfg, listener, Tuning::default(), shutdown)
}

/// Starts the link on an already bound listener with explicit tuning (tests).
pub fn start(
    cfg: LinkConfig,
    listener: std::net::TcpListener,
    tuning: Tuning,
    shutdown: CancellationToken,
) -> Result<mpsc::Receiver<LinkEvent>, LinkError> {
    let addr = cfg.listen;
    let listener =
        TcpListener::from_std(listener).map_err(|source| LinkError::Bind { addr, source })?;
    let instance = super::auth::random_u64().map_err(LinkError::Start)?;
    let (events, rx) = mpsc::channel(tuning.event_queue.max(1));
    let (results, results_rx) = mpsc::unbounded_channel();
    let (ended, ended_rx) = mpsc::unbounded_channel();
    let accepted = accept_into_channel(listener, shutdown.clone());
    let m = Manager {
        lower: cfg.node < cfg.peer,
        budget: sess::Budget::new(cfg.max_in_flight_bytes),
        cfg: Arc::new(cfg),
        backoff: tuning.backoff_min,
        tuning,
        instance,
        events,
        results,
        ended,
        current: None,
        epoch: 0,
        next_session: 1,
        dialing: false,
        next_dial: Instant::now(),
        in_progress: HashMap::new(),
        logged: HashMap::new(),
    };
    tokio::spawn(m.run(accepted, results_rx, ended_rx, shutdown));
    Ok(rx)
}

/// How the replication listener accepts (table in `crate::accept`): the loop only hands each
/// connection to the manager, which bounds handshakes per source and in all.
const POLICY: Policy =
    Policy::new("replication").bounded(MAX_HANDSHAKES, Full::Wait).on_cancel(OnCancel::Drop);

/// Runs the shared accept loop on `listener`, its connections arriving on the returned channel.
fn accept_into_channel(
    listener: TcpListener,
    shutdown: CancellationToken,
) -> mpsc::Receiver<(TcpStream, SocketAddr)> {
    let (tx, rx) = mpsc::channel(MAX_HANDSHAKES);
    tokio::spawn(accept::serve(listener, POLICY, shutdown, TaskTracker::new(), move |c| {
        let tx = tx.clone();
        async move {
            let _ = tx.send((c.stream, c.from)).await;
        }
    }));
    rx
}

/// Applies the link's socket options (see the module doc).
fn tune_socket(s: &TcpStream, peer_timeout: Duration) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(s);
    sock.set_tcp_nodelay(true)?;
    let idle = (peer_timeout / 3).max(Duration::from_secs(1));
    let ka = socket2::TcpKeepalive::new().with_time(idle).with_interval(idle).with_retries(3);
    sock.set_tcp_keepalive(&ka)?;
    sock.set_tcp_user_timeout(Some(peer_timeout))
}

/// The outcome of one connection's handshake, reported to the manager.
struct Authed {
    dialed: bool,
    stream: TcpStream,
    buf: BytesMut,
    addr: SocketAddr,
    hello: PeerHello,
    channel: Channel,
}

enum Outcome {
    Authed(Box<Authed>),
    Failed { dialed: bool, addr: Option<SocketAddr>, error: HandshakeError },
}

/// Runs the handshake on a connected stream and reports the outcome to the manager.
async fn run_handshake(
    mut stream: TcpStream,
    addr: SocketAddr,
    dialed: bool,
    cfg: Arc<LinkConfig>,
    instance: u64,
    results: mpsc::UnboundedSender<Outcome>,
) {
    // Small: nothing more is allocated before the peer is authenticated (handshake.rs).
    let mut buf = BytesMut::with_capacity(4096);
    let r = match tune_socket(&stream, cfg.peer_timeout) {
        Err(e) => Err(HandshakeError::Io(e)),
        Ok(()) => handshake::handshake(&mut stream, &mut buf, &cfg, instance, addr, dialed).await,
    };
    let o = match r {
        Ok((hello, channel)) => {
            Outcome::Authed(Box::new(Authed { dialed, stream, buf, addr, hello, channel }))
        }
        Err(error) => Outcome::Failed { dialed, addr: Some(addr), error },
    };
    let _ = results.send(o);
}

struct Current {
    session: Session,
    peer_instance: u64,
    epoch: u64,
}

struct Manager {
    cfg: Arc<LinkConfig>,
    tuning: Tuning,
    instance: u64,
    /// This node's name sorts lower: it dials at once and decides which connection survives.
    lower: bool,
    events: mpsc::Sender<LinkEvent>,
    results: mpsc::UnboundedSender<Outcome>,
    ended: mpsc::UnboundedSender<(u64, String)>,
    current: Option<Current>,
    /// Shared by every session: a stale session's requests still hold their bytes.
    budget: Arc<sess::Budget>,
    /// Last epoch adopted (lower node: assigned; higher: as received).
    epoch: u64,
    next_session: u64,
    dialing: bool,
    next_dial: Instant,
    backoff: Duration,
    /// Accepted connections still in their handshake, per source address.
    in_progress: HashMap<IpAddr, usize>,
    /// When a refusal from each source was last logged.
    logged: HashMap<IpAddr, Instant>,
}

/// Handshakes in progress one source address may have; more connections are dropped at once.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 4;
/// Handshakes in progress from all sources together.
pub const MAX_HANDSHAKES: usize = 32;
/// A source's refusals are logged at most this often (each one is still counted).
const LOG_EVERY: Duration = Duration::from_secs(60);

impl Manager {
    async fn run(
        mut self,
        mut accepted: mpsc::Receiver<(TcpStream, SocketAddr)>,
        mut results: mpsc::UnboundedReceiver<Outcome>,
        mut ended: mpsc::UnboundedReceiver<(u64, String)>,
        shutdown: CancellationToken,
    ) {
        if !self.lower {
            self.next_dial = Instant::now() + self.tuning.higher_dial_delay;
        }
        loop {
            let may_dial = self.current.is_none() && !self.dialing;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some((stream, addr)) = accepted.recv() => self.handshake(stream, addr).await,
                Some(o) = results.recv() => self.outcome(o).await,
                Some((id, reason)) = ended.recv() => self.ended(id, reason).await,
                _ = tokio::time::sleep_until(self.next_dial), if may_dial => self.dial(),
            }
        }
        if let Some(c) = self.current.take() {
            c.session.close("node shutting down");
        }
    }

    fn dial(&mut self) {
        self.dialing = true;
        let (cfg, results, instance) = (self.cfg.clone(), self.results.clone(), self.instance);
        tokio::spawn(async move {
            let addr = cfg.peer_addr;
            let error = match tokio::time::timeout(cfg.peer_timeout, TcpStream::connect(addr)).await
            {
                Ok(Ok(stream)) => {
                    return run_handshake(stream, addr, true, cfg, instance, results).await
                }
                Ok(Err(e)) => HandshakeError::Io(e),
                Err(_) => HandshakeError::Timeout,
            };
            let _ = results.send(Outcome::Failed { dialed: true, addr: None, error });
        });
    }

    /// Starts the handshake of an accepted connection, unless its source already has
    /// [`MAX_HANDSHAKES_PER_SOURCE`] in progress (or all sources [`MAX_HANDSHAKES`]).
    async fn handshake(&mut self, stream: TcpStream, addr: SocketAddr) {
        let ip = addr.ip();
        let mine = self.in_progress.get(&ip).copied().unwrap_or(0);
        let all: usize = self.in_progress.values().sum();
        if mine >= MAX_HANDSHAKES_PER_SOURCE || all >= MAX_HANDSHAKES {
            drop(stream);
            let why = format!(
                "too many handshakes in progress from {ip}: connection from {addr} dropped"
            );
            self.failed(Some(addr), &HandshakeError::Refused(why));
            return;
        }
        *self.in_progress.entry(ip).or_default() += 1;
        let (cfg, results, instance) = (self.cfg.clone(), self.results.clone(), self.instance);
        tokio::spawn(run_handshake(stream, addr, false, cfg, instance, results));
    }

    /// A failed handshake: logged once per source per [`LOG_EVERY`], always reported.
    fn failed(&mut self, addr: Option<SocketAddr>, error: &HandshakeError) {
        let HandshakeError::Refused(reason) = error else {
            tracing::debug!(%error, ?addr, "replication connection failed");
            return;
        };
        let ip = addr.map_or(self.cfg.peer_addr.ip(), |a| a.ip());
        let now = Instant::now();
        if self.logged.len() > 1024 {
            self.logged.clear();
        }
        let quiet = self.logged.get(&ip).is_some_and(|t| now.duration_since(*t) < LOG_EVERY);
        if quiet {
            tracing::debug!(%reason, "replication connection refused");
        } else {
            self.logged.insert(ip, now);
            tracing::warn!(%reason, source = %ip, "replication connection refused (logged once a minute per source)");
        }
        // Never blocks the manager: under a flood of refusals some may go uncounted rather than
        // hold up the session's requests behind them.
        let _ = self.events.try_send(LinkEvent::Refused { reason: reason.clone() });
    }

    async fn outcome(&mut self, o: Outcome) {
        if matches!(o, Outcome::Failed { dialed: true, .. })
            || matches!(&o, Outcome::Authed(a) if a.dialed)
        {
            self.dialing = false;
        }
        match o {
            Outcome::Authed(a) => {
                self.finished(&a);
                self.adopt(*a).await
            }
            Outcome::Failed { dialed, addr, error } => {
                if !dialed {
                    self.done_from(addr);
                }
                self.failed(addr, &error);
                if dialed {
                    self.after_failure();
                }
            }
        }
    }

    fn finished(&mut self, a: &Authed) {
        if !a.dialed {
            self.done_from(Some(a.addr));
        }
    }

    /// An accepted connection's handshake ended.
    fn done_from(&mut self, addr: Option<SocketAddr>) {
        let Some(ip) = addr.map(|a| a.ip()) else { return };
        if let Some(n) = self.in_progress.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.in_progress.remove(&ip);
            }
        }
    }

    fn after_failure(&mut self) {
        self.next_dial = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(self.tuning.backoff_max);
    }

    /// Makes an authenticated connection the session, or drops it (see the module doc).
    async fn adopt(&mut self, a: Authed) {
        let epoch = match a.hello.epoch {
            None => {
                // Both nodes dial when the link heals: keep the session already up with this
                // very peer process rather than tear it down for the second connection (that
                // would abort whatever the first one started, a resync say).
                let live = self
                    .current
                    .as_ref()
                    .is_some_and(|c| c.peer_instance == a.hello.instance && c.session.is_open());
                if live {
                    tracing::debug!(addr = %a.addr, "a second connection from the peer: keeping the session");
                    return;
                }
                self.epoch += 1;
                self.epoch
            }
            Some(e) => {
                let same =
                    self.current.as_ref().is_some_and(|c| c.peer_instance == a.hello.instance);
                if same && self.current.as_ref().is_some_and(|c| c.epoch >= e) {
                    tracing::debug!(epoch = e, "dropping an older connection from the peer");
                    return;
                }
                e
            }
        };
        if let Some(old) = self.current.take() {
            let reason = if old.peer_instance == a.hello.instance {
                "replaced by a newer connection"
            } else {
                "peer restarted"
            };
            old.session.close(reason);
            self.down(old.session.id(), reason.to_string()).await;
        }
        let id = self.next_session;
        self.next_session += 1;
        let first = a.hello.epoch.is_none().then_some(Frame {
            volume: 0,
            id: 0,
            reply: false,
            msg: Message::Ready { epoch },
        });
        let params = SessionParams {
            id,
            epoch,
            peer: a.hello.node.clone(),
            peer_addr: a.addr,
            peer_timeout: self.cfg.peer_timeout,
            events: self.events.clone(),
            ended: self.ended.clone(),
            first,
            budget: Arc::clone(&self.budget),
        };
        let (session, reader) = sess::start(a.stream, a.buf, a.channel, params);
        tracing::info!(peer = %a.hello.node, addr = %a.addr, session = id, epoch, "replication link up");
        self.current =
            Some(Current { session: session.clone(), peer_instance: a.hello.instance, epoch });
        self.backoff = self.tuning.backoff_min;
        // Up before the reader runs: the session's first request must not overtake it.
        let _ = self.events.send(LinkEvent::Up(session)).await;
        reader.spawn();
    }

    async fn down(&mut self, session: u64, reason: String) {
        tracing::warn!(session, %reason, "replication link down");
        let _ = self.events.send(LinkEvent::Down { session, reason }).await;
    }

    /// A session ended by itself (timeout, error, peer's GOODBYE, `close`).
    async fn ended(&mut self, id: u64, reason: String) {
        if self.current.as_ref().is_some_and(|c| c.session.id() == id) {
            self.current = None;
            self.down(id, reason).await;
            let delay =
                if self.lower { self.tuning.backoff_min } else { self.tuning.higher_dial_delay };
            self.next_dial = Instant::now() + delay;
        }
    }
}

#[cfg(test)]
#[path = "link_tests.rs"]
mod tests;
