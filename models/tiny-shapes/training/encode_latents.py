"""Encode the image pool once with the trained VAE: WORK/latents.npz (latent means x scaling_factor).

Also sets the VAE's scaling_factor to 1/std of the pool's latents (saved to WORK/vae/final) and reports how well the
VAE keeps the world's attributes (the analyser on reconstructions of held-out scenes).
    nice -n 19 python encode_latents.py --work-dir /root/shapes-work
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from diffusers import AutoencoderKL

import analyse
import common
import world
from train_vae import to_tensor


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work-dir", default="/root/shapes-work")
    ap.add_argument("--vae", default=None, help="default: WORK/vae/final")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=256)
    a = ap.parse_args()
    common.setup(0, a.threads)
    dev = common.pick_device(a.device)
    vdir = a.vae or os.path.join(a.work_dir, "vae", "final")
    vae = AutoencoderKL.from_pretrained(vdir).to(dev).eval()
    pool = world.ensure_pool(a.work_dir)
    imgs = pool["images"]
    side = imgs.shape[1] // 2 ** (len(vae.config.block_out_channels) - 1)
    lat = np.empty((len(imgs), vae.config.latent_channels, side, side), np.float32)
    with torch.no_grad():
        for i in range(0, len(imgs), a.batch):
            x = to_tensor(imgs[i:i + a.batch], dev)
            lat[i:i + a.batch] = vae.encode(x).latent_dist.mode().cpu().numpy()
    std = float(lat.std())
    mean_c = lat.mean(axis=(0, 2, 3))
    sf = 1.0 / std
    print(f"latent std {std:.4f} per-channel mean {np.round(mean_c, 3).tolist()} -> scaling_factor {sf:.5f}")
    vae.register_to_config(scaling_factor=sf)
    vae.save_pretrained(vdir)
    np.savez(os.path.join(a.work_dir, "latents.npz"), latents=lat * sf, scene=pool["scene"])
    # attribute fidelity of the VAE on held-out scenes
    _, held = world.split_scenes()
    vimgs, vidx = world.render_pool(held, 600, seed=4242)
    with torch.no_grad():
        r = vae.decode(vae.encode(to_tensor(vimgs, dev)).latent_dist.mode()).sample
    rimg = ((r.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    ok = {k: 0 for k in world.ATTRIBUTES}
    for i in range(len(rimg)):
        for k, v in analyse.score(held[vidx[i]], analyse.analyse(rimg[i])).items():
            ok[k] += v
    mse = float(((rimg.astype(np.float32) - vimgs.astype(np.float32)) ** 2).mean())
    psnr = 10 * np.log10(255.0 ** 2 / mse)
    rep = {"scaling_factor": sf, "latent_std": std, "recon_psnr_db": round(float(psnr), 2),
           "analyser_on_recon_pct": {k: round(100.0 * v / len(rimg), 2) for k, v in ok.items()}, "n": len(rimg)}
    print(json.dumps(rep, indent=1))
    with open(os.path.join(a.work_dir, "vae_report.json"), "w") as f:
        json.dump(rep, f, indent=1)


if __name__ == "__main__":
    main()
