//! What the simulator (`crate::sim`) reads of a volume beyond its status: test builds only.

use std::ops::Range;

use super::Volume;

impl Volume {
    /// Whether this node's marks, in memory, cover `range`: a bit of the dirty bitmap or a hot
    /// activity-log extent touches every granule of it (design.md §4's invariant, as the
    /// simulator checks it against the two disks).
    pub(crate) fn marks_cover(&self, range: Range<u64>) -> bool {
        self.track.with(|d| {
            let g = u64::from(d.bitmap().granularity());
            let size = d.areas().al.extent_size;
            let hot = d.hot_extents();
            let mut at = range.start - range.start % g;
            while at < range.end {
                let granule = at..at + g;
                if !d.bitmap().test(granule) && !hot.contains(&(at / size)) {
                    return false;
                }
                at += g;
            }
            true
        })
    }
}
