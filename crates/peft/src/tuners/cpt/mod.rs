//! Context-aware prompt tuning (CPT, Blau et al., 2024) as PEFT 0.21 implements it (`CPTConfig`,
//! `CPTEmbedding`), causal LM only. The prompt is an in-context example: the word embeddings of
//! `cpt_token_ids` (frozen) plus a learned delta (zeros at first). `cpt_tokens_type_mask` gives
//! each prompt token a type (`4k+1` input template, `4k+2` input, `4k+3` output template, `4k+4`
//! label, for example `k`); only the first three types learn (the delta's gradient is masked on
//! labels), and before every use each delta row is scaled back into a ball of radius
//! `ε · √(d/2048)` (`opt_projection_format_epsilon` for templates, `opt_projection_epsilon` for
//! inputs). The loss is the causal LM loss over the prompt's label tokens and the inputs' labels,
//! the inputs' types shifted past the prompt's; with `opt_weighted_loss_type = "decay"`, each
//! earlier example's labels weigh `opt_loss_decay_factor` times less than the next. PEFT saves the
//! prompt (embeddings + projected delta) as `prompt_embeddings`.

use candle_core::{DType, Tensor, Var, D};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;

use crate::error::config_err;
use crate::models::{Model, TaskType};
use crate::tuners::config::{adapter_json, parse_config, BaseFields, ConfigFields};
use crate::tuners::prompt_learning::encoders::param;
use crate::tuners::prompt_learning::{
    load_key, repeat_rows, word_embeddings, Kind, PromptEncoder, PromptLearningFields, PromptTuner,
    EMBEDDING_KEY, PROMPT_EMBEDDINGS,
};
use crate::tuners::{InjectContext, Injected, MethodKind, ModelTensor, TunerConfig};
use crate::{ops, Error, Result};

/// `opt_weighted_loss_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WeightedLoss {
    #[default]
    None,
    Decay,
}

/// `CPTConfig`, PEFT's field names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CptConfig {
    #[serde(flatten)]
    pub prompt: PromptLearningFields,
    /// The prompt's tokens (default `[0]`); `num_virtual_tokens` is their count.
    pub cpt_token_ids: Option<Vec<u32>>,
    pub cpt_mask: Option<Vec<u32>>,
    pub cpt_tokens_type_mask: Option<Vec<u32>>,
    pub opt_weighted_loss_type: WeightedLoss,
    pub opt_loss_decay_factor: f64,
    pub opt_projection_epsilon: f64,
    pub opt_projection_format_epsilon: f64,
    pub tokenizer_name_or_path: Option<String>,
    #[serde(flatten)]
    pub base: BaseFields,
}

impl Default for CptConfig {
    fn default() -> Self {
        Self {
            prompt: PromptLearningFields::default(),
            cpt_token_ids: None,
            cpt_mask: None,
            cpt_tokens_type_mask: None,
            opt_weighted_loss_type: WeightedLoss::None,
            opt_loss_decay_factor: 1.0,
            opt_projection_epsilon: 0.1,
            opt_projection_format_epsilon: 0.1,
            tokenizer_name_or_path: None,
            base: BaseFields::default(),
        }
    }
}

impl ConfigFields for CptConfig {
    const PEFT_TYPE: &'static str = "CPT";
    const NAME: &'static str = "CPTConfig";
    const INT_FIELDS: &'static [&'static str] = &[];

    /// PEFT's `__post_init__`: causal LM only, and the three lists of one length.
    fn validate(&self) -> Result<()> {
        match self.base.task_type {
            Some(TaskType::CausalLm) => {}
            other => {
                return Err(config_err!(
                    "CPTConfig only supports task_type = CAUSAL_LM (got {}); CPT learns an \
                     in-context example for a causal language model",
                    other.map_or("none", |t| t.as_str())
                ))
            }
        }
        let n = self.token_ids().len();
        let mask = self.cpt_mask.as_ref().map_or(n, Vec::len);
        let types = self.cpt_tokens_type_mask.as_ref().map_or(n, Vec::len);
        if mask != n || types != n {
            return Err(config_err!(
                "cpt_token_ids, cpt_mask and cpt_tokens_type_mask must have the same length (got \
                 {n}, {mask} and {types})"
            ));
        }
        Ok(())
    }
}

impl CptConfig {
    pub fn from_json(v: &Value, strict: bool) -> Result<Self> {
        parse_config(v, strict)
    }

    /// A CPT config for a causal LM from the prompt's token ids and their types.
    pub fn new(token_ids: Vec<u32>, types: Vec<u32>) -> Self {
        let mut c = Self {
            cpt_mask: Some(vec![1; token_ids.len()]),
            cpt_token_ids: Some(token_ids),
            cpt_tokens_type_mask: Some(types),
            ..Default::default()
        };
        c.base.task_type = Some(TaskType::CausalLm);
        c
    }

    fn token_ids(&self) -> Vec<u32> {
        self.cpt_token_ids.clone().unwrap_or_else(|| vec![0])
    }

