//! Writing GGUF files (version 3, as llama.cpp's `gguf` Python package writes them): metadata
//! key/values, then tensor descriptions, then the tensor data, each piece aligned to 32 bytes.
//!
//! candle's own `gguf_file::write` writes version 2 and only takes already-quantized tensors; the
//! adapters written here are float tensors (F32/F16/BF16, what llama.cpp's LoRA converter
//! offers), so a small writer of our own keeps the file exactly in the current format. The file
//! is written atomically, like every other file the project writes.

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Tensor};
use std::path::Path;

use crate::{Error, Result};

const MAGIC: u32 = 0x4655_4747; // "GGUF", little endian
const VERSION: u32 = 3;
/// `general.alignment`'s default: the file does not record it unless it differs.
const ALIGNMENT: usize = 32;

/// One tensor to write: its name, the ggml type to store it in, and its values in
/// PyTorch/NumPy dimension order (outermost first; the file records them reversed, as ggml's
/// `ne`).
pub struct GgufTensor {
    pub name: String,
    pub dtype: GgmlDType,
    pub tensor: Tensor,
}

/// Serialises `metadata` (in order) and `tensors` (in order) as a GGUF v3 file at `path`,
/// atomically. Only float storage types are written (F32, F16, BF16).
pub fn write_gguf(path: &Path, metadata: &[(String, Value)], tensors: &[GgufTensor]) -> Result<()> {
    let bytes = to_bytes(metadata, tensors)?;
    super::write_atomic(path, &bytes)
}

/// The bytes of the GGUF file [`write_gguf`] writes.
pub fn to_bytes(metadata: &[(String, Value)], tensors: &[GgufTensor]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    out.extend(MAGIC.to_le_bytes());
    out.extend(VERSION.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut out, key);
        out.extend(type_id(value).to_le_bytes());
        put_value(&mut out, value)?;
    }
    let mut data: Vec<Vec<u8>> = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for t in tensors {
        let bytes = tensor_bytes(t)?;
        put_string(&mut out, &t.name);
        let dims = t.tensor.dims();
        out.extend((dims.len() as u32).to_le_bytes());
        for &d in dims.iter().rev() {
            out.extend((d as u64).to_le_bytes());
        }
        out.extend(ggml_type_id(t.dtype)?.to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offset += padded(bytes.len());
        data.push(bytes);
    }
    out.resize(padded(out.len()), 0);
    for bytes in data {
        let len = bytes.len();
        out.extend(bytes);
        out.resize(out.len() + padded(len) - len, 0);
    }
    Ok(out)
}

fn padded(n: usize) -> usize {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// GGUF's value type ids (gguf.GGUFValueType).
fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend(x.to_le_bytes()),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
        Value::Array(items) => {
            // An array holds one type; an empty one is written as an array of u8 (any works).
            let elem = items.first().map_or(0, type_id);
            if items.iter().any(|i| type_id(i) != elem) {
                return Err(Error::Config(
                    "a GGUF metadata array must hold values of one type".into(),
                ));
            }
            out.extend(elem.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i)?;
            }
        }
    }
    Ok(())
}

fn ggml_type_id(t: GgmlDType) -> Result<u32> {
    match t {
        GgmlDType::F32 => Ok(0),
        GgmlDType::F16 => Ok(1),
        GgmlDType::BF16 => Ok(30),
        other => Err(Error::Config(format!(
            "GGUF writer: tensors are written as F32, F16 or BF16, not {other:?}"
        ))),
    }
}

/// The tensor's values in the storage type, little endian, row-major. The float conversions
/// round to nearest even, as NumPy's `astype(float16)` and gguf-py's BF16 packing do.
fn tensor_bytes(t: &GgufTensor) -> Result<Vec<u8>> {
    let flat = t
        .tensor
        .to_device(&candle_core::Device::Cpu)?
        .flatten_all()?;
    Ok(match t.dtype {
        GgmlDType::F32 => flat
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        GgmlDType::F16 => flat
            .to_dtype(DType::F32)?
            .to_dtype(DType::F16)?
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        GgmlDType::BF16 => flat
            .to_dtype(DType::F32)?
            .to_dtype(DType::BF16)?
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        other => {
            ggml_type_id(other)?;
            unreachable!("ggml_type_id accepts only float types")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Content;
    use candle_core::Device;

    #[test]
    fn candle_reads_back_what_is_written() {
        let t = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let meta = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("adapter.lora.alpha".to_string(), Value::F32(16.0)),
            (
                "list".to_string(),
                Value::Array(vec![Value::U32(1), Value::U32(2)]),
            ),
        ];
        let tensors = [
            GgufTensor {
                name: "a".into(),
                dtype: GgmlDType::F32,
                tensor: t.clone(),
            },
            GgufTensor {
                name: "b".into(),
                dtype: GgmlDType::F16,
                tensor: t.clone(),
            },
        ];
        let bytes = to_bytes(&meta, &tensors).unwrap();
        let mut cur = std::io::Cursor::new(&bytes);
        let c = Content::read(&mut cur).unwrap();
        assert_eq!(c.metadata["adapter.lora.alpha"].to_f32().unwrap(), 16.0);
        for name in ["a", "b"] {
            let q = c.tensor(&mut cur, name, &Device::Cpu).unwrap();
            assert_eq!(q.shape().dims(), &[2, 3]);
            let back = q.dequantize(&Device::Cpu).unwrap();
            assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        }
    }
}
