#!/usr/bin/env bash
# The benchmark training step side by side with PyTorch + PEFT, fp32 and bf16 mixed precision:
# MiniLM (all-MiniLM-L6-v2), LoRA r=8 on query/value, batch 8 × 128, AdamW; `peft bench` and
# tools/reference/bench_train.py alternate (ours fp32, PyTorch fp32, ours bf16, PyTorch bf16
# autocast), ROUNDS times, one process per run. One JSON line per run, each prefixed with the
# load average when it started; the CPU model first.
#
#   tools/bench_step.sh PEFT_BINARY [ROUNDS] [STEPS]
#
# PYTHON: the venv with torch, transformers and peft (default python3).
set -euo pipefail
peft="$1"; rounds="${2:-3}"; steps="${3:-10}"
py="${PYTHON:-python3}"
root="$(cd "$(dirname "$0")/.." && pwd)"
model="${PEFT_ASSETS:-$root/.assets}/all-MiniLM-L6-v2"
echo "# cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs) ($(nproc) cores; $(grep -o -m1 -w 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u | xargs))"
load() { cut -d' ' -f1 /proc/loadavg; }
for _ in $(seq "$rounds"); do
  for bf in "" "--bf16"; do
    echo -n "load=$(load) "; "$peft" -q bench --model "$model" --steps "$steps" --warmup 2 $bf
    echo -n "load=$(load) "; "$py" "$root/tools/reference/bench_train.py" --model "$model" --steps "$steps" --warmup 2 $bf 2>/dev/null | tail -1
  done
done
