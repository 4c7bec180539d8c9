//! `blockd witness`: the lease service on a third host. One task accepts, one short task per
//! connection runs the exchange of `proto.rs` and asks the lease table; nothing else runs.
//!
//! ```text
//!   accept ─► (≤ MAX_CONNECTIONS at once, each ≤ CONN_TIMEOUT)
//!     HELLO ─► CHALLENGE ─► REQUEST: verify proof ─► lock table: request(node, now)
//!        └─ new epoch? save state file (fsync, rename, fsync dir) ─► unlock ─► GRANT/REFUSED
//! ```
//!
//! The table's lock is held across the state file write (a few milliseconds, only when the
//! holder changes), so no answer about a newer epoch can overtake the write of an older one.
//! Time is the witness's monotonic clock, read under the lock.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    frames::{self, FrameError},
    lease::{Answer, Witness},
    proto::{self, Message, Reply, WITNESS_ID},
    state::{self, StateError},
};
use crate::{
    accept::{self, Full, Policy},
    replication::auth::{self, Secrets},
};

/// Connections served at once; more wait in the listen backlog. Two nodes ask every few
/// seconds: this bounds memory against a flood, it is never reached in normal operation.
const MAX_CONNECTIONS: usize = 32;

/// A connection must finish its exchange within this, or it is dropped.
const CONN_TIMEOUT: Duration = Duration::from_secs(5);

/// How the witness accepts (table in `crate::accept`): connections over the bound wait in the
/// backlog; a failed accept (out of descriptors or memory, for a moment) backs off and the
/// lease goes on being served.
const POLICY: Policy = Policy::new("witness").bounded(MAX_CONNECTIONS, Full::Wait).nodelay();

/// What `blockd witness` needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub state: PathBuf,
    pub term: Duration,
    /// `--secret`, and during a rotation `--previous-secret` (accepted too); read again for
    /// every request, so a rotation needs no restart.
    pub secrets: Secrets,
}

/// Why the witness could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The lease table and what answering needs, shared by the connection tasks.
pub struct Shared {
    table: Mutex<Witness>,
    state: PathBuf,
    secrets: Secrets,
}

impl Shared {
    /// Loads `--state` (or creates it for a fresh witness) and builds the table, quiet for a
    /// term if the file existed.
    pub fn open(state_path: &Path, term: Duration, secrets: Secrets) -> Result<Shared, StateError> {
        let table = match state::load(state_path)? {
            Some(record) => {
                let w = Witness::restored(term, record.clone(), Instant::now());
                let quiet = term.max(record.term);
                tracing::info!(
                    "witness restarted from {}: epoch {}, holder {}; no new holder for {}",
                    state_path.display(),
                    record.epoch,
                    record.holder.as_deref().unwrap_or("none"),
                    humantime::format_duration(quiet)
                );
                w
            }
            None => {
                let w = Witness::new(term);
                // Written now so that a restart before the first grant is quiet too, and so an
                // unwritable path fails at start rather than at the first grant.
                state::save(state_path, &w.record())?;
                tracing::info!("new witness state {}: epoch 0, no holder", state_path.display());
                w
            }
        };
        Ok(Shared { table: Mutex::new(table), state: state_path.to_owned(), secrets })
    }

    /// Asks the table for `node` and persists a changed record (new epoch, or the holder's
    /// degraded flag) before returning the answer. `degraded` None: an old node's REQUEST,
    /// answered without the flags.
    fn decide(&self, node: &str, degraded: Option<bool>) -> Result<Reply, StateError> {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let term = table.term();
        let before = table.record();
        let answer = table.request(node, degraded, Instant::now());
        if table.record() != before {
            state::save(&self.state, &table.record())?;
        }
        let flag = |f: Option<bool>| degraded.and(f);
        match answer {
            Answer::Grant(g) => {
                if g.fresh {
                    tracing::info!(
                        "lease epoch {} granted to {} for {}",
                        g.epoch,
                        g.holder,
                        humantime::format_duration(term)
                    );
                } else {
                    tracing::debug!("lease epoch {} renewed by {}", g.epoch, g.holder);
                }
                let (holder, epoch, expires_in) = (g.holder, g.epoch, g.expires_in);
                let prev_degraded = flag(g.prev_degraded.or(Some(true)));
                Ok(Reply::Grant { holder, epoch, term, expires_in, prev_degraded })
            }
            Answer::Refused(r) => {
                tracing::debug!("lease refused to {node}: epoch {} is {:?}'s", r.epoch, r.holder);
                let (holder, epoch, retry_after) = (r.holder, r.epoch, r.retry_after);
                let degraded = flag(r.degraded.or(Some(true)));
                Ok(Reply::Refused { holder, epoch, retry_after, degraded })
            }
        }
    }
}

