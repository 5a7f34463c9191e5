#!/usr/bin/env bash
# The serving benchmark: `peft serve` on SmolLM2-135M with 1, 4, 16 and 64 LoRA adapters, server
# on core 0 and load generator on core 1 (taskset), Poisson arrivals, fixed lengths; one JSON line
# per run (tools/serve/loadgen.py), with the load averages at the end of each run.
#   tools/serve/run_bench.sh PEFT_BINARY ADAPTERS_DIR [RATE] [REQUESTS] [POPULARITY]
# ADAPTERS_DIR holds a0..a63 (tools/serve/make_bench_adapters.py).
set -euo pipefail
peft="$1"; adapters="$2"; rate="${3:-4}"; requests="${4:-48}"; popularity="${5:-uniform}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
model="${PEFT_ASSETS:-$root/.assets}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
port=18900
for n in 1 4 16 64; do
  args=()
  names=()
  for i in $(seq 0 $((n - 1))); do args+=(--adapter "a$i=$adapters/a$i"); names+=("a$i"); done
  taskset -c 0 "$peft" -q serve --model "$model" --port "$port" --max-loras "$n" \
    --max-batch-size 32 "${args[@]}" &
  pid=$!
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break; sleep 0.2
  done
  list=$(IFS=,; echo "${names[*]}")
  taskset -c 1 python3 "$root/tools/serve/loadgen.py" --url "http://127.0.0.1:$port" \
    --adapters "$list" --rate "$rate" --requests "$requests" --prompt-len 64 --output-len 32 \
    --popularity "$popularity" --label "peft serve, $n adapters"
  kill -TERM "$pid"; wait "$pid" || true
done
