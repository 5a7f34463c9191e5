#!/usr/bin/env bash
# Every GPU check of the CUDA, QLoRA, Stable Diffusion and NCCL work in one run, on a machine
# with an NVIDIA GPU (driver and CUDA 13 libraries; python3 with torch, transformers and peft,
# and diffusers for the SD rows), from the root of a checkout of the same commit:
#   1. the CUDA tests (crates/peft/tests/cuda.rs) and, when bundled, the NCCL smoke test;
#   2. tools/bench_gpu.sh: MiniLM steps, SmolLM2 bf16 training, generation, mixed adapters,
#      against PyTorch + PEFT;
#   3. the SD UNet training and sampling steps against diffusers + PEFT (tiny SD 2.x-style and
#      SD-2-sized UNets).
#
#   tools/gpu_check.sh BUNDLE [OUT_DIR]
#
# BUNDLE is what `NCCL=1 scripts/check-cuda-build.sh` leaves in TARGET/gpu-bundle (built on a
# machine without a GPU). MINILM_CONFIG (a directory with MiniLM's config and tokenizer files),
# SMOLLM2_CONFIG (its config.json) and DATA (rotten_tomatoes train.csv) default to .assets/ and
# tools/reference/smollm2-135m-config.json (SmolLM2-135M-Instruct's config, as transformers 5 saves it).
set -uo pipefail
bundle="$(cd "$1" && pwd)"; out="${2:-gpu-check-out}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root" && mkdir -p "$out"
for f in "$bundle"/*.xz; do [ -e "$f" ] && xz -dk -T0 "$f"; done
chmod +x "$bundle"/peft "$bundle"/cuda-tests "$bundle"/sd_bench 2>/dev/null
# The CUDA libraries from the python environment's NVIDIA wheels, where the system has none.
libs=$(find / -xdev \( -name 'libcublas.so.13' -o -name 'libnvrtc.so.13' -o -name 'libcurand.so.10' \
  -o -name 'libcudart.so.13' -o -name 'libcublasLt.so.13' -o -name 'libnccl.so.2' \) 2>/dev/null |
  xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
# The test binaries read the fixtures at the build checkout's path.
built="$(cat "$bundle/built-in" 2>/dev/null || echo "$root")"
if [ "$built" != "$root" ] && [ ! -e "$built" ]; then
  mkdir -p "$(dirname "$built")" && ln -s "$root" "$built"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
(cd crates/peft && timeout 300 "$bundle/cuda-tests" --test-threads=1 2>&1) | tee "$out/cuda-tests.log" |
  grep -E "^test |panicked|test result"
if [ -x "$bundle/nccl-test" ]; then
  (cd crates/peft && timeout 120 "$bundle/nccl-test" 2>&1) | tee "$out/nccl-test.log" | grep -E "^test |test result"
fi
export MINILM_CONFIG="${MINILM_CONFIG:-$root/.assets/all-MiniLM-L6-v2}"
export SMOLLM2_CONFIG="${SMOLLM2_CONFIG:-$root/tools/reference/smollm2-135m-config.json}"
export DATA="${DATA:-$root/.assets/rotten_tomatoes/train.csv}"
models="${MODELS:-/tmp/peft-gpu-models}"
RUN_TIMEOUT="${RUN_TIMEOUT:-120}" bash tools/bench_gpu.sh "$bundle/peft" "$models" 1 2>&1 | tee "$out/bench.log"
# One run with the peak GPU memory nvidia-smi saw during it (every 50 ms) before its JSON lines.
peak() {
  local smi; smi=$(mktemp)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$smi" 2>/dev/null &
  local poll=$!
  local lines; lines=$("$@" 2>&1 | grep '^{')
  kill "$poll" 2>/dev/null; wait "$poll" 2>/dev/null
  echo "$lines" | sed "s/^/gpu_peak_mb=$(sort -n "$smi" | tail -1) /"
  rm -f "$smi"
}
if python3 -c 'import diffusers' 2>/dev/null; then
  {
    echo "== tiny SD 2.x-style UNet"
    peak python3 tools/bench_sd.py crates/peft/tests/fixtures/sd/sd2/unet 64 5 4 cuda
    peak "$bundle/sd_bench" crates/peft/tests/fixtures/sd/sd2/unet 64 5 4 cuda
    echo "== SD-2-sized UNet, random weights"
    [ -f "$models/sd2_unet/config.json" ] || python3 tools/bench_sd.py make-sd2-unet "$models/sd2_unet" >/dev/null 2>&1
    peak python3 tools/bench_sd.py "$models/sd2_unet" 64 3 4 cuda
    peak "$bundle/sd_bench" "$models/sd2_unet" 64 3 4 cuda
  } | tee "$out/sd.log"
fi
