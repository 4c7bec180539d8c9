//! The superblock's bytes (design.md §4), pure: [`encode`] a [`Meta`] into one slot, [`decode`] a
//! slot back. `file.rs` decides where slots go and how they are made durable.
//!
//! One slot, [`SLOT`] bytes, all integers little-endian:
//!
//! ```text
//!  off  len  field
//!    0    8  magic "BLKDMETA"
//!    8    4  format version (FORMAT_VERSION = 1); another version is refused, not guessed at
//!   12    4  reserved (0)
//!   16    8  sequence number: the slot holding the higher one is the current superblock
//!   24    8  volume size in bytes
//!   32    4  bitmap granularity in bytes (power of two, 4 KiB..1 MiB)
//!   36    4  flags: 1 consistent, 2 primary-when-stopped, 4 clean-shutdown, 8 disk-failed;
//!              other bits refused
//!   40    8  generation current
//!   48    8  generation bitmap
//!   56   16  generation history[0], history[1]
//!   72    2  node name length (1..=NODE_MAX)
//!   74   64  node name, UTF-8, zero padded
//!  138    6  reserved (0)
//!  144    8  activity-log offset in the file (0: no areas yet, see below)
//!  152    8  activity-log extent size in bytes
//!  160    4  activity-log hot extents
//!  164    4  activity-log ring slots (RING_SLOTS)
//!  168    8  dirty-bitmap offset in the file
//!  176    8  dirty-bitmap length in bytes (whole pages)
//!  184    4  disk failure (flag 8 only, else 0): the operation (DiskOp code)
//!  188    4  ... its errno (0: not an OS error)
//!  192    8  ... the offset it was at
//!  200  ...  reserved, written as zeroes
//!
//! The areas (bytes 144..184) were reserved zeroes in the first files of version 1, so they
//! keep version 1: older files read as "no areas yet" and the caller creates them, and an
//! older blockd reading a newer file ignores them (its crc covers them all the same).
//! 4092    4  crc32 (crc32fast) of bytes 0..4092
//! ```

use super::al::{AlConfig, RING_SLOTS};
use super::bitmap::{Bitmap, PAGE};
use super::Generations;

/// Bytes of one superblock slot; one page, so a slot write never straddles two pages.
pub(super) const SLOT: usize = 4096;

/// The format version this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Default bitmap granularity: one bit per 4 KiB, as small as the NBD block size (design.md §4).
pub const DEFAULT_GRANULARITY: u32 = 4096;

/// Longest node name the superblock holds, in bytes.
pub const NODE_MAX: usize = 64;

const MAGIC: &[u8; 8] = b"BLKDMETA";
const CRC_AT: usize = SLOT - 4;
const NODE_AT: usize = 74;
const MIN_GRANULARITY: u32 = 4096;
const MAX_GRANULARITY: u32 = 1 << 20;

const FLAG_CONSISTENT: u32 = 1;
const FLAG_PRIMARY_WHEN_STOPPED: u32 = 2;
const FLAG_CLEAN_SHUTDOWN: u32 = 4;
/// The disk failed (DRBD's detach): never a resync source, never promoted, until the operator
/// brings it back. A blockd from before this flag refuses the file rather than trust the disk.
const FLAG_FAILED: u32 = 8;
const FLAGS_KNOWN: u32 =
    FLAG_CONSISTENT | FLAG_PRIMARY_WHEN_STOPPED | FLAG_CLEAN_SHUTDOWN | FLAG_FAILED;

/// What the superblock says about a volume on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Volume size in bytes; opening with another size is refused.
    pub size: u64,
    /// The node that wrote this metadata.
    pub node: String,
    pub gens: Generations,
    pub flags: Flags,
    /// Bytes per dirty-bitmap bit.
    pub granularity: u32,
}

/// Superblock flags (design.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flags {
    /// False while this node is the target of an unfinished resync: its data is a mix of two
    /// generations and must never be promoted or used as a source. Set false *before* the first
    /// resync write lands, true only after the last one is durable.
    pub consistent: bool,
    /// This node was Primary when it stopped (or crashed): it may hold writes the peer lacks.
    pub primary_when_stopped: bool,
    /// The daemon stopped in an orderly way (cleared while running); false after a crash.
    pub clean_shutdown: bool,
    /// The local disk failed, and how: its contents are unknown from then on.
    pub failed: Option<DiskFailure>,
}

/// The request a disk failed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DiskOp {
    Read,
    Write,
    WriteZeroes,
    Trim,
    Flush,
    /// The dirty bitmap or activity log (the `.meta` file).
    Metadata,
}

