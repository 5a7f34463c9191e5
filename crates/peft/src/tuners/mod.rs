//! Tuners: one folder per PEFT method, each with its config, its layer math and its glue to a
//! model, all behind the interface in [`tuner`]; what they share lives in [`config`], [`inject`]
//! and [`targets`].
//!
//! Adding a method is a new folder implementing [`TunerConfig`] (and, for what lives in layers,
//! the layer traits of [`crate::layers`]) plus one line in [`METHODS`].

pub mod adalora;
pub mod bottleneck;
pub mod config;
pub mod cpt;
pub mod fusion;
pub mod ia3;
pub mod inject;
pub mod loha;
pub mod lokr;
pub mod lora;
pub mod lycoris;
pub mod multitask_prompt_tuning;
pub mod p_tuning;
pub mod prefix_tuning;
pub mod prompt_learning;
pub mod prompt_tuning;
pub mod targets;
pub mod tuner;
pub mod vera;

use serde_json::Value;
use std::fmt;

use crate::error::config_err;
use crate::models::TaskType;
use crate::Result;
pub use config::{nearest, BaseFields, Bias, ConfigFields};
pub use tuner::{
    AdapterHost, Existing, InjectContext, Injected, InputTransform, MethodKind, ModelTensor,
    OutputHead, Prepared, Tuner, TunerConfig,
};

/// A registered method: how to read its config from JSON.
pub struct Method {
    pub peft_type: &'static str,
    /// `strict`: a hand-written config, where every key must be known.
    pub parse: fn(&Value, bool) -> Result<PeftConfig>,
}

impl Method {
    pub const fn of<T: ConfigFields + TunerConfig + Clone + PartialEq>() -> Self {
        Self {
            peft_type: T::PEFT_TYPE,
            parse: parse_as::<T>,
        }
    }
}

fn parse_as<T: ConfigFields + TunerConfig + Clone + PartialEq>(
    v: &Value,
    strict: bool,
) -> Result<PeftConfig> {
    Ok(PeftConfig::new(config::parse_config::<T>(v, strict)?))
}

/// Every method this crate implements, by `peft_type`.
pub const METHODS: &[Method] = &[
    Method::of::<lora::LoraConfig>(),
    Method::of::<adalora::AdaLoraConfig>(),
    Method::of::<loha::LohaConfig>(),
    Method::of::<lokr::LokrConfig>(),
    Method::of::<ia3::Ia3Config>(),
    Method::of::<vera::VeraConfig>(),
    Method {
        peft_type: "BOTTLENECK",
        parse: bottleneck::parse,
    },
    Method {
        peft_type: "ADAPTER_FUSION",
        parse: fusion::parse,
    },
    Method::of::<prompt_tuning::PromptTuningConfig>(),
    Method::of::<p_tuning::PromptEncoderConfig>(),
    Method::of::<prefix_tuning::PrefixTuningConfig>(),
    Method::of::<multitask_prompt_tuning::MultitaskPromptTuningConfig>(),
    Method::of::<cpt::CptConfig>(),
];

/// An adapter directory layout besides PEFT's that `PeftModel::load_adapter` reads as it is.
pub struct AdapterFormat {
    pub name: &'static str,
    /// Whether a directory is in this layout (and not PEFT's).
    pub detect: fn(&std::path::Path) -> bool,
    /// The adapter's config and its tensors under the keys `adapter_state_dict` uses, for the
    /// given model and adapter name.
    #[allow(clippy::type_complexity)]
    pub read: fn(
        &std::path::Path,
        &dyn crate::models::Model,
        &str,
    ) -> Result<(
        PeftConfig,
        std::collections::HashMap<String, candle_core::Tensor>,
    )>,
    /// The head the base model needs under such an adapter (what the layout records).
    pub task: fn(&std::path::Path) -> Result<Option<TaskType>>,
    /// [`AdapterFormat::read`] from the base model's config.json alone, before any model is
    /// loaded (what a server reads to register an adapter), where the layout allows it.
    #[allow(clippy::type_complexity)]
    pub read_for_config: Option<
        fn(
            &std::path::Path,
            &Value,
            &candle_core::Device,
        ) -> Result<(
            PeftConfig,
            std::collections::HashMap<String, candle_core::Tensor>,
        )>,
    >,
}

