//! Forward latency of a mixed batch (8 rows, each through its own one of 8 LoRA adapters) against
//! the same batch through a single adapter, and through the bare model, on MiniLM. A benchmark,
//! not a test.
//!
//!     cargo run --release -p peft --example mixed_batch_bench -- .assets/all-MiniLM-L6-v2 [seq_len] [iters]

use candle_core::{Device, Tensor};
use peft::models::{self, LoadOptions};
use peft::tuners::lora::InitLoraWeights;
use peft::tuners::{lora::LoraConfig, targets::ModuleSpec};
use peft::{get_peft_model, Inputs, TaskType};
use std::path::PathBuf;
use std::time::Instant;

const ADAPTERS: usize = 8;
const ROWS: usize = 8;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> peft::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or(".assets/all-MiniLM-L6-v2".into()));
    let seq: usize = args.next().map_or(128, |s| s.parse().expect("seq_len"));
    let iters: usize = args.next().map_or(20, |s| s.parse().expect("iters"));
    let device = if candle_core::utils::cuda_is_available() {
        Device::new_cuda(0)?
    } else {
        Device::Cpu
    };
    let opts = LoadOptions {
        task: Some(TaskType::SeqCls),
        num_labels: Some(2),
        device: device.clone(),
        ..Default::default()
    };
    let config = |seed_alpha: f64| LoraConfig {
        r: 8,
        lora_alpha: seed_alpha,
        target_modules: Some(ModuleSpec::List(vec!["query".into(), "value".into()])),
        // Random non-zero B, so every adapter really changes its rows.
        init_lora_weights: InitLoraWeights::Bool(false),
        ..Default::default()
    };
    let mut model = get_peft_model(models::load(&dir, &opts)?, config(16.0), "default")?;
    let mut names = vec!["default".to_string()];
    for i in 1..ADAPTERS {
        let name = format!("a{i}");
        model.add_adapter(&name, config(16.0 + i as f64))?;
        names.push(name);
    }
    let ids: Vec<u32> = (0..ROWS * seq)
        .map(|i| 1000 + (i as u32 * 7919) % 20000)
        .collect();
    let inputs = Inputs::new(Tensor::from_vec(ids, (ROWS, seq), &device)?);
    let row_names: Vec<String> = (0..ROWS).map(|i| names[i % ADAPTERS].clone()).collect();

    let time = |f: &dyn Fn() -> peft::Result<Tensor>| -> peft::Result<f64> {
        for _ in 0..3 {
            f()?;
        }
        let mut v = Vec::new();
        for _ in 0..iters {
            let t = Instant::now();
            let out = f()?;
            device.synchronize()?;
            drop(out);
            v.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(median(v))
    };
    let single = peft::no_grad(|| time(&|| model.forward(&inputs, false)))?;
    let mixed = peft::no_grad(|| time(&|| model.forward_mixed(&inputs, &row_names)))?;
    let bare = {
        let disabled = model.disable_adapter()?;
        peft::no_grad(|| time(&|| disabled.forward(&inputs, false)))?
    };
    println!(
        "MiniLM forward, batch {ROWS} x {seq} tokens, {iters} iterations (median), {device:?}:\n  \
         base model        {bare:8.2} ms\n  single adapter    {single:8.2} ms\n  \
         mixed, {ADAPTERS} adapters {mixed:8.2} ms  ({:.2}x single)",
        mixed / single
    );
    Ok(())
}
