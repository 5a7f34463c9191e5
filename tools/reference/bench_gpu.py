"""PyTorch + PEFT on the GPU: the reference side of tools/bench_gpu.sh.

One benchmark per call, one JSON line, timed with the GPU drained (torch.cuda.synchronize) at
both ends. Peak memory is torch's own (max_memory_allocated) plus what the process holds on the
device at the end (NVML, context included), so that it compares with `peft bench`'s
`device_mb`, which is the device memory the process took, context included.

  bench_gpu.py make-models OUT_DIR MINILM_CONFIG_DIR SMOLLM2_CONFIG_JSON
      random-initialised MiniLM (BERT) and SmolLM2-135M (Llama) directories with the real
      configs and tokenizers (weights are random: speed does not depend on them)
  bench_gpu.py train-causal MODEL_DIR --batch 8 --seq-len 512 [--bf16]
      LoRA r=16 on all linear layers, AdamW, batch of random ids, labels = ids
  bench_gpu.py generate MODEL_DIR --batch 1 --new-tokens 128 [--static]
      greedy generation of --new-tokens tokens after a --prompt-len-token random prompt

The MiniLM training step is tools/reference/bench_train.py --device cuda.
"""

import argparse
import json
import os
import shutil
import time

import torch


def device_mb():
    """Memory this process holds on GPU 0 (MiB), context included, from NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            if p.pid == os.getpid():
                return round(p.usedGpuMemory / 2**20)
    except Exception:  # noqa: BLE001 (NVML missing or no per-process accounting)
        return None
    return None


def make_models(out, minilm_cfg, smol_cfg):
    from transformers import AutoConfig, BertModel, LlamaForCausalLM

    torch.manual_seed(0)
    m = os.path.join(out, "minilm")
    os.makedirs(m, exist_ok=True)
    for f in os.listdir(minilm_cfg):
        src = os.path.join(minilm_cfg, f)
        # The config and tokenizer files; the weights are made below.
        if os.path.isfile(src) and (f.endswith((".json", ".txt"))):
            shutil.copy(src, m)
    BertModel(AutoConfig.from_pretrained(m)).save_pretrained(m, safe_serialization=True)
    s = os.path.join(out, "smollm2")
    os.makedirs(s, exist_ok=True)
    shutil.copy(smol_cfg, os.path.join(s, "config.json"))
    cfg = AutoConfig.from_pretrained(s)
    LlamaForCausalLM(cfg).save_pretrained(s, safe_serialization=True)
    print(json.dumps({"made": [m, s]}))


def train_causal(a):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32).to(dev)
    cfg = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.1, target_modules="all-linear")
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (a.batch, a.seq_len), device=dev)
    mask = torch.ones_like(ids)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / a.steps
    print(json.dumps({
        "impl": "pytorch+peft", "mode": "train-causal", "seq_per_s": round(a.batch / step_s, 2),
        "step_s": round(step_s, 5), "batch": a.batch, "seq_len": a.seq_len, "bf16": a.bf16,
        "torch_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20), "device_mb": device_mb(),
        "trainable": sum(p.numel() for p in params), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0),
    }))


def generate(a):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32).to(dev).eval()
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.prompt_len), device=dev)
    kw = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
              pad_token_id=0)
    if a.static:
        kw["cache_implementation"] = "static"
    best = None
    with torch.no_grad():
        for i in range(a.warmup + a.runs):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
            torch.cuda.synchronize()
            t = time.perf_counter() - t0
            assert out.shape[1] == a.prompt_len + a.new_tokens
            if i >= a.warmup:
                best = t if best is None else min(best, t)
    print(json.dumps({
        "impl": "transformers", "mode": "generate", "tokens_per_s": round(a.batch * a.new_tokens / best, 2),
        "seconds": round(best, 4), "batch": a.batch, "prompt_len": a.prompt_len,
        "new_tokens": a.new_tokens, "static_cache": a.static, "device_mb": device_mb(),
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
    }))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-models")
    mk.add_argument("out")
    mk.add_argument("minilm_config_dir")
    mk.add_argument("smollm2_config")
    tc = sub.add_parser("train-causal")
    tc.add_argument("model")
    tc.add_argument("--batch", type=int, default=8)
    tc.add_argument("--seq-len", type=int, default=512)
    tc.add_argument("--steps", type=int, default=10)
    tc.add_argument("--warmup", type=int, default=3)
    tc.add_argument("--bf16", action="store_true")
    g = sub.add_parser("generate")
    g.add_argument("model")
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--prompt-len", type=int, default=16)
    g.add_argument("--new-tokens", type=int, default=128)
    g.add_argument("--runs", type=int, default=3)
    g.add_argument("--warmup", type=int, default=1)
    g.add_argument("--static", action="store_true")
    a = p.parse_args()
    if a.cmd == "make-models":
        make_models(a.out, a.minilm_config_dir, a.smollm2_config)
    elif a.cmd == "train-causal":
        train_causal(a)
    else:
        generate(a)


if __name__ == "__main__":
    main()
