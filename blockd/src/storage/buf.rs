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

use bytes::{buf::UninitSlice, BufMut, Bytes};

/// Address alignment of every non-empty buffer. Direct I/O needs the memory aligned to the
/// device's logical block (512 or 4096) or to `stx_dio_mem_align`; a page covers all of them and
/// makes large buffers page-granular for the kernel.
pub const BUF_ALIGN: usize = 4096;

/// An initialised heap buffer whose address is aligned to [`BUF_ALIGN`]: zeroed, a copy, or
/// filled from a reader ([`Filler`]). Only `zeroed` writes zeroes first; a payload that is about
/// to be overwritten whole is not written twice (a 1 MiB write paid a `memset` per MiB).
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

    /// A buffer holding a copy of `data`, written once (not zeroed first).
    pub fn copy_from(data: &[u8]) -> Self {
        let mut fill = Filler::new(data.len());
        fill.put_slice(data);
        match fill.finish() {
            Ok(buf) => buf,
            Err(_) => unreachable!("a filler of data.len() bytes is full after put_slice(data)"),
        }
    }

    /// An allocation of `len` bytes not yet initialised; only [`Filler`] holds one.
    fn uninit(len: usize) -> NonNull<u8> {
        if len == 0 {
            return NonNull::dangling();
        }
        let layout = Self::layout(len);
        // SAFETY: `layout` has a non-zero size (len > 0) and a valid power-of-two alignment.
        let raw = unsafe { alloc::alloc(layout) };
        NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised bytes (see the type's doc) owned by
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
            // SAFETY: `ptr` came from `alloc_zeroed` or `alloc` (through `Filler`) with exactly
            // this layout and is freed once.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

/// A whole [`AlignedBuf`] frozen for sharing: read-only, cloned by a reference count, still
/// aligned (it cannot be sliced). A mirrored write hands one to the local engine and a clone of
/// its bytes to the peer's frame, so the payload is not copied for the peer; the memory is freed
/// when both are done with it.
#[derive(Clone)]
pub struct SharedBuf(Bytes);

impl SharedBuf {
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The same bytes as a [`Bytes`] (for a frame), without a copy.
    pub fn bytes(&self) -> Bytes {
        self.0.clone()
    }

    /// Received bytes that already start on a [`BUF_ALIGN`] boundary (the replication reader
    /// places a write's payload so), shared as they are; anything else comes back.
    pub fn from_aligned(bytes: Bytes) -> Result<SharedBuf, Bytes> {
        match bytes.as_ptr() as usize % BUF_ALIGN {
            0 => Ok(SharedBuf(bytes)),
            _ => Err(bytes),
        }
    }

    /// `bytes` shared as they are when aligned, else copied once into an aligned buffer.
    pub fn aligned_or_copied(bytes: Bytes) -> SharedBuf {
        SharedBuf::from_aligned(bytes)
            .unwrap_or_else(|b| SharedBuf::from(AlignedBuf::copy_from(&b)))
    }
}

impl From<AlignedBuf> for SharedBuf {
    fn from(buf: AlignedBuf) -> Self {
        SharedBuf(Bytes::from_owner(buf))
    }
}

impl fmt::Debug for Filler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Filler").field("len", &self.len).field("filled", &self.filled).finish()
    }
}

impl fmt::Debug for SharedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedBuf").field("len", &self.len()).finish_non_exhaustive()
    }
}

/// An [`AlignedBuf`] being filled front to back, as a [`BufMut`]: a socket reads straight into
/// it (`read_buf`) without the memory being zeroed first. It becomes the buffer only once every
/// byte is written ([`finish`](Self::finish)), so no uninitialised byte is ever read.
pub struct Filler {
    /// Start of an allocation of `len` bytes, of which `filled` are initialised.
    ptr: NonNull<u8>,
    len: usize,
    filled: usize,
}

// SAFETY: as for `AlignedBuf`: the allocation is owned exclusively.
unsafe impl Send for Filler {}

