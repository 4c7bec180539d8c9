//! [`Store`]: any byte range over an engine that only takes block-aligned ops.
//!
//! ```text
//!  write(offset, data)      aligned? ──yes──► Write(data)                     (zero copy)
//!                             │no
//!                             ▼
//!        head block: Read ─► patch ─► Write ┐
//!        aligned middle: copy ─► Write      ├─ concurrently
//!        tail block: Read ─► patch ─► Write ┘
//!
//!  write_zeroes: edges (partial allocation units) written as zeroes as above,
//!                middle PunchHole | ZeroRange, else zero buffers in 1 MiB chunks
//!  trim:         PunchHole of the whole allocation units inside the range, nothing else
//! ```
//!
//! Memory: a request never makes the store allocate more than its own length plus two blocks
//! (a read widens to whole blocks; an unaligned write copies its aligned middle and patches at
//! most two edge blocks; zeroing reuses one chunk of at most 1 MiB, whatever the length).

use std::{
    fs::File,
    future::Future,
    io,
    ops::Range,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use super::{
    backing, sync::SyncEngine, uring::UringEngine, AlignedBuf, Allocate, Completion, DirectIo,
    Engine, EngineKind, Op, SharedBuf, StorageError,
};

/// Largest zero buffer written when the backing cannot zero a range itself.
const ZERO_CHUNK: u64 = 1 << 20;

/// How to open a backing store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// File or block device. A missing regular file is created sparse at `size` (mode 0600);
    /// its parent directory must exist.
    pub path: PathBuf,
    /// Volume size in bytes. A file must have exactly this size (or be created); a device at least.
    pub size: u64,
    pub engine: EngineKind,
    pub direct: DirectIo,
    /// How a missing regular file is created.
    pub allocate: Allocate,
}

#[cfg(test)]
impl StoreOptions {
    /// The unit tests' store: a sparse file (created at `size`), the sync engine, buffered I/O.
    pub(crate) fn sparse_sync(path: PathBuf, size: u64) -> StoreOptions {
        StoreOptions {
            path,
            size,
            engine: EngineKind::Sync,
            direct: DirectIo::Off,
            allocate: Allocate::Sparse,
        }
    }
}

/// The bytes of a read: `len` bytes starting `start` into an aligned buffer.
#[derive(Debug)]
pub struct ReadBuf {
    pub buf: AlignedBuf,
    pub start: usize,
    pub len: usize,
}
impl std::ops::Deref for ReadBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf.as_slice()[self.start..self.start + self.len]
    }
}

/// An open backing store: its geometry and the engine doing its I/O.
#[derive(Debug)]
pub struct Store {
    engine: Arc<dyn Engine>,
    path: PathBuf,
    size: u64,
    /// Every engine op is aligned to this (1 when buffered).
    block: u32,
    /// Punch / zero-range ops are aligned to this; a multiple of `block`.
    unit: u32,
    direct: bool,
    /// The zero-write fallback is logged once per store, not once per request.
    zero_fallback_logged: AtomicBool,
    /// `open` created the backing file (sparse, all zeroes).
    created: bool,
    /// `RWF_DSYNC` is trusted on this backing; otherwise a FUA write is followed by a flush.
    dsync: bool,
}

/// What to put into a byte range: the caller's bytes, or `n` zeroes.
#[derive(Debug, Clone, Copy)]
enum Fill<'a> {
    Bytes(&'a [u8]),
    Zero(usize),
}

impl<'a> Fill<'a> {
    fn len(self) -> usize {
        match self {
            Fill::Bytes(b) => b.len(),
            Fill::Zero(n) => n,
        }
    }

    fn slice(self, r: Range<usize>) -> Fill<'a> {
        match self {
            Fill::Bytes(b) => Fill::Bytes(&b[r]),
            Fill::Zero(_) => Fill::Zero(r.len()),
        }
    }

    fn copy_to(self, dst: &mut [u8]) {
        match self {
            Fill::Bytes(b) => dst.copy_from_slice(b),
            Fill::Zero(_) => dst.fill(0),
        }
    }
}

