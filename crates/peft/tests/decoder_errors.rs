//! Decoder models: what `ModelDims` reports, and bad input answered by errors that say what is
//! wrong (never a panic).

use candle_core::{DType, Device, Tensor};
use peft::models::{self, Cache, LoadOptions, ModelDims};
use peft::{Inputs, TaskType};
use std::path::{Path, PathBuf};

fn model_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/decoder/models")
        .join(name)
}

/// A copy of fixture model `name` whose config.json is changed by `edit`.
fn edited(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let src = model_dir(name);
    std::fs::copy(
        src.join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let mut config = peft::io::read_json(&src.join("config.json")).unwrap();
    edit(&mut config);
    std::fs::write(
        tmp.path().join("config.json"),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    tmp
}

fn load_err(dir: &Path) -> String {
    match models::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn ids(t: usize) -> Inputs {
    let v: Vec<u32> = (0..t as u32).map(|i| 4 + i % 28).collect();
    Inputs::new(Tensor::from_vec(v, (1, t), &Device::Cpu).unwrap())
}

#[test]
fn dims_come_from_config_json() {
    let m = models::load(&model_dir("llama_gqa"), &LoadOptions::default()).unwrap();
    assert_eq!(m.info().task, TaskType::CausalLm, "from `architectures`");
    assert_eq!(m.info().architecture, "LlamaForCausalLM");
    assert_eq!(
        m.dims(),
        ModelDims {
            vocab_size: 32,
            hidden_size: 32,
            num_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            num_encoder_layers: 0,
            is_encoder_decoder: false,
            max_positions: Some(64),
            pad_token_id: Some(0),
            eos_token_ids: vec![2, 3],
            bos_token_id: Some(1),
            decoder_start_token_id: None,
        }
    );
    let tied = models::load(&model_dir("llama_tied"), &LoadOptions::default()).unwrap();
    assert_eq!(tied.dims().head_dim, 16, "explicit head_dim");
    assert_eq!(tied.dims().eos_token_ids, vec![2]);
    // Dynamic RoPE is meant to run past max_position_embeddings (6), up to factor (2) times it.
    let dynamic = models::load(&model_dir("llama_dynamic"), &LoadOptions::default()).unwrap();
    assert_eq!(dynamic.dims().max_positions, Some(12));
}

#[test]
fn unsupported_model_type_lists_the_supported_ones() {
    let dir = edited("llama_gqa", |c| c["model_type"] = "falcon".into());
    let e = load_err(dir.path());
    for t in ["`falcon`", "bert", "llama", "mistral", "qwen2"] {
        assert!(e.contains(t), "{e}");
    }
}

#[test]
fn config_weight_mismatch_names_the_tensor() {
    let dir = edited("llama_gqa", |c| c["num_key_value_heads"] = 4.into());
    let e = load_err(dir.path());
    assert!(e.contains("model.layers.0.self_attn.k_proj.weight"), "{e}");
    assert!(e.contains("[16, 32]") && e.contains("[32, 32]"), "{e}");
    let dir = edited("llama_gqa", |c| c["attention_bias"] = true.into());
    let e = load_err(dir.path());
    assert!(e.contains("q_proj.bias"), "{e}");
}

#[test]
fn bad_rope_scaling_is_named() {
    let dir =
        edited(
            "llama_gqa",
            |c| {
                c["rope_parameters"] =
                    serde_json::json!({"rope_type": "longrope", "rope_theta": 10000.0})
            },
        );
    let e = load_err(dir.path());
    assert!(e.contains("longrope") && e.contains("llama3"), "{e}");
}

#[test]
fn sequences_longer_than_the_context_window_are_errors() {
    let m = models::load(&model_dir("llama_gqa"), &LoadOptions::default()).unwrap();
    assert!(m.forward(&ids(64), false).is_ok());
    let e = m.forward(&ids(65), false).unwrap_err().to_string();
    assert!(e.contains("65") && e.contains("64"), "{e}");
    // Cached positions count too.
    let mut cache = Cache::default();
    m.forward_with_cache(&ids(60), Some(&mut cache), false)
        .unwrap();
    let e = m
        .forward_with_cache(&ids(5), Some(&mut cache), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("60 cached"), "{e}");
}

#[test]
fn sequence_classification_of_a_batch_needs_a_pad_token() {
    let dir = edited("llama_seq_cls", |c| {
        c["pad_token_id"] = serde_json::Value::Null
    });
    let m = models::load(dir.path(), &LoadOptions::default()).unwrap();
    let two = Inputs::new(Tensor::ones((2, 4), DType::U32, &Device::Cpu).unwrap());
    let e = m.forward(&two, false).unwrap_err().to_string();
    assert!(e.contains("pad_token_id"), "{e}");
    assert_eq!(m.forward(&ids(4), false).unwrap().dims(), &[1, 3]);
}

#[test]
fn every_decoder_head_loads_with_transformers_names() {
    let dir = model_dir("llama_gqa");
    for (task, arch, head) in [
        (TaskType::SeqCls, "LlamaForSequenceClassification", "score"),
        (TaskType::TokenCls, "LlamaForTokenClassification", "score"),
        (
            TaskType::QuestionAns,
            "LlamaForQuestionAnswering",
            "qa_outputs",
        ),
        (TaskType::FeatureExtraction, "LlamaModel", ""),
    ] {
        let opts = LoadOptions {
            task: Some(task),
            num_labels: Some(5),
            ..Default::default()
        };
        let m = models::load(&dir, &opts).unwrap();
        assert_eq!(m.info().architecture, arch);
        let names: Vec<String> = m.modules().iter().map(|m| m.name().to_string()).collect();
        let first = match task {
            TaskType::QuestionAns => "transformer.embed_tokens",
            TaskType::FeatureExtraction => "embed_tokens",
            _ => "model.embed_tokens",
        };
        assert_eq!(names[0], first);
        let out = m.forward(&ids(6), false).unwrap();
        match task {
            TaskType::SeqCls => assert_eq!(out.dims(), &[1, 5]),
            TaskType::TokenCls => assert_eq!(out.dims(), &[1, 6, 5]),
            TaskType::QuestionAns => assert_eq!(out.dims(), &[1, 6, 2]),
            _ => assert_eq!(out.dims(), &[1, 6, 32]),
        }
        assert_eq!(
            m.info().head,
            if head.is_empty() {
                vec![]
            } else {
                vec![head.to_string()]
            }
        );
    }
}
