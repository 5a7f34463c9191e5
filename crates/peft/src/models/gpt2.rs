//! GPT-2: `GPT2LMHeadModel`, `GPT2ForSequenceClassification`, `GPT2ForTokenClassification`,
//! `GPT2ForQuestionAnswering` and the bare `GPT2Model`. Its projections are transformers'
//! `Conv1D`, whose weight is stored `[in, out]` (PEFT's `fan_in_fan_out`), and one fused
//! `c_attn` projection yields queries, keys and values; the LM head shares `wte`.

use candle_core::{Device, Tensor};
use serde::Deserialize;
use std::path::Path;

use super::decoder::{self, Activation, Head};
use super::{Cache, Inputs, KeyValue, LoadOptions, Model, ModelDims, ModelInfo, TaskType};
use crate::grad::checkpoint::{self, Checkpointed, Enrollment};
use crate::io::Weights;
use crate::layers::attention::{attention, causal_mask, extend_cache};
use crate::layers::{Embedding, HookLocation, HookPoint, LayerNorm, Linear};
use crate::layers::{HeadInit, Loader};
use crate::{impl_modules, ops, Error, Result};

#[derive(Debug, Clone, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_positions: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_act")]
    pub activation_function: String,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_dropout")]
    pub resid_pdrop: f64,
    #[serde(default = "default_dropout")]
    pub embd_pdrop: f64,
    #[serde(default = "default_dropout")]
    pub attn_pdrop: f64,
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
}

