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

use std::{io, ops::Range, os::fd::AsRawFd, sync::atomic::Ordering, time::Duration};

use bytes::Bytes;
// tokio's clock (the same as std's outside tests): the simulator's paused time drives the
// checkpoints and the rate limit too.
use futures::stream::{FuturesUnordered, StreamExt};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::{Volume, VolumeError};
use crate::{
    config::ChecksumMode,
    meta::{Bitmap, DiskOp},
    replication::{
        wire::{SUM_BLOCK, SUM_LEN},
        Message, Session,
    },
};

/// Bytes per resync request while the application is idle.
const CHUNK: u64 = 1 << 20;
/// ... and while it writes: one at a time, short enough that an application write queued
/// behind it on the link waits ~0.5 ms at 1 Gbit/s (design.md §5: app latency ≤ 2× idle).
const BUSY_CHUNK: u64 = 64 << 10;
/// Bytes `verify` compares per request (under the interval lock).
const VERIFY_CHUNK: u64 = 256 << 10;
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
/// Bitmap bytes per GetBitmap reply.
pub(super) const BITMAP_PART: usize = 1 << 20;

/// How a resync is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncOptions {
    /// Copy the whole device (an unrelated peer, `resolve --full-sync`).
    pub full: bool,
    /// The peer's bitmap marks something: fetch it and copy the union.
    pub peer_dirty: bool,
    /// Bytes per second; 0 = no ceiling.
    pub max_rate: u64,
    pub checksum: ChecksumMode,
}

/// Why a resync (or a verify) this node was running stopped.
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error("local I/O failed")]
    Local(#[source] VolumeError),
    #[error("the peer did not apply the resync: {0}")]
    Peer(String),
    #[error("this node is not connected and Primary")]
    NotReady,
}

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

impl Volume {
    /// Sends everything that may differ to the peer over `session`, then the generations they
    /// now share. Application writes go on meanwhile, mirrored as usual.
    pub async fn resync_source(
        &self,
        session: &Session,
        opts: ResyncOptions,
    ) -> Result<(), ResyncError> {
        let started = Instant::now();
        let own = self.plan_resync(session, opts).await?;
        let total = self.dirty_bytes();
        if let Some(p) = self.live().resync.as_mut() {
            *p = super::state::Progress::new(total);
        }
        tracing::info!(volume = %self.name(), bytes = total, full = opts.full,
            peer_bitmap = opts.peer_dirty, "resync to the peer started");
        // Normally one pass. A range marked again while it was being copied keeps its bits (the
        // checkpoint does not clear them) and is copied by the next pass.
        let mut sent = Sent::default();
        for pass in 1.. {
            sent += self.copy_dirty(session, opts, &own).await?;
            let left = self.dirty_bytes();
            if left == 0 {
                break;
            }
            if pass == MAX_PASSES {
                return Err(ResyncError::Peer(format!(
                    "{left} bytes still out of sync after {pass} passes"
                )));
            }
            tracing::info!(volume = %self.name(), left, pass, "ranges changed during the resync: another pass");
        }
        let gens = self.lock_persisted().await.meta.gens;
        match self.call_peer(session, Message::ResyncDone { gens }).await {
            Ok(Message::Ack { error: 0 }) => {}
            other => return Err(ResyncError::Peer(format!("{other:?}"))),
        }
        self.track.forget_crash();
        self.finish_resync_source().await.map_err(ResyncError::Local)?;
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(volume = %self.name(), bytes = total, data = sent.data, zero = sent.zero,
            same = sent.same, "resync to the peer done in {secs:.1} s");
        Ok(())
    }

