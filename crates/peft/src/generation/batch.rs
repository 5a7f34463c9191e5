//! Continuous batching: many independent generation requests — each with its own prompt, adapter,
//! sampling options, token budget and key/value cache — advanced together one step at a time, as
//! a server needs them. Requests join the running decode batch at any step, whatever adapter they
//! name; new prompts are prefilled in chunks between decode steps (a long prompt never stalls the
//! rows already running); a row that finishes or is cancelled leaves at once.
//!
//! Every request keeps its own cache: nothing computed for one request is ever reused for another
//! (or for another adapter). Rows that decode together are left-padded to a common cache length
//! with an attention mask, exactly as [`super::generate`] pads a batch of prompts, so each row's
//! greedy tokens are those of `generate` on that prompt alone (up to float rounding between batch
//! shapes). Adapters whose method cannot share a batch with others (DoRA, PEFT's rule) decode in
//! a batch of their own.
//!
//! The scheduler is method-neutral: it knows adapters only by name, through [`BatchModel`].

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::{BTreeSet, VecDeque};

use super::logits::{self, SamplingConfig};
use super::FinishReason;
use crate::models::{Cache, Inputs, KeyValue, Model, ModelDims};
use crate::{Error, Result};

/// What continuous batching needs of a model: a forward pass in which row `i` runs through
/// adapter `adapters[i]`, attending to and extending a batched cache.
pub trait BatchModel {
    fn dims(&self) -> ModelDims;
    fn device(&self) -> Device;

    /// Whether rows using `adapter` may share a forward pass with rows using other adapters. When
    /// false, every batch [`BatchModel::forward_rows`] gets with it names only it.
    fn shares_batch(&self, _adapter: &str) -> bool {
        true
    }

    /// Readies `adapter` before a request using it is admitted; `in_use` holds the adapters of
    /// the requests already admitted (which must stay ready). `Ok(false)`: not now (every adapter
    /// slot is busy), the request waits; an error fails the request.
    fn prepare(&mut self, _adapter: &str, _in_use: &BTreeSet<String>) -> Result<bool> {
        Ok(true)
    }

    /// One forward pass: row `i` through adapter `adapters[i]`. Returns the logits of the last
    /// `inputs.logits_to_keep` positions, `[batch, positions, vocab]`.
    fn forward_rows(
        &mut self,
        inputs: &Inputs,
        cache: &mut Cache,
        adapters: &[String],
    ) -> Result<Tensor>;
}

/// A plain model serves only `__base__` rows.
impl<T: Model + ?Sized> BatchModel for T {
    fn dims(&self) -> ModelDims {
        Model::dims(self)
    }
    fn device(&self) -> Device {
        Model::device(self).clone()
    }
    fn prepare(&mut self, adapter: &str, _in_use: &BTreeSet<String>) -> Result<bool> {
        if adapter != crate::layers::mixed::BASE {
            return Err(Error::Adapter(format!(
                "no adapter named `{adapter}`: this model has no adapters (use `__base__`)"
            )));
        }
        Ok(true)
    }
    fn forward_rows(
        &mut self,
        inputs: &Inputs,
        cache: &mut Cache,
        _adapters: &[String],
    ) -> Result<Tensor> {
        Model::forward_with_cache(self, inputs, Some(cache), false)
    }
}

/// A request's identity, given by [`Scheduler::submit`].
pub type RequestId = u64;

/// One generation request.
#[derive(Debug, Clone)]
pub struct Request {
    /// Token ids (at least one).
    pub prompt: Vec<u32>,
    /// The adapter every forward pass of this request runs through (a name [`BatchModel`]
    /// understands).
    pub adapter: String,
    /// New tokens at most; the context window may end the request earlier.
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Seeds this request's own sampler.
    pub seed: u64,
    /// Tokens that end the request; empty: the model's.
    pub eos_token_ids: Vec<u32>,
    /// Report each token's log-probability and the `n` most likely alternatives (`Some(n)`).
    pub logprobs: Option<usize>,
}

/// Log-probabilities (of the model's raw distribution) of a chosen token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

/// What a step produced for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A new token (the first one ends the prefill: time to first token).
    Token {
        id: RequestId,
        token: u32,
        logprob: Option<TokenLogprob>,
    },
    /// The request ended; its last [`Event::Token`] came before.
    Finished { id: RequestId, reason: FinishReason },
    /// The request failed and left; the message says why.
    Failed { id: RequestId, message: String },
}

