"""The tiny-shapes world: a renderer, the prompt grammar and its paraphrases.

One shape on a plain background in a 64x64 RGB image. Everything here is pinned: tests, clients
and the benchmark rely on these words, colours, sizes and positions.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64

SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
# Fixed RGB values of every colour (shape and background).
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 220, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOR_NAMES = tuple(COLORS)
# Size across (px): the circle's diameter, the square's side, the triangle's base and height.
SIZE_PX = {"small": 14, "large": 30}
# Position word -> (column, row) of the 3x3 grid cell holding the shape's centre (bounding-box centre).
POSITIONS = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
POSITION_NAMES = tuple(POSITIONS)
CELL = IMAGE_SIZE / 3.0
JITTER = 3.0  # the centre moves at most this many px around its nominal place

ATTRIBUTES = ("shape", "size", "color", "background", "position")


@dataclass(frozen=True)
class Scene:
    shape: str
    size: str
    color: str
    background: str
    position: str

    def as_tuple(self):
        return (self.shape, self.size, self.color, self.background, self.position)


def all_scenes() -> list[Scene]:
    """Every scene of the world (3 x 2 x 8 x 7 x 9 = 3024), in a fixed order."""
    out = []
    for shape, size, color, bg, pos in itertools.product(SHAPES, SIZES, COLOR_NAMES, COLOR_NAMES, POSITION_NAMES):
        if color != bg:
            out.append(Scene(shape, size, color, bg, pos))
    return out


def split_scenes(held_out_fraction: float = 0.1, seed: int = 0) -> tuple[list[Scene], list[Scene]]:
    """(train, held_out): held-out scenes (full attribute combinations) are never seen in training."""
    scenes = all_scenes()
    rng = random.Random(seed)
    idx = list(range(len(scenes)))
    rng.shuffle(idx)
    n_held = int(round(len(scenes) * held_out_fraction))
    held = sorted(idx[:n_held])
    held_set = set(held)
    return [s for i, s in enumerate(scenes) if i not in held_set], [scenes[i] for i in held]


def nominal_centre(size: str, col: int) -> float:
    r = SIZE_PX[size] / 2.0
    c = (col + 0.5) * CELL
    return float(min(max(c, r + 1.0 + 0.0), IMAGE_SIZE - r - 1.0 - 0.0))


def centre_range(size: str, col: int) -> tuple[float, float]:
    """Allowed centre coordinates: inside the cell, the shape inside the image."""
    r = SIZE_PX[size] / 2.0
    n = nominal_centre(size, col)
    lo = max(n - JITTER, r + 1.0, col * CELL + 1.0)
    hi = min(n + JITTER, IMAGE_SIZE - r - 1.0, (col + 1) * CELL - 1.0)
    return lo, hi


_SS = 4  # supersampling factor (anti-aliased edges)
_GRID = (np.arange(IMAGE_SIZE * _SS, dtype=np.float32) + 0.5) / _SS


def coverage(shape: str, size: str, cx: float, cy: float) -> np.ndarray:
    """Fraction of each pixel covered by the shape, float32 [64, 64]."""
    r = SIZE_PX[size] / 2.0
    x = _GRID[None, :]
    y = _GRID[:, None]
    if shape == "circle":
        m = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        m = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    elif shape == "triangle":
        top = cy - r
        m = (y >= top) & (y <= cy + r) & (np.abs(x - cx) <= (y - top) / 2.0)
    else:
        raise ValueError(shape)
    m = m.astype(np.float32).reshape(IMAGE_SIZE, _SS, IMAGE_SIZE, _SS)
    return m.mean(axis=(1, 3))


def render(scene: Scene, rng: np.random.Generator | None = None, centre: tuple[float, float] | None = None) -> np.ndarray:
    """Draw a scene: uint8 [64, 64, 3]. The centre is jittered with rng (nominal when rng is None)."""
    col, row = POSITIONS[scene.position]
    if centre is None:
        if rng is None:
            cx, cy = nominal_centre(scene.size, col), nominal_centre(scene.size, row)
        else:
            cx = rng.uniform(*centre_range(scene.size, col))
            cy = rng.uniform(*centre_range(scene.size, row))
    else:
        cx, cy = centre
    cov = coverage(scene.shape, scene.size, cx, cy)[..., None]
    fg = np.array(COLORS[scene.color], np.float32)
    bg = np.array(COLORS[scene.background], np.float32)
    img = bg * (1.0 - cov) + fg * cov
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- prompts
def canonical_prompt(scene: Scene) -> str:
    return f"a {scene.size} {scene.color} {scene.shape} {scene.position} on a {scene.background} background"


# Paraphrases: {S} size, {C} colour, {H} shape, {P} position, {IP} "in the"-position, {B} background.
PARAPHRASES = (
    "a {C} {H} {P} on a {B} background",
    "a {S} {C} {H} {IP} on a {B} background",
    "a {C} {H} {IP} on a {B} background",
    "a {S} {C} {H} on a {B} background, {IP}",
    "on a {B} background, a {S} {C} {H} {P}",
    "a {B} background with a {S} {C} {H} {IP}",
    "{S} {C} {H} {P}, {B} background",
    "a {S} {C} {H} at the {P} on a {B} background",
    "a {S} {C} {H}, {P}, on a {B} background",
)
CANONICAL_PROBABILITY = 0.6


def in_the(position: str, rng: random.Random) -> str:
    if position == "center" and rng.random() < 0.5:
        return "in the middle"
    if " " in position and rng.random() < 0.3:
        return f"in the {position} corner"
    return f"in the {position}"


def paraphrase(scene: Scene, rng: random.Random) -> str:
    """A training prompt for scene: the canonical form half of the time, else a paraphrase."""
    if rng.random() < CANONICAL_PROBABILITY:
        return canonical_prompt(scene)
    t = rng.choice(PARAPHRASES)
    return t.format(S=scene.size, C=scene.color, H=scene.shape, P=scene.position,
                    IP=in_the(scene.position, rng), B=scene.background)


def world_words() -> list[str]:
    """Every word a prompt of this world may contain (each is one token of the tokenizer)."""
    words = set(SHAPES) | set(SIZES) | set(COLOR_NAMES)
    for p in POSITION_NAMES:
        words |= set(p.split())
    words |= {"a", "on", "in", "at", "the", "with", "background", "middle", "corner", "and", "an", "of", "shape"}
    return sorted(words)


def render_pool(scenes: list[Scene], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images drawn uniformly from scenes (cycled through in shuffled order): (uint8 [n,64,64,3], int [n] scene index)."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(scenes)) for _ in range((n + len(scenes) - 1) // len(scenes))])[:n]
    imgs = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i, k in enumerate(order):
        imgs[i] = render(scenes[k], rng)
    return imgs, order


if __name__ == "__main__":
    import argparse

    from PIL import Image

    ap = argparse.ArgumentParser(description="Draw a few scenes of the world into a PNG grid.")
    ap.add_argument("--out", default="world_samples.png")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    prng = random.Random(a.seed)
    scenes = all_scenes()
    pick = [scenes[i] for i in rng.choice(len(scenes), 16, replace=False)]
    grid = np.zeros((4 * 66, 4 * 66, 3), np.uint8)
    for i, s in enumerate(pick):
        grid[(i // 4) * 66:(i // 4) * 66 + 64, (i % 4) * 66:(i % 4) * 66 + 64] = render(s, rng)
        print(paraphrase(s, prng))
    Image.fromarray(grid).save(a.out)


def ensure_pool(work_dir: str, n: int = 40000, seed: int = 0) -> dict:
    """Render (once) the training image pool from the training scenes: work_dir/pool.npz."""
    import os

    path = os.path.join(work_dir, "pool.npz")
    if not os.path.exists(path):
        train, _ = split_scenes()
        imgs, idx = render_pool(train, n, seed)
        tmp = path + ".tmp.npz"
        np.savez(tmp, images=imgs, scene=idx)
        os.replace(tmp, path)
    d = np.load(path)
    return {"images": d["images"], "scene": d["scene"]}
