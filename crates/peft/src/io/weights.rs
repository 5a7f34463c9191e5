//! Base-model weights from a Hugging Face directory or a GGUF file, by tensor name. The layers
//! built from them come from [`crate::layers::Loader`].

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::gguf::{find_gguf, GgufFile, Source as GgufSource};
use crate::{Error, Result};

/// A model's stored tensors under their Hugging Face names: the safetensors files of a model
/// directory (memory-mapped), or a GGUF file (names mapped; dequantized on load, except the
/// Linear weights the loader keeps in their blocks).
pub struct Weights {
    source: Source,
    names: BTreeSet<String>,
    /// Where the tensors come from, for error messages.
    pub(crate) location: String,
}

enum Source {
    Safetensors(MmapedSafetensors),
    Gguf {
        file: GgufFile,
        map: BTreeMap<String, GgufSource>,
    },
}

impl Weights {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`, or
    /// else the directory's only `.gguf` file. diffusers' components name the same files
    /// `diffusion_pytorch_model.safetensors[.index.json]`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let stem = if !dir.join("model.safetensors").exists()
            && !dir.join("model.safetensors.index.json").exists()
            && (dir.join("diffusion_pytorch_model.safetensors").exists()
                || dir
                    .join("diffusion_pytorch_model.safetensors.index.json")
                    .exists())
        {
            "diffusion_pytorch_model"
        } else {
            "model"
        };
        let single = dir.join(format!("{stem}.safetensors"));
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let idx = super::read_json(&index)?;
            let map = idx
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    Error::Config(format!("{}: no `weight_map` object", index.display()))
                })?;
            let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else if let Some(gguf) = find_gguf(dir)? {
            return Self::from_gguf(&gguf);
        } else if dir.join("pytorch_model.bin").exists()
            || dir.join("diffusion_pytorch_model.bin").exists()
        {
            return Err(Error::Config(format!(
                "{}: only pytorch_model.bin found; convert it to safetensors (transformers: \
                 model.save_pretrained(dir, safe_serialization=True))",
                dir.display()
            )));
        } else {
            return Err(Error::io(
                dir.join("model.safetensors"),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors, sharded index or .gguf file in the model directory",
                ),
            ));
        };
        Self::from_files(&files, dir.display().to_string())
    }

    pub fn from_files(files: &[PathBuf], location: String) -> Result<Self> {
        for f in files {
            if !f.exists() {
                return Err(Error::io(
                    f,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "weight file not found"),
                ));
            }
        }
        // SAFETY: the files are mapped read-only; like every mmap user we rely on nobody truncating
        // them while the model is alive.
        let st = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| Error::Safetensors {
            path: files.first().cloned().unwrap_or_default(),
            reason: e.to_string(),
        })?;
        let names = st.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Self {
            source: Source::Safetensors(st),
            names,
            location,
        })
    }

    /// A GGUF file's tensors under transformers' names (`blk.0.attn_q.weight` is served as
    /// `model.layers.0.self_attn.q_proj.weight`), dequantized to f32 when loaded.
    pub fn from_gguf(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let map = file.hf_names()?;
        let names = map.keys().cloned().collect();
        Ok(Self {
            source: Source::Gguf { file, map },
            names,
            location: path.display().to_string(),
        })
    }

    /// The GGUF file behind these weights, if that is where they come from.
    pub fn gguf(&self) -> Option<&GgufFile> {
        match &self.source {
            Source::Gguf { file, .. } => Some(file),
            Source::Safetensors(_) => None,
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(|s| s.as_str())
    }

    /// A stored tensor as its raw little-endian bytes with its shape, for the dtypes candle has
    /// no tensor type for (bitsandbytes' int8 codes): `None` when it is not stored as `dtype`
    /// in a safetensors file.
    pub(crate) fn raw(
        &self,
        name: &str,
        dtype: safetensors::Dtype,
    ) -> Result<Option<(Vec<usize>, Vec<u8>)>> {
        let Source::Safetensors(st) = &self.source else {
            return Ok(None);
        };
        let view = st.get(name)?;
        if view.dtype() != dtype {
            return Ok(None);
        }
        Ok(Some((view.shape().to_vec(), view.data().to_vec())))
    }

    /// Tensor `name` in its GGUF blocks, when these weights are a GGUF file that stores it
    /// block-quantized; `None` otherwise (a safetensors file, an F32/F16 GGUF tensor).
    pub(crate) fn load_ggml(&self, name: &str) -> Result<Option<crate::quant::GgmlWeight>> {
        match &self.source {
            Source::Gguf { file, map } => match map.get(name) {
                Some(src) => file.load_quantized(src),
                None => Ok(None),
            },
            Source::Safetensors(_) => Ok(None),
        }
    }

    pub(crate) fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        match &self.source {
            Source::Safetensors(st) => Ok(st.load(name, device)?),
            Source::Gguf { file, map } => {
                let src = map.get(name).ok_or_else(|| Error::MissingTensor {
                    name: name.to_string(),
                    location: self.location.clone(),
                    hint: String::new(),
                })?;
                file.load(src, device)
            }
        }
    }
}
