//! BERT (and checkpoints that share its layout: MiniLM, ...): `BertModel`,
//! `BertForSequenceClassification`, `BertForTokenClassification`, `BertForQuestionAnswering`;
//! and RoBERTa / XLM-RoBERTa, which keep BERT's layers under `roberta.` and differ only in where
//! positions start (after the padding index, counting non-padding tokens) and in the SEQ_CLS head
//! (`classifier.dense` + tanh + `classifier.out_proj` on the first token, no pooler).

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::path::Path;

use super::{
    num_labels, task_from_architectures, Cache, Inputs, KeyValue, LoadOptions, Model, ModelDims,
    ModelInfo, TaskType,
};
use crate::grad::checkpoint::{self, Checkpointed, Enrollment};
use crate::io::Weights;
use crate::layers::{Embedding, HookLocation, HookPoint, LayerNorm, Linear};
use crate::layers::{HeadInit, Loader};
use crate::{impl_modules, ops, Error, Result};

#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    /// NEZHA: where the relative distances are clipped.
    #[serde(default = "default_max_relative")]
    pub max_relative_position: usize,
}

fn default_max_relative() -> usize {
    64
}

fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

/// Feed-forward activations by their transformers names (shared with the other architectures).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Activation {
    GeluErf,
    GeluTanh,
    Relu,
    Silu,
}

impl Activation {
    pub(crate) fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            other => {
                return Err(Error::Config(format!(
                    "hidden_act `{other}` is not supported; supported: gelu, gelu_new, gelu_pytorch_tanh, relu, silu"
                )))
            }
        })
    }

    pub(crate) fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::GeluErf => ops::gelu_erf(x)?,
            Activation::GeluTanh => x.gelu()?,
            Activation::Relu => x.relu()?,
            Activation::Silu => x.silu()?,
        })
    }
}

/// Which member of the family: same layers, different positions and SEQ_CLS head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Bert,
    Roberta {
        padding_idx: u32,
    },
    /// No position embeddings; relative positions in every self-attention ([`super::nezha`]).
    Nezha,
}

struct Embeddings {
    word: Embedding,
    /// Absent in NEZHA.
    position: Option<Embedding>,
    token_type: Embedding,
    norm: LayerNorm,
}
impl_modules!(Embeddings {
    word,
    position,
    token_type,
    norm
});

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    /// `attention.output`: after attention, before its residual add and LayerNorm.
    attn_hook: HookPoint,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
    /// `output`: after the feed-forward block, before its residual add and LayerNorm.
    out_hook: HookPoint,
}
impl_modules!(Layer {
    query,
    key,
    value,
    attn_out,
    attn_norm,
    attn_hook,
    intermediate,
    output,
    out_norm,
    out_hook
});

pub struct Bert {
    info: ModelInfo,
    cfg: BertConfig,
    flavor: Flavor,
    act: Activation,
    embeddings: Embeddings,
    layers: Vec<Layer>,
    pooler: Option<Linear>,
    /// RoBERTa's SEQ_CLS head: `classifier.dense` before `classifier.out_proj`.
    head_dense: Option<Linear>,
    /// `classifier` (SEQ_CLS, TOKEN_CLS), `classifier.out_proj` (RoBERTa SEQ_CLS) or `qa_outputs`
    /// (QUESTION_ANS).
    head: Option<Linear>,
    /// NEZHA's relative position table `[max_positions, max_positions, head_dim]`.
    relative: Option<Tensor>,
    device: Device,
    checkpointing: Enrollment,
}
impl_modules!(Bert {
    embeddings,
    layers,
    pooler,
    head_dense,
    head
});

impl Bert {
    pub fn load(
        weights: &Weights,
        init: &HeadInit,
        config: serde_json::Value,
        dir: &Path,
        opts: &LoadOptions,
    ) -> Result<Self> {
        Self::load_flavor(weights, init, config, dir, opts, Flavor::Bert)
    }

    /// RoBERTa and XLM-RoBERTa (`model_type` `roberta`, `xlm-roberta`).
    pub fn load_roberta(
        weights: &Weights,
        init: &HeadInit,
        config: serde_json::Value,
        dir: &Path,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let padding_idx = config
            .get("pad_token_id")
            .and_then(|v| v.as_u64())
            .unwrap_or(1) as u32;
        Self::load_flavor(
            weights,
            init,
            config,
            dir,
            opts,
            Flavor::Roberta { padding_idx },
        )
    }

    /// NEZHA (`model_type` `nezha`, keys under `nezha.`).
    pub fn load_nezha(
        weights: &Weights,
        init: &HeadInit,
        config: serde_json::Value,
        dir: &Path,
        opts: &LoadOptions,
    ) -> Result<Self> {
        Self::load_flavor(weights, init, config, dir, opts, Flavor::Nezha)
    }

