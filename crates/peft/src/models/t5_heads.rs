//! The heads transformers puts on T5 / mT5 besides the LM head: `T5ForSequenceClassification`
//! (the decoder's state at the last EOS of the source, through `classification_head.dense`, tanh
//! and `classification_head.out_proj`), `T5ForTokenClassification` (the encoder alone, then
//! `classifier`) and `T5ForQuestionAnswering` (`qa_outputs` on every decoder position). The two
//! classification classes keep the encoder-decoder under `transformer.`, so their module names
//! (and PEFT's adapter keys) carry that prefix.

use candle_core::{DType, Tensor};

use super::{num_labels, LoadOptions, TaskType};
use crate::layers::Linear;
use crate::layers::Loader;
use crate::{impl_modules, ops, Error, Result};

/// Whichever head the task needs; the others stay `None`.
pub(crate) struct T5Heads {
    /// `None` when the LM head is tied to `shared` (or the task is not SEQ_2_SEQ_LM).
    pub lm_head: Option<Linear>,
    pub classification_dense: Option<Linear>,
    pub classification_out: Option<Linear>,
    pub classifier: Option<Linear>,
    pub qa_outputs: Option<Linear>,
    /// `classifier_dropout` (transformers' default 0.0).
    pub dropout: f64,
}
impl_modules!(T5Heads {
    lm_head,
    classification_dense,
    classification_out,
    classifier,
    qa_outputs
});

/// The transformers class of each T5 task (`family` is `T5` or `MT5`) and the path its
/// encoder-decoder lives under.
pub(crate) fn class_of(
    family: &str,
    task: TaskType,
    model_type: &str,
) -> Result<(String, &'static str)> {
    Ok(match task {
        TaskType::Seq2SeqLm => (format!("{family}ForConditionalGeneration"), ""),
        TaskType::FeatureExtraction => (format!("{family}EncoderModel"), ""),
        TaskType::SeqCls => (format!("{family}ForSequenceClassification"), "transformer"),
        TaskType::TokenCls => (format!("{family}ForTokenClassification"), "transformer"),
        TaskType::QuestionAns => (format!("{family}ForQuestionAnswering"), ""),
        TaskType::CausalLm => {
            return Err(Error::Config(format!(
                "{model_type} is an encoder-decoder model and has no CAUSAL_LM head; use \
                 SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS, QUESTION_ANS or FEATURE_EXTRACTION"
            )))
        }
    })
}

/// Whether the task runs the decoder (token classification and the bare encoder do not).
pub(crate) fn needs_decoder(task: TaskType) -> bool {
    matches!(
        task,
        TaskType::Seq2SeqLm | TaskType::SeqCls | TaskType::QuestionAns
    )
}

impl T5Heads {
    /// Loads (or, when the checkpoint lacks it, initialises) the task's head. `root` is the
    /// model's top level; `lm_head` the SEQ_2_SEQ_LM head, loaded by the caller.
    pub fn load(
        root: &Loader,
        task: TaskType,
        config: &serde_json::Value,
        opts: &LoadOptions,
        d_model: usize,
        lm_head: Option<Linear>,
    ) -> Result<Self> {
        let labels = num_labels(config, opts.num_labels);
        let mut heads = T5Heads {
            lm_head,
            classification_dense: None,
            classification_out: None,
            classifier: None,
            qa_outputs: None,
            dropout: config
                .get("classifier_dropout")
                .and_then(|v| v.as_f64())
                .unwrap_or(0.0),
        };
        match task {
            TaskType::SeqCls => {
                let h = root.pp("classification_head");
                heads.classification_dense =
                    Some(h.pp("dense").linear_or_init(d_model, d_model, true)?);
                heads.classification_out =
                    Some(h.pp("out_proj").linear_or_init(d_model, labels, true)?);
            }
            TaskType::TokenCls => {
                heads.classifier = Some(
                    root.pp("classifier")
                        .linear_or_init(d_model, labels, true)?,
                )
            }
            TaskType::QuestionAns => {
                heads.qa_outputs = Some(
                    root.pp("qa_outputs")
                        .linear_or_init(d_model, labels, true)?,
                )
            }
            _ => {}
        }
        Ok(heads)
    }

    /// Module names of the head (kept out of `all-linear`).
    pub fn names(&self) -> Vec<String> {
        [
            &self.classification_dense,
            &self.classification_out,
            &self.classifier,
            &self.qa_outputs,
        ]
        .into_iter()
        .flatten()
        .map(|l| l.name.clone())
        .collect()
    }

    /// SEQ_CLS: the decoder's hidden state `[batch, t, d]` at each row's last EOS of `input_ids`
    /// through the classification head, `[batch, labels]`. As in transformers every row must hold
    /// the same number (at least one) of EOS tokens.
    pub fn classify_sequence(
        &self,
        hidden: &Tensor,
        input_ids: &Tensor,
        eos: u32,
        train: bool,
    ) -> Result<Tensor> {
        let (dense, out) = match (&self.classification_dense, &self.classification_out) {
            (Some(d), Some(o)) => (d, o),
            _ => {
                return Err(Error::Config(
                    "T5 loaded without its classification head".into(),
                ))
            }
        };
        let (b, t, d) = hidden.dims3()?;
        let rows: Vec<Vec<u32>> = input_ids.to_dtype(DType::U32)?.to_vec2()?;
        let counts: Vec<usize> = rows
            .iter()
            .map(|r| r.iter().filter(|&&x| x == eos).count())
            .collect();
        if counts.iter().any(|&c| c == 0 || c != counts[0]) {
            return Err(Error::Data(format!(
                "T5 sequence classification reads the decoder at the last EOS token ({eos}) of each \
                 row; every row must hold the same number (at least one) of them, got {counts:?}; \
                 end each input with EOS (the T5 tokenizer does by default)"
            )));
        }
        let idx: Vec<u32> = rows
            .iter()
            .map(|r| r.iter().rposition(|&x| x == eos).unwrap_or(0) as u32)
            .collect();
        if let Some(&i) = idx.iter().find(|&&i| i as usize >= t) {
            return Err(Error::Data(format!(
                "EOS at position {i} of input_ids is past the {t} decoder positions; give \
                 decoder_input_ids as long as input_ids (or none, to shift input_ids right)"
            )));
        }
        let idx = Tensor::from_vec(idx, (b, 1, 1), hidden.device())?
            .broadcast_as((b, 1, d))?
            .contiguous()?;
        let x = hidden.gather(&idx, 1)?.squeeze(1)?;
        let x = ops::dropout(&x, self.dropout, train)?;
        let x = dense.forward_t(&x, train)?.tanh()?;
        let x = ops::dropout(&x, self.dropout, train)?;
        out.forward_t(&x, train)
    }

    /// TOKEN_CLS on the encoder output, QUESTION_ANS on the decoder output: `[batch, t, labels]`
    /// (for QUESTION_ANS, start and end logits in the last dimension).
    pub fn per_token(&self, hidden: &Tensor, train: bool) -> Result<Tensor> {
        if let Some(c) = &self.classifier {
            return c.forward_t(&ops::dropout(hidden, self.dropout, train)?, train);
        }
        match &self.qa_outputs {
            Some(qa) => qa.forward_t(hidden, train),
            None => Err(Error::Config("T5 loaded without a per-token head".into())),
        }
    }
}
