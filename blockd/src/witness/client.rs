//! The node's side of the lease: [`LeaseClient`] asks the witness, [`Lease`] says until when
//! this node may act on it, by its own monotonic clock.
//!
//! ```text
//!   node clock:   sent ──────────────────────────── valid_until ─ margin ─┤
//!                  │ request ─►            ◄─ answer                      │
//!   witness clock:       granted ─────────────────────────────── granted + term
//! ```
//!
//! The node starts counting *before* it sends (`sent`), the witness only when it answers
//! (`granted`), so however slow the request or the answer, `sent + term` is no later than the
//! witness's `granted + term` in real time, if both clocks ran at the same rate. They do not
//! quite: `margin` (default a tenth of the term) absorbs a node clock that runs up to that
//! fraction slower than the witness's. CLOCK_MONOTONIC is slewed by NTP by at most 0.05 %, so a
//! tenth is generous. Hence: while [`Lease::is_valid`] holds on this node, the witness gives the
//! lease to nobody else.
//!
//! A lease may arrive already expired (an answer slower than `term - margin`); callers check
//! [`Lease::is_valid`] before every use, not once.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    time::Instant,
};

use super::{
    frames::{self, FrameError},
    proto::{self, Message, Reply, WITNESS_ID},
};
use crate::replication::auth::{self, Secrets};

/// A lease this node holds, in its own clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub epoch: u64,
    /// The term the witness announced.
    pub term: Duration,
    /// This node may act on the lease strictly before this instant.
    pub valid_until: Instant,
}

impl Lease {
    pub fn is_valid(&self, now: Instant) -> bool {
        now < self.valid_until
    }

    /// Time left at `now` (zero once expired).
    pub fn remaining(&self, now: Instant) -> Duration {
        self.valid_until.saturating_duration_since(now)
    }
}

/// A lease just granted, with what the witness said about the node that held it before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    pub lease: Lease,
    /// The previous holder's last grant was asked degraded: it may have acknowledged writes
    /// without its peer. `Some(false)` for a renewal of this node's own epoch; None from a
    /// witness that does not send the flag.
    pub prev_degraded: Option<bool>,
}

/// Why no lease was obtained.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error("cannot reach witness {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("witness {addr}: exchange failed")]
    Exchange {
        addr: SocketAddr,
        #[source]
        source: FrameError,
    },
    #[error("witness {addr} did not answer within {}", show(*after))]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("witness {addr} refused: {reason}")]
    Denied { addr: SocketAddr, reason: String },
    #[error("witness {addr} sent {what}")]
    Unexpected { addr: SocketAddr, what: String },
    #[error("witness {addr} failed authentication: its secret is not this cluster's")]
    BadProof { addr: SocketAddr },
    #[error(
        "lease epoch {epoch} is held by {}; retry in {}",
        show_holder(holder),
        show(*retry_after)
    )]
    Refused {
        holder: Option<String>,
        epoch: u64,
        retry_after: Duration,
        /// The holder's last grant was asked degraded (None: the witness did not say).
        degraded: Option<bool>,
    },
    #[error("lease epoch {had} was lost: another node held it since; now epoch {}", now.epoch)]
    Superseded { had: u64, now: Lease },
    #[error(
        "witness {addr} grants leases of {}, this node expects {}: make lease.term and the \
         witness's --term agree",
        show(*witness),
        show(*expected)
    )]
    TermMismatch { addr: SocketAddr, witness: Duration, expected: Duration },
    #[error("no randomness for a nonce")]
    Random(#[from] auth::AuthError),
}

fn show(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

fn show_holder(h: &Option<String>) -> &str {
    h.as_deref().unwrap_or("nobody yet (witness restarting)")
}

impl WitnessError {
    /// The witness answered, and the lease is someone else's.
    pub fn is_refused(&self) -> bool {
        matches!(self, WitnessError::Refused { .. })
    }
}

/// Settings of a [`LeaseClient`] (from `[lease]` in the node's configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    /// The term the witness must announce; None accepts the witness's.
    pub term: Option<Duration>,
    /// Subtracted from the term on this side; None: a tenth of the term.
    pub margin: Option<Duration>,
    /// A whole exchange (connect, four frames) must finish within this.
    pub timeout: Duration,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings { term: None, margin: None, timeout: Duration::from_secs(2) }
    }
}

/// Asks the witness at `addr` for the lease, as node `node`.
#[derive(Debug, Clone)]
pub struct LeaseClient {
    addr: SocketAddr,
    node: String,
    secrets: Secrets,
    settings: ClientSettings,
}

impl LeaseClient {
    pub fn new(addr: SocketAddr, node: &str, secret: Arc<[u8]>, settings: ClientSettings) -> Self {
        Self::with_secrets(addr, node, Secrets::Fixed(vec![secret]), settings)
    }

    /// A client that reads its secret (the current one of `secrets`) again for every request,
    /// so that a secret rotation needs no restart of the node.
    pub fn with_secrets(
        addr: SocketAddr,
        node: &str,
        secrets: Secrets,
        settings: ClientSettings,
    ) -> Self {
        LeaseClient { addr, node: node.to_string(), secrets, settings }
    }

    /// The margin for a lease of `term`.
    pub fn margin(&self, term: Duration) -> Duration {
        self.settings.margin.unwrap_or(term / 10).min(term)
    }

    /// Asks for the lease as a node that is not degraded: granted if nobody else holds it (or
    /// this node already does).
    pub async fn acquire(&self) -> Result<Lease, WitnessError> {
        self.ask(false).await.map(|g| g.lease)
    }

