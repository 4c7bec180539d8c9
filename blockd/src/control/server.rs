//! Daemon side of the control socket: the shared accept loop (`crate::accept`), one task per
//! connection, one request per line. Lines are bounded, connections are bounded (one over the
//! bound is answered `Busy`), idle connections time out, and everything stops on the shutdown
//! token.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{ErrorKind, Request, Response, MAX_REQUEST_LINE};
use crate::accept::{self, Full, Policy};

/// Control connections served at once; more get [`ErrorKind::Busy`]. Operators and agents
/// need a handful; the bound keeps a runaway script from exhausting file descriptors.
const MAX_CONNECTIONS: usize = 32;

/// How the control socket accepts (table in `crate::accept`).
const POLICY: Policy = Policy::new("control socket").bounded(MAX_CONNECTIONS, Full::Busy);

/// A connection silent this long is closed, so a stuck client does not hold a slot forever.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// What answers requests: the daemon implements it.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request) -> impl Future<Output = Response> + Send;
}

/// Accepts control connections on `listener` until `shutdown`; each runs on `tracker`.
pub async fn serve<H: Handler>(
    listener: UnixListener,
    handler: Arc<H>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    accept::serve(listener, POLICY, shutdown, tracker, move |c| {
        let handler = Arc::clone(&handler);
        async move {
            match c.busy {
                true => refuse_busy(c.stream).await,
                false => connection(c.stream, &*handler, c.token).await,
            }
        }
    })
    .await;
}

async fn refuse_busy(mut stream: UnixStream) {
    let busy = Response::err(ErrorKind::Busy, "too many control connections; retry");
    let _ = write_response(&mut stream, &busy).await;
}

/// Serves one connection: read a line, answer it, until EOF, an error, idleness or shutdown.
async fn connection<H: Handler>(stream: UnixStream, handler: &H, shutdown: CancellationToken) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut bounded = (&mut reader).take(MAX_REQUEST_LINE as u64 + 1);
        let read = tokio::select! {
            () = shutdown.cancelled() => return,
            r = tokio::time::timeout(IDLE_TIMEOUT, bounded.read_until(b'\n', &mut line)) => r,
        };
        let n = match read {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return tracing::debug!(error = %e, "control connection: read failed"),
            Err(_) => return tracing::debug!("control connection: idle, closed"),
        };
        if n == 0 {
            return;
        }
        if line.last() != Some(&b'\n') && n > MAX_REQUEST_LINE {
            let msg = format!("request longer than {MAX_REQUEST_LINE} bytes");
            let _ = write_response(&mut write, &Response::err(ErrorKind::BadRequest, msg)).await;
            return;
        }
        let response = match serde_json::from_slice::<Request>(&line) {
            Ok(request) => handler.handle(request).await,
            Err(e) => Response::err(ErrorKind::BadRequest, format!("not a valid request: {e}")),
        };
        if let Err(e) = write_response(&mut write, &response).await {
            return tracing::debug!(error = %e, "control connection: write failed");
        }
    }
}

async fn write_response<W: AsyncWrite + Unpin>(w: &mut W, r: &Response) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    w.write_all(&bytes).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncBufReadExt;

    use super::*;
    use crate::control::{NodeStatus, Reply};

    struct Fixed;

    impl Handler for Fixed {
        async fn handle(&self, request: Request) -> Response {
            match request {
                Request::Status => Response::Ok(Reply::Status(NodeStatus {
                    node: "n1".into(),
                    version: "v".into(),
                    volumes: vec![],
                })),
                Request::Role { .. }
                | Request::PeerPromote
                | Request::Resolve { .. }
                | Request::Verify { .. }
                | Request::Attach { .. }
                | Request::Detach { .. } => {
                    Response::err(crate::control::ErrorKind::NotPrimary, "no")
                }
            }
        }
    }

    async fn start() -> (tempfile::TempDir, std::path::PathBuf, CancellationToken, TaskTracker) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (token, tracker) = (CancellationToken::new(), TaskTracker::new());
        tracker.spawn(serve(listener, Arc::new(Fixed), token.clone(), tracker.clone()));
        (dir, path, token, tracker)
    }

    async fn exchange(stream: &mut BufReader<UnixStream>, line: &[u8]) -> String {
        stream.get_mut().write_all(line).await.unwrap();
        let mut out = String::new();
        stream.read_line(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn answers_several_requests_on_one_connection() {
        let (_dir, path, token, tracker) = start().await;
        let mut s = BufReader::new(UnixStream::connect(&path).await.unwrap());
        for _ in 0..2 {
            let out = exchange(&mut s, b"{\"cmd\":\"status\"}\n").await;
            assert!(out.starts_with(r#"{"ok":{"status":{"node":"n1""#), "{out}");
        }
        let out = exchange(&mut s, b"{\"cmd\":\"nope\"}\n").await;
        assert!(out.contains("BadRequest"), "{out}");
        let out = exchange(&mut s, b"{\"cmd\":\"status\"}\n").await;
        assert!(out.contains("\"ok\""), "a bad request does not close the connection: {out}");
        token.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test]
    async fn overlong_line_is_refused_and_closed() {
        let (_dir, path, token, _tracker) = start().await;
        let mut s = BufReader::new(UnixStream::connect(&path).await.unwrap());
        let long = vec![b' '; MAX_REQUEST_LINE + 10];
        let out = exchange(&mut s, &long).await;
        assert!(out.contains("BadRequest") && out.contains("longer"), "{out}");
        let mut rest = String::new();
        assert_eq!(s.read_line(&mut rest).await.unwrap(), 0, "connection closed");
        token.cancel();
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections() {
        let (_dir, path, token, tracker) = start().await;
        let mut s = BufReader::new(UnixStream::connect(&path).await.unwrap());
        exchange(&mut s, b"{\"cmd\":\"status\"}\n").await;
        token.cancel();
        tracker.close();
        tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await.unwrap();
        let mut rest = String::new();
        assert_eq!(s.read_line(&mut rest).await.unwrap(), 0);
    }
}
