//! bf16 × bf16 → f32 products on AMX tiles (Sapphire Rapids and later Intel Xeons).
//!
//! An AMX core holds eight tile registers of up to 16 rows × 64 bytes; `tdpbf16ps` multiplies a
//! 16 × 32 bf16 tile of A by a 32 × 16 tile of B (stored as 16 rows of k *pairs*,
//! `(b[2p][j], b[2p+1][j])`, the same pair-interleaving as the AVX512-BF16 kernel's) into a
//! 16 × 16 f32 tile of C: 8,192 multiply-adds per instruction, about 16 times what one
//! `vdpbf16ps` does. On Sapphire Rapids `vdpbf16ps` runs at the f32 FMA rate, so the AVX512-BF16
//! kernel gains nothing over f32 there; AMX is what makes bf16 products faster than f32 ones.
//!
//! The micro-kernel keeps a 32 × 32 block of C in four tiles (tmm0–3), loads two A tiles
//! (tmm4–5, rows 0–15 and 16–31) and two B tiles (tmm6–7, columns 0–15 and 16–31) per 32 values
//! of k, and issues four `tdpbf16ps`. B is packed by [`super::avx512bf16::pack_b`]
//! (strips of 32 columns, a k pair per 128-byte row, so the two B tiles are the two 64-byte
//! halves of the same rows); A is packed per task into panels of 32 rows × 32 k, 64 bytes per
//! row, so an A tile is 16 consecutive rows of a panel. Partial k chunks and ragged edges are
//! zero in the packs; C tiles are stored to a 32 × 32 buffer, scaled and added to the output.
//!
//! Linux hands out AMX's tile state only to a process that asks for it
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); [`detected`] asks once, and reports
//! AMX unavailable when the CPU or the kernel says no. The instructions are written with `asm!`
//! (Rust's AMX intrinsics are not stable); tile registers are never touched by compiled code,
//! so they survive between the `asm!` blocks of one task, which loads the tile configuration at
//! its start and releases the tiles at its end.

use std::arch::asm;
use std::sync::OnceLock;

use half::bf16;

use super::avx512bf16::{pack_b, NR};
use super::{MatMut, MatRef};

/// Rows of the micro-tile: two A tiles of 16 rows.
const MR: usize = 32;
/// k per block (a multiple of [`KCHUNK`]): a B strip block is 512 × 32 × 2 bytes = 32 KiB.
const KC: usize = 512;
/// k per `tdpbf16ps`: 16 pairs, 64 bytes per tile row.
const KCHUNK: usize = 32;
/// Most rows packed at once: 128 × 512 bf16 = 128 KiB of a 2 MiB L2.
const MC: usize = 128;

/// Whether this CPU has AMX-BF16 and the kernel lets this process use the tiles.
pub(super) fn detected() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = (leaf7.edx >> 22 & 1 == 1, leaf7.edx >> 24 & 1 == 1);
        amx_bf16 && amx_tile && request_tile_permission()
    })
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: permission, for the whole process,
/// to use the 8 KiB tile-data state. Without it the first tile instruction raises SIGILL.
#[cfg(target_os = "linux")]
fn request_tile_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with this code only changes which extended states the process may
    // use; it reads and writes no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    if rc != 0 {
        tracing::debug!(
            "AMX: the kernel refused tile permission ({}); bf16 products use another backend",
            std::io::Error::last_os_error()
        );
    }
    rc == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_permission() -> bool {
    false
}

/// The 64-byte tile configuration: palette 1, all eight tiles 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
            c[48 + t] = 16; // rows
        }
        Self(c)
    }
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
    assert!(
        detected(),
        "AMX kernel called on a CPU (or kernel) without it"
    );
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
        let panel = KC * MR; // bf16 values per packed A panel
                             // SAFETY: `pack_a` writes every row of the `chunks` chunks the tile loads then read.
        let mut apack = unsafe { super::super::buffer::uninit(rows.min(MC).div_ceil(MR) * panel) };
        let mut acc = Acc([0f32; MR * NR]);
        let cfg = TileConfig::new();
        // SAFETY: `detected()` (asserted by the caller) means the CPU has AMX and the process
        // may use it; the configuration is a valid palette-1 layout.
        unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
        for ic in (0..rows).step_by(MC) {
            let mc = MC.min(rows - ic);
            for pc in 0..self.k.div_ceil(KC) {
                let k0 = pc * KC;
                let kc = KC.min(self.k - k0);
                let chunks = kc.div_ceil(KCHUNK);
                pack_a(self.lhs, r0 + ic, mc, k0, kc, &mut apack);
                let load = self.accumulate || pc > 0;
                for js in 0..self.strips {
                    let j0 = js * NR;
                    let nw = NR.min(n - j0);
                    let b = &self.packed_b[(pc * self.strips + js) * KC * NR..][..KC * NR];
                    for ip in 0..mc.div_ceil(MR) {
                        let a = &apack[ip * panel..][..panel];
                        // SAFETY: tiles configured above; `a` and `b` hold `chunks` full
                        // 32-row × 32-k chunks each (asserted inside).
                        unsafe { tile_product(chunks, a, b, &mut acc) };
                        let i0 = ic + ip * MR;
                        let mh = MR.min(mc - ip * MR);
                        for i in 0..mh {
                            let out = &mut c[(i0 + i) * rs + j0..][..nw];
                            let sum = &acc.0[i * NR..][..nw];
                            if load {
                                for (o, s) in out.iter_mut().zip(sum) {
                                    *o += self.alpha * s;
                                }
                            } else {
                                for (o, s) in out.iter_mut().zip(sum) {
                                    *o = self.alpha * s;
                                }
                            }
                        }
                    }
                }
            }
        }
        // SAFETY: releases the tile state this task configured.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// A 32 × 32 f32 block, aligned for the tile stores.
