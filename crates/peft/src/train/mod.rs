//! A training loop sufficient for sequence classification: AdamW, warmup + decay, dynamic
//! padding, gradient clipping, evaluation accuracy, a progress bar.

pub mod config;
pub mod data;
pub mod optim;
pub mod schedule;

use candle_core::{DType, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::time::Instant;

use crate::models::TaskType;
use crate::peft_model::PeftModel;
use crate::{ops, Error, Result};
pub use config::{TrainConfig, TrainingArguments};
use data::{collate, Example};
use optim::{clip_scale, AdamW, AdamWParams};
use schedule::{lr_lambda, warmup_steps};

/// What a training run did.
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub steps: usize,
    pub epochs: f64,
    pub final_loss: f64,
    pub seconds: f64,
    pub examples_per_second: f64,
}

/// Mean cross-entropy of a classification forward pass.
pub fn classification_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    match logits.rank() {
        2 => ops::cross_entropy(logits, labels),
        3 => {
            let c = logits.dim(2)?;
            ops::cross_entropy(&logits.reshape(((), c))?, &labels.flatten_all()?)
        }
        r => Err(Error::Training(format!(
            "cannot compute a classification loss on logits of rank {r}"
        ))),
    }
}

/// Trains the active adapter of `model` on `train` examples (sequence classification).
pub fn train(
    model: &mut PeftModel,
    train: &[Example],
    args: &TrainingArguments,
    pad_id: u32,
) -> Result<TrainReport> {
    let task = model.base_model().info().task;
    if task != TaskType::SeqCls {
        return Err(Error::Training(format!(
            "this trainer handles SEQ_CLS; the model's task is {}",
            task.as_str()
        )));
    }
    if train.is_empty() {
        return Err(Error::Data("the training set is empty".into()));
    }
    args.validate()?;
    let vars = model.trainable_parameters();
    if vars.is_empty() {
        return Err(Error::Training(
            "the model has no trainable parameters (was the adapter loaded for inference?)".into(),
        ));
    }
    let bs = args.per_device_train_batch_size;
    let steps_per_epoch = train.len().div_ceil(bs);
    let total = if args.max_steps > 0 {
        args.max_steps as usize
    } else {
        (args.num_train_epochs * steps_per_epoch as f64).ceil() as usize
    };
    let warmup = warmup_steps(args.warmup_steps, args.warmup_ratio, total);
    let mut opt = AdamW::new(
        vars,
        AdamWParams {
            beta1: args.adam_beta1,
            beta2: args.adam_beta2,
            eps: args.adam_epsilon,
            weight_decay: args.weight_decay,
        },
    )?;
    let device = model.base_model().device().clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    ops::seed_dropout(args.seed);
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let start = Instant::now();
    let (mut step, mut seen, mut window_loss, mut window_n, mut last_loss) =
        (0usize, 0usize, 0f64, 0usize, f64::NAN);
    'outer: loop {
        let order = if args.group_by_length {
            let lengths: Vec<usize> = train.iter().map(|e| e.enc.input_ids.len()).collect();
            length_grouped_order(&lengths, bs, &mut rng)
        } else {
            let mut order: Vec<usize> = (0..train.len()).collect();
            order.shuffle(&mut rng);
            order
        };
        for chunk in order.chunks(bs) {
            if step >= total {
                break 'outer;
            }
            let batch: Vec<&Example> = chunk.iter().map(|&i| &train[i]).collect();
            let (inputs, labels) = collate(&batch, pad_id, &device)?;
            let logits = model.forward(&inputs, true)?;
            let mut loss = classification_loss(&logits, &labels)?;
            // Method-specific terms (AdaLoRA's orthogonal regularisation), as PEFT adds them.
            if let Some(reg) = model.regularization_loss()? {
                loss = (loss + reg)?;
            }
            let loss_v = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !loss_v.is_finite() {
                bar.abandon();
                return Err(Error::Training(format!(
                    "the loss became {loss_v} at step {}; lower learning_rate or check the data",
                    step + 1
                )));
            }
            let grads = loss.backward()?;
            let scale = clip_scale(opt.grad_norm(&grads)?, args.max_grad_norm);
            let lr = args.learning_rate * lr_lambda(args.lr_scheduler_type, step, warmup, total);
            opt.step(&grads, lr, scale)?;
            // AdaLoRA's rank allocation, after the step and with its gradients (a no-op otherwise).
            model.update_and_allocate(step, &grads)?;
            step += 1;
            seen += batch.len();
            window_loss += loss_v;
            window_n += 1;
            last_loss = loss_v;
            bar.set_position(step as u64);
            bar.set_message(format!("loss {loss_v:.4} lr {lr:.2e}"));
            if args.logging_steps > 0 && step % args.logging_steps == 0 {
                let epoch = step as f64 / steps_per_epoch as f64;
                let line = format!(
                    "step {step}/{total}  epoch {epoch:.2}  loss {:.4}  lr {lr:.3e}  {:.1} seq/s",
                    window_loss / window_n as f64,
                    seen as f64 / start.elapsed().as_secs_f64()
                );
                // A hidden bar (output not a terminal) swallows println; logs must still appear.
                if bar.is_hidden() {
                    println!("{line}");
                } else {
                    bar.println(line);
                }
                window_loss = 0.0;
                window_n = 0;
            }
        }
    }
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    Ok(TrainReport {
        steps: step,
        epochs: step as f64 / steps_per_epoch as f64,
        final_loss: last_loss,
        seconds,
        examples_per_second: seen as f64 / seconds,
    })
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

/// Classification accuracy of the model (dropout off) on `examples`.
pub fn evaluate_accuracy(
    model: &PeftModel,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
) -> Result<f64> {
    if examples.is_empty() {
        return Err(Error::Data("the evaluation set is empty".into()));
    }
    let device = model.base_model().device().clone();
    // Order does not change accuracy; batching similar lengths avoids computing on padding.
    let mut by_length: Vec<&Example> = examples.iter().collect();
    by_length.sort_by_key(|e| e.enc.input_ids.len());
    let mut correct = 0usize;
    for batch in by_length.chunks(batch_size.max(1)) {
        let (inputs, labels) = collate(batch, pad_id, &device)?;
        let logits = crate::no_grad(|| model.forward(&inputs, false))?;
        let pred: Vec<u32> = logits.argmax(candle_core::D::Minus1)?.to_vec1()?;
        let gold: Vec<i64> = labels.to_vec1()?;
        correct += pred
            .iter()
            .zip(&gold)
            .filter(|(p, g)| **p as i64 == **g)
            .count();
    }
    Ok(correct as f64 / examples.len() as f64)
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
