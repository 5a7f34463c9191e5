//! llama.cpp's GGUF LoRA adapters, both ways: a PEFT LoRA adapter written as llama.cpp's
//! `convert_lora_to_gguf.py` writes it, and such a file read back as a PEFT LoRA adapter (to
//! load on a model, serve, merge, or save in PEFT's layout).
//!
//! The format, as that converter writes it (llama-family bases, llama.cpp architecture `llama`):
//! - metadata `general.architecture = "llama"`, `general.type = "adapter"`,
//!   `adapter.type = "lora"`, `adapter.lora.alpha` (f32; llama.cpp scales each tensor pair by
//!   alpha / rank, and by 1 when alpha is 0), `general.quantization_version = 2`;
//! - for every adapted Linear `<stem>.weight.lora_a` = PEFT's `lora_A` ([r, in]) and
//!   `.lora_b` = `lora_B` ([out, r]), float (F32 by default, F16/BF16 on request), where the
//!   stem is llama.cpp's tensor name (`blk.3.attn_q`, `output`, ...);
//! - the query and key projections' `lora_b` rows permuted as llama.cpp permutes those weights
//!   (its RoPE works on adjacent pairs), with the query's head count and the key's KV head count;
//! - the token embedding's `token_embd.weight.lora_a` = `lora_embedding_A` transposed ([vocab, r]),
//!   `lora_b` = `lora_embedding_B` ([hidden, r]);
//! - tensors in the order of the PEFT file's sorted keys.
//!
//! The model-card metadata the converter guesses from the directory (`general.name`, tags,
//! `general.base_model.*`) is not written: llama.cpp does not read it.

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value as Json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use crate::io::gguf::{permute_rows, unpermute_rows, GgufFile, Source, BLOCK_LINEARS};
use crate::io::gguf_write::{write_gguf, GgufTensor};
use crate::io::KEY_PREFIX;
use crate::{Error, Result};

/// The float type of the written tensors: convert_lora_to_gguf.py's `--outtype` (f32 is its
/// default; its q8_0 and auto are not offered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GgufOutType {
    #[default]
    F32,
    F16,
    Bf16,
}

impl std::str::FromStr for GgufOutType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            other => Err(Error::Config(format!(
                "GGUF adapter tensor type `{other}` is not offered; use f32, f16 or bf16"
            ))),
        }
    }
}

impl GgufOutType {
    fn ggml(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Bf16 => GgmlDType::BF16,
        }
    }
}

/// GGUF metadata key/values, in file order.
pub type Metadata = Vec<(String, Value)>;

/// What a GGUF LoRA needs from the base model's config.json.
struct Base {
    heads: usize,
    kv_heads: usize,
    layers: usize,
}

impl Base {
    /// llama.cpp's `llama` architecture covers transformers' llama and mistral (its `LlamaModel`
    /// converts both); anything else has other tensor names or no RoPE permutation.
    fn from_config(config: &Json) -> Result<Self> {
        let model_type = config["model_type"].as_str().unwrap_or("");
        if !matches!(model_type, "llama" | "mistral") {
            return Err(Error::Config(format!(
                "GGUF LoRA adapters are supported for llama-family bases (model_type llama or \
                 mistral, llama.cpp's `llama` architecture); this base is `{model_type}`"
            )));
        }
        let get = |k: &str| config[k].as_u64().map(|v| v as usize);
        let heads = get("num_attention_heads")
            .ok_or_else(|| Error::Config("the base config has no num_attention_heads".into()))?;
        Ok(Self {
            heads,
            kv_heads: get("num_key_value_heads").unwrap_or(heads),
            layers: get("num_hidden_layers").unwrap_or(0),
        })
    }
}

/// A transformers module path → llama.cpp's tensor stem and the heads its rows are permuted with.
fn stem_of(module: &str, base: &Base) -> Option<(String, Option<usize>)> {
    match module {
        "model.embed_tokens" => return Some(("token_embd".into(), None)),
        "lm_head" => return Some(("output".into(), None)),
        _ => {}
    }
    let rest = module.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (stem, _) = BLOCK_LINEARS.iter().find(|(_, hf)| *hf == part)?;
    let heads = match *stem {
        "attn_q" => Some(base.heads),
        "attn_k" => Some(base.kv_heads),
        _ => None,
    };
    Some((format!("blk.{layer}.{stem}"), heads))
}

/// llama.cpp's tensor stem → the transformers module path and the permutation heads.
fn module_of(stem: &str, base: &Base) -> Option<(String, Option<usize>)> {
    match stem {
        "token_embd" => return Some(("model.embed_tokens".into(), None)),
        "output" => return Some(("lm_head".into(), None)),
        _ => {}
    }
    let rest = stem.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, hf) = BLOCK_LINEARS.iter().find(|(g, _)| *g == part)?;
    let heads = match part {
        "attn_q" => Some(base.heads),
        "attn_k" => Some(base.kv_heads),
        _ => None,
    };
    Some((format!("model.layers.{layer}.{hf}"), heads))
}

