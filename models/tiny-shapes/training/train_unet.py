"""Train the tiny-shapes U-Net jointly with its CLIP text encoder on the pre-encoded latent pool.

DDPM noise schedule of Stable Diffusion (scaled_linear 0.00085-0.012, 1000 steps, epsilon prediction), min-SNR-5
loss weighting, AdamW with warmup and gradient clipping, EMA of the weights, classifier-free-guidance dropout of
the prompt. Deterministic given --seed; resumes from the newest checkpoint in WORK/unet/; evaluates the EMA
weights on held-out scenes every --eval-every steps (logged to WORK/unet/train.log and eval.jsonl).
    nice -n 19 python train_unet.py --work-dir /root/shapes-work
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import common
import world
from tokenizer import FastIds

TEXT_HIDDEN = 64


def text_config(vocab_size: int, bos: int, eos: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=TEXT_HIDDEN, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)


# The architecture per latent size (64x64 images; sample_size = the latent side). Every weight is independent of
# the latent size, so a U-Net trained on one latent space can initialise one for another (--init-ckpt).
UNET_COMMON = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    cross_attention_dim=TEXT_HIDDEN,
    attention_head_dim=2,  # diffusers' legacy name: the number of heads (head size 16 / 32)
    norm_num_groups=8,  # 4-8 channels per group
)
UNET_CONFIGS = {
    # no attention at the full latent resolution (16x16: a third of the step time); text enters at 8x8, 4x4 and
    # the mid block, fine enough for a 3x3 grid of positions
    16: dict(UNET_COMMON, sample_size=16,
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    # the first version (4x8x8 latents): cross-attention in every block
    8: dict(UNET_COMMON, sample_size=8, down_block_types=("CrossAttnDownBlock2D",) * 3,
            up_block_types=("CrossAttnUpBlock2D",) * 3),
}

SCHEDULER_KW = dict(num_train_timesteps=1000, timestep_spacing="trailing", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_models(tok_dir: str, unet_config: dict):
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    te = CLIPTextModel(text_config(len(tok), tok.bos_token_id, tok.eos_token_id))
    unet = UNet2DConditionModel(**unet_config)
    return tok, te, unet


class AttributeHeads(torch.nn.Module):
    """Auxiliary linear heads on the text encoder's pooled output that predict the scene's attributes from the prompt.

    Training only (not exported): a cheap, direct signal that organises the text features by attribute and role
    (shape colour vs background colour) long before the diffusion loss alone would."""

    VALUES = {"shape": world.SHAPES, "size": world.SIZES, "color": world.COLOR_NAMES, "background": world.COLOR_NAMES,
              "position": world.POSITION_NAMES}

    def __init__(self, dim: int):
        super().__init__()
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, len(v)) for k, v in self.VALUES.items()})

    @staticmethod
    def labels(scene: world.Scene, prompt: str) -> list[int]:
        """Class index per attribute, -100 where the prompt does not say it (dropped prompt, missing size)."""
        if not prompt:
            return [-100] * 5
        out = []
        for k, vals in AttributeHeads.VALUES.items():
            v = getattr(scene, k)
            out.append(vals.index(v) if (k != "size" or v in prompt.split()) else -100)
        return out

    def loss(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = pooled.new_zeros(())
        for i, h in enumerate(self.heads.values()):
            if (labels[:, i] >= 0).any():
                out = out + F.cross_entropy(h(pooled), labels[:, i], ignore_index=-100)
        return out / 5


class Ema:
    def __init__(self, modules: dict, decay: float):
        self.decay = decay
        self.shadow = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        for k, m in modules.items():
            for ps, p in zip(self.shadow[k].parameters(), m.parameters()):
                ps.mul_(d).add_(p.detach(), alpha=1 - d)
            for bs, b in zip(self.shadow[k].buffers(), m.buffers()):
                bs.copy_(b)


def make_pipeline(te, tok, unet, vae, scheduler_cls="DDIMScheduler"):
    import diffusers
    from diffusers import StableDiffusionPipeline

    sch = getattr(diffusers, scheduler_cls)(**{k: v for k, v in SCHEDULER_KW.items()
                                              if scheduler_cls == "DDIMScheduler" or k not in ("clip_sample", "set_alpha_to_one")})
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sch,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def eval_scenes(n: int, seed: int = 7) -> list[world.Scene]:
    _, held = world.split_scenes()
    r = random.Random(seed)
    return r.sample(held, n)


@torch.no_grad()
def evaluate(pipe, scenes, steps: int, guidance: float, seed: int = 0, batch: int = 64) -> dict:
    import analyse

    results = []
    for i in range(0, len(scenes), batch):
        sc = scenes[i:i + batch]
        g = torch.Generator("cpu").manual_seed(seed + i)
        ims = pipe([world.canonical_prompt(s) for s in sc], height=64, width=64, num_inference_steps=steps,
                   guidance_scale=guidance, generator=g, output_type="np").images
        results += [analyse.score(s, analyse.analyse((im * 255).round().astype(np.uint8))) for s, im in zip(sc, ims)]
    return analyse.percent_right(results, len(scenes), "all")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work-dir", default="/root/shapes-work")
    ap.add_argument("--steps", type=int, default=1_000_000, help="stop after this many steps (resume any time)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--decay-from", type=int, default=None,
                    help="anneal the learning rate with a cosine from this step to --steps, down to a tenth")
    ap.add_argument("--init-ckpt", default=None,
                    help="when WORK/unet has no checkpoint, start from the weights (not the optimiser) of this one, "
                         "e.g. to adapt a trained U-Net to a retrained VAE's latents")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--cfg-drop", type=float, default=0.1)
    ap.add_argument("--snr-gamma", type=float, default=5.0)
    ap.add_argument("--offset-noise", type=float, default=0.1)
    ap.add_argument("--aux-weight", type=float, default=0.3, help="weight of the text encoder's attribute loss")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=600)
    ap.add_argument("--eval-n", type=int, default=72)
    ap.add_argument("--eval-guidance", type=float, default=4.0)
    a = ap.parse_args()
    common.setup(a.seed, a.threads)
    dev = common.pick_device(a.device)
    out = os.path.join(a.work_dir, "unet")
    log = common.Log(os.path.join(out, "train.log"))
    tok_dir = os.path.join(a.work_dir, "tokenizer")
    d = np.load(os.path.join(a.work_dir, "latents.npz"))
    lat, scene_idx = torch.from_numpy(d["latents"]), d["scene"]
    train_scenes, _ = world.split_scenes()
    ids_of = FastIds(tok_dir)
    unet_config = UNET_CONFIGS[int(lat.shape[-1])]
    tok, te, unet = build_models(tok_dir, unet_config)
    te.to(dev).train()
    unet.to(dev).train()
    vae = AutoencoderKL.from_pretrained(os.path.join(a.work_dir, "vae", "final")).eval()
    heads = AttributeHeads(TEXT_HIDDEN).to(dev)
    params = list(unet.parameters()) + list(te.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = Ema({"unet": unet, "te": te}, a.ema)
    sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_KW.items() if k not in ("set_alpha_to_one",)})
    ac = sched.alphas_cumprod.to(dev)
    snr = ac / (1 - ac)
    step, ck = common.resume(out, dev, {"unet": unet, "te": te, "ema_unet": ema.shadow["unet"], "ema_te": ema.shadow["te"],
                                        "heads": heads, "opt": opt}, log)
    if not ck and a.init_ckpt:
        # U-Net weights by name where the shapes agree (an older U-Net may have attention where this one has none);
        # the text encoder and its attribute heads carry over whole
        st = torch.load(a.init_ckpt, map_location=dev)
        own = unet.state_dict()
        take = {k: v for k, v in st["ema_unet"].items() if k in own and own[k].shape == v.shape}
        unet.load_state_dict(take, strict=False)
        ema.shadow["unet"].load_state_dict(take, strict=False)
        te.load_state_dict(st["ema_te"])
        ema.shadow["te"].load_state_dict(st["ema_te"])
        heads.load_state_dict(st["heads"])
        log(f"initialised from the EMA weights of {a.init_ckpt}: {len(take)} of {len(own)} U-Net tensors, "
            "text encoder and heads whole")
    log(f"device {dev} latents {tuple(lat.shape)} unet {sum(p.numel() for p in unet.parameters()) / 1e6:.3f} M "
        f"text encoder {sum(p.numel() for p in te.parameters()) / 1e6:.3f} M")
    ev_scenes = eval_scenes(a.eval_n)
    t0, acc, acc_aux, n_acc = time.time(), 0.0, 0.0, 0
    while step < a.steps:
        rng = np.random.default_rng([a.seed, step])
        prng = random.Random(a.seed * 1_000_003 + step)
        b = rng.integers(0, len(lat), a.batch)
        x0 = lat[b].to(dev)
        prompts = ["" if prng.random() < a.cfg_drop else world.paraphrase(train_scenes[scene_idx[i]], prng) for i in b]
        ids = torch.tensor([ids_of(p) for p in prompts], device=dev)
        labels = torch.tensor([AttributeHeads.labels(train_scenes[scene_idx[i]], p) for i, p in zip(b, prompts)], device=dev)
        g = torch.Generator().manual_seed(a.seed * 7919 + step)
        noise = torch.randn(x0.shape, generator=g)
        if a.offset_noise > 0:  # per-image, per-channel constant: teaches the model to set plain colours from the text
            noise = noise + a.offset_noise * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=g)
        noise = noise.to(dev)
        t = torch.randint(0, 1000, (a.batch,), generator=g).to(dev)
        a_t = ac[t].view(-1, 1, 1, 1)
        xt = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
        lr = a.lr * min(1.0, (step + 1) / a.warmup)
        if a.decay_from is not None and step >= a.decay_from:
            p = min(1.0, (step - a.decay_from) / max(1, a.steps - a.decay_from))
            lr = a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
        for pg in opt.param_groups:
            pg["lr"] = lr
        te_out = te(ids)
        hs = te_out.last_hidden_state
        pred = unet(xt, t, encoder_hidden_states=hs).sample
        w = torch.clamp(snr[t], max=a.snr_gamma) / snr[t]
        loss_diff = (w * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        loss_aux = heads.loss(te_out.pooler_output, labels)
        loss = loss_diff + a.aux_weight * loss_aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema.update({"unet": unet, "te": te}, step)
        acc += loss_diff.item()
        acc_aux += loss_aux.item()
        n_acc += 1
        if step % 10 == 0:
            dt = time.time() - t0
            log(f"step {step} loss {acc / n_acc:.4f} aux {acc_aux / n_acc:.3f} gnorm {gn.item():.3f} lr {lr:.2e} {dt / n_acc:.3f}s/step "
                f"{a.batch * n_acc / dt:.0f} samples/s")
            t0, acc, acc_aux, n_acc = time.time(), 0.0, 0.0, 0
        if step % a.ckpt_every == 0:
            common.save_ckpt(os.path.join(out, f"step_{step:07d}.pt"),
                             {"unet": unet.state_dict(), "te": te.state_dict(), "ema_unet": ema.shadow["unet"].state_dict(),
                              "ema_te": ema.shadow["te"].state_dict(), "heads": heads.state_dict(), "opt": opt.state_dict(), "step": step,
                              "unet_config": unet_config, "args": vars(a)})
        if step % a.eval_every == 0:
            te0 = time.time()
            pipe = make_pipeline(ema.shadow["te"], tok, ema.shadow["unet"], vae)
            pipe.set_progress_bar_config(disable=True)
            res = evaluate(pipe, ev_scenes, 20, a.eval_guidance)
            log(f"eval step {step} (EMA, DDIM 20 steps, guidance {a.eval_guidance}, {len(ev_scenes)} held-out) {res} "
                f"{time.time() - te0:.0f}s")
            with open(os.path.join(out, "eval.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "time": time.time(), **res}) + "\n")
            t0 = time.time()


if __name__ == "__main__":
    main()