    fn load_flavor(
        weights: &Weights,
        init: &HeadInit,
        config: serde_json::Value,
        dir: &Path,
        opts: &LoadOptions,
        flavor: Flavor,
    ) -> Result<Self> {
        let cfg: BertConfig = serde_json::from_value(config.clone())
            .map_err(|e| Error::Config(format!("{}/config.json: {e}", dir.display())))?;
        if let Some(p) = cfg.position_embedding_type.as_deref() {
            if p != "absolute" {
                return Err(Error::Config(format!(
                    "position_embedding_type `{p}` is not supported; supported: absolute"
                )));
            }
        }
        if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(Error::Config(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        let act = Activation::parse(&cfg.hidden_act)?;
        let task = opts
            .task
            .or_else(|| task_from_architectures(&config))
            .unwrap_or(TaskType::FeatureExtraction);
        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("bert")
            .to_string();
        let roberta = matches!(flavor, Flavor::Roberta { .. });
        let (family, base_prefix) = match (flavor, model_type.as_str()) {
            (Flavor::Bert, _) => ("Bert", "bert"),
            (Flavor::Nezha, _) => ("Nezha", "nezha"),
            (_, "xlm-roberta") => ("XLMRoberta", "roberta"),
            _ => ("Roberta", "roberta"),
        };
        let (suffix, prefix, with_pooler) = match task {
            TaskType::SeqCls => ("ForSequenceClassification", base_prefix, !roberta),
            TaskType::TokenCls => ("ForTokenClassification", base_prefix, false),
            TaskType::QuestionAns => ("ForQuestionAnswering", base_prefix, false),
            TaskType::FeatureExtraction => ("Model", "", true),
            other => {
                return Err(Error::Config(format!(
                    "{model_type} has no {} head; use SEQ_CLS, TOKEN_CLS, QUESTION_ANS or \
                     FEATURE_EXTRACTION",
                    other.as_str()
                )))
            }
        };
        let architecture = format!("{family}{suffix}");
        let root = super::loader(weights, base_prefix, init, opts);
        let base = if prefix.is_empty() {
            root.clone()
        } else {
            root.pp(prefix)
        };
        let h = cfg.hidden_size;
        let emb = base.pp("embeddings");
        let embeddings = Embeddings {
            word: emb.pp("word_embeddings").embedding(cfg.vocab_size, h)?,
            position: match flavor {
                Flavor::Nezha => None,
                _ => Some(
                    emb.pp("position_embeddings")
                        .embedding(cfg.max_position_embeddings, h)?,
                ),
            },
            token_type: emb
                .pp("token_type_embeddings")
                .embedding(cfg.type_vocab_size, h)?,
            norm: emb.pp("LayerNorm").layer_norm(h, cfg.layer_norm_eps)?,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| load_layer(&base.pp("encoder.layer").pp(i), &cfg, i))
            .collect::<Result<Vec<_>>>()?;
        // A bare RobertaModel may have been saved without its pooler; it is unused here anyway.
        let pooler_present = !roberta || base.pp("pooler.dense").contains("weight");
        let pooler = if with_pooler && pooler_present {
            Some(base.pp("pooler.dense").linear(h, h, true)?)
        } else {
            None
        };
        let head_dense = if roberta && task == TaskType::SeqCls {
            Some(root.pp("classifier.dense").linear_or_init(h, h, true)?)
        } else {
            None
        };
        let head = match task {
            TaskType::SeqCls if roberta => {
                let n = num_labels(&config, opts.num_labels);
                Some(root.pp("classifier.out_proj").linear_or_init(h, n, true)?)
            }
            TaskType::SeqCls | TaskType::TokenCls => {
                let n = num_labels(&config, opts.num_labels);
                Some(root.pp("classifier").linear_or_init(h, n, true)?)
            }
            TaskType::QuestionAns => Some(root.pp("qa_outputs").linear_or_init(h, 2, true)?),
            _ => None,
        };
        let info = ModelInfo {
            model_type,
            architecture,
            task,
            // The output layer first: its rows are the class count.
            head: head
                .iter()
                .chain(&head_dense)
                .map(|l| l.name.clone())
                .collect(),
            config,
            dir: dir.to_path_buf(),
        };
        Ok(Self {
            info,
            flavor,
            act,
            embeddings,
            layers,
            pooler,
            head_dense,
            head,
            relative: match flavor {
                Flavor::Nezha => Some(super::nezha::table_for(
                    cfg.max_position_embeddings,
                    h / cfg.num_attention_heads,
                    cfg.max_relative_position,
                    &opts.device,
                )?),
                _ => None,
            },
            cfg,
            device: opts.device.clone(),
            checkpointing: Enrollment::default(),
        })
    }

    fn encode(
        &self,
        inputs: &Inputs,
        mut cache: Option<&mut Cache>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t) = inputs.batch_seq()?;
        let past = cache.as_deref().map_or(0, Cache::past_len);
        let offset = match self.flavor {
            Flavor::Bert | Flavor::Nezha => 0,
            Flavor::Roberta { padding_idx } => padding_idx as usize + 1,
        };
        if offset + past + t > self.cfg.max_position_embeddings {
            return Err(Error::Data(format!(
                "sequence of {} tokens exceeds the {} positions of max_position_embeddings {}",
                past + t,
                self.cfg.max_position_embeddings - offset,
                self.cfg.max_position_embeddings
            )));
        }
        let dev = &self.device;
        let sequential = |start: usize| -> Result<Tensor> {
            Ok(Tensor::arange(start as u32, (start + t) as u32, dev)?
                .unsqueeze(0)?
                .expand((b, t))?
                .contiguous()?)
        };
        let positions = match (&inputs.position_ids, self.flavor) {
            (Some(p), _) => p.to_dtype(DType::U32)?,
            (None, Flavor::Bert | Flavor::Nezha) => sequential(past)?,
            (None, Flavor::Roberta { padding_idx }) => match &inputs.inputs_embeds {
                None => roberta_positions(inputs.ids()?, padding_idx, past)?,
                // As transformers: with embeddings no padding can be seen, and the past length
                // is not added.
                Some(_) => sequential(offset)?,
            },
        };
        let token_types = match &inputs.token_type_ids {
            Some(tt) => tt.to_dtype(DType::U32)?,
            None => Tensor::zeros((b, t), DType::U32, dev)?,
        };
        let e = &self.embeddings;
        let words = match &inputs.inputs_embeds {
            Some(x) => x.clone(),
            None => self.embed_tokens(inputs.ids()?, train)?,
        };
        let x = match &e.position {
            Some(p) => words.add(&p.forward_t(&positions, train)?)?,
            None => words,
        };
        let x = x.add(&e.token_type.forward_t(&token_types, train)?)?;
        let mut x = ops::dropout(&e.norm.forward(&x)?, self.cfg.hidden_dropout_prob, train)?;
        let mask = match &inputs.attention_mask {
            Some(m) => Some(ops::padding_mask(m, past + t, x.dtype())?),
            None => None,
        };
        if let Some(c) = cache.as_deref_mut() {
            c.self_attn.resize(self.layers.len(), None);
        }
        for (i, layer) in self.layers.iter().enumerate() {
            x = match cache.as_deref_mut() {
                Some(c) => {
                    let kv = Some(&mut c.self_attn[i]);
                    self.layer_forward(layer, &x, mask.as_ref(), kv, train)?
                }
                None => {
                    let mask = mask.clone();
                    checkpoint::block(self, &x, None, move |m: &Self, x, _| {
                        m.layer_forward(&m.layers[i], x, mask.as_ref(), None, train)
                    })?
                }
            };
        }
        Ok(x)
    }

    fn layer_forward(
        &self,
        l: &Layer,
        x: &Tensor,
        mask: Option<&Tensor>,
        kv: Option<&mut Option<KeyValue>>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, _, h) = x.dims3()?;
        let heads = self.cfg.num_attention_heads;
        let d = h / heads;
        let q = l.query.forward_t(x, train)?;
        let mut k = l.key.forward_t(x, train)?;
        let mut v = l.value.forward_t(x, train)?;
        // The cache keeps keys and values per head, `[batch, heads, s, d]`.
        let split = |y: &Tensor| -> Result<Tensor> {
            let s = y.dim(1)?;
            Ok(y.reshape((b, s, heads, d))?.transpose(1, 2)?.contiguous()?)
        };
        let merge = |y: &Tensor| -> Result<Tensor> {
            let s = y.dim(2)?;
            Ok(y.transpose(1, 2)?.reshape((b, s, h))?)
        };
        if let Some(slot) = kv {
            let (mut kh, mut vh) = (split(&k)?, split(&v)?);
            if let Some(past) = slot.as_ref() {
                kh = Tensor::cat(&[&past.key, &kh], 2)?;
                vh = Tensor::cat(&[&past.value, &vh], 2)?;
                k = merge(&kh)?;
                v = merge(&vh)?;
            }
            *slot = Some(KeyValue { key: kh, value: vh });
        }
        let ctx = match &self.relative {
            Some(rel) => super::nezha::relative_attention(
                &q,
                &k,
                &v,
                heads,
                mask,
                rel,
                self.cfg.attention_probs_dropout_prob,
                train,
            )?,
            None => ops::attention_merged_heads(
                &q,
                &k,
                &v,
                heads,
                mask,
                1.0 / (d as f64).sqrt(),
                self.cfg.attention_probs_dropout_prob,
                train,
            )?,
        };
        let p = self.cfg.hidden_dropout_prob;
        let a = ops::dropout(&l.attn_out.forward_t(&ctx, train)?, p, train)?;
        let a = l.attn_hook.forward(&a, x, Some(&l.attn_norm), train)?;
        let i = self.act.apply(&l.intermediate.forward_t(&a, train)?)?;
        let o = ops::dropout(&l.output.forward_t(&i, train)?, p, train)?;
        l.out_hook.forward(&o, &a, Some(&l.out_norm), train)
    }
}

