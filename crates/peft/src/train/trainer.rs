//! The training loop: transformers' `Trainer` for an adapter. Per optimizer step it sums the
//! gradients of `gradient_accumulation_steps` micro-batches (each loss weighted by its share of
//! the step's targets, so k micro-batches equal one batch k times larger), clips, steps AdamW on
//! the schedule, logs, evaluates and checkpoints on the configured intervals, and stops cleanly
//! on Ctrl-C or a non-finite loss.

use candle_core::{DType, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::callback::{StepInfo, TrainerCallback, TrainerEvent};
use super::checkpoint::{self, TrainerState};
use super::config::{Interval, TrainingArguments};
use super::data::{collate, CollateOptions, Example};
use super::dist::{self, sampler, Fingerprint, ProcessGroup};
use super::eval::{evaluate, targets_with_prefix, training_loss, EvalOptions};
use super::metrics::Metrics;
use super::optim::{clip_scale, norm_of, AdamW, AdamWParams};
use super::schedule::{warmup_steps, Schedule};
use crate::peft_model::PeftModel;
use crate::{ops, Error, Result};

/// A request to stop a run after its current step, with a checkpoint to resume from. Each
/// trainer owns one, so runs in one process (tests, servers) never stop each other; clones share
/// the flag, so a Ctrl-C handler or another thread can hold one.
#[derive(Debug, Clone, Default)]
pub struct StopSignal(Arc<AtomicBool>);

impl StopSignal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the run to save a checkpoint and stop after the current step.
    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Reads and clears the request (a resumed run starts without it).
    fn take(&self) -> bool {
        self.0.swap(false, Ordering::SeqCst)
    }
}

/// Installs a SIGINT (Ctrl-C) handler that requests `stop` (said as a `tracing` warning), so the
/// run saves a checkpoint and stops after the current step. A second Ctrl-C exits at once.
pub fn install_interrupt_handler(stop: StopSignal) -> Result<()> {
    ctrlc::set_handler(move || {
        if stop.is_requested() {
            std::process::exit(130);
        }
        stop.request();
        tracing::warn!(
            "interrupted: saving a checkpoint after this step (Ctrl-C again to quit now)"
        );
    })
    .map_err(|e| Error::Training(format!("cannot install the Ctrl-C handler: {e}")))
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Finished,
    /// Stopped on request; the checkpoint to resume from.
    Interrupted(PathBuf),
}

/// What a training run did.
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub steps: usize,
    pub epochs: f64,
    pub final_loss: f64,
    pub seconds: f64,
    pub examples_per_second: f64,
    pub outcome: Outcome,
    /// Metrics of the last evaluation, if any.
    pub eval: Option<Metrics>,
    pub best_checkpoint: Option<PathBuf>,
    /// Seconds this process spent exchanging gradients and step totals with the others (0 for
    /// a single process).
    pub communication_seconds: f64,
}

/// A training run over tokenised examples.
pub struct Trainer<'a> {
    pub model: &'a mut PeftModel,
    pub args: TrainingArguments,
    pub collate: CollateOptions,
    pub train: &'a [Example],
    pub eval: Option<&'a [Example]>,
    /// TOKEN_CLS tag names for entity F1.
    pub label_names: Vec<String>,
    /// Receives every step, log, evaluation and checkpoint (to draw progress); `None`: silent.
    /// metrics.jsonl is written either way.
    pub callback: Option<&'a mut dyn TrainerCallback>,
    /// Checked after every optimizer step; see [`install_interrupt_handler`].
    pub stop: StopSignal,
    /// The processes of a data-parallel run ([`ProcessGroup::single`] for one): each trains on
    /// its shard of every batch; only rank 0 reports, evaluates and writes.
    pub group: ProcessGroup,
}

/// Sends `event` to the callback, if there is one.
fn emit(callback: &mut Option<&mut dyn TrainerCallback>, event: TrainerEvent<'_>) {
    if let Some(cb) = callback {
        cb.on_event(&event);
    }
}

