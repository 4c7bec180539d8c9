//! The metadata file `<data-dir>/<volume>.meta` and how it is updated durably.
//!
//! ```text
//!  0        4 KiB     8 KiB
//!  | slot 0 | slot 1 | activity-log ring | dirty bitmap ... |
//!    even     odd      (RING_SLOTS pages)  (whole pages)
//!    seqs     seqs
//! ```
//!
//! The two areas after the slots are located by fields of the superblock ([`Areas`]). A file
//! from before them has none; [`MetaFile::open_areas`] then lays them out, extends the file with
//! zeroes (an all-clean bitmap, an empty log), makes that durable, and only then stores a
//! superblock naming them: a crash in between leaves a superblock without areas, and the next
//! start lays them out again.
//!
//! Atomic update by two alternating slots, not by temp-file-and-rename: the dirty bitmap and
//! the activity log live in this same file after the slots and are updated in place,
//! so replacing the whole file on every superblock change would mean copying them. Each
//! [`MetaFile::store`] writes the next sequence number into the slot of its parity (the one
//! *not* holding the newest superblock), then `fdatasync`s, and only then counts that sequence
//! as written. Opening reads both slots and takes the valid one with the higher sequence.
//!
//! Durability: when `store` returns Ok the new superblock is on stable storage. A crash (or an
//! error) during `store` can tear only the slot being written; its crc then fails and the
//! other slot, untouched since its own `fdatasync`, still holds the previous superblock. So
//! after a crash at any point either the old or the new version is read, never neither.
//!
//! Creation writes both slots into `<path>.tmp`, fsyncs it, renames it over `<path>` and
//! fsyncs the directory: a crash while creating leaves no metadata file (a later start creates
//! it again, replacing the partial temp file), never a half-written one.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::al::AlConfig;
use super::dirty::FileIo;
use super::format::{self, Areas, Slot, SlotError, SLOT};
use super::ZEROES;
use super::{new_generation, Flags, Generations, Meta, DEFAULT_GRANULARITY, FORMAT_VERSION};
use crate::role::DiskState;

/// Errors opening, creating or storing a metadata file. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("cannot open metadata {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create metadata {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read metadata {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write metadata {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("metadata {path} is {len} bytes, shorter than its two superblocks ({min} bytes)")]
    Truncated { path: PathBuf, len: u64, min: u64 },
    #[error("{path} is not a blockd metadata file (bad magic)")]
    BadMagic { path: PathBuf },
    #[error("metadata {path} is corrupt: both superblocks fail their crc")]
    BadCrc { path: PathBuf },
    #[error("metadata {path} has format version {version}; this blockd knows {FORMAT_VERSION}")]
    UnknownVersion { path: PathBuf, version: u32 },
    #[error("metadata {path} is invalid: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("metadata {path} is for a volume of {stored} bytes, not {expected} bytes")]
    SizeMismatch { path: PathBuf, stored: u64, expected: u64 },
    #[error(
        "metadata {path} exists but the backing was just created empty: the data it describes \
         is gone (remove the metadata file to start this volume afresh)"
    )]
    BackingRecreated { path: PathBuf },
}

/// An open metadata file. `Sync`: share it in an `Arc`; concurrent `store`s are serialised.
#[derive(Debug)]
pub struct MetaFile {
    path: PathBuf,
    file: File,
    /// Sequence number of the newest durable superblock; it lives in slot `seq % 2`.
    seq: Mutex<u64>,
    /// The areas the newest durable superblock names; every `store` writes them again. Changed
    /// only while `seq` is held, after the slot naming them is durable.
    areas: Mutex<Option<Areas>>,
}

impl Meta {
    /// The disk state this superblock implies at start: `Inconsistent` while a resync into
    /// this node is unfinished, else `UpToDate` as far as this node alone can tell (the
    /// handshake's decision may then make it a resync target).
    pub fn disk_state(&self) -> DiskState {
        if self.flags.consistent {
            DiskState::UpToDate
        } else {
            DiskState::Inconsistent
        }
    }
}

impl MetaFile {
    /// Opens the metadata, or creates it: `created_backing` = the backing was just created
    /// sparse by us, so the generation is [`ZEROES`]; otherwise a fresh random generation
    /// (data of unknown origin: a peer can only be brought in by a full sync).
    ///
    /// Refused, with an error naming the path: bad magic or crc in both slots, a volume size
    /// other than `size`, an unknown format version, and an existing metadata file when the
    /// backing was just created (its generation would claim data that is gone).
    pub fn open_or_create(
        path: &Path,
        size: u64,
        node: &str,
        created_backing: bool,
    ) -> Result<(MetaFile, Meta), MetaError> {
        Self::open_or_create_with(path, size, node, created_backing, DEFAULT_GRANULARITY)
    }

