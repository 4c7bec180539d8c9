//! The link handshake (DESIGN §6), run on every fresh connection, whoever dialed:
//!
//! ```text
//!   both:  HELLO (version in header, node, instance, nonce, volumes) ──►   ◄── HELLO
//!          check: version equal (the decoder refuses others), peer's name is the configured peer
//!   both:  AUTH (HMAC over the peer's nonce, auth.rs) ──►                  ◄── AUTH
//!          check: the peer's AUTH verifies; volume names and sizes equal
//!   lower-named node only:  READY { epoch } ──►      (sent by the session as its first frame)
//! ```
//!
//! Any failed check sends a GOODBYE naming the reason and closes; the reason becomes a
//! `LinkEvent::Refused` on both sides. The lower-named node alone decides which connection
//! becomes the session (see `link.rs`); the higher-named one waits for its READY.
//!
//! [`handshake`] is public so that integration tests can act as a fake peer: complete a valid
//! handshake with a real daemon, then send frames no honest node sends.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::auth;
use super::link::LinkConfig;
use super::wire::{self, Frame, Message, PROTOCOL_VERSION};

/// Why a handshake did not produce a session.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The connection failed (refused, reset, closed): not worth a log line above debug.
    #[error("connection failed")]
    Io(#[source] std::io::Error),
    #[error("handshake timed out")]
    Timeout,
    /// The peer is not one we may talk to, or refused us: logged and shown in status.
    #[error("{0}")]
    Refused(String),
}

/// What the handshake learned about the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerHello {
    pub node: String,
    /// Random per process start of the peer.
    pub instance: u64,
    /// The READY epoch, when the peer is the lower-named node; None when we are (we send READY).
    pub epoch: Option<u64>,
}

fn frame(msg: Message) -> Frame {
    Frame { volume: 0, id: 0, reply: false, msg }
}

async fn send<S: AsyncWrite + Unpin>(s: &mut S, msg: Message) -> Result<(), HandshakeError> {
    s.write_all(&wire::encode(&frame(msg))).await.map_err(HandshakeError::Io)
}

/// Reads the next frame; a GOODBYE becomes Refused with the peer's reason.
async fn recv<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    addr: SocketAddr,
) -> Result<Message, HandshakeError> {
    loop {
        match wire::decode_buf(buf) {
            Ok(Some(Frame { msg: Message::Goodbye { reason }, .. })) => {
                return Err(HandshakeError::Refused(format!(
                    "peer {addr} refused the connection: {reason}"
                )));
            }
            Ok(Some(f)) => return Ok(f.msg),
            Ok(None) => {}
            Err(wire::WireError::Version(v)) => {
                let why = format!(
                    "peer {addr} speaks protocol version {v}, this node speaks {PROTOCOL_VERSION}"
                );
                return Err(HandshakeError::Refused(why));
            }
            Err(e) => {
                return Err(HandshakeError::Refused(format!("peer {addr} sent a bad frame: {e}")));
            }
        }
        if s.read_buf(buf).await.map_err(HandshakeError::Io)? == 0 {
            let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
            return Err(HandshakeError::Io(eof));
        }
    }
}

fn unexpected(addr: SocketAddr, m: &Message, during: &str) -> HandshakeError {
    HandshakeError::Refused(format!(
        "peer {addr} sent message kind {} instead of {during}",
        m.kind()
    ))
}

fn describe(v: &[(String, u64)]) -> String {
    let items: Vec<String> = v.iter().map(|(n, s)| format!("{n} {s} bytes")).collect();
    format!("[{}]", items.join(", "))
}

/// Sends GOODBYE (best effort) and turns `reason` into Refused.
async fn refuse<S: AsyncWrite + Unpin>(s: &mut S, reason: String) -> HandshakeError {
    let _ = send(s, Message::Goodbye { reason: reason.clone() }).await;
    let _ = s.flush().await;
    HandshakeError::Refused(reason)
}

/// Runs the handshake as node `cfg.node` (process instance `instance`) on a fresh connection
/// to `addr`, bounded by `cfg.peer_timeout`. Bytes read past the last handshake frame stay in
/// `buf` for the session.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    cfg: &LinkConfig,
    instance: u64,
    addr: SocketAddr,
) -> Result<PeerHello, HandshakeError> {
    let limit = cfg.peer_timeout.max(Duration::from_millis(100));
    match tokio::time::timeout(limit, exchange(stream, buf, cfg, instance, addr)).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::Timeout),
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    cfg: &LinkConfig,
    instance: u64,
    addr: SocketAddr,
) -> Result<PeerHello, HandshakeError> {
    let nonce = auth::new_nonce().map_err(|e| HandshakeError::Refused(e.to_string()))?;
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        node: cfg.node.clone(),
        instance,
        nonce,
        volumes: cfg.volumes.clone(),
    };
    send(s, hello).await?;
    let (node, peer_instance, peer_nonce, volumes) = match recv(s, buf, addr).await? {
        Message::Hello { node, instance, nonce, volumes, .. } => (node, instance, nonce, volumes),
        m => return Err(refuse(s, unexpected(addr, &m, "HELLO").to_string()).await),
    };
    if node != cfg.peer {
        let why = format!("peer {addr} is node '{node}', expected '{}'", cfg.peer);
        return Err(refuse(s, why).await);
    }
    send(s, Message::Auth { mac: auth::mac(&cfg.secret, &peer_nonce, &cfg.node, &node) }).await?;
    let answer = match recv(s, buf, addr).await? {
        Message::Auth { mac } => mac,
        m => return Err(refuse(s, unexpected(addr, &m, "AUTH").to_string()).await),
    };
    if !auth::verify(&cfg.secret, &nonce, &cfg.node, &node, &answer) {
        let _ = send(s, Message::Goodbye { reason: "authentication failed".into() }).await;
        return Err(HandshakeError::Refused(format!("peer {addr} failed authentication")));
    }
    if volumes != cfg.volumes {
        let why = format!(
            "volumes differ: this node ({}) has {}, peer {node} ({addr}) has {}",
            cfg.node,
            describe(&cfg.volumes),
            describe(&volumes)
        );
        return Err(refuse(s, why).await);
    }
    let epoch = if cfg.node < node {
        None
    } else {
        match recv(s, buf, addr).await? {
            Message::Ready { epoch } => Some(epoch),
            m => return Err(refuse(s, unexpected(addr, &m, "READY").to_string()).await),
        }
    };
    Ok(PeerHello { node, instance: peer_instance, epoch })
}
