//! [`AlignedVec`]: a growable buffer whose first element sits on a 64-byte boundary.
//!
//! The CPU kernels read activations and write outputs in whole 32/64-byte vectors, and prefill
//! jobs write runs of one cache line each. The system allocator returns 16-byte aligned blocks
//! (large ones at a page plus 16 bytes), so with a plain `Vec` every other 32-byte load split
//! two cache lines and the jobs' output runs shared lines with their neighbours' (written by
//! the other thread at the same time). `Vec` cannot be asked for a larger alignment on stable
//! Rust (the allocator API is unstable), hence this small hand-written type; it is only what
//! the tensors need: a length fixed at creation, `resize`, and slice access.

use std::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use bytemuck::Pod;

/// The alignment of every [`AlignedVec`]: one x86 cache line, one AVX-512 vector.
pub const ALIGN: usize = 64;

/// A heap buffer of `len` values of `T` starting on a 64-byte boundary.
pub struct AlignedVec<T: Pod> {
    ptr: NonNull<T>,
    len: usize,
    /// Bytes from the start of the allocation to `ptr`.
    offset: usize,
}

// SAFETY: it owns its values like a Vec<T>.
unsafe impl<T: Pod + Send> Send for AlignedVec<T> {}
unsafe impl<T: Pod + Sync> Sync for AlignedVec<T> {}

impl<T: Pod> AlignedVec<T> {
    /// The allocation behind `len` values: [`ALIGN`] bytes more than they need, at the
    /// alignment `calloc` gives, so that `alloc_zeroed` stays `calloc`. Asking the allocator
    /// for 64-byte alignment instead makes std's `alloc_zeroed` write every byte, which maps
    /// all pages at once: a KV cache or a batch-sized buffer would then count in full in the
    /// resident memory before a single position is used.
    fn layout(len: usize) -> Layout {
        size_of::<T>()
            .checked_mul(len)
            .and_then(|bytes| bytes.checked_add(ALIGN))
            .and_then(|bytes| Layout::from_size_align(bytes, align_of::<T>().max(16)).ok())
            .expect("AlignedVec: size overflows isize")
    }

    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        if len == 0 || size_of::<T>() == 0 {
            return AlignedVec {
                ptr: NonNull::dangling(),
                len,
                offset: 0,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        if raw.is_null() {
            handle_alloc_error(layout);
        }
        let offset = raw.align_offset(ALIGN);
        // SAFETY: offset < ALIGN, and the allocation has ALIGN spare bytes past len values; the
        // offset is a multiple of align_of::<T>() (both raw and raw + offset are aligned to it).
        let ptr = unsafe { NonNull::new_unchecked(raw.add(offset) as *mut T) };
        AlignedVec { ptr, len, offset }
    }

    /// `len` copies of `v` (zeros are left to the allocator, so their pages stay unmapped until
    /// written, as with [`AlignedVec::zeroed`]).
    pub fn filled(len: usize, v: T) -> Self {
        let mut a = Self::zeroed(len);
        if bytemuck::bytes_of(&v).iter().any(|&b| b != 0) {
            a.fill(v);
        }
        a
    }

    /// Grows or shrinks to `len` values: the first `min(len, old len)` kept, new ones `v`.
    pub fn resize(&mut self, len: usize, v: T) {
        if len == self.len {
            return;
        }
        let mut grown = Self::filled(len, v);
        let keep = len.min(self.len);
        grown[..keep].copy_from_slice(&self[..keep]);
        *self = grown;
    }
}

impl<T: Pod> Drop for AlignedVec<T> {
    fn drop(&mut self) {
        if self.len != 0 && size_of::<T>() != 0 {
            // SAFETY: allocated in `zeroed` with this very layout, `offset` bytes before `ptr`.
            unsafe {
                let raw = (self.ptr.as_ptr() as *mut u8).sub(self.offset);
                dealloc(raw, Self::layout(self.len))
            };
        }
    }
}

impl<T: Pod> Deref for AlignedVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `len` initialised values at `ptr` (dangling only when empty or zero-sized).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Pod> DerefMut for AlignedVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Pod> Default for AlignedVec<T> {
    fn default() -> Self {
        Self::zeroed(0)
    }
}

impl<T: Pod> Clone for AlignedVec<T> {
    fn clone(&self) -> Self {
        Self::from(&self[..])
    }
}

impl<T: Pod + std::fmt::Debug> std::fmt::Debug for AlignedVec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self[..].fmt(f)
    }
}

