//! Sending a resync (design.md §5): only what the bitmaps say may differ, in offset order.
//!
//! ```text
//!  plan:  my bitmap ∪ the peer's (GetBitmap) ∪ everything if a full sync; on disk first
//!  copy:  for each dirty run, in offset order, in chunks (≤ 1 MiB; up to 1 GiB for a hole):
//!           lock chunk (the application's interval lock, on both nodes while in flight)
//!           hole in my backing (SEEK_DATA) ─────────► ResyncZero        (nothing read)
//!           read; all zero ─────────────────────────► ResyncZero
//!           checksum mode: GetSums ─► compare ──────► ResyncData of the differing blocks only
//!           else ───────────────────────────────────► ResyncData
//!  every 64 MiB or 0.5 s, and at the end: peer Flush, then the ranges copied before it are
//!  cleared and the bitmap written back — so an interrupted resync resumes where it was, and a
//!  bit is never cleared for data the target could still lose.
//!  end:   ResyncDone{generations}
//! ```
//!
//! Checksum mode ("auto"): used for ranges that only the target's bitmap or this node's own
//! crash recovery marked, where most blocks are usually identical; ranges this node wrote
//! without the peer certainly differ and travel as data.
//!
//! Rate: up to 8 MiB (64 requests) in flight while the application is idle, one smaller chunk
//! at a time while it writes (its writes wait on the same link and, for a resynced range, the same
//! lock), and never above `max-rate` when one is set.

use std::{ops::Range, time::Duration};

use bytes::Bytes;
// tokio's clock (the same as std's outside tests): the simulator's paused time drives the
// checkpoints and the rate limit too.
use futures::stream::{FuturesUnordered, StreamExt};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::{holes::Holes, Progress, Replica, ResyncError, ResyncOptions, Tally};
use crate::{
    config::ChecksumMode,
    meta::Bitmap,
    replication::{
        wire::{SUM_BLOCK, SUM_LEN},
        LinkError, Message, Session,
    },
};

/// Bytes per resync request while the application is idle (also the most a `GetSums` covers).
pub(super) const CHUNK: u64 = 1 << 20;
/// ... and while it writes: one at a time, short enough that an application write queued
/// behind it on the link waits ~0.5 ms at 1 Gbit/s (design.md §5: app latency ≤ 2× idle).
const BUSY_CHUNK: u64 = 64 << 10;
/// A hole travels as one zero request of up to this much.
const HOLE_CHUNK: u64 = 1 << 30;
/// Payload bytes in flight while the application is idle (several chunks, or many small dirty
/// runs: a scattered bitmap must not be bound by the round trip).
const WINDOW: u64 = 8 << 20;
/// ... and at most this many requests.
const WINDOW_REQUESTS: usize = 64;
/// An application write within this long makes the resync yield.
const BUSY_WINDOW: Duration = Duration::from_millis(50);
/// A checkpoint (peer flush, bits cleared, bitmap written) after this many copied bytes or this
/// long, whichever comes first: what an interrupted resync can lose.
const CHECKPOINT: u64 = 64 << 20;
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// Passes over the bitmap before a resync gives up (and the link reconnects to try again).
const MAX_PASSES: u32 = 4;

/// What one chunk cost on the link.
#[derive(Debug, Default, Clone, Copy)]
struct Sent {
    data: u64,
    zero: u64,
    same: u64,
}

impl std::ops::AddAssign for Sent {
    fn add_assign(&mut self, o: Sent) {
        self.data += o.data;
        self.zero += o.zero;
        self.same += o.same;
    }
}

/// Sends everything that may differ to the peer over `session`, then the generations they
/// now share. Application writes go on meanwhile, mirrored as usual.
pub(crate) async fn run<V: Replica>(
    v: &V,
    session: &Session,
    opts: ResyncOptions,
) -> Result<(), ResyncError> {
    let started = Instant::now();
    let own = plan_resync(v, session, opts).await?;
    let total = v.dirty_bytes();
    v.progress(|p| *p = Progress::new(total));
    tracing::info!(volume = %v.name(), bytes = total, full = opts.full,
        peer_bitmap = opts.peer_dirty, "resync to the peer started");
    // Normally one pass. A range marked again while it was being copied keeps its bits (the
    // checkpoint does not clear them) and is copied by the next pass.
    let mut sent = Sent::default();
    for pass in 1.. {
        sent += copy_dirty(v, session, opts, &own).await?;
        let left = v.dirty_bytes();
        if left == 0 {
            break;
        }
        if pass == MAX_PASSES {
            return Err(ResyncError::Peer(format!(
                "{left} bytes still out of sync after {pass} passes"
            )));
        }
        tracing::info!(volume = %v.name(), left, pass, "ranges changed during the resync: another pass");
    }
    let gens = v.generations().await;
    match call(v, session, Message::ResyncDone { gens }).await {
        Ok(Message::Ack { error: 0 }) => {}
        other => return Err(ResyncError::Peer(format!("{other:?}"))),
    }
    v.forget_crash();
    v.finish_source().await.map_err(ResyncError::Local)?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(volume = %v.name(), bytes = total, data = sent.data, zero = sent.zero,
        same = sent.same, "resync to the peer done in {secs:.1} s");
    Ok(())
}

