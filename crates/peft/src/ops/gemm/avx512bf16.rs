//! bf16 × bf16 → f32 products with AVX512-BF16's `vdpbf16ps`, which multiplies 16 *pairs* of
//! bf16 values per register and adds both products into 16 f32 lanes: `c[j] += a[2j]·b[2j] +
//! a[2j+1]·b[2j+1]`. The operands are therefore packed pair-interleaved along k:
//!
//! - B (k × n) in strips of [`NR`] columns: for each pair of rows `(2p, 2p+1)`, the strip's NR
//!   columns as `(b[2p][j], b[2p+1][j])`, so one 64-byte load feeds 16 columns' pairs;
//! - A (m × k) in panels of [`MR`] rows: for each pair, the row's `(a[i][2p], a[i][2p+1])` as
//!   one 32-bit word, broadcast to all lanes.
//!
//! The loops are BLIS's: k in blocks of [`KC`] (a B strip, KC × NR × 2 bytes = 16 KiB, stays in
//! L1 while the A panels of a row block pass it), rows in blocks packed into a per-task buffer
//! (L2), and an `MR × NR` tile of f32 accumulators (24 of the 32 zmm registers) in the
//! micro-kernel. Odd k and ragged edges are zero-padded in the packed panels; edge tiles go
//! through a small buffer. Row blocks are rayon tasks on the global pool.

use std::arch::x86_64::*;

use half::bf16;
use rayon::prelude::*;

use super::{MatMut, MatRef};

/// Rows of the micro-tile.
const MR: usize = 12;
/// Columns of the micro-tile: two zmm registers of f32.
pub(super) const NR: usize = 32;
/// k per block (even).
const KC: usize = 256;
/// k pairs per block.
const KCP: usize = KC / 2;
/// Most rows packed at once: 192 × 256 bf16 = 96 KiB, a tenth of a Zen 4 / Sapphire Rapids L2.
const MC: usize = 192;

pub(super) fn detected() -> bool {
    std::is_x86_feature_detected!("avx512bf16") && std::is_x86_feature_detected!("avx512f")
}

/// `rhs` packed for [`matmul`].
pub(super) fn pack(rhs: &MatRef<bf16>, threads: usize) -> Vec<u16> {
    pack_b(rhs, KC, threads)
}

/// `dst = alpha · lhs · rhs (+ dst)`, `rhs` (`k × n`) packed by [`pack`]. The caller checked the
/// shapes agree and that k, m, n > 0.
pub(super) fn matmul(
    dst: MatMut,
    accumulate: bool,
    lhs: MatRef<bf16>,
    packed_b: &[u16],
    n: usize,
    alpha: f32,
    threads: usize,
) {
    assert!(detected(), "avx512bf16 kernel called on a CPU without it");
    let k = lhs.cols;
    let strips = n.div_ceil(NR);
    assert_eq!(
        packed_b.len(),
        k.div_ceil(KC) * strips * KC * NR,
        "B packed for another shape"
    );
    let rs = dst.rs;
    super::for_row_blocks(dst, MR, threads, |r0, rows, c| {
        let job = Job {
            lhs: &lhs,
            packed_b,
            n,
            k,
            strips,
            rs,
            accumulate,
            alpha,
        };
        job.rows(r0, rows, c);
    });
}

struct Job<'a> {
    lhs: &'a MatRef<'a, bf16>,
    packed_b: &'a [u16],
    n: usize,
    k: usize,
    strips: usize,
    rs: usize,
    accumulate: bool,
    alpha: f32,
}

