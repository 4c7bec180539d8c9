//! The console's HTTP/1.1 server: three routes, one request per connection.
//!
//! ```text
//!  GET  /             → 200 text/html, the page        GET /api/state → 200 JSON
//!  POST /api/action   → 200 text/plain, blockctl's output streamed, ending "exit N";
//!                       401 without the token, 409 while another action runs, 400 bad body
//!  other path → 404; other method → 405; bad head or body → 400
//! ```
//!
//! Bounded like the metrics endpoint: a few connections at once, a head of 8 KiB, a body of
//! 4 KiB, 10 s to send the request. An action's answer is not bounded in time (a swap waits
//! for the peer) and the action is never stopped because its page went away.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{actions, state, Console};
use crate::accept::{self, Full, OnCancel, Policy};

const MAX_CONNECTIONS: usize = 16;
const MAX_HEAD: usize = 8 << 10;
const MAX_BODY: usize = 4 << 10;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

const PAGE: &str = include_str!("page.html");

/// One parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// The `Authorization: Bearer` value, if any.
    pub bearer: Option<String>,
    pub body: Vec<u8>,
}

pub async fn serve(
    listener: TcpListener,
    console: Arc<Console>,
    token: CancellationToken,
    tracker: TaskTracker,
) {
    // Over the limit: closed at once.
    let policy =
        Policy::new("console").bounded(MAX_CONNECTIONS, Full::Busy).on_cancel(OnCancel::Drop);
    accept::serve(listener, policy, token, tracker, move |c| {
        let console = Arc::clone(&console);
        async move {
            if !c.busy {
                connection(c.stream, c.from, &console).await;
            }
        }
    })
    .await;
}

async fn connection(mut stream: TcpStream, from: SocketAddr, console: &Console) {
    let request = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream)).await;
    let request = match request {
        Ok(Ok(r)) => r,
        Ok(Err(why)) => return answer(&mut stream, 400, "text/plain", why.as_bytes()).await,
        Err(_) => return,
    };
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/" | "/index.html") => {
            answer(&mut stream, 200, "text/html; charset=utf-8", PAGE.as_bytes()).await;
        }
        ("GET", "/api/state") => {
            let body = state::state(console).to_string();
            answer(&mut stream, 200, "application/json", body.as_bytes()).await;
        }
        ("POST", "/api/action") => actions::handle(console, &request, from, &mut stream).await,
        (_, "/" | "/index.html" | "/api/state" | "/api/action") => {
            answer(&mut stream, 405, "text/plain", b"method not allowed\n").await;
        }
        _ => answer(&mut stream, 404, "text/plain", b"not found\n").await,
    }
}

/// Writes a whole answer and closes.
pub async fn answer(stream: &mut TcpStream, code: u16, kind: &str, body: &[u8]) {
    let mut r = head(code, kind, Some(body.len()));
    r.extend_from_slice(body);
    let _ = stream.write_all(&r).await;
    let _ = stream.shutdown().await;
}

/// A response head; without a length the body ends when the connection closes.
pub fn head(code: u16, kind: &str, len: Option<usize>) -> Vec<u8> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        _ => "Error",
    };
    let len = len.map(|n| format!("Content-Length: {n}\r\n")).unwrap_or_default();
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {kind}\r\n{len}Cache-Control: no-store\r\n\
         X-Content-Type-Options: nosniff\r\nX-Frame-Options: DENY\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

async fn read_request(stream: &mut TcpStream) -> Result<Request, &'static str> {
    let mut data = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let mut request = parse_head(&data[..end + 4])?;
            let len = content_length(&data[..end])?;
            let mut body = data.split_off(end + 4);
            while body.len() < len {
                let n = stream.read(&mut buf).await.map_err(|_| "read failed")?;
                if n == 0 {
                    return Err("body cut short");
                }
                body.extend_from_slice(&buf[..n]);
            }
            body.truncate(len);
            request.body = body;
            return Ok(request);
        }
        if data.len() > MAX_HEAD {
            return Err("head too long");
        }
        let n = stream.read(&mut buf).await.map_err(|_| "read failed")?;
        if n == 0 {
            return Err("no complete request");
        }
        data.extend_from_slice(&buf[..n]);
    }
}

/// The request line and the Authorization header of `head` (ending with the blank line).
pub fn parse_head(head: &[u8]) -> Result<Request, &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "not UTF-8")?;
    let mut lines = text.split("\r\n");
    let mut parts = lines.next().unwrap_or_default().split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v)) if parts.next().is_none() => (m, t, v),
        _ => return Err("bad request line"),
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err("bad method");
    }
    if !target.starts_with('/') || !version.starts_with("HTTP/1.") {
        return Err("bad target or version");
    }
    let bearer = header(text, "authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let path = target.split('?').next().unwrap_or_default().to_string();
    Ok(Request { method: method.to_string(), path, bearer, body: Vec::new() })
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn content_length(head: &[u8]) -> Result<usize, &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "not UTF-8")?;
    let Some(v) = header(text, "content-length") else { return Ok(0) };
    let n: usize = v.parse().map_err(|_| "bad Content-Length")?;
    if n > MAX_BODY {
        return Err("body too long");
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_with_the_bearer_token() {
        let r = parse_head(
            b"POST /api/action?x=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer abc \r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/api/action"));
        assert_eq!(r.bearer.as_deref(), Some("abc"));
        let r = parse_head(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(r.bearer, None);
        for bad in [&b"GET /\r\n\r\n"[..], b"get / HTTP/1.1\r\n\r\n", b"GET x HTTP/1.1\r\n\r\n"] {
            assert!(parse_head(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(content_length(b"POST / HTTP/1.1\r\ncontent-length: 12"), Ok(12));
        assert!(content_length(b"POST / HTTP/1.1\r\nContent-Length: 99999").is_err());
    }
}
