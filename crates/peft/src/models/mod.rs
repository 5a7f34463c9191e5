//! Model architectures, one file per family, loading Hugging Face checkpoints under their Hugging
//! Face module names. Models know nothing about tuners: they build their layers through a
//! [`Loader`] and expose them through [`Modules`].

pub mod bert;
pub mod clip;
pub mod decoder;
pub mod gpt2;
pub mod kbit;
pub mod llama;
pub mod nezha;
pub mod opt;
pub mod pooling;
pub mod quantized_checkpoint;
pub mod t5;
mod t5_heads;
pub mod unet;
pub mod vae;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::io::gguf::find_gguf;
use crate::io::{read_json, Weights};
pub use crate::layers::cache::{Cache, KeyValue};
use crate::layers::Modules;
use crate::layers::{HeadInit, Loader};
use crate::{Error, Result};

/// PEFT's task types; they pick the model head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskType {
    #[serde(rename = "SEQ_CLS")]
    SeqCls,
    #[serde(rename = "TOKEN_CLS")]
    TokenCls,
    #[serde(rename = "CAUSAL_LM")]
    CausalLm,
    #[serde(rename = "SEQ_2_SEQ_LM")]
    Seq2SeqLm,
    #[serde(rename = "QUESTION_ANS")]
    QuestionAns,
    #[serde(rename = "FEATURE_EXTRACTION")]
    FeatureExtraction,
}

impl TaskType {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskType::SeqCls => "SEQ_CLS",
            TaskType::TokenCls => "TOKEN_CLS",
            TaskType::CausalLm => "CAUSAL_LM",
            TaskType::Seq2SeqLm => "SEQ_2_SEQ_LM",
            TaskType::QuestionAns => "QUESTION_ANS",
            TaskType::FeatureExtraction => "FEATURE_EXTRACTION",
        }
    }

    /// PEFT adds these head modules to `modules_to_save` for the task.
    pub fn default_modules_to_save(self) -> &'static [&'static str] {
        match self {
            TaskType::SeqCls | TaskType::TokenCls => &["classifier", "score"],
            TaskType::QuestionAns => &["qa_outputs"],
            _ => &[],
        }
    }
}

impl std::str::FromStr for TaskType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| {
            Error::Config(format!(
                "unknown task_type `{s}`; expected one of SEQ_CLS, TOKEN_CLS, CAUSAL_LM, \
                 SEQ_2_SEQ_LM, QUESTION_ANS, FEATURE_EXTRACTION"
            ))
        })
    }
}

/// A batch of model inputs, with transformers' names. Ids are `u32` `[batch, seq]`; masks are 1
/// for real tokens and 0 for padding.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// Token ids; `None` when `inputs_embeds` is given instead.
    pub input_ids: Option<Tensor>,
    /// `[batch, seq, hidden]`, used in place of the token-embedding lookup (what prompt tuning and
    /// p-tuning feed the model). Position and type embeddings are still added by the model.
    pub inputs_embeds: Option<Tensor>,
    /// `[batch, past + seq]` when a [`Cache`] holds `past` positions (transformers' convention);
    /// a mask of only `seq` columns is taken to attend to every past position.
    pub attention_mask: Option<Tensor>,
    pub token_type_ids: Option<Tensor>,
    /// Explicit positions `[batch, seq]`; by default each architecture's own rule (past length
    /// onward; RoBERTa counts from the padding index over non-padding tokens).
    pub position_ids: Option<Tensor>,
    /// Encoder-decoder models: the decoder's side.
    pub decoder_input_ids: Option<Tensor>,
    pub decoder_inputs_embeds: Option<Tensor>,
    pub decoder_attention_mask: Option<Tensor>,
    /// Language-model heads compute logits for only the last this-many positions; 0 means all
    /// (transformers' `logits_to_keep`). Generation uses 1.
    pub logits_to_keep: usize,
    /// Diffusion models, with diffusers' names: the UNet's noisy latents, or the VAE's image
    /// (`[batch, 3, h, w]`, values in [-1, 1]) or latents to decode (`[batch, latent_channels,
    /// h, w]`).
    pub sample: Option<Tensor>,
    /// The UNet's diffusion timestep: one per row (`[batch]`) or one for all (`[]` or `[1]`).
    pub timestep: Option<Tensor>,
    /// The UNet's text conditioning `[batch, seq, cross_attention_dim]`.
    pub encoder_hidden_states: Option<Tensor>,
    /// PEFT's `task_ids`: one task index per row (`[batch]`, u32), for adapters that hold one
    /// prompt per task (multitask prompt tuning). Models ignore it.
    pub task_ids: Option<Tensor>,
}

