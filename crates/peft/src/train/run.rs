//! A whole job from a [`TrainConfig`]: read and tokenise the data, load the model with the head
//! the task needs, wrap it with the adapter, train (or only evaluate), save. `peft train` and
//! `peft eval` are these two functions. Nothing here prints: progress goes to a
//! [`TrainerCallback`], results are returned, and notes are `tracing` events.

use candle_core::Device;
use std::path::{Path, PathBuf};

use super::callback::TrainerCallback;
use super::config::TrainConfig;
use super::data::{
    build_examples, read_records, split_validation, CollateOptions, Example, LabelSet, TaskData,
};
use super::dist::ProcessGroup;
use super::eval::{evaluate, EvalOptions};
use super::metrics::Metrics;
use super::trainer::{Outcome, StopSignal, TrainReport, Trainer};
use crate::io::tokenizer::Tokenizer;
use crate::models::{self, LoadOptions, TaskType};
use crate::peft_model::{get_peft_model_with_seed, PeftModel, CONFIG_NAME};
use crate::{Error, Result};

/// Tokenised data and everything derived from it.
pub struct Prepared {
    pub task: TaskType,
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
    pub labels: Option<LabelSet>,
    pub collate: CollateOptions,
    /// Where the evaluation examples came from, for messages.
    pub eval_source: String,
}

/// The task: `[model] task_type`, else the `[peft]` table's, else SEQ_CLS.
pub fn task_of(cfg: &TrainConfig) -> TaskType {
    cfg.model
        .task_type
        .or(cfg.peft.task_type())
        .unwrap_or(TaskType::SeqCls)
}

fn load_base(
    cfg: &TrainConfig,
    labels: Option<&LabelSet>,
    device: &Device,
) -> Result<Box<dyn crate::Model>> {
    load_base_for(cfg, labels, device, cfg.peft.brings_head())
}

/// [`load_base`] for an adapter that brings its own prediction head or not.
fn load_base_for(
    cfg: &TrainConfig,
    labels: Option<&LabelSet>,
    device: &Device,
    brings_head: bool,
) -> Result<Box<dyn crate::Model>> {
    let task = task_of(cfg);
    // Without `[model] num_labels`, the head keeps the checkpoint's class count (as
    // transformers' from_pretrained does) unless the data needs more classes.
    let config_path = cfg.model.path.join("config.json");
    let from_config = config_path
        .exists()
        .then(|| crate::io::read_json(&config_path))
        .transpose()?
        .map(|c| models::num_labels(&c, None));
    let num_labels = match task {
        TaskType::SeqCls | TaskType::TokenCls => cfg
            .model
            .num_labels
            .or(labels.map(|l| l.num_labels.max(from_config.unwrap_or(0)))),
        _ => None,
    };
    // An adapter that brings its own prediction head reads the last hidden states.
    let model_task = if brings_head {
        TaskType::FeatureExtraction
    } else {
        task
    };
    models::load(
        &cfg.model.path,
        &LoadOptions {
            task: Some(model_task),
            num_labels,
            device: device.clone(),
            seed: cfg.training.seed,
            quantization: cfg.model.quantization.clone(),
            keep_gguf_quantized: cfg.model.keep_gguf_quantized,
        },
    )
}

/// Reads, splits and tokenises the data for `model`'s task.
pub fn prepare(cfg: &TrainConfig, model: &dyn crate::Model, tok: &Tokenizer) -> Result<Prepared> {
    let task = task_of(cfg);
    let d = &cfg.data;
    let records = read_records(&d.train_file)?;
    let (train_rec, eval_rec, eval_file, eval_source) = match &d.eval_file {
        Some(f) => {
            let e = read_records(f)?;
            (records, e, f.clone(), f.display().to_string())
        }
        None => {
            let (t, e) = split_validation(records, d.validation_split, cfg.training.seed);
            let src = format!(
                "{} held out of {} (validation_split = {})",
                e.len(),
                d.train_file.display(),
                d.validation_split
            );
            (t, e, d.train_file.clone(), src)
        }
    };
    let labels = match task {
        TaskType::SeqCls | TaskType::TokenCls => {
            let raw = TaskData::raw_labels(task, d, &train_rec, &d.train_file)?;
            let min = if task == TaskType::SeqCls { 2 } else { 1 };
            let mut set = LabelSet::infer(d.label_names.as_deref(), &raw, min);
            if let Some(n) = cfg.model.num_labels {
                if set.names.as_ref().is_some_and(|names| names.len() > n) {
                    return Err(Error::Config(format!(
                        "[model] num_labels = {n} but the data has {} labels",
                        set.num_labels
                    )));
                }
                set.num_labels = n;
            }
            Some(set)
        }
        _ => None,
    };
    let dims = model.dims();
    let spec = TaskData {
        task,
        data: d,
        labels: labels.as_ref(),
        eos_id: dims.eos_token_ids.first().copied(),
    };
    let train = build_examples(&spec, &train_rec, &d.train_file, tok)?;
    if train.is_empty() {
        return Err(Error::Data(format!(
            "{}: no training examples after tokenisation",
            d.train_file.display()
        )));
    }
    let eval = build_examples(&spec, &eval_rec, &eval_file, tok)?;
    let pad_id = dims.pad_token_id.unwrap_or(tok.pad_id());
    Ok(Prepared {
        task,
        train,
        eval,
        labels,
        collate: CollateOptions {
            task,
            pad_id,
            padding_side: d.padding_side,
            decoder_start_id: dims.decoder_start_token_id.unwrap_or(pad_id),
        },
        eval_source,
    })
}

