//! GGUF files (llama.cpp's format) as a source of Hugging Face-format models: tensors under
//! their transformers names (block-quantized Linear weights kept in their blocks, everything else
//! dequantized to f32), a config.json equivalent from the `llama.*`
//! metadata, and a `tokenizer.json` equivalent from the `tokenizer.ggml.*` metadata.
//!
//! llama.cpp's converter renames every tensor (`blk.3.attn_q` for
//! `model.layers.3.self_attn.q_proj`) and permutes the rows of the query and key projections
//! into the pair layout its RoPE kernel wants; both are undone here so that the model code reads
//! the checkpoint exactly as transformers would.

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use serde_json::{json, Map, Value as Json};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::quant::ggml::{supported_names, GgmlWeight};
use crate::{Error, Result};

/// An open GGUF file, memory-mapped; tensors are read and dequantized on request.
pub struct GgufFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    content: Content,
}

/// Where a transformers tensor comes from in the file, and whether its rows must be un-permuted
/// (query/key projections: the head count the permutation was made with).
#[derive(Debug, Clone)]
pub(crate) struct Source {
    pub gguf_name: String,
    pub unpermute_heads: Option<usize>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: mapped read-only; like every mmap user we rely on nobody truncating the file
        // while it is open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let content = Content::read(&mut std::io::Cursor::new(&mmap[..])).map_err(|e| {
            let e = e.to_string();
            if e.contains("unknown dtype") {
                // llama.cpp types candle has no blocks for (the IQ* family, TQ*, MXFP4, ...).
                Error::Config(format!(
                    "{}: a tensor uses a GGML type that cannot be read here ({e}); supported                      quantized types: {}, plus F32/F16/BF16 — re-quantize the model to one of                      them (llama.cpp's llama-quantize)",
                    path.display(),
                    supported_names()
                ))
            } else {
                Error::Config(format!(
                    "{}: not a readable GGUF file ({e}); is it truncated or corrupt?",
                    path.display()
                ))
            }
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            content,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// `general.architecture` (`llama`, ...).
    pub fn architecture(&self) -> Result<String> {
        self.string("general.architecture")?.ok_or_else(|| {
            Error::Config(format!(
                "{}: no general.architecture in the GGUF metadata",
                self.path.display()
            ))
        })
    }