/// Limits of a [`Scheduler`].
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Requests admitted at once (prefilling or decoding); the rest wait in order.
    pub max_batch_size: usize,
    /// Prompt tokens prefilled per step, across requests: a longer prompt is prefilled in chunks
    /// of this size between decode steps.
    pub prefill_chunk: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            prefill_chunk: 512,
        }
    }
}

/// One request's state.
struct Seq {
    id: RequestId,
    req: Request,
    eos: Vec<u32>,
    /// Token budget after the context window's limit.
    budget: usize,
    rng: StdRng,
    /// Prompt and generated tokens (the repetition penalty's view).
    seen: Vec<u32>,
    generated: usize,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// Its own cache while prefilling.
    cache: Cache,
}

impl Seq {
    /// Tokens in its cache (positions `0..len`).
    fn cached(&self) -> usize {
        self.seen.len() - 1
    }
}

/// Rows decoding together: one batched cache, each row left-padded to the common width.
struct Group {
    /// `None`: rows whose adapters share batches; `Some(name)`: that adapter's own batch.
    key: Option<String>,
    rows: Vec<Seq>,
    cache: Cache,
    /// Cache positions (padding included).
    width: usize,
}

impl Group {
    fn names(&self) -> Vec<String> {
        self.rows.iter().map(|s| s.req.adapter.clone()).collect()
    }

    /// Adds `seq` (its own cache of `seq.cached()` positions) to the batch.
    fn join(&mut self, mut seq: Seq) -> Result<()> {
        let own = std::mem::take(&mut seq.cache);
        let len = seq.cached();
        if self.rows.is_empty() {
            self.cache = own;
            self.width = len;
        } else {
            let width = self.width.max(len);
            let (grow, pad) = (width - self.width, width - len);
            let layers = self.cache.self_attn.len().max(own.self_attn.len());
            self.cache.self_attn.resize(layers, None);
            for (slot, theirs) in self.cache.self_attn.iter_mut().zip(own.self_attn) {
                let (Some(ours), Some(theirs)) = (slot.as_ref(), theirs) else {
                    return Err(Error::Config(
                        "continuous batching: a layer without a key/value cache".into(),
                    ));
                };
                let join = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
                    Ok(Tensor::cat(&[&pad_left(a, grow)?, &pad_left(b, pad)?], 0)?)
                };
                *slot = Some(KeyValue {
                    key: join(&ours.key, &theirs.key)?,
                    value: join(&ours.value, &theirs.value)?,
                });
            }
            self.width = width;
        }
        self.rows.push(seq);
        Ok(())
    }

    /// Keeps the rows at `keep` (in order) and drops padding no remaining row needs.
    fn retain(&mut self, keep: &[usize]) -> Result<Vec<Seq>> {
        let mut gone = Vec::new();
        let mut kept = Vec::new();
        for (i, s) in std::mem::take(&mut self.rows).into_iter().enumerate() {
            if keep.contains(&i) {
                kept.push(s);
            } else {
                gone.push(s);
            }
        }
        self.rows = kept;
        if gone.is_empty() {
            return Ok(gone);
        }
        if self.rows.is_empty() {
            self.cache = Cache::default();
            self.width = 0;
            return Ok(gone);
        }
        let width = self.rows.iter().map(Seq::cached).max().unwrap_or(0);
        let idx: Vec<u32> = keep.iter().map(|&i| i as u32).collect();
        let device = self
            .cache
            .self_attn
            .iter()
            .flatten()
            .next()
            .map(|kv| kv.key.device().clone());
        if let Some(device) = device {
            let idx = Tensor::from_vec(idx.clone(), idx.len(), &device)?;
            let cut = self.width - width;
            for kv in self.cache.self_attn.iter_mut().flatten() {
                let pick = |t: &Tensor| -> Result<Tensor> {
                    let t = t.index_select(&idx, 0)?;
                    Ok(if cut > 0 { t.narrow(2, cut, width)? } else { t })
                };
                *kv = KeyValue {
                    key: pick(&kv.key)?,
                    value: pick(&kv.value)?,
                };
            }
        }
        self.width = width;
        Ok(gone)
    }
}

/// `[batch, heads, len, dim]` with `n` zero positions in front.
fn pad_left(t: &Tensor, n: usize) -> Result<Tensor> {
    if n == 0 {
        return Ok(t.clone());
    }
    let (b, h, _, d) = t.dims4()?;
    let zeros = Tensor::zeros((b, h, n, d), t.dtype(), t.device())?;
    Ok(Tensor::cat(&[&zeros, t], 2)?)
}

/// Admits requests, prefills their prompts in chunks, and decodes every admitted request one
/// token per [`Scheduler::step`].
pub struct Scheduler {
    cfg: SchedulerConfig,
    dims: ModelDims,
    next_id: RequestId,
    waiting: VecDeque<Seq>,
    prefilling: Vec<Seq>,
    groups: Vec<Group>,
}

