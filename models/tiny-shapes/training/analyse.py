"""Read shape, colour, background, size and position back from a 64x64 image of the tiny-shapes world.

Run as a script to validate it on the renderer's own images (it must be >= 99 % correct there):
    python analyse.py --n 3000
"""

from __future__ import annotations

import argparse
from collections import deque

import numpy as np

import world

PALETTE = np.array([world.COLORS[c] for c in world.COLOR_NAMES], np.float32)  # [8, 3]
MASK_THRESHOLD = 40.0  # minimum RGB distance from the background for a pixel to belong to the shape
LARGE_ABOVE = (world.SIZE_PX["small"] + world.SIZE_PX["large"]) / 2.0  # px across


def nearest_colour(rgb: np.ndarray, exclude: int | None = None) -> int:
    d = ((PALETTE - rgb[None, :]) ** 2).sum(-1)
    if exclude is not None:
        d[exclude] = np.inf
    return int(np.argmin(d))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean mask."""
    h, w = mask.shape
    label = np.zeros((h, w), np.int32)
    best, best_n, cur = 0, 0, 0
    ys, xs = np.nonzero(mask)
    for y0, x0 in zip(ys.tolist(), xs.tolist()):
        if label[y0, x0]:
            continue
        cur += 1
        n = 0
        q = deque([(y0, x0)])
        label[y0, x0] = cur
        while q:
            y, x = q.popleft()
            n += 1
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not label[yy, xx]:
                    label[yy, xx] = cur
                    q.append((yy, xx))
        if n > best_n:
            best, best_n = cur, n
    return label == best if best else np.zeros_like(mask)


def template(shape: str, across: float, cx: float, cy: float) -> np.ndarray:
    """Coverage of a shape `across` px wide centred at (cx, cy), drawn like the renderer does."""
    r = across / 2.0
    x = world._GRID[None, :]
    y = world._GRID[:, None]
    if shape == "circle":
        m = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        m = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    else:
        top = cy - r
        m = (y >= top) & (y <= cy + r) & (np.abs(x - cx) <= (y - top) / 2.0)
    s = world._SS
    return m.astype(np.float32).reshape(world.IMAGE_SIZE, s, world.IMAGE_SIZE, s).mean(axis=(1, 3))


def analyse(img: np.ndarray) -> dict:
    """img: uint8 [64, 64, 3]. Returns the attributes (None where unreadable) plus measurements."""
    x = img.astype(np.float32)
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]], 0)
    bg_rgb = np.median(border, axis=0)
    bg = nearest_colour(bg_rgb)
    dist = np.sqrt(((x - bg_rgb[None, None, :]) ** 2).sum(-1))
    # adaptive: half way between the background and the most distinct pixels (robust to blur and noisy backgrounds)
    thr = max(MASK_THRESHOLD, 0.5 * float(np.percentile(dist, 99.5)))
    mask = largest_component(dist > thr)
    out = {"background": world.COLOR_NAMES[bg], "shape": None, "size": None, "color": None, "position": None}
    area = int(mask.sum())
    if area < 12:
        return out
    # colour: median of the shape's interior (pixels far from the background, away from anti-aliased edges)
    core = mask & (dist > np.percentile(dist[mask], 30))
    fg_rgb = np.median(x[core if core.sum() >= 4 else mask], axis=0)
    out["color"] = world.COLOR_NAMES[nearest_colour(fg_rgb, exclude=bg)]
    ys, xs = np.nonzero(mask)
    # bounding box in continuous coordinates (pixel edges)
    x0, x1 = xs.min(), xs.max() + 1
    y0, y1 = ys.min(), ys.max() + 1
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    out["size"] = "large" if max(w, h) > LARGE_ABOVE else "small"
    col = min(2, max(0, int(cx // world.CELL)))
    row = min(2, max(0, int(cy // world.CELL)))
    out["position"] = next(p for p, cr in world.POSITIONS.items() if cr == (col, row))
    fill = area / float(w * h)
    # shape: the template (drawn by the renderer at the measured centre and extent) that overlaps the mask best
    ext = (w + h) / 2.0
    ious = {}
    for shape in world.SHAPES:
        t = template(shape, ext, cx, cy) > 0.5
        ious[shape] = (t & mask).sum() / max(1, (t | mask).sum())
    out["shape"] = max(ious, key=ious.get)
    out.update(fill=round(fill, 3), iou={k: round(float(v), 3) for k, v in ious.items()}, width=int(w), height=int(h),
               cx=float(cx), cy=float(cy))
    return out


def score(scene: world.Scene, res: dict) -> dict:
    """Per-attribute correctness (bool) of an analysis against the scene asked for."""
    return {a: res.get(a) == getattr(scene, a) for a in world.ATTRIBUTES}


def percent_right(results: list[dict], n: int, all_key: str) -> dict:
    """Percent (one decimal) of `n` scenes with each attribute right, and under `all_key` with all of them right,
    from their score() dicts (used by benchmark.py and train_unet.py's evaluation)."""
    ok = {k: 0 for k in world.ATTRIBUTES}
    allok = 0
    for r in results:
        for k in ok:
            ok[k] += r[k]
        allok += all(r.values())
    res = {k: round(100.0 * v / n, 1) for k, v in ok.items()}
    res[all_key] = round(100.0 * allok / n, 1)
    return res


def main():
    ap = argparse.ArgumentParser(description="Validate the analyser on the renderer's own images.")
    ap.add_argument("--n", type=int, default=3024, help="number of random rendered scenes")
    ap.add_argument("--seed", type=int, default=123)
    a = ap.parse_args()
    scenes = world.all_scenes()
    rng = np.random.default_rng(a.seed)
    tot = {k: 0 for k in world.ATTRIBUTES}
    all_ok = 0
    bad = []
    for i in range(a.n):
        s = scenes[i % len(scenes)] if a.n >= len(scenes) else scenes[int(rng.integers(len(scenes)))]
        r = analyse(world.render(s, rng))
        sc = score(s, r)
        for k, v in sc.items():
            tot[k] += v
        all_ok += all(sc.values())
        if not all(sc.values()) and len(bad) < 10:
            bad.append((s, r))
    print(f"analyser on {a.n} rendered images:")
    for k in world.ATTRIBUTES:
        print(f"  {k:10s} {100.0 * tot[k] / a.n:6.2f} %")
    print(f"  {'all':10s} {100.0 * all_ok / a.n:6.2f} %")
    for s, r in bad:
        print("  wrong:", s, r)


if __name__ == "__main__":
    main()
