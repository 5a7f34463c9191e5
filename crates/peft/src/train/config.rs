//! The `peft train` config file: four tables with Hugging Face names — `[model]`, `[peft]` (the
//! adapter_config.json fields), `[data]`, `[training]` (TrainingArguments) — and `--set
//! table.key=value` overrides applied before the tables are read.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use super::schedule::SchedulerType;
use crate::models::TaskType;
use crate::tuners::PeftConfig;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub model: ModelSection,
    pub peft: PeftConfig,
    pub data: DataSection,
    pub training: TrainingArguments,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub path: PathBuf,
    pub task_type: Option<TaskType>,
    pub num_labels: Option<usize>,
    /// Quantize the base at load (QLoRA), with transformers' `BitsAndBytesConfig` names:
    /// `quantization = { load_in_4bit = true, bnb_4bit_quant_type = "nf4",
    /// bnb_4bit_use_double_quant = true, bnb_4bit_compute_dtype = "bfloat16" }`.
    pub quantization: Option<crate::quant::BitsAndBytesConfig>,
    /// Keep a GGUF base's quantized Linear weights in their blocks (QLoRA on a GGUF file)
    /// instead of dequantizing them to f32 at load, as transformers does.
    #[serde(default)]
    pub keep_gguf_quantized: bool,
}

/// Where the examples are, which columns hold what, and how long sequences may be. Column names
/// default to the names of the Hugging Face example scripts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub train_file: PathBuf,
    pub eval_file: Option<PathBuf>,
    /// Fraction of the train file held out for evaluation when no `eval_file` is given (a fixed
    /// split drawn with `seed`); 0 evaluates on nothing.
    #[serde(default = "default_validation_split")]
    pub validation_split: f64,
    #[serde(default = "default_text")]
    pub text_column: String,
    pub text_pair_column: Option<String>,
    #[serde(default = "default_label")]
    pub label_column: String,
    /// Class names in id order; default: integer labels as given, names sorted.
    pub label_names: Option<Vec<String>>,
    /// TOKEN_CLS: the words and their tags (lists, or whitespace-separated strings).
    #[serde(default = "default_tokens")]
    pub tokens_column: String,
    #[serde(default = "default_tags")]
    pub tags_column: String,
    /// CAUSAL_LM with prompt/completion pairs (loss on the completion only); without a prompt
    /// column, `text_column` is packed into blocks of `block_size`.
    pub prompt_column: Option<String>,
    #[serde(default = "default_completion")]
    pub completion_column: String,
    /// CAUSAL_LM packing length (default: `max_length`).
    pub block_size: Option<usize>,
    /// SEQ_2_SEQ_LM.
    #[serde(default = "default_source")]
    pub source_column: String,
    #[serde(default = "default_target")]
    pub target_column: String,
    pub max_target_length: Option<usize>,
    /// QUESTION_ANS: the answer text, and optionally its character offset in the context (else
    /// its first occurrence).
    #[serde(default = "default_question")]
    pub question_column: String,
    #[serde(default = "default_context")]
    pub context_column: String,
    #[serde(default = "default_answer")]
    pub answer_column: String,
    pub answer_start_column: Option<String>,
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// `right` (default) or `left`.
    #[serde(default)]
    pub padding_side: super::data::PaddingSide,
    /// A column of task ids (integers), passed to the model as PEFT's `task_ids` (multitask
    /// prompt tuning).
    pub task_id_column: Option<String>,
}

fn default_text() -> String {
    "text".into()
}
fn default_label() -> String {
    "label".into()
}
fn default_tokens() -> String {
    "tokens".into()
}
fn default_tags() -> String {
    "ner_tags".into()
}
fn default_completion() -> String {
    "completion".into()
}
fn default_source() -> String {
    "source".into()
}
fn default_target() -> String {
    "target".into()
}
fn default_question() -> String {
    "question".into()
}
fn default_context() -> String {
    "context".into()
}
fn default_answer() -> String {
    "answer".into()
}
fn default_max_length() -> usize {
    128
}
fn default_validation_split() -> f64 {
    0.1
}

/// When to evaluate or save: transformers' `IntervalStrategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interval {
    No,
    Steps,
    Epoch,
}

