//! f32 ⇄ bf16 conversion passes for the bf16 training path: branch-free so they vectorise
//! (`half`'s per-element conversion has a NaN branch), and split over the cores.

use half::bf16;
use rayon::prelude::*;

use super::fused::{simd_fn, CHUNK};

/// `x` rounded to the nearest bf16, ties to even, as `half::bf16::from_f32` (NaN stays NaN).
#[inline(always)]
fn round(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) | 0x40) as u16;
    if x.is_nan() {
        nan
    } else {
        rounded
    }
}

simd_fn!(
    fn narrow_kernel(x: &[f32], y: &mut [u16]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = round(x);
        }
    }
);

simd_fn!(
    fn widen_kernel(x: &[u16], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = f32::from_bits((x as u32) << 16);
        }
    }
);

/// `x` rounded to bf16.
pub(crate) fn narrow(x: &[f32]) -> Vec<bf16> {
    // SAFETY: the chunks cover `out` and the kernel writes each element of its chunk.
    let mut out = unsafe { super::buffer::uninit(x.len()) };
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| {
            // `bf16` is `repr(transparent)` over its `u16` bits.
            let bits: &mut [u16] = bytemuck_bits_mut(o);
            narrow_kernel(x, bits)
        });
    out
}

/// `x` widened to f32 (exact).
pub(crate) fn widen(x: &[bf16]) -> Vec<f32> {
    // SAFETY: as in `narrow`.
    let mut out = unsafe { super::buffer::uninit(x.len()) };
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| widen_kernel(bytemuck_bits(x), o));
    out
}

fn bytemuck_bits_mut(x: &mut [bf16]) -> &mut [u16] {
    // SAFETY: `half::bf16` is `#[repr(transparent)]` over `u16`: same size, alignment and
    // validity (every bit pattern is a valid bf16), so the slice may be viewed as its bits.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut u16, x.len()) }
}

fn bytemuck_bits(x: &[bf16]) -> &[u16] {
    // SAFETY: as in `bytemuck_bits_mut`.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u16, x.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrow_matches_half_round_to_nearest_even_and_widen_is_exact() {
        let mut xs: Vec<f32> = (0..100_000)
            .map(|i| ((i as f32) * 0.731).sin() * 10f32.powi(i % 30 - 15))
            .collect();
        // Ties (exactly halfway between two bf16 values), both parities, and the specials.
        xs.extend([
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            -0.0,
            f32::NAN,
        ]);
        let got = narrow(&xs);
        for (x, g) in xs.iter().zip(&got) {
            let want = bf16::from_f32(*x);
            if x.is_nan() {
                assert!(g.is_nan());
            } else {
                assert_eq!(g.to_bits(), want.to_bits(), "{x}");
            }
        }
        let back = widen(&got);
        for (g, b) in got.iter().zip(&back) {
            assert!(g.is_nan() && b.is_nan() || g.to_f32().to_bits() == b.to_bits());
        }
    }
}
