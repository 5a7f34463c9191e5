//! bitsandbytes' blockwise 4-bit weights (NF4 and FP4), with or without double quantization of
//! the block scales, stored exactly as bitsandbytes 0.50 stores them, so that a transformers
//! 4-bit checkpoint loads here and one written here loads there.
//!
//! Layout: the weight is flattened row-major and cut into blocks of `blocksize` values (the last
//! block may be shorter); each block keeps its absolute maximum (`absmax`, f32) and each value
//! the index of the nearest of 16 codes to `value / absmax`. Two indices share a byte, the even
//! element in the high nibble. Double quantization stores the absmax values themselves as 8-bit
//! codes of the signed dynamic map, in blocks of 256, around their mean (`offset`).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::{Error, Result};

/// Elements dequantized per parallel task (about 64 KiB of f32).
const PIECE: usize = 1 << 14;

/// The block sizes bitsandbytes accepts for 4-bit weights.
pub const BLOCK_SIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];
/// Double quantization's block size over the absmax values (bitsandbytes fixes it).
pub const NESTED_BLOCK_SIZE: usize = 256;

/// NormalFloat4: quantiles of a standard normal, scaled to [-1, 1] (QLoRA's data type), as the
/// Python floats bitsandbytes lists (rounded to f32 as torch rounds them).
const NF4_F64: [f64; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// FP4 (1 sign, 2 exponent, 1 mantissa bits) in code order, before scaling by 1/12.
const FP4_UNSCALED: [f32; 16] = [
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
];

/// The 4-bit data type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    Nf4,
    Fp4,
}

impl QuantType {
    /// bitsandbytes' / transformers' name (`bnb_4bit_quant_type`).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "nf4" => Ok(Self::Nf4),
            "fp4" => Ok(Self::Fp4),
            other => Err(Error::Config(format!(
                "unknown 4-bit quant type {other:?}: bitsandbytes has \"nf4\" and \"fp4\""
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Nf4 => "nf4",
            Self::Fp4 => "fp4",
        }
    }

    /// The 16 values a code stands for, in code order (`quant_map` in a checkpoint).
    pub fn code(self) -> [f32; 16] {
        match self {
            Self::Nf4 => NF4_F64.map(|v| v as f32),
            Self::Fp4 => FP4_UNSCALED.map(|v| v / 12.0),
        }
    }
}

/// Nearest-code lookup: the codes sorted by value with the midpoints between neighbours. A value
/// on a midpoint takes the lower code, and FP4's two zeros keep their code order (+0 below -0),
/// as bitsandbytes' bucketize over a stable argsort does.
struct Codebook {
    bounds: Vec<f32>,
    order: Vec<u8>,
}

impl Codebook {
    fn new(code: &[f32]) -> Self {
        let mut order: Vec<u8> = (0..code.len()).map(|i| i as u8).collect();
        // A stable sort: equal values (0.0 and -0.0) keep their code order.
        order.sort_by(|&a, &b| code[a as usize].total_cmp_eq_zero(&code[b as usize]));
        let bounds = order
            .windows(2)
            .map(|w| (code[w[0] as usize] + code[w[1] as usize]) / 2.0)
            .collect();
        Self { bounds, order }
    }

