//! llama.cpp GGUF LoRA adapters, against llama.cpp's own convert_lora_to_gguf.py, the `gguf`
//! Python package and PEFT 0.21. Fixtures: tools/fixtures/make_gguf_lora_fixtures.py (PEFT
//! adapters on a tiny random Llama with 4 query / 2 KV heads, the converter's GGUF files for them,
//! what the gguf package reads from those, and PEFT's logits).

mod common;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use common::{assert_close, load_st};
use peft::io::gguf_write::{write_gguf, GgufTensor};
use peft::models::{self, LoadOptions};
use peft::peft_model::load_with_adapter;
use peft::tuners::lora::gguf::{export_gguf, peft_to_gguf, read_gguf_lora, GgufOutType};
use peft::{Inputs, PeftModel, TaskType};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf_lora")
}

fn base_config() -> serde_json::Value {
    peft::io::read_json(&dir().join("base/config.json")).unwrap()
}

fn inputs() -> Inputs {
    let t = load_st(&dir().join("inputs.safetensors"));
    Inputs::new(t["input_ids"].to_dtype(DType::U32).unwrap())
}

fn opts() -> LoadOptions {
    LoadOptions {
        task: Some(TaskType::CausalLm),
        ..Default::default()
    }
}

/// A GGUF file as candle reads it: metadata, and tensors in file order (by data offset) with
/// their ggml type and values in f32.
struct Read {
    meta: HashMap<String, Value>,
    tensors: Vec<(String, String, Vec<usize>, Tensor)>,
}

fn read(path: &Path) -> Read {
    let bytes = std::fs::read(path).unwrap();
    let mut cur = std::io::Cursor::new(&bytes);
    let c = Content::read(&mut cur).unwrap();
    let mut infos: Vec<_> = c.tensor_infos.iter().collect();
    infos.sort_by_key(|(_, i)| i.offset);
    let tensors = infos
        .into_iter()
        .map(|(name, info)| {
            let q = c.tensor(&mut cur, name, &Device::Cpu).unwrap();
            (
                name.clone(),
                format!("{:?}", info.ggml_dtype),
                info.shape.dims().to_vec(),
                q.dequantize(&Device::Cpu).unwrap(),
            )
        })
        .collect();
    Read {
        meta: c.metadata,
        tensors,
    }
}

fn meta_json(v: &Value) -> serde_json::Value {
    match v {
        Value::String(s) => s.clone().into(),
        Value::F32(x) => (*x as f64).into(),
        Value::U32(x) => (*x).into(),
        other => panic!("unexpected metadata type {other:?}"),
    }
}

fn export(adapter: &str, out_type: GgufOutType) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("out.gguf");
    export_gguf(&dir().join(adapter), &base_config(), out_type, &path).unwrap();
    (tmp, path)
}

const CASES: &[(&str, &str, GgufOutType)] = &[
    ("lora_all.gguf", "lora_all", GgufOutType::F32),
    ("lora_qv.gguf", "lora_qv", GgufOutType::F32),
    ("lora_qv.f16.gguf", "lora_qv", GgufOutType::F16),
    ("lora_qv.bf16.gguf", "lora_qv", GgufOutType::Bf16),
];

#[test]
fn export_equals_llama_cpp_converter_tensor_for_tensor() {
    for (file, adapter, ty) in CASES {
        let want = read(&dir().join(file));
        let (_tmp, path) = export(adapter, *ty);
        let got = read(&path);
        let names = |r: &Read| r.tensors.iter().map(|t| t.0.clone()).collect::<Vec<_>>();
        assert_eq!(names(&got), names(&want), "{file}: tensor names and order");
        for (g, w) in got.tensors.iter().zip(&want.tensors) {
            assert_eq!(g.1, w.1, "{file} {}: ggml type", g.0);
            assert_eq!(g.2, w.2, "{file} {}: shape", g.0);
            // Bit-exact: the same f32 values, the same f16/bf16 rounding.
            let (gv, wv) = (g.3.flatten_all().unwrap(), w.3.flatten_all().unwrap());
            assert_eq!(
                gv.to_vec1::<f32>().unwrap(),
                wv.to_vec1::<f32>().unwrap(),
                "{file} {}: values",
                g.0
            );
        }
        for key in [
            "general.architecture",
            "general.type",
            "adapter.type",
            "adapter.lora.alpha",
            "general.quantization_version",
        ] {
            assert_eq!(
                meta_json(&got.meta[key]),
                meta_json(&want.meta[key]),
                "{file}: {key}"
            );
        }
    }
}

/// Names, ggml shapes (ne), types and alpha of our files equal what the gguf package read from
/// the converter's files (expected.json, recorded by the fixture script).
#[test]
fn export_matches_what_the_gguf_package_read_from_the_converter() {
    let expected = peft::io::read_json(&dir().join("expected.json")).unwrap();
    for (file, adapter, ty) in CASES {
        let want = &expected[*file];
        let (_tmp, path) = export(adapter, *ty);
        let got = read(&path);
        let rows: Vec<serde_json::Value> = got
            .tensors
            .iter()
            .map(|(name, ty, dims, _)| {
                let ne: Vec<usize> = dims.iter().rev().copied().collect();
                serde_json::json!({"name": name, "ne": ne, "type": ty.to_uppercase()})
            })
            .collect();
        assert_eq!(serde_json::Value::from(rows), want["tensors"], "{file}");
        for (key, v) in want["metadata"].as_object().unwrap() {
            assert_eq!(&meta_json(&got.meta[key]), v, "{file}: {key}");
        }
    }
}

