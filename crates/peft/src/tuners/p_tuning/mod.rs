//! P-tuning (Liu et al., 2021) as PEFT 0.21 implements it (`PromptEncoderConfig`,
//! `PromptEncoder`): a table of `num_virtual_tokens · num_transformer_submodules` vectors
//! (standard normal) reparameterised by
//!
//! - `MLP`: `Linear(d, h) → ReLU → Linear(h, h) → ReLU → Linear(h, d)` (`encoder_num_layers` is
//!   ignored, as in PEFT), or
//! - `LSTM`: a bidirectional `encoder_num_layers`-layer LSTM of hidden size `h` (dropout
//!   `encoder_dropout` between layers) over the table as one sequence, then
//!   `Linear(2h, 2h) → ReLU → Linear(2h, d)`,
//!
//! `h = encoder_hidden_size` (default `token_dim`). Its output goes in front of the input
//! embeddings like prompt tuning's. PEFT saves only that output (`prompt_embeddings`), not the
//! encoder, so a saved adapter loads as its table (inference); continuing to train one needs the
//! encoder, which only a checkpoint of `peft train` keeps.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;

use crate::error::config_err;
use crate::models::Model;
use crate::tuners::config::{adapter_json, check_prob, parse_config, BaseFields, ConfigFields};
use crate::tuners::prompt_learning::encoders::{normal, param, Linear, Lstm};
use crate::tuners::prompt_learning::{
    repeat_rows, rng, Kind, PromptEncoder, PromptLearningFields, PromptTuner, Table, EMBEDDING_KEY,
    PROMPT_EMBEDDINGS,
};
use crate::tuners::{InjectContext, Injected, MethodKind, ModelTensor, TunerConfig};
use crate::{Error, Result};

/// `PromptEncoderReparameterizationType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Reparameterization {
    #[default]
    #[serde(rename = "MLP")]
    Mlp,
    #[serde(rename = "LSTM")]
    Lstm,
}

/// `PromptEncoderConfig` (`peft_type` P_TUNING), PEFT's field names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PromptEncoderConfig {
    #[serde(flatten)]
    pub prompt: PromptLearningFields,
    pub encoder_reparameterization_type: Reparameterization,
    /// Default: `token_dim`.
    pub encoder_hidden_size: Option<usize>,
    pub encoder_num_layers: usize,
    pub encoder_dropout: f64,
    #[serde(flatten)]
    pub base: BaseFields,
}

impl Default for PromptEncoderConfig {
    fn default() -> Self {
        Self {
            prompt: PromptLearningFields::default(),
            encoder_reparameterization_type: Reparameterization::Mlp,
            encoder_hidden_size: None,
            encoder_num_layers: 2,
            encoder_dropout: 0.0,
            base: BaseFields::default(),
        }
    }
}

impl ConfigFields for PromptEncoderConfig {
    const PEFT_TYPE: &'static str = "P_TUNING";
    const NAME: &'static str = "PromptEncoderConfig";
    const INT_FIELDS: &'static [&'static str] = &[];

    fn validate(&self) -> Result<()> {
        check_prob("encoder_dropout", self.encoder_dropout)?;
        if self.encoder_reparameterization_type == Reparameterization::Lstm
            && self.encoder_num_layers == 0
        {
            return Err(config_err!(
                "PromptEncoderConfig `encoder_num_layers` must be at least 1 for the LSTM"
            ));
        }
        if self.encoder_hidden_size == Some(0) {
            return Err(config_err!(
                "PromptEncoderConfig `encoder_hidden_size` must be at least 1"
            ));
        }
        Ok(())
    }
}

impl PromptEncoderConfig {
    pub fn from_json(v: &Value, strict: bool) -> Result<Self> {
        parse_config(v, strict)
    }

