"""diffusers + PEFT side of the Stable Diffusion benchmark (the Rust side is
crates/peft/examples/sd_bench.rs): a UNet LoRA training step and a sampling step on the same
UNet, inputs and machine.

    /tmp/pyenv/bin/python tools/bench_sd.py make-sd2-unet DIR     # an SD-2-sized UNet, random weights
    /usr/bin/time -v /tmp/pyenv/bin/python tools/bench_sd.py UNET_DIR LATENT_SIDE [STEPS] [RANK] [cpu|cuda]

Training step: `unet.add_adapter(LoraConfig(r, alpha=r, init_lora_weights="gaussian",
target_modules=["to_k", "to_q", "to_v", "to_out.0"]))` as diffusers' train_dreambooth_lora.py
does, batch 1, latents [1, 4, side, side], text states [1, 77, cross_attention_dim], MSE against
the noise, backward, AdamW (torch's, fused off). Sampling step: the UNet on a guidance batch of 2
under no_grad. torch uses the machine's cores (set OMP/torch threads to compare with fewer).
Prints one JSON line per measure; the first step is a warm-up and not counted.
"""

import json
import sys
import time

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig


def make_sd2_unet(out):
    # stabilityai/stable-diffusion-2's UNet config (865M parameters), random weights.
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=96,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
        upcast_attention=True,
    )
    unet.save_pretrained(out, safe_serialization=True)
    print(out, sum(p.numel() for p in unet.parameters()), "parameters")


def main():
    if sys.argv[1] == "make-sd2-unet":
        make_sd2_unet(sys.argv[2])
        return
    d = sys.argv[1]
    side = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    rank = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    dev = torch.device(sys.argv[5] if len(sys.argv) > 5 else "cpu")
    t0 = time.time()
    unet = UNet2DConditionModel.from_pretrained(d).to(dev)
    load = time.time() - t0
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    ctx = unet.config.cross_attention_dim
    ctx = ctx[0] if isinstance(ctx, (list, tuple)) else ctx
    g = torch.Generator().manual_seed(0)
    sample = torch.randn((1, 4, side, side), generator=g).to(dev)
    noise = torch.randn((1, 4, side, side), generator=g).to(dev)
    context = torch.randn((1, 77, ctx), generator=g).to(dev)
    t = torch.tensor([500], device=dev)
    opt = torch.optim.AdamW(params, lr=1e-4)
    unet.train()
    times = []
    for i in range(steps + 1):
        t1 = time.time()
        pred = unet(sample, t, context).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss.item()
        if i > 0:
            times.append(time.time() - t1)
    print(json.dumps(dict(measure="train_step", impl="diffusers + PEFT", latent_side=side, rank=rank,
                          trainable_params=sum(p.numel() for p in params),
                          seconds_per_step=sum(times) / len(times), steps=len(times), load_seconds=load,
                          torch_threads=torch.get_num_threads(), device=str(dev))))
    unet.eval()
    s2 = torch.cat([sample, sample])
    c2 = torch.cat([context, torch.randn((1, 77, ctx), generator=g).to(dev)])
    times = []
    with torch.no_grad():
        for i in range(steps + 1):
            t1 = time.time()
            unet(s2, t, c2).sample.sum().item()
            if i > 0:
                times.append(time.time() - t1)
    print(json.dumps(dict(measure="sampling_step", impl="diffusers + PEFT", latent_side=side, batch=2,
                          seconds_per_step=sum(times) / len(times), steps=len(times))))


if __name__ == "__main__":
    main()
