//! One authenticated connection: the [`Session`] handle, its reader task and its writer task.
//!
//! ```text
//!   Session::call ──┐
//!   Responder::send ┼─► Out::send (writer.rs): written at once, or queued for the writer task
//!   heartbeat ──────┘   (Ping when nothing was queued for peer_timeout/4)
//!
//!   socket ─► reader task ─┬─ reply  ──► pending[id] (oneshot) ──► Session::call returns
//!                          ├─ Ping   ──► Pong into the queue
//!                          └─ request ─► LinkEvent::Request (in arrival order)
//! ```
//!
//! Deadlines (design.md §3): a request of ours the peer has not answered within `peer_timeout`
//! ends the session, pings or not: a peer whose disk hangs still pongs from its reader task.
//! There is no timer per request: each call notes when it was sent, and the reader's one
//! silence timer also wakes at the oldest call's deadline (ids grow, so the oldest is the first
//! entry of the pending map). Ending the session fails every pending call with LinkDown: the
//! caller's link-loss path marks the ranges. `RunPromote` alone has no deadline: the peer runs
//! a whole promote plan before it answers.
//!
//! Memory: a request from the peer holds a share of the link's [`Budget`] (its payload bytes
//! plus [`REQUEST_COST`]) from the moment it is decoded until it is answered. When the budget
//! is spent the reader waits before it dispatches the next request and reads nothing more, so
//! the peer's frames back up in TCP and the sender blocks: bytes in flight here stay under the
//! ceiling, plus the one frame the reader holds. A request larger than the whole budget takes
//! all of it (it still runs, alone).
//!
//! The writer's queue is unbounded on purpose: what flows into it is bounded elsewhere (the
//! node's requests by the NBD queue depths, replies by the bounded event channel the reader
//! feeds), and an unbounded queue lets [`Responder::send`] be synchronous.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::link::{LinkError, LinkEvent};
use super::record::{self, Channel, Opener};
use super::stream::{LinkRead, LinkWrite};
use super::wire::{self, Frame, Message};
use super::writer::{self, Out};

// Sent when a request was dropped unanswered (the crate's one table).
use crate::errno::EIO;
use crate::storage::buf::BUF_ALIGN;

/// Read buffer growth step.
const READ_CHUNK: usize = 64 << 10;
/// A record still missing at least this many bytes raises the socket's low-water mark to the
/// missing part (see [`Reader::tune_low_water`]); below it the reader wakes for every byte.
const LOW_WATER_MIN: usize = 64 << 10;
/// The highest low-water mark asked for (the kernel caps it further, at half its largest
/// receive buffer).
const LOW_WATER_MAX: usize = 4 << 20;
/// Where a data frame's payload starts in its record: after the record's length prefix and
/// the frame's header.
const PAYLOAD_AT: usize = record::LEN_LEN + wire::HEADER_LEN;
/// What a request costs besides its payload (its task, its frame, its event): charged to the
/// budget so that a flood of empty requests is bounded too.
pub(crate) const REQUEST_COST: usize = 1024;

/// Bytes of the peer's requests this node may hold at once, shared by every session of a link
/// (a stale session's requests still count until they are answered).
#[derive(Debug)]
pub(crate) struct Budget {
    sem: Arc<Semaphore>,
    ceiling: usize,
}

impl Budget {
    pub(crate) fn new(ceiling: usize) -> Arc<Budget> {
        let ceiling = ceiling.clamp(REQUEST_COST, u32::MAX as usize);
        Arc::new(Budget { sem: Arc::new(Semaphore::new(ceiling)), ceiling })
    }

    /// Waits until `msg`'s share is free; a request larger than the ceiling takes all of it.
    /// None only if the semaphore were closed, which nothing does.
    async fn take(&self, msg: &Message) -> Option<OwnedSemaphorePermit> {
        let payload = match msg {
            Message::Write { data, .. }
            | Message::WriteFua { data, .. }
            | Message::ResyncData { data, .. } => data.len(),
            _ => 0,
        };
        let n = (payload + REQUEST_COST).min(self.ceiling);
        // `n` fits in u32: the ceiling does.
        Arc::clone(&self.sem).acquire_many_owned(n as u32).await.ok()
    }
}

