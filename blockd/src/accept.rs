//! The one accept loop. Every listener of the daemon and of `blockd witness` takes its
//! connections through [`serve`]; what differs between them is a [`Policy`] value:
//!
//! | listener                        | at once      | when full             | on shutdown                    |
//! |---------------------------------|--------------|-----------------------|--------------------------------|
//! | NBD sockets, NBD over TCP       | no bound ¹   | —                     | `Finish`: in-flight requests end |
//! | control socket                  | 32           | `Busy`: answered Busy | `Finish`: stops at its next read |
//! | replication listener            | 32 hand-offs | `Wait` ²              | `Drop`                         |
//! | metrics endpoint                | 8            | `Busy`: closed at once | `Drop`                        |
//! | web console                     | 16           | `Busy`: closed at once | `Drop`                        |
//! | `blockd witness`                | 32           | `Wait`: left in the backlog | `Finish` (5 s per connection) |
//!
//! ¹ each volume bounds its NBD clients (`nbd.max-clients`, `Volume::add_client`).
//! ² the loop only hands the connection to the link's manager, which bounds handshakes per
//! source (`replication/link.rs`, `MAX_HANDSHAKES_PER_SOURCE`).
//!
//! Every one of them: a failed accept (EMFILE, ENFILE, ENOMEM, ECONNABORTED, ...) is logged
//! and retried after `backoff`, so a process out of descriptors does not spin; cancelling the
//! token stops accepting at once.

use std::{fmt::Debug, future::Future, io, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, UnixListener},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Pause after a failed accept before the next try: long enough not to spin while the process
/// is out of descriptors, short enough that a client barely notices.
pub const BACKOFF: Duration = Duration::from_millis(100);

/// How one listener takes its connections.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// The listener's name in logs ("control socket", "metrics", ...).
    pub what: &'static str,
    /// Connections handled at once; `None`: no bound here (the handler bounds them).
    pub max: Option<usize>,
    /// What happens to a connection while `max` are handled.
    pub full: Full,
    /// What cancelling the token does to connections being handled.
    pub cancel: OnCancel,
    /// Pause after a failed accept.
    pub backoff: Duration,
    /// Set TCP_NODELAY on every accepted TCP connection (small requests must not wait for
    /// Nagle).
    pub nodelay: bool,
}

impl Policy {
    /// A policy with the common defaults: no bound, connections finish on cancellation, the
    /// standard backoff, no TCP_NODELAY.
    pub const fn new(what: &'static str) -> Policy {
        Policy {
            what,
            max: None,
            full: Full::Wait,
            cancel: OnCancel::Finish,
            backoff: BACKOFF,
            nodelay: false,
        }
    }

    /// At most `max` at once; `full` says what happens to the next.
    pub const fn bounded(self, max: usize, full: Full) -> Policy {
        Policy { max: Some(max), full, ..self }
    }

    pub const fn on_cancel(self, cancel: OnCancel) -> Policy {
        Policy { cancel, ..self }
    }

    pub const fn nodelay(self) -> Policy {
        Policy { nodelay: true, ..self }
    }
}

/// What happens to a connection that arrives while `max` are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// Not accepted until a slot frees: it waits in the listen backlog.
    Wait,
    /// Accepted and handed to the handler with `busy` set: it answers "busy" or just closes.
    Busy,
}

/// What cancelling the token does to connections being handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnCancel {
    /// Dropped at once (the handler's future is dropped at its next await).
    Drop,
    /// Left to finish; the handler watches [`Conn::token`] (cancelled with the loop's).
    Finish,
}

/// One accepted connection, as the handler gets it.
#[derive(Debug)]
pub struct Conn<S, A> {
    pub stream: S,
    pub from: A,
    /// Accepted over the bound ([`Full::Busy`]): answer "busy" (or nothing) and close.
    pub busy: bool,
    /// Cancelled when the loop's token is.
    pub token: CancellationToken,
}

/// A listener the loop can take connections from.
pub trait Listener: Send + 'static {
    type Stream: Send + 'static;
    type Addr: Debug + Send + 'static;
    fn accept_conn(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Addr)>> + Send;
    /// Sets TCP_NODELAY where there is such a thing.
    fn set_nodelay(_stream: &Self::Stream) -> io::Result<()> {
        Ok(())
    }
}

impl Listener for UnixListener {
    type Stream = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;
    async fn accept_conn(&self) -> io::Result<(Self::Stream, Self::Addr)> {
        self.accept().await
    }
}

impl Listener for TcpListener {
    type Stream = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;
    async fn accept_conn(&self) -> io::Result<(Self::Stream, Self::Addr)> {
        self.accept().await
    }
    fn set_nodelay(stream: &Self::Stream) -> io::Result<()> {
        stream.set_nodelay(true)
    }
}

