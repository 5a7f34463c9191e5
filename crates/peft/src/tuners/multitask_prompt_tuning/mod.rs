//! Multitask prompt tuning (Wang et al., 2023) as PEFT 0.21 implements it
//! (`MultitaskPromptTuningConfig`, `MultitaskPromptEmbedding`): a shared prompt `P` `[n·s, d]`
//! (initialised as prompt tuning's) and per task a low-rank factor, `cols[t]` `[n·s, R]` and
//! `rows[t]` `[R, d]` (both `N(0, 0.02)`); the prompt of an example of task `t` is
//! `P ⊙ (cols[t] · rows[t])`, so every batch needs `task_ids`, one per row. Inits from a trained
//! source adapter (`prompt_tuning_init_state_dict_path`): `AVERAGE_SOURCE_TASKS` (the source's
//! `P` and its factors averaged over tasks), `EXACT_SOURCE_TASK` (its `P` and the factors of task
//! `prompt_tuning_init_task`), `ONLY_SOURCE_SHARED` (its `P` only). Saved as `prompt_embeddings`
//! (`P`), `prefix_task_cols` `[T, n·s, R]` and `prefix_task_rows` `[T, R, d]`.
//!
//! On a seq2seq model with two submodules the decoder gets the second half of the prompt in front
//! of its input embeddings in a forward pass (PEFT derives that input from the labels; given
//! `decoder_input_ids`, where PEFT fails, we embed them and do the same); generation, as PEFT's,
//! prompts the encoder only.

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::Path;

use crate::error::config_err;
use crate::models::Model;
use crate::tuners::config::{adapter_json, parse_config, BaseFields, ConfigFields};
use crate::tuners::prompt_learning::encoders::{normal, param};
use crate::tuners::prompt_learning::{
    load_key, rng, Kind, PromptEncoder, PromptLearningFields, PromptTuner, EMBEDDING_KEY,
    PROMPT_EMBEDDINGS,
};
use crate::tuners::prompt_tuning::{check_text_init, initial_table, InitText, PromptTuningInit};
use crate::tuners::tuner::set_checked;
use crate::tuners::{InjectContext, Injected, MethodKind, ModelTensor, TunerConfig};
use crate::{Error, Result};

/// Keys of the task factors in the adapter file.
pub const COLS_KEY: &str = "prefix_task_cols";
pub const ROWS_KEY: &str = "prefix_task_rows";

/// `MultitaskPromptTuningInit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MultitaskPromptTuningInit {
    Text,
    #[default]
    Random,
    AverageSourceTasks,
    ExactSourceTask,
    OnlySourceShared,
    /// Not in PEFT's enum, but PEFT's `PromptEmbedding` accepts it here too.
    SampleVocab,
}

/// `MultitaskPromptTuningConfig`, PEFT's field names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MultitaskPromptTuningConfig {
    #[serde(flatten)]
    pub prompt: PromptLearningFields,
    pub prompt_tuning_init: MultitaskPromptTuningInit,
    pub prompt_tuning_init_text: Option<String>,
    pub tokenizer_name_or_path: Option<String>,
    pub tokenizer_kwargs: Option<Map<String, Value>>,
    /// The source adapter's `adapter_model.safetensors` for the three source inits.
    pub prompt_tuning_init_state_dict_path: Option<String>,
    /// The source task of `EXACT_SOURCE_TASK`.
    pub prompt_tuning_init_task: usize,
    pub num_ranks: usize,
    pub num_tasks: usize,
    #[serde(flatten)]
    pub base: BaseFields,
}

impl Default for MultitaskPromptTuningConfig {
    fn default() -> Self {
        Self {
            prompt: PromptLearningFields::default(),
            prompt_tuning_init: MultitaskPromptTuningInit::Random,
            prompt_tuning_init_text: None,
            tokenizer_name_or_path: None,
            tokenizer_kwargs: None,
            prompt_tuning_init_state_dict_path: None,
            prompt_tuning_init_task: 0,
            num_ranks: 1,
            num_tasks: 1,
            base: BaseFields::default(),
        }
    }
}

impl MultitaskPromptTuningInit {
    fn reads_source_tasks(self) -> bool {
        matches!(
            self,
            Self::AverageSourceTasks | Self::ExactSourceTask | Self::OnlySourceShared
        )
    }
}

impl ConfigFields for MultitaskPromptTuningConfig {
    const PEFT_TYPE: &'static str = "MULTITASK_PROMPT_TUNING";
    const NAME: &'static str = "MultitaskPromptTuningConfig";