fn label_names(p: &Prepared) -> Vec<String> {
    p.labels
        .as_ref()
        .map(|l| (0..l.num_labels).map(|i| l.name(i)).collect())
        .unwrap_or_default()
}

/// Labels from the training file, read before the model so the head gets the right size.
fn labels_for_head(cfg: &TrainConfig) -> Result<Option<LabelSet>> {
    let task = task_of(cfg);
    if !matches!(task, TaskType::SeqCls | TaskType::TokenCls) || cfg.model.num_labels.is_some() {
        return Ok(None);
    }
    let records = read_records(&cfg.data.train_file)?;
    let raw = TaskData::raw_labels(task, &cfg.data, &records, &cfg.data.train_file)?;
    let min = if task == TaskType::SeqCls { 2 } else { 1 };
    Ok(Some(LabelSet::infer(
        cfg.data.label_names.as_deref(),
        &raw,
        min,
    )))
}

/// A training job ready to run: the base model with the task's head, wrapped with the
/// config's adapter, and the tokenised data. [`TrainJob::prepare`] then [`TrainJob::run`] is what
/// `peft train` does; in between, [`PeftModel::trainable_parameters_line`] on `model` says what
/// will train.
pub struct TrainJob {
    pub config: TrainConfig,
    pub model: PeftModel,
    pub data: Prepared,
    /// Stops the run after its current step with a checkpoint (hand a clone to
    /// [`super::install_interrupt_handler`] for Ctrl-C).
    pub stop: StopSignal,
    /// The processes training together ([`ProcessGroup::from_env`] under `mpirun`); a single
    /// process by default.
    pub group: ProcessGroup,
}

/// An evaluation of an adapter.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub metrics: Metrics,
    /// How many examples were evaluated.
    pub examples: usize,
    /// Where they came from (the eval file, or the held-out part of the train file).
    pub source: String,
}

/// What [`TrainJob::run`] did.
#[derive(Debug, Clone)]
pub struct TrainOutput {
    pub report: TrainReport,
    /// The final evaluation; `None` without evaluation data, or when the run was interrupted.
    pub eval: Option<Evaluation>,
    /// `output_dir`: the adapter, its model card, `metrics.jsonl`, `curves.png` / `curves.svg`
    /// and `eval_results.json` (unless the run was interrupted: then only the checkpoint in
    /// `report.outcome`).
    pub output_dir: PathBuf,
}

impl TrainJob {
    /// Reads and tokenises the data, loads the model with the head the task needs, and adds the
    /// adapter of the `[peft]` table.
    pub fn prepare(cfg: &TrainConfig, device: &Device) -> Result<TrainJob> {
        let task = task_of(cfg);
        let tok = Tokenizer::for_model(&cfg.model.path)?;
        let head_labels = labels_for_head(cfg)?;
        let model = load_base(cfg, head_labels.as_ref(), device)?;
        let mut prepared = prepare(cfg, model.as_ref(), &tok)?;
        if let (Some(h), Some(l)) = (&head_labels, &mut prepared.labels) {
            l.num_labels = l.num_labels.max(h.num_labels);
        }
        let mut peft_config = cfg.peft.clone();
        if peft_config.task_type().is_none() {
            // The [model] table already says the task; PEFT needs it to train and save the head.
            peft_config.set_task_type(task);
        }
        if let Some(l) = &prepared.labels {
            peft_config.as_dyn_mut().set_num_labels(l.num_labels);
        }
        let peft_model =
            get_peft_model_with_seed(model, peft_config, "default", cfg.training.seed)?;
        tracing::info!(
            "training on {} examples ({}){}",
            prepared.train.len(),
            match &prepared.labels {
                Some(l) => format!("{} labels", l.num_labels),
                None => task.as_str().to_string(),
            },
            if prepared.eval.is_empty() {
                String::new()
            } else {
                format!(
                    ", evaluating on {} ({})",
                    prepared.eval.len(),
                    prepared.eval_source
                )
            }
        );
        Ok(TrainJob {
            config: cfg.clone(),
            model: peft_model,
            data: prepared,
            stop: StopSignal::new(),
            group: ProcessGroup::single(),
        })
    }

