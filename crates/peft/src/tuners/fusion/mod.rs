//! AdapterFusion (Pfeiffer et al., 2021) as AdapterHub's `adapters` 1.3.0 computes it
//! (`BertFusion` in `methods/modeling.py`, `compose_fuse` in `methods/bottleneck.py`): at each
//! hook point, an attention over the scaled up-projections of frozen bottleneck adapters, with
//! the query taken from the last fused adapter's input. The fused adapters must be on the model
//! already; activating the fusion adapter runs `Fuse(a, b, ...)`. Presets `dynamic` (a value
//! matrix initialised to the identity, regularised towards it) and `static`; the regularisation
//! `0.01 · Σ ‖I − W_v‖²` over every fusion layer with a value matrix is the tuner's
//! [`Tuner::regularization_loss`], which the training loop adds to the loss each step.

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::any::Any;
use std::path::Path;
use std::sync::Mutex;

use crate::error::config_err;
use crate::layers::{Adapter, HookAdapter, HookInput, HookLocation, HookPoint, ModuleMut};
use crate::models::{Model, TaskType};
use crate::tuners::bottleneck::config::{sorted, HeadConfig};
use crate::tuners::bottleneck::head::Head;
use crate::tuners::bottleneck::layer::{Bottleneck, Dense};
use crate::tuners::config::{nearest, BaseFields, PEFT_VERSION};
use crate::tuners::tuner::OutputHead;
use crate::tuners::{
    InjectContext, Injected, MethodKind, ModelTensor, PeftConfig, Tuner, TunerConfig,
};
use crate::{ops, Error, Result};

/// `AdapterFusionConfig` with AdapterHub's field names, the names of the fused adapters, PEFT's
/// base fields and an optional prediction head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FusionConfig {
    pub key: bool,
    pub query: bool,
    pub value: bool,
    pub query_before_ln: bool,
    /// Written and read as AdapterHub does; like AdapterHub's trainer, the regularisation is
    /// applied to every fusion layer with a value matrix.
    pub regularization: bool,
    pub residual_before: bool,
    pub temperature: bool,
    pub value_before_softmax: bool,
    /// `true` / `false` (AdapterHub writes a bool, typed as a string).
    pub value_initialized: Value,
    pub dropout_prob: Option<f64>,
    /// The fused adapters, in order (AdapterHub's `adapter_names`).
    #[serde(default)]
    pub adapter_names: Vec<String>,
    /// Where the fused adapters are saved (any layout `load_adapter` reads), in the order of
    /// `adapter_names`: loaded, frozen, before the fusion when the model lacks them. Without
    /// `adapter_names`, the names are the ones these directories record (AdapterHub's `name`),
    /// else the directories' own names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<String>,
    #[serde(skip)]
    pub head: Option<HeadConfig>,
    #[serde(skip)]
    pub base: BaseFields,
}

const FIELDS: &[&str] = &[
    "key",
    "query",
    "value",
    "query_before_ln",
    "regularization",
    "residual_before",
    "temperature",
    "value_before_softmax",
    "value_initialized",
    "dropout_prob",
];

impl FusionConfig {
    /// AdapterHub's presets: `dynamic` (the default) and `static`.
    pub fn preset(name: &str) -> Result<Self> {
        let dynamic = Self {
            key: true,
            query: true,
            value: true,
            query_before_ln: false,
            regularization: true,
            residual_before: false,
            temperature: false,
            value_before_softmax: true,
            value_initialized: Value::Bool(true),
            dropout_prob: None,
            adapter_names: Vec::new(),
            adapters: Vec::new(),
            head: None,
            base: BaseFields::default(),
        };
        match name {
            "dynamic" => Ok(dynamic),
            "static" => Ok(Self {
                value: false,
                regularization: false,
                value_initialized: Value::Bool(false),
                ..dynamic
            }),
            other => Err(config_err!(
                "unknown AdapterFusion config `{other}`; presets: dynamic, static"
            )),
        }
    }

