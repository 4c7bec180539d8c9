//! The peer's side of the write path: applying what the primary sends, and sending a resync.
//!
//! Resync (this issue: the whole device, in offset order, one chunk at a time):
//! ```text
//!  source: lock chunk ─► read ─► all zero? ResyncZero : ResyncData ─► wait for ack ─► unlock
//!  target: wait until its Inconsistent flag is on disk ─► lock chunk ─► write ─► ack
//!  source: ResyncDone{generations} ─► target adopts them, then marks itself consistent
//! ```
//! The chunk lock is the same interval lock application writes take, on both nodes, held until
//! the peer acknowledged: a resync block read before an application write is applied on the
//! peer before that write, and one read after it carries it. So a stale block never lands on a
//! newer write.

use std::{sync::atomic::Ordering, time::Duration};

use bytes::Bytes;

use super::{Volume, VolumeError};
use crate::{
    control::Role,
    replication::{Message, Session},
};

/// Bytes per resync request: large enough to fill the link, small enough to keep the interval
/// lock (which application writes to the chunk wait on) short.
const RESYNC_CHUNK: u64 = 1 << 20;

/// How long a resync block waits for the target's own decision to be on disk.
const TARGET_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Error codes in `Ack` (the NBD/Linux numbers).
const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// Why a resync this node was sending stopped.
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error("local read failed")]
    Local(#[source] VolumeError),
    #[error("the peer did not apply the resync: {0}")]
    Peer(String),
}

impl Volume {
    /// Applies a request from the peer and returns the reply. Never panics on what the peer
    /// sends: anything out of place is refused with an error ack, and nothing is written.
    pub async fn apply_peer(&self, session: &Session, msg: Message) -> Message {
        if self.live().machine.role == Role::Primary {
            tracing::warn!(volume = %self.name(), "refusing a write from the peer: this node is Primary");
            return ack(EPERM);
        }
        let result = match msg {
            Message::Write { offset, data } => self.apply_data(offset, &data).await,
            Message::WriteZeroes { offset, len, punch } => {
                self.apply_zeroes(offset, len, punch).await
            }
            Message::Trim { offset, len } => match self.check_range(offset, len) {
                Ok(()) => {
                    let _lock = self.locks.lock(self.store.lock_span(offset, len)).await;
                    self.io(self.store.trim(offset, len).await)
                }
                Err(e) => Err(e),
            },
            Message::Flush => self.io(self.store.flush().await),
            Message::ResyncData { offset, data } => match self.wait_target_ready(session).await {
                Ok(()) => {
                    self.apply_resync(data.len() as u64, self.apply_data(offset, &data)).await
                }
                Err(code) => return ack(code),
            },
            Message::ResyncZero { offset, len } => match self.wait_target_ready(session).await {
                Ok(()) => self.apply_resync(len, self.apply_zeroes(offset, len, true)).await,
                Err(code) => return ack(code),
            },
            other => {
                tracing::warn!(volume = %self.name(), "unexpected request from the peer: {other:?}");
                return ack(EINVAL);
            }
        };
        match result {
            Ok(()) => ack(0),
            Err(VolumeError::OutOfRange { offset, len, size }) => {
                tracing::warn!(volume = %self.name(), offset, len, size, "peer request out of range");
                ack(EINVAL)
            }
            Err(e) if e.is_no_space() => ack(ENOSPC),
            Err(_) => ack(EIO),
        }
    }

    async fn apply_data(&self, offset: u64, data: &[u8]) -> Result<(), VolumeError> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        // Received bytes are not aligned for direct I/O: one copy into an aligned buffer.
        let mut buf = self.store.alloc(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        let _lock = self.locks.lock(self.store.lock_span(offset, len)).await;
        self.io(self.store.write(offset, buf).await)
    }

    async fn apply_zeroes(&self, offset: u64, len: u64, punch: bool) -> Result<(), VolumeError> {
        self.check_range(offset, len)?;
        let _lock = self.locks.lock(self.store.lock_span(offset, len)).await;
        self.io(self.store.write_zeroes(offset, len, punch).await)
    }

    async fn apply_resync(
        &self,
        len: u64,
        apply: impl std::future::Future<Output = Result<(), VolumeError>>,
    ) -> Result<(), VolumeError> {
        apply.await?;
        if let Some(p) = self.live().resync.as_mut() {
            p.done = (p.done + len).min(p.total);
        }
        Ok(())
    }

    /// A resync block may only be written once this node's `Inconsistent` flag is on disk for
    /// this session: otherwise a crash could leave a half-resynced disk that calls itself
    /// consistent.
    async fn wait_target_ready(&self, session: &Session) -> Result<(), u32> {
        let deadline = tokio::time::Instant::now() + TARGET_READY_TIMEOUT;
        loop {
            if self.live().target_ready == session.id() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline || !session.is_open() {
                tracing::warn!(volume = %self.name(), "resync data arrived but this node is not a resync target");
                return Err(EINVAL);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Sends the whole device to the peer over `session`, then the generations it now shares.
    /// Application writes go on meanwhile, mirrored as usual.
    pub async fn resync_source(&self, session: &Session) -> Result<(), ResyncError> {
        let size = self.size();
        let started = std::time::Instant::now();
        tracing::info!(volume = %self.name(), bytes = size, "resync to the peer started");
        let mut offset = 0;
        while offset < size {
            let len = RESYNC_CHUNK.min(size - offset);
            self.resync_chunk(session, offset, len).await?;
            offset += len;
            if let Some(p) = self.live().resync.as_mut() {
                p.done = offset;
            }
            self.counters.resync_bytes.fetch_add(len, Ordering::Relaxed);
        }
        let gens = self.persisted.lock().await.meta.gens;
        match self.call_peer(session, Message::ResyncDone { gens }).await {
            Ok(Message::Ack { error: 0 }) => {}
            other => return Err(ResyncError::Peer(format!("{other:?}"))),
        }
        self.finish_resync_source().await.map_err(ResyncError::Local)?;
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(volume = %self.name(), bytes = size, "resync to the peer done in {secs:.1} s");
        Ok(())
    }

    async fn resync_chunk(
        &self,
        session: &Session,
        offset: u64,
        len: u64,
    ) -> Result<(), ResyncError> {
        let _lock = self.locks.lock(self.store.lock_span(offset, len)).await;
        // `len` ≤ RESYNC_CHUNK, which fits u32.
        let data =
            self.io(self.store.read(offset, len as u32).await).map_err(ResyncError::Local)?;
        // Zero ranges travel as zero requests, not data (DESIGN §5).
        let msg = if data.iter().all(|&b| b == 0) {
            Message::ResyncZero { offset, len }
        } else {
            Message::ResyncData { offset, data: Bytes::copy_from_slice(&data) }
        };
        match self.call_peer(session, msg).await {
            Ok(Message::Ack { error: 0 }) => Ok(()),
            other => Err(ResyncError::Peer(format!("{other:?}"))),
        }
    }
}

fn ack(error: u32) -> Message {
    Message::Ack { error }
}