/// transformers' `create_position_ids_from_input_ids`: padding tokens sit at `padding_idx`,
/// the others count from `padding_idx + 1 + past` over non-padding tokens only.
fn roberta_positions(ids: &Tensor, padding_idx: u32, past: usize) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let mut out = Vec::with_capacity(b * t);
    for row in rows {
        let mut seen = 0u32;
        for id in row {
            if id == padding_idx {
                out.push(padding_idx);
            } else {
                seen += 1;
                out.push(padding_idx + seen + past as u32);
            }
        }
    }
    Ok(Tensor::from_vec(out, (b, t), ids.device())?)
}

fn load_layer(vb: &Loader, cfg: &BertConfig, index: usize) -> Result<Layer> {
    let h = cfg.hidden_size;
    let att = vb.pp("attention");
    Ok(Layer {
        query: att.pp("self.query").linear(h, h, true)?,
        key: att.pp("self.key").linear(h, h, true)?,
        value: att.pp("self.value").linear(h, h, true)?,
        attn_out: att.pp("output.dense").linear(h, h, true)?,
        attn_norm: att
            .pp("output.LayerNorm")
            .layer_norm(h, cfg.layer_norm_eps)?,
        attn_hook: att.pp("output").hook(HookLocation::Attention, index),
        intermediate: vb
            .pp("intermediate.dense")
            .linear(h, cfg.intermediate_size, true)?,
        output: vb
            .pp("output.dense")
            .linear(cfg.intermediate_size, h, true)?,
        out_norm: vb
            .pp("output.LayerNorm")
            .layer_norm(h, cfg.layer_norm_eps)?,
        out_hook: vb.pp("output").hook(HookLocation::FeedForward, index),
    })
}

