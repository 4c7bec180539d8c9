//! The metrics endpoint: a deliberately tiny HTTP/1.1 server with one route.
//!
//! ```text
//!  GET|HEAD /metrics[?...]  → 200, text/plain; version=0.0.4, the rendered status
//!  other path               → 404          other method on /metrics → 405 (Allow: GET, HEAD)
//!  unparsable head, or a head without its blank line within 8 KiB → 400
//!  nothing complete within 10 s → closed without an answer
//! ```
//!
//! One request per connection (`Connection: close`), a bounded number of connections, and
//! every connection bounded in time, so a scraper that misbehaves costs a few sockets at
//! most. A bind failure is logged and the daemon goes on: observability must never keep the
//! volumes from being served.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{render, CONTENT_TYPE};
use crate::{
    accept::{self, Full, OnCancel, Policy},
    control::NodeStatus,
};

/// Scrapes served at once; a scraper needs one, an operator's curl another.
const MAX_CONNECTIONS: usize = 8;

/// Longest request head read; a scraper's is a few hundred bytes.
const MAX_HEAD: usize = 8 << 10;

/// Time a connection has to send its request and take the answer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `addr` and serves `GET /metrics` from `status()` until `token` is cancelled, on
/// `tracker`. Returns the bound address (useful with port 0), or `None` when binding failed
/// (logged: the daemon goes on without metrics).
pub async fn start<F>(
    addr: SocketAddr,
    status: F,
    token: CancellationToken,
    tracker: &TaskTracker,
) -> Option<SocketAddr>
where
    F: Fn() -> NodeStatus + Send + Sync + 'static,
{
    start_text(addr, move || render(&status()), token, tracker).await
}

/// [`start`] with the whole text coming from `text()`: the rendered status plus families
/// from elsewhere (the agent's tally, `console::agent`).
pub async fn start_text<F>(
    addr: SocketAddr,
    text: F,
    token: CancellationToken,
    tracker: &TaskTracker,
) -> Option<SocketAddr>
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot serve metrics; going on without them");
            return None;
        }
    };
    let bound = listener.local_addr().ok()?;
    tracing::info!("metrics at http://{bound}/metrics");
    tracker.spawn(serve(listener, Arc::new(text), token, tracker.clone()));
    Some(bound)
}

/// Accepts scrapers until `token` is cancelled. Over the limit: closed at once; the scraper
/// retries at its next interval.
async fn serve<F>(
    listener: TcpListener,
    status: Arc<F>,
    token: CancellationToken,
    tracker: TaskTracker,
) where
    F: Fn() -> String + Send + Sync + 'static,
{
    let policy =
        Policy::new("metrics").bounded(MAX_CONNECTIONS, Full::Busy).on_cancel(OnCancel::Drop);
    accept::serve(listener, policy, token, tracker, move |c| {
        let status = Arc::clone(&status);
        async move {
            if !c.busy {
                let _ =
                    tokio::time::timeout(CONNECTION_TIMEOUT, connection(c.stream, &*status)).await;
            }
        }
    })
    .await;
}

/// Reads one request head, answers it, closes.
async fn connection<F: Fn() -> String>(mut stream: TcpStream, text: &F) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = |h: &[u8]| h.windows(4).any(|w| w == b"\r\n\r\n");
    while !complete(&head) && head.len() <= MAX_HEAD {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    // A head that never ended (too long, or the client stopped sending) is a bad request.
    let head: &[u8] = if complete(&head) { &head } else { b"" };
    let response = respond(head, text);
    if let Err(e) = stream.write_all(&response).await {
        return tracing::debug!(error = %e, "metrics: write failed");
    }
    let _ = stream.shutdown().await;
}

