//! Continuous batching (`generation::batch`) on the tiny Llama of make_generation_fixtures.py with
//! LoRA adapters made from fixed seeds (one of them DoRA, which cannot share a batch): requests
//! that arrive at different steps, through different adapters, prefilled in small chunks, give
//! exactly the greedy tokens of `generate` with that adapter alone; a seeded sampled request draws
//! the same tokens alone or in a crowd; cancelled requests free their slot at once; the batch
//! never holds more than `max_batch_size` requests.

use peft::generation::batch::{Event, Request, Scheduler, SchedulerConfig};
use peft::generation::{generate, FinishReason, GenerationConfig, SamplingConfig};
use peft::layers::mixed::BASE;
use peft::models::{self, LoadOptions, Model};
use peft::tuners::lora::InitLoraWeights;
use peft::tuners::targets::ModuleSpec;
use peft::{get_peft_model_with_seed, LoraConfig, PeftModel};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/generation/tiny_llama")
}

fn load() -> Box<dyn Model> {
    models::load(&dir(), &LoadOptions::default()).unwrap()
}

fn lora(targets: &[&str], dora: bool) -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 16.0,
        target_modules: Some(ModuleSpec::List(
            targets.iter().map(|s| s.to_string()).collect(),
        )),
        init_lora_weights: InitLoraWeights::Bool(false),
        use_dora: dora,
        ..Default::default()
    }
}

/// The model with adapters `a`, `b` (LoRA) and `c` (DoRA), each saved and loaded back, and a
/// model per adapter alone for the reference.
fn models(tmp: &Path) -> (PeftModel, HashMap<&'static str, PeftModel>) {
    let specs: [(&str, u64, &[&str], bool); 3] = [
        ("a", 1, &["q_proj", "v_proj"], false),
        ("b", 2, &["k_proj", "down_proj"], false),
        ("c", 3, &["q_proj", "up_proj"], true),
    ];
    let mut all = PeftModel::without_adapters(load());
    let mut alone = HashMap::new();
    for (name, seed, targets, dora) in specs {
        let d = tmp.join(name);
        get_peft_model_with_seed(load(), lora(targets, dora), "default", seed)
            .unwrap()
            .save_pretrained(&d)
            .unwrap();
        all.load_adapter(&d, name, false).unwrap();
        let mut one = PeftModel::without_adapters(load());
        one.load_adapter(&d, name, false).unwrap();
        alone.insert(name, one);
    }
    (all, alone)
}

fn request(prompt: &[u32], adapter: &str, n: usize) -> Request {
    Request {
        prompt: prompt.to_vec(),
        adapter: adapter.to_string(),
        max_new_tokens: n,
        sampling: SamplingConfig::default(),
        seed: 0,
        eos_token_ids: Vec::new(),
        logprobs: None,
    }
}

/// Runs the scheduler to the end, submitting `late` requests after `after` steps; returns each
/// request's tokens and finish reason.
fn drive(
    model: &mut PeftModel,
    cfg: SchedulerConfig,
    early: Vec<Request>,
    late: Vec<Request>,
    after: usize,
) -> Vec<(Vec<u32>, Option<FinishReason>)> {
    let dims = peft::generation::batch::BatchModel::dims(&*model);
    let max = cfg.max_batch_size;
    let mut s = Scheduler::new(dims, cfg).unwrap();
    let mut ids = Vec::new();
    for r in early {
        ids.push(s.submit(r).unwrap());
    }
    let mut out: HashMap<u64, (Vec<u32>, Option<FinishReason>)> = HashMap::new();
    let mut late = Some(late);
    let mut step = 0;
    while !s.is_idle() || late.is_some() {
        if step == after {
            for r in late.take().unwrap_or_default() {
                ids.push(s.submit(r).unwrap());
            }
        }
        for ev in s.step(model) {
            match ev {
                Event::Token { id, token, .. } => out.entry(id).or_default().0.push(token),
                Event::Finished { id, reason } => out.entry(id).or_default().1 = Some(reason),
                Event::Failed { message, .. } => panic!("{message}"),
            }
        }
        assert!(s.running() <= max);
        step += 1;
        assert!(step < 10_000);
    }
    ids.iter()
        .map(|id| out.remove(id).unwrap_or_default())
        .collect()
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![307, 223, 304, 291, 223, 284, 300, 80],
        vec![264, 223, 310, 294],
        vec![297, 285, 85, 315, 316, 317],
        vec![
            5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
        ],
    ]
}

#[test]
fn interleaved_requests_equal_generate_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut all, alone) = models(tmp.path());
    let base = load();
    let n = 12;
    let names = [BASE, "a", "b", "c"];
    let mut early = Vec::new();
    let mut late = Vec::new();
    let mut want = Vec::new();
    for (i, p) in prompts().iter().enumerate() {
        for (j, name) in names.iter().enumerate() {
            let cfg = GenerationConfig {
                max_new_tokens: n,
                ..Default::default()
            };
            let w = match *name {
                BASE => generate(base.as_ref(), std::slice::from_ref(p), &cfg, None),
                other => generate(&alone[other], std::slice::from_ref(p), &cfg, None),
            }
            .unwrap();
            let r = request(p, name, n);
            if (i + j) % 2 == 0 {
                early.push(r);
            } else {
                late.push(r);
            }
            want.push(w);
        }
    }
    // Early requests first, late ones after 3 steps: rows join batches already decoding.
    let mut order = Vec::new();
    let (mut e, mut l) = (0, 0);
    for (i, _) in prompts().iter().enumerate() {
        for (j, _) in names.iter().enumerate() {
            if (i + j) % 2 == 0 {
                order.push((true, e));
                e += 1;
            } else {
                order.push((false, l));
                l += 1;
            }
        }
    }
    let cfg = SchedulerConfig {
        max_batch_size: 5,
        prefill_chunk: 3,
    };
    let got = drive(&mut all, cfg, early, late, 3);
    let (got_early, got_late) = got.split_at(e);
    for (k, (is_early, idx)) in order.into_iter().enumerate() {
        let g = if is_early {
            &got_early[idx]
        } else {
            &got_late[idx]
        };
        let w = &want[k];
        assert_eq!(g.0, w.tokens[0], "request {k}");
        assert_eq!(g.1, Some(w.finish[0]), "request {k}");
    }
}

