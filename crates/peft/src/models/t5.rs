//! T5 and mT5: `T5ForConditionalGeneration` / `MT5ForConditionalGeneration` (SEQ_2_SEQ_LM),
//! `T5EncoderModel` (FEATURE_EXTRACTION) and the classification / question-answering classes
//! (heads in `t5_heads.rs`), v1.0 (ReLU `wi`/`wo`) and v1.1 / mT5 (gated `wi_0`, `wi_1`, `wo`).
//!
//! What sets T5 apart from BERT-style attention: no absolute positions but a learned bias per
//! (bucketed) relative distance, owned by layer 0 of each stack and shared by the others; no
//! `1/sqrt(d)` scaling of the scores; RMS norms before each sub-layer (pre-norm) and one at the end
//! of each stack; one embedding table (`shared`) for encoder, decoder and, when tied, the output
//! projection.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::path::Path;

use super::bert::Activation;
use super::t5_heads::{class_of, needs_decoder, T5Heads};
use super::{task_from_architectures, Cache, Inputs, KeyValue, LoadOptions, Model, ModelDims};
use super::{ModelInfo, TaskType};
use crate::grad::checkpoint::{self, Checkpointed, Enrollment};
use crate::io::Weights;
use crate::layers::attention::{attention, causal_mask, extend_cache};
use crate::layers::{Embedding, HookLocation, HookPoint, Linear, RmsNorm};
use crate::layers::{HeadInit, Loader};
use crate::{impl_modules, ops, Error, Result};

#[derive(Debug, Clone, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_dropout")]
    pub dropout_rate: f64,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// Written by transformers 5; older configs leave it to `tie_word_embeddings`.
    #[serde(default)]
    pub scale_decoder_outputs: Option<bool>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub decoder_start_token_id: Option<u32>,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_dropout() -> f64 {
    0.1
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".into()
}

/// `feed_forward_proj` as transformers reads it: `ACT` or `gated-ACT`, where `gated-gelu` means
/// the tanh approximation (`gelu_new`) for backward compatibility.
fn parse_feed_forward(proj: &str) -> Result<(bool, Activation)> {
    let unsupported = || {
        Error::Config(format!(
            "feed_forward_proj `{proj}` is not supported; supported: relu, gelu, gelu_new, silu, \
             gated-relu, gated-gelu, gated-gelu_new, gated-silu"
        ))
    };
    let (gated, act) = match proj.split_once('-') {
        Some(("gated", act)) => (true, act),
        Some(_) => return Err(unsupported()),
        None => (false, proj),
    };
    let act = if proj == "gated-gelu" {
        "gelu_new"
    } else {
        act
    };
    if !matches!(act, "relu" | "gelu" | "gelu_new" | "silu") {
        return Err(unsupported());
    }
    Ok((gated, Activation::parse(act)?))
}

/// The decoder's input ids for `labels` as transformers' `_shift_right` builds them: the start id,
/// then the labels without their last position, with ignored labels (-100) as the padding id.
pub fn shift_right(
    labels: &Tensor,
    decoder_start_token_id: u32,
    pad_token_id: u32,
) -> Result<Tensor> {
    let (b, t) = labels.dims2()?;
    let rows = labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let mut out = Vec::with_capacity(b * t);
    for row in rows {
        out.push(decoder_start_token_id);
        out.extend(row.iter().take(t.saturating_sub(1)).map(|&l| {
            if l < 0 {
                pad_token_id
            } else {
                l as u32
            }
        }));
    }
    Ok(Tensor::from_vec(out, (b, t), labels.device())?)
}

/// T5's bucket for a relative distance `memory - query` (transformers'
/// `_relative_position_bucket`): exact buckets for small distances, logarithmic ones up to
/// `max_distance`; the bidirectional (encoder) form gives positive distances their own half.
fn relative_bucket(rel: i64, bidirectional: bool, num_buckets: usize, max_distance: usize) -> u32 {
    let mut nb = num_buckets as i64;
    let mut bucket = 0i64;
    let n = if bidirectional {
        nb /= 2;
        if rel > 0 {
            bucket += nb;
        }
        rel.abs()
    } else {
        (-rel).max(0)
    };
    let max_exact = nb / 2;
    if n < max_exact {
        return (bucket + n) as u32;
    }
    // In f32, as torch computes it, so that distances on a bucket boundary round the same way.
    let ratio = (max_distance as f64 / max_exact as f64).ln() as f32;
    let large = ((n as f32 / max_exact as f32).ln() / ratio * (nb - max_exact) as f32) as i64;
    (bucket + (max_exact + large).min(nb - 1)) as u32
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Only layer 0's self-attention owns it; the other layers reuse layer 0's bias.
    relative_attention_bias: Option<Embedding>,
}
impl_modules!(Attention {
    q,
    k,
    v,
    o,
    relative_attention_bias
});