/// Why a disk is `Failed`: the first error, kept in the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskFailure {
    pub op: DiskOp,
    /// The OS error number (EIO 5, ENOSPC 28, ...); 0 when the error had none.
    pub errno: u32,
    pub offset: u64,
}

impl std::fmt::Display for DiskFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.errno {
            0 => "an error".to_string(),
            n => std::io::Error::from_raw_os_error(n as i32).to_string(),
        };
        write!(f, "{what} on {:?} at offset {}", self.op, self.offset)
    }
}

const OPS: [DiskOp; 6] = [
    DiskOp::Read,
    DiskOp::Write,
    DiskOp::WriteZeroes,
    DiskOp::Trim,
    DiskOp::Flush,
    DiskOp::Metadata,
];

fn op_code(op: DiskOp) -> u32 {
    OPS.iter().position(|o| *o == op).map_or(0, |i| i as u32 + 1)
}

/// Where the activity log and the dirty bitmap live in the metadata file: after the two
/// superblock slots, the log's ring first (fixed size), then the bitmap (which grows with the
/// volume, so it goes last).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Areas {
    pub al_offset: u64,
    pub al: AlConfig,
    pub al_slots: u32,
    pub bitmap_offset: u64,
    pub bitmap_len: u64,
}

impl Areas {
    /// The layout for a volume of `size` bytes at `granularity` with log shape `al`.
    pub fn layout(size: u64, granularity: u32, al: AlConfig) -> Areas {
        let al_offset = 2 * SLOT as u64;
        let bitmap_offset = al_offset + u64::from(RING_SLOTS) * PAGE as u64;
        let bitmap_len = Bitmap::bytes_for(size, granularity);
        Areas { al_offset, al, al_slots: RING_SLOTS, bitmap_offset, bitmap_len }
    }

    /// Bytes the metadata file needs to hold them.
    pub fn end(&self) -> u64 {
        self.bitmap_offset + self.bitmap_len
    }

    /// Refuses areas that overlap the slots or each other, or a bitmap too short for the volume.
    fn check(&self, size: u64, granularity: u32) -> Result<(), String> {
        self.al.check().map_err(|e| e.to_string())?;
        let al_end = self.al_offset + u64::from(self.al_slots) * PAGE as u64;
        let aligned = [self.al_offset, self.bitmap_offset, self.bitmap_len]
            .iter()
            .all(|v| v % PAGE as u64 == 0);
        if self.al_slots != RING_SLOTS
            || !aligned
            || self.al_offset < 2 * SLOT as u64
            || self.bitmap_offset < al_end
            || self.bitmap_len < Bitmap::bytes_for(size, granularity)
        {
            return Err(format!("impossible metadata areas {self:?}"));
        }
        Ok(())
    }
}

/// Why a slot is not a usable superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum SlotError {
    BadMagic,
    UnknownVersion(u32),
    BadCrc,
    /// The crc matched but a field's value is impossible.
    Invalid(String),
}

/// A decoded slot: its sequence number and content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Slot {
    pub seq: u64,
    pub meta: Meta,
    /// None in a file written before the areas existed.
    pub areas: Option<Areas>,
}

/// Checks what `encode` would refuse, so that callers can fail before touching a file.
pub(super) fn check(meta: &Meta) -> Result<(), String> {
    if meta.node.is_empty() || meta.node.len() > NODE_MAX {
        return Err(format!("node name {:?} must be 1 to {NODE_MAX} bytes", meta.node));
    }
    check_granularity(meta.granularity)
}

fn check_granularity(g: u32) -> Result<(), String> {
    if g.is_power_of_two() && (MIN_GRANULARITY..=MAX_GRANULARITY).contains(&g) {
        Ok(())
    } else {
        Err(format!("bitmap granularity {g} is not a power of two in 4 KiB..1 MiB"))
    }
}

/// Encodes `meta` as slot number `seq`, without areas. The caller ran [`check`] first.
pub(super) fn encode(meta: &Meta, seq: u64) -> Box<[u8; SLOT]> {
    encode_with(meta, None, seq)
}

