//! Saving and loading adapters in PEFT's layout: `adapter_config.json` and
//! `adapter_model.safetensors` (keys `base_model.model.<module path>.<tensor>`), the default
//! adapter in the directory and others in `<dir>/<name>/`.

use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

use super::{bias_key, modules_to_save_root, PeftModel, CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME};
use crate::io::{load_safetensors, read_json, save_safetensors, write_atomic};
use crate::tuners::tuner::set_checked;
use crate::tuners::{Bias, PeftConfig};
use crate::{Error, Result};

impl PeftModel {
    /// The tensors `save_pretrained` writes for adapter `name`.
    pub fn adapter_state_dict(&self, name: &str) -> Result<Vec<(String, Tensor)>> {
        let entry = self.entry(name).ok_or_else(|| self.no_such_adapter(name))?;
        let mut out: Vec<(String, Tensor)> = self
            .adapter_vars(name)
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().detach()))
            .collect();
        out.extend(
            entry
                .tuner
                .model_tensors()
                .into_iter()
                .map(|t| (t.key, t.var.as_tensor().detach())),
        );
        let bias = entry.config.bias();
        if bias != Bias::None {
            for module in self.model.modules() {
                let wrapped = module.has_adapters();
                for p in module.params() {
                    let wanted = p.name.ends_with(".bias")
                        && match bias {
                            Bias::All => true,
                            Bias::AdaptedOnly => wrapped,
                            Bias::None => false,
                        };
                    if !wanted {
                        continue;
                    }
                    match modules_to_save_root(module.name(), &entry.modules_to_save) {
                        // PEFT's bias filter also catches the wrapper's two inner modules.
                        Some(root) if bias == Bias::All => {
                            let rest = &p.name[root.len() + 1..];
                            let base = format!("{KEY_PREFIX}{root}.original_module.{rest}");
                            out.push((base, p.base().detach()));
                            if let Some(copy) = p.copy(name) {
                                let key = format!("{KEY_PREFIX}{root}.modules_to_save.{rest}");
                                out.push((key, copy.as_tensor().detach()));
                            }
                        }
                        Some(_) => {}
                        None => {
                            out.push((bias_key(module.name(), &p.name, wrapped), p.base().detach()))
                        }
                    }
                }
            }
        }
        entry.tuner.state_dict_to_save(&entry.config, out)
    }

    /// Writes every adapter in PEFT's layout: `default` in `dir`, others in `dir/<name>/`.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        self.save_pretrained_selected(dir, None)
    }

    /// [`PeftModel::save_pretrained`] of only the named adapters (PEFT's `selected_adapters`).
    pub fn save_pretrained_selected(&self, dir: &Path, selected: Option<&[&str]>) -> Result<()> {
        if let Some(sel) = selected {
            if let Some(bad) = sel.iter().find(|n| self.entry(n).is_none()) {
                return Err(Error::Adapter(format!(
                    "cannot save adapter `{bad}`: no such adapter; loaded: {}",
                    self.adapter_names().join(", ")
                )));
            }
        }
        let chosen = self
            .adapters
            .iter()
            .filter(|e| selected.is_none_or(|sel| sel.contains(&e.name.as_str())));
        for entry in chosen {
            let target = if entry.name == "default" {
                dir.to_path_buf()
            } else {
                dir.join(&entry.name)
            };
            std::fs::create_dir_all(&target).map_err(|e| Error::io(&target, e))?;
            save_safetensors(
                &target.join(WEIGHTS_NAME),
                &self.adapter_state_dict(&entry.name)?,
            )?;
            let json = serde_json::to_string_pretty(&entry.config.to_adapter_json())
                .map_err(|e| Error::Adapter(e.to_string()))?;
            write_atomic(&target.join(CONFIG_NAME), json.as_bytes())?;
        }
        Ok(())
    }

    /// Loads the adapter in `dir` as `name`: a PEFT adapter directory, or one in a foreign layout
    /// the tuners read ([`crate::tuners::FORMATS`]: AdapterHub's adapters, fusions and heads),
    /// told apart by its files. Every tensor the config implies must be in the file with the
    /// model's shape, and the file must hold nothing the model cannot place.
    pub fn load_adapter(&mut self, dir: &Path, name: &str, is_trainable: bool) -> Result<()> {
        let (config, file, weights_path) = match crate::tuners::foreign_format(dir) {
            Some(format) => {
                let (config, file) = (format.read)(dir, self.model.as_ref(), name)?;
                tracing::debug!("{}: {} adapter directory", dir.display(), format.name);
                (config, file, dir.to_path_buf())
            }
            None => {
                let f = AdapterFiles::read(dir, self.model.device())?;
                (f.config, f.tensors, dir.join(WEIGHTS_NAME))
            }
        };
        let config = resolve_dependencies(config, dir);
        self.load_adapter_state(
            name,
            config,
            file,
            is_trainable,
            &weights_path.display().to_string(),
        )
    }

    /// Puts an adapter already read from disk on the model as `name` (what
    /// [`PeftModel::load_adapter`] does after reading): a server keeps [`AdapterFiles`] in memory
    /// and adds or deletes adapters without touching the disk again.
    pub fn add_adapter_files(
        &mut self,
        files: &AdapterFiles,
        name: &str,
        is_trainable: bool,
    ) -> Result<()> {
        self.load_adapter_state(
            name,
            files.config.clone(),
            files.tensors.clone(),
            is_trainable,
            &files.dir.join(WEIGHTS_NAME).display().to_string(),
        )
    }

    /// Attaches adapter `name` described by `config` and fills it from `state`, whose keys are
    /// PEFT's (`base_model.model.<module path>.<tensor>`): what [`PeftModel::load_adapter`] does
    /// once the files are read, also for adapters that come from other formats (diffusers' and
    /// kohya's LoRA files). Every tensor the config implies must be there with the model's shape,
    /// and nothing else; `source` names where the tensors came from in the error.
    pub fn load_adapter_state(
        &mut self,
        name: &str,
        config: PeftConfig,
        state: HashMap<String, Tensor>,
        is_trainable: bool,
        source: &str,
    ) -> Result<()> {
        let model = self.model.as_ref();
        let mut file: HashMap<String, Tensor> = state
            .into_iter()
            .map(|(k, t)| match k.strip_prefix(KEY_PREFIX) {
                Some(rest) => (
                    format!("{KEY_PREFIX}{}", model.canonical_module_path(rest)),
                    t,
                ),
                None => (k, t),
            })
            .collect();
        let first = self.adapters.is_empty();
        self.inject(name, config, is_trainable, true)?;
        let mut expected = self.adapter_vars(name);
        // Trained biases are part of the adapter too: `bias` = all / lora_only.
        let bias = self.entry(name).map_or(Bias::None, |e| e.config.bias());
        let mut missing = Vec::new();
        for (key, var) in expected.drain(..) {
            match file.remove(&key) {
                Some(t) => {
                    if let Err(e) = set_checked(&key, &var, &t) {
                        self.delete_adapter(name)?;
                        return Err(match e {
                            Error::ShapeMismatch {
                                name: key,
                                expected,
                                found,
                            } => Error::Adapter(format!(
                                "{source} does not fit this model: tensor `{key}` has shape \
                                 {found:?} but the model's layer needs {expected:?} (an adapter \
                                 trained on a model of another size?)"
                            )),
                            e => e,
                        });
                    }
                }
                None => missing.push(key),
            }
        }
        // The method's model-level tensors, read its own way.
        let own = match self.adapters.iter_mut().find(|a| a.name == name) {
            Some(e) => e.tuner.load_tensors(&mut file),
            None => Ok(Vec::new()),
        };
        match own {
            Ok(m) => missing.extend(m),
            Err(e) => {
                self.delete_adapter(name)?;
                return Err(e);
            }
        }
        // PEFT saves the base weight of an adapted embedding or head with the adapter
        // (`save_embedding_layers`, on when `embed_tokens` / `lm_head` is a target) and its
        // loader puts it back on the model: do the same.
        let (base_weights, rest): (HashMap<_, _>, HashMap<_, _>) = std::mem::take(&mut file)
            .into_iter()
            .partition(|(k, _)| k.ends_with(".base_layer.weight"));
        file = rest;
        for (key, t) in base_weights {
            if let Err(e) = self.load_bias(&key, name, t) {
                self.delete_adapter(name)?;
                return Err(e);
            }
        }
        if bias != Bias::None {
            let (biases, rest): (HashMap<_, _>, HashMap<_, _>) = std::mem::take(&mut file)
                .into_iter()
                .partition(|(k, _)| k.ends_with(".bias"));
            file = rest;
            for (key, t) in biases {
                self.load_bias(&key, name, t)?;
            }
        }
        if !missing.is_empty() || !file.is_empty() {
            let mut unexpected: Vec<&String> = file.keys().collect();
            unexpected.sort();
            // Roll back so a failed load leaves the model as it was.
            self.delete_adapter(name)?;
            return Err(Error::Adapter(format!(
                "{source} does not fit this model: missing tensors [{}]; tensors the model has no place for [{}]",
                missing.join(", "),
                unexpected.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        if first {
            self.set_adapter(name)?;
        }
        Ok(())
    }

    /// Places a trained bias saved with the adapter (`bias` = all / lora_only), or a base weight
    /// saved with it (`base_layer.weight` of an adapted embedding or head). PEFT writes a
    /// wrapped layer's bias under `base_layer`, and for a `modules_to_save` module also under
    /// `original_module` (the base) and `modules_to_save` (the adapter's copy, which the plain
    /// key already carries).
    fn load_bias(&mut self, key: &str, adapter: &str, t: Tensor) -> Result<()> {
        let path = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
        let to_copy = path.contains(".modules_to_save.");
        let path = path
            .replace(".base_layer.", ".")
            .replace(".modules_to_save.", ".")
            .replace(".original_module.", ".");
        for module in self.model.modules_mut() {
            for p in module.params_mut() {
                if p.name != path {
                    continue;
                }
                if p.base().dims() != t.dims() {
                    return Err(Error::ShapeMismatch {
                        name: key.to_string(),
                        expected: p.base().dims().to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
                let t = t.to_dtype(p.base().dtype())?;
                return match p.copy(adapter) {
                    Some(copy) if to_copy => Ok(copy.set(&t)?),
                    Some(_) => Ok(()),
                    None => p.set_base(t),
                };
            }
        }
        Err(Error::Adapter(format!(
            "adapter bias `{key}` matches no parameter of the model"
        )))
    }

    /// Loads the base model in `model_dir` with the head the first adapter was trained for, then
    /// every `(name, dir)` adapter on it, frozen; the first is active. The several-adapter form
    /// of [`load_with_adapter`].
    pub fn load_with_adapters(
        model_dir: &Path,
        adapters: &[(String, std::path::PathBuf)],
        mut opts: crate::LoadOptions,
    ) -> Result<Self> {
        let (_, first) = adapters
            .first()
            .ok_or_else(|| Error::Adapter("no adapter given".into()))?;
        base_task(first, &mut opts)?;
        let mut m = PeftModel::wrap(crate::models::load(model_dir, &opts)?, 0);
        for (name, dir) in adapters {
            m.load_adapter(dir, name, false)?;
        }
        Ok(m)
    }

    /// Loads every adapter saved in `dir` by `save_pretrained`: `default` from `dir` itself (if it
    /// holds one) and each subdirectory holding an `adapter_config.json` under its own name.
    /// Returns the names loaded, `default` first, then by name.
    pub fn load_adapters_from(&mut self, dir: &Path, is_trainable: bool) -> Result<Vec<String>> {
        let mut found = Vec::new();
        if dir.join(CONFIG_NAME).exists() {
            found.push(("default".to_string(), dir.to_path_buf()));
        }
        let mut subs: Vec<(String, std::path::PathBuf)> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join(CONFIG_NAME).exists())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect();
        subs.sort();
        found.extend(subs);
        if found.is_empty() {
            return Err(Error::Adapter(format!(
                "{}: no adapter_config.json in it or in its subdirectories",
                dir.display()
            )));
        }
        for (name, path) in &found {
            self.load_adapter(path, name, is_trainable)?;
        }
        Ok(found.into_iter().map(|(n, _)| n).collect())
    }
}

/// An adapter directory read into memory: its config and its tensors (on the device they were read
/// for), not yet on any model.
#[derive(Clone)]
pub struct AdapterFiles {
    pub config: PeftConfig,
    pub tensors: HashMap<String, Tensor>,
    /// Where it was read from.
    pub dir: std::path::PathBuf,
}

impl AdapterFiles {
    /// Reads `adapter_config.json` and `adapter_model.safetensors` from `dir`.
    pub fn read(dir: &Path, device: &candle_core::Device) -> Result<Self> {
        let config_path = dir.join(CONFIG_NAME);
        if !config_path.exists() {
            return Err(Error::io(
                &config_path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not an adapter directory (no adapter_config.json)",
                ),
            ));
        }
        let config = PeftConfig::from_adapter_json(&read_json(&config_path)?)?;
        let weights_path = dir.join(WEIGHTS_NAME);
        if !weights_path.exists() && dir.join("adapter_model.bin").exists() {
            return Err(Error::Adapter(format!(
                "{}: only adapter_model.bin (pickle) found; re-save it with safe_serialization=True",
                dir.display()
            )));
        }
        let tensors = load_safetensors(&weights_path, device)?;
        Ok(Self {
            config,
            tensors,
            dir: dir.to_path_buf(),
        })
    }

    /// [`AdapterFiles::read`], and also an adapter in a foreign layout that can be read from the
    /// base model's config.json alone (`base_config`; llama.cpp's GGUF LoRA files, whose q/k rows
    /// are permuted by the base's head counts).
    pub fn read_for_base(
        path: &Path,
        base_config: Option<&serde_json::Value>,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let Some((format, read)) = crate::tuners::foreign_format(path)
            .and_then(|f| f.read_for_config.map(|read| (f, read)))
        else {
            return Self::read(path, device);
        };
        let base = base_config.ok_or_else(|| {
            Error::Adapter(format!(
                "{}: a {} adapter needs its base model's config to be read",
                path.display(),
                format.name
            ))
        })?;
        let (config, tensors) = read(path, base, device)?;
        Ok(Self {
            config,
            tensors,
            dir: path.to_path_buf(),
        })
    }

    /// Bytes the tensors take.
    pub fn size_in_bytes(&self) -> usize {
        self.tensors
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

/// A saved adapter's dependencies ([`crate::tuners::TunerConfig::depends_on`]) found from its
/// directory: the copy `save_pretrained` wrote beside it (`<dir>/<name>/`, or `<dir>/../<name>/`
/// for a non-default adapter), else the recorded directory as it is, or relative to `dir`.
fn resolve_dependencies(config: PeftConfig, dir: &Path) -> PeftConfig {
    let deps = config.as_dyn().depends_on();
    if deps.is_empty() {
        return config;
    }
    let mut json = config.to_adapter_json();
    let found: Vec<String> = deps
        .iter()
        .map(|(name, recorded)| {
            let candidates = [
                dir.join(name),
                dir.parent().map(|p| p.join(name)).unwrap_or_default(),
                recorded.clone(),
                dir.join(recorded),
            ];
            candidates
                .into_iter()
                .find(|c| {
                    c.join(CONFIG_NAME).exists() || crate::tuners::foreign_format(c).is_some()
                })
                .unwrap_or_else(|| recorded.clone())
                .display()
                .to_string()
        })
        .collect();
    json["adapters"] = serde_json::json!(found);
    PeftConfig::from_adapter_json(&json).unwrap_or(config)
}

/// Loads the base model in `model_dir` with the head the adapter in `adapter_dir` was trained
/// for (its `task_type`, and the class count of its saved classifier), then the adapter on top,
/// frozen. The counterpart of `AutoPeftModelFor...from_pretrained` for a known base directory.
pub fn load_with_adapter(
    model_dir: &Path,
    adapter_dir: &Path,
    mut opts: crate::LoadOptions,
) -> Result<PeftModel> {
    base_task(adapter_dir, &mut opts)?;
    let model = crate::models::load(model_dir, &opts)?;
    PeftModel::from_pretrained(model, adapter_dir, Default::default())
}

/// The head the base model needs under the adapter in `adapter_dir`, unless `opts` names one:
/// the adapter's `task_type` and saved classifier size (PEFT), the task its own layout records
/// (foreign layouts), or FEATURE_EXTRACTION when the adapter brings its own prediction head.
pub fn base_task(adapter_dir: &Path, opts: &mut crate::LoadOptions) -> Result<()> {
    if let Some(format) = crate::tuners::foreign_format(adapter_dir) {
        if opts.task.is_none() {
            opts.task = (format.task)(adapter_dir)?;
        }
        return Ok(());
    }
    let config = PeftConfig::from_adapter_json(&read_json(&adapter_dir.join(CONFIG_NAME))?)?;
    if config.brings_head() {
        opts.task
            .get_or_insert(crate::models::TaskType::FeatureExtraction);
        return Ok(());
    }
    if opts.task.is_none() {
        opts.task = config.task_type();
    }
    // The saved head's size holds whoever names the task.
    if opts.num_labels.is_none() {
        opts.num_labels = saved_head_classes(adapter_dir)?;
    }
    Ok(())
}

/// Rows of a classification head saved in an adapter (`modules_to_save`), if there is one.
pub fn saved_head_classes(adapter_dir: &Path) -> Result<Option<usize>> {
    let path = adapter_dir.join(WEIGHTS_NAME);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::Safetensors {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    Ok(meta
        .tensors()
        .iter()
        .find(|(k, _)| {
            k.ends_with(".classifier.weight")
                || k.ends_with(".classifier.out_proj.weight")
                || k.ends_with(".score.weight")
        })
        .map(|(_, info)| info.shape[0]))
}

/// Loads the adapter in `adapter_dir` on the base model its config names, found without network
/// access (PEFT's `AutoPeftModelFor...from_pretrained(adapter_dir)`): `base_model_name_or_path`
/// as a path (also relative to the adapter directory), else the Hugging Face cache (see
/// [`crate::io::hub::resolve_model`]). The head comes from the adapter's `task_type`.
pub fn load_auto(adapter_dir: &Path, opts: crate::LoadOptions) -> Result<PeftModel> {
    let config = PeftConfig::from_adapter_json(&read_json(&adapter_dir.join(CONFIG_NAME))?)?;
    let base = config.base_model_name_or_path().ok_or_else(|| {
        Error::Adapter(format!(
            "{}: no base_model_name_or_path; pass the base model explicitly",
            adapter_dir.join(CONFIG_NAME).display()
        ))
    })?;
    let model_dir = crate::io::hub::resolve_model(base, Some(adapter_dir))?;
    load_with_adapter(&model_dir, adapter_dir, opts)
}
