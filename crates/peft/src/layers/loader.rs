//! The weight loader: hands out layers by Hugging Face path, so that every layer a model builds
//! is named as transformers names it and becomes an adaptation site under that name.

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use std::sync::Mutex;

use super::{Conv2d, ConvParams, Embedding, GroupNorm, HookPoint, LayerNorm, Linear, RmsNorm};
use crate::io::Weights;
use crate::quant::{BitsAndBytesConfig, Int8Rows, Quant4, QuantWeight, Scheme};
use crate::{Error, Result};

/// Hands out layers by Hugging Face path. `pp` descends one level, as in candle's `VarBuilder`.
///
/// Checkpoints disagree about the base-model prefix (`bert.` is absent from MiniLM, present in a
/// saved `BertForSequenceClassification`), so a name is looked up as given, without the prefix,
/// and with it.
#[derive(Clone)]
pub struct Loader<'a> {
    weights: &'a Weights,
    path: String,
    base_prefix: Option<&'a str>,
    pub device: Device,
    pub dtype: DType,
    init: &'a HeadInit,
}

/// What every loader of one model load shares: the random initialisation of task heads the
/// checkpoint lacks (a classifier on a base model), as transformers does it (normal(0,
/// initializer_range) weights and zero biases), and the quantization of the base's Linear
/// layers, if one was asked for.
pub struct HeadInit {
    pub std: f64,
    pub seed: u64,
    /// Names of the tensors that were initialised rather than loaded.
    pub initialized: Mutex<Vec<String>>,
    /// Quantize every dense Linear the loader hands out (transformers' skips aside).
    pub quantization: Option<(BitsAndBytesConfig, Scheme)>,
    /// Keep a GGUF file's block-quantized Linear weights in their blocks instead of
    /// dequantizing them to f32 at load (what transformers does).
    pub keep_gguf_quantized: bool,
    /// The compute dtype a checkpoint saved 4-bit names in its `quantization_config`
    /// (`bnb_4bit_compute_dtype`), given to its stored 4-bit layers.
    pub stored_compute_dtype: Option<candle_core::DType>,
}

impl HeadInit {
    pub fn new(std: f64, seed: u64) -> Self {
        Self {
            std,
            seed,
            initialized: Mutex::new(Vec::new()),
            quantization: None,
            keep_gguf_quantized: false,
            stored_compute_dtype: None,
        }
    }

    /// Quantizes the base's Linear layers at load as `config` asks (checked here).
    pub fn with_quantization(mut self, config: Option<&BitsAndBytesConfig>) -> Result<Self> {
        self.quantization = match config {
            Some(c) => c.scheme()?.map(|s| (c.clone(), s)),
            None => None,
        };
        Ok(self)
    }
}

/// Output heads by the module's own name.
const HEAD_NAMES: [&str; 4] = ["lm_head", "score", "classifier", "qa_outputs"];

/// Whether transformers 5 keeps the Linear at `path` dense when quantizing at load with no
/// `llm_int8_skip_modules`. Its `get_keys_to_not_convert` skips the tied weights, the output
/// embedding (`lm_head`) and the module of the model's last parameter, named by stripping only
/// `.weight`: a head whose last parameter is its bias (`classifier.bias` of BERT/RoBERTa/GPT-2
/// classifiers, `qa_outputs.bias`, a Llama token classifier's `score.bias`) leaves the pattern
/// `classifier.bias`, which matches no module, so that head is quantized with the pooler; only
/// a bias-less head (`score` of a Llama/GPT-2/OPT sequence classifier) stays dense. (4.x
/// stripped `.bias` too and kept every last head dense.)
fn transformers_default_skip(path: &str, bias: bool) -> bool {
    let last = path.rsplit('.').next().unwrap_or(path);
    last == "lm_head" || (!bias && HEAD_NAMES.contains(&last))
}

impl<'a> Loader<'a> {
    pub fn new(
        weights: &'a Weights,
        base_prefix: Option<&'a str>,
        device: Device,
        init: &'a HeadInit,
    ) -> Self {
        Self {
            weights,
            path: String::new(),
            base_prefix,
            device,
            dtype: DType::F32,
            init,
        }
    }

