//! Stable Diffusion LoRA files besides PEFT's own layout, read and written as the ecosystem does:
//!
//! - diffusers' `pytorch_lora_weights.safetensors`: keys `unet.<module>.…` and
//!   `text_encoder.<module>.…`, PEFT's `.lora_A/B.weight` (diffusers 0.42) or, from older
//!   scripts, `to_q`/`to_k`/`to_v`/`to_out.0` as `.lora.down.weight` / `.lora.up.weight` and the
//!   text encoder's `q_proj`/`k_proj`/`v_proj`/`out_proj` as `.lora_linear_layer.down/up.weight`
//!   (`convert_state_dict_to_diffusers`), and the attention-processor names before those
//!   (`….processor.to_q_lora.down.weight`). Alpha comes from the header's
//!   `lora_adapter_metadata` (the `LoraConfig` of each component, keys prefixed with it), from
//!   `.alpha` tensors, or else equals the rank (scale 1).
//! - kohya-ss (`sd-scripts`, A1111, ComfyUI): `lora_unet_<module, dots as underscores>` and
//!   `lora_te_…` (`lora_te1_…` read too) with `.lora_down.weight`, `.lora_up.weight` and a scalar
//!   `.alpha` (scale alpha / r). Underscored names are resolved against the model's own modules.
//!
//! Both come in as one [`ComponentLora`] per component: a [`LoraConfig`] (rank and alpha per
//! module through `rank_pattern` / `alpha_pattern`, as diffusers' `get_peft_kwargs` builds it) and
//! the tensors under PEFT's keys, ready for [`crate::PeftModel::load_adapter_state`].

use candle_core::{DType, Device, Tensor};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::config::LoraConfig;
use crate::io::{load_safetensors, safetensors_metadata, KEY_PREFIX};
use crate::tuners::targets::ModuleSpec;
use crate::{Error, Result};

/// diffusers' name of the file in an adapter folder.
pub const DIFFUSERS_WEIGHTS_NAME: &str = "pytorch_lora_weights.safetensors";
/// The safetensors header key diffusers keeps each component's `LoraConfig` under.
pub const METADATA_KEY: &str = "lora_adapter_metadata";

/// The components of a Stable Diffusion LoRA file.
pub const UNET: &str = "unet";
pub const TEXT_ENCODER: &str = "text_encoder";

/// One component's LoRA in PEFT's layout.
#[derive(Debug, Clone)]
pub struct ComponentLora {
    pub config: LoraConfig,
    /// `base_model.model.<module>.lora_A.weight`, `….lora_B.weight`,
    /// `….lora_magnitude_vector`.
    pub state: HashMap<String, Tensor>,
}

/// The file formats of a Stable Diffusion LoRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdLoraFormat {
    Diffusers,
    Kohya,
}

/// The shape of each adaptable layer of a component's model (`[out, in]` or `[out, in, kh, kw]`),
/// by module name: what kohya's underscored names are resolved against and how 2-D and 1×1
/// 4-D factors are fitted to the layer.
pub type SiteShapes = BTreeMap<String, Vec<usize>>;

/// Tensors under their keys, in order.
pub type StateDict = Vec<(String, Tensor)>;

/// One component's adapter: its name (`unet`, `text_encoder`), config and PEFT-keyed tensors.
pub type ComponentState<'a> = (&'a str, &'a LoraConfig, StateDict);

#[derive(Default)]
struct Parts {
    a: Option<Tensor>,
    b: Option<Tensor>,
    alpha: Option<f64>,
    magnitude: Option<Tensor>,
}

