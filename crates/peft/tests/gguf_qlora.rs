//! Adapters on a GGUF base kept in its blocks: a tiny random Llama written as a GGUF file by
//! candle's writer, every projection in a different GGML type, loaded here with its Linear
//! weights kept quantized (`keep_gguf_quantized`) and, as the reference, dequantized to f32 (what
//! transformers does).

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use peft::layers::ModuleRef;
use peft::models::{self, LoadOptions};
use peft::quant::ggml::type_name;
use peft::quant::{GgmlWeight, QuantWeight};
use peft::{get_peft_model, Inputs, Model, PeftConfig, TaskType};
use std::path::Path;

const HIDDEN: usize = 256;
const FFN: usize = 512;
const VOCAB: usize = 64;

/// The GGML type of each projection, per layer: all ten supported types appear.
const TYPES: [[(&str, GgmlDType); 7]; 2] = [
    [
        ("attn_q", GgmlDType::Q4_0),
        ("attn_k", GgmlDType::Q4_1),
        ("attn_v", GgmlDType::Q5_0),
        ("attn_output", GgmlDType::Q5_1),
        ("ffn_gate", GgmlDType::Q8_0),
        ("ffn_up", GgmlDType::Q2K),
        ("ffn_down", GgmlDType::Q3K),
    ],
    [
        ("attn_q", GgmlDType::Q4K),
        ("attn_k", GgmlDType::Q5K),
        ("attn_v", GgmlDType::Q6K),
        ("attn_output", GgmlDType::Q4_1),
        ("ffn_gate", GgmlDType::Q4K),
        ("ffn_up", GgmlDType::Q6K),
        ("ffn_down", GgmlDType::Q8_0),
    ],
];

fn values(n: usize, seed: f64, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i as f64 * 12.9898 + seed * 78.233).sin() * 43758.5453;
            scale * (2.0 * (x - x.floor()) - 1.0) as f32
        })
        .collect()
}

fn random(dims: &[usize], seed: f64, scale: f32) -> Tensor {
    Tensor::from_vec(
        values(dims.iter().product(), seed, scale),
        dims,
        &Device::Cpu,
    )
    .unwrap()
}

/// Writes the tiny model; with `tied`, no `output.weight` (the head reads the embedding).
fn write_tiny_gguf(path: &Path, tied: bool) {
    let u = |v: usize| Value::U32(v as u32);
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", u(HIDDEN)),
        ("llama.feed_forward_length", u(FFN)),
        ("llama.block_count", u(TYPES.len())),
        ("llama.attention.head_count", u(4)),
        ("llama.attention.head_count_kv", u(2)),
        ("llama.context_length", u(64)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
    ];
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let dense = |t: Tensor| QTensor::quantize(&t, GgmlDType::F32).unwrap();
    tensors.push((
        "token_embd.weight".into(),
        dense(random(&[VOCAB, HIDDEN], 1.0, 1.0)),
    ));
    tensors.push((
        "output_norm.weight".into(),
        dense((random(&[HIDDEN], 2.0, 0.1) + 1.0).unwrap()),
    ));
    if !tied {
        let head = random(&[VOCAB, HIDDEN], 3.0, 0.1);
        tensors.push((
            "output.weight".into(),
            QTensor::quantize(&head, GgmlDType::Q8_0).unwrap(),
        ));
    }
    for (layer, types) in TYPES.iter().enumerate() {
        for norm in ["attn_norm", "ffn_norm"] {
            let w = (random(&[HIDDEN], 10.0 + layer as f64, 0.1) + 1.0).unwrap();
            tensors.push((format!("blk.{layer}.{norm}.weight"), dense(w)));
        }
        for (i, (name, dtype)) in types.iter().enumerate() {
            let (rows, cols) = match *name {
                "attn_k" | "attn_v" => (128, HIDDEN),
                "ffn_gate" | "ffn_up" => (FFN, HIDDEN),
                "ffn_down" => (HIDDEN, FFN),
                _ => (HIDDEN, HIDDEN),
            };
            let w = random(&[rows, cols], 100.0 * layer as f64 + i as f64, 0.08);
            tensors.push((
                format!("blk.{layer}.{name}.weight"),
                QTensor::quantize(&w, *dtype).unwrap(),
            ));
        }
    }
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta, &refs).unwrap();
}

struct Tiny {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

fn tiny(tied: bool) -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, tied);
    Tiny { _dir: dir, path }
}

