//! The io_uring engine, driven from tokio without a thread hop.
//!
//! ```text
//!  submit(op) ─► lock ring ─► slot = slab index ─► SQE(user_data = slot) ─► io_uring_enter
//!                                                                              │ (no wait)
//!  reaper task: AsyncFd(ring fd) readable ─► clear_ready ─► drain CQ ─► oneshot::send
//!                                              │ short transfer / EAGAIN / EINTR
//!                                              └─► resubmit the rest of the same slot
//! ```
//!
//! Ownership of buffers: from `submit` until its completion is sent, an op (with a read's
//! [`AlignedBuf`](super::AlignedBuf), or a write's share of a [`SharedBuf`](super::SharedBuf),
//! which keeps the allocation alive and unchanged however many other shares there are) lives in
//! `Ring::slots[user_data]`. The SQE points into the buffer's heap allocation, which does not
//! move when the slot table grows. A slot is only
//! emptied when the kernel has posted the CQE of its last SQE, so the kernel never touches
//! freed memory. Dropping the engine waits (blocking) for SQEs still owned by the kernel
//! before the slots are freed; if even that fails the buffers are leaked, never freed early.
//!
//! Runtime: [`UringEngine::new`] must run inside a tokio runtime with I/O enabled (the daemon's,
//! or `#[tokio::test]`'s): the reaper task is spawned on it and lives until the engine is
//! dropped. Completions stop if that runtime shuts down first.

use std::{
    collections::VecDeque,
    fmt,
    fs::File,
    io,
    os::fd::{AsRawFd, RawFd},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use io_uring::{opcode, squeue, types, IoUring};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::{oneshot, Notify},
    task::AbortHandle,
};

use super::{backing, Completion, Engine, Op};

/// Submission queue size; the completion queue gets the kernel default of twice that.
const ENTRIES: u32 = 256;
/// Largest single read/write SQE; a longer buffer is finished by the short-transfer path.
const MAX_RW: usize = 1 << 30;
/// Pause before retrying an `io_uring_enter` that failed (EAGAIN, EBUSY, ENOMEM).
const RETRY_DELAY: Duration = Duration::from_millis(1);

/// io_uring on the backing file; see the module docs for who owns what.
pub struct UringEngine {
    shared: Arc<Shared>,
    reaper: AbortHandle,
}

struct Shared {
    ring: Mutex<Ring>,
    /// The ring's fd, registered with tokio's reactor by the reaper's `AsyncFd`.
    ring_fd: RawFd,
    /// Wakes the reaper when a submit failed transiently: it may have nothing else to wait for.
    retry: Notify,
}

/// One op owned by the engine until its completion is sent.
struct InFlight {
    op: Op,
    done: oneshot::Sender<Completion>,
    /// Bytes of a read/write already transferred (short transfers are resubmitted).
    progress: usize,
}

type Done = (oneshot::Sender<Completion>, Completion);

struct Ring {
    ring: IoUring,
    /// Slab of in-flight ops; the index is the SQE's user_data.
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Slots waiting for room in the SQ (or for `limit`), including resubmissions.
    backlog: VecDeque<usize>,
    /// SQEs pushed whose CQE has not been reaped yet.
    in_kernel: usize,
    /// Never more SQEs outstanding than the CQ holds, so completions are never dropped.
    limit: usize,
    fd: types::Fd,
    /// Keeps the backing fd open while the kernel holds SQEs that name it.
    _file: Arc<File>,
}

