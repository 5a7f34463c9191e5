//! Parameter-efficient fine-tuning of transformer models, compatible with Hugging Face PEFT.
//!
//! The vocabulary is PEFT's: build a [`tuners::lora::LoraConfig`], wrap a loaded model with
//! [`get_peft_model`], train, [`PeftModel::save_pretrained`]; later
//! [`PeftModel::from_pretrained`] or [`PeftModel::merge_and_unload`]. Adapters are written in PEFT's
//! layout and load in Python PEFT unchanged, and the reverse.

pub mod error;
pub mod generation;
pub mod grad;
pub mod io;
pub mod layers;
pub mod models;
pub mod ops;
pub mod peft_model;
pub mod train;
pub mod tuners;

pub use error::{Error, Result};
pub use generation::{generate, Generated, GenerationConfig, SamplingConfig};
pub use grad::no_grad;
pub use models::{Inputs, LoadOptions, Model, TaskType};
pub use peft_model::{
    get_peft_model, get_peft_model_with_seed, load_auto, load_with_adapter, FromPretrained,
    PeftModel,
};
pub use tuners::adalora::AdaLoraConfig;
pub use tuners::ia3::Ia3Config;
pub use tuners::loha::LohaConfig;
pub use tuners::lokr::LokrConfig;
pub use tuners::lora::weighted::{CombinationType, WeightedOptions};
pub use tuners::lora::{LoraConfig, LoraModelExt};
pub use tuners::targets::ModuleSpec;
pub use tuners::vera::VeraConfig;
pub use tuners::{Bias, PeftConfig, TunerConfig};