    /// The code of the nearest value to `x` (already scaled into [-1, 1]).
    fn nearest(&self, x: f32) -> u8 {
        // The number of bounds strictly below x (torch.bucketize with right=False).
        let i = self.bounds.partition_point(|&b| b < x);
        self.order[i]
    }
}

/// `total_cmp` would put -0.0 below +0.0; bitsandbytes compares them equal.
trait CmpEqZero {
    fn total_cmp_eq_zero(&self, other: &Self) -> std::cmp::Ordering;
}

impl CmpEqZero for f32 {
    fn total_cmp_eq_zero(&self, other: &Self) -> std::cmp::Ordering {
        self.partial_cmp(other).unwrap_or(std::cmp::Ordering::Equal)
    }
}

/// bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`): for each decade
/// `10^-6 .. 10^0`, `2^i` evenly spaced means of a linspace over [0.1, 1], both signs, plus 0 and
/// 1, sorted. Double quantization codes the absmax values with it.
pub fn signed_dynamic_map() -> Vec<f32> {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7 {
        let items = (1usize << i) + 1;
        let bounds = linspace_f32(0.1, 1.0, items);
        let scale = 10f64.powi(i - 6) as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(|a, b| a.total_cmp(b));
    data
}

/// torch.linspace in f32: from the start for the first half, from the end for the second, each
/// point rounded once (torch's vectorized kernel fuses the multiply and add).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// Blockwise absmax quantization of `x` onto a sorted 8-bit `map` (double quantization's inner
/// step): the codes and one absmax per block.
fn quantize_blockwise_8bit(x: &[f32], map: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let book = Codebook::new(map);
    let mut codes = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(blocksize));
    for block in x.chunks(blocksize) {
        let (am, scaled) = scale_block(block, blocksize);
        absmax.push(am);
        codes.extend(scaled.map(|v| book.nearest(v)));
    }
    (codes, absmax)
}

/// A block's absmax and its values scaled into [-1, 1] as bitsandbytes scales them: a full block
/// by the reciprocal of its absmax, a shorter last block by division.
fn scale_block(block: &[f32], blocksize: usize) -> (f32, impl Iterator<Item = f32> + '_) {
    let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let safe = am.max(1e-38);
    let full = block.len() == blocksize;
    let inv = 1.0 / safe;
    let scaled = block.iter().map(move |&v| {
        let s = if full { v * inv } else { v / safe };
        s.clamp(-1.0, 1.0)
    });
    (am, scaled)
}

/// The block scales of a 4-bit weight.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block (`weight.absmax` as f32).
    Plain(Vec<f32>),
    /// Double quantization: `absmax[i] = map[codes[i]] · nested_absmax[i / 256] + offset`.
    Nested {
        codes: Vec<u8>,
        nested_absmax: Vec<f32>,
        map: Vec<f32>,
        blocksize: usize,
        offset: f32,
    },
}

impl Absmax {
    /// The f32 scale of every block.
    pub fn values(&self) -> Vec<f32> {
        match self {
            Self::Plain(v) => v.clone(),
            Self::Nested {
                codes,
                nested_absmax,
                map,
                blocksize,
                offset,
            } => codes
                .iter()
                .enumerate()
                .map(|(i, &c)| map[c as usize] * nested_absmax[i / blocksize] + offset)
                .collect(),
        }
    }
}

/// A 4-bit weight as bitsandbytes' `Params4bit` holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Quant4 {
    pub quant_type: QuantType,
    pub blocksize: usize,
    /// The dense weight's shape (`[out, in]` for a Linear).
    pub shape: Vec<usize>,
    /// The dtype the weight had and dequantizes to (`quant_state.dtype`).
    pub dtype: DType,
    /// `Linear4bit.compute_dtype` (transformers' `bnb_4bit_compute_dtype`): the dtype the
    /// layer's products run in. `None` follows the activations.
    pub compute_dtype: Option<DType>,
    /// Two codes per byte, the even element in the high nibble; `ceil(n / 2)` bytes.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

