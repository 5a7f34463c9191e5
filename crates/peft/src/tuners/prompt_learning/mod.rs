//! What PEFT 0.21's prompt-learning methods share (`PromptLearningConfig`, `PeftModelFor*`'s
//! injection): the config fields filled from the model, and how a method's virtual tokens reach
//! the model, per task, exactly as PEFT's `PeftModelForSequenceClassification`,
//! `...ForCausalLM` and `...ForSeq2SeqLM` put them there:
//!
//! - *embeddings* (prompt tuning, p-tuning, multitask prompt tuning, CPT): `[n, d]` vectors in
//!   front of `inputs_embeds`; the attention mask gets `n` ones in front (when given), BERT's
//!   `token_type_ids` `n` zeros (classification), `position_ids` are dropped (the model counts
//!   them over the whole sequence), token labels get `n` × -100 in front (causal LM). A
//!   seq2seq model gets the first `n` rows in front of the encoder's input; multitask prompt
//!   tuning with two submodules also puts the second `n` in front of the decoder's (training
//!   only: PEFT's `generate` prompts the encoder alone).
//! - a *prefix* (prefix tuning): per layer `n` keys and values the attention sees before the
//!   sequence's own, as the key/value cache the model starts from; the attention mask (the
//!   decoder's, for seq2seq) gets `n` ones in front, `position_ids` move by `n`. A seq2seq
//!   model's decoder self-attention gets them as transformers 5 does with PEFT's
//!   `EncoderDecoderCache`: decoder layer `i` takes the key/value slots `4i mod 2L` and
//!   `4i mod 2L + 1` of the `2L` the prefix holds; the encoder and cross-attention get none.
//!
//! In generation the virtual tokens go in on the first step only (the cache then holds them).

pub mod encoders;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

use crate::error::config_err;
use crate::models::{Cache, Inputs, KeyValue, Model, ModelDims, TaskType};
use crate::tuners::tuner::set_checked;
use crate::tuners::{InputTransform, ModelTensor, Prepared, Tuner};
use crate::{Error, Result};

/// The key PEFT saves every prompt-learning method's virtual-token table under.
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";
/// The in-memory name of a prompt encoder's embedding table (PEFT's
/// `prompt_encoder.<adapter>.embedding.weight`, without the adapter name).
pub const EMBEDDING_KEY: &str = "prompt_encoder.embedding.weight";

/// `PromptLearningConfig`'s fields. Left `None`, they are filled from the model's config when the
/// adapter is attached, as PEFT's `_prepare_prompt_learning_config` fills them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct PromptLearningFields {
    pub num_virtual_tokens: Option<usize>,
    /// The width of the virtual tokens: the model's hidden size (the key/value width for prefix
    /// tuning on grouped-query models).
    pub token_dim: Option<usize>,
    /// 2 for seq2seq models (an encoder and a decoder prompt), else 1.
    pub num_transformer_submodules: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_layers: Option<usize>,
}

/// A field of config.json under the first of its names present.
fn config_usize(config: &serde_json::Value, names: &[&str]) -> Option<usize> {
    names
        .iter()
        .find_map(|k| config.get(*k).and_then(|v| v.as_u64()))
        .map(|v| v as usize)
}

impl PromptLearningFields {
    /// The virtual-token count, which PEFT leaves to the user.
    pub fn n(&self, what: &str) -> Result<usize> {
        match self.num_virtual_tokens {
            Some(n) if n > 0 => Ok(n),
            Some(_) => Err(config_err!(
                "{what} `num_virtual_tokens` must be at least 1"
            )),
            None => Err(config_err!(
                "{what} needs `num_virtual_tokens` (how many virtual tokens to learn, e.g. 20)"
            )),
        }
    }

