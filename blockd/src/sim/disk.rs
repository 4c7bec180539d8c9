//! A MODEL disk with a volatile write cache, behind the real [`Engine`] trait: reads see every
//! completed write; a flush makes the completed writes durable, a write with `durable` set
//! (`RWF_DSYNC`) is durable when it completes; a power cut keeps the durable
//! image plus a seeded subset of the writes completed since the last flush (applied in their
//! order), and the disk of the dead incarnation fails every later request. Each request
//! completes after a seeded delay of 0 to 2 ms, so requests in flight complete out of order
//! and faults land while they are in flight.
//!
//! Faults ([`Fault`]): a failing disk answers every write, zeroing and trim with the error
//! (EIO or ENOSPC) and changes nothing; with EIO its reads and flushes fail too. A disk whose
//! write-back fails takes writes into its cache and reads them back, but every flush fails
//! with EIO and loses what was cached (Linux marks such pages clean). A hung disk
//! takes requests and does nothing with them until it is thawed (then runs them in order) or
//! its power goes (then they never happened).

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use super::Rng;
use crate::storage::{Completion, Engine, Op};

#[derive(Debug)]
struct State {
    /// What reads return: every completed write.
    current: Vec<u8>,
    /// What survives a power cut for sure.
    durable: Vec<u8>,
    /// Completed writes since the last flush, in completion order: (offset, bytes, durable).
    /// A durable one (`RWF_DSYNC`) survives a power cut for sure, over older cached ones.
    cached: Vec<(u64, Vec<u8>, bool)>,
    /// Powered off: this incarnation's disk is gone.
    dead: bool,
    fault: Option<Fault>,
    /// Requests a hung disk took, in order.
    hung: Vec<(Op, oneshot::Sender<Completion>)>,
    /// Completion delays.
    rng: Rng,
}

/// A fault of a model disk, set by the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Writes fail with this errno (and, for EIO, reads and flushes too).
    Errors(i32),
    /// Write-back fails: writes and reads succeed (from the cache), every flush fails with
    /// EIO and drops what the cache held (it never becomes durable).
    FlushErrors,
    /// Nothing completes until [`ModelDisk::thaw`].
    Hang,
}

/// The model disk of one node incarnation.
#[derive(Debug, Clone)]
pub struct ModelDisk(Arc<Mutex<State>>);

impl ModelDisk {
    /// A disk holding `image` durably (what a power cut left, or zeroes).
    pub fn new(image: Vec<u8>, seed: u64) -> ModelDisk {
        let state = State {
            current: image.clone(),
            durable: image,
            cached: Vec::new(),
            dead: false,
            fault: None,
            hung: Vec::new(),
            rng: Rng::new(seed),
        };
        ModelDisk(Arc::new(Mutex::new(state)))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first `block`-sized block where what reads return differs from `other`'s.
    pub fn first_difference(&self, other: &ModelDisk, block: usize) -> Option<usize> {
        let (a, b) = (self.lock(), other.lock());
        if a.current == b.current {
            return None; // one memcmp: the common case
        }
        a.current.chunks(block).zip(b.current.chunks(block)).position(|(x, y)| x != y)
    }

    /// The write id at the start of block `block` (of `size` bytes) as reads return it now.
    pub fn block_id(&self, block: u64, size: u64) -> u64 {
        let s = self.lock();
        let at = (block * size) as usize;
        let mut id = [0u8; 8];
        id.copy_from_slice(&s.current[at..at + 8]);
        u64::from_le_bytes(id)
    }

    /// The blocks (of `size` bytes) from `first` on where this disk and `other` differ now.
    pub fn differences(&self, other: &ModelDisk, size: usize, first: usize) -> Vec<u64> {
        let (a, b) = (self.lock(), other.lock());
        let (a, b) =
            (a.current[first * size..].chunks(size), b.current[first * size..].chunks(size));
        a.zip(b).enumerate().filter(|(_, (x, y))| x != y).map(|(i, _)| (first + i) as u64).collect()
    }

    /// The bytes at `offset..offset+len` as reads return them now.
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let s = self.lock();
        s.current[offset as usize..offset as usize + len].to_vec()
    }