impl Quant4 {
    /// Quantizes a dense weight (values row-major, in f32) as `bnb.functional.quantize_4bit`
    /// does; `dtype` is the dtype the weight had (what dequantization returns).
    pub fn quantize(
        values: &[f32],
        shape: &[usize],
        quant_type: QuantType,
        blocksize: usize,
        double_quant: bool,
        dtype: DType,
    ) -> Result<Self> {
        check_blocksize(blocksize)?;
        let n: usize = shape.iter().product();
        if n != values.len() {
            return Err(Error::ShapeMismatch {
                name: "weight to quantize".into(),
                expected: shape.to_vec(),
                found: vec![values.len()],
            });
        }
        if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
            return Err(Error::Config(format!(
                "cannot quantize a weight holding {bad}: every value must be finite"
            )));
        }
        let book = Codebook::new(&quant_type.code());
        let mut codes = Vec::with_capacity(n + 1);
        let mut absmax = Vec::with_capacity(n.div_ceil(blocksize));
        for block in values.chunks(blocksize) {
            let (am, scaled) = scale_block(block, blocksize);
            absmax.push(am);
            codes.extend(scaled.map(|v| book.nearest(v)));
        }
        if codes.len() % 2 == 1 {
            codes.push(book.nearest(0.0));
        }
        let packed = codes.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
        let absmax = if double_quant {
            nest(&absmax)
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Self {
            quant_type,
            blocksize,
            shape: shape.to_vec(),
            dtype,
            compute_dtype: None,
            packed,
            absmax,
        })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The 4-bit code of element `i` (row-major).
    pub fn code_at(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0x0f
        }
    }

    /// Dequantizes elements `start..start + out.len()` (row-major) into `out`, in f32: the
    /// building block of a product that never expands the whole layer.
    ///
    /// A block at a time (one scale), a byte (two codes) at a time, and in parallel over
    /// pieces of whole blocks: a product waits for its band while this runs.
    pub fn dequantize_range(&self, scales: &[f32], start: usize, out: &mut [f32]) {
        use rayon::prelude::*;
        let bs = self.blocksize.max(1);
        let piece = (PIECE / bs).max(1) * bs;
        // Pieces start at `start` plus a multiple of the block size, so every piece but the
        // first starts on a block boundary.
        out.par_chunks_mut(piece)
            .enumerate()
            .for_each(|(p, o)| self.dequantize_piece(scales, start + p * piece, o));
    }

    fn dequantize_piece(&self, scales: &[f32], start: usize, out: &mut [f32]) {
        let code = self.quant_type.code();
        let bs = self.blocksize.max(1);
        let (mut i, mut k) = (start, 0);
        while k < out.len() {
            let block = i / bs;
            let n = ((block + 1) * bs - i).min(out.len() - k);
            let s = scales[block];
            let o = &mut out[k..k + n];
            if i.is_multiple_of(2) && n.is_multiple_of(2) {
                for (pair, &b) in o.chunks_exact_mut(2).zip(&self.packed[i / 2..(i + n) / 2]) {
                    pair[0] = code[(b >> 4) as usize] * s;
                    pair[1] = code[(b & 0x0f) as usize] * s;
                }
            } else {
                for (j, o) in o.iter_mut().enumerate() {
                    *o = code[self.code_at(i + j) as usize] * s;
                }
            }
            i += n;
            k += n;
        }
    }

    /// The whole dense weight in f32 (bitsandbytes computes in f32, then casts to `dtype`).
    pub fn dequantize_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.dequantize_range(&self.absmax.values(), 0, &mut out);
        out
    }

    /// The dense weight as a tensor of `self.dtype`.
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let t = Tensor::from_vec(self.dequantize_f32(), self.shape.as_slice(), device)?;
        Ok(t.to_dtype(self.dtype)?)
    }

    /// Storage in bits per weight, scales included.
    pub fn bits_per_weight(&self) -> f64 {
        let scale_bytes = match &self.absmax {
            Absmax::Plain(v) => 4 * v.len(),
            Absmax::Nested {
                codes,
                nested_absmax,
                map,
                ..
            } => codes.len() + 4 * (nested_absmax.len() + map.len()) + 4,
        };
        8.0 * (self.packed.len() + scale_bytes) as f64 / self.numel() as f64
    }

    /// The tensors transformers saves for this weight under `prefix` (e.g.
    /// `model.layers.0.self_attn.q_proj.weight`): the packed codes, `absmax`, `quant_map`, the
    /// nested ones with double quantization, and `quant_state.bitsandbytes__<type>` (the rest of
    /// the state as JSON bytes).
    pub fn to_state_dict(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        let cpu = Device::Cpu;
        let mut out = vec![(
            prefix.to_string(),
            Tensor::from_vec(self.packed.clone(), (self.packed.len(), 1), &cpu)?,
        )];
        let code = self.quant_type.code().to_vec();
        out.push((
            format!("{prefix}.quant_map"),
            Tensor::from_vec(code, 16, &cpu)?,
        ));
        let mut state = json!({
            "quant_type": self.quant_type.name(),
            "blocksize": self.blocksize,
            "dtype": dtype_name(self.dtype),
            "shape": self.shape,
        });
        match &self.absmax {
            Absmax::Plain(v) => {
                out.push((
                    format!("{prefix}.absmax"),
                    Tensor::from_vec(v.clone(), v.len(), &cpu)?,
                ));
            }
            Absmax::Nested {
                codes,
                nested_absmax,
                map,
                blocksize,
                offset,
            } => {
                out.push((
                    format!("{prefix}.absmax"),
                    Tensor::from_vec(codes.clone(), codes.len(), &cpu)?,
                ));
                out.push((
                    format!("{prefix}.nested_absmax"),
                    Tensor::from_vec(nested_absmax.clone(), nested_absmax.len(), &cpu)?,
                ));
                out.push((
                    format!("{prefix}.nested_quant_map"),
                    Tensor::from_vec(map.clone(), map.len(), &cpu)?,
                ));
                state["nested_blocksize"] = json!(blocksize);
                state["nested_dtype"] = json!("float32");
                state["nested_offset"] = json!(*offset as f64);
            }
        }
        // bitsandbytes packs the JSON as Python's json.dumps writes it.
        let bytes = python_json(&state).into_bytes();
        out.push((
            format!(
                "{prefix}.quant_state.bitsandbytes__{}",
                self.quant_type.name()
            ),
            Tensor::from_vec(bytes.clone(), bytes.len(), &cpu)?,
        ));
        Ok(out)
    }

    /// Reads the weight saved under `prefix` from a checkpoint's tensors (see
    /// [`Quant4::to_state_dict`]); `None` when `prefix` holds no 4-bit quant state.
    pub fn from_state_dict(
        prefix: &str,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<Option<Self>> {
        let state_key = ["nf4", "fp4"]
            .iter()
            .map(|t| format!("{prefix}.quant_state.bitsandbytes__{t}"))
            .find(|k| tensors.contains_key(k));
        let Some(state_key) = state_key else {
            return Ok(None);
        };
        let get = |suffix: &str| -> Result<&Tensor> {
            let key = if suffix.is_empty() {
                prefix.to_string()
            } else {
                format!("{prefix}.{suffix}")
            };
            tensors.get(&key).ok_or(Error::MissingTensor {
                name: key,
                location: prefix.to_string(),
                hint: " (the 4-bit weight has a quant state but not this part)".into(),
            })
        };
        let bytes: Vec<u8> = get_u8(&tensors[&state_key])?;
        let state: Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Config(format!("{state_key}: the quant state is not JSON: {e}")))?;
        let field = |k: &str| {
            state
                .get(k)
                .ok_or_else(|| Error::Config(format!("{state_key}: the quant state lacks {k:?}")))
        };
        let quant_type = QuantType::parse(field("quant_type")?.as_str().unwrap_or_default())?;
        let blocksize = field("blocksize")?.as_u64().unwrap_or(0) as usize;
        check_blocksize(blocksize)?;
        let dtype = parse_dtype(field("dtype")?.as_str().unwrap_or_default())?;
        let shape: Vec<usize> = serde_json::from_value(field("shape")?.clone())
            .map_err(|e| Error::Config(format!("{state_key}: shape: {e}")))?;
        let n: usize = shape.iter().product();
        let packed = get_u8(get("")?)?;
        if packed.len() != n.div_ceil(2) {
            return Err(Error::ShapeMismatch {
                name: prefix.to_string(),
                expected: vec![n.div_ceil(2), 1],
                found: get("")?.dims().to_vec(),
            });
        }
        let blocks = n.div_ceil(blocksize);
        let absmax_t = get("absmax")?;
        let absmax = if state.get("nested_offset").is_some() {
            let nested_blocksize = field("nested_blocksize")?.as_u64().unwrap_or(0) as usize;
            if nested_blocksize == 0 {
                return Err(Error::Config(format!("{state_key}: nested_blocksize is 0")));
            }
            let offset = field("nested_offset")?.as_f64().unwrap_or(f64::NAN) as f32;
            let codes = get_u8(absmax_t)?;
            let nested_absmax = get("nested_absmax")?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            let map: Vec<f32> = get("nested_quant_map")?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            check_len(prefix, "absmax", codes.len(), blocks)?;
            check_len(
                prefix,
                "nested_absmax",
                nested_absmax.len(),
                blocks.div_ceil(nested_blocksize),
            )?;
            check_len(prefix, "nested_quant_map", map.len(), 256)?;
            Absmax::Nested {
                codes,
                nested_absmax,
                map,
                blocksize: nested_blocksize,
                offset,
            }
        } else {
            let v: Vec<f32> = absmax_t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            check_len(prefix, "absmax", v.len(), blocks)?;
            Absmax::Plain(v)
        };
        Ok(Some(Self {
            quant_type,
            blocksize,
            shape,
            dtype,
            compute_dtype: None,
            packed,
            absmax,
        }))
    }
}