    /// Fills what is missing as PEFT does: `num_layers` from `num_hidden_layers` / `num_layers` /
    /// `n_layer`, `token_dim` from `hidden_size` / `n_embd` / `d_model`, `num_attention_heads`
    /// from `num_attention_heads` / `n_head` / `num_heads`, `num_transformer_submodules` 2 for
    /// SEQ_2_SEQ_LM else 1; for prefix tuning on a model with `num_key_value_heads`, the
    /// key/value width and head count (grouped-query attention).
    pub fn fill(&mut self, model: &dyn Model, task: Option<TaskType>, prefix: bool) {
        let config = &model.info().config;
        let dims = model.dims();
        if self.num_layers.is_none() {
            let from_config = config_usize(config, &["num_hidden_layers", "num_layers", "n_layer"]);
            self.num_layers = Some(from_config.unwrap_or(if dims.is_encoder_decoder {
                dims.num_encoder_layers
            } else {
                dims.num_layers
            }));
        }
        if self.token_dim.is_none() {
            self.token_dim = Some(
                config_usize(config, &["hidden_size", "n_embd", "d_model"])
                    .unwrap_or(dims.hidden_size),
            );
        }
        if self.num_attention_heads.is_none() {
            self.num_attention_heads = Some(
                config_usize(
                    config,
                    &[
                        "num_attention_heads",
                        "n_head",
                        "num_heads",
                        "encoder_attention_heads",
                    ],
                )
                .unwrap_or(dims.num_attention_heads),
            );
        }
        if prefix {
            if let Some(kv) = config_usize(config, &["num_key_value_heads"]) {
                let head_dim = config_usize(config, &["head_dim"]).unwrap_or_else(|| {
                    self.token_dim.unwrap_or(0) / self.num_attention_heads.unwrap_or(1).max(1)
                });
                self.token_dim = Some(head_dim * kv);
                self.num_attention_heads = Some(kv);
            }
        }
        if self.num_transformer_submodules.is_none() {
            self.num_transformer_submodules = Some(if task == Some(TaskType::Seq2SeqLm) {
                2
            } else {
                1
            });
        }
    }

    /// The filled fields, as the injection uses them.
    pub fn layout(&self, what: &str, model: &dyn Model, kind: Kind) -> Result<Layout> {
        let n = self.n(what)?;
        let get = |v: Option<usize>, f: &str| {
            v.ok_or_else(|| config_err!("{what} `{f}` is not set and could not be filled"))
        };
        let layout = Layout {
            n,
            submodules: get(
                self.num_transformer_submodules,
                "num_transformer_submodules",
            )?,
            token_dim: get(self.token_dim, "token_dim")?,
            num_layers: get(self.num_layers, "num_layers")?,
            num_attention_heads: get(self.num_attention_heads, "num_attention_heads")?,
            kind,
        };
        layout.check(what, model)?;
        Ok(layout)
    }
}

/// How a method's virtual tokens reach the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Vectors in front of the input embeddings. `decoder_prompt`: a seq2seq model's decoder gets
    /// the second half of the table in front of its inputs (multitask prompt tuning).
    Embeddings { decoder_prompt: bool },
    /// Keys and values in front of every attention's own.
    Prefix,
}

/// The filled config, as the injection uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub n: usize,
    pub submodules: usize,
    pub token_dim: usize,
    pub num_layers: usize,
    pub num_attention_heads: usize,
    pub kind: Kind,
}

impl Layout {
    /// Rows of the virtual-token table: `n · submodules` embeddings, or `n` prefixes.
    pub fn rows(&self) -> usize {
        match self.kind {
            Kind::Embeddings { .. } => self.n * self.submodules,
            Kind::Prefix => self.n,
        }
    }

    /// Width of one row: `token_dim`, or `num_layers · 2 · token_dim` for a prefix.
    pub fn width(&self) -> usize {
        match self.kind {
            Kind::Embeddings { .. } => self.token_dim,
            Kind::Prefix => self.num_layers * 2 * self.token_dim,
        }
    }

