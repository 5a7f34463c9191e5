//! The Llama family — Llama, Mistral, Qwen2 — which share one layout: RMSNorm before attention
//! and MLP, rotary positions, grouped-query attention and a gated (SwiGLU) MLP. The differences
//! are config switches: q/k/v biases (`attention_bias`; Qwen2 always), `mlp_bias`, `head_dim`,
//! sliding-window attention (Mistral on every layer, Qwen2 on the layers `layer_types` marks),
//! tied embeddings. Heads: `...ForCausalLM`, `...ForSequenceClassification`,
//! `...ForTokenClassification`, `...ForQuestionAnswering` and the bare `...Model`.

use candle_core::{Device, Tensor};
use serde::Deserialize;
use std::path::Path;

use super::decoder::{self, Activation, Head};
use super::{Cache, Inputs, KeyValue, LoadOptions, Model, ModelDims, ModelInfo, TaskType};
use crate::grad::checkpoint::{self, Checkpointed, Enrollment};
use crate::io::Weights;
use crate::layers::attention::{attention, causal_mask, extend_cache};
use crate::layers::rotary::{apply_rotary, Rotary};
use crate::layers::{Embedding, HookLocation, HookPoint, Linear, RmsNorm};
use crate::layers::{HeadInit, Loader};
use crate::{impl_modules, ops, Error, Result};

/// The config.json fields the Llama family shares (unknown fields are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub attention_dropout: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2: sliding windows only when this is set, on layers from `max_window_layers` on.
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    #[serde(default)]
    pub token_classification_bias: Option<bool>,
}

fn default_act() -> String {
    "silu".into()
}
fn default_max_positions() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}

struct Layer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    /// `attention_adapters`: the attention's output meets the residual.
    attn_hook: HookPoint,
    /// `output_adapters`: the MLP's output meets the residual.
    out_hook: HookPoint,
    sliding_window: Option<usize>,
}
impl_modules!(Layer {
    q_proj,
    k_proj,
    v_proj,
    o_proj,
    attn_hook,
    gate_proj,
    up_proj,
    down_proj,
    out_hook,
    input_layernorm,
    post_attention_layernorm
});

/// A Llama-family model with one of its heads.
pub struct Llama {
    info: ModelInfo,
    cfg: LlamaConfig,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    act: Activation,
    rotary: Rotary,
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    head: Head,
    pad_token_id: Option<u32>,
    device: Device,
    checkpointing: Enrollment,
}
impl_modules!(Llama {
    embed_tokens,
    layers,
    norm,
    head
});

/// The transformers class name stem of each supported `model_type`.
fn class_stem(model_type: &str) -> Result<&'static str> {
    Ok(match model_type {
        "llama" => "Llama",
        "mistral" => "Mistral",
        "qwen2" => "Qwen2",
        other => {
            return Err(Error::Config(format!(
                "`{other}` is not a Llama-family model_type; expected llama, mistral or qwen2"
            )))
        }
    })
}

