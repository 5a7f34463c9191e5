//! `tokenizer.json` through the `tokenizers` crate, with the file's own padding and truncation
//! switched off: transformers overrides them on every call, the `tokenizers` crate would apply
//! them (MiniLM's file pads everything to 128), so we truncate per call and pad per batch.

use std::path::Path;
use tokenizers::{
    Tokenizer as HfTokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use super::gguf::{find_gguf, GgufFile};
use crate::{Error, Result};

pub struct Tokenizer {
    inner: HfTokenizer,
    pad_id: u32,
    /// Jinja chat template from tokenizer_config.json or the GGUF metadata.
    chat_template: Option<String>,
    /// Special tokens' text, for chat templates (`bos_token`, `eos_token`).
    bos_token: Option<String>,
    eos_token: Option<String>,
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
        let inner = HfTokenizer::from_file(&file)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", file.display())))?;
        let mut tok = Self::from_inner(inner, None);
        let config = file.with_file_name("tokenizer_config.json");
        if config.exists() {
            tok.read_tokenizer_config(&config)?;
        }
        Ok(tok)
    }

    fn from_inner(mut inner: HfTokenizer, pad_id: Option<u32>) -> Self {
        inner.with_padding(None);
        let _ = inner.with_truncation(None);
        let pad_id = pad_id
            .or_else(|| {
                ["[PAD]", "<pad>", "<|endoftext|>"]
                    .iter()
                    .find_map(|t| inner.token_to_id(t))
            })
            .unwrap_or(0);
        Self {
            inner,
            pad_id,
            chat_template: None,
            bos_token: None,
            eos_token: None,
        }
    }

    /// The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata (see
    /// [`GgufFile::tokenizer_json`]), with its chat template and special tokens.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let json = file.tokenizer_json()?;
        let bytes = serde_json::to_vec(&json).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let inner = HfTokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", file.path().display())))?;
        let cfg = file.config_json()?;
        let id = |k: &str| cfg.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
        let mut tok = Self::from_inner(inner, id("pad_token_id"));
        tok.chat_template = file.chat_template();
        tok.bos_token = id("bos_token_id").and_then(|i| tok.inner.id_to_token(i));
        tok.eos_token = id("eos_token_id").and_then(|i| tok.inner.id_to_token(i));
        Ok(tok)
    }

    /// The tokenizer of a model given as a directory or a GGUF file: `tokenizer.json` in the
    /// directory (or next to the GGUF file) when there is one, else the GGUF's own metadata.
    pub fn for_model(path: &Path) -> Result<Self> {
        let dir = if path.is_dir() {
            path
        } else {
            path.parent().unwrap_or(Path::new("."))
        };
        if dir.join("tokenizer.json").exists() {
            return Self::from_path(&dir.join("tokenizer.json"));
        }
        match find_gguf(path)? {
            Some(gguf) => Self::from_gguf(&GgufFile::open(&gguf)?),
            None => Err(Error::io(
                dir.join("tokenizer.json"),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no tokenizer.json and no GGUF file to read a tokenizer from",
                ),
            )),
        }
    }

    /// Takes the chat template and special tokens from a tokenizer_config.json.
    fn read_tokenizer_config(&mut self, path: &Path) -> Result<()> {
        let cfg = super::read_json(path)?;
        let text = |v: Option<&serde_json::Value>| -> Option<String> {
            match v? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
                _ => None,
            }
        };
        self.chat_template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: the `default` one.
            Some(serde_json::Value::Array(list)) => list.iter().find_map(|t| {
                (t.get("name")?.as_str()? == "default")
                    .then(|| t.get("template")?.as_str().map(String::from))
                    .flatten()
            }),
            _ => None,
        };
        self.bos_token = text(cfg.get("bos_token"));
        self.eos_token = text(cfg.get("eos_token"));
        if let Some(pad) = text(cfg.get("pad_token")).and_then(|t| self.inner.token_to_id(&t)) {
            self.pad_id = pad;
        }
        Ok(())
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Renders the chat template over `messages` (`(role, content)` pairs), as transformers'
    /// `apply_chat_template(..., tokenize=False)` does.
    pub fn apply_chat_template(
        &self,
        messages: &[(String, String)],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::Tokenizer(
                "this tokenizer has no chat template (neither tokenizer_config.json nor the GGUF \
                 metadata carries one); run without chat formatting"
                    .into(),
            )
        })?;
        super::chat::render(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref(),
            self.eos_token.as_deref(),
        )
    }

    /// Ids of `text` with the tokenizer's special tokens (as transformers' `tokenizer(text)`),
    /// no truncation.
    pub fn encode_text(&mut self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let _ = self.inner.with_truncation(None);
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (transformers' `decode`).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &HfTokenizer {
        &self.inner
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
