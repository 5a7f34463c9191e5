//! OPT: `OPTForCausalLM`, `OPTForSequenceClassification`, `OPTForQuestionAnswering` and the bare
//! `OPTModel`. Positions are learned and counted over the attention mask (padding does not
//! advance them) with an offset of 2; token embeddings may be narrower than the hidden size
//! (`word_embed_proj_dim`, with `project_in` / `project_out`); `do_layer_norm_before` picks pre-
//! or post-norm layers. Weights live under `model.decoder.`.

use candle_core::{DType, Device, Tensor};
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

/// transformers' `OPTLearnedPositionalEmbedding` offset: position `p` reads row `p + 2`.
const POSITION_OFFSET: u32 = 2;

#[derive(Debug, Clone, Deserialize)]
pub struct OptConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub ffn_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub word_embed_proj_dim: Option<usize>,
    #[serde(default = "default_true")]
    pub do_layer_norm_before: bool,
    #[serde(default)]
    pub _remove_final_layer_norm: bool,
    #[serde(default = "default_true")]
    pub enable_bias: bool,
    #[serde(default = "default_true")]
    pub layer_norm_elementwise_affine: bool,
    #[serde(default = "default_act")]
    pub activation_function: String,
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    #[serde(default)]
    pub attention_dropout: f64,
}

fn default_true() -> bool {
    true
}
fn default_act() -> String {
    "relu".into()
}
fn default_dropout() -> f64 {
    0.1
}

struct Layer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    self_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
    /// `attention_adapters`: the attention's output meets the residual (and, in post-norm
    /// models, `self_attn_layer_norm`).
    attn_hook: HookPoint,
    /// `output_adapters`: the feed-forward output meets the residual.
    out_hook: HookPoint,
}
impl_modules!(Layer {
    q_proj,
    k_proj,
    v_proj,
    out_proj,
    attn_hook,
    self_attn_layer_norm,
    fc1,
    fc2,
    out_hook,
    final_layer_norm
});

pub struct Opt {
    info: ModelInfo,
    cfg: OptConfig,
    act: Activation,
    embed_tokens: Embedding,
    embed_positions: Embedding,
    project_in: Option<Linear>,
    layers: Vec<Layer>,
    final_layer_norm: Option<LayerNorm>,
    project_out: Option<Linear>,
    head: Head,
    pad_token_id: Option<u32>,
    device: Device,
    checkpointing: Enrollment,
}
impl_modules!(Opt {
    embed_tokens,
    embed_positions,
    project_in,
    layers,
    final_layer_norm,
    project_out,
    head
});

/// A LayerNorm that may have no affine parameters (`layer_norm_elementwise_affine = false`).
fn layer_norm(vb: &Loader, dim: usize, affine: bool) -> Result<LayerNorm> {
    const EPS: f64 = 1e-5;
    if affine {
        return vb.layer_norm(dim, EPS);
    }
    let ones = Tensor::ones(dim, vb.dtype, &vb.device)?;
    Ok(LayerNorm::new(vb.path(), ones, None, EPS))
}

