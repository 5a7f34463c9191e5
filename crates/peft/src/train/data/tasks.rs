//! Rows → tokenised examples, one builder per task, following the Hugging Face example scripts
//! (run_glue, run_ner, run_clm, run_summarization, run_qa):
//! - SEQ_CLS: text (and optional pair) with a class label.
//! - TOKEN_CLS: words and tags; the first sub-word of each word carries the tag, the other
//!   sub-words and the special tokens are ignored (-100).
//! - CAUSAL_LM: plain text concatenated and cut into blocks (labels = inputs), or prompt and
//!   completion pairs with the loss on the completion (and the closing eos) only.
//! - SEQ_2_SEQ_LM: source ids; target ids as labels.
//! - QUESTION_ANS: question and context (truncated, never the question), with the answer's token
//!   span; an answer cut off by truncation points at the first token, as transformers does.

use std::collections::BTreeSet;
use std::path::Path;
use tokenizers::{
    Tokenizer as HfTokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use super::Record;
use crate::io::tokenizer::Tokenizer;
use crate::models::TaskType;
use crate::train::config::DataSection;
use crate::{Error, Result};

/// The label ignored by the loss (torch's `ignore_index`).
pub const IGNORE: i64 = -100;

/// What an example is trained to predict.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// SEQ_CLS: the class id.
    Class(i64),
    /// TOKEN_CLS and CAUSAL_LM: one label per input position (-100: no loss there). For causal
    /// LM the model shifts them: position i's logits predict label i + 1.
    Tokens(Vec<i64>),
    /// SEQ_2_SEQ_LM: the target ids.
    Sequence(Vec<u32>),
    /// QUESTION_ANS.
    Span(Box<Span>),
}

/// An answer span and what evaluation needs to turn predicted positions back into text.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    /// Per token: its character range in the context, or `None` outside the context.
    pub offsets: Vec<Option<(usize, usize)>>,
    pub context: String,
    pub answer: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub token_type_ids: Vec<u32>,
    pub target: Target,
    /// PEFT's `task_ids` entry of this example (`[data] task_id_column`), for adapters with a
    /// prompt per task.
    pub task_id: Option<u32>,
}

/// Class names, or plain integer ids when the file's labels are integers and no names are set.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelSet {
    pub names: Option<Vec<String>>,
    pub num_labels: usize,
}

impl LabelSet {
    /// From `[data] label_names`, else from the training labels: integers as given (at least
    /// `min` classes), names in sorted order.
    pub fn infer(given: Option<&[String]>, labels: &[String], min: usize) -> LabelSet {
        if let Some(names) = given {
            return LabelSet {
                names: Some(names.to_vec()),
                num_labels: names.len(),
            };
        }
        let ints: Option<Vec<i64>> = labels.iter().map(|l| l.trim().parse().ok()).collect();
        match ints {
            Some(ints) => LabelSet {
                names: None,
                num_labels: (ints.into_iter().max().unwrap_or(-1) + 1).max(min as i64) as usize,
            },
            None => {
                let names: Vec<String> = labels
                    .iter()
                    .cloned()
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                LabelSet {
                    num_labels: names.len().max(min),
                    names: Some(names),
                }
            }
        }
    }

    /// The id of `raw`, or an error naming the file, line and the label set.
    pub fn id(&self, raw: &str, file: &Path, line: usize) -> Result<i64> {
        if let Some(names) = &self.names {
            if let Some(i) = names.iter().position(|n| n == raw) {
                return Ok(i as i64);
            }
        }
        match raw.trim().parse::<i64>() {
            Ok(i) if i >= 0 && (i as usize) < self.num_labels => Ok(i),
            Ok(i) if self.names.is_none() => Err(Error::Data(format!(
                "{}: line {line}: label {i} is out of range for num_labels = {}",
                file.display(),
                self.num_labels
            ))),
            _ => Err(Error::Data(format!(
                "{}: line {line}: label `{raw}` is not in the label set {}; set [data] \
                 label_names or fix the row",
                file.display(),
                match &self.names {
                    Some(n) => format!("{n:?}"),
                    None => format!("0..{}", self.num_labels),
                }
            ))),
        }
    }

    /// The name of class `id` (`LABEL_i` without names, as transformers).
    pub fn name(&self, id: usize) -> String {
        self.names
            .as_ref()
            .and_then(|n| n.get(id).cloned())
            .unwrap_or_else(|| format!("LABEL_{id}"))
    }
}

/// Everything the builders need besides the rows.
pub struct TaskData<'a> {
    pub task: TaskType,
    pub data: &'a DataSection,
    /// SEQ_CLS / TOKEN_CLS.
    pub labels: Option<&'a LabelSet>,
    /// Appended to causal-LM completions.
    pub eos_id: Option<u32>,
}