    /// Cuts the power: returns what the disk holds afterwards (the durable image plus each
    /// cached write with probability 1/2) and fails everything this incarnation submits later.
    pub fn power_cut(&self, rng: &mut Rng) -> (Vec<u8>, usize, usize) {
        let mut s = self.lock();
        s.dead = true;
        for (op, done) in std::mem::take(&mut s.hung) {
            let result = Err(io::Error::other("simulated power cut: this disk is gone"));
            let _ = done.send(Completion { result, buf: op.into_buf() });
        }
        let mut image = s.durable.clone();
        let total = s.cached.len();
        let mut kept = 0;
        for (offset, bytes, durable) in &s.cached {
            if *durable || rng.below(2) == 0 {
                kept += 1;
                let at = *offset as usize;
                image[at..at + bytes.len()].copy_from_slice(bytes);
            }
        }
        (image, kept, total)
    }

    /// Starts `fault` (a failing disk keeps failing: the operator replaces it).
    pub fn fault(&self, fault: Fault) {
        self.lock().fault = Some(fault);
    }

    /// A hung disk resumes: what it took runs now, in order.
    pub fn thaw(&self) {
        let hung = {
            let mut s = self.lock();
            if s.fault != Some(Fault::Hang) {
                return;
            }
            s.fault = None;
            std::mem::take(&mut s.hung)
        };
        for (op, done) in hung {
            self.submit(op, done);
        }
    }

    fn apply(s: &mut State, offset: u64, bytes: Option<&[u8]>, len: usize, durable: bool) {
        let at = offset as usize;
        let end = (at + len).min(s.current.len());
        let data = match bytes {
            Some(b) => b[..end - at].to_vec(),
            None => vec![0; end - at],
        };
        s.current[at..end].copy_from_slice(&data);
        s.cached.push((offset, data, durable));
    }

    fn run(&self, op: Op) -> Completion {
        let mut s = self.lock();
        if s.dead {
            let result = Err(io::Error::other("simulated power cut: this disk is gone"));
            return Completion { result, buf: op.into_buf() };
        }
        if let Some(Fault::Errors(errno)) = s.fault {
            let fails = match op {
                Op::Read { .. } | Op::Flush => errno == libc::EIO,
                Op::Write { .. } | Op::PunchHole { .. } | Op::ZeroRange { .. } => true,
            };
            if fails {
                let result = Err(io::Error::from_raw_os_error(errno));
                return Completion { result, buf: op.into_buf() };
            }
        }
        if s.fault == Some(Fault::FlushErrors) && matches!(op, Op::Flush) {
            s.cached.clear();
            return Completion { result: Err(io::Error::from_raw_os_error(libc::EIO)), buf: None };
        }
        match op {
            Op::Read { offset, mut buf } => {
                let at = offset as usize;
                let n = buf.len().min(s.current.len().saturating_sub(at));
                buf.as_mut_slice()[..n].copy_from_slice(&s.current[at..at + n]);
                Completion { result: Ok(()), buf: Some(buf) }
            }
            Op::Write { offset, buf, durable } => {
                Self::apply(&mut s, offset, Some(buf.as_slice()), buf.len(), durable);
                Completion { result: Ok(()), buf: None }
            }
            Op::PunchHole { offset, len } | Op::ZeroRange { offset, len } => {
                Self::apply(&mut s, offset, None, len as usize, false);
                Completion { result: Ok(()), buf: None }
            }
            Op::Flush => {
                let cached = std::mem::take(&mut s.cached);
                for (offset, bytes, _) in cached {
                    let at = offset as usize;
                    s.durable[at..at + bytes.len()].copy_from_slice(&bytes);
                }
                Completion { result: Ok(()), buf: None }
            }
        }
    }
}

impl Engine for ModelDisk {
    fn submit(&self, op: Op, done: oneshot::Sender<Completion>) {
        // The request takes effect at submission (reads see it at once, as a device cache
        // does); the completion comes later.
        {
            let mut s = self.lock();
            if s.fault == Some(Fault::Hang) && !s.dead {
                s.hung.push((op, done));
                return;
            }
        }
        let completion = self.run(op);
        let delay = std::time::Duration::from_micros(self.lock().rng.below(2000));
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = done.send(completion);
        });
    }

    fn name(&self) -> &'static str {
        "sim-model"
    }
}
