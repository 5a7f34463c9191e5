//! The generation engine: one thread that owns the model, its adapters and the continuous-batching
//! [`Scheduler`], and talks to the HTTP handlers through channels. Handlers never touch the model.
//!
//! Adapters go by internal names, `<name>@<version>`: loading a name again installs a new version
//! while requests already accepted keep the old one, which is deleted once no request names it.
//! Adapters on the model are at most `max_loras` (least recently used first out, never one that
//! a running request uses); adapter files kept in memory at most `max_cpu_loras`; the rest are
//! read from disk again when a request needs them.

use peft::generation::batch::{
    BatchModel, Event, Request, RequestId, Scheduler, SchedulerConfig, TokenLogprob,
};
use peft::generation::FinishReason;
use peft::layers::mixed::BASE;
use peft::models::{Cache, Inputs, ModelDims};
use peft::peft_model::AdapterFiles;
use peft::{PeftModel, Result};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc::UnboundedSender, oneshot};

use crate::metrics::{Metrics, TokenLabels};

/// What the engine tells a handler about one choice of its request.
#[derive(Debug)]
pub enum GenEvent {
    Token {
        index: usize,
        token: u32,
        logprob: Option<TokenLogprob>,
    },
    Finished {
        index: usize,
        reason: FinishReason,
    },
    Failed {
        index: usize,
        message: String,
    },
}

/// Messages to the engine thread.
pub enum Command {
    /// Generate for `request`; events go to `events` tagged with `index`. `ticket` identifies it
    /// for [`Command::Cancel`].
    Generate {
        ticket: u64,
        index: usize,
        request: Request,
        /// The adapter's public name (metrics).
        adapter: String,
        arrived: Instant,
        events: UnboundedSender<GenEvent>,
    },
    /// Stop generating for a ticket (a stop string was found).
    Cancel(u64),
    /// Put a new adapter version on the model (validates it against the model).
    Install {
        internal: String,
        files: Arc<AdapterFiles>,
        reply: oneshot::Sender<std::result::Result<(), String>>,
    },
    /// No new request will name this version; delete it once no request uses it.
    Retire(String),
    /// Cancel every request (shutdown past its grace period).
    CancelAll,
    Shutdown,
}

/// The model with its adapter residency: what the scheduler drives.
pub struct Served {
    pub model: PeftModel,
    max_loras: usize,
    max_cpu_loras: usize,
    /// internal name → directory, for every version a request may still name.
    known: HashMap<String, PathBuf>,
    /// Adapter files in memory, least recently used first.
    resident: Vec<(String, Arc<AdapterFiles>)>,
    /// Adapters on the model, least recently used first.
    active: Vec<String>,
    metrics: Arc<Metrics>,
}

impl Served {
    pub fn new(
        model: PeftModel,
        max_loras: usize,
        max_cpu_loras: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            model,
            max_loras: max_loras.max(1),
            max_cpu_loras: max_cpu_loras.max(max_loras).max(1),
            known: HashMap::new(),
            resident: Vec::new(),
            active: Vec::new(),
            metrics,
        }
    }

    fn touch_active(&mut self, name: &str) {
        if let Some(i) = self.active.iter().position(|n| n == name) {
            let n = self.active.remove(i);
            self.active.push(n);
        }
    }

    fn keep_resident(&mut self, name: &str, files: Arc<AdapterFiles>) {
        self.resident.retain(|(n, _)| n != name);
        self.resident.push((name.to_string(), files));
        while self.resident.len() > self.max_cpu_loras {
            self.resident.remove(0);
        }
    }

    fn files(&mut self, name: &str) -> Result<Arc<AdapterFiles>> {
        if let Some(i) = self.resident.iter().position(|(n, _)| n == name) {
            let entry = self.resident.remove(i);
            let files = entry.1.clone();
            self.resident.push(entry);
            return Ok(files);
        }
        let dir = self.known.get(name).cloned().ok_or_else(|| {
            peft::Error::Adapter(format!("adapter version `{name}` is no longer known"))
        })?;
        tracing::info!("reading adapter {name} from {} again", dir.display());
        let base = self.model.base_model();
        let files = Arc::new(AdapterFiles::read_for_base(
            &dir,
            Some(&base.info().config),
            &base.device().clone(),
        )?);
        self.keep_resident(name, files.clone());
        Ok(files)
    }

    /// Takes adapters off the model (least recently used first) until at most `limit` remain,
    /// sparing those in `in_use`. Returns whether the limit was reached.
    fn evict_to(&mut self, limit: usize, in_use: &BTreeSet<String>) -> bool {
        while self.active.len() > limit {
            let Some(i) = self.active.iter().position(|n| !in_use.contains(n)) else {
                return false;
            };
            let name = self.active.remove(i);
            if let Err(e) = self.model.delete_adapter(&name) {
                tracing::warn!("could not take adapter {name} off the model: {e}");
            }
        }
        true
    }

    fn install(&mut self, internal: &str, files: Arc<AdapterFiles>) {
        self.known.insert(internal.to_string(), files.dir.clone());
        self.keep_resident(internal, files);
    }

    /// Validates a new version by putting it on the model.
    fn validate(&mut self, internal: &str, in_use: &BTreeSet<String>) -> Result<()> {
        let files = self.files(internal)?;
        self.evict_to(self.max_loras.saturating_sub(1), in_use);
        self.model.add_adapter_files(&files, internal, false)?;
        self.active.push(internal.to_string());
        Ok(())
    }

    fn forget(&mut self, internal: &str) {
        self.known.remove(internal);
        self.resident.retain(|(n, _)| n != internal);
        if let Some(i) = self.active.iter().position(|n| n == internal) {
            self.active.remove(i);
            if let Err(e) = self.model.delete_adapter(internal) {
                tracing::warn!("could not take adapter {internal} off the model: {e}");
            }
        }
    }

    pub fn publish(&self) {
        let mut list: Vec<(String, &'static str)> = self
            .active
            .iter()
            .map(|n| (public(n).to_string(), "active"))
            .collect();
        for (n, _) in &self.resident {
            if !self.active.contains(n) {
                list.push((public(n).to_string(), "cpu"));
            }
        }
        self.metrics.set_adapters(&list);
    }
}