    /// Trains (reporting to `callback`; `None`: silently), evaluates, and saves the adapter,
    /// model card, curves and `eval_results.json` in `output_dir`. An interrupted run (Ctrl-C)
    /// returns after its checkpoint, without the final evaluation and save; so does every rank
    /// but 0 of a data-parallel run.
    pub fn run(&mut self, callback: Option<&mut dyn TrainerCallback>) -> Result<TrainOutput> {
        let names = label_names(&self.data);
        let output_dir = self.config.training.output_dir.clone();
        let mut trainer = Trainer {
            model: &mut self.model,
            args: self.config.training.clone(),
            collate: self.data.collate,
            train: &self.data.train,
            eval: (!self.data.eval.is_empty()).then_some(self.data.eval.as_slice()),
            label_names: names,
            // Reborrowed for the trainer's (shorter) lifetime.
            callback: callback.map(|c| -> &mut dyn TrainerCallback { c }),
            stop: self.stop.clone(),
            group: self.group.clone(),
        };
        let report = trainer.train()?;
        // Only rank 0 evaluates and writes; the other ranks' work ends with training.
        if matches!(report.outcome, Outcome::Interrupted(_)) || !self.group.is_main() {
            return Ok(TrainOutput {
                report,
                eval: None,
                output_dir,
            });
        }
        let metrics = trainer.evaluate()?;
        trainer.save_final(&report, metrics.as_ref())?;
        if let Some(m) = &metrics {
            super::checkpoint::write_json(&output_dir.join("eval_results.json"), m)?;
        }
        Ok(TrainOutput {
            report,
            eval: metrics.map(|metrics| Evaluation {
                metrics,
                examples: self.data.eval.len(),
                source: self.data.eval_source.clone(),
            }),
            output_dir,
        })
    }
}

/// `peft train`: [`TrainJob::prepare`], then [`TrainJob::run`].
pub fn train(
    cfg: &TrainConfig,
    device: &Device,
    callback: Option<&mut dyn TrainerCallback>,
) -> Result<TrainOutput> {
    TrainJob::prepare(cfg, device)?.run(callback)
}

/// `peft eval`: the metrics of an adapter (default: the one in `output_dir`) on the eval data.
pub fn eval(cfg: &TrainConfig, adapter: Option<&Path>, device: &Device) -> Result<Evaluation> {
    eval_skipping(cfg, adapter, device, &[])
}

/// [`eval`] with the hook points of `skip_layers` running without adapters (AdapterDrop at
/// inference).
pub fn eval_skipping(
    cfg: &TrainConfig,
    adapter: Option<&Path>,
    device: &Device,
    skip_layers: &[usize],
) -> Result<Evaluation> {
    let dir: PathBuf = adapter
        .map(Path::to_path_buf)
        .unwrap_or_else(|| cfg.training.output_dir.clone());
    let foreign = crate::tuners::foreign_format(&dir).is_some();
    if !dir.join(CONFIG_NAME).exists() && !foreign {
        return Err(Error::Adapter(format!(
            "{}: no {CONFIG_NAME}; pass --adapter DIR or train first",
            dir.display()
        )));
    }
    let tok = Tokenizer::for_model(&cfg.model.path)?;
    let mut cfg = cfg.clone();
    if cfg.model.num_labels.is_none() && !foreign {
        cfg.model.num_labels = crate::peft_model::saved_head_classes(&dir)?;
    }
    // The adapter's own view of the base model's head: FEATURE_EXTRACTION under an adapter that
    // brings its own prediction head.
    let mut o = LoadOptions::default();
    crate::peft_model::base_task(&dir, &mut o)?;
    let brings_head = o.task == Some(TaskType::FeatureExtraction)
        && matches!(task_of(&cfg), TaskType::SeqCls | TaskType::TokenCls);
    let head_labels = labels_for_head(&cfg)?;
    let model = load_base_for(&cfg, head_labels.as_ref(), device, brings_head)?;
    let prepared = prepare(&cfg, model.as_ref(), &tok)?;
    if prepared.eval.is_empty() {
        return Err(Error::Data(
            "no evaluation examples: set [data] eval_file or validation_split > 0".into(),
        ));
    }
    let mut peft_model = PeftModel::from_pretrained(model, &dir, Default::default())?;
    if !skip_layers.is_empty() {
        peft_model.set_skip_layers(Some(skip_layers))?;
    }
    let m = evaluate(
        &peft_model,
        &prepared.eval,
        &EvalOptions {
            collate: prepared.collate,
            batch_size: cfg.training.per_device_eval_batch_size,
            label_names: label_names(&prepared),
            max_answer_length: 30,
        },
    )?;
    Ok(Evaluation {
        metrics: m,
        examples: prepared.eval.len(),
        source: prepared.eval_source,
    })
}