/// Which part of a module's LoRA a key suffix names, and the module path before it.
fn split_diffusers_key(key: &str, text: bool) -> Option<(String, &'static str)> {
    const SUFFIXES: [(&str, &str); 12] = [
        (".lora.down.weight", "A"),
        (".lora.up.weight", "B"),
        (".lora_linear_layer.down.weight", "A"),
        (".lora_linear_layer.up.weight", "B"),
        (".lora_A.weight", "A"),
        (".lora_B.weight", "B"),
        (".lora_A.default.weight", "A"),
        (".lora_B.default.weight", "B"),
        (".lora_magnitude_vector.weight", "M"),
        (".lora_magnitude_vector", "M"),
        (".down.weight", "A"),
        (".up.weight", "B"),
    ];
    if let Some(stem) = key.strip_suffix(".alpha") {
        return Some((old_names(stem, text), "alpha"));
    }
    SUFFIXES
        .iter()
        .find_map(|(suf, part)| key.strip_suffix(suf).map(|s| (old_names(s, text), *part)))
}

/// The attention-processor names of old diffusers files (`attn1.processor.to_q_lora`,
/// `self_attn.to_q_lora`) as module paths.
fn old_names(stem: &str, text: bool) -> String {
    let stem = stem.replace(".processor.", ".");
    let map: [(&str, &str); 4] = if text {
        [
            ("to_q_lora", "q_proj"),
            ("to_k_lora", "k_proj"),
            ("to_v_lora", "v_proj"),
            ("to_out_lora", "out_proj"),
        ]
    } else {
        [
            ("to_q_lora", "to_q"),
            ("to_k_lora", "to_k"),
            ("to_v_lora", "to_v"),
            ("to_out_lora", "to_out.0"),
        ]
    };
    for (old, new) in map {
        if let Some(prefix) = stem.strip_suffix(old) {
            return format!("{prefix}{new}");
        }
    }
    stem
}

/// The format of the LoRA file at `path`, from its keys.
pub fn detect_format(keys: &[&str]) -> SdLoraFormat {
    if keys
        .iter()
        .any(|k| k.starts_with("lora_unet_") || k.starts_with("lora_te"))
    {
        SdLoraFormat::Kohya
    } else {
        SdLoraFormat::Diffusers
    }
}

