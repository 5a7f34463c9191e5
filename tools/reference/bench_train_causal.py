"""Training-throughput benchmark of PyTorch + PEFT LoRA on SmolLM2-135M-Instruct (CAUSAL_LM, CPU, fp32).

The counterpart of `peft bench --model GGUF --task-type CAUSAL_LM --target-modules q_proj,v_proj`:

  * model: the SmolLM2 GGUF from .assets/smollm2, dequantized to f32 by transformers (needs the
    `gguf` package);
  * LoRA: task_type=CAUSAL_LM, r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj","v_proj"];
  * input: batch B of L random token ids (seeded), attention mask all ones, labels = the ids
    (transformers shifts them inside the loss);
  * step: forward + loss + backward + AdamW(lr=1e-4) step + zero_grad, model.train().

`--base` picks how the frozen base is stored: f32 (default), bf16 (bf16 weights; PEFT keeps the
adapter in fp32), nf4 (bitsandbytes NF4 with double quantization, compute dtype f32, after
`prepare_model_for_kbit_training`), nf4-bf16 (the same with compute dtype bf16); `--autocast`
runs forward and loss under `torch.autocast(dtype=bfloat16)` (transformers' Trainer with
`bf16=True` on the CPU); `--model-dir` loads a Hugging Face directory instead of the
GGUF. `--gradient-checkpointing` turns on transformers' gradient checkpointing (non-reentrant,
inputs requiring grad as PEFT's `enable_input_require_grads` makes them).

After --warmup steps it times --steps steps and prints one JSON line with seq_per_s, step_s and
peak_rss_mb (ru_maxrss of the process, MiB), plus other_load (mean cores other processes kept busy
while timing; see bench_train.py). Run from the repository root:

    python tools/reference/bench_train_causal.py [--threads 2] [--steps 10] [--batch 8] [--seq-len 128]
"""

import argparse
import json
import os
import resource
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from peft import LoraConfig, get_peft_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import busy_jiffies, other_load  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GGUF = os.path.join(ROOT, ".assets", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--gguf", default=GGUF)
    p.add_argument("--model-dir", help="a Hugging Face model directory instead of the GGUF")
    p.add_argument("--base", choices=["f32", "bf16", "nf4", "nf4-bf16"], default="f32")
    p.add_argument("--autocast", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    kw = {"dtype": torch.bfloat16 if args.base == "bf16" else torch.float32}
    if args.base.startswith("nf4"):
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if args.base == "nf4-bf16" else torch.float32,
        )
    if args.model_dir:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, **kw)
    else:
        d, f = os.path.dirname(args.gguf), os.path.basename(args.gguf)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, **kw)
    model.config.use_cache = False
    if args.base.startswith("nf4"):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=args.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(
        model,
        LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]),
    )
    model.train()
    vocab = model.config.vocab_size
    ids = torch.randint(min(1000, vocab // 10), vocab, (args.batch, args.seq_len))
    mask = torch.ones_like(ids)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast):
            out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(args.warmup):
        step()
    busy0, cpu0 = busy_jiffies(), time.process_time()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    elapsed = time.perf_counter() - t0
    step_s = elapsed / args.steps
    print(
        json.dumps(
            {
                "impl": "pytorch+peft",
                "task": "CAUSAL_LM",
                "base": args.base + ("+autocast" if args.autocast else ""),
                "gradient_checkpointing": args.gradient_checkpointing,
                "seq_per_s": round(args.batch / step_s, 2),
                "step_s": round(step_s, 4),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
                "threads": torch.get_num_threads(),
                "batch": args.batch,
                "seq_len": args.seq_len,
                "steps": args.steps,
                "other_load": other_load(elapsed, busy0, cpu0),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
