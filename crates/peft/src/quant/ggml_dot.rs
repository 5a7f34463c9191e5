//! Few-row products `y[m, n] = x[m, k] · deq(W)[n, k]ᵀ` straight from GGUF's 32-value blocks
//! (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): the decode step of generation, where `m` is the batch and the
//! product only has to stream the blocks once. candle's dot products for Q4_1, Q5_0 and Q5_1 are
//! scalar loops (25–30x slower than these), and it has no kernel for an odd number of blocks per
//! row; these kernels cover every row length.
//!
//! Numerics are llama.cpp's CPU ones: each row of `x` is rounded to 8-bit blocks of 32 with one
//! f16 scale (`Q8_0`: Q4_0, Q5_0 and Q8_0 weights; `Q8_1`, which also stores the block's scaled
//! sum, for the weights with an offset, Q4_1 and Q5_1), exactly as candle's `from_float` rounds
//! them; each block pair gives an exact integer dot product, scaled by the two f16 scales:
//! `Σ_b d_w·d_x·Σ q_w q_x (+ m_w·s_x)`. The float order per output value is candle's and
//! llama.cpp's: the portable loop adds block by block as candle's scalar `vec_dot` does (so it
//! equals candle's scalar kernels bit for bit), the x86 kernels keep eight lane sums fused with
//! FMA and add them pairwise at the end as candle's and llama.cpp's AVX2 kernels do (so Q4_0 and
//! Q8_0 equal candle's `vec_dot` bit for bit; Q4_1/Q5_x add `Σ m_w·s_x` after the lanes as
//! llama.cpp does).
//!
//! Instruction sets, picked at run time: AVX-512 VNNI (`vpdpbusd` on 256-bit vectors, which
//! gives the very integers of the AVX2 path), AVX2 + FMA + F16C (`vpmaddubsw` + `vpmaddwd`), or
//! the portable loop. Four weight rows are multiplied at once against two quantized `x` rows
//! (eight independent FMA chains; each weight block decoded once for both), and rayon splits the output rows in tasks of at least
//! [`MIN_TASK_BYTES`] of blocks so that the small projections of a small model stay on one
//! thread.

use std::sync::OnceLock;

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

use super::ggml::{type_name, GgmlWeight};
use crate::{Error, Result};

/// Values per block (all the types here).
const QK: usize = 32;

/// Rows of `x` up to which a forward takes these kernels rather than the banded f32 product.
/// Each row of `x` costs these kernels a full pass of integer dot products, while the banded
/// product dequantizes once and runs an f32 GEMM: measured on one Zen 4 core (SmolLM2's Q4_1
/// shapes, `examples/ggml_dot_bench.rs`), the kernels take 0.55–0.7x the time of the dense f32
/// product at 8 rows, 0.8–1.1x at 16, and 1.2–1.3x at 32.
pub const MAX_ROWS: usize = 16;

/// The fewest block bytes (times rows of `x`) one rayon task multiplies: one task streams about
/// 10 GB/s, so 128 KiB is ~13 µs, a few times what waking a pool thread costs. SmolLM2-135M's
/// smallest projections (192 × 576 Q4_1, 69 KB) stay on the calling thread; its 576 × 576 ones
/// (207 KB) split in two.
pub const MIN_TASK_BYTES: usize = 128 << 10;

/// The instruction set a kernel runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust, block by block (any CPU).
    Portable,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 VL + VNNI on top of AVX2.
    Avx512Vnni,
}

impl Isa {
    /// The best one this CPU has (detected once).
    pub fn detect() -> Self {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                if has!("avx2") && has!("fma") && has!("f16c") {
                    if has!("avx512f") && has!("avx512vl") && has!("avx512vnni") {
                        return Isa::Avx512Vnni;
                    }
                    return Isa::Avx2;
                }
            }
            Isa::Portable
        })
    }

    /// Whether this CPU can run `self`.
    pub fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            Isa::Avx2 => Isa::detect() != Isa::Portable,
            Isa::Avx512Vnni => Isa::detect() == Isa::Avx512Vnni,
        }
    }
}

/// Whether these kernels multiply `dtype`'s blocks.
pub fn supports(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_0
    )
}

/// `y[m, n] (+)= x[m, k] · deq(w)ᵀ` with the best kernel this CPU has.
pub fn matmul(w: &GgmlWeight, x: &[f32], y: &mut [f32], accumulate: bool) -> Result<()> {
    matmul_with(Isa::detect(), w, x, y, accumulate)
}

