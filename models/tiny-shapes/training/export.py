"""Export tiny-shapes to the optimum ONNX layout (fp32) in models/tiny-shapes/.

Takes the EMA weights of the newest (or a given) U-Net checkpoint, the trained VAE and tokenizer, assembles a
diffusers StableDiffusionPipeline, save_pretrained()s it to WORK/export/pipeline, runs
optimum.exporters.onnx.main_export(..., task="text-to-image") into the model folder and copies the preview
decoder beside it.
    python export.py --work-dir /root/shapes-work --out ../
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

import common
import train_unet

# The default sampler shipped in scheduler/scheduler_config.json (see the model README for the measurements).
DEFAULT_SCHEDULER = EulerDiscreteScheduler
DEFAULT_SCHEDULER_KW = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                            prediction_type="epsilon", steps_offset=1, timestep_spacing="trailing")


def build_pipeline(work_dir: str, ckpt: str | None) -> tuple[StableDiffusionPipeline, int]:
    tok_dir = os.path.join(work_dir, "tokenizer")
    ckpt = ckpt or common.latest_ckpt(os.path.join(work_dir, "unet"))
    st = torch.load(ckpt, map_location="cpu")
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    te = CLIPTextModel(train_unet.text_config(len(tok), tok.bos_token_id, tok.eos_token_id))
    te.load_state_dict(st["ema_te"])
    unet = UNet2DConditionModel(**st["unet_config"])  # the checkpoint records its architecture
    unet.load_state_dict(st["ema_unet"])
    vdir = os.path.join(work_dir, "vae", "final_ft")  # decoder fine-tuned on the fixed latent space, when done
    if not os.path.isdir(vdir):
        vdir = os.path.join(work_dir, "vae", "final")
    vae = AutoencoderKL.from_pretrained(vdir)
    sch = DEFAULT_SCHEDULER(**DEFAULT_SCHEDULER_KW)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te.eval(), tokenizer=tok, unet=unet.eval(), scheduler=sch,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe, st["step"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work-dir", default="/root/shapes-work")
    ap.add_argument("--ckpt", default=None, help="U-Net checkpoint (default: newest in WORK/unet)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pipe, step = build_pipeline(a.work_dir, a.ckpt)
    pdir = os.path.join(a.work_dir, "export", "pipeline")
    shutil.rmtree(pdir, ignore_errors=True)
    pipe.save_pretrained(pdir)
    out = os.path.abspath(a.out)
    for sub in ("text_encoder", "unet", "vae_encoder", "vae_decoder", "tokenizer", "scheduler", "preview_decoder"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    if os.path.exists(os.path.join(out, "model_index.json")):
        os.remove(os.path.join(out, "model_index.json"))
    from optimum.exporters.onnx import main_export

    main_export(model_name_or_path=pdir, output=out, task="text-to-image", device="cpu", local_files_only=True)
    # like SD 1.5's config: keys other samplers read when they are built from this config (DDIM must not clip x0:
    # these latents are not in [-1, 1])
    sc_path = os.path.join(out, "scheduler", "scheduler_config.json")
    with open(sc_path) as f:
        sc = json.load(f)
    sc.update(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)
    with open(sc_path, "w") as f:
        json.dump(sc, f, indent=2, sort_keys=True)
        f.write("\n")
    prev = os.path.join(a.work_dir, "preview", "preview_decoder")
    if os.path.isdir(prev):
        shutil.copytree(prev, os.path.join(out, "preview_decoder"))
    with open(os.path.join(a.work_dir, "export", "exported.json"), "w") as f:
        json.dump({"unet_step": step, "out": out}, f)
    total = 0
    for p in sorted(glob.glob(os.path.join(out, "**", "*"), recursive=True)):
        if os.path.isfile(p) and "/training/" not in p:
            total += os.path.getsize(p)
            print(f"{os.path.getsize(p) / 1e6:8.3f} MB  {os.path.relpath(p, out)}")
    print(f"exported U-Net step {step}; model files {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