/// Accepts connections on `listener` until `token` is cancelled, each handled by `handle` on
/// `tracker` as `policy` says.
pub async fn serve<L, H, Fut>(
    listener: L,
    policy: Policy,
    token: CancellationToken,
    tracker: TaskTracker,
    mut handle: H,
) where
    L: Listener,
    H: FnMut(Conn<L::Stream, L::Addr>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = policy.max.map(|n| Arc::new(Semaphore::new(n)));
    loop {
        // `Wait`: a slot first, so that the next connection stays in the backlog meanwhile.
        let waited = match (&slots, policy.full) {
            (Some(s), Full::Wait) => tokio::select! {
                biased;
                () = token.cancelled() => return,
                p = Arc::clone(s).acquire_owned() => p.ok(),
            },
            _ => None,
        };
        // Cancellation first: once cancelled, nothing more is accepted.
        let (stream, from) = tokio::select! {
            biased;
            () = token.cancelled() => return,
            accepted = listener.accept_conn() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "{}: accept failed", policy.what);
                    tokio::select! {
                        () = token.cancelled() => return,
                        () = tokio::time::sleep(policy.backoff) => continue,
                    }
                }
            },
        };
        if policy.nodelay {
            if let Err(e) = L::set_nodelay(&stream) {
                tracing::debug!(error = %e, "{}: cannot set TCP_NODELAY", policy.what);
            }
        }
        let (slot, busy) = admit(slots.as_ref(), waited);
        let conn = handle(Conn { stream, from, busy, token: token.child_token() });
        let token = token.clone();
        tracker.spawn(async move {
            match policy.cancel {
                OnCancel::Drop => tokio::select! {
                    () = token.cancelled() => {}
                    () = conn => {}
                },
                OnCancel::Finish => conn.await,
            }
            drop(slot);
        });
    }
}

/// The slot a new connection holds, and whether it came over the bound.
fn admit(
    slots: Option<&Arc<Semaphore>>,
    waited: Option<OwnedSemaphorePermit>,
) -> (Option<OwnedSemaphorePermit>, bool) {
    match (slots, waited) {
        (_, Some(p)) => (Some(p), false),
        (None, None) => (None, false),
        (Some(s), None) => match Arc::clone(s).try_acquire_owned() {
            Ok(p) => (Some(p), false),
            Err(_) => (None, true),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn listener() -> (TcpListener, std::net::SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (l, addr)
    }

    /// Handlers hold their connection until told; returns what each client read first.
    async fn run(policy: Policy, clients: usize) -> Vec<Vec<u8>> {
        let (l, addr) = listener().await;
        let (token, tracker) = (CancellationToken::new(), TaskTracker::new());
        let release = CancellationToken::new();
        let r = release.clone();
        let loop_task = tokio::spawn(serve(l, policy, token.clone(), tracker.clone(), move |c| {
            let r = r.clone();
            async move {
                let mut s = c.stream;
                let _ = s.write_all(if c.busy { b"busy" } else { b"okay" }).await;
                r.cancelled().await;
            }
        }));
        let mut streams = Vec::new();
        let mut first = Vec::new();
        for _ in 0..clients {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut buf = vec![0; 4];
            let got = tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf)).await;
            first.push(if got.is_ok() { buf } else { b"none".to_vec() });
            streams.push(s);
        }
        release.cancel();
        token.cancel();
        loop_task.await.unwrap();
        first
    }

    #[tokio::test]
    async fn busy_policy_hands_over_the_bound_connections_as_busy() {
        let got = run(Policy::new("t").bounded(2, Full::Busy), 3).await;
        assert_eq!(got, vec![b"okay".to_vec(), b"okay".to_vec(), b"busy".to_vec()]);
    }

    #[tokio::test]
    async fn wait_policy_leaves_the_next_connection_in_the_backlog() {
        let got = run(Policy::new("t").bounded(1, Full::Wait), 2).await;
        assert_eq!(got, vec![b"okay".to_vec(), b"none".to_vec()], "not accepted meanwhile");
    }

    #[tokio::test]
    async fn unbounded_policy_takes_everyone() {
        let got = run(Policy::new("t"), 5).await;
        assert!(got.iter().all(|g| g == b"okay"), "{got:?}");
    }

    /// `Drop` ends handlers with the token; `Finish` lets them run, watching their own token.
    #[tokio::test]
    async fn cancellation_drops_or_lets_finish() {
        for (cancel, finished) in [(OnCancel::Drop, 0), (OnCancel::Finish, 1)] {
            let (l, addr) = listener().await;
            let (token, tracker) = (CancellationToken::new(), TaskTracker::new());
            let done = Arc::new(AtomicUsize::new(0));
            let d = Arc::clone(&done);
            let policy = Policy::new("t").on_cancel(cancel);
            let task = tokio::spawn(serve(l, policy, token.clone(), tracker.clone(), move |c| {
                let d = Arc::clone(&d);
                async move {
                    c.token.cancelled().await;
                    tokio::task::yield_now().await;
                    d.fetch_add(1, Ordering::SeqCst);
                }
            }));
            let _s = tokio::net::TcpStream::connect(addr).await.unwrap();
            while tracker.is_empty() {
                tokio::task::yield_now().await;
            }
            token.cancel();
            task.await.unwrap();
            tracker.close();
            tracker.wait().await;
            assert_eq!(done.load(Ordering::SeqCst), finished, "{cancel:?}");
        }
    }

    /// A failing accept is retried after the backoff, not in a busy loop.
    #[tokio::test(start_paused = true)]
    async fn a_failing_accept_backs_off() {
        struct Failing(Arc<AtomicUsize>);
        impl Listener for Failing {
            type Stream = ();
            type Addr = ();
            async fn accept_conn(&self) -> io::Result<((), ())> {
                self.0.fetch_add(1, Ordering::SeqCst);
                Err(io::Error::from_raw_os_error(libc::EMFILE))
            }
        }
        let tries = Arc::new(AtomicUsize::new(0));
        let token = CancellationToken::new();
        let policy = Policy::new("t");
        let l = Failing(Arc::clone(&tries));
        let task = tokio::spawn(serve(l, policy, token.clone(), TaskTracker::new(), |_| async {}));
        tokio::time::sleep(BACKOFF * 10 + BACKOFF / 2).await;
        token.cancel();
        task.await.unwrap();
        assert_eq!(tries.load(Ordering::SeqCst), 11, "one try per backoff");
    }
}
