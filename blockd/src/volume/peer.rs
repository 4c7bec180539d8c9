//! The peer's side of the write path: applying what the primary sends, and the target's side
//! of a resync (the source's is in `resync.rs`):
//! ```text
//!  GetBitmap ─► parts of this node's bitmap (the source copies the union)
//!  GetSums   ─► checksums of a chunk (the source then sends only differing blocks)
//!  ResyncData / ResyncZero: wait until the Inconsistent flag is on disk ─► lock ─► write ─►
//!            clear those bits here ─► ack
//!  Flush during a resync: the data, then this node's bitmap, are made durable
//!  ResyncDone{generations} ─► adopt them, bitmap cleared, then marked consistent
//! ```
//! The chunk lock is the same interval lock application writes take, on both nodes, held until
//! the peer acknowledged: a resync block read before an application write is applied on the
//! peer before that write, and one read after it carries it. So a stale block never lands on a
//! newer write.

use std::time::Duration;

use bytes::Bytes;

use super::{Volume, VolumeError};
use crate::meta::DiskOp;
use crate::{
    control::Role,
    replication::{Message, Session},
};

/// How long a resync block waits for the target's own decision to be on disk.
const TARGET_READY_TIMEOUT: Duration = Duration::from_secs(10);

// Values in `Ack`: the crate's one table.
use crate::errno::{self, EINVAL, EIO, EPERM};

