//! Checkpoints: `output_dir/checkpoint-N/` with the adapter (PEFT layout), `optimizer.safetensors`
//! (fp32 moments), `scheduler.json` and `trainer_state.json` (step, epoch, best metric, log
//! history, data position and dropout generator). The directory is written under a temporary
//! name and renamed, so a crash leaves either a whole checkpoint or none.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use super::optim::AdamW;
use super::schedule::Schedule;
use crate::peft_model::{PeftModel, WEIGHTS_NAME};
use crate::{Error, Result};

pub const STATE_NAME: &str = "trainer_state.json";
pub const OPTIMIZER_NAME: &str = "optimizer.safetensors";
/// Every trainable tensor under the name `PeftModel::trainable_parameters` gives it.
pub const TRAINABLE_NAME: &str = "trainable.safetensors";
pub const SCHEDULER_NAME: &str = "scheduler.json";

/// Where a run is; written in every checkpoint (transformers' `TrainerState` plus the data and
/// generator positions a bit-exact resume needs).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainerState {
    pub global_step: usize,
    /// Fractional epochs done (`global_step / steps_per_epoch`).
    pub epoch: f64,
    pub max_steps: usize,
    pub num_train_epochs: f64,
    /// Loss, learning rate, metrics: one entry per log or evaluation.
    pub log_history: Vec<serde_json::Value>,
    pub best_metric: Option<f64>,
    pub best_model_checkpoint: Option<PathBuf>,
    /// The data order is regenerated from the seed; these say where in it the run is.
    pub seed: u64,
    pub epochs_started: usize,
    /// Micro-batches of the current epoch already consumed.
    pub micro_batch_in_epoch: usize,
    /// Dropout masks drawn so far (see [`crate::ops::restore_dropout`]).
    pub dropout_draws: u64,
    /// The processes of the run that wrote this (0 in checkpoints from before data-parallel
    /// training: 1).
    #[serde(default)]
    pub world_size: usize,
    /// Examples of the current epoch's order already consumed by all processes together (their
    /// micro-batches × batch size × processes): where a run with another process count or
    /// batch size resumes. Absent in older checkpoints: `micro_batch_in_epoch` then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub examples_in_epoch: Option<usize>,
    /// Every rank's dropout draws (rank 0's is `dropout_draws`), to resume each rank's stream.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropout_draws_by_rank: Vec<u64>,
}

/// The `checkpoint-N` directories of `output_dir`, oldest first.
pub fn list_checkpoints(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join(STATE_NAME).exists().then(|| (n, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// `resume_from_checkpoint`: a directory, or `last`/`true` for the newest in `output_dir`.
pub fn resolve_resume(spec: &str, output_dir: &Path) -> Result<PathBuf> {
    if matches!(spec, "last" | "true" | "latest") {
        return list_checkpoints(output_dir)
            .pop()
            .map(|(_, p)| p)
            .ok_or_else(|| {
                Error::Training(format!(
                    "nothing to resume: no checkpoint-N directory in {}",
                    output_dir.display()
                ))
            });
    }
    let p = PathBuf::from(spec);
    if !p.join(STATE_NAME).exists() {
        return Err(Error::Training(format!(
            "{}: not a checkpoint (no {STATE_NAME})",
            p.display()
        )));
    }
    Ok(p)
}

/// Writes `output_dir/checkpoint-{step}` atomically.
pub fn save(
    output_dir: &Path,
    model: &PeftModel,
    opt: &AdamW,
    schedule: &Schedule,
    state: &TrainerState,
) -> Result<PathBuf> {
    let final_dir = output_dir.join(format!("checkpoint-{}", state.global_step));
    let tmp = output_dir.join(format!(
        ".checkpoint-{}.tmp-{}",
        state.global_step,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| {
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        model.save_pretrained(&tmp)?;
        // Every trainable tensor under its own name: an adapter file may hold something else
        // (a prompt encoder's output instead of the encoder), and resuming needs the tensors.
        let trainable: Vec<(String, candle_core::Tensor)> = model
            .trainable_parameters()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().detach()))
            .collect();
        crate::io::save_safetensors(&tmp.join(TRAINABLE_NAME), &trainable)?;
        crate::io::save_safetensors(&tmp.join(OPTIMIZER_NAME), &opt.state_tensors()?)?;
        write_json(&tmp.join(SCHEDULER_NAME), schedule)?;
        write_json(&tmp.join(STATE_NAME), state)?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|_| final_dir)
}

/// Deletes the oldest checkpoints beyond `limit`, never `keep` (the best one).
pub fn rotate(output_dir: &Path, limit: Option<usize>, keep: Option<&Path>) -> Result<()> {
    let Some(limit) = limit else {
        return Ok(());
    };
    let all = list_checkpoints(output_dir);
    let mut excess = all.len().saturating_sub(limit.max(1));
    for (_, p) in all {
        if excess == 0 {
            break;
        }
        if keep.is_some_and(|k| k == p) {
            continue;
        }
        std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        excess -= 1;
    }
    Ok(())
}

pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let json = serde_json::to_string_pretty(value).map_err(|e| Error::Training(e.to_string()))?;
    crate::io::write_atomic(path, json.as_bytes())
}

pub fn read_state(dir: &Path) -> Result<(TrainerState, Schedule)> {
    let read = |name: &str| -> Result<serde_json::Value> { crate::io::read_json(&dir.join(name)) };
    let state = serde_json::from_value(read(STATE_NAME)?)
        .map_err(|e| Error::Training(format!("{}: {e}", dir.join(STATE_NAME).display())))?;
    let schedule = serde_json::from_value(read(SCHEDULER_NAME)?)
        .map_err(|e| Error::Training(format!("{}: {e}", dir.join(SCHEDULER_NAME).display())))?;
    Ok((state, schedule))
}

/// Sets the model's trainable tensors from the checkpoint in `dir` (its `trainable.safetensors`,
/// or for older checkpoints the adapter file).
pub fn load_trainable(model: &PeftModel, dir: &Path) -> Result<()> {
    let path = if dir.join(TRAINABLE_NAME).exists() {
        dir.join(TRAINABLE_NAME)
    } else {
        dir.join(WEIGHTS_NAME)
    };
    let device = model.base_model().device().clone();
    let saved = crate::io::load_safetensors(&path, &device)?;
    for (name, var) in model.trainable_parameters() {
        let t = saved.get(&name).ok_or_else(|| {
            Error::Training(format!(
                "{}: no `{name}`; the checkpoint was written for a different adapter config",
                path.display()
            ))
        })?;
        if t.dims() != var.dims() {
            return Err(Error::ShapeMismatch {
                name,
                expected: var.dims().to_vec(),
                found: t.dims().to_vec(),
            });
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}