impl UringEngine {
    /// Sets up a ring for `file` and spawns the reaper on the current tokio runtime.
    pub fn new(file: Arc<File>) -> io::Result<Self> {
        let rt = tokio::runtime::Handle::try_current().map_err(|e| {
            io::Error::other(format!("the io_uring engine needs a tokio runtime: {e}"))
        })?;
        let ring = IoUring::new(ENTRIES)?;
        let limit = ring.params().cq_entries() as usize;
        let ring_fd = ring.as_raw_fd();
        let fd = types::Fd(file.as_raw_fd());
        let shared = Arc::new(Shared {
            ring: Mutex::new(Ring {
                ring,
                slots: Vec::new(),
                free: Vec::new(),
                backlog: VecDeque::new(),
                in_kernel: 0,
                limit,
                fd,
                _file: file,
            }),
            ring_fd,
            retry: Notify::new(),
        });
        let ring_fd = RingFd(Arc::clone(&shared));
        // SAFETY: the fd is the ring's, owned by the `IoUring` inside `Shared`; `RingFd` holds an
        // `Arc<Shared>`, so the ring (and its fd) stays open until this `AsyncFd` is dropped,
        // and `as_raw_fd` always returns that same fd.
        let afd = unsafe { AsyncFd::register_with_interest(ring_fd, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        let reaper = rt.spawn(reap(afd)).abort_handle();
        Ok(UringEngine { shared, reaper })
    }
}

impl Engine for UringEngine {
    fn submit(&self, op: Op, done: oneshot::Sender<Completion>) {
        if matches!(&op, Op::Read { .. } | Op::Write { .. } if op.payload_len() == 0) {
            let _ = done.send(Completion { result: Ok(()), buf: op.into_buf() });
            return;
        }
        let stalled = {
            let mut r = self.shared.lock();
            let idx = r.insert(InFlight { op, done, progress: 0 });
            r.backlog.push_back(idx);
            r.pump()
        };
        if stalled {
            self.shared.retry.notify_one();
        }
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // The reaper's future owns the AsyncFd and an Arc<Shared>; dropping it deregisters the
        // ring fd before the last Arc can close it. `Ring::drop` then waits for the kernel.
        self.reaper.abort();
    }
}

impl fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.shared.lock();
        f.debug_struct("UringEngine")
            .field("in_kernel", &r.in_kernel)
            .field("backlog", &r.backlog.len())
            .finish_non_exhaustive()
    }
}

/// The reaper's handle on the ring fd. Owning the `Arc` here makes `AsyncFd`'s drop deregister
/// the fd before the ring (and so the fd) can be closed.
struct RingFd(Arc<Shared>);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.ring_fd
    }
}

