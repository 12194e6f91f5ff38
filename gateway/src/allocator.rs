//! The binary's allocator: mimalloc, asked for a plain block wherever a plain block is aligned
//! enough (docs/performance.md, session 24).
//!
//! The `mimalloc` crate's adapter hands every layout to `mi_malloc_aligned`. Its fast path covers
//! blocks up to 1 KiB; a larger block of an ordinary alignment (a header map's entries, an encoded
//! request, a string lifted out of a plugin) falls to mimalloc's generic aligned path, which for
//! most size classes over-allocates and marks the page as holding aligned blocks, and its free
//! then has to find each block's start again: 8 such allocations per request on the pooled
//! policies chain, ~1k instructions. A plain `mi_malloc` block of 16 bytes or more is aligned to
//! 16 (a page's first block is, and every size class from 16 up is a multiple of 16) and a
//! smaller one to 8, so a layout whose alignment is at most 16 and at most its size is served
//! plainly, as Rust's own `System` allocator does with `malloc`. Larger alignments (Tokio's task
//! cells ask for 128) keep the aligned calls.
//!
//! The C library is mimalloc's v2 line (`libmimalloc-sys` with `v2`): with v3 and this adapter,
//! a pooled chain's request took a fresh page from the arena and retired it again each time.
//!
//! Public so that the hot-path benchmarks run on the allocator the binary does: the costs they
//! report are the binary's (docs/performance.md, session 25).

#![allow(
    unsafe_code,
    reason = "`GlobalAlloc` is unsafe to implement and mimalloc is C: the binary's one exception"
)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment of every mimalloc block of at least this size (`MI_MAX_ALIGN_SIZE`).
const PLAIN_ALIGN: usize = 16;

/// mimalloc as the global allocator, plain where that is aligned enough.
pub struct MiMalloc;

/// Whether a plain mimalloc block of `size` bytes is aligned to `align`.
#[inline]
fn plain(size: usize, align: usize) -> bool {
    align <= PLAIN_ALIGN && align <= size
}

// SAFETY: every block comes from mimalloc, aligned as its layout asks (`plain`, or mimalloc's
// aligned calls), and is freed or resized by mimalloc, which accepts blocks from either kind of
// call. A null return is an allocation failure, as `GlobalAlloc` requires.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain C allocation calls; `layout.align()` is a power of two.
        unsafe {
            match plain(layout.size(), layout.align()) {
                true => mi::mi_malloc(layout.size()),
                false => mi::mi_malloc_aligned(layout.size(), layout.align()),
            }
        }
        .cast()
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe {
            match plain(layout.size(), layout.align()) {
                true => mi::mi_zalloc(layout.size()),
                false => mi::mi_zalloc_aligned(layout.size(), layout.align()),
            }
        }
        .cast()
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: the caller passes a block this allocator returned, once.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller passes a live block of this allocator and a non-zero size; the
        // new block keeps `layout`'s alignment either way.
        unsafe {
            match plain(new_size, layout.align()) {
                true => mi::mi_realloc(ptr.cast::<c_void>(), new_size),
                false => mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()),
            }
        }
        .cast()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size from 1 byte to past mimalloc's small and medium classes, at every alignment
    /// from 1 to 4 KiB: each block is aligned as asked, holds its bytes, and keeps them when it
    /// grows or shrinks.
    #[test]
    fn blocks_are_aligned_as_their_layouts_ask_and_keep_their_bytes() {
        let sizes = (1..=300)
            .chain((300..5_000).step_by(37))
            .chain([8_192, 70_000, 1 << 20]);
        let mut checked = 0;
        for size in sizes {
            for shift in 0..=12 {
                let align = 1usize << shift;
                let layout = Layout::from_size_align(size, align).expect("a valid layout");
                // Several at once, so that they come from different places in a page.
                let blocks: Vec<*mut u8> = (0..3)
                    .map(|_| {
                        // SAFETY: a non-zero size; freed below with the same layout.
                        let block = unsafe { MiMalloc.alloc(layout) };
                        assert!(!block.is_null());
                        assert_eq!(block as usize % align, 0, "{size} bytes at {align}");
                        // SAFETY: `size` bytes are the block's.
                        unsafe { block.write_bytes(size as u8, size) };
                        block
                    })
                    .collect();
                for block in blocks {
                    let grown = size * 3 + 5;
                    // SAFETY: a live block of `layout`, a non-zero new size.
                    let moved = unsafe { MiMalloc.realloc(block, layout, grown) };
                    assert_eq!(
                        moved as usize % align,
                        0,
                        "{size} -> {grown} bytes at {align}"
                    );
                    // SAFETY: the first `size` bytes were kept by `realloc`.
                    let kept = unsafe { std::slice::from_raw_parts(moved, size) };
                    assert!(kept.iter().all(|&byte| byte == size as u8));
                    let grown_layout = Layout::from_size_align(grown, align).expect("valid");
                    // SAFETY: the live block, now of `grown_layout`.
                    unsafe { MiMalloc.dealloc(moved, grown_layout) };
                }
                // SAFETY: as above; zeroed blocks are read back as zeros.
                let zeroed = unsafe { MiMalloc.alloc_zeroed(layout) };
                assert_eq!(zeroed as usize % align, 0, "zeroed {size} bytes at {align}");
                // SAFETY: `size` bytes are the block's.
                let bytes = unsafe { std::slice::from_raw_parts(zeroed, size) };
                assert!(bytes.iter().all(|&byte| byte == 0));
                // SAFETY: the live block of `layout`.
                unsafe { MiMalloc.dealloc(zeroed, layout) };
                checked += 1;
            }
        }
        assert!(checked > 4_000);
    }

    #[test]
    fn only_alignments_a_plain_block_has_are_served_plainly() {
        assert!(plain(1, 1));
        assert!(plain(8, 8));
        assert!(plain(4_096, 16));
        assert!(
            !plain(4, 8),
            "a 4-byte block may sit at any 4-byte boundary"
        );
        assert!(!plain(256, 32));
        assert!(!plain(640, 128));
    }
}
