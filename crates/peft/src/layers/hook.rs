//! Hook points: the named places in a block where a sub-layer's output meets its residual input.
//!
//! Every block of every model ends its attention and its feed-forward sub-layers at a hook point
//! instead of adding the residual itself. Without adapters the point computes what the block
//! always did, `norm(hidden + residual)` (post-norm blocks such as BERT's) or `hidden + residual`
//! (pre-norm blocks); hook methods (bottleneck adapters, AdapterFusion) attached to it see both
//! tensors and the block's normalisation, as AdapterHub's `bottleneck_layer_forward` does.
//! Points are named as AdapterHub names the module that holds its adapters, so tuners find them by
//! path like any other site: `encoder.layer.N.attention.output` and `encoder.layer.N.output`
//! (BERT family), `<layer>.attention_adapters` and `<layer>.output_adapters` (GPT-2, Llama, OPT),
//! `<block>.layer.K` (T5: self-attention, cross-attention, feed-forward).

use candle_core::Tensor;

use super::adapter::{Adapter, AdapterList, AdapterSite, Adapters};
use super::norm::LayerNorm;
use crate::{Error, Result};

/// Which sub-layer a hook point follows (AdapterHub's location keys `mh_adapter`,
/// `cross_adapter`, `output_adapter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookLocation {
    /// After (self-)attention.
    Attention,
    /// After an encoder-decoder model's cross-attention.
    CrossAttention,
    /// After the feed-forward block.
    FeedForward,
}

/// What a hook method sees at a point.
pub struct HookInput<'a> {
    /// The sub-layer's output, after its dropout.
    pub hidden: &'a Tensor,
    /// The sub-layer's input, which the block adds back.
    pub residual: &'a Tensor,
    /// The normalisation the block applies after the residual add (post-norm blocks), if any.
    pub norm: Option<&'a LayerNorm>,
    pub train: bool,
}

impl HookInput<'_> {
    /// What the block computes here without adapters.
    pub fn plain(&self) -> Result<Tensor> {
        match self.norm {
            Some(n) => n.forward_residual(self.hidden, self.residual),
            None => Ok((self.hidden + self.residual)?),
        }
    }
}

/// An adapter at a hook point (a bottleneck adapter, a fusion layer).
pub trait HookAdapter: Adapter {
    /// Computes the point's output. `running` lists the point's adapters the forward pass must
    /// run, in the order they were activated; the first one's method is called and decides how
    /// they combine (a stack, a fusion over `point`'s other adapters, ...).
    fn forward(
        &self,
        point: &HookPoint,
        running: &[(&str, &dyn HookAdapter)],
        input: &HookInput<'_>,
    ) -> Result<Tensor>;
}

#[derive(Debug)]
pub struct HookPoint {
    /// AdapterHub's module path of the point, e.g. `bert.encoder.layer.0.attention.output`.
    pub name: String,
    pub location: HookLocation,
    /// Index of the block in its stack (AdapterHub's `layer_idx`, what `leave_out` names).
    pub layer: usize,
    /// Encoder-decoder models: whether the point is in the decoder.
    pub is_decoder: bool,
    /// AdapterDrop: the point runs without its adapters (as AdapterHub's `skip_layers`).
    pub skipped: bool,
    pub adapters: Adapters<dyn HookAdapter>,
}

impl HookPoint {
    pub fn new(name: impl Into<String>, location: HookLocation, layer: usize) -> Self {
        Self {
            name: name.into(),
            location,
            layer,
            is_decoder: false,
            skipped: false,
            adapters: Adapters::default(),
        }
    }

    /// A point in the decoder of an encoder-decoder model.
    pub fn in_decoder(mut self) -> Self {
        self.is_decoder = true;
        self
    }

    /// The layer index counted over the whole model as AdapterHub counts it (`layer_idx`, what
    /// `leave_out` and `skip_layers` name): decoder blocks of an encoder-decoder model come after
    /// its `encoder_layers` encoder blocks.
    pub fn global_layer(&self, encoder_layers: usize) -> usize {
        if self.is_decoder {
            encoder_layers + self.layer
        } else {
            self.layer
        }
    }

    /// The block's output at this point: `norm(hidden + residual)` (or without `norm`), or what
    /// the running hook adapters make of it.
    pub fn forward(
        &self,
        hidden: &Tensor,
        residual: &Tensor,
        norm: Option<&LayerNorm>,
        train: bool,
    ) -> Result<Tensor> {
        let input = HookInput {
            hidden,
            residual,
            norm,
            train,
        };
        if crate::layers::mixed::current().is_some() && !self.adapters.is_empty() {
            return Err(Error::Adapter(format!(
                "mixed batches route linear and embedding layers only; `{}` carries hook adapters",
                self.name
            )));
        }
        let active = self.adapters.active();
        let running: Vec<(&str, &dyn HookAdapter)> = if self.adapters.is_disabled() || self.skipped
        {
            Vec::new()
        } else {
            active
                .iter()
                .filter_map(|n| self.adapters.get(n).map(|a| (n.as_str(), a)))
                .collect()
        };
        match running.first() {
            None => input.plain(),
            Some((_, first)) => first.forward(self, &running, &input),
        }
    }
}

impl AdapterSite for HookPoint {
    fn site_name(&self) -> &str {
        &self.name
    }
    fn adapters(&self) -> &dyn AdapterList {
        &self.adapters
    }
    fn adapters_mut(&mut self) -> &mut dyn AdapterList {
        &mut self.adapters
    }
    /// Hook adapters are functions of the hidden states, not weight deltas: they cannot be
    /// folded into a weight.
    fn merge(&mut self, names: &[String]) -> Result<()> {
        match names.iter().find(|n| self.adapters.get(n).is_some()) {
            Some(n) => Err(Error::Adapter(format!(
                "adapter `{n}` at `{}` is a hook method (it transforms hidden states) and cannot \
                 be merged into the base weights",
                self.name
            ))),
            None => Ok(()),
        }
    }
    fn unmerge(&mut self) -> Result<()> {
        Ok(())
    }
}