/// `name@3` → `name`.
pub fn public(internal: &str) -> &str {
    internal.rsplit_once('@').map_or(internal, |(n, _)| n)
}

impl BatchModel for Served {
    fn dims(&self) -> ModelDims {
        BatchModel::dims(&self.model)
    }
    fn device(&self) -> candle_core::Device {
        BatchModel::device(&self.model)
    }
    fn shares_batch(&self, adapter: &str) -> bool {
        self.model.supports_mixed_batch(adapter)
    }
    fn prepare(&mut self, adapter: &str, in_use: &BTreeSet<String>) -> Result<bool> {
        if adapter == BASE {
            return Ok(true);
        }
        if self.active.iter().any(|n| n == adapter) {
            self.touch_active(adapter);
            return Ok(true);
        }
        if !self.evict_to(self.max_loras - 1, in_use) {
            return Ok(false);
        }
        let files = self.files(adapter)?;
        self.model.add_adapter_files(&files, adapter, false)?;
        self.active.push(adapter.to_string());
        self.publish();
        Ok(true)
    }
    fn forward_rows(
        &mut self,
        inputs: &Inputs,
        cache: &mut Cache,
        adapters: &[String],
    ) -> Result<candle_core::Tensor> {
        self.model.forward_rows(inputs, cache, adapters)
    }
}

struct Sink {
    ticket: u64,
    index: usize,
    adapter: String,
    arrived: Instant,
    last: Option<Instant>,
    events: UnboundedSender<GenEvent>,
}

