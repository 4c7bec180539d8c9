//! `[resync]`: the dirty bitmap, the activity log, and how a resync uses the link
//! (design.md §4, §5).

use serde::Deserialize;

use super::validate::Problems;
use super::values::ByteSize;
use crate::meta::{
    AlConfig, DEFAULT_EXTENTS, DEFAULT_EXTENT_SIZE, DEFAULT_GRANULARITY, MAX_EXTENTS,
};

/// `[resync]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ResyncConfig {
    /// Bytes per dirty-bitmap bit, a power of two in 4KiB..1MiB. Fixed when a volume's
    /// metadata is created; changing it later has no effect on that volume.
    #[serde(default = "default_granularity")]
    pub granularity: ByteSize,
    /// Hot extents of the activity log (1..=1019). More: fewer metadata writes on a scattered
    /// workload, more to resync after a crash of the primary. Fixed at creation, as above.
    #[serde(default = "default_al_extents")]
    pub activity_log_extents: u32,
    /// Bytes per activity-log extent, a power of two in 1MiB..1GiB. Fixed at creation.
    #[serde(default = "default_al_extent_size")]
    pub activity_log_extent_size: ByteSize,
    /// Ceiling of the resync rate in bytes per second ("100MiB"); 0 means none: fill the link.
    #[serde(default)]
    pub max_rate: ByteSize,
    /// When the target first sends checksums so that only differing blocks travel:
    /// "auto" (ranges only the target's bitmap names: activity-log extents after a crash, a
    /// discarded node's writes), "always" or "never".
    #[serde(default)]
    pub checksum: ChecksumMode,
}

/// See [`ResyncConfig::checksum`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChecksumMode {
    #[default]
    Auto,
    Always,
    Never,
}

impl Default for ResyncConfig {
    fn default() -> Self {
        ResyncConfig {
            granularity: default_granularity(),
            activity_log_extents: default_al_extents(),
            activity_log_extent_size: default_al_extent_size(),
            max_rate: ByteSize(0),
            checksum: ChecksumMode::Auto,
        }
    }
}

fn default_granularity() -> ByteSize {
    ByteSize(u64::from(DEFAULT_GRANULARITY))
}
fn default_al_extents() -> u32 {
    DEFAULT_EXTENTS
}
fn default_al_extent_size() -> ByteSize {
    ByteSize(DEFAULT_EXTENT_SIZE)
}

impl ResyncConfig {
    /// The bitmap granularity; `check` has made sure it fits.
    pub fn granularity(&self) -> u32 {
        u32::try_from(self.granularity.bytes()).unwrap_or(DEFAULT_GRANULARITY)
    }

    /// The activity log's shape.
    pub fn al(&self) -> AlConfig {
        AlConfig {
            extent_size: self.activity_log_extent_size.bytes(),
            extents: self.activity_log_extents,
        }
    }

    pub(super) fn check(&self, p: &mut Problems) {
        let g = self.granularity.bytes();
        if !g.is_power_of_two() || !(4096..=1 << 20).contains(&g) {
            p.add(
                "resync.granularity",
                Some(g.to_string()),
                "must be a power of two from 4KiB to 1MiB",
            );
        }
        let n = self.activity_log_extents;
        if n == 0 || n > MAX_EXTENTS {
            p.add(
                "resync.activity-log-extents",
                Some(n.to_string()),
                format!("must be 1..={MAX_EXTENTS}"),
            );
        }
        let s = self.activity_log_extent_size.bytes();
        if !s.is_power_of_two() || !(1 << 20..=1 << 30).contains(&s) {
            p.add(
                "resync.activity-log-extent-size",
                Some(s.to_string()),
                "must be a power of two from 1MiB to 1GiB",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_design_defaults_and_valid() {
        let c = ResyncConfig::default();
        assert_eq!(c.granularity(), 4096);
        assert_eq!(c.al(), AlConfig::default());
        let mut p = Problems::default();
        c.check(&mut p);
        assert!(p.0.is_empty(), "{:?}", p.0);
    }

    #[test]
    fn bad_shapes_are_named() {
        let c = ResyncConfig {
            granularity: ByteSize(3000),
            activity_log_extents: 0,
            activity_log_extent_size: ByteSize(4096),
            ..ResyncConfig::default()
        };
        let mut p = Problems::default();
        c.check(&mut p);
        let keys: Vec<&str> = p.0.iter().map(|x| x.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "resync.granularity",
                "resync.activity-log-extents",
                "resync.activity-log-extent-size"
            ]
        );
    }
}
