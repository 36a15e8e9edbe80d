"""Prompt-adherence benchmark for tiny-shapes (GenEval-style, for this world).

Generates one image per held-out scene (full attribute combinations never seen in training) from its canonical
prompt, reads the attributes back with analyse.py and prints per-attribute accuracy.

The image source is pluggable (class ImageSource). Available now:
  --source ort    the exported ONNX model through optimum's ORTStableDiffusionPipeline (CPU)
Example:
    python benchmark.py --model .. --steps 20
    python benchmark.py --model .. --steps 4 --scheduler DPMSolverMultistepScheduler
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

import analyse
import world


class ImageSource:
    """Something that turns prompts into 64x64 RGB uint8 images."""

    name = "abstract"

    def generate(self, prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        raise NotImplementedError


class OrtSource(ImageSource):
    """The exported model through optimum's ORTStableDiffusionPipeline."""

    def __init__(self, model_dir: str, steps: int, guidance: float, scheduler: str | None, threads: int):
        import onnxruntime as ort
        from optimum.onnxruntime import ORTStableDiffusionPipeline

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.pipe = ORTStableDiffusionPipeline.from_pretrained(model_dir, provider="CPUExecutionProvider", session_options=so)
        if scheduler:
            import diffusers

            self.pipe.scheduler = getattr(diffusers, scheduler).from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)
        self.steps, self.guidance = steps, guidance
        self.name = f"ort:{type(self.pipe.scheduler).__name__}"

    def generate(self, prompts, seeds):
        import torch

        out = []
        for p, s in zip(prompts, seeds):
            g = torch.Generator("cpu").manual_seed(s)
            im = self.pipe(p, height=64, width=64, num_inference_steps=self.steps, guidance_scale=self.guidance,
                           generator=g, output_type="np").images[0]
            out.append((np.asarray(im) * 255).round().clip(0, 255).astype(np.uint8))
        return out


def held_out_prompts(n: int | None, seed: int) -> list[world.Scene]:
    _, held = world.split_scenes()
    if n is None or n >= len(held):
        return held
    return random.Random(seed).sample(held, n)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    ap.add_argument("--source", default="ort", choices=["ort"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=2.5)
    ap.add_argument("--scheduler", default=None, help="diffusers scheduler class name (default: the model's)")
    ap.add_argument("--n", type=int, default=None, help="number of held-out scenes (default: all 302)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", default=None, help="write a PNG grid of the images here")
    ap.add_argument("--json", default=None, help="write the scores as JSON here")
    a = ap.parse_args()
    scenes = held_out_prompts(a.n, a.seed)
    src = OrtSource(a.model, a.steps, a.guidance, a.scheduler, a.threads)
    prompts = [world.canonical_prompt(s) for s in scenes]
    seeds = [a.seed * 100_000 + i for i in range(len(scenes))]
    t0 = time.time()
    imgs = src.generate(prompts, seeds)
    dt = (time.time() - t0) / len(imgs)
    ok = {k: 0 for k in world.ATTRIBUTES}
    allok = 0
    for s, im in zip(scenes, imgs):
        r = analyse.score(s, analyse.analyse(im))
        for k in ok:
            ok[k] += r[k]
        allok += all(r.values())
    n = len(scenes)
    res = {k: round(100.0 * v / n, 1) for k, v in ok.items()}
    res["all attributes"] = round(100.0 * allok / n, 1)
    print(f"tiny-shapes benchmark: {n} held-out canonical prompts, source {src.name}, {a.steps} steps, "
          f"guidance {a.guidance}, {dt:.3f} s/image")
    for k, v in res.items():
        print(f"  {k:15s} {v:5.1f} %")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"n": n, "source": src.name, "steps": a.steps, "guidance": a.guidance, "s_per_image": dt, **res}, f, indent=1)
    if a.save:
        from PIL import Image

        k = int(np.ceil(np.sqrt(min(64, n))))
        grid = np.zeros((k * 66, k * 66, 3), np.uint8)
        for i, im in enumerate(imgs[:k * k]):
            grid[(i // k) * 66:(i // k) * 66 + 64, (i % k) * 66:(i % k) * 66 + 64] = im
        Image.fromarray(grid).save(a.save)


if __name__ == "__main__":
    main()
