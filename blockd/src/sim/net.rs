//! The simulation's network: a connection is two in-process byte pipes, one per direction,
//! with TCP's behaviour where the link code can tell: bounded buffers (a full pipe makes the
//! writer wait), a partition that holds bytes without delivering them (both ways or one way;
//! the sender notices only through the peer's silence), a heal that delivers what was held,
//! and a cut that ends both directions at once (a FIN/RST: the reader sees the end, the writer
//! an error). Wakers are woken synchronously, so on a single-threaded runtime the order of
//! events depends only on the schedule.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::replication::stream::{LinkRead, LinkWrite};

/// Bytes a direction buffers before the writer waits (a socket buffer's order of magnitude).
const PIPE_CAPACITY: usize = 256 << 10;

#[derive(Default)]
struct Dir {
    buf: VecDeque<u8>,
    /// Partitioned: bytes are accepted (up to the capacity) but not delivered.
    held: bool,
    closed: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

/// One direction of a connection.
#[derive(Clone, Default)]
pub struct Pipe(Arc<Mutex<Dir>>);

impl Pipe {
    fn lock(&self) -> MutexGuard<'_, Dir> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(d: &mut Dir) {
        if let Some(w) = d.reader.take() {
            w.wake();
        }
        if let Some(w) = d.writer.take() {
            w.wake();
        }
    }

    /// Holds (true) or delivers again (false) what is written into this direction.
    pub fn hold(&self, held: bool) {
        let mut d = self.lock();
        d.held = held;
        Self::wake(&mut d);
    }

    pub fn close(&self) {
        let mut d = self.lock();
        d.closed = true;
        d.buf.clear();
        Self::wake(&mut d);
    }

    fn poll_read(&self, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut d = self.lock();
        if d.closed {
            return Poll::Ready(Ok(()));
        }
        if d.held || d.buf.is_empty() {
            d.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = out.remaining().min(d.buf.len());
        let (a, b) = d.buf.as_slices();
        let first = n.min(a.len());
        out.put_slice(&a[..first]);
        out.put_slice(&b[..n - first]);
        d.buf.drain(..n);
        if let Some(w) = d.writer.take() {
            w.wake();
        }
        Poll::Ready(Ok(()))
    }

    fn try_write(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut d = self.lock();
        if d.closed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let room = PIPE_CAPACITY.saturating_sub(d.buf.len());
        if room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(room - n);
            d.buf.extend(&b[..take]);
            n += take;
            if n == room {
                break;
            }
        }
        if let Some(w) = d.reader.take() {
            w.wake();
        }
        Ok(n)
    }

    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut d = self.lock();
        if d.closed || d.buf.len() < PIPE_CAPACITY {
            return Poll::Ready(Ok(()));
        }
        d.writer = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// One end of a connection: reads `rx`, writes `tx`.
pub struct End {
    pub rx: Pipe,
    pub tx: Pipe,
}

/// A new connection: the two ends.
pub fn connection() -> (End, End) {
    let (ab, ba) = (Pipe::default(), Pipe::default());
    (End { rx: ba.clone(), tx: ab.clone() }, End { rx: ab, tx: ba })
}

impl End {
    /// The halves a session runs on.
    pub fn split(self) -> (LinkRead, Box<dyn LinkWrite>) {
        (Box::new(ReadHalf(self.rx)), Box::new(WriteHalf(self.tx)))
    }
}

impl AsyncRead for End {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.rx.poll_read(cx, buf)
    }
}

impl AsyncWrite for End {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.tx.try_write(&[IoSlice::new(b)]) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => match self.tx.poll_writable(cx) {
                Poll::Ready(_) => self.tx.try_write(&[IoSlice::new(b)]).into(),
                Poll::Pending => Poll::Pending,
            },
            r => Poll::Ready(r),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tx.close();
        Poll::Ready(Ok(()))
    }
}

struct ReadHalf(Pipe);

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.0.poll_read(cx, buf)
    }
}

impl crate::replication::stream::LinkReadHalf for ReadHalf {}

struct WriteHalf(Pipe);

impl LinkWrite for WriteHalf {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write(bufs)
    }
    fn writable(&self) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + '_>> {
        Box::pin(std::future::poll_fn(|cx| self.0.poll_writable(cx)))
    }
    fn shutdown(&self) {
        self.0.close();
    }
}
