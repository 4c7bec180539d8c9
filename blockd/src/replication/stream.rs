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
pub type LinkRead = Box<dyn LinkReadHalf>;

/// What a session reads from: any `AsyncRead`, plus TCP's receive low-water mark.
pub trait LinkReadHalf: AsyncRead + Send + Unpin {
    /// Asks to be woken for reading only once `n` bytes are queued (TCP's SO_RCVLOWAT; the
    /// kernel caps it at half the largest receive buffer and still wakes on EOF, an error or
    /// memory pressure). Returns whether the connection took it: in-process pipes do not, and
    /// then the reader wakes for every byte as before.
    fn set_low_water(&self, _n: usize) -> bool {
        false
    }
    /// Bytes queued unread (SIOCINQ), where the connection can tell.
    fn queued(&self) -> Option<usize> {
        None
    }
}

impl LinkReadHalf for OwnedReadHalf {
    fn set_low_water(&self, n: usize) -> bool {
        let fd = std::os::fd::AsRawFd::as_raw_fd(self.as_ref());
        let v = libc::c_int::try_from(n).unwrap_or(libc::c_int::MAX);
        // SAFETY: `fd` is this half's open socket for the duration of the call; the option
        // value is a c_int on the stack whose size is passed with it.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        r == 0
    }
    fn queued(&self) -> Option<usize> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(self.as_ref());
        let mut n: libc::c_int = 0;
        // SAFETY: `fd` is this half's open socket; FIONREAD (SIOCINQ) writes one c_int into `n`.
        let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int) };
        (r == 0).then(|| usize::try_from(n).unwrap_or(0))
    }
}

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