fn default_act() -> String {
    "gelu_new".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_dropout() -> f64 {
    0.1
}
fn default_true() -> bool {
    true
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
    /// `attention_adapters`: the attention's output meets the residual.
    attn_hook: HookPoint,
    /// `output_adapters`: the feed-forward output meets the residual.
    out_hook: HookPoint,
}
impl_modules!(Block {
    ln_1,
    c_attn,
    attn_proj,
    attn_hook,
    ln_2,
    c_fc,
    mlp_proj,
    out_hook
});

pub struct Gpt2 {
    info: ModelInfo,
    cfg: Gpt2Config,
    act: Activation,
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    head: Head,
    pad_token_id: Option<u32>,
    device: Device,
    checkpointing: Enrollment,
}
impl_modules!(Gpt2 {
    wte,
    wpe,
    blocks,
    ln_f,
    head
});

impl Gpt2 {
    pub fn load(
        weights: &Weights,
        init: &HeadInit,
        config: serde_json::Value,
        dir: &Path,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let cfg: Gpt2Config = serde_json::from_value(config.clone())
            .map_err(|e| Error::Config(format!("{}/config.json: {e}", dir.display())))?;
        if cfg.n_head == 0 || !cfg.n_embd.is_multiple_of(cfg.n_head) {
            return Err(Error::Config(format!(
                "n_embd {} is not a multiple of n_head {}",
                cfg.n_embd, cfg.n_head
            )));
        }
        let act = Activation::parse(&cfg.activation_function)?;
        let task = decoder::task(&config, opts);
        let architecture =
            match task {
                TaskType::CausalLm => "GPT2LMHeadModel",
                TaskType::SeqCls => "GPT2ForSequenceClassification",
                TaskType::TokenCls => "GPT2ForTokenClassification",
                TaskType::QuestionAns => "GPT2ForQuestionAnswering",
                TaskType::FeatureExtraction => "GPT2Model",
                TaskType::Seq2SeqLm => return Err(Error::Config(
                    "GPT-2 is decoder-only and has no SEQ_2_SEQ_LM head; use CAUSAL_LM, SEQ_CLS, \
                     TOKEN_CLS, QUESTION_ANS or FEATURE_EXTRACTION"
                        .into(),
                )),
            };
        // Hub checkpoints of GPT2LMHeadModel often lack the `transformer.` prefix; the loader
        // finds names with or without it.
        let root = Loader::new(weights, Some("transformer"), opts.device.clone(), init);
        let base = if task == TaskType::FeatureExtraction {
            root.clone()
        } else {
            root.pp("transformer")
        };
        let (h, inner) = (cfg.n_embd, cfg.n_inner.unwrap_or(4 * cfg.n_embd));
        let eps = cfg.layer_norm_epsilon;
        let wte = base
            .pp("wte")
            .tied_embedding(cfg.vocab_size, h, &root.pp("lm_head"))?;
        let wpe = base.pp("wpe").embedding(cfg.n_positions, h)?;
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let b = base.pp("h").pp(i);
                Ok(Block {
                    ln_1: b.pp("ln_1").layer_norm(h, eps)?,
                    c_attn: b.pp("attn.c_attn").conv1d(h, 3 * h)?,
                    attn_proj: b.pp("attn.c_proj").conv1d(h, h)?,
                    ln_2: b.pp("ln_2").layer_norm(h, eps)?,
                    c_fc: b.pp("mlp.c_fc").conv1d(h, inner)?,
                    mlp_proj: b.pp("mlp.c_proj").conv1d(inner, h)?,
                    attn_hook: b.pp("attention_adapters").hook(HookLocation::Attention, i),
                    out_hook: b.pp("output_adapters").hook(HookLocation::FeedForward, i),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = base.pp("ln_f").layer_norm(h, eps)?;
        let head = match task {
            // GPT-2 always ties its LM head to the token embedding.
            TaskType::CausalLm => Head::CausalLm(Linear::new(
                "lm_head",
                wte.weight.base().clone(),
                None,
                false,
            )),
            TaskType::SeqCls => Head::SeqCls(Head::classifier(
                &root.pp("score"),
                &config,
                opts,
                h,
                false,
            )?),
            TaskType::TokenCls => Head::TokenCls(
                Head::classifier(&root.pp("classifier"), &config, opts, h, true)?,
                cfg.classifier_dropout.unwrap_or(0.1),
            ),
            TaskType::QuestionAns => {
                Head::QuestionAns(root.pp("qa_outputs").linear_or_init(h, 2, true)?)
            }
            _ => Head::None,
        };
        let info = ModelInfo {
            model_type: "gpt2".into(),
            architecture: architecture.into(),
            task,
            head: head.names(),
            config: config.clone(),
            dir: dir.to_path_buf(),
        };
        Ok(Self {
            info,
            pad_token_id: decoder::token_id(&config, "pad_token_id"),
            cfg,
            act,
            wte,
            wpe,
            blocks,
            ln_f,
            head,
            device: opts.device.clone(),
            checkpointing: Enrollment::default(),
        })
    }

    fn block_forward(
        &self,
        i: usize,
        blk: &Block,
        x: &Tensor,
        mask: &Tensor,
        kv: Option<&mut Option<KeyValue>>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let heads = self.cfg.n_head;
        let d = h / heads;
        let qkv = blk.c_attn.forward_t(&blk.ln_1.forward(x)?, train)?;
        let split = |j: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(2, j * h, h)?
                .reshape((b, t, heads, d))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let (k, v) = extend_cache(kv, k, v)?;
        let mut scale = 1.0;
        if self.cfg.scale_attn_weights {
            scale /= (d as f64).sqrt();
        }
        if self.cfg.scale_attn_by_inverse_layer_idx {
            scale /= (i + 1) as f64;
        }
        let ctx = attention(
            &q,
            &k,
            &v,
            Some(mask),
            None,
            scale,
            self.cfg.attn_pdrop,
            train,
        )?
        .transpose(1, 2)?
        .reshape((b, t, h))?;
        let p = self.cfg.resid_pdrop;
        let a = ops::dropout(&blk.attn_proj.forward_t(&ctx, train)?, p, train)?;
        let x = blk.attn_hook.forward(&a, x, None, train)?;
        let m = self
            .act
            .apply(&blk.c_fc.forward_t(&blk.ln_2.forward(&x)?, train)?)?;
        let o = ops::dropout(&blk.mlp_proj.forward_t(&m, train)?, p, train)?;
        blk.out_hook.forward(&o, &x, None, train)
    }

    fn decode(
        &self,
        inputs: &Inputs,
        mut cache: Option<&mut Cache>,
        train: bool,
    ) -> Result<Tensor> {
        let (past, t) = decoder::check_length(inputs, cache.as_deref(), self.cfg.n_positions)?;
        let words = decoder::input_embeddings(inputs, |ids| self.wte.forward_t(ids, train))?;
        let b = words.dim(0)?;
        let dev = &self.device;
        let positions = decoder::positions(inputs, past, b, t, dev)?;
        let x = words.broadcast_add(&self.wpe.forward_t(&positions, train)?)?;
        let mut x = ops::dropout(&x, self.cfg.embd_pdrop, train)?;
        let mask = causal_mask(
            b,
            t,
            past,
            inputs.attention_mask.as_ref(),
            None,
            x.dtype(),
            dev,
        )?;
        if let Some(c) = cache.as_deref_mut() {
            c.self_attn.resize(self.blocks.len(), None);
        }
        for (i, blk) in self.blocks.iter().enumerate() {
            x = match cache.as_deref_mut() {
                Some(c) => {
                    self.block_forward(i, blk, &x, &mask, Some(&mut c.self_attn[i]), train)?
                }
                None => {
                    let mask = mask.clone();
                    checkpoint::block(self, &x, None, move |m: &Self, x, _| {
                        m.block_forward(i, &m.blocks[i], x, &mask, None, train)
                    })?
                }
            };
        }
        self.ln_f.forward(&x)
    }
}

// SAFETY: the enrollment is a field of the model.
unsafe impl Checkpointed for Gpt2 {
    fn enrollment(&self) -> &Enrollment {
        &self.checkpointing
    }
}

impl Model for Gpt2 {
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
            hidden_size: self.cfg.n_embd,
            num_layers: self.cfg.n_layer,
            num_attention_heads: self.cfg.n_head,
            num_key_value_heads: self.cfg.n_head,
            head_dim: self.cfg.n_embd / self.cfg.n_head,
            num_encoder_layers: 0,
            is_encoder_decoder: false,
            max_positions: Some(self.cfg.n_positions),
            pad_token_id: self.pad_token_id,
            eos_token_ids: decoder::token_ids(c, "eos_token_id"),
            bos_token_id: decoder::token_id(c, "bos_token_id"),
            decoder_start_token_id: None,
        }
    }

    fn embed_tokens(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        self.wte
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