impl<T: Pod + PartialEq> PartialEq for AlignedVec<T> {
    fn eq(&self, other: &Self) -> bool {
        self[..] == other[..]
    }
}

impl<T: Pod + PartialEq> PartialEq<Vec<T>> for AlignedVec<T> {
    fn eq(&self, other: &Vec<T>) -> bool {
        self[..] == other[..]
    }
}

impl<T: Pod + PartialEq> PartialEq<AlignedVec<T>> for Vec<T> {
    fn eq(&self, other: &AlignedVec<T>) -> bool {
        self[..] == other[..]
    }
}

impl<T: Pod> From<&[T]> for AlignedVec<T> {
    fn from(values: &[T]) -> Self {
        let mut a = Self::zeroed(values.len());
        a.copy_from_slice(values);
        a
    }
}

impl<T: Pod> From<Vec<T>> for AlignedVec<T> {
    fn from(values: Vec<T>) -> Self {
        Self::from(&values[..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_on_a_cache_line_and_keeps_values_across_resizes() {
        for len in [0usize, 1, 15, 64, 4097, 300_000] {
            let mut a = AlignedVec::<f32>::zeroed(len);
            assert_eq!(a.len(), len);
            assert!(a.iter().all(|&v| v == 0.0), "len {len}: not zeroed");
            // (an empty buffer owns no memory: its pointer is only a placeholder)
            assert!(
                len == 0 || (a.as_ptr() as usize).is_multiple_of(ALIGN),
                "len {len}: misaligned"
            );
            a.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32);
            a.resize(len + 3, -1.0);
            assert_eq!(
                a.as_ptr() as usize % ALIGN,
                0,
                "len {len}: misaligned after growing"
            );
            for (i, &v) in a.iter().enumerate() {
                let want = if i < len { i as f32 } else { -1.0 };
                assert_eq!(v, want, "len {len}: index {i} after growing");
            }
            a.resize(len / 2, 0.0);
            assert_eq!(a.len(), len / 2);
            assert!(a.iter().enumerate().all(|(i, &v)| v == i as f32));
            let b = a.clone();
            assert_eq!(&b[..], &a[..]);
            assert!(b.is_empty() || (b.as_ptr() as usize).is_multiple_of(ALIGN));
        }
        let q = AlignedVec::from(vec![1i8, -2, 3]);
        assert_eq!(&q[..], &[1, -2, 3]);
        assert_eq!(q.as_ptr() as usize % ALIGN, 0);
    }

    /// A large zeroed buffer maps no pages until they are written (as `vec![0; n]` does), so a
    /// KV cache sized for the whole context does not count in the resident memory up front.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_large_zeroed_buffer_is_not_resident_until_used() {
        let resident = || -> usize {
            let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
            let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
            pages * 4096
        };
        let before = resident();
        let mut a = AlignedVec::<f32>::zeroed(64 << 20); // 256 MiB
        let mut b = AlignedVec::<f32>::default();
        b.resize(64 << 20, 0.0);
        let after = resident();
        assert!(
            after < before + (32 << 20),
            "allocating 2 × 256 MiB of zeros made {} MiB resident",
            (after - before) >> 20
        );
        assert!(b.iter().step_by(4096).all(|&v| v == 0.0));
        a[12345] = 1.0;
        assert_eq!(a[12345], 1.0);
        assert_eq!(a[(64 << 20) - 1], 0.0);
    }
}