/// Reads a diffusers or kohya Stable Diffusion LoRA file. `shapes` has, per component present
/// in the model (`unet`, `text_encoder`), its layers' weight shapes.
pub fn read_sd_lora(
    path: &Path,
    device: &Device,
    shapes: &BTreeMap<&str, SiteShapes>,
) -> Result<(SdLoraFormat, BTreeMap<String, ComponentLora>)> {
    let tensors = load_safetensors(path, device)?;
    let meta = safetensors_metadata(path)?;
    let keys: Vec<&str> = tensors.keys().map(|k| k.as_str()).collect();
    let format = detect_format(&keys);
    let mut parts: BTreeMap<String, BTreeMap<String, Parts>> = BTreeMap::new();
    let mut unknown = Vec::new();
    for (key, t) in &tensors {
        let (component, module, part) = match format {
            SdLoraFormat::Diffusers => {
                let (component, rest) = if let Some(r) = key.strip_prefix("unet.") {
                    (UNET, r)
                } else if let Some(r) = key.strip_prefix("text_encoder.") {
                    (TEXT_ENCODER, r)
                } else if key.starts_with("text_model.") {
                    (TEXT_ENCODER, key.as_str())
                } else {
                    (UNET, key.as_str())
                };
                match split_diffusers_key(rest, component == TEXT_ENCODER) {
                    Some((m, p)) => (component, m, p),
                    None => {
                        unknown.push(key.clone());
                        continue;
                    }
                }
            }
            SdLoraFormat::Kohya => {
                let Some((stem, suffix)) = key.split_once('.') else {
                    unknown.push(key.clone());
                    continue;
                };
                let part = match suffix {
                    "lora_down.weight" => "A",
                    "lora_up.weight" => "B",
                    "alpha" => "alpha",
                    "dora_scale" => {
                        return Err(Error::Adapter(format!(
                            "{}: kohya DoRA (`dora_scale`) files are not read; convert the \
                             adapter to PEFT's layout",
                            path.display()
                        )))
                    }
                    _ => {
                        unknown.push(key.clone());
                        continue;
                    }
                };
                let (component, under) = if let Some(r) = stem.strip_prefix("lora_unet_") {
                    (UNET, r)
                } else if let Some(r) = stem
                    .strip_prefix("lora_te_")
                    .or_else(|| stem.strip_prefix("lora_te1_"))
                {
                    (TEXT_ENCODER, r)
                } else {
                    unknown.push(key.clone());
                    continue;
                };
                let sites = shapes.get(component).ok_or_else(|| {
                    Error::Adapter(format!(
                        "{}: holds a {component} LoRA but the model has no {component}",
                        path.display()
                    ))
                })?;
                let bare = under.strip_prefix("text_model_").unwrap_or(under);
                let module = sites
                    .keys()
                    .find(|m| {
                        let u = m.replace('.', "_");
                        u == under || u == bare || u.strip_prefix("text_model_") == Some(bare)
                    })
                    .cloned()
                    .ok_or_else(|| {
                        Error::Adapter(format!(
                            "{}: kohya module `{stem}` matches no layer of the {component} (a \
                             LoRA for another model, e.g. SDXL's `input_blocks` layout?)",
                            path.display()
                        ))
                    })?;
                (component, module, part)
            }
        };
        let p = parts
            .entry(component.to_string())
            .or_default()
            .entry(module)
            .or_default();
        match part {
            "A" => p.a = Some(t.clone()),
            "B" => p.b = Some(t.clone()),
            "M" => p.magnitude = Some(t.clone()),
            _ => p.alpha = Some(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0]),
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        return Err(Error::Adapter(format!(
            "{}: keys that are not LoRA weights of a UNet or CLIP text encoder: {}",
            path.display(),
            unknown
                .iter()
                .take(8)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let metadata: Option<Value> = meta
        .get(METADATA_KEY)
        .map(|s| serde_json::from_str(s))
        .transpose()
        .map_err(|e| Error::Adapter(format!("{}: bad {METADATA_KEY}: {e}", path.display())))?;
    let mut out = BTreeMap::new();
    for (component, modules) in parts {
        let sites = shapes.get(component.as_str()).ok_or_else(|| {
            Error::Adapter(format!(
                "{}: holds a {component} LoRA but the model has no {component}",
                path.display()
            ))
        })?;
        let comp_meta = metadata.as_ref().and_then(|m| m.as_object()).map(|m| {
            let prefix = format!("{component}.");
            m.iter()
                .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|k| (k.to_string(), v.clone())))
                .collect::<Map<String, Value>>()
        });
        out.insert(
            component.clone(),
            build_component(path, &component, modules, sites, comp_meta)?,
        );
    }
    if out.is_empty() {
        return Err(Error::Adapter(format!(
            "{}: no LoRA weights in the file",
            path.display()
        )));
    }
    Ok((format, out))
}

/// The site a module path from a file names: itself, or the same without or with CLIP's
/// `text_model.` wrapper (transformers 4 and 5 name the text encoder's modules differently).
fn resolve<'a>(sites: &'a SiteShapes, module: &str) -> Option<&'a String> {
    let bare = module.strip_prefix("text_model.").unwrap_or(module);
    sites
        .get_key_value(module)
        .or_else(|| sites.get_key_value(bare))
        .or_else(|| sites.get_key_value(&format!("text_model.{bare}")))
        .map(|(k, _)| k)
}

/// Fits a factor stored 2-D to a 1×1 convolution, or one stored `[.., .., 1, 1]` to a linear
/// layer (files made on models whose projections are the other kind).
fn fit(t: Tensor, conv: bool) -> Result<Tensor> {
    Ok(match (t.rank(), conv) {
        (2, true) => t.unsqueeze(2)?.unsqueeze(3)?,
        (4, false) if t.dims()[2] == 1 && t.dims()[3] == 1 => t.squeeze(3)?.squeeze(2)?,
        _ => t,
    })
}

fn most_common<T: PartialEq + Copy>(values: &[T]) -> Option<T> {
    let mut best: Option<(T, usize)> = None;
    for v in values {
        let n = values.iter().filter(|x| *x == v).count();
        if best.is_none_or(|(_, m)| n > m) {
            best = Some((*v, n));
        }
    }
    best.map(|(v, _)| v)
}

