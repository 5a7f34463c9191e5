#!/usr/bin/env python3
"""The floor for the serving benchmark: a plain transformers + PEFT loop that answers requests one
at a time (`set_adapter`, then `generate`, greedy, fixed prompt and output lengths), on the same
base and adapters as tools/serve/loadgen.py drives through a server. Prints one JSON line:
requests/s and output tokens/s of the closed loop, per-request latency p50/p99.

  python3 tools/serve/hf_floor.py --base /tmp/bench-adapters/base-hf \
      --adapters /tmp/bench-adapters --count 16 --requests 16 --prompt-len 64 --output-len 32
"""

import argparse
import json
import os
import random
import time

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapters", required=True, help="directory holding a0, a1, ...")
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rng = random.Random(a.seed)
    model = AutoModelForCausalLM.from_pretrained(a.base, torch_dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, os.path.join(a.adapters, "a0"), adapter_name="a0")
    for i in range(1, a.count):
        pm.load_adapter(os.path.join(a.adapters, f"a{i}"), adapter_name=f"a{i}")
    pm.eval()
    lat = []
    t0 = time.perf_counter()
    for _ in range(a.requests):
        name = f"a{rng.randrange(a.count)}"
        ids = torch.tensor([[rng.randrange(100, 48000) for _ in range(a.prompt_len)]])
        s = time.perf_counter()
        pm.set_adapter(name)
        with torch.no_grad():
            pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                        max_new_tokens=a.output_len, min_new_tokens=a.output_len)
        lat.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0
    lat.sort()
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(json.dumps({
        "label": "transformers+peft sequential generate",
        "torch": torch.__version__, "threads": a.threads, "adapters": a.count,
        "requests": a.requests, "prompt_len": a.prompt_len, "output_len": a.output_len,
        "wall_s": round(wall, 2), "requests_per_s": round(a.requests / wall, 3),
        "output_tokens_per_s": round(a.requests * a.output_len / wall, 1),
        "latency_p50_ms": round(1000 * lat[len(lat) // 2], 1),
        "latency_p99_ms": round(1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1),
        "loadavg": load,
    }))


if __name__ == "__main__":
    main()
