//! Exclusive byte-range locks, granted in arrival order among overlapping ranges.

use std::{
    collections::HashMap,
    ops::Range,
    sync::{Arc, Mutex},
};

use tokio::sync::Semaphore;

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
