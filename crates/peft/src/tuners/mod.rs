//! Tuners: one module per PEFT method, each with its config and layer math, plus what they share.

pub mod adalora;
pub mod lora;
pub mod targets;

use serde_json::Value;

use crate::error::config_err;
use crate::models::TaskType;
use crate::Result;
use adalora::AdaLoraConfig;
use lora::{Bias, LoraConfig};

/// A PEFT method's configuration, tagged by `peft_type` as in `adapter_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub enum PeftConfig {
    Lora(LoraConfig),
    AdaLora(AdaLoraConfig),
}

const SUPPORTED: &str = "LORA, ADALORA";

impl PeftConfig {
    fn dispatch(v: &Value, strict: bool) -> Result<Self> {
        let peft_type = v
            .get("peft_type")
            .and_then(|p| p.as_str())
            .ok_or_else(|| config_err!("missing `peft_type` (supported: {SUPPORTED})"))?;
        match peft_type {
            "LORA" => Ok(PeftConfig::Lora(if strict {
                LoraConfig::from_json_strict(v)?
            } else {
                LoraConfig::from_adapter_json(v)?
            })),
            "ADALORA" => Ok(PeftConfig::AdaLora(if strict {
                AdaLoraConfig::from_json_strict(v)?
            } else {
                AdaLoraConfig::from_adapter_json(v)?
            })),
            other => Err(config_err!(
                "unknown peft_type `{other}`; supported: {SUPPORTED}"
            )),
        }
    }

    /// From `adapter_config.json`: tolerant of fields added by newer PEFT versions.
    pub fn from_adapter_json(v: &Value) -> Result<Self> {
        Self::dispatch(v, false)
    }

    /// From a hand-written config (`[peft]` in a TOML file): every key must be known.
    pub fn from_user_json(v: &Value) -> Result<Self> {
        Self::dispatch(v, true)
    }

    pub fn to_adapter_json(&self) -> Value {
        match self {
            PeftConfig::Lora(c) => c.to_adapter_json(),
            PeftConfig::AdaLora(c) => c.to_adapter_json(),
        }
    }

    pub fn peft_type(&self) -> &'static str {
        match self {
            PeftConfig::Lora(_) => "LORA",
            PeftConfig::AdaLora(_) => "ADALORA",
        }
    }

    pub fn task_type(&self) -> Option<TaskType> {
        match self {
            PeftConfig::Lora(c) => c.task_type,
            PeftConfig::AdaLora(c) => c.task_type,
        }
    }

    pub fn set_task_type(&mut self, task: TaskType) {
        match self {
            PeftConfig::Lora(c) => c.task_type = Some(task),
            PeftConfig::AdaLora(c) => c.task_type = Some(task),
        }
    }

    pub fn modules_to_save(&self) -> Option<&Vec<String>> {
        match self {
            PeftConfig::Lora(c) => c.modules_to_save.as_ref(),
            PeftConfig::AdaLora(c) => c.modules_to_save.as_ref(),
        }
    }

    pub fn set_modules_to_save(&mut self, m: Option<Vec<String>>) {
        match self {
            PeftConfig::Lora(c) => c.modules_to_save = m,
            PeftConfig::AdaLora(c) => c.modules_to_save = m,
        }
    }

    pub fn set_base_model_name_or_path(&mut self, p: Option<String>) {
        match self {
            PeftConfig::Lora(c) => c.base_model_name_or_path = p,
            PeftConfig::AdaLora(c) => c.base_model_name_or_path = p,
        }
    }

    pub fn base_model_name_or_path(&self) -> Option<&str> {
        match self {
            PeftConfig::Lora(c) => c.base_model_name_or_path.as_deref(),
            PeftConfig::AdaLora(c) => c.base_model_name_or_path.as_deref(),
        }
    }
}

impl PeftConfig {
    /// `bias`: which base biases are trained and saved with the adapter.
    pub fn bias(&self) -> Bias {
        match self {
            PeftConfig::Lora(c) => c.bias,
            PeftConfig::AdaLora(c) => c.bias,
        }
    }
}

impl From<AdaLoraConfig> for PeftConfig {
    fn from(c: AdaLoraConfig) -> Self {
        PeftConfig::AdaLora(c)
    }
}

impl From<LoraConfig> for PeftConfig {
    fn from(c: LoraConfig) -> Self {
        PeftConfig::Lora(c)
    }
}

/// " (did you mean `x`?)" for the known name closest to `key`, or "" when nothing is close.
pub fn nearest(key: &str, known: &[String]) -> String {
    let best = known.iter().map(|k| (edit_distance(key, k), k)).min();
    match best {
        Some((d, k)) if d <= 3.max(key.len() / 3) => format!(" (did you mean `{k}`?)"),
        _ => String::new(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}
