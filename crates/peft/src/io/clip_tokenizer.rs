//! CLIP's tokenizer from a diffusers pipeline's `tokenizer/` folder (`vocab.json`, `merges.txt`,
//! `tokenizer_config.json` / `special_tokens_map.json`), as transformers' `CLIPTokenizer` builds
//! it: NFC, runs of whitespace to one space, lowercase; CLIP's word pattern; byte-level BPE whose
//! word-final pieces end in `</w>`; `<|startoftext|>` … `<|endoftext|>` around the text, truncated
//! and padded to `model_max_length` (77) with the pad token (`<|endoftext|>` in SD 1.x, `!` in
//! SD 2.x). A `tokenizer.json` in the folder is used as it is instead.

use serde_json::{json, Value};
use std::path::Path;
use tokenizers::Tokenizer as HfTokenizer;

use super::read_json;
use crate::{Error, Result};

/// CLIP's pre-tokenization pattern (transformers' `CLIPTokenizer`).
const PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

pub struct ClipTokenizer {
    inner: HfTokenizer,
    pub bos_id: u32,
    pub eos_id: u32,
    pub pad_id: u32,
    /// `model_max_length`: every prompt becomes this many ids.
    pub max_length: usize,
}

/// A special token's text in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

impl ClipTokenizer {
    /// Loads the tokenizer in `dir` (a pipeline's `tokenizer/`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let read_opt = |name: &str| -> Result<Value> {
            let p = dir.join(name);
            if p.exists() {
                read_json(&p)
            } else {
                Ok(Value::Null)
            }
        };
        let cfg = read_opt("tokenizer_config.json")?;
        let special = read_opt("special_tokens_map.json")?;
        let tok = |key: &str, default: &str| {
            token_text(cfg.get(key))
                .or_else(|| token_text(special.get(key)))
                .unwrap_or_else(|| default.to_string())
        };
        let (bos, eos, unk) = (
            tok("bos_token", "<|startoftext|>"),
            tok("eos_token", "<|endoftext|>"),
            tok("unk_token", "<|endoftext|>"),
        );
        let pad = tok("pad_token", &eos);
        let max_length = cfg
            .get("model_max_length")
            .and_then(|v| v.as_f64())
            .filter(|v| *v > 0.0 && *v < 1e6)
            .map(|v| v as usize)
            .unwrap_or(77);
        let json_file = dir.join("tokenizer.json");
        let inner = if json_file.exists() {
            let mut t = HfTokenizer::from_file(&json_file)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", json_file.display())))?;
            t.with_padding(None);
            t.with_truncation(None)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            t.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
            t
        } else {
            let vocab_file = dir.join("vocab.json");
            let merges_file = dir.join("merges.txt");
            for f in [&vocab_file, &merges_file] {
                if !f.exists() {
                    return Err(Error::io(
                        f,
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "a CLIP tokenizer folder needs vocab.json and merges.txt (or \
                             tokenizer.json)",
                        ),
                    ));
                }
            }
            let vocab = read_json(&vocab_file)?;
            let merges_text =
                std::fs::read_to_string(&merges_file).map_err(|e| Error::io(&merges_file, e))?;
            // The first line is the `#version` header; transformers also stops at CLIP's
            // 49152 - 256 - 2 merges.
            let merges: Vec<Value> = merges_text
                .lines()
                .filter(|l| !l.starts_with("#version"))
                .filter(|l| !l.trim().is_empty())
                .take(49152 - 256 - 2)
                .map(|l| Value::String(l.to_string()))
                .collect();
            // transformers registers the special tokens as added tokens, so a pad token that is
            // an ordinary character (SD 2.x's `!`) is split out of the text as its own id.
            let mut specials = vec![&bos, &eos];
            if !specials.contains(&&pad) {
                specials.push(&pad);
            }
            let added: Vec<Value> = specials
                .iter()
                .filter_map(|t| {
                    let id = vocab.get(t.as_str())?.as_u64()?;
                    Some(
                        json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                        "rstrip": false, "normalized": true, "special": true}),
                    )
                })
                .collect();
            let spec = json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": [
                    {"type": "NFC"},
                    {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                    {"type": "Lowercase"}
                ]},
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": PATTERN}, "behavior": "Removed",
                     "invert": true},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                     "use_regex": false}
                ]},
                "post_processor": null,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                            "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk,
                          "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
                          "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                          "vocab": vocab, "merges": merges}
            });
            let text = serde_json::to_string(&spec).map_err(|e| Error::Tokenizer(e.to_string()))?;
            text.parse::<HfTokenizer>()
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", dir.display())))?
        };
        let id = |t: &str| {
            inner.token_to_id(t).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: the special token `{t}` is not in the vocabulary",
                    dir.display()
                ))
            })
        };
        Ok(Self {
            bos_id: id(&bos)?,
            eos_id: id(&eos)?,
            pad_id: id(&pad)?,
            max_length,
            inner,
        })
    }

    /// The ids of `text` without special tokens.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// What the pipelines feed the text encoder: `<|startoftext|>`, the text's ids truncated to
    /// `max_length - 2`, `<|endoftext|>`, padding to `max_length`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode_raw(text)?;
        ids.truncate(self.max_length.saturating_sub(2));
        let mut out = Vec::with_capacity(self.max_length);
        out.push(self.bos_id);
        out.extend(ids);
        out.push(self.eos_id);
        out.resize(self.max_length, self.pad_id);
        Ok(out)
    }

    /// [`ClipTokenizer::encode`] for several prompts: `[n, max_length]` (u32).
    pub fn encode_batch(
        &self,
        texts: &[&str],
        device: &candle_core::Device,
    ) -> Result<candle_core::Tensor> {
        let rows = texts
            .iter()
            .map(|t| self.encode(t))
            .collect::<Result<Vec<_>>>()?;
        let n = rows.len();
        Ok(candle_core::Tensor::from_vec(
            rows.concat(),
            (n, self.max_length),
            device,
        )?)
    }
}