impl TaskData<'_> {
    /// The raw labels of `records` (SEQ_CLS labels, TOKEN_CLS tags), for [`LabelSet::infer`].
    pub fn raw_labels(
        task: TaskType,
        data: &DataSection,
        records: &[Record],
        file: &Path,
    ) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for r in records {
            match task {
                TaskType::SeqCls => out.push(r.text(&data.label_column, file)?),
                TaskType::TokenCls => out.extend(r.list(&data.tags_column, file)?),
                _ => {}
            }
        }
        Ok(out)
    }
}

/// Tokenises `records` of `file` for `spec.task`; with `[data] task_id_column`, each example
/// carries its row's task id.
pub fn build_examples(
    spec: &TaskData,
    records: &[Record],
    file: &Path,
    tok: &Tokenizer,
) -> Result<Vec<Example>> {
    let mut out = build_task_examples(spec, records, file, tok)?;
    let Some(col) = &spec.data.task_id_column else {
        return Ok(out);
    };
    if out.len() != records.len() {
        return Err(Error::Config(format!(
            "[data] task_id_column needs one example per row, but packing the text into blocks              mixes rows ({} rows, {} blocks); give prompt/completion pairs (prompt_column) instead",
            records.len(),
            out.len()
        )));
    }
    for (e, r) in out.iter_mut().zip(records) {
        let raw = r.text(col, file)?;
        let id = raw.trim().parse::<u32>().map_err(|_| {
            Error::Data(format!(
                "{}: line {}: task id `{raw}` in column `{col}` is not a non-negative integer",
                file.display(),
                r.line
            ))
        })?;
        e.task_id = Some(id);
    }
    Ok(out)
}

fn build_task_examples(
    spec: &TaskData,
    records: &[Record],
    file: &Path,
    tok: &Tokenizer,
) -> Result<Vec<Example>> {
    let d = spec.data;
    let max = d.max_length;
    let need_labels = || {
        spec.labels
            .ok_or_else(|| Error::Config(format!("{} needs a label set", spec.task.as_str())))
    };
    match spec.task {
        TaskType::SeqCls => {
            let labels = need_labels()?;
            let hf = truncating(tok, max, TruncationStrategy::LongestFirst)?;
            each_record(records, |r| {
                let text = r.text(&d.text_column, file)?;
                let pair = d
                    .text_pair_column
                    .as_deref()
                    .map(|c| r.text(c, file))
                    .transpose()?;
                let enc = match &pair {
                    Some(p) => hf.encode((text.as_str(), p.as_str()), true),
                    None => hf.encode(text.as_str(), true),
                }
                .map_err(|e| tok_err(file, r.line, e))?;
                let label = labels.id(&r.text(&d.label_column, file)?, file, r.line)?;
                Ok(Example {
                    task_id: None,
                    input_ids: enc.get_ids().to_vec(),
                    token_type_ids: enc.get_type_ids().to_vec(),
                    target: Target::Class(label),
                })
            })
        }
        TaskType::TokenCls => {
            let labels = need_labels()?;
            let hf = truncating(tok, max, TruncationStrategy::LongestFirst)?;
            each_record(records, |r| token_cls_example(&hf, r, d, labels, file))
        }
        TaskType::CausalLm => match &d.prompt_column {
            Some(p) => each_record(records, |r| {
                prompt_completion_example(tok, r, p, d, spec.eos_id, file)
            }),
            None => packed_blocks(tok, records, d, file),
        },
        TaskType::Seq2SeqLm => {
            let hf = truncating(tok, max, TruncationStrategy::LongestFirst)?;
            let hf_t = truncating(
                tok,
                d.max_target_length.unwrap_or(max),
                TruncationStrategy::LongestFirst,
            )?;
            each_record(records, |r| {
                let src = r.text(&d.source_column, file)?;
                let tgt = r.text(&d.target_column, file)?;
                let s = hf
                    .encode(src.as_str(), true)
                    .map_err(|e| tok_err(file, r.line, e))?;
                let t = hf_t
                    .encode(tgt.as_str(), true)
                    .map_err(|e| tok_err(file, r.line, e))?;
                Ok(Example {
                    task_id: None,
                    input_ids: s.get_ids().to_vec(),
                    token_type_ids: vec![0; s.get_ids().len()],
                    target: Target::Sequence(t.get_ids().to_vec()),
                })
            })
        }
        TaskType::QuestionAns => {
            let hf = truncating(tok, max, TruncationStrategy::OnlySecond)?;
            each_record(records, |r| qa_example(&hf, r, d, file))
        }
        TaskType::FeatureExtraction => Err(Error::Config(
            "FEATURE_EXTRACTION has no training objective; choose SEQ_CLS, TOKEN_CLS, \
             CAUSAL_LM, SEQ_2_SEQ_LM or QUESTION_ANS"
                .into(),
        )),
    }
}

