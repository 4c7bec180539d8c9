//! The transmission phase of one connection (NBD-NOTES §2.4–2.8).
//!
//! ```text
//!             ┌──────── reader (this task) ────────┐
//!  socket ──► │ header ─► codec::validate ─► payload│──spawn──► request task ─► Volume
//!  (read      │ (slot + byte budget taken first)    │               │ (out of order)
//!   half)     └─────────────────────────────────────┘               ▼
//!                                 rejections ──────────────► mpsc<Reply> ─► writer task ─► socket
//!                                                              (batched writev, flush when idle)
//! ```
//!
//! Buffers: a WRITE payload is read straight into an aligned buffer, not zeroed first
//! (`storage::Filler`; only the bytes that arrived with earlier reads are copied out of the input
//! buffer), which the volume then shares with the peer's frame; a READ payload goes from
//! the volume's buffer to the socket in a vectored write. Memory per connection is bounded by
//! `max_in_flight` requests and `byte_budget()` payload bytes: the reader stops reading while
//! either is exhausted, and a reply gives both back only once it is written.
//!
//! Endings: DISC, EOF, a protocol violation or `shutdown` stop the reader; requests already
//! received still run and are answered; the writer closes the connection after the last reply.
//! A WRITE whose payload was cut off is dropped before it reaches the volume.

use std::{io, io::IoSlice, ops::Range, sync::Arc};

use bytes::{Buf, BufMut, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::{mpsc, OwnedSemaphorePermit, Semaphore},
};
use tokio_util::sync::CancellationToken;

use super::{
    codec::{self, Command, Decoded, ExportView, Rejection, ReplyHead, Request, Verdict},
    handshake::Session,
    proto::{self, cmd},
    Limits,
};
use crate::{
    errno,
    storage::{AlignedBuf, Filler, ReadBuf},
    volume::{Volume, VolumeError},
};

/// Replies written with one vectored write at most.
const MAX_BATCH: usize = 64;
/// Input buffer growth step: several pipelined small requests per read syscall.
const READ_CHUNK: usize = 64 << 10;
/// Payload bytes in flight allowed for a connection with these limits (`nbd.max-in-flight-bytes`;
/// a request larger than that takes all of it).
fn byte_budget(limits: &Limits) -> usize {
    limits.max_in_flight_bytes.clamp(1, u32::MAX as usize)
}

