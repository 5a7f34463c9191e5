//! GGUF (llama.cpp) block-quantized weights kept as the file stores them: Q4_0, Q4_1, Q5_0,
//! Q5_1, Q8_0 and the K-quants Q2_K…Q6_K. The blocks live in a candle `QTensor`. A forward of a
//! few rows (a decode step) through the 32-value block types runs our own kernels
//! ([`super::ggml_dot`]); batches of the types candle has SIMD dot products for run candle's own
//! quantized matmul (activations quantized to Q8 as llama.cpp does, bit for bit `QMatMul`); the
//! backward, merges and other batches read the blocks a band of rows at a time through the block
//! types' `to_float`.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0,
};
use candle_core::quantized::{GgmlDType, GgmlType, QStorage, QTensor};
use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// The GGML types a frozen Linear may stay quantized in: llama.cpp's storage types for weights.
/// (`Q8_1` and `Q8_K` only ever hold quantized activations; F32/F16/BF16 tensors load dense.)
pub const SUPPORTED: [GgmlDType; 10] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// llama.cpp's name of a GGML type (`Q4_1`, `Q6_K`), as `gguf-dump` and the file names say it.
pub fn type_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// The supported types, named, for error messages.
pub fn supported_names() -> String {
    SUPPORTED.map(type_name).join(", ")
}

/// A frozen `[out, in]` weight in GGML blocks (row-major: each row is `in / block` blocks).
/// Cheap to clone: the blocks are shared.
#[derive(Clone)]
pub struct GgmlWeight {
    q: Arc<QTensor>,
    rows: usize,
    cols: usize,
}

impl std::fmt::Debug for GgmlWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GgmlWeight[{} x {}; {}]",
            self.rows,
            self.cols,
            type_name(self.dtype())
        )
    }
}

impl GgmlWeight {
    /// Takes a 2-D `QTensor` on the CPU in one of the [`SUPPORTED`] types.
    pub fn new(q: QTensor) -> Result<Self> {
        let dtype = q.dtype();
        if !SUPPORTED.contains(&dtype) {
            return Err(Error::Config(format!(
                "GGML type {} cannot back a quantized Linear weight (supported: {}); load the \
                 GGUF file dequantized instead (without `keep_gguf_quantized`)",
                type_name(dtype),
                supported_names()
            )));
        }
        let (rows, cols) = match q.shape().dims() {
            [r, c] => (*r, *c),
            other => {
                return Err(Error::Config(format!(
                    "a quantized Linear weight must be 2-D, found a {} tensor of shape {other:?}",
                    type_name(dtype)
                )))
            }
        };
        if !q.device().is_cpu() {
            return Err(Error::Config(
                "GGML weights are kept on the CPU (their banded backward reads the blocks there)"
                    .into(),
            ));
        }
        Ok(Self {
            q: Arc::new(q),
            rows,
            cols,
        })
    }

    /// Quantizes a dense `[out, in]` weight to `dtype` with candle's (llama.cpp's reference)
    /// quantizer: merging an adapter into a GGUF layer comes back here with the layer's type.
    pub fn quantize(w: &Tensor, dtype: GgmlDType) -> Result<Self> {
        if !SUPPORTED.contains(&dtype) {
            return Err(Error::Config(format!(
                "cannot quantize to GGML type {} (supported: {})",
                type_name(dtype),
                supported_names()
            )));
        }
        let (rows, cols) = w.dims2()?;
        let block = dtype.block_size();
        if !cols.is_multiple_of(block) {
            return Err(Error::Config(format!(
                "a [{rows}, {cols}] weight cannot be quantized to {}: its rows ({cols} values) \
                 must be a multiple of the {block}-value block",
                type_name(dtype)
            )));
        }
        let w = w.to_device(&Device::Cpu)?.contiguous()?;
        Self::new(QTensor::quantize(&w, dtype)?)
    }