impl Inputs {
    /// Inputs of token ids alone.
    pub fn new(input_ids: Tensor) -> Self {
        Self {
            input_ids: Some(input_ids),
            ..Default::default()
        }
    }

    /// The token ids, or an error naming what the model needed them for.
    pub fn ids(&self) -> Result<&Tensor> {
        self.input_ids.as_ref().ok_or_else(|| {
            Error::Data("input_ids are required here (no inputs_embeds given)".into())
        })
    }

    /// `(batch, seq)` of the encoder-side (or only) input, from ids or embeddings.
    pub fn batch_seq(&self) -> Result<(usize, usize)> {
        match (&self.input_ids, &self.inputs_embeds) {
            (Some(ids), _) => Ok(ids.dims2()?),
            (None, Some(e)) => {
                let (b, t, _) = e.dims3()?;
                Ok((b, t))
            }
            (None, None) => Err(Error::Data(
                "neither input_ids nor inputs_embeds given".into(),
            )),
        }
    }
}

/// Sizes that prompt methods, caches and generation need, whatever the architecture (all zero
/// for models without tokens, such as a UNet).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelDims {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Attention layers (the decoder's, for an encoder-decoder model).
    pub num_layers: usize,
    pub num_attention_heads: usize,
    /// Fewer than `num_attention_heads` with grouped-query attention.
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// Encoder layers of an encoder-decoder model, else 0.
    pub num_encoder_layers: usize,
    pub is_encoder_decoder: bool,
    /// Longest sequence the position scheme allows, if it has a limit.
    pub max_positions: Option<usize>,
    pub pad_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// The id an encoder-decoder decoder starts from.
    pub decoder_start_token_id: Option<u32>,
}

/// Facts about a loaded model that tuners and the PEFT wrapper need.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// `model_type` from config.json (`bert`, ...).
    pub model_type: String,
    /// The transformers class this model corresponds to (`BertForSequenceClassification`).
    pub architecture: String,
    pub task: TaskType,
    /// Module names of the output head (excluded from `all-linear`).
    pub head: Vec<String>,
    /// config.json as read, written back when a merged model is saved.
    pub config: serde_json::Value,
    pub dir: PathBuf,
}

/// A loaded model: a forward pass plus its layers.
pub trait Model: Modules + Send + Sync {
    fn info(&self) -> &ModelInfo;
    fn dims(&self) -> ModelDims;
    fn device(&self) -> &Device;

    /// The token-embedding lookup that `inputs_embeds` replaces: `[batch, seq]` ids →
    /// `[batch, seq, hidden]` (adapters on the embedding layer included).
    fn embed_tokens(&self, ids: &Tensor, train: bool) -> Result<Tensor>;

    /// Logits for heads (`[batch, classes]`, `[batch, seq, classes]`, `[batch, seq, vocab]`); last
    /// hidden states for FEATURE_EXTRACTION. With a `cache`, attends to the positions it holds
    /// and appends the new ones. `train` switches dropout on.
    fn forward_with_cache(
        &self,
        inputs: &Inputs,
        cache: Option<&mut Cache>,
        train: bool,
    ) -> Result<Tensor>;

    fn forward(&self, inputs: &Inputs, train: bool) -> Result<Tensor> {
        self.forward_with_cache(inputs, None, train)
    }

    /// The language-modelling loss of a batch against `labels` lined up with the output
    /// positions (`[batch, seq]`, -100 ignored: a causal LM's next tokens, already shifted; a
    /// seq2seq model's decoder targets), computed without materialising the logits where the
    /// head allows it ([`decoder::head_loss`]); `None` for a model without a language-modelling
    /// head, whose loss the caller takes from [`Model::forward`]'s logits.
    fn lm_loss(&self, _inputs: &Inputs, _labels: &Tensor, _train: bool) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// The mark that enrolls this model in a gradient-checkpointing session; `None` for a model
    /// whose blocks are not checkpointed.
    fn checkpointing(&self) -> Option<&crate::grad::checkpoint::Enrollment> {
        None
    }

    /// A module path from an adapter file as this model names the module: the identity, except
    /// for models whose library renamed its modules between versions (CLIP's text encoder lost
    /// its `text_model.` wrapper in transformers 5), so adapters saved under either name load.
    fn canonical_module_path(&self, path: &str) -> String {
        path.to_string()
    }

