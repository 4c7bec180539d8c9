//! The link handshake (design.md §6), run on every fresh connection; the dialer is the Noise
//! initiator:
//!
//! ```text
//!   both, in clear:  HELLO (version in header, node, instance, encrypt) ──►  ◄── HELLO
//!          check: version equal (the decoder refuses others), the configured peer's name,
//!                 the same `encryption` setting
//!   dialer:     NOISE msg 1 (psk, e) ──►           check it under each accepted secret
//!                                   ◄── NOISE msg 2 (e, ee)      dialer checks it
//!   dialer:     PARAMS record ──►                  the first record opens: the dialer is
//!                                                  authenticated; volumes compared
//!                                   ◄── PARAMS record            dialer compares volumes
//!   lower-named node only:  READY { epoch } record ──►  (sent by the session as its first frame)
//! ```
//!
//! Each side checks the other's proof before it sends anything that depends on it: the
//! responder answers message 1 only if it verifies, sends its PARAMS only after the dialer's
//! record opened; the dialer sends PARAMS only after message 2 verified. From message 2 on,
//! every frame is a record (`record.rs`) under the keys of this handshake (`noise.rs`).
//!
//! Before the peer is authenticated only HELLO, NOISE and GOODBYE frames of at most
//! [`wire::MAX_UNAUTHENTICATED`] bytes, and one record of at most [`MAX_HANDSHAKE_RECORD`]
//! bytes, are accepted: nothing larger is allocated for a connection that has not proven the
//! secret. Any failed check sends a GOODBYE naming the reason (best effort) and closes; the
//! reason becomes a `LinkEvent::Refused`. The lower-named node alone decides which connection
//! becomes the session (see `link.rs`).
//!
//! [`handshake`] is public so that tests can act as a peer that knows the secret.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::link::LinkConfig;
use super::noise::{self, Initiator, Side};
use super::record::{Channel, Protection, RecordError};
use super::wire::{self, kind, Frame, Message, VolumeParams, PROTOCOL_VERSION};

/// Largest record body accepted before the peer's first record opened: a PARAMS.
pub const MAX_HANDSHAKE_RECORD: usize = wire::HEADER_LEN + wire::MAX_CONTROL + wire::TRAILER_LEN;

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

fn refused(why: String) -> HandshakeError {
    HandshakeError::Refused(why)
}

async fn send<S: AsyncWrite + Unpin>(s: &mut S, msg: Message) -> Result<(), HandshakeError> {
    s.write_all(&wire::encode(&frame(msg))).await.map_err(HandshakeError::Io)
}

async fn send_sealed<S: AsyncWrite + Unpin>(
    s: &mut S,
    ch: &mut Channel,
    msg: Message,
) -> Result<(), HandshakeError> {
    let rec = ch.tx.seal(&frame(msg)).map_err(|e| refused(e.to_string()))?;
    s.write_all(&rec).await.map_err(HandshakeError::Io)
}

/// Decodes a clear frame before authentication: only the kinds of the handshake, bounded
/// (their shapes cap them at [`wire::MAX_UNAUTHENTICATED`]), refused from the header alone.
fn decode_clear(buf: &mut BytesMut) -> Result<Option<Frame>, String> {
    let version = |e| match e {
        wire::WireError::Version(v) => {
            format!("it speaks protocol version {v}, this node speaks {PROTOCOL_VERSION}")
        }
        e => e.to_string(),
    };
    let Some(h) = wire::decode_header(buf).map_err(version)? else { return Ok(None) };
    if !matches!(h.kind, kind::HELLO | kind::NOISE | kind::GOODBYE) {
        return Err(format!("message kind {} before authentication", h.kind));
    }
    wire::decode_buf(buf).map_err(version)
}