impl Job<'_> {
    /// Rows `r0 .. r0 + rows` of the output, held in `c` (row `r0` first, rows `rs` apart).
    fn rows(&self, r0: usize, rows: usize, c: &mut [f32]) {
        let (n, rs) = (self.n, self.rs);
        let mc_max = rows.min(MC);
        // SAFETY: `pack_a` writes the `kp` pairs of every panel row the kernel then reads.
        let mut apack = unsafe { super::super::buffer::uninit(mc_max.div_ceil(MR) * KCP * MR) };
        let mut tmp = [0f32; MR * NR];
        for ic in (0..rows).step_by(MC) {
            let mc = MC.min(rows - ic);
            for pc in 0..self.k.div_ceil(KC) {
                let k0 = pc * KC;
                let kc = KC.min(self.k - k0);
                let kp = kc.div_ceil(2);
                pack_a(self.lhs, r0 + ic, mc, k0, kc, &mut apack);
                let load = self.accumulate || pc > 0;
                for js in 0..self.strips {
                    let j0 = js * NR;
                    let nw = NR.min(n - j0);
                    let b =
                        &self.packed_b[(pc * self.strips + js) * KCP * NR * 2..][..KCP * NR * 2];
                    for ip in 0..mc.div_ceil(MR) {
                        let i0 = ic + ip * MR;
                        let mh = MR.min(mc - ip * MR);
                        let a = &apack[ip * KCP * MR..][..KCP * MR];
                        if mh == MR && nw == NR {
                            let tile = &mut c[i0 * rs + j0..];
                            // SAFETY: `detected()` was asserted in `matmul`.
                            unsafe { kernel(kp, a, b, tile, rs, load, self.alpha) };
                        } else {
                            if load {
                                for i in 0..mh {
                                    tmp[i * NR..i * NR + nw]
                                        .copy_from_slice(&c[(i0 + i) * rs + j0..][..nw]);
                                }
                            }
                            // SAFETY: as above.
                            unsafe { kernel(kp, a, b, &mut tmp, NR, load, self.alpha) };
                            for i in 0..mh {
                                c[(i0 + i) * rs + j0..][..nw]
                                    .copy_from_slice(&tmp[i * NR..i * NR + nw]);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// B in k blocks of `kc_block / 2` pairs (the last zero-padded), each in strips of [`NR`]
/// columns: `out[((block · strips + strip) · kc_block / 2 + p) · NR · 2 + 2 j + h] =
/// b[block · kc_block + 2p + h][strip · NR + j]`. Shared with the AMX kernel, whose B tiles
/// are the two 64-byte halves of 16 such pair rows.
pub(super) fn pack_b(b: &MatRef<bf16>, kc_block: usize, threads: usize) -> Vec<u16> {
    let (k, n) = (b.rows, b.cols);
    let strips = n.div_ceil(NR);
    let kblocks = k.div_ceil(kc_block);
    let panel = kc_block * NR;
    // SAFETY: `fill` writes every element a kernel reads: all NR columns of the first
    // `kpad` rows of each panel (zeros past the matrix), `kpad` covering the last 32-value chunk
    // the AMX kernel reads and the last pair the AVX512-BF16 kernel reads. Rows past `kpad` are
    // never read.
    let mut out = unsafe { super::super::buffer::uninit(kblocks * strips * panel) };
    let fill = |(idx, dst): (usize, &mut [u16])| {
        let (pc, js) = (idx / strips, idx % strips);
        let (k0, j0) = (pc * kc_block, js * NR);
        let kc = kc_block.min(k - k0);
        let kpad = kc.next_multiple_of(32).min(kc_block);
        let nw = NR.min(n - j0);
        let bits = |kk: usize, j: usize| b.at(k0 + kk, j0 + j).to_bits();
        // Read B along its contiguous direction: rows when its columns are adjacent (the
        // backward's `W`), columns when its rows are (the forward's `Wᵀ`).
        if b.cs == 1 {
            for kk in 0..kc {
                let row = &mut dst[(kk / 2) * NR * 2 + (kk & 1)..];
                let src = &b.data[(k0 + kk) * b.rs + j0..][..nw];
                for (j, v) in src.iter().enumerate() {
                    row[2 * j] = v.to_bits();
                }
            }
        } else if b.rs == 1 {
            // Each column's k values are adjacent: copy them a pair at a time.
            for j in 0..nw {
                let src = &b.data[(j0 + j) * b.cs + k0..][..kc];
                let mut pairs = src.chunks_exact(2);
                for (p, pair) in pairs.by_ref().enumerate() {
                    let d = &mut dst[p * NR * 2 + 2 * j..][..2];
                    d[0] = pair[0].to_bits();
                    d[1] = pair[1].to_bits();
                }
                if let [last] = pairs.remainder() {
                    dst[(kc / 2) * NR * 2 + 2 * j] = last.to_bits();
                }
            }
        } else {
            for j in 0..nw {
                for kk in 0..kc {
                    dst[(kk / 2) * NR * 2 + 2 * j + (kk & 1)] = bits(kk, j);
                }
            }
        }
        for kk in 0..kc {
            for j in nw..NR {
                dst[(kk / 2) * NR * 2 + 2 * j + (kk & 1)] = 0;
            }
        }
        dst[kc.div_ceil(2) * NR * 2..(kpad / 2) * NR * 2].fill(0);
        if kc % 2 == 1 {
            // The odd last row's partner in its pair.
            for j in 0..NR {
                dst[(kc / 2) * NR * 2 + 2 * j + 1] = 0;
            }
        }
    };
    if threads > 1 {
        out.par_chunks_mut(panel).enumerate().for_each(fill);
    } else {
        out.chunks_mut(panel).enumerate().for_each(fill);
    }
    out
}

/// Rows `i0 .. i0 + mc`, columns `k0 .. k0 + kc` of A into panels of [`MR`] rows:
/// `out[(panel · KCP + p) · MR + i] = a[row][k0 + 2p] | a[row][k0 + 2p + 1] << 16`, zero past
/// the edges.
fn pack_a(a: &MatRef<bf16>, i0: usize, mc: usize, k0: usize, kc: usize, out: &mut [u32]) {
    let kp = kc.div_ceil(2);
    for ip in 0..mc.div_ceil(MR) {
        let panel = &mut out[ip * KCP * MR..][..KCP * MR];
        for ii in 0..MR {
            let r = ip * MR + ii;
            if r >= mc {
                for p in 0..kp {
                    panel[p * MR + ii] = 0;
                }
                continue;
            }
            let row = i0 + r;
            if a.cs == 1 {
                let src = &a.data[row * a.rs + k0..][..kc];
                let mut pairs = src.chunks_exact(2);
                for (p, pair) in pairs.by_ref().enumerate() {
                    panel[p * MR + ii] =
                        pair[0].to_bits() as u32 | (pair[1].to_bits() as u32) << 16;
                }
                if let [last] = pairs.remainder() {
                    panel[(kp - 1) * MR + ii] = last.to_bits() as u32;
                }
            } else {
                for p in 0..kp {
                    let lo = a.at(row, k0 + 2 * p).to_bits() as u32;
                    let hi = if 2 * p + 1 < kc {
                        a.at(row, k0 + 2 * p + 1).to_bits() as u32
                    } else {
                        0
                    };
                    panel[p * MR + ii] = lo | hi << 16;
                }
            }
        }
    }
}

/// One `MR × NR` tile: `c = alpha · Σ_p a_p ⊗ b_p (+ c when load)` over `kp` packed pairs.
///
/// # Safety
/// The CPU must have AVX512-BF16 and AVX-512F.
#[target_feature(enable = "avx512bf16,avx512f")]
unsafe fn kernel(
    kp: usize,
    a: &[u32],
    b: &[u16],
    c: &mut [f32],
    ldc: usize,
    load: bool,
    alpha: f32,
) {
    assert!(kp <= KCP && a.len() >= kp * MR && b.len() >= kp * NR * 2);
    assert!(ldc >= NR && c.len() >= (MR - 1) * ldc + NR);
    let mut acc0 = [_mm512_setzero_ps(); MR];
    let mut acc1 = [_mm512_setzero_ps(); MR];
    let (mut ap, mut bp) = (a.as_ptr(), b.as_ptr());
    for _ in 0..kp {
        // SAFETY: the asserts above keep `ap` within `a` (kp · MR words) and `bp` within `b`
        // (kp · NR · 2 halves) for every step of this loop; unaligned loads are allowed.
        unsafe {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp as *const __m512i));
            let b1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(bp.add(32) as *const __m512i));
            for i in 0..MR {
                let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(i) as i32));
                acc0[i] = _mm512_dpbf16_ps(acc0[i], ai, b0);
                acc1[i] = _mm512_dpbf16_ps(acc1[i], ai, b1);
            }
            ap = ap.add(MR);
            bp = bp.add(NR * 2);
        }
    }
    let va = _mm512_set1_ps(alpha);
    for i in 0..MR {
        // SAFETY: row i of the tile is c[i·ldc .. i·ldc + NR], inside `c` by the assert above.
        unsafe {
            let row = c.as_mut_ptr().add(i * ldc);
            let mut r0 = _mm512_mul_ps(acc0[i], va);
            let mut r1 = _mm512_mul_ps(acc1[i], va);
            if load {
                r0 = _mm512_add_ps(r0, _mm512_loadu_ps(row));
                r1 = _mm512_add_ps(r1, _mm512_loadu_ps(row.add(16)));
            }
            _mm512_storeu_ps(row, r0);
            _mm512_storeu_ps(row.add(16), r1);
        }
    }
}