/// One finished reply on its way to the writer; holds the request's slot and bytes until written.
#[derive(Debug)]
struct Reply {
    head: ReplyHead,
    data: Option<ReadBuf>,
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// Why the reader stopped.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("connection failed")]
    Io(#[source] io::Error),
    #[error("connection closed in the middle of a request")]
    Torn,
    #[error("protocol violation")]
    Codec(#[from] codec::CodecError),
}

/// Serves the transmission phase until the connection ends; returns once every request received
/// has been answered (or the connection is gone) and the connection is closed.
pub async fn transmission<S>(
    stream: S,
    session: Session,
    limits: &Limits,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let Session { volume, guard, structured, leftover } = session;
    let (rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::unbounded_channel();
    let writer_failed = CancellationToken::new();
    let writer = tokio::spawn(write_loop(wr, rx, writer_failed.clone()));
    let mut conn = Connection {
        input: Input { rd, buf: leftover },
        view: ExportView { size: volume.size(), max_request: limits.max_request },
        volume,
        structured,
        tx,
        slots: Arc::new(Semaphore::new(limits.max_in_flight.max(1))),
        bytes: Arc::new(Semaphore::new(byte_budget(limits))),
        budget: byte_budget(limits) as u32,
    };
    let name = conn.volume.name().to_owned();
    tokio::select! {
        biased;
        () = shutdown.cancelled() => tracing::debug!(volume = %name, "shutdown: no new requests"),
        () = writer_failed.cancelled() => {}
        r = conn.read_loop() => match r {
            Ok(()) => {}
            Err(ReadError::Codec(e)) => {
                tracing::warn!(volume = %name, error = %e, "NBD protocol violation, hanging up");
            }
            Err(e) => tracing::debug!(volume = %name, error = %e, "NBD client gone"),
        },
    }
    // Dropping the reader's sender lets the writer end after the last request task's reply.
    let Connection { mut input, tx, .. } = conn;
    drop(tx);
    let mut guard = Some(guard);
    tokio::pin!(writer);
    let done = loop {
        tokio::select! {
            r = &mut writer => break r,
            // The client is gone once its end of the socket closes: it no longer counts as
            // connected (so `demote` can go on) even while a request of it still runs, such as
            // a degraded write frozen by the fence, which the demotion then fails.
            () = input.closed(), if guard.is_some() => guard = None,
        }
    };
    if let Err(e) = done {
        tracing::error!(error = %e, "NBD reply writer panicked");
    }
    drop(guard);
}

/// The reader's side of one connection.
struct Connection<R> {
    input: Input<R>,
    volume: Arc<Volume>,
    view: ExportView,
    structured: bool,
    tx: mpsc::UnboundedSender<Reply>,
    /// One permit per request in flight (`limits.max_in_flight`).
    slots: Arc<Semaphore>,
    /// One permit per payload byte in flight ([`byte_budget`]).
    bytes: Arc<Semaphore>,
    /// All of `bytes`: what a request larger than the budget takes (it then runs alone).
    budget: u32,
}

impl<R: AsyncRead + Unpin> Connection<R> {
    /// Reads and dispatches requests until DISC, EOF or an error. Cancel-safe in the sense that
    /// matters: dropping it mid-request abandons that request without applying it.
    async fn read_loop(&mut self) -> Result<(), ReadError> {
        loop {
            // Stop reading while the connection has its maximum in flight.
            let slot = Arc::clone(&self.slots).acquire_owned().await.map_err(closed)?;
            if !self.input.fill(proto::REQUEST_LEN).await? {
                return Ok(()); // EOF between requests
            }
            let Decoded::Frame(req) = codec::decode_request(&self.input.buf)? else {
                return Err(ReadError::Torn); // unreachable: fill() waited for a whole header
            };
            self.input.buf.advance(proto::REQUEST_LEN);
            match codec::validate(&req, &self.view) {
                Verdict::Run(Command::Disc) => return Ok(()),
                Verdict::Run(c) => self.dispatch(req.cookie, c, slot).await?,
                Verdict::Reject(rej) => self.reject(&req, rej, slot).await?,
                Verdict::Disconnect(reason) => {
                    warn_request(&self.volume, &req, reason, "hanging up");
                    return Ok(());
                }
            }
        }
    }

    /// Refuses a request: one log line, the payload (if any) thrown away, an error reply.
    async fn reject(
        &mut self,
        req: &Request,
        rej: Rejection,
        slot: OwnedSemaphorePermit,
    ) -> Result<(), ReadError> {
        warn_request(&self.volume, req, rej.reason, errno::name(rej.error));
        self.input.discard(rej.discard as usize).await?;
        let head = error_head(req.cookie, req.kind == cmd::READ && self.structured, rej.error);
        self.send(Reply { head, data: None, _slot: slot, _bytes: None });
        Ok(())
    }

    /// Reads a WRITE payload, then runs the command in its own task.
    async fn dispatch(
        &mut self,
        cookie: u64,
        c: Command,
        slot: OwnedSemaphorePermit,
    ) -> Result<(), ReadError> {
        let payload_len = match c {
            Command::Read { len, .. } | Command::Write { len, .. } => len,
            _ => 0,
        };
        let bytes = match payload_len {
            0 => None,
            n => {
                let n = n.min(self.budget);
                Some(Arc::clone(&self.bytes).acquire_many_owned(n).await.map_err(closed)?)
            }
        };
        let payload = match c {
            Command::Write { len, .. } => Some(self.input.read_payload(len as usize).await?),
            _ => None,
        };
        let (volume, tx, structured) = (Arc::clone(&self.volume), self.tx.clone(), self.structured);
        tokio::spawn(async move {
            let (head, data) = execute(&volume, cookie, c, payload, structured).await;
            // A closed channel means the writer is gone: the client cannot get replies anyway.
            let _ = tx.send(Reply { head, data, _slot: slot, _bytes: bytes });
        });
        Ok(())
    }

    fn send(&self, reply: Reply) {
        let _ = self.tx.send(reply);
    }
}

fn closed(_: tokio::sync::AcquireError) -> ReadError {
    ReadError::Io(io::Error::other("semaphore closed"))
}

/// Logs a refused request, exactly once per request.
fn warn_request(volume: &Volume, r: &Request, reason: &str, outcome: &str) {
    tracing::warn!(
        volume = %volume.name(),
        cookie = r.cookie,
        command = command_name(r.kind),
        flags = r.flags,
        offset = r.offset,
        length = r.length,
        outcome,
        "NBD request refused: {reason}"
    );
}

/// Runs one validated command against the volume and builds its reply.
async fn execute(
    volume: &Volume,
    cookie: u64,
    c: Command,
    payload: Option<AlignedBuf>,
    structured: bool,
) -> (ReplyHead, Option<ReadBuf>) {
    let done = |r: Result<(), VolumeError>| {
        (simple(cookie, r.err().map_or(0, |e| errno::of_volume(&e))), None)
    };
    match c {
        Command::Read { offset, len } => match volume.read(offset, len).await {
            // A short buffer would desynchronise the stream after a simple reply: refuse it.
            Ok(data) if data.len() != len as usize => {
                (error_head(cookie, structured, errno::EIO), None)
            }
            Ok(data) if structured => (ReplyHead::Data { cookie, offset, len }, Some(data)),
            Ok(data) => (simple(cookie, 0), Some(data)),
            Err(e) => (error_head(cookie, structured, errno::of_volume(&e)), None),
        },
        Command::Write { offset, fua, .. } => match payload {
            Some(buf) => done(volume.write(offset, buf, fua).await),
            None => (simple(cookie, errno::EIO), None), // unreachable: dispatch reads it
        },
        Command::Flush => done(volume.flush().await),
        Command::Trim { offset, len, fua } => done(volume.trim(offset, len, fua).await),
        Command::WriteZeroes { offset, len, punch, fua } => {
            done(volume.write_zeroes(offset, len, punch, fua).await)
        }
        Command::Empty { read: true } if structured => (ReplyHead::Done { cookie }, None),
        Command::Empty { .. } | Command::Disc => (simple(cookie, 0), None),
    }
}

fn simple(cookie: u64, error: u32) -> ReplyHead {
    ReplyHead::Simple { cookie, error }
}

/// An error reply: an ERROR chunk for a READ under structured replies (MUST), else simple.
fn error_head(cookie: u64, structured_read: bool, error: u32) -> ReplyHead {
    if structured_read {
        ReplyHead::Error { cookie, error, message: errno::message(error) }
    } else {
        simple(cookie, error)
    }
}

fn command_name(kind: u16) -> &'static str {
    match kind {
        cmd::READ => "READ",
        cmd::WRITE => "WRITE",
        cmd::DISC => "DISC",
        cmd::FLUSH => "FLUSH",
        cmd::TRIM => "TRIM",
        cmd::CACHE => "CACHE",
        cmd::WRITE_ZEROES => "WRITE_ZEROES",
        cmd::BLOCK_STATUS => "BLOCK_STATUS",
        cmd::RESIZE => "RESIZE",
        _ => "unknown",
    }
}

/// The read half with its input buffer. Small requests are parsed out of the buffer (many per
/// read syscall); large payloads are read from the socket straight into their destination.
struct Input<R> {
    rd: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> Input<R> {
    /// Reads until `n` bytes are buffered. `Ok(false)`: clean EOF with nothing buffered.
    async fn fill(&mut self, n: usize) -> Result<bool, ReadError> {
        while self.buf.len() < n {
            self.buf.reserve(READ_CHUNK.max(n - self.buf.len()));
            if self.rd.read_buf(&mut self.buf).await.map_err(ReadError::Io)? == 0 {
                return if self.buf.is_empty() { Ok(false) } else { Err(ReadError::Torn) };
            }
        }
        Ok(true)
    }

    /// The next `len` bytes of the stream, in a buffer aligned for direct I/O: what is buffered
    /// already is copied, the rest read from the socket straight into it (not zeroed first).
    async fn read_payload(&mut self, len: usize) -> Result<AlignedBuf, ReadError> {
        let mut fill = Filler::new(len);
        let have = self.buf.len().min(len);
        fill.put_slice(&self.buf[..have]);
        self.buf.advance(have);
        loop {
            fill = match fill.finish() {
                Ok(buf) => return Ok(buf),
                Err(fill) => fill,
            };
            if self.rd.read_buf(&mut fill).await.map_err(ReadError::Io)? == 0 {
                return Err(ReadError::Torn);
            }
        }
    }

    /// Reads (and throws away) until the client closes its end or the socket fails.
    async fn closed(&mut self) {
        loop {
            self.buf.clear();
            self.buf.reserve(READ_CHUNK);
            if !matches!(self.rd.read_buf(&mut self.buf).await, Ok(n) if n > 0) {
                return;
            }
        }
    }

    /// Throws away the next `n` bytes, at most one buffer at a time.
    async fn discard(&mut self, mut n: usize) -> Result<(), ReadError> {
        while n > 0 {
            if self.buf.is_empty() && !self.fill(1).await? {
                return Err(ReadError::Torn);
            }
            let take = self.buf.len().min(n);
            self.buf.advance(take);
            n -= take;
        }
        Ok(())
    }
}

/// The one writer of a connection: replies never interleave at byte level. Writes each batch of
/// queued replies with vectored writes and flushes when the queue is empty. On a write error it
/// cancels `failed` (the reader stops) and keeps draining, so it returns only after every
/// request task has finished.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    failed: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut heads = BytesMut::with_capacity(MAX_BATCH * 96);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let mut r = write_batch(&mut wr, &batch, &mut heads).await;
        batch.clear();
        if r.is_ok() && rx.is_empty() {
            r = wr.flush().await;
        }
        if let Err(e) = r {
            tracing::debug!(error = %e, "NBD client no longer takes replies");
            failed.cancel();
            while rx.recv().await.is_some() {}
            return;
        }
    }
    let _ = wr.shutdown().await;
}

/// Writes `batch` in order: reply headers are encoded into `heads`, payloads are sent from
/// their read buffers, all in as few `writev` calls as the socket takes.
async fn write_batch<W: AsyncWrite + Unpin>(
    wr: &mut W,
    batch: &[Reply],
    heads: &mut BytesMut,
) -> io::Result<()> {
    heads.clear();
    let mut spans: Vec<Range<usize>> = Vec::with_capacity(batch.len());
    for r in batch {
        let start = heads.len();
        r.head.encode(heads);
        spans.push(start..heads.len());
    }
    let mut segments: Vec<&[u8]> = Vec::with_capacity(batch.len() * 2);
    // Consecutive headers are adjacent in `heads`: a run of them is one segment.
    let mut run: Option<Range<usize>> = None;
    for (r, span) in batch.iter().zip(spans) {
        let joined = run.take().map_or(span.clone(), |prev| prev.start..span.end);
        match &r.data {
            Some(data) => {
                segments.push(&heads[joined]);
                segments.push(data);
            }
            None => run = Some(joined),
        }
    }
    if let Some(rest) = run {
        segments.push(&heads[rest]);
    }
    write_all_vectored(wr, &mut segments).await
}

/// Writes every segment, resuming after partial writes.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    wr: &mut W,
    segments: &mut [&[u8]],
) -> io::Result<()> {
    const IOV_MAX: usize = 1024;
    let mut i = 0;
    while i < segments.len() {
        if segments[i].is_empty() {
            i += 1;
            continue;
        }
        let iov: Vec<IoSlice<'_>> =
            segments[i..].iter().take(IOV_MAX).map(|s| IoSlice::new(s)).collect();
        let mut n = wr.write_vectored(&iov).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let seg = &mut segments[i];
            if n >= seg.len() {
                n -= seg.len();
                i += 1;
            } else {
                *seg = &seg[n..];
                n = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