/// Waits for completions and hands them out, until aborted by `UringEngine::drop`.
async fn reap(afd: AsyncFd<RingFd>) {
    let shared = &afd.get_ref().0;
    let mut reported = false;
    loop {
        tokio::select! {
            ready = afd.readable() => match ready {
                // Cleared BEFORE draining: a CQE posted after the drain re-arms readiness,
                // one posted before it is drained now. Either way none is left unseen.
                Ok(mut guard) => guard.clear_ready(),
                Err(e) => {
                    if !std::mem::replace(&mut reported, true) {
                        tracing::error!(error = %e,
                            "io_uring reaper cannot poll the ring; polling by timer");
                    }
                    tokio::time::sleep(RETRY_DELAY).await;
                }
            },
            () = shared.retry.notified() => tokio::time::sleep(RETRY_DELAY).await,
        }
        let (done, stalled) = {
            let mut r = shared.lock();
            let done = r.drain();
            (done, r.pump())
        };
        if stalled {
            shared.retry.notify_one();
        }
        for (tx, completion) in done {
            // The receiver may have given up (request cancelled); the buffer is freed here.
            let _ = tx.send(completion);
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Ring {
    fn insert(&mut self, op: InFlight) -> usize {
        match self.free.pop() {
            Some(idx) => {
                self.slots[idx] = Some(op);
                idx
            }
            None => {
                self.slots.push(Some(op));
                self.slots.len() - 1
            }
        }
    }

    /// Moves backlog slots into the SQ while there is room, then enters the kernel (no wait).
    /// Returns true when something is left that only a retry will move.
    fn pump(&mut self) -> bool {
        while let Some(&idx) = self.backlog.front() {
            if self.in_kernel >= self.limit {
                // The reaper pumps again after each drain, and in_kernel > 0 means CQEs will come.
                break;
            }
            let Some(entry) = self.entry(idx) else {
                self.backlog.pop_front();
                continue;
            };
            if !self.push(&entry) {
                return true;
            }
            self.backlog.pop_front();
            self.in_kernel += 1;
        }
        self.enter().is_err()
    }

    /// Pushes one SQE, entering the kernel once to make room if the SQ is full.
    fn push(&mut self, entry: &squeue::Entry) -> bool {
        // SAFETY: the SQE's buffer pointer (if any) points into the buffer held by
        // `self.slots[user_data]` (owned, or a share that keeps it alive), which stays there, unmoved on the heap, until this SQE's CQE
        // is reaped (`drain`) or the ring is torn down after waiting for it (`Drop for Ring`).
        // The backing fd is kept open by `_file` for as long.
        if unsafe { self.ring.submission().push(entry) }.is_ok() {
            return true;
        }
        if self.enter().is_err() {
            return false;
        }
        // SAFETY: as above; same entry, same owner.
        unsafe { self.ring.submission().push(entry) }.is_ok()
    }

    /// `io_uring_enter` for whatever is queued in the SQ, retrying EINTR.
    fn enter(&mut self) -> io::Result<()> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "io_uring submit failed; retrying shortly");
                    return Err(e);
                }
            }
        }
    }

    /// The SQE for the (rest of the) op in slot `idx`.
    fn entry(&mut self, idx: usize) -> Option<squeue::Entry> {
        let fd = self.fd;
        let slot = self.slots.get_mut(idx)?.as_mut()?;
        let done = slot.progress;
        let entry = match &mut slot.op {
            Op::Read { offset, buf } => {
                let rest = &mut buf.as_mut_slice()[done..];
                let len = rest.len().min(MAX_RW) as u32;
                opcode::Read::new(fd, rest.as_mut_ptr(), len)
                    .offset(offset.saturating_add(done as u64))
                    .build()
            }
            Op::Write { offset, buf, durable } => {
                let rest = &buf.as_slice()[done..];
                let len = rest.len().min(MAX_RW) as u32;
                let flags = if *durable { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(fd, rest.as_ptr(), len)
                    .offset(offset.saturating_add(done as u64))
                    .rw_flags(flags)
                    .build()
            }
            Op::Flush => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            Op::PunchHole { offset, len } => {
                opcode::Fallocate::new(fd, *len).offset(*offset).mode(backing::PUNCH_HOLE).build()
            }
            Op::ZeroRange { offset, len } => {
                opcode::Fallocate::new(fd, *len).offset(*offset).mode(backing::ZERO_RANGE).build()
            }
        };
        Some(entry.user_data(idx as u64))
    }

    /// Reaps every CQE: finished ops are returned, unfinished ones go back to the backlog.
    fn drain(&mut self) -> Vec<Done> {
        let cqes: Vec<(u64, i32)> =
            self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        let mut done = Vec::new();
        for (user_data, res) in cqes {
            self.in_kernel = self.in_kernel.saturating_sub(1);
            if let Some(result) = self.progress(user_data as usize, res) {
                if let Some(slot) = self.take(user_data as usize) {
                    done.push((slot.done, Completion { result, buf: slot.op.into_buf() }));
                }
            }
        }
        done
    }

    /// Applies one CQE to its slot: `Some(result)` when the op is finished, `None` when the
    /// rest of it was queued again.
    fn progress(&mut self, idx: usize, res: i32) -> Option<io::Result<()>> {
        let slot = self.slots.get_mut(idx)?.as_mut()?;
        if res < 0 {
            let errno = -res;
            if errno == libc::EAGAIN || errno == libc::EINTR {
                self.backlog.push_back(idx);
                return None;
            }
            return Some(Err(io::Error::from_raw_os_error(errno)));
        }
        let (total, eof) = match &slot.op {
            Op::Read { .. } => (slot.op.payload_len(), io::ErrorKind::UnexpectedEof),
            Op::Write { .. } => (slot.op.payload_len(), io::ErrorKind::WriteZero),
            Op::Flush | Op::PunchHole { .. } | Op::ZeroRange { .. } => return Some(Ok(())),
        };
        if res == 0 {
            return Some(Err(io::Error::new(eof, "short transfer at end of the backing")));
        }
        slot.progress += res as usize;
        if slot.progress < total {
            self.backlog.push_back(idx);
            return None;
        }
        Some(Ok(()))
    }

    fn take(&mut self, idx: usize) -> Option<InFlight> {
        let slot = self.slots.get_mut(idx)?.take()?;
        self.free.push(idx);
        Some(slot)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel may still write into buffers of SQEs it holds: wait for every CQE before
        // the slots (and their buffers) are freed.
        while self.in_kernel > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, in_kernel = self.in_kernel,
                        "cannot wait for io_uring completions; leaking their buffers");
                    for slot in self.slots.drain(..).flatten() {
                        std::mem::forget(slot.op);
                    }
                    return;
                }
            }
            let reaped = self.ring.completion().count();
            self.in_kernel = self.in_kernel.saturating_sub(reaped);
        }
    }
}