    /// The checks that turn a mismatch between the adapter and the model into an error naming
    /// both values (PEFT fails later, inside the model, with a shape error).
    fn check(&self, what: &str, model: &dyn Model) -> Result<()> {
        let dims = model.dims();
        let task = model.info().task;
        let seq2seq = dims.is_encoder_decoder && task == TaskType::Seq2SeqLm;
        let allowed: &[usize] = if seq2seq { &[1, 2] } else { &[1] };
        if !allowed.contains(&self.submodules) {
            return Err(config_err!(
                "{what} `num_transformer_submodules` = {} does not fit a {} model ({}); leave it \
                 unset (PEFT's default: 2 for SEQ_2_SEQ_LM, else 1)",
                self.submodules,
                task.as_str(),
                allowed
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            ));
        }
        match self.kind {
            Kind::Embeddings { .. } => {
                let width = embedding_width(model)?;
                if self.token_dim != width {
                    return Err(config_err!(
                        "{what} `token_dim` = {} but the model's token embeddings are {width} \
                         wide ({}); a prompt adapter must be made for this model (leave \
                         token_dim unset to take the model's)",
                        self.token_dim,
                        model.info().model_type
                    ));
                }
            }
            Kind::Prefix => {
                let (kv, hd) = (dims.num_key_value_heads, dims.head_dim);
                if self.num_attention_heads != kv || self.token_dim != kv * hd {
                    return Err(config_err!(
                        "{what}: the prefix has {} heads of {} (token_dim {}) but the model's \
                         attention keeps {kv} key/value heads of {hd} ({}); leave token_dim and \
                         num_attention_heads unset to take the model's",
                        self.num_attention_heads,
                        self.token_dim / self.num_attention_heads.max(1),
                        self.token_dim,
                        model.info().model_type
                    ));
                }
                let layers = if dims.is_encoder_decoder {
                    dims.num_encoder_layers
                } else {
                    dims.num_layers
                };
                if self.num_layers != layers {
                    return Err(config_err!(
                        "{what} `num_layers` = {} but the model has {layers} layers; leave it \
                         unset to take the model's",
                        self.num_layers
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The width of the model's token embeddings (what `inputs_embeds` must have).
pub fn embedding_width(model: &dyn Model) -> Result<usize> {
    let probe = Tensor::zeros((1, 1), DType::U32, model.device())?;
    Ok(crate::grad::no_grad(|| model.embed_tokens(&probe, false))?.dim(2)?)
}

/// The dtype the model computes in (its token embeddings').
fn compute_dtype(model: &dyn Model) -> Result<DType> {
    let probe = Tensor::zeros((1, 1), DType::U32, model.device())?;
    Ok(crate::grad::no_grad(|| model.embed_tokens(&probe, false))?.dtype())
}

/// A method's virtual tokens: what it computes from its parameters.
pub trait PromptEncoder: Send + Sync {
    /// Embeddings `[batch, n · submodules, token_dim]`, or a prefix `[batch, n, num_layers · 2 ·
    /// token_dim]`. `task_ids` (`[batch]`) for methods with a prompt per task.
    fn prompts(&self, batch: usize, task_ids: Option<&Tensor>, train: bool) -> Result<Tensor>;

    /// Everything it holds, under PEFT's in-memory names (without the adapter name).
    fn tensors(&self) -> Vec<ModelTensor>;

    /// What PEFT's `save_pretrained` writes: `prompt_embeddings` (the encoder's output for one
    /// batch row) and the method's other keys.
    fn to_save(&self) -> Result<Vec<(String, Tensor)>>;

    /// Reads what [`PromptEncoder::to_save`] wrote; returns the keys it did not find.
    fn load(&mut self, file: &mut HashMap<String, Tensor>) -> Result<Vec<String>>;

    /// A loss replacing the task's (CPT).
    fn loss(&self, _logits: &Tensor, _labels: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// The saved table put straight in (an adapter loaded for inference, as PEFT's
/// `inference_mode`): the prompts are the rows of `prompt_embeddings`.
pub struct Table {
    pub table: Var,
}

impl Table {
    pub fn new(rows: usize, width: usize, device: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            table: Var::zeros((rows, width), DType::F32, device)?,
        })
    }
}

/// `table` as `[batch, rows, width]`.
pub fn repeat_rows(table: &Tensor, batch: usize) -> Result<Tensor> {
    let t = if table.rank() == 2 {
        table.unsqueeze(0)?
    } else {
        table.clone()
    };
    let (_, r, w) = t.dims3()?;
    Ok(t.broadcast_as((batch, r, w))?.contiguous()?)
}

impl PromptEncoder for Table {
    fn prompts(&self, batch: usize, _task_ids: Option<&Tensor>, _train: bool) -> Result<Tensor> {
        repeat_rows(&crate::grad::live(self.table.as_tensor()), batch)
    }
    fn tensors(&self) -> Vec<ModelTensor> {
        vec![ModelTensor {
            key: EMBEDDING_KEY.into(),
            var: self.table.clone(),
            is_parameter: true,
            frozen: false,
        }]
    }
    fn to_save(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![(
            PROMPT_EMBEDDINGS.into(),
            self.table.as_tensor().detach(),
        )])
    }
    fn load(&mut self, file: &mut HashMap<String, Tensor>) -> Result<Vec<String>> {
        load_key(file, PROMPT_EMBEDDINGS, &self.table)
    }
}

/// Sets `var` from `file[key]` (shape checked), or reports `key` missing.
pub fn load_key(file: &mut HashMap<String, Tensor>, key: &str, var: &Var) -> Result<Vec<String>> {
    match file.remove(key) {
        Some(t) => {
            set_checked(key, var, &t)?;
            Ok(Vec::new())
        }
        None => Ok(vec![key.to_string()]),
    }
}

/// A prompt-learning adapter's model-level side: its encoder and how its output is injected.
pub struct PromptTuner {
    pub layout: Layout,
    pub encoder: Box<dyn PromptEncoder>,
    /// The method's name for messages (`prompt tuning`).
    pub what: &'static str,
}

impl Tuner for PromptTuner {
    fn model_tensors(&self) -> Vec<ModelTensor> {
        self.encoder.tensors()
    }

    fn load_tensors(&mut self, file: &mut HashMap<String, Tensor>) -> Result<Vec<String>> {
        self.encoder.load(file)
    }

    fn state_dict_to_save(
        &self,
        _config: &crate::tuners::PeftConfig,
        state: Vec<(String, Tensor)>,
    ) -> Result<Vec<(String, Tensor)>> {
        // The encoder's own tensors are replaced by what PEFT saves (its output).
        let own: Vec<String> = self.encoder.tensors().into_iter().map(|t| t.key).collect();
        let mut out: Vec<(String, Tensor)> = state
            .into_iter()
            .filter(|(k, _)| !own.contains(k))
            .collect();
        out.extend(crate::grad::no_grad(|| self.encoder.to_save())?);
        Ok(out)
    }

    fn input_transform(&self) -> Option<&dyn InputTransform> {
        Some(self)
    }
}

/// Whether this pass is the first of a sequence (no virtual tokens in the cache yet): always
/// without a cache; in generation, the step that fills it.
pub fn is_first_step(cache: Option<&Cache>, dims: &ModelDims) -> bool {
    match cache {
        None => true,
        Some(c) if dims.is_encoder_decoder => c.encoder_output.is_none(),
        Some(c) => c.past_len() == 0,
    }
}

/// `[batch, cols]` with `n` columns of `value` in front (`mask` ones, `token_type_ids` zeros).
fn prefix_cols(t: &Tensor, n: usize, value: f64) -> Result<Tensor> {
    let (b, _) = t.dims2()?;
    let front = (Tensor::ones((b, n), t.dtype(), t.device())? * value)?;
    Ok(Tensor::cat(&[&front, t], 1)?)
}

/// The per-layer keys and values of a prefix `[batch, n, num_layers · 2 · token_dim]`, as PEFT's
/// `get_prompt` lays it out (`view(batch, n, 2L, heads, head_dim)`, then `permute(2, 0, 3, 1, 4)`:
/// slot `2l` is layer `l`'s keys, `2l + 1` its values). A seq2seq decoder's layer `i` takes
/// slots `4i mod 2L` and `4i mod 2L + 1` (PEFT concatenates the slots twice and hands
/// transformers groups of four, of which the cross-attention pair is then dropped).
pub fn prefix_key_values(
    prefix: &Tensor,
    layout: &Layout,
    seq2seq: bool,
) -> Result<Vec<Option<KeyValue>>> {
    let (b, n, _) = prefix.dims3()?;
    let l = layout.num_layers;
    let h = layout.num_attention_heads;
    let hd = layout.token_dim / h;
    let slots = prefix
        .reshape((b, n, 2 * l, h, hd))?
        .permute((2, 0, 3, 1, 4))?;
    let slot = |j: usize| -> Result<Tensor> { Ok(slots.get(j)?.contiguous()?) };
    (0..l)
        .map(|i| {
            let k = if seq2seq { (4 * i) % (2 * l) } else { 2 * i };
            Ok(Some(KeyValue {
                key: slot(k)?,
                value: slot(k + 1)?,
            }))
        })
        .collect()
}

impl InputTransform for PromptTuner {
    fn prepare(
        &self,
        model: &dyn Model,
        inputs: &Inputs,
        cache: Option<&mut Cache>,
        train: bool,
    ) -> Result<Prepared> {
        prepare(self, model, inputs, cache, train)
    }

    fn virtual_tokens(&self) -> usize {
        self.layout.n
    }

    fn loss(&self, logits: &Tensor, labels: &Tensor) -> Result<Option<Tensor>> {
        self.encoder.loss(logits, labels)
    }
}

fn prepare(
    tuner: &PromptTuner,
    model: &dyn Model,
    inputs: &Inputs,
    mut cache: Option<&mut Cache>,
    train: bool,
) -> Result<Prepared> {
    let layout = &tuner.layout;
    let n = layout.n;
    let dims = model.dims();
    let task = model.info().task;
    let seq2seq = dims.is_encoder_decoder && task == TaskType::Seq2SeqLm;
    let causal = task == TaskType::CausalLm;
    let (b, t) = inputs.batch_seq()?;
    let first = is_first_step(cache.as_deref(), &dims);
    let past = cache.as_deref().map_or(0, Cache::past_len);
    if let (false, Some(max)) = (dims.is_encoder_decoder, dims.max_positions) {
        let added = if first { n } else { 0 };
        if past + added + t > max {
            let cached = if past > 0 {
                format!(" + {past} cached positions")
            } else {
                String::new()
            };
            return Err(Error::Data(format!(
                "{t} input tokens + {n} virtual tokens of the {} adapter{cached} exceed the \
                 model's context window of {max} positions (max_position_embeddings); shorten \
                 the input to at most {} tokens or use fewer virtual tokens",
                tuner.what,
                max.saturating_sub(n + past)
            )));
        }
    }
    let mut x = inputs.clone();
    let mut own_cache = None;
    let mut output_prefix = 0;
    // Token type ids: kept (and prefixed) by the classification classes, dropped by the others.
    if causal || seq2seq {
        x.token_type_ids = None;
    }
    match layout.kind {
        Kind::Prefix => {
            if let Some(p) = &inputs.position_ids {
                x.position_ids = Some((p.to_dtype(DType::F32)? + n as f64)?.to_dtype(DType::U32)?);
            }
            if seq2seq {
                if let Some(m) = &inputs.decoder_attention_mask {
                    x.decoder_attention_mask = Some(prefix_cols(m, n, 1.0)?);
                }
            } else if let Some(m) = &inputs.attention_mask {
                x.attention_mask = Some(prefix_cols(m, n, 1.0)?);
            }
            if first {
                let dtype = compute_dtype(model)?;
                let prefix = tuner
                    .encoder
                    .prompts(b, inputs.task_ids.as_ref(), train)?
                    .to_dtype(dtype)?;
                let kv = prefix_key_values(&prefix, layout, seq2seq)?;
                match cache.as_deref_mut() {
                    Some(c) => c.self_attn = kv,
                    None => {
                        own_cache = Some(Cache {
                            self_attn: kv,
                            ..Default::default()
                        })
                    }
                }
            }
        }
        Kind::Embeddings { decoder_prompt } => {
            // PEFT ignores position ids here (with a warning): the model numbers the whole
            // sequence, virtual tokens first.
            x.position_ids = None;
            if let Some(m) = &inputs.attention_mask {
                x.attention_mask = Some(prefix_cols(m, n, 1.0)?);
            }
            if first {
                if !causal && !seq2seq {
                    if let Some(tt) = &inputs.token_type_ids {
                        x.token_type_ids = Some(prefix_cols(tt, n, 0.0)?);
                    }
                }
                let embeds = match &inputs.inputs_embeds {
                    Some(e) => e.clone(),
                    None => model.embed_tokens(inputs.ids()?, train)?,
                };
                let prompts = tuner
                    .encoder
                    .prompts(b, inputs.task_ids.as_ref(), train)?
                    .to_dtype(embeds.dtype())?;
                let encoder_part = if prompts.dim(1)? > n {
                    prompts.narrow(1, 0, n)?
                } else {
                    prompts.clone()
                };
                x.input_ids = None;
                x.inputs_embeds = Some(Tensor::cat(&[&encoder_part, &embeds], 1)?);
                if !seq2seq {
                    output_prefix = n;
                }
                // The decoder's prompt: in a forward pass, not in generation (PEFT's `generate`
                // prompts the encoder only).
                if seq2seq && decoder_prompt && layout.submodules == 2 && cache.is_none() {
                    let dec = match (&inputs.decoder_inputs_embeds, &inputs.decoder_input_ids) {
                        (Some(e), _) => e.clone(),
                        (None, Some(ids)) => model.embed_tokens(ids, train)?,
                        (None, None) => {
                            return Err(Error::Data(format!(
                                "{} on a seq2seq model prompts the decoder too and needs its \
                                 input: give decoder_input_ids (the labels shifted right, \
                                 peft::models::t5::shift_right) or decoder_inputs_embeds",
                                tuner.what
                            )))
                        }
                    };
                    let dec_prompt = prompts.narrow(1, n, n)?.to_dtype(dec.dtype())?;
                    x.decoder_input_ids = None;
                    x.decoder_inputs_embeds = Some(Tensor::cat(&[&dec_prompt, &dec], 1)?);
                    if let Some(m) = &inputs.decoder_attention_mask {
                        x.decoder_attention_mask = Some(prefix_cols(m, n, 1.0)?);
                    }
                    output_prefix = n;
                }
            }
        }
    }
    Ok(Prepared {
        inputs: x,
        cache: own_cache,
        output_prefix,
    })
}

/// A seeded generator for an adapter's initial weights.
pub fn rng(seed: u64) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// The word embeddings of `ids` (`[rows, d]`, f32, detached): TEXT / SAMPLE_VOCAB / CPT inits.
pub fn word_embeddings(model: &dyn Model, ids: &[u32]) -> Result<Tensor> {
    let t = Tensor::from_vec(ids.to_vec(), (1, ids.len()), model.device())?;
    let e = crate::grad::no_grad(|| model.embed_tokens(&t, false))?;
    Ok(e.squeeze(0)?.to_dtype(DType::F32)?.detach())
}

/// PEFT's TEXT init: `prompt_tuning_init_text` tokenized (special tokens included, as the
/// tokenizer's `__call__` adds them) with the tokenizer at `tokenizer_name_or_path` (with
/// `tokenizer_kwargs` `gguf_file`: the tokenizer of that GGUF file there), repeated or cut to
/// `rows` ids.
pub fn text_init_ids(
    tokenizer: &str,
    kwargs: Option<&serde_json::Map<String, serde_json::Value>>,
    text: &str,
    rows: usize,
    vocab: usize,
) -> Result<Vec<u32>> {
    let mut path = crate::io::hub::resolve_model(tokenizer, None).map_err(|e| {
        config_err!(
            "prompt_tuning_init = TEXT: cannot find the tokenizer `{tokenizer}` \
             (tokenizer_name_or_path): {e}"
        )
    })?;
    for (k, v) in kwargs.into_iter().flatten() {
        match (k.as_str(), v.as_str()) {
            ("gguf_file", Some(f)) => path = path.join(f),
            ("trust_remote_code", _) => {} // PEFT drops it too
            _ => {
                return Err(config_err!(
                    "tokenizer_kwargs `{k}` = {v} is not understood here (only gguf_file); \
                     remove it, or point tokenizer_name_or_path at a directory with the \
                     tokenizer.json to use"
                ))
            }
        }
    }
    let mut tok = crate::io::tokenizer::Tokenizer::for_model(&path)?;
    let ids = tok.encode_text(text, true)?;
    if ids.is_empty() {
        return Err(config_err!(
            "prompt_tuning_init_text {text:?} tokenizes to no tokens with {tokenizer}"
        ));
    }
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(config_err!(
            "the tokenizer {tokenizer} gives id {bad} for prompt_tuning_init_text, outside the \
             model's vocabulary of {vocab}; use the model's own tokenizer"
        ));
    }
    Ok(ids.iter().copied().cycle().take(rows).collect())
}