/// Encodes `meta` and `areas` as slot number `seq`. The caller ran [`check`] first.
pub(super) fn encode_with(meta: &Meta, areas: Option<&Areas>, seq: u64) -> Box<[u8; SLOT]> {
    let mut b = Box::new([0u8; SLOT]);
    b[0..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    b[24..32].copy_from_slice(&meta.size.to_le_bytes());
    b[32..36].copy_from_slice(&meta.granularity.to_le_bytes());
    b[36..40].copy_from_slice(&flag_bits(meta.flags).to_le_bytes());
    if let Some(f) = meta.flags.failed {
        b[184..188].copy_from_slice(&op_code(f.op).to_le_bytes());
        b[188..192].copy_from_slice(&f.errno.to_le_bytes());
        b[192..200].copy_from_slice(&f.offset.to_le_bytes());
    }
    let g = meta.gens;
    for (i, v) in [g.current, g.bitmap, g.history[0], g.history[1]].into_iter().enumerate() {
        b[40 + 8 * i..48 + 8 * i].copy_from_slice(&v.to_le_bytes());
    }
    let node = &meta.node.as_bytes()[..meta.node.len().min(NODE_MAX)];
    b[72..74].copy_from_slice(&(node.len() as u16).to_le_bytes());
    b[NODE_AT..NODE_AT + node.len()].copy_from_slice(node);
    if let Some(a) = areas {
        encode_areas(&mut b, a);
    }
    let crc = crc32fast::hash(&b[..CRC_AT]);
    b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes one slot. Order matters: the magic says whether this is ours at all, the version
/// whether we know the layout (including where the crc is), and only then the crc is checked.
pub(super) fn decode(b: &[u8; SLOT]) -> Result<Slot, SlotError> {
    if &b[0..8] != MAGIC {
        return Err(SlotError::BadMagic);
    }
    let version = u32_at(b, 8);
    if version != FORMAT_VERSION {
        return Err(SlotError::UnknownVersion(version));
    }
    if crc32fast::hash(&b[..CRC_AT]) != u32_at(b, CRC_AT) {
        return Err(SlotError::BadCrc);
    }
    let bits = u32_at(b, 36);
    if bits & !FLAGS_KNOWN != 0 {
        return Err(SlotError::Invalid(format!("unknown flag bits {:#x}", bits & !FLAGS_KNOWN)));
    }
    let granularity = u32_at(b, 32);
    check_granularity(granularity).map_err(SlotError::Invalid)?;
    let gens = Generations {
        current: u64_at(b, 40),
        bitmap: u64_at(b, 48),
        history: [u64_at(b, 56), u64_at(b, 64)],
    };
    let mut flags = flags(bits);
    if bits & FLAG_FAILED != 0 {
        // An unknown operation code still means Failed: the flag is what matters.
        let op = OPS.get((u32_at(b, 184) as usize).wrapping_sub(1)).copied();
        let (errno, offset) = (u32_at(b, 188), u64_at(b, 192));
        flags.failed = Some(DiskFailure { op: op.unwrap_or(DiskOp::Write), errno, offset });
    }
    let meta = Meta { size: u64_at(b, 24), node: node_at(b)?, gens, flags, granularity };
    let areas = decode_areas(b);
    if let Some(a) = &areas {
        a.check(meta.size, granularity).map_err(SlotError::Invalid)?;
    }
    Ok(Slot { seq: u64_at(b, 16), meta, areas })
}

fn encode_areas(b: &mut [u8; SLOT], a: &Areas) {
    b[144..152].copy_from_slice(&a.al_offset.to_le_bytes());
    b[152..160].copy_from_slice(&a.al.extent_size.to_le_bytes());
    b[160..164].copy_from_slice(&a.al.extents.to_le_bytes());
    b[164..168].copy_from_slice(&a.al_slots.to_le_bytes());
    b[168..176].copy_from_slice(&a.bitmap_offset.to_le_bytes());
    b[176..184].copy_from_slice(&a.bitmap_len.to_le_bytes());
}

/// The areas, or None when their offset is 0 (a file from before them).
fn decode_areas(b: &[u8; SLOT]) -> Option<Areas> {
    let al_offset = u64_at(b, 144);
    (al_offset != 0).then(|| Areas {
        al_offset,
        al: AlConfig { extent_size: u64_at(b, 152), extents: u32_at(b, 160) },
        al_slots: u32_at(b, 164),
        bitmap_offset: u64_at(b, 168),
        bitmap_len: u64_at(b, 176),
    })
}

fn node_at(b: &[u8; SLOT]) -> Result<String, SlotError> {
    let len = usize::from(u16::from_le_bytes([b[72], b[73]]));
    if len == 0 || len > NODE_MAX {
        return Err(SlotError::Invalid(format!("node name length {len}")));
    }
    String::from_utf8(b[NODE_AT..NODE_AT + len].to_vec())
        .map_err(|_| SlotError::Invalid("node name is not UTF-8".into()))
}

fn flag_bits(f: Flags) -> u32 {
    let mut bits = 0;
    if f.consistent {
        bits |= FLAG_CONSISTENT;
    }
    if f.primary_when_stopped {
        bits |= FLAG_PRIMARY_WHEN_STOPPED;
    }
    if f.clean_shutdown {
        bits |= FLAG_CLEAN_SHUTDOWN;
    }
    if f.failed.is_some() {
        bits |= FLAG_FAILED;
    }
    bits
}

fn flags(bits: u32) -> Flags {
    Flags {
        consistent: bits & FLAG_CONSISTENT != 0,
        primary_when_stopped: bits & FLAG_PRIMARY_WHEN_STOPPED != 0,
        clean_shutdown: bits & FLAG_CLEAN_SHUTDOWN != 0,
        failed: None,
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Meta {
        Meta {
            size: 1 << 30,
            node: "alpha".into(),
            gens: Generations { current: 0xfeed, bitmap: 0xbeef, history: [3, 4] },
            flags: Flags {
                consistent: true,
                primary_when_stopped: false,
                clean_shutdown: true,
                failed: None,
            },
            granularity: DEFAULT_GRANULARITY,
        }
    }

    #[test]
    fn slot_round_trip_every_flag_combination() {
        for bits in 0..8 {
            let meta = Meta { flags: flags(bits), ..sample() };
            let slot = decode(&encode(&meta, 42)).expect("decodes");
            assert_eq!(slot, Slot { seq: 42, meta, areas: None });
        }
    }

    /// A Failed disk stays Failed across a restart, with why (issue 17).
    #[test]
    fn a_disk_failure_round_trips() {
        for op in OPS {
            let failed = Some(DiskFailure { op, errno: 28, offset: 1 << 33 });
            let meta = Meta { flags: Flags { failed, ..sample().flags }, ..sample() };
            let slot = decode(&encode(&meta, 7)).expect("decodes");
            assert_eq!(slot.meta, meta);
        }
        let text = DiskFailure { op: DiskOp::Write, errno: 5, offset: 4096 }.to_string();
        assert!(text.contains("Input/output error") && text.contains("Write at offset 4096"));
    }

    #[test]
    fn areas_round_trip_and_impossible_ones_are_refused() {
        let meta = sample();
        let areas = Areas::layout(meta.size, meta.granularity, AlConfig::default());
        assert_eq!(areas.al_offset, 2 * SLOT as u64);
        assert_eq!(areas.bitmap_offset, areas.al_offset + 4 * PAGE as u64);
        assert_eq!(areas.bitmap_len, 8 * PAGE as u64, "1 GiB at 4 KiB: 8 pages");
        let slot = decode(&encode_with(&meta, Some(&areas), 3)).expect("decodes");
        assert_eq!(slot.areas, Some(areas));
        let short = Areas { bitmap_len: PAGE as u64, ..areas };
        assert!(matches!(decode(&encode_with(&meta, Some(&short), 3)), Err(SlotError::Invalid(_))));
        let overlap = Areas { bitmap_offset: areas.al_offset, ..areas };
        assert!(decode(&encode_with(&meta, Some(&overlap), 3)).is_err());
        let bad_al = Areas { al: AlConfig { extents: 0, ..areas.al }, ..areas };
        assert!(decode(&encode_with(&meta, Some(&bad_al), 3)).is_err());
    }

    #[test]
    fn every_single_byte_change_is_caught() {
        let good = encode(&sample(), 1);
        for at in (0..SLOT).step_by(7).chain([SLOT - 1]) {
            let mut bad = good.clone();
            bad[at] ^= 0x20;
            assert!(decode(&bad).is_err(), "flip at {at} went unnoticed");
        }
    }

    #[test]
    fn unknown_version_and_flags_and_granularity_are_refused() {
        let mut b = encode(&sample(), 1);
        b[8] = 2;
        assert_eq!(decode(&b), Err(SlotError::UnknownVersion(2)));
        let mut b = encode(&sample(), 1);
        b[36] |= 0x80;
        let crc = crc32fast::hash(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode(&b), Err(SlotError::Invalid(_))));
        assert!(check(&Meta { granularity: 3000, ..sample() }).is_err());
        assert!(check(&Meta { node: "n".repeat(NODE_MAX + 1), ..sample() }).is_err());
        assert!(check(&Meta { node: String::new(), ..sample() }).is_err());
        assert!(check(&Meta { node: "n".repeat(NODE_MAX), ..sample() }).is_ok());
    }

    #[test]
    fn zeroes_are_not_a_slot() {
        assert_eq!(decode(&[0u8; SLOT]), Err(SlotError::BadMagic));
    }
}