fn supported_names() -> String {
    let mut names: Vec<&str> = vec!["embed_tokens (token_embd)", "lm_head (output)"];
    names.extend(BLOCK_LINEARS.iter().map(|(_, hf)| *hf));
    names.join(", ")
}

/// The metadata and tensors of the GGUF LoRA for a PEFT LoRA adapter (`adapter_config.json` as
/// JSON and its tensors under PEFT's keys) on a base with config.json `base_config`.
pub fn peft_to_gguf(
    adapter_config: &Json,
    tensors: &HashMap<String, Tensor>,
    base_config: &Json,
    out_type: GgufOutType,
) -> Result<(Metadata, Vec<GgufTensor>)> {
    let base = Base::from_config(base_config)?;
    check_exportable(adapter_config)?;
    let alpha = adapter_config["lora_alpha"].as_f64().unwrap_or(8.0);
    // Pairs by module path, in the order of the sorted PEFT keys (the converter's order).
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    let mut order: Vec<String> = Vec::new();
    let mut pairs: HashMap<String, (Option<Tensor>, Option<Tensor>, bool)> = HashMap::new();
    for key in keys {
        let path = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
        if path.ends_with(".base_layer.weight") {
            continue; // PEFT saves the embedding/head base weights with the adapter; not LoRA.
        }
        let (module, is_a, embedding) = if let Some(m) = path.strip_suffix(".lora_A.weight") {
            (m, true, false)
        } else if let Some(m) = path.strip_suffix(".lora_B.weight") {
            (m, false, false)
        } else if let Some(m) = path.strip_suffix(".lora_embedding_A") {
            (m, true, true)
        } else if let Some(m) = path.strip_suffix(".lora_embedding_B") {
            (m, false, true)
        } else {
            return Err(Error::Adapter(format!(
                "tensor `{key}` is not a LoRA factor (lora_A / lora_B); a GGUF LoRA adapter holds \
                 only those (no trained biases, no modules_to_save)"
            )));
        };
        let entry = pairs.entry(module.to_string()).or_insert_with(|| {
            order.push(module.to_string());
            (None, None, embedding)
        });
        let t = tensors[key].to_dtype(DType::F32)?;
        if is_a {
            entry.0 = Some(t);
        } else {
            entry.1 = Some(t);
        }
    }
    let mut out = Vec::new();
    for module in order {
        let (a, b, embedding) = pairs.remove(&module).expect("recorded above");
        let (Some(a), Some(b)) = (a, b) else {
            return Err(Error::Adapter(format!(
                "module `{module}` has only one of its two LoRA factors in the adapter file"
            )));
        };
        let (stem, heads) = stem_of(&module, &base).ok_or_else(|| {
            Error::Adapter(format!(
                "module `{module}` has no llama.cpp tensor name, so a GGUF adapter cannot hold \
                 it; llama.cpp's LoRA covers {}",
                supported_names()
            ))
        })?;
        // Embedding LoRA: llama.cpp gathers rows of lora_a, so it stores A transposed.
        let a = if embedding { a.t()?.contiguous()? } else { a };
        let b = match heads {
            Some(h) => permute_rows(&b, h)?,
            None => b,
        };
        for (suffix, t) in [("lora_a", a), ("lora_b", b)] {
            out.push(GgufTensor {
                name: format!("{stem}.weight.{suffix}"),
                dtype: out_type.ggml(),
                tensor: t,
            });
        }
    }
    let metadata = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.type".into(), Value::String("adapter".into())),
        ("adapter.type".into(), Value::String("lora".into())),
        ("adapter.lora.alpha".into(), Value::F32(alpha as f32)),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    Ok((metadata, out))
}

/// Refuses what llama.cpp's LoRA cannot express, rather than writing an adapter that computes
/// something else there.
fn check_exportable(c: &Json) -> Result<()> {
    let kind = c["peft_type"].as_str().unwrap_or("");
    if kind != "LORA" {
        return Err(Error::Adapter(format!(
            "a GGUF adapter holds LoRA only; this adapter is {kind}"
        )));
    }
    let refuse = |what: &str| {
        Err(Error::Adapter(format!(
            "this LoRA uses {what}, which llama.cpp's GGUF LoRA cannot express (it scales each \
             pair by one alpha / rank); merge it into the base instead"
        )))
    };
    let truthy = |k: &str| c[k].as_bool().unwrap_or(false);
    if truthy("use_dora") {
        return refuse("DoRA (use_dora)");
    }
    if truthy("use_rslora") {
        return refuse("rsLoRA scaling (use_rslora)");
    }
    let alpha = c["lora_alpha"].as_f64();
    if let Some(p) = c["alpha_pattern"].as_object() {
        if p.values().any(|v| v.as_f64() != alpha) {
            return refuse("per-module alphas (alpha_pattern)");
        }
    }
    if c["modules_to_save"]
        .as_array()
        .is_some_and(|m| !m.is_empty())
    {
        return refuse("modules_to_save (whole trained modules)");
    }
    if c["bias"].as_str().is_some_and(|b| b != "none") || truthy("lora_bias") {
        return refuse("trained biases");
    }
    Ok(())
}

