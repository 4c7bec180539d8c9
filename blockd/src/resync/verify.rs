//! `blockctl verify` (design.md §5): the Primary compares its blocks with the peer's by checksum
//! while the volume is in use, 256 KiB at a time under the interval lock; what differs is
//! marked, sent to the peer as a write, and cleared once acknowledged.

use bytes::Bytes;

use super::{
    source::{differing_blocks, send_ok},
    Replica, ResyncError, Tally,
};
use crate::replication::{Message, Session};

/// Bytes `verify` compares per request (under the interval lock).
const VERIFY_CHUNK: u64 = 256 << 10;

/// `blockctl verify`: compares every block with the peer's by checksum while the volume is
/// in use; a mismatch is marked out of sync, sent to the peer, and cleared once it acked.
/// Returns (bytes compared, bytes that differed).
pub(crate) async fn run<V: Replica>(v: &V) -> Result<(u64, u64), ResyncError> {
    let size = v.size();
    let (mut offset, mut differed) = (0, 0);
    tracing::info!(volume = %v.name(), "online verify started");
    while offset < size {
        let Some(session) = v.mirror_session() else { return Err(ResyncError::NotReady) };
        let len = VERIFY_CHUNK.min(size - offset);
        differed += verify_chunk(v, &session, offset, len).await?;
        offset += len;
    }
    tracing::info!(volume = %v.name(), compared = size, differed, "online verify done");
    Ok((size, differed))
}

async fn verify_chunk<V: Replica>(
    v: &V,
    session: &Session,
    offset: u64,
    len: u64,
) -> Result<u64, ResyncError> {
    let _lock = v.lock(offset, len).await;
    let data = v.read_local(offset, len as u32).await.map_err(ResyncError::Local)?;
    let mut differed = 0;
    for r in differing_blocks(v, session, offset, &data).await? {
        let at = offset + r.start;
        tracing::warn!(volume = %v.name(), offset = at, len = r.end - r.start,
            "verify: blocks differ from the peer; repairing from this node");
        v.mark(at..offset + r.end).await.map_err(ResyncError::Local)?;
        let bytes = Bytes::copy_from_slice(&data[r.start as usize..r.end as usize]);
        differed += bytes.len() as u64;
        send_ok(v, session, Message::Write { offset: at, data: bytes }).await?;
        v.clear(at..offset + r.end);
    }
    if differed > 0 {
        v.count(Tally::VerifyDiffered, differed);
        v.flush_bitmap().await.map_err(ResyncError::Local)?;
    }
    Ok(differed)
}