impl Store {
    /// Opens `opts.path` (see [`StoreOptions`]) and starts its engine.
    ///
    /// Must be called inside a tokio runtime when the engine may be io_uring (`Auto` or
    /// `IoUring`): the io_uring reaper task is spawned on the current runtime and the store
    /// must not outlive it. Without a runtime, `Auto` falls back to the sync engine.
    pub fn open(opts: &StoreOptions) -> Result<Store, StorageError> {
        let b = backing::open(opts)?;
        let engine = start_engine(opts, Arc::new(b.file))?;
        tracing::debug!(path = %opts.path.display(), engine = engine.name(), direct = b.direct,
            block = b.block, unit = b.unit, dsync = b.dsync, "backing store open");
        Ok(Store {
            engine,
            path: opts.path.clone(),
            size: b.size,
            block: b.block,
            unit: b.unit,
            direct: b.direct,
            zero_fallback_logged: AtomicBool::new(false),
            created: b.created,
            dsync: b.dsync,
        })
    }

    /// Replaces the engine with `wrap(engine)`, e.g. a [`FaultEngine`](super::fault::FaultEngine).
    pub fn map_engine(self, wrap: impl FnOnce(Arc<dyn Engine>) -> Arc<dyn Engine>) -> Store {
        Store { engine: wrap(self.engine), ..self }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Offsets and lengths aligned to this need no read-modify-write (1 when buffered).
    pub fn block_size(&self) -> u32 {
        self.block
    }

    /// The granularity of holes: trims cover only whole units, zeroing punches only whole units.
    pub fn alloc_unit(&self) -> u32 {
        self.unit
    }

    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// True when [`Store::open`] created the backing file (sparse, so all zeroes): its data
    /// is then of the generation `meta::ZEROES`, the same on every node that created it.
    pub fn created(&self) -> bool {
        self.created
    }

    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    /// The range a write-type request on `offset..offset+len` may touch: widened to whole
    /// blocks. Callers of [`write`](Self::write), [`write_zeroes`](Self::write_zeroes) and
    /// [`trim`](Self::trim) hold an exclusive lock on it.
    pub fn lock_span(&self, offset: u64, len: u64) -> Range<u64> {
        let b = u64::from(self.block);
        let end = offset.saturating_add(len);
        round_down(offset, b)..end.checked_next_multiple_of(b).unwrap_or(u64::MAX)
    }

    /// Reads `len` bytes at `offset` (widened to whole blocks underneath).
    pub async fn read(&self, offset: u64, len: u32) -> io::Result<ReadBuf> {
        let n = u64::from(len);
        self.check(offset, n)?;
        if len == 0 {
            return Ok(ReadBuf { buf: AlignedBuf::zeroed(0), start: 0, len: 0 });
        }
        let b = u64::from(self.block);
        let start = round_down(offset, b);
        let end = round_up(offset + n, b);
        let buf = self.read_aligned(start, (end - start) as usize).await?;
        Ok(ReadBuf { buf, start: (offset - start) as usize, len: len as usize })
    }

    /// Writes `data` at `offset`. Aligned writes go to the engine as they are (zero copy).
    ///
    /// Contract: the caller holds an exclusive lock on [`lock_span`](Self::lock_span) for the
    /// whole call. Partial edge blocks are read, patched and written back; a concurrent writer
    /// of the same blocks would otherwise lose its bytes to the stale copy.
    pub async fn write(&self, offset: u64, data: impl Into<SharedBuf>) -> io::Result<()> {
        self.write_with(offset, data, false).await
    }

    /// [`write`](Self::write); with `durable` (NBD's FUA) it completes only once `data` is on
    /// stable storage: `RWF_DSYNC` on each piece, or the write then a flush on a backing where
    /// that flag cannot be trusted (FUSE). Same contract as `write`.
    pub async fn write_with(
        &self,
        offset: u64,
        data: impl Into<SharedBuf>,
        durable: bool,
    ) -> io::Result<()> {
        let data = data.into();
        if durable && !self.dsync {
            self.write_pieces(offset, data, false).await?;
            return self.flush().await;
        }
        self.write_pieces(offset, data, durable).await
    }

    async fn write_pieces(&self, offset: u64, data: SharedBuf, durable: bool) -> io::Result<()> {
        let len = data.len() as u64;
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.aligned(offset, len) {
            return self.write_aligned(offset, data, durable).await;
        }
        self.patch(offset, Fill::Bytes(data.as_slice()), durable).await
    }

    /// Makes `offset..offset+len` read as zeroes. Whole allocation units inside the range are
    /// punched (`punch`, deallocating) or zeroed in place (`!punch`, staying allocated); the
    /// edges are written as zeroes. Where the backing cannot do either (EOPNOTSUPP/EINVAL),
    /// zero buffers are written in chunks of at most 1 MiB.
    ///
    /// Contract: as for [`write`](Self::write), the caller holds [`lock_span`](Self::lock_span).
    pub async fn write_zeroes(&self, offset: u64, len: u64, punch: bool) -> io::Result<()> {
        self.check(offset, len)?;
        let u = u64::from(self.unit);
        let end = offset + len;
        let a = round_up(offset, u).min(end);
        let e = round_down(end, u).max(a);
        tokio::try_join!(
            maybe(offset < a, self.zero_bytes(offset, a - offset)),
            maybe(a < e, self.zero_units(a, e - a, punch)),
            maybe(e < end, self.zero_bytes(e, end - e)),
        )
        .map(|_| ())
    }

    /// Discards the whole allocation units inside `offset..offset+len`; partial units are left
    /// alone. Afterwards those units read as zeroes: a backing that cannot punch them
    /// (EOPNOTSUPP/EINVAL) gets them zeroed instead, as the peer's punched copy reads zeroes
    /// and the replicas must not differ unrecorded (and a loop device sends its WRITE_ZEROES
    /// through nbdfuse as a trim: ext4 relies on those zeroes).
    ///
    /// Contract: as for [`write`](Self::write), the caller holds [`lock_span`](Self::lock_span).
    pub async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        let u = u64::from(self.unit);
        let (a, e) = (round_up(offset, u), round_down(offset + len, u));
        if a >= e {
            return Ok(());
        }
        self.zero_units(a, e - a, true).await
    }

