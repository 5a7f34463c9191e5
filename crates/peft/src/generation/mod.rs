//! Text generation with transformers' `generate` semantics: greedy or sampled decoding
//! (temperature, top-k, top-p, repetition penalty), a key/value cache so each step runs only the
//! new token, batches of prompts padded on the left, EOS and stop strings, and encoder-decoder
//! models (the encoder runs once; its output rides in the [`Cache`]). Works on anything with a
//! cached forward pass: a plain model or a `PeftModel` with its adapters active.

pub mod batch;
pub mod logits;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;

use crate::io::tokenizer::Tokenizer;
use crate::models::{Cache, Inputs, Model, ModelDims};
use crate::{Error, Result};

pub use logits::SamplingConfig;

/// What generation needs of a model: its sizes and special ids, and a forward pass that attends
/// to a cache and appends to it.
pub trait Generate {
    fn dims(&self) -> ModelDims;
    fn device(&self) -> &Device;
    fn forward_with_cache(&self, inputs: &Inputs, cache: Option<&mut Cache>) -> Result<Tensor>;
    /// Positions put in front of every sequence besides the prompt's own (an input method's
    /// virtual tokens): they take room in the context window.
    fn virtual_tokens(&self) -> usize {
        0
    }
}

impl<T: Model + ?Sized> Generate for T {
    fn dims(&self) -> ModelDims {
        Model::dims(self)
    }
    fn device(&self) -> &Device {
        Model::device(self)
    }
    fn forward_with_cache(&self, inputs: &Inputs, cache: Option<&mut Cache>) -> Result<Tensor> {
        Model::forward_with_cache(self, inputs, cache, false)
    }
}

/// Options of one `generate` call (transformers' `GenerationConfig` names).
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Tokens that end a sequence; empty means the model's own (`ModelDims::eos_token_ids`).
    pub eos_token_ids: Vec<u32>,
    /// Fills left padding and finished rows; default: the model's pad id, else its first EOS.
    pub pad_token_id: Option<u32>,
    /// A row ends once its decoded text contains one of these (needs a tokenizer).
    pub stop_strings: Vec<String>,
    /// Seeds the sampler: the same seed, prompts and model give the same tokens.
    pub seed: u64,
    /// PEFT's `task_ids`, one per prompt, for adapters with a prompt per task (multitask prompt
    /// tuning).
    pub task_ids: Option<Vec<u32>>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 20,
            sampling: SamplingConfig::default(),
            eos_token_ids: Vec::new(),
            pad_token_id: None,
            stop_strings: Vec::new(),
            seed: 0,
            task_ids: None,
        }
    }
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced an EOS token (included in its tokens).
    Eos,
    /// Its text came to contain a stop string.
    StopString,
    /// `max_new_tokens`, or the context window, was reached.
    Length,
}

/// The new tokens of each row (EOS included when it ended on one, no padding) and why it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub tokens: Vec<Vec<u32>>,
    pub finish: Vec<FinishReason>,
}

/// Generates continuations of `prompts` (token ids, one row each, any lengths). `tokenizer` is
/// needed only for stop strings.
pub fn generate(
    model: &(impl Generate + ?Sized),
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
) -> Result<Generated> {
    generate_stream(model, prompts, cfg, tokenizer, &mut |_, _| {})
}