    /// Asks for the lease, saying whether this node completes writes without its peer.
    pub async fn ask(&self, degraded: bool) -> Result<Granted, WitnessError> {
        let sent = Instant::now();
        let limit = self.settings.timeout;
        let addr = self.addr;
        let ask = async {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|source| WitnessError::Connect { addr, source })?;
            let _ = stream.set_nodelay(true);
            self.exchange(stream, sent, degraded).await
        };
        match tokio::time::timeout(limit, ask).await {
            Ok(r) => r,
            Err(_) => Err(WitnessError::Timeout { addr, after: limit }),
        }
    }

    /// Renews `held`: the same epoch for a new term, or [`WitnessError::Superseded`] if another
    /// node held the lease meanwhile (this node then holds the new epoch, which it must not
    /// mistake for a continuation of the old one).
    pub async fn renew(&self, held: &Lease) -> Result<Lease, WitnessError> {
        self.renew_as(held, false).await
    }

    /// [`renew`](Self::renew), saying whether this node is degraded.
    pub async fn renew_as(&self, held: &Lease, degraded: bool) -> Result<Lease, WitnessError> {
        continues(held, self.ask(degraded).await?.lease)
    }

    /// The exchange of `proto.rs` on `s`, not degraded; the lease counts from `sent`.
    #[cfg(test)]
    async fn ask_over<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        s: S,
        sent: Instant,
    ) -> Result<Lease, WitnessError> {
        self.exchange(s, sent, false).await.map(|g| g.lease)
    }

    /// The exchange of `proto.rs` on `s`, asked now (the simulator's witness connection).
    #[cfg(test)]
    pub(crate) async fn ask_on<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        s: S,
        degraded: bool,
    ) -> Result<Granted, WitnessError> {
        self.exchange(s, Instant::now(), degraded).await
    }

    /// The exchange of `proto.rs` on `s`; the lease counts from `sent`.
    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut s: S,
        sent: Instant,
        degraded: bool,
    ) -> Result<Granted, WitnessError> {
        let addr = self.addr;
        let secret = self.secrets.load()?.swap_remove(0);
        let nonce = auth::new_nonce()?;
        let mut buf = Vec::new();
        self.send(&mut s, Message::Hello { node: self.node.clone(), nonce }).await?;
        let challenge = match self.recv(&mut s, &mut buf).await? {
            Message::Challenge { nonce } => nonce,
            m => return Err(self.unexpected(&m, "CHALLENGE")),
        };
        let signed = proto::request_nonce(&challenge, degraded);
        let proof = auth::mac(&secret, &signed, &self.node, WITNESS_ID);
        self.send(&mut s, Message::Request { proof, degraded: Some(degraded) }).await?;
        let (reply, proof) = match self.recv(&mut s, &mut buf).await? {
            Message::Answer { reply, proof } => (reply, proof),
            m => return Err(self.unexpected(&m, "an answer")),
        };
        let signed = proto::answer_nonce(&nonce, &reply);
        if !auth::verify(&secret, &signed, &self.node, WITNESS_ID, &proof) {
            return Err(WitnessError::BadProof { addr });
        }
        self.lease(reply, sent)
    }

    fn lease(&self, reply: Reply, sent: Instant) -> Result<Granted, WitnessError> {
        let addr = self.addr;
        match reply {
            Reply::Grant { holder, epoch, term, expires_in, prev_degraded } => {
                if holder != self.node {
                    let what = format!("a grant for node {holder:?}");
                    return Err(WitnessError::Unexpected { addr, what });
                }
                if let Some(expected) = self.settings.term.filter(|t| *t != term) {
                    return Err(WitnessError::TermMismatch { addr, witness: term, expected });
                }
                let length = term.min(expires_in);
                let valid_until = sent + length - self.margin(length);
                Ok(Granted { lease: Lease { epoch, term, valid_until }, prev_degraded })
            }
            Reply::Refused { holder, epoch, retry_after, degraded } => {
                Err(WitnessError::Refused { holder, epoch, retry_after, degraded })
            }
        }
    }

    async fn send<S: AsyncWrite + Unpin>(&self, s: &mut S, m: Message) -> Result<(), WitnessError> {
        frames::send(s, &m)
            .await
            .map_err(|source| WitnessError::Exchange { addr: self.addr, source })
    }

    async fn recv<S: AsyncRead + Unpin>(
        &self,
        s: &mut S,
        buf: &mut Vec<u8>,
    ) -> Result<Message, WitnessError> {
        let addr = self.addr;
        match frames::recv(s, buf).await {
            Ok(Message::Denied { reason }) => Err(WitnessError::Denied { addr, reason }),
            Ok(m) => Ok(m),
            Err(source) => Err(WitnessError::Exchange { addr, source }),
        }
    }

    fn unexpected(&self, m: &Message, want: &str) -> WitnessError {
        let what = format!("{} instead of {want}", kind(m));
        WitnessError::Unexpected { addr: self.addr, what }
    }
}

/// `got` continues `held` only with the same epoch.
pub(crate) fn continues(held: &Lease, got: Lease) -> Result<Lease, WitnessError> {
    if got.epoch != held.epoch {
        return Err(WitnessError::Superseded { had: held.epoch, now: got });
    }
    Ok(got)
}

fn kind(m: &Message) -> &'static str {
    match m {
        Message::Hello { .. } => "HELLO",
        Message::Challenge { .. } => "CHALLENGE",
        Message::Request { .. } => "REQUEST",
        Message::Answer { .. } => "an answer",
        Message::Denied { .. } => "DENIED",
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
