//! Lock-free latency histograms: fixed log-scale buckets of `AtomicU64`, so recording on the
//! I/O path is two relaxed atomic adds and never a lock or an allocation.
//!
//! ```text
//!  bucket   0      1      2      3           19          20
//!  le      16µs   32µs   64µs   128µs  ...   8.39s       +Inf
//!          └─ each bound doubles the previous: 16µs << i ─┘
//! ```
//!
//! A sample of `d` lands in the first bucket whose bound is `>= d` (Prometheus' `le`). The
//! buckets are stored per bucket (not cumulative) and [`HistogramSnapshot::count`] is their sum
//! at snapshot time, so a rendered histogram always has `+Inf == _count`, even while requests
//! are being recorded during the snapshot. `sum_ns` is read separately and may lag a sample
//! behind; Prometheus tolerates that, and it is exact at rest.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Upper bound of bucket 0, in nanoseconds: below a 4 KiB direct write on fast NVMe.
const FIRST_BOUND_NS: u64 = 16_000;

/// Bounded buckets; bucket `BOUNDED` is the overflow (`+Inf`). The last bound is
/// 16 µs << 19 ≈ 8.39 s: anything slower is a stall, and its exact size matters less.
pub const BOUNDED: usize = 20;

/// Upper bound of bucket `i` (`i < BOUNDED`), in nanoseconds.
pub fn bound_ns(i: usize) -> u64 {
    FIRST_BOUND_NS << i
}

/// The bucket a sample of `ns` nanoseconds belongs to: the first `i` with `ns <= bound_ns(i)`,
/// or `BOUNDED` (overflow) when it is beyond the last bound.
pub fn bucket_of(ns: u64) -> usize {
    // Units of the first bound, rounded up: bucket i covers units in (2^(i-1), 2^i].
    let units = ns.div_ceil(FIRST_BOUND_NS);
    if units <= 1 {
        return 0;
    }
    // ceil(log2(units)) for units >= 2.
    let i = (u64::BITS - (units - 1).leading_zeros()) as usize;
    i.min(BOUNDED)
}

/// One latency distribution, shared by every task that records into it.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BOUNDED + 1],
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { buckets: std::array::from_fn(|_| AtomicU64::new(0)), sum_ns: AtomicU64::new(0) }
    }
}

impl Histogram {
    /// Counts one sample. Durations beyond u64 nanoseconds (584 years) saturate.
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The distribution now: per-bucket counts, their total, and the sum.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        HistogramSnapshot {
            bounds_ns: (0..BOUNDED).map(bound_ns).collect(),
            count: counts.iter().sum(),
            counts,
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

/// A histogram as reported in status. Self-describing (`bounds_ns`), so a client of another
/// build still reads it right. JSON:
/// `{"bounds_ns":[16000,...],"counts":[3,...,0],"count":3,"sum_ns":41000}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistogramSnapshot {
    /// Upper bound (inclusive) of each bounded bucket, in nanoseconds, ascending.
    pub bounds_ns: Vec<u64>,
    /// Samples per bucket (not cumulative); one more entry than `bounds_ns`: the overflow.
    pub counts: Vec<u64>,
    /// Samples in all: the sum of `counts`.
    pub count: u64,
    /// Sum of all samples, in nanoseconds.
    pub sum_ns: u64,
}

impl HistogramSnapshot {
    /// `(upper bound in ns, cumulative count)` per bounded bucket, then `(None, count)` for
    /// `+Inf`: the shape of a Prometheus histogram.
    pub fn cumulative(&self) -> Vec<(Option<u64>, u64)> {
        let mut total = 0u64;
        let mut out: Vec<(Option<u64>, u64)> = self
            .bounds_ns
            .iter()
            .zip(&self.counts)
            .map(|(&le, &n)| {
                total = total.saturating_add(n);
                (Some(le), total)
            })
            .collect();
        out.push((None, self.count));
        out
    }
}

/// The latencies of one volume, per kind of request, as the NBD client sees them (from the
/// volume receiving the request to its completion, lock waits and the peer's ack included).
/// Only successful requests are recorded; failures show in the `errors` counter.
#[derive(Debug, Default)]
pub struct Latencies {
    pub read: Histogram,
    pub write: Histogram,
    pub write_zeroes: Histogram,
    pub trim: Histogram,
    /// FLUSH requests and the flushes FUA implies (as the `flushes` counter).
    pub flush: Histogram,
}

impl Latencies {
    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            read: self.read.snapshot(),
            write: self.write.snapshot(),
            write_zeroes: self.write_zeroes.snapshot(),
            trim: self.trim.snapshot(),
            flush: self.flush.snapshot(),
        }
    }
}