    /// From our `[peft]` table / `adapter_config.json` (`peft_type = "ADAPTER_FUSION"`, an
    /// optional `config` preset, fields overriding it, `adapter_names`, `head`) or AdapterHub's
    /// `config` dict.
    pub fn from_json(v: &Value, strict: bool) -> Result<Self> {
        let obj = v
            .as_object()
            .ok_or_else(|| config_err!("the fusion config must be a JSON object / TOML table"))?;
        let preset = match obj.get("config") {
            None | Some(Value::Null) => "dynamic".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(o) => {
                return Err(config_err!(
                    "`config` must be `dynamic` or `static`, got {o}"
                ))
            }
        };
        let mut out = Self::preset(&preset)?;
        let mut fields = match serde_json::to_value(&out) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        let base_keys: Vec<String> = match serde_json::to_value(BaseFields::default()) {
            Ok(Value::Object(m)) => m.keys().cloned().collect(),
            _ => Vec::new(),
        };
        let mut known: Vec<String> = FIELDS.iter().map(|s| s.to_string()).collect();
        known.extend(base_keys.iter().cloned());
        known.extend(["config", "head", "adapter_names", "adapters"].map(String::from));
        let mut base = Map::new();
        let mut head = None;
        for (k, val) in obj {
            match k.as_str() {
                "config" | "peft_type" => {}
                "peft_version" | "runtime_config" if !strict => {}
                "adapter_names" | "adapters" => {
                    fields.insert(k.clone(), val.clone());
                }
                "head" if !val.is_null() => {
                    let h: HeadConfig = serde_json::from_value(val.clone())
                        .map_err(|e| config_err!("fusion `head`: {e}"))?;
                    h.validate()?;
                    head = Some(h);
                }
                "head" => {}
                _ if FIELDS.contains(&k.as_str()) => {
                    fields.insert(k.clone(), val.clone());
                }
                _ if base_keys.contains(k) => {
                    base.insert(k.clone(), val.clone());
                }
                _ if strict => {
                    return Err(config_err!(
                        "unknown AdapterFusion config field `{k}`{}",
                        nearest(k, &known)
                    ))
                }
                _ => tracing::warn!("ignoring unknown AdapterFusion config field `{k}`"),
            }
        }
        out = serde_json::from_value(Value::Object(fields))
            .map_err(|e| config_err!("AdapterFusion config: {e}"))?;
        out.head = head;
        out.base = serde_json::from_value(Value::Object(base))
            .map_err(|e| config_err!("AdapterFusion config: {e}"))?;
        if out.adapter_names.is_empty() {
            out.adapter_names = out
                .adapters
                .iter()
                .map(|d| saved_name(Path::new(d)))
                .collect();
        }
        if !out.adapters.is_empty() && out.adapters.len() != out.adapter_names.len() {
            return Err(config_err!(
                "`adapters` lists {} directories but `adapter_names` {} names; give one \
                 directory per fused adapter",
                out.adapters.len(),
                out.adapter_names.len()
            ));
        }
        out.validate()?;
        Ok(out)
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(p) = self.dropout_prob {
            if !(0.0..1.0).contains(&p) {
                return Err(config_err!("`dropout_prob` must be in [0, 1), got {p}"));
            }
        }
        if !matches!(self.value_initialized, Value::Bool(_) | Value::Null)
            && !matches!(&self.value_initialized, Value::String(s) if s == "True" || s == "False")
        {
            return Err(config_err!(
                "`value_initialized` must be true or false, got {}",
                self.value_initialized
            ));
        }
        if let Some(h) = &self.head {
            h.validate()?;
        }
        Ok(())
    }

    fn value_initialized(&self) -> bool {
        match &self.value_initialized {
            Value::Bool(b) => *b,
            Value::String(s) => s == "True",
            _ => false,
        }
    }

    /// The dict AdapterHub writes as `adapter_fusion_config.json`'s `config`.
    pub fn adapterhub_dict(&self) -> Value {
        let mut m = match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        m.remove("adapter_names");
        m.remove("adapters");
        sorted(m)
    }

    fn peft_json(&self) -> Value {
        let mut m = match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        if let Ok(Value::Object(b)) = serde_json::to_value(&self.base) {
            m.extend(b);
        }
        m.insert(
            "head".into(),
            serde_json::to_value(&self.head).unwrap_or(Value::Null),
        );
        m.insert("peft_type".into(), "ADAPTER_FUSION".into());
        m.insert("peft_version".into(), PEFT_VERSION.into());
        m.insert("inference_mode".into(), true.into());
        sorted(m)
    }
}

