//! Each task's loss (what transformers' heads compute when given `labels`) and evaluation: the
//! mean loss over the eval set plus the task's metrics.

use candle_core::{DType, IndexOp, Tensor, D};

use super::data::tasks::IGNORE;
use super::data::{collate, CollateOptions, Example, Target, Targets};
use super::metrics::{self, Metrics};
use crate::models::TaskType;
use crate::peft_model::PeftModel;
use crate::{ops, Error, Result};

/// Mean cross-entropy of a classification forward pass (`[n, c]`, or `[b, t, c]` per token).
pub fn classification_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    match logits.rank() {
        2 => ops::cross_entropy(&logits.to_dtype(DType::F32)?, labels),
        3 => {
            let c = logits.dim(2)?;
            ops::cross_entropy(
                &logits.to_dtype(DType::F32)?.reshape(((), c))?,
                &labels.flatten_all()?,
            )
        }
        r => Err(Error::Training(format!(
            "cannot compute a classification loss on logits of rank {r}"
        ))),
    }
}

/// Causal language-modelling loss as transformers computes it (`ForCausalLMLoss`): the logits at
/// position `i` predict the label at `i + 1`, so `labels` are the input ids themselves (not
/// shifted by the caller); labels of -100 (padding, prompt tokens) are ignored and the mean is
/// over the rest. `logits` `[batch, seq, vocab]`, `labels` `[batch, seq]` (i64).
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let (lb, lt) = labels.dims2()?;
    if (lb, lt) != (b, t) {
        return Err(Error::Training(format!(
            "labels [{lb}, {lt}] do not line up with logits [{b}, {t}, {v}]; pass the input ids \
             (with -100 where no loss is wanted) as labels, unshifted"
        )));
    }
    if t < 2 {
        return Err(Error::Training(
            "a causal-LM loss needs at least two positions (one to predict from, one to predict)"
                .into(),
        ));
    }
    // Position i predicts label i + 1: shift the labels, not the logits (a narrowed logits
    // tensor would be copied, and its gradient padded back, each vocabulary-sized).
    let shifted = ops::next_token_labels(labels)?;
    ops::cross_entropy(
        &logits.to_dtype(DType::F32)?.reshape((b * t, v))?,
        &shifted.flatten_all()?,
    )
}

/// The task's mean loss over the batch's targets (see [`super::data::Batch::num_targets`]).
pub fn task_loss(task: TaskType, logits: &Tensor, targets: &Targets) -> Result<Tensor> {
    match (task, targets) {
        (TaskType::SeqCls, Targets::Class(l)) => classification_loss(logits, l),
        (TaskType::TokenCls | TaskType::Seq2SeqLm, Targets::Tokens(l)) => {
            classification_loss(logits, l)
        }
        (TaskType::CausalLm, Targets::Tokens(l)) => causal_lm_loss(logits, l),
        (TaskType::QuestionAns, Targets::Span { start, end }) => {
            let logits = logits.to_dtype(DType::F32)?;
            let s = classification_loss(&logits.i((.., .., 0))?.contiguous()?, start)?;
            let e = classification_loss(&logits.i((.., .., 1))?.contiguous()?, end)?;
            Ok(((s + e)? / 2.0)?)
        }
        (task, _) => Err(Error::Training(format!(
            "the batch's targets do not fit the task {}",
            task.as_str()
        ))),
    }
}

/// The loss of a batch as PEFT computes it for `model`'s active adapter, from the logits of
/// [`PeftModel::forward_with_prefix`] (`prefix` positions put in front by an input method): the
/// method's own loss when it has one (CPT), else the task's, with token labels padded with
/// `prefix` × -100 in front (what PEFT's `PeftModelForCausalLM` does: the last virtual position
/// then predicts the first label) and other outputs stripped of the prefix.
pub fn adapter_loss(
    model: &PeftModel,
    task: TaskType,
    logits: &Tensor,
    prefix: usize,
    targets: &Targets,
) -> Result<Tensor> {
    if prefix == 0 {
        return task_loss(task, logits, targets);
    }
    match targets {
        Targets::Tokens(labels) => {
            if let Some(loss) = model.method_loss(logits, labels)? {
                return Ok(loss);
            }
            let (b, _) = labels.dims2()?;
            let front = Tensor::full(IGNORE, (b, prefix), labels.device())?;
            let padded = Tensor::cat(&[&front, &labels.to_dtype(DType::I64)?], 1)?;
            task_loss(task, logits, &Targets::Tokens(padded))
        }
        _ => task_loss(task, &strip_front(logits, prefix)?, targets),
    }
}

