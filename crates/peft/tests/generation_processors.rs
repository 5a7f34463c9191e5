//! Logits processors against transformers' own (`RepetitionPenaltyLogitsProcessor`,
//! `TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`) on fixed scores, from
//! tools/fixtures/make_generation_fixtures.py; and the sampler's reproducibility.

use candle_core::{DType, Device};
use peft::generation::logits::{self, SamplingConfig};
use rand::SeedableRng;
use std::path::Path;

fn fixture() -> std::collections::HashMap<String, candle_core::Tensor> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/generation/processors.safetensors");
    peft::io::load_safetensors(&p, &Device::Cpu).unwrap()
}

fn rows(t: &candle_core::Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
}

fn assert_rows(what: &str, got: &[Vec<f32>], want: &[Vec<f32>]) {
    for (r, (g, w)) in got.iter().zip(want).enumerate() {
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            let same = (a.is_infinite() && a == b) || (a - b).abs() <= 1e-5;
            assert!(same, "{what}: row {r} token {i}: got {a}, transformers {b}");
        }
    }
    // The fixture must exercise filtering: some scores removed, some kept.
    if what.starts_with("top") || what == "chain" {
        assert!(want.iter().flatten().any(|x| x.is_infinite()));
        assert!(want.iter().flatten().any(|x| x.is_finite()));
    }
}

#[test]
fn processors_match_transformers_on_fixed_scores() {
    let f = fixture();
    let scores = rows(&f["scores"]);
    let ids: Vec<Vec<u32>> = f["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let apply = |op: &dyn Fn(&mut Vec<f32>, &[u32])| -> Vec<Vec<f32>> {
        scores
            .iter()
            .zip(&ids)
            .map(|(s, seen)| {
                let mut s = s.clone();
                op(&mut s, seen);
                s
            })
            .collect()
    };
    let cases: Vec<(&str, Vec<Vec<f32>>)> = vec![
        (
            "repetition_penalty",
            apply(&|s, seen| logits::repetition_penalty(s, seen, 1.3)),
        ),
        ("temperature", apply(&|s, _| logits::temperature(s, 0.7))),
        ("top_k", apply(&|s, _| logits::top_k(s, 5, 1))),
        ("top_p", apply(&|s, _| logits::top_p(s, 0.8, 1))),
        (
            "chain",
            apply(&|s, seen| {
                let cfg = SamplingConfig {
                    do_sample: true,
                    temperature: 0.8,
                    top_k: 10,
                    top_p: 0.9,
                    repetition_penalty: 1.2,
                };
                logits::process(s, seen, &cfg)
            }),
        ),
    ];
    for (name, got) in cases {
        assert_rows(name, &got, &rows(&f[name]));
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_follows_the_distribution() {
    let scores = vec![0.0f32, 1.0, 2.0, f32::NEG_INFINITY];
    let draw = |seed: u64, n: usize| -> Vec<u32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| logits::choose(&scores, true, &mut rng))
            .collect()
    };
    assert_eq!(draw(7, 200), draw(7, 200));
    assert_ne!(draw(7, 200), draw(8, 200));
    let n = 20000;
    let draws = draw(1, n);
    let probs = logits::softmax(&scores);
    for (t, p) in probs.iter().enumerate() {
        let freq = draws.iter().filter(|&&d| d == t as u32).count() as f32 / n as f32;
        assert!(
            (freq - p).abs() < 0.015,
            "token {t}: frequency {freq}, probability {p}"
        );
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    assert_eq!(logits::choose(&scores, false, &mut rng), 2);
}