    /// Descends into the child module `name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let mut next = self.clone();
        next.path = if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        };
        next
    }

    /// The module path this loader points at.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn full(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    fn resolve(&self, full: &str) -> Option<String> {
        if self.weights.contains(full) {
            return Some(full.to_string());
        }
        let prefix = self.base_prefix?;
        if let Some(stripped) = full.strip_prefix(prefix).and_then(|s| s.strip_prefix('.')) {
            if self.weights.contains(stripped) {
                return Some(stripped.to_string());
            }
        }
        let added = format!("{prefix}.{full}");
        self.weights.contains(&added).then_some(added)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.resolve(&self.full(name)).is_some()
    }

    /// Loads tensor `name` under the current path and checks its shape.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = self.full(name);
        let key = self.resolve(&full).ok_or_else(|| {
            let near: Vec<&str> = self
                .weights
                .names()
                .filter(|n| {
                    n.ends_with(name) || n.contains(self.path.rsplit('.').next().unwrap_or(""))
                })
                .take(5)
                .collect();
            Error::MissingTensor {
                name: full.clone(),
                location: self.weights.location.clone(),
                hint: if near.is_empty() {
                    String::new()
                } else {
                    format!("; similar names there: {}", near.join(", "))
                },
            }
        })?;
        let t = self.weights.load(&key, &self.device)?;
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                name: key,
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.to_dtype(self.dtype)?)
    }

    /// A `Linear` with weight `[out, in]`: kept quantized when the checkpoint stores it in
    /// bitsandbytes' 4-bit format, quantized here when the load asks for it, else dense.
    pub fn linear(&self, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        // The weight first: a shape error then names the weight, not its bias.
        let bias = || -> Result<Option<Tensor>> {
            Ok(if bias {
                Some(self.tensor("bias", &[out_dim])?)
            } else {
                None
            })
        };
        if let Some(q) = self.stored_quant(in_dim, out_dim)? {
            return Linear::quantized(self.path.clone(), q, bias()?, &self.device);
        }
        if let Some(q) = self.stored_ggml(in_dim, out_dim)? {
            return Linear::quantized(self.path.clone(), q, bias()?, &self.device);
        }
        let w = self.tensor("weight", &[out_dim, in_dim])?;
        let b = bias()?;
        match self.load_scheme(b.is_some()) {
            Some(scheme) => {
                let q = QuantWeight::quantize(&w, &scheme)?;
                Linear::quantized(self.path.clone(), q, b, &self.device)
            }
            None => Ok(Linear::new(self.path.clone(), w, b, false)),
        }
    }

    /// A `Linear` stored `[in, out]`, as transformers' `Conv1D` (GPT-2) stores it. Quantized,
    /// it is stored `[out, in]` as bitsandbytes stores the `Linear4bit` transformers makes of it.
    pub fn conv1d(&self, in_dim: usize, out_dim: usize) -> Result<Linear> {
        if let Some(q) = self.stored_quant(in_dim, out_dim)? {
            let b = self.tensor("bias", &[out_dim])?;
            return Linear::quantized_conv1d(self.path.clone(), q, Some(b), &self.device);
        }
        let w = self.tensor("weight", &[in_dim, out_dim])?;
        let b = self.tensor("bias", &[out_dim])?;
        match self.load_scheme(true) {
            Some(scheme) => {
                let q = QuantWeight::quantize(&w.t()?.contiguous()?, &scheme)?;
                Linear::quantized_conv1d(self.path.clone(), q, Some(b), &self.device)
            }
            None => Ok(Linear::new(self.path.clone(), w, Some(b), true)),
        }
    }

    /// The scheme this Linear (with a bias or not) is quantized with at load, if any: none for
    /// transformers' default skips ([`transformers_default_skip`]) unless a skip list replaces
    /// them, and none for `llm_int8_skip_modules`, as transformers does.
    fn load_scheme(&self, bias: bool) -> Option<Scheme> {
        let (config, scheme) = self.init.quantization.as_ref()?;
        let default_skip =
            !config.replaces_default_skips() && transformers_default_skip(&self.path, bias);
        if default_skip || config.skips(&self.path) {
            tracing::debug!("{}: kept dense", self.path);
            return None;
        }
        Some(*scheme)
    }

    /// The GGUF blocks stored at this path, kept as they are (unless the load asks for
    /// dequantized GGUF weights). Heads included: llama.cpp multiplies the output by its stored
    /// blocks. Off the CPU the weight is dequantized at load: the blocks' kernels here are CPU
    /// kernels.
    fn stored_ggml(&self, in_dim: usize, out_dim: usize) -> Result<Option<QuantWeight>> {
        self.gguf_blocks(out_dim, in_dim)
    }

    /// The `[rows, cols]` GGUF blocks of this path's `weight` when the load keeps GGUF weights
    /// quantized (on the CPU); `None` for a dense weight or a dequantizing load. A tied LM head
    /// reads the token table's blocks here, as llama.cpp's output product does.
    pub fn gguf_blocks(&self, rows: usize, cols: usize) -> Result<Option<QuantWeight>> {
        let (out_dim, in_dim) = (rows, cols);
        if !self.init.keep_gguf_quantized || !self.device.is_cpu() {
            return Ok(None);
        }
        let Some(key) = self.resolve(&self.full("weight")) else {
            return Ok(None);
        };
        let Some(q) = self.weights.load_ggml(&key)? else {
            return Ok(None);
        };
        if q.dims() != (out_dim, in_dim) {
            return Err(Error::ShapeMismatch {
                name: key,
                expected: vec![out_dim, in_dim],
                found: vec![q.dims().0, q.dims().1],
            });
        }
        Ok(Some(QuantWeight::Ggml(q)))
    }

    /// The 4-bit weight a transformers checkpoint stores at this path (`weight`,
    /// `weight.absmax`, ..., `weight.quant_state.bitsandbytes__nf4|fp4`), checked against the
    /// layer's shape.
    fn stored_quant(&self, in_dim: usize, out_dim: usize) -> Result<Option<QuantWeight>> {
        let Some(key) = self.resolve(&self.full("weight")) else {
            return Ok(None);
        };
        let state = ["nf4", "fp4"].iter().any(|t| {
            self.weights
                .contains(&format!("{key}.quant_state.bitsandbytes__{t}"))
        });
        if !state {
            // transformers saves the row scales beside the weight: `<module>.SCB`.
            let scb = format!("{}.SCB", key.strip_suffix(".weight").unwrap_or(&key));
            if self.weights.contains(&scb) {
                return self.stored_int8(&key, &scb, in_dim, out_dim).map(Some);
            }
            return Ok(None);
        }
        let mut parts = std::collections::HashMap::new();
        let prefix = format!("{key}.");
        for name in self.weights.names() {
            if name == key || name.starts_with(&prefix) {
                // Codes and the quant state are bytes: read them on the CPU as stored.
                parts.insert(
                    name.to_string(),
                    self.weights.load(name, &candle_core::Device::Cpu)?,
                );
            }
        }
        let q = Quant4::from_state_dict(&key, &parts)?
            .ok_or_else(|| Error::Config(format!("{key}: unreadable 4-bit quant state")))?;
        if q.shape != [out_dim, in_dim] {
            return Err(Error::ShapeMismatch {
                name: key,
                expected: vec![out_dim, in_dim],
                found: q.shape.clone(),
            });
        }
        // transformers gives every Linear4bit the config's compute dtype.
        let compute_dtype = self.init.stored_compute_dtype;
        Ok(Some(QuantWeight::bnb4(Quant4 { compute_dtype, ..q })?))
    }

    /// The LLM.int8 weight a transformers checkpoint stores at `key` (`weight` int8 `[out, in]`,
    /// `SCB` f32 `[out]`, `weight_format` 0 = row-major), checked against the layer's shape.
    fn stored_int8(
        &self,
        key: &str,
        scb_key: &str,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<QuantWeight> {
        let (shape, bytes) = self
            .weights
            .raw(key, safetensors::Dtype::I8)?
            .ok_or_else(|| {
                Error::Config(format!(
                    "{key}: has an 8-bit SCB beside it but is not stored as int8 ({})",
                    self.weights.location
                ))
            })?;
        let format_key = format!("{key}_format");
        if self.weights.contains(&format_key) {
            let f = self
                .weights
                .load(&format_key, &candle_core::Device::Cpu)?
                .to_dtype(candle_core::DType::U32)?
                .flatten_all()?
                .to_vec1::<u32>()?;
            // bitsandbytes' LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING: 0 row, 1 col32, 2 col_turing,
            // 3 col_ampere; only the row layout is written since bitsandbytes 0.45.
            if f.first().copied().unwrap_or(0) != 0 {
                return Err(Error::Config(format!(
                    "{key}: 8-bit weight_format {f:?} (a tiled GPU layout of old bitsandbytes) is \
                     not supported; re-save the model with bitsandbytes >= 0.45 (row format)"
                )));
            }
        }
        if shape != [out_dim, in_dim] {
            return Err(Error::ShapeMismatch {
                name: key.to_string(),
                expected: vec![out_dim, in_dim],
                found: shape,
            });
        }
        let scb = self.weights.load(scb_key, &candle_core::Device::Cpu)?;
        let codes: Vec<i8> = bytes.into_iter().map(|b| b as i8).collect();
        Ok(QuantWeight::Int8(std::sync::Arc::new(
            Int8Rows::from_parts(codes, &shape, &scb)?,
        )))
    }

    /// A task head: loaded when the checkpoint has it, else freshly initialised.
    pub fn linear_or_init(&self, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        if self.contains("weight") {
            return self.linear(in_dim, out_dim, bias);
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.init.seed ^ fxhash(&self.path));
        let normal =
            Normal::new(0.0f32, self.init.std as f32).map_err(|e| Error::Config(e.to_string()))?;
        let w: Vec<f32> = (0..in_dim * out_dim)
            .map(|_| normal.sample(&mut rng))
            .collect();
        let w = Tensor::from_vec(w, (out_dim, in_dim), &self.device)?.to_dtype(self.dtype)?;
        let b = if bias {
            Some(Tensor::zeros(out_dim, self.dtype, &self.device)?)
        } else {
            None
        };
        if let Ok(mut v) = self.init.initialized.lock() {
            v.push(self.path.clone());
        }
        Ok(Linear::new(self.path.clone(), w, b, false))
    }

    pub fn embedding(&self, num: usize, dim: usize) -> Result<Embedding> {
        Ok(Embedding::new(
            self.path.clone(),
            self.tensor("weight", &[num, dim])?,
        ))
    }

    /// The input embedding of a model whose output head shares its weight: this path's
    /// `weight`, or, when the checkpoint holds only the head's (`head`; transformers keeps one
    /// copy of tied weights, under either name), that one, as transformers ties them on load.
    pub fn tied_embedding(&self, num: usize, dim: usize, head: &Loader) -> Result<Embedding> {
        if !self.contains("weight") && head.contains("weight") {
            return Ok(Embedding::new(
                self.path.clone(),
                head.tensor("weight", &[num, dim])?,
            ));
        }
        self.embedding(num, dim)
    }

    pub fn layer_norm(&self, dim: usize, eps: f64) -> Result<LayerNorm> {
        // Old BERT checkpoints name LayerNorm parameters gamma/beta.
        let (w, b) = if !self.contains("weight") && self.contains("gamma") {
            (self.tensor("gamma", &[dim])?, self.tensor("beta", &[dim])?)
        } else {
            (self.tensor("weight", &[dim])?, self.tensor("bias", &[dim])?)
        };
        Ok(LayerNorm::new(self.path.clone(), w, Some(b), eps))
    }

    /// A `Conv2d` with weight `[out, in / groups, k, k]` (and a bias `[out]` when `bias`).
    pub fn conv2d(
        &self,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        params: ConvParams,
        bias: bool,
    ) -> Result<Conv2d> {
        let w = self.tensor(
            "weight",
            &[out_ch, in_ch / params.groups.max(1), kernel, kernel],
        )?;
        let b = if bias {
            Some(self.tensor("bias", &[out_ch])?)
        } else {
            None
        };
        Ok(Conv2d::new(self.path.clone(), w, b, params))
    }

    /// A `GroupNorm` over `channels` in `groups` groups (weight and bias `[channels]`).
    pub fn group_norm(&self, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
        Ok(GroupNorm::new(
            self.path.clone(),
            self.tensor("weight", &[channels])?,
            self.tensor("bias", &[channels])?,
            groups,
            eps,
        ))
    }

    /// The hook point at this path (it has no weights; see [`HookPoint`]).
    pub fn hook(&self, location: super::HookLocation, layer: usize) -> HookPoint {
        HookPoint::new(self.path.clone(), location, layer)
    }

    pub fn rms_norm(&self, dim: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm::new(
            self.path.clone(),
            self.tensor("weight", &[dim])?,
            eps,
        ))
    }
}

/// A small stable string hash so each initialised head gets its own stream from one seed.
fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}