/// Every record made into an example on all cores (tokenizing is most of the wait before the
/// first training step), in file order; the error of the first record that fails, as a
/// sequential pass would report it.
fn each_record<F>(records: &[Record], f: F) -> Result<Vec<Example>>
where
    F: Fn(&Record) -> Result<Example> + Sync + Send,
{
    use rayon::prelude::*;
    let out: Vec<Result<Example>> = records.par_iter().map(f).collect();
    out.into_iter().collect()
}

fn tok_err(file: &Path, line: usize, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{}: line {line}: {e}", file.display()))
}

/// A copy of the tokenizer that truncates to `max` tokens (special tokens included) the way
/// transformers' `truncation=True` (or `"only_second"`) does.
fn truncating(tok: &Tokenizer, max: usize, strategy: TruncationStrategy) -> Result<HfTokenizer> {
    let mut hf = tok.inner().clone();
    hf.with_truncation(Some(TruncationParams {
        max_length: max,
        strategy,
        stride: 0,
        direction: TruncationDirection::Right,
    }))
    .map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok(hf)
}

fn token_cls_example(
    hf: &HfTokenizer,
    r: &Record,
    d: &DataSection,
    labels: &LabelSet,
    file: &Path,
) -> Result<Example> {
    let words = r.list(&d.tokens_column, file)?;
    let tags = r.list(&d.tags_column, file)?;
    if words.is_empty() {
        return Err(Error::Data(format!(
            "{}: line {}: `{}` is empty",
            file.display(),
            r.line,
            d.tokens_column
        )));
    }
    if words.len() != tags.len() {
        return Err(Error::Data(format!(
            "{}: line {}: {} words but {} tags; give one tag per word",
            file.display(),
            r.line,
            words.len(),
            tags.len()
        )));
    }
    let ids: Vec<i64> = tags
        .iter()
        .map(|t| labels.id(t, file, r.line))
        .collect::<Result<_>>()?;
    let enc = hf
        .encode(words.as_slice(), true)
        .map_err(|e| tok_err(file, r.line, e))?;
    Ok(Example {
        task_id: None,
        input_ids: enc.get_ids().to_vec(),
        token_type_ids: enc.get_type_ids().to_vec(),
        target: Target::Tokens(align_word_labels(enc.get_word_ids(), &ids)),
    })
}

/// run_ner's alignment: the first sub-word of each word gets the word's label; later sub-words
/// of the same word and special tokens (no word) get -100.
pub fn align_word_labels(word_ids: &[Option<u32>], word_labels: &[i64]) -> Vec<i64> {
    let mut prev = None;
    word_ids
        .iter()
        .map(|w| {
            let out = match w {
                Some(i) if prev != Some(*i) => {
                    word_labels.get(*i as usize).copied().unwrap_or(IGNORE)
                }
                _ => IGNORE,
            };
            prev = *w;
            out
        })
        .collect()
}

fn prompt_completion_example(
    tok: &Tokenizer,
    r: &Record,
    prompt_col: &str,
    d: &DataSection,
    eos: Option<u32>,
    file: &Path,
) -> Result<Example> {
    let prompt = r.text(prompt_col, file)?;
    let completion = r.text(&d.completion_column, file)?;
    let hf = tok.inner();
    let p = hf
        .encode(prompt.as_str(), true)
        .map_err(|e| tok_err(file, r.line, e))?;
    let c = hf
        .encode(completion.as_str(), false)
        .map_err(|e| tok_err(file, r.line, e))?;
    let mut completion_ids = c.get_ids().to_vec();
    completion_ids.extend(eos);
    let (ids, labels) = prompt_completion_ids(p.get_ids(), &completion_ids, d.max_length);
    if labels.iter().all(|&l| l == IGNORE) {
        return Err(Error::Data(format!(
            "{}: line {}: the prompt alone fills max_length = {}; nothing of the completion \
             is left to learn from (raise max_length or shorten the prompt)",
            file.display(),
            r.line,
            d.max_length
        )));
    }
    Ok(Example {
        task_id: None,
        token_type_ids: vec![0; ids.len()],
        input_ids: ids,
        target: Target::Tokens(labels),
    })
}

/// Prompt then completion, cut to `max` tokens; labels ignore the prompt.
pub fn prompt_completion_ids(
    prompt: &[u32],
    completion: &[u32],
    max: usize,
) -> (Vec<u32>, Vec<i64>) {
    let mut ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let mut labels: Vec<i64> = std::iter::repeat_n(IGNORE, prompt.len())
        .chain(completion.iter().map(|&i| i as i64))
        .collect();
    ids.truncate(max);
    labels.truncate(max);
    (ids, labels)
}

