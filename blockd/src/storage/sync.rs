//! The blocking-thread engine: for tests, for kernels without io_uring, and as the reference the
//! io_uring engine is compared against.
//!
//! ```text
//!  submit ──► mpsc channel ──► N worker threads: pread/pwrite/fdatasync/fallocate ──► oneshot
//! ```
//!
//! Ownership: a submitted op (and its buffer) sits in the channel, then belongs to the one
//! worker that took it, which sends it back in the op's completion.

use std::{
    fs::File,
    io,
    os::unix::fs::FileExt,
    sync::{mpsc, Arc, Mutex},
    thread::JoinHandle,
};

use tokio::sync::oneshot;

use super::{backing, Completion, Engine, Op};

/// Default number of worker threads: enough to overlap a few I/Os on a small machine without
/// turning the engine into a thread-per-request pool.
pub const DEFAULT_THREADS: usize = 4;

type Job = (Op, oneshot::Sender<Completion>);

/// A fixed pool of threads doing plain blocking syscalls on the backing file.
#[derive(Debug)]
pub struct SyncEngine {
    /// `None` only while dropping: closing the channel is what tells the workers to exit.
    tx: Option<mpsc::Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl SyncEngine {
    /// Starts `threads` workers (at least one) on `file`.
    pub fn new(file: Arc<File>, threads: usize) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let (rx, file) = (Arc::clone(&rx), Arc::clone(&file));
            // On failure the workers already started see the channel close and exit.
            let spawned = std::thread::Builder::new()
                .name(format!("blockd-io-{i}"))
                .spawn(move || worker(&rx, &file))?;
            workers.push(spawned);
        }
        Ok(SyncEngine { tx: Some(tx), workers })
    }
}

impl Engine for SyncEngine {
    fn submit(&self, op: Op, done: oneshot::Sender<Completion>) {
        let Some(tx) = &self.tx else { return };
        if let Err(mpsc::SendError((op, done))) = tx.send((op, done)) {
            // Every worker is gone (they only exit on drop, or if one panicked): fail the op
            // and hand its buffer back rather than dropping it silently.
            let _ = done.send(Completion {
                result: Err(io::Error::other("sync storage engine stopped")),
                buf: op.into_buf(),
            });
        }
    }

    fn name(&self) -> &'static str {
        "sync"
    }
}

impl Drop for SyncEngine {
    fn drop(&mut self) {
        drop(self.tx.take());
        for w in self.workers.drain(..) {
            // A worker finishes its current syscall, then sees the closed channel.
            let _ = w.join();
        }
    }
}

fn worker(rx: &Mutex<mpsc::Receiver<Job>>, file: &File) {
    loop {
        // The lock is held only while waiting for the next job, never during the I/O.
        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok((op, done)) = job else { return };
        let _ = done.send(execute(file, op));
    }
}

/// Runs one op to the end: std's `*_exact_at`/`*_all_at` loop over short transfers and EINTR.
pub(super) fn execute(file: &File, op: Op) -> Completion {
    match op {
        Op::Read { offset, mut buf } => {
            let result = file.read_exact_at(buf.as_mut_slice(), offset);
            Completion { result, buf: Some(buf) }
        }
        Op::Write { offset, buf, durable } => {
            // Durable: the written range then `fdatasync`, which covers it (and more).
            let result = file.write_all_at(buf.as_slice(), offset);
            let result = result.and_then(|()| if durable { file.sync_data() } else { Ok(()) });
            drop(buf);
            Completion { result, buf: None }
        }
        Op::Flush => Completion { result: file.sync_data(), buf: None },
        Op::PunchHole { offset, len } => Completion {
            result: backing::fallocate(file, backing::PUNCH_HOLE, offset, len),
            buf: None,
        },
        Op::ZeroRange { offset, len } => Completion {
            result: backing::fallocate(file, backing::ZERO_RANGE, offset, len),
            buf: None,
        },
    }
}
