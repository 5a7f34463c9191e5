//! Scaled dot-product attention as one graph node on the CPU.
//!
//! Composed from candle ops, attention is about fifteen graph nodes per layer (head split and
//! its copies, scaling, `q kᵀ`, mask, softmax, dropout, `p v`, head merge), each with its own
//! pass over a `[batch, heads, t, s]` or `[batch, t, hidden]` tensor forward and two more in
//! backward (candle accumulates every gradient into a fresh zero tensor). Here the heads are
//! read in place from the projections' `[batch, t, heads * head_dim]` layout through strides,
//! each `(batch, head)` pair is one task for rayon, and the probabilities are not stored: the
//! backward recomputes them from `q` and `k` (one small product per head, as flash attention
//! does), which also keeps a `[batch, heads, t, s]` tensor per layer out of memory.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::fused::{contiguous_f32, dropout_params, exp_f32, fast, keep, simd_fn, with_f32};
use crate::Result;

/// `softmax(q kᵀ · scale + mask)` with dropout on the probabilities, times `v`, for `q`
/// `[batch, t, heads * d]` and `k`, `v` `[batch, s, heads * d]` (heads side by side, as the
/// projections produce them). `mask` is additive and broadcasts to `[batch, 1, t, s]`. Returns
/// `[batch, t, heads * d]`, the heads merged back.
#[allow(clippy::too_many_arguments)]
pub fn attention_merged_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    scale: f64,
    dropout: f64,
    train: bool,
) -> Result<Tensor> {
    let (b, t, hd) = q.dims3()?;
    let s = k.dim(1)?;
    let d = hd / heads;
    let p = if train { dropout } else { 0.0 };
    if super::bf16_cpu(q) && super::bf16_cpu(k) && super::bf16_cpu(v) && p < 1.0 {
        // The attention products are ~5 % of a BERT layer's; f32 inside keeps one node.
        let f = |x: &Tensor| x.to_dtype(candle_core::DType::F32);
        let y = attention_merged_heads(&f(q)?, &f(k)?, &f(v)?, heads, mask, scale, dropout, train)?;
        return Ok(y.to_dtype(candle_core::DType::BF16)?);
    }
    if !(fast(q) && fast(k) && fast(v)) || p >= 1.0 {
        let split = |x: &Tensor, n: usize| -> Result<Tensor> {
            Ok(x.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous()?)
        };
        let (qh, kh, vh) = (split(q, t)?, split(k, s)?, split(v, s)?);
        if super::attention_node_applies(q, None, dropout, train) {
            let y = super::attention_node(&qh, &kh, &vh, mask, None, scale, dropout, train)?;
            return Ok(y.transpose(1, 2)?.reshape((b, t, hd))?);
        }
        let scores = (qh * scale)?.matmul(&kh.t()?)?;
        let probs = super::dropout(&super::masked_softmax(&scores, mask)?, dropout, train)?;
        return Ok(probs.matmul(&vh)?.transpose(1, 2)?.reshape((b, t, hd))?);
    }
    let kv_heads = k.dim(2)? / d.max(1);
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) || k.dim(2)? != kv_heads * d {
        return Err(crate::Error::ShapeMismatch {
            name: "attention keys (heads side by side)".into(),
            expected: vec![b, s, hd],
            found: k.dims().to_vec(),
        });
    }
    let shape = Dims {
        b,
        t,
        s,
        heads,
        kv_heads,
        d,
    };
    let layouts = (Heads::merged(t, heads, d), Heads::merged(s, kv_heads, d));
    fused(q, k, v, shape, layouts, mask, scale, p)
}

/// Attention for queries `[batch, heads, t, d]` and keys and values `[batch, kv_heads, s, d]`
/// (`heads` a multiple of `kv_heads`: grouped-query attention reads each key/value head for
/// `heads / kv_heads` query heads, without repeating it), as one node: `[batch, heads, t, d]`.
/// `mask` as for [`attention_merged_heads`]. `None` unless all three are f32 on the CPU.
pub fn attention_split_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    dropout: f64,
    train: bool,
) -> Result<Option<Tensor>> {
    let p = if train { dropout } else { 0.0 };
    if !(fast(q) && fast(k) && fast(v)) || p >= 1.0 {
        return Ok(None);
    }
    let (b, heads, t, d) = q.dims4()?;
    let (kb, kv_heads, s, kd) = k.dims4()?;
    if kb != b
        || kd != d
        || kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
        || v.dims() != k.dims()
    {
        return Err(crate::Error::ShapeMismatch {
            name: "attention keys and values".into(),
            expected: vec![b, kv_heads, s, d],
            found: [k.dims(), v.dims()].concat(),
        });
    }
    let shape = Dims {
        b,
        t,
        s,
        heads,
        kv_heads,
        d,
    };
    let layouts = (Heads::split(t, heads, d), Heads::split(s, kv_heads, d));
    fused(q, k, v, shape, layouts, mask, scale, p).map(Some)
}

