//! What a running [`Trainer`](super::Trainer) reports, for whoever shows progress: the library
//! draws nothing itself. A [`TrainerCallback`] (transformers' `TrainerCallback`, as one method
//! taking an event) receives every step, log, evaluation and checkpoint; any
//! `FnMut(&TrainerEvent)` closure is one. Without a callback a run is silent (it still writes
//! `metrics.jsonl` and its checkpoints).

use std::path::Path;

use super::metrics::Metrics;

/// The numbers of one optimizer step, or of a logging window.
#[derive(Debug, Clone, PartialEq)]
pub struct StepInfo {
    /// Optimizer steps done (1-based after the first step).
    pub step: usize,
    pub total_steps: usize,
    /// Fractional epochs done.
    pub epoch: f64,
    /// This step's loss ([`TrainerEvent::Step`]), or the mean over the steps since the previous
    /// log ([`TrainerEvent::Log`], the `loss` of metrics.jsonl).
    pub loss: f64,
    pub learning_rate: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Training examples per second since the run (or the resumed part of it) started.
    pub examples_per_second: f64,
}

/// One thing that happened in a training run, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum TrainerEvent<'a> {
    /// Before the first step. `start_step` is above 0 when resuming from `resumed_from`.
    Begin {
        total_steps: usize,
        start_step: usize,
        resumed_from: Option<&'a Path>,
    },
    /// After every optimizer step.
    Step(&'a StepInfo),
    /// Every `logging_steps` steps, after the step's [`TrainerEvent::Step`]: what metrics.jsonl
    /// records (the loss averaged over the window).
    Log(&'a StepInfo),
    /// An evaluation on the eval set at `step` (on `eval_strategy`).
    Evaluate { step: usize, metrics: &'a Metrics },
    /// A checkpoint was written (on `save_strategy`, or on a stop request).
    Save {
        step: usize,
        dir: &'a Path,
        seconds: f64,
    },
    /// The run stopped on request (Ctrl-C) after saving `checkpoint`; resume from it.
    Interrupted { step: usize, checkpoint: &'a Path },
    /// `load_best_model_at_end` restored the adapter of this checkpoint.
    LoadedBest { dir: &'a Path },
    /// The loop is over (finished or interrupted; an error ends a run without this event).
    End { steps: usize },
}

/// Receives a [`Trainer`](super::Trainer)'s events.
pub trait TrainerCallback {
    fn on_event(&mut self, event: &TrainerEvent<'_>);
}

impl<F: FnMut(&TrainerEvent<'_>)> TrainerCallback for F {
    fn on_event(&mut self, event: &TrainerEvent<'_>) {
        self(event)
    }
}
