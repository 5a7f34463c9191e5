"""Generation-speed benchmark of transformers on SmolLM2-135M-Instruct (CPU, fp32, greedy).

The counterpart of `peft bench --model GGUF --generate 64 --batch B --seq-len L`:

  * model: the SmolLM2 GGUF from .assets/smollm2, dequantized to f32 by transformers (needs `gguf`);
  * prompts: B rows of L random token ids (seeded), no padding;
  * generate(do_sample=False, max_new_tokens=N, min_new_tokens=N): every row makes exactly N new
    tokens (min_new_tokens keeps EOS away, as `peft bench` does with an EOS id outside the
    vocabulary), KV cache on.

It runs --warmup + --runs generations and prints one JSON line with the best run: tokens_per_s
(B * N / seconds), seconds, peak_rss_mb, other_load (see bench_train.py). Run from the repository
root:

    python tools/reference/bench_generate.py [--batch 1] [--new-tokens 64] [--prompt-len 16]
"""

import argparse
import json
import os
import resource
import sys
import time

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import busy_jiffies, other_load  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GGUF = os.path.join(ROOT, ".assets", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--gguf", default=GGUF)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    d, f = os.path.dirname(args.gguf), os.path.basename(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(min(1000, vocab // 10), vocab, (args.batch, args.prompt_len))
    mask = torch.ones_like(ids)
    n = args.new_tokens

    def run():
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                pad_token_id=model.generation_config.eos_token_id,
            )
        assert out.shape[1] == args.prompt_len + n

    for _ in range(args.warmup):
        run()
    best, busy0, cpu0, t_all = float("inf"), busy_jiffies(), time.process_time(), time.perf_counter()
    for _ in range(args.runs):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    other = other_load(time.perf_counter() - t_all, busy0, cpu0)
    print(
        json.dumps(
            {
                "impl": "transformers",
                "mode": "generate",
                "tokens_per_s": round(args.batch * n / best, 2),
                "seconds": round(best, 3),
                "batch": args.batch,
                "prompt_len": args.prompt_len,
                "new_tokens": n,
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
                "threads": torch.get_num_threads(),
                "other_load": other,
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
