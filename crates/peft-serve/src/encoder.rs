//! The encoder engine (BERT family): sentence embeddings (`/v1/embeddings`) and task heads
//! (`/predict`), on a thread of its own. Each task head is its own model — the base for
//! embeddings (FEATURE_EXTRACTION), and one per head type its adapters were trained for
//! (SEQ_CLS, TOKEN_CLS) — each holding the adapters of its task; a request names one.

use candle_core::{DType, Tensor};
use peft::layers::mixed::BASE;
use peft::models::pooling::Pooling;
use peft::models::{self, LoadOptions, TaskType};
use peft::peft_model::AdapterFiles;
use peft::{Error, Inputs, PeftModel, Result};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use tokio::sync::oneshot;

/// Token ids of each input, and the head's answer.
pub enum Job {
    /// Pooled (and maybe normalised) sentence vectors, one per input.
    Embed {
        adapter: String,
        inputs: Vec<Vec<u32>>,
        reply: oneshot::Sender<Result<Vec<Vec<f32>>>>,
    },
    /// Logits of the adapter's head: `[classes]` per input (SEQ_CLS) or `[tokens][classes]`
    /// (TOKEN_CLS).
    Predict {
        adapter: String,
        inputs: Vec<Vec<u32>>,
        reply: oneshot::Sender<Result<Prediction>>,
    },
    Install {
        internal: String,
        files: Arc<AdapterFiles>,
        reply: oneshot::Sender<std::result::Result<(), String>>,
    },
    Remove(String),
}

pub enum Prediction {
    Sequence(Vec<Vec<f32>>),
    Tokens(Vec<Vec<Vec<f32>>>),
}

pub struct Encoder {
    path: PathBuf,
    device: candle_core::Device,
    pooling: Pooling,
    pad_id: u32,
    /// The base's own task (from config.json's architectures).
    base_task: TaskType,
    models: HashMap<TaskKey, PeftModel>,
    /// internal adapter name → the task model it lives on.
    placed: HashMap<String, TaskKey>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum TaskKey {
    Features,
    Seq,
    Token,
}

impl TaskKey {
    fn of(task: Option<TaskType>) -> Result<Self> {
        match task {
            None | Some(TaskType::FeatureExtraction) => Ok(TaskKey::Features),
            Some(TaskType::SeqCls) => Ok(TaskKey::Seq),
            Some(TaskType::TokenCls) => Ok(TaskKey::Token),
            Some(t) => Err(Error::Adapter(format!(
                "an encoder server serves FEATURE_EXTRACTION, SEQ_CLS and TOKEN_CLS adapters; \
                 this one is {}",
                t.as_str()
            ))),
        }
    }
    fn task(self) -> TaskType {
        match self {
            TaskKey::Features => TaskType::FeatureExtraction,
            TaskKey::Seq => TaskType::SeqCls,
            TaskKey::Token => TaskType::TokenCls,
        }
    }
}

impl Encoder {
    pub fn new(path: PathBuf, device: candle_core::Device, pad_id: u32) -> Result<Self> {
        let pooling = Pooling::from_model_dir(&path)?;
        let config = peft::io::read_json(&path.join("config.json"))?;
        let base_task =
            models::task_from_architectures(&config).unwrap_or(TaskType::FeatureExtraction);
        let mut e = Self {
            path,
            device,
            pooling,
            pad_id,
            base_task,
            models: HashMap::new(),
            placed: HashMap::new(),
        };
        e.model(TaskKey::Features, None)?;
        Ok(e)
    }

    /// The model of a task, loaded on first need (`num_labels` from the first adapter's head).
    fn model(&mut self, key: TaskKey, num_labels: Option<usize>) -> Result<&mut PeftModel> {
        if !self.models.contains_key(&key) {
            let opts = LoadOptions {
                task: Some(key.task()),
                num_labels,
                device: self.device.clone(),
                seed: 42,
                ..Default::default()
            };
            let m = models::load(&self.path, &opts)?;
            self.models.insert(key, PeftModel::without_adapters(m));
        }
        Ok(self.models.get_mut(&key).expect("inserted above"))
    }

    fn install(&mut self, internal: &str, files: &AdapterFiles) -> Result<()> {
        let key = TaskKey::of(files.config.task_type())?;
        let labels = peft::peft_model::saved_head_classes(&files.dir)?;
        let model = self.model(key, labels)?;
        model.add_adapter_files(files, internal, false)?;
        self.placed.insert(internal.to_string(), key);
        Ok(())
    }

    fn remove(&mut self, internal: &str) {
        if let Some(key) = self.placed.remove(internal) {
            if let Some(m) = self.models.get_mut(&key) {
                if let Err(e) = m.delete_adapter(internal) {
                    tracing::warn!("could not remove adapter {internal}: {e}");
                }
            }
        }
    }