struct Dims {
    b: usize,
    t: usize,
    s: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
}

/// The one-node attention over inputs laid out as `(ql, kl)` say.
#[allow(clippy::too_many_arguments)]
fn fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    Dims {
        b,
        t,
        s,
        heads,
        kv_heads,
        d,
    }: Dims,
    (ql, kl): (Heads, Heads),
    mask: Option<&Tensor>,
    scale: f64,
    p: f64,
) -> Result<Tensor> {
    let mask = match mask {
        None => None,
        Some(m) => {
            let (mb, _, mt, ms) = m.dims4()?;
            if ms != s || (mb != 1 && mb != b) || (mt != 1 && mt != t) {
                return Err(crate::Error::ShapeMismatch {
                    name: "attention mask".into(),
                    expected: vec![b, 1, t, s],
                    found: m.dims().to_vec(),
                });
            }
            let data: Vec<f32> = m
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            let batch_stride = if mb == 1 { 0 } else { mt * s };
            let row_stride = if mt == 1 { 0 } else { s };
            Some((data, batch_stride, row_stride))
        }
    };
    let drop = (p > 0.0).then(|| {
        let seed = super::next_dropout_seed();
        let (threshold, keep_scale) = dropout_params(p);
        (seed, threshold, keep_scale)
    });
    let op = Attention {
        b,
        t,
        s,
        heads,
        kv_heads,
        d,
        ql,
        kl,
        scale: scale as f32,
        mask,
        drop,
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

struct Attention {
    b: usize,
    t: usize,
    s: usize,
    heads: usize,
    /// Key/value heads: each serves `heads / kv_heads` query heads (grouped-query attention).
    kv_heads: usize,
    d: usize,
    /// Where a query head's rows are in `q` (and in the output and its gradient).
    ql: Heads,
    /// Where a key/value head's rows are in `k` and `v`.
    kl: Heads,
    scale: f32,
    /// Additive mask data with its batch and row strides (0 where broadcast).
    mask: Option<(Vec<f32>, usize, usize)>,
    /// Dropout seed, drop threshold out of 2^32, keep scale.
    drop: Option<(u64, u32, f32)>,
}

/// Strides, in elements, of one batch, one head and one row of a `[batch, rows, heads, d]`
/// (heads side by side, the projections' layout) or `[batch, heads, rows, d]` tensor.
#[derive(Clone, Copy)]
struct Heads {
    batch: usize,
    head: usize,
    row: usize,
}

impl Heads {
    /// `[batch, rows, heads * d]`.
    fn merged(rows: usize, heads: usize, d: usize) -> Self {
        Heads {
            batch: rows * heads * d,
            head: d,
            row: heads * d,
        }
    }

    /// `[batch, heads, rows, d]`.
    fn split(rows: usize, heads: usize, d: usize) -> Self {
        Heads {
            batch: heads * rows * d,
            head: rows * d,
            row: d,
        }
    }

    fn at(&self, bi: usize, h: usize) -> usize {
        bi * self.batch + h * self.head
    }
}

/// A pointer that rayon tasks may share: each task writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: tasks write disjoint elements (one `(batch, head)` block each).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// Taking `self` makes a closure capture the whole (shareable) wrapper, not the raw field.
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

simd_fn!(
    pub(super) fn softmax_row(row: &mut [f32], mask: &[f32]) {
        if !mask.is_empty() {
            for (r, &m) in row.iter_mut().zip(mask) {
                *r += m;
            }
        }
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        for r in row.iter_mut() {
            *r = exp_f32(*r - max);
        }
        let sum: f32 = row.iter().sum();
        let inv = 1.0 / sum;
        for r in row.iter_mut() {
            *r *= inv;
        }
    }
);

simd_fn!(
    fn apply_drop(row: &mut [f32], seed: u64, start: u64, threshold: u32, scale: f32) {
        for (j, r) in row.iter_mut().enumerate() {
            *r *= keep(seed, start + j as u64, threshold, scale);
        }
    }
);

// `ds = p ⊙ (dp - rowsum(dp ⊙ p))`, in place of `dp`.
simd_fn!(
    fn softmax_bwd_row(p: &[f32], dp: &mut [f32]) {
        let dot: f32 = p.iter().zip(dp.iter()).map(|(a, b)| a * b).sum();
        for (g, &p) in dp.iter_mut().zip(p) {
            *g = p * (*g - dot);
        }
    }
);

/// `dst (m×n) = beta · lhs (m×k) · rhs (k×n)`, strides as (row, column), single-threaded (the
/// caller runs one product per rayon task).
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    mnk: (usize, usize, usize),
    dst: *mut f32,
    dst_s: (usize, usize),
    lhs: *const f32,
    lhs_s: (usize, usize),
    rhs: *const f32,
    rhs_s: (usize, usize),
    beta: f32,
) {
    // SAFETY: the caller's contract.
    unsafe { mm_acc(mnk, dst, dst_s, lhs, lhs_s, rhs, rhs_s, beta, false) }
}

/// [`mm`], adding to `dst` when `acc` (`dst += beta · lhs · rhs`).
#[allow(clippy::too_many_arguments)]
unsafe fn mm_acc(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
    acc: bool,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        acc,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        if acc { 1.0 } else { 0.0 },
        beta,
        false,
        false,
        false,
        Parallelism::None,
    )
}