/// run_clm's `group_texts`: every text tokenised (with the tokenizer's special tokens),
/// concatenated, and cut into `block_size` blocks; the remainder is dropped unless it is all
/// there is.
fn packed_blocks(
    tok: &Tokenizer,
    records: &[Record],
    d: &DataSection,
    file: &Path,
) -> Result<Vec<Example>> {
    let block = d.block_size.unwrap_or(d.max_length).max(2);
    use rayon::prelude::*;
    let encoded: Vec<Result<Vec<u32>>> = records
        .par_iter()
        .map(|r| {
            let text = r.text(&d.text_column, file)?;
            let enc = tok
                .inner()
                .encode(text.as_str(), true)
                .map_err(|e| tok_err(file, r.line, e))?;
            Ok(enc.get_ids().to_vec())
        })
        .collect();
    let mut all = Vec::new();
    for ids in encoded {
        all.extend_from_slice(&ids?);
    }
    Ok(pack(&all, block)
        .into_iter()
        .map(|ids| Example {
            task_id: None,
            token_type_ids: vec![0; ids.len()],
            target: Target::Tokens(ids.iter().map(|&i| i as i64).collect()),
            input_ids: ids,
        })
        .collect())
}

/// Cuts `ids` into `block`-long pieces, dropping a short remainder unless it is the only piece.
pub fn pack(ids: &[u32], block: usize) -> Vec<Vec<u32>> {
    let full = ids.len() / block;
    if full == 0 {
        return if ids.len() >= 2 {
            vec![ids.to_vec()]
        } else {
            Vec::new()
        };
    }
    ids.chunks_exact(block).map(<[u32]>::to_vec).collect()
}

fn qa_example(hf: &HfTokenizer, r: &Record, d: &DataSection, file: &Path) -> Result<Example> {
    let question = r.text(&d.question_column, file)?;
    let context = r.text(&d.context_column, file)?;
    let answer = r.text(&d.answer_column, file)?;
    let start_char = match &d.answer_start_column {
        Some(c) => {
            let s = r.text(c, file)?;
            s.trim().parse::<usize>().map_err(|_| {
                Error::Data(format!(
                    "{}: line {}: `{c}` = `{s}` is not a character offset",
                    file.display(),
                    r.line
                ))
            })?
        }
        None => match context.find(&answer) {
            Some(byte) => context[..byte].chars().count(),
            None => {
                return Err(Error::Data(format!(
                    "{}: line {}: the answer `{answer}` does not occur in the context; give \
                     [data] answer_start_column or fix the row",
                    file.display(),
                    r.line
                )))
            }
        },
    };
    let end_char = start_char + answer.chars().count();
    let enc = hf
        .encode_char_offsets((question.as_str(), context.as_str()), true)
        .map_err(|e| tok_err(file, r.line, e))?;
    let seq = enc.get_sequence_ids();
    let offsets: Vec<Option<(usize, usize)>> = enc
        .get_offsets()
        .iter()
        .zip(&seq)
        .map(|(o, s)| (*s == Some(1)).then_some(*o))
        .collect();
    let (start, end) = answer_tokens(&offsets, start_char, end_char);
    Ok(Example {
        task_id: None,
        input_ids: enc.get_ids().to_vec(),
        token_type_ids: enc.get_type_ids().to_vec(),
        target: Target::Span(Box::new(Span {
            start,
            end,
            offsets,
            context,
            answer,
        })),
    })
}

/// The first and last token covering characters `start..end` of the context, or `(0, 0)` (the
/// first token, transformers' "no answer" position) when truncation cut the answer off.
pub fn answer_tokens(
    offsets: &[Option<(usize, usize)>],
    start: usize,
    end: usize,
) -> (usize, usize) {
    let ctx: Vec<(usize, (usize, usize))> = offsets
        .iter()
        .enumerate()
        .filter_map(|(i, o)| o.map(|o| (i, o)))
        .collect();
    let (Some(first), Some(last)) = (ctx.first(), ctx.last()) else {
        return (0, 0);
    };
    if first.1 .0 > start || last.1 .1 < end {
        return (0, 0);
    }
    let s = ctx
        .iter()
        .find(|(_, (a, b))| *a <= start && start < *b)
        .or_else(|| ctx.iter().find(|(_, (a, _))| *a >= start));
    let e = ctx
        .iter()
        .rev()
        .find(|(_, (a, b))| *a < end && end <= *b)
        .or_else(|| ctx.iter().rev().find(|(_, (_, b))| *b <= end));
    match (s, e) {
        (Some(s), Some(e)) if s.0 <= e.0 => (s.0, e.0),
        _ => (0, 0),
    }
}