impl Trainer<'_> {
    fn eval_options(&self) -> EvalOptions {
        EvalOptions {
            collate: self.collate,
            batch_size: self.args.per_device_eval_batch_size,
            label_names: self.label_names.clone(),
            max_answer_length: 30,
        }
    }

    pub fn evaluate(&self) -> Result<Option<Metrics>> {
        match self.eval {
            Some(e) if !e.is_empty() => Ok(Some(evaluate(self.model, e, &self.eval_options())?)),
            _ => Ok(None),
        }
    }

    /// Trains the active adapter; resumes from `args.resume_from_checkpoint` when set.
    pub fn train(&mut self) -> Result<TrainReport> {
        let args = self.args.clone();
        args.validate()?;
        if self.train.is_empty() {
            return Err(Error::Data("the training set is empty".into()));
        }
        let vars = self.model.trainable_parameters();
        if vars.is_empty() {
            return Err(Error::Training(
                "the model has no trainable parameters (was the adapter loaded for inference?)"
                    .into(),
            ));
        }
        // Where the CPU has no bf16 matrix instructions this stays fp32 (and warns).
        if args.bf16 {
            self.model.autocast_bf16()?;
        }
        if args.gradient_checkpointing && self.model.base_model().checkpointing().is_none() {
            tracing::warn!(
                "gradient_checkpointing: this model's blocks cannot be checkpointed; training \
                 keeps every activation"
            );
        }
        let group = self.group.clone();
        let (rank, world, main) = (group.rank(), group.world_size(), group.is_main());
        if !main {
            self.callback = None;
        }
        let out_dir = args.output_dir.clone();
        if main {
            std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
        }
        let bs = args.per_device_train_batch_size;
        let k = args.gradient_accumulation_steps;
        // Each rank's share of an epoch, cut into its micro-batches (transformers: the
        // per-device batch is per process).
        let micro_per_epoch = sampler::per_rank_len(self.train.len(), world).div_ceil(bs);
        let steps_per_epoch = micro_per_epoch.div_ceil(k).max(1);
        let total = if args.max_steps > 0 {
            args.max_steps as usize
        } else {
            (args.num_train_epochs * steps_per_epoch as f64).ceil() as usize
        };
        let mut schedule = Schedule {
            kind: args.lr_scheduler_type,
            base_lr: args.learning_rate,
            warmup: warmup_steps(args.warmup_steps, args.warmup_ratio, total),
            total,
            lr_end: args.lr_end,
            power: args.power,
        };
        let mut opt = AdamW::new(
            vars,
            AdamWParams {
                beta1: args.adam_beta1,
                beta2: args.adam_beta2,
                eps: args.adam_epsilon,
                weight_decay: args.weight_decay,
            },
        )?;
        let var_tensors: Vec<Tensor> = opt.vars().map(|v| v.as_tensor().clone()).collect();
        let mut state = TrainerState {
            max_steps: total,
            num_train_epochs: args.num_train_epochs,
            seed: args.seed,
            world_size: world,
            ..Default::default()
        };
        // Each rank its own dropout stream (rank 0's is a single process's).
        ops::seed_dropout(dist::rank_seed(args.seed, rank));
        let mut resumed_from = None;
        if let Some(spec) = &args.resume_from_checkpoint {
            let dir = checkpoint::resolve_resume(spec, &out_dir)?;
            let (s, sch) = checkpoint::read_state(&dir)?;
            checkpoint::load_trainable(self.model, &dir)?;
            opt.load_state(&dir.join(checkpoint::OPTIMIZER_NAME))?;
            let draws = match s.dropout_draws_by_rank.get(rank) {
                Some(&d) => d,
                None if rank == 0 => s.dropout_draws,
                None => 0,
            };
            ops::restore_dropout(dist::rank_seed(s.seed, rank), draws);
            schedule = sch;
            state = s;
            state.micro_batch_in_epoch = resume_position(&state, bs * world);
            state.world_size = world;
            tracing::info!(
                "resuming from {} (step {}, epoch {:.2})",
                dir.display(),
                state.global_step,
                state.epoch
            );
            resumed_from = Some(dir);
        }
        if group.is_distributed() {
            group.check_agreement(
                self.fingerprint(&var_tensors)?,
                "the config, the data or the adapter (names, shapes, values)",
            )?;
        }
        let metrics_path = out_dir.join("metrics.jsonl");
        if main && state.global_step == 0 {
            let _ = std::fs::remove_file(&metrics_path);
        }
        let device = self.model.base_model().device().clone();
        // The data order: one generator for the run, one permutation per epoch, so that a
        // resumed run replays the earlier epochs' draws to reach the same order.
        let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
        let lengths: Vec<usize> = self.train.iter().map(|e| e.input_ids.len()).collect();
        // The epoch's order is the same on every rank (one seed); each takes its shard of it.
        let next_order = |rng: &mut rand::rngs::StdRng| {
            let order = if args.group_by_length {
                length_grouped_order(&lengths, bs * world, rng)
            } else {
                let mut order: Vec<usize> = (0..lengths.len()).collect();
                order.shuffle(rng);
                order
            };
            sampler::shard(&order, rank, world)
        };
        for _ in 0..state.epochs_started.saturating_sub(1) {
            next_order(&mut rng);
        }
        emit(
            &mut self.callback,
            TrainerEvent::Begin {
                total_steps: total,
                start_step: state.global_step,
                resumed_from: resumed_from.as_deref(),
            },
        );
        let start = Instant::now();
        let (mut seen, mut window_loss, mut window_n, mut last_loss) =
            (0usize, 0f64, 0usize, f64::NAN);
        let mut last_eval = None;
        let mut outcome = Outcome::Finished;
        let mut order = if state.epochs_started > 0 {
            next_order(&mut rng)
        } else {
            Vec::new()
        };
        'outer: while state.global_step < total {
            if state.epochs_started == 0 || state.micro_batch_in_epoch >= micro_per_epoch {
                order = next_order(&mut rng);
                state.epochs_started += 1;
                state.micro_batch_in_epoch = 0;
            }
            let micro: Vec<&[usize]> = order.chunks(bs).collect();
            while state.micro_batch_in_epoch < micro.len() {
                if state.global_step >= total {
                    break 'outer;
                }
                let group_end = (state.micro_batch_in_epoch + k).min(micro.len());
                let mut step_seen = 0usize;
                let batches = micro[state.micro_batch_in_epoch..group_end]
                    .iter()
                    .map(|chunk| {
                        let ex: Vec<&Example> = chunk.iter().map(|&i| &self.train[i]).collect();
                        step_seen += ex.len();
                        collate(&ex, &self.collate, &device)
                    })
                    .collect::<Result<Vec<_>>>()?;
                // With an input method's virtual tokens in front, a causal LM also predicts each
                // row's first label (PEFT's label padding).
                let prefix = self.model.virtual_tokens();
                let task = self.collate.task;
                let counts = batches
                    .iter()
                    .map(|b| targets_with_prefix(task, &b.targets, b.num_targets, prefix))
                    .collect::<Result<Vec<_>>>()?;
                // The step's targets over all ranks: each loss is weighted by its share of
                // them, so the summed gradients are the global batch's (transformers'
                // `average_tokens_across_devices`).
                let n_local: usize = counts.iter().sum();
                let n_total = if world > 1 {
                    group.sum(n_local as f64)?.round() as usize
                } else {
                    n_local
                };
                if n_total == 0 {
                    state.micro_batch_in_epoch = group_end;
                    continue;
                }
                self.model.before_train_step(
                    args.seed.wrapping_mul(1_000_003) ^ state.global_step as u64,
                )?;
                let mut grads: Option<Vec<Option<Tensor>>> = None;
                let mut step_loss = 0f64;
                for (b, &count) in batches.iter().zip(&counts) {
                    if count == 0 {
                        continue;
                    }
                    // Open for this micro-batch's forward and backward only: the model is
                    // borrowed while it is open.
                    let _checkpointing = if args.gradient_checkpointing {
                        self.model.gradient_checkpointing()
                    } else {
                        None
                    };
                    let mut loss = training_loss(self.model, task, &b.inputs, &b.targets)?;
                    // Method-specific terms (AdaLoRA's orthogonal regularisation), as PEFT adds
                    // them to the task loss.
                    if let Some(reg) = self.model.regularization_loss()? {
                        loss = (loss + reg)?;
                    }
                    let loss_v = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                    if !loss_v.is_finite() {
                        let last = checkpoint::list_checkpoints(&out_dir).pop();
                        return Err(Error::Training(format!(
                            "the loss became {loss_v} at step {}; lower learning_rate (or check \
                             the data). {}",
                            state.global_step + 1,
                            match last {
                                Some((_, p)) => format!(
                                    "The last good checkpoint is {}; resume from it with \
                                     --resume {}",
                                    p.display(),
                                    p.display()
                                ),
                                None => "No checkpoint was saved before it.".into(),
                            }
                        )));
                    }
                    let share = count as f64 / n_total as f64;
                    step_loss += loss_v * share;
                    let loss = if share != 1.0 { (loss * share)? } else { loss };
                    let g = opt.gradients(&crate::grad::backward(&loss)?);
                    grads = Some(match grads {
                        None => g,
                        Some(acc) => acc
                            .into_iter()
                            .zip(g)
                            .map(|(a, b)| match (a, b) {
                                (Some(a), Some(b)) => Ok(Some((a + b)?)),
                                (a, b) => Ok(a.or(b)),
                            })
                            .collect::<Result<_>>()?,
                    });
                }
                state.micro_batch_in_epoch = group_end;
                let grads = grads.unwrap_or_else(|| vec![None; var_tensors.len()]);
                let (grads, totals) = group.reduce_step(
                    grads,
                    &var_tensors,
                    step_loss,
                    step_seen,
                    self.stop.take(),
                )?;
                let (step_loss, stop) = (totals.loss, totals.stop);
                seen += totals.seen;
                let norm = norm_of(&grads)?;
                let scale = clip_scale(norm, args.max_grad_norm);
                let lr = schedule.lr(state.global_step);
                opt.step_with(&grads, lr, scale)?;
                // AdaLoRA's rank allocation with this step's gradients (a no-op for other
                // methods), after the optimizer step as PEFT's training loops call it.
                let by_var: Vec<(Tensor, Tensor)> = opt
                    .vars()
                    .zip(&grads)
                    .filter_map(|(v, g)| g.clone().map(|g| (v.as_tensor().clone(), g)))
                    .collect();
                self.model.update_and_allocate_by(state.global_step, &|t| {
                    by_var
                        .iter()
                        .find(|(v, _)| v.id() == t.id())
                        .map(|(_, g)| g.clone())
                })?;
                state.global_step += 1;
                state.epoch = (state.epochs_started - 1) as f64
                    + state.micro_batch_in_epoch as f64 / micro_per_epoch as f64;
                state.dropout_draws = ops::dropout_draws();
                state.examples_in_epoch = Some(state.micro_batch_in_epoch * bs * world);
                window_loss += step_loss;
                window_n += 1;
                last_loss = step_loss;
                let rate = seen as f64 / start.elapsed().as_secs_f64();
                let step = state.global_step;
                let mut info = StepInfo {
                    step,
                    total_steps: total,
                    epoch: state.epoch,
                    loss: step_loss,
                    learning_rate: lr,
                    grad_norm: norm,
                    examples_per_second: rate,
                };
                emit(&mut self.callback, TrainerEvent::Step(&info));
                if args.logging_steps > 0 && step.is_multiple_of(args.logging_steps) {
                    let entry = serde_json::json!({
                        "step": step, "epoch": round4(state.epoch),
                        "loss": window_loss / window_n as f64, "learning_rate": lr,
                        "grad_norm": norm, "examples_per_second": rate,
                    });
                    info.loss = window_loss / window_n as f64;
                    emit(&mut self.callback, TrainerEvent::Log(&info));
                    log(main, &metrics_path, &mut state, entry)?;
                    window_loss = 0.0;
                    window_n = 0;
                }
                let epoch_end = state.micro_batch_in_epoch >= micro_per_epoch;
                let due = |s: Interval, every: usize| match s {
                    Interval::No => false,
                    Interval::Steps => step.is_multiple_of(every),
                    Interval::Epoch => epoch_end,
                };
                if due(args.eval_strategy, args.eval_steps()) {
                    self.model.after_training()?;
                    // Rank 0 evaluates; the others wait for it at the next step's exchange.
                    let metrics = if main { self.evaluate()? } else { None };
                    if let Some(m) = metrics {
                        emit(
                            &mut self.callback,
                            TrainerEvent::Evaluate { step, metrics: &m },
                        );
                        let mut entry =
                            serde_json::json!({"step": step, "epoch": round4(state.epoch)});
                        for (k, v) in &m {
                            entry[format!("eval_{k}")] = serde_json::json!(v);
                        }
                        log(main, &metrics_path, &mut state, entry)?;
                        if let Some(&v) = m.get(&args.best_metric()) {
                            let better = state.best_metric.is_none_or(|b| {
                                if args.greater_is_better() {
                                    v > b
                                } else {
                                    v < b
                                }
                            });
                            if better {
                                state.best_metric = Some(v);
                                state.best_model_checkpoint =
                                    Some(out_dir.join(format!("checkpoint-{step}")));
                            }
                        }
                        last_eval = Some(m);
                    }
                }
                if due(args.save_strategy, args.save_steps) || stop {
                    if world > 1 {
                        state.dropout_draws_by_rank = group.all_gather(ops::dropout_draws())?;
                    }
                    let t = Instant::now();
                    let dir = if main {
                        checkpoint::save(&out_dir, self.model, &opt, &schedule, &state)?
                    } else {
                        out_dir.join(format!("checkpoint-{step}"))
                    };
                    emit(
                        &mut self.callback,
                        TrainerEvent::Save {
                            step,
                            dir: &dir,
                            seconds: t.elapsed().as_secs_f64(),
                        },
                    );
                    if main {
                        checkpoint::rotate(
                            &out_dir,
                            args.save_total_limit,
                            state.best_model_checkpoint.as_deref(),
                        )?;
                    }
                    if stop {
                        emit(
                            &mut self.callback,
                            TrainerEvent::Interrupted {
                                step,
                                checkpoint: &dir,
                            },
                        );
                        outcome = Outcome::Interrupted(dir);
                        break 'outer;
                    }
                }
            }
        }
        self.model.after_training()?;
        if outcome == Outcome::Finished && args.load_best_model_at_end {
            if let Some(best) = &state.best_model_checkpoint {
                if best.exists() {
                    checkpoint::load_trainable(self.model, best)?;
                    emit(&mut self.callback, TrainerEvent::LoadedBest { dir: best });
                }
            }
        }
        emit(
            &mut self.callback,
            TrainerEvent::End {
                steps: state.global_step,
            },
        );
        let seconds = start.elapsed().as_secs_f64();
        Ok(TrainReport {
            steps: state.global_step,
            epochs: state.global_step as f64 / steps_per_epoch as f64,
            final_loss: last_loss,
            seconds,
            examples_per_second: seen as f64 / seconds.max(1e-9),
            outcome,
            eval: last_eval,
            best_checkpoint: state.best_model_checkpoint.clone(),
            communication_seconds: group.communication_seconds(),
        })
    }

    /// What every rank of a data-parallel run must agree on: the arguments, the collation,
    /// the training examples, and the adapter's parameter names, shapes and values (as loaded
    /// or resumed).
    fn fingerprint(&self, vars: &[Tensor]) -> Result<u64> {
        let mut f = Fingerprint::default();
        f.str(&serde_json::to_string(&self.args).unwrap_or_default())
            .str(&format!("{:?}", self.collate))
            .u64(self.train.len() as u64);
        for e in self.train {
            f.str(&format!("{:?}", e));
        }
        for (name, _) in self.model.trainable_parameters() {
            f.str(&name);
        }
        for v in vars {
            f.tensor(v)?;
        }
        Ok(f.finish())
    }

    /// After training: the adapter in `output_dir`, a model card, and the curves. `eval`, the
    /// final evaluation, goes into the card and, unless the run already logged an evaluation
    /// at its last step, into metrics.jsonl (as transformers' `Trainer.evaluate` logs it), so
    /// the curves show it even when `eval_strategy` is `no`.
    pub fn save_final(&self, report: &TrainReport, eval: Option<&Metrics>) -> Result<()> {
        let dir = &self.args.output_dir;
        self.model.save_pretrained(dir)?;
        super::card::write_model_card(
            dir,
            self.model,
            &self.args,
            self.train.len(),
            report.steps,
            eval,
        )?;
        let metrics_path = dir.join("metrics.jsonl");
        let mut history = read_history(&metrics_path);
        if let Some(m) = eval {
            let logged = history.iter().any(|h| {
                h.get("step").and_then(|s| s.as_u64()) == Some(report.steps as u64)
                    && h.as_object()
                        .is_some_and(|o| o.keys().any(|k| k.starts_with("eval_")))
            });
            if !logged && !m.is_empty() {
                let mut entry =
                    serde_json::json!({"step": report.steps, "epoch": round4(report.epochs)});
                for (k, v) in m {
                    entry[format!("eval_{k}")] = serde_json::json!(v);
                }
                append_line(&metrics_path, &entry)?;
                history.push(entry);
            }
        }
        let panels = super::plot::curves_from_history(&history, &self.args.best_metric());
        let title = match dir.file_name() {
            Some(name) => format!("Training curves: {}", name.to_string_lossy()),
            None => "Training curves".to_string(),
        };
        super::plot::write_curves(&dir.join("curves"), &title, &panels)
    }
}

