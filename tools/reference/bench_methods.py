"""Training-step cost of every PEFT method, here and in PyTorch + PEFT, side by side.

For each config in tools/reference/methods/ (LoRA r=8 and the other methods on the same query/value
layers of all-MiniLM-L6-v2, the default job's model), runs `peft bench --peft-config FILE` and
`bench_train.py --peft-config FILE` in turn, --repeats times each (alternating, best run kept),
and prints a Markdown table: seq/s and peak RSS of each, each method relative to LoRA in the same
implementation, and peft relative to PyTorch. Run from the repository root, on a quiet machine,
after `cargo build --release`:

    python tools/reference/bench_methods.py [--repeats 2] [--steps 20] [--batch 8] [--seq-len 128]
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
METHODS = ["lora", "dora", "adalora", "loha", "lokr", "ia3", "vera", "prompt_tuning", "p_tuning", "prefix_tuning",
           "multitask_prompt_tuning"]


def last_json(cmd):
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads([l for l in out.splitlines() if l.startswith("{")][-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--peft", default=os.path.join(ROOT, "target", "release", "peft"))
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args()
    shape = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len)]

    rows = {}
    for m in args.methods.split(","):
        cfg = os.path.join(ROOT, "tools", "reference", "methods", f"{m}.json")
        ours_cmd = [args.peft, "bench", "--model", ".assets/all-MiniLM-L6-v2", "--peft-config", cfg] + shape
        torch_cmd = [sys.executable, os.path.join(ROOT, "tools", "reference", "bench_train.py"),
                     "--peft-config", cfg] + shape
        best = {}
        for _ in range(args.repeats):
            for impl, cmd in (("ours", ours_cmd), ("torch", torch_cmd)):
                r = last_json(cmd)
                if impl not in best or r["seq_per_s"] > best[impl]["seq_per_s"]:
                    best[impl] = r
        rows[m] = best
        print(m, json.dumps(best), file=sys.stderr, flush=True)

    base = rows.get("lora")
    print("| method | trainable | peft seq/s | vs LoRA | peak MB | vs LoRA | PyTorch seq/s | vs LoRA "
          "| peak MB | vs LoRA | peft / PyTorch speed | memory |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m, r in rows.items():
        o, t = r["ours"], r["torch"]
        rel = (lambda impl, k: f"{r[impl][k] / base[impl][k]:.2f}x") if base else (lambda impl, k: "-")
        print(
            f"| {o['method']} | {o['trainable']:,} | {o['seq_per_s']:.2f} | {rel('ours', 'seq_per_s')} "
            f"| {o['peak_rss_mb']:.0f} | {rel('ours', 'peak_rss_mb')} | {t['seq_per_s']:.2f} "
            f"| {rel('torch', 'seq_per_s')} | {t['peak_rss_mb']:.0f} | {rel('torch', 'peak_rss_mb')} "
            f"| {o['seq_per_s'] / t['seq_per_s']:.2f}x | {o['peak_rss_mb'] / t['peak_rss_mb']:.2f}x |"
        )
    loads = [r["torch"].get("other_load") for r in rows.values()]
    print(f"\nother_load during the PyTorch runs (cores busy elsewhere; ~0 means quiet): {loads}")


if __name__ == "__main__":
    main()
