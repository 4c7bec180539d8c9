//! A fault-injecting engine: wraps another engine and fails chosen ops with EIO.
//!
//! It exists for tests of everything above the engine (store, volume, NBD replies): the failed
//! op never reaches the inner engine, and its buffer comes back in the completion exactly as a
//! real engine hands back the buffer of a failed op.

use std::{
    io,
    ops::Range,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use tokio::sync::oneshot;

use super::{Completion, Engine, Op};

/// The kinds of [`Op`], to choose which ones fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    Flush,
    PunchHole,
    ZeroRange,
}

impl OpKind {
    pub fn of(op: &Op) -> OpKind {
        match op {
            Op::Read { .. } => OpKind::Read,
            Op::Write { .. } => OpKind::Write,
            Op::Flush => OpKind::Flush,
            Op::PunchHole { .. } => OpKind::PunchHole,
            Op::ZeroRange { .. } => OpKind::ZeroRange,
        }
    }
}

/// Which ops fail: those of `kind` touching `range` (any offset when `None`), with `errno`.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: OpKind,
    pub range: Option<Range<u64>>,
    /// The error reported, normally EIO; EOPNOTSUPP tests the store's fallbacks.
    pub errno: i32,
}

impl Fault {
    /// Every op of `kind` fails with EIO.
    pub fn eio(kind: OpKind) -> Fault {
        Fault { kind, range: None, errno: libc::EIO }
    }

    fn matches(&self, op: &Op) -> bool {
        if OpKind::of(op) != self.kind {
            return false;
        }
        let (Some(r), Some(span)) = (&self.range, span(op)) else {
            return true;
        };
        r.start < span.end && span.start < r.end
    }
}

fn span(op: &Op) -> Option<Range<u64>> {
    match op {
        Op::Read { offset, .. } | Op::Write { offset, .. } => {
            Some(*offset..offset.saturating_add(op.payload_len() as u64))
        }
        Op::PunchHole { offset, len } | Op::ZeroRange { offset, len } => {
            Some(*offset..offset.saturating_add(*len))
        }
        Op::Flush => None,
    }
}

/// Passes ops to `inner` unless a [`Fault`] matches, in which case the op fails with its errno.
#[derive(Debug)]
pub struct FaultEngine {
    inner: Arc<dyn Engine>,
    faults: Mutex<Vec<Fault>>,
    injected: AtomicU64,
}

impl FaultEngine {
    pub fn new(inner: Arc<dyn Engine>) -> Self {
        FaultEngine { inner, faults: Mutex::new(Vec::new()), injected: AtomicU64::new(0) }
    }

    /// From now on, ops matching `fault` fail.
    pub fn fail(&self, fault: Fault) {
        self.lock().push(fault);
    }

    /// Stops all injected failures.
    pub fn heal(&self) {
        self.lock().clear();
    }

    /// How many ops were failed so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Fault>> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Engine for FaultEngine {
    fn submit(&self, op: Op, done: oneshot::Sender<Completion>) {
        let errno = self.lock().iter().find(|f| f.matches(&op)).map(|f| f.errno);
        let Some(errno) = errno else {
            return self.inner.submit(op, done);
        };
        self.injected.fetch_add(1, Ordering::Relaxed);
        let _ = done.send(Completion {
            result: Err(io::Error::from_raw_os_error(errno)),
            buf: op.into_buf(),
        });
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }
}
