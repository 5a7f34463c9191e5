"""Forward latency of a PEFT mixed batch (8 rows, each through its own one of 8 LoRA adapters)
against the same batch through a single adapter and through the bare model: the PyTorch + PEFT
counterpart of `cargo run --release -p peft --example mixed_batch_bench`, same model, adapters
(r=8 on query/value, random non-zero B), ids and timing (3 warm-up runs, median of N, no grad).

    python tools/reference/bench_mixed_batch.py [seq_len 128] [iters 20] [--threads 2]
"""

import argparse
import os
import statistics
import time

import torch
from transformers import BertForSequenceClassification

from peft import LoraConfig, get_peft_model

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
ADAPTERS = ROWS = 8


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("seq_len", type=int, nargs="?", default=128)
    p.add_argument("iters", type=int, nargs="?", default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=os.path.join(ROOT, ".assets", "all-MiniLM-L6-v2"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def config(alpha):
        return LoraConfig(r=8, lora_alpha=alpha, target_modules=["query", "value"], init_lora_weights=False)

    base = BertForSequenceClassification.from_pretrained(args.model, num_labels=2)
    model = get_peft_model(base, config(16))
    names = ["default"]
    for i in range(1, ADAPTERS):
        model.add_adapter(f"a{i}", config(16 + i))
        names.append(f"a{i}")
    model.eval()
    seq = args.seq_len
    ids = torch.tensor([1000 + (i * 7919) % 20000 for i in range(ROWS * seq)]).reshape(ROWS, seq)
    mask = torch.ones_like(ids)
    row_names = [names[i % ADAPTERS] for i in range(ROWS)]

    def timed(f):
        for _ in range(3):
            f()
        v = []
        for _ in range(args.iters):
            t = time.perf_counter()
            f()
            v.append((time.perf_counter() - t) * 1e3)
        return statistics.median(v)

    with torch.no_grad():
        single = timed(lambda: model(input_ids=ids, attention_mask=mask))
        mixed = timed(lambda: model(input_ids=ids, attention_mask=mask, adapter_names=row_names))
        with model.disable_adapter():
            bare = timed(lambda: model(input_ids=ids, attention_mask=mask))
    print(
        f"PyTorch + PEFT MiniLM forward, batch {ROWS} x {seq} tokens, {args.iters} iterations (median), "
        f"{torch.get_num_threads()} threads:\n  base model        {bare:8.2f} ms\n  single adapter    "
        f"{single:8.2f} ms\n  mixed, {ADAPTERS} adapters {mixed:8.2f} ms  ({mixed / single:.2f}x single)"
    )


if __name__ == "__main__":
    main()