    /// Returns once every write completed before the call is on stable storage (`fdatasync`).
    pub async fn flush(&self) -> io::Result<()> {
        self.run(Op::Flush).await.result
    }

    async fn run(&self, op: Op) -> Completion {
        self.engine.run(op).await
    }

    async fn read_aligned(&self, offset: u64, len: usize) -> io::Result<AlignedBuf> {
        let c = self.run(Op::Read { offset, buf: AlignedBuf::zeroed(len) }).await;
        c.result?;
        c.buf.ok_or_else(|| io::Error::other("storage engine lost a read buffer"))
    }

    async fn write_aligned(
        &self,
        offset: u64,
        buf: impl Into<SharedBuf>,
        durable: bool,
    ) -> io::Result<()> {
        self.run(Op::Write { offset, buf: buf.into(), durable }).await.result
    }

    /// Unaligned write of `fill` at `offset`: patched edge blocks and a copied aligned middle,
    /// each piece `durable` or not.
    async fn patch(&self, offset: u64, fill: Fill<'_>, durable: bool) -> io::Result<()> {
        let b = u64::from(self.block);
        let len = fill.len() as u64;
        let end = offset + len;
        let first = round_down(offset, b);
        if first == round_down(end - 1, b) {
            return self.patch_block(first, (offset - first) as usize, fill, durable).await;
        }
        let (inner_start, inner_end) = (round_up(offset, b), round_down(end, b));
        let (head_len, mid_end) = ((inner_start - offset) as usize, (inner_end - offset) as usize);
        let head =
            self.patch_block(first, (offset - first) as usize, fill.slice(0..head_len), durable);
        let tail = self.patch_block(inner_end, 0, fill.slice(mid_end..len as usize), durable);
        let middle = async {
            if inner_start >= inner_end {
                return Ok(());
            }
            let mut buf = AlignedBuf::zeroed(mid_end - head_len);
            fill.slice(head_len..mid_end).copy_to(buf.as_mut_slice());
            self.write_aligned(inner_start, buf, durable).await
        };
        tokio::try_join!(maybe(head_len > 0, head), middle, maybe(inner_end < end, tail))
            .map(|_| ())
    }

