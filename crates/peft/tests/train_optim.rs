//! AdamW and the learning-rate schedules against PyTorch's `torch.optim.AdamW` and
//! transformers' `get_scheduler` (tools/fixtures/make_train_fixtures.py).

use candle_core::{Device, Tensor, Var};
use peft::train::optim::{clip_scale, norm_of, AdamW, AdamWParams};
use peft::train::schedule::{Schedule, SchedulerType};
use serde_json::Value;

fn fixture() -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/train/optim_schedule.json");
    peft::io::read_json(&p).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol, "{what}[{i}]: {x} vs torch {y}");
    }
}

#[test]
fn adamw_matches_torch_step_by_step() {
    let f = fixture();
    for case in f["adamw"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let w0 = Tensor::from_vec(floats(&case["w0"]), (3, 4), &Device::Cpu).unwrap();
        let var = Var::from_tensor(&w0).unwrap();
        let mut opt = AdamW::new(
            vec![("layer.lora_A.weight".into(), var.clone())],
            AdamWParams {
                beta1: case["beta1"].as_f64().unwrap(),
                beta2: case["beta2"].as_f64().unwrap(),
                eps: case["eps"].as_f64().unwrap(),
                weight_decay: case["weight_decay"].as_f64().unwrap(),
            },
        )
        .unwrap();
        let grads = case["grads"].as_array().unwrap();
        let weights = case["weights"].as_array().unwrap();
        for (i, (g, w)) in grads.iter().zip(weights).enumerate() {
            let g = Tensor::from_vec(floats(g), (3, 4), &Device::Cpu).unwrap();
            let lr = match case["lrs"].as_array() {
                Some(lrs) => lrs[i].as_f64().unwrap(),
                None => case["lr"].as_f64().unwrap(),
            };
            let grads = vec![Some(g)];
            let scale = match case["max_grad_norm"].as_f64() {
                Some(m) => clip_scale(norm_of(&grads).unwrap(), m),
                None => 1.0,
            };
            opt.step_with(&grads, lr, scale).unwrap();
            let got: Vec<f32> = var.flatten_all().unwrap().to_vec1().unwrap();
            close(&got, &floats(w), 2e-6, &format!("{name} step {}", i + 1));
        }
        let state = opt.state_tensors().unwrap();
        let get = |k: &str| -> Vec<f32> {
            state
                .iter()
                .find(|(n, _)| n == k)
                .unwrap()
                .1
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        close(
            &get("layer.lora_A.weight.exp_avg"),
            &floats(&case["exp_avg"]),
            1e-6,
            name,
        );
        close(
            &get("layer.lora_A.weight.exp_avg_sq"),
            &floats(&case["exp_avg_sq"]),
            1e-6,
            name,
        );
    }
}

#[test]
fn optimizer_state_round_trips_through_a_file() {
    let f = fixture();
    let case = &f["adamw"][1];
    let w0 = Tensor::from_vec(floats(&case["w0"]), (3, 4), &Device::Cpu).unwrap();
    let params = AdamWParams {
        weight_decay: 0.01,
        ..Default::default()
    };
    let grads: Vec<Tensor> = case["grads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| Tensor::from_vec(floats(g), (3, 4), &Device::Cpu).unwrap())
        .collect();
    // Three steps, save, restore into a fresh optimizer, three more: same as six in one go.
    let a = Var::from_tensor(&w0).unwrap();
    let mut opt = AdamW::new(vec![("w".into(), a.clone())], params).unwrap();
    for g in &grads[..3] {
        opt.step_with(&[Some(g.clone())], 1e-2, 1.0).unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("optimizer.safetensors");
    peft::io::save_safetensors(&path, &opt.state_tensors().unwrap()).unwrap();
    let b = Var::from_tensor(&a.as_tensor().copy().unwrap()).unwrap();
    let mut resumed = AdamW::new(vec![("w".into(), b.clone())], params).unwrap();
    resumed.load_state(&path).unwrap();
    assert_eq!(resumed.steps_taken(), 3);
    for g in &grads[3..] {
        opt.step_with(&[Some(g.clone())], 1e-2, 1.0).unwrap();
        resumed.step_with(&[Some(g.clone())], 1e-2, 1.0).unwrap();
    }
    let x: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let y: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(x, y);
    close(&x, &floats(&case["weights"][5]), 2e-6, "six steps");
}

#[test]
fn schedules_match_transformers_per_step() {
    let f = fixture();
    for s in f["schedules"].as_array().unwrap() {
        let kind: SchedulerType = serde_json::from_value(s["kind"].clone()).unwrap();
        let kw = &s["kwargs"];
        let sched = Schedule {
            kind,
            base_lr: s["lr"].as_f64().unwrap(),
            warmup: s["warmup"].as_u64().unwrap() as usize,
            total: s["total"].as_u64().unwrap() as usize,
            lr_end: kw["lr_end"].as_f64().unwrap_or(1e-7),
            power: kw["power"].as_f64().unwrap_or(1.0),
        };
        for (step, want) in s["lrs"].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = sched.lr(step);
            assert!(
                (got - want).abs() < 1e-12,
                "{kind:?} warmup {} total {} step {step}: {got} vs transformers {want}",
                sched.warmup,
                sched.total
            );
        }
    }
}

/// A variable's gradient can stay attached to the graph that made it when that graph reads
/// another variable (LoHa's `W1a·W1b`). The moments must not hold on to it, or each step keeps
/// the previous steps' graphs alive (LoHa training grew by ~26 MB a step on MiniLM).
#[test]
fn moments_do_not_keep_the_gradient_graph_alive() {
    let a = Var::from_tensor(&Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap()).unwrap();
    let b =
        Var::from_tensor(&Tensor::new(&[[0.5f32, -1.], [2., 1.]], &Device::Cpu).unwrap()).unwrap();
    let mut opt = AdamW::new(
        vec![("a".into(), a.clone()), ("b".into(), b.clone())],
        AdamWParams::default(),
    )
    .unwrap();
    for _ in 0..3 {
        let loss = a.matmul(&b).unwrap().sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        // The case in question: candle's gradient of `a` records `… · bᵀ`, an op on `b`.
        assert!(
            grads.get(&a).unwrap().track_op(),
            "the case is not exercised"
        );
        assert!(opt
            .gradients(&grads)
            .iter()
            .flatten()
            .all(|g| !g.track_op()));
        opt.step(&grads, 1e-2, 1.0).unwrap();
    }
    for (name, t) in opt.state_tensors().unwrap() {
        assert!(!t.track_op(), "{name} records the graph of a gradient");
    }
}
