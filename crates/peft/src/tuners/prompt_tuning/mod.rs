//! Prompt tuning (Lester et al., 2021) as PEFT 0.21 implements it (`PromptTuningConfig`,
//! `PromptEmbedding`): `num_virtual_tokens · num_transformer_submodules` learned vectors put in
//! front of the input embeddings (see [`crate::tuners::prompt_learning`] for how, per task).
//! Initialised at random (standard normal, `RANDOM`), from the word embeddings of
//! `prompt_tuning_init_text` tokenized with `tokenizer_name_or_path` and repeated or cut to the
//! table's length (`TEXT`), or from the embeddings of tokens drawn from the vocabulary
//! (`SAMPLE_VOCAB`). Saved as `prompt_embeddings`.

use candle_core::Var;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::config_err;
use crate::models::Model;
use crate::tuners::config::{adapter_json, parse_config, BaseFields, ConfigFields};
use crate::tuners::prompt_learning::encoders::normal;
use crate::tuners::prompt_learning::{
    rng, text_init_ids, word_embeddings, Kind, PromptLearningFields, PromptTuner, Table,
};
use crate::tuners::{InjectContext, Injected, MethodKind, TunerConfig};
use crate::Result;

/// `PromptTuningInit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PromptTuningInit {
    Text,
    SampleVocab,
    #[default]
    Random,
}

/// `PromptTuningConfig`, PEFT's field names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct PromptTuningConfig {
    #[serde(flatten)]
    pub prompt: PromptLearningFields,
    pub prompt_tuning_init: PromptTuningInit,
    pub prompt_tuning_init_text: Option<String>,
    /// The tokenizer of the TEXT init: a local directory (or `tokenizer.json`, or GGUF file), or
    /// a model name in the Hugging Face cache.
    pub tokenizer_name_or_path: Option<String>,
    /// What PEFT passes to `AutoTokenizer.from_pretrained`; `gguf_file` (the tokenizer of a GGUF
    /// file in that directory) is understood here.
    pub tokenizer_kwargs: Option<Map<String, Value>>,
    #[serde(flatten)]
    pub base: BaseFields,
}

impl ConfigFields for PromptTuningConfig {
    const PEFT_TYPE: &'static str = "PROMPT_TUNING";
    const NAME: &'static str = "PromptTuningConfig";

    /// PEFT's `__post_init__`: TEXT needs the tokenizer and the text; tokenizer_kwargs only
    /// with TEXT.
    fn validate(&self) -> Result<()> {
        let text = self.prompt_tuning_init == PromptTuningInit::Text;
        if self
            .tokenizer_kwargs
            .as_ref()
            .is_some_and(|k| !k.is_empty())
            && !text
        {
            return Err(config_err!(
                "tokenizer_kwargs only valid when using prompt_tuning_init='TEXT'."
            ));
        }
        check_text_init(
            text,
            &self.prompt_tuning_init_text,
            &self.tokenizer_name_or_path,
        )
    }
}

/// PEFT's checks of a TEXT init.
pub(crate) fn check_text_init(
    text_init: bool,
    text: &Option<String>,
    tokenizer: &Option<String>,
) -> Result<()> {
    if text_init && tokenizer.as_deref().is_none_or(str::is_empty) {
        return Err(config_err!(
            "prompt_tuning_init = \"TEXT\" needs `tokenizer_name_or_path` (the model's tokenizer: \
             a directory with tokenizer.json, or a model name in the Hugging Face cache)"
        ));
    }
    if text_init && text.is_none() {
        return Err(config_err!(
            "prompt_tuning_init = \"TEXT\" needs `prompt_tuning_init_text` (e.g. \"Classify if \
             the review is positive or negative\")"
        ));
    }
    Ok(())
}

impl PromptTuningConfig {
    pub fn from_json(v: &Value, strict: bool) -> Result<Self> {
        parse_config(v, strict)
    }