fn load(path: &Path, dequantize_gguf: bool) -> Box<dyn Model> {
    let opts = LoadOptions {
        task: Some(TaskType::CausalLm),
        keep_gguf_quantized: !dequantize_gguf,
        ..Default::default()
    };
    models::load(path, &opts).unwrap()
}

fn inputs() -> Inputs {
    let ids: Vec<u32> = (0..10).map(|i| (i * 7 + 3) % VOCAB as u32).collect();
    Inputs::new(Tensor::from_vec(ids, (2, 5), &Device::Cpu).unwrap())
}

/// Linear name → its GGML type, for the layers stored quantized.
fn ggml_linears(m: &dyn Model) -> Vec<(String, GgmlDType)> {
    m.modules()
        .into_iter()
        .filter_map(|m| match m {
            ModuleRef::Linear(l) => match l.quant() {
                Some(QuantWeight::Ggml(g)) => Some((l.name.clone(), g.dtype())),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let m = |t: Tensor| {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    m((a - b).unwrap()) / m(b.clone())
}

/// The 8-bit activations of candle's quantized product, through two layers and the head, move
/// the tiny model's logits by about 1 % of their range (measured); the f32 reference does not
/// round them.
const ACT_TOL: f32 = 3e-2;

/// The same rounding, through softmax attention, turns adapter gradients by a few degrees at
/// most (cosine ≥ 0.993 measured, lowest on the first layer's query/key adapters).
const GRAD_COS: f32 = 0.98;

#[test]
fn a_gguf_base_keeps_its_projections_and_its_head_in_their_blocks() {
    let t = tiny(false);
    let q = load(&t.path, false);
    let got = ggml_linears(q.as_ref());
    assert_eq!(got.len(), 15, "{got:?}");
    for (layer, types) in TYPES.iter().enumerate() {
        for (gguf, dtype) in types {
            let hf = match *gguf {
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                _ => "mlp.down_proj",
            };
            let name = format!("model.layers.{layer}.{hf}");
            assert!(
                got.contains(&(name.clone(), *dtype)),
                "{name} should be {}",
                type_name(*dtype)
            );
        }
    }
    // The Q8_0 head stays in its blocks, as llama.cpp multiplies the output by them.
    assert!(got.contains(&("lm_head".to_string(), GgmlDType::Q8_0)));
    // A tied head reads the token table's storage: F32 here, so a dense product.
    let tied = tiny(true);
    let tq = load(&tied.path, false);
    assert!(!ggml_linears(tq.as_ref())
        .iter()
        .any(|(n, _)| n == "lm_head"));
    let d = load(&t.path, true);
    assert!(ggml_linears(d.as_ref()).is_empty());
    // The kept blocks are the dequantized weights (query/key rows un-permuted alike).
    for (mq, md) in q.modules().into_iter().zip(d.modules()) {
        if let (ModuleRef::Linear(lq), ModuleRef::Linear(ld)) = (mq, md) {
            let diff = (lq.dense_weight().unwrap() - ld.dense_weight().unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{}", lq.name);
        }
    }
    let yq = q.forward(&inputs(), false).unwrap();
    let yd = d.forward(&inputs(), false).unwrap();
    let r = rel_diff(&yq, &yd);
    assert!(r < ACT_TOL, "logits {r} off the dequantized model");
}

fn cosine(a: &Tensor, b: &Tensor) -> f32 {
    let dot = |x: &Tensor, y: &Tensor| {
        (x * y)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    dot(a, b) / (dot(a, a) * dot(b, b)).sqrt()
}

fn cfg(v: serde_json::Value) -> PeftConfig {
    PeftConfig::from_user_json(&v).unwrap()
}

/// Every adapter method of the Linear kind on the GGUF base: its output is the dequantized
/// twin's within the activation rounding, gradients reach every adapter tensor, and merging
/// re-quantizes to each layer's own GGML type exactly as candle quantizes the twin's merged
/// weight.
#[test]
fn every_linear_adapter_trains_and_merges_on_a_gguf_base() {
    let t = tiny(false);
    let targets = serde_json::json!([
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "up_proj",
        "down_proj"
    ]);
    let configs = [
        (
            "lora",
            cfg(
                serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "init_lora_weights": false, "target_modules": targets, "task_type": "CAUSAL_LM"}),
            ),
        ),
        (
            "dora",
            cfg(
                serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": true, "init_lora_weights": false, "target_modules": targets, "task_type": "CAUSAL_LM"}),
            ),
        ),
        (
            "loha",
            cfg(
                serde_json::json!({"peft_type": "LOHA", "r": 4, "alpha": 8, "target_modules": targets, "task_type": "CAUSAL_LM"}),
            ),
        ),
        (
            "lokr",
            cfg(
                serde_json::json!({"peft_type": "LOKR", "r": 2, "alpha": 4, "target_modules": targets, "task_type": "CAUSAL_LM"}),
            ),
        ),
        (
            "ia3",
            cfg(
                serde_json::json!({"peft_type": "IA3", "target_modules": targets, "feedforward_modules": ["down_proj", "up_proj"], "task_type": "CAUSAL_LM"}),
            ),
        ),
        (
            "vera",
            cfg(
                serde_json::json!({"peft_type": "VERA", "r": 8, "target_modules": ["q_proj", "o_proj", "up_proj"], "task_type": "CAUSAL_LM"}),
            ),
        ),
        (
            "adalora",
            cfg(
                serde_json::json!({"peft_type": "ADALORA", "init_r": 4, "target_r": 2, "total_step": 10, "target_modules": targets, "task_type": "CAUSAL_LM"}),
            ),
        ),
    ];
    let x = inputs();
    for (method, config) in configs {
        let mut q = get_peft_model(load(&t.path, false), config.clone(), "default").unwrap();
        let mut d = get_peft_model(load(&t.path, true), config, "default").unwrap();
        // Move every adapter tensor off its initial value (B = 0, l = 1, ...), alike in both.
        for pm in [&mut q, &mut d] {
            for (i, (_, v)) in pm.trainable_parameters().into_iter().enumerate() {
                let bump = random(v.as_tensor().dims(), i as f64, 0.3);
                v.set(&(v.as_tensor() + bump).unwrap()).unwrap();
            }
        }
        let yq = q.forward(&x, false).unwrap();
        let yd = d.forward(&x, false).unwrap();
        let r = rel_diff(&yq, &yd);
        assert!(r < ACT_TOL, "{method}: {r} off the dequantized twin");
        let base = load(&t.path, false).forward(&x, false).unwrap();
        assert!(
            rel_diff(&yq, &base) > 1e-3,
            "{method}: adapter changes nothing"
        );

        // Gradients reach every trainable tensor through the quantized products, and are the
        // twin's within the activation rounding.
        let loss = |pm: &peft::PeftModel| {
            let y = pm.forward(&x, true).unwrap();
            let grads = y.sqr().unwrap().mean_all().unwrap().backward().unwrap();
            pm.trainable_parameters()
                .into_iter()
                .map(|(n, v)| {
                    let g = grads
                        .get(v.as_tensor())
                        .unwrap_or_else(|| panic!("{method}: no gradient for {n}"))
                        .clone();
                    (n, g)
                })
                .collect::<Vec<_>>()
        };
        for ((n, gq), (_, gd)) in loss(&q).iter().zip(loss(&d)) {
            let norm = gq
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "{method}: zero gradient for {n}");
            let r = rel_diff(gq, &gd);
            let c = cosine(gq, &gd);
            assert!(
                c > GRAD_COS,
                "{method}: gradient of {n} has cosine {c} with the twin's (max diff {r})"
            );
        }

        let before = ggml_linears(q.base_model());
        q.merge_adapter().unwrap();
        d.merge_adapter().unwrap();
        assert_eq!(ggml_linears(q.base_model()), before, "{method}: types kept");
        let mut merged = 0;
        for (m, dm) in q
            .base_model()
            .modules()
            .into_iter()
            .zip(d.base_model().modules())
        {
            if let (ModuleRef::Linear(l), ModuleRef::Linear(ld)) = (m, dm) {
                let Some(QuantWeight::Ggml(got)) = l.quant() else {
                    continue;
                };
                if l.adapters.is_empty() {
                    continue;
                }
                // (Layers without an adapter keep the file's blocks: re-quantizing a K-quant's
                // dequantized values need not give the same blocks back.)
                let want = GgmlWeight::quantize(&ld.dense_weight().unwrap(), got.dtype()).unwrap();
                assert!(got.bytes() == want.bytes(), "{method}: {} blocks", l.name);
                merged += 1;
            }
        }
        assert!(merged > 0, "{method}: no quantized layer merged");
        q.unmerge_adapter().unwrap();
        assert_eq!(ggml_linears(q.base_model()), before, "{method}: unmerged");
        let yu = q.forward(&x, false).unwrap();
        assert!(yu
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .is_finite());
    }
}

#[test]
fn quantized_gguf_layers_cannot_be_trained_as_base_weights() {
    let t = tiny(true);
    let e = get_peft_model(
        load(&t.path, false),
        cfg(
            serde_json::json!({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"],
            "modules_to_save": ["model.layers.0.self_attn.o_proj"], "task_type": "CAUSAL_LM"}),
        ),
        "default",
    )
    .err()
    .expect("a quantized modules_to_save is refused")
    .to_string();
    assert!(e.contains("quantized") && e.contains("o_proj"), "{e}");
    // Loaded dequantized, the same layer may be trained.
    get_peft_model(
        load(&t.path, true),
        cfg(
            serde_json::json!({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"],
            "modules_to_save": ["model.layers.0.self_attn.o_proj"], "task_type": "CAUSAL_LM"}),
        ),
        "default",
    )
    .unwrap();
}

/// A GGML type candle has no blocks for (IQ2_XXS, id 16) is named with the supported list.
#[test]
fn a_file_with_an_unknown_ggml_type_is_refused_with_the_supported_types() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("iq.gguf");
    let w = QTensor::quantize(&random(&[2, 256], 1.0, 1.0), GgmlDType::Q8_0).unwrap();
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &[], &[("w", &w)]).unwrap();
    drop(f);
    // Header (24 bytes), name (8 + 1), n_dims (4), two dims (16): the type id follows.
    let mut bytes = std::fs::read(&path).unwrap();
    let at = 24 + 9 + 4 + 16;
    assert_eq!(
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()),
        8,
        "Q8_0's id"
    );
    bytes[at..at + 4].copy_from_slice(&16u32.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let e = peft::io::gguf::GgufFile::open(&path)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("16")
            && e.contains("Q4_1")
            && e.contains("Q6_K")
            && e.contains("llama-quantize"),
        "{e}"
    );
}

