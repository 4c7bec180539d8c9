//! Opening the backing file or block device, and the few syscalls std does not wrap
//! (`statx` for the direct-I/O alignment, the block-device size ioctls, `fallocate`).
//!
//! Decisions made here, once per open:
//! - direct or buffered ([`DirectIo`]): `Auto` falls back to buffered with one warning naming
//!   the path and the reason; `On` turns the same reason into an error;
//! - the block size every engine op is aligned to: `stx_dio_offset_align` (or the filesystem
//!   block size when the kernel does not report it) for direct files, the logical block size
//!   for direct devices, 1 for buffered I/O (the page cache does any read-modify-write);
//! - the allocation unit that punching and zeroing are aligned to: the filesystem block size
//!   for files, the logical block size for devices.

use std::{
    fs::{File, OpenOptions},
    io,
    os::{
        fd::AsRawFd,
        unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
    },
    path::Path,
};

use super::{Allocate, DirectIo, StorageError, StoreOptions};

/// `_IOR(0x12, 114, size_t)`: the device size in bytes (`<linux/fs.h>`; not in the libc crate).
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
const BLKGETSIZE64: libc::Ioctl = 0x4008_1272;
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;

/// Largest allocation unit used for aligning punch/zero ranges; beyond it the block size is used.
const MAX_UNIT: u32 = 1 << 20;

/// An opened backing store and its geometry.
#[derive(Debug)]
pub(super) struct Backing {
    pub file: File,
    pub size: u64,
    /// Alignment of every engine op's offset and length (1 when buffered).
    pub block: u32,
    /// Alignment of punch / zero-range ops; a multiple of `block`.
    pub unit: u32,
    pub direct: bool,
    /// `open` created the file (sparse, all zeroes): see [`Store::created`](super::Store::created).
    pub created: bool,
    /// `RWF_DSYNC` makes a write durable here. Not on FUSE: the kernel hands the flag to the
    /// daemon with a direct write and sends no fsync, and daemons may ignore it (nbdfuse
    /// does), so a durable write there is the write followed by `fdatasync`.
    pub dsync: bool,
}

/// `statfs.f_type` of FUSE filesystems.
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// Whether `RWF_DSYNC` can be trusted on `file`'s filesystem (see [`Backing::dsync`]).
fn trusts_dsync(file: &File) -> io::Result<bool> {
    // SAFETY: `statfs` is a plain C struct for which all-zero bytes are a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open for the call's duration and `st` is a live, writable struct the
    // kernel fills before returning.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's integer type differs between targets
    Ok(st.f_type as i64 != FUSE_SUPER_MAGIC)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Device,
}

/// Opens (creating a missing regular file sparse at `opts.size`) and checks the backing.
pub(super) fn open(opts: &StoreOptions) -> Result<Backing, StorageError> {
    let path = opts.path.as_path();
    let (kind, created) = prepare(path, opts.size, opts.allocate)?;
    let want_direct = opts.direct != DirectIo::Off;
    let file = match open_rw(path, want_direct) {
        Err(e) if want_direct && e.raw_os_error() == Some(libc::EINVAL) => {
            no_direct(opts, format!("O_DIRECT refused by open: {e}"))?;
            open_rw(path, false).map_err(|source| open_err(path, source))?
        }
        r => r.map_err(|source| open_err(path, source))?,
    };
    check_size(&file, kind, path, opts.size)?;
    let direct_block = if want_direct && is_direct(&file) {
        match direct_block(&file, kind, opts.size) {
            Ok(block) => Some(block),
            Err(reason) => {
                no_direct(opts, reason)?;
                None
            }
        }
    } else {
        None
    };
    let file = match direct_block {
        Some(_) => file,
        // Reopen buffered: dropping O_DIRECT with fcntl would need one more unsafe call.
        None if is_direct(&file) => open_rw(path, false).map_err(|e| open_err(path, e))?,
        None => file,
    };
    let block = direct_block.unwrap_or(1);
    let unit = alloc_unit(&file, kind, block).map_err(|e| open_err(path, e))?;
    let dsync = trusts_dsync(&file).map_err(|e| open_err(path, e))?;
    let direct = direct_block.is_some();
    Ok(Backing { file, size: opts.size, block, unit, direct, created, dsync })
}

/// Direct I/O is impossible for `reason`: an error with `On`, one warning with `Auto`.
fn no_direct(opts: &StoreOptions, reason: String) -> Result<(), StorageError> {
    if opts.direct == DirectIo::On {
        return Err(StorageError::Unsupported { path: opts.path.clone(), what: reason });
    }
    tracing::warn!(path = %opts.path.display(), %reason,
        "direct I/O unavailable, falling back to buffered I/O");
    Ok(())
}

fn open_err(path: &Path, source: io::Error) -> StorageError {
    StorageError::Open { path: path.to_path_buf(), source }
}

