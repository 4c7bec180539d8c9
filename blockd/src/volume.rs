//! The write path of one volume: where "when is a write acknowledged" is decided.
//!
//! ```text
//!  NBD request ─► bounds check ─► interval lock (aligned span, FIFO among overlaps)
//!                                   │
//!                                   ▼
//!                                Store (io_uring) ─► completion ─► counters ─► reply
//! ```
//!
//! Durability, single node: a WRITE is acknowledged once the backing store completed it (with
//! direct I/O that means it reached the device, whose volatile cache may still lose it on power
//! loss). FLUSH is acknowledged after `fdatasync` completed, which covers every write completed
//! before it, so every write already acknowledged. FUA writes, zeroes and trims are followed by
//! that same flush before their reply.
//!
//! Ordering: every write-type request holds an exclusive lock on its range, widened to the
//! backing's block size ([`Store::lock_span`]), for the whole of its execution. Overlapping
//! requests therefore execute one after the other in arrival order; this is what keeps
//! read-modify-write of partial blocks from losing a neighbour's bytes, and what mirroring will
//! rely on to apply overlaps in the same order on both nodes (DESIGN §3, step 1).

use std::{
    collections::HashMap,
    io,
    ops::Range,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use tokio::sync::Semaphore;

use crate::{
    control::{Counters, DiskState, Role, VolumeStatus},
    storage::{AlignedBuf, ReadBuf, Store},
};

/// Why a request on a volume failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The request does not fit inside the volume; nothing was touched.
    #[error("request {offset}+{len} is beyond the end of the volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The backing store failed; the disk is now `Failed`.
    #[error("I/O error on the backing store")]
    Io(#[source] io::Error),
}

impl VolumeError {
    /// True when the backing store ran out of space (ENOSPC, EDQUOT, EFBIG): NBD says ENOSPC.
    pub fn is_no_space(&self) -> bool {
        match self {
            VolumeError::Io(e) => {
                matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG))
            }
            VolumeError::OutOfRange { .. } => false,
        }
    }
}

/// Why this node does not serve the volume to NBD clients right now.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NotServing {
    #[error("volume {volume} is Secondary on node {node}; the primary is {}",
        primary.as_deref().unwrap_or("unknown"))]
    Secondary { volume: String, node: String, primary: Option<String> },
}

/// What a volume is made of, besides its store.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub name: String,
    /// This node's name, for messages.
    pub node: String,
    /// The NBD unix socket, for status.
    pub socket: PathBuf,
    /// Backing file or device, for status.
    pub backing: PathBuf,
    /// The role this node starts in.
    pub role: Role,
}

/// One mirrored volume as seen on this node.
#[derive(Debug)]
pub struct Volume {
    info: VolumeInfo,
    store: Store,
    locks: IntervalLocks,
    counters: AtomicCounters,
    clients: AtomicU32,
    failed: AtomicBool,
    role: Mutex<Role>,
}