/// PEFT's `prepare_model_for_kbit_training`: everything frozen, float parameters that are not
/// quantized back in f32 (tied weights still shared), quantized weights untouched; LoRA then
/// trains on top.
#[test]
fn prepare_model_for_kbit_training_freezes_and_casts_the_unquantized_parameters() {
    let t = tiny(true);
    let mut m = load(&t.path, false);
    let mut trained = None;
    // Stored in bf16 (tied tensors cast once, so they stay shared), one norm trained in place.
    let mut cast = std::collections::HashMap::new();
    for module in m.modules_mut() {
        for p in module.params_mut() {
            if p.quant().is_none() {
                let bf = cast
                    .entry(p.base().id())
                    .or_insert_with(|| p.base().to_dtype(DType::BF16).unwrap())
                    .clone();
                p.set_base(bf).unwrap();
                if trained.is_none() && p.name.ends_with("norm.weight") {
                    p.train_in_place().unwrap();
                    trained = Some(p.name.clone());
                }
            }
        }
    }
    let report = peft::prepare_model_for_kbit_training(m.as_mut()).unwrap();
    assert_eq!(report.quantized, 14);
    assert_eq!(report.frozen, vec![trained.clone().unwrap()]);
    // Two norms per layer, the final norm, the embedding and the tied head reading it.
    assert_eq!(
        report.cast_to_f32.len(),
        2 * 2 + 1 + 2,
        "{:?}",
        report.cast_to_f32
    );
    let tensor_of = |name: &str| {
        m.modules()
            .into_iter()
            .flat_map(|module| {
                module
                    .params()
                    .into_iter()
                    .map(|p| (p.name.clone(), p.base().id()))
                    .collect::<Vec<_>>()
            })
            .find(|(n, _)| n == name)
            .unwrap()
            .1
    };
    assert_eq!(
        tensor_of("model.embed_tokens.weight"),
        tensor_of("lm_head.weight"),
        "the tied head still reads the embedding's tensor"
    );
    for module in m.modules() {
        for p in module.params() {
            assert!(!p.is_trainable(), "{} still trains", p.name);
            if p.quant().is_none() {
                assert_eq!(p.base().dtype(), DType::F32, "{}", p.name);
            }
        }
    }
    assert_eq!(ggml_linears(m.as_ref()).len(), 14);
    let pm = get_peft_model(
        m,
        cfg(
            serde_json::json!({"peft_type": "LORA", "r": 4, "init_lora_weights": false,
            "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}),
        ),
        "default",
    )
    .unwrap();
    let y = pm.forward(&inputs(), true).unwrap();
    assert_eq!(y.dtype(), DType::F32);
    let grads = y.sqr().unwrap().mean_all().unwrap().backward().unwrap();
    for (n, v) in pm.trainable_parameters() {
        assert!(grads.get(v.as_tensor()).is_some(), "no gradient for {n}");
    }
}