/// The foreign adapter layouts: AdapterHub's (bottleneck adapters, fusions, heads) and
/// llama.cpp's GGUF LoRA files.
pub const FORMATS: &[AdapterFormat] = &[
    AdapterFormat {
        name: "AdapterHub",
        detect: crate::io::adapterhub::is_adapterhub_dir,
        read: bottleneck::hub::read_dir,
        task: bottleneck::hub::base_task,
        read_for_config: None,
    },
    AdapterFormat {
        name: "GGUF LoRA",
        detect: lora::gguf::is_gguf_adapter,
        read: lora::gguf::read_for_model,
        task: lora::gguf::base_task,
        read_for_config: Some(lora::gguf::read_for_config),
    },
];

/// The foreign layout `dir` is in, if any.
pub fn foreign_format(dir: &std::path::Path) -> Option<&'static AdapterFormat> {
    FORMATS.iter().find(|f| (f.detect)(dir))
}

/// A PEFT method's configuration, whichever the method: what `adapter_config.json` holds.
pub struct PeftConfig(Box<dyn TunerConfig>);

impl PeftConfig {
    pub fn new(config: impl TunerConfig) -> Self {
        Self(Box::new(config))
    }

    fn dispatch(v: &Value, strict: bool) -> Result<Self> {
        let supported = || {
            METHODS
                .iter()
                .map(|m| m.peft_type)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let peft_type = v
            .get("peft_type")
            .and_then(|p| p.as_str())
            .ok_or_else(|| config_err!("missing `peft_type` (supported: {})", supported()))?;
        let method = METHODS
            .iter()
            .find(|m| m.peft_type == peft_type)
            .ok_or_else(|| {
                config_err!(
                    "unknown peft_type `{peft_type}`; supported: {}",
                    supported()
                )
            })?;
        (method.parse)(v, strict)
    }

    /// From `adapter_config.json`: tolerant of fields added by newer PEFT versions.
    pub fn from_adapter_json(v: &Value) -> Result<Self> {
        Self::dispatch(v, false)
    }

    /// From a hand-written config (`[peft]` in a TOML file): every key must be known.
    pub fn from_user_json(v: &Value) -> Result<Self> {
        Self::dispatch(v, true)
    }

    /// The method's own config type, if it is `T`.
    pub fn downcast_ref<T: TunerConfig>(&self) -> Option<&T> {
        (self.0.as_ref() as &dyn std::any::Any).downcast_ref()
    }

    pub fn downcast_mut<T: TunerConfig>(&mut self) -> Option<&mut T> {
        (self.0.as_mut() as &mut dyn std::any::Any).downcast_mut()
    }

    pub fn as_dyn(&self) -> &dyn TunerConfig {
        self.0.as_ref()
    }

    pub fn as_dyn_mut(&mut self) -> &mut dyn TunerConfig {
        self.0.as_mut()
    }

    pub fn to_adapter_json(&self) -> Value {
        self.0.to_adapter_json()
    }

    pub fn peft_type(&self) -> &'static str {
        self.0.peft_type()
    }

    pub fn kind(&self) -> MethodKind {
        self.0.kind()
    }

    pub fn task_type(&self) -> Option<TaskType> {
        self.0.base().task_type
    }

    pub fn set_task_type(&mut self, task: TaskType) {
        self.0.base_mut().task_type = Some(task);
    }

    pub fn modules_to_save(&self) -> Option<&Vec<String>> {
        self.0.base().modules_to_save.as_ref()
    }

    pub fn set_modules_to_save(&mut self, m: Option<Vec<String>>) {
        self.0.base_mut().modules_to_save = m;
    }

    pub fn base_model_name_or_path(&self) -> Option<&str> {
        self.0.base().base_model_name_or_path.as_deref()
    }

    pub fn set_base_model_name_or_path(&mut self, p: Option<String>) {
        self.0.base_mut().base_model_name_or_path = p;
    }

    /// Which base biases are trained and saved with the adapter.
    pub fn bias(&self) -> Bias {
        self.0.bias()
    }

    /// Whether the adapter brings its own prediction head (the base model runs as
    /// FEATURE_EXTRACTION).
    pub fn brings_head(&self) -> bool {
        self.0.brings_head()
    }
}

impl<T: TunerConfig> From<T> for PeftConfig {
    fn from(c: T) -> Self {
        PeftConfig(Box::new(c))
    }
}

impl Clone for PeftConfig {
    fn clone(&self) -> Self {
        PeftConfig(self.0.clone_config())
    }
}

impl PartialEq for PeftConfig {
    fn eq(&self, other: &Self) -> bool {
        self.0.eq_config(other.0.as_ref())
    }
}

impl fmt::Debug for PeftConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
