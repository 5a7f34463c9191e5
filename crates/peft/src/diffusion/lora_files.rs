//! A pipeline's adapters on disk, in the three layouts the ecosystem uses:
//!
//! - PEFT's (its DreamBooth example): `<dir>/unet/` and `<dir>/text_encoder/`, each a PEFT
//!   adapter folder (`adapter_config.json`, `adapter_model.safetensors`); an adapter folder
//!   directly in `<dir>` is taken as the UNet's.
//! - diffusers': `<dir>/pytorch_lora_weights.safetensors` (or the file itself), what
//!   `StableDiffusionPipeline.load_lora_weights` reads and `save_lora_weights` writes.
//! - kohya-ss: a single `.safetensors` file with `lora_unet_…` / `lora_te_…` keys.
//!
//! Any method loads from PEFT's layout; diffusers' and kohya's files are LoRA.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::StableDiffusion;
use crate::io::{save_safetensors, save_safetensors_with, ADAPTER_CONFIG_NAME};
use crate::layers::ModuleRef;
use crate::models::Model;
use crate::peft_model::PeftModel;
use crate::tuners::lora::sd_formats::{
    self, ComponentState, SiteShapes, StateDict, DIFFUSERS_WEIGHTS_NAME, TEXT_ENCODER, UNET,
};
use crate::tuners::lora::LoraConfig;
use crate::tuners::PeftConfig;
use crate::{Error, Result};

/// How an adapter is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterFormat {
    /// PEFT's folders `unet/` and `text_encoder/`.
    Peft,
    /// diffusers' `pytorch_lora_weights.safetensors`.
    Diffusers,
    /// A kohya-ss file, `<dir>/lora_kohya.safetensors`.
    Kohya,
}

impl std::str::FromStr for AdapterFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "peft" => Ok(Self::Peft),
            "diffusers" => Ok(Self::Diffusers),
            "kohya" | "kohya-ss" => Ok(Self::Kohya),
            other => Err(Error::Config(format!(
                "unknown adapter format `{other}`; expected peft, diffusers or kohya"
            ))),
        }
    }
}

/// The kohya file's name in an output folder.
pub const KOHYA_WEIGHTS_NAME: &str = "lora_kohya.safetensors";

/// The weight shape of every adaptable layer of `model`.
pub fn site_shapes(model: &dyn Model) -> SiteShapes {
    model
        .modules()
        .iter()
        .filter_map(|m| match m {
            ModuleRef::Linear(l) => Some((l.name.clone(), vec![l.out_features(), l.in_features()])),
            ModuleRef::Conv2d(c) => Some((c.name.clone(), c.weight.base().dims().to_vec())),
            _ => None,
        })
        .collect()
}

impl StableDiffusion {
    fn component_mut(&mut self, name: &str) -> Result<&mut PeftModel> {
        match name {
            UNET => Ok(&mut self.unet),
            TEXT_ENCODER => Ok(&mut self.text_encoder),
            other => Err(Error::Adapter(format!(
                "adapters attach to the unet and the text_encoder, not `{other}`"
            ))),
        }
    }

