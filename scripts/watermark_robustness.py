"""Tree-Ring watermark robustness, measured as the paper does (Wen et al. 2023, section 4): N watermarked and
N clean pictures from the default model's held-out benchmark prompts (the same prompt and seed for a pair;
only the watermark differs), each attacked, then checked with POST /v1/watermarks/detect. For each attack:
AUC of the detection score (minus the distance, as the paper) over watermarked against clean pictures, the
true-positive rate at 1 % false positives (threshold from the clean pictures' scores), and the server's own
verdicts (p < threshold) on both sets.

Attacks (the paper's, on 64x64 pictures): none; JPEG quality 25; random crop of 75 % of the area (aspect 0.75)
resized back; Gaussian blur radius 4; Gaussian noise sigma 0.1 (of the [0, 1] range); colour jitter
(brightness factor uniform in [0, 7], the paper's brightness 6); rotation by 75 degrees.

Needs only numpy and Pillow (scripts/watermark-robustness makes the venv) and the server over HTTP.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time
import urllib.error
import urllib.request

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models", "tiny-shapes", "training"))
import world  # noqa: E402  (the benchmark's prompts)


class Server:
    def __init__(self, url: str, key: str | None):
        self.url, self.key = url.rstrip("/"), key

    def call(self, method: str, path: str, body: dict | None = None) -> bytes:
        headers = {"content-type": "application/json"} if body is not None else {}
        if self.key:
            headers["authorization"] = f"Bearer {self.key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{method} {path}: {e.code} {e.read().decode(errors='replace')}") from e

    def generate(self, prompt: str, seed: int, steps: int, watermark: bool) -> Image.Image:
        body = {"prompt": prompt, "seed": seed, "steps": steps, "preview_every": 0, "watermark": watermark}
        job = json.loads(self.call("POST", "/v1/images", body))
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.02)
            job = json.loads(self.call("GET", f"/v1/jobs/{job['id']}"))
        if job["status"] != "succeeded":
            raise RuntimeError(f"job {job['id']} ended {job['status']}: {job.get('error')}")
        has = job["params"].get("watermark")
        if bool(has) != watermark:
            raise RuntimeError(f"job {job['id']}: asked watermark={watermark}, got {has}")
        return Image.open(io.BytesIO(self.call("GET", job["images"][0]["url"]))).convert("RGB")

    def detect(self, picture: Image.Image, key: str, inversion_steps: int | None) -> tuple[float, float]:
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        body = {"image": base64.b64encode(buffer.getvalue()).decode()}
        if inversion_steps:
            body["inversion_steps"] = inversion_steps
        answer = json.loads(self.call("POST", "/v1/watermarks/detect", body))
        for result in answer["keys"]:
            if result["key"] == key:
                return result["distance"], result["p_value"]
        raise RuntimeError(f"key {key} is not among the keys this caller may test: {answer['keys']}")


def attacks(rng: np.random.Generator):
    def jpeg(im):
        buffer = io.BytesIO()
        im.save(buffer, format="JPEG", quality=25)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")

    def crop(im):
        w, h = im.size
        area = 0.75 * w * h
        cw, ch = int(round(np.sqrt(area * 0.75))), int(round(np.sqrt(area / 0.75)))
        cw, ch = min(cw, w), min(ch, h)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return im.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BILINEAR)

    def noise(im):
        a = np.asarray(im).astype(np.float64) / 255.0
        a = np.clip(a + rng.normal(0.0, 0.1, a.shape), 0.0, 1.0)
        return Image.fromarray((a * 255.0 + 0.5).astype(np.uint8))

    def brightness(im):
        return ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.0, 7.0)))

    return [
        ("none", lambda im: im),
        ("JPEG q25", jpeg),
        ("crop 75 % + rescale", crop),
        ("blur r4", lambda im: im.filter(ImageFilter.GaussianBlur(radius=4))),
        ("noise σ0.1", noise),
        ("brightness [0, 7]", brightness),
        ("rotation 75°", lambda im: im.rotate(75)),
    ]


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a watermarked picture > score of a clean one), ties counting half (Mann-Whitney)."""
    greater = (positive[:, None] > negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(greater + 0.5 * ties)


def tpr_at_fpr(positive: np.ndarray, negative: np.ndarray, fpr: float) -> float:
    """True-positive rate at the strictest threshold that lets at most `fpr` of the clean scores above it."""
    allowed = int(np.floor(fpr * len(negative)))
    threshold = np.sort(negative)[::-1][allowed] if allowed < len(negative) else -np.inf
    return float((positive > threshold).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="http://127.0.0.1:8080")
    ap.add_argument("--key", default=None, help="API key to call with (its own watermark is tested with --test-key)")
    ap.add_argument("--test-key", default="server", help="the key id whose watermark is measured (default: server)")
    ap.add_argument("--n", type=int, default=100, help="pictures per set (held-out prompts, cycled)")
    ap.add_argument("--steps", type=int, default=20, help="generation steps")
    ap.add_argument("--inversion-steps", type=int, default=None, help="default: the server's")
    ap.add_argument("--threshold", type=float, default=0.01, help="p-value threshold of the verdict columns")
    ap.add_argument("--seed", type=int, default=0, help="seeds pictures (seed·100000 + i) and attacks")
    ap.add_argument("--json", default=None, help="write every score here")
    a = ap.parse_args()

    server = Server(a.server, a.key)
    _, held = world.split_scenes()
    prompts = [world.canonical_prompt(held[i % len(held)]) for i in range(a.n)]
    started = time.time()
    marked, clean = [], []
    for i, prompt in enumerate(prompts):
        seed = a.seed * 100_000 + i
        marked.append(server.generate(prompt, seed, a.steps, True))
        clean.append(server.generate(prompt, seed, a.steps, False))
    generated = time.time() - started
    rng = np.random.default_rng(a.seed)
    rows, scores = [], {}
    for name, attack in attacks(rng):
        t0 = time.time()
        w = [server.detect(attack(im), a.test_key, a.inversion_steps) for im in marked]
        c = [server.detect(attack(im), a.test_key, a.inversion_steps) for im in clean]
        wd, cd = np.array([d for d, _ in w]), np.array([d for d, _ in c])
        wp, cp = np.array([p for _, p in w]), np.array([p for _, p in c])
        row = {
            "attack": name,
            "auc": auc(-wd, -cd),
            "tpr_at_1pct_fpr": tpr_at_fpr(-wd, -cd, 0.01),
            "auc_p": auc(-wp, -cp),
            "verdict_tpr": float((wp < a.threshold).mean()),
            "verdict_fpr": float((cp < a.threshold).mean()),
            "seconds": time.time() - t0,
        }
        rows.append(row)
        scores[name] = {"marked": w, "clean": c}
        print(f"{name:<22} AUC {row['auc']:.3f}  TPR@1%FPR {row['tpr_at_1pct_fpr']:.3f}  AUC(p) {row['auc_p']:.3f}  "
              f"p<{a.threshold}: {row['verdict_tpr']:.3f} of watermarked, {row['verdict_fpr']:.3f} of clean  "
              f"({row['seconds']:.0f} s)", flush=True)
    print(f"\n{a.n} watermarked + {a.n} clean pictures, {a.steps} steps, generated in {generated:.0f} s\n")
    print(f"| attack | AUC | TPR at 1 % FPR | watermarked with p < {a.threshold} | clean with p < {a.threshold} |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['attack']} | {r['auc']:.3f} | {r['tpr_at_1pct_fpr']:.3f} | {r['verdict_tpr']:.3f} | {r['verdict_fpr']:.3f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "scores": scores, "n": a.n, "steps": a.steps}, f)


if __name__ == "__main__":
    main()
