//! transformers' `BitsAndBytesConfig`: how a dense checkpoint is quantized at load, and what a
//! quantized checkpoint's `config.json` says in `quantization_config`. Field names and defaults
//! are transformers'.

use candle_core::DType;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::bnb4::{parse_dtype, QuantType};
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BitsAndBytesConfig {
    #[serde(default = "bitsandbytes")]
    pub quant_method: String,
    #[serde(default, alias = "_load_in_4bit")]
    pub load_in_4bit: bool,
    #[serde(default, alias = "_load_in_8bit")]
    pub load_in_8bit: bool,
    /// "nf4" or "fp4" (transformers' default).
    #[serde(default = "fp4")]
    pub bnb_4bit_quant_type: String,
    #[serde(default)]
    pub bnb_4bit_use_double_quant: bool,
    /// The dtype products run in: "float32", "bfloat16" or "float16".
    #[serde(default)]
    pub bnb_4bit_compute_dtype: Option<String>,
    #[serde(default = "uint8")]
    pub bnb_4bit_quant_storage: String,
    /// bitsandbytes' 4-bit block size (transformers always uses 64).
    #[serde(default = "blocksize", skip_serializing)]
    pub bnb_4bit_blocksize: usize,
    #[serde(default = "threshold")]
    pub llm_int8_threshold: f64,
    /// Modules kept dense (besides the heads and embeddings, which always are).
    #[serde(default)]
    pub llm_int8_skip_modules: Option<Vec<String>>,
    #[serde(default)]
    pub llm_int8_enable_fp32_cpu_offload: bool,
    #[serde(default)]
    pub llm_int8_has_fp16_weight: bool,
}

fn bitsandbytes() -> String {
    "bitsandbytes".into()
}
fn fp4() -> String {
    "fp4".into()
}
fn uint8() -> String {
    "uint8".into()
}
fn blocksize() -> usize {
    64
}
fn threshold() -> f64 {
    6.0
}

impl Default for BitsAndBytesConfig {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults parse")
    }
}

/// What a config asks for, checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scheme {
    FourBit {
        quant_type: QuantType,
        double_quant: bool,
        blocksize: usize,
        compute_dtype: DType,
    },
    EightBit {
        threshold: f64,
    },
}

impl BitsAndBytesConfig {
    /// NF4 with double quantization computing in `compute` (QLoRA's recipe).
    pub fn qlora(compute: DType) -> Self {
        Self {
            load_in_4bit: true,
            bnb_4bit_quant_type: "nf4".into(),
            bnb_4bit_use_double_quant: true,
            bnb_4bit_compute_dtype: Some(super::bnb4::dtype_name(compute).into()),
            ..Self::default()
        }
    }

    /// Reads `quantization_config` (from config.json or a `[model]` table); unknown fields and
    /// values are errors.
    pub fn from_json(v: &Value) -> Result<Self> {
        let mut v = v.clone();
        if let Some(m) = v.as_object_mut() {
            // transformers writes both spellings; the underscored ones are its properties' storage.
            for k in ["load_in_4bit", "load_in_8bit"] {
                if let Some(x) = m.remove(&format!("_{k}")) {
                    m.entry(k.to_string()).or_insert(x);
                }
            }
        }
        let c: Self = serde_json::from_value(v)
            .map_err(|e| Error::Config(format!("quantization config: {e}")))?;
        c.scheme()?;
        Ok(c)
    }

    /// The checked scheme; `None` for a config that quantizes nothing.
    pub fn scheme(&self) -> Result<Option<Scheme>> {
        if self.quant_method != "bitsandbytes" {
            return Err(Error::Config(format!(
                "quant_method {:?} is not supported: this loads bitsandbytes checkpoints (and GGUF \
                 files, which need no quantization config)",
                self.quant_method
            )));
        }
        if self.bnb_4bit_quant_storage != "uint8" {
            return Err(Error::Config(format!(
                "bnb_4bit_quant_storage {:?}: only uint8 storage is supported",
                self.bnb_4bit_quant_storage
            )));
        }
        match (self.load_in_4bit, self.load_in_8bit) {
            (true, true) => Err(Error::Config(
                "load_in_4bit and load_in_8bit are both set; choose one".into(),
            )),
            (true, false) => Ok(Some(Scheme::FourBit {
                quant_type: QuantType::parse(&self.bnb_4bit_quant_type)?,
                double_quant: self.bnb_4bit_use_double_quant,
                blocksize: {
                    let b = self.bnb_4bit_blocksize;
                    if !super::bnb4::BLOCK_SIZES.contains(&b) {
                        return Err(Error::Config(format!(
                            "bnb_4bit_blocksize {b} is not one bitsandbytes allows ({:?})",
                            super::bnb4::BLOCK_SIZES
                        )));
                    }
                    b
                },
                compute_dtype: match &self.bnb_4bit_compute_dtype {
                    Some(d) => parse_dtype(d)?,
                    None => DType::F32,
                },
            })),
            (false, true) => Ok(Some(Scheme::EightBit {
                threshold: self.llm_int8_threshold,
            })),
            (false, false) => Ok(None),
        }
    }

