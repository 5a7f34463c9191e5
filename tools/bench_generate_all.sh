#!/usr/bin/env bash
# SmolLM2-135M greedy generation side by side: ours (the Q4_1 GGUF dequantized to f32, and its
# blocks kept with --keep-gguf-quantized), transformers + PEFT (tools/reference/bench_generate.py)
# and, when LLAMA_BENCH names llama.cpp's llama-bench, llama.cpp on the same file; 16-token
# prompts, 64 new tokens, batch 1 and 8, ROUNDS interleaved rounds. One JSON line per run, each
# prefixed with the load average when it started.
#
#   tools/bench_generate_all.sh PEFT_BINARY [ROUNDS]
#
# PYTHON: the venv with torch and transformers (default python3).
set -euo pipefail
peft="$1"; rounds="${2:-2}"
py="${PYTHON:-python3}"
root="$(cd "$(dirname "$0")/.." && pwd)"
model="${PEFT_ASSETS:-$root/.assets}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
load() { cut -d' ' -f1 /proc/loadavg; }
echo "# cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores"
for _ in $(seq "$rounds"); do
  for b in 1 8; do
    echo -n "load=$(load) "; "$peft" -q bench --model "$model" --generate 64 --batch "$b" --seq-len 16 --steps 3
    echo -n "load=$(load) "; "$peft" -q bench --model "$model" --generate 64 --batch "$b" --seq-len 16 --steps 3 --keep-gguf-quantized | sed 's/"mode"/"kept":true,"mode"/'
    echo -n "load=$(load) "; "$py" "$root/tools/reference/bench_generate.py" --batch "$b" --new-tokens 64 --prompt-len 16 2>/dev/null | tail -1
  done
  if [ -n "${LLAMA_BENCH:-}" ]; then
    echo -n "load=$(load) llama-bench: "; "$LLAMA_BENCH" -m "$model" -p 16 -n 64 -t 2 -o jsonl 2>/dev/null | grep '"n_gen": 64' | head -1
  fi
done
