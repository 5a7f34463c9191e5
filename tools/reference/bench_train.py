"""Training-throughput benchmark of PyTorch + PEFT LoRA on all-MiniLM-L6-v2 (CPU, fp32).

Measures what one optimizer step of the default LoRA recipe costs, on fixed-shape batches, so that
the Rust `peft` trainer can be compared step for step:

  * model: BertForSequenceClassification from .assets/all-MiniLM-L6-v2, num_labels=2;
  * LoRA: task_type=SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query","value"],
    or with --peft-config FILE any PEFT method from a config JSON (tools/reference/methods/*.json;
    `peft bench --peft-config FILE` reads the same files). AdaLoRA's update_and_allocate runs after
    each optimizer step and its orthogonal regulariser is in the loss, as PEFT's docs prescribe;
  * input: batch B of real rotten_tomatoes training texts, tokenized and padded/truncated to exactly
    L tokens, with the attention mask set to all ones (every position counts as a real token, as if
    every review were L tokens long); labels from the CSV;
  * step: forward + cross-entropy loss + backward + AdamW(lr=1e-4) step over the trainable
    parameters + zero_grad, model.train() (dropout on).

After --warmup steps (default 3) it times --steps steps (default 20) and prints one JSON line:

    {"impl": "pytorch+peft", "seq_per_s": ..., "step_s": ..., "peak_rss_mb": ..., "threads": ...}

step_s is the mean wall time of a timed step, seq_per_s = batch / step_s, peak_rss_mb the peak
resident set size of the whole process (ru_maxrss, MiB). Extra fields: batch, seq_len, steps, torch
and other_load, the mean number of cores other processes kept busy while the steps were timed (from
/proc/stat; a measurement is only meaningful when it is near 0). Run from the repository root:

    python tools/reference/bench_train.py [--threads 2] [--steps 20] [--batch 8] [--seq-len 128]
        [--peft-config tools/reference/methods/dora.json] [--bf16]
"""

import argparse
import csv
import json
import os
import resource
import time

import torch
from transformers import AutoTokenizer, BertForSequenceClassification

from peft import LoraConfig, get_peft_config, get_peft_model

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def busy_jiffies():
    """Busy CPU time of the whole machine from /proc/stat (seconds), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def other_load(t_wall, busy0, cpu0):
    """Mean number of cores that other processes kept busy since (busy0, cpu0), over t_wall s.

    Near 0 on a quiet machine; on the 2-core machine anything above ~0.3 makes the timings of a
    2-thread OpenMP run unreliable (threads wait at barriers for a descheduled peer).
    """
    busy1 = busy_jiffies()
    if busy0 is None or busy1 is None:
        return None
    own = time.process_time() - cpu0
    return round(max(0.0, (busy1 - busy0) - own) / t_wall, 2)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the step then waits for the GPU)")
    p.add_argument("--model", default=os.path.join(ROOT, ".assets", "all-MiniLM-L6-v2"))
    p.add_argument("--peft-config", help="a PEFT config JSON to train instead of LoRA r=8 q/v")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 mixed precision: forward and loss under torch.autocast(dtype=bfloat16), "
                        "fp32 weights and optimizer (as transformers' Trainer with bf16=True)")
    p.add_argument("--data", default=os.path.join(ROOT, ".assets", "rotten_tomatoes", "train.csv"))
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    # Fixed-shape batches from real texts: padded/truncated to exactly seq_len, mask all ones.
    n_batches = args.warmup + args.steps
    with open(args.data, newline="", encoding="utf-8") as f:
        rows = [r for _, r in zip(range(args.batch * n_batches), csv.DictReader(f))]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    enc = tokenizer(
        [r["text"] for r in rows],
        padding="max_length",
        truncation=True,
        max_length=args.seq_len,
        return_tensors="pt",
    )
    input_ids = enc["input_ids"]
    attention_mask = torch.ones_like(input_ids)
    labels = torch.tensor([int(r["label"]) for r in rows])
    n_rows = len(rows)

    model = BertForSequenceClassification.from_pretrained(args.model, num_labels=2)
    if args.peft_config:
        with open(args.peft_config, encoding="utf-8") as f:
            config = get_peft_config(json.load(f))
    else:
        config = LoraConfig(
            task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"]
        )
    model = get_peft_model(model, config)
    adalora = config.peft_type == "ADALORA"
    dev = torch.device(args.device)
    model.to(dev)
    input_ids, attention_mask, labels = input_ids.to(dev), attention_mask.to(dev), labels.to(dev)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(i):
        sl = [(i * args.batch + j) % n_rows for j in range(args.batch)]
        # task_ids (all task 0) reach multitask prompt tuning; the other methods ignore them.
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            out = model(input_ids=input_ids[sl], attention_mask=attention_mask[sl], labels=labels[sl],
                        task_ids=torch.zeros(len(sl), dtype=torch.long, device=dev))
        out.loss.backward()
        opt.step()
        if adalora:
            model.base_model.update_and_allocate(i)
        opt.zero_grad()
        return out.loss.item()  # .item() waits for the GPU, so each step is timed whole

    for i in range(args.warmup):
        step(i)
    busy0, cpu0 = busy_jiffies(), time.process_time()
    t0 = time.perf_counter()
    for i in range(args.warmup, n_batches):
        step(i)
    elapsed = time.perf_counter() - t0
    other = other_load(elapsed, busy0, cpu0)

    step_s = elapsed / args.steps
    print(
        json.dumps(
            {
                "impl": "pytorch+peft",
                "method": "DORA" if getattr(config, "use_dora", False) else str(config.peft_type.value),
                "seq_per_s": round(args.batch / step_s, 2),
                "step_s": round(step_s, 4),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
                "threads": torch.get_num_threads(),
                "batch": args.batch,
                "seq_len": args.seq_len,
                "steps": args.steps,
                "trainable": sum(p.numel() for p in params),
                "other_load": other,
                "torch": torch.__version__,
                "device": args.device,
                "bf16": args.bf16,
            }
        )
    )


if __name__ == "__main__":
    main()