    /// [`open_or_create`](Self::open_or_create), creating with bitmap `granularity` (an
    /// existing file keeps the granularity it was created with).
    pub fn open_or_create_with(
        path: &Path,
        size: u64,
        node: &str,
        created_backing: bool,
        granularity: u32,
    ) -> Result<(MetaFile, Meta), MetaError> {
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) if created_backing => {
                drop(file);
                Err(MetaError::BackingRecreated { path: path.to_path_buf() })
            }
            Ok(file) => Self::open(path, file, size, node),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let current = if created_backing { ZEROES } else { new_generation() };
                let meta = Meta {
                    size,
                    node: node.to_owned(),
                    gens: Generations::new(current),
                    // Nothing ran yet, so nothing to recover: consistent and clean.
                    flags: Flags {
                        consistent: true,
                        primary_when_stopped: false,
                        clean_shutdown: true,
                        failed: None,
                    },
                    granularity,
                };
                let mf = Self::create(path, &meta)?;
                Ok((mf, meta))
            }
            Err(source) => Err(MetaError::Open { path: path.to_path_buf(), source }),
        }
    }

    /// The file's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Durably replaces the stored metadata (blocking; callers use spawn_blocking). After it
    /// returns Ok, a crash at any point leaves either the old or the new version readable,
    /// never neither (see the module doc for how).
    pub fn store(&self, meta: &Meta) -> Result<(), MetaError> {
        self.store_slot(meta, None)
    }

    /// Where the dirty bitmap and the activity log are, if the superblock names them yet.
    pub fn areas(&self) -> Option<Areas> {
        *self.areas.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The areas of the dirty bitmap and activity log, and I/O on them. A file without them
    /// (written before them) gets them now, shaped by `al` and `meta.granularity`, as the
    /// module doc describes; `meta` is what the new superblock stores. Existing areas keep the
    /// shape they were created with, whatever `al` says.
    pub fn open_areas(&self, meta: &Meta, al: AlConfig) -> Result<(Areas, FileIo), MetaError> {
        let io_err = |source| MetaError::Write { path: self.path.clone(), source };
        let areas = match self.areas() {
            Some(a) => a,
            None => {
                al.check().map_err(|e| self.err_invalid(e.to_string()))?;
                let a = Areas::layout(meta.size, meta.granularity, al);
                let len = self.file.metadata().map_err(io_err)?.len();
                allocate(&self.file, len.max(a.end())).map_err(io_err)?;
                self.file.sync_all().map_err(io_err)?;
                self.store_slot(meta, Some(a))?;
                a
            }
        };
        let file = self.file.try_clone().map_err(io_err)?;
        Ok((areas, FileIo::new(file)))
    }

    /// Stores `meta` with the current areas, or with `new_areas` which then become current.
    fn store_slot(&self, meta: &Meta, new_areas: Option<Areas>) -> Result<(), MetaError> {
        format::check(meta).map_err(|what| self.err_invalid(what))?;
        // A poisoned lock only means another store panicked; the counter is still right,
        // because it is only advanced after a successful write.
        let mut seq = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        let next = *seq + 1;
        let areas = new_areas.or_else(|| self.areas());
        let slot = format::encode_with(meta, areas.as_ref(), next);
        let write = |f: &File| {
            f.write_all_at(&slot[..], slot_offset(next))?;
            f.sync_data()
        };
        write(&self.file).map_err(|source| MetaError::Write { path: self.path.clone(), source })?;
        *seq = next;
        *self.areas.lock().unwrap_or_else(|p| p.into_inner()) = areas;
        Ok(())
    }

    fn open(path: &Path, file: File, size: u64, node: &str) -> Result<(MetaFile, Meta), MetaError> {
        remove_stale_tmp(path);
        let slot = read_newest(path, &file)?;
        if slot.meta.size != size {
            return Err(MetaError::SizeMismatch {
                path: path.to_path_buf(),
                stored: slot.meta.size,
                expected: size,
            });
        }
        if slot.meta.node != node {
            tracing::warn!(path = %path.display(), stored = %slot.meta.node, node,
                "metadata was written under another node name");
        }
        let mf = MetaFile {
            path: path.to_path_buf(),
            file,
            seq: Mutex::new(slot.seq),
            areas: Mutex::new(slot.areas),
        };
        Ok((mf, slot.meta))
    }

    fn create(path: &Path, meta: &Meta) -> Result<MetaFile, MetaError> {
        format::check(meta)
            .map_err(|what| MetaError::Invalid { path: path.to_path_buf(), what })?;
        let tmp = tmp_path(path);
        let create_err = |source| MetaError::Create { path: path.to_path_buf(), source };
        if let Err(e) = write_new(&tmp, meta) {
            let _ = std::fs::remove_file(&tmp);
            return Err(create_err(e));
        }
        std::fs::rename(&tmp, path).map_err(create_err)?;
        sync_dir(path).map_err(create_err)?;
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(create_err)?;
        Ok(MetaFile { path: path.to_path_buf(), file, seq: Mutex::new(1), areas: Mutex::new(None) })
    }

    fn err_invalid(&self, what: String) -> MetaError {
        MetaError::Invalid { path: self.path.clone(), what }
    }
}