impl Filler {
    pub fn new(len: usize) -> Self {
        Filler { ptr: AlignedBuf::uninit(len), len, filled: 0 }
    }

    /// Bytes still to be written.
    pub fn missing(&self) -> usize {
        self.len - self.filled
    }

    /// The buffer, once full; otherwise the filler back.
    pub fn finish(self) -> Result<AlignedBuf, Filler> {
        if self.filled != self.len {
            return Err(self);
        }
        let this = std::mem::ManuallyDrop::new(self);
        // Every byte is initialised: ownership of the allocation passes to the buffer.
        Ok(AlignedBuf { ptr: this.ptr, len: this.len })
    }
}

// SAFETY: `chunk_mut` is exactly the unwritten tail `filled..len` of the allocation, and
// `advance_mut` only counts bytes the caller wrote there (its contract), never past `len`.
unsafe impl BufMut for Filler {
    fn remaining_mut(&self) -> usize {
        self.missing()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        assert!(cnt <= self.missing(), "advance_mut past the end of a Filler");
        self.filled += cnt;
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        // SAFETY: `filled <= len`, so the tail is inside the allocation (empty when full; the
        // dangling pointer of a zero-length filler is never dereferenced) and owned by `self`.
        unsafe {
            UninitSlice::from_raw_parts_mut(self.ptr.as_ptr().add(self.filled), self.missing())
        }
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        if self.len != 0 {
            // SAFETY: allocated in `AlignedBuf::uninit` with this layout; `finish` does not run
            // this drop (ManuallyDrop), so it is freed once.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), AlignedBuf::layout(self.len)) }
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
    fn a_filler_is_a_buffer_only_once_full() {
        let mut f = Filler::new(8192);
        f.put_slice(&[1; 5000]);
        assert_eq!(f.missing(), 3192);
        let mut f = f.finish().expect_err("not full");
        f.put_slice(&[2; 3192]);
        assert_eq!(f.remaining_mut(), 0);
        let b = f.finish().expect("full");
        assert_eq!(b.as_slice().as_ptr() as usize % BUF_ALIGN, 0);
        assert!(b.as_slice()[..5000].iter().all(|&x| x == 1));
        assert!(b.as_slice()[5000..].iter().all(|&x| x == 2));
        drop(Filler::new(4096)); // never filled: freed, never read
        assert!(Filler::new(0).finish().expect("empty is full").is_empty());
    }

    #[test]
    fn a_shared_buffer_keeps_its_alignment_and_bytes() {
        let s = SharedBuf::from(AlignedBuf::copy_from(&[3; 8192]));
        let wire = s.bytes();
        drop(s.clone());
        assert_eq!(s.as_slice().as_ptr() as usize % BUF_ALIGN, 0);
        assert_eq!(wire.as_ptr(), s.as_slice().as_ptr(), "no copy");
        drop(s);
        assert_eq!(&wire[..], &[3; 8192][..]);
    }

    #[test]
    fn received_bytes_are_shared_only_when_aligned() {
        let whole = SharedBuf::from(AlignedBuf::copy_from(&[4; 12288])).bytes();
        let at = SharedBuf::from_aligned(whole.slice(4096..)).expect("aligned");
        assert_eq!(at.as_slice().as_ptr(), whole[4096..].as_ptr(), "no copy");
        let off = SharedBuf::from_aligned(whole.slice(48..)).expect_err("not aligned");
        let copied = SharedBuf::aligned_or_copied(off);
        assert_eq!(copied.as_slice().as_ptr() as usize % BUF_ALIGN, 0);
        assert_eq!(copied.as_slice(), &whole[48..]);
    }

    #[test]
    fn copy_from_copies() {
        let b = AlignedBuf::copy_from(b"hello");
        assert_eq!(b.as_slice(), b"hello");
        let moved = std::thread::spawn(move || b.as_slice().to_vec()).join().unwrap();
        assert_eq!(moved, b"hello");
    }
}