/// [`matmul`] with the given instruction set (tests compare them), which must be
/// [`Isa::available`].
pub fn matmul_with(
    isa: Isa,
    w: &GgmlWeight,
    x: &[f32],
    y: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    let dtype = w.dtype();
    let (n, k) = w.dims();
    if !supports(dtype) {
        return Err(Error::Config(format!(
            "no few-row kernel for GGML type {}",
            type_name(dtype)
        )));
    }
    if !isa.available() {
        return Err(Error::Config(format!(
            "this CPU cannot run the {isa:?} kernels"
        )));
    }
    if k == 0 || !x.len().is_multiple_of(k) || y.len() != x.len() / k * n {
        return Err(Error::Config(format!(
            "a [{n}, {k}] {} product got {} input and {} output values",
            type_name(dtype),
            x.len(),
            y.len()
        )));
    }
    let m = x.len() / k;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let xq = Q8Rows::quantize(x, k, matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_1));
    let bytes = w.bytes();
    let rb = bytes.len() / n;
    // Output rows per task: at least MIN_TASK_BYTES of work, at most four tasks per thread.
    let threads = crate::threads::num_threads();
    let min_rows = MIN_TASK_BYTES.div_ceil(rb * m);
    let rows = min_rows.max(n.div_ceil(4 * threads)).next_multiple_of(4);
    // Results transposed, `[n, m]`, so that each task owns a contiguous slice.
    let mut yt = vec![0f32; n * m];
    let task = |(i, out): (usize, &mut [f32])| {
        let r0 = i * rows;
        let nr = out.len() / m;
        let w = &bytes[r0 * rb..(r0 + nr) * rb];
        match dtype {
            GgmlDType::Q4_0 => rows_dot::<Q4_0>(isa, w, rb, &xq, out),
            GgmlDType::Q4_1 => rows_dot::<Q4_1>(isa, w, rb, &xq, out),
            GgmlDType::Q5_0 => rows_dot::<Q5_0>(isa, w, rb, &xq, out),
            GgmlDType::Q5_1 => rows_dot::<Q5_1>(isa, w, rb, &xq, out),
            // `supports` admits only these five.
            _ => rows_dot::<Q8_0>(isa, w, rb, &xq, out),
        }
    };
    if rows >= n || threads == 1 {
        yt.chunks_mut(rows * m).enumerate().for_each(task);
    } else {
        yt.par_chunks_mut(rows * m).enumerate().for_each(task);
    }
    for (r, col) in yt.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            let dst = &mut y[i * n + r];
            *dst = if accumulate { *dst + v } else { v };
        }
    }
    Ok(())
}

/// Rows of `x` rounded to 8-bit blocks as candle's `BlockQ8_0::from_float` /
/// `BlockQ8_1::from_float` (llama.cpp's `quantize_row_q8_0/1` reference) round them.
struct Q8Rows {
    /// Blocks per row.
    nb: usize,
    qs: Vec<i8>,
    /// The f16 scale of each block, widened.
    d: Vec<f32>,
    /// Q8_1's f16 `d · Σ q` per block, widened (empty for Q8_0).
    s: Vec<f32>,
}

impl Q8Rows {
    /// Rounds `x` (rows of `k`, a multiple of 32) to Q8_1 blocks when `with_sum`, else Q8_0.
    fn quantize(x: &[f32], k: usize, with_sum: bool) -> Self {
        let nb = k / QK;
        let blocks = x.len() / QK;
        let mut qs = vec![0i8; blocks * QK];
        let mut d = Vec::with_capacity(blocks);
        let mut s = Vec::with_capacity(if with_sum { blocks } else { 0 });
        for (xs, q) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)) {
            let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
            let dv = amax / 127.0;
            let id = if dv != 0.0 { 1.0 / dv } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in q.iter_mut().zip(xs) {
                *q = f32::round(v * id) as i8;
                sum += *q as i32;
            }
            let d16 = f16::from_f32(dv);
            d.push(d16.to_f32());
            if with_sum {
                // candle: `f16::from_f32(sum as f32) * d`, a product of two f16 rounded to f16.
                s.push((f16::from_f32(sum as f32) * d16).to_f32());
            }
        }
        Self { nb, qs, d, s }
    }

    /// Block `b` of row `i`: its 32 values, scale, and (Q8_1) scaled sum.
    fn block(&self, i: usize, b: usize) -> (&[i8], f32, f32) {
        let j = i * self.nb + b;
        let s = self.s.get(j).copied().unwrap_or(0.0);
        (&self.qs[j * QK..(j + 1) * QK], self.d[j], s)
    }

    fn rows(&self) -> usize {
        self.d.len() / self.nb.max(1)
    }
}