// SAFETY: the enrollment is a field of the model.
unsafe impl Checkpointed for Bert {
    fn enrollment(&self) -> &Enrollment {
        &self.checkpointing
    }
}

impl Model for Bert {
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
        let id = |k: &str| self.info.config.get(k).and_then(|v| v.as_u64());
        let pad = id("pad_token_id");
        let offset = match self.flavor {
            Flavor::Bert | Flavor::Nezha => 0,
            Flavor::Roberta { padding_idx } => padding_idx as usize + 1,
        };
        ModelDims {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            num_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_attention_heads,
            head_dim: c.hidden_size / c.num_attention_heads,
            num_encoder_layers: 0,
            is_encoder_decoder: false,
            max_positions: Some(c.max_position_embeddings.saturating_sub(offset)),
            pad_token_id: pad.map(|p| p as u32),
            eos_token_ids: id("eos_token_id").map(|e| e as u32).into_iter().collect(),
            bos_token_id: id("bos_token_id").map(|b| b as u32),
            decoder_start_token_id: None,
        }
    }

    fn embed_tokens(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        self.embeddings
            .word
            .forward_t(&ids.to_dtype(DType::U32)?, train)
    }

    fn forward_with_cache(
        &self,
        inputs: &Inputs,
        cache: Option<&mut Cache>,
        train: bool,
    ) -> Result<Tensor> {
        let hidden = self.encode(inputs, cache, train)?;
        let dropout = self
            .cfg
            .classifier_dropout
            .unwrap_or(self.cfg.hidden_dropout_prob);
        match (self.info.task, &self.head) {
            (TaskType::SeqCls, Some(head)) => {
                let first = hidden.narrow(1, 0, 1)?.squeeze(1)?;
                let x = match (&self.head_dense, &self.pooler) {
                    // RoBERTa: dropout, dense, tanh, dropout, out_proj.
                    (Some(dense), _) => dense
                        .forward_t(&ops::dropout(&first, dropout, train)?, train)?
                        .tanh()?,
                    // BERT: the pooler, then dropout and the classifier.
                    (None, Some(pooler)) => pooler.forward_t(&first, train)?.tanh()?,
                    (None, None) => return Err(Error::Config("BERT pooler missing".into())),
                };
                head.forward_t(&ops::dropout(&x, dropout, train)?, train)
            }
            (TaskType::TokenCls, Some(head)) => {
                head.forward_t(&ops::dropout(&hidden, dropout, train)?, train)
            }
            (TaskType::QuestionAns, Some(head)) => head.forward_t(&hidden, train),
            _ => Ok(hidden),
        }
    }
}