    /// Pads `inputs` into one batch.
    fn batch(&self, inputs: &[Vec<u32>]) -> Result<Inputs> {
        let longest = inputs.iter().map(Vec::len).max().unwrap_or(0);
        if longest == 0 {
            return Err(Error::Data("empty input".into()));
        }
        let b = inputs.len();
        let mut ids = Vec::with_capacity(b * longest);
        let mut mask = Vec::with_capacity(b * longest);
        for row in inputs {
            ids.extend(row.iter().copied());
            ids.extend(std::iter::repeat_n(self.pad_id, longest - row.len()));
            mask.extend(std::iter::repeat_n(1u32, row.len()));
            mask.extend(std::iter::repeat_n(0u32, longest - row.len()));
        }
        Ok(Inputs {
            input_ids: Some(Tensor::from_vec(ids, (b, longest), &self.device)?),
            attention_mask: Some(Tensor::from_vec(mask, (b, longest), &self.device)?),
            token_type_ids: Some(Tensor::zeros((b, longest), DType::U32, &self.device)?),
            ..Default::default()
        })
    }

    /// Runs `key`'s model with every row through `adapter`.
    fn forward(&mut self, key: TaskKey, adapter: &str, inputs: &Inputs) -> Result<Tensor> {
        let model = self
            .models
            .get_mut(&key)
            .ok_or_else(|| Error::Adapter("no model for this task".into()))?;
        let rows = inputs.batch_seq()?.0;
        peft::no_grad(|| {
            if adapter == BASE || model.supports_mixed_batch(adapter) {
                model.forward_mixed(inputs, &vec![adapter.to_string(); rows])
            } else {
                model.set_adapter(adapter)?;
                model.forward(inputs, false)
            }
        })
    }

    fn embed(&mut self, adapter: &str, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if adapter != BASE && self.placed.get(adapter) != Some(&TaskKey::Features) {
            return Err(Error::Data(format!(
                "adapter `{}` has a task head ({}); use /predict for it",
                crate::engine::public(adapter),
                self.placed
                    .get(adapter)
                    .map_or("unknown", |k| k.task().as_str())
            )));
        }
        let batch = self.batch(inputs)?;
        let hidden = self.forward(TaskKey::Features, adapter, &batch)?;
        let mask = batch.attention_mask.as_ref().expect("batch sets a mask");
        Ok(self.pooling.apply(&hidden, mask)?.to_vec2()?)
    }

    fn predict(&mut self, adapter: &str, inputs: &[Vec<u32>]) -> Result<Prediction> {
        let key =
            if adapter == BASE {
                match self.base_task {
                    TaskType::SeqCls => TaskKey::Seq,
                    TaskType::TokenCls => TaskKey::Token,
                    _ => return Err(Error::Data(
                        "the base model has no classification head; name a SEQ_CLS or TOKEN_CLS \
                         adapter in `model`"
                            .into(),
                    )),
                }
            } else {
                match self.placed.get(adapter) {
                    Some(TaskKey::Features) | None => {
                        return Err(Error::Data(format!(
                            "adapter `{}` has no classification head (FEATURE_EXTRACTION); use \
                         /v1/embeddings for it",
                            crate::engine::public(adapter)
                        )))
                    }
                    Some(k) => *k,
                }
            };
        if adapter == BASE {
            self.model(key, None)?;
        }
        let batch = self.batch(inputs)?;
        let logits = self.forward(key, adapter, &batch)?.to_dtype(DType::F32)?;
        Ok(match key {
            TaskKey::Token => {
                let all: Vec<Vec<Vec<f32>>> = logits.to_vec3()?;
                Prediction::Tokens(
                    all.into_iter()
                        .zip(inputs)
                        .map(|(rows, inp)| rows.into_iter().take(inp.len()).collect())
                        .collect(),
                )
            }
            _ => Prediction::Sequence(logits.to_vec2()?),
        })
    }
}

/// Serves jobs until every sender is gone.
pub fn run(mut enc: Encoder, jobs: Receiver<Job>) {
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Embed {
                adapter,
                inputs,
                reply,
            } => {
                let _ = reply.send(enc.embed(&adapter, &inputs));
            }
            Job::Predict {
                adapter,
                inputs,
                reply,
            } => {
                let _ = reply.send(enc.predict(&adapter, &inputs));
            }
            Job::Install {
                internal,
                files,
                reply,
            } => {
                let r = enc.install(&internal, &files).map_err(|e| {
                    enc.remove(&internal);
                    e.to_string()
                });
                let _ = reply.send(r);
            }
            Job::Remove(internal) => enc.remove(&internal),
        }
    }
}