/// Calls waiting for their reply. `closed` is set under the same lock as the map is drained, so
/// a call either gets its sender into the map before the drain (and sees LinkDown from the
/// dropped sender) or sees `closed` (and fails at once).
#[derive(Default)]
struct Pending {
    closed: bool,
    /// Keyed by id, so the first entry is the oldest call.
    map: BTreeMap<u64, Call>,
}

/// One call waiting for its reply; `sent` is None for calls without a deadline.
struct Call {
    tx: oneshot::Sender<Message>,
    sent: Option<Instant>,
}

impl Pending {
    /// When the oldest call with a deadline was sent.
    fn oldest(&self) -> Option<Instant> {
        self.map.values().find_map(|c| c.sent)
    }
}

struct Inner {
    id: u64,
    epoch: u64,
    peer: String,
    peer_addr: std::net::SocketAddr,
    out: Out,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    /// Our calls waiting for a reply, and the peer's requests waiting for ours: when either
    /// is more than the frame being sent, it goes through the batching writer.
    calls_out: AtomicUsize,
    requests_in: AtomicUsize,
    cancel: CancellationToken,
    reason: Mutex<Option<String>>,
    /// Tells the link manager that this session ended (id, reason), once.
    ended: mpsc::UnboundedSender<(u64, String)>,
}

/// A handle to the one live session with the peer; cheap to clone.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.inner.id)
            .field("peer", &self.inner.peer)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these short locks leaves consistent data; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Session {
    /// Local id of this session, unique within the process; `Down` events name it.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The peer's node name.
    pub fn peer(&self) -> &str {
        &self.inner.peer
    }

    /// The peer's socket address.
    pub fn peer_addr(&self) -> std::net::SocketAddr {
        self.inner.peer_addr
    }

    /// The connection's epoch, assigned by the lower-named node: the same on both sides, so
    /// tests can check that both kept the same connection.
    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    /// Sends a request and waits for the reply; Err(LinkDown) as soon as the session ends
    /// (timeout, error, close). A reply not in within `peer_timeout` ends the session (see the
    /// module doc), so this waits at most about that long; `RunPromote` waits for the peer.
    pub async fn call(&self, volume: u16, msg: Message) -> Result<Message, LinkError> {
        let inner = &*self.inner;
        let alone = inner.calls_out.fetch_add(1, Ordering::Relaxed) == 0
            && inner.requests_in.load(Ordering::Relaxed) == 0;
        // Decrements `calls_out` however the call ends, also when its future is dropped.
        let _out = CallGuard(&inner.calls_out);
        inner.call(volume, msg, alone).await
    }

    /// Ends the session: pending calls fail with LinkDown, the peer gets a GOODBYE naming
    /// `reason` (best effort), and the link reports `Down` and reconnects.
    pub fn close(&self, reason: &str) {
        let _ = self.inner.send(goodbye(reason), true);
        self.inner.end(reason.to_owned());
    }

    /// Resolves when the session has ended.
    pub async fn closed(&self) {
        self.inner.cancel.cancelled().await;
    }

    /// Whether the session is still up.
    pub fn is_open(&self) -> bool {
        !self.inner.cancel.is_cancelled()
    }

    /// Why the session ended, once it has.
    pub fn reason(&self) -> Option<String> {
        lock(&self.inner.reason).clone()
    }
}

struct CallGuard<'a>(&'a AtomicUsize);

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn goodbye(reason: &str) -> Frame {
    Frame { volume: 0, id: 0, reply: false, msg: Message::Goodbye { reason: reason.to_owned() } }
}

impl Inner {
    async fn call(&self, volume: u16, msg: Message, direct: bool) -> Result<Message, LinkError> {
        let (tx, rx) = oneshot::channel();
        let sent = (!matches!(msg, Message::RunPromote)).then(Instant::now);
        let id = {
            let mut p = lock(&self.pending);
            if p.closed {
                return Err(LinkError::LinkDown);
            }
            // Taken under the lock: ids then grow in the map's order, oldest first.
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            p.map.insert(id, Call { tx, sent });
            id
        };
        if self.send(Frame { volume, id, reply: false, msg }, direct).is_err() {
            lock(&self.pending).map.remove(&id);
            return Err(LinkError::LinkDown);
        }
        rx.await.map_err(|_| LinkError::LinkDown)
    }