    /// Whether the Linear at `path` stays dense because `llm_int8_skip_modules` lists it.
    /// transformers 5's `should_convert_module` matching: a pattern matches as a regex from the
    /// start of the path up to a module boundary (`layer.1` matches `layer.1.attn`, not
    /// `layer.11.attn`), or as a plain string suffix (`proj` matches every `*_proj`). A list
    /// given replaces transformers' default skips (the output head): see
    /// [`BitsAndBytesConfig::replaces_default_skips`].
    pub fn skips(&self, path: &str) -> bool {
        self.llm_int8_skip_modules
            .as_ref()
            .is_some_and(|mods| mods.iter().any(|m| skip_pattern_matches(m, path)))
    }

    /// Whether `llm_int8_skip_modules` is set: transformers then keeps dense only what it lists
    /// (`get_modules_to_not_convert`), so an output head not listed is quantized too.
    pub fn replaces_default_skips(&self) -> bool {
        self.llm_int8_skip_modules.is_some()
    }

    /// As transformers saves it in config.json.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("serializable");
        if let Some(m) = v.as_object_mut() {
            m.insert("_load_in_4bit".into(), Value::Bool(self.load_in_4bit));
            m.insert("_load_in_8bit".into(), Value::Bool(self.load_in_8bit));
            if self.bnb_4bit_compute_dtype.is_none() {
                m.insert(
                    "bnb_4bit_compute_dtype".into(),
                    Value::String("float32".into()),
                );
            }
        }
        v
    }
}

/// `re.match(rf"(?:{key}){boundary}", path) or path.endswith(key)` with
/// `boundary = (?:(?<=\.)|(?=\.|$))`: the pattern must match a prefix of `path` that ends at
/// a boundary (right after a `.`, right before one, or at the end). Each boundary position is
/// tried, as Python's backtracking would. A pattern that is not a valid regex matches literally.
fn skip_pattern_matches(key: &str, path: &str) -> bool {
    if path.ends_with(key) {
        return true;
    }
    let full = regex::Regex::new(&format!("^(?:{key})$")).ok();
    let bytes = path.as_bytes();
    (0..=path.len())
        .filter(|&i| {
            path.is_char_boundary(i)
                && (i == path.len() || bytes[i] == b'.' || (i > 0 && bytes[i - 1] == b'.'))
        })
        .any(|i| match &full {
            Some(re) => re.is_match(&path[..i]),
            None => &path[..i] == key,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transformers_config_json_parses_and_bad_values_are_named() {
        let saved = serde_json::json!({
            "_load_in_4bit": true, "_load_in_8bit": false, "bnb_4bit_compute_dtype": "bfloat16",
            "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": true, "llm_int8_enable_fp32_cpu_offload": false,
            "llm_int8_has_fp16_weight": false, "llm_int8_skip_modules": null,
            "llm_int8_threshold": 6.0, "load_in_4bit": true, "load_in_8bit": false,
            "quant_method": "bitsandbytes"
        });
        let c = BitsAndBytesConfig::from_json(&saved).unwrap();
        assert_eq!(
            c.scheme().unwrap(),
            Some(Scheme::FourBit {
                quant_type: QuantType::Nf4,
                double_quant: true,
                blocksize: 64,
                compute_dtype: DType::BF16
            })
        );
        let bad = serde_json::json!({"load_in_4bit": true, "bnb_4bit_quant_type": "nf3"});
        let e = BitsAndBytesConfig::from_json(&bad).unwrap_err().to_string();
        assert!(e.contains("nf3") && e.contains("nf4"), "{e}");
        let unknown = serde_json::json!({"load_in_4bit": true, "bnb_4bit_quant": "nf4"});
        let e = BitsAndBytesConfig::from_json(&unknown)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bnb_4bit_quant"), "{e}");
    }
}