impl Llama {
    pub fn load(
        weights: &Weights,
        init: &HeadInit,
        config: serde_json::Value,
        dir: &Path,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("llama")
            .to_string();
        let stem = class_stem(&model_type)?;
        let cfg: LlamaConfig = serde_json::from_value(config.clone())
            .map_err(|e| Error::Config(format!("{}/config.json: {e}", dir.display())))?;
        let heads = cfg.num_attention_heads;
        let kv_heads = cfg.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(Error::Config(format!(
                "num_attention_heads {heads} must be a positive multiple of num_key_value_heads {kv_heads}"
            )));
        }
        let head_dim = match cfg.head_dim {
            Some(d) => d,
            None if cfg.hidden_size.is_multiple_of(heads) => cfg.hidden_size / heads,
            None => {
                return Err(Error::Config(format!(
                    "hidden_size {} is not a multiple of num_attention_heads {heads}; set head_dim",
                    cfg.hidden_size
                )))
            }
        };
        let act = Activation::parse(&cfg.hidden_act)?;
        let rotary = Rotary::from_config(&config, head_dim, cfg.max_position_embeddings)?;
        let task = decoder::task(&config, opts);
        let (suffix, class_prefix) = match task {
            TaskType::CausalLm => ("ForCausalLM", "model"),
            TaskType::SeqCls => ("ForSequenceClassification", "model"),
            TaskType::TokenCls => ("ForTokenClassification", "model"),
            // Llama and Qwen2 keep the old `transformer.` name here (transformers' BC choice).
            TaskType::QuestionAns if stem == "Mistral" => ("ForQuestionAnswering", "model"),
            TaskType::QuestionAns => ("ForQuestionAnswering", "transformer"),
            TaskType::FeatureExtraction => ("Model", ""),
            TaskType::Seq2SeqLm => {
                return Err(Error::Config(format!(
                    "{stem} is decoder-only and has no SEQ_2_SEQ_LM head; use CAUSAL_LM, SEQ_CLS, \
                     TOKEN_CLS, QUESTION_ANS or FEATURE_EXTRACTION"
                )))
            }
        };
        // Checkpoints name the base model `model.` (or `transformer.` when saved from a
        // QuestionAnswering class); the loader also finds names without any prefix.
        let ckpt_prefix = if weights.contains("transformer.embed_tokens.weight") {
            "transformer"
        } else {
            "model"
        };
        let root = Loader::new(weights, Some(ckpt_prefix), opts.device.clone(), init);
        let base = if class_prefix.is_empty() {
            root.clone()
        } else {
            root.pp(ckpt_prefix)
        };
        let h = cfg.hidden_size;
        let embed_tokens = if cfg.tie_word_embeddings {
            base.pp("embed_tokens")
                .tied_embedding(cfg.vocab_size, h, &root.pp("lm_head"))?
        } else {
            base.pp("embed_tokens").embedding(cfg.vocab_size, h)?
        };
        let sliding = sliding_layers(&model_type, &cfg);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                load_layer(
                    &base.pp("layers").pp(i),
                    &cfg,
                    &model_type,
                    (heads, kv_heads, head_dim),
                    sliding[i],
                    i,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = base.pp("norm").rms_norm(h, cfg.rms_norm_eps)?;
        let head = match task {
            TaskType::CausalLm => Head::CausalLm(if cfg.tie_word_embeddings {
                // GGUF blocks kept: the head multiplies by the token table's blocks (30 MB of
                // Q8_0 for SmolLM2 against 113 MB of f32 per decoded token), as llama.cpp does.
                match base.pp("embed_tokens").gguf_blocks(cfg.vocab_size, h)? {
                    Some(q) => Linear::quantized("lm_head", q, None, &opts.device)?,
                    None => Linear::new("lm_head", embed_tokens.weight.base().clone(), None, false),
                }
            } else {
                root.pp("lm_head").linear(h, cfg.vocab_size, false)?
            }),
            TaskType::SeqCls => Head::SeqCls(Head::classifier(
                &root.pp("score"),
                &config,
                opts,
                h,
                false,
            )?),
            TaskType::TokenCls => {
                let bias = cfg.token_classification_bias.unwrap_or(true);
                let dropout = cfg.classifier_dropout.unwrap_or(0.1);
                Head::TokenCls(
                    Head::classifier(&root.pp("score"), &config, opts, h, bias)?,
                    dropout,
                )
            }
            TaskType::QuestionAns => {
                Head::QuestionAns(root.pp("qa_outputs").linear_or_init(h, 2, true)?)
            }
            _ => Head::None,
        };
        let info = ModelInfo {
            model_type: model_type.clone(),
            architecture: format!("{stem}{suffix}"),
            task,
            head: head.names(),
            config: config.clone(),
            dir: dir.to_path_buf(),
        };
        let mut model = Self {
            info,
            pad_token_id: decoder::token_id(&config, "pad_token_id"),
            cfg,
            heads,
            kv_heads,
            head_dim,
            act,
            rotary,
            embed_tokens,
            layers,
            norm,
            head,
            device: opts.device.clone(),
            checkpointing: Enrollment::default(),
        };
        if !class_prefix.is_empty() && class_prefix != ckpt_prefix {
            decoder::rename_prefix(&mut model, ckpt_prefix, class_prefix);
        }
        Ok(model)
    }