/// The converter's GGUF files load here as LoRA adapters and give PEFT's logits.
#[test]
fn converter_gguf_loads_and_gives_peft_logits() {
    let logits = load_st(&dir().join("logits.safetensors"));
    for (file, adapter) in [("lora_all.gguf", "lora_all"), ("lora_qv.gguf", "lora_qv")] {
        let m = load_with_adapter(&dir().join("base"), &dir().join(file), opts()).unwrap();
        let got = m.forward(&inputs(), false).unwrap();
        assert_close(file, &got, &logits[adapter], 1e-4);
        // The same adapter read from PEFT's files gives the same.
        let p = load_with_adapter(&dir().join("base"), &dir().join(adapter), opts()).unwrap();
        assert_close(
            adapter,
            &p.forward(&inputs(), false).unwrap(),
            &logits[adapter],
            1e-4,
        );
    }
}

/// Merged into the base, the GGUF adapter still gives PEFT's logits.
#[test]
fn gguf_adapter_merges() {
    let logits = load_st(&dir().join("logits.safetensors"));
    let base = models::load(&dir().join("base"), &opts()).unwrap();
    let m =
        PeftModel::from_pretrained(base, &dir().join("lora_all.gguf"), Default::default()).unwrap();
    let merged = m.merge_and_unload().unwrap();
    let got = merged.forward(&inputs(), false).unwrap();
    assert_close("merged", &got, &logits["lora_all"], 1e-4);
}

/// PEFT → GGUF → PEFT gives back PEFT's tensors bit for bit, and a config with the same rank,
/// alpha and targets (a layer subset keeps its layers).
#[test]
fn round_trip_peft_gguf_peft_is_exact() {
    for adapter in ["lora_all", "lora_qv"] {
        let (tmp, path) = export(adapter, GgufOutType::F32);
        let back = read_gguf_lora(&path, &base_config(), &Device::Cpu).unwrap();
        let original = load_st(&dir().join(adapter).join("adapter_model.safetensors"));
        let lora: HashMap<&String, &Tensor> = original
            .iter()
            .filter(|(k, _)| !k.ends_with(".base_layer.weight"))
            .collect();
        assert_eq!(back.tensors.len(), lora.len(), "{adapter}: tensor count");
        for (k, t) in lora {
            let b = back
                .tensors
                .get(k)
                .unwrap_or_else(|| panic!("{adapter}: no {k}"));
            assert_eq!(b.dims(), t.dims(), "{k}");
            assert_eq!(
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{k}"
            );
        }
        // Saved in PEFT's layout, it loads and gives PEFT's logits again.
        let out = tmp.path().join("peft");
        back.save_pretrained(&out).unwrap();
        let cfg = peft::io::read_json(&out.join("adapter_config.json")).unwrap();
        let orig = peft::io::read_json(&dir().join(adapter).join("adapter_config.json")).unwrap();
        assert_eq!(cfg["r"], orig["r"], "{adapter}: r");
        assert_eq!(
            cfg["lora_alpha"].as_f64(),
            orig["lora_alpha"].as_f64(),
            "{adapter}: alpha"
        );
        let m = load_with_adapter(&dir().join("base"), &out, opts()).unwrap();
        let logits = load_st(&dir().join("logits.safetensors"));
        assert_close(
            adapter,
            &m.forward(&inputs(), false).unwrap(),
            &logits[adapter],
            1e-4,
        );
    }
}

fn err_text<T>(r: peft::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn export_refuses_a_base_that_is_not_llama() {
    let mut cfg = base_config();
    cfg["model_type"] = "gpt2".into();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.gguf");
    let e = err_text(export_gguf(
        &dir().join("lora_qv"),
        &cfg,
        GgufOutType::F32,
        &out,
    ));
    assert!(e.contains("llama-family") && e.contains("gpt2"), "{e}");
    assert!(!out.exists(), "nothing written on error");
}

#[test]
fn export_refuses_a_module_llama_cpp_cannot_name() {
    let config = peft::io::read_json(&dir().join("lora_qv/adapter_config.json")).unwrap();
    let r = Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap();
    let mut t = HashMap::new();
    t.insert(
        "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight".to_string(),
        r.clone(),
    );
    t.insert(
        "base_model.model.model.layers.0.self_attn.rotary.lora_B.weight".to_string(),
        r.t().unwrap(),
    );
    let e = err_text(peft_to_gguf(&config, &t, &base_config(), GgufOutType::F32));
    assert!(
        e.contains("self_attn.rotary") && e.contains("llama.cpp"),
        "{e}"
    );
    let mut dora = config.clone();
    dora["use_dora"] = true.into();
    let e = err_text(peft_to_gguf(
        &dora,
        &HashMap::new(),
        &base_config(),
        GgufOutType::F32,
    ));
    assert!(e.contains("DoRA"), "{e}");
}

#[test]
fn a_gguf_that_is_not_an_adapter_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.gguf");
    let meta = vec![(
        "general.architecture".to_string(),
        Value::String("llama".into()),
    )];
    let tensors = [GgufTensor {
        name: "token_embd.weight".into(),
        dtype: candle_core::quantized::GgmlDType::F32,
        tensor: Tensor::zeros((32, 32), DType::F32, &Device::Cpu).unwrap(),
    }];
    write_gguf(&path, &meta, &tensors).unwrap();
    let e = err_text(load_with_adapter(&dir().join("base"), &path, opts()));
    assert!(e.contains("not a GGUF adapter"), "{e}");
}