/// Double quantization of the block scales (bitsandbytes' `compress_statistics`).
fn nest(absmax: &[f32]) -> Absmax {
    let mean = absmax.iter().map(|&v| v as f64).sum::<f64>() / absmax.len().max(1) as f64;
    let offset = mean as f32;
    let centred: Vec<f32> = absmax.iter().map(|&v| v - offset).collect();
    let map = signed_dynamic_map();
    let (codes, nested_absmax) = quantize_blockwise_8bit(&centred, &map, NESTED_BLOCK_SIZE);
    Absmax::Nested {
        codes,
        nested_absmax,
        map,
        blocksize: NESTED_BLOCK_SIZE,
        offset,
    }
}

fn check_blocksize(blocksize: usize) -> Result<()> {
    if BLOCK_SIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "4-bit block size {blocksize} is not one bitsandbytes allows ({BLOCK_SIZES:?})"
        )))
    }
}

fn check_len(prefix: &str, what: &str, found: usize, expected: usize) -> Result<()> {
    if found == expected {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            name: format!("{prefix}.{what}"),
            expected: vec![expected],
            found: vec![found],
        })
    }
}

fn get_u8(t: &Tensor) -> Result<Vec<u8>> {
    if t.dtype() != DType::U8 {
        return Err(Error::Config(format!(
            "a 4-bit weight's codes must be uint8, found {:?}",
            t.dtype()
        )));
    }
    Ok(t.flatten_all()?.to_vec1()?)
}

