//! What the decoder-only architectures (Llama family, GPT-2, OPT) share: activations, special
//! token ids from config.json, the task heads on top of the last hidden state, and the checks on
//! inputs every forward pass makes.

use candle_core::{DType, Tensor};
use serde_json::Value;

use super::{num_labels, Cache, Inputs, LoadOptions, TaskType};
use crate::layers::Loader;
use crate::layers::{Linear, ModuleMut, Modules};
use crate::{ops, Error, Result};

/// transformers' `ACT2FN` entries these models use.
#[derive(Debug, Clone, Copy)]
pub enum Activation {
    GeluErf,
    GeluTanh,
    Relu,
    Silu,
}

impl Activation {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            other => {
                return Err(Error::Config(format!(
                    "activation `{other}` is not supported; supported: gelu, gelu_new, \
                     gelu_pytorch_tanh, gelu_fast, relu, silu"
                )))
            }
        })
    }

    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::GeluErf => x.gelu_erf()?,
            Activation::GeluTanh => x.gelu()?,
            Activation::Relu => x.relu()?,
            Activation::Silu => x.silu()?,
        })
    }
}

/// A token id field of config.json (`pad_token_id`, ...), absent or null → `None`.
pub fn token_id(config: &Value, key: &str) -> Option<u32> {
    config.get(key).and_then(|v| v.as_u64()).map(|v| v as u32)
}

/// `eos_token_id`, which may be one id or a list of them.
pub fn token_ids(config: &Value, key: &str) -> Vec<u32> {
    match config.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_u64())
            .map(|v| v as u32)
            .collect(),
        Some(v) => v.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        None => Vec::new(),
    }
}

/// The head on top of a decoder, as transformers' `...For<Task>` classes build it.
pub enum Head {
    /// `lm_head` (possibly sharing the token embedding's weight).
    CausalLm(Linear),
    /// `score` on the last non-padding token.
    SeqCls(Linear),
    /// `score` (Llama family) or `classifier` (GPT-2) on every token, after dropout.
    TokenCls(Linear, f64),
    /// `qa_outputs`: start and end logits per token, `[batch, seq, 2]`.
    QuestionAns(Linear),
    /// The base model's last hidden state.
    None,
}

impl Modules for Head {
    fn visit<'a>(&'a self, out: &mut Vec<crate::layers::ModuleRef<'a>>) {
        match self {
            Head::CausalLm(l) | Head::SeqCls(l) | Head::TokenCls(l, _) | Head::QuestionAns(l) => {
                l.visit(out)
            }
            Head::None => {}
        }
    }
    fn visit_mut<'a>(&'a mut self, out: &mut Vec<ModuleMut<'a>>) {
        match self {
            Head::CausalLm(l) | Head::SeqCls(l) | Head::TokenCls(l, _) | Head::QuestionAns(l) => {
                l.visit_mut(out)
            }
            Head::None => {}
        }
    }
}

impl Head {
    pub fn names(&self) -> Vec<String> {
        self.modules()
            .iter()
            .map(|m| m.name().to_string())
            .collect()
    }

    /// A classification head of the configured label count, loaded or freshly initialised.
    pub fn classifier(
        vb: &Loader,
        config: &Value,
        opts: &LoadOptions,
        hidden: usize,
        bias: bool,
    ) -> Result<Linear> {
        vb.linear_or_init(hidden, num_labels(config, opts.num_labels), bias)
    }

    /// The causal-LM loss of the final hidden states `[batch, seq, hidden]` against next-token
    /// `labels` `[batch, seq]` (already shifted, -100 ignored); `None` for other heads. A plain
    /// frozen LM head, dense or quantized, is fused into the loss ([`ops::linear_cross_entropy`]:
    /// no logits are made); any other (an adapter on it, trained, not on the CPU) runs as in
    /// [`Head::forward`], followed by [`ops::cross_entropy`].
    pub fn causal_lm_loss(
        &self,
        hidden: &Tensor,
        labels: &Tensor,
        train: bool,
    ) -> Result<Option<Tensor>> {
        let Head::CausalLm(lm) = self else {
            return Ok(None);
        };
        head_loss(lm, hidden, labels, train).map(Some)
    }

    /// Applies the head to the final hidden states `[batch, seq, hidden]`.
    pub fn forward(
        &self,
        hidden: &Tensor,
        inputs: &Inputs,
        pad_token_id: Option<u32>,
        train: bool,
    ) -> Result<Tensor> {
        match self {
            Head::CausalLm(lm) => {
                let t = hidden.dim(1)?;
                let keep = inputs.logits_to_keep;
                let h = if keep > 0 && keep < t {
                    hidden.narrow(1, t - keep, keep)?
                } else {
                    hidden.clone()
                };
                lm.forward_t(&h, train)
            }
            Head::SeqCls(score) => {
                let logits = score.forward_t(hidden, train)?;
                let idx = last_token_indices(inputs, pad_token_id)?;
                let (b, t, c) = logits.dims3()?;
                let idx = Tensor::from_vec(idx, (b, 1, 1), logits.device())?
                    .broadcast_as((b, 1, c))?
                    .contiguous()?;
                debug_assert!(t > 0);
                Ok(logits.gather(&idx, 1)?.squeeze(1)?)
            }
            Head::TokenCls(score, dropout) => {
                score.forward_t(&ops::dropout(hidden, *dropout, train)?, train)
            }
            Head::QuestionAns(qa) => qa.forward_t(hidden, train),
            Head::None => Ok(hidden.clone()),
        }
    }
}