    /// The names of the tensors stored in the file (llama.cpp's names).
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.content.tensor_infos.keys().map(|s| s.as_str())
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.bad_type(key, "a string", other)),
        }
    }

    fn number(&self, key: &str) -> Result<Option<f64>> {
        Ok(match self.get(key) {
            None => None,
            Some(v) => Some(match v {
                Value::U8(x) => *x as f64,
                Value::I8(x) => *x as f64,
                Value::U16(x) => *x as f64,
                Value::I16(x) => *x as f64,
                Value::U32(x) => *x as f64,
                Value::I32(x) => *x as f64,
                Value::U64(x) => *x as f64,
                Value::I64(x) => *x as f64,
                Value::F32(x) => *x as f64,
                Value::F64(x) => *x,
                other => return Err(self.bad_type(key, "a number", other)),
            }),
        })
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        Ok(self.number(key)?.map(|v| v as usize))
    }

    fn required(&self, key: &str) -> Result<usize> {
        self.usize(key)?.ok_or_else(|| {
            Error::Config(format!(
                "{}: GGUF metadata `{key}` is missing; the file cannot describe a model without it",
                self.path.display()
            ))
        })
    }

    fn bool(&self, key: &str) -> Option<bool> {
        match self.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(self.bad_type(key, "an array of strings", other)),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(other) => Err(self.bad_type(key, "an array of strings", other)),
        }
    }

    fn ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::I32(x) => Ok(*x as i64),
                    Value::U32(x) => Ok(*x as i64),
                    Value::I64(x) => Ok(*x),
                    Value::U8(x) => Ok(*x as i64),
                    other => Err(self.bad_type(key, "an array of integers", other)),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(other) => Err(self.bad_type(key, "an array of integers", other)),
        }
    }

    fn bad_type(&self, key: &str, wanted: &str, found: &Value) -> Error {
        Error::Config(format!(
            "{}: GGUF metadata `{key}` should be {wanted}, found {:?}",
            self.path.display(),
            found.value_type()
        ))
    }

    /// The config.json transformers derives from the metadata, for the architectures whose
    /// models exist here.
    pub fn config_json(&self) -> Result<Json> {
        let arch = self.architecture()?;
        if arch != "llama" {
            return Err(Error::Config(format!(
                "{}: GGUF architecture `{arch}` is not supported; supported: llama (convert \
                 other models to a Hugging Face directory with safetensors)",
                self.path.display()
            )));
        }
        let k = |name: &str| format!("{arch}.{name}");
        let hidden = self.required(&k("embedding_length"))?;
        let heads = self.required(&k("attention.head_count"))?;
        let kv_heads = self.usize(&k("attention.head_count_kv"))?.unwrap_or(heads);
        let head_dim = self
            .usize(&k("attention.key_length"))?
            .or(self.usize(&k("rope.dimension_count"))?)
            .unwrap_or(hidden / heads.max(1));
        let embd = self.content.tensor_infos.get("token_embd.weight");
        let vocab = match self.usize(&k("vocab_size"))? {
            Some(v) => v,
            None => match embd {
                Some(info) => info.shape.dims()[0],
                None => self
                    .strings("tokenizer.ggml.tokens")?
                    .map(|t| t.len())
                    .unwrap_or(0),
            },
        };
        let theta = self.number(&k("rope.freq_base"))?.unwrap_or(10000.0);
        let mut cfg = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": self.required(&k("feed_forward_length"))?,
            "num_hidden_layers": self.required(&k("block_count"))?,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.usize(&k("context_length"))?.unwrap_or(2048),
            "rms_norm_eps": self.number(&k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
            "rope_theta": theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": theta},
            "attention_bias": self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            "mlp_bias": false,
            "tie_word_embeddings": !self.content.tensor_infos.contains_key("output.weight"),
            "initializer_range": 0.02,
            "torch_dtype": "float32",
        });
        let obj = cfg.as_object_mut().expect("object literal");
        if let (Some(Value::String(kind)), Some(factor)) = (
            self.get(&k("rope.scaling.type")),
            self.number(&k("rope.scaling.factor"))?,
        ) {
            if kind != "none" {
                let scaling = json!({"rope_type": kind, "factor": factor, "rope_theta": theta});
                obj.insert("rope_scaling".into(), scaling.clone());
                obj.insert("rope_parameters".into(), scaling);
            }
        }
        for (name, key) in [
            ("bos_token_id", "tokenizer.ggml.bos_token_id"),
            ("eos_token_id", "tokenizer.ggml.eos_token_id"),
            ("pad_token_id", "tokenizer.ggml.padding_token_id"),
        ] {
            if let Some(v) = self.usize(key)? {
                obj.insert(name.into(), v.into());
            }
        }
        Ok(cfg)
    }

    /// transformers name → where it is stored, for every tensor of the file that the model uses.
    pub(crate) fn hf_names(&self) -> Result<BTreeMap<String, Source>> {
        let cfg = self.config_json()?;
        let heads = cfg["num_attention_heads"].as_u64().unwrap_or(1) as usize;
        let kv_heads = cfg["num_key_value_heads"].as_u64().unwrap_or(1) as usize;
        let mut out = BTreeMap::new();
        for name in self.content.tensor_infos.keys() {
            if let Some((hf, unpermute)) = hf_name(name, heads, kv_heads) {
                out.insert(
                    hf,
                    Source {
                        gguf_name: name.clone(),
                        unpermute_heads: unpermute,
                    },
                );
            }
        }
        Ok(out)
    }

    fn read(&self, source: &Source) -> Result<candle_core::quantized::QTensor> {
        let mut cursor = std::io::Cursor::new(&self.mmap[..]);
        self.content
            .tensor(&mut cursor, &source.gguf_name, &Device::Cpu)
            .map_err(|e| {
                Error::Config(format!(
                    "{}: tensor `{}` could not be read ({e}); is the file truncated?",
                    self.path.display(),
                    source.gguf_name
                ))
            })
    }

    /// Reads one 2-D tensor in its GGML blocks (llama.cpp's RoPE row permutation undone by
    /// moving whole rows of blocks), or `None` when the file stores it unquantized
    /// (F32/F16/BF16), which then loads dense.
    pub(crate) fn load_quantized(&self, source: &Source) -> Result<Option<GgmlWeight>> {
        use candle_core::quantized::GgmlDType;
        let q = self.read(source)?;
        if matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            return Ok(None);
        }
        let w = GgmlWeight::new(q).map_err(|e| {
            Error::Config(format!(
                "{}: tensor `{}`: {e}",
                self.path.display(),
                source.gguf_name
            ))
        })?;
        Ok(Some(match source.unpermute_heads {
            Some(heads) => w.permute_rows(&unpermute_order(w.dims().0, heads)?)?,
            None => w,
        }))
    }

    /// Reads one tensor, dequantized to f32, with llama.cpp's RoPE row permutation undone.
    pub(crate) fn load(&self, source: &Source, device: &Device) -> Result<Tensor> {
        let q = self.read(source)?;
        let mut t = q.dequantize(&Device::Cpu)?;
        if let Some(heads) = source.unpermute_heads {
            t = unpermute_rows(&t, heads)?;
        }
        Ok(t.to_device(device)?)
    }

    /// `tokenizer.chat_template`, if the file carries one.
    pub fn chat_template(&self) -> Option<String> {
        self.string("tokenizer.chat_template").ok().flatten()
    }

    /// The `tokenizer.json` (the `tokenizers` library's format) that the `tokenizer.ggml.*`
    /// metadata describes: a byte-level BPE with the file's vocabulary and merges, control tokens
    /// as special added tokens, and the pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre`.
    pub fn tokenizer_json(&self) -> Result<Json> {
        let model = self.string("tokenizer.ggml.model")?.unwrap_or_default();
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "{}: GGUF tokenizer model `{model}` cannot be rebuilt here (supported: gpt2, \
                 byte-level BPE); put the model's tokenizer.json next to the GGUF file",
                self.path.display()
            )));
        }
        let pre = self
            .string("tokenizer.ggml.pre")?
            .unwrap_or_else(|| "default".into());
        let pre_tokenizer = pre_tokenizer(&pre).ok_or_else(|| {
            Error::Tokenizer(format!(
                "{}: GGUF pre-tokenizer `{pre}` is not known here (known: {}); put the model's \
                 tokenizer.json next to the GGUF file",
                self.path.display(),
                KNOWN_PRE.join(", ")
            ))
        })?;
        let tokens = self.strings("tokenizer.ggml.tokens")?.ok_or_else(|| {
            Error::Tokenizer(format!(
                "{}: no tokenizer.ggml.tokens in the GGUF metadata; put a tokenizer.json next to it",
                self.path.display()
            ))
        })?;
        let types = self.ints("tokenizer.ggml.token_type")?.unwrap_or_default();
        let merges = self.strings("tokenizer.ggml.merges")?.unwrap_or_default();
        let alphabet = byte_alphabet();
        let spelled: std::collections::HashSet<char> = alphabet.iter().copied().collect();
        let mut vocab = Map::new();
        let mut added = Vec::new();
        for (id, token) in tokens.iter().enumerate() {
            let in_alphabet = token.chars().all(|c| spelled.contains(&c));
            let ty = types.get(id).copied().unwrap_or(1);
            // 3 = control (`<|im_end|>`), 4 = user-defined: both are matched whole in the text.
            // A control token outside the byte alphabet is a llama.cpp mislabel (transformers
            // skips it too).
            if (ty == 3 && in_alphabet) || ty == 4 {
                added.push(json!({
                    "id": id, "content": token, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": ty == 3,
                }));
            }
            let key = if in_alphabet {
                token.clone()
            } else {
                token.bytes().map(|b| alphabet[b as usize]).collect()
            };
            vocab.entry(key).or_insert(id.into());
        }
        let add_bos = self.bool("tokenizer.ggml.add_bos_token").unwrap_or(false);
        let bos = self
            .usize("tokenizer.ggml.bos_token_id")?
            .and_then(|i| tokens.get(i).cloned());
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let post = match (add_bos, bos) {
            (true, Some(bos)) => {
                let id = tokens.iter().position(|t| *t == bos).unwrap_or(0);
                json!({"type": "Sequence", "processors": [
                    byte_level.clone(),
                    {"type": "TemplateProcessing",
                     "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                     "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                              {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                     "special_tokens": {bos.clone(): {"id": bos, "ids": [id], "tokens": [bos]}}}
                ]})
            }
            _ => byte_level.clone(),
        };
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post,
            "decoder": byte_level,
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            }
        }))
    }
}

