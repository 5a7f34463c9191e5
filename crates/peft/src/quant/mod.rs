//! Quantized frozen weights: bitsandbytes' 4-bit (NF4, FP4, double quantization) and 8-bit
//! formats bit for bit, transformers' `BitsAndBytesConfig` that asks for them, and GGUF's block
//! quantizations as llama.cpp stores them. A quantized weight stays quantized; products
//! dequantize it a band of rows at a time (or, for GGUF, multiply the blocks directly).

pub mod bnb4;
pub mod config;
pub mod ggml;
pub mod ggml_dot;
pub mod int8;

pub use bnb4::{Absmax, Quant4, QuantType};
pub use config::{BitsAndBytesConfig, Scheme};
pub use ggml::GgmlWeight;
pub use int8::Int8Rows;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// A frozen `[out, in]` weight kept quantized. Cheap to clone (the codes are shared).
#[derive(Debug, Clone)]
pub enum QuantWeight {
    Bnb4(Arc<Quant4>),
    Int8(Arc<Int8Rows>),
    /// GGUF blocks (Q4_0 … Q6_K) as read from a llama.cpp file.
    Ggml(GgmlWeight),
}

impl QuantWeight {
    pub fn bnb4(q: Quant4) -> Result<Self> {
        if q.shape.len() != 2 {
            return Err(Error::Config(format!(
                "a quantized Linear weight must be 2-D, found shape {:?}",
                q.shape
            )));
        }
        Ok(Self::Bnb4(Arc::new(q)))
    }

    /// Quantizes a dense `[out, in]` weight as `scheme` asks (what transformers does to each
    /// Linear when it loads a model with a `BitsAndBytesConfig`). The 4-bit weight keeps `w`'s
    /// dtype, which it dequantizes to.
    pub fn quantize(w: &Tensor, scheme: &Scheme) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        let values: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        match *scheme {
            Scheme::FourBit {
                quant_type,
                double_quant,
                blocksize,
                compute_dtype,
            } => Self::bnb4(Quant4 {
                compute_dtype: Some(compute_dtype),
                ..Quant4::quantize(
                    &values,
                    &[rows, cols],
                    quant_type,
                    blocksize,
                    double_quant,
                    w.dtype(),
                )?
            }),
            Scheme::EightBit { .. } => Ok(Self::Int8(Arc::new(Int8Rows::quantize(
                &values, rows, cols,
            )?))),
        }
    }

    /// The bitsandbytes scheme this weight was quantized with (`None` for GGUF blocks, whose
    /// type is [`GgmlWeight::dtype`]).
    pub fn scheme(&self) -> Option<Scheme> {
        match self {
            Self::Bnb4(q) => Some(Scheme::FourBit {
                quant_type: q.quant_type,
                double_quant: matches!(q.absmax, Absmax::Nested { .. }),
                blocksize: q.blocksize,
                compute_dtype: q.compute_dtype.unwrap_or(q.dtype),
            }),
            Self::Int8(_) => Some(Scheme::EightBit { threshold: 6.0 }),
            Self::Ggml(_) => None,
        }
    }

    /// `w` (`[out, in]`, same shape) quantized with this weight's scheme and dtype: merging an
    /// adapter into a quantized layer dequantizes, adds, and comes back here.
    pub fn requantize(&self, w: &Tensor) -> Result<Self> {
        let (out, inp) = self.dims();
        if w.dims() != [out, inp] {
            return Err(Error::ShapeMismatch {
                name: "weight to re-quantize".into(),
                expected: vec![out, inp],
                found: w.dims().to_vec(),
            });
        }
        match (self, self.scheme()) {
            (Self::Ggml(g), _) => Ok(Self::Ggml(GgmlWeight::quantize(w, g.dtype())?)),
            (Self::Bnb4(q), Some(scheme)) => {
                match Self::quantize(&w.to_dtype(q.dtype)?, &scheme)? {
                    Self::Bnb4(new) => Self::bnb4(Quant4 {
                        compute_dtype: q.compute_dtype,
                        ..Arc::unwrap_or_clone(new)
                    }),
                    other => Ok(other),
                }
            }
            (_, Some(scheme)) => Self::quantize(&w.to_dtype(self.dtype())?, &scheme),
            (_, None) => Err(Error::Config(
                "a bitsandbytes weight without a scheme cannot be re-quantized".into(),
            )),
        }
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Self::Bnb4(q) => (q.shape[0], q.shape[1]),
            Self::Int8(q) => (q.rows, q.cols),
            Self::Ggml(g) => g.dims(),
        }
    }

    /// The dtype the dense weight had, which products compute in (bitsandbytes' compute dtype
    /// for 4-bit layers defaults to it; 8-bit layers compute in the input's dtype).
    pub fn dtype(&self) -> DType {
        match self {
            Self::Bnb4(q) => q.dtype,
            Self::Int8(_) | Self::Ggml(_) => DType::F32,
        }
    }

    /// The dtype a 4-bit layer's products run in when its config names one
    /// (`bnb_4bit_compute_dtype`); `None` follows the activations.
    pub fn compute_dtype(&self) -> Option<DType> {
        match self {
            Self::Bnb4(q) => q.compute_dtype,
            Self::Int8(_) | Self::Ggml(_) => None,
        }
    }

    /// A function that writes rows `r0..r0 + out.len() / in` of the dequantized weight (f32,
    /// rounded through the weight's dtype as bitsandbytes rounds it) into `out`. The block
    /// scales are expanded once, here, not per band.
    pub fn band_reader(&self) -> impl Fn(usize, &mut [f32]) + Send + Sync + '_ {
        let scales = match self {
            Self::Bnb4(q) => q.absmax.values(),
            Self::Int8(_) | Self::Ggml(_) => Vec::new(),
        };
        let (_, cols) = self.dims();
        move |r0: usize, out: &mut [f32]| match self {
            Self::Bnb4(q) => {
                q.dequantize_range(&scales, r0 * cols, out);
                round_through(q.dtype, out);
            }
            Self::Int8(q) => q.dequantize_rows(r0, out),
            Self::Ggml(g) => g.dequantize_rows(r0, out),
        }
    }

    /// The whole dense weight (merging, `merge_and_unload`, devices without a banded kernel).
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        match self {
            Self::Bnb4(q) => q.dequantize(device),
            Self::Int8(q) => q.dequantize(device),
            Self::Ggml(g) => g.dequantize(device),
        }
    }

    /// Bytes held by the codes and scales.
    pub fn storage_bytes(&self) -> usize {
        match self {
            Self::Bnb4(q) => (q.bits_per_weight() * q.numel() as f64 / 8.0).round() as usize,
            Self::Int8(q) => q.codes.len() + 4 * q.scb.len(),
            Self::Ggml(g) => g.storage_bytes(),
        }
    }
}

/// Rounds f32 values to `dtype` and back (a no-op for f32).
fn round_through(dtype: DType, v: &mut [f32]) {
    match dtype {
        DType::BF16 => v
            .iter_mut()
            .for_each(|x| *x = half::bf16::from_f32(*x).to_f32()),
        DType::F16 => v
            .iter_mut()
            .for_each(|x| *x = half::f16::from_f32(*x).to_f32()),
        _ => {}
    }
}