fn build_component(
    path: &Path,
    component: &str,
    modules: BTreeMap<String, Parts>,
    sites: &SiteShapes,
    metadata: Option<Map<String, Value>>,
) -> Result<ComponentLora> {
    let mut state = HashMap::new();
    let mut ranks = Vec::new();
    let mut alphas = Vec::new();
    for (module, p) in &modules {
        let module = resolve(sites, module).unwrap_or(module);
        let shape = sites.get(module).ok_or_else(|| {
            Error::Adapter(format!(
                "{}: `{component}.{module}` is not an adaptable layer of this {component} (a LoRA \
                 for another model?)",
                path.display()
            ))
        })?;
        let conv = shape.len() == 4;
        let (Some(a), Some(b)) = (&p.a, &p.b) else {
            return Err(Error::Adapter(format!(
                "{}: `{component}.{module}` has only one of its two LoRA factors",
                path.display()
            )));
        };
        let r = a.dims()[0];
        ranks.push((module.clone(), r));
        alphas.push((module.clone(), p.alpha.unwrap_or(r as f64)));
        let key = |s: &str| format!("{KEY_PREFIX}{module}.{s}");
        state.insert(key("lora_A.weight"), fit(a.to_dtype(DType::F32)?, conv)?);
        state.insert(key("lora_B.weight"), fit(b.to_dtype(DType::F32)?, conv)?);
        if let Some(m) = &p.magnitude {
            state.insert(key("lora_magnitude_vector"), m.to_dtype(DType::F32)?);
        }
    }
    let use_dora = modules.values().any(|p| p.magnitude.is_some());
    let config = match metadata {
        Some(m) if !m.is_empty() => {
            let v = Value::Object(m);
            let mut v = v;
            if let Some(o) = v.as_object_mut() {
                o.entry("peft_type").or_insert("LORA".into());
            }
            LoraConfig::from_json(&v, false).map_err(|e| {
                Error::Adapter(format!(
                    "{}: the {component} LoraConfig in {METADATA_KEY}: {e}",
                    path.display()
                ))
            })?
        }
        _ => {
            let rank_values: Vec<usize> = ranks.iter().map(|(_, r)| *r).collect();
            let r = most_common(&rank_values).unwrap_or(4);
            let alpha_values: Vec<f64> = alphas.iter().map(|(_, a)| *a).collect();
            let any_alpha = modules.values().any(|p| p.alpha.is_some());
            let lora_alpha = if any_alpha {
                let mut best = alpha_values[0];
                let mut count = 0;
                for a in &alpha_values {
                    let n = alpha_values.iter().filter(|x| *x == a).count();
                    if n > count {
                        best = *a;
                        count = n;
                    }
                }
                best
            } else {
                r as f64
            };
            let mut rank_pattern = Map::new();
            for (m, rr) in &ranks {
                if *rr != r {
                    rank_pattern.insert(m.clone(), (*rr).into());
                }
            }
            let mut alpha_pattern = Map::new();
            for (m, a) in &alphas {
                if *a != lora_alpha {
                    alpha_pattern.insert(m.clone(), (*a).into());
                }
            }
            LoraConfig {
                r,
                lora_alpha,
                target_modules: Some(ModuleSpec::List(
                    modules
                        .keys()
                        .map(|m| resolve(sites, m).unwrap_or(m).clone())
                        .collect(),
                )),
                rank_pattern,
                alpha_pattern,
                use_dora,
                ..Default::default()
            }
        }
    };
    Ok(ComponentLora { config, state })
}

/// `base_model.model.<module>.<suffix>` → (`<module>`, `<suffix>`).
fn split_peft_key(key: &str) -> Result<(&str, &str)> {
    let rest = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
    for suf in ["lora_A.weight", "lora_B.weight", "lora_magnitude_vector"] {
        if let Some(m) = rest.strip_suffix(suf).and_then(|m| m.strip_suffix('.')) {
            return Ok((m, suf));
        }
    }
    Err(Error::Adapter(format!(
        "`{key}` is not a LoRA tensor (lora_A / lora_B / lora_magnitude_vector); only LoRA \
         adapters have diffusers and kohya files"
    )))
}

