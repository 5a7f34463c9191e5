//! Batches with dynamic padding (to the longest example of the batch), as transformers' data
//! collators build them: `DataCollatorWithPadding`, `...ForTokenClassification`,
//! `...ForLanguageModeling(mlm=False)` / completion-only, `...ForSeq2Seq`, and QA's
//! start/end positions.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::tasks::{Example, Target, IGNORE};
use crate::models::{Inputs, TaskType};
use crate::{Error, Result};

/// Which side padding goes on. Right suits training every model here; left is what batched
/// generation with decoders wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PaddingSide {
    #[default]
    Right,
    Left,
}

#[derive(Debug, Clone, Copy)]
pub struct CollateOptions {
    pub task: TaskType,
    pub pad_id: u32,
    pub padding_side: PaddingSide,
    /// SEQ_2_SEQ_LM: the decoder's first input id (T5: the pad id).
    pub decoder_start_id: u32,
}

/// What the loss compares the logits with.
#[derive(Debug, Clone)]
pub enum Targets {
    /// `[batch]` i64.
    Class(Tensor),
    /// `[batch, seq]` i64, -100 where ignored (TOKEN_CLS, CAUSAL_LM, SEQ_2_SEQ_LM's decoder).
    Tokens(Tensor),
    /// `[batch]` i64 each.
    Span { start: Tensor, end: Tensor },
}

#[derive(Debug, Clone)]
pub struct Batch {
    pub inputs: Inputs,
    pub targets: Targets,
    /// Labels the loss averages over: examples, or non-ignored tokens (after the causal shift).
    /// Gradient accumulation divides by the sum of these over its micro-batches.
    pub num_targets: usize,
}

/// Pads `batch` into model inputs and targets.
pub fn collate(batch: &[&Example], opts: &CollateOptions, device: &Device) -> Result<Batch> {
    if batch.is_empty() {
        return Err(Error::Data("cannot collate an empty batch".into()));
    }
    let b = batch.len();
    let t = batch.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
    let left = opts.padding_side == PaddingSide::Left;
    let pad_row = |n: usize| if left { t - n } else { 0 };
    let mut ids = vec![opts.pad_id; b * t];
    let mut types = vec![0u32; b * t];
    let mut mask = vec![0u32; b * t];
    for (i, e) in batch.iter().enumerate() {
        let n = e.input_ids.len();
        let at = i * t + pad_row(n);
        ids[at..at + n].copy_from_slice(&e.input_ids);
        types[at..at + n].copy_from_slice(&e.token_type_ids);
        mask[at..at + n].iter_mut().for_each(|m| *m = 1);
    }
    let mut inputs = Inputs {
        input_ids: Some(Tensor::from_vec(ids, (b, t), device)?),
        attention_mask: Some(Tensor::from_vec(mask, (b, t), device)?),
        ..Default::default()
    };
    // All-zero segment ids are the models' default; passing none keeps decoders, which have no
    // segment embedding (or use it differently, as GPT-2), unaffected.
    if types.iter().any(|&x| x != 0) {
        inputs.token_type_ids = Some(Tensor::from_vec(types, (b, t), device)?);
    }
    if batch.iter().any(|e| e.task_id.is_some()) {
        let ids = batch
            .iter()
            .map(|e| {
                e.task_id.ok_or_else(|| {
                    Error::Data("a batch mixes examples with and without a task id".into())
                })
            })
            .collect::<Result<Vec<u32>>>()?;
        inputs.task_ids = Some(Tensor::from_vec(ids, (b,), device)?);
    }
    let mismatch = |what: &str| {
        Error::Data(format!(
            "a {} batch holds an example with {what} targets",
            opts.task.as_str()
        ))
    };
    let (targets, num_targets) = match opts.task {
        TaskType::SeqCls => {
            let labels = batch
                .iter()
                .map(|e| match &e.target {
                    Target::Class(c) => Ok(*c),
                    _ => Err(mismatch("non-class")),
                })
                .collect::<Result<Vec<i64>>>()?;
            (Targets::Class(Tensor::new(labels.as_slice(), device)?), b)
        }
        TaskType::TokenCls | TaskType::CausalLm => {
            let mut labels = vec![IGNORE; b * t];
            let mut count = 0;
            for (i, e) in batch.iter().enumerate() {
                let Target::Tokens(l) = &e.target else {
                    return Err(mismatch("non-token"));
                };
                let at = i * t + pad_row(l.len());
                labels[at..at + l.len()].copy_from_slice(l);
                // Causal LM: position 0's label is never predicted (the model shifts).
                let skip = usize::from(opts.task == TaskType::CausalLm);
                count += l.iter().skip(skip).filter(|&&x| x != IGNORE).count();
            }
            (
                Targets::Tokens(Tensor::from_vec(labels, (b, t), device)?),
                count,
            )
        }
        TaskType::Seq2SeqLm => {
            let tt = batch
                .iter()
                .map(|e| match &e.target {
                    Target::Sequence(s) => Ok(s.len()),
                    _ => Err(mismatch("non-sequence")),
                })
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .max()
                .unwrap_or(0);
            let mut labels = vec![IGNORE; b * tt];
            let mut dec = vec![opts.pad_id; b * tt];
            let mut dec_mask = vec![0u32; b * tt];
            let mut count = 0;
            for (i, e) in batch.iter().enumerate() {
                let Target::Sequence(s) = &e.target else {
                    unreachable!("checked above")
                };
                for (j, &id) in s.iter().enumerate() {
                    labels[i * tt + j] = id as i64;
                    dec_mask[i * tt + j] = 1;
                }
                // transformers' shift_right: the start id, then the labels but the last.
                dec[i * tt] = opts.decoder_start_id;
                for j in 1..s.len() {
                    dec[i * tt + j] = s[j - 1];
                }
                count += s.len();
            }
            inputs.decoder_input_ids = Some(Tensor::from_vec(dec, (b, tt), device)?);
            inputs.decoder_attention_mask = Some(Tensor::from_vec(dec_mask, (b, tt), device)?);
            (
                Targets::Tokens(Tensor::from_vec(labels, (b, tt), device)?),
                count,
            )
        }
        TaskType::QuestionAns => {
            let (mut s, mut en) = (Vec::with_capacity(b), Vec::with_capacity(b));
            for e in batch {
                let Target::Span(sp) = &e.target else {
                    return Err(mismatch("non-span"));
                };
                let shift = pad_row(e.input_ids.len());
                s.push((sp.start + shift) as i64);
                en.push((sp.end + shift) as i64);
            }
            (
                Targets::Span {
                    start: Tensor::new(s.as_slice(), device)?,
                    end: Tensor::new(en.as_slice(), device)?,
                },
                b,
            )
        }
        TaskType::FeatureExtraction => {
            return Err(Error::Config(
                "FEATURE_EXTRACTION has no training targets".into(),
            ))
        }
    };
    Ok(Batch {
        inputs,
        targets,
        num_targets,
    })
}