    /// Sends a frame; a socket error ends the session.
    fn send(&self, f: Frame, direct: bool) -> Result<(), LinkError> {
        match self.out.send(f, direct) {
            Ok(()) => Ok(()),
            Err(Some(e)) => {
                self.end(format!("write error: {e}"));
                Err(LinkError::LinkDown)
            }
            Err(None) => Err(LinkError::LinkDown),
        }
    }

    /// The one way a session ends. Idempotent: the first reason wins.
    fn end(&self, reason: String) {
        {
            let mut r = lock(&self.reason);
            if r.is_some() {
                return;
            }
            *r = Some(reason.clone());
        }
        {
            let mut p = lock(&self.pending);
            p.closed = true;
            p.map.clear();
        }
        self.cancel.cancel();
        let _ = self.ended.send((self.id, reason));
    }
}

/// The answer to one request from the peer. Dropping it unanswered replies `Ack { error: EIO }`,
/// so the peer's call never waits for an answer that will not come.
pub struct Responder {
    inner: Arc<Inner>,
    volume: u16,
    id: u64,
    answered: bool,
    /// This request's share of the budget, given back when the answer is queued.
    _budget: Option<OwnedSemaphorePermit>,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder").field("volume", &self.volume).field("id", &self.id).finish()
    }
}

impl Responder {
    /// Queues the reply. Only reply kinds may be sent (Ack, State, PromoteAnswer, Pong); any
    /// other message would make the peer drop the link, so it is replaced by `Ack { EIO }`.
    pub fn send(mut self, msg: Message) {
        self.answered = true;
        let msg = if wire::is_reply_kind(msg.kind()) {
            msg
        } else {
            tracing::error!(kind = msg.kind(), "not a reply message; answering EIO instead");
            Message::Ack { error: EIO }
        };
        self.reply(msg);
    }

    fn reply(&self, msg: Message) {
        let inner = &*self.inner;
        let alone = inner.requests_in.fetch_sub(1, Ordering::Relaxed) == 1
            && inner.calls_out.load(Ordering::Relaxed) == 0;
        let _ = inner.send(Frame { volume: self.volume, id: self.id, reply: true, msg }, alone);
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if !self.answered {
            self.reply(Message::Ack { error: EIO });
        }
    }
}

/// What a session needs besides its socket.
pub(crate) struct SessionParams {
    pub id: u64,
    pub epoch: u64,
    pub peer: String,
    pub peer_addr: std::net::SocketAddr,
    pub peer_timeout: Duration,
    pub events: mpsc::Sender<LinkEvent>,
    pub ended: mpsc::UnboundedSender<(u64, String)>,
    /// Frames to send before anything else (READY).
    pub first: Option<Frame>,
    /// The link's budget for the peer's requests.
    pub budget: Arc<Budget>,
}

/// The reader of a session that has not started yet: see [`start`].
pub(crate) struct PendingReader(Reader);

impl PendingReader {
    /// Starts delivering the peer's frames (requests go to the event channel).
    pub(crate) fn spawn(self) {
        tokio::spawn(self.0.run());
    }
}

/// Starts the writer task of an authenticated connection and returns its reader unstarted:
/// the caller queues `LinkEvent::Up` first, so that no request of this session can reach the
/// event channel before the session itself does. `buf` holds bytes the handshake already read
/// past its last frame.
pub(crate) fn start(
    stream: tokio::net::TcpStream,
    buf: BytesMut,
    channel: Channel,
    p: SessionParams,
) -> (Session, PendingReader) {
    let (rd, wr) = super::stream::tcp_halves(stream);
    start_on(rd, wr, buf, channel, p)
}

