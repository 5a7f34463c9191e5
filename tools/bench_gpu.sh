#!/usr/bin/env bash
# The CUDA goals side by side with PyTorch + PEFT on one GPU, one process per run, ours and the
# reference alternating:
#   * MiniLM (all-MiniLM-L6-v2 shape) LoRA r=8 q/v training step, batch 8 and 64 x 128, fp32 and
#     bf16 (torch.autocast on the PyTorch side): `peft bench` vs tools/reference/bench_train.py;
#   * SmolLM2-135M LoRA r=16 on all linear layers, batch 8 x 512, bf16: `peft bench` vs
#     tools/reference/bench_gpu.py train-causal;
#   * greedy generation of 128 tokens after a 16-token prompt, batch 1 and 32 (transformers with a
#     static cache), and a batch of 32 rows spread over 8 LoRA adapters against the same batch
#     through one adapter (`peft bench --generate --adapters 8`).
# Weights are random with the real configs (speed does not depend on them): MODELS gets a
# `minilm` and a `smollm2` directory from tools/reference/bench_gpu.py make-models, which needs
# MINILM_CONFIG (a directory with MiniLM's config and tokenizer files; default .assets/) and
# SMOLLM2_CONFIG (its config.json; default tools/reference/smollm2-135m-config.json) the first time.
#
#   tools/bench_gpu.sh PEFT_CUDA_BINARY MODELS [ROUNDS]
#
# Each line: the peak memory in use on the GPU while the run went (nvidia-smi, every 50 ms; the
# GPU holds nothing else), then the run's JSON line. PYTHON: the python with torch, transformers
# and peft (default python3).
set -uo pipefail
peft="$1"; models="$2"; rounds="${3:-1}"
py="${PYTHON:-python3}"
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ ! -f "$models/smollm2/model.safetensors" ]; then
  "$py" "$root/tools/reference/bench_gpu.py" make-models "$models" \
    "${MINILM_CONFIG:-$root/.assets/all-MiniLM-L6-v2}" \
    "${SMOLLM2_CONFIG:-$root/tools/reference/smollm2-135m-config.json}" || exit 1
fi
echo "# gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
echo "# cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs) ($(nproc) cores)"
echo "# torch: $("$py" -c 'import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)')"
smi=$(mktemp)
run() {
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$smi" 2>/dev/null &
  local poll=$!
  local out
  out=$(timeout "${RUN_TIMEOUT:-600}" "$@" 2>&1)
  local rc=$?
  kill "$poll" 2>/dev/null; wait "$poll" 2>/dev/null
  local peak
  peak=$(sort -n "$smi" | tail -1)
  if [ $rc -ne 0 ]; then
    echo "FAILED ($rc): $*"; echo "$out" | tail -5
  else
    echo "$out" | grep '^{' | sed "s/^/gpu_peak_mb=$peak /"
  fi
}
minilm="$models/minilm"; smol="$models/smollm2"
for _ in $(seq "$rounds"); do
  for b in 8 64; do
    for bf in "" "--bf16"; do
      run "$peft" -q bench --device cuda --model "$minilm" --batch "$b" --steps 20 --warmup 3 $bf
      run "$py" "$root/tools/reference/bench_train.py" --device cuda --model "$minilm" --batch "$b" \
        --steps 20 --warmup 3 --data "${DATA:-$root/.assets/rotten_tomatoes/train.csv}" $bf
    done
  done
  run "$peft" -q bench --device cuda --model "$smol" --task CAUSAL_LM \
    --peft-config "$root/tools/reference/methods/lora-r16-all-linear.json" --batch 8 --seq-len 512 \
    --steps 10 --warmup 3 --bf16
  run "$py" "$root/tools/reference/bench_gpu.py" train-causal "$smol" --batch 8 --seq-len 512 --bf16
  for b in 1 32; do
    run "$peft" -q bench --device cuda --model "$smol" --generate 128 --batch "$b" --seq-len 16 \
      --steps 3 --warmup 1
    run "$py" "$root/tools/reference/bench_gpu.py" generate "$smol" --batch "$b" --static
  done
  run "$peft" -q bench --device cuda --model "$smol" --generate 128 --batch 32 --seq-len 16 \
    --steps 3 --warmup 1 --adapters 8
done
rm -f "$smi"