/// [`generate`], streaming: `on_token` sees every new token as it is chosen (`row`, `id`).
pub fn generate_stream(
    model: &(impl Generate + ?Sized),
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<Generated> {
    crate::no_grad(|| run(model, prompts, cfg, tokenizer, on_token))
}

fn run(
    model: &(impl Generate + ?Sized),
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<Generated> {
    let dims = model.dims();
    let device = model.device().clone();
    let virtual_tokens = model.virtual_tokens();
    check(prompts, cfg, tokenizer, &dims, virtual_tokens)?;
    let b = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let eos = if cfg.eos_token_ids.is_empty() {
        dims.eos_token_ids.clone()
    } else {
        cfg.eos_token_ids.clone()
    };
    let pad = cfg
        .pad_token_id
        .or(dims.pad_token_id)
        .or(eos.first().copied())
        .unwrap_or(0);
    // Decoder-only models see the prompt in their window; encoder-decoder decoders start empty.
    let budget = match dims.max_positions {
        Some(max) if !dims.is_encoder_decoder => {
            cfg.max_new_tokens.min(max - longest - virtual_tokens)
        }
        Some(max) => cfg.max_new_tokens.min(max.saturating_sub(1)),
        None => cfg.max_new_tokens,
    };

    // Left padding: every prompt ends at the same column, so each step's new token lines up.
    let mut mask: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let mut m = vec![0; longest - p.len()];
            m.resize(longest, 1);
            m
        })
        .collect();
    let padded: Vec<u32> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(pad, longest - p.len()).chain(p.iter().copied()))
        .collect();
    let ids = Tensor::from_vec(padded, (b, longest), &device)?;
    let any_padding = prompts.iter().any(|p| p.len() < longest);
    let mask_tensor = |m: &[Vec<u32>]| -> Result<Tensor> {
        let cols = m.first().map_or(0, Vec::len);
        Ok(Tensor::from_vec(m.concat(), (b, cols), &device)?)
    };
    // transformers' positions for left padding: count real tokens, padding gets 1.
    let mut next_pos: Vec<i64> = mask
        .iter()
        .map(|m| m.iter().map(|&x| x as i64).sum())
        .collect();
    let positions: Vec<u32> = mask
        .iter()
        .flat_map(|m| {
            let mut c = 0i64;
            m.iter()
                .map(move |&x| {
                    c += x as i64;
                    if x == 0 {
                        1
                    } else {
                        (c - 1) as u32
                    }
                })
                .collect::<Vec<_>>()
        })
        .collect();

    let task_ids = match &cfg.task_ids {
        Some(t) => Some(Tensor::from_vec(t.clone(), (b,), &device)?),
        None => None,
    };
    let mut cache = Cache::default();
    let mut first = Inputs {
        logits_to_keep: 1,
        task_ids: task_ids.clone(),
        ..Default::default()
    };
    let enc_mask = if any_padding {
        Some(mask_tensor(&mask)?)
    } else {
        None
    };
    let mut seen: Vec<Vec<u32>>;
    if dims.is_encoder_decoder {
        let start = dims
            .decoder_start_token_id
            .or(dims.pad_token_id)
            .ok_or_else(|| {
                Error::Config(
                "encoder-decoder generation needs decoder_start_token_id (or pad_token_id) in the \
                 model config"
                    .into(),
            )
            })?;
        first.input_ids = Some(ids.clone());
        first.attention_mask = enc_mask.clone();
        first.decoder_input_ids = Some(Tensor::from_vec(vec![start; b], (b, 1), &device)?);
        seen = vec![vec![start]; b];
    } else {
        first.input_ids = Some(ids);
        first.attention_mask = enc_mask;
        first.position_ids = Some(Tensor::from_vec(positions, (b, longest), &device)?);
        seen = prompts.to_vec();
    }

    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut finish: Vec<Option<FinishReason>> = vec![None; b];
    let mut inputs = first;
    for step in 0..budget {
        let logits = model.forward_with_cache(&inputs, Some(&mut cache))?;
        let last = match logits.rank() {
            3 => logits.narrow(1, logits.dim(1)? - 1, 1)?.squeeze(1)?,
            2 => logits,
            r => {
                return Err(Error::Config(format!(
                    "generation needs a language-model head; the model returned rank-{r} output"
                )))
            }
        };
        let rows = last.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut chosen = Vec::with_capacity(b);
        for (i, mut scores) in rows.into_iter().enumerate() {
            if finish[i].is_some() {
                chosen.push(pad);
                continue;
            }
            logits::process(&mut scores, &seen[i], &cfg.sampling);
            let t = logits::choose(&scores, cfg.sampling.do_sample, &mut rng);
            chosen.push(t);
            tokens[i].push(t);
            seen[i].push(t);
            on_token(i, t);
            if eos.contains(&t) {
                finish[i] = Some(FinishReason::Eos);
            } else if let (false, Some(tok)) = (cfg.stop_strings.is_empty(), tokenizer) {
                let text = tok.decode(&tokens[i], false)?;
                if cfg.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                    finish[i] = Some(FinishReason::StopString);
                }
            }
        }
        if finish.iter().all(Option::is_some) || step + 1 == budget {
            break;
        }
        let new = Tensor::from_vec(chosen, (b, 1), &device)?;
        inputs = if dims.is_encoder_decoder {
            Inputs {
                input_ids: inputs.input_ids.take(),
                attention_mask: inputs.attention_mask.take(),
                decoder_input_ids: Some(new),
                logits_to_keep: 1,
                task_ids: task_ids.clone(),
                ..Default::default()
            }
        } else {
            for m in mask.iter_mut() {
                m.push(1);
            }
            let pos: Vec<u32> = next_pos.iter().map(|&p| p as u32).collect();
            for p in next_pos.iter_mut() {
                *p += 1;
            }
            Inputs {
                input_ids: Some(new),
                attention_mask: if any_padding {
                    Some(mask_tensor(&mask)?)
                } else {
                    None
                },
                position_ids: Some(Tensor::from_vec(pos, (b, 1), &device)?),
                logits_to_keep: 1,
                task_ids: task_ids.clone(),
                ..Default::default()
            }
        };
    }
    Ok(Generated {
        tokens,
        finish: finish
            .into_iter()
            .map(|f| f.unwrap_or(FinishReason::Length))
            .collect(),
    })
}

