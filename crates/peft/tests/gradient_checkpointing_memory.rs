//! Gradient checkpointing keeps activation memory flat in depth: on an 8-block Llama the peak of
//! live heap bytes over a training step's forward and backward is a fraction of the plain
//! step's. Measured with a counting allocator, so this file holds one test (the count is
//! process-wide).

use candle_core::{DType, Device, Tensor};
use peft::models::{self, LoadOptions};
use peft::peft_model::get_peft_model_with_seed;
use peft::tuners::lora::LoraConfig;
use peft::{grad, Inputs, TaskType};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(l.size(), Relaxed) + l.size();
        PEAK.fetch_max(now, Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Relaxed);
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// A random 8-block Llama written as a checkpoint.
fn deep_llama(dir: &std::path::Path) {
    let (v, h, i, n) = (64, 64, 128, 8);
    let dev = Device::Cpu;
    let r = |shape: &[usize]| Tensor::randn(0f32, 0.05, shape, &dev).unwrap();
    let mut t = vec![
        ("model.embed_tokens.weight".to_string(), r(&[v, h])),
        (
            "model.norm.weight".to_string(),
            Tensor::ones(h, DType::F32, &dev).unwrap(),
        ),
    ];
    for l in 0..n {
        let p = format!("model.layers.{l}");
        for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            t.push((format!("{p}.self_attn.{m}.weight"), r(&[h, h])));
        }
        t.push((format!("{p}.mlp.gate_proj.weight"), r(&[i, h])));
        t.push((format!("{p}.mlp.up_proj.weight"), r(&[i, h])));
        t.push((format!("{p}.mlp.down_proj.weight"), r(&[h, i])));
        for m in ["input_layernorm", "post_attention_layernorm"] {
            t.push((
                format!("{p}.{m}.weight"),
                Tensor::ones(h, DType::F32, &dev).unwrap(),
            ));
        }
    }
    peft::io::save_safetensors(&dir.join("model.safetensors"), &t).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": v,
        "hidden_size": h, "intermediate_size": i, "num_hidden_layers": n,
        "num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": true,
        "max_position_embeddings": 256
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

/// Peak live heap bytes above the start, over one forward and backward.
fn step_peak(checkpointing: bool, dir: &std::path::Path) -> usize {
    let opts = LoadOptions {
        task: Some(TaskType::CausalLm),
        ..Default::default()
    };
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        ..Default::default()
    };
    let m =
        get_peft_model_with_seed(models::load(dir, &opts).unwrap(), config, "default", 1).unwrap();
    let (b, t) = (8, 128);
    let ids: Vec<u32> = (0..b * t).map(|k| (k * 7 % 64) as u32).collect();
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
    let inputs = Inputs {
        input_ids: Some(ids.clone()),
        ..Default::default()
    };
    let start = LIVE.load(Relaxed);
    PEAK.store(start, Relaxed);
    {
        let _session = if checkpointing {
            Some(m.gradient_checkpointing().unwrap())
        } else {
            None
        };
        let logits = m.forward(&inputs, true).unwrap();
        let loss = peft::causal_lm_loss(&logits, &ids.to_dtype(DType::I64).unwrap()).unwrap();
        let grads = grad::backward(&loss).unwrap();
        assert!(grads.get_ids().count() >= 32);
    }
    PEAK.load(Relaxed) - start
}

#[test]
fn checkpointed_step_peaks_at_a_fraction_of_the_plain_one() {
    let tmp = tempfile::tempdir().unwrap();
    deep_llama(tmp.path());
    let plain = step_peak(false, tmp.path());
    let ckpt = step_peak(true, tmp.path());
    eprintln!("peak above start: plain {plain} B, checkpointed {ckpt} B");
    assert!(
        ckpt * 3 < plain,
        "checkpointed peak {ckpt} B is not under a third of the plain {plain} B"
    );
}