    /// Loads the adapter at `path` (any of the three layouts) as `name` on the UNet and, when it
    /// has one, the text encoder. Returns the components it went to.
    pub fn load_adapter(
        &mut self,
        path: &Path,
        name: &str,
        is_trainable: bool,
    ) -> Result<Vec<&'static str>> {
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "adapter path does not exist"),
            ));
        }
        if path.is_dir() {
            let mut done = Vec::new();
            for component in [UNET, TEXT_ENCODER] {
                let sub = path.join(component);
                if sub.join(ADAPTER_CONFIG_NAME).exists() {
                    self.component_mut(component)?
                        .load_adapter(&sub, name, is_trainable)?;
                    done.push(component);
                }
            }
            if done.is_empty() && path.join(ADAPTER_CONFIG_NAME).exists() {
                self.unet.load_adapter(path, name, is_trainable)?;
                done.push(UNET);
            }
            if !done.is_empty() {
                return Ok(done);
            }
            let file = path.join(DIFFUSERS_WEIGHTS_NAME);
            let kohya = path.join(KOHYA_WEIGHTS_NAME);
            let file = if file.exists() {
                file
            } else if kohya.exists() {
                kohya
            } else {
                return Err(Error::Adapter(format!(
                    "{}: no adapter here: expected unet/ and text_encoder/ adapter folders \
                     (PEFT), adapter_config.json, {DIFFUSERS_WEIGHTS_NAME} (diffusers) or a \
                     kohya .safetensors file",
                    path.display()
                )));
            };
            return self.load_lora_file(&file, name, is_trainable);
        }
        self.load_lora_file(path, name, is_trainable)
    }

    /// Loads a diffusers or kohya LoRA file.
    pub fn load_lora_file(
        &mut self,
        file: &Path,
        name: &str,
        is_trainable: bool,
    ) -> Result<Vec<&'static str>> {
        let mut shapes = BTreeMap::new();
        shapes.insert(UNET, site_shapes(self.unet.base_model()));
        shapes.insert(TEXT_ENCODER, site_shapes(self.text_encoder.base_model()));
        let (_, mut parts) = sd_formats::read_sd_lora(file, &self.device, &shapes)?;
        let mut done: Vec<&'static str> = Vec::new();
        for c in [UNET, TEXT_ENCODER] {
            let Some(lora) = parts.remove(c) else {
                continue;
            };
            let source = format!("{} ({c})", file.display());
            let result = self.component_mut(c)?.load_adapter_state(
                name,
                PeftConfig::new(lora.config),
                lora.state,
                is_trainable,
                &source,
            );
            if let Err(e) = result {
                for d in &done {
                    let _ = self.component_mut(d)?.delete_adapter(name);
                }
                return Err(e);
            }
            done.push(c);
        }
        Ok(done)
    }

    /// The components carrying adapter `name`, with its config and tensors under PEFT's keys.
    fn adapter_parts(&self, name: &str) -> Result<Vec<(&'static str, PeftConfig, StateDict)>> {
        let mut parts = Vec::new();
        for (c, m) in [(UNET, &self.unet), (TEXT_ENCODER, &self.text_encoder)] {
            if let Some(config) = m.peft_config(name) {
                parts.push((c, config.clone(), m.adapter_state_dict(name)?));
            }
        }
        if parts.is_empty() {
            return Err(Error::Adapter(format!(
                "no adapter named `{name}` on the UNet or the text encoder"
            )));
        }
        Ok(parts)
    }

    /// Writes adapter `name` to `dir` in `format`; returns the files written.
    pub fn save_adapter(
        &self,
        dir: &Path,
        name: &str,
        format: AdapterFormat,
    ) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let parts = self.adapter_parts(name)?;
        match format {
            AdapterFormat::Peft => {
                let mut out = Vec::new();
                for (c, _, _) in &parts {
                    let m = if *c == UNET {
                        &self.unet
                    } else {
                        &self.text_encoder
                    };
                    let sub = dir.join(c);
                    let tmp = sub.join(".peft-save");
                    // save_pretrained writes `default` in the folder itself, others below it.
                    if name == "default" {
                        m.save_pretrained_selected(&sub, Some(&[name]))?;
                    } else {
                        m.save_pretrained_selected(&tmp, Some(&[name]))?;
                        for f in ["adapter_config.json", "adapter_model.safetensors"] {
                            let from = tmp.join(name).join(f);
                            std::fs::rename(&from, sub.join(f)).map_err(|e| Error::io(&from, e))?;
                        }
                        let _ = std::fs::remove_dir_all(&tmp);
                    }
                    out.push(sub);
                }
                Ok(out)
            }
            AdapterFormat::Diffusers | AdapterFormat::Kohya => {
                let mut lora = Vec::new();
                for (c, config, state) in parts {
                    let cfg = config
                        .downcast_ref::<LoraConfig>()
                        .cloned()
                        .ok_or_else(|| {
                            Error::Adapter(format!(
                            "adapter `{name}` is {} on the {c}; diffusers and kohya files hold \
                             LoRA only (save it in PEFT's layout)",
                            config.peft_type()
                        ))
                        })?;
                    lora.push((c, cfg, state));
                }
                let refs: Vec<ComponentState<'_>> = lora
                    .iter()
                    .map(|(c, cfg, s)| (*c, cfg, s.clone()))
                    .collect();
                if format == AdapterFormat::Diffusers {
                    let (tensors, meta) = sd_formats::to_diffusers(&refs)?;
                    let path = dir.join(DIFFUSERS_WEIGHTS_NAME);
                    save_safetensors_with(&path, &tensors, meta)?;
                    Ok(vec![path])
                } else {
                    let tensors = sd_formats::to_kohya(&refs)?;
                    let path = dir.join(KOHYA_WEIGHTS_NAME);
                    save_safetensors(&path, &tensors)?;
                    Ok(vec![path])
                }
            }
        }
    }

    /// What a training run saves: adapter `name` in PEFT's layout (`unet/`, `text_encoder/`)
    /// and, when it is a LoRA, diffusers' file beside them, so that both PEFT and
    /// `load_lora_weights` read the folder.
    pub fn save_training_adapter(&self, dir: &Path, name: &str) -> Result<Vec<PathBuf>> {
        let mut files = self.save_adapter(dir, name, AdapterFormat::Peft)?;
        let lora = self
            .adapter_parts(name)?
            .iter()
            .all(|(_, c, _)| c.downcast_ref::<LoraConfig>().is_some());
        if lora {
            files.extend(self.save_adapter(dir, name, AdapterFormat::Diffusers)?);
        }
        Ok(files)
    }
}
