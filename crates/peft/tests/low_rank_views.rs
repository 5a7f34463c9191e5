//! Adapters that are a plain low-rank update in disguise (VeRA: `λ_b ⊙ B · λ_d ⊙ A`; AdaLoRA:
//! `B · (A ⊙ E)` scaled by `s / (ranknum + 1e-5)`) run through the fused low-rank node on a
//! frozen dense layer. Their view (`LinearAdapter::low_rank`) must give the same output and the
//! same gradients for every trained tensor as the adapter's own forward, which follows PEFT's
//! composition step by step.

mod common;

use candle_core::{Device, Tensor, Var};
use common::max_diff;
use peft::layers::{LinearAdapter, LinearBase};
use peft::ops;
use peft::tuners::adalora::layer::AdaLoraLinear;
use peft::tuners::vera::VeraLinear;
use rand::SeedableRng;

fn data(shape: &[usize], seed: f32, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| scale * ((i as f32 * 0.618 + seed).sin() * 1.7 + (i as f32 * 0.1377).cos()) / 2.7)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `sum(y * r)` for a fixed `r`.
fn weighted_sum(y: &Tensor) -> Tensor {
    (y * data(y.dims(), 3.3, 1.0)).unwrap().sum_all().unwrap()
}

/// Runs `adapter` on a frozen `[out, in]` layer both ways, with dropout, and compares the
/// outputs and the gradients of `trained`.
fn check(what: &str, adapter: &dyn LinearAdapter, trained: &[(&str, &Var)], dims: (usize, usize)) {
    let (in_dim, out_dim) = dims;
    let w = data(&[out_dim, in_dim], 1.9, 0.3);
    let bias = data(&[out_dim], 0.4, 0.3);
    let x = Var::from_tensor(&data(&[2, 5, in_dim], 0.7, 1.0)).unwrap();
    let base = LinearBase::dense(w.clone(), Some(bias.clone()), false);
    ops::restore_dropout(11, 0);
    let x2 = x.as_tensor().reshape(((), in_dim)).unwrap();
    let plain = ops::frozen_linear_bias(&x2, &w, Some(&bias), false).unwrap();
    let composed = adapter
        .forward(&x2, plain, &base, true)
        .unwrap()
        .reshape((2, 5, out_dim))
        .unwrap();
    let g_composed = weighted_sum(&composed).backward().unwrap();
    ops::restore_dropout(11, 0);
    let view = adapter.low_rank().expect("a low-rank view");
    let fused = ops::frozen_linear_low_rank(
        x.as_tensor(),
        ops::BaseWeight::Dense {
            w: &w,
            transposed: false,
        },
        Some(&bias),
        (&view.a, &view.b, view.scaling),
        view.dropout,
        true,
    )
    .unwrap()
    .expect("f32 on the CPU");
    let g_fused = weighted_sum(&fused).backward().unwrap();
    let d = max_diff(&fused, &composed);
    assert!(d < 1e-5, "{what}: outputs differ by {d}");
    for (name, var) in trained.iter().copied().chain([("x", &x)]) {
        let (a, b) = (
            g_fused.get(var.as_tensor()).expect("a gradient"),
            g_composed.get(var.as_tensor()).expect("a gradient"),
        );
        let scale = b.abs().unwrap().max_keepdim(0).unwrap().max_all().unwrap();
        let scale: f32 = scale.to_scalar().unwrap();
        assert!(scale > 0.0, "{what}: d{name} is all zeros");
        let d = max_diff(a, b);
        assert!(d <= 1e-5 * scale.max(1.0), "{what}: d{name} differs by {d}");
    }
}

#[test]
fn vera_s_low_rank_view_gives_its_own_output_and_gradients() {
    let (in_dim, out_dim, r) = (24, 10, 6);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    // Shared projections wider than this layer: it reads their leading columns / rows.
    let shared = (
        Var::from_tensor(&data(&[r, in_dim + 8], 0.1, 0.5)).unwrap(),
        Var::from_tensor(&data(&[out_dim + 4, r], 0.2, 0.5)).unwrap(),
    );
    let mut vera = VeraLinear::new(
        in_dim,
        out_dim,
        r,
        shared,
        false,
        0.1,
        0.25,
        &mut rng,
        &Device::Cpu,
    )
    .unwrap();
    // Non-trivial scales on both sides.
    vera.lambda_b = Var::from_tensor(&data(&[out_dim], 0.5, 1.0)).unwrap();
    vera.lambda_d = Var::from_tensor(&data(&[r], 0.9, 1.0)).unwrap();
    let (lb, ld) = (vera.lambda_b.clone(), vera.lambda_d.clone());
    check(
        "vera",
        &vera,
        &[("lambda_b", &lb), ("lambda_d", &ld)],
        (in_dim, out_dim),
    );
}

#[test]
fn adalora_s_low_rank_view_gives_its_own_output_and_gradients() {
    let (in_dim, out_dim, r) = (24, 10, 6);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut layer =
        AdaLoraLinear::new(in_dim, out_dim, r, r, 8.0, false, &mut rng, &Device::Cpu).unwrap();
    layer.e = Var::from_tensor(&data(&[r, 1], 0.3, 1.0)).unwrap();
    layer.dropout = 0.25;
    let (a, e, b) = (layer.a.clone(), layer.e.clone(), layer.b.clone());
    check(
        "adalora",
        &layer,
        &[("A", &a), ("E", &e), ("B", &b)],
        (in_dim, out_dim),
    );
}