/// Reads until `decode` yields a frame; a GOODBYE becomes Refused with the peer's reason.
async fn recv_with<S, F>(
    s: &mut S,
    buf: &mut BytesMut,
    addr: SocketAddr,
    mut decode: F,
) -> Result<Message, HandshakeError>
where
    S: AsyncRead + Unpin,
    F: FnMut(&mut BytesMut) -> Result<Option<Frame>, String>,
{
    loop {
        match decode(buf).map_err(|e| refused(format!("peer {addr} sent a bad frame: {e}")))? {
            Some(Frame { msg: Message::Goodbye { reason }, .. }) => {
                return Err(refused(format!("peer {addr} refused the connection: {reason}")));
            }
            Some(f) => return Ok(f.msg),
            None => {}
        }
        if s.read_buf(buf).await.map_err(HandshakeError::Io)? == 0 {
            let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
            return Err(HandshakeError::Io(eof));
        }
    }
}

async fn recv<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    addr: SocketAddr,
) -> Result<Message, HandshakeError> {
    recv_with(s, buf, addr, decode_clear).await
}

async fn recv_sealed<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    ch: &mut Channel,
    addr: SocketAddr,
) -> Result<Message, HandshakeError> {
    let r =
        recv_with(s, buf, addr, |b| ch.rx.open(b, MAX_HANDSHAKE_RECORD).map_err(|e| e.to_string()))
            .await;
    match r {
        Err(HandshakeError::Refused(why)) if why.contains(&RecordError::Auth.to_string()) => {
            Err(refused(format!("peer {addr} failed authentication: {why}")))
        }
        r => r,
    }
}

fn unexpected(addr: SocketAddr, m: &Message, during: &str) -> String {
    format!("peer {addr} sent message kind {} instead of {during}", m.kind())
}

/// Sends GOODBYE (best effort) and turns `reason` into Refused.
async fn refuse<S: AsyncWrite + Unpin>(s: &mut S, reason: String) -> HandshakeError {
    let _ = send(s, Message::Goodbye { reason: reason.clone() }).await;
    let _ = s.flush().await;
    refused(reason)
}

/// Runs the handshake as node `cfg.node` (process instance `instance`) on a fresh connection
/// to `addr`, as the Noise initiator if this side `dialed`, bounded by `cfg.peer_timeout`.
/// Bytes read past the last handshake frame stay in `buf` for the session.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    cfg: &LinkConfig,
    instance: u64,
    addr: SocketAddr,
    dialed: bool,
) -> Result<(PeerHello, Channel), HandshakeError> {
    let limit = cfg.peer_timeout.max(Duration::from_millis(100));
    let run = exchange(stream, buf, cfg, instance, addr, dialed);
    match tokio::time::timeout(limit, run).await {
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
    dialed: bool,
) -> Result<(PeerHello, Channel), HandshakeError> {
    let encrypt = cfg.protection == Protection::Encrypt;
    let secrets = cfg.secrets.load().map_err(|e| refused(e.to_string()))?;
    let hello =
        Message::Hello { version: PROTOCOL_VERSION, node: cfg.node.clone(), instance, encrypt };
    send(s, hello).await?;
    let (node, peer_instance) = match recv(s, buf, addr).await? {
        Message::Hello { node, instance, encrypt: theirs, .. } if theirs == encrypt => {
            (node, instance)
        }
        Message::Hello { node, encrypt: theirs, .. } => {
            let (o, t) = (on_off(encrypt), on_off(theirs));
            let why = format!("encryption differs: this node ({}) has encryption = \"{o}\", peer {node} ({addr}) has \"{t}\"", cfg.node);
            return Err(refuse(s, why).await);
        }
        m => return Err(refuse(s, unexpected(addr, &m, "HELLO")).await),
    };
    if node != cfg.peer {
        let why = format!("peer {addr} is node '{node}', expected '{}'", cfg.peer);
        return Err(refuse(s, why).await);
    }
    let me = Side { node: &cfg.node, instance };
    let them = Side { node: &node, instance: peer_instance };
    let (i, r) = if dialed { (me, them) } else { (them, me) };
    let prologue = noise::prologue(PROTOCOL_VERSION, encrypt, i, r);
    let mut ch = if dialed {
        initiate(s, buf, &secrets[0], &prologue, cfg.protection, addr).await?
    } else {
        answer(s, buf, &secrets, &prologue, cfg.protection, addr).await?
    };
    let ours = || Message::Params { volumes: cfg.volumes.clone() };
    if dialed {
        send_sealed(s, &mut ch, ours()).await?;
    }
    let theirs = match recv_sealed(s, buf, &mut ch, addr).await? {
        Message::Params { volumes } => volumes,
        m => return Err(refused(unexpected(addr, &m, "PARAMS"))),
    };
    if let Some(why) = differences(&cfg.node, &cfg.volumes, &node, addr, &theirs) {
        let _ = send_sealed(s, &mut ch, Message::Goodbye { reason: why.clone() }).await;
        return Err(refused(why));
    }
    if !dialed {
        send_sealed(s, &mut ch, ours()).await?;
    }
    let epoch = if cfg.node < node {
        None
    } else {
        match recv_sealed(s, buf, &mut ch, addr).await? {
            Message::Ready { epoch } => Some(epoch),
            m => return Err(refused(unexpected(addr, &m, "READY"))),
        }
    };
    Ok((PeerHello { node, instance: peer_instance, epoch }, ch))
}

fn on_off(encrypt: bool) -> &'static str {
    if encrypt {
        "on"
    } else {
        "off"
    }
}

