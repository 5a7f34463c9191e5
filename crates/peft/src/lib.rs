//! Parameter-efficient fine-tuning of transformer models, compatible with Hugging Face PEFT.
//!
//! The vocabulary is PEFT's: build a config ([`LoraConfig`], [`Ia3Config`], ...), wrap a model
//! from [`load_model`] with [`get_peft_model`], train, [`PeftModel::save_pretrained`]; later
//! [`PeftModel::from_pretrained`] or [`PeftModel::merge_and_unload`]. Adapters are written in
//! PEFT's layout and load in Python PEFT unchanged, and the reverse. Everything a user needs is
//! re-exported here; the modules hold the rest (`tuners` for each method, `layers` for the
//! adapter-aware building blocks, `models` for the architectures).

pub mod diffusion;
pub mod error;
pub mod generation;
pub mod grad;
pub mod io;
pub mod layers;
pub mod models;
pub mod ops;
pub mod peft_model;
pub mod quant;
pub mod threads;
pub mod train;
pub mod tuners;

/// The tensor library, so that users need not match its version.
pub use candle_core as candle;
pub use diffusion::StableDiffusion;
pub use error::{Error, Result};
pub use generation::{generate, generate_stream, Generated, GenerationConfig, SamplingConfig};
pub use grad::no_grad;
pub use models::kbit::prepare_model_for_kbit_training;
pub use models::{load as load_model, Inputs, LoadOptions, Model, TaskType};
pub use peft_model::{
    get_peft_model, get_peft_model_with_seed, load_auto, load_with_adapter, FromPretrained,
    PeftModel,
};
pub use train::optim::{AdamW, AdamWParams};
pub use train::{causal_lm_loss, classification_loss};
pub use tuners::adalora::AdaLoraConfig;
pub use tuners::bottleneck::hub::AdapterHubExt;
pub use tuners::bottleneck::{BottleneckConfig, HeadConfig};
pub use tuners::cpt::CptConfig;
pub use tuners::fusion::FusionConfig;
pub use tuners::ia3::Ia3Config;
pub use tuners::loha::LohaConfig;
pub use tuners::lokr::LokrConfig;
pub use tuners::lora::weighted::{CombinationType, WeightedOptions};
pub use tuners::lora::{LoraConfig, LoraModelExt};
pub use tuners::multitask_prompt_tuning::MultitaskPromptTuningConfig;
pub use tuners::p_tuning::PromptEncoderConfig;
pub use tuners::prefix_tuning::PrefixTuningConfig;
pub use tuners::prompt_tuning::PromptTuningConfig;
pub use tuners::targets::ModuleSpec;
pub use tuners::vera::VeraConfig;
pub use tuners::{Bias, PeftConfig, TunerConfig};
