//! Prefix tuning (Li & Liang, 2021) as PEFT 0.21 implements it (`PrefixTuningConfig`,
//! `PrefixEncoder`): every attention layer sees `num_virtual_tokens` learned keys and values
//! before the sequence's own. The prefix is a table `[n, num_layers · 2 · token_dim]` (standard
//! normal, or zeros with `init_weights = "zero"`), or with `prefix_projection` the output of
//! `Embedding(n, d) → Linear(d, h) → Tanh → Linear(h, num_layers · 2 · d)` (`h =
//! encoder_hidden_size`, default `token_dim`; `"zero"` zeroes the last Linear). On grouped-query
//! models `token_dim` is the key/value width (`num_key_value_heads · head_dim`). The model gets it
//! as the key/value cache it starts from, with positions moved by `n` (see
//! [`crate::tuners::prompt_learning`]). PEFT saves the prefix itself (`prompt_embeddings`),
//! never the projection.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;

use crate::error::config_err;
use crate::models::Model;
use crate::tuners::config::{adapter_json, parse_config, BaseFields, ConfigFields};
use crate::tuners::prompt_learning::encoders::{normal, param, Linear};
use crate::tuners::prompt_learning::{
    repeat_rows, rng, Kind, PromptEncoder, PromptLearningFields, PromptTuner, Table, EMBEDDING_KEY,
    PROMPT_EMBEDDINGS,
};
use crate::tuners::{InjectContext, Injected, MethodKind, ModelTensor, TunerConfig};
use crate::{Error, Result};

/// `PrefixTuningConfig`, PEFT's field names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct PrefixTuningConfig {
    #[serde(flatten)]
    pub prompt: PromptLearningFields,
    /// `None` (random) or `"zero"`: a prefix of zeros.
    pub init_weights: Option<String>,
    /// Default: `token_dim`.
    pub encoder_hidden_size: Option<usize>,
    pub prefix_projection: bool,
    #[serde(flatten)]
    pub base: BaseFields,
}

impl ConfigFields for PrefixTuningConfig {
    const PEFT_TYPE: &'static str = "PREFIX_TUNING";
    const NAME: &'static str = "PrefixTuningConfig";

    fn validate(&self) -> Result<()> {
        if let Some(w) = &self.init_weights {
            if w != "zero" {
                return Err(config_err!(
                    "PrefixTuningConfig `init_weights` = {w:?}; allowed: null (random) or \"zero\""
                ));
            }
        }
        if self.encoder_hidden_size == Some(0) {
            return Err(config_err!(
                "PrefixTuningConfig `encoder_hidden_size` must be at least 1"
            ));
        }
        Ok(())
    }
}

impl PrefixTuningConfig {
    pub fn from_json(v: &Value, strict: bool) -> Result<Self> {
        parse_config(v, strict)
    }

    /// `num_virtual_tokens` prefix positions, without projection.
    pub fn new(num_virtual_tokens: usize) -> Self {
        Self {
            prompt: PromptLearningFields {
                num_virtual_tokens: Some(num_virtual_tokens),
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

/// The projected prefix while training: `transform(embedding)`.
struct Projected {
    embedding: Var,
    transform: [Linear; 2],
}

impl Projected {
    fn output(&self) -> Result<Tensor> {
        let [a, b] = &self.transform;
        b.forward(
            &a.forward(&crate::grad::live(self.embedding.as_tensor()))?
                .tanh()?,
        )
    }
}

impl PromptEncoder for Projected {
    fn prompts(&self, batch: usize, _task_ids: Option<&Tensor>, _train: bool) -> Result<Tensor> {
        repeat_rows(&self.output()?, batch)
    }

    fn tensors(&self) -> Vec<ModelTensor> {
        let mut out = vec![param(EMBEDDING_KEY, &self.embedding)];
        out.extend(self.transform[0].tensors("prompt_encoder.transform.0"));
        out.extend(self.transform[1].tensors("prompt_encoder.transform.2"));
        out
    }

    fn to_save(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![(PROMPT_EMBEDDINGS.into(), self.output()?.detach())])
    }

    fn load(&mut self, _file: &mut HashMap<String, Tensor>) -> Result<Vec<String>> {
        Err(Error::Adapter(
            "a PREFIX_TUNING adapter with prefix_projection = true saves only the projected \
             prefix (prompt_embeddings), not the embedding and projection that produced it, so it \
             cannot be trained further (PEFT 0.21 refuses is_trainable for every \
             prompt-learning adapter); load it for inference, or resume training from a \
             checkpoint directory of `peft train`, whose trainable.safetensors keeps the \
             projection"
                .into(),
        ))
    }
}

impl TunerConfig for PrefixTuningConfig {
    fn peft_type(&self) -> &'static str {
        Self::PEFT_TYPE
    }
    fn tuner_name(&self) -> &'static str {
        "PrefixEncoder"
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
        let task = self.base.task_type.or(Some(model.info().task));
        self.prompt.fill(model, task, true);
        let layout = self.prompt.layout("prefix tuning", model, Kind::Prefix)?;
        let d = layout.token_dim;
        let h = *self.encoder_hidden_size.get_or_insert(d);
        let (n, width) = (layout.n, layout.width());
        let device = model.device();
        let zero = self.init_weights.as_deref() == Some("zero");
        let encoder: Box<dyn PromptEncoder> = match (ctx.trainable, self.prefix_projection) {
            (true, true) => {
                let mut r = rng(ctx.seed);
                let embedding = normal(n, d, 1.0, &mut r, device)?;
                let first = Linear::new(d, h, &mut r, device)?;
                let last = Linear::new(h, width, &mut r, device)?;
                if zero {
                    last.weight.set(&last.weight.zeros_like()?)?;
                    last.bias.set(&last.bias.zeros_like()?)?;
                }
                Box::new(Projected {
                    embedding,
                    transform: [first, last],
                })
            }
            (true, false) if !ctx.from_file => {
                let table = if zero {
                    Var::zeros((n, width), candle_core::DType::F32, device)?
                } else {
                    normal(n, width, 1.0, &mut rng(ctx.seed), device)?
                };
                Box::new(Table { table })
            }
            _ => Box::new(Table::new(n, width, device)?),
        };
        Ok(Injected {
            modules: Vec::new(),
            tuner: Box::new(PromptTuner {
                layout,
                encoder,
                what: "prefix tuning",
            }),
        })
    }
}