    /// Builds the union to copy, durably, and returns the bitmap of ranges this node knows
    /// differ (its own writes without the peer): those skip the checksum round trip.
    async fn plan_resync(
        &self,
        session: &Session,
        opts: ResyncOptions,
    ) -> Result<Bitmap, ResyncError> {
        let mut own = self.track.with(|d| d.bitmap().clone());
        for r in self.track.crash_ranges() {
            own.clear(r);
        }
        if opts.peer_dirty {
            let peer = self.fetch_bitmap(session, &own).await?;
            self.track.with(|d| d.union(&peer)).map_err(|e| {
                ResyncError::Peer(format!("the peer's bitmap does not fit this volume: {e}"))
            })?;
        }
        if opts.full {
            own.set(0..self.size());
            self.mark(0..self.size()).await.map_err(ResyncError::Local)?;
        }
        // The union on disk before anything is copied: a crash from here on resumes from it.
        self.flush_bitmap().await.map_err(ResyncError::Local)?;
        Ok(own)
    }

    /// The peer's dirty bitmap, in parts.
    async fn fetch_bitmap(&self, session: &Session, like: &Bitmap) -> Result<Bitmap, ResyncError> {
        let mut peer = Bitmap::new(like.size(), like.granularity())
            .map_err(|e| ResyncError::Peer(e.to_string()))?;
        let mut offset = 0;
        while offset < like.byte_len() {
            match self.call_peer(session, Message::GetBitmap { offset }).await {
                Ok(Message::BitmapPart { offset: at, data })
                    if at == offset && !data.is_empty() =>
                {
                    peer.or_bytes(offset, &data);
                    offset += data.len() as u64;
                }
                other => return Err(ResyncError::Peer(format!("bitmap: {other:?}"))),
            }
        }
        tracing::info!(volume = %self.name(), bytes = peer.dirty_bytes(), "the peer's bitmap");
        Ok(peer)
    }