    fn layer_forward(
        &self,
        l: &Layer,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        masks: &Masks,
        kv: Option<&mut Option<KeyValue>>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let d = self.head_dim;
        let split = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?)
        };
        let hn = l.input_layernorm.forward(x)?;
        let q = split(l.q_proj.forward_t(&hn, train)?, self.heads)?;
        let k = split(l.k_proj.forward_t(&hn, train)?, self.kv_heads)?;
        let v = split(l.v_proj.forward_t(&hn, train)?, self.kv_heads)?;
        let q = apply_rotary(&q, &rope.0, &rope.1)?;
        let k = apply_rotary(&k, &rope.0, &rope.1)?;
        let (k, v) = extend_cache(kv, k, v)?;
        let mask = if l.sliding_window.is_some() {
            &masks.sliding
        } else {
            &masks.full
        };
        let ctx = attention(
            &q,
            &k,
            &v,
            Some(mask),
            None,
            1.0 / (d as f64).sqrt(),
            self.cfg.attention_dropout,
            train,
        )?;
        let ctx = ctx.transpose(1, 2)?.reshape((b, t, self.heads * d))?;
        let x = l
            .attn_hook
            .forward(&l.o_proj.forward_t(&ctx, train)?, x, None, train)?;
        let hn = l.post_attention_layernorm.forward(&x)?;
        let gate = l.gate_proj.forward_t(&hn, train)?;
        let up = l.up_proj.forward_t(&hn, train)?;
        let h = match self.act {
            Activation::Silu => ops::silu_mul(&gate, &up)?,
            act => (act.apply(&gate)? * up)?,
        };
        let o = l.down_proj.forward_t(&h, train)?;
        l.out_hook.forward(&o, &x, None, train)
    }

    /// The final hidden states `[batch, seq, hidden]` (after the last norm).
    fn decode(
        &self,
        inputs: &Inputs,
        mut cache: Option<&mut Cache>,
        train: bool,
    ) -> Result<Tensor> {
        let (past, t) =
            decoder::check_length(inputs, cache.as_deref(), self.rotary.context_length())?;
        let mut x =
            decoder::input_embeddings(inputs, |ids| self.embed_tokens.forward_t(ids, train))?;
        let b = x.dim(0)?;
        let dev = &self.device;
        let positions = decoder::positions(inputs, past, b, t, dev)?;
        let rope = self.rotary.cos_sin(&positions, x.dtype(), dev)?;
        let padding = inputs.attention_mask.as_ref();
        let full = causal_mask(b, t, past, padding, None, x.dtype(), dev)?;
        let window = self.layers.iter().find_map(|l| l.sliding_window);
        let sliding = match window {
            Some(w) => causal_mask(b, t, past, padding, Some(w), x.dtype(), dev)?,
            None => full.clone(),
        };
        let masks = Masks { full, sliding };
        if let Some(c) = cache.as_deref_mut() {
            c.self_attn.resize(self.layers.len(), None);
        }
        for (i, layer) in self.layers.iter().enumerate() {
            x = match cache.as_deref_mut() {
                Some(c) => {
                    let kv = Some(&mut c.self_attn[i]);
                    self.layer_forward(layer, &x, &rope, &masks, kv, train)?
                }
                None => {
                    let (rope, masks) = (rope.clone(), masks.clone());
                    checkpoint::block(self, &x, None, move |m: &Self, x, _| {
                        m.layer_forward(&m.layers[i], x, &rope, &masks, None, train)
                    })?
                }
            };
        }
        self.norm.forward(&x)
    }
}

#[derive(Clone)]
struct Masks {
    full: Tensor,
    sliding: Tensor,
}

