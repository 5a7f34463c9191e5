//! `tokenizer.json` through the `tokenizers` crate, with the file's own padding and truncation
//! switched off: transformers overrides them on every call, the `tokenizers` crate would apply
//! them (MiniLM's file pads everything to 128), so we truncate per call and pad per batch.

use std::path::Path;
use tokenizers::{
    Tokenizer as HfTokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::{Error, Result};

pub struct Tokenizer {
    inner: HfTokenizer,
    pad_id: u32,
}

/// One encoded example.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub input_ids: Vec<u32>,
    pub token_type_ids: Vec<u32>,
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a model directory (or the file itself).
    pub fn from_path(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        if !file.exists() {
            return Err(Error::io(
                &file,
                std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found"),
            ));
        }
        let mut inner = HfTokenizer::from_file(&file)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", file.display())))?;
        inner.with_padding(None);
        let _ = inner.with_truncation(None);
        let pad_id = ["[PAD]", "<pad>", "<|endoftext|>"]
            .iter()
            .find_map(|t| inner.token_to_id(t))
            .unwrap_or(0);
        Ok(Self { inner, pad_id })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Encodes a text (or a text pair) with special tokens, truncated to `max_length` tokens the
    /// way transformers' `truncation=True` does (longest first, from the right).
    pub fn encode(&mut self, text: &str, pair: Option<&str>, max_length: usize) -> Result<Encoded> {
        self.inner
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let enc = match pair {
            Some(p) => self.inner.encode((text, p), true),
            None => self.inner.encode(text, true),
        }
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(Encoded {
            input_ids: enc.get_ids().to_vec(),
            token_type_ids: enc.get_type_ids().to_vec(),
        })
    }
}
