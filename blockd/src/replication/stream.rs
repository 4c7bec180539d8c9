//! What a session needs from its connection, so that the same session code runs over TCP (the
//! daemon) and over an in-process pipe (the deterministic simulation's network).
//!
//! The write half is shared: the direct path and the writer task both write through `&self`
//! (`writer.rs`), so it is a non-blocking `try_write` plus a readiness wait, as tokio's TCP
//! halves offer, rather than `AsyncWrite`. The read half is any `AsyncRead`.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;

use tokio::io::AsyncRead;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// The read half of a connection.
pub type LinkRead = Box<dyn AsyncRead + Send + Unpin>;

/// The write half of a connection, written from several tasks through `&self`.
pub trait LinkWrite: Send + Sync + 'static {
    /// Writes what the connection takes now; `WouldBlock` when it takes nothing.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Resolves once a write may make progress.
    fn writable(&self) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + '_>>;
    /// Shuts both directions down, so that the peer sees the end at once (best effort).
    fn shutdown(&self);
}

impl LinkWrite for OwnedWriteHalf {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        OwnedWriteHalf::try_write_vectored(self, bufs)
    }
    fn writable(&self) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + '_>> {
        Box::pin(self.as_ref().writable())
    }
    fn shutdown(&self) {
        let _ = socket2::SockRef::from(self.as_ref()).shutdown(std::net::Shutdown::Both);
    }
}

/// The halves of a TCP stream, as a session takes them.
pub(crate) fn tcp_halves(stream: tokio::net::TcpStream) -> (LinkRead, Box<dyn LinkWrite>) {
    let (rd, wr): (OwnedReadHalf, OwnedWriteHalf) = stream.into_split();
    (Box::new(rd), Box::new(wr))
}