/// Which layers use a sliding window, and its size: Mistral's on every layer; Qwen2's only with
/// `use_sliding_window`, on the layers `layer_types` marks `sliding_attention` (by default those
/// from `max_window_layers` on); Llama's never.
fn sliding_layers(model_type: &str, cfg: &LlamaConfig) -> Vec<Option<usize>> {
    let n = cfg.num_hidden_layers;
    match (model_type, cfg.sliding_window) {
        ("mistral", Some(w)) => vec![Some(w); n],
        ("qwen2", Some(w)) if cfg.use_sliding_window => {
            let from = cfg.max_window_layers.unwrap_or(28);
            (0..n)
                .map(|i| {
                    let sliding = match &cfg.layer_types {
                        Some(types) => types.get(i).is_some_and(|t| t == "sliding_attention"),
                        None => i >= from,
                    };
                    sliding.then_some(w)
                })
                .collect()
        }
        _ => vec![None; n],
    }
}

fn load_layer(
    vb: &Loader,
    cfg: &LlamaConfig,
    model_type: &str,
    (heads, kv_heads, d): (usize, usize, usize),
    sliding_window: Option<usize>,
    index: usize,
) -> Result<Layer> {
    let h = cfg.hidden_size;
    let att = vb.pp("self_attn");
    let mlp = vb.pp("mlp");
    let (qkv_bias, o_bias) = match model_type {
        "qwen2" => (true, false),
        "mistral" => (false, false),
        _ => (cfg.attention_bias, cfg.attention_bias),
    };
    let i = cfg.intermediate_size;
    Ok(Layer {
        q_proj: att.pp("q_proj").linear(h, heads * d, qkv_bias)?,
        k_proj: att.pp("k_proj").linear(h, kv_heads * d, qkv_bias)?,
        v_proj: att.pp("v_proj").linear(h, kv_heads * d, qkv_bias)?,
        o_proj: att.pp("o_proj").linear(heads * d, h, o_bias)?,
        gate_proj: mlp.pp("gate_proj").linear(h, i, cfg.mlp_bias)?,
        up_proj: mlp.pp("up_proj").linear(h, i, cfg.mlp_bias)?,
        down_proj: mlp.pp("down_proj").linear(i, h, cfg.mlp_bias)?,
        input_layernorm: vb.pp("input_layernorm").rms_norm(h, cfg.rms_norm_eps)?,
        post_attention_layernorm: vb
            .pp("post_attention_layernorm")
            .rms_norm(h, cfg.rms_norm_eps)?,
        attn_hook: vb
            .pp("attention_adapters")
            .hook(HookLocation::Attention, index),
        out_hook: vb
            .pp("output_adapters")
            .hook(HookLocation::FeedForward, index),
        sliding_window,
    })
}

// SAFETY: the enrollment is a field of the model.
unsafe impl Checkpointed for Llama {
    fn enrollment(&self) -> &Enrollment {
        &self.checkpointing
    }
}

impl Model for Llama {
    fn checkpointing(&self) -> Option<&Enrollment> {
        Some(&self.checkpointing)
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dims(&self) -> ModelDims {
        let c = &self.info.config;
        ModelDims {
            vocab_size: self.cfg.vocab_size,
            hidden_size: self.cfg.hidden_size,
            num_layers: self.cfg.num_hidden_layers,
            num_attention_heads: self.heads,
            num_key_value_heads: self.kv_heads,
            head_dim: self.head_dim,
            num_encoder_layers: 0,
            is_encoder_decoder: false,
            max_positions: Some(self.rotary.context_length()),
            pad_token_id: self.pad_token_id,
            eos_token_ids: decoder::token_ids(c, "eos_token_id"),
            bos_token_id: decoder::token_id(c, "bos_token_id"),
            decoder_start_token_id: None,
        }
    }

    fn embed_tokens(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        self.embed_tokens
            .forward_t(&ids.to_dtype(candle_core::DType::U32)?, train)
    }

    fn forward_with_cache(
        &self,
        inputs: &Inputs,
        cache: Option<&mut Cache>,
        train: bool,
    ) -> Result<Tensor> {
        let hidden = self.decode(inputs, cache, train)?;
        self.head.forward(&hidden, inputs, self.pad_token_id, train)
    }

    fn lm_loss(&self, inputs: &Inputs, labels: &Tensor, train: bool) -> Result<Option<Tensor>> {
        if !matches!(self.head, Head::CausalLm(_)) {
            return Ok(None);
        }
        let hidden = self.decode(inputs, None, train)?;
        self.head.causal_lm_loss(&hidden, labels, train)
    }
}