/// `tokenizer.ggml.pre` values understood, grouped by the splitting rule llama.cpp applies.
const KNOWN_PRE: &[&str] = &[
    "default",
    "gpt2",
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva",
    "llama3",
    "llama-bpe",
    "llama-v3",
    "falcon3",
    "smaug-bpe",
    "dbrx",
];

/// Llama-3's split regex (from its tokenizer.json), for the pre-tokenizers that use it.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn pre_tokenizer(pre: &str) -> Option<Json> {
    let gpt2 = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    Some(match pre {
        "default" | "gpt2" => gpt2,
        // llama.cpp splits these into single digits before GPT-2's regex, as the models' own
        // tokenizer.json files do (`Digits(individual_digits=True)` then `ByteLevel`).
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, gpt2
            ]})
        }
        "llama3" | "llama-bpe" | "llama-v3" | "falcon3" | "smaug-bpe" | "dbrx" => {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
            ]})
        }
        _ => return None,
    })
}

/// GPT-2's byte → printable character table (`bytes_to_unicode`).
fn byte_alphabet() -> Vec<char> {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                let c = char::from_u32(next).unwrap_or('?');
                next += 1;
                c
            }
        })
        .collect()
}

/// The Linear layers of a llama block: llama.cpp's tensor stem and the transformers module path
/// under `model.layers.N.` (llama.cpp's `MODEL_TENSOR` names for `LLM_ARCH_LLAMA`).
pub(crate) const BLOCK_LINEARS: &[(&str, &str)] = &[
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// llama.cpp name → (transformers name, heads to un-permute with).
fn hf_name(name: &str, heads: usize, kv_heads: usize) -> Option<(String, Option<usize>)> {
    let (stem, suffix) = name.rsplit_once('.')?;
    let top = match stem {
        "token_embd" => Some("model.embed_tokens".to_string()),
        "output_norm" => Some("model.norm".to_string()),
        "output" => Some("lm_head".to_string()),
        _ => None,
    };
    if let Some(t) = top {
        return Some((format!("{t}.{suffix}"), None));
    }
    let rest = stem.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (hf, unpermute) = match part {
        "attn_norm" => ("input_layernorm", None),
        "ffn_norm" => ("post_attention_layernorm", None),
        _ => {
            let (_, hf) = BLOCK_LINEARS.iter().find(|(g, _)| *g == part)?;
            let unpermute = match part {
                "attn_q" => Some(heads),
                "attn_k" => Some(kv_heads),
                _ => None,
            };
            (*hf, unpermute)
        }
    };
    Some((
        format!("model.layers.{layer}.{hf}.{suffix}"),
        unpermute.filter(|_| suffix == "weight" || suffix == "bias"),
    ))
}

/// llama.cpp's `LlamaModel.permute`: rows `[heads, 2, half, ...]` reordered to
/// `[heads, half, 2, ...]`, the pair layout of its RoPE kernel.
pub(crate) fn permute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if heads == 0 || !rows.is_multiple_of(heads * 2) {
        return Err(Error::Config(format!(
            "a tensor with {rows} rows cannot be split into {heads} heads of RoPE pairs"
        )));
    }
    let half = rows / heads / 2;
    let rest: usize = dims[1..].iter().product();
    Ok(t.reshape((heads, 2, half, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// Inverse of llama.cpp's `permute`: its rows are `[heads, 2, half, ...]` viewed as
/// `[heads, half, 2, ...]`; transformers' rotate-half RoPE wants the former order back.
pub(crate) fn unpermute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if heads == 0 || !rows.is_multiple_of(heads * 2) {
        return Err(Error::Config(format!(
            "GGUF tensor with {rows} rows cannot be split into {heads} heads of RoPE pairs"
        )));
    }
    let half = rows / heads / 2;
    let rest: usize = dims[1..].iter().product();
    Ok(t.reshape((heads, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// The row order [`unpermute_rows`] produces: row `i` of the result is row `order[i]` of the
/// stored tensor.
fn unpermute_order(rows: usize, heads: usize) -> Result<Vec<usize>> {
    if heads == 0 || !rows.is_multiple_of(heads * 2) {
        return Err(Error::Config(format!(
            "GGUF tensor with {rows} rows cannot be split into {heads} heads of RoPE pairs"
        )));
    }
    let half = rows / heads / 2;
    let per_head = 2 * half;
    Ok((0..rows)
        .map(|n| {
            let (h, rest) = (n / per_head, n % per_head);
            let (a, b) = (rest / half, rest % half);
            h * per_head + b * 2 + a
        })
        .collect())
}

/// The GGUF file that `path` names: the file itself, or the only `.gguf` in a directory.
pub fn find_gguf(path: &Path) -> Result<Option<PathBuf>> {
    if path.is_file() {
        return Ok(path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
            .then(|| path.to_path_buf()));
    }
    if !path.is_dir() {
        return Ok(None);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        })
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(Error::Config(format!(
            "{} holds several GGUF files ({}); pass the one to load",
            path.display(),
            found
                .iter()
                .filter_map(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(heads, 2, half, in).swapaxes(1, 2).reshape(w.shape)
        let (heads, half, inp) = (3usize, 2usize, 2usize);
        let rows = heads * 2 * half;
        let w = Tensor::arange(0f32, (rows * inp) as f32, &Device::Cpu)
            .unwrap()
            .reshape((rows, inp))
            .unwrap();
        let permuted = w
            .reshape((heads, 2, half, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((rows, inp))
            .unwrap();
        assert_eq!(
            permute_rows(&w, heads).unwrap().to_vec2::<f32>().unwrap(),
            permuted.to_vec2::<f32>().unwrap()
        );
        let back = unpermute_rows(&permuted, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        assert_ne!(
            permuted.to_vec2::<f32>().unwrap(),
            w.to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn unpermute_order_matches_unpermute_rows() {
        let (rows, heads) = (12usize, 3usize);
        let w = Tensor::arange(0f32, (rows * 2) as f32, &Device::Cpu)
            .unwrap()
            .reshape((rows, 2))
            .unwrap();
        let want = unpermute_rows(&w, heads).unwrap().to_vec2::<f32>().unwrap();
        let rows_w = w.to_vec2::<f32>().unwrap();
        let got: Vec<Vec<f32>> = unpermute_order(rows, heads)
            .unwrap()
            .into_iter()
            .map(|r| rows_w[r].clone())
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn names_map_to_transformers() {
        assert_eq!(
            hf_name("blk.12.attn_k.weight", 9, 3),
            Some(("model.layers.12.self_attn.k_proj.weight".into(), Some(3)))
        );
        assert_eq!(
            hf_name("token_embd.weight", 9, 3),
            Some(("model.embed_tokens.weight".into(), None))
        );
        assert_eq!(hf_name("rope_freqs.weight", 9, 3), None);
    }
}
