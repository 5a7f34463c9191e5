//! The `peft train` config file: four tables with Hugging Face names — `[model]`, `[peft]` (the
//! adapter_config.json fields), `[data]`, `[training]` (TrainingArguments).

use serde::Deserialize;
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub train_file: PathBuf,
    pub eval_file: Option<PathBuf>,
    #[serde(default = "default_text")]
    pub text_column: String,
    pub text_pair_column: Option<String>,
    #[serde(default = "default_label")]
    pub label_column: String,
    #[serde(default = "default_max_length")]
    pub max_length: usize,
}

fn default_text() -> String {
    "text".into()
}
fn default_label() -> String {
    "label".into()
}
fn default_max_length() -> usize {
    128
}

/// transformers' TrainingArguments, the subset the trainer implements, with its defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingArguments {
    pub output_dir: PathBuf,
    pub learning_rate: f64,
    pub num_train_epochs: f64,
    /// Stops after this many optimizer steps when positive (overrides epochs).
    pub max_steps: i64,
    pub per_device_train_batch_size: usize,
    pub per_device_eval_batch_size: usize,
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
    /// Batch examples of similar length together (transformers' LengthGroupedSampler), which cuts
    /// padding and so time when lengths vary.
    pub group_by_length: bool,
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
            group_by_length: false,
        }
    }
}

impl TrainingArguments {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("[training] {m}")));
        if self.per_device_train_batch_size == 0 || self.per_device_eval_batch_size == 0 {
            return bad("batch sizes must be positive".into());
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
        Ok(())
    }
}

impl TrainConfig {
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&text).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    pub fn from_toml_str(text: &str) -> Result<Self> {
        let value: toml::Table = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        const TABLES: [&str; 4] = ["model", "peft", "data", "training"];
        for k in value.keys() {
            if !TABLES.contains(&k.as_str()) {
                let near = crate::tuners::nearest(k, &TABLES.map(String::from));
                return Err(Error::Config(format!("unknown table `[{k}]`{near}; the tables are [model], [peft], [data], [training]")));
            }
        }
        let table = |name: &str| -> Result<toml::Value> {
            value
                .get(name)
                .cloned()
                .ok_or_else(|| Error::Config(format!("missing table `[{name}]`")))
        };
        let section =
            |name: &str, e: toml::de::Error| Error::Config(format!("[{name}] {}", e.message()));
        let model: ModelSection = table("model")?
            .try_into()
            .map_err(|e| section("model", e))?;
        let data: DataSection = table("data")?.try_into().map_err(|e| section("data", e))?;
        let training: TrainingArguments = match value.get("training") {
            Some(t) => t.clone().try_into().map_err(|e| section("training", e))?,
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
