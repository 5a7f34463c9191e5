#!/usr/bin/env bash
# Scaling of the default job's training step, 1 vs 2 processes with one thread each, and the
# cost of the gradient exchange alone (docs/decisions/0008). Needs Open MPI, the assets
# (scripts/fetch-assets.sh) and a release build with MPI:
#   cargo build --release -p peft-cli --features mpi
#   cargo build --release -p peft --features mpi --example allreduce_bench
# STEPS (12) sets the steps per run; TARGET the cargo target directory (target).
set -u
cd "$(dirname "$0")/.."
target="${TARGET:-${CARGO_TARGET_DIR:-target}}"
peft="$target/release/peft"
export RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1
steps="${STEPS:-12}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
common=(--config examples/minilm-rotten-tomatoes.toml --set "training.max_steps=$steps"
  --set training.eval_strategy=no --set training.save_strategy=no --set training.logging_steps=0)
mpi=(mpirun --allow-run-as-root --oversubscribe --bind-to none
  -x RAYON_NUM_THREADS=1 -x CANDLE_NUM_THREADS=1 -np 2)
grep -m1 "model name" /proc/cpuinfo
echo "== 1 process x batch 16"; uptime
"$peft" train "${common[@]}" --set training.per_device_train_batch_size=16 \
  --set "training.output_dir=$out/a" 2>&1 | grep -E "trained|error"
echo "== 2 processes x batch 8 (the same global batches)"; uptime
"${mpi[@]}" "$peft" train "${common[@]}" --set training.per_device_train_batch_size=8 \
  --set "training.output_dir=$out/b" 2>&1 | grep -E "trained|all-reduce|error"
echo "== 2 processes x batch 16"; uptime
"${mpi[@]}" "$peft" train "${common[@]}" --set training.per_device_train_batch_size=16 \
  --set "training.output_dir=$out/c" 2>&1 | grep -E "trained|all-reduce|error"
echo "== the exchange alone (the default job's LoRA gradients)"; uptime
"${mpi[@]}" "$target/release/examples/allreduce_bench" 74498 300
