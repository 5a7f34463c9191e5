//! Train-mode DoRA with LoRA dropout against PEFT 0.21's own layers
//! (tools/fixtures/make_dora_dropout_fixtures.py).
//!
//! With dropout active, PEFT's DoRA recomputes the base output from the dropped input `x_d`:
//! `out = base(x) + (s - 1)·x_d Wᵀ + s·scaling·B A x_d`, `s = m / ‖W + scaling·B A‖`. Torch's masks
//! cannot be reproduced here, but the output and the gradients of `sum(out · G)` are affine in
//! `x_d`, and the fixture holds PEFT's map (its value at `x_d = 0` and its coefficient for every
//! element of `x_d`). So the layer runs here with our own mask, the same mask is drawn again from
//! the same seed, and PEFT's answer for that mask is rebuilt from the map.
//!
//! PEFT never applies `lora_dropout` on an embedding (its forward does not call the module), so
//! embedding DoRA is checked to be deterministic in training and to match PEFT's train-mode
//! output and gradients directly.

mod common;

use candle_core::{DType, Tensor, Var};
use common::{assert_close, load_st, max_diff};
use peft::layers::{Adapter, Embedding, Linear};
use peft::ops;
use peft::tuners::lora::{DoraEmbedding, DoraLinear, LoraEmbedding, LoraLinear};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-5;
const SEEDS: [u64; 3] = [0, 17, 4242];

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dora_dropout")
}

fn fixture() -> (HashMap<String, Tensor>, Value) {
    let t = load_st(&dir().join("map.safetensors"));
    let meta = peft::io::read_json(&dir().join("meta.json")).unwrap();
    (t, meta)
}

fn var(t: &HashMap<String, Tensor>, key: &str) -> Var {
    Var::from_tensor(t.get(key).unwrap_or_else(|| panic!("fixture lacks {key}"))).unwrap()
}

/// A linear layer carrying PEFT's DoRA adapter, and its trainable `(name, var)` pairs.
fn dora_linear(
    t: &HashMap<String, Tensor>,
    meta: &Value,
    name: &str,
) -> (Linear, Vec<(String, Var)>) {
    let m = &meta[name];
    let layer_bias = t.get(&format!("{name}.bias")).cloned();
    assert_eq!(
        layer_bias.is_some(),
        m["bias"].as_bool().unwrap(),
        "{name}: bias"
    );
    let mut layer = Linear::new(
        name,
        t[&format!("{name}.weight")].clone(),
        layer_bias,
        m["fan_in_fan_out"].as_bool().unwrap(),
    );
    let lora = LoraLinear {
        a: var(t, &format!("{name}.lora_A")),
        b: var(t, &format!("{name}.lora_B")),
        scaling: m["scaling"].as_f64().unwrap(),
        dropout: m["lora_dropout"].as_f64().unwrap(),
    };
    let mut dora = DoraLinear::new(lora, &layer.base().unwrap()).unwrap();
    let magnitude = var(t, &format!("{name}.lora_magnitude_vector"));
    // The fixture moved m away from the weight norm, so `s - 1` is not zero.
    assert!(max_diff(dora.magnitude.as_tensor(), magnitude.as_tensor()) > 1e-2);
    dora.magnitude = magnitude;
    let vars = dora.tensors();
    layer.adapters.insert("default", Box::new(dora));
    (layer, vars)
}

/// PEFT's value for this `x_d`: `const + Σ_j x_d[j] · linear[j]`.
fn rebuild(t: &HashMap<String, Tensor>, key: &str, xd: &Tensor) -> Tensor {
    let c = &t[&format!("{key}.const")];
    let lin = &t[&format!("{key}.linear")];
    let n = xd.elem_count();
    assert_eq!(
        lin.dim(0).unwrap(),
        n,
        "{key}: one coefficient per element of x_d"
    );
    let lin = lin.reshape((n, c.elem_count())).unwrap();
    let sum = xd.reshape((1, n)).unwrap().matmul(&lin).unwrap();
    (c + sum.reshape(c.shape()).unwrap()).unwrap()
}

/// The PEFT suffix of an adapter tensor → the fixture's gradient key.
fn grad_key(suffix: &str) -> &'static str {
    match suffix {
        "lora_A.weight" => "grad.lora_A",
        "lora_B.weight" => "grad.lora_B",
        "lora_magnitude_vector" => "grad.lora_magnitude_vector",
        other => panic!("unexpected DoRA tensor {other}"),
    }
}