    /// Copies every dirty range in offset order; see the module doc.
    async fn copy_dirty(
        &self,
        session: &Session,
        opts: ResyncOptions,
        own: &Bitmap,
    ) -> Result<Sent, ResyncError> {
        let holes = Holes::open(self.store.path());
        let mut total = Sent::default();
        let mut in_flight = FuturesUnordered::new();
        let mut in_flight_bytes = 0u64;
        let mut copied: Vec<Range<u64>> = Vec::new();
        let mut since_checkpoint = 0u64;
        let mut marks = self.track.marks();
        let mut last_checkpoint = Instant::now();
        let mut checkpoint = None;
        let started = Instant::now();
        let mut offset = 0;
        loop {
            let busy = self.app_busy(BUSY_WINDOW);
            let (window, requests) = if busy { (1, 1) } else { (WINDOW, WINDOW_REQUESTS) };
            while in_flight.len() < requests && (in_flight_bytes < window || in_flight.is_empty()) {
                let Some(chunk) = self.next_chunk(offset, busy, &holes) else { break };
                offset = chunk.range.end;
                let sums = match opts.checksum {
                    ChecksumMode::Always => true,
                    ChecksumMode::Never => false,
                    ChecksumMode::Auto => !own.test(chunk.range.clone()),
                } && !chunk.hole;
                // A hole travels as one small zero request, whatever its length.
                let payload = if chunk.hole { 0 } else { chunk.range.end - chunk.range.start };
                in_flight_bytes += payload;
                let copy = self.resync_chunk(session, chunk, sums, &holes);
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
            if let Some(p) = self.live().resync.as_mut() {
                p.done = (p.done + len).min(p.total);
            }
            let due =
                since_checkpoint >= CHECKPOINT || last_checkpoint.elapsed() >= CHECKPOINT_EVERY;
            if due && checkpoint.is_none() {
                // Covers what completed so far; what is in flight clears at the next one.
                let batch = std::mem::take(&mut copied);
                checkpoint = Some(Box::pin(self.checkpoint(session, batch, marks)));
                marks = self.track.marks();
                since_checkpoint = 0;
                last_checkpoint = Instant::now();
            }
        }
        if let Some(pending) = checkpoint {
            pending.await?;
        }
        self.checkpoint(session, copied, marks).await?;
        Ok(total)
    }

    /// Both nodes made everything copied so far durable: those bits clear, on disk too —
    /// unless something was marked since `marks` (a write the peer failed, say), in which case
    /// they stay for the next pass: a mark must never be cleared by a copy made before it.
    async fn checkpoint(
        &self,
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
        let (peer, local) =
            tokio::join!(self.call_peer(session, Message::Flush), self.store.flush());
        match peer {
            Ok(Message::Ack { error: 0 }) => {}
            other => return Err(ResyncError::Peer(format!("flush: {other:?}"))),
        }
        self.io(DiskOp::Flush, 0, local).await.map_err(ResyncError::Local)?;
        if self.track.marks() != marks {
            return Ok(());
        }
        for r in copied {
            self.track.clear(r);
        }
        self.flush_bitmap().await.map_err(ResyncError::Local)
    }

    /// The next chunk to copy at or after `offset`: the start of the next dirty run, up to a
    /// chunk's length, or the whole of a hole in the backing (up to [`HOLE_CHUNK`]).
    fn next_chunk(&self, offset: u64, busy: bool, holes: &Holes) -> Option<Chunk> {
        let run = self.track.with(|d| d.ranges_from(offset).next())?;
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

    async fn resync_chunk(
        &self,
        session: &Session,
        chunk: Chunk,
        sums: bool,
        holes: &Holes,
    ) -> Result<(Range<u64>, Sent), ResyncError> {
        let Range { start, end } = chunk.range.clone();
        let len = end - start;
        let _lock = self.locks.lock(self.store.lock_span(start, len)).await;
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
            self.send_ok(session, Message::ResyncZero { offset: start, len }).await?;
            sent.zero = len;
            self.counters.resync_zero_bytes.fetch_add(len, Ordering::Relaxed);
            return Ok((chunk.range, sent));
        }
        // `len` ≤ CHUNK, which fits u32.
        let data = self.store.read(start, len as u32).await;
        let data = self.io(DiskOp::Read, start, data).await.map_err(ResyncError::Local)?;
        if is_zero(&data) {
            // Zero ranges travel as zero requests, not data (design.md §5).
            self.send_ok(session, Message::ResyncZero { offset: start, len }).await?;
            sent.zero = len;
            self.counters.resync_zero_bytes.fetch_add(len, Ordering::Relaxed);
            return Ok((chunk.range, sent));
        }
        let differ = match sums {
            true => self.differing_blocks(session, start, &data).await?,
            false => std::iter::once(0..len).collect(),
        };
        for r in &differ {
            let bytes = Bytes::copy_from_slice(&data[r.start as usize..r.end as usize]);
            let n = bytes.len() as u64;
            self.send_ok(session, Message::ResyncData { offset: start + r.start, data: bytes })
                .await?;
            sent.data += n;
            self.counters.resync_bytes.fetch_add(n, Ordering::Relaxed);
        }
        sent.same = len - sent.data;
        self.counters.resync_same_bytes.fetch_add(sent.same, Ordering::Relaxed);
        Ok((chunk.range, sent))
    }

    /// Byte ranges (relative to `start`) of `data` whose blocks' checksums differ on the peer.
    async fn differing_blocks(
        &self,
        session: &Session,
        start: u64,
        data: &[u8],
    ) -> Result<Vec<Range<u64>>, ResyncError> {
        let len = data.len() as u64;
        let theirs = match self.call_peer(session, Message::GetSums { offset: start, len }).await {
            Ok(Message::Sums { data }) => data,
            other => return Err(ResyncError::Peer(format!("checksums: {other:?}"))),
        };
        Ok(differing(&sums(data), &theirs, len))
    }

    async fn send_ok(&self, session: &Session, msg: Message) -> Result<(), ResyncError> {
        match self.call_peer(session, msg).await {
            Ok(Message::Ack { error: 0 }) => Ok(()),
            other => Err(ResyncError::Peer(format!("{other:?}"))),
        }
    }

    /// `blockctl verify`: compares every block with the peer's by checksum while the volume is
    /// in use; a mismatch is marked out of sync, sent to the peer, and cleared once it acked.
    /// Returns (bytes compared, bytes that differed).
    pub async fn verify(&self) -> Result<(u64, u64), ResyncError> {
        let size = self.size();
        let (mut offset, mut differed) = (0, 0);
        tracing::info!(volume = %self.name(), "online verify started");
        while offset < size {
            let session = match self.route() {
                Ok(Some(s)) => s,
                _ => return Err(ResyncError::NotReady),
            };
            let len = VERIFY_CHUNK.min(size - offset);
            differed += self.verify_chunk(&session, offset, len).await?;
            offset += len;
        }
        tracing::info!(volume = %self.name(), compared = size, differed, "online verify done");
        Ok((size, differed))
    }

    async fn verify_chunk(
        &self,
        session: &Session,
        offset: u64,
        len: u64,
    ) -> Result<u64, ResyncError> {
        let _lock = self.locks.lock(self.store.lock_span(offset, len)).await;
        let data = self.store.read(offset, len as u32).await;
        let data = self.io(DiskOp::Read, offset, data).await.map_err(ResyncError::Local)?;
        let mut differed = 0;
        for r in self.differing_blocks(session, offset, &data).await? {
            let at = offset + r.start;
            tracing::warn!(volume = %self.name(), offset = at, len = r.end - r.start,
                "verify: blocks differ from the peer; repairing from this node");
            self.mark(at..offset + r.end).await.map_err(ResyncError::Local)?;
            let bytes = Bytes::copy_from_slice(&data[r.start as usize..r.end as usize]);
            differed += bytes.len() as u64;
            self.send_ok(session, Message::Write { offset: at, data: bytes }).await?;
            self.track.clear(at..offset + r.end);
        }
        if differed > 0 {
            self.counters.verify_differed.fetch_add(differed, Ordering::Relaxed);
            self.flush_bitmap().await.map_err(ResyncError::Local)?;
        }
        Ok(differed)
    }

    /// The checksums of `offset..offset+len` here, for the peer's `GetSums`.
    pub(super) async fn local_sums(&self, offset: u64, len: u64) -> Result<Bytes, VolumeError> {
        self.check_range(offset, len)?;
        if len > CHUNK {
            return Err(VolumeError::OutOfRange { offset, len, size: CHUNK });
        }
        let _lock = self.locks.lock(self.store.lock_span(offset, len)).await;
        let data = self.store.read(offset, len as u32).await;
        let data = self.io(DiskOp::Read, offset, data).await?;
        Ok(Bytes::from(sums(&data)))
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

/// SEEK_DATA / SEEK_HOLE on the backing, so that holes are sent as zero requests without being
/// read (design.md §5: initial sync skips holes). Without the file (or on a filesystem that does
/// not say), everything is data.
struct Holes(Option<std::fs::File>);

impl Holes {
    fn open(path: &std::path::Path) -> Holes {
        Holes(std::fs::File::open(path).ok())
    }

    /// The first data byte at or after `offset`; the volume's end (as `u64::MAX`) if none.
    fn next_data(&self, offset: u64) -> Option<u64> {
        self.seek(offset, libc::SEEK_DATA)
            .or_else(|e| match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(u64::MAX),
                _ => Err(e),
            })
            .ok()
    }

    /// The first hole byte at or after `offset` (every file has one at its end).
    fn next_hole(&self, offset: u64) -> Option<u64> {
        self.seek(offset, libc::SEEK_HOLE).ok()
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<u64> {
        let file = self.0.as_ref().ok_or_else(|| io::Error::from(io::ErrorKind::Unsupported))?;
        let off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
        // SAFETY: lseek takes no pointers; the fd stays open for the call (we borrow `file`).
        let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as u64)
    }
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

    #[test]
    fn holes_are_found_in_a_sparse_file() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 32 << 20).unwrap();
        f.sync_all().unwrap();
        let h = Holes::open(&path);
        let data = h.next_data(0).unwrap();
        assert!(data <= 32 << 20 && data > 0, "{data}");
        assert!(h.next_hole(32 << 20).unwrap() > 32 << 20);
        assert_eq!(h.next_data((32 << 20) + (1 << 20)), Some(u64::MAX));
        let none = Holes(None);
        assert_eq!(none.next_data(5), None);
    }
}
