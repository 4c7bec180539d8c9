//! Heap buffers aligned for direct I/O.
//!
//! Ownership: an [`AlignedBuf`] owns its allocation exclusively, like a `Box<[u8]>`. While an
//! [`Op`](super::Op) carrying it is in flight the engine owns it (the io_uring engine keeps it in
//! its in-flight table, so the kernel may write into it); the engine hands it back in the op's
//! [`Completion`](super::Completion). The memory is freed when the last owner drops it.

use std::{
    alloc::{self, Layout},
    fmt,
    ptr::NonNull,
    slice,
};

/// Address alignment of every non-empty buffer. Direct I/O needs the memory aligned to the
/// device's logical block (512 or 4096) or to `stx_dio_mem_align`; a page covers all of them and
/// makes large buffers page-granular for the kernel.
pub const BUF_ALIGN: usize = 4096;

/// A zero-initialised heap buffer whose address is aligned to [`BUF_ALIGN`].
pub struct AlignedBuf {
    /// Start of the allocation; dangling (and never dereferenced) when `len == 0`.
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `AlignedBuf` owns its allocation exclusively (no aliasing pointers are kept anywhere),
// exactly like `Box<[u8]>`, so moving it to another thread is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out `&[u8]`; mutation needs `&mut self`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes whose address is aligned to 4096. `len` may be 0.
    ///
    /// Zeroing is free for large sizes: `alloc_zeroed` gets fresh pages from the kernel.
    /// Aborts (like `Vec`) if the allocator cannot provide the memory.
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return AlignedBuf { ptr: NonNull::dangling(), len: 0 };
        }
        let layout = Self::layout(len);
        // SAFETY: `layout` has a non-zero size (len > 0) and a valid power-of-two alignment.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        match NonNull::new(raw) {
            Some(ptr) => AlignedBuf { ptr, len },
            None => alloc::handle_alloc_error(layout),
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_from(data: &[u8]) -> Self {
        let mut buf = Self::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised (zeroed at allocation) bytes owned by
        // `self`, or dangling-but-aligned with `len == 0`, which `from_raw_parts` allows.
        unsafe { slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` guarantees no other reference exists.
        unsafe { slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    fn layout(len: usize) -> Layout {
        match Layout::from_size_align(len, BUF_ALIGN) {
            Ok(layout) => layout,
            // Only for len > isize::MAX - 4095, which no allocator could satisfy anyway.
            Err(_) => panic!("AlignedBuf of {len} bytes exceeds the address space"),
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len != 0 {
            // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout and is freed once.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_writable() {
        for len in [1, 511, 4096, 4097, 1 << 20] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_slice().as_ptr() as usize % BUF_ALIGN, 0, "len {len}");
            assert_eq!(b.len(), len);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice()[len - 1] = 7;
            assert_eq!(b.as_slice()[len - 1], 7);
        }
    }

    #[test]
    fn empty_buffer_is_allowed() {
        let mut b = AlignedBuf::zeroed(0);
        assert!(b.is_empty());
        assert!(b.as_mut_slice().is_empty());
        assert_eq!(AlignedBuf::copy_from(&[]).len(), 0);
    }

    #[test]
    fn copy_from_copies() {
        let b = AlignedBuf::copy_from(b"hello");
        assert_eq!(b.as_slice(), b"hello");
        let moved = std::thread::spawn(move || b.as_slice().to_vec()).join().unwrap();
        assert_eq!(moved, b"hello");
    }
}