/// Builds the union to copy, durably, and returns the bitmap of ranges this node knows
/// differ (its own writes without the peer): those skip the checksum round trip.
async fn plan_resync<V: Replica>(
    v: &V,
    session: &Session,
    opts: ResyncOptions,
) -> Result<Bitmap, ResyncError> {
    let mut own = v.bitmap();
    for r in v.crash_ranges() {
        own.clear(r);
    }
    if opts.peer_dirty {
        let peer = fetch_bitmap(v, session, &own).await?;
        v.union(&peer).map_err(|e| {
            ResyncError::Peer(format!("the peer's bitmap does not fit this volume: {e}"))
        })?;
    }
    if opts.full {
        own.set(0..v.size());
        v.mark(0..v.size()).await.map_err(ResyncError::Local)?;
    }
    // The union on disk before anything is copied: a crash from here on resumes from it.
    v.flush_bitmap().await.map_err(ResyncError::Local)?;
    Ok(own)
}

/// The peer's dirty bitmap, in parts.
async fn fetch_bitmap<V: Replica>(
    v: &V,
    session: &Session,
    like: &Bitmap,
) -> Result<Bitmap, ResyncError> {
    let mut peer = Bitmap::new(like.size(), like.granularity())
        .map_err(|e| ResyncError::Peer(e.to_string()))?;
    let mut offset = 0;
    while offset < like.byte_len() {
        match call(v, session, Message::GetBitmap { offset }).await {
            Ok(Message::BitmapPart { offset: at, data }) if at == offset && !data.is_empty() => {
                peer.or_bytes(offset, &data);
                offset += data.len() as u64;
            }
            other => return Err(ResyncError::Peer(format!("bitmap: {other:?}"))),
        }
    }
    tracing::info!(volume = %v.name(), bytes = peer.dirty_bytes(), "the peer's bitmap");
    Ok(peer)
}

/// Copies every dirty range in offset order; see the module doc.
async fn copy_dirty<V: Replica>(
    v: &V,
    session: &Session,
    opts: ResyncOptions,
    own: &Bitmap,
) -> Result<Sent, ResyncError> {
    let holes = Holes::open(v.backing());
    let mut total = Sent::default();
    let mut in_flight = FuturesUnordered::new();
    let mut in_flight_bytes = 0u64;
    let mut copied: Vec<Range<u64>> = Vec::new();
    let mut since_checkpoint = 0u64;
    let mut marks = v.marks();
    let mut last_checkpoint = Instant::now();
    let mut checkpoint = None;
    let started = Instant::now();
    let mut offset = 0;
    loop {
        let busy = v.app_busy(BUSY_WINDOW);
        let (window, requests) = if busy { (1, 1) } else { (WINDOW, WINDOW_REQUESTS) };
        while in_flight.len() < requests && (in_flight_bytes < window || in_flight.is_empty()) {
            let Some(chunk) = next_chunk(v, offset, busy, &holes) else { break };
            offset = chunk.range.end;
            let sums = match opts.checksum {
                ChecksumMode::Always => true,
                ChecksumMode::Never => false,
                ChecksumMode::Auto => !own.test(chunk.range.clone()),
            } && !chunk.hole;
            // A hole travels as one small zero request, whatever its length.
            let payload = if chunk.hole { 0 } else { chunk.range.end - chunk.range.start };
            in_flight_bytes += payload;
            let copy = resync_chunk(v, session, chunk, sums, &holes);
            in_flight.push(async move { (payload, copy.await) });
            if opts.max_rate > 0 {
                // Stay under the ceiling: wait until the bytes sent so far are due.
                let due = Duration::from_secs_f64(total.data as f64 / opts.max_rate as f64);
                tokio::time::sleep_until(started + due).await;
            }
        }
        if in_flight.is_empty() {
            break; // nothing left to copy in this pass
        }
        // A checkpoint runs beside the copy: its peer flush and bitmap write must not
        // leave the link idle.
        // A fixed order, so the simulator replays a seed exactly; the checkpoint first, or a
        // copy with a completion ready at every poll would starve it (no progress kept).
        let next = tokio::select! {
            biased;
            result = async { checkpoint.as_mut().expect("guarded").await }, if checkpoint.is_some() => {
                checkpoint = None;
                result?;
                continue;
            }
            next = in_flight.next() => next,
        };
        let Some((payload, done)) = next else { break };
        in_flight_bytes -= payload;
        let (range, sent) = done?;
        total += sent;
        let len = range.end - range.start;
        since_checkpoint += len;
        copied.push(range);
        v.progress(|p| p.done = (p.done + len).min(p.total));
        let due = since_checkpoint >= CHECKPOINT || last_checkpoint.elapsed() >= CHECKPOINT_EVERY;
        if due && checkpoint.is_none() {
            // Covers what completed so far; what is in flight clears at the next one.
            let batch = std::mem::take(&mut copied);
            checkpoint = Some(Box::pin(make_checkpoint(v, session, batch, marks)));
            marks = v.marks();
            since_checkpoint = 0;
            last_checkpoint = Instant::now();
        }
    }
    if let Some(pending) = checkpoint {
        pending.await?;
    }
    make_checkpoint(v, session, copied, marks).await?;
    Ok(total)
}

