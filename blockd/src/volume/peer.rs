//! The peer's side of the write path: applying what the primary sends. The target's side of a
//! resync (`GetBitmap`, `GetSums`, `ResyncData`, `ResyncZero`, the bitmap after a `Flush`) is
//! `crate::resync::target`, which this routes to after its own checks (Primary, detached).

use bytes::Bytes;

use super::{Volume, VolumeError};
use crate::meta::DiskOp;
use crate::storage::SharedBuf;
use crate::{
    control::Role,
    replication::{Message, Session},
    resync::{self, Served},
};

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
                Ok(()) => resync::flushed(self).await,
                other => other,
            },
            Message::Read { offset, len } => {
                return match self.peer_read(offset, len).await {
                    Ok(data) => Message::ReadData { data },
                    Err(_) => ack(EIO),
                };
            }
            msg @ (Message::GetBitmap { .. }
            | Message::GetSums { .. }
            | Message::ResyncData { .. }
            | Message::ResyncZero { .. }) => match resync::serve(self, session, msg).await {
                Served::Reply(reply) => return reply,
                Served::Applied(result) => result,
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

    pub(super) async fn apply_data(
        &self,
        session: &Session,
        offset: u64,
        data: Bytes,
        durable: bool,
    ) -> Result<(), VolumeError> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        // The session's reader puts a big record's payload on a page boundary
        // (`replication/session.rs`): written from where it was received. A small one is
        // copied into an aligned buffer, and the received frame is let go at once. Either way
        // a request waiting for its lock or its disk holds its payload once (the link's budget
        // counts it once).
        let buf = SharedBuf::aligned_or_copied(data);
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

    pub(super) async fn apply_zeroes(
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
}

fn ack(error: u32) -> Message {
    Message::Ack { error }
}

#[cfg(test)]
#[path = "peer_tests.rs"]
mod tests;