impl Volume {
    pub fn new(info: VolumeInfo, store: Store) -> Self {
        let role = Mutex::new(info.role);
        Volume {
            info,
            store,
            locks: IntervalLocks::default(),
            counters: AtomicCounters::default(),
            clients: AtomicU32::new(0),
            failed: AtomicBool::new(false),
            role,
        }
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// Size in bytes, as exported.
    pub fn size(&self) -> u64 {
        self.store.size()
    }

    /// The backing's block size: requests aligned to it avoid read-modify-write.
    pub fn block_size(&self) -> u32 {
        self.store.block_size()
    }

    /// A buffer suitable for a write payload of `len` bytes.
    pub fn alloc(&self, len: usize) -> AlignedBuf {
        self.store.alloc(len)
    }

    /// Ok when this node may serve the volume to NBD clients.
    pub fn check_serving(&self) -> Result<(), NotServing> {
        match *self.role.lock().unwrap_or_else(|p| p.into_inner()) {
            Role::Primary => Ok(()),
            Role::Secondary => Err(NotServing::Secondary {
                volume: self.info.name.clone(),
                node: self.info.node.clone(),
                primary: None,
            }),
        }
    }

    /// Registers an NBD client, unless `max` are already connected. The count drops with the guard.
    pub fn add_client(self: &Arc<Self>, max: u32) -> Option<ClientGuard> {
        self.clients
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| ClientGuard(Arc::clone(self)))
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<ReadBuf, VolumeError> {
        self.check_range(offset, u64::from(len))?;
        let buf = self.io(self.store.read(offset, len).await)?;
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_read.fetch_add(u64::from(len), Ordering::Relaxed);
        Ok(buf)
    }

    /// Writes `data` at `offset`; with `fua`, returns only once it is on stable storage.
    pub async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), VolumeError> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        {
            let _lock = self.locks.lock(self.store.lock_span(offset, len)).await;
            self.io(self.store.write(offset, data).await)?;
        }
        if fua {
            self.flush().await?;
        }
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_written.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Makes `offset..offset+len` read as zeroes. `punch` allows deallocating (NBD without
    /// NO_HOLE); otherwise the range stays allocated.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        punch: bool,
        fua: bool,
    ) -> Result<(), VolumeError> {
        self.check_range(offset, len)?;
        {
            let _lock = self.locks.lock(self.store.lock_span(offset, len)).await;
            self.io(self.store.write_zeroes(offset, len, punch).await)?;
        }
        if fua {
            self.flush().await?;
        }
        self.counters.zeroes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Discards `offset..offset+len` (a hint: contents are undefined until rewritten).
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        self.check_range(offset, len)?;
        {
            let _lock = self.locks.lock(self.store.lock_span(offset, len)).await;
            self.io(self.store.trim(offset, len).await)?;
        }
        if fua {
            self.flush().await?;
        }
        self.counters.trims.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Returns once every write completed before the call is on stable storage.
    pub async fn flush(&self) -> Result<(), VolumeError> {
        self.io(self.store.flush().await)?;
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub fn status(&self) -> VolumeStatus {
        VolumeStatus {
            name: self.info.name.clone(),
            size: self.size(),
            role: *self.role.lock().unwrap_or_else(|p| p.into_inner()),
            disk: if self.failed.load(Ordering::Relaxed) {
                DiskState::Failed
            } else {
                DiskState::UpToDate
            },
            clients: self.clients.load(Ordering::Relaxed),
            socket: self.info.socket.display().to_string(),
            backing: self.info.backing.display().to_string(),
            engine: self.store.engine_name().to_string(),
            direct_io: self.store.is_direct(),
            counters: self.counters.snapshot(),
        }
    }

    /// Overflow-safe bounds check (NBD-NOTES §2.6): `offset + len` is never computed.
    fn check_range(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        let size = self.size();
        if offset > size || len > size - offset {
            return Err(VolumeError::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    /// Accounts a backing-store result: any error counts and marks the disk `Failed`.
    fn io<T>(&self, r: io::Result<T>) -> Result<T, VolumeError> {
        r.map_err(|e| {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            // Running out of space is the filesystem's state, not a broken disk.
            let err = VolumeError::Io(e);
            if !err.is_no_space() && !self.failed.swap(true, Ordering::Relaxed) {
                tracing::error!(volume = %self.info.name, error = %err, "disk state became Failed");
            }
            err
        })
    }
}

/// Holds one of a volume's client slots.
#[derive(Debug)]
pub struct ClientGuard(Arc<Volume>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Default)]
struct AtomicCounters {
    reads: AtomicU64,
    writes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    zeroes: AtomicU64,
    errors: AtomicU64,
}

impl AtomicCounters {
    fn snapshot(&self) -> Counters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            reads: get(&self.reads),
            writes: get(&self.writes),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            flushes: get(&self.flushes),
            trims: get(&self.trims),
            zeroes: get(&self.zeroes),
            errors: get(&self.errors),
        }
    }
}

/// Exclusive locks on byte ranges, granted in arrival order among overlapping ranges.
///
/// A request waits for every earlier request whose range overlaps its own, whether that one is
/// running or itself still waiting; non-overlapping requests never wait for each other. Each
/// holder owns a zero-permit semaphore that it closes when it lets go, which wakes its waiters
/// however late they started waiting.
#[derive(Debug, Default)]
pub struct IntervalLocks {
    inner: Mutex<LockTable>,
}

#[derive(Debug, Default)]
struct LockTable {
    next: u64,
    held: HashMap<u64, (Range<u64>, Arc<Semaphore>)>,
}

impl IntervalLocks {
    /// Waits until every earlier overlapping holder has let go, then holds `range`.
    /// Dropping the returned future while it waits gives its place up cleanly.
    pub async fn lock(&self, range: Range<u64>) -> RangeGuard<'_> {
        let (guard, earlier) = {
            let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            let earlier: Vec<Arc<Semaphore>> = t
                .held
                .values()
                .filter(|(r, _)| r.start < range.end && range.start < r.end)
                .map(|(_, s)| Arc::clone(s))
                .collect();
            let id = t.next;
            t.next += 1;
            t.held.insert(id, (range, Arc::new(Semaphore::new(0))));
            (RangeGuard { locks: self, id }, earlier)
        };
        for s in earlier {
            // Err(Closed) is the only way this returns: the earlier holder let go.
            let _ = s.acquire().await;
        }
        guard
    }
}

/// A held range; released on drop.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    locks: &'a IntervalLocks,
    id: u64,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut t = self.locks.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, s)) = t.held.remove(&self.id) {
            s.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn disjoint_ranges_do_not_wait() {
        let locks = IntervalLocks::default();
        let _a = locks.lock(0..4096).await;
        let b = tokio::time::timeout(Duration::from_secs(1), locks.lock(4096..8192)).await;
        assert!(b.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn overlapping_ranges_wait_in_arrival_order() {
        let locks = Arc::new(IntervalLocks::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = locks.lock(0..8192).await;
        let mut tasks = Vec::new();
        for (i, r) in [(1, 4096..12288), (2, 0..4096), (3, 8192..16384)] {
            let (locks, order) = (Arc::clone(&locks), Arc::clone(&order));
            tasks.push(tokio::spawn(async move {
                let _g = locks.lock(r).await;
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }));
            // Let the task register before the next one arrives.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(
            order.lock().unwrap().is_empty(),
            "each waits, directly or through 1, on the held range"
        );
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        // 2 overlaps only `first`; 1 then 3 wait for each other in arrival order.
        let got = order.lock().unwrap().clone();
        let pos = |n| got.iter().position(|&i| i == n).expect("every task ran");
        assert!(pos(1) < pos(3), "1 arrived before 3 and overlaps it: {got:?}");
        assert_eq!(got.len(), 3);
    }

    #[tokio::test]
    async fn abandoned_waiter_releases_its_place() {
        let locks = IntervalLocks::default();
        let held = locks.lock(0..10).await;
        let waiting = tokio::time::timeout(Duration::from_millis(20), locks.lock(5..15)).await;
        assert!(waiting.is_err(), "must wait while 0..10 is held");
        drop(held);
        let again = tokio::time::timeout(Duration::from_secs(1), locks.lock(0..15)).await;
        assert!(again.is_ok(), "the abandoned waiter must not block later requests");
    }
}