/// Both nodes made everything copied so far durable: those bits clear, on disk too —
/// unless something was marked since `marks` (a write the peer failed, say), in which case
/// they stay for the next pass: a mark must never be cleared by a copy made before it.
async fn make_checkpoint<V: Replica>(
    v: &V,
    session: &Session,
    copied: Vec<Range<u64>>,
    marks: u64,
) -> Result<(), ResyncError> {
    if copied.is_empty() {
        return Ok(());
    }
    // Both copies durable before the bits go: the target's, and this node's own — what it
    // sent may sit in its disk's volatile cache (data it took as a Secondary and never
    // flushed), which a power cut here would lose while both bitmaps say the two agree.
    // The local flush is accounted whatever the peer answers (`flush_local`).
    let (peer, local) = tokio::join!(call(v, session, Message::Flush), v.flush_local());
    match peer {
        Ok(Message::Ack { error: 0 }) => {}
        other => return Err(ResyncError::Peer(format!("flush: {other:?}"))),
    }
    local.map_err(ResyncError::Local)?;
    if v.marks() != marks {
        return Ok(());
    }
    for r in copied {
        v.clear(r);
    }
    v.flush_bitmap().await.map_err(ResyncError::Local)
}

/// The next chunk to copy at or after `offset`: the start of the next dirty run, up to a
/// chunk's length, or the whole of a hole in the backing (up to [`HOLE_CHUNK`]).
fn next_chunk<V: Replica>(v: &V, offset: u64, busy: bool, holes: &Holes) -> Option<Chunk> {
    let run = v.next_dirty(offset)?;
    let start = run.start.max(offset);
    let max = if busy { BUSY_CHUNK } else { CHUNK };
    if let Some(data_at) = holes.next_data(start) {
        if data_at > start {
            let end = run.end.min(data_at).min(start + HOLE_CHUNK);
            return Some(Chunk { range: start..end, hole: true });
        }
    }
    let end = run.end.min(start + max);
    // A chunk never starts inside data and runs into a hole for long: cut at the hole.
    let end = match holes.next_hole(start) {
        Some(h) if h > start && h < end => h,
        _ => end,
    };
    Some(Chunk { range: start..end, hole: false })
}

