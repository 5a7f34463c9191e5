//! A causal LM's head and its cross-entropy as one node: `CE(h · Wᵀ + b, labels)` for a frozen
//! `W`, over chunks of rows, without the `[tokens, vocab]` logits.
//!
//! Composed, the loss keeps the logits alive from forward to backward and backward builds their
//! gradient beside them: for SmolLM2's 49k-token vocabulary at 8 × 128 tokens, 200 MB each, the
//! larger part of a checkpointed step's peak memory. The loss is the graph's last node, so its
//! gradient with respect to `h` is known in forward up to the incoming scalar: each chunk's
//! logits are made, turned into `(softmax − onehot) / kept` in place and multiplied back by `W`
//! at once, and only `dL/dh` (`[tokens, hidden]`) is kept for backward. The products are the
//! frozen linear's own ([`super::linear`]), so f32, bf16 and autocast behave as they do unfused.

use candle_core::{DType, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::bf16::narrow;
use super::fused::{exp_f32, simd_fn};
use super::linear::{data, Data, FrozenLinear};
use super::with_backward;
use crate::quant::QuantWeight;
use crate::{Error, Result};

/// Logits held at once: chunks of rows are sized to this many bytes of f32.
const CHUNK_BYTES: usize = 64 << 20;

/// The frozen weight of a head that [`linear_cross_entropy`] multiplies by.
#[derive(Clone, Debug)]
pub enum HeadWeight {
    /// `[vocab, in]`, or `[in, vocab]` when `transposed`, in the hidden states' dtype (or bf16
    /// against f32 hidden states: autocast).
    Dense { w: Tensor, transposed: bool },
    /// Quantized blocks or codes, multiplied by bands of dequantized rows (f32 hidden states).
    Quant(QuantWeight),
}

impl HeadWeight {
    /// Whether the fused op takes `hidden` (and `bias`) with this weight.
    pub fn applies(&self, hidden: &Tensor, bias: Option<&Tensor>) -> bool {
        match self {
            HeadWeight::Dense { w, .. } => super::linear::applies(hidden, w, bias),
            HeadWeight::Quant(_) => {
                super::fused::fast(hidden) && bias.is_none_or(super::fused::fast)
            }
        }
    }
}

/// The chunk products of either kind of weight.
enum Product {
    Dense(FrozenLinear),
    Quant(QuantWeight),
}

impl Product {
    /// `(in, vocab)`.
    fn dims(&self) -> (usize, usize) {
        match self {
            Product::Dense(op) => op.dims(),
            Product::Quant(q) => (q.dims().1, q.dims().0),
        }
    }

    /// `dst (+)= lhs · Wᵀ` (forward, `dst` `rows × vocab`) or `dst = lhs · W` (backward, `lhs`
    /// the logits' gradient, `dst` `rows × in`).
    fn run(
        &self,
        lhs: Data,
        backward: bool,
        dst: &mut [f32],
        accumulate: bool,
    ) -> candle_core::Result<()> {
        let q = match self {
            Product::Dense(op) => return op.product(lhs, backward, dst, accumulate),
            Product::Quant(q) => q,
        };
        let Data::F32(lhs) = lhs else {
            candle_core::bail!("a quantized head takes f32 hidden states");
        };
        // Both directions walk bands of dequantized rows: the loss a training step sees is the
        // dequantized model's (not rounded to 8-bit activations as llama.cpp's and candle's
        // kernels for Q8_0 blocks round them), whatever the chunking.
        if backward {
            super::quant::input_grad_into(q, lhs, dst)
        } else {
            super::quant::banded_forward_into(q, lhs, dst, accumulate)
        }
    }
}

/// Mean cross-entropy of `labels` (`[n]`, -100 ignored, as torch's `ignore_index`) under the
/// logits `hidden · Wᵀ + bias` (`W` `[vocab, in]`), with `hidden` `[n, in]` on the CPU (see
/// [`HeadWeight`] for the dtypes each kind of weight takes). The gradient flows to `hidden`
/// only. Equal to [`super::cross_entropy`] over the unfused head's output, bf16 rounding of the
/// logits included.
pub fn linear_cross_entropy(
    hidden: &Tensor,
    weight: &HeadWeight,
    bias: Option<&Tensor>,
    labels: &Tensor,
) -> Result<Tensor> {
    chunked(hidden, weight, bias, labels, CHUNK_BYTES)
}

/// [`linear_cross_entropy`] holding about `chunk_bytes` of logits at once.
fn chunked(
    hidden: &Tensor,
    weight: &HeadWeight,
    bias: Option<&Tensor>,
    labels: &Tensor,
    chunk_bytes: usize,
) -> Result<Tensor> {
    let (n, k) = hidden.dims2()?;
    if !weight.applies(hidden, bias) {
        return Err(Error::Training(format!(
            "the fused head and loss take CPU f32 or bf16 hidden states with a matching dense \
             weight, or f32 ones with a quantized weight; not {:?} on {:?}",
            hidden.dtype(),
            hidden.device()
        )));
    }
    let op = match weight {
        HeadWeight::Dense { w, transposed } => {
            Product::Dense(FrozenLinear::new(w.clone(), *transposed)?)
        }
        HeadWeight::Quant(q) => Product::Quant(q.clone()),
    };
    let (in_dim, vocab) = op.dims();
    if in_dim != k {
        return Err(Error::ShapeMismatch {
            name: "hidden states of the LM head".into(),
            expected: vec![n, in_dim],
            found: vec![n, k],
        });
    }
    let labels = super::cross_entropy::checked_labels(labels, n, vocab)?;
    let kept = labels.iter().filter(|&&l| l != -100).count();
    let scale = 1.0 / kept as f32;
    let bias: Option<Vec<f32>> = match bias {
        Some(b) => Some(b.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?),
        None => None,
    };
    let want_grad = hidden.track_op();
    let h = hidden.detach().contiguous()?;
    let is_bf16 = h.dtype() == DType::BF16;
    let rows_per_chunk = (chunk_bytes / (4 * vocab).max(1)).max(1).min(n);
    let mut logits = vec![0f32; rows_per_chunk * vocab];
    let mut dh = if want_grad {
        vec![0f32; n * k]
    } else {
        Vec::new()
    };
    let mut total = 0f64;
    {
        let (storage, layout) = h.storage_and_layout();
        let Storage::Cpu(hs) = &*storage else {
            return Err(Error::Training(
                "the fused head and loss run on the CPU".into(),
            ));
        };
        let hd = data(hs, layout)?;
        for start in (0..n).step_by(rows_per_chunk.max(1)) {
            let rows = rows_per_chunk.min(n - start);
            let buf = &mut logits[..rows * vocab];
            if let Some(b) = &bias {
                for row in buf.chunks_exact_mut(vocab) {
                    row.copy_from_slice(b);
                }
            }
            let lhs = match &hd {
                Data::F32(v) => Data::F32(&v[start * k..(start + rows) * k]),
                Data::BF16(v) => Data::BF16(&v[start * k..(start + rows) * k]),
            };
            op.run(lhs, false, buf, bias.is_some())?;
            if is_bf16 {
                // The unfused head returns bf16 logits; the loss reads them widened.
                buf.par_iter_mut()
                    .for_each(|v| *v = bf16::from_f32(*v).to_f32());
            }
            let chunk_labels = &labels[start..start + rows];
            total += buf
                .par_chunks_mut(vocab)
                .zip(chunk_labels.par_iter())
                .map(|(row, &l)| row_loss(row, l, scale, want_grad))
                .sum::<f64>();
            if want_grad {
                let dst = &mut dh[start * k..(start + rows) * k];
                if is_bf16 {
                    // As the unfused frozen linear takes its gradient: in the input's dtype.
                    op.run(Data::BF16(&narrow(buf)), true, dst, false)?;
                } else {
                    op.run(Data::F32(buf), true, dst, false)?;
                }
            }
        }
    }
    let device = hidden.device();
    let loss = Tensor::new((total / kept as f64) as f32, device)?;
    if !want_grad {
        return Ok(loss);
    }
    let dh = if is_bf16 {
        Tensor::from_vec(narrow(&dh), (n, k), device)?
    } else {
        Tensor::from_vec(dh, (n, k), device)?
    };
    with_backward(hidden, loss, move |_x, _y, g| {
        let g = g.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if g == 1.0 {
            Ok(dh.clone())
        } else {
            dh.affine(g as f64, 0.0)
        }
    })
}

/// One row's loss `lse − x[label]`, and with `grad` the row overwritten by its gradient
/// `(softmax − onehot) · scale` (zero for an ignored row).
fn row_loss(row: &mut [f32], label: i64, scale: f32, grad: bool) -> f64 {
    if label == -100 {
        if grad {
            row.fill(0.0);
        }
        return 0.0;
    }
    let label = label as usize;
    let target = row[label];
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = exp_shifted_sum(row, max);
    if grad {
        scale_row(row, (scale as f64 / sum) as f32);
        row[label] -= scale;
    }
    max as f64 + sum.ln() - target as f64
}

simd_fn!(
    fn exp_shifted(row: &mut [f32], max: f32) {
        for v in row.iter_mut() {
            *v = exp_f32(*v - max);
        }
    }
);

simd_fn!(
    fn scale_row(row: &mut [f32], s: f32) {
        for v in row.iter_mut() {
            *v *= s;
        }
    }
);

/// Overwrites `row` with `e^(x − max)` and returns the sum, accumulated in f64 over eight lanes:
/// a vocabulary-long f32 running sum drifts (1e-4 of SmolLM2's loss), one f64 chain is slow.
fn exp_shifted_sum(row: &mut [f32], max: f32) -> f64 {
    exp_shifted(row, max);
    let mut lanes = [0f64; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v as f64;
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
    lanes.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn data(shape: &[usize], seed: f32, scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| scale * ((i as f32 * 0.618 + seed).sin() * 1.7 + (i as f32 * 0.1377).cos()))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// The reference: logits from candle's matmul, the loss as torch's `cross_entropy` composes
    /// it (`-mean(log_softmax(x)[label])` over kept rows), gradients by candle's autograd.
    fn reference(
        h: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        transposed: bool,
        labels: &[i64],
    ) -> (f32, Tensor) {
        let var = Var::from_tensor(h).unwrap();
        let wt = if transposed {
            w.clone()
        } else {
            w.t().unwrap()
        };
        let mut logits = var.as_tensor().matmul(&wt).unwrap();
        if let Some(b) = b {
            logits = logits.broadcast_add(b).unwrap();
        }
        let max = logits.max_keepdim(1).unwrap().detach();
        let shifted = logits.broadcast_sub(&max).unwrap();
        let lse = shifted
            .exp()
            .unwrap()
            .sum_keepdim(1)
            .unwrap()
            .log()
            .unwrap();
        let logp = shifted.broadcast_sub(&lse).unwrap();
        let (n, v) = logp.dims2().unwrap();
        let pick: Vec<f32> = (0..n * v)
            .map(|i| {
                let l = labels[i / v];
                if l >= 0 && (i % v) as i64 == l {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        let kept = labels.iter().filter(|&&l| l != -100).count() as f64;
        let pick = Tensor::from_vec(pick, (n, v), &Device::Cpu).unwrap();
        let loss = ((logp * pick).unwrap().sum_all().unwrap() * (-1.0 / kept)).unwrap();
        let grads = loss.backward().unwrap();
        (
            loss.to_scalar().unwrap(),
            grads.get(var.as_tensor()).unwrap().clone(),
        )
    }

    fn fused(
        h: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        transposed: bool,
        labels: &[i64],
        chunk_bytes: usize,
    ) -> (f32, Tensor) {
        let var = Var::from_tensor(h).unwrap();
        let l = Tensor::new(labels, &Device::Cpu).unwrap();
        let weight = HeadWeight::Dense {
            w: w.clone(),
            transposed,
        };
        let loss = chunked(var.as_tensor(), &weight, b, &l, chunk_bytes).unwrap();
        let grads = loss.backward().unwrap();
        (
            loss.to_scalar().unwrap(),
            grads.get(var.as_tensor()).unwrap().clone(),
        )
    }

    #[test]
    fn equals_the_composed_loss_and_gradient_in_every_chunking() {
        let (n, k, v) = (13, 24, 70);
        let h = data(&[n, k], 0.3, 1.0);
        let w = data(&[v, k], 1.1, 0.4);
        let b = data(&[v], 2.0, 0.5);
        let labels: Vec<i64> = (0..n as i64)
            .map(|i| {
                if i % 5 == 3 {
                    -100
                } else {
                    (i * 17) % v as i64
                }
            })
            .collect();
        for (bias, transposed) in [(None, false), (Some(&b), false), (Some(&b), true)] {
            let w = if transposed {
                w.t().unwrap().contiguous().unwrap()
            } else {
                w.clone()
            };
            let (want, want_g) = reference(&h, &w, bias, transposed, &labels);
            // One row per chunk, a ragged last chunk, everything at once.
            for rows in [1, 4, n] {
                let (got, got_g) = fused(&h, &w, bias, transposed, &labels, rows * v * 4);
                assert!((got - want).abs() < 1e-5 * want.abs(), "{got} vs {want}");
                let d = max_diff(&got_g, &want_g);
                assert!(d < 1e-6, "gradient differs by {d} (rows per chunk {rows})");
                // Ignored rows get no gradient.
                let row3: Vec<f32> = got_g.get(3).unwrap().to_vec1().unwrap();
                assert!(row3.iter().all(|&x| x == 0.0));
            }
        }
    }

    #[test]
    fn bf16_and_autocast_equal_the_unfused_head_and_loss() {
        let (n, k, v) = (9, 32, 50);
        let h = data(&[n, k], 0.7, 1.0);
        let w = data(&[v, k], 1.9, 0.3).to_dtype(DType::BF16).unwrap();
        let labels: Vec<i64> = (0..n as i64).map(|i| (i * 7) % v as i64).collect();
        let l = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
        // bf16 activations (a bf16 model), and f32 activations against the bf16 copy (autocast).
        for h in [h.to_dtype(DType::BF16).unwrap(), h] {
            let unfused = {
                let var = Var::from_tensor(&h).unwrap();
                let logits = super::super::frozen_linear(var.as_tensor(), &w, false).unwrap();
                let loss =
                    super::super::cross_entropy(&logits.to_dtype(DType::F32).unwrap(), &l).unwrap();
                let g = loss.backward().unwrap();
                (
                    loss.to_scalar::<f32>().unwrap(),
                    g.get(var.as_tensor()).unwrap().clone(),
                )
            };
            let var = Var::from_tensor(&h).unwrap();
            let weight = HeadWeight::Dense {
                w: w.clone(),
                transposed: false,
            };
            let loss = chunked(var.as_tensor(), &weight, None, &l, 4 * 4 * v).unwrap();
            let g = loss.backward().unwrap();
            let got_g = g.get(var.as_tensor()).unwrap();
            assert_eq!(got_g.dtype(), h.dtype());
            let got = loss.to_scalar::<f32>().unwrap();
            assert!(
                (got - unfused.0).abs() < 1e-5 * unfused.0,
                "{got} vs {}",
                unfused.0
            );
            let d = max_diff(got_g, &unfused.1);
            assert!(d < 1e-6, "{:?}: gradient differs by {d}", h.dtype());
        }
    }

    /// Quantized heads (GGUF Q8_0 blocks, NF4 codes) give the loss and input gradient of the
    /// composed loss over the dequantized weight, in every chunking.
    #[test]
    fn quantized_heads_equal_the_loss_through_the_dequantized_weight() {
        use crate::quant::{GgmlWeight, QuantType, Scheme};
        let (n, k, v) = (40, 64, 96);
        let h = data(&[n, k], 0.4, 1.0);
        let w = data(&[v, k], 2.3, 0.3);
        let labels: Vec<i64> = (0..n as i64)
            .map(|i| {
                if i % 7 == 2 {
                    -100
                } else {
                    (i * 13) % v as i64
                }
            })
            .collect();
        let l = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
        let nf4 = Scheme::FourBit {
            quant_type: QuantType::Nf4,
            double_quant: true,
            blocksize: 64,
            compute_dtype: DType::F32,
        };
        let q8 = GgmlWeight::quantize(&w, candle_core::quantized::GgmlDType::Q8_0).unwrap();
        for q in [
            QuantWeight::Ggml(q8),
            QuantWeight::quantize(&w, &nf4).unwrap(),
        ] {
            let deq = q.dequantize(&Device::Cpu).unwrap();
            let (want, want_g) = reference(&h, &deq, None, false, &labels);
            for rows in [3, 20, n] {
                let var = Var::from_tensor(&h).unwrap();
                let weight = HeadWeight::Quant(q.clone());
                let loss = chunked(var.as_tensor(), &weight, None, &l, rows * 4 * v).unwrap();
                let g = loss.backward().unwrap();
                let got = loss.to_scalar::<f32>().unwrap();
                assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
                let d = max_diff(g.get(var.as_tensor()).unwrap(), &want_g);
                assert!(d < 1e-6, "gradient differs by {d} (rows per chunk {rows})");
            }
        }
    }

    /// A loss scaled after the op (gradient accumulation, a regulariser's weight) scales the
    /// gradient it gives back.
    #[test]
    fn an_upstream_factor_scales_the_gradient() {
        let (n, k, v) = (6, 16, 30);
        let h = data(&[n, k], 0.9, 1.0);
        let w = data(&[v, k], 1.4, 0.5);
        let labels: Vec<i64> = (0..n as i64).map(|i| (i * 11) % v as i64).collect();
        let (_, want_g) = reference(&h, &w, None, false, &labels);
        let var = Var::from_tensor(&h).unwrap();
        let weight = HeadWeight::Dense {
            w: w.clone(),
            transposed: false,
        };
        let l = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
        let loss = linear_cross_entropy(var.as_tensor(), &weight, None, &l).unwrap();
        let g = (loss * 0.25).unwrap().backward().unwrap();
        let d = max_diff(g.get(var.as_tensor()).unwrap(), &(want_g * 0.25).unwrap());
        assert!(d < 1e-7, "gradient differs by {d}");
    }

    #[test]
    fn bad_labels_are_errors() {
        let h = data(&[3, 8], 0.1, 1.0);
        let w = data(&[5, 8], 0.2, 1.0);
        let dense = |w: &Tensor| HeadWeight::Dense {
            w: w.clone(),
            transposed: false,
        };
        let run = |l: &[i64]| {
            linear_cross_entropy(&h, &dense(&w), None, &Tensor::new(l, &Device::Cpu).unwrap())
                .unwrap_err()
                .to_string()
        };
        assert!(run(&[0, 5, 1]).contains("label 5 is out of range"));
        assert!(run(&[-100, -100, -100]).contains("every label"));
        assert!(run(&[0, 1]).contains("2 labels for 3 rows"));
        let wrong = data(&[5, 7], 0.2, 1.0);
        let l = Tensor::new(&[0i64, 1, 2], &Device::Cpu).unwrap();
        assert!(linear_cross_entropy(&h, &dense(&wrong), None, &l).is_err());
    }
}