    /// Read-modify-write of the block at `block_off`: `fill` lands `at` bytes into it.
    async fn patch_block(
        &self,
        block_off: u64,
        at: usize,
        fill: Fill<'_>,
        durable: bool,
    ) -> io::Result<()> {
        let mut buf = self.read_aligned(block_off, self.block as usize).await?;
        fill.copy_to(&mut buf.as_mut_slice()[at..at + fill.len()]);
        self.write_aligned(block_off, buf, durable).await
    }

    /// Writes `len` (< one allocation unit, so small) zeroes at `offset`.
    async fn zero_bytes(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.aligned(offset, len) {
            return self.write_aligned(offset, AlignedBuf::zeroed(len as usize), false).await;
        }
        self.patch(offset, Fill::Zero(len as usize), false).await
    }

    /// Zeroes whole allocation units, by fallocate when the backing can.
    async fn zero_units(&self, offset: u64, len: u64, punch: bool) -> io::Result<()> {
        let op = if punch { Op::PunchHole { offset, len } } else { Op::ZeroRange { offset, len } };
        match self.run(op).await.result {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                if !self.zero_fallback_logged.swap(true, Ordering::Relaxed) {
                    tracing::info!(path = %self.path.display(), error = %e, punch,
                        "backing cannot zero ranges; writing zero buffers instead");
                }
                self.write_zero_chunks(offset, len).await
            }
            r => r,
        }
    }

    /// Writes zeroes over `offset..offset+len` (unit-aligned) reusing one buffer of ≤ 1 MiB.
    async fn write_zero_chunks(&self, offset: u64, len: u64) -> io::Result<()> {
        let chunk = ZERO_CHUNK.max(u64::from(self.unit));
        let mut zeroes: Option<SharedBuf> = None;
        let (mut pos, end) = (offset, offset + len);
        while pos < end {
            let n = (end - pos).min(chunk) as usize;
            // A write only reads its buffer: one of zeroes serves every chunk of its size.
            let buf = match zeroes.take() {
                Some(b) if b.len() == n => b,
                _ => SharedBuf::from(AlignedBuf::zeroed(n)),
            };
            zeroes = Some(buf.clone());
            self.write_aligned(pos, buf, false).await?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Overflow-safe bounds check; the volume checks first, this keeps the store panic-free.
    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset > self.size || len > self.size - offset {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("range {offset}+{len} is beyond the end of {} bytes", self.size),
            ));
        }
        Ok(())
    }

    fn aligned(&self, offset: u64, len: u64) -> bool {
        let b = u64::from(self.block);
        offset % b == 0 && len % b == 0
    }
}

fn start_engine(opts: &StoreOptions, file: Arc<File>) -> Result<Arc<dyn Engine>, StorageError> {
    let sync = |file| -> Result<Arc<dyn Engine>, StorageError> {
        let engine = SyncEngine::new(file, super::sync::DEFAULT_THREADS);
        Ok(Arc::new(engine.map_err(StorageError::Threads)?))
    };
    match opts.engine {
        EngineKind::Sync => sync(file),
        EngineKind::IoUring => Ok(Arc::new(UringEngine::new(file).map_err(StorageError::Uring)?)),
        EngineKind::Auto => match UringEngine::new(Arc::clone(&file)) {
            Ok(engine) => Ok(Arc::new(engine)),
            Err(e) => {
                tracing::warn!(path = %opts.path.display(), error = %e,
                    "io_uring unavailable, using the sync engine");
                sync(file)
            }
        },
    }
}

/// Awaits `f` only when `cond`: the optional pieces of a split request (futures are lazy, so
/// an unused piece costs nothing).
async fn maybe(cond: bool, f: impl Future<Output = io::Result<()>>) -> io::Result<()> {
    if cond {
        f.await
    } else {
        Ok(())
    }
}

fn round_down(x: u64, b: u64) -> u64 {
    x - x % b
}

/// Only called on in-range offsets (≤ size, which is block-aligned when direct), so the
/// saturation never triggers in practice; it keeps a bad caller from panicking.
fn round_up(x: u64, b: u64) -> u64 {
    x.checked_next_multiple_of(b).unwrap_or(u64::MAX - u64::MAX % b)
}