struct FeedForward {
    wi: Option<Linear>,
    wi_0: Option<Linear>,
    wi_1: Option<Linear>,
    wo: Linear,
}
impl_modules!(FeedForward { wi, wi_0, wi_1, wo });

struct Block {
    self_attn: Attention,
    self_norm: RmsNorm,
    /// `layer.0`: the self-attention's output meets the residual.
    self_hook: HookPoint,
    cross_attn: Option<Attention>,
    cross_norm: Option<RmsNorm>,
    /// `layer.1` of a decoder block: the cross-attention's output meets the residual.
    cross_hook: Option<HookPoint>,
    ff: FeedForward,
    ff_norm: RmsNorm,
    /// `layer.1` (encoder) or `layer.2` (decoder): the feed-forward output meets the residual.
    ff_hook: HookPoint,
}
impl_modules!(Block {
    self_attn,
    self_norm,
    self_hook,
    cross_attn,
    cross_norm,
    cross_hook,
    ff,
    ff_norm,
    ff_hook
});

struct Stack {
    blocks: Vec<Block>,
    final_norm: RmsNorm,
}
impl_modules!(Stack { blocks, final_norm });

pub struct T5 {
    info: ModelInfo,
    cfg: T5Config,
    act: Activation,
    /// Multiply the decoder output by `d_model ** -0.5` before the LM head (v1.0, tied).
    scale_output: bool,
    shared: Embedding,
    encoder: Stack,
    decoder: Option<Stack>,
    heads: T5Heads,
    device: Device,
    checkpointing: Enrollment,
}
impl_modules!(T5 {
    shared,
    encoder,
    decoder,
    heads
});

impl T5 {
    pub fn load(
        weights: &Weights,
        init: &HeadInit,
        config: serde_json::Value,
        dir: &Path,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let cfg: T5Config = serde_json::from_value(config.clone())
            .map_err(|e| Error::Config(format!("{}/config.json: {e}", dir.display())))?;
        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("t5")
            .to_string();
        let (gated, act) = parse_feed_forward(&cfg.feed_forward_proj)?;
        let task = opts
            .task
            .or_else(|| task_from_architectures(&config))
            .unwrap_or(TaskType::Seq2SeqLm);
        let family = if model_type == "mt5" { "MT5" } else { "T5" };
        let (architecture, base_path) = class_of(family, task, &model_type)?;
        let root = super::loader(weights, "transformer", init, opts);
        let base = if base_path.is_empty() {
            root.clone()
        } else {
            root.pp(base_path)
        };
        let d = cfg.d_model;
        let shared = if base.pp("shared").contains("weight") {
            base.pp("shared").embedding(cfg.vocab_size, d)?
        } else {
            // Some checkpoints keep only the stacks' (tied) copies.
            let e = base
                .pp("encoder.embed_tokens")
                .embedding(cfg.vocab_size, d)?;
            Embedding::new(base.pp("shared").path(), e.weight.base().clone())
        };
        let encoder = load_stack(&base.pp("encoder"), &cfg, cfg.num_layers, gated, false)?;
        let decoder = if needs_decoder(task) {
            let n = cfg.num_decoder_layers.unwrap_or(cfg.num_layers);
            Some(load_stack(&base.pp("decoder"), &cfg, n, gated, true)?)
        } else {
            None
        };
        let lm_head = if task == TaskType::Seq2SeqLm && root.pp("lm_head").contains("weight") {
            Some(root.pp("lm_head").linear(d, cfg.vocab_size, false)?)
        } else {
            None
        };
        let heads = T5Heads::load(&root, task, &config, opts, d, lm_head)?;
        // transformers 5 writes `scale_decoder_outputs`; before it, T5 scaled exactly when tied,
        // and MT5 never does in transformers 5.
        let scale_output = cfg
            .scale_decoder_outputs
            .unwrap_or(model_type == "t5" && cfg.tie_word_embeddings != Some(false));
        let info = ModelInfo {
            model_type,
            architecture,
            task,
            head: if task == TaskType::Seq2SeqLm {
                vec!["lm_head".into()]
            } else {
                heads.names()
            },
            config,
            dir: dir.to_path_buf(),
        };
        Ok(Self {
            info,
            cfg,
            act,
            scale_output,
            shared,
            encoder,
            decoder,
            heads,
            device: opts.device.clone(),
            checkpointing: Enrollment::default(),
        })
    }