#[repr(C, align(64))]
struct Acc([f32; MR * NR]);

/// `acc = Σ_chunks A_chunk · B_chunk` for one 32-row panel of A and one 32-column strip of B.
///
/// # Safety
/// The calling thread must have loaded the all-16 × 64-byte tile configuration.
unsafe fn tile_product(chunks: usize, a: &[u16], b: &[u16], acc: &mut Acc) {
    // Each chunk: A is 32 rows × 32 values (2,048 bytes), B 16 pair rows × 64 values.
    assert!(chunks * KCHUNK * MR <= a.len() && chunks * KCHUNK * NR <= b.len());
    let (mut ap, mut bp) = (a.as_ptr(), b.as_ptr());
    // SAFETY (all blocks below): the assert keeps every tile load inside `a` (rows of 64 bytes,
    // 64 apart) and `b` (rows of 64 bytes, 128 apart); the stores write `acc`'s 32 rows of
    // 128 bytes.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        for _ in 0..chunks {
            asm!(
                "tileloadd tmm4, [{a} + {s64}*1]",
                "tileloadd tmm5, [{a1} + {s64}*1]",
                "tileloadd tmm6, [{b} + {s128}*1]",
                "tileloadd tmm7, [{b1} + {s128}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a = in(reg) ap,
                a1 = in(reg) ap.add(16 * KCHUNK),
                b = in(reg) bp,
                b1 = in(reg) bp.add(32),
                s64 = in(reg) 64usize,
                s128 = in(reg) 128usize,
                options(nostack, readonly)
            );
            ap = ap.add(KCHUNK * MR);
            bp = bp.add(KCHUNK * NR);
        }
        let cp = acc.0.as_mut_ptr();
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) cp,
            c1 = in(reg) cp.add(16),
            c2 = in(reg) cp.add(16 * NR),
            c3 = in(reg) cp.add(16 * NR + 16),
            s = in(reg) 128usize,
            options(nostack)
        );
    }
}

/// Rows `i0 .. i0 + mc`, columns `k0 .. k0 + kc` of A into panels of [`MR`] rows, each as
/// chunks of [`KCHUNK`] values: `out[panel·KC·MR + (q·MR + i)·KCHUNK + t] = a[i0 + panel·MR +
/// i][k0 + q·KCHUNK + t]`, zero past the edges (so padded k pairs multiply B's zero padding).
fn pack_a(a: &MatRef<bf16>, i0: usize, mc: usize, k0: usize, kc: usize, out: &mut [u16]) {
    let chunks = kc.div_ceil(KCHUNK);
    for ip in 0..mc.div_ceil(MR) {
        let panel = &mut out[ip * KC * MR..][..KC * MR];
        for q in 0..chunks {
            let kq = k0 + q * KCHUNK;
            let kw = KCHUNK.min(k0 + kc - kq);
            for ii in 0..MR {
                let dst = &mut panel[(q * MR + ii) * KCHUNK..][..KCHUNK];
                let r = ip * MR + ii;
                if r >= mc {
                    dst.fill(0);
                    continue;
                }
                let row = i0 + r;
                if a.cs == 1 {
                    let src = &a.data[row * a.rs + kq..][..kw];
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d = s.to_bits();
                    }
                } else {
                    for (t, d) in dst[..kw].iter_mut().enumerate() {
                        *d = a.at(row, kq + t).to_bits();
                    }
                }
                dst[kw..].fill(0);
            }
        }
    }
}
