//! AdapterHub's (`adapters` 1.3.0) directory layout, at the file level: which files a saved
//! adapter, head or fusion has, telling it apart from a PEFT adapter directory, and reading and
//! writing its JSON and tensors (`*.safetensors`, or the PyTorch pickles `*.bin` through candle's
//! pickle reader). What the configs and keys mean is the tuners' business
//! (`tuners::bottleneck::hub`).

use candle_core::{Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

use super::{load_safetensors, read_json, save_safetensors, write_atomic};
use crate::{Error, Result};

/// The library version AdapterHub writes (`"adapters." + __version__`).
pub const VERSION: &str = "adapters.1.3.0";

/// One kind of AdapterHub file pair: a JSON config and its weights.
#[derive(Debug, Clone, Copy)]
pub struct FilePair {
    pub config: &'static str,
    /// The PyTorch pickle AdapterHub writes by default.
    pub bin: &'static str,
    /// The safetensors file it writes with `use_safetensors=True` (and we write).
    pub safe: &'static str,
}

pub const ADAPTER: FilePair = FilePair {
    config: "adapter_config.json",
    bin: "pytorch_adapter.bin",
    safe: "adapter.safetensors",
};
pub const HEAD: FilePair = FilePair {
    config: "head_config.json",
    bin: "pytorch_model_head.bin",
    safe: "model_head.safetensors",
};
pub const FUSION: FilePair = FilePair {
    config: "adapter_fusion_config.json",
    bin: "pytorch_model_adapter_fusion.bin",
    safe: "model_adapter_fusion.safetensors",
};

/// Whether `dir` holds an AdapterHub adapter or fusion rather than a PEFT adapter: an
/// `adapter_config.json` with AdapterHub's `config` + `version` and no `peft_type`, or an
/// `adapter_fusion_config.json`.
pub fn is_adapterhub_dir(dir: &Path) -> bool {
    if dir.join(FUSION.config).exists() && !has_peft_type(dir) {
        return true;
    }
    let path = dir.join(ADAPTER.config);
    match read_json(&path) {
        Ok(v) => {
            v.get("peft_type").is_none() && v.get("config").is_some() && v.get("name").is_some()
        }
        Err(_) => false,
    }
}

fn has_peft_type(dir: &Path) -> bool {
    read_json(&dir.join(ADAPTER.config))
        .map(|v| v.get("peft_type").is_some())
        .unwrap_or(false)
}

/// A config file and its tensors.
pub struct Saved {
    pub json: Value,
    pub tensors: HashMap<String, Tensor>,
}

/// Reads `pair` from `dir` if its config is there: the safetensors weights if present, else the
/// pickle. `None` when the config file is absent.
pub fn read(dir: &Path, pair: FilePair, device: &Device) -> Result<Option<Saved>> {
    let config = dir.join(pair.config);
    if !config.exists() {
        return Ok(None);
    }
    let json = read_json(&config)?;
    let safe = dir.join(pair.safe);
    let bin = dir.join(pair.bin);
    let tensors = if safe.exists() {
        load_safetensors(&safe, device)?
    } else if bin.exists() {
        read_pickle(&bin, device)?
    } else {
        return Err(Error::io(
            &safe,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "{} has no weights: neither {} nor {}",
                    dir.display(),
                    pair.safe,
                    pair.bin
                ),
            ),
        ));
    };
    Ok(Some(Saved { json, tensors }))
}

/// A PyTorch state dict saved with `torch.save` (zip format), through candle's pickle reader.
pub fn read_pickle(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let all = candle_core::pickle::read_all(path).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        reason: format!("not a PyTorch state dict candle can read: {e}"),
    })?;
    all.into_iter()
        .map(|(k, t)| Ok((k, t.to_device(device)?)))
        .collect()
}

/// Writes `pair` into `dir`: the config as AdapterHub writes it (indented, keys sorted) and the
/// tensors as safetensors.
pub fn write(dir: &Path, pair: FilePair, json: &Value, tensors: &[(String, Tensor)]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let text = serde_json::to_string_pretty(json).map_err(|e| Error::Config(e.to_string()))?;
    write_atomic(&dir.join(pair.config), text.as_bytes())?;
    save_safetensors(&dir.join(pair.safe), tensors)
}