/// torch's dtype names as bitsandbytes writes them in a quant state.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

pub fn parse_dtype(name: &str) -> Result<DType> {
    match name.trim_start_matches("torch.") {
        "float32" | "float" => Ok(DType::F32),
        "bfloat16" => Ok(DType::BF16),
        "float16" | "half" => Ok(DType::F16),
        other => Err(Error::Config(format!(
            "unknown dtype {other:?}: expected float32, bfloat16 or float16"
        ))),
    }
}

/// JSON as Python's `json.dumps` writes it (", " and ": " separators), keys in insertion order.
fn python_json(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let parts: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{}: {}", Value::String(k.clone()), python_json(v)))
                .collect();
            format!("{{{}}}", parts.join(", "))
        }
        Value::Array(a) => {
            let parts: Vec<String> = a.iter().map(python_json).collect();
            format!("[{}]", parts.join(", "))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_range_dequantizes_to_each_code_times_its_block_scale() {
        // A 200 × 200 weight in blocks of 64: blocks straddle rows, and ranges start and end at
        // odd elements, inside blocks and across parallel pieces.
        let values: Vec<f32> = (0..40_000)
            .map(|i| ((i as f32) * 0.37).sin() * 3.0)
            .collect();
        let q =
            Quant4::quantize(&values, &[200, 200], QuantType::Nf4, 64, true, DType::F32).unwrap();
        let scales = q.absmax.values();
        let code = QuantType::Nf4.code();
        let want = |i: usize| code[q.code_at(i) as usize] * scales[i / 64];
        for (start, len) in [
            (0, 40_000),
            (1, 63),
            (63, 2),
            (64, 129),
            (7, 33_001),
            (39_999, 1),
        ] {
            let mut out = vec![f32::NAN; len];
            q.dequantize_range(&scales, start, &mut out);
            for (k, &o) in out.iter().enumerate() {
                assert_eq!(
                    o.to_bits(),
                    want(start + k).to_bits(),
                    "range {start}+{len}, element {k}"
                );
            }
        }
    }

    #[test]
    fn fp4_zeros_keep_code_order_and_midpoints_go_down() {
        let book = Codebook::new(&QuantType::Fp4.code());
        assert_eq!(book.nearest(0.0), 0);
        assert_eq!(book.nearest(-1e-4), 0);
        assert_eq!(book.nearest(1e-4), 8);
        let code = QuantType::Nf4.code();
        let nf4 = Codebook::new(&code);
        let mid = (code[7] + code[8]) / 2.0;
        assert_eq!(nf4.nearest(mid), 7);
        assert_eq!(nf4.nearest(f32::from_bits(mid.to_bits() + 1)), 8);
    }

    #[test]
    fn the_dynamic_map_has_256_sorted_values_from_minus_one_to_one() {
        let m = signed_dynamic_map();
        assert_eq!(m.len(), 256);
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(m[255], 1.0);
        assert!(m.contains(&0.0));
    }
}