/// One GGML block type's layout and integer dot product.
trait Block {
    /// Bytes per block.
    const BYTES: usize;
    /// Whether blocks carry an offset `m` (values are `d·q + m`; the dot adds `m·s_x`).
    const MIN: bool;
    /// `Σ q_w q_x` over the block (the weights' integer values, offset removed).
    fn dot_i32(b: &[u8], x: &[i8]) -> i32;
    /// Whether the weights' integer values are signed (dotted with llama.cpp's sign trick).
    const SIGNED: bool;
    /// The block's 32 integer values as bytes (i8 if `SIGNED`, else u8 below 32).
    ///
    /// # Safety
    /// `b` points to one whole block; the caller runs on a CPU with AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn values(b: *const u8) -> std::arch::x86_64::__m256i;
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// The 5th bits of a Q5 block's 32 values (`qh`, little-endian).
fn qh_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// `Σ lo(qs[j])·x[j] + hi(qs[j])·x[j + 16]` with `lo`/`hi` mapping each nibble (and its index)
/// to the weight's integer value.
fn nibble_dot(qs: &[u8], x: &[i8], value: impl Fn(u8, usize) -> i32) -> i32 {
    (0..QK / 2)
        .map(|j| value(qs[j] & 0xF, j) * x[j] as i32 + value(qs[j] >> 4, j + 16) * x[j + 16] as i32)
        .sum()
}

struct Q4_0;
struct Q4_1;
struct Q5_0;
struct Q5_1;
struct Q8_0;

impl Block for Q4_0 {
    const BYTES: usize = 18;
    const MIN: bool = false;
    const SIGNED: bool = true;
    fn dot_i32(b: &[u8], x: &[i8]) -> i32 {
        nibble_dot(&b[2..18], x, |q, _| q as i32 - 8)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn values(b: *const u8) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        // SAFETY: bytes 2..18 are the block's nibbles.
        let q = unsafe { x86::nibbles(b.add(2)) };
        _mm256_sub_epi8(q, _mm256_set1_epi8(8))
    }
}

impl Block for Q4_1 {
    const BYTES: usize = 20;
    const MIN: bool = true;
    const SIGNED: bool = false;
    fn dot_i32(b: &[u8], x: &[i8]) -> i32 {
        nibble_dot(&b[4..20], x, |q, _| q as i32)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn values(b: *const u8) -> std::arch::x86_64::__m256i {
        // SAFETY: bytes 4..20 are the block's nibbles.
        unsafe { x86::nibbles(b.add(4)) }
    }
}

impl Block for Q5_0 {
    const BYTES: usize = 22;
    const MIN: bool = false;
    const SIGNED: bool = true;
    fn dot_i32(b: &[u8], x: &[i8]) -> i32 {
        let qh = qh_at(b, 2);
        nibble_dot(&b[6..22], x, |q, j| {
            (q as i32 | (((qh >> j) & 1) << 4) as i32) - 16
        })
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn values(b: *const u8) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        // SAFETY: bytes 2..6 are the high bits, 6..22 the nibbles.
        let (q, hi) = unsafe { (x86::nibbles(b.add(6)), x86::bits(b.add(2))) };
        // `q - 16` where the 5th bit is clear, `q` where it is set (llama.cpp's trick: OR in
        // 0xF0, which is -16 in i8, where the bit is 0).
        _mm256_or_si256(q, _mm256_andnot_si256(hi, _mm256_set1_epi8(0xF0u8 as i8)))
    }
}

impl Block for Q5_1 {
    const BYTES: usize = 24;
    const MIN: bool = true;
    const SIGNED: bool = false;
    fn dot_i32(b: &[u8], x: &[i8]) -> i32 {
        let qh = qh_at(b, 4);
        nibble_dot(&b[8..24], x, |q, j| {
            q as i32 | (((qh >> j) & 1) << 4) as i32
        })
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn values(b: *const u8) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        // SAFETY: bytes 4..8 are the high bits, 8..24 the nibbles.
        let (q, hi) = unsafe { (x86::nibbles(b.add(8)), x86::bits(b.add(4))) };
        _mm256_or_si256(q, _mm256_and_si256(hi, _mm256_set1_epi8(0x10)))
    }
}

impl Block for Q8_0 {
    const BYTES: usize = 34;
    const MIN: bool = false;
    const SIGNED: bool = true;
    fn dot_i32(b: &[u8], x: &[i8]) -> i32 {
        b[2..34]
            .iter()
            .zip(x)
            .map(|(&q, &v)| q as i8 as i32 * v as i32)
            .sum()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn values(b: *const u8) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        // SAFETY: bytes 2..34 are the block's 32 values.
        unsafe { _mm256_loadu_si256(b.add(2) as *const __m256i) }
    }
}

/// `out[r·m + i] = Σ_b …` for the weight rows in `w` (`rb` bytes each) and every row `i` of `xq`.
fn rows_dot<B: Block>(isa: Isa, w: &[u8], rb: usize, xq: &Q8Rows, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `matmul_with` checked that this CPU has the instruction set.
        Isa::Avx512Vnni => unsafe { x86::rows_vnni::<B>(w, rb, xq, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::rows_avx2::<B>(w, rb, xq, out) },
        _ => rows_portable::<B>(w, rb, xq, out),
    }
}

/// Block by block, in candle's scalar `vec_dot` order: `sumf += Σq·d_w·d_x (+ m_w·s_x)`.
fn rows_portable<B: Block>(w: &[u8], rb: usize, xq: &Q8Rows, out: &mut [f32]) {
    let m = xq.rows();
    for (row, out) in w.chunks_exact(rb).zip(out.chunks_exact_mut(m)) {
        for (i, out) in out.iter_mut().enumerate() {
            let mut sumf = 0f32;
            for (b, blk) in row.chunks_exact(B::BYTES).enumerate() {
                let (xs, dx, sx) = xq.block(i, b);
                let sumi = B::dot_i32(blk, xs);
                sumf += if B::MIN {
                    sumi as f32 * f16_at(blk, 0) * dx + f16_at(blk, 2) * sx
                } else {
                    sumi as f32 * f16_at(blk, 0) * dx
                };
            }
            *out = sumf;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Block, Q8Rows};

    /// The 32 nibbles at `p` (16 bytes) as bytes: the low nibbles, then the high ones.
    ///
    /// # Safety
    /// `p` points to 16 readable bytes; AVX2.
    #[inline(always)]
    pub(super) unsafe fn nibbles(p: *const u8) -> __m256i {
        // SAFETY: the caller's 16 bytes.
        let t = unsafe { _mm_loadu_si128(p as *const __m128i) };
        let both = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4));
        _mm256_and_si256(both, _mm256_set1_epi8(0xF))
    }

