//! LLM.int8()-style 8-bit weights as bitsandbytes 0.50 stores them (`Int8Params`, transformers'
//! `load_in_8bit`): every row scaled by its absolute maximum onto [-127, 127] and rounded; the
//! row maxima are `SCB`. The product dequantizes (`code · SCB / 127`) and multiplies in the
//! input's dtype, as bitsandbytes' CPU training product (`MatMul8bitFp`) does. Its inference
//! product (`MatMul8bitLt`, eval mode on CPU and CUDA) also quantizes the activations to int8
//! rows and keeps the columns above `llm_int8_threshold` in fp16; that path is not reproduced, so
//! the threshold changes nothing here (transformers' eval logits differ by that quantization:
//! ~0.1 on the tiny fixture model, see tests/int8_checkpoint.rs).

use candle_core::{DType, Device, Tensor};
use half::f16;

use crate::{Error, Result};

/// A `[rows, cols]` weight in 8 bits per value plus one f32 per row.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Rows {
    pub rows: usize,
    pub cols: usize,
    /// Row-major codes (`weight` in a checkpoint, int8).
    pub codes: Vec<i8>,
    /// Each row's absolute maximum (`SCB`).
    pub scb: Vec<f32>,
}

impl Int8Rows {
    /// Quantizes as bitsandbytes does: the weight in f16 first, then
    /// `round(w · (127 · (1 / rowmax)))` (round half to even).
    pub fn quantize(values: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if values.len() != rows * cols {
            return Err(Error::ShapeMismatch {
                name: "weight to quantize".into(),
                expected: vec![rows, cols],
                found: vec![values.len()],
            });
        }
        if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
            return Err(Error::Config(format!(
                "cannot quantize a weight holding {bad}: every value must be finite"
            )));
        }
        let mut codes = Vec::with_capacity(values.len());
        let mut scb = Vec::with_capacity(rows);
        for row in values.chunks(cols.max(1)).take(rows) {
            let half: Vec<f32> = row.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
            let max = half.iter().fold(0f32, |m, v| m.max(v.abs()));
            scb.push(max);
            // torch divides a scalar by a tensor through the reciprocal.
            let k = 127.0 * (1.0 / max);
            codes.extend(half.iter().map(|&v| {
                if max == 0.0 {
                    0
                } else {
                    (v * k).round_ties_even().clamp(-127.0, 127.0) as i8
                }
            }));
        }
        Ok(Self {
            rows,
            cols,
            codes,
            scb,
        })
    }

    /// Rows `r0..r0 + out.len() / cols` dequantized into `out` (f32) as bitsandbytes' CPU product
    /// does: `code · (SCB · (1 / 127))`.
    pub fn dequantize_rows(&self, r0: usize, out: &mut [f32]) {
        for (k, row) in out.chunks_mut(self.cols).enumerate() {
            let r = r0 + k;
            let s = self.scb[r] * (1.0 / 127.0);
            let codes = &self.codes[r * self.cols..(r + 1) * self.cols];
            for (o, &c) in row.iter_mut().zip(codes) {
                *o = c as f32 * s;
            }
        }
    }

    /// The dense weight as `int8_vectorwise_dequant` computes it (`code · SCB · (1 / 127)`, in
    /// that order), which PEFT uses to merge into and dequantize an 8-bit layer.
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        // bitsandbytes multiplies by the Python float 7.874015718698502e-3, rounded to f32.
        let inv = 7.874_015_718_698_502e-3_f64 as f32;
        let out: Vec<f32> = self
            .codes
            .iter()
            .enumerate()
            .map(|(i, &c)| c as f32 * self.scb[i / self.cols] * inv)
            .collect();
        Ok(Tensor::from_vec(out, (self.rows, self.cols), device)?)
    }

    /// From a checkpoint's raw `weight` bytes (int8, `[rows, cols]`) and its `SCB` tensor.
    pub fn from_parts(codes: Vec<i8>, shape: &[usize], scb: &Tensor) -> Result<Self> {
        let [rows, cols] = shape else {
            return Err(Error::Config(format!(
                "an 8-bit weight must be 2-D, found shape {shape:?}"
            )));
        };
        let scb: Vec<f32> = scb.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if scb.len() != *rows || codes.len() != rows * cols {
            return Err(Error::ShapeMismatch {
                name: "SCB of an 8-bit weight".into(),
                expected: vec![*rows],
                found: vec![scb.len()],
            });
        }
        Ok(Self {
            rows: *rows,
            cols: *cols,
            codes,
            scb,
        })
    }
}