    pub fn dtype(&self) -> GgmlDType {
        self.q.dtype()
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Whether a forward of more than [`super::ggml_dot::MAX_ROWS`] rows (fewer take
    /// [`super::ggml_dot`] for the 32-value block types) runs candle's quantized matmul on these blocks (activations rounded
    /// to Q8, as `QMatMul` and llama.cpp's CPU kernels do) rather than the banded f32 product
    /// with the dequantized rows (what llama.cpp's BLAS backend computes for batches).
    ///
    /// candle has SIMD dot products (AVX2 + FMA, NEON) only for Q4_0, Q8_0 and the K-quants;
    /// its Q4_1, Q5_0 and Q5_1 ones are scalar loops, measured 25–30x slower than the banded
    /// product on a 1024-row training batch and 3x slower on a single row (SmolLM2's Q4_1
    /// projections, AMD EPYC). Its scalar and NEON dot products also take blocks in pairs and
    /// assert an even number of blocks per row — a panic that poisons candle's thread pool —
    /// where llama.cpp handles the odd block; such rows take the banded product too.
    pub fn uses_candle_kernel(&self) -> bool {
        let block = self.dtype().block_size();
        let simd_type = matches!(
            self.dtype(),
            GgmlDType::Q4_0
                | GgmlDType::Q8_0
                | GgmlDType::Q2K
                | GgmlDType::Q3K
                | GgmlDType::Q4K
                | GgmlDType::Q5K
                | GgmlDType::Q6K
        );
        simd_type && has_simd_dot() && (block == 256 || (self.cols / block).is_multiple_of(2))
    }

    /// The candle tensor holding the blocks (its forward is candle's quantized matmul).
    pub fn qtensor(&self) -> &Arc<QTensor> {
        &self.q
    }

    /// The raw blocks, as the GGUF file stores them.
    pub fn bytes(&self) -> &[u8] {
        match self.q.data() {
            Ok(Cow::Borrowed(b)) => b,
            // `new` keeps the tensor on the CPU, whose data is always borrowed.
            _ => &[],
        }
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.dtype().block_size() * self.dtype().type_size()
    }

    /// Rows `r0..r0 + out.len() / in` dequantized into `out` (f32), exactly as candle's (and
    /// llama.cpp's) `dequantize` computes them.
    pub fn dequantize_rows(&self, r0: usize, out: &mut [f32]) {
        let n_rows = out.len() / self.cols.max(1);
        let rb = self.row_bytes();
        let bytes = &self.bytes()[r0 * rb..(r0 + n_rows) * rb];
        match self.dtype() {
            GgmlDType::Q4_0 => to_float::<BlockQ4_0>(bytes, out),
            GgmlDType::Q4_1 => to_float::<BlockQ4_1>(bytes, out),
            GgmlDType::Q5_0 => to_float::<BlockQ5_0>(bytes, out),
            GgmlDType::Q5_1 => to_float::<BlockQ5_1>(bytes, out),
            GgmlDType::Q8_0 => to_float::<BlockQ8_0>(bytes, out),
            GgmlDType::Q2K => to_float::<BlockQ2K>(bytes, out),
            GgmlDType::Q3K => to_float::<BlockQ3K>(bytes, out),
            GgmlDType::Q4K => to_float::<BlockQ4K>(bytes, out),
            GgmlDType::Q5K => to_float::<BlockQ5K>(bytes, out),
            GgmlDType::Q6K => to_float::<BlockQ6K>(bytes, out),
            // `new` admits only the types above.
            _ => out.fill(f32::NAN),
        }
    }

    /// The whole dense weight (merging, `merge_and_unload`, devices without a banded kernel).
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        Ok(self.q.dequantize(&Device::Cpu)?.to_device(device)?)
    }

    /// Bytes held by the blocks.
    pub fn storage_bytes(&self) -> usize {
        self.q.storage_size_in_bytes()
    }

    /// The same weight with its rows reordered: row `i` of the result is row `order[i]` here.
    /// Blocks never straddle rows, so this moves whole rows of blocks and loses nothing (how
    /// llama.cpp's RoPE permutation of the query/key rows is undone without dequantizing).
    pub fn permute_rows(&self, order: &[usize]) -> Result<Self> {
        if order.len() != self.rows || order.iter().any(|&r| r >= self.rows) {
            return Err(Error::Config(format!(
                "row order of length {} does not permute {} rows",
                order.len(),
                self.rows
            )));
        }
        let rb = self.row_bytes();
        let src = self.bytes();
        let mut bytes = Vec::with_capacity(src.len());
        for &r in order {
            bytes.extend_from_slice(&src[r * rb..(r + 1) * rb]);
        }
        let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, self.dtype())?;
        Self::new(QTensor::new(storage, (self.rows, self.cols))?)
    }
}

/// Whether candle's quantized dot products run vectorised on this CPU.
fn has_simd_dot() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(target_arch = "aarch64")]
    {
        cfg!(target_feature = "neon")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Decodes whole blocks of type `T` from their bytes.
fn to_float<T: GgmlType>(bytes: &[u8], out: &mut [f32]) {
    let size = std::mem::size_of::<T>();
    assert!(
        bytes.len().is_multiple_of(size)
            && (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
            && out.len() == bytes.len() / size * T::BLCK_SIZE,
        "GGML blocks misaligned or mis-sized"
    );
    // SAFETY: the bytes come from candle's `Vec<T>` storage (so aligned for `T`, checked above),
    // are cut at block boundaries, and every bit pattern is a valid block (plain integers and
    // f16 scales).
    let blocks =
        unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) };
    T::to_float(blocks, out);
}
