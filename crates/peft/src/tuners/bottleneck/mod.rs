//! Bottleneck adapters as AdapterHub's `adapters` 1.3.0 defines them: Pfeiffer (`seq_bn`),
//! Houlsby (`double_seq_bn`), parallel (`par_bn`, `scaled_par_bn`) and every `BnConfig` field
//! (see [`config`]), run at the hook points of each block ([`crate::layers::HookPoint`]:
//! `mh_adapter` after attention, `cross_adapter` after cross-attention, `output_adapter` after
//! the feed-forward block), with `leave_out` and per-layer reduction factors by AdapterHub's
//! layer index. Several active bottleneck adapters stack (AdapterHub's `Stack`); an adapter may
//! bring a prediction head ([`head`]). `peft_type = "BOTTLENECK"` in our `[peft]` tables; the
//! AdapterHub file layout is read and written by [`hub`].

pub mod config;
pub mod head;
pub mod hub;
pub mod layer;

pub use config::{BottleneckConfig, HeadConfig, ReductionFactor, ResidualBeforeLn, Scaling};
pub use layer::Bottleneck;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::layers::{HookLocation, ModuleMut};
use crate::models::{Model, TaskType};
use crate::tuners::config::BaseFields;
use crate::tuners::tuner::OutputHead;
use crate::tuners::{
    InjectContext, Injected, MethodKind, ModelTensor, PeftConfig, Tuner, TunerConfig,
};
use crate::{Error, Result};

/// [`crate::tuners::Method::parse`] for `BOTTLENECK`.
pub fn parse(v: &Value, strict: bool) -> Result<PeftConfig> {
    Ok(PeftConfig::new(BottleneckConfig::from_json(v, strict)?))
}

impl BottleneckConfig {
    /// Whether the config puts an adapter at a point of this kind (AdapterHub's location keys).
    pub fn at(&self, location: HookLocation) -> bool {
        match location {
            HookLocation::Attention => self.mh_adapter,
            HookLocation::CrossAttention => self.cross_adapter,
            HookLocation::FeedForward => self.output_adapter,
        }
    }
}

impl TunerConfig for BottleneckConfig {
    fn peft_type(&self) -> &'static str {
        "BOTTLENECK"
    }
    fn tuner_name(&self) -> &'static str {
        "BottleneckModel"
    }
    fn kind(&self) -> MethodKind {
        MethodKind::Hook
    }
    fn base(&self) -> &BaseFields {
        &self.base
    }
    fn base_mut(&mut self) -> &mut BaseFields {
        &mut self.base
    }
    fn to_adapter_json(&self) -> Value {
        self.peft_json()
    }
    fn brings_head(&self) -> bool {
        self.head.is_some()
    }
    fn set_num_labels(&mut self, n: usize) {
        if let Some(h) = &mut self.head {
            if h.num_labels == 0 {
                h.num_labels = n;
            }
        }
    }
    fn inject(&mut self, model: &mut dyn Model, ctx: &InjectContext<'_>) -> Result<Injected> {
        self.validate()?;
        let dims = model.dims();
        let hidden = dims.hidden_size;
        let encoder_layers = dims.num_encoder_layers;
        let total = if dims.is_encoder_decoder {
            dims.num_encoder_layers + dims.num_layers
        } else {
            dims.num_layers
        };
        if let Some(bad) = self.leave_out.iter().find(|l| **l >= total) {
            return Err(Error::Config(format!(
                "leave_out names layer {bad}, but the model has layers 0..{total}"
            )));
        }
        let head = match &self.head {
            Some(h) => {
                if model.info().task != TaskType::FeatureExtraction {
                    return Err(Error::Adapter(format!(
                        "adapter `{}` brings its own {} head: load the base model as \
                         FEATURE_EXTRACTION (its last hidden states feed the head), not {}",
                        ctx.adapter_name,
                        h.head_type,
                        model.info().task.as_str()
                    )));
                }
                Some(head::Head::new(
                    ctx.adapter_name,
                    h,
                    hidden,
                    &model.info().config,
                    ctx.seed ^ 0x6865_6164,
                    model.device(),
                )?)
            }
            None => None,
        };
        let device = model.device().clone();
        let mut rng = StdRng::seed_from_u64(ctx.seed);
        let mut modules = Vec::new();
        for m in model.modules_mut() {
            let ModuleMut::Hook(point) = m else { continue };
            let layer = point.global_layer(encoder_layers);
            if !self.at(point.location) || self.leave_out.contains(&layer) {
                continue;
            }
            let d = layer::bottleneck_size(hidden, self.reduction_factor.at(layer)?);
            let mut own;
            let rng = match self.init_weights_seed {
                // AdapterHub's fix_seed: every module starts from the same seed.
                Some(s) => {
                    own = StdRng::seed_from_u64(s);
                    &mut own
                }
                None => &mut rng,
            };
            let adapter = Bottleneck::new(self, hidden, d, rng, &device)?;
            point.adapters.insert(ctx.adapter_name, Box::new(adapter));
            modules.push(point.name.clone());
        }
        if modules.is_empty() {
            return Err(Error::Config(format!(
                "the bottleneck config places no adapter on this {} model (mh_adapter = {}, \
                 output_adapter = {}, cross_adapter = {}, leave_out = {:?})",
                model.info().model_type,
                self.mh_adapter,
                self.output_adapter,
                self.cross_adapter,
                self.leave_out
            )));
        }
        Ok(Injected {
            modules,
            tuner: Box::new(BottleneckTuner {
                head,
                adapter_drop: self.adapter_drop,
                layers: total,
            }),
        })
    }
}

/// A bottleneck adapter's model-level side: its prediction head, if it brings one, and
/// AdapterDrop in training.
pub struct BottleneckTuner {
    pub head: Option<head::Head>,
    adapter_drop: bool,
    /// The model's layers as AdapterHub counts them.
    layers: usize,
}

/// Marks the hook points of layers below `k` as skipped (AdapterDrop), or none with 0.
fn skip_below(model: &mut dyn Model, k: usize) {
    let enc = model.dims().num_encoder_layers;
    for m in model.modules_mut() {
        if let ModuleMut::Hook(point) = m {
            point.skipped = point.global_layer(enc) < k;
        }
    }
}

impl Tuner for BottleneckTuner {
    /// AdapterDrop as AdapterHub's AdapterDrop notebook trains it: each step skips the adapters
    /// of the lowest `k` layers, `k` uniform in `[0, layers − 1)` (0 to 10 for 12 layers).
    fn before_train_step(
        &self,
        model: &mut dyn Model,
        _config: &PeftConfig,
        seed: u64,
    ) -> Result<()> {
        if self.adapter_drop {
            let mut rng = StdRng::seed_from_u64(seed);
            let k = rng.random_range(0..self.layers.saturating_sub(1).max(1));
            skip_below(model, k);
        }
        Ok(())
    }
    fn after_training(&self, model: &mut dyn Model, _config: &PeftConfig) -> Result<()> {
        if self.adapter_drop {
            skip_below(model, 0);
        }
        Ok(())
    }
    fn model_tensors(&self) -> Vec<ModelTensor> {
        self.head.as_ref().map(|h| h.tensors()).unwrap_or_default()
    }
    fn head(&self) -> Option<&dyn OutputHead> {
        self.head.as_ref().map(|h| h as &dyn OutputHead)
    }
}