/// [`start`] on any connection (the simulation's pipes; TCP through `start`).
pub(crate) fn start_on(
    rd: LinkRead,
    wr: Box<dyn LinkWrite>,
    buf: BytesMut,
    channel: Channel,
    p: SessionParams,
) -> (Session, PendingReader) {
    let (out, wr, rx) = Out::new(wr, channel.tx);
    let inner = Arc::new(Inner {
        id: p.id,
        epoch: p.epoch,
        peer: p.peer,
        peer_addr: p.peer_addr,
        out,
        pending: Mutex::new(Pending::default()),
        next_id: AtomicU64::new(1),
        calls_out: AtomicUsize::new(0),
        requests_in: AtomicUsize::new(0),
        cancel: CancellationToken::new(),
        reason: Mutex::new(None),
        ended: p.ended,
    });
    if let Some(f) = p.first {
        let _ = inner.send(f, true);
    }
    let reader = Reader {
        inner: inner.clone(),
        rd,
        buf,
        opener: channel.rx,
        timeout: p.peer_timeout,
        events: p.events,
        budget: p.budget,
        last: Instant::now(),
        low_water: 1,
        queued_seen: 0,
    };
    let w = inner.clone();
    tokio::spawn(async move {
        let ping = || {
            let id = w.next_id.fetch_add(1, Ordering::Relaxed);
            Frame { volume: 0, id, reply: false, msg: Message::Ping }
        };
        let r = writer::run(&w.out, wr, rx, w.cancel.clone(), p.peer_timeout / 4, ping).await;
        if let Some(reason) = r {
            w.end(reason);
        }
    });
    (Session { inner }, PendingReader(reader))
}

struct Reader {
    inner: Arc<Inner>,
    rd: LinkRead,
    buf: BytesMut,
    /// Opens the peer's records, in order.
    opener: Opener,
    timeout: Duration,
    events: mpsc::Sender<LinkEvent>,
    budget: Arc<Budget>,
    /// When the peer was last heard from; time the reader spent waiting on this node (the
    /// budget, the event channel) does not count as the peer's silence.
    last: Instant,
    /// The socket's receive low-water mark as last set (1: wake for every byte).
    low_water: usize,
    /// Bytes the socket held unread when the silence timer last looked, while `low_water` > 1.
    queued_seen: usize,
}

impl Reader {
    async fn run(mut self) {
        let reason = self.read_loop().await;
        self.inner.end(reason);
    }

