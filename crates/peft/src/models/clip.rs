//! CLIP's text encoder (transformers' `CLIPTextModel`), the text side of Stable Diffusion 1.x and
//! 2.x (the latter's OpenCLIP encoder converted to this layout, with `gelu` instead of
//! `quick_gelu`). Pre-norm blocks under causal attention, a final LayerNorm; the output is the
//! last hidden state (`FEATURE_EXTRACTION`), the pooled output being the state at the first
//! end-of-text token ([`ClipText::pooled`]).

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::path::Path;

use super::{Cache, Inputs, LoadOptions, Model, ModelDims, ModelInfo, TaskType};
use crate::io::Weights;
use crate::layers::attention::causal_mask;
use crate::layers::{Embedding, HeadInit, HookLocation, HookPoint, LayerNorm, Linear, Loader};
use crate::{impl_modules, ops, Error, Result};

/// `CLIPTextConfig` (the fields the text encoder uses, transformers' defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub attention_dropout: f64,
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

fn default_vocab() -> usize {
    49408
}
fn default_hidden() -> usize {
    512
}
fn default_intermediate() -> usize {
    2048
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    8
}
fn default_positions() -> usize {
    77
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> u32 {
    2
}

#[derive(Debug, Clone, Copy)]
enum Act {
    QuickGelu,
    Gelu,
    GeluTanh,
}

impl Act {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "quick_gelu" => Act::QuickGelu,
            "gelu" => Act::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Act::GeluTanh,
            other => {
                return Err(Error::Config(format!(
                    "CLIP hidden_act `{other}` is not supported; supported: quick_gelu, gelu, \
                     gelu_new, gelu_pytorch_tanh"
                )))
            }
        })
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            // x · sigmoid(1.702 x)
            Act::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
            Act::Gelu => ops::gelu_erf(x)?,
            Act::GeluTanh => x.gelu()?,
        })
    }
}

struct Layer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    attn_hook: HookPoint,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    out_hook: HookPoint,
}
impl_modules!(Layer {
    layer_norm1,
    q_proj,
    k_proj,
    v_proj,
    out_proj,
    attn_hook,
    layer_norm2,
    fc1,
    fc2,
    out_hook
});

/// `CLIPTextModel`, weights under `text_model.` as transformers saves them.
pub struct ClipText {
    info: ModelInfo,
    pub cfg: ClipTextConfig,
    act: Act,
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<Layer>,
    final_layer_norm: LayerNorm,
    device: Device,
}
impl_modules!(ClipText {
    token_embedding,
    position_embedding,
    layers,
    final_layer_norm
});

