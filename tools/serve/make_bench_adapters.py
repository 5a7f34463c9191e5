#!/usr/bin/env python3
"""Makes the serving benchmark's adapters with Python PEFT: N LoRA adapters (r=8 on q_proj and
v_proj, random non-zero weights from seeds 0..N-1) for SmolLM2-135M-Instruct, in PEFT's layout,
plus the base dequantized into a Hugging Face directory (what llama.cpp's convert_lora_to_gguf.py
and the transformers floor read).

  python3 tools/serve/make_bench_adapters.py --gguf .assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
      --out /tmp/bench-adapters --count 64
"""

import argparse
import os

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--count", type=int, default=64)
    a = ap.parse_args()
    d, f = os.path.split(os.path.abspath(a.gguf))
    base_dir = os.path.join(a.out, "base-hf")
    if not os.path.exists(os.path.join(base_dir, "config.json")):
        # transformers dequantizes the GGUF but will not save_pretrained a GGUF-loaded model:
        # write its weights and config by hand.
        from safetensors.torch import save_model

        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        os.makedirs(base_dir, exist_ok=True)
        save_model(model, os.path.join(base_dir, "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = ["LlamaForCausalLM"]  # llama.cpp's converter needs it
        config.save_pretrained(base_dir)
        AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(base_dir)
    for i in range(a.count):
        out = os.path.join(a.out, f"a{i}")
        if os.path.exists(os.path.join(out, "adapter_model.safetensors")):
            continue
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                         init_lora_weights=False, task_type="CAUSAL_LM")
        pm = get_peft_model(model, cfg)
        # Small deltas: outputs change, the model still talks.
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.05)
        pm.save_pretrained(out)
        print("wrote", out)


if __name__ == "__main__":
    main()
