//! A volume's counters: atomics the data path bumps, snapshot for status and metrics.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::{control::Counters, metrics::Latencies};

/// One per volume; each field's meaning is that of [`Counters`]' field of the same name.
#[derive(Debug, Default)]
pub(super) struct AtomicCounters {
    pub(super) reads: AtomicU64,
    pub(super) writes: AtomicU64,
    pub(super) bytes_read: AtomicU64,
    pub(super) bytes_written: AtomicU64,
    pub(super) flushes: AtomicU64,
    pub(super) trims: AtomicU64,
    pub(super) zeroes: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) peer_writes: AtomicU64,
    pub(super) peer_bytes: AtomicU64,
    pub(super) degraded_writes: AtomicU64,
    pub(super) resync_bytes: AtomicU64,
    pub(super) resync_zero_bytes: AtomicU64,
    pub(super) resync_same_bytes: AtomicU64,
    pub(super) verify_differed: AtomicU64,
    pub(super) connects: AtomicU64,
    pub(super) link_refused: AtomicU64,
    /// Per-kind latency histograms of successful requests (metrics/histogram.rs).
    pub(super) latency: Latencies,
}

impl AtomicCounters {
    /// The counters now; `meta_writes` is kept by the dirty tracking, not here.
    pub(super) fn snapshot(&self, meta_writes: u64) -> Counters {
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
            peer_writes: get(&self.peer_writes),
            peer_bytes: get(&self.peer_bytes),
            degraded_writes: get(&self.degraded_writes),
            resync_bytes: get(&self.resync_bytes),
            resync_zero_bytes: get(&self.resync_zero_bytes),
            resync_same_bytes: get(&self.resync_same_bytes),
            verify_differed: get(&self.verify_differed),
            connects: get(&self.connects),
            link_refused: get(&self.link_refused),
            meta_writes,
        }
    }
}
