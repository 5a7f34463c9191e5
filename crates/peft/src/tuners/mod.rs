//! Tuners: one module per PEFT method, each with its config and layer math, plus what they share.

pub mod adalora;
pub mod common;
pub mod ia3;
pub mod loha;
pub mod lokr;
pub mod lora;
pub mod lycoris;
pub mod targets;
pub mod vera;

use candle_core::Var;
use serde_json::Value;

use crate::error::config_err;
use crate::models::{Model, TaskType};
use crate::Result;
use adalora::AdaLoraConfig;
use common::BaseFields;
use ia3::Ia3Config;
use loha::LohaConfig;
use lokr::LokrConfig;
use lora::{Bias, LoraConfig};
use vera::VeraConfig;

/// A PEFT method's configuration, tagged by `peft_type` as in `adapter_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub enum PeftConfig {
    Lora(LoraConfig),
    Loha(LohaConfig),
    Lokr(LokrConfig),
    Ia3(Ia3Config),
    Vera(VeraConfig),
    AdaLora(AdaLoraConfig),
}

const SUPPORTED: &str = "LORA, ADALORA, LOHA, LOKR, IA3, VERA";

/// What attaching an adapter produced: the adapted module names, and tensors the adapter owns at
/// model level (VeRA's shared projections), under their file keys; those are saved and loaded
/// with the adapter but never trained.
pub struct Injected {
    pub modules: Vec<String>,
    pub shared: Vec<(String, Var)>,
}

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
            "LOHA" => Ok(PeftConfig::Loha(LohaConfig::from_json(v, strict)?)),
            "LOKR" => Ok(PeftConfig::Lokr(LokrConfig::from_json(v, strict)?)),
            "IA3" => Ok(PeftConfig::Ia3(Ia3Config::from_json(v, strict)?)),
            "VERA" => Ok(PeftConfig::Vera(VeraConfig::from_json(v, strict)?)),
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
            PeftConfig::Loha(c) => c.to_adapter_json(),
            PeftConfig::Lokr(c) => c.to_adapter_json(),
            PeftConfig::Ia3(c) => c.to_adapter_json(),
            PeftConfig::Vera(c) => c.to_adapter_json(),
            PeftConfig::AdaLora(c) => c.to_adapter_json(),
        }
    }

    pub fn peft_type(&self) -> &'static str {
        match self {
            PeftConfig::Lora(_) => "LORA",
            PeftConfig::Loha(_) => "LOHA",
            PeftConfig::Lokr(_) => "LOKR",
            PeftConfig::Ia3(_) => "IA3",
            PeftConfig::Vera(_) => "VERA",
            PeftConfig::AdaLora(_) => "ADALORA",
        }
    }

    /// The base `PeftConfig` fields of the methods that keep them in [`BaseFields`].
    fn base(&self) -> Option<&BaseFields> {
        match self {
            PeftConfig::Lora(_) | PeftConfig::AdaLora(_) => None,
            PeftConfig::Loha(c) => Some(&c.common.base),
            PeftConfig::Lokr(c) => Some(&c.common.base),
            PeftConfig::Ia3(c) => Some(&c.base),
            PeftConfig::Vera(c) => Some(&c.base),
        }
    }

    fn base_mut(&mut self) -> Option<&mut BaseFields> {
        match self {
            PeftConfig::Lora(_) | PeftConfig::AdaLora(_) => None,
            PeftConfig::Loha(c) => Some(&mut c.common.base),
            PeftConfig::Lokr(c) => Some(&mut c.common.base),
            PeftConfig::Ia3(c) => Some(&mut c.base),
            PeftConfig::Vera(c) => Some(&mut c.base),
        }
    }

    pub fn task_type(&self) -> Option<TaskType> {
        match self {
            PeftConfig::Lora(c) => c.task_type,
            PeftConfig::AdaLora(c) => c.task_type,
            other => other.base().and_then(|b| b.task_type),
        }
    }

    pub fn set_task_type(&mut self, task: TaskType) {
        match self {
            PeftConfig::Lora(c) => c.task_type = Some(task),
            PeftConfig::AdaLora(c) => c.task_type = Some(task),
            other => {
                if let Some(b) = other.base_mut() {
                    b.task_type = Some(task)
                }
            }
        }
    }

    pub fn modules_to_save(&self) -> Option<&Vec<String>> {
        match self {
            PeftConfig::Lora(c) => c.modules_to_save.as_ref(),
            PeftConfig::AdaLora(c) => c.modules_to_save.as_ref(),
            other => other.base().and_then(|b| b.modules_to_save.as_ref()),
        }
    }

    pub fn set_modules_to_save(&mut self, m: Option<Vec<String>>) {
        match self {
            PeftConfig::Lora(c) => c.modules_to_save = m,
            PeftConfig::AdaLora(c) => c.modules_to_save = m,
            other => {
                if let Some(b) = other.base_mut() {
                    b.modules_to_save = m
                }
            }
        }
    }

    pub fn set_base_model_name_or_path(&mut self, p: Option<String>) {
        match self {
            PeftConfig::Lora(c) => c.base_model_name_or_path = p,
            PeftConfig::AdaLora(c) => c.base_model_name_or_path = p,
            other => {
                if let Some(b) = other.base_mut() {
                    b.base_model_name_or_path = p
                }
            }
        }
    }

    pub fn base_model_name_or_path(&self) -> Option<&str> {
        match self {
            PeftConfig::Lora(c) => c.base_model_name_or_path.as_deref(),
            PeftConfig::AdaLora(c) => c.base_model_name_or_path.as_deref(),
            other => other
                .base()
                .and_then(|b| b.base_model_name_or_path.as_deref()),
        }
    }

    /// PEFT's `_check_new_adapter_config`: what a new adapter must agree on with the adapters
    /// already on the model. Biases are base weights, so only the first adapter may train them;
    /// VeRA adapters share one pair of projections, so they must draw them from the same key.
    pub fn check_new_adapter(&self, existing: &[&PeftConfig]) -> Result<()> {
        if !existing.is_empty() && self.bias() != Bias::None {
            return Err(config_err!(
                "only the first adapter on a model may train base biases (bias = \"{}\" here, \
                 and the model already has an adapter); set bias = \"none\" on this one, as \
                 PEFT requires",
                match self.bias() {
                    Bias::All => "all",
                    _ => "lora_only",
                }
            ));
        }
        if let PeftConfig::Vera(new) = self {
            for old in existing {
                if let PeftConfig::Vera(old) = old {
                    vera::check_shared_projections(old, new)?;
                }
            }
        }
        Ok(())
    }

    /// Which base biases are trained and saved with the adapter (LoRA's and VeRA's `bias`).
    pub fn bias(&self) -> Bias {
        match self {
            PeftConfig::Lora(c) => c.bias,
            PeftConfig::AdaLora(c) => c.bias,
            PeftConfig::Vera(c) => c.bias.into(),
            PeftConfig::Loha(_) | PeftConfig::Lokr(_) | PeftConfig::Ia3(_) => Bias::None,
        }
    }

    /// Attaches an adapter of this method, named `name`, to `model`. The config is completed in
    /// place the way PEFT completes it before saving (resolved targets, corrected
    /// `fan_in_fan_out`). `seed` draws the random initial weights.
    pub fn inject(
        &mut self,
        model: &mut dyn Model,
        name: &str,
        modules_to_save: &[String],
        seed: u64,
    ) -> Result<Injected> {
        let plain = |modules| Injected {
            modules,
            shared: Vec::new(),
        };
        Ok(match self {
            PeftConfig::Lora(c) => plain(lora::inject(model, name, c, modules_to_save, seed)?),
            PeftConfig::AdaLora(c) => {
                plain(adalora::inject(model, name, c, modules_to_save, seed)?)
            }
            PeftConfig::Loha(c) => plain(loha::inject(model, name, c, modules_to_save, seed)?),
            PeftConfig::Lokr(c) => plain(lokr::inject(model, name, c, modules_to_save, seed)?),
            PeftConfig::Ia3(c) => plain(ia3::inject(model, name, c, modules_to_save, seed)?),
            PeftConfig::Vera(c) => vera::inject(model, name, c, modules_to_save, seed)?,
        })
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

impl From<LohaConfig> for PeftConfig {
    fn from(c: LohaConfig) -> Self {
        PeftConfig::Loha(c)
    }
}

impl From<LokrConfig> for PeftConfig {
    fn from(c: LokrConfig) -> Self {
        PeftConfig::Lokr(c)
    }
}

impl From<Ia3Config> for PeftConfig {
    fn from(c: Ia3Config) -> Self {
        PeftConfig::Ia3(c)
    }
}

impl From<VeraConfig> for PeftConfig {
    fn from(c: VeraConfig) -> Self {
        PeftConfig::Vera(c)
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
