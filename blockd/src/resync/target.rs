//! Receiving a resync (design.md §5): the target's answers to the source.
//!
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

use super::{source::sums, Replica};
use crate::{
    errno::EINVAL,
    meta::Generations,
    replication::{Message, Session},
    volume::{Transition, VolumeError},
};

/// How long a resync block waits for the target's own decision to be on disk.
const TARGET_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bitmap bytes per GetBitmap reply.
const BITMAP_PART: usize = 1 << 20;

/// What a resync request from the source came to here.
#[derive(Debug)]
pub(crate) enum Served {
    /// The reply to send as it is.
    Reply(Message),
    /// A block applied (or not): acknowledged like the peer's writes are.
    Applied(Result<(), VolumeError>),
}

/// Answers `GetBitmap`, `GetSums`, `ResyncData` and `ResyncZero` (`volume/peer.rs` routes them
/// here, after its own checks); anything else is refused.
pub(crate) async fn serve<V: Replica>(v: &V, session: &Session, msg: Message) -> Served {
    match msg {
        Message::GetBitmap { offset } => {
            let data = v.bitmap_part(offset, BITMAP_PART);
            Served::Reply(Message::BitmapPart { offset, data: data.into() })
        }
        Message::GetSums { offset, len } => Served::Reply(match local_sums(v, offset, len).await {
            Ok(data) => Message::Sums { data },
            Err(_) => Message::Ack { error: crate::errno::EIO },
        }),
        Message::ResyncData { offset, data } => match wait_target_ready(v, session).await {
            Ok(()) => {
                let len = data.len() as u64;
                let apply = v.write_from_peer(session, offset, data);
                Served::Applied(apply_resync(v, offset, len, apply).await)
            }
            Err(code) => Served::Reply(Message::Ack { error: code }),
        },
        Message::ResyncZero { offset, len } => match wait_target_ready(v, session).await {
            Ok(()) => {
                let zero = v.zero_from_peer(session, offset, len);
                Served::Applied(apply_resync(v, offset, len, zero).await)
            }
            Err(code) => Served::Reply(Message::Ack { error: code }),
        },
        other => {
            tracing::warn!(volume = %v.name(), "not a resync request: {other:?}");
            Served::Reply(Message::Ack { error: EINVAL })
        }
    }
}

/// This node's store completed the peer's `Flush`: the source clears its bits after it, so
/// during a resync ours are cleared durably too.
pub(crate) async fn flushed<V: Replica>(v: &V) -> Result<(), VolumeError> {
    match v.resyncing() {
        true => v.flush_bitmap().await,
        false => Ok(()),
    }
}

/// `ResyncDone`: the resync this node received is complete.
pub(crate) async fn finish<V: Replica>(
    v: &V,
    source: &Generations,
) -> Result<Transition, VolumeError> {
    v.finish_target(source).await
}

/// The checksums of `offset..offset+len` here, for the peer's `GetSums`.
async fn local_sums<V: Replica>(v: &V, offset: u64, len: u64) -> Result<Bytes, VolumeError> {
    v.check_range(offset, len)?;
    if len > super::source::CHUNK {
        return Err(VolumeError::OutOfRange { offset, len, size: super::source::CHUNK });
    }
    let _lock = v.lock(offset, len).await;
    let data = v.read_local(offset, len as u32).await?;
    Ok(Bytes::from(sums(&data)))
}

async fn apply_resync<V: Replica>(
    v: &V,
    offset: u64,
    len: u64,
    apply: impl std::future::Future<Output = Result<(), VolumeError>>,
) -> Result<(), VolumeError> {
    apply.await?;
    // Same as the source's now: this node's own mark of it (if any) is satisfied.
    v.clear(offset..offset + len);
    v.progress(|p| p.done = (p.done + len).min(p.total));
    Ok(())
}

/// A resync block may only be written once this node's `Inconsistent` flag is on disk for
/// this session: otherwise a crash could leave a half-resynced disk that calls itself
/// consistent.
async fn wait_target_ready<V: Replica>(v: &V, session: &Session) -> Result<(), u32> {
    let mut ready = v.target_ready();
    let wanted = session.id();
    let wait = async {
        loop {
            if *ready.borrow_and_update() == wanted {
                return true;
            }
            // A session that ended never becomes ready; the sender lives as long as the volume.
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
            tracing::warn!(volume = %v.name(), "resync data arrived but this node is not a resync target");
            Err(EINVAL)
        }
    }
}
