"""Train the tiny-shapes VAE (diffusers AutoencoderKL, 64x64 RGB -> 4x16x16 latents, factor 4 with 3 blocks;
--latent-size 8 gives the earlier 4x8x8 variant, factor 8 with 4 blocks).

Deterministic given --seed; resumes from the newest checkpoint in WORK/vae/.
    python train_vae.py --work-dir /root/shapes-work16/base --steps 1500 --lr 5e-4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

import common
import world

VAE_COMMON = dict(
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    mid_block_add_attention=False,
    sample_size=64,
    scaling_factor=1.0,  # replaced by 1/std of the latent pool in encode_latents.py
)

# Architecture per latent size (64x64 images). 16x16 keeps a 14 px shape's outline (about 3.5 latent pixels
# across); 8x8 (the first shipped model) lost small triangles entirely.
VAE_CONFIGS = {
    16: dict(VAE_COMMON, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
             block_out_channels=(16, 32, 64), norm_num_groups=4),
    8: dict(VAE_COMMON, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 32, 32),
            norm_num_groups=2),  # >= 4 channels per group: plain colours survive GroupNorm as channel contrast
}


def to_tensor(imgs: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(imgs).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work-dir", default="/root/shapes-work")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--kl", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--latent-size", type=int, choices=sorted(VAE_CONFIGS), default=16,
                    help="latent height and width for 64x64 images (picks the architecture in VAE_CONFIGS)")
    ap.add_argument("--decoder-only", action="store_true",
                    help="fine-tune only the decoder of WORK/vae/final on the pre-encoded latent pool (the latent space "
                         "stays fixed, so this can run while the U-Net trains); writes WORK/vae/<--ft-name>")
    ap.add_argument("--init", default=None,
                    help="start the full training from this saved AutoencoderKL folder instead of random weights "
                         "(e.g. to retrain the encoder of an existing VAE with --fg-weight)")
    ap.add_argument("--ft-init", default="final", help="decoder fine-tune: start from WORK/vae/<this>")
    ap.add_argument("--ft-name", default="final_ft", help="decoder fine-tune: output WORK/vae/<this>")
    ap.add_argument("--fg-weight", type=float, default=0.0,
                    help="extra loss weight on the shape's pixels and a 1 px ring around them "
                         "(small shapes cover 4 %% of the image, so plain MSE lets their outline blur)")
    a = ap.parse_args()
    if a.decoder_only:
        return finetune_decoder(a)
    common.setup(a.seed, a.threads)
    dev = common.pick_device(a.device)
    out = os.path.join(a.work_dir, "vae")
    log = common.Log(os.path.join(out, "train.log"))
    pool = world.ensure_pool(a.work_dir)
    imgs = pool["images"]
    log(f"pool {imgs.shape}, device {dev}")

    if a.init:
        vae = AutoencoderKL.from_pretrained(a.init).to(dev)
        vae.register_to_config(scaling_factor=1.0)  # encode_latents.py sets it again from the new latents
    else:
        vae = AutoencoderKL(**VAE_CONFIGS[a.latent_size]).to(dev)
        with torch.no_grad():  # start with a nearly deterministic posterior (std ~0.02): decoding learns much faster
            vae.encoder.conv_out.weight[4:].mul_(0.1)
            vae.encoder.conv_out.bias[4:].fill_(-8.0)
    opt = torch.optim.AdamW(vae.parameters(), lr=a.lr, weight_decay=0.0)
    step, _ = common.resume(out, dev, {"model": vae, "opt": opt}, log)
    log(f"params {sum(p.numel() for p in vae.parameters()) / 1e6:.3f} M")
    # a fixed validation batch (held-out scenes)
    _, held = world.split_scenes()
    vimgs, vidx = world.render_pool(held, 96, seed=999)
    vx = to_tensor(vimgs, dev)

    def lr_at(s):
        if s < a.warmup:
            return a.lr * (s + 1) / a.warmup
        p = (s - a.warmup) / max(1, a.steps - a.warmup)
        return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))

    t0 = time.time()
    acc = 0.0
    while step < a.steps:
        rng = np.random.default_rng([a.seed, step])
        b = rng.integers(0, len(imgs), a.batch)
        x = to_tensor(imgs[b], dev)
        if rng.random() < 0.5:  # the world is not mirror-symmetric in its words, but pixels are: flip the image only as augmentation of the autoencoder
            x = x.flip(3)
        torch.manual_seed(a.seed * 1000003 + step)
        post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        if a.fg_weight > 0:
            weight = 1.0 + a.fg_weight * foreground_ring(x)
            err = (rec - x) ** 2 + 0.5 * (rec - x).abs()
            loss = (weight * err).sum() / (weight.sum() * 3) + a.kl * post.kl().mean()
        else:
            loss = mse + 0.5 * F.l1_loss(rec, x) + a.kl * post.kl().mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        acc += mse.item()
        if step % 20 == 0:
            psnr = 10 * math.log10(4.0 / max(acc / 20, 1e-10))
            log(f"step {step} mse {acc / 20:.5f} psnr {psnr:.2f} dB lr {lr_at(step):.2e} {(time.time() - t0) / 20:.3f}s/step")
            acc, t0 = 0.0, time.time()
        if step % a.ckpt_every == 0 or step == a.steps:
            vae.eval()
            with torch.no_grad():
                r = vae.decode(vae.encode(vx).latent_dist.mode()).sample
                vm = F.mse_loss(r, vx).item()
                rimg = ((r.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            import analyse

            ok = {k: 0 for k in world.ATTRIBUTES}
            for i in range(len(rimg)):
                sc = analyse.score(held[vidx[i]], analyse.analyse(rimg[i]))
                for k in ok:
                    ok[k] += sc[k]
            vae.train()
            log(f"val step {step} psnr {10 * math.log10(4.0 / vm):.2f} dB analyser-on-recon "
                + " ".join(f"{k} {100 * v / len(rimg):.1f}" for k, v in ok.items()))
            common.save_ckpt(os.path.join(out, f"step_{step:07d}.pt"), {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step})
            t0 = time.time()
    vae.save_pretrained(os.path.join(out, "final"))
    with open(os.path.join(out, "final", "done.json"), "w") as f:
        json.dump({"step": step}, f)
    log("done")


def foreground_ring(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] 1.0 on pixels that differ from the background (the corner pixel: shapes stay 1 px inside the
    image) and on a 1 px ring around them, else 0.0."""
    fg = ((x - x[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.05).float()
    return F.max_pool2d(fg, 3, stride=1, padding=1)


def recon_scores(rec: torch.Tensor, scenes) -> dict:
    """Analyser accuracy (%) on decoded images, per attribute."""
    import analyse

    imgs = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    ok = {k: 0 for k in world.ATTRIBUTES}
    for img, sc in zip(imgs, scenes):
        s = analyse.score(sc, analyse.analyse(img))
        for k in ok:
            ok[k] += s[k]
    return {k: 100.0 * v / len(imgs) for k, v in ok.items()}


def finetune_decoder(a):
    common.setup(a.seed, a.threads)
    dev = common.pick_device(a.device)
    out = os.path.join(a.work_dir, "vae", "decoder_ft" if a.ft_name == "final_ft" else f"decoder_{a.ft_name}")
    log = common.Log(os.path.join(out, "train.log"))
    vae = AutoencoderKL.from_pretrained(os.path.join(a.work_dir, "vae", a.ft_init)).to(dev)
    sf = vae.config.scaling_factor
    imgs = world.ensure_pool(a.work_dir)["images"]
    lat = np.load(os.path.join(a.work_dir, "latents.npz"))["latents"] / sf
    n_val = 480
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    step, _ = common.resume(out, dev, {"model": vae, "opt": opt}, log)
    vz = torch.from_numpy(lat[:n_val]).to(dev)
    vx = to_tensor(imgs[:n_val], dev)
    train_scenes, _ = world.split_scenes()
    val_scenes = [train_scenes[k] for k in world.ensure_pool(a.work_dir)["scene"][:n_val]]
    if step == 0:
        with torch.no_grad():
            r = vae.decode(vz).sample
        log(f"val start psnr {10 * math.log10(4.0 / F.mse_loss(r, vx).item()):.2f} dB analyser-on-recon "
            + " ".join(f"{k} {v:.1f}" for k, v in recon_scores(r, val_scenes).items()))
    t0, acc = time.time(), 0.0
    while step < a.steps:
        rng = np.random.default_rng([a.seed, 7, step])
        b = rng.integers(n_val, len(lat), a.batch)
        x = to_tensor(imgs[b], dev)
        rec = vae.decode(torch.from_numpy(lat[b]).to(dev)).sample
        mse = F.mse_loss(rec, x)
        if a.fg_weight > 0:
            weight = 1.0 + a.fg_weight * foreground_ring(x)
            err = (rec - x) ** 2 + 0.5 * (rec - x).abs()
            loss = (weight * err).sum() / (weight.sum() * 3)
        else:
            loss = mse + 0.5 * F.l1_loss(rec, x)
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / 20)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        acc += mse.item()
        if step % 20 == 0:
            log(f"step {step} mse {acc / 20:.5f} psnr {10 * math.log10(4.0 / max(acc / 20, 1e-10)):.2f} dB {(time.time() - t0) / 20:.3f}s/step")
            acc, t0 = 0.0, time.time()
        if step % a.ckpt_every == 0 or step == a.steps:
            with torch.no_grad():
                r = vae.decode(vz).sample
                vm = F.mse_loss(r, vx).item()
            log(f"val step {step} psnr {10 * math.log10(4.0 / vm):.2f} dB analyser-on-recon "
                + " ".join(f"{k} {v:.1f}" for k, v in recon_scores(r, val_scenes).items()))
            common.save_ckpt(os.path.join(out, f"step_{step:07d}.pt"), {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step})
    vae.save_pretrained(os.path.join(a.work_dir, "vae", a.ft_name))
    log("done")


if __name__ == "__main__":
    main()