    fn validate(&self) -> Result<()> {
        check_text_init(
            self.prompt_tuning_init == MultitaskPromptTuningInit::Text,
            &self.prompt_tuning_init_text,
            &self.tokenizer_name_or_path,
        )?;
        if self.num_tasks == 0 || self.num_ranks == 0 {
            return Err(config_err!(
                "MultitaskPromptTuningConfig `num_tasks` and `num_ranks` must be at least 1 \
                 (got {} and {})",
                self.num_tasks,
                self.num_ranks
            ));
        }
        if self.prompt_tuning_init.reads_source_tasks()
            && self.prompt_tuning_init_state_dict_path.is_none()
        {
            return Err(config_err!(
                "prompt_tuning_init = {:?} needs `prompt_tuning_init_state_dict_path` (the source \
                 adapter's adapter_model.safetensors)",
                self.prompt_tuning_init
            ));
        }
        Ok(())
    }
}

impl MultitaskPromptTuningConfig {
    pub fn from_json(v: &Value, strict: bool) -> Result<Self> {
        parse_config(v, strict)
    }

    /// `num_virtual_tokens` virtual tokens shared by `num_tasks` tasks through rank-`num_ranks`
    /// factors, initialised at random.
    pub fn new(num_virtual_tokens: usize, num_tasks: usize, num_ranks: usize) -> Self {
        Self {
            prompt: PromptLearningFields {
                num_virtual_tokens: Some(num_virtual_tokens),
                ..Default::default()
            },
            num_tasks,
            num_ranks,
            ..Default::default()
        }
    }
}

/// `MultitaskPromptEmbedding`.
struct Encoder {
    embedding: Var,
    cols: Var,
    rows: Var,
    num_tasks: usize,
}

impl PromptEncoder for Encoder {
    fn prompts(&self, batch: usize, task_ids: Option<&Tensor>, _train: bool) -> Result<Tensor> {
        let ids = task_ids.ok_or_else(|| {
            Error::Data(format!(
                "multitask prompt tuning needs task_ids, one task index (0..{}) per row: pass \
                 Inputs::task_ids (`peft forward --task-ids '[0, 2]'`, a [data] task_id_column \
                 for `peft train`)",
                self.num_tasks
            ))
        })?;
        let ids = ids.to_dtype(DType::U32)?;
        let list = ids.to_vec1::<u32>()?;
        if list.len() != batch {
            return Err(Error::Data(format!(
                "multitask prompt tuning: {} task_ids for a batch of {batch} rows; give one per \
                 row",
                list.len()
            )));
        }
        if let Some(bad) = list.iter().find(|&&t| t as usize >= self.num_tasks) {
            return Err(Error::Data(format!(
                "task id {bad} is out of range: the adapter has num_tasks = {} (ids 0..{})",
                self.num_tasks,
                self.num_tasks - 1
            )));
        }
        let cols = crate::grad::live(self.cols.as_tensor()).index_select(&ids, 0)?;
        let rows = crate::grad::live(self.rows.as_tensor()).index_select(&ids, 0)?;
        let task = cols.matmul(&rows)?;
        Ok(task.broadcast_mul(&crate::grad::live(self.embedding.as_tensor()).unsqueeze(0)?)?)
    }

    fn tensors(&self) -> Vec<ModelTensor> {
        vec![
            param(EMBEDDING_KEY, &self.embedding),
            param("prompt_encoder.prefix_task_cols", &self.cols),
            param("prompt_encoder.prefix_task_rows", &self.rows),
        ]
    }

    fn to_save(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            (COLS_KEY.into(), self.cols.as_tensor().detach()),
            (ROWS_KEY.into(), self.rows.as_tensor().detach()),
            (
                PROMPT_EMBEDDINGS.into(),
                self.embedding.as_tensor().detach(),
            ),
        ])
    }

    fn load(&mut self, file: &mut HashMap<String, Tensor>) -> Result<Vec<String>> {
        let mut missing = load_key(file, PROMPT_EMBEDDINGS, &self.embedding)?;
        missing.extend(load_key(file, COLS_KEY, &self.cols)?);
        missing.extend(load_key(file, ROWS_KEY, &self.rows)?);
        Ok(missing)
    }
}

/// The source adapter of a source init.
fn read_source(path: &str, device: &candle_core::Device) -> Result<HashMap<String, Tensor>> {
    let p = Path::new(path);
    if p.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        return Err(config_err!(
            "prompt_tuning_init_state_dict_path = {path}: only .safetensors files are read \
             (PEFT's adapter_model.safetensors); convert a .bin with safetensors.torch.save_file"
        ));
    }
    crate::io::load_safetensors(p, device)
}