/// Runs the engine until [`Command::Shutdown`] (or every sender is gone) and nothing runs.
pub fn run(
    mut served: Served,
    sched_cfg: SchedulerConfig,
    commands: Receiver<Command>,
    metrics: Arc<Metrics>,
) -> Result<()> {
    let mut scheduler = Scheduler::new(BatchModel::dims(&served), sched_cfg)?;
    let mut sinks: HashMap<RequestId, Sink> = HashMap::new();
    let mut tickets: HashMap<u64, Vec<RequestId>> = HashMap::new();
    let mut retired: HashSet<String> = HashSet::new();
    let mut stopping = false;
    served.publish();
    loop {
        // Wait for work when there is none; otherwise take what has arrived and step.
        let mut next = if scheduler.is_idle() && !stopping {
            match commands.recv() {
                Ok(c) => Some(c),
                Err(_) => return Ok(()),
            }
        } else if scheduler.is_idle() {
            match commands.recv_timeout(Duration::from_millis(50)) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => return Ok(()),
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
        } else {
            None
        };
        loop {
            let cmd = match next.take() {
                Some(c) => c,
                None => match commands.try_recv() {
                    Ok(c) => c,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        stopping = true;
                        break;
                    }
                },
            };
            match cmd {
                Command::Generate {
                    ticket,
                    index,
                    request,
                    adapter,
                    arrived,
                    events,
                } => {
                    let prompt_len = request.prompt.len() as u64;
                    match scheduler.submit(request) {
                        Ok(id) => {
                            metrics
                                .prompt_tokens
                                .get_or_create(&TokenLabels {
                                    adapter: adapter.clone(),
                                })
                                .inc_by(prompt_len);
                            tickets.entry(ticket).or_default().push(id);
                            sinks.insert(
                                id,
                                Sink {
                                    ticket,
                                    index,
                                    adapter,
                                    arrived,
                                    last: None,
                                    events,
                                },
                            );
                        }
                        Err(e) => {
                            let _ = events.send(GenEvent::Failed {
                                index,
                                message: e.to_string(),
                            });
                        }
                    }
                }
                Command::Cancel(ticket) => {
                    for id in tickets.remove(&ticket).unwrap_or_default() {
                        scheduler.cancel(id);
                        sinks.remove(&id);
                    }
                }
                Command::Install {
                    internal,
                    files,
                    reply,
                } => {
                    let in_use = scheduler.adapters_in_use();
                    served.install(&internal, files);
                    let result = served.validate(&internal, &in_use).map_err(|e| {
                        served.forget(&internal);
                        e.to_string()
                    });
                    served.evict_to(served.max_loras, &in_use);
                    served.publish();
                    let _ = reply.send(result);
                }
                Command::Retire(internal) => {
                    retired.insert(internal);
                }
                Command::CancelAll => {
                    for id in scheduler.request_ids() {
                        scheduler.cancel(id);
                    }
                    sinks.clear();
                    tickets.clear();
                }
                Command::Shutdown => stopping = true,
            }
        }
        // Requests whose client went away free their slot now.
        let gone: Vec<RequestId> = sinks
            .iter()
            .filter(|(_, s)| s.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            scheduler.cancel(id);
            if let Some(s) = sinks.remove(&id) {
                tickets.remove(&s.ticket);
            }
        }
        if !scheduler.is_idle() {
            let events = scheduler.step(&mut served);
            let now = Instant::now();
            for ev in events {
                route(ev, &mut sinks, &mut tickets, &metrics, now);
            }
        }
        metrics.queue_depth.set(scheduler.waiting() as i64);
        metrics.batch_size.set(scheduler.running() as i64);
        // Old versions nobody names any more leave the model and memory.
        if !retired.is_empty() {
            let wanted = scheduler.adapters_wanted();
            let done: Vec<String> = retired
                .iter()
                .filter(|n| !wanted.contains(*n))
                .cloned()
                .collect();
            for n in done {
                served.forget(&n);
                retired.remove(&n);
            }
            served.publish();
        }
        if stopping && scheduler.is_idle() {
            return Ok(());
        }
    }
}

fn route(
    ev: Event,
    sinks: &mut HashMap<RequestId, Sink>,
    tickets: &mut HashMap<u64, Vec<RequestId>>,
    metrics: &Metrics,
    now: Instant,
) {
    let (id, ended) = match &ev {
        Event::Token { id, .. } => (*id, false),
        Event::Finished { id, .. } | Event::Failed { id, .. } => (*id, true),
    };
    let Some(sink) = sinks.get_mut(&id) else {
        return;
    };
    let out = match ev {
        Event::Token { token, logprob, .. } => {
            match sink.last {
                None => metrics
                    .ttft
                    .observe(now.duration_since(sink.arrived).as_secs_f64()),
                Some(t) => metrics.itl.observe(now.duration_since(t).as_secs_f64()),
            }
            sink.last = Some(now);
            metrics
                .generated_tokens
                .get_or_create(&TokenLabels {
                    adapter: sink.adapter.clone(),
                })
                .inc();
            GenEvent::Token {
                index: sink.index,
                token,
                logprob,
            }
        }
        Event::Finished { reason, .. } => {
            metrics
                .e2e
                .observe(now.duration_since(sink.arrived).as_secs_f64());
            GenEvent::Finished {
                index: sink.index,
                reason,
            }
        }
        Event::Failed { message, .. } => GenEvent::Failed {
            index: sink.index,
            message,
        },
    };
    let _ = sink.events.send(out);
    if ended {
        if let Some(s) = sinks.remove(&id) {
            if let Some(ids) = tickets.get_mut(&s.ticket) {
                ids.retain(|&i| i != id);
                if ids.is_empty() {
                    tickets.remove(&s.ticket);
                }
            }
        }
    }
}
