"""Fit the cheap preview decoders for step previews: diffusion latents (VAE latents x scaling_factor, the tensor
the U-Net sees) -> RGB.

1. A linear latent->RGB matrix (4x3 + bias, least squares per pixel, nearest-upsampled to 64x64): R^2 per channel.
2. A tiny convolutional decoder (TAESD in spirit) trained on the latent pool against the pool's images,
   exported as ONNX: input `latent_sample` float32 [b, 4, h, w] (diffusion latents, NOT divided by
   scaling_factor), output `sample` float32 [b, 3, 64, 64] in [-1, 1].
Writes WORK/preview/{linear.json, report.json, ckpt.pt, preview_decoder/model.onnx + config.json}.
    nice -n 19 python train_preview.py --work-dir /root/shapes-work --steps 1500
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import world


class PreviewDecoder(nn.Module):
    """Conv 4->ch, then one conv + nearest x2 upsampling per factor of two between latent and image (two for
    16x16 latents, three for 8x8), the last at ch/2 channels, then a conv to RGB and tanh."""

    def __init__(self, factor: int, ch: int = 32):
        super().__init__()
        ups = factor.bit_length() - 1
        layers: list[nn.Module] = [nn.Conv2d(4, ch, 3, padding=1), nn.ReLU()]
        for i in range(ups):
            out = ch // 2 if i == ups - 1 else ch
            layers += [nn.Conv2d(ch, out, 3, padding=1), nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest")]
        layers.append(nn.Conv2d(ch // 2, 3, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return torch.tanh(self.net(z))


def r2(pred: np.ndarray, target: np.ndarray) -> list[float]:
    """R^2 per RGB channel; arrays [n, 3, H, W]."""
    out = []
    for c in range(3):
        t, p = target[:, c].ravel(), pred[:, c].ravel()
        out.append(float(1 - ((t - p) ** 2).sum() / ((t - t.mean()) ** 2).sum()))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work-dir", default="/root/shapes-work")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    common.setup(a.seed, a.threads)
    dev = common.pick_device(a.device)
    out = os.path.join(a.work_dir, "preview")
    os.makedirs(out, exist_ok=True)
    log = common.Log(os.path.join(out, "train.log"))
    lat = np.load(os.path.join(a.work_dir, "latents.npz"))["latents"]
    imgs = world.ensure_pool(a.work_dir)["images"]
    tgt = lambda idx: torch.from_numpy(imgs[idx]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    n_val = 500
    side = lat.shape[-1]
    factor = imgs.shape[1] // side
    tr, va = np.arange(n_val, len(lat)), np.arange(n_val)
    # 1. linear fit on 4000 training latents
    sub = tr[:4000]
    z = np.repeat(np.repeat(lat[sub], factor, axis=2), factor, axis=3)  # [n,4,64,64]
    X = np.concatenate([z.transpose(0, 2, 3, 1).reshape(-1, 4), np.ones((z.shape[0] * 4096, 1), np.float32)], 1)
    Y = tgt(sub).numpy().transpose(0, 2, 3, 1).reshape(-1, 3)
    W, *_ = np.linalg.lstsq(X, Y, rcond=None)
    zv = np.repeat(np.repeat(lat[va], factor, axis=2), factor, axis=3)
    Xv = np.concatenate([zv.transpose(0, 2, 3, 1).reshape(-1, 4), np.ones((zv.shape[0] * 4096, 1), np.float32)], 1)
    pv = (Xv @ W).reshape(len(va), 64, 64, 3).transpose(0, 3, 1, 2)
    lin_r2 = r2(pv, tgt(va).numpy())
    with open(os.path.join(out, "linear.json"), "w") as f:
        json.dump({"weights_4x3": W[:4].tolist(), "bias_3": W[4].tolist(), "r2_rgb": lin_r2,
                   "note": "rgb[-1,1] = latents(scaled) @ weights + bias, per latent pixel, nearest-upsampled x" + str(factor)}, f, indent=1)
    log(f"linear latent->RGB R^2 (val) R {lin_r2[0]:.3f} G {lin_r2[1]:.3f} B {lin_r2[2]:.3f}")
    # 2. tiny conv decoder
    m = PreviewDecoder(factor).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=a.lr)
    step = 0
    ckp = os.path.join(out, "ckpt.pt")
    if os.path.exists(ckp):
        st = torch.load(ckp, map_location=dev)
        m.load_state_dict(st["model"]); opt.load_state_dict(st["opt"]); step = st["step"]
        log(f"resumed at step {step}")
    log(f"conv preview decoder {sum(p.numel() for p in m.parameters())} params")
    t0 = time.time()
    while step < a.steps:
        rng = np.random.default_rng([a.seed, step])
        b = tr[rng.integers(0, len(tr), a.batch)]
        zb = torch.from_numpy(lat[b]).to(dev)
        # previews are shown on noisy intermediate estimates too: add a little latent noise
        zb = zb + 0.1 * torch.from_numpy(rng.standard_normal(zb.shape).astype(np.float32)).to(dev)
        loss = F.l1_loss(m(zb), tgt(b).to(dev))
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 - step / a.steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            log(f"step {step} l1 {loss.item():.4f} {(time.time() - t0) / 100:.3f}s/step")
            t0 = time.time()
            torch.save({"model": m.state_dict(), "opt": opt.state_dict(), "step": step}, ckp + ".tmp")
            os.replace(ckp + ".tmp", ckp)
    m.eval().cpu()
    with torch.no_grad():
        pc = m(torch.from_numpy(lat[va])).numpy()
    conv_r2 = r2(pc, tgt(va).numpy())
    psnr = float(10 * np.log10(4.0 / ((pc - tgt(va).numpy()) ** 2).mean()))
    import analyse

    _, held = world.split_scenes()
    sc_all = world.ensure_pool(a.work_dir)["scene"]
    train_scenes, _ = world.split_scenes()
    ok = {k: 0 for k in world.ATTRIBUTES}
    pimg = ((pc + 1) * 127.5).round().clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    for i, j in enumerate(va):
        for k, v in analyse.score(train_scenes[sc_all[j]], analyse.analyse(pimg[i])).items():
            ok[k] += v
    rep = {"linear_r2_rgb": lin_r2, "conv_r2_rgb": conv_r2, "conv_psnr_db": psnr,
           "conv_params": sum(p.numel() for p in m.parameters()),
           "analyser_on_conv_preview_pct": {k: round(100 * v / len(va), 1) for k, v in ok.items()}, "steps": step}
    log(json.dumps(rep))
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(rep, f, indent=1)
    pdir = os.path.join(out, "preview_decoder")
    os.makedirs(pdir, exist_ok=True)
    torch.onnx.export(m, (torch.zeros(1, 4, side, side),), os.path.join(pdir, "model.onnx"), input_names=["latent_sample"],
                      output_names=["sample"], dynamic_axes={"latent_sample": {0: "batch"}, "sample": {0: "batch"}},
                      opset_version=17, dynamo=False)
    with open(os.path.join(pdir, "config.json"), "w") as f:
        json.dump({"kind": "tiny-conv-preview", "input": f"latent_sample float32 [b,4,{side},{side}]: diffusion latents (VAE latents x scaling_factor, not divided)",
                   "output": "sample float32 [b,3,64,64] in [-1,1]", "r2_rgb": conv_r2, "psnr_db": psnr,
                   "linear_fallback": {"weights_4x3": W[:4].tolist(), "bias_3": W[4].tolist(), "r2_rgb": lin_r2}}, f, indent=1)
    log("exported preview decoder")


if __name__ == "__main__":
    main()