fn check_linear(name: &str) {
    let (t, meta) = fixture();
    let p = meta[name]["lora_dropout"].as_f64().unwrap();
    assert!(p > 0.0, "{name}: the fixture must use dropout");
    let (layer, vars) = dora_linear(&t, &meta, name);
    assert_eq!(vars.len(), 3);
    let x = &t[&format!("{name}.x")];
    let g = &t[&format!("{name}.grad_out")];
    let eval_out = layer.forward_t(x, false).unwrap();
    for seed in SEEDS {
        ops::seed_dropout(seed);
        let out = layer.forward_t(x, true).unwrap();
        // The layer's only random draw is its dropout mask (so the redraw below is the same).
        assert_eq!(ops::dropout_draws(), 1, "{name}: draws in forward");
        let grads = (&out * g).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            ops::dropout_draws(),
            1,
            "{name}: backward redraws from the kept seed"
        );

        ops::seed_dropout(seed);
        let xd = ops::dropout(x, p, true).unwrap();
        let dropped = (xd.eq(0f32).unwrap().to_dtype(DType::F32).unwrap())
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as usize;
        assert!(
            dropped > 0 && dropped < x.elem_count(),
            "{name} seed {seed}: {dropped} of {} dropped",
            x.elem_count()
        );
        assert!(
            max_diff(&out, &eval_out) > 1e-3,
            "{name} seed {seed}: dropout left the output unchanged"
        );

        let what = format!("{name} seed {seed}");
        assert_close(
            &format!("{what} out"),
            &out,
            &rebuild(&t, &format!("{name}.out"), &xd),
            TOL,
        );
        for (suffix, v) in &vars {
            let got = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{what}: no gradient for {suffix}"));
            assert!(
                got.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0,
                "{what}: zero gradient for {suffix}"
            );
            let want = rebuild(&t, &format!("{name}.{}", grad_key(suffix)), &xd);
            assert_close(&format!("{what} d/d {suffix}"), got, &want, TOL);
        }
    }
}

#[test]
fn dora_linear_with_bias_in_training_matches_peft_for_our_dropout_mask() {
    check_linear("linear_bias");
}

#[test]
fn dora_linear_without_bias_in_training_matches_peft_for_our_dropout_mask() {
    check_linear("linear_nobias");
}

#[test]
fn dora_conv1d_in_training_matches_peft_for_our_dropout_mask() {
    check_linear("conv1d");
}

/// The map itself, without our dropout: `x_d = x` is the eval-mode output, which the Rust layer
/// computes from the base output (bias removed) instead of recomputing it.
#[test]
fn the_recorded_map_at_x_d_equal_x_is_the_eval_output() {
    let (t, meta) = fixture();
    for name in ["linear_bias", "linear_nobias", "conv1d"] {
        let (layer, _) = dora_linear(&t, &meta, name);
        let x = &t[&format!("{name}.x")];
        let want = rebuild(&t, &format!("{name}.out"), x);
        assert_close(name, &layer.forward_t(x, false).unwrap(), &want, TOL);
    }
}

#[test]
fn dora_embedding_has_no_dropout_and_matches_peft_in_training() {
    let (t, meta) = fixture();
    let m = &meta["embedding"];
    assert!(m["lora_dropout"].as_f64().unwrap() > 0.0);
    let weight = t["embedding.weight"].clone();
    let mut layer = Embedding::new("embedding", weight.clone());
    let lora = LoraEmbedding {
        a: var(&t, "embedding.lora_embedding_A"),
        b: var(&t, "embedding.lora_embedding_B"),
        scaling: m["scaling"].as_f64().unwrap(),
    };
    let mut dora = DoraEmbedding::new(lora, &weight).unwrap();
    dora.magnitude = var(&t, "embedding.lora_magnitude_vector");
    let vars = dora.tensors();
    layer.adapters.insert("default", Box::new(dora));
    let ids = t["embedding.ids"].to_dtype(DType::U32).unwrap();

    ops::seed_dropout(1);
    let out = layer.forward_t(&ids, true).unwrap();
    assert_eq!(
        ops::dropout_draws(),
        0,
        "embedding DoRA drew a random number"
    );
    assert_close("embedding out", &out, &t["embedding.out"], TOL);
    let grads = (&out * &t["embedding.grad_out"])
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (suffix, v) in &vars {
        let got = grads.get(v.as_tensor()).unwrap();
        let key = format!("embedding.grad.{}", suffix.trim_end_matches(".weight"));
        let want = &t[&key];
        assert!(
            max_diff(want, &want.zeros_like().unwrap()) > 1e-3,
            "{key} is zero"
        );
        assert_close(&key, got, want, TOL);
    }
}