#[test]
fn sampling_is_per_request_and_cancel_frees_the_slot() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut all, _) = models(tmp.path());
    let sampled = Request {
        sampling: SamplingConfig {
            do_sample: true,
            temperature: 1.3,
            top_k: 40,
            top_p: 0.95,
            repetition_penalty: 1.1,
        },
        seed: 99,
        eos_token_ids: vec![u32::MAX],
        ..request(&prompts()[0], "a", 16)
    };
    let cfg = SchedulerConfig {
        max_batch_size: 8,
        prefill_chunk: 4,
    };
    let alone = drive(&mut all, cfg.clone(), vec![sampled.clone()], vec![], 0);
    let crowd: Vec<Request> = prompts()
        .iter()
        .zip(["b", "c", BASE, "a"])
        .map(|(p, n)| request(p, n, 16))
        .collect();
    let together = drive(&mut all, cfg.clone(), crowd, vec![sampled], 2);
    assert_eq!(alone[0].0, together.last().unwrap().0);
    assert_eq!(alone[0].0.len(), 16);

    // Cancelling frees the slot at once, wherever the request is.
    let dims = peft::generation::batch::BatchModel::dims(&all);
    let mut s = Scheduler::new(
        dims,
        SchedulerConfig {
            max_batch_size: 2,
            prefill_chunk: 64,
        },
    )
    .unwrap();
    let ids: Vec<u64> = prompts()
        .iter()
        .map(|p| s.submit(request(p, "a", 30)).unwrap())
        .collect();
    s.step(&mut all);
    assert_eq!((s.running(), s.waiting()), (2, 2));
    assert!(s.cancel(ids[0]));
    assert!(s.cancel(ids[3]));
    assert_eq!((s.running(), s.waiting()), (1, 1));
    s.step(&mut all);
    assert_eq!((s.running(), s.waiting()), (2, 0));
    assert!(!s.cancel(ids[0]));
    assert_eq!(s.adapters_in_use().into_iter().collect::<Vec<_>>(), ["a"]);

    // Errors a caller can fix come back at submit.
    assert!(s.submit(request(&[], "a", 3)).is_err());
    assert!(s.submit(request(&vec![5; 64], "a", 3)).is_err());
    assert!(s.submit(request(&[400], "a", 3)).is_err());
    // An unknown adapter fails the request, not the batch.
    assert!(s.cancel(ids[1]));
    let bad = s.submit(request(&[5, 6], "nope", 3)).unwrap();
    let events = s.step(&mut all);
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Failed { id, .. } if *id == bad)));
    assert_eq!(s.running(), 1);
    assert!(s
        .step(&mut all)
        .iter()
        .any(|e| matches!(e, Event::Token { id, .. } if *id == ids[2])));
}

/// The batched low-rank path of mixed batches pads every adapter's rank to the largest with
/// zeros: adapters of ranks 2 and 8 on the same layers (and one on a layer the others lack), with
/// a bare row among them, give each row the logits of its adapter run alone.
#[test]
fn mixed_ranks_in_one_batch_equal_each_adapter_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let specs: [(&str, u64, usize, &[&str]); 3] = [
        ("r2", 4, 2, &["q_proj", "v_proj"]),
        ("r8", 5, 8, &["q_proj", "v_proj", "o_proj"]),
        ("k", 6, 3, &["k_proj"]),
    ];
    let mut pm = PeftModel::without_adapters(load());
    for (name, seed, r, targets) in specs {
        let d = tmp.path().join(name);
        let cfg = LoraConfig {
            r,
            ..lora(targets, false)
        };
        get_peft_model_with_seed(load(), cfg, "default", seed)
            .unwrap()
            .save_pretrained(&d)
            .unwrap();
        pm.load_adapter(&d, name, false).unwrap();
    }
    let names: Vec<String> = ["r8", BASE, "r2", "k", "r8"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let ids: Vec<u32> = (0..names.len() * 6)
        .map(|i| (i as u32 * 7 + 3) % 60)
        .collect();
    let inputs = peft::Inputs {
        input_ids: Some(
            candle_core::Tensor::from_vec(ids, (names.len(), 6), &candle_core::Device::Cpu)
                .unwrap(),
        ),
        ..Default::default()
    };
    let mixed = pm.forward_mixed(&inputs, &names).unwrap();
    for (i, name) in names.iter().enumerate() {
        let alone = if name == BASE {
            let d = pm.disable_adapter().unwrap();
            d.forward(&inputs, false).unwrap()
        } else {
            pm.set_adapter(name).unwrap();
            pm.forward(&inputs, false).unwrap()
        };
        let (g, a) = (mixed.get(i).unwrap(), alone.get(i).unwrap());
        let diff = (g - &a)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "row {i} ({name}): max difference {diff}");
    }
}
