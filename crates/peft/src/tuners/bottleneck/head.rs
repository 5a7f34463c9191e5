//! AdapterHub's flex prediction heads (`adapters/heads/base.py`): `ClassificationHead` on the
//! first token's last hidden state and `TaggingHead` on every token: `layers` times
//! (dropout, linear), with the activation after every linear but the last. Their tensors are
//! `heads.<name>.<index>.{weight,bias}` with nn.Sequential's indices (dropout 0, linear 1,
//! activation 2, dropout 3, linear 4, ... for two layers with an activation).

use candle_core::{Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use super::config::HeadConfig;
use super::layer::{Act, Dense};
use crate::models::Inputs;
use crate::tuners::tuner::OutputHead;
use crate::tuners::ModelTensor;
use crate::{ops, Error, Result};

pub struct Head {
    /// Key prefix, `head.` (AdapterHub's `heads.<name>.` in its own layout).
    prefix: String,
    /// `(sequential index, layer)`.
    layers: Vec<(usize, Dense)>,
    act: Option<Act>,
    tagging: bool,
    dropout: f64,
}

impl Head {
    /// A new head of adapter `_name` on a model of `hidden` size, initialised as transformers' BERT
    /// `_init_weights` (normal with `initializer_range`, zero bias). `model_config` is the base
    /// model's config.json (dropout and init range).
    pub fn new(
        _name: &str,
        config: &HeadConfig,
        hidden: usize,
        model_config: &serde_json::Value,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        if config.num_labels == 0 {
            return Err(crate::Error::Config(
                "the head's `num_labels` is not set (0); give the number of classes".into(),
            ));
        }
        let get = |k: &str| model_config.get(k).and_then(|v| v.as_f64());
        let dropout = config
            .dropout_prob
            .or_else(|| get("classifier_dropout"))
            .or_else(|| get("hidden_dropout_prob"))
            .unwrap_or(0.0);
        let std = get("initializer_range").unwrap_or(0.02);
        let act = config
            .activation_function
            .as_deref()
            .map(Act::parse)
            .transpose()?;
        let normal = Normal::new(0.0f32, std as f32).map_err(|e| Error::Adapter(e.to_string()))?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut layers = Vec::new();
        let mut index = 0;
        for l in 0..config.layers {
            index += 1; // the dropout
            let last = l + 1 == config.layers;
            let out = if last { config.num_labels } else { hidden };
            let w: Vec<f32> = (0..out * hidden).map(|_| normal.sample(&mut rng)).collect();
            let weight = Var::from_tensor(&Tensor::from_vec(w, (out, hidden), device)?)?;
            let bias = (!last || config.bias)
                .then(|| Var::zeros(out, candle_core::DType::F32, device))
                .transpose()?;
            layers.push((index, Dense { weight, bias }));
            index += 1;
            if !last && act.is_some() {
                index += 1;
            }
        }
        Ok(Self {
            prefix: super::hub::HEAD_KEY.to_string(),
            layers,
            act,
            tagging: config.head_type == "tagging",
            dropout,
        })
    }

    pub fn tensors(&self) -> Vec<ModelTensor> {
        let mut out = Vec::new();
        for (i, l) in &self.layers {
            out.push(ModelTensor::parameter(
                format!("{}{i}.weight", self.prefix),
                &l.weight,
            ));
            if let Some(b) = &l.bias {
                out.push(ModelTensor::parameter(
                    format!("{}{i}.bias", self.prefix),
                    b,
                ));
            }
        }
        out
    }
}

impl OutputHead for Head {
    fn forward(&self, hidden: &Tensor, _inputs: &Inputs, train: bool) -> Result<Tensor> {
        if hidden.rank() != 3 {
            return Err(Error::Adapter(format!(
                "a prediction head needs the base model's last hidden states [batch, seq, hidden], \
                 got shape {:?}: load the base model as FEATURE_EXTRACTION",
                hidden.dims()
            )));
        }
        let mut x = if self.tagging {
            hidden.clone()
        } else {
            hidden.narrow(1, 0, 1)?.squeeze(1)?
        };
        let n = self.layers.len();
        for (k, (_, l)) in self.layers.iter().enumerate() {
            x = l.forward(&ops::dropout(&x, self.dropout, train)?)?;
            if k + 1 < n {
                if let Some(a) = self.act {
                    x = a.apply(&x)?;
                }
            }
        }
        Ok(x)
    }
}