impl Opt {
    pub fn load(
        weights: &Weights,
        init: &HeadInit,
        config: serde_json::Value,
        dir: &Path,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let cfg: OptConfig = serde_json::from_value(config.clone())
            .map_err(|e| Error::Config(format!("{}/config.json: {e}", dir.display())))?;
        let (h, heads) = (cfg.hidden_size, cfg.num_attention_heads);
        if heads == 0 || !h.is_multiple_of(heads) {
            return Err(Error::Config(format!(
                "hidden_size {h} is not a multiple of num_attention_heads {heads}"
            )));
        }
        let act = Activation::parse(&cfg.activation_function)?;
        let task = decoder::task(&config, opts);
        let architecture = match task {
            TaskType::CausalLm => "OPTForCausalLM",
            TaskType::SeqCls => "OPTForSequenceClassification",
            TaskType::QuestionAns => "OPTForQuestionAnswering",
            TaskType::FeatureExtraction => "OPTModel",
            other => {
                return Err(Error::Config(format!(
                    "OPT has no {} head in transformers; use CAUSAL_LM, SEQ_CLS, QUESTION_ANS or \
                     FEATURE_EXTRACTION",
                    other.as_str()
                )))
            }
        };
        let root = Loader::new(weights, Some("model"), opts.device.clone(), init);
        let base = if task == TaskType::FeatureExtraction {
            root.pp("decoder")
        } else {
            root.pp("model.decoder")
        };
        let proj = cfg.word_embed_proj_dim.unwrap_or(h);
        let affine = cfg.layer_norm_elementwise_affine;
        let embed_tokens =
            base.pp("embed_tokens")
                .tied_embedding(cfg.vocab_size, proj, &root.pp("lm_head"))?;
        let embed_positions = base
            .pp("embed_positions")
            .embedding(cfg.max_position_embeddings + POSITION_OFFSET as usize, h)?;
        let (project_in, project_out) = if proj != h {
            (
                Some(base.pp("project_in").linear(proj, h, false)?),
                Some(base.pp("project_out").linear(h, proj, false)?),
            )
        } else {
            (None, None)
        };
        let bias = cfg.enable_bias;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = base.pp("layers").pp(i);
                let att = l.pp("self_attn");
                Ok(Layer {
                    q_proj: att.pp("q_proj").linear(h, h, bias)?,
                    k_proj: att.pp("k_proj").linear(h, h, bias)?,
                    v_proj: att.pp("v_proj").linear(h, h, bias)?,
                    out_proj: att.pp("out_proj").linear(h, h, bias)?,
                    self_attn_layer_norm: layer_norm(&l.pp("self_attn_layer_norm"), h, affine)?,
                    fc1: l.pp("fc1").linear(h, cfg.ffn_dim, bias)?,
                    fc2: l.pp("fc2").linear(cfg.ffn_dim, h, bias)?,
                    final_layer_norm: layer_norm(&l.pp("final_layer_norm"), h, affine)?,
                    attn_hook: l.pp("attention_adapters").hook(HookLocation::Attention, i),
                    out_hook: l.pp("output_adapters").hook(HookLocation::FeedForward, i),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = if cfg.do_layer_norm_before && !cfg._remove_final_layer_norm {
            Some(layer_norm(&base.pp("final_layer_norm"), h, affine)?)
        } else {
            None
        };
        let head = match task {
            // OPT ties its LM head to the token embedding.
            TaskType::CausalLm => Head::CausalLm(Linear::new(
                "lm_head",
                embed_tokens.weight.base().clone(),
                None,
                false,
            )),
            TaskType::SeqCls => Head::SeqCls(Head::classifier(
                &root.pp("score"),
                &config,
                opts,
                proj,
                false,
            )?),
            TaskType::QuestionAns => {
                Head::QuestionAns(root.pp("qa_outputs").linear_or_init(proj, 2, true)?)
            }
            _ => Head::None,
        };
        let info = ModelInfo {
            model_type: "opt".into(),
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
            embed_tokens,
            embed_positions,
            project_in,
            layers,
            final_layer_norm,
            project_out,
            head,
            device: opts.device.clone(),
            checkpointing: Enrollment::default(),
        })
    }

    /// Positions as OPT counts them: the running count of attended tokens minus one (padding
    /// gets -1), for the new columns only, plus the offset of 2.
    fn position_rows(&self, inputs: &Inputs, past: usize, b: usize, t: usize) -> Result<Tensor> {
        let dev = &self.device;
        if let Some(p) = &inputs.position_ids {
            return Ok(p
                .to_dtype(DType::U32)?
                .broadcast_add(&Tensor::new(POSITION_OFFSET, dev)?)?);
        }
        let mask: Vec<Vec<u32>> = match &inputs.attention_mask {
            Some(m) => m.to_dtype(DType::U32)?.to_vec2()?,
            None => vec![vec![1; past + t]; b],
        };
        let mut rows = Vec::with_capacity(b * t);
        for row in &mask {
            // A mask of only the new columns attends to every cached position.
            let lead = (past + t).saturating_sub(row.len());
            let full: Vec<u32> = std::iter::repeat_n(1, lead)
                .chain(row.iter().copied())
                .collect();
            let mut count: i64 = 0;
            for (j, &m) in full.iter().enumerate() {
                count += m as i64;
                if j >= past {
                    let pos = count * m as i64 - 1;
                    rows.push((pos + POSITION_OFFSET as i64) as u32);
                }
            }
        }
        Ok(Tensor::from_vec(rows, (b, t), dev)?)
    }

    fn layer_forward(
        &self,
        l: &Layer,
        x: &Tensor,
        mask: &Tensor,
        kv: Option<&mut Option<KeyValue>>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let heads = self.cfg.num_attention_heads;
        let d = h / heads;
        let pre = self.cfg.do_layer_norm_before;
        let p = self.cfg.dropout;
        let split = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, heads, d))?.transpose(1, 2)?.contiguous()?)
        };
        let a = if pre {
            l.self_attn_layer_norm.forward(x)?
        } else {
            x.clone()
        };
        // transformers scales the projected queries before the product; same value either way.
        let q = split((l.q_proj.forward_t(&a, train)? * (1.0 / (d as f64).sqrt()))?)?;
        let k = split(l.k_proj.forward_t(&a, train)?)?;
        let v = split(l.v_proj.forward_t(&a, train)?)?;
        let (k, v) = extend_cache(kv, k, v)?;
        let ctx = attention(
            &q,
            &k,
            &v,
            Some(mask),
            None,
            1.0,
            self.cfg.attention_dropout,
            train,
        )?
        .transpose(1, 2)?
        .reshape((b, t, h))?;
        let a = ops::dropout(&l.out_proj.forward_t(&ctx, train)?, p, train)?;
        let post_norm = |n| if pre { None } else { Some(n) };
        let x = l
            .attn_hook
            .forward(&a, x, post_norm(&l.self_attn_layer_norm), train)?;
        let f = if pre {
            l.final_layer_norm.forward(&x)?
        } else {
            x.clone()
        };
        let f = self.act.apply(&l.fc1.forward_t(&f, train)?)?;
        let o = ops::dropout(&l.fc2.forward_t(&f, train)?, p, train)?;
        l.out_hook
            .forward(&o, &x, post_norm(&l.final_layer_norm), train)
    }

    fn decode(
        &self,
        inputs: &Inputs,
        mut cache: Option<&mut Cache>,
        train: bool,
    ) -> Result<Tensor> {
        let (past, t) =
            decoder::check_length(inputs, cache.as_deref(), self.cfg.max_position_embeddings)?;
        let mut x =
            decoder::input_embeddings(inputs, |ids| self.embed_tokens.forward_t(ids, train))?;
        let b = x.dim(0)?;
        if let Some(p) = &self.project_in {
            x = p.forward_t(&x, train)?;
        }
        let positions = self.position_rows(inputs, past, b, t)?;
        let x = x.broadcast_add(&self.embed_positions.forward_t(&positions, train)?)?;
        let mut x = ops::dropout(&x, self.cfg.dropout, train)?;
        let mask = causal_mask(
            b,
            t,
            past,
            inputs.attention_mask.as_ref(),
            None,
            x.dtype(),
            &self.device,
        )?;
        if let Some(c) = cache.as_deref_mut() {
            c.self_attn.resize(self.layers.len(), None);
        }
        for (i, layer) in self.layers.iter().enumerate() {
            x = match cache.as_deref_mut() {
                Some(c) => {
                    self.layer_forward(layer, &x, &mask, Some(&mut c.self_attn[i]), train)?
                }
                None => {
                    let mask = mask.clone();
                    checkpoint::block(self, &x, None, move |m: &Self, x, _| {
                        m.layer_forward(&m.layers[i], x, &mask, None, train)
                    })?
                }
            };
        }
        if let Some(n) = &self.final_layer_norm {
            x = n.forward(&x)?;
        }
        if let Some(p) = &self.project_out {
            x = p.forward_t(&x, train)?;
        }
        Ok(x)
    }
}

// SAFETY: the enrollment is a field of the model.
unsafe impl Checkpointed for Opt {
    fn enrollment(&self) -> &Enrollment {
        &self.checkpointing
    }
}

impl Model for Opt {
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
        let heads = self.cfg.num_attention_heads;
        ModelDims {
            vocab_size: self.cfg.vocab_size,
            hidden_size: self.cfg.hidden_size,
            num_layers: self.cfg.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: heads,
            head_dim: self.cfg.hidden_size / heads,
            num_encoder_layers: 0,
            is_encoder_decoder: false,
            max_positions: Some(self.cfg.max_position_embeddings),
            pad_token_id: self.pad_token_id,
            eos_token_ids: decoder::token_ids(c, "eos_token_id"),
            bos_token_id: decoder::token_id(c, "bos_token_id"),
            decoder_start_token_id: None,
        }
    }

    fn embed_tokens(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        self.embed_tokens
            .forward_t(&ids.to_dtype(DType::U32)?, train)
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