/// The whole HTTP response to `head` (the bytes up to the blank line); `body` is called only
/// for a request that gets the metrics.
pub fn respond(head: &[u8], body: impl FnOnce() -> String) -> Vec<u8> {
    let Some((method, path)) = request_line(head) else {
        return plain(400, "Bad Request", &[], "bad request\n", true);
    };
    let path = path.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let text = body();
            let mut r = header(200, "OK", CONTENT_TYPE, text.len(), &[]);
            if method == "GET" {
                r.extend_from_slice(text.as_bytes());
            }
            r
        }
        (_, "/metrics") => plain(405, "Method Not Allowed", &["Allow: GET, HEAD"], "", true),
        (_, _) => plain(404, "Not Found", &[], "not found; try /metrics\n", method != "HEAD"),
    }
}

/// `(method, target)` of an HTTP/1.x request line, if it is one.
fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    let end = head.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&head[..end]).ok()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let valid = parts.next().is_none()
        && !method.is_empty()
        && method.bytes().all(|b| b.is_ascii_uppercase())
        && target.starts_with('/')
        && version.starts_with("HTTP/1.");
    valid.then_some((method, target))
}

fn plain(code: u16, reason: &str, extra: &[&str], text: &str, with_body: bool) -> Vec<u8> {
    let mut r = header(code, reason, "text/plain; charset=utf-8", text.len(), extra);
    if with_body {
        r.extend_from_slice(text.as_bytes());
    }
    r
}

fn header(code: u16, reason: &str, content_type: &str, len: usize, extra: &[&str]) -> Vec<u8> {
    let mut h = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\n\
         Connection: close\r\n"
    );
    for line in extra {
        h.push_str(line);
        h.push_str("\r\n");
    }
    h.push_str("\r\n");
    h.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: &[u8]) -> String {
        String::from_utf8_lossy(r).into_owned()
    }

    fn status() -> NodeStatus {
        NodeStatus { node: "alpha".into(), version: "9.9".into(), volumes: vec![] }
    }

    #[test]
    fn metrics_route_answers_with_the_exposition_format() {
        let r = text(&respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", || "m 1\n".into()));
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"), "{r}");
        assert!(r.contains("Content-Length: 4\r\n") && r.ends_with("\r\n\r\nm 1\n"), "{r}");
        let q = text(&respond(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", || "m 1\n".into()));
        assert!(q.starts_with("HTTP/1.1 200 OK"), "a query string is ignored: {q}");
        let head = text(&respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", || "m 1\n".into()));
        assert!(head.contains("Content-Length: 4\r\n") && head.ends_with("\r\n\r\n"), "{head}");
    }

    #[test]
    fn other_routes_methods_and_garbage_are_refused() {
        let never = || -> String { panic!("the status must not be rendered") };
        let cases: [(&[u8], &str); 6] = [
            (b"GET / HTTP/1.1\r\n\r\n", "404"),
            (b"GET /metricsx HTTP/1.1\r\n\r\n", "404"),
            (b"POST /metrics HTTP/1.1\r\n\r\n", "405"),
            (b"GET /metrics\r\n\r\n", "400"),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\r\n", "400"),
            (b"", "400"),
        ];
        for (req, code) in cases {
            let r = text(&respond(req, never));
            assert!(r.starts_with(&format!("HTTP/1.1 {code} ")), "{req:?}: {r}");
            assert!(r.contains("Connection: close"), "{r}");
        }
    }

    /// The server over a real socket: a GET gets the rendered status, then the connection is
    /// closed; cancelling the token stops the accept loop.
    #[tokio::test]
    async fn serves_over_tcp_and_stops_on_cancel() {
        let (token, tracker) = (CancellationToken::new(), TaskTracker::new());
        let addr = start("127.0.0.1:0".parse().unwrap(), status, token.clone(), &tracker)
            .await
            .expect("bound");
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).await.unwrap();
        assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
        assert!(got.contains("blockd_build_info{node=\"alpha\",version=\"9.9\"} 1\n"), "{got}");
        let taken = start(addr, status, token.clone(), &tracker).await;
        assert_eq!(taken, None, "a second bind of the same address fails softly");
        token.cancel();
        tracker.close();
        tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await.unwrap();
    }
}