    /// `[batch, seq, d_model]` → `[batch, heads, seq, d_kv]`.
    fn project(&self, lin: &Linear, x: &Tensor, train: bool) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        Ok(lin
            .forward_t(x, train)?
            .reshape((b, s, self.cfg.num_heads, self.cfg.d_kv))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// Attention output through `o`, `[batch, t, d_model]`; T5 does not scale the scores.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        a: &Attention,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        bias: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, h, t, dk) = q.dims4()?;
        let ctx = attention(q, k, v, mask, bias, 1.0, self.cfg.dropout_rate, train)?;
        let ctx = ctx.transpose(1, 2)?.reshape((b, t, h * dk))?;
        a.o.forward_t(&ctx, train)
    }

    /// The relative position bias `[1, heads, t, past + t]` for queries at `past..past + t`.
    fn position_bias(&self, stack: &Stack, t: usize, past: usize, decoder: bool) -> Result<Tensor> {
        let emb = stack
            .blocks
            .first()
            .and_then(|b| b.self_attn.relative_attention_bias.as_ref())
            .ok_or_else(|| Error::Config("T5 layer 0 has no relative_attention_bias".into()))?;
        let total = past + t;
        let buckets: Vec<u32> = (0..t)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    relative_bucket(
                        j as i64 - (past + i) as i64,
                        !decoder,
                        self.cfg.relative_attention_num_buckets,
                        self.cfg.relative_attention_max_distance,
                    )
                })
            })
            .collect();
        let buckets = Tensor::from_vec(buckets, (t, total), &self.device)?;
        Ok(emb.forward(&buckets)?.permute((2, 0, 1))?.unsqueeze(0)?)
    }

    /// One encoder block; `prefix` holds prompt-learning keys and values put in front.
    fn encoder_block(
        &self,
        blk: &Block,
        x: &Tensor,
        mask: Option<&Tensor>,
        bias: &Tensor,
        prefix: Option<&KeyValue>,
        train: bool,
    ) -> Result<Tensor> {
        let p = self.cfg.dropout_rate;
        let h = blk.self_norm.forward(x)?;
        let a = &blk.self_attn;
        let q = self.project(&a.q, &h, train)?;
        let mut k = self.project(&a.k, &h, train)?;
        let mut v = self.project(&a.v, &h, train)?;
        if let Some(pre) = prefix {
            k = Tensor::cat(&[&pre.key, &k], 2)?;
            v = Tensor::cat(&[&pre.value, &v], 2)?;
        }
        let out = self.attend(a, &q, &k, &v, mask, Some(bias), train)?;
        let x = blk
            .self_hook
            .forward(&ops::dropout(&out, p, train)?, x, None, train)?;
        self.feed_forward(blk, &x, train)
    }

    /// One decoder block over the encoder output `enc`. With cache `slots` (self-attention,
    /// cross-attention), attends to and extends the first and uses the second when filled.
    #[allow(clippy::too_many_arguments)]
    fn decoder_block(
        &self,
        blk: &Block,
        x: &Tensor,
        enc: &Tensor,
        enc_mask: Option<&Tensor>,
        mask: &Tensor,
        bias: &Tensor,
        slots: Option<(&mut Option<KeyValue>, &mut Option<KeyValue>)>,
        train: bool,
    ) -> Result<Tensor> {
        let p = self.cfg.dropout_rate;
        let (self_slot, cross_slot) = match slots {
            Some((s, c)) => (Some(s), Some(c)),
            None => (None, None),
        };
        let h = blk.self_norm.forward(x)?;
        let a = &blk.self_attn;
        let q = self.project(&a.q, &h, train)?;
        let k = self.project(&a.k, &h, train)?;
        let v = self.project(&a.v, &h, train)?;
        let (k, v) = extend_cache(self_slot, k, v)?;
        let out = self.attend(a, &q, &k, &v, Some(mask), Some(bias), train)?;
        let x = blk
            .self_hook
            .forward(&ops::dropout(&out, p, train)?, x, None, train)?;

        let (ca, cn, ch) = match (&blk.cross_attn, &blk.cross_norm, &blk.cross_hook) {
            (Some(a), Some(n), Some(hook)) => (a, n, hook),
            _ => {
                return Err(Error::Config(
                    "T5 decoder block without cross-attention".into(),
                ))
            }
        };
        let h = cn.forward(&x)?;
        let q = self.project(&ca.q, &h, train)?;
        let filled = cross_slot
            .as_deref()
            .and_then(|kv| kv.clone())
            .filter(|kv| !kv.is_empty());
        let (k, v) = match filled {
            Some(kv) => (kv.key, kv.value),
            None => {
                let k = self.project(&ca.k, enc, train)?;
                let v = self.project(&ca.v, enc, train)?;
                if let Some(slot) = cross_slot {
                    *slot = Some(KeyValue {
                        key: k.clone(),
                        value: v.clone(),
                    });
                }
                (k, v)
            }
        };
        let cross_mask = match enc_mask {
            Some(m) => Some(ops::padding_mask(m, k.dim(2)?, x.dtype())?),
            None => None,
        };
        let out = self.attend(ca, &q, &k, &v, cross_mask.as_ref(), None, train)?;
        let x = ch.forward(&ops::dropout(&out, p, train)?, &x, None, train)?;
        self.feed_forward(blk, &x, train)
    }

    fn feed_forward(&self, blk: &Block, x: &Tensor, train: bool) -> Result<Tensor> {
        let p = self.cfg.dropout_rate;
        let h = blk.ff_norm.forward(x)?;
        let f = &blk.ff;
        let inner = match (&f.wi, &f.wi_0, &f.wi_1) {
            (Some(wi), _, _) => self.act.apply(&wi.forward_t(&h, train)?)?,
            (None, Some(w0), Some(w1)) => {
                (self.act.apply(&w0.forward_t(&h, train)?)? * w1.forward_t(&h, train)?)?
            }
            _ => return Err(Error::Config("T5 feed-forward has no wi".into())),
        };
        let out = f.wo.forward_t(&ops::dropout(&inner, p, train)?, train)?;
        blk.ff_hook
            .forward(&ops::dropout(&out, p, train)?, x, None, train)
    }

    /// The encoder's last hidden state. `prefixes` (per layer, never appended to) come before
    /// the inputs' own keys and values.
    fn encode(
        &self,
        inputs: &Inputs,
        prefixes: &[Option<KeyValue>],
        train: bool,
    ) -> Result<Tensor> {
        let p = self.cfg.dropout_rate;
        let x = match &inputs.inputs_embeds {
            Some(e) => e.clone(),
            None => self.embed_tokens(inputs.ids()?, train)?,
        };
        let (_, t, _) = x.dims3()?;
        let past = prefixes
            .iter()
            .flatten()
            .map(KeyValue::len)
            .next()
            .unwrap_or(0);
        let mask = match &inputs.attention_mask {
            Some(m) => Some(ops::padding_mask(m, past + t, x.dtype())?),
            None => None,
        };
        let bias = self.position_bias(&self.encoder, t, past, false)?;
        let mut x = ops::dropout(&x, p, train)?;
        for (i, blk) in self.encoder.blocks.iter().enumerate() {
            x = match prefixes.get(i) {
                Some(Some(pre)) => {
                    self.encoder_block(blk, &x, mask.as_ref(), &bias, Some(pre), train)?
                }
                _ => {
                    let (mask, bias) = (mask.clone(), bias.clone());
                    checkpoint::block(self, &x, None, move |m: &Self, x, _| {
                        m.encoder_block(&m.encoder.blocks[i], x, mask.as_ref(), &bias, None, train)
                    })?
                }
            };
        }
        let x = self.encoder.final_norm.forward(&x)?;
        ops::dropout(&x, p, train)
    }

    /// The decoder's last hidden state over `enc` (`[batch, src, d_model]`, padding `enc_mask`).
    /// With a cache: self-attention attends to and extends `cache.self_attn`; cross-attention
    /// uses `cache.cross_attn` as it is when filled (as transformers does with a filled
    /// cross-attention cache), else computes it from `enc` and stores it.
    fn decode(
        &self,
        inputs: &Inputs,
        enc: &Tensor,
        enc_mask: Option<&Tensor>,
        mut cache: Option<&mut Cache>,
        train: bool,
    ) -> Result<Tensor> {
        let dec = self
            .decoder
            .as_ref()
            .ok_or_else(|| Error::Config("this T5 was loaded without its decoder".into()))?;
        let p = self.cfg.dropout_rate;
        let x = match (&inputs.decoder_inputs_embeds, &inputs.decoder_input_ids) {
            (Some(e), _) => e.clone(),
            (None, Some(ids)) => self.embed_tokens(ids, train)?,
            (None, None) => return Err(Error::Data(
                "SEQ_2_SEQ_LM needs decoder_input_ids (or decoder_inputs_embeds; `peft forward \
                     --decoder-input-ids`); build them from the labels with \
                     peft::models::t5::shift_right"
                    .into(),
            )),
        };
        let (b, t, _) = x.dims3()?;
        let n = dec.blocks.len();
        if let Some(c) = cache.as_deref_mut() {
            c.self_attn.resize(n, None);
            c.cross_attn.resize(n, None);
        }
        let past = cache.as_deref().map_or(0, Cache::past_len);
        let mask = causal_mask(
            b,
            t,
            past,
            inputs.decoder_attention_mask.as_ref(),
            None,
            x.dtype(),
            &self.device,
        )?;
        let bias = self.position_bias(dec, t, past, true)?;
        let mut x = ops::dropout(&x, p, train)?;
        for (i, blk) in dec.blocks.iter().enumerate() {
            x = match cache.as_deref_mut() {
                Some(c) => {
                    let slots = Some((&mut c.self_attn[i], &mut c.cross_attn[i]));
                    self.decoder_block(blk, &x, enc, enc_mask, &mask, &bias, slots, train)?
                }
                None => {
                    let (enc_mask, mask, bias) = (enc_mask.cloned(), mask.clone(), bias.clone());
                    checkpoint::block(self, &x, Some(enc), move |m: &Self, x, enc| {
                        let (Some(dec), Some(enc)) = (&m.decoder, enc) else {
                            return Err(Error::Config(
                                "a checkpointed T5 decoder block needs the decoder and the \
                                 encoder output"
                                    .into(),
                            ));
                        };
                        let blk = &dec.blocks[i];
                        m.decoder_block(blk, x, enc, enc_mask.as_ref(), &mask, &bias, None, train)
                    })?
                }
            };
        }
        let x = dec.final_norm.forward(&x)?;
        ops::dropout(&x, p, train)
    }
}

