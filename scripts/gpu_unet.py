#!/usr/bin/env python3
"""Exports a U-Net with Stable Diffusion 1.5's shape and random weights to ONNX, for timing a GPU without
downloading a model: diffusers' UNet2DConditionModel at SD 1.5's configuration (320/640/1280/1280 channels,
two layers per block, 8 attention heads, 768-wide text states, 64x64 latents), exported with the input and
output names of optimum's export (sample, timestep, encoder_hidden_states -> out_sample). fp16 needs a CUDA
device (weights and export on the GPU); `--fp32` exports on the CPU; `--small` makes a tiny U-Net of the same
layout for a quick check of the script itself.
"""

import argparse
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", help="folder for model.onnx (and its external weights)")
    parser.add_argument("--fp32", action="store_true", help="float32 on the CPU instead of float16 on CUDA")
    parser.add_argument("--small", action="store_true", help="a tiny U-Net of the same layout")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.small:
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=4, norm_num_groups=8)
    else:
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    device, dtype = ("cpu", torch.float32) if args.fp32 else ("cuda", torch.float16)
    unet = unet.to(device=device, dtype=dtype).eval()
    width = unet.config.cross_attention_dim
    latent = unet.config.sample_size
    sample = torch.randn(2, 4, latent, latent, device=device, dtype=dtype)
    timestep = torch.tensor([500, 500], device=device, dtype=torch.int64)
    hidden = torch.randn(2, 77, width, device=device, dtype=dtype)

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.inner(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            Wrapped(unet), (sample, timestep, hidden), str(out / "model.onnx"), dynamo=False, opset_version=17,
            input_names=["sample", "timestep", "encoder_hidden_states"], output_names=["out_sample"],
            dynamic_axes={"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
                          "encoder_hidden_states": {0: "batch", 1: "sequence"}, "out_sample": {0: "batch"}},
        )
    parameters = sum(p.numel() for p in unet.parameters())
    print(f"exported {parameters / 1e6:.0f} M parameters ({dtype}) to {out / 'model.onnx'}")


if __name__ == "__main__":
    main()