/// The mean cross-entropy of `labels` (`[batch, seq]`, lined up with the positions, -100
/// ignored) under `lm`'s logits of `hidden` (`[batch, seq, hidden]`): fused into the loss
/// ([`ops::linear_cross_entropy`], no logits made) when `lm` is a plain frozen product, else
/// through its forward and [`ops::cross_entropy`].
pub fn head_loss(lm: &Linear, hidden: &Tensor, labels: &Tensor, train: bool) -> Result<Tensor> {
    let h = hidden.flatten_to(1)?;
    let labels = labels.flatten_all()?;
    if let Some((w, b)) = lm.frozen_product(&h)? {
        return ops::linear_cross_entropy(&h, &w, b.as_ref(), &labels);
    }
    let logits = lm.forward_t(&h, train)?.to_dtype(DType::F32)?;
    ops::cross_entropy(&logits, &labels)
}

/// The position whose logits a sequence classifier reads, per row: as transformers finds it,
/// the rightmost token that is not `pad_token_id` (so left and right padding both work), the
/// last position when only embeddings are given, and an error for a batch without a pad id.
pub fn last_token_indices(inputs: &Inputs, pad_token_id: Option<u32>) -> Result<Vec<u32>> {
    let (b, t) = inputs.batch_seq()?;
    let last = vec![t.saturating_sub(1) as u32; b];
    let Some(pad) = pad_token_id else {
        if b != 1 {
            return Err(Error::Config(
                "sequence classification of a batch needs `pad_token_id` in config.json to find \
                 each row's last token; set it (often to eos_token_id) or use batch size 1"
                    .into(),
            ));
        }
        return Ok(last);
    };
    let Some(ids) = &inputs.input_ids else {
        return Ok(last);
    };
    let ids: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
    Ok(ids
        .iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .filter(|(_, &id)| id != pad)
                .map(|(i, _)| i as u32)
                .next_back()
                .unwrap_or(0)
        })
        .collect())
}

/// The input embeddings and the number of cached positions, after checking that the sequence
/// fits the model's context window.
pub fn check_length(
    inputs: &Inputs,
    cache: Option<&Cache>,
    limit: usize,
) -> Result<(usize, usize)> {
    let (_, t) = inputs.batch_seq()?;
    let past = cache.map_or(0, Cache::past_len);
    if past + t > limit {
        return Err(Error::Data(format!(
            "sequence of {} positions ({past} cached + {t} new) exceeds the model's context window \
             of {limit} (max_position_embeddings); truncate the input",
            past + t
        )));
    }
    Ok((past, t))
}

/// Gives every module and parameter under `from.` the prefix `to.` instead. transformers names
/// the base model differently in some head classes (`transformer.` in
/// `LlamaForQuestionAnswering`) than the checkpoint it is loaded from (`model.`); PEFT's keys
/// follow the class.
pub fn rename_prefix(model: &mut impl Modules, from: &str, to: &str) {
    let from = format!("{from}.");
    let to = format!("{to}.");
    let swap = |s: &mut String| {
        if let Some(rest) = s.strip_prefix(&from) {
            *s = format!("{to}{rest}");
        }
    };
    for m in model.modules_mut() {
        match m {
            ModuleMut::Linear(l) => swap(&mut l.name),
            ModuleMut::Embedding(e) => swap(&mut e.name),
            ModuleMut::Conv2d(c) => swap(&mut c.name),
            ModuleMut::LayerNorm(n) => swap(&mut n.name),
            ModuleMut::GroupNorm(n) => swap(&mut n.name),
            ModuleMut::RmsNorm(n) => swap(&mut n.name),
            ModuleMut::Hook(h) => swap(&mut h.name),
        }
    }
    for m in model.modules_mut() {
        for p in m.params_mut() {
            swap(&mut p.name);
        }
    }
}

/// The embeddings the layers start from: `inputs_embeds` as given, or the lookup of `input_ids`.
pub fn input_embeddings(
    inputs: &Inputs,
    embed: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    match (&inputs.inputs_embeds, &inputs.input_ids) {
        (Some(e), _) => Ok(e.clone()),
        (None, Some(ids)) => embed(&ids.to_dtype(DType::U32)?),
        (None, None) => Err(Error::Data(
            "neither input_ids nor inputs_embeds given".into(),
        )),
    }
}

/// The task a decoder model is built for: `opts.task`, else config.json's `architectures`, else
/// the base model.
pub fn task(config: &Value, opts: &LoadOptions) -> TaskType {
    opts.task
        .or_else(|| super::task_from_architectures(config))
        .unwrap_or(TaskType::FeatureExtraction)
}

/// The positions a decoder uses by default: `past..past + t` for every row (transformers'
/// `cache_position`), or the explicit `position_ids`.
pub fn positions(
    inputs: &Inputs,
    past: usize,
    b: usize,
    t: usize,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    Ok(match &inputs.position_ids {
        Some(p) => p.to_dtype(DType::U32)?,
        None => Tensor::arange(past as u32, (past + t) as u32, dev)?
            .unsqueeze(0)?
            .expand((b, t))?
            .contiguous()?,
    })
}