/// Errors a caller can fix, found before any forward pass.
fn check(
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
    dims: &ModelDims,
    virtual_tokens: usize,
) -> Result<()> {
    if prompts.is_empty() {
        return Err(Error::Data("generate: no prompts given".into()));
    }
    if let Some(t) = &cfg.task_ids {
        if t.len() != prompts.len() {
            return Err(Error::Data(format!(
                "generate: {} task_ids for {} prompts; give one task id per prompt",
                t.len(),
                prompts.len()
            )));
        }
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(Error::Data(format!(
            "generate: prompt {i} is empty; a decoder needs at least one token to continue from \
             (add the BOS token)"
        )));
    }
    if let Some((i, t)) = prompts.iter().enumerate().find_map(|(i, p)| {
        p.iter()
            .find(|&&t| t as usize >= dims.vocab_size)
            .map(|t| (i, t))
    }) {
        return Err(Error::Data(format!(
            "generate: prompt {i} holds token id {t}, outside the vocabulary of {} tokens",
            dims.vocab_size
        )));
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if let Some(max) = dims.max_positions {
        let limit = if dims.is_encoder_decoder {
            max
        } else {
            max - 1
        };
        if longest + virtual_tokens > limit {
            let virt = if virtual_tokens > 0 {
                format!(" plus the adapter's {virtual_tokens} virtual tokens")
            } else {
                String::new()
            };
            return Err(Error::Data(format!(
                "prompt of {longest} tokens{virt} does not fit the model's context window of \
                 {max} positions{}; shorten the prompt",
                if dims.is_encoder_decoder {
                    ""
                } else {
                    " (at least one position must stay free for the answer)"
                }
            )));
        }
    }
    let s = &cfg.sampling;
    if s.do_sample && s.temperature <= 0.0 {
        return Err(Error::Config(format!(
            "temperature must be > 0 when sampling (got {}); use greedy decoding instead of 0",
            s.temperature
        )));
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(Error::Config(format!(
            "top_p must be in (0, 1] (got {})",
            s.top_p
        )));
    }
    if s.repetition_penalty <= 0.0 {
        return Err(Error::Config(format!(
            "repetition_penalty must be > 0 (got {}); 1.0 switches it off",
            s.repetition_penalty
        )));
    }
    if !cfg.stop_strings.is_empty() && tokenizer.is_none() {
        return Err(Error::Config(
            "stop strings need a tokenizer to decode the generated text".into(),
        ));
    }
    Ok(())
}
