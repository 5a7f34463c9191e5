#!/usr/bin/env bash
# QLoRA memory and speed, side by side: LoRA r=8 (q_proj, v_proj) on SmolLM2-135M, batch B × L,
# with the frozen base in f32, bf16 (ours: autocast's bf16 products, `--bf16`; PyTorch: under
# torch.autocast, and with the weights stored bf16), NF4 + double quantization with f32 and bf16
# compute, and (ours only) the Q4_1 GGUF kept quantized, each with and without gradient
# checkpointing; `peft bench` and
# tools/reference/bench_train_causal.py (PyTorch + PEFT + bitsandbytes) alternate, one process
# per row, so each row's peak RSS is its own. One JSON line per run.
#
#   tools/bench_qlora.sh PEFT_BINARY HF_DIR [STEPS] [BATCH] [SEQ_LEN]
#
# HF_DIR: SmolLM2-135M as a Hugging Face directory (f32 safetensors), e.g. the GGUF dequantized by
# transformers (tools/serve/make_bench_adapters.py writes one as base-hf/). PYTHON: the venv with
# torch, transformers, peft and bitsandbytes (default python3).
set -euo pipefail
peft="$1"; hf="$2"; steps="${3:-5}"; batch="${4:-8}"; len="${5:-128}"
py="${PYTHON:-python3}"
root="$(cd "$(dirname "$0")/.." && pwd)"
gguf="${PEFT_ASSETS:-$root/.assets}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
warmup="${WARMUP:-1}"
common=(--task-type CAUSAL_LM --target-modules q_proj,v_proj --steps "$steps" --warmup "$warmup" --batch "$batch" --seq-len "$len")
ref=("$py" "$root/tools/reference/bench_train_causal.py" --model-dir "$hf" --steps "$steps" --warmup "$warmup" --batch "$batch" --seq-len "$len")
for ckpt in "" "--gradient-checkpointing"; do
  "$peft" -q bench --model "$hf" "${common[@]}" $ckpt
  "${ref[@]}" --base f32 $ckpt 2>/dev/null | tail -1
  "$peft" -q bench --model "$hf" "${common[@]}" --bf16 $ckpt
  "${ref[@]}" --base f32 --autocast $ckpt 2>/dev/null | tail -1
  "${ref[@]}" --base bf16 $ckpt 2>/dev/null | tail -1
  "$peft" -q bench --model "$hf" "${common[@]}" --load-in-4bit --bnb-4bit-quant-type nf4 --bnb-4bit-use-double-quant $ckpt
  "${ref[@]}" --base nf4 $ckpt 2>/dev/null | tail -1
  "$peft" -q bench --model "$hf" "${common[@]}" --load-in-4bit --bnb-4bit-quant-type nf4 --bnb-4bit-use-double-quant --bnb-4bit-compute-dtype bfloat16 $ckpt
  "${ref[@]}" --base nf4-bf16 $ckpt 2>/dev/null | tail -1
  "$peft" -q bench --model "$gguf" "${common[@]}" --keep-gguf-quantized $ckpt
done