/// Runs the witness until `shutdown` completes.
pub async fn run(
    cfg: ServerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    let shared = Arc::new(Shared::open(&cfg.state, cfg.term, cfg.secrets)?);
    let addr = cfg.listen;
    let listener =
        TcpListener::bind(addr).await.map_err(|source| ServerError::Listen { addr, source })?;
    tracing::info!("witness listening on {addr}, term {}", humantime::format_duration(cfg.term));
    let token = CancellationToken::new();
    let accepting = accept::serve(listener, POLICY, token.clone(), TaskTracker::new(), move |c| {
        let (shared, peer) = (Arc::clone(&shared), c.from);
        async move {
            match tokio::time::timeout(CONN_TIMEOUT, serve(&shared, c.stream, peer)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!("witness connection from {peer}: {e:#}"),
                Err(_) => tracing::debug!("witness connection from {peer} timed out"),
            }
        }
    });
    tokio::select! {
        () = accepting => {}
        () = shutdown => token.cancel(),
    }
    Ok(())
}

/// Why one connection ended without an answer.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("sent {0} out of turn")]
    Unexpected(&'static str),
    #[error("node {0:?} failed authentication")]
    Auth(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Random(#[from] auth::AuthError),
}

/// One exchange (`proto.rs`) on `s`, from the node at `peer`.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    mut s: S,
    peer: SocketAddr,
) -> Result<(), ConnError> {
    let mut buf = Vec::new();
    let (node, node_nonce) = match recv(&mut s, &mut buf).await? {
        Message::Hello { node, nonce } if !node.is_empty() && node != WITNESS_ID => (node, nonce),
        Message::Hello { .. } => {
            return Err(deny(&mut s, ConnError::Unexpected("a bad name")).await)
        }
        _ => return Err(deny(&mut s, ConnError::Unexpected("something other than HELLO")).await),
    };
    let nonce = auth::new_nonce()?;
    frames::send(&mut s, &Message::Challenge { nonce }).await?;
    let (proof, degraded) = match recv(&mut s, &mut buf).await? {
        Message::Request { proof, degraded } => (proof, degraded),
        _ => return Err(deny(&mut s, ConnError::Unexpected("something other than REQUEST")).await),
    };
    // A REQUEST2's proof covers its flag too.
    let signed = degraded.map_or(nonce, |d| proto::request_nonce(&nonce, d));
    // The answer is signed with the secret the request verified under (current or previous).
    let secrets = shared.secrets.load()?;
    let Some(secret) = secrets.iter().find(|k| auth::verify(k, &signed, WITNESS_ID, &node, &proof))
    else {
        tracing::warn!("witness: {peer} (node {node:?}) failed authentication: wrong secret?");
        return Err(deny(&mut s, ConnError::Auth(node)).await);
    };
    let reply = match shared.decide(&node, degraded) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("witness cannot persist its state, no lease granted: {e:#}");
            return Err(deny(&mut s, e.into()).await);
        }
    };
    let answer_nonce = proto::answer_nonce(&node_nonce, &reply);
    let proof = auth::mac(secret, &answer_nonce, WITNESS_ID, &node);
    frames::send(&mut s, &Message::Answer { reply, proof }).await?;
    Ok(())
}

/// Reads a frame; a frame of another protocol version is answered with DENIED first.
async fn recv<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> Result<Message, ConnError> {
    match frames::recv(s, buf).await {
        Err(FrameError::Proto(e)) => {
            let _ = frames::send(s, &Message::Denied { reason: format!("witness: {e}") }).await;
            Err(FrameError::Proto(e).into())
        }
        r => Ok(r?),
    }
}

/// Sends DENIED naming `why` (best effort) and returns it.
async fn deny<S: AsyncWrite + Unpin>(s: &mut S, why: ConnError) -> ConnError {
    let reason = match &why {
        ConnError::Auth(_) => "authentication failed (is the secret file the cluster's?)".into(),
        other => format!("witness: {other}"),
    };
    let _ = frames::send(s, &Message::Denied { reason }).await;
    why
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
