"""Prompt-adherence benchmark for tiny-shapes (GenEval-style, for this world).

Generates one image per held-out scene (full attribute combinations never seen in training) from its canonical
prompt, reads the attributes back with analyse.py and prints per-attribute accuracy.

The image source is pluggable (class ImageSource):
  --source ort      the exported ONNX model through optimum's ORTStableDiffusionPipeline (CPU)
  --source server   a running denoised server (`--server URL`, default http://127.0.0.1:8080): the Rust engine
                    through POST /v1/images; `--scheduler` then takes denoised's names (euler, dpmpp_2m, …)
Example:
    python benchmark.py --model .. --steps 20
    python benchmark.py --model .. --steps 4 --scheduler DPMSolverMultistepScheduler
    python benchmark.py --source server --steps 20          # needs only numpy and pillow
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


class ServerSource(ImageSource):
    """A running denoised server: submits every prompt as a job, then collects the pictures."""

    def __init__(self, url: str, model: str | None, steps: int, guidance: float, scheduler: str | None):
        self.url, self.model, self.steps, self.guidance, self.scheduler = url.rstrip("/"), model, steps, guidance, scheduler
        self.name = f"server:{scheduler or 'default'}"
        self.job_seconds: list[float] = []

    def _call(self, method: str, path: str, body: dict | None = None) -> bytes:
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"content-type": "application/json"} if data else {})
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.read()

    def generate(self, prompts, seeds):
        import io

        from PIL import Image

        ids = []
        for p, s in zip(prompts, seeds):
            body = {"prompt": p, "seed": s, "steps": self.steps, "guidance_scale": self.guidance, "preview_every": 0}
            if self.model:
                body["model"] = self.model
            if self.scheduler:
                body["scheduler"] = self.scheduler
            ids.append(json.loads(self._call("POST", "/v1/images", body))["id"])
        out = []
        for job_id in ids:
            while True:
                job = json.loads(self._call("GET", f"/v1/jobs/{job_id}"))
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.02)
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
            started = _parse_time(job["started_at"])
            self.job_seconds.append(_parse_time(job["finished_at"]) - started)
            png = self._call("GET", job["images"][0]["url"])
            out.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
        return out


def _parse_time(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def held_out_prompts(n: int | None, seed: int) -> list[world.Scene]:
    _, held = world.split_scenes()
    if n is None or n >= len(held):
        return held
    return random.Random(seed).sample(held, n)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    ap.add_argument("--source", default="ort", choices=["ort", "server"])
    ap.add_argument("--server", default="http://127.0.0.1:8080", help="with --source server: the server's URL")
    ap.add_argument("--server-model", default=None, help="with --source server: the model id (default: the server's)")
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
    if a.source == "server":
        src = ServerSource(a.server, a.server_model, a.steps, a.guidance, a.scheduler)
    else:
        src = OrtSource(a.model, a.steps, a.guidance, a.scheduler, a.threads)
    prompts = [world.canonical_prompt(s) for s in scenes]
    seeds = [a.seed * 100_000 + i for i in range(len(scenes))]
    t0 = time.time()
    imgs = src.generate(prompts, seeds)
    dt = (time.time() - t0) / len(imgs)
    n = len(scenes)
    res = analyse.percent_right([analyse.score(s, analyse.analyse(im)) for s, im in zip(scenes, imgs)], n, "all attributes")
    print(f"tiny-shapes benchmark: {n} held-out canonical prompts, source {src.name}, {a.steps} steps, "
          f"guidance {a.guidance}, {dt:.3f} s/image")
    for k, v in res.items():
        print(f"  {k:15s} {v:5.1f} %")
    if isinstance(src, ServerSource) and src.job_seconds:
        median = sorted(src.job_seconds)[len(src.job_seconds) // 2]
        print(f"  server-side job time (started -> finished, median): {median * 1000:.0f} ms")
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