    /// Every output under its transformers / diffusers name (what `peft forward` writes):
    /// `logits` (or `last_hidden_state` for FEATURE_EXTRACTION) by default; a model with several
    /// outputs lists them all (CLIP's `pooler_output`, the VAE's `latent_dist.mean`, ...).
    fn outputs(&self, inputs: &Inputs, train: bool) -> Result<Vec<(String, Tensor)>> {
        let name = match self.info().task {
            TaskType::FeatureExtraction => "last_hidden_state",
            _ => "logits",
        };
        Ok(vec![(name.to_string(), self.forward(inputs, train)?)])
    }
}

/// Options for loading a model from a directory.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub task: Option<TaskType>,
    /// Overrides `num_labels` / `id2label` from config.json for classification heads.
    pub num_labels: Option<usize>,
    pub device: Device,
    /// Seed for heads the checkpoint does not contain.
    pub seed: u64,
    /// Quantize the base's Linear layers at load (transformers' `quantization_config`):
    /// every Linear but transformers 5's default skips (`lm_head`, a bias-less `score`; a
    /// classifier with a bias is quantized, as transformers 5 does: name it in
    /// `llm_int8_skip_modules` to train it), or only those `llm_int8_skip_modules` lists. A head
    /// the checkpoint lacks is initialized dense.
    pub quantization: Option<crate::quant::BitsAndBytesConfig>,
    /// Keep a GGUF file's block-quantized Linear weights in their blocks (QLoRA on a GGUF base)
    /// instead of dequantizing them to f32 at load as transformers does (the default). The
    /// blocks' product quantizes activations to 8 bits as llama.cpp does, so outputs differ
    /// from transformers' by the quantization of the activations.
    pub keep_gguf_quantized: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            task: None,
            num_labels: None,
            device: Device::Cpu,
            seed: 42,
            quantization: None,
            keep_gguf_quantized: false,
        }
    }
}

/// Loads a model: a Hugging Face directory (config.json + safetensors), a GGUF file, or a
/// directory holding one GGUF file (its config comes from the GGUF metadata). The head comes from
/// `opts.task` or else from config.json's `architectures`.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Box<dyn Model>> {
    let (config, weights, dir, config_path) = open_checkpoint(path)?;
    let std = config
        .get("initializer_range")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.02);
    let mut stored_compute_dtype = None;
    if let Some(q) = config.get("quantization_config") {
        // A checkpoint saved quantized: its layers come back quantized from their stored
        // state; the config is checked so an unsupported method is named, not misread.
        let c = crate::quant::BitsAndBytesConfig::from_json(q)
            .map_err(|e| Error::Config(format!("{}: {e}", config_path.display())))?;
        if let Some(crate::quant::Scheme::FourBit { compute_dtype, .. }) = c
            .scheme()
            .map_err(|e| Error::Config(format!("{}: {e}", config_path.display())))?
        {
            stored_compute_dtype = Some(compute_dtype);
        }
        tracing::info!(
            "{}: a {} checkpoint; its quantized layers stay quantized",
            config_path.display(),
            if c.load_in_8bit { "8-bit" } else { "4-bit" }
        );
    }
    let mut init = HeadInit::new(std, opts.seed).with_quantization(opts.quantization.as_ref())?;
    init.keep_gguf_quantized = opts.keep_gguf_quantized;
    init.stored_compute_dtype = stored_compute_dtype;
    // diffusers models name their class instead of a model_type.
    if let Some(class) = config.get("_class_name").and_then(|v| v.as_str()) {
        return Ok(match class {
            "UNet2DConditionModel" => Box::new(unet::UNet2DConditionModel::load(
                &weights,
                &init,
                config.clone(),
                &dir,
                opts,
            )?),
            "AutoencoderKL" => Box::new(vae::AutoencoderKl::load(
                &weights,
                &init,
                config.clone(),
                &dir,
                opts,
            )?),
            other => {
                return Err(Error::Config(format!(
                    "unsupported diffusers model `{other}` in {}; supported: \
                     UNet2DConditionModel, AutoencoderKL (and CLIPTextModel from transformers)",
                    config_path.display()
                )))
            }
        });
    }
    let model_type = config
        .get("model_type")
        .and_then(|v| v.as_str())
        .ok_or_else(|| Error::Config(format!("{}: no `model_type`", config_path.display())))?
        .to_string();
    let dir = dir.as_path();
    let model: Box<dyn Model> = match model_type.as_str() {
        "bert" => Box::new(bert::Bert::load(
            &weights,
            &init,
            config.clone(),
            dir,
            opts,
        )?),
        "roberta" | "xlm-roberta" => Box::new(bert::Bert::load_roberta(
            &weights,
            &init,
            config.clone(),
            dir,
            opts,
        )?),
        "nezha" => Box::new(nezha::load(&weights, &init, config.clone(), dir, opts)?),
        "llama" | "mistral" | "qwen2" => Box::new(llama::Llama::load(
            &weights,
            &init,
            config.clone(),
            dir,
            opts,
        )?),
        "gpt2" => Box::new(gpt2::Gpt2::load(
            &weights,
            &init,
            config.clone(),
            dir,
            opts,
        )?),
        "opt" => Box::new(opt::Opt::load(&weights, &init, config.clone(), dir, opts)?),
        "t5" | "mt5" => Box::new(t5::T5::load(&weights, &init, config.clone(), dir, opts)?),
        "clip_text_model" | "clip" => Box::new(clip::ClipText::load(
            &weights,
            &init,
            config.clone(),
            dir,
            opts,
        )?),
        other => {
            return Err(Error::Config(format!(
                "unsupported model_type `{other}` in {}; supported: bert, clip_text_model, gpt2, \
                 llama, mistral, mt5, nezha, opt, qwen2, roberta, t5, xlm-roberta (and diffusers' \
                 UNet2DConditionModel and AutoencoderKL)",
                config_path.display()
            )))
        }
    };
    let initialized = init
        .initialized
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    if !initialized.is_empty() {
        tracing::warn!(
            "{} not in the checkpoint; initialised randomly (train it, or load an adapter that saves it)",
            initialized.join(", ")
        );
    }
    Ok(model)
}