/// Writes the PEFT LoRA adapter in `adapter_dir` as a GGUF LoRA at `path` (atomically), for the
/// base described by `base_config`.
pub fn export_gguf(
    adapter_dir: &Path,
    base_config: &Json,
    out_type: GgufOutType,
    path: &Path,
) -> Result<()> {
    let config = crate::io::read_json(&adapter_dir.join(crate::io::ADAPTER_CONFIG_NAME))?;
    let tensors = crate::io::load_safetensors(
        &adapter_dir.join(crate::io::ADAPTER_WEIGHTS_NAME),
        &Device::Cpu,
    )?;
    let (meta, tensors) = peft_to_gguf(&config, &tensors, base_config, out_type)?;
    write_gguf(path, &meta, &tensors)
}

/// A GGUF LoRA adapter read back as a PEFT LoRA: `adapter_config.json` as JSON and the tensors
/// under PEFT's keys, in f32.
pub struct GgufLora {
    pub config: Json,
    pub tensors: BTreeMap<String, Tensor>,
}

/// Whether `path` names a GGUF adapter: a `.gguf` file, or a directory holding one GGUF file and
/// no PEFT `adapter_config.json`. (A GGUF model passed as an adapter is refused when read.)
pub fn is_gguf_adapter(path: &Path) -> bool {
    if path.is_dir() && path.join(crate::io::ADAPTER_CONFIG_NAME).exists() {
        return false;
    }
    matches!(crate::io::gguf::find_gguf(path), Ok(Some(_)))
}

/// Reads the GGUF LoRA adapter at `path` (a file, or a directory holding one) for a base with
/// config.json `base_config`.
pub fn read_gguf_lora(path: &Path, base_config: &Json, device: &Device) -> Result<GgufLora> {
    let file_path = crate::io::gguf::find_gguf(path)?
        .ok_or_else(|| Error::Adapter(format!("{}: no GGUF file there", path.display())))?;
    let file = GgufFile::open(&file_path)?;
    let shown = file_path.display();
    let string = |k: &str| match file.metadata().get(k) {
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    };
    let ty = string("general.type");
    if ty != "adapter" {
        let what = if ty.is_empty() { "model".into() } else { ty };
        return Err(Error::Adapter(format!(
            "{shown} is not a GGUF adapter (general.type = {what}): a GGUF model is a base model, \
             pass it as the model, not as an adapter"
        )));
    }
    let kind = string("adapter.type");
    if kind != "lora" {
        return Err(Error::Adapter(format!(
            "{shown}: GGUF adapter type `{kind}` is not supported (only lora)"
        )));
    }
    let arch = string("general.architecture");
    if arch != "llama" {
        return Err(Error::Adapter(format!(
            "{shown}: GGUF LoRA for architecture `{arch}` is not supported (only llama)"
        )));
    }
    let base = Base::from_config(base_config)?;
    let alpha = match file.metadata().get("adapter.lora.alpha") {
        Some(v) => v.to_f32().map_err(|e| {
            Error::Adapter(format!("{shown}: adapter.lora.alpha is not a number ({e})"))
        })? as f64,
        None => 0.0,
    };
    let names: Vec<String> = file.tensor_names().map(str::to_string).collect();
    let mut tensors = BTreeMap::new();
    let mut ranks: BTreeMap<String, usize> = BTreeMap::new();
    for name in &names {
        let (stem, is_a) = match (
            name.strip_suffix(".weight.lora_a"),
            name.strip_suffix(".weight.lora_b"),
        ) {
            (Some(s), _) => (s, true),
            (_, Some(s)) => (s, false),
            _ => {
                return Err(Error::Adapter(format!(
                    "{shown}: tensor `{name}` is not a LoRA factor (.lora_a / .lora_b); extra \
                     tensors such as mergekit's norms are not supported"
                )))
            }
        };
        let (module, heads) = module_of(stem, &base).ok_or_else(|| {
            Error::Adapter(format!(
                "{shown}: tensor `{name}` names no module of a llama model here (known: {})",
                supported_names()
            ))
        })?;
        let other = if is_a { "lora_b" } else { "lora_a" };
        if !names.contains(&format!("{stem}.weight.{other}")) {
            return Err(Error::Adapter(format!(
                "{shown}: `{name}` has no `{stem}.weight.{other}` beside it"
            )));
        }
        let source = Source {
            gguf_name: name.clone(),
            unpermute_heads: None,
        };
        let t = file.load(&source, &Device::Cpu)?;
        let embedding = module == "model.embed_tokens";
        let (key, t) = match (is_a, embedding) {
            (true, false) => (format!("{module}.lora_A.weight"), t),
            (true, true) => (format!("{module}.lora_embedding_A"), t.t()?.contiguous()?),
            (false, false) => (format!("{module}.lora_B.weight"), t),
            (false, true) => (format!("{module}.lora_embedding_B"), t),
        };
        let t = match heads {
            Some(h) if !is_a => unpermute_rows(&t, h)?,
            _ => t,
        };
        if is_a {
            ranks.insert(module.clone(), t.dims()[0]);
        }
        tensors.insert(format!("{KEY_PREFIX}{key}"), t.to_device(device)?);
    }
    if ranks.is_empty() {
        return Err(Error::Adapter(format!(
            "{shown}: the adapter holds no LoRA tensors"
        )));
    }
    Ok(GgufLora {
        config: lora_config(&ranks, alpha, &base),
        tensors,
    })
}