impl Volume {
    /// Applies a request from the peer and returns the reply. Never panics on what the peer
    /// sends: anything out of place is refused with an error ack, and nothing is written.
    pub async fn apply_peer(&self, session: &Session, msg: Message) -> Message {
        if self.live().machine.role == Role::Primary {
            tracing::warn!(volume = %self.name(), "refusing a write from the peer: this node is Primary");
            return ack(EPERM);
        }
        if self.detached() && !matches!(msg, Message::GetBitmap { .. }) {
            // Nothing is read from or written to a Failed disk; the Primary marks and goes on
            // without this node (DRBD's detach).
            return ack(EIO);
        }
        let result = match msg {
            Message::Write { offset, data } => self.apply_data(session, offset, data, false).await,
            // The Primary's FUA: written durably here before the ack (RWF_DSYNC).
            Message::WriteFua { offset, data } => {
                self.apply_data(session, offset, data, true).await
            }
            Message::WriteZeroes { offset, len, punch } => {
                self.apply_zeroes(session, offset, len, punch).await
            }
            Message::Trim { offset, len } => match self.check_range(offset, len) {
                Ok(()) => match self.lock_live(session, offset, len).await {
                    Ok(_lock) => {
                        self.io(DiskOp::Trim, offset, self.store.trim(offset, len).await).await
                    }
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            },
            Message::Flush => match self.io(DiskOp::Flush, 0, self.store.flush().await).await {
                // The source clears its bits after this flush: clear ours durably too.
                Ok(()) if self.live().resync.is_some() => self.flush_bitmap().await,
                other => other,
            },
            Message::GetBitmap { offset } => {
                let data =
                    self.track.with(|d| d.bitmap().bytes_at(offset, super::resync::BITMAP_PART));
                return Message::BitmapPart { offset, data: data.into() };
            }
            Message::Read { offset, len } => {
                return match self.peer_read(offset, len).await {
                    Ok(data) => Message::ReadData { data },
                    Err(_) => ack(EIO),
                };
            }
            Message::GetSums { offset, len } => {
                return match self.local_sums(offset, len).await {
                    Ok(data) => Message::Sums { data },
                    Err(_) => ack(EIO),
                };
            }
            Message::ResyncData { offset, data } => match self.wait_target_ready(session).await {
                Ok(()) => {
                    let len = data.len() as u64;
                    let apply = self.apply_data(session, offset, data, false);
                    self.apply_resync(offset, len, apply).await
                }
                Err(code) => return ack(code),
            },
            Message::ResyncZero { offset, len } => match self.wait_target_ready(session).await {
                Ok(()) => {
                    let zero = self.apply_zeroes(session, offset, len, true);
                    self.apply_resync(offset, len, zero).await
                }
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
            Err(e) => ack(errno::of_volume(&e)),
        }
    }

    async fn apply_data(
        &self,
        session: &Session,
        offset: u64,
        data: Bytes,
        durable: bool,
    ) -> Result<(), VolumeError> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        // Received bytes are not aligned for direct I/O: one copy into an aligned buffer. The
        // received frame is let go at once, so a request waiting for its lock or its disk holds
        // its payload once (the link's budget counts it once, `replication/session.rs`).
        let mut buf = self.store.alloc(data.len());
        buf.as_mut_slice().copy_from_slice(&data);
        drop(data);
        let _lock = self.lock_live(session, offset, len).await?;
        self.io(DiskOp::Write, offset, self.store.write_with(offset, buf, durable).await).await
    }

    /// The Primary's disk failed: it reads this node's copy.
    async fn peer_read(&self, offset: u64, len: u32) -> Result<bytes::Bytes, VolumeError> {
        self.check_range(offset, u64::from(len))?;
        let data = self.store.read(offset, len).await;
        let data = self.io(DiskOp::Read, offset, data).await?;
        Ok(bytes::Bytes::copy_from_slice(&data))
    }

    async fn apply_zeroes(
        &self,
        session: &Session,
        offset: u64,
        len: u64,
        punch: bool,
    ) -> Result<(), VolumeError> {
        self.check_range(offset, len)?;
        let _lock = self.lock_live(session, offset, len).await?;
        self.io(DiskOp::WriteZeroes, offset, self.store.write_zeroes(offset, len, punch).await)
            .await
    }

    /// The range lock for a request of `session`, taken only while that session lives. A
    /// request of a session that ended while it waited must not be applied: the next session's
    /// resync may have written the range meanwhile, and the stale bytes would land on newer
    /// ones (the Primary marked the unacknowledged request; the resync covers it). The session
    /// ends before the next one can start, so the check under the lock is enough. Answered EIO
    /// (to nobody: the session is gone), without failing the disk.
    async fn lock_live(
        &self,
        session: &Session,
        offset: u64,
        len: u64,
    ) -> Result<super::locks::RangeGuard<'_>, VolumeError> {
        let lock = self.locks.lock(self.store.lock_span(offset, len)).await;
        if session.is_open() {
            return Ok(lock);
        }
        tracing::debug!(volume = %self.name(), offset, len, "dropping a request of an ended session");
        let ended = std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "session ended");
        Err(VolumeError::Io(ended))
    }

    async fn apply_resync(
        &self,
        offset: u64,
        len: u64,
        apply: impl std::future::Future<Output = Result<(), VolumeError>>,
    ) -> Result<(), VolumeError> {
        apply.await?;
        // Same as the source's now: this node's own mark of it (if any) is satisfied.
        self.track.clear(offset..offset + len);
        if let Some(p) = self.live().resync.as_mut() {
            p.done = (p.done + len).min(p.total);
        }
        Ok(())
    }

    /// A resync block may only be written once this node's `Inconsistent` flag is on disk for
    /// this session: otherwise a crash could leave a half-resynced disk that calls itself
    /// consistent.
    async fn wait_target_ready(&self, session: &Session) -> Result<(), u32> {
        let mut ready = self.target_ready.subscribe();
        let wanted = session.id();
        let wait = async {
            loop {
                if *ready.borrow_and_update() == wanted {
                    return true;
                }
                // A session that ended never becomes ready; the sender lives as long as `self`.
                tokio::select! {
                    biased; // deterministic in the simulator
                    changed = ready.changed() => if changed.is_err() { return false },
                    () = session.closed() => return false,
                }
            }
        };
        match tokio::time::timeout(TARGET_READY_TIMEOUT, wait).await {
            Ok(true) => Ok(()),
            Ok(false) | Err(_) => {
                tracing::warn!(volume = %self.name(), "resync data arrived but this node is not a resync target");
                Err(EINVAL)
            }
        }
    }
}

fn ack(error: u32) -> Message {
    Message::Ack { error }
}

#[cfg(test)]
#[path = "peer_tests.rs"]
mod tests;