/// Creates a missing regular file of `size` (allocated in full or sparse); tells a file from a
/// device, and whether it was created just now.
fn prepare(path: &Path, size: u64, allocate: Allocate) -> Result<(Kind, bool), StorageError> {
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_file() => Ok((Kind::File, false)),
        Ok(m) if m.file_type().is_block_device() => Ok((Kind::Device, false)),
        Ok(_) => Err(StorageError::Unsupported {
            path: path.to_path_buf(),
            what: "neither a regular file nor a block device".into(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            create(path, size, allocate)
                .map_err(|source| StorageError::Create { path: path.to_path_buf(), source })?;
            Ok((Kind::File, true))
        }
        Err(source) => Err(open_err(path, source)),
    }
}

fn create(path: &Path, size: u64, allocate: Allocate) -> io::Result<()> {
    // 0600: the volume holds a whole filesystem of someone's data.
    let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    let sized = match allocate {
        Allocate::Sparse => file.set_len(size),
        // A backing that cannot hold the volume is refused now, not at the write that finds
        // the filesystem full (which would fail the disk).
        Allocate::Full => allocate_all(&file, size),
    };
    if let Err(e) = sized.and_then(|()| file.sync_all()) {
        // No half-made backing left behind: the next start would take it for the volume.
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(())
}

/// Reserves every block of `0..size` (zeroes, allocated).
fn allocate_all(file: &File, size: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(size).map_err(io::Error::other)?;
    // SAFETY: fallocate takes no pointers; the fd is open for the call (we borrow `file`).
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("cannot allocate {size} bytes: {e}")));
    }
    Ok(())
}

fn open_rw(path: &Path, direct: bool) -> io::Result<File> {
    let flags = if direct { libc::O_DIRECT } else { 0 };
    OpenOptions::new().read(true).write(true).custom_flags(flags).open(path)
}

fn is_direct(file: &File) -> bool {
    // Read back from the open file description rather than trusting our own bookkeeping.
    status_flags(file).is_ok_and(|f| f & libc::O_DIRECT != 0)
}

/// A file must have exactly the volume's size, a device at least.
fn check_size(file: &File, kind: Kind, path: &Path, expected: u64) -> Result<(), StorageError> {
    let actual = match kind {
        Kind::File => file.metadata().map(|m| m.len()),
        Kind::Device => device_size(file),
    }
    .map_err(|e| open_err(path, e))?;
    let ok = match kind {
        Kind::File => actual == expected,
        Kind::Device => actual >= expected,
    };
    if ok {
        Ok(())
    } else {
        Err(StorageError::SizeMismatch { path: path.to_path_buf(), actual, expected })
    }
}

/// The direct-I/O block size, or why direct I/O cannot be used on this backing.
fn direct_block(file: &File, kind: Kind, size: u64) -> Result<u32, String> {
    let block = match kind {
        Kind::Device => logical_block_size(file).map_err(|e| format!("BLKSSZGET: {e}"))?,
        Kind::File => match dio_align(file).map_err(|e| format!("statx: {e}"))? {
            Some((0, _)) => return Err("the filesystem reports no direct I/O support".into()),
            Some((_, mem)) if mem as usize > super::buf::BUF_ALIGN => {
                return Err(format!("direct I/O needs {mem}-byte memory alignment"))
            }
            Some((offset, _)) => offset,
            None => fs_block_size(file).map_err(|e| format!("fstat: {e}"))?,
        },
    };
    if block == 0 || !block.is_power_of_two() || block > MAX_UNIT {
        return Err(format!("unusable direct I/O alignment {block}"));
    }
    if size % u64::from(block) != 0 {
        return Err(format!("volume size {size} is not a multiple of the {block}-byte block"));
    }
    Ok(block)
}

/// Punch / zero alignment: the filesystem block (the unit a hole can be) or the logical block.
fn alloc_unit(file: &File, kind: Kind, block: u32) -> io::Result<u32> {
    let unit = match kind {
        Kind::File => fs_block_size(file)?,
        Kind::Device => logical_block_size(file)?,
    };
    let usable = unit.is_power_of_two() && unit <= MAX_UNIT && unit % block == 0;
    Ok(if usable { unit } else { block })
}

fn fs_block_size(file: &File) -> io::Result<u32> {
    let b = file.metadata()?.blksize();
    u32::try_from(b).map_err(|_| io::Error::other(format!("block size {b} out of range")))
}

fn status_flags(file: &File) -> io::Result<libc::c_int> {
    // SAFETY: F_GETFL takes no argument and only reads the open file description's flags.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(flags)
    }
}

/// `(stx_dio_offset_align, stx_dio_mem_align)` when the kernel reports them (Linux ≥ 6.1).
fn dio_align(file: &File) -> io::Result<Option<(u32, u32)>> {
    // SAFETY: `statx` is a plain C struct for which all-zero bytes are a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid NUL-terminated empty string (AT_EMPTY_PATH: stat the fd
    // itself) and `stx` is a live, writable struct the kernel fills before returning.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOSYS) { Ok(None) } else { Err(e) };
    }
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return Ok(None);
    }
    Ok(Some((stx.stx_dio_offset_align, stx.stx_dio_mem_align)))
}

fn device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

fn logical_block_size(file: &File) -> io::Result<u32> {
    let mut bs: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at `bs`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut bs as *mut libc::c_int) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(bs).map_err(|_| io::Error::other(format!("logical block size {bs}")))
}

/// `fallocate(2)` with `mode`, retried on EINTR.
pub(super) fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    };
    loop {
        // SAFETY: fallocate takes no pointers; the fd stays open for the call (we borrow `file`).
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, n) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`: deallocate, read back as zeroes.
pub(super) const PUNCH_HOLE: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// `FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE`: zero and keep allocated.
pub(super) const ZERO_RANGE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
