//! Training: transformers' `Trainer` and `TrainingArguments` for adapters.
//!
//! - [`config`]: the TOML config (`[model]`, `[peft]`, `[data]`, `[training]`) and `--set` overrides.
//! - [`data`]: JSONL / CSV / Parquet rows → per-task examples → padded batches.
//! - [`trainer`]: the loop (accumulation, clipping, schedule, logging, evaluation, checkpoints);
//!   [`callback`]: the events it reports to whoever shows progress (the library prints nothing).
//! - [`optim`], [`schedule`]: AdamW and the learning-rate schedules, as torch / transformers.
//! - [`eval`], [`metrics`]: task losses and metrics; [`checkpoint`]: save / resume.
//! - [`plot`], [`card`]: curves and the adapter's model card.
//! - [`dist`]: data-parallel training over MPI / NCCL processes (`mpirun -np N peft train`).
//! - [`run`]: everything above from a config file, as `peft train` / `peft eval` run it.
//! - [`dreambooth`]: the same for a Stable Diffusion pipeline's adapters (DreamBooth data).

pub mod callback;
pub mod card;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dist;
pub mod dreambooth;
pub mod eval;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod run;
pub mod schedule;
pub mod trainer;

pub use callback::{StepInfo, TrainerCallback, TrainerEvent};
pub use config::{TrainConfig, TrainingArguments};
pub use eval::{causal_lm_loss, classification_loss, evaluate, task_loss, EvalOptions};
pub use trainer::{
    install_interrupt_handler, length_grouped_order, Outcome, StopSignal, TrainReport, Trainer,
};
