//! The NBD protocol: fixed newstyle handshake, then the transmission phase (NBD-NOTES §1–2).
//!
//! - [`proto`]: wire constants, nothing else.
//! - [`codec`]: pure. Bytes in, values out (and back); the protocol's rules that need no volume
//!   (option answers, request validation) so they can be tested with bytes alone.
//! - [`handshake`]: option haggling over an async stream; ends in a `Session` or a hang-up.
//! - [`server`]: the transmission phase of one connection: concurrent requests, one writer.
//!
//! Nothing here touches storage: every request goes through [`Volume`].

pub mod codec;
pub mod handshake;
pub mod proto;
pub mod server;
#[cfg(test)]
pub(crate) mod testkit;

use std::{sync::Arc, time::Duration};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::volume::Volume;
use handshake::HandshakeError;

/// The volumes one listener offers. `""` names the default export, if any.
#[derive(Debug)]
pub struct Exports {
    volumes: Vec<Arc<Volume>>,
    default: Option<usize>,
}

impl Exports {
    /// `default`: the volume that the empty export name selects.
    pub fn new(volumes: Vec<Arc<Volume>>, default: Option<&str>) -> Self {
        let default = default.and_then(|d| volumes.iter().position(|v| v.name() == d));
        Exports { volumes, default }
    }
    pub fn find(&self, name: &str) -> Option<&Arc<Volume>> {
        if name.is_empty() {
            return self.default.map(|i| &self.volumes[i]);
        }
        self.volumes.iter().find(|v| v.name() == name)
    }
    pub fn volumes(&self) -> &[Arc<Volume>] {
        &self.volumes
    }
}

/// Limits of the NBD server (`[nbd]` in the configuration).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest READ/WRITE payload accepted (32 MiB: what the Linux client sends).
    pub max_request: u32,
    /// NBD clients per volume in the transmission phase.
    pub max_connections: u32,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// Requests one connection may have in flight before the server stops reading.
    pub max_in_flight: usize,
    /// Payload bytes one connection may have in flight before the server stops reading.
    pub max_in_flight_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request: 32 << 20,
            max_connections: 16,
            handshake_timeout: Duration::from_secs(10),
            max_in_flight: 256,
            max_in_flight_bytes: 128 << 20,
        }
    }
}

/// Serves one client connection until it ends: handshake, then transmission.
/// On `shutdown`, stops reading new requests, finishes those in flight, and returns.
/// Never fails: whatever ends the connection is logged here (protocol violations as warnings).
pub async fn serve<S>(
    mut stream: S,
    exports: Arc<Exports>,
    limits: Limits,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let negotiated = tokio::time::timeout(
        limits.handshake_timeout,
        handshake::negotiate(&mut stream, &exports, &limits, &shutdown),
    )
    .await;
    let session = match negotiated {
        Ok(Ok(Some(session))) => session,
        Ok(Ok(None)) => return tracing::debug!("NBD client aborted the handshake"),
        Ok(Err(
            e @ (HandshakeError::Io(_) | HandshakeError::Eof | HandshakeError::ShutdownIdle),
        )) => {
            return tracing::debug!(error = %e, "NBD handshake ended");
        }
        Ok(Err(e)) => return tracing::warn!(error = %e, "NBD handshake failed"),
        Err(_) => {
            return tracing::warn!(timeout = ?limits.handshake_timeout, "NBD handshake timed out")
        }
    };
    tracing::debug!(volume = %session.volume.name(), structured = session.structured, "NBD client in transmission");
    server::transmission(stream, session, &limits, shutdown).await;
}
