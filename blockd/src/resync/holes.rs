//! Holes in the resync source's backing, for the copy in `source.rs`.

use std::{io, os::fd::AsRawFd};

/// SEEK_DATA / SEEK_HOLE on the backing, so that holes are sent as zero requests without being
/// read (design.md §5: initial sync skips holes). Without the file (or on a filesystem that does
/// not say), everything is data.
pub(super) struct Holes(Option<std::fs::File>);

impl Holes {
    pub(super) fn open(path: &std::path::Path) -> Holes {
        Holes(std::fs::File::open(path).ok())
    }

    /// The first data byte at or after `offset`; the volume's end (as `u64::MAX`) if none.
    pub(super) fn next_data(&self, offset: u64) -> Option<u64> {
        self.seek(offset, libc::SEEK_DATA)
            .or_else(|e| match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(u64::MAX),
                _ => Err(e),
            })
            .ok()
    }

    /// The first hole byte at or after `offset` (every file has one at its end).
    pub(super) fn next_hole(&self, offset: u64) -> Option<u64> {
        self.seek(offset, libc::SEEK_HOLE).ok()
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<u64> {
        let file = self.0.as_ref().ok_or_else(|| io::Error::from(io::ErrorKind::Unsupported))?;
        let off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
        // SAFETY: lseek takes no pointers; the fd stays open for the call (we borrow `file`).
        let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_found_in_a_sparse_file() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 32 << 20).unwrap();
        f.sync_all().unwrap();
        let h = Holes::open(&path);
        let data = h.next_data(0).unwrap();
        assert!(data <= 32 << 20 && data > 0, "{data}");
        assert!(h.next_hole(32 << 20).unwrap() > 32 << 20);
        assert_eq!(h.next_data((32 << 20) + (1 << 20)), Some(u64::MAX));
        let none = Holes(None);
        assert_eq!(none.next_data(5), None);
    }
}