/// transformers' TrainingArguments, the subset the trainer implements, with its defaults.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingArguments {
    pub output_dir: PathBuf,
    pub learning_rate: f64,
    pub num_train_epochs: f64,
    /// Stops after this many optimizer steps when positive (overrides epochs).
    pub max_steps: i64,
    pub per_device_train_batch_size: usize,
    pub per_device_eval_batch_size: usize,
    /// Micro-batches summed into one optimizer step.
    pub gradient_accumulation_steps: usize,
    pub warmup_ratio: f64,
    pub warmup_steps: usize,
    pub lr_scheduler_type: SchedulerType,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    pub logging_steps: usize,
    pub eval_strategy: Interval,
    /// Default: `logging_steps`, as transformers.
    pub eval_steps: Option<usize>,
    pub save_strategy: Interval,
    pub save_steps: usize,
    /// Keeps at most this many checkpoints (the best one is never deleted).
    pub save_total_limit: Option<usize>,
    pub load_best_model_at_end: bool,
    /// `loss` or a metric name (`accuracy`, `f1`, `perplexity`, `exact_match`, ...), with or
    /// without the `eval_` prefix. Default: `loss`.
    pub metric_for_best_model: Option<String>,
    /// Default: false for loss and perplexity, true otherwise.
    pub greater_is_better: Option<bool>,
    /// bf16 mixed precision with fp32 master weights and optimizer moments. On the CPU it runs
    /// as `torch.autocast(dtype=torch.bfloat16)` does: frozen linear weights stored and
    /// multiplied in bf16 (f32 accumulation), everything else f32; on a GPU the frozen base is
    /// cast to bf16 whole.
    pub bf16: bool,
    /// Recompute each block in backward instead of keeping its activations: activation memory
    /// flat in depth for about a third more compute (transformers' name).
    pub gradient_checkpointing: bool,
    /// A `checkpoint-N` directory, or `true`-like `"last"` for the newest in `output_dir`.
    pub resume_from_checkpoint: Option<String>,
    /// Batch examples of similar length together (transformers' LengthGroupedSampler), which cuts
    /// padding and so time when lengths vary.
    pub group_by_length: bool,
    /// Polynomial schedule: the final learning rate and the power (transformers' defaults 1e-7, 1).
    pub lr_end: f64,
    pub power: f64,
}

impl Default for TrainingArguments {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from("output"),
            learning_rate: 5e-5,
            num_train_epochs: 3.0,
            max_steps: -1,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            gradient_checkpointing: false,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            lr_scheduler_type: SchedulerType::Linear,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            logging_steps: 500,
            eval_strategy: Interval::No,
            eval_steps: None,
            save_strategy: Interval::Steps,
            save_steps: 500,
            save_total_limit: None,
            load_best_model_at_end: false,
            metric_for_best_model: None,
            greater_is_better: None,
            bf16: false,
            resume_from_checkpoint: None,
            group_by_length: false,
            lr_end: 1e-7,
            power: 1.0,
        }
    }
}

impl TrainingArguments {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("[training] {m}")));
        if self.per_device_train_batch_size == 0 || self.per_device_eval_batch_size == 0 {
            return bad("batch sizes must be positive".into());
        }
        if self.gradient_accumulation_steps == 0 {
            return bad("gradient_accumulation_steps must be at least 1".into());
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return bad(format!(
                "learning_rate must be positive, got {}",
                self.learning_rate
            ));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return bad(format!(
                "warmup_ratio must be in [0, 1], got {}",
                self.warmup_ratio
            ));
        }
        if self.max_steps <= 0 && self.num_train_epochs <= 0.0 {
            return bad("set num_train_epochs > 0 or max_steps > 0".into());
        }
        if self.eval_strategy == Interval::Steps && self.eval_steps() == 0 {
            return bad("eval_strategy = \"steps\" needs eval_steps > 0".into());
        }
        if self.save_strategy == Interval::Steps && self.save_steps == 0 {
            return bad("save_strategy = \"steps\" needs save_steps > 0".into());
        }
        if self.load_best_model_at_end {
            if self.eval_strategy == Interval::No {
                return bad(
                    "load_best_model_at_end needs an eval_strategy other than \"no\"".into(),
                );
            }
            if self.save_strategy != self.eval_strategy
                || (self.save_strategy == Interval::Steps
                    && !self.save_steps.is_multiple_of(self.eval_steps()))
            {
                return bad(
                    "load_best_model_at_end needs save_strategy equal to eval_strategy (and \
                     save_steps a multiple of eval_steps), so that every saved checkpoint has \
                     been evaluated"
                        .into(),
                );
            }
        }
        Ok(())
    }

    pub fn eval_steps(&self) -> usize {
        self.eval_steps.unwrap_or(self.logging_steps)
    }

    /// The metric that picks the best checkpoint, without the `eval_` prefix.
    pub fn best_metric(&self) -> String {
        let m = self.metric_for_best_model.as_deref().unwrap_or("loss");
        m.strip_prefix("eval_").unwrap_or(m).to_string()
    }

    pub fn greater_is_better(&self) -> bool {
        self.greater_is_better
            .unwrap_or_else(|| !matches!(self.best_metric().as_str(), "loss" | "perplexity"))
    }
}