/// diffusers' `pytorch_lora_weights.safetensors` contents from per-component PEFT state dicts
/// and configs, as diffusers 0.42 writes them (`save_lora_weights` of `get_peft_model_state_dict`
/// with each component's `LoraConfig` in the header): PEFT's keys under `unet.` /
/// `text_encoder.`. (Not the older renamed keys: diffusers 0.42 takes a file with any `lora_A`
/// key as PEFT's and then drops renamed `.lora.down` keys.) Returns the tensors and the header.
pub fn to_diffusers(
    components: &[ComponentState<'_>],
) -> Result<(StateDict, HashMap<String, String>)> {
    let mut tensors = Vec::new();
    let mut meta = Map::new();
    for (component, config, state) in components {
        for (key, t) in state {
            let (module, suffix) = split_peft_key(key)?;
            tensors.push((format!("{component}.{module}.{suffix}"), t.clone()));
        }
        if let Value::Object(o) = config.to_adapter_json() {
            for (k, v) in o {
                meta.insert(format!("{component}.{k}"), v);
            }
        }
    }
    let mut header = HashMap::new();
    header.insert(
        METADATA_KEY.to_string(),
        serde_json::to_string_pretty(&Value::Object(meta))
            .map_err(|e| Error::Adapter(e.to_string()))?,
    );
    Ok((tensors, header))
}

/// A kohya-ss file's tensors from per-component PEFT state dicts: `lora_unet_…` / `lora_te_…`
/// with `.lora_down.weight`, `.lora_up.weight` and the module's scalar `.alpha` (its alpha, so
/// that alpha / r is the PEFT scale). DoRA adapters have no kohya form here.
pub fn to_kohya(components: &[ComponentState<'_>]) -> Result<StateDict> {
    let mut out = Vec::new();
    for (component, config, state) in components {
        let prefix = match *component {
            UNET => "lora_unet",
            TEXT_ENCODER => "lora_te",
            other => {
                return Err(Error::Adapter(format!(
                    "kohya files hold unet and text_encoder LoRAs, not `{other}`"
                )))
            }
        };
        if config.use_dora {
            return Err(Error::Adapter(
                "DoRA adapters are not written as kohya files; use PEFT's or diffusers' layout"
                    .into(),
            ));
        }
        for (key, t) in state {
            let (module, suffix) = split_peft_key(key)?;
            // sd-scripts (and the web UIs reading its files) name the text encoder's modules as
            // transformers 4 did, under `text_model`.
            let path = if *component == TEXT_ENCODER && !module.starts_with("text_model.") {
                format!("text_model.{module}")
            } else {
                module.to_string()
            };
            let stem = format!("{prefix}_{}", path.replace('.', "_"));
            match suffix {
                "lora_A.weight" => {
                    out.push((format!("{stem}.lora_down.weight"), t.clone()));
                    let r = t.dims()[0];
                    let alpha = crate::tuners::targets::pattern_value(
                        &config.alpha_pattern,
                        module,
                        |v| v.as_f64(),
                    )?
                    .unwrap_or(config.lora_alpha);
                    let rank =
                        crate::tuners::targets::pattern_value(&config.rank_pattern, module, |v| {
                            v.as_u64().map(|x| x as usize)
                        })?
                        .unwrap_or(config.r);
                    // rsLoRA's alpha / sqrt(r) expressed as a kohya alpha over r.
                    let alpha = if config.use_rslora {
                        alpha * (rank as f64).sqrt()
                    } else {
                        alpha
                    };
                    debug_assert_eq!(r, rank);
                    out.push((
                        format!("{stem}.alpha"),
                        Tensor::new(alpha as f32, t.device())?,
                    ));
                }
                "lora_B.weight" => out.push((format!("{stem}.lora_up.weight"), t.clone())),
                _ => {
                    return Err(Error::Adapter(
                        "DoRA adapters are not written as kohya files".into(),
                    ))
                }
            }
        }
    }
    Ok(out)
}