async fn resync_chunk<V: Replica>(
    v: &V,
    session: &Session,
    chunk: Chunk,
    sums: bool,
    holes: &Holes,
) -> Result<(Range<u64>, Sent), ResyncError> {
    let Range { start, end } = chunk.range.clone();
    let len = end - start;
    let _lock = v.lock(start, len).await;
    let mut sent = Sent::default();
    // The hole was seen before the lock: an application write may have filled part of it
    // since. Zero only what is still a hole; the rest keeps its bits for the next pass.
    let chunk = match chunk.hole {
        true => match holes.next_data(start) {
            Some(data) if data >= end => chunk,
            Some(data) if data > start => Chunk { range: start..data, hole: true },
            _ => return Ok((start..start, sent)),
        },
        false => chunk,
    };
    let Range { start, end } = chunk.range.clone();
    let len = end - start;
    if chunk.hole {
        send_ok(v, session, Message::ResyncZero { offset: start, len }).await?;
        sent.zero = len;
        v.count(Tally::ResyncZero, len);
        return Ok((chunk.range, sent));
    }
    // `len` ≤ CHUNK, which fits u32.
    let data = v.read_local(start, len as u32).await.map_err(ResyncError::Local)?;
    if is_zero(&data) {
        // Zero ranges travel as zero requests, not data (design.md §5).
        send_ok(v, session, Message::ResyncZero { offset: start, len }).await?;
        sent.zero = len;
        v.count(Tally::ResyncZero, len);
        return Ok((chunk.range, sent));
    }
    let differ = match sums {
        true => differing_blocks(v, session, start, &data).await?,
        false => std::iter::once(0..len).collect(),
    };
    for r in &differ {
        let bytes = Bytes::copy_from_slice(&data[r.start as usize..r.end as usize]);
        let n = bytes.len() as u64;
        send_ok(v, session, Message::ResyncData { offset: start + r.start, data: bytes }).await?;
        sent.data += n;
        v.count(Tally::ResyncData, n);
    }
    sent.same = len - sent.data;
    v.count(Tally::ResyncSame, sent.same);
    Ok((chunk.range, sent))
}

/// Byte ranges (relative to `start`) of `data` whose blocks' checksums differ on the peer.
pub(super) async fn differing_blocks<V: Replica>(
    v: &V,
    session: &Session,
    start: u64,
    data: &[u8],
) -> Result<Vec<Range<u64>>, ResyncError> {
    let len = data.len() as u64;
    let theirs = match call(v, session, Message::GetSums { offset: start, len }).await {
        Ok(Message::Sums { data }) => data,
        other => return Err(ResyncError::Peer(format!("checksums: {other:?}"))),
    };
    Ok(differing(&sums(data), &theirs, len))
}

/// A request to the peer about this volume (its index on the link).
pub(super) async fn call<V: Replica>(
    v: &V,
    session: &Session,
    msg: Message,
) -> Result<Message, LinkError> {
    session.call(v.index(), msg).await
}

pub(super) async fn send_ok<V: Replica>(
    v: &V,
    session: &Session,
    msg: Message,
) -> Result<(), ResyncError> {
    match call(v, session, msg).await {
        Ok(Message::Ack { error: 0 }) => Ok(()),
        other => Err(ResyncError::Peer(format!("{other:?}"))),
    }
}

#[derive(Debug, Clone)]
struct Chunk {
    range: Range<u64>,
    /// The backing has a hole there: sent as zeroes without reading.
    hole: bool,
}

/// One checksum per [`SUM_BLOCK`] of `data` (the last block may be short).
pub(super) fn sums(data: &[u8]) -> Vec<u8> {
    data.chunks(SUM_BLOCK as usize).flat_map(|b| Sha256::digest(b)[..SUM_LEN].to_vec()).collect()
}

/// Byte ranges (relative, merged) of blocks whose checksums differ; a short or missing answer
/// from the peer counts as different.
fn differing(mine: &[u8], theirs: &[u8], len: u64) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for (i, m) in mine.chunks(SUM_LEN).enumerate() {
        let same = theirs.get(i * SUM_LEN..(i + 1) * SUM_LEN) == Some(m);
        if same {
            continue;
        }
        let start = i as u64 * SUM_BLOCK;
        let end = (start + SUM_BLOCK).min(len);
        match out.last_mut() {
            Some(last) if last.end == start => last.end = end,
            _ => out.push(start..end),
        }
    }
    out
}

/// Whether `data` is all zeroes: compared a page at a time (a `memcmp`, fast in debug builds
/// too, where the simulator runs its resyncs).
fn is_zero(data: &[u8]) -> bool {
    const ZERO: [u8; 4096] = [0; 4096];
    data.chunks(ZERO.len()).all(|c| c == &ZERO[..c.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differing_merges_adjacent_blocks_and_treats_missing_as_different() {
        let a = vec![1u8; 4096 * 4];
        let mut b = a.clone();
        b[4096 + 7] = 2;
        b[2 * 4096] = 2;
        let len = a.len() as u64;
        assert_eq!(differing(&sums(&a), &sums(&b), len), vec![4096..3 * 4096]);
        assert!(differing(&sums(&a), &sums(&a), len).is_empty());
        let short = &sums(&a)[..SUM_LEN * 3];
        assert_eq!(differing(&sums(&a), short, len), vec![3 * 4096..4 * 4096]);
        // A short last block.
        let c = vec![3u8; 4096 + 100];
        assert_eq!(differing(&sums(&c), &[], c.len() as u64), vec![0..4196]);
    }
}