impl Attention {
    /// Batch, head, and the offsets of query head `task % heads` of batch `task / heads` in `q`
    /// (and the output) and of the key/value head it reads in `k`/`v`.
    fn offsets(&self, task: usize) -> (usize, usize, usize, usize) {
        let (bi, h) = (task / self.heads, task % self.heads);
        let kv = h / (self.heads / self.kv_heads);
        (bi, h, self.ql.at(bi, h), self.kl.at(bi, kv))
    }

    /// The probabilities (before dropout) of one `(batch, head)` pair into `p` (`t × s`).
    fn probs(&self, q: &[f32], k: &[f32], task: usize, p: &mut [f32]) {
        let (t, s, d) = (self.t, self.s, self.d);
        let (bi, _, qo, ko) = self.offsets(task);
        // SAFETY: the shapes were checked by candle; offsets stay inside q, k and p.
        unsafe {
            mm(
                (t, s, d),
                p.as_mut_ptr(),
                (s, 1),
                q[qo..].as_ptr(),
                (self.ql.row, 1),
                k[ko..].as_ptr(),
                (1, self.kl.row),
                self.scale,
            )
        };
        for (i, row) in p.chunks_exact_mut(s).enumerate() {
            let m: &[f32] = match &self.mask {
                Some((data, bs, rs)) => &data[bi * bs + i * rs..][..s],
                None => &[],
            };
            softmax_row(row, m);
        }
    }

    fn drop_rows(&self, task: usize, p: &mut [f32]) {
        if let Some((seed, threshold, scale)) = self.drop {
            let base = (task * self.t * self.s) as u64;
            for (i, row) in p.chunks_exact_mut(self.s).enumerate() {
                apply_drop(row, seed, base + (i * self.s) as u64, threshold, scale);
            }
        }
    }

    fn forward(&self, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let (t, s) = (self.t, self.s);
        // SAFETY (all buffers here): the products overwrite (`read_dst` off), and the tasks'
        // heads tile the outputs, `p` and `dp` whole.
        let mut out = unsafe { super::buffer::uninit(self.b * t * self.heads * self.d) };
        let dst = Shared(out.as_mut_ptr());
        (0..self.b * self.heads).into_par_iter().for_each(|task| {
            let mut p = unsafe { super::buffer::uninit(t * s) };
            self.probs(q, k, task, &mut p);
            self.drop_rows(task, &mut p);
            let (_, _, qo, vo) = self.offsets(task);
            // SAFETY: this task alone writes head `h` of batch `bi` of the output.
            unsafe {
                mm(
                    (t, self.d, s),
                    dst.at(qo),
                    (self.ql.row, 1),
                    p.as_ptr(),
                    (s, 1),
                    v[vo..].as_ptr(),
                    (self.kl.row, 1),
                    1.0,
                )
            };
        });
        out
    }

