//! Request bodies of the OpenAI-compatible routes (the fields this server reads; others are
//! ignored as OpenAI's own server ignores unknown ones).

use serde::Deserialize;
use serde_json::Value;

/// A string or a list of strings (`stop`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `prompt` of `/v1/completions`: text, texts, token ids, or lists of token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling and stopping fields both routes share.
#[derive(Debug, Clone, Deserialize)]
pub struct Sampling {
    pub model: String,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// The chat route's newer name for `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    /// vLLM's extension (0 or -1: off).
    #[serde(default)]
    pub top_k: Option<i64>,
    /// vLLM's extension (1: off).
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    /// vLLM's extension: keep generating past EOS (benchmarks with fixed output lengths).
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    /// Log-probabilities of this many most likely tokens per position (0–20).
    #[serde(default)]
    pub logprobs: Option<usize>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    /// A string or a list of parts (`{"type": "text", "text": ...}`).
    #[serde(default)]
    pub content: Value,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub logprobs: bool,
    #[serde(default)]
    pub top_logprobs: Option<usize>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `input` of `/v1/embeddings` (and `inputs` of `/predict`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingRequest {
    pub input: EmbeddingInput,
    pub model: String,
    /// `float` (default) or `base64` (little-endian f32, as OpenAI's client asks for).
    #[serde(default)]
    pub encoding_format: Option<String>,
}

/// Text Embeddings Inference's `/predict` body, with `model` choosing the adapter.
#[derive(Debug, Clone, Deserialize)]
pub struct PredictRequest {
    pub inputs: EmbeddingInput,
    #[serde(default)]
    pub model: Option<String>,
    /// Logits instead of probabilities.
    #[serde(default)]
    pub raw_scores: bool,
}

/// vLLM's `/v1/load_lora_adapter` body.
#[derive(Debug, Clone, Deserialize)]
pub struct LoadAdapter {
    pub lora_name: String,
    pub lora_path: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct UnloadAdapter {
    pub lora_name: String,
}
