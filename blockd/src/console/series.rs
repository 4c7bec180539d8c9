//! The console's live chart: write latency and IOPS of the last 15 minutes, from the daemon's
//! own histograms (`metrics::histogram`), one point per [`STEP`] in a ring of [`POINTS`].
//!
//! ```text
//!  every STEP: Σ volumes' counters + write histogram ─ minus the previous ─► Point ─► ring
//! ```
//!
//! A point's percentiles are those of the requests completed within its step (the difference
//! of two cumulative snapshots), interpolated inside a bucket as Prometheus'
//! `histogram_quantile` does, so the console and a Grafana panel agree.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;

use crate::{control::NodeStatus, metrics::HistogramSnapshot};

/// Time between two points.
pub const STEP: Duration = Duration::from_secs(2);

/// 15 minutes of points.
pub const POINTS: usize = 450;

/// One step of the chart. JSON as in `/api/state` `series`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    /// End of the step, Unix milliseconds.
    pub t_ms: u64,
    pub write_iops: f64,
    pub read_iops: f64,
    /// Write latency percentiles within the step, microseconds (0 without writes).
    pub write_p50_us: f64,
    pub write_p99_us: f64,
}

/// The totals a point is the difference of.
#[derive(Debug, Clone, Default)]
struct Totals {
    t_ms: u64,
    reads: u64,
    writes: u64,
    hist: HistogramSnapshot,
}

impl Totals {
    fn of(status: &NodeStatus, t_ms: u64) -> Totals {
        let mut t = Totals { t_ms, ..Totals::default() };
        for v in &status.volumes {
            t.reads += v.counters.reads;
            t.writes += v.counters.writes;
            let h = &v.latency.write;
            if t.hist.counts.len() < h.counts.len() {
                t.hist.counts.resize(h.counts.len(), 0);
                t.hist.bounds_ns.clone_from(&h.bounds_ns);
            }
            for (sum, n) in t.hist.counts.iter_mut().zip(&h.counts) {
                *sum += n;
            }
            t.hist.count += h.count;
        }
        t
    }
}

/// The ring and the totals of the last sample.
#[derive(Debug, Default)]
pub struct Series {
    points: VecDeque<Point>,
    last: Option<Totals>,
}

impl Series {
    /// Adds the point from the previous sample to `status` (taken at `t_ms`).
    pub fn sample(&mut self, status: &NodeStatus, t_ms: u64) {
        let now = Totals::of(status, t_ms);
        if let Some(last) = self.last.take() {
            if let Some(p) = point(&last, &now) {
                if self.points.len() == POINTS {
                    self.points.pop_front();
                }
                self.points.push_back(p);
            }
        }
        self.last = Some(now);
    }

    pub fn points(&self) -> Vec<Point> {
        self.points.iter().cloned().collect()
    }
}

/// The step from `a` to `b`; none when time did not advance. Counters that went backwards (a
/// restarted daemon cannot, but a volume set that changed could) count as 0.
fn point(a: &Totals, b: &Totals) -> Option<Point> {
    let dt = b.t_ms.checked_sub(a.t_ms).filter(|d| *d > 0)? as f64 / 1000.0;
    let delta: Vec<u64> = b
        .hist
        .counts
        .iter()
        .enumerate()
        .map(|(i, n)| n.saturating_sub(a.hist.counts.get(i).copied().unwrap_or(0)))
        .collect();
    let bounds = &b.hist.bounds_ns;
    Some(Point {
        t_ms: b.t_ms,
        write_iops: b.writes.saturating_sub(a.writes) as f64 / dt,
        read_iops: b.reads.saturating_sub(a.reads) as f64 / dt,
        write_p50_us: quantile(bounds, &delta, 0.5) / 1000.0,
        write_p99_us: quantile(bounds, &delta, 0.99) / 1000.0,
    })
}

/// The `q` quantile in nanoseconds of per-bucket `counts` (one more than `bounds`: the
/// overflow), linear within the bucket it falls in; the overflow reports the last bound.
pub fn quantile(bounds: &[u64], counts: &[u64], q: f64) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let rank = q * total as f64;
    let mut seen = 0u64;
    for (i, &n) in counts.iter().enumerate() {
        if n > 0 && (seen + n) as f64 >= rank {
            let Some(&upper) = bounds.get(i) else {
                return bounds.last().copied().unwrap_or(0) as f64;
            };
            let lower = if i == 0 { 0 } else { bounds[i - 1] };
            let within = (rank - seen as f64) / n as f64;
            return lower as f64 + (upper - lower) as f64 * within;
        }
        seen += n;
    }
    bounds.last().copied().unwrap_or(0) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_interpolates_like_prometheus() {
        let bounds = [16_000, 32_000, 64_000];
        // 10 samples in (16, 32] µs: the median is half-way.
        assert_eq!(quantile(&bounds, &[0, 10, 0, 0], 0.5), 24_000.0);
        assert_eq!(quantile(&bounds, &[10, 0, 0, 0], 1.0), 16_000.0);
        assert_eq!(quantile(&bounds, &[0, 0, 0, 5], 0.5), 64_000.0, "overflow: last bound");
        assert_eq!(quantile(&bounds, &[0, 0, 0, 0], 0.5), 0.0);
    }

    #[test]
    fn points_are_differences_per_second_and_the_ring_is_bounded() {
        let mut s = Series::default();
        let mut status = NodeStatus { node: "a".into(), version: "0".into(), volumes: vec![] };
        s.sample(&status, 0);
        assert!(s.points().is_empty(), "one sample is no step yet");
        for i in 1..=(POINTS as u64 + 10) {
            status = NodeStatus { volumes: vec![], ..status };
            s.sample(&status, i * 2000);
        }
        assert_eq!(s.points().len(), POINTS);
        let a = Totals { t_ms: 0, writes: 100, ..Totals::default() };
        let b = Totals { t_ms: 2000, writes: 300, reads: 50, ..Totals::default() };
        let p = point(&a, &b).unwrap();
        assert_eq!((p.write_iops, p.read_iops), (100.0, 25.0));
        assert!(point(&b, &b).is_none());
    }
}
