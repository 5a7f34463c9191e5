//! Files: Hugging Face model directories, PEFT adapter directories, safetensors, atomic writes.

pub mod adapterhub;
pub mod chat;
pub mod clip_tokenizer;
pub mod gguf;
pub mod gguf_write;
pub mod hub;
pub mod image;
pub mod tokenizer;
pub mod weights;

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

pub use weights::Weights;

/// Prefix of every key in a PEFT adapter file: PEFT's wrapper path to the base model's modules.
pub const KEY_PREFIX: &str = "base_model.model.";
/// A PEFT adapter directory's config file.
pub const ADAPTER_CONFIG_NAME: &str = "adapter_config.json";
/// A PEFT adapter directory's weights file.
pub const ADAPTER_WEIGHTS_NAME: &str = "adapter_model.safetensors";

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one, never a
/// half-written file: write a sibling temporary file, flush it to disk, rename it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let file_name = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Serialises named tensors as safetensors with PEFT's metadata (`{"format": "pt"}`), atomically.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    save_safetensors_with(path, tensors, HashMap::new())
}

/// [`save_safetensors`] with more header metadata (diffusers' `lora_adapter_metadata`).
pub fn save_safetensors_with(
    path: &Path,
    tensors: &[(String, Tensor)],
    mut meta: HashMap<String, String>,
) -> Result<()> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    meta.insert("format".to_string(), "pt".to_string());
    let bytes = safetensors::serialize(cpu.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    write_atomic(path, &bytes)
}

/// Reads every tensor of a safetensors file onto `device`.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
        ));
    }
    candle_core::safetensors::load(path, device).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The header metadata of a safetensors file (`__metadata__`), empty when it has none.
pub fn safetensors_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Reads and parses a JSON file.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// The config.json of the base model at `path` without loading its weights: a Hugging Face
/// directory's `config.json`, or the one a GGUF model's metadata describes (what llama.cpp's
/// converter takes from `--base`).
pub fn read_base_config(path: &Path) -> Result<serde_json::Value> {
    let config = path.join("config.json");
    if path.is_dir() && config.exists() {
        return read_json(&config);
    }
    match gguf::find_gguf(path)? {
        Some(file) => gguf::GgufFile::open(&file)?.config_json(),
        None => Err(Error::Config(format!(
            "{}: neither a model directory with config.json nor a GGUF model",
            path.display()
        ))),
    }
}