    fn types(&self) -> Vec<u32> {
        self.cpt_tokens_type_mask
            .clone()
            .unwrap_or_else(|| vec![1; self.token_ids().len()])
    }

    /// PEFT's post-init defaults, written back as PEFT writes them.
    fn complete(&mut self) {
        let ids = self.token_ids();
        let n = ids.len();
        self.prompt.num_virtual_tokens = Some(n);
        self.prompt.num_transformer_submodules = Some(1);
        if self.cpt_mask.is_none() {
            self.cpt_mask = Some(vec![1; n]);
        }
        if self.cpt_tokens_type_mask.is_none() {
            self.cpt_tokens_type_mask = Some(vec![1; n]);
        }
        self.cpt_token_ids = Some(ids);
    }
}

/// `CPTEmbedding`.
struct Encoder {
    /// The prompt's word embeddings, frozen.
    embedding: Var,
    /// The learned delta, projected before every use.
    delta: Var,
    /// 1 on rows whose delta learns (types `4k+1..4k+3`), else 0; `[n, 1]`.
    learns: Tensor,
    /// The projection radius of every row `[n]`.
    epsilon: Vec<f32>,
    types: Vec<u32>,
    token_ids: Vec<u32>,
    weighted: WeightedLoss,
    decay: f64,
}

impl Encoder {
    /// PEFT's `get_projection`: rows with a non-zero norm are scaled by `ε / max(norm, ε)`.
    fn project(&self) -> Result<()> {
        let w = self.delta.as_tensor().detach();
        let norms: Vec<f32> = w.sqr()?.sum(D::Minus1)?.sqrt()?.to_vec1()?;
        let scale: Vec<f32> = norms
            .iter()
            .zip(&self.epsilon)
            .map(|(&n, &e)| if n > 0.0 { e / n.max(e) } else { 1.0 })
            .collect();
        let scale = Tensor::from_vec(scale, (norms.len(), 1), w.device())?;
        self.delta.set(&w.broadcast_mul(&scale)?)?;
        Ok(())
    }

    /// `[1, n, d]`: the embeddings plus the projected delta, its gradient masked to the rows
    /// that learn.
    fn prompt(&self) -> Result<Tensor> {
        self.project()?;
        let delta = crate::grad::live(self.delta.as_tensor());
        let keep = delta.broadcast_mul(&self.learns)?;
        let masked = (delta - &keep)?.detach();
        let delta = (keep + masked)?;
        Ok((crate::grad::live(self.embedding.as_tensor()) + delta)?.unsqueeze(0)?)
    }
}

/// PEFT's `get_epsilon`: `1e-10` for label rows, the format epsilon for templates, the input
/// epsilon for inputs, both times `√(d/2048)` (in f32).
fn epsilons(types: &[u32], d: usize, input: f64, format: f64) -> Vec<f32> {
    let norm = (d as f32 / 2048.0).sqrt();
    let (fmt, inp) = (format as f32 * norm, input as f32 * norm);
    types
        .iter()
        .map(|&t| match (t > 0, t % 4) {
            (true, 1) | (true, 3) => fmt,
            (true, 2) => inp,
            _ => 1e-10,
        })
        .collect()
}

impl PromptEncoder for Encoder {
    fn prompts(&self, batch: usize, _task_ids: Option<&Tensor>, _train: bool) -> Result<Tensor> {
        repeat_rows(&self.prompt()?, batch)
    }

    fn tensors(&self) -> Vec<ModelTensor> {
        vec![
            ModelTensor {
                key: EMBEDDING_KEY.into(),
                var: self.embedding.clone(),
                is_parameter: true,
                frozen: true,
            },
            param("prompt_encoder.delta_embedding.weight", &self.delta),
        ]
    }

