#!/usr/bin/env bash
# The serving benchmark, side by side on one machine: `peft serve`, llama.cpp's `llama-server`
# (if LLAMA_SERVER points at one; the same adapters converted to GGUF) and the transformers + PEFT
# floor (tools/serve/hf_floor.py, sequential `generate`), on SmolLM2-135M with 1, 4, 16 and 64
# LoRA adapters. Servers run on core 0 and the load generator on core 1 (taskset); Poisson
# arrivals, fixed prompt and output lengths, adapters drawn uniformly (POPULARITY=powerlaw for a
# power law). One JSON line per run on stdout (tools/serve/loadgen.py, hf_floor.py), with the
# load averages at the end of each run.
#
#   tools/serve/run_bench.sh PEFT_BINARY ADAPTERS_DIR [RATE] [REQUESTS]
#
# ADAPTERS_DIR holds a0..a63, base-hf/ and gguf/a0.gguf.. (tools/serve/make_bench_adapters.py,
# then llama.cpp's convert_lora_to_gguf.py --base ADAPTERS_DIR/base-hf for each adapter).
# Environment: PYTHON (with torch, transformers, peft; default python3), LLAMA_SERVER (path to
# llama-server; skipped when unset), COUNTS (default "1 4 16 64"), HF_REQUESTS (default 16),
# POPULARITY (default uniform).
set -euo pipefail
peft="$1"; adapters="$2"; rate="${3:-16}"; requests="${4:-64}"
py="${PYTHON:-python3}"
counts="${COUNTS:-1 4 16 64}"
popularity="${POPULARITY:-uniform}"
hf_requests="${HF_REQUESTS:-16}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
model="${PEFT_ASSETS:-$root/.assets}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
port=18900
plen=64; olen=32

wait_up() {
  for _ in $(seq 1 900); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && return 0; sleep 0.2
  done
  echo "server on port $port did not come up" >&2; return 1
}

for n in $counts; do
  names=(); args=(); largs=()
  for i in $(seq 0 $((n - 1))); do
    names+=("a$i"); args+=(--adapter "a$i=$adapters/a$i"); largs+=(--lora "$adapters/gguf/a$i.gguf")
  done
  list=$(IFS=,; echo "${names[*]}")

  taskset -c 0 "$peft" -q serve --model "$model" --port "$port" --max-loras "$n" \
    --max-batch-size 32 "${args[@]}" &
  pid=$!
  wait_up
  taskset -c 1 "$py" "$root/tools/serve/loadgen.py" --url "http://127.0.0.1:$port" \
    --adapters "$list" --rate "$rate" --requests "$requests" --prompt-len $plen \
    --output-len $olen --popularity "$popularity" --label "peft serve, $n adapters"
  kill -TERM "$pid"; wait "$pid" || true

  if [ -n "${LLAMA_SERVER:-}" ]; then
    taskset -c 0 "$LLAMA_SERVER" -m "$model" "${largs[@]}" --lora-init-without-apply \
      --port "$port" -t 1 -tb 1 -c $((32 * (plen + olen + 8))) -np 32 --log-disable \
      >/dev/null 2>&1 &
    pid=$!
    wait_up
    taskset -c 1 "$py" "$root/tools/serve/loadgen.py" --url "http://127.0.0.1:$port" \
      --backend llamacpp --adapters "$n" --rate "$rate" --requests "$requests" \
      --prompt-len $plen --output-len $olen --popularity "$popularity" \
      --label "llama-server, $n adapters"
    kill -TERM "$pid"; wait "$pid" || true
  fi

  taskset -c 0 "$py" "$root/tools/serve/hf_floor.py" --base "$adapters/base-hf" \
    --adapters "$adapters" --count "$n" --requests "$hf_requests" --prompt-len $plen \
    --output-len $olen --threads 1
done