impl Scheduler {
    /// A scheduler for a decoder-only model of these dimensions.
    pub fn new(dims: ModelDims, cfg: SchedulerConfig) -> Result<Self> {
        if dims.is_encoder_decoder {
            return Err(Error::Config(
                "continuous batching serves decoder-only models; this one is an encoder-decoder \
                 model (use generation::generate)"
                    .into(),
            ));
        }
        if cfg.max_batch_size == 0 || cfg.prefill_chunk == 0 {
            return Err(Error::Config(
                "max_batch_size and prefill_chunk must be at least 1".into(),
            ));
        }
        Ok(Self {
            cfg,
            dims,
            next_id: 0,
            waiting: VecDeque::new(),
            prefilling: Vec::new(),
            groups: Vec::new(),
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Queues a request; errors a caller can fix (empty prompt, unknown token, a prompt that
    /// fills the context window, bad sampling options) are returned here.
    pub fn submit(&mut self, req: Request) -> Result<RequestId> {
        let dims = &self.dims;
        if req.prompt.is_empty() {
            return Err(Error::Data(
                "the prompt is empty; a decoder needs at least one token to continue from".into(),
            ));
        }
        if let Some(t) = req.prompt.iter().find(|&&t| t as usize >= dims.vocab_size) {
            return Err(Error::Data(format!(
                "the prompt holds token id {t}, outside the vocabulary of {} tokens",
                dims.vocab_size
            )));
        }
        let budget = match dims.max_positions {
            Some(max) if req.prompt.len() >= max => {
                return Err(Error::Data(format!(
                    "the prompt has {} tokens but the model's context window is {max} positions \
                     (at least one must stay free for the answer); shorten the prompt",
                    req.prompt.len()
                )))
            }
            Some(max) => req.max_new_tokens.min(max - req.prompt.len()),
            None => req.max_new_tokens,
        };
        let s = &req.sampling;
        if s.do_sample && s.temperature <= 0.0 {
            return Err(Error::Config(format!(
                "temperature must be > 0 when sampling (got {})",
                s.temperature
            )));
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return Err(Error::Config(format!(
                "top_p must be in (0, 1] (got {})",
                s.top_p
            )));
        }
        let id = self.next_id;
        self.next_id += 1;
        let eos = if req.eos_token_ids.is_empty() {
            dims.eos_token_ids.clone()
        } else {
            req.eos_token_ids.clone()
        };
        self.waiting.push_back(Seq {
            id,
            eos,
            budget,
            rng: StdRng::seed_from_u64(req.seed),
            seen: req.prompt.clone(),
            generated: 0,
            prefilled: 0,
            cache: Cache::default(),
            req,
        });
        Ok(id)
    }

    /// Removes a request wherever it is (waiting, prefilling or decoding), freeing its slot and
    /// cache. Returns whether it was there.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(i);
            return true;
        }
        if let Some(i) = self.prefilling.iter().position(|s| s.id == id) {
            self.prefilling.remove(i);
            return true;
        }
        for g in &mut self.groups {
            if let Some(i) = g.rows.iter().position(|s| s.id == id) {
                let keep: Vec<usize> = (0..g.rows.len()).filter(|&k| k != i).collect();
                if g.retain(&keep).is_err() {
                    // The batch could not be rebuilt: drop it whole rather than keep a stale one.
                    g.rows.clear();
                    g.cache = Cache::default();
                }
                self.groups.retain(|g| !g.rows.is_empty());
                return true;
            }
        }
        false
    }

    /// Requests queued but not yet admitted.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Requests admitted (prefilling or decoding).
    pub fn running(&self) -> usize {
        self.prefilling.len() + self.groups.iter().map(|g| g.rows.len()).sum::<usize>()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running() == 0
    }

    /// The adapters of the admitted requests.
    pub fn adapters_in_use(&self) -> BTreeSet<String> {
        self.prefilling
            .iter()
            .chain(self.groups.iter().flat_map(|g| g.rows.iter()))
            .map(|s| s.req.adapter.clone())
            .collect()
    }

    /// The adapters of every request, admitted or waiting.
    pub fn adapters_wanted(&self) -> BTreeSet<String> {
        let mut out = self.adapters_in_use();
        out.extend(self.waiting.iter().map(|s| s.req.adapter.clone()));
        out
    }

    /// Ids of every request, admitted or waiting.
    pub fn request_ids(&self) -> Vec<RequestId> {
        self.waiting
            .iter()
            .chain(&self.prefilling)
            .chain(self.groups.iter().flat_map(|g| g.rows.iter()))
            .map(|s| s.id)
            .collect()
    }

    /// One step: admit what fits, one decode pass over every running row, then up to
    /// `prefill_chunk` prompt tokens of the admitted requests.
    pub fn step(&mut self, model: &mut dyn BatchModel) -> Vec<Event> {
        crate::no_grad(|| {
            let mut events = Vec::new();
            self.admit(model, &mut events);
            self.decode(model, &mut events);
            self.prefill(model, &mut events);
            events
        })
    }

    fn admit(&mut self, model: &mut dyn BatchModel, events: &mut Vec<Event>) {
        let mut still = VecDeque::new();
        while let Some(seq) = self.waiting.pop_front() {
            if self.running() >= self.cfg.max_batch_size {
                still.push_back(seq);
                continue;
            }
            match model.prepare(&seq.req.adapter, &self.adapters_in_use()) {
                Ok(true) => self.prefilling.push(seq),
                Ok(false) => still.push_back(seq),
                Err(e) => events.push(Event::Failed {
                    id: seq.id,
                    message: e.to_string(),
                }),
            }
        }
        self.waiting = still;
    }

    fn prefill(&mut self, model: &mut dyn BatchModel, events: &mut Vec<Event>) {
        let mut budget = self.cfg.prefill_chunk;
        let mut i = 0;
        while i < self.prefilling.len() && budget > 0 {
            let seq = &mut self.prefilling[i];
            let n = (seq.req.prompt.len() - seq.prefilled).min(budget);
            budget -= n;
            match prefill_chunk(model, seq, n) {
                Err(e) => {
                    let seq = self.prefilling.remove(i);
                    events.push(Event::Failed {
                        id: seq.id,
                        message: e.to_string(),
                    });
                }
                Ok(None) => i += 1,
                Ok(Some(row)) => {
                    let mut seq = self.prefilling.remove(i);
                    match sample(&mut seq, &row) {
                        Err(e) => events.push(Event::Failed {
                            id: seq.id,
                            message: e.to_string(),
                        }),
                        Ok((ev, done)) => {
                            events.push(ev);
                            if let Some(reason) = done {
                                events.push(Event::Finished { id: seq.id, reason });
                            } else if let Err(e) = self.join(model, seq) {
                                events.push(e);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Puts a prefilled request into its decode batch.
    fn join(&mut self, model: &dyn BatchModel, seq: Seq) -> std::result::Result<(), Event> {
        let key = (!model.shares_batch(&seq.req.adapter)).then(|| seq.req.adapter.clone());
        let id = seq.id;
        let at = match self.groups.iter().position(|g| g.key == key) {
            Some(i) => i,
            None => {
                self.groups.push(Group {
                    key,
                    rows: Vec::new(),
                    cache: Cache::default(),
                    width: 0,
                });
                self.groups.len() - 1
            }
        };
        let g = &mut self.groups[at];
        g.join(seq).map_err(|e| {
            // A half-joined batch cannot be trusted: fail its rows rather than decode garbage.
            g.rows.clear();
            Event::Failed {
                id,
                message: e.to_string(),
            }
        })?;
        self.groups.retain(|g| !g.rows.is_empty());
        Ok(())
    }

    fn decode(&mut self, model: &mut dyn BatchModel, events: &mut Vec<Event>) {
        for g in &mut self.groups {
            if let Err(e) = decode_group(model, g, events) {
                for s in g.rows.drain(..) {
                    events.push(Event::Failed {
                        id: s.id,
                        message: e.to_string(),
                    });
                }
                g.cache = Cache::default();
            }
        }
        self.groups.retain(|g| !g.rows.is_empty());
    }
}

/// Runs `n` more prompt tokens of `seq` through the model; at the prompt's end, returns the last
/// position's logits.
fn prefill_chunk(model: &mut dyn BatchModel, seq: &mut Seq, n: usize) -> Result<Option<Vec<f32>>> {
    let device = model.device();
    let start = seq.prefilled;
    let ids = seq.req.prompt[start..start + n].to_vec();
    let positions: Vec<u32> = (start..start + n).map(|p| p as u32).collect();
    let inputs = Inputs {
        input_ids: Some(Tensor::from_vec(ids, (1, n), &device)?),
        position_ids: Some(Tensor::from_vec(positions, (1, n), &device)?),
        logits_to_keep: 1,
        ..Default::default()
    };
    let names = [seq.req.adapter.clone()];
    let logits = model.forward_rows(&inputs, &mut seq.cache, &names)?;
    seq.prefilled += n;
    if seq.prefilled < seq.req.prompt.len() {
        return Ok(None);
    }
    Ok(Some(last_rows(&logits)?.swap_remove(0)))
}

/// One decode pass over a group: every row's last token in, one new token out per row.
fn decode_group(model: &mut dyn BatchModel, g: &mut Group, events: &mut Vec<Event>) -> Result<()> {
    let device = model.device();
    let b = g.rows.len();
    let last: Vec<u32> = g
        .rows
        .iter()
        .map(|s| *s.seen.last().unwrap_or(&0))
        .collect();
    let positions: Vec<u32> = g.rows.iter().map(|s| s.cached() as u32).collect();
    let padded = g.rows.iter().any(|s| s.cached() != g.width);
    let mask = padded
        .then(|| {
            let cols = g.width + 1;
            let m: Vec<u32> = g
                .rows
                .iter()
                .flat_map(|s| {
                    let pad = g.width - s.cached();
                    std::iter::repeat_n(0u32, pad).chain(std::iter::repeat_n(1u32, cols - pad))
                })
                .collect();
            Tensor::from_vec(m, (b, cols), &device)
        })
        .transpose()?;
    let inputs = Inputs {
        input_ids: Some(Tensor::from_vec(last, (b, 1), &device)?),
        attention_mask: mask,
        position_ids: Some(Tensor::from_vec(positions, (b, 1), &device)?),
        logits_to_keep: 1,
        ..Default::default()
    };
    let names = g.names();
    let logits = model.forward_rows(&inputs, &mut g.cache, &names)?;
    g.width += 1;
    let rows = last_rows(&logits)?;
    let mut keep = Vec::with_capacity(b);
    for (i, (seq, row)) in g.rows.iter_mut().zip(rows).enumerate() {
        match sample(seq, &row) {
            Ok((ev, done)) => {
                events.push(ev);
                match done {
                    Some(reason) => events.push(Event::Finished { id: seq.id, reason }),
                    None => keep.push(i),
                }
            }
            Err(e) => events.push(Event::Failed {
                id: seq.id,
                message: e.to_string(),
            }),
        }
    }
    g.retain(&keep)?;
    Ok(())
}

/// The last position's logits of each row, in f32.
fn last_rows(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    let last = match logits.rank() {
        3 => logits.narrow(1, logits.dim(1)? - 1, 1)?.squeeze(1)?,
        2 => logits.clone(),
        r => {
            return Err(Error::Config(format!(
                "generation needs a language-model head; the model returned rank-{r} output"
            )))
        }
    };
    Ok(last.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

/// Chooses the next token of `seq` from its raw logits; returns the token event and, when the
/// request ends with it, why.
fn sample(seq: &mut Seq, raw: &[f32]) -> Result<(Event, Option<FinishReason>)> {
    let logprob = seq.req.logprobs.map(|n| token_logprobs(raw, n));
    let mut scores = raw.to_vec();
    logits::process(&mut scores, &seq.seen, &seq.req.sampling);
    let t = logits::choose(&scores, seq.req.sampling.do_sample, &mut seq.rng);
    seq.seen.push(t);
    seq.generated += 1;
    let logprob = logprob.map(|f| f(t));
    let done = if seq.eos.contains(&t) {
        Some(FinishReason::Eos)
    } else if seq.generated >= seq.budget {
        Some(FinishReason::Length)
    } else {
        None
    };
    Ok((
        Event::Token {
            id: seq.id,
            token: t,
            logprob,
        },
        done,
    ))
}

/// Log-softmax of `raw`: a function giving the chosen token's log-probability and the `n` best.
fn token_logprobs(raw: &[f32], n: usize) -> impl FnOnce(u32) -> TokenLogprob {
    let max = raw.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = raw.iter().map(|&s| ((s - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    let mut top: Vec<(u32, f32)> = Vec::new();
    if n > 0 {
        let mut order: Vec<u32> = (0..raw.len() as u32).collect();
        let n = n.min(order.len());
        order.select_nth_unstable_by(n - 1, |&a, &b| raw[b as usize].total_cmp(&raw[a as usize]));
        order.truncate(n);
        order.sort_by(|&a, &b| raw[b as usize].total_cmp(&raw[a as usize]).then(a.cmp(&b)));
        top = order
            .into_iter()
            .map(|t| (t, raw[t as usize] - lse))
            .collect();
    }
    let chosen: Vec<f32> = raw.to_vec();
    move |t| TokenLogprob {
        logprob: chosen
            .get(t as usize)
            .map_or(f32::NEG_INFINITY, |s| s - lse),
        top,
    }
}