impl ClipText {
    pub fn load(
        weights: &Weights,
        init: &HeadInit,
        config: serde_json::Value,
        dir: &Path,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let cfg: ClipTextConfig = serde_json::from_value(config.clone())
            .map_err(|e| Error::Config(format!("{}/config.json: {e}", dir.display())))?;
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(Error::Config(format!(
                "{}/config.json: hidden_size {} is not a multiple of num_attention_heads {}",
                dir.display(),
                cfg.hidden_size,
                cfg.num_attention_heads
            )));
        }
        let act = Act::parse(&cfg.hidden_act)?;
        // transformers 5 names the modules without the `text_model.` wrapper that checkpoints
        // of transformers 4 (every SD pipeline on the hub) still carry in their keys; the
        // loader finds the weights either way, and the modules take transformers 5's names, as
        // PEFT 0.21 on it names them ([`Model::canonical_module_path`] maps the old ones).
        let tm = Loader::new(weights, Some("text_model"), opts.device.clone(), init);
        let (h, inner, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let emb = tm.pp("embeddings");
        let token_embedding = emb.pp("token_embedding").embedding(cfg.vocab_size, h)?;
        let position_embedding = emb
            .pp("position_embedding")
            .embedding(cfg.max_position_embeddings, h)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = tm.pp("encoder.layers").pp(i);
                let a = l.pp("self_attn");
                Ok(Layer {
                    layer_norm1: l.pp("layer_norm1").layer_norm(h, eps)?,
                    q_proj: a.pp("q_proj").linear(h, h, true)?,
                    k_proj: a.pp("k_proj").linear(h, h, true)?,
                    v_proj: a.pp("v_proj").linear(h, h, true)?,
                    out_proj: a.pp("out_proj").linear(h, h, true)?,
                    attn_hook: l.pp("attention_adapters").hook(HookLocation::Attention, i),
                    layer_norm2: l.pp("layer_norm2").layer_norm(h, eps)?,
                    fc1: l.pp("mlp.fc1").linear(h, inner, true)?,
                    fc2: l.pp("mlp.fc2").linear(inner, h, true)?,
                    out_hook: l.pp("output_adapters").hook(HookLocation::FeedForward, i),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = tm.pp("final_layer_norm").layer_norm(h, eps)?;
        let info = ModelInfo {
            model_type: "clip_text_model".into(),
            architecture: "CLIPTextModel".into(),
            task: TaskType::FeatureExtraction,
            head: Vec::new(),
            config,
            dir: dir.to_path_buf(),
        };
        Ok(Self {
            info,
            cfg,
            act,
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            device: opts.device.clone(),
        })
    }

    /// The last hidden state `[batch, seq, hidden]` for `[batch, seq]` ids (u32), after the final
    /// LayerNorm; `attention_mask` (1 = token) masks padded keys on top of the causal mask.
    pub fn encode(
        &self,
        ids: Option<&Tensor>,
        embeds: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let x = match (embeds, ids) {
            (Some(e), _) => e.clone(),
            (None, Some(ids)) => self
                .token_embedding
                .forward_t(&ids.to_dtype(DType::U32)?, train)?,
            (None, None) => {
                return Err(Error::Data(
                    "the CLIP text encoder needs input_ids (or inputs_embeds)".into(),
                ))
            }
        };
        let (b, t, h) = x.dims3()?;
        if t > self.cfg.max_position_embeddings {
            return Err(Error::Data(format!(
                "{t} tokens, but the CLIP text encoder has {} positions; truncate the prompt \
                 (the tokenizer's model_max_length)",
                self.cfg.max_position_embeddings
            )));
        }
        let pos = Tensor::arange(0u32, t as u32, &self.device)?;
        let mut x = x.broadcast_add(&self.position_embedding.forward_t(&pos, train)?)?;
        let mask = causal_mask(b, t, 0, attention_mask, None, x.dtype(), &self.device)?;
        let heads = self.cfg.num_attention_heads;
        let scale = 1.0 / ((h / heads) as f64).sqrt();
        for l in &self.layers {
            let n = l.layer_norm1.forward(&x)?;
            let q = l.q_proj.forward_t(&n, train)?;
            let k = l.k_proj.forward_t(&n, train)?;
            let v = l.v_proj.forward_t(&n, train)?;
            let ctx = ops::attention_merged_heads(
                &q,
                &k,
                &v,
                heads,
                Some(&mask),
                scale,
                self.cfg.attention_dropout,
                train,
            )?;
            let a = l.out_proj.forward_t(&ctx, train)?;
            x = l.attn_hook.forward(&a, &x, None, train)?;
            let n = l.layer_norm2.forward(&x)?;
            let m = l
                .fc2
                .forward_t(&self.act.apply(&l.fc1.forward_t(&n, train)?)?, train)?;
            x = l.out_hook.forward(&m, &x, None, train)?;
        }
        self.final_layer_norm.forward(&x)
    }

    /// transformers' `pooler_output`: the last hidden state at the end-of-text token (the
    /// highest id when `eos_token_id` is 2, as in configs from before the token was fixed;
    /// else the first position holding `eos_token_id`).
    pub fn pooled(&self, hidden: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.to_dtype(DType::U32)?;
        let rows: Vec<Vec<u32>> = ids.to_vec2()?;
        let eos = self.cfg.eos_token_id;
        let pos: Vec<u32> = rows
            .iter()
            .map(|r| {
                let at = if eos == 2 {
                    r.iter()
                        .enumerate()
                        .max_by_key(|(i, v)| (**v, std::cmp::Reverse(*i)))
                        .map(|(i, _)| i)
                } else {
                    r.iter().position(|v| *v == eos)
                };
                at.unwrap_or(r.len().saturating_sub(1)) as u32
            })
            .collect();
        let (b, _, h) = hidden.dims3()?;
        let idx = Tensor::from_vec(pos, (b, 1, 1), &self.device)?.broadcast_as((b, 1, h))?;
        Ok(hidden
            .contiguous()?
            .gather(&idx.contiguous()?, 1)?
            .squeeze(1)?)
    }
}

impl Model for ClipText {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dims(&self) -> ModelDims {
        let c = &self.cfg;
        ModelDims {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            num_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_attention_heads,
            head_dim: c.hidden_size / c.num_attention_heads,
            num_encoder_layers: 0,
            is_encoder_decoder: false,
            max_positions: Some(c.max_position_embeddings),
            pad_token_id: c.pad_token_id,
            eos_token_ids: vec![c.eos_token_id],
            bos_token_id: c.bos_token_id,
            decoder_start_token_id: None,
        }
    }

    fn embed_tokens(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        self.token_embedding
            .forward_t(&ids.to_dtype(DType::U32)?, train)
    }

    fn forward_with_cache(
        &self,
        inputs: &Inputs,
        cache: Option<&mut Cache>,
        train: bool,
    ) -> Result<Tensor> {
        if cache.is_some() {
            return Err(Error::Config(
                "the CLIP text encoder has no key/value cache".into(),
            ));
        }
        self.encode(
            inputs.input_ids.as_ref(),
            inputs.inputs_embeds.as_ref(),
            inputs.attention_mask.as_ref(),
            train,
        )
    }

    /// Module paths of transformers 4 (`text_model.encoder.layers.0...`) as this model names
    /// them (transformers 5: `encoder.layers.0...`).
    fn canonical_module_path(&self, path: &str) -> String {
        path.strip_prefix("text_model.").unwrap_or(path).to_string()
    }

    fn outputs(&self, inputs: &Inputs, train: bool) -> Result<Vec<(String, Tensor)>> {
        let hidden = self.forward(inputs, train)?;
        let mut out = Vec::new();
        if let Some(ids) = &inputs.input_ids {
            out.push(("pooler_output".into(), self.pooled(&hidden, ids)?));
        }
        out.insert(0, ("last_hidden_state".into(), hidden));
        Ok(out)
    }
}
