"""Adapter overhead at inference in PyTorch + PEFT: the forward pass of all-MiniLM-L6-v2
(BertForSequenceClassification, num_labels=2) with a LoRA adapter (r=8, lora_alpha=16, on
query/value, random non-zero B: init_lora_weights=False) switched on and off in turn
(`with model.disable_adapter():`), under torch.no_grad() in eval mode, on random ids of batch B
x L with an all-ones attention mask. `peft bench --inference` measures the same.

After --warmup rounds it runs --steps rounds, each one forward with the adapter and one without,
and prints one JSON line with the best time of each and the overhead (adapter / base - 1):

    {"impl": "pytorch+peft", "mode": "inference", "adapter_s": ..., "base_s": ..., "overhead": ...}

Run from the repository root:

    python tools/reference/bench_inference.py [--threads 2] [--steps 20] [--batch 8] [--seq-len 128]
"""

import argparse
import json
import os
import resource
import time

import torch
from transformers import BertForSequenceClassification

from peft import LoraConfig, get_peft_model

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--model", default=os.path.join(ROOT, ".assets", "all-MiniLM-L6-v2"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = BertForSequenceClassification.from_pretrained(args.model, num_labels=2)
    config = LoraConfig(
        task_type="SEQ_CLS",
        r=8,
        lora_alpha=16,
        target_modules=["query", "value"],
        init_lora_weights=False,
    )
    model = get_peft_model(model, config)
    model.eval()
    vocab = model.config.vocab_size
    ids = torch.randint(min(1000, vocab // 10), vocab, (args.batch, args.seq_len))
    mask = torch.ones_like(ids)

    def forward():
        t = time.perf_counter()
        model(input_ids=ids, attention_mask=mask)
        return time.perf_counter() - t

    on = off = float("inf")
    with torch.no_grad():
        for run in range(args.warmup + args.steps):
            s_on = forward()
            with model.disable_adapter():
                s_off = forward()
            if run >= args.warmup:
                on, off = min(on, s_on), min(off, s_off)
    print(
        json.dumps(
            {
                "impl": "pytorch+peft",
                "mode": "inference",
                "adapter_s": round(on, 4),
                "base_s": round(off, 4),
                "overhead": round(on / off - 1.0, 4),
                "batch": args.batch,
                "seq_len": args.seq_len,
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "threads": args.threads,
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