/// The training loss of a batch, as [`adapter_loss`] computes it from
/// [`PeftModel::forward_with_prefix`]'s logits; a causal or seq2seq LM whose head can be fused
/// into the loss ([`PeftModel::causal_lm_loss`], [`PeftModel::seq2seq_lm_loss`]) skips the
/// logits.
pub fn training_loss(
    model: &PeftModel,
    task: TaskType,
    inputs: &crate::models::Inputs,
    targets: &Targets,
) -> Result<Tensor> {
    let fused = match (task, targets) {
        (TaskType::CausalLm, Targets::Tokens(labels)) if labels.dim(1)? >= 2 => {
            model.causal_lm_loss(inputs, labels, true)?
        }
        (TaskType::Seq2SeqLm, Targets::Tokens(labels)) => {
            model.seq2seq_lm_loss(inputs, labels, true)?
        }
        _ => None,
    };
    if let Some(loss) = fused {
        return Ok(loss);
    }
    let (logits, prefix) = model.forward_with_prefix(inputs, true)?;
    adapter_loss(model, task, &logits, prefix, targets)
}

/// The number of labels [`adapter_loss`] averages over, from the batch's count without a prefix:
/// for a causal LM, the first label of each row is predicted too (by the last virtual position).
pub fn targets_with_prefix(
    task: TaskType,
    targets: &Targets,
    num_targets: usize,
    prefix: usize,
) -> Result<usize> {
    match (task, targets, prefix) {
        (TaskType::CausalLm, Targets::Tokens(l), p) if p > 0 => {
            let first: Vec<i64> = l
                .narrow(1, 0, 1)?
                .flatten_all()?
                .to_dtype(DType::I64)?
                .to_vec1()?;
            Ok(num_targets + first.iter().filter(|&&x| x != IGNORE).count())
        }
        _ => Ok(num_targets),
    }
}

/// Drops the first `prefix` positions of a `[batch, seq, ...]` output.
fn strip_front(out: &Tensor, prefix: usize) -> Result<Tensor> {
    if prefix == 0 || out.rank() < 3 {
        return Ok(out.clone());
    }
    let seq = out.dim(1)?;
    Ok(out.narrow(1, prefix, seq - prefix)?)
}

/// What evaluation needs besides the model and the examples.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub collate: CollateOptions,
    pub batch_size: usize,
    /// TOKEN_CLS: tag names by id, for entity F1.
    pub label_names: Vec<String>,
    /// QUESTION_ANS: the longest answer considered, in tokens (run_qa's 30).
    pub max_answer_length: usize,
}