/// The dialer's side of the Noise exchange.
async fn initiate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    secret: &[u8],
    prologue: &[u8],
    protection: Protection,
    addr: SocketAddr,
) -> Result<Channel, HandshakeError> {
    let (hs, m1) = Initiator::start(secret, prologue).map_err(|e| refused(e.to_string()))?;
    send(s, Message::Noise { msg: m1.into() }).await?;
    let m2 = match recv(s, buf, addr).await? {
        Message::Noise { msg } => msg,
        m => return Err(refuse(s, unexpected(addr, &m, "NOISE")).await),
    };
    hs.finish(&m2, protection).map_err(|e| refused(format!("peer {addr} {e}")))
}

/// The listener's side: message 1 must verify under one of the accepted secrets.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    secrets: &[std::sync::Arc<[u8]>],
    prologue: &[u8],
    protection: Protection,
    addr: SocketAddr,
) -> Result<Channel, HandshakeError> {
    let m1 = match recv(s, buf, addr).await? {
        Message::Noise { msg } => msg,
        m => return Err(refuse(s, unexpected(addr, &m, "NOISE")).await),
    };
    match noise::respond(secrets, prologue, &m1, protection) {
        Ok((m2, ch, which)) => {
            if which > 0 {
                tracing::info!(%addr, "peer authenticated with the previous secret");
            }
            send(s, Message::Noise { msg: m2.into() }).await?;
            Ok(ch)
        }
        Err(e) => {
            let _ = send(s, Message::Goodbye { reason: e.to_string() }).await;
            Err(refused(format!("peer {addr} {e}")))
        }
    }
}

fn describe(v: &[VolumeParams]) -> String {
    let items: Vec<String> = v
        .iter()
        .map(|p| {
            format!(
                "{} {} bytes granularity {} activity log {} x {} bytes",
                p.name, p.size, p.granularity, p.al_extents, p.al_extent_size
            )
        })
        .collect();
    format!("[{}]", items.join(", "))
}

/// Why the two volume lists cannot be mirrored, if they cannot: names, sizes and bitmap
/// granularities must be equal (activity-log geometry may differ: each node's log covers only
/// its own writes).
fn differences(
    node: &str,
    ours: &[VolumeParams],
    peer: &str,
    addr: SocketAddr,
    theirs: &[VolumeParams],
) -> Option<String> {
    let key = |v: &[VolumeParams]| -> Vec<(String, u64)> {
        v.iter().map(|p| (p.name.clone(), p.size)).collect()
    };
    if key(ours) != key(theirs) {
        return Some(format!(
            "volumes differ: this node ({node}) has {}, peer {peer} ({addr}) has {}",
            describe(ours),
            describe(theirs)
        ));
    }
    let (a, b) = ours.iter().zip(theirs).find(|(a, b)| a.granularity != b.granularity)?;
    Some(format!(
        "bitmap granularity of volume {} differs: this node ({node}) has {} bytes, peer {peer} ({addr}) has {} bytes",
        a.name, a.granularity, b.granularity
    ))
}
