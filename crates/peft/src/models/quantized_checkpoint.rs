//! Writing a model with quantized base weights as transformers saves a bitsandbytes model
//! (`save_pretrained` of a model loaded with a `BitsAndBytesConfig`), so transformers loads it
//! back quantized: 8-bit layers as `weight` (int8) + `SCB` (f32 row maxima) + `weight_format`
//! (u8 0 = row-major), 4-bit layers as the packed `weight` with its quant state, every other
//! tensor as it is, and `quantization_config` in config.json.
//!
//! candle has no int8 tensor, so the file is assembled from raw little-endian buffers.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use safetensors::tensor::View;
use safetensors::Dtype;

use super::Model;
use crate::quant::{BitsAndBytesConfig, QuantWeight};
use crate::{Error, Result};

/// One tensor of a safetensors file as raw bytes.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn raw(t: &Tensor) -> Result<Raw> {
    let shape = t.dims().to_vec();
    let t = t.to_device(&candle_core::Device::Cpu)?.flatten_all()?;
    let (dtype, data): (Dtype, Vec<u8>) = match t.dtype() {
        DType::F32 => (Dtype::F32, bytes(t.to_vec1::<f32>()?, f32::to_le_bytes)),
        DType::BF16 => (
            Dtype::BF16,
            bytes(t.to_vec1::<half::bf16>()?, |x| x.to_le_bytes()),
        ),
        DType::F16 => (
            Dtype::F16,
            bytes(t.to_vec1::<half::f16>()?, |x| x.to_le_bytes()),
        ),
        DType::U8 => (Dtype::U8, t.to_vec1::<u8>()?),
        other => {
            return Err(Error::Config(format!(
                "a quantized checkpoint cannot hold a {other:?} tensor"
            )))
        }
    };
    Ok(Raw { dtype, shape, data })
}

fn bytes<T: Copy, const N: usize>(v: Vec<T>, f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.into_iter().flat_map(f).collect()
}

/// Writes `model` to `dir` with its quantized Linear weights in bitsandbytes' serialized form
/// and `config` as config.json's `quantization_config` (model.safetensors and config.json,
/// atomically). Refuses a model with no quantized layer (save it with
/// [`crate::models::save_pretrained`]).
pub fn save_quantized(model: &dyn Model, dir: &Path, config: &BitsAndBytesConfig) -> Result<()> {
    let mut tensors: Vec<(String, Raw)> = Vec::new();
    let mut quantized = 0;
    for module in model.modules() {
        for p in module.params() {
            match p.quant() {
                None => {
                    tensors.push((p.name.clone(), raw(&p.dense()?.detach())?));
                }
                Some(QuantWeight::Int8(q)) => {
                    quantized += 1;
                    let module_path = p.name.strip_suffix(".weight").unwrap_or(&p.name);
                    tensors.push((
                        p.name.clone(),
                        Raw {
                            dtype: Dtype::I8,
                            shape: vec![q.rows, q.cols],
                            data: q.codes.iter().map(|&c| c as u8).collect(),
                        },
                    ));
                    tensors.push((
                        format!("{module_path}.SCB"),
                        Raw {
                            dtype: Dtype::F32,
                            shape: vec![q.rows],
                            data: bytes(q.scb.clone(), f32::to_le_bytes),
                        },
                    ));
                    tensors.push((
                        format!("{}_format", p.name),
                        Raw {
                            dtype: Dtype::U8,
                            shape: Vec::new(),
                            data: vec![0],
                        },
                    ));
                }
                Some(QuantWeight::Bnb4(q)) => {
                    quantized += 1;
                    for (name, t) in q.to_state_dict(&p.name)? {
                        tensors.push((name, raw(&t)?));
                    }
                }
                Some(QuantWeight::Ggml(_)) => {
                    return Err(Error::Config(format!(
                        "{}: a GGUF-quantized weight has no bitsandbytes form; merge and save the \
                         model dequantized instead (peft merge --dequantize f32)",
                        p.name
                    )))
                }
            }
        }
    }
    if quantized == 0 {
        return Err(Error::Config(
            "the model has no quantized layer; save it as a dense checkpoint".into(),
        ));
    }
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let st = safetensors::serialize(tensors.iter().map(|(n, r)| (n.as_str(), r)), Some(meta))
        .map_err(|e| Error::Safetensors {
            path: dir.join("model.safetensors"),
            reason: e.to_string(),
        })?;
    let info = model.info();
    let mut cfg = info.config.clone();
    if let Some(obj) = cfg.as_object_mut() {
        obj.insert(
            "architectures".into(),
            serde_json::json!([info.architecture]),
        );
        obj.insert("quantization_config".into(), config.to_json());
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    crate::io::write_atomic(&dir.join("model.safetensors"), &st)?;
    let json = serde_json::to_string_pretty(&cfg).map_err(|e| Error::Config(e.to_string()))?;
    crate::io::write_atomic(&dir.join("config.json"), json.as_bytes())
}