/// The config (config.json, or the GGUF metadata's equivalent), the weights, the model's
/// directory and where the config came from.
fn open_checkpoint(path: &Path) -> Result<(serde_json::Value, Weights, PathBuf, PathBuf)> {
    let config_path = path.join("config.json");
    if path.is_dir() && config_path.exists() {
        let config = read_json(&config_path)?;
        return Ok((
            config,
            Weights::from_dir(path)?,
            path.to_path_buf(),
            config_path,
        ));
    }
    match find_gguf(path)? {
        Some(gguf) => {
            let weights = Weights::from_gguf(&gguf)?;
            let config = weights
                .gguf()
                .map(|g| g.config_json())
                .transpose()?
                .unwrap_or_default();
            let dir = gguf.parent().unwrap_or(Path::new(".")).to_path_buf();
            Ok((config, weights, dir, gguf))
        }
        None if path.exists() => Err(Error::io(
            &config_path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not a model: expected a directory with config.json, a .gguf file, or a \
                 directory holding one .gguf file",
            ),
        )),
        None => Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "model path does not exist"),
        )),
    }
}

/// Reads the task from config.json's `architectures` (`...ForSequenceClassification`, ...).
pub fn task_from_architectures(config: &serde_json::Value) -> Option<TaskType> {
    let arch = config.get("architectures")?.as_array()?.first()?.as_str()?;
    Some(if arch.ends_with("ForSequenceClassification") {
        TaskType::SeqCls
    } else if arch.ends_with("ForTokenClassification") {
        TaskType::TokenCls
    } else if arch.ends_with("ForQuestionAnswering") {
        TaskType::QuestionAns
    } else if arch.ends_with("ForCausalLM") || arch.ends_with("LMHeadModel") {
        TaskType::CausalLm
    } else if arch.ends_with("ForConditionalGeneration") {
        TaskType::Seq2SeqLm
    } else {
        TaskType::FeatureExtraction
    })
}

/// `num_labels` as transformers derives it: explicit option, then `id2label`, then `num_labels`,
/// then 2.
pub fn num_labels(config: &serde_json::Value, explicit: Option<usize>) -> usize {
    explicit
        .or_else(|| {
            config
                .get("id2label")
                .and_then(|m| m.as_object())
                .map(|m| m.len())
        })
        .or_else(|| {
            config
                .get("num_labels")
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
        })
        .unwrap_or(2)
}

pub(crate) fn loader<'a>(
    weights: &'a Weights,
    prefix: &'a str,
    init: &'a HeadInit,
    opts: &LoadOptions,
) -> Loader<'a> {
    Loader::new(weights, Some(prefix), opts.device.clone(), init)
}