/// Mean loss and the task's metrics on `examples` (dropout off). `loss` is averaged over
/// targets (examples or tokens), so that perplexity is `exp(loss)` over every token.
pub fn evaluate(model: &PeftModel, examples: &[Example], opts: &EvalOptions) -> Result<Metrics> {
    if examples.is_empty() {
        return Err(Error::Data("the evaluation set is empty".into()));
    }
    let task = opts.collate.task;
    let device = model.base_model().device().clone();
    // Order does not change any metric; batching similar lengths avoids computing on padding.
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| examples[i].input_ids.len());
    let (mut loss_sum, mut n_targets) = (0f64, 0usize);
    let (mut pred_cls, mut gold_cls) = (Vec::new(), Vec::new());
    let (mut pred_tags, mut gold_tags) = (Vec::new(), Vec::new());
    let (mut pred_ans, mut gold_ans) = (Vec::new(), Vec::new());
    for chunk in order.chunks(opts.batch_size.max(1)) {
        let batch: Vec<&Example> = chunk.iter().map(|&i| &examples[i]).collect();
        let b = collate(&batch, &opts.collate, &device)?;
        let (logits, prefix) = crate::no_grad(|| model.forward_with_prefix(&b.inputs, false))?;
        if b.num_targets > 0 {
            let loss = crate::no_grad(|| adapter_loss(model, task, &logits, prefix, &b.targets))?;
            let n = targets_with_prefix(task, &b.targets, b.num_targets, prefix)?;
            loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * n as f64;
            n_targets += n;
        }
        let logits = strip_front(&logits, prefix)?.to_dtype(DType::F32)?;
        match task {
            TaskType::SeqCls => {
                let pred: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
                pred_cls.extend(pred.iter().map(|&p| p as i64));
                gold_cls.extend(batch.iter().map(|e| match e.target {
                    Target::Class(c) => c,
                    _ => -1,
                }));
            }
            TaskType::TokenCls => {
                let pred: Vec<Vec<u32>> = logits.argmax(D::Minus1)?.to_vec2()?;
                for (e, row) in batch.iter().zip(pred) {
                    let Target::Tokens(gold) = &e.target else {
                        continue;
                    };
                    let shift = pad_offset(&opts.collate, row.len(), gold.len());
                    let (mut p, mut g) = (Vec::new(), Vec::new());
                    for (j, &l) in gold.iter().enumerate() {
                        if l >= 0 {
                            p.push(tag_name(&opts.label_names, row[j + shift] as i64));
                            g.push(tag_name(&opts.label_names, l));
                        }
                    }
                    pred_tags.push(p);
                    gold_tags.push(g);
                }
            }
            TaskType::QuestionAns => {
                let start: Vec<Vec<f32>> = logits.i((.., .., 0))?.to_vec2()?;
                let end: Vec<Vec<f32>> = logits.i((.., .., 1))?.to_vec2()?;
                for (k, e) in batch.iter().enumerate() {
                    let Target::Span(span) = &e.target else {
                        continue;
                    };
                    let shift = pad_offset(&opts.collate, start[k].len(), e.input_ids.len());
                    let n = e.input_ids.len();
                    let s = &start[k][shift..shift + n];
                    let en = &end[k][shift..shift + n];
                    pred_ans.push(best_span(s, en, span, opts.max_answer_length));
                    gold_ans.push(span.answer.clone());
                }
            }
            _ => {}
        }
    }
    let loss = if n_targets > 0 {
        loss_sum / n_targets as f64
    } else {
        f64::NAN
    };
    let mut m = match task {
        TaskType::SeqCls => metrics::classification(&pred_cls, &gold_cls),
        TaskType::TokenCls => metrics::entity_f1(&pred_tags, &gold_tags),
        TaskType::QuestionAns => metrics::squad(&pred_ans, &gold_ans),
        TaskType::CausalLm | TaskType::Seq2SeqLm => {
            Metrics::from([("perplexity".to_string(), loss.exp())])
        }
        TaskType::FeatureExtraction => Metrics::new(),
    };
    m.insert("loss".into(), loss);
    Ok(m)
}

fn pad_offset(c: &CollateOptions, padded: usize, len: usize) -> usize {
    match c.padding_side {
        super::data::PaddingSide::Left => padded - len,
        super::data::PaddingSide::Right => 0,
    }
}

fn tag_name(names: &[String], id: i64) -> String {
    names
        .get(id as usize)
        .cloned()
        .unwrap_or_else(|| format!("LABEL_{id}"))
}

/// run_qa's post-processing for one example: the context span with the highest start + end
/// logit, start ≤ end, at most `max_len` tokens; its text from the context.
fn best_span(
    start: &[f32],
    end: &[f32],
    span: &super::data::tasks::Span,
    max_len: usize,
) -> String {
    let mut best: Option<(f32, usize, usize)> = None;
    for (i, &s) in start.iter().enumerate() {
        if span.offsets.get(i).copied().flatten().is_none() {
            continue;
        }
        let stop = (i + max_len).min(end.len());
        for (j, &e) in end.iter().enumerate().take(stop).skip(i) {
            if span.offsets.get(j).copied().flatten().is_none() {
                continue;
            }
            let score = s + e;
            if best.is_none_or(|(b, _, _)| score > b) {
                best = Some((score, i, j));
            }
        }
    }
    match best {
        Some((_, i, j)) => {
            let (a, _) = span.offsets[i].unwrap_or((0, 0));
            let (_, b) = span.offsets[j].unwrap_or((0, 0));
            span.context
                .chars()
                .skip(a)
                .take(b.saturating_sub(a))
                .collect()
        }
        None => String::new(),
    }
}