/// The PEFT LoraConfig that reproduces llama.cpp's scaling: one rank (the most common; others in
/// `rank_pattern`), `lora_alpha` = the file's alpha (alpha 0 means scale 1 in llama.cpp, so
/// alpha = r per module), and target modules by short name when every layer has the module, by
/// full path otherwise.
fn lora_config(ranks: &BTreeMap<String, usize>, alpha: f64, base: &Base) -> Json {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for r in ranks.values() {
        *counts.entry(*r).or_default() += 1;
    }
    let r = counts
        .iter()
        .max_by_key(|(r, n)| (**n, std::cmp::Reverse(**r)))
        .map(|(r, _)| *r)
        .unwrap_or(8);
    let rank_pattern: serde_json::Map<String, Json> = ranks
        .iter()
        .filter(|(_, rm)| **rm != r)
        .map(|(m, rm)| (m.clone(), json!(rm)))
        .collect();
    let (lora_alpha, alpha_pattern) = if alpha == 0.0 {
        let p: serde_json::Map<String, Json> = rank_pattern.clone();
        (r as f64, p)
    } else {
        (alpha, serde_json::Map::new())
    };
    let mut by_short: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for m in ranks.keys() {
        let short = m.rsplit('.').next().unwrap_or(m).to_string();
        by_short.entry(short).or_default().insert(m.clone());
    }
    let mut targets: Vec<String> = Vec::new();
    for (short, paths) in by_short {
        let per_layer = paths.iter().all(|p| p.starts_with("model.layers."));
        if !per_layer || paths.len() == base.layers {
            targets.push(short);
        } else {
            targets.extend(paths);
        }
    }
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "inference_mode": true,
    })
}

impl GgufLora {
    /// Writes the adapter in PEFT's layout (`adapter_config.json` with every field PEFT writes,
    /// `adapter_model.safetensors`) in `dir`.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        let config = crate::tuners::PeftConfig::from_adapter_json(&self.config)?;
        let tensors: Vec<(String, Tensor)> = self
            .tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        crate::io::save_safetensors(&dir.join(crate::io::ADAPTER_WEIGHTS_NAME), &tensors)?;
        let json = serde_json::to_string_pretty(&config.to_adapter_json())
            .map_err(|e| Error::Adapter(e.to_string()))?;
        crate::io::write_atomic(&dir.join(crate::io::ADAPTER_CONFIG_NAME), json.as_bytes())
    }
}

/// [`crate::tuners::AdapterFormat`] hook: the GGUF LoRA at `path` for `model`.
pub(crate) fn read_for_model(
    path: &Path,
    model: &dyn crate::models::Model,
    _name: &str,
) -> Result<(crate::tuners::PeftConfig, HashMap<String, Tensor>)> {
    read_for_config(path, &model.info().config, model.device())
}

/// [`crate::tuners::AdapterFormat`] hook: the GGUF LoRA at `path` for the base whose config.json
/// is `base_config`.
pub(crate) fn read_for_config(
    path: &Path,
    base_config: &Json,
    device: &Device,
) -> Result<(crate::tuners::PeftConfig, HashMap<String, Tensor>)> {
    let lora = read_gguf_lora(path, base_config, device)?;
    let config = crate::tuners::PeftConfig::from_adapter_json(&lora.config)?;
    Ok((config, lora.tensors.into_iter().collect()))
}

/// [`crate::tuners::AdapterFormat`] hook: a llama.cpp adapter is for a causal LM.
pub(crate) fn base_task(_path: &Path) -> Result<Option<crate::models::TaskType>> {
    Ok(Some(crate::models::TaskType::CausalLm))
}