/// Writes `model` as a Hugging Face directory: config.json (with the head's architecture and
/// label count), model.safetensors with every weight under its transformers name, and the
/// tokenizer files of the source directory. transformers loads the result directly.
pub fn save_pretrained(model: &dyn Model, dir: &Path) -> Result<()> {
    let info = model.info();
    let mut tensors = Vec::new();
    for module in model.modules() {
        for p in module.params() {
            // A quantized base is written dequantized, in the dense layout (a quantized
            // Conv1D `[in, out]` again): the directory is a dense checkpoint.
            tensors.push((p.name.clone(), p.checkpoint_value()?.detach()));
        }
    }
    let mut config = info.config.clone();
    if let Some(obj) = config.as_object_mut() {
        obj.insert(
            "architectures".into(),
            serde_json::json!([info.architecture]),
        );
        // Every weight is written dense: the checkpoint is not a quantized one any more, and
        // its dtype is the one written (transformers 5 reads `dtype`, 4.x `torch_dtype`).
        if obj.remove("quantization_config").is_some() {
            tracing::info!("quantized base written dense: config.json without quantization_config");
        }
        let written = tensors
            .iter()
            .map(|(_, t)| t.dtype())
            .find(|d| d.is_float())
            .map(|d| match d {
                candle_core::DType::BF16 => "bfloat16",
                candle_core::DType::F16 => "float16",
                _ => "float32",
            });
        if let Some(name) = written {
            for key in ["torch_dtype", "dtype"] {
                if obj.contains_key(key) {
                    obj.insert(key.into(), name.into());
                }
            }
        }
        if let Some(head) = info.head.first() {
            let rows = model
                .modules()
                .iter()
                .find(|m| m.name() == head)
                .and_then(|m| m.params().first().map(|p| p.base().dims()[0]));
            if let (Some(n), TaskType::SeqCls | TaskType::TokenCls) = (rows, info.task) {
                obj.insert("num_labels".into(), n.into());
                let id2label: serde_json::Map<String, serde_json::Value> = (0..n)
                    .map(|i| (i.to_string(), format!("LABEL_{i}").into()))
                    .collect();
                let label2id: serde_json::Map<String, serde_json::Value> =
                    (0..n).map(|i| (format!("LABEL_{i}"), i.into())).collect();
                let same = obj
                    .get("id2label")
                    .and_then(|m| m.as_object())
                    .is_some_and(|m| m.len() == n);
                if !same {
                    obj.insert("id2label".into(), id2label.into());
                    obj.insert("label2id".into(), label2id.into());
                }
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    crate::io::save_safetensors(&dir.join("model.safetensors"), &tensors)?;
    let json = serde_json::to_string_pretty(&config).map_err(|e| Error::Config(e.to_string()))?;
    crate::io::write_atomic(&dir.join("config.json"), json.as_bytes())?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
    ] {
        let src = info.dir.join(f);
        if src.exists() {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            crate::io::write_atomic(&dir.join(f), &bytes)?;
        }
    }
    // A model loaded from a GGUF file has its tokenizer in the file's metadata: write it out so
    // the saved directory is complete.
    if !dir.join("tokenizer.json").exists() {
        if let Some(gguf) = find_gguf(&info.dir).ok().flatten() {
            let file = crate::io::gguf::GgufFile::open(&gguf)?;
            if let Ok(tok) = file.tokenizer_json() {
                let json = serde_json::to_vec(&tok).map_err(|e| Error::Config(e.to_string()))?;
                crate::io::write_atomic(&dir.join("tokenizer.json"), &json)?;
                let mut cfg = serde_json::Map::new();
                if let Some(t) = file.chat_template() {
                    cfg.insert("chat_template".into(), t.into());
                }
                let vocab = tok["model"]["vocab"].as_object();
                for (key, id_key) in [
                    ("bos_token", "bos_token_id"),
                    ("eos_token", "eos_token_id"),
                    ("pad_token", "pad_token_id"),
                ] {
                    let id = config.get(id_key).and_then(|v| v.as_u64());
                    let name = vocab.and_then(|v| {
                        v.iter()
                            .find(|(_, i)| i.as_u64() == id)
                            .map(|(t, _)| t.clone())
                    });
                    if let Some(name) = name {
                        cfg.insert(key.into(), name.into());
                    }
                }
                let json =
                    serde_json::to_vec_pretty(&cfg).map_err(|e| Error::Config(e.to_string()))?;
                crate::io::write_atomic(&dir.join("tokenizer_config.json"), &json)?;
            }
        }
    }
    Ok(())
}
