//! Attention without a backward pass (generation, evaluation) on the CPU, reading a key/value
//! cache in place and sharing each key/value head between its group of query heads.
//!
//! The composed attention copies the cache several times per layer and token: grouped-query
//! heads are repeated (`repeat_kv`: one copy of K and V per query head), `kᵀ` is made contiguous
//! for the product (another copy of K), and each batched product is a loop of small `gemm` calls
//! with a rayon hand-off each. Decoding one token needs none of it: for each `(batch, kv head)`
//! the `groups · t` query rows meet the cache's key rows in dot products (the rows are read
//! where they are, any strides), the scores go through the masked softmax, and the value rows
//! are summed with those weights: one task per `(batch, kv head)`, one pass over K and V.

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};
use rayon::prelude::*;

use super::attention::softmax_row;
use super::fused::simd_fn;
use crate::Result;

/// Multiply-adds below which the op runs on the calling thread.
const PAR_MIN_WORK: usize = 1 << 18;

simd_fn!(
    // `p[j] = scale · q · k_j`, key row `j` at `k[j · stride..][..q.len()]`.
    fn scores(p: &mut [f32], q: &[f32], k: &[f32], stride: usize, scale: f32) {
        let d = q.len();
        for (j, pj) in p.iter_mut().enumerate() {
            let kr = &k[j * stride..j * stride + d];
            let mut acc = [0f32; 16];
            let (qc, kc) = (q.chunks_exact(16), kr.chunks_exact(16));
            let tail: f32 = qc
                .remainder()
                .iter()
                .zip(kc.remainder())
                .map(|(x, y)| x * y)
                .sum();
            for (x, y) in qc.zip(kc) {
                for l in 0..16 {
                    acc[l] += x[l] * y[l];
                }
            }
            *pj = scale * (acc.iter().sum::<f32>() + tail);
        }
    }
);

simd_fn!(
    // `o = Σ_j p[j] · v_j`, value row `j` at `v[j · stride..][..o.len()]`.
    fn weighted_sum(o: &mut [f32], p: &[f32], v: &[f32], stride: usize) {
        let d = o.len();
        for (j, &pj) in p.iter().enumerate() {
            for (x, y) in o.iter_mut().zip(&v[j * stride..j * stride + d]) {
                *x += pj * y;
            }
        }
    }
);

/// A 4-d f32 tensor's data and strides, the last one 1.
struct View<'a> {
    data: &'a [f32],
    offset: usize,
    strides: [usize; 3],
}

/// `data` seen through `l`, when its last dimension (of `d` elements) is contiguous.
fn view<'a>(data: &'a [f32], l: &Layout, d: usize) -> Option<View<'a>> {
    let st = l.stride();
    (st[3] == 1 || d == 1).then(|| View {
        data,
        offset: l.start_offset(),
        strides: [st[0], st[1], st[2]],
    })
}

/// `softmax(q kᵀ · scale + mask) v` for `q` `[batch, heads, t, d]` and `k`, `v`
/// `[batch, kv_heads, s, d]` (`heads` a multiple of `kv_heads`; heads `g · groups ..` share kv
/// head `g`), `mask` additive and broadcast to `[batch, 1, t, s]`. Returns `[batch, heads, t,
/// d]`, or `None` when this op does not serve the inputs (not all f32 on the CPU, a last
/// dimension that is not contiguous, or any input recording gradients: the caller then uses the
/// composed attention, which has a backward pass).
pub fn cached_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Option<Tensor>> {
    let cpu_f32 = |x: &Tensor| x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() == 4;
    if !(cpu_f32(q) && cpu_f32(k) && cpu_f32(v)) || q.track_op() || k.track_op() || v.track_op() {
        return Ok(None);
    }
    let (b, heads, t, d) = q.dims4()?;
    let (kb, kv_heads, s, kd) = k.dims4()?;
    if kb != b || kd != d || v.dims() != k.dims() || kv_heads == 0 || heads % kv_heads != 0 {
        return Ok(None);
    }
    let mask = match mask {
        None => None,
        Some(m) => {
            let (mb, mh, mt, ms) = m.dims4()?;
            if ms != s || mh != 1 || (mb != 1 && mb != b) || (mt != 1 && mt != t) {
                return Ok(None);
            }
            let data: Vec<f32> = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            Some((
                data,
                if mb == 1 { 0 } else { mt * s },
                if mt == 1 { 0 } else { s },
            ))
        }
    };
    let groups = heads / kv_heads;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (
        Storage::Cpu(CpuStorage::F32(qd)),
        Storage::Cpu(CpuStorage::F32(kd)),
        Storage::Cpu(CpuStorage::F32(vd)),
    ) = (&*qs, &*ks, &*vs)
    else {
        return Ok(None);
    };
    let (Some(qv), Some(kv), Some(vv)) = (view(qd, ql, d), view(kd, kl, d), view(vd, vl, d)) else {
        return Ok(None);
    };
    // Every element the tasks read lies inside its storage: checked once here, so that the
    // row slices below cannot panic halfway through (and bad layouts give an error).
    for (x, dims) in [
        (&qv, [b, heads, t]),
        (&kv, [b, kv_heads, s]),
        (&vv, [b, kv_heads, s]),
    ] {
        if dims.contains(&0) || d == 0 {
            continue;
        }
        let last: usize = (0..3).map(|a| (dims[a] - 1) * x.strides[a]).sum::<usize>();
        if x.offset + last + d > x.data.len() {
            let msg = "cached attention: a view reaches past its storage";
            return Err(candle_core::Error::Msg(msg.into()).into());
        }
    }
    let row = |x: &View, i0: usize, i1: usize, i2: usize| -> usize {
        x.offset + i0 * x.strides[0] + i1 * x.strides[1] + i2 * x.strides[2]
    };
    let block = groups * t * d;
    let mut out = vec![0f32; b * heads * t * d];
    let task = |(c, o): (usize, &mut [f32])| {
        let (bi, g) = (c / kv_heads, c % kv_heads);
        let mut p = vec![0f32; s];
        for r in 0..groups * t {
            let (h, i) = (g * groups + r / t, r % t);
            let qo = row(&qv, bi, h, i);
            let qrow = &qv.data[qo..qo + d];
            let k0 = row(&kv, bi, g, 0);
            scores(&mut p, qrow, &kv.data[k0..], kv.strides[2], scale as f32);
            let m: &[f32] = match &mask {
                Some((data, bs, rs)) => &data[bi * bs + i * rs..][..s],
                None => &[],
            };
            softmax_row(&mut p, m);
            let v0 = row(&vv, bi, g, 0);
            weighted_sum(
                &mut o[r * d..(r + 1) * d],
                &p,
                &vv.data[v0..],
                vv.strides[2],
            );
        }
    };
    if block > 0 {
        if b * heads * t * s * d >= PAR_MIN_WORK && b * kv_heads > 1 {
            out.par_chunks_mut(block).enumerate().for_each(task);
        } else {
            out.chunks_mut(block).enumerate().for_each(task);
        }
    }
    drop((qs, ks, vs));
    Ok(Some(Tensor::from_vec(out, (b, heads, t, d), q.device())?))
}
