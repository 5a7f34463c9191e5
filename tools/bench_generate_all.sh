#!/bin/bash
# SmolLM2 generation, ours (dense f32 and Q4_1 blocks kept), transformers and llama.cpp, interleaved.
cd /work/main
P=/work/target-rel/release/peft
M=.assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
LB=/tmp/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-bench
echo "# cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores"
for r in 1 2; do
  for b in 1 8; do
    echo -n "load=$(cut -d' ' -f1 /proc/loadavg) "; $P -q bench --model $M --generate 64 --batch $b --seq-len 16 --steps 3
    echo -n "load=$(cut -d' ' -f1 /proc/loadavg) "; $P -q bench --model $M --generate 64 --batch $b --seq-len 16 --steps 3 --keep-gguf-quantized | sed 's/"mode"/"kept":true,"mode"/'
    echo -n "load=$(cut -d' ' -f1 /proc/loadavg) "; /tmp/pyenv/bin/python tools/reference/bench_generate.py --batch $b --new-tokens 64 --prompt-len 16 2>/dev/null | tail -1
  done
  echo -n "load=$(cut -d' ' -f1 /proc/loadavg) llama-bench: "; $LB -m $M -p 16 -n 64 -t 2 -o jsonl 2>/dev/null | grep '"n_gen": 64' | head -1
done