    /// `num_virtual_tokens` virtual tokens, initialised at random.
    pub fn new(num_virtual_tokens: usize) -> Self {
        Self {
            prompt: PromptLearningFields {
                num_virtual_tokens: Some(num_virtual_tokens),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// The TEXT init from `text`, tokenized with the tokenizer at `tokenizer`.
    pub fn with_text_init(mut self, text: &str, tokenizer: &str) -> Self {
        self.prompt_tuning_init = PromptTuningInit::Text;
        self.prompt_tuning_init_text = Some(text.to_string());
        self.tokenizer_name_or_path = Some(tokenizer.to_string());
        self
    }
}

/// Where a TEXT init's token ids come from: the config's `prompt_tuning_init_text`,
/// `tokenizer_name_or_path` and `tokenizer_kwargs`.
#[derive(Clone, Copy, Default)]
pub(crate) struct InitText<'a> {
    pub text: Option<&'a str>,
    pub tokenizer: Option<&'a str>,
    pub tokenizer_kwargs: Option<&'a Map<String, Value>>,
}

/// The initial `[rows, d]` table of prompt tuning (and multitask prompt tuning's shared prompt):
/// RANDOM standard normal, TEXT the word embeddings of the init text's ids, SAMPLE_VOCAB those of
/// ids drawn uniformly from the vocabulary.
pub(crate) fn initial_table(
    model: &dyn Model,
    init: PromptTuningInit,
    source: InitText<'_>,
    (rows, width): (usize, usize),
    seed: u64,
) -> Result<Var> {
    let InitText {
        text,
        tokenizer,
        tokenizer_kwargs,
    } = source;
    let mut r = rng(seed);
    let vocab = model.dims().vocab_size;
    match init {
        PromptTuningInit::Random => normal(rows, width, 1.0, &mut r, model.device()),
        PromptTuningInit::SampleVocab => {
            let ids: Vec<u32> = (0..rows).map(|_| r.random_range(0..vocab as u32)).collect();
            Ok(Var::from_tensor(&word_embeddings(model, &ids)?)?)
        }
        PromptTuningInit::Text => {
            let ids = text_init_ids(
                tokenizer.unwrap_or_default(),
                tokenizer_kwargs,
                text.unwrap_or_default(),
                rows,
                vocab,
            )?;
            tracing::debug!("TEXT init from token ids {ids:?}");
            Ok(Var::from_tensor(&word_embeddings(model, &ids)?)?)
        }
    }
}

impl TunerConfig for PromptTuningConfig {
    fn peft_type(&self) -> &'static str {
        Self::PEFT_TYPE
    }
    fn tuner_name(&self) -> &'static str {
        "PromptEmbedding"
    }
    fn kind(&self) -> MethodKind {
        MethodKind::Input
    }
    fn base(&self) -> &BaseFields {
        &self.base
    }
    fn base_mut(&mut self) -> &mut BaseFields {
        &mut self.base
    }
    fn to_adapter_json(&self) -> Value {
        adapter_json(self)
    }
    fn inject(&mut self, model: &mut dyn Model, ctx: &InjectContext<'_>) -> Result<Injected> {
        ConfigFields::validate(self)?;
        let task = self.base.task_type.or(Some(model.info().task));
        self.prompt.fill(model, task, false);
        let layout = self.prompt.layout(
            "prompt tuning",
            model,
            Kind::Embeddings {
                decoder_prompt: false,
            },
        )?;
        let (rows, width) = (layout.rows(), layout.width());
        // An adapter loaded from a file (or for inference) holds the saved table, whatever the
        // init was.
        let table = if ctx.trainable && !ctx.from_file {
            initial_table(
                model,
                self.prompt_tuning_init,
                InitText {
                    text: self.prompt_tuning_init_text.as_deref(),
                    tokenizer: self.tokenizer_name_or_path.as_deref(),
                    tokenizer_kwargs: self.tokenizer_kwargs.as_ref(),
                },
                (rows, width),
                ctx.seed,
            )?
        } else {
            Table::new(rows, width, model.device())?.table
        };
        Ok(Injected {
            modules: Vec::new(),
            tuner: Box::new(PromptTuner {
                layout,
                encoder: Box::new(Table { table }),
                what: "prompt tuning",
            }),
        })
    }
}