    /// `num_virtual_tokens` virtual tokens through the default MLP.
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

/// The reparameterisation head.
enum Head {
    /// `mlp_head.0`, `.2`, `.4`.
    Mlp([Linear; 3]),
    /// `lstm_head`, then `mlp_head.0`, `.2`.
    Lstm(Lstm, [Linear; 2]),
}

/// PEFT's `PromptEncoder` while training: the table and its head.
struct Encoder {
    embedding: Var,
    head: Head,
}

impl Encoder {
    /// The head's output for the whole table, `[1, rows, d]`.
    fn output(&self, train: bool) -> Result<Tensor> {
        let x = crate::grad::live(self.embedding.as_tensor()).unsqueeze(0)?;
        match &self.head {
            Head::Mlp([a, b, c]) => c.forward(&b.forward(&a.forward(&x)?.relu()?)?.relu()?),
            Head::Lstm(lstm, [a, b]) => b.forward(&a.forward(&lstm.forward(&x, train)?)?.relu()?),
        }
    }
}

impl PromptEncoder for Encoder {
    fn prompts(&self, batch: usize, _task_ids: Option<&Tensor>, train: bool) -> Result<Tensor> {
        // As PEFT: the head runs once and its output is repeated over the batch.
        repeat_rows(&self.output(train)?, batch)
    }

    fn tensors(&self) -> Vec<ModelTensor> {
        let mut out = vec![param(EMBEDDING_KEY, &self.embedding)];
        match &self.head {
            Head::Mlp(l) => {
                for (i, lin) in l.iter().enumerate() {
                    out.extend(lin.tensors(&format!("prompt_encoder.mlp_head.{}", 2 * i)));
                }
            }
            Head::Lstm(lstm, l) => {
                out.extend(lstm.tensors("prompt_encoder.lstm_head"));
                for (i, lin) in l.iter().enumerate() {
                    out.extend(lin.tensors(&format!("prompt_encoder.mlp_head.{}", 2 * i)));
                }
            }
        }
        out
    }

    fn to_save(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![(
            PROMPT_EMBEDDINGS.into(),
            self.output(false)?.squeeze(0)?.detach(),
        )])
    }

    fn load(&mut self, _file: &mut HashMap<String, Tensor>) -> Result<Vec<String>> {
        Err(Error::Adapter(
            "a P_TUNING adapter file holds only the prompt encoder's output (prompt_embeddings), \
             not the MLP/LSTM that produced it, so it cannot be trained further (PEFT 0.21 \
             refuses is_trainable for every prompt-learning adapter); load it for inference, or \
             resume training from a checkpoint directory of `peft train`, whose \
             trainable.safetensors keeps the encoder"
                .into(),
        ))
    }
}

impl TunerConfig for PromptEncoderConfig {
    fn peft_type(&self) -> &'static str {
        Self::PEFT_TYPE
    }
    fn tuner_name(&self) -> &'static str {
        "PromptEncoder"
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
        self.prompt.fill(model, task, false);
        let layout = self.prompt.layout(
            "p-tuning",
            model,
            Kind::Embeddings {
                decoder_prompt: false,
            },
        )?;
        let d = layout.token_dim;
        let h = *self.encoder_hidden_size.get_or_insert(d);
        let rows = layout.rows();
        let device = model.device();
        let encoder: Box<dyn PromptEncoder> = if ctx.trainable {
            let mut r = rng(ctx.seed);
            let embedding = normal(rows, d, 1.0, &mut r, device)?;
            let head = match self.encoder_reparameterization_type {
                Reparameterization::Mlp => {
                    if self.encoder_num_layers != 2 {
                        tracing::warn!(
                            "for MLP, the argument `encoder_num_layers` is ignored. Exactly 2 MLP \
                             layers are used."
                        );
                    }
                    Head::Mlp([
                        Linear::new(d, h, &mut r, device)?,
                        Linear::new(h, h, &mut r, device)?,
                        Linear::new(h, d, &mut r, device)?,
                    ])
                }
                Reparameterization::Lstm => Head::Lstm(
                    Lstm::new(
                        d,
                        h,
                        self.encoder_num_layers,
                        self.encoder_dropout,
                        &mut r,
                        device,
                    )?,
                    [
                        Linear::new(2 * h, 2 * h, &mut r, device)?,
                        Linear::new(2 * h, d, &mut r, device)?,
                    ],
                ),
            };
            Box::new(Encoder { embedding, head })
        } else {
            Box::new(Table::new(rows, d, device)?)
        };
        Ok(Injected {
            modules: Vec::new(),
            tuner: Box::new(PromptTuner {
                layout,
                encoder,
                what: "p-tuning",
            }),
        })
    }
}
