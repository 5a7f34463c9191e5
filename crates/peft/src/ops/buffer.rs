//! Output buffers that are not cleared first.
//!
//! `vec![0.0; n]` asks the allocator for zeroed memory. A training step frees and reallocates
//! the same few megabytes of activations over and over, so the allocator hands back used memory
//! and must clear it: on the MiniLM step (Sapphire Rapids, one thread) that `memset` was 16 %
//! of the profile, most of it for outputs the next statement overwrites whole (a product
//! without accumulation, an element-wise map). candle allocates its own outputs the same way
//! (`CpuDevice::alloc_uninit`).

/// Plain numbers: every bit pattern is a value, and none needs dropping.
pub(crate) trait Plain: Copy {}
impl Plain for f32 {}
impl Plain for u16 {}
impl Plain for u32 {}
impl Plain for half::bf16 {}

/// A vector of `n` elements whose contents are unspecified.
///
/// # Safety
/// The caller must write every element before reading any of it (through the vector or a
/// slice of it).
// clippy's `uninit_vec` guards against handing out uninitialised elements; that is this
// function's purpose, and its callers' contract (above) is what makes it sound to use.
#[allow(clippy::uninit_vec)]
pub(crate) unsafe fn uninit<T: Plain>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: the capacity is `n`; `T` is a plain number with no drop glue, and the caller
    // writes each element before it is read.
    unsafe { v.set_len(n) };
    v
}