    /// Gradients with respect to `q`, `k` and `v` given that of the output, `g`. One task per
    /// key/value head: the query heads that share it add into its `dk` and `dv` in turn.
    fn backward(&self, q: &[f32], k: &[f32], v: &[f32], g: &[f32]) -> [Vec<f32>; 3] {
        let (t, s, d) = (self.t, self.s, self.d);
        let (qr, kr) = (self.ql.row, self.kl.row);
        let groups = self.heads / self.kv_heads;
        // SAFETY: as in `forward`: every element is written by an overwriting product (the
        // first query head of each group overwrites its `dk` and `dv`, the others add).
        let mut dq = unsafe { super::buffer::uninit(q.len()) };
        let mut dk = unsafe { super::buffer::uninit(k.len()) };
        let mut dv = unsafe { super::buffer::uninit(v.len()) };
        let (pq, pk, pv) = (
            Shared(dq.as_mut_ptr()),
            Shared(dk.as_mut_ptr()),
            Shared(dv.as_mut_ptr()),
        );
        (0..self.b * self.kv_heads)
            .into_par_iter()
            .for_each(|kv_task| {
                let (bi, kv) = (kv_task / self.kv_heads, kv_task % self.kv_heads);
                let mut p = unsafe { super::buffer::uninit(t * s) };
                let mut dp = unsafe { super::buffer::uninit(t * s) };
                for j in 0..groups {
                    let task = bi * self.heads + kv * groups + j;
                    let (_, _, qo, ko) = self.offsets(task);
                    let acc = j > 0;
                    self.probs(q, k, task, &mut p);
                    // SAFETY (all products): offsets stay inside their buffers, and this task
                    // alone writes the query heads of key/value head `kv` of batch `bi` in dq,
                    // and that head in dk and dv.
                    unsafe {
                        // dp' = g vᵀ
                        mm(
                            (t, s, d),
                            dp.as_mut_ptr(),
                            (s, 1),
                            g[qo..].as_ptr(),
                            (qr, 1),
                            v[ko..].as_ptr(),
                            (1, kr),
                            1.0,
                        );
                    }
                    let dropped;
                    let pd: &[f32] = if self.drop.is_some() {
                        let mut x = p.clone();
                        self.drop_rows(task, &mut x);
                        // The same mask scales dp' (dropout's backward).
                        self.drop_rows(task, &mut dp);
                        dropped = x;
                        &dropped
                    } else {
                        &p
                    };
                    unsafe {
                        // dv (+)= pdᵀ g
                        mm_acc(
                            (s, d, t),
                            pv.at(ko),
                            (kr, 1),
                            pd.as_ptr(),
                            (1, s),
                            g[qo..].as_ptr(),
                            (qr, 1),
                            1.0,
                            acc,
                        );
                    }
                    for (p, dp) in p.chunks_exact(s).zip(dp.chunks_exact_mut(s)) {
                        softmax_bwd_row(p, dp);
                    }
                    unsafe {
                        // dq = scale · ds k ; dk (+)= scale · dsᵀ q
                        mm(
                            (t, d, s),
                            pq.at(qo),
                            (qr, 1),
                            dp.as_ptr(),
                            (s, 1),
                            k[ko..].as_ptr(),
                            (kr, 1),
                            self.scale,
                        );
                        mm_acc(
                            (s, d, t),
                            pk.at(ko),
                            (kr, 1),
                            dp.as_ptr(),
                            (1, s),
                            q[qo..].as_ptr(),
                            (qr, 1),
                            self.scale,
                            acc,
                        );
                    }
                }
            });
        [dq, dk, dv]
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            contiguous_f32(s1, l1, "attention")?,
            contiguous_f32(s2, l2, "attention")?,
            contiguous_f32(s3, l3, "attention")?,
        );
        Ok((CpuStorage::F32(self.forward(q, k, v)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dq, dk, dv] = with_f32(q, |qv| {
            with_f32(k, |kv| {
                with_f32(v, |vv| with_f32(grad, |gv| self.backward(qv, kv, vv, gv)))
            })
        })????;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}