fn load_attention(vb: &Loader, cfg: &T5Config, with_bias: bool) -> Result<Attention> {
    let (d, inner) = (cfg.d_model, cfg.num_heads * cfg.d_kv);
    Ok(Attention {
        q: vb.pp("q").linear(d, inner, false)?,
        k: vb.pp("k").linear(d, inner, false)?,
        v: vb.pp("v").linear(d, inner, false)?,
        o: vb.pp("o").linear(inner, d, false)?,
        relative_attention_bias: if with_bias {
            Some(
                vb.pp("relative_attention_bias")
                    .embedding(cfg.relative_attention_num_buckets, cfg.num_heads)?,
            )
        } else {
            None
        },
    })
}

fn load_stack(vb: &Loader, cfg: &T5Config, n: usize, gated: bool, decoder: bool) -> Result<Stack> {
    let (d, eps) = (cfg.d_model, cfg.layer_norm_epsilon);
    let blocks = (0..n)
        .map(|i| {
            let blk = vb.pp("block").pp(i);
            let l0 = blk.pp("layer.0");
            let at = |hook: HookPoint| if decoder { hook.in_decoder() } else { hook };
            let (cross_attn, cross_norm, cross_hook, ff_idx) = if decoder {
                let l1 = blk.pp("layer.1");
                (
                    Some(load_attention(&l1.pp("EncDecAttention"), cfg, false)?),
                    Some(l1.pp("layer_norm").rms_norm(d, eps)?),
                    Some(at(l1.hook(HookLocation::CrossAttention, i))),
                    2,
                )
            } else {
                (None, None, None, 1)
            };
            let lf = blk.pp("layer").pp(ff_idx);
            let dense = lf.pp("DenseReluDense");
            let ff = if gated {
                FeedForward {
                    wi: None,
                    wi_0: Some(dense.pp("wi_0").linear(d, cfg.d_ff, false)?),
                    wi_1: Some(dense.pp("wi_1").linear(d, cfg.d_ff, false)?),
                    wo: dense.pp("wo").linear(cfg.d_ff, d, false)?,
                }
            } else {
                FeedForward {
                    wi: Some(dense.pp("wi").linear(d, cfg.d_ff, false)?),
                    wi_0: None,
                    wi_1: None,
                    wo: dense.pp("wo").linear(cfg.d_ff, d, false)?,
                }
            };
            Ok(Block {
                self_attn: load_attention(&l0.pp("SelfAttention"), cfg, i == 0)?,
                self_norm: l0.pp("layer_norm").rms_norm(d, eps)?,
                self_hook: at(l0.hook(HookLocation::Attention, i)),
                cross_attn,
                cross_norm,
                cross_hook,
                ff,
                ff_norm: lf.pp("layer_norm").rms_norm(d, eps)?,
                ff_hook: at(lf.hook(HookLocation::FeedForward, i)),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Stack {
        blocks,
        final_norm: vb.pp("final_layer_norm").rms_norm(d, eps)?,
    })
}

// SAFETY: the enrollment is a field of the model.
unsafe impl Checkpointed for T5 {
    fn enrollment(&self) -> &Enrollment {
        &self.checkpointing
    }
}

impl Model for T5 {
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
        let c = &self.cfg;
        let eos = match &c.eos_token_id {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|v| v as u32).into_iter().collect()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64().map(|v| v as u32))
                .collect(),
            _ => Vec::new(),
        };
        let decoder = self.decoder.as_ref().is_some();
        ModelDims {
            vocab_size: c.vocab_size,
            hidden_size: c.d_model,
            num_layers: if decoder {
                c.num_decoder_layers.unwrap_or(c.num_layers)
            } else {
                c.num_layers
            },
            num_attention_heads: c.num_heads,
            num_key_value_heads: c.num_heads,
            head_dim: c.d_kv,
            num_encoder_layers: if decoder { c.num_layers } else { 0 },
            is_encoder_decoder: decoder,
            max_positions: None,
            pad_token_id: c.pad_token_id,
            eos_token_ids: eos,
            bos_token_id: None,
            // T5 starts decoding from the padding id unless told otherwise.
            decoder_start_token_id: c.decoder_start_token_id.or(c.pad_token_id),
        }
    }

    fn embed_tokens(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        self.shared.forward_t(&ids.to_dtype(DType::U32)?, train)
    }

    fn forward_with_cache(
        &self,
        inputs: &Inputs,
        mut cache: Option<&mut Cache>,
        train: bool,
    ) -> Result<Tensor> {
        let prefixes = cache
            .as_deref()
            .map(|c| c.encoder_self_attn.clone())
            .unwrap_or_default();
        let task = self.info.task;
        if matches!(task, TaskType::FeatureExtraction | TaskType::TokenCls) {
            let h = self.encode(inputs, &prefixes, train)?;
            return match task {
                TaskType::TokenCls => self.heads.per_token(&h, train),
                _ => Ok(h),
            };
        }
        // The classification and QA classes, like transformers', decode `input_ids` shifted
        // right when no decoder input is given.
        let shifted;
        let inputs = match (
            task,
            &inputs.decoder_input_ids,
            &inputs.decoder_inputs_embeds,
        ) {
            (TaskType::SeqCls | TaskType::QuestionAns, None, None) => {
                let dims = self.dims();
                let start = dims.decoder_start_token_id.unwrap_or(0);
                shifted = Inputs {
                    decoder_input_ids: Some(shift_right(
                        inputs.ids()?,
                        start,
                        dims.pad_token_id.unwrap_or(0),
                    )?),
                    ..inputs.clone()
                };
                &shifted
            }
            _ => inputs,
        };
        let stored = cache.as_deref().and_then(|c| c.encoder_output.clone());
        let (enc, enc_mask) = match stored {
            Some(e) => e,
            None => {
                let enc = self.encode(inputs, &prefixes, train)?;
                let mask = inputs.attention_mask.clone();
                if let Some(c) = cache.as_deref_mut() {
                    c.encoder_output = Some((enc.clone(), mask.clone()));
                }
                (enc, mask)
            }
        };
        let mut h = self.decode(inputs, &enc, enc_mask.as_ref(), cache, train)?;
        match task {
            TaskType::SeqCls => {
                let eos = self.dims().eos_token_ids.first().copied().ok_or_else(|| {
                    Error::Config(
                        "T5 sequence classification needs eos_token_id in config.json".into(),
                    )
                })?;
                return self.heads.classify_sequence(&h, inputs.ids()?, eos, train);
            }
            TaskType::QuestionAns => return self.heads.per_token(&h, train),
            _ => {}
        }
        if inputs.logits_to_keep > 0 {
            let t = h.dim(1)?;
            let keep = inputs.logits_to_keep.min(t);
            h = h.narrow(1, t - keep, keep)?;
        }
        if self.scale_output {
            h = (h * (self.cfg.d_model as f64).powf(-0.5))?;
        }
        match &self.heads.lm_head {
            Some(head) => head.forward_t(&h, train),
            None => Ok(h.broadcast_matmul(&self.shared.weight.value().t()?)?),
        }
    }

    fn lm_loss(&self, inputs: &Inputs, labels: &Tensor, train: bool) -> Result<Option<Tensor>> {
        if self.info.task != TaskType::Seq2SeqLm {
            return Ok(None);
        }
        let enc = self.encode(inputs, &[], train)?;
        let mut h = self.decode(inputs, &enc, inputs.attention_mask.as_ref(), None, train)?;
        if self.scale_output {
            h = (h * (self.cfg.d_model as f64).powf(-0.5))?;
        }
        if let Some(head) = &self.heads.lm_head {
            return super::decoder::head_loss(head, &h, labels, train).map(Some);
        }
        // Tied to the shared embedding: fused while that table is frozen (a trained one needs
        // its gradient from the head's product too).
        let (h, labels) = (h.flatten_to(1)?, labels.flatten_all()?);
        let w = self.shared.weight.value();
        let weight = ops::HeadWeight::Dense {
            w: w.clone(),
            transposed: false,
        };
        if !w.track_op() && weight.applies(&h, None) {
            return ops::linear_cross_entropy(&h, &weight, None, &labels).map(Some);
        }
        let logits = h.matmul(&w.t()?)?.to_dtype(DType::F32)?;
        ops::cross_entropy(&logits, &labels).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_transformers_rule() {
        // num_buckets 32, max_distance 128 (T5's defaults), values from the formula by hand:
        // bidirectional: 16 buckets per side, 8 exact.
        assert_eq!(relative_bucket(0, true, 32, 128), 0);
        assert_eq!(relative_bucket(-3, true, 32, 128), 3);
        assert_eq!(relative_bucket(3, true, 32, 128), 19);
        assert_eq!(relative_bucket(-1000, true, 32, 128), 15);
        assert_eq!(relative_bucket(1000, true, 32, 128), 31);
        // unidirectional: future positions all map to bucket 0.
        assert_eq!(relative_bucket(5, false, 32, 128), 0);
        assert_eq!(relative_bucket(-5, false, 32, 128), 5);
        assert_eq!(relative_bucket(-1000, false, 32, 128), 31);
    }

    #[test]
    fn feed_forward_proj_parsing() {
        assert!(matches!(parse_feed_forward("relu"), Ok((false, _))));
        assert!(matches!(
            parse_feed_forward("gated-gelu"),
            Ok((true, Activation::GeluTanh))
        ));
        let e = parse_feed_forward("swiglu-x").unwrap_err().to_string();
        assert!(e.contains("supported: relu"), "{e}");
    }
}