impl TrainConfig {
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        Self::from_toml_file_with(path, &[])
    }

    /// Reads the file, applies `overrides` (`table.key=value`, the value in TOML syntax or a bare
    /// string), then checks everything.
    pub fn from_toml_file_with(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str_with(&text, overrides).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    pub fn from_toml_str(text: &str) -> Result<Self> {
        Self::from_toml_str_with(text, &[])
    }

    pub fn from_toml_str_with(text: &str, overrides: &[String]) -> Result<Self> {
        let mut value: toml::Table =
            toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        for k in value.keys() {
            check_table(k)?;
        }
        let table = |name: &str| -> Result<toml::Value> {
            value
                .get(name)
                .cloned()
                .ok_or_else(|| Error::Config(format!("missing table `[{name}]`")))
        };
        let model: ModelSection = table("model")?
            .try_into()
            .map_err(|e| section_error("model", e))?;
        if let Some(q) = &model.quantization {
            q.scheme().map_err(|e| match e {
                Error::Config(m) => Error::Config(format!("[model] quantization: {m}")),
                other => other,
            })?;
        }
        let data: DataSection = table("data")?
            .try_into()
            .map_err(|e| section_error("data", e))?;
        let training: TrainingArguments = match value.get("training") {
            Some(t) => t
                .clone()
                .try_into()
                .map_err(|e| section_error("training", e))?,
            None => TrainingArguments::default(),
        };
        training.validate()?;
        let peft_json =
            serde_json::to_value(table("peft")?).map_err(|e| Error::Config(e.to_string()))?;
        let peft = PeftConfig::from_user_json(&peft_json).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("[peft] {m}")),
            other => other,
        })?;
        Ok(Self {
            model,
            peft,
            data,
            training,
        })
    }
}

const TABLES: [&str; 4] = ["model", "peft", "data", "training"];

fn check_table(k: &str) -> Result<()> {
    if TABLES.contains(&k) {
        return Ok(());
    }
    let near = crate::tuners::nearest(k, &TABLES.map(String::from));
    Err(Error::Config(format!(
        "unknown table `[{k}]`{near}; the tables are [model], [peft], [data], [training]"
    )))
}

/// serde names an unknown field and lists the valid ones; add the nearest as a suggestion.
pub(crate) fn section_error(name: &str, e: toml::de::Error) -> Error {
    let msg = e.message().to_string();
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some((field, tail)) = rest.split_once('`') {
            let known: Vec<String> = tail
                .split('`')
                .skip(1)
                .step_by(2)
                .map(String::from)
                .collect();
            let near = crate::tuners::nearest(field, &known);
            return Error::Config(format!(
                "[{name}] unknown key `{field}`{near}; valid keys: {}",
                known.join(", ")
            ));
        }
    }
    Error::Config(format!("[{name}] {msg}"))
}

/// `training.learning_rate=1e-4`: sets one key of one table. The value is read as TOML
/// (numbers, booleans, quoted strings, arrays), and as a plain string when it is not valid TOML.
fn apply_override(doc: &mut toml::Table, spec: &str) -> Result<()> {
    apply_override_in(doc, spec, &TABLES)
}

/// [`apply_override`] for a config whose tables are `tables`.
pub(crate) fn apply_override_in(doc: &mut toml::Table, spec: &str, tables: &[&str]) -> Result<()> {
    let (path, raw) = spec.split_once('=').ok_or_else(|| {
        Error::Config(format!(
            "--set `{spec}`: expected table.key=value, e.g. training.learning_rate=1e-4"
        ))
    })?;
    let (table, key) = path.trim().split_once('.').ok_or_else(|| {
        Error::Config(format!(
            "--set `{spec}`: the key must name its table, e.g. training.{}",
            path.trim()
        ))
    })?;
    if !tables.contains(&table) {
        let near = crate::tuners::nearest(
            table,
            &tables.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
        );
        return Err(Error::Config(format!(
            "--set `{spec}`: unknown table `{table}`{near}; the tables are {}",
            tables
                .iter()
                .map(|t| format!("[{t}]"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let raw = raw.trim();
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let entry = doc
        .entry(table.to_string())
        .or_insert_with(|| toml::Value::Table(Default::default()));
    match entry {
        toml::Value::Table(t) => {
            t.insert(key.to_string(), value);
            Ok(())
        }
        _ => Err(Error::Config(format!("`{table}` is not a table"))),
    }
}