/// The name an adapter directory records (AdapterHub's `name`), else the directory's name.
fn saved_name(dir: &Path) -> String {
    crate::io::read_json(&dir.join("adapter_config.json"))
        .ok()
        .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(String::from))
        .unwrap_or_else(|| {
            dir.file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
}

/// [`crate::tuners::Method::parse`] for `ADAPTER_FUSION`.
pub fn parse(v: &Value, strict: bool) -> Result<PeftConfig> {
    Ok(PeftConfig::new(FusionConfig::from_json(v, strict)?))
}

/// One fusion layer at one hook point.
#[derive(Debug)]
pub struct FusionLayer {
    adapters: Vec<String>,
    query_before_ln: bool,
    residual_before: bool,
    value_before_softmax: bool,
    pub query: Option<Dense>,
    pub key: Option<Dense>,
    pub value: Option<Dense>,
    /// A linear scoring layer used when none of query, key, value is on (AdapterHub creates it
    /// as `dense`).
    pub dense: Option<Dense>,
    dropout: f64,
    /// The softmax temperature: 50, lowered by 0.05 each forward pass down to 1 when
    /// `temperature` is on (as AdapterHub's layer does), else 1.
    t: Mutex<f64>,
    reduction: f64,
}

fn dense(rng: &mut StdRng, n_out: usize, n_in: usize, bias: bool, dev: &Device) -> Result<Dense> {
    let normal = Normal::new(0.0f32, 0.02).map_err(|e| Error::Adapter(e.to_string()))?;
    let w: Vec<f32> = (0..n_out * n_in).map(|_| normal.sample(rng)).collect();
    Ok(Dense {
        weight: Var::from_tensor(&Tensor::from_vec(w, (n_out, n_in), dev)?)?,
        bias: bias
            .then(|| Var::zeros(n_out, DType::F32, dev))
            .transpose()?,
    })
}

impl FusionLayer {
    fn new(
        config: &FusionConfig,
        hidden: usize,
        dropout: f64,
        rng: &mut StdRng,
        dev: &Device,
    ) -> Result<Self> {
        let query = config
            .query
            .then(|| dense(rng, hidden, hidden, true, dev))
            .transpose()?;
        let key = config
            .key
            .then(|| dense(rng, hidden, hidden, true, dev))
            .transpose()?;
        let mut value = config
            .value
            .then(|| dense(rng, hidden, hidden, false, dev))
            .transpose()?;
        if let (Some(v), true) = (&mut value, config.value_initialized()) {
            // The identity with 1e-6 off the diagonal.
            let eye = Tensor::eye(hidden, DType::F32, dev)?;
            let init = (&eye + ((eye.ones_like()? - &eye)? * 1e-6)?)?;
            v.weight = Var::from_tensor(&init)?;
        }
        let dense = (!config.query && !config.key && !config.value)
            .then(|| dense(rng, 1, hidden, true, dev))
            .transpose()?;
        let t = if config.temperature { 50.0 } else { 1.0 };
        Ok(Self {
            adapters: config.adapter_names.clone(),
            query_before_ln: config.query_before_ln,
            residual_before: config.residual_before,
            value_before_softmax: config.value_before_softmax,
            query,
            key,
            value,
            dense,
            dropout,
            t: Mutex::new(t),
            reduction: t / 1000.0,
        })
    }

    /// `BertFusion.forward`: `query` `[B, T, H]`, `up` `[B, T, n, H]` (the key and the value),
    /// `residual` `[B, T, H]`.
    fn attend(
        &self,
        query: &Tensor,
        up: &Tensor,
        residual: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let n = up.dim(2)?;
        let up = if self.residual_before {
            up.broadcast_add(&residual.unsqueeze(2)?)?
        } else {
            up.clone()
        };
        let q = match &self.query {
            Some(l) => l.forward(query)?,
            None => query.clone(),
        };
        let k = match &self.key {
            Some(l) => l.forward(&up)?,
            None => up.clone(),
        };
        let v = match (&self.value, self.value_before_softmax) {
            (Some(l), true) => l.forward(&up)?,
            _ => up.clone(),
        };
        // [B, T, 1, H] @ [B, T, H, n] → [B, T, n]
        let scores = q
            .unsqueeze(2)?
            .contiguous()?
            .matmul(&k.transpose(2, 3)?.contiguous()?)?
            .squeeze(2)?;
        let scores = ops::dropout(&scores, self.dropout, train)?;
        let t = {
            let mut t = self
                .t
                .lock()
                .map_err(|_| Error::Adapter("fusion temperature lock".into()))?;
            let now = *t;
            *t = (now - self.reduction).max(1.0);
            now
        };
        let probs = ops::softmax(&(scores / t)?)?;
        let _ = n;
        let mut ctx = probs
            .unsqueeze(2)?
            .contiguous()?
            .matmul(&v.contiguous()?)?
            .squeeze(2)?;
        if let (Some(l), false) = (&self.value, self.value_before_softmax) {
            ctx = l.forward(&ctx)?;
        }
        if !self.residual_before {
            ctx = (ctx + residual)?;
        }
        Ok(ctx)
    }

    fn named(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (n, l) in [
            ("query", &self.query),
            ("key", &self.key),
            ("value", &self.value),
            ("dense", &self.dense),
        ] {
            if let Some(l) = l {
                out.push((format!("{n}.weight"), l.weight.clone()));
                if let Some(b) = &l.bias {
                    out.push((format!("{n}.bias"), b.clone()));
                }
            }
        }
        out
    }
}

impl Adapter for FusionLayer {
    fn tensors(&self) -> Vec<(String, Var)> {
        self.named()
    }
    fn type_name(&self) -> &'static str {
        "adapters.BertFusion"
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn supports_mixed_batch(&self) -> bool {
        false
    }
}

impl HookAdapter for FusionLayer {
    /// AdapterHub's `compose_fuse`: the last fused adapter's `pre_forward` gives the adapters'
    /// input, the query and the residual; each fused adapter's scaled up-projection is attended
    /// over; the last adapter's `post_forward` finishes the block.
    fn forward(
        &self,
        point: &HookPoint,
        running: &[(&str, &dyn HookAdapter)],
        input: &HookInput<'_>,
    ) -> Result<Tensor> {
        if running.len() > 1 {
            return Err(Error::Adapter(format!(
                "a fusion layer runs alone at `{}`; activate only the fusion adapter (its fused \
                 adapters run inside it)",
                point.name
            )));
        }
        let children: Vec<&Bottleneck> = self
            .adapters
            .iter()
            .filter_map(|n| point.adapters.get(n))
            .filter_map(|a| a.as_any().downcast_ref::<Bottleneck>())
            .collect();
        let Some(last) = self
            .adapters
            .iter()
            .rev()
            .find_map(|n| point.adapters.get(n))
            .and_then(|a| a.as_any().downcast_ref::<Bottleneck>())
        else {
            // None of the fused adapters at this layer (leave_out): the block as it was.
            return input.plain();
        };
        let (h, residual, query) = last.pre_forward(
            input.hidden,
            input.residual,
            input.norm,
            self.query_before_ln,
            &point.name,
        )?;
        let ups = children
            .iter()
            .map(|c| Ok(c.bottleneck(&h, &residual, input.train)?.up))
            .collect::<Result<Vec<_>>>()?;
        let up = Tensor::stack(&ups, 2)?;
        let x = self.attend(&query, &up, &residual, input.train)?;
        last.post_forward(x, input.hidden, input.residual, input.norm)
    }
}

impl TunerConfig for FusionConfig {
    fn peft_type(&self) -> &'static str {
        "ADAPTER_FUSION"
    }
    fn tuner_name(&self) -> &'static str {
        "AdapterFusionModel"
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
    fn depends_on(&self) -> Vec<(String, std::path::PathBuf)> {
        self.adapter_names
            .iter()
            .cloned()
            .zip(self.adapters.iter().map(std::path::PathBuf::from))
            .collect()
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
        if self.adapter_names.len() < 2 {
            return Err(Error::Config(format!(
                "a fusion needs at least two adapters in `adapter_names`, got {:?}",
                self.adapter_names
            )));
        }
        let hidden = model.dims().hidden_size;
        let info = model.info().clone();
        let dropout = self.dropout_prob.unwrap_or_else(|| {
            info.config
                .get("attention_probs_dropout_prob")
                .and_then(|v| v.as_f64())
                .unwrap_or(0.0)
        });
        // Which kinds of point carry each fused adapter (AdapterHub's `common_config_value`:
        // a fusion layer goes where all fused adapters have that location switched on).
        let mut kinds: Vec<Vec<HookLocation>> = vec![Vec::new(); self.adapter_names.len()];
        for m in model.modules() {
            let crate::layers::ModuleRef::Hook(point) = m else {
                continue;
            };
            for (i, n) in self.adapter_names.iter().enumerate() {
                if let Some(a) = point.adapters.get(n) {
                    let b = a.as_any().downcast_ref::<Bottleneck>().ok_or_else(|| {
                        Error::Adapter(format!(
                            "`{n}` is not a bottleneck adapter; AdapterFusion fuses bottleneck adapters"
                        ))
                    })?;
                    if b.hidden_size() != hidden {
                        return Err(Error::Adapter(format!(
                            "adapter `{n}` works on hidden size {}, the model (and the other fused \
                             adapters) on {hidden}: a fusion needs adapters of one hidden size",
                            b.hidden_size()
                        )));
                    }
                    if !kinds[i].contains(&point.location) {
                        kinds[i].push(point.location);
                    }
                }
            }
        }
        if let Some((i, _)) = kinds.iter().enumerate().find(|(_, k)| k.is_empty()) {
            return Err(Error::Adapter(format!(
                "fused adapter `{}` is not on the model; load the adapters to fuse first",
                self.adapter_names[i]
            )));
        }
        // AdapterHub refuses adapters that differ in a location flag.
        for l in kinds.iter().flatten() {
            if let Some(i) = kinds.iter().position(|k| !k.contains(l)) {
                let key = match l {
                    HookLocation::Attention => "mh_adapter",
                    HookLocation::CrossAttention => "cross_adapter",
                    HookLocation::FeedForward => "output_adapter",
                };
                return Err(Error::Adapter(format!(
                    "all fused adapters must have the same `{key}`: `{}` has no adapter there and \
                     another has (as AdapterHub requires)",
                    self.adapter_names[i]
                )));
            }
        }
        let common: Vec<HookLocation> = kinds[0].clone();
        let head = match &self.head {
            Some(h) => {
                if info.task != TaskType::FeatureExtraction {
                    return Err(Error::Adapter(format!(
                        "fusion `{}` brings its own {} head: load the base model as \
                         FEATURE_EXTRACTION, not {}",
                        ctx.adapter_name,
                        h.head_type,
                        info.task.as_str()
                    )));
                }
                Some(Head::new(
                    ctx.adapter_name,
                    h,
                    hidden,
                    &info.config,
                    ctx.seed ^ 0x6865_6164,
                    model.device(),
                )?)
            }
            None => None,
        };
        let device = model.device().clone();
        let mut rng = StdRng::seed_from_u64(ctx.seed);
        let mut modules = Vec::new();
        let mut values = Vec::new();
        for m in model.modules_mut() {
            let ModuleMut::Hook(point) = m else { continue };
            if !common.contains(&point.location) {
                continue;
            }
            let layer = FusionLayer::new(self, hidden, dropout, &mut rng, &device)?;
            if let Some(v) = &layer.value {
                values.push(v.weight.clone());
            }
            point.adapters.insert(ctx.adapter_name, Box::new(layer));
            modules.push(point.name.clone());
        }
        Ok(Injected {
            modules,
            tuner: Box::new(FusionTuner { values, head }),
        })
    }
}

/// A fusion's model-level side: the value matrices it regularises, and its head.
pub struct FusionTuner {
    values: Vec<Var>,
    head: Option<Head>,
}

impl Tuner for FusionTuner {
    fn model_tensors(&self) -> Vec<ModelTensor> {
        self.head.as_ref().map(|h| h.tensors()).unwrap_or_default()
    }
    /// AdapterHub's `get_fusion_regularization_loss`: `Σ_layers 0.01 · ‖I − W_v‖²`.
    fn regularization_loss(
        &self,
        _model: &dyn Model,
        _adapter: &str,
        _config: &PeftConfig,
    ) -> Result<Option<Tensor>> {
        let mut sum: Option<Tensor> = None;
        for v in &self.values {
            let w = crate::grad::live(v.as_tensor());
            let eye = Tensor::eye(w.dim(0)?, w.dtype(), w.device())?;
            let term = ((eye - w)?.sqr()?.sum_all()? * 0.01)?;
            sum = Some(match sum {
                Some(s) => (s + term)?,
                None => term,
            });
        }
        Ok(sum)
    }
    fn head(&self) -> Option<&dyn OutputHead> {
        self.head.as_ref().map(|h| h as &dyn OutputHead)
    }
}