fn source_tensor<'a>(
    src: &'a HashMap<String, Tensor>,
    key: &str,
    path: &str,
) -> Result<&'a Tensor> {
    src.get(key).ok_or_else(|| {
        config_err!(
            "{path} has no `{key}`; prompt_tuning_init_state_dict_path must be a multitask prompt \
             tuning adapter's adapter_model.safetensors"
        )
    })
}

impl TunerConfig for MultitaskPromptTuningConfig {
    fn peft_type(&self) -> &'static str {
        Self::PEFT_TYPE
    }
    fn tuner_name(&self) -> &'static str {
        "MultitaskPromptEmbedding"
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
            "multitask prompt tuning",
            model,
            Kind::Embeddings {
                decoder_prompt: true,
            },
        )?;
        let (rows, d) = (layout.rows(), layout.width());
        let (t, r) = (self.num_tasks, self.num_ranks);
        let device = model.device();
        let fresh = ctx.trainable && !ctx.from_file;
        let init = self.prompt_tuning_init;
        // The shared prompt as prompt tuning initialises it, then the factors (PEFT's order).
        let embedding = match (fresh, init) {
            (true, MultitaskPromptTuningInit::Text) => initial_table(
                model,
                PromptTuningInit::Text,
                InitText {
                    text: self.prompt_tuning_init_text.as_deref(),
                    tokenizer: self.tokenizer_name_or_path.as_deref(),
                    tokenizer_kwargs: self.tokenizer_kwargs.as_ref(),
                },
                (rows, d),
                ctx.seed,
            )?,
            (true, MultitaskPromptTuningInit::SampleVocab) => initial_table(
                model,
                PromptTuningInit::SampleVocab,
                InitText::default(),
                (rows, d),
                ctx.seed,
            )?,
            (true, _) => normal(rows, d, 1.0, &mut rng(ctx.seed), device)?,
            (false, _) => Var::zeros((rows, d), DType::F32, device)?,
        };
        let mut fr = rng(ctx.seed.wrapping_add(1));
        let cols = Var::from_tensor(
            &normal(t * rows, r, 0.02, &mut fr, device)?
                .as_tensor()
                .reshape((t, rows, r))?,
        )?;
        let task_rows = Var::from_tensor(
            &normal(t * r, d, 0.02, &mut fr, device)?
                .as_tensor()
                .reshape((t, r, d))?,
        )?;
        if fresh && init.reads_source_tasks() {
            let path = self
                .prompt_tuning_init_state_dict_path
                .clone()
                .unwrap_or_default();
            let src = read_source(&path, device)?;
            let shared = source_tensor(&src, PROMPT_EMBEDDINGS, &path)?;
            set_checked(&format!("{path}: {PROMPT_EMBEDDINGS}"), &embedding, shared)?;
            if init != MultitaskPromptTuningInit::OnlySourceShared {
                let scols = source_tensor(&src, COLS_KEY, &path)?;
                let srows = source_tensor(&src, ROWS_KEY, &path)?;
                let (c, w) = if init == MultitaskPromptTuningInit::AverageSourceTasks {
                    (scols.mean_keepdim(0)?, srows.mean_keepdim(0)?)
                } else {
                    let k = self.prompt_tuning_init_task;
                    let tasks = scols.dim(0)?;
                    if k >= tasks {
                        return Err(config_err!(
                            "prompt_tuning_init_task = {k}, but the source adapter {path} has \
                             {tasks} tasks"
                        ));
                    }
                    (scols.narrow(0, k, 1)?, srows.narrow(0, k, 1)?)
                };
                // PEFT loads these strictly: the new adapter must have one task.
                if t != 1 {
                    return Err(config_err!(
                        "prompt_tuning_init = {init:?} gives one task's factors, so num_tasks \
                         must be 1 (got {t}), as PEFT's strict load requires"
                    ));
                }
                set_checked(&format!("{path}: {COLS_KEY}"), &cols, &c)?;
                set_checked(&format!("{path}: {ROWS_KEY}"), &task_rows, &w)?;
            }
        }
        Ok(Injected {
            modules: Vec::new(),
            tuner: Box::new(PromptTuner {
                layout,
                encoder: Box::new(Encoder {
                    embedding,
                    cols,
                    rows: task_rows,
                    num_tasks: t,
                }),
                what: "multitask prompt tuning",
            }),
        })
    }
}
