//! Wide writes' bits ([`super::track`]): a write over more than a quarter of the activity log
//! marks its range in the bitmap instead of the log, and once a flush on both nodes covers it
//! the bits are taken back. Which bits: the range widened to whole granules (a bit stands for
//! a granule), less an edge granule that was dirty already for another reason (only partly
//! overwritten, the rest of it may still differ). Narrowing to whole granules instead left the
//! partial edge granules of every unaligned wide write marked for good: out of sync while
//! Connected, with no resync coming (ext4 with 1 KiB blocks on a small log showed it).
//!
//! A bit is never taken back while another wide write still needs it (in flight, or done but
//! not yet covered), nor after a mark set it since (a mark cuts its granules out of every wide
//! write's claim).

use std::ops::Range;

/// A wide write's claim: the granule-aligned ranges whose bits it may take back.
type Claim = Vec<Range<u64>>;

#[derive(Debug, Default)]
pub(super) struct WideWrites {
    /// Admitted, not yet done: (byte range, claim).
    flying: Vec<(Range<u64>, Claim)>,
    /// Done on both nodes, by the flush epoch they completed in.
    done: Vec<(u64, Claim)>,
}

/// `r` widened outward to whole granules of `g` bytes.
fn widen(r: &Range<u64>, g: u64) -> Range<u64> {
    r.start / g * g..r.end.div_ceil(g) * g
}

/// Removes `cut` from every range of `claim`.
fn subtract(claim: &mut Claim, cut: &Range<u64>) {
    let mut out = Vec::with_capacity(claim.len() + 1);
    for r in claim.drain(..) {
        if cut.end <= r.start || r.end <= cut.start {
            out.push(r);
            continue;
        }
        if r.start < cut.start {
            out.push(r.start..cut.start);
        }
        if cut.end < r.end {
            out.push(cut.end..r.end);
        }
    }
    *claim = out;
}

impl WideWrites {
    fn claims(&self) -> impl Iterator<Item = &Range<u64>> {
        let flying = self.flying.iter().flat_map(|(_, c)| c);
        flying.chain(self.done.iter().flat_map(|(_, c)| c))
    }

    /// Another wide write claims (part of) granule range `gr`.
    fn claimed(&self, gr: &Range<u64>) -> bool {
        self.claims().any(|c| c.start < gr.end && gr.start < c.end)
    }

    /// A wide write of `range` is admitted, before its bits are set; `dirty(gr)` says whether
    /// any bit of granule range `gr` is set now.
    pub fn admit(&mut self, range: Range<u64>, g: u64, dirty: impl Fn(Range<u64>) -> bool) {
        let mut w = widen(&range, g);
        let shared = |gr: Range<u64>| dirty(gr.clone()) && !self.claimed(&gr);
        if range.start % g != 0 && shared(w.start..w.start + g) {
            w.start += g;
        }
        if range.end % g != 0 && w.end >= w.start + g && shared(w.end - g..w.end) {
            w.end -= g;
        }
        let claim = if w.start < w.end { vec![w] } else { Vec::new() };
        self.flying.push((range, claim));
    }

    /// The wide write of `range` reached both nodes in flush epoch `epoch`.
    pub fn done(&mut self, range: &Range<u64>, epoch: u64) {
        if let Some(i) = self.flying.iter().position(|(r, _)| r == range) {
            let (_, claim) = self.flying.swap_remove(i);
            self.done.push((epoch, claim));
        }
    }

    /// The wide write of `range` ended without [`done`](Self::done) (an error, the peer gone):
    /// it claims nothing any more, its bits stay.
    pub fn release(&mut self, range: &Range<u64>) {
        if let Some(i) = self.flying.iter().position(|(r, _)| r == range) {
            self.flying.swap_remove(i);
        }
    }

    /// `range` was marked out of sync: no wide write may take its granules' bits back.
    pub fn marked(&mut self, range: &Range<u64>, g: u64) {
        let cut = widen(range, g);
        let flying = self.flying.iter_mut().map(|(_, c)| c);
        for claim in flying.chain(self.done.iter_mut().map(|(_, c)| c)) {
            subtract(claim, &cut);
        }
    }

    /// A flush of `epoch` completed on both nodes: the ranges whose bits go now (claims of the
    /// writes done before it, less what writes still in flight or not covered claim).
    pub fn covered(&mut self, epoch: u64) -> Vec<Range<u64>> {
        let (due, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.done).into_iter().partition(|(e, _)| *e < epoch);
        self.done = later;
        let mut clear: Claim = due.into_iter().flat_map(|(_, c)| c).collect();
        let still: Vec<Range<u64>> = self.claims().cloned().collect();
        for cut in &still {
            subtract(&mut clear, cut);
        }
        clear
    }

    /// The link is gone: writes done but not covered keep their bits (the resync needs them).
    pub fn link_lost(&mut self) {
        self.done.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 4096;

    #[test]
    fn unaligned_edges_are_claimed_unless_dirty_for_another_reason() {
        let mut w = WideWrites::default();
        w.admit(1024..3 * G + 1024, G, |_| false);
        w.done(&(1024..3 * G + 1024), 1);
        assert_eq!(w.covered(2), vec![0..4 * G], "both partial edge granules go too");

        let mut w = WideWrites::default();
        // The first granule was marked before: only partly overwritten, it stays.
        w.admit(1024..3 * G + 1024, G, |gr| gr.start == 0);
        w.done(&(1024..3 * G + 1024), 1);
        assert_eq!(w.covered(2), vec![G..4 * G]);
    }

    #[test]
    fn a_flush_that_started_before_the_write_completed_does_not_cover_it() {
        let mut w = WideWrites::default();
        w.admit(0..4 * G, G, |_| false);
        w.done(&(0..4 * G), 3);
        assert!(w.covered(3).is_empty());
        assert_eq!(w.covered(4), vec![0..4 * G]);
    }

    #[test]
    fn bits_another_wide_write_needs_stay_until_it_is_covered() {
        let mut w = WideWrites::default();
        w.admit(0..4 * G, G, |_| false);
        w.done(&(0..4 * G), 1);
        // Overlapping, in flight when the first is covered; its edge granule was dirty (set
        // by the first write) but is claimed by it, so the second claims it as well.
        w.admit(3 * G + 512..6 * G, G, |gr| gr.start < 4 * G);
        assert_eq!(w.covered(2), vec![0..3 * G]);
        w.done(&(3 * G + 512..6 * G), 2);
        assert_eq!(w.covered(3), vec![3 * G..6 * G]);
    }

    #[test]
    fn a_mark_keeps_its_granules_and_a_released_write_claims_nothing() {
        let mut w = WideWrites::default();
        w.admit(0..8 * G, G, |_| false);
        w.marked(&(2 * G + 10..2 * G + 20), G);
        w.done(&(0..8 * G), 1);
        assert_eq!(w.covered(2), vec![0..2 * G, 3 * G..8 * G]);

        w.admit(0..8 * G, G, |_| false);
        w.release(&(0..8 * G));
        w.admit(8 * G..16 * G, G, |_| false);
        w.done(&(8 * G..16 * G), 2);
        w.link_lost();
        assert!(w.covered(9).is_empty(), "not covered before the link went: the bits stay");
    }
}