    /// The 32 bits at `p` (4 bytes, little-endian) as bytes: 0xFF where the bit is set.
    ///
    /// # Safety
    /// `p` points to 4 readable bytes; AVX2.
    #[inline(always)]
    pub(super) unsafe fn bits(p: *const u8) -> __m256i {
        // SAFETY: the caller's 4 bytes.
        let v = unsafe { (p as *const i32).read_unaligned() };
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(v),
            _mm256_set_epi64x(
                0x0303030303030303,
                0x0202020202020202,
                0x0101010101010101,
                0,
            ),
        );
        let marked = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
        _mm256_cmpeq_epi8(marked, _mm256_set1_epi64x(-1))
    }

    /// Lane sums of `u · s` for unsigned bytes `u` (< 128) and signed bytes `s`.
    #[inline(always)]
    pub(super) unsafe fn dot_u8<const VNNI: bool>(u: __m256i, s: __m256i) -> __m256i {
        if VNNI {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
        } else {
            // No saturation: |u·s + u'·s'| ≤ 2·128·127 < 2^15.
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
        }
    }

    /// candle's and llama.cpp's `hsum_float_8`: halves, then pairs.
    #[inline(always)]
    unsafe fn hsum(x: __m256) -> f32 {
        let r = _mm_add_ps(_mm256_extractf128_ps::<1>(x), _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    #[inline(always)]
    unsafe fn f16_at(p: *const u8) -> f32 {
        // SAFETY: the caller's block starts with an f16.
        let bits = unsafe { (p as *const u16).read_unaligned() };
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// `R` weight rows (`rows[r]`, `nb` blocks each) against rows `xs[..]` of `xq`: each
    /// weight block is decoded once for the `M` rows of `x`. Every output keeps its own FMA
    /// chain, so the tile sizes do not change a result.
    #[inline(always)]
    unsafe fn dot_tile<B: Block, const R: usize, const M: usize, const VNNI: bool>(
        rows: [*const u8; R],
        nb: usize,
        xq: &Q8Rows,
        xs: [usize; M],
    ) -> [[f32; M]; R] {
        let mut acc = [[_mm256_setzero_ps(); M]; R];
        let mut summs = [[0f32; M]; R];
        for b in 0..nb {
            let x = xs.map(|i| xq.block(i, b));
            // SAFETY: each block of `x` is 32 bytes.
            let xv = x.map(|(q, _, _)| unsafe { _mm256_loadu_si256(q.as_ptr() as *const __m256i) });
            for r in 0..R {
                // SAFETY: block `b < nb` of a row of `nb` blocks.
                let blk = unsafe { rows[r].add(b * B::BYTES) };
                let (dw, q) = unsafe { (f16_at(blk), B::values(blk)) };
                // llama.cpp's sign trick: |q| (unsigned) times x with q's sign.
                let u = if B::SIGNED { _mm256_sign_epi8(q, q) } else { q };
                // SAFETY: offset types store `m` at bytes 2..4.
                let mw = if B::MIN {
                    unsafe { f16_at(blk.add(2)) }
                } else {
                    0.0
                };
                for j in 0..M {
                    let s = if B::SIGNED {
                        _mm256_sign_epi8(xv[j], q)
                    } else {
                        xv[j]
                    };
                    // SAFETY: AVX2 (+ VNNI when asked), as the caller promised.
                    let lanes = unsafe { dot_u8::<VNNI>(u, s) };
                    let d = _mm256_set1_ps(dw * x[j].1);
                    acc[r][j] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes), acc[r][j]);
                    if B::MIN {
                        summs[r][j] += mw * x[j].2;
                    }
                }
            }
        }
        let mut out = [[0f32; M]; R];
        for r in 0..R {
            for j in 0..M {
                // SAFETY: AVX2, as the caller promised.
                out[r][j] = unsafe { hsum(acc[r][j]) } + if B::MIN { summs[r][j] } else { 0.0 };
            }
        }
        out
    }

    /// `R` weight rows against every row of `xq`, two rows of `x` at a time.
    #[inline(always)]
    unsafe fn rows_tile<B: Block, const R: usize, const VNNI: bool>(
        rows: [*const u8; R],
        r0: usize,
        nb: usize,
        xq: &Q8Rows,
        out: &mut [f32],
    ) {
        let m = xq.rows();
        let mut i = 0;
        while i + 2 <= m {
            // SAFETY: the caller's rows are whole rows of `nb` blocks.
            let d = unsafe { dot_tile::<B, R, 2, VNNI>(rows, nb, xq, [i, i + 1]) };
            for (k, v) in d.into_iter().enumerate() {
                out[(r0 + k) * m + i] = v[0];
                out[(r0 + k) * m + i + 1] = v[1];
            }
            i += 2;
        }
        if i < m {
            // SAFETY: as above.
            let d = unsafe { dot_tile::<B, R, 1, VNNI>(rows, nb, xq, [i]) };
            for (k, v) in d.into_iter().enumerate() {
                out[(r0 + k) * m + i] = v[0];
            }
        }
    }

    #[inline(always)]
    unsafe fn rows_with<B: Block, const VNNI: bool>(
        w: &[u8],
        rb: usize,
        xq: &Q8Rows,
        out: &mut [f32],
    ) {
        let n = w.len() / rb;
        let nb = rb / B::BYTES;
        assert!(nb * B::BYTES == rb && out.len() == n * xq.rows() && xq.nb == nb);
        let row = |r: usize| w[r * rb..].as_ptr();
        let mut r = 0;
        while r + 4 <= n {
            let rows = [row(r), row(r + 1), row(r + 2), row(r + 3)];
            // SAFETY: rows `r..r + 4 ≤ n` are whole rows of `w` (asserted above).
            unsafe { rows_tile::<B, 4, VNNI>(rows, r, nb, xq, out) };
            r += 4;
        }
        for r in r..n {
            // SAFETY: row `r < n` is a whole row of `w`.
            unsafe { rows_tile::<B, 1, VNNI>([row(r)], r, nb, xq, out) };
        }
    }

    /// # Safety
    /// AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows_avx2<B: Block>(w: &[u8], rb: usize, xq: &Q8Rows, out: &mut [f32]) {
        unsafe { rows_with::<B, false>(w, rb, xq, out) }
    }

    /// # Safety
    /// AVX2, FMA, F16C and AVX-512 F + VL + VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub(super) unsafe fn rows_vnni<B: Block>(w: &[u8], rb: usize, xq: &Q8Rows, out: &mut [f32]) {
        unsafe { rows_with::<B, true>(w, rb, xq, out) }
    }
}