    /// Reads and dispatches frames until the session ends; returns why it ended.
    ///
    /// The silence timer is one long-lived `Sleep` checked against the time of the last read
    /// and the oldest pending call, not a timeout per read or per call: arming a timer per
    /// frame costs more than the frame.
    async fn read_loop(&mut self) -> String {
        let cancelled = self.inner.cancel.clone().cancelled_owned();
        tokio::pin!(cancelled);
        self.last = Instant::now();
        let silence = tokio::time::sleep_until(self.last + self.timeout);
        tokio::pin!(silence);
        loop {
            loop {
                match self.opener.open(&mut self.buf, record::MAX_BODY) {
                    Ok(Some(f)) => {
                        if let Err(reason) = self.dispatch(f).await {
                            return reason;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return format!("bad frame from peer: {e}"),
                }
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(READ_CHUNK);
            }
            self.tune_low_water();
            tokio::select! {
                biased;
                _ = &mut cancelled => return "closed".into(),
                r = self.rd.read_buf(&mut self.buf) => match r {
                    Ok(0) => return "peer closed the connection".into(),
                    Ok(_) => self.last = Instant::now(),
                    Err(e) => return format!("read error: {e}"),
                },
                _ = &mut silence => {
                    self.note_queued();
                    let last = self.last;
                    if last.elapsed() >= self.timeout {
                        return "peer timeout".into();
                    }
                    let oldest = lock(&self.inner.pending).oldest();
                    if let Some(sent) = oldest.filter(|s| s.elapsed() >= self.timeout) {
                        return format!(
                            "peer timeout: a request unanswered for {:?} (peer-timeout {:?})",
                            sent.elapsed(),
                            self.timeout
                        );
                    }
                    // A call made after this reset has its deadline after the wake-up.
                    let next = oldest.map_or(last, |s| s.min(last));
                    silence.as_mut().reset(next + self.timeout);
                }
            }
        }
    }

    /// A big record (a 1 MiB write) arrives in many TCP segments, and each read of a part is a
    /// wake-up and a syscall. Once its header is in, the socket's low-water mark is raised to
    /// the part still missing, so the kernel wakes this reader once, when the whole record can
    /// be read, in one read. Back to 1 when the front record
    /// is small or its header is not in yet. A setsockopt only when the mark changes; back-to-
    /// back big records cost one each. The kernel still wakes on EOF, errors, memory pressure
    /// and a closing window, so the mark cannot stall a stream.
    fn tune_low_water(&mut self) {
        let missing = match record::record_len(&self.buf) {
            Some(total) => total.saturating_sub(self.buf.len()),
            None => 0,
        };
        let want = if missing >= LOW_WATER_MIN { missing.min(LOW_WATER_MAX) } else { 1 };
        if want > 1 {
            self.place_big_record(missing);
        }
        if want != self.low_water && self.rd.set_low_water(want) {
            self.low_water = want;
            self.queued_seen = 0;
        }
    }

    /// Gives the big record at the front of the buffer room for its `missing` bytes, placed so
    /// that a data frame's payload ([`PAYLOAD_AT`] bytes into the record) starts on a page
    /// boundary: the Secondary then writes a 1 MiB payload to disk with direct I/O from where
    /// it was received and decrypted, instead of copying it into an aligned buffer. When the
    /// front is not so placed, the bytes already in (one read's worth) move to a fresh buffer;
    /// once placed, nothing moves until the record is complete.
    ///
    /// Room past the record too: the read that completes it also takes the next record's front
    /// if that is in, and comes back short, so tokio waits for the next wake-up instead of
    /// trying another read that would find nothing.
    fn place_big_record(&mut self, missing: usize) {
        let room = missing + READ_CHUNK;
        let placed = (self.buf.as_ptr() as usize + PAYLOAD_AT) % BUF_ALIGN == 0;
        if placed {
            self.buf.reserve(room);
            return;
        }
        let mut fresh = BytesMut::with_capacity(BUF_ALIGN + self.buf.len() + room);
        let pad = (BUF_ALIGN - (fresh.as_ptr() as usize + PAYLOAD_AT) % BUF_ALIGN) % BUF_ALIGN;
        fresh.put_bytes(0, pad);
        fresh.advance(pad);
        fresh.extend_from_slice(&self.buf);
        self.buf = fresh;
    }

    /// With a raised low-water mark, bytes of a big record can arrive without waking this
    /// reader: bytes queued since the last look count as hearing from the peer, as a partial
    /// read did before.
    fn note_queued(&mut self) {
        if self.low_water <= 1 {
            return;
        }
        if let Some(q) = self.rd.queued().filter(|&q| q > self.queued_seen) {
            self.queued_seen = q;
            self.last = Instant::now();
        }
    }

    async fn dispatch(&mut self, f: Frame) -> Result<(), String> {
        if f.reply {
            let waiter = lock(&self.inner.pending).map.remove(&f.id);
            if let Some(w) = waiter {
                let _ = w.tx.send(f.msg);
            }
            return Ok(());
        }
        match f.msg {
            Message::Ping => {
                let _ = self
                    .inner
                    .send(Frame { volume: 0, id: f.id, reply: true, msg: Message::Pong }, true);
                Ok(())
            }
            Message::Goodbye { reason } => Err(format!("peer closed the session: {reason}")),
            Message::Hello { .. }
            | Message::Noise { .. }
            | Message::Params { .. }
            | Message::Ready { .. } => {
                Err(format!("unexpected handshake message kind {} in session", f.msg.kind()))
            }
            msg => {
                // Back-pressure: nothing more is read until this request's share is free.
                let budget = tokio::select! {
                    biased;
                    _ = self.inner.cancel.cancelled() => return Err("closed".into()),
                    p = self.budget.take(&msg) => p,
                };
                self.inner.requests_in.fetch_add(1, Ordering::Relaxed);
                let reply = Responder {
                    inner: self.inner.clone(),
                    volume: f.volume,
                    id: f.id,
                    answered: false,
                    _budget: budget,
                };
                let ev =
                    LinkEvent::Request { session: self.inner.id, volume: f.volume, msg, reply };
                let sent = self.events.send(ev).await;
                self.last = Instant::now();
                sent.map_err(|_| "link event receiver gone".to_string())
            }
        }
    }
}
