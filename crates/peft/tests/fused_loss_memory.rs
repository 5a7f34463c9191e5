//! The causal-LM head fused into the loss never holds the `[tokens, vocab]` logits: on a Llama
//! with a 32k vocabulary, the fused step's peak of live heap bytes over forward and backward is
//! below the unfused step's by more than the logits' size (the unfused step keeps the logits
//! for backward and builds their gradient beside them). Counted by a global allocator, so this
//! file holds one test (the count is process-wide).

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

const VOCAB: usize = 32_768;
const TOKENS: (usize, usize) = (8, 128);

/// A random one-block Llama with a large vocabulary and an untied head, as a checkpoint.
fn wide_vocab_llama(dir: &std::path::Path) {
    let (v, h, i) = (VOCAB, 64, 128);
    let dev = Device::Cpu;
    let r = |shape: &[usize]| Tensor::randn(0f32, 0.05, shape, &dev).unwrap();
    let ones = || Tensor::ones(h, DType::F32, &dev).unwrap();
    let p = "model.layers.0";
    let mut t = vec![
        ("model.embed_tokens.weight".to_string(), r(&[v, h])),
        ("lm_head.weight".to_string(), r(&[v, h])),
        ("model.norm.weight".to_string(), ones()),
        (format!("{p}.input_layernorm.weight"), ones()),
        (format!("{p}.post_attention_layernorm.weight"), ones()),
        (format!("{p}.mlp.gate_proj.weight"), r(&[i, h])),
        (format!("{p}.mlp.up_proj.weight"), r(&[i, h])),
        (format!("{p}.mlp.down_proj.weight"), r(&[h, i])),
    ];
    for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        t.push((format!("{p}.self_attn.{m}.weight"), r(&[h, h])));
    }
    peft::io::save_safetensors(&dir.join("model.safetensors"), &t).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": v,
        "hidden_size": h, "intermediate_size": i, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": false,
        "max_position_embeddings": 256
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

/// Peak live heap bytes above the start over one forward and backward, and the loss.
fn step_peak(fused: bool, dir: &std::path::Path) -> (usize, f32) {
    let opts = LoadOptions {
        task: Some(TaskType::CausalLm),
        ..Default::default()
    };
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        ..Default::default()
    };
    let m =
        get_peft_model_with_seed(models::load(dir, &opts).unwrap(), config, "default", 1).unwrap();
    let (b, t) = TOKENS;
    let ids: Vec<u32> = (0..b * t).map(|k| (k * 7919 % VOCAB) as u32).collect();
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
    let labels = ids.to_dtype(DType::I64).unwrap();
    let inputs = Inputs {
        input_ids: Some(ids),
        ..Default::default()
    };
    let start = LIVE.load(Relaxed);
    PEAK.store(start, Relaxed);
    let loss_value = {
        let loss = if fused {
            m.causal_lm_loss(&inputs, &labels, true)
                .unwrap()
                .expect("the frozen head is fused")
        } else {
            let logits = m.forward(&inputs, true).unwrap();
            peft::causal_lm_loss(&logits, &labels).unwrap()
        };
        let grads = grad::backward(&loss).unwrap();
        assert!(grads.get_ids().count() >= 4);
        loss.to_scalar::<f32>().unwrap()
    };
    (PEAK.load(Relaxed) - start, loss_value)
}

#[test]
fn the_fused_head_and_loss_never_holds_the_logits() {
    let tmp = tempfile::tempdir().unwrap();
    wide_vocab_llama(tmp.path());
    let (unfused, l0) = step_peak(false, tmp.path());
    let (fused, l1) = step_peak(true, tmp.path());
    let logits = TOKENS.0 * TOKENS.1 * VOCAB * 4;
    eprintln!("peak above start: unfused {unfused} B, fused {fused} B; logits {logits} B");
    assert!((l0 - l1).abs() < 1e-5 * l0, "loss {l1} vs unfused {l0}");
    assert!(
        fused + logits < unfused,
        "fused peak {fused} B is not a logits tensor ({logits} B) below the unfused {unfused} B"
    );
}
