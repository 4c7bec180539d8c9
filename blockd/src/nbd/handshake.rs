//! Fixed newstyle option haggling (NBD-NOTES §2.1–2.3) over any `AsyncRead + AsyncWrite`.
//!
//! ```text
//!  greeting ─► client flags ─► loop { option header + data ─► classify_option ─► replies }
//!                                   │ GO (ACK) / EXPORT_NAME (size, flags[, zeroes])
//!                                   ▼
//!                             Session ─► server::transmission
//! ```
//!
//! Which reply an option gets is decided by the pure [`codec::classify_option`]; this module
//! only does the I/O and the parts that need the exports (INFO, GO, LIST, EXPORT_NAME). Input is
//! read through one buffer so that a shutdown can interrupt a wait without losing bytes, and
//! whatever the client pipelined after GO is handed on to the transmission phase.

use std::{io, sync::Arc, time::Duration};

use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::{
    codec::{self, BlockSizes, CodecError, Decoded, HaggleState, OptionAction},
    proto::{self, opt, rep},
    Exports, Limits,
};
use crate::volume::{ClientGuard, Volume};

/// After a shutdown starts, an idle client gets this long to send an option (to be answered
/// ERR_SHUTDOWN) before the server gives up on it, so shutdown is not held up by idlers.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Why the handshake ended without entering transmission.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("connection failed during the handshake")]
    Io(#[source] io::Error),
    #[error("client closed the connection during the handshake")]
    Eof,
    #[error("protocol violation")]
    Codec(#[from] CodecError),
    #[error("protocol violation: {0}")]
    Violation(&'static str),
    #[error("refused EXPORT_NAME {name:?}: {reason}")]
    ExportRefused { name: String, reason: String },
    #[error("server shutting down and the client sent no option")]
    ShutdownIdle,
}

/// What the handshake agreed on; the transmission phase runs on it.
#[derive(Debug)]
pub struct Session {
    pub volume: Arc<Volume>,
    /// Holds this connection's client slot on the volume for the whole transmission phase.
    pub guard: ClientGuard,
    /// STRUCTURED_REPLY was acknowledged: READ replies are structured.
    pub structured: bool,
    /// Bytes the client already sent after the last option (pipelined requests).
    pub leftover: BytesMut,
}

/// Runs the handshake. `Ok(None)`: the client aborted (NBD_OPT_ABORT).
pub async fn negotiate<S>(
    stream: &mut S,
    exports: &Exports,
    limits: &Limits,
    shutdown: &CancellationToken,
) -> Result<Option<Session>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut h = Haggler {
        stream,
        exports,
        limits,
        shutdown,
        grace: None,
        input: BytesMut::with_capacity(1024),
        out: Vec::with_capacity(256),
        st: HaggleState::default(),
    };
    codec::encode_greeting(&mut h.out);
    h.send().await?;
    h.fill(4).await?;
    let Decoded::Frame(client) = codec::decode_client_flags(&h.input)? else {
        return Err(HandshakeError::Eof); // fill(4) guarantees a frame
    };
    h.input.advance(4);
    h.st.client = client;
    h.option_loop().await
}

/// Where the haggling goes after one option.
enum Next {
    /// Wait for the next option.
    Option,
    /// The client sent ABORT.
    Abort,
    /// GO or EXPORT_NAME succeeded.
    Transmit(Session),
}

struct Haggler<'a, S> {
    stream: &'a mut S,
    exports: &'a Exports,
    limits: &'a Limits,
    shutdown: &'a CancellationToken,
    /// Set once shutdown started: the deadline for the client's next option.
    grace: Option<Instant>,
    input: BytesMut,
    out: Vec<u8>,
    st: HaggleState,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Haggler<'_, S> {
    async fn option_loop(&mut self) -> Result<Option<Session>, HandshakeError> {
        loop {
            self.fill(proto::OPTION_HEADER_LEN).await?;
            let Decoded::Frame(header) = codec::decode_option_header(&self.input)? else {
                return Err(HandshakeError::Eof); // unreachable: fill() waited for a whole header
            };
            self.input.advance(proto::OPTION_HEADER_LEN);
            // Always consume exactly `length` bytes, whatever the answer (§2.1).
            let len = header.length as usize;
            self.fill(len).await?;
            let data = self.input.split_to(len);
            match self.answer(header.option, &data).await? {
                Next::Option => {}
                Next::Abort => return Ok(None),
                Next::Transmit(session) => return Ok(Some(session)),
            }
        }
    }

    /// Answers one option.
    async fn answer(&mut self, option: u32, data: &[u8]) -> Result<Next, HandshakeError> {
        if self.shutdown.is_cancelled() && !self.st.shutting_down {
            self.shutting_down();
        }
        let action = codec::classify_option(option, data, &self.st);
        tracing::debug!(option = option_name(option), len = data.len(), ?action, "NBD option");
        match action {
            OptionAction::Reply { reply, message } => self.reply(option, reply, message),
            OptionAction::EnableStructured => {
                self.st.structured = true;
                self.reply(option, rep::ACK, "");
            }
            OptionAction::List => self.list(option),
            OptionAction::Abort => {
                self.reply(option, rep::ACK, "");
                // The client may already be gone; that is fine (§2.2 ABORT).
                let _ = self.send().await;
                return Ok(Next::Abort);
            }
            OptionAction::Disconnect(why) => return Err(HandshakeError::Violation(why)),
            OptionAction::ExportName(name) => return self.export_name(name).await,
            OptionAction::Info { request, go } => {
                if let Some(session) = self.info(option, request.name, go) {
                    self.send().await?;
                    return Ok(Next::Transmit(self.session(session)));
                }
            }
        }
        self.send().await?;
        Ok(Next::Option)
    }

    fn reply(&mut self, option: u32, reply: u32, message: &str) {
        codec::encode_option_reply(&mut self.out, option, reply, message.as_bytes());
    }

    /// One SERVER reply per export, then ACK (§2.2 LIST).
    fn list(&mut self, option: u32) {
        for v in self.exports.volumes() {
            codec::encode_rep_server(&mut self.out, option, v.name());
        }
        self.reply(option, rep::ACK, "");
    }

    /// INFO and GO (§2.2). Replies are queued in `out`; returns the volume and its client slot
    /// when GO succeeded. INFO then GO report the same size and flags: both come from here.
    fn info(&mut self, option: u32, name: &[u8], go: bool) -> Option<(Arc<Volume>, ClientGuard)> {
        let Some(volume) = self.find(name) else {
            self.reply(option, rep::ERR_UNKNOWN, "no such export");
            return None;
        };
        if let Err(e) = volume.check_serving() {
            self.reply(option, rep::ERR_POLICY, &e.to_string());
            return None;
        }
        let guard = if go {
            let Some(g) = volume.add_client(self.limits.max_connections) else {
                self.reply(option, rep::ERR_POLICY, "too many connections to this export");
                return None;
            };
            Some(g)
        } else {
            None
        };
        // Sent unasked (allowed): EXPORT, NAME, BLOCK_SIZE; unknown requested types ignored [M].
        codec::encode_info_export(&mut self.out, option, volume.size(), codec::TRANSMISSION_FLAGS);
        codec::encode_info_name(&mut self.out, option, volume.name());
        codec::encode_info_block_size(&mut self.out, option, block_sizes(&volume, self.limits));
        self.reply(option, rep::ACK, "");
        guard.map(|g| (volume, g))
    }

    /// EXPORT_NAME (§2.2): the only way to refuse is to hang up.
    async fn export_name(&mut self, name: &[u8]) -> Result<Next, HandshakeError> {
        let refuse = |reason: String| HandshakeError::ExportRefused {
            name: String::from_utf8_lossy(name).into_owned(),
            reason,
        };
        let volume = self.find(name).ok_or_else(|| refuse("no such export".into()))?;
        volume.check_serving().map_err(|e| refuse(e.to_string()))?;
        let guard = volume
            .add_client(self.limits.max_connections)
            .ok_or_else(|| refuse("too many connections to this export".into()))?;
        let flags = codec::TRANSMISSION_FLAGS;
        codec::encode_export_name_reply(
            &mut self.out,
            volume.size(),
            flags,
            self.st.client.no_zeroes,
        );
        self.send().await?;
        Ok(Next::Transmit(self.session((volume, guard))))
    }

    fn find(&self, name: &[u8]) -> Option<Arc<Volume>> {
        std::str::from_utf8(name).ok().and_then(|n| self.exports.find(n)).cloned()
    }

    fn session(&mut self, (volume, guard): (Arc<Volume>, ClientGuard)) -> Session {
        let leftover = std::mem::take(&mut self.input);
        Session { volume, guard, structured: self.st.structured, leftover }
    }

    async fn send(&mut self) -> Result<(), HandshakeError> {
        self.stream.write_all(&self.out).await.map_err(HandshakeError::Io)?;
        self.stream.flush().await.map_err(HandshakeError::Io)?;
        self.out.clear();
        Ok(())
    }

    /// From now on options get ERR_SHUTDOWN, and an idle client gets [`SHUTDOWN_GRACE`].
    fn shutting_down(&mut self) {
        self.st.shutting_down = true;
        self.grace = Some(Instant::now() + SHUTDOWN_GRACE);
    }

    /// Reads until `input` holds at least `n` bytes. A shutdown does not interrupt this: it
    /// marks the state (options get ERR_SHUTDOWN from now on) and starts the grace period.
    async fn fill(&mut self, n: usize) -> Result<(), HandshakeError> {
        while self.input.len() < n {
            self.input.reserve(n - self.input.len());
            let grace = self.grace.unwrap_or_else(Instant::now);
            let read = tokio::select! {
                r = self.stream.read_buf(&mut self.input) => r.map_err(HandshakeError::Io)?,
                () = self.shutdown.cancelled(), if !self.st.shutting_down => {
                    self.shutting_down();
                    continue;
                }
                () = tokio::time::sleep_until(grace), if self.grace.is_some() => {
                    return Err(HandshakeError::ShutdownIdle);
                }
            };
            if read == 0 {
                return Err(HandshakeError::Eof);
            }
        }
        Ok(())
    }
}

/// Block size constraints (§2.3). Minimum 1: the store does read-modify-write for unaligned
/// requests, so clients that ignore block sizes are served correctly. Preferred: the backing's
/// block size, at least 4096. Maximum: the largest READ/WRITE payload accepted.
pub fn block_sizes(volume: &Volume, limits: &Limits) -> BlockSizes {
    let maximum = limits.max_request;
    let preferred = volume.block_size().max(4096).min(maximum);
    BlockSizes { minimum: 1, preferred, maximum }
}

/// The option's name, for logs.
pub fn option_name(option: u32) -> &'static str {
    match option {
        opt::EXPORT_NAME => "EXPORT_NAME",
        opt::ABORT => "ABORT",
        opt::LIST => "LIST",
        opt::STARTTLS => "STARTTLS",
        opt::INFO => "INFO",
        opt::GO => "GO",
        opt::STRUCTURED_REPLY => "STRUCTURED_REPLY",
        opt::LIST_META_CONTEXT => "LIST_META_CONTEXT",
        opt::SET_META_CONTEXT => "SET_META_CONTEXT",
        opt::EXTENDED_HEADERS => "EXTENDED_HEADERS",
        _ => "unknown",
    }
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;