    fn to_save(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![(
            PROMPT_EMBEDDINGS.into(),
            self.prompt()?.squeeze(0)?.detach(),
        )])
    }

    /// The saved prompt becomes the embeddings; the delta starts again from zero (PEFT's state
    /// after loading).
    fn load(&mut self, file: &mut HashMap<String, Tensor>) -> Result<Vec<String>> {
        let missing = load_key(file, PROMPT_EMBEDDINGS, &self.embedding)?;
        self.delta.set(&self.delta.zeros_like()?)?;
        Ok(missing)
    }

    /// PEFT's `_cpt_forward` labels and `calculate_loss`.
    fn loss(&self, logits: &Tensor, labels: &Tensor) -> Result<Option<Tensor>> {
        let n = self.token_ids.len();
        let (b, t) = labels.dims2()?;
        let (lb, lt, v) = logits.dims3()?;
        if lb != b || lt != n + t {
            return Err(Error::ShapeMismatch {
                name: "CPT logits".into(),
                expected: vec![b, n + t, v],
                found: vec![lb, lt, v],
            });
        }
        let labels: Vec<Vec<i64>> = labels.to_dtype(DType::I64)?.to_vec2()?;
        let max_type = self.types.iter().copied().max().unwrap_or(0) as i64;
        let mut all_labels = Vec::with_capacity(b * (n + t));
        let mut weights = Vec::with_capacity(b * (n + t - 1));
        let mut count = 0usize;
        for row in &labels {
            // The prompt's labels and types, then the inputs' (type 4, shifted past the prompt's).
            let types: Vec<i64> = self
                .types
                .iter()
                .map(|&x| x as i64)
                .chain(std::iter::repeat_n(4 + max_type, t))
                .collect();
            let mut lab: Vec<i64> = self
                .token_ids
                .iter()
                .map(|&x| x as i64)
                .chain(row.iter().copied())
                .collect();
            for (l, ty) in lab.iter_mut().zip(&types) {
                if !(*ty > 0 && ty % 4 == 0) {
                    *l = -100;
                }
            }
            // The shifted positions' weights: each example's labels `decay` times the next's.
            let shifted = &types[1..];
            let mut ids: Vec<i64> = shifted
                .iter()
                .copied()
                .filter(|&x| x > 0 && x % 4 == 0)
                .collect();
            ids.sort_unstable();
            ids.dedup();
            let mut decay = vec![1.0f32; shifted.len()];
            let mut value = 1.0f64;
            for id in ids.iter().rev() {
                for (w, &ty) in decay.iter_mut().zip(shifted) {
                    if ty == *id {
                        *w = value as f32;
                    }
                }
                value *= self.decay;
            }
            for (j, &l) in lab[1..].iter().enumerate() {
                let valid = l != -100;
                count += usize::from(valid);
                let w = match (valid, self.weighted) {
                    (false, _) => 0.0,
                    (true, WeightedLoss::Decay) => decay[j],
                    (true, WeightedLoss::None) => 1.0,
                };
                weights.push(w);
            }
            all_labels.extend(lab);
        }
        let device = logits.device();
        let labels = Tensor::from_vec(all_labels, (b, n + t), device)?;
        let targets = labels.narrow(1, 1, n + t - 1)?.clamp(0i64, v as i64 - 1)?;
        let logp = ops::log_softmax(&logits.narrow(1, 0, n + t - 1)?.to_dtype(DType::F32)?)?;
        let picked = logp
            .gather(&targets.to_dtype(DType::U32)?.unsqueeze(2)?, 2)?
            .squeeze(2)?;
        let w = Tensor::from_vec(weights, (b, n + t - 1), device)?;
        // The mean over the label positions of the weighted losses (NaN without any, as PEFT).
        let loss = (picked.neg()? * w)?.sum_all()?;
        Ok(Some((loss / count as f64)?))
    }
}

impl TunerConfig for CptConfig {
    fn peft_type(&self) -> &'static str {
        Self::PEFT_TYPE
    }
    fn tuner_name(&self) -> &'static str {
        "CPTEmbedding"
    }
    fn kind(&self) -> MethodKind {
        MethodKind::Input
    }
    fn base(&self) -> &BaseFields {
        &self.base
    }
    fn base_mut(&mut self) -> &mut BaseFields {
        &mut self.base
    }
    fn to_adapter_json(&self) -> Value {
        adapter_json(self)
    }
    fn inject(&mut self, model: &mut dyn Model, ctx: &InjectContext<'_>) -> Result<Injected> {
        ConfigFields::validate(self)?;
        if model.info().task != TaskType::CausalLm {
            return Err(config_err!(
                "CPT works on causal language models only, but this {} model is loaded for {}; \
                 load it with task CAUSAL_LM",
                model.info().model_type,
                model.info().task.as_str()
            ));
        }
        self.complete();
        self.prompt.fill(model, Some(TaskType::CausalLm), false);
        let layout = self.prompt.layout(
            "CPT",
            model,
            Kind::Embeddings {
                decoder_prompt: false,
            },
        )?;
        let (n, d) = (layout.rows(), layout.width());
        let ids = self.token_ids();
        let vocab = model.dims().vocab_size;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(config_err!(
                "cpt_token_ids holds {bad}, outside the model's vocabulary of {vocab}"
            ));
        }
        let device = model.device();
        let embedding = if ctx.trainable && !ctx.from_file {
            Var::from_tensor(&word_embeddings(model, &ids)?)?
        } else {
            Var::zeros((n, d), DType::F32, device)?
        };
        let types = self.types();
        let learns: Vec<f32> = types
            .iter()
            .map(|&t| f32::from(u8::from(matches!(t % 4, 1..=3))))
            .collect();
        let encoder = Encoder {
            embedding,
            delta: Var::zeros((n, d), DType::F32, device)?,
            learns: Tensor::from_vec(learns, (n, 1), device)?,
            epsilon: epsilons(
                &types,
                d,
                self.opt_projection_epsilon,
                self.opt_projection_format_epsilon,
            ),
            types,
            token_ids: ids,
            weighted: self.opt_weighted_loss_type,
            decay: self.opt_loss_decay_factor,
        };
        Ok(Injected {
            modules: Vec::new(),
            tuner: Box::new(PromptTuner {
                layout,
                encoder: Box::new(encoder),
                what: "CPT",
            }),
        })
    }
}