/// [`Latencies`] as reported in status; every field defaults to empty, so a status from a
/// daemon without it (or without one kind) still parses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LatencySnapshot {
    pub read: HistogramSnapshot,
    pub write: HistogramSnapshot,
    pub write_zeroes: HistogramSnapshot,
    pub trim: HistogramSnapshot,
    pub flush: HistogramSnapshot,
}

impl LatencySnapshot {
    /// `(kind label, histogram)` in a fixed order, for rendering.
    pub fn kinds(&self) -> [(&'static str, &HistogramSnapshot); 5] {
        [
            ("read", &self.read),
            ("write", &self.write),
            ("write_zeroes", &self.write_zeroes),
            ("trim", &self.trim),
            ("flush", &self.flush),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: u64 = 1_000;

    #[test]
    fn bounds_double_from_16us_to_about_8s() {
        assert_eq!(bound_ns(0), 16 * US);
        assert_eq!(bound_ns(1), 32 * US);
        assert_eq!(bound_ns(BOUNDED - 1), 8_388_608 * US);
    }

    #[test]
    fn a_sample_lands_in_the_first_bucket_whose_bound_covers_it() {
        // Edges: a bound itself belongs to its bucket (Prometheus' le is inclusive).
        let cases = [
            (0, 0),
            (1, 0),
            (16 * US, 0),
            (16 * US + 1, 1),
            (32 * US, 1),
            (32 * US + 1, 2),
            (100 * US, 3), // 64 < 100 <= 128
            (bound_ns(BOUNDED - 1), BOUNDED - 1),
            (bound_ns(BOUNDED - 1) + 1, BOUNDED),
            (u64::MAX, BOUNDED),
        ];
        for (ns, want) in cases {
            assert_eq!(bucket_of(ns), want, "{ns} ns");
        }
        for i in 1..BOUNDED {
            assert_eq!(bucket_of(bound_ns(i - 1) + 1), i, "just above bound {}", i - 1);
            assert_eq!(bucket_of(bound_ns(i)), i, "bound {i}");
        }
    }

    #[test]
    fn snapshot_counts_sums_and_accumulates() {
        let h = Histogram::default();
        for us in [10, 20, 20, 5_000, 60_000_000] {
            h.record(Duration::from_micros(us));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 5);
        assert_eq!(s.sum_ns, (10 + 20 + 20 + 5_000 + 60_000_000) * US);
        assert_eq!(s.counts.len(), BOUNDED + 1);
        assert_eq!((s.counts[0], s.counts[1], s.counts[BOUNDED]), (1, 2, 1));
        let cum = s.cumulative();
        assert_eq!(cum.len(), BOUNDED + 1);
        assert_eq!(cum[0], (Some(16 * US), 1));
        assert_eq!(cum[1], (Some(32 * US), 3));
        assert!(cum.windows(2).all(|w| w[0].1 <= w[1].1), "cumulative: {cum:?}");
        assert_eq!(cum[BOUNDED - 1].1, 4, "the 60 s sample is beyond the last bound");
        assert_eq!(cum[BOUNDED], (None, 5), "+Inf equals count");
    }

    #[test]
    fn huge_duration_saturates_instead_of_wrapping() {
        let h = Histogram::default();
        h.record(Duration::MAX);
        let s = h.snapshot();
        assert_eq!((s.count, s.sum_ns, s.counts[BOUNDED]), (1, u64::MAX, 1));
    }

    #[test]
    fn snapshot_round_trips_and_missing_kinds_default() {
        let l = Latencies::default();
        l.write.record(Duration::from_micros(40));
        let snap = l.snapshot();
        let json = serde_json::to_string(&snap).unwrap();
        assert_eq!(serde_json::from_str::<LatencySnapshot>(&json).unwrap(), snap);
        let old: LatencySnapshot = serde_json::from_str("{}").unwrap();
        assert_eq!(old, LatencySnapshot::default(), "a status without latencies parses");
    }
}
