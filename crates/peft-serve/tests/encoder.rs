//! `peft serve` with an encoder (all-MiniLM-L6-v2 from the assets) and task adapters made from
//! fixed seeds: `/v1/embeddings` equals the library's forward pass pooled as sentence-transformers
//! pools it (mean over real tokens, then L2-normalised, as MiniLM's modules.json says), through
//! the adapter the request names; `/predict` gives the SEQ_CLS adapter's class probabilities and
//! the TOKEN_CLS adapter's per-token labels, as the library's forward does.

mod common;

use common::*;
use peft::io::tokenizer::Tokenizer;
use peft::tuners::lora::InitLoraWeights;
use peft::tuners::targets::ModuleSpec;
use peft::{
    get_peft_model_with_seed, load_with_adapter, Inputs, LoadOptions, LoraConfig, PeftConfig,
    TaskType,
};
use peft_serve::{Handle, ServeConfig};
use serde_json::json;
use std::path::Path;

fn make_adapter(dir: &Path, seed: u64, task: TaskType, labels: Option<usize>) {
    let model = peft::models::load(
        &minilm(),
        &LoadOptions {
            task: Some(task),
            num_labels: labels,
            seed,
            ..Default::default()
        },
    )
    .unwrap();
    let config = LoraConfig {
        r: 4,
        lora_alpha: 16.0,
        target_modules: Some(ModuleSpec::List(vec!["query".into(), "value".into()])),
        init_lora_weights: InitLoraWeights::Bool(false),
        ..Default::default()
    };
    let mut config = PeftConfig::new(config);
    config.set_task_type(task);
    get_peft_model_with_seed(model, config, "default", seed)
        .unwrap()
        .save_pretrained(dir)
        .unwrap();
}

/// The library's forward pass of one text through an adapter (or none), `[seq, out]`.
fn forward(adapter: Option<&Path>, task: TaskType, text: &str) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut tok = Tokenizer::for_model(&minilm()).unwrap();
    let ids = tok.encode_text(text, true).unwrap();
    let opts = LoadOptions {
        task: Some(task),
        ..Default::default()
    };
    let inputs = Inputs::new(
        candle_core::Tensor::new(ids.as_slice(), &candle_core::Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
    );
    let out = match adapter {
        Some(dir) => {
            let m = load_with_adapter(&minilm(), dir, opts).unwrap();
            peft::no_grad(|| m.forward(&inputs, false)).unwrap()
        }
        None => peft::models::load(&minilm(), &opts)
            .unwrap()
            .forward(&inputs, false)
            .unwrap(),
    };
    let out = out.squeeze(0).unwrap();
    let rows = if out.rank() == 1 {
        vec![out.to_vec1().unwrap()]
    } else {
        out.to_vec2().unwrap()
    };
    (ids, rows)
}

/// sentence-transformers' mean pooling and L2 normalisation, by hand.
fn mean_normalized(rows: &[Vec<f32>]) -> Vec<f32> {
    let d = rows[0].len();
    let mut m = vec![0f32; d];
    for r in rows {
        for (a, b) in m.iter_mut().zip(r) {
            *a += b / rows.len() as f32;
        }
    }
    let norm = m.iter().map(|x| x * x).sum::<f32>().sqrt();
    m.iter().map(|x| x / norm).collect()
}

fn softmax(v: &[f32]) -> Vec<f32> {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = v.iter().map(|x| (x - max).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

fn close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-4, "{x} vs {y}");
    }
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn embeddings_and_predict_equal_the_library_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let fe = tmp.path().join("fe");
    let cls = tmp.path().join("cls");
    let tok = tmp.path().join("tok");
    make_adapter(&fe, 1, TaskType::FeatureExtraction, None);
    make_adapter(&cls, 2, TaskType::SeqCls, Some(3));
    make_adapter(&tok, 3, TaskType::TokenCls, Some(4));
    let mut cfg = ServeConfig::new(minilm());
    cfg.port = 0;
    cfg.served_model_name = Some("minilm".into());
    cfg.adapters = vec![
        ("fe".into(), fe.clone()),
        ("cls".into(), cls.clone()),
        ("tok".into(), tok.clone()),
    ];
    let server = Handle::start(cfg).unwrap();
    let addr = server.addr;
    let texts = [
        "A fine film.",
        "the plot made no sense at all, and it went on for hours",
    ];

    for (model, dir) in [("minilm", None), ("fe", Some(fe.as_path()))] {
        let r = post(
            addr,
            "/v1/embeddings",
            &json!({"model": model, "input": texts}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(v["object"], "list");
        for (i, t) in texts.iter().enumerate() {
            let (_, hidden) = forward(dir, TaskType::FeatureExtraction, t);
            let want = mean_normalized(&hidden);
            close(&floats(&v["data"][i]["embedding"]), &want);
        }
    }
    // The adapter changes the embedding.
    let a = post(
        addr,
        "/v1/embeddings",
        &json!({"model": "fe", "input": texts[0]}),
    )
    .json();
    let b = post(
        addr,
        "/v1/embeddings",
        &json!({"model": "minilm", "input": texts[0]}),
    )
    .json();
    assert_ne!(a["data"][0]["embedding"], b["data"][0]["embedding"]);

    // SEQ_CLS: probabilities per label, best first.
    let r = post(
        addr,
        "/predict",
        &json!({"model": "cls", "inputs": texts[1]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let (_, logits) = forward(Some(&cls), TaskType::SeqCls, texts[1]);
    let want = softmax(&logits[0]);
    let got = r.json();
    let got = got.as_array().unwrap();
    assert_eq!(got.len(), 3);
    for entry in got {
        let label = entry["label"].as_str().unwrap();
        let i: usize = label.trim_start_matches("LABEL_").parse().unwrap();
        assert!((entry["score"].as_f64().unwrap() as f32 - want[i]).abs() < 1e-4);
    }
    assert!(got[0]["score"].as_f64() >= got[1]["score"].as_f64());

    // TOKEN_CLS: a label per token.
    let r = post(
        addr,
        "/predict",
        &json!({"model": "tok", "inputs": [texts[0]], "raw_scores": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let (ids, logits) = forward(Some(&tok), TaskType::TokenCls, texts[0]);
    let got = r.json();
    let tokens = got[0].as_array().unwrap();
    assert_eq!(tokens.len(), ids.len());
    for ((t, id), want) in tokens.iter().zip(&ids).zip(&logits) {
        assert_eq!(t["token_id"], *id);
        close(&floats(&t["scores"]), want);
        let best = peft::generation::logits::argmax(want);
        assert_eq!(t["label"], format!("LABEL_{best}"));
    }

    // Heads and routes that do not fit say so.
    let r = post(addr, "/predict", &json!({"model": "fe", "inputs": "x"}));
    assert_eq!(r.status, 400);
    let r = post(
        addr,
        "/v1/embeddings",
        &json!({"model": "cls", "input": "x"}),
    );
    assert_eq!(r.status, 400);
    let r = post(
        addr,
        "/v1/completions",
        &json!({"model": "minilm", "prompt": "x"}),
    );
    assert_eq!(r.status, 400);
    let r = post(
        addr,
        "/v1/embeddings",
        &json!({"model": "nope", "input": "x"}),
    );
    assert_eq!(r.status, 404);
    let m = get(addr, "/metrics").body;
    assert!(
        metric(
            &m,
            "peft_requests_total",
            &[("endpoint", "embeddings"), ("status", "ok")]
        )
        .unwrap()
            >= 4.0
    );
}