/// Slot `seq % 2` holds sequence `seq`, so the slot written next never holds the newest.
fn slot_offset(seq: u64) -> u64 {
    (seq % 2) * SLOT as u64
}

/// `<path>.tmp`: where a new metadata file is prepared before its rename.
fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// A temp file left by a crash during an earlier creation is of no use once the metadata exists.
fn remove_stale_tmp(path: &Path) {
    let tmp = tmp_path(path);
    match std::fs::remove_file(&tmp) {
        Ok(()) => tracing::info!(path = %tmp.display(), "removed a stale metadata temp file"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %tmp.display(), error = %e, "cannot remove stale temp file")
        }
    }
}

/// Writes both slots (sequences 0 and 1, same content) into a new file and fsyncs it. Both
/// are valid from the start, so a damaged slot in a healthy file always means damage.
fn write_new(tmp: &Path, meta: &Meta) -> io::Result<()> {
    let file = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(tmp)?;
    for seq in 0..2 {
        file.write_all_at(&format::encode(meta, seq)[..], slot_offset(seq))?;
    }
    file.sync_all()
}

/// Makes a rename in `path`'s directory durable.
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Reads both slots and returns the valid one with the higher sequence number.
fn read_newest(path: &Path, file: &File) -> Result<Slot, MetaError> {
    let read_err = |source| MetaError::Read { path: path.to_path_buf(), source };
    let len = file.metadata().map_err(read_err)?.len();
    let min = 2 * SLOT as u64;
    if len < min {
        return Err(MetaError::Truncated { path: path.to_path_buf(), len, min });
    }
    let mut decoded = Vec::with_capacity(2);
    for seq in 0..2u64 {
        let mut buf = Box::new([0u8; SLOT]);
        file.read_exact_at(&mut buf[..], slot_offset(seq)).map_err(read_err)?;
        decoded.push(format::decode(&buf).and_then(|s| parity_checked(s, seq)));
    }
    pick(path, decoded)
}

/// A slot holding a sequence of the other parity was not written by `store`.
fn parity_checked(slot: Slot, index: u64) -> Result<Slot, SlotError> {
    if slot.seq % 2 == index {
        Ok(slot)
    } else {
        Err(SlotError::Invalid(format!("slot {index} holds sequence {}", slot.seq)))
    }
}

/// Chooses between the two decoded slots. A newer format in either slot is refused outright:
/// falling back to an older slot would silently undo what the newer blockd recorded.
fn pick(path: &Path, decoded: Vec<Result<Slot, SlotError>>) -> Result<Slot, MetaError> {
    let path_buf = || path.to_path_buf();
    if let Some(version) = decoded.iter().find_map(|r| match r {
        Err(SlotError::UnknownVersion(v)) => Some(*v),
        _ => None,
    }) {
        return Err(MetaError::UnknownVersion { path: path_buf(), version });
    }
    for (index, r) in decoded.iter().enumerate() {
        if let Err(e) = r {
            tracing::warn!(path = %path.display(), slot = index, error = ?e,
                "metadata superblock slot unusable (torn by a crash, or damaged); using the other");
        }
    }
    let newest = decoded.iter().filter_map(|r| r.as_ref().ok()).max_by_key(|s| s.seq).cloned();
    if let Some(slot) = newest {
        return Ok(slot);
    }
    let invalid = decoded.iter().find_map(|r| match r {
        Err(SlotError::Invalid(what)) => Some(what.clone()),
        _ => None,
    });
    Err(match invalid {
        Some(what) => MetaError::Invalid { path: path_buf(), what },
        None if decoded.iter().all(|r| matches!(r, Err(SlotError::BadMagic))) => {
            MetaError::BadMagic { path: path_buf() }
        }
        None => MetaError::BadCrc { path: path_buf() },
    })
}

/// Sizes the file to `len` with every block reserved, so that a full filesystem (the backing
/// filling it, say) can never fail a bitmap or activity-log write later (issue 17: that would
/// fail a demotion, and the disk's record of what differs). Where the filesystem cannot
/// reserve blocks, the file is only sized.
fn allocate(file: &File, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let off = libc::off_t::try_from(len).map_err(io::Error::other)?;
    // SAFETY: fallocate takes no pointers; the fd is open for the call (we borrow `file`).
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, off) };
    if r == 0 {
        return Ok(());
    }
    match io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EOPNOTSUPP) => file.set_len(len),
        e => Err(e),
    }
}

#[cfg(test)]
#[path = "file_tests.rs"]
mod tests;