/// The micro-batch of the epoch a run resumes at when each of its micro-batch rounds takes
/// `per_round` examples of the epoch's order (batch size × processes): the checkpoint's place in
/// that order, whatever process count and batch size wrote it, rounded up to a whole round.
fn resume_position(state: &TrainerState, per_round: usize) -> usize {
    let Some(done) = state.examples_in_epoch else {
        return state.micro_batch_in_epoch;
    };
    if !done.is_multiple_of(per_round) {
        tracing::warn!(
            "the checkpoint stopped {done} examples into the epoch, not a multiple of this \
             run's {per_round} per micro-batch round (batch size x processes): resuming at the \
             next whole round skips {} examples",
            per_round - done % per_round
        );
    }
    done.div_ceil(per_round)
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// Appends `entry` to the state's log history and, on the rank that writes (`write`), to
/// `metrics.jsonl`.
fn log(write: bool, path: &Path, state: &mut TrainerState, entry: serde_json::Value) -> Result<()> {
    if write {
        append_line(path, &entry)?;
    }
    state.log_history.push(entry);
    Ok(())
}

/// Appends one JSON line to `path`.
fn append_line(path: &Path, entry: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    writeln!(f, "{entry}").map_err(|e| Error::io(path, e))
}

/// The entries of a `metrics.jsonl`, skipping unreadable lines.
pub fn read_history(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// transformers' LengthGroupedSampler: shuffle, cut into megabatches of up to 50 batches, sort
/// each megabatch by length (longest first), and move the longest example of all to the front
/// so a too-large batch fails at the first step rather than late.
pub fn length_grouped_order(
    lengths: &[usize],
    batch_size: usize,
    rng: &mut impl rand::Rng,
) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    idx.shuffle(rng);
    let mult = (lengths.len() / (batch_size * 4)).clamp(1, 50);
    let mut megabatches: Vec<Vec<usize>> = idx
        .chunks(mult * batch_size)
        .map(|m| {
            let mut m = m.to_vec();
            m.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
            m
        })
        .collect();
    if let Some(longest) =
        (0..megabatches.len()).max_by_key(|&j| (lengths[megabatches[j][0]], std::cmp::Reverse(j)))
    {
        let first = megabatches[longest][0];
        megabatches[longest][0] = megabatches[0][0];
        megabatches[0][0] = first;
    }
    megabatches.concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_grouping_sorts_megabatches_and_leads_with_the_longest() {
        let lengths: Vec<usize> = (0..1000).map(|i| (i * 7919) % 97 + 3).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let order = length_grouped_order(&lengths, 4, &mut rng);
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>(), "a permutation");
        assert_eq!(lengths[order[0]], 99, "longest first");
        // 1000 / (4 * 4) = 62 -> 50 batches of 4 per megabatch: 200 examples, descending.
        for mb in order.chunks(200) {
            assert!(mb[1..].windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]));
        }
    }
}
