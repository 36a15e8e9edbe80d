"""Edits on the default model (models/tiny-shapes), judged by the model's own benchmark analyser
(models/tiny-shapes/training/analyse.py, which reads shape, colour, background, size and position back from a
picture): inpainting a region with a new shape draws what the prompt asks there and leaves every pixel
outside the mask within 2/255 of the input; img2img at low strength keeps the input's composition even when
the prompt asks for another picture; DiffEdit (`mask: "auto"`) recolours a generated shape by prompt and keeps the
background and every pixel outside the mask it computed.

Each check runs over 8 seeds (one job, n = 8) and asserts a rate, because the model itself is imperfect
(see its README for its text-to-image scores); the thresholds sit at or below the rates measured when the test
was written (inpainting 8/8 on shape, colour, size and position; img2img variations 8/8; against another
prompt, unguided, position 8/8, size 8/8, shape 7/8 at strength 0.2 and 0/8 at 1.0), and well above chance
(1/3 for shape, 1/8 for colour, 1/9 for position).
"""

import base64
import io
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, finished_job, running_server

sys.path.insert(0, str(ROOT / "models" / "tiny-shapes" / "training"))
import analyse  # noqa: E402
import world  # noqa: E402

DEFAULT_MODEL = f"""
[[models]]
name = "tiny-shapes"
path = "{ROOT / 'models' / 'tiny-shapes'}"
guidance_scale = 2.5
"""

N = 8


@pytest.fixture(scope="module")
def shapes_server():
    with running_server(DEFAULT_MODEL) as started:
        yield started


def png_b64(pixels: np.ndarray) -> str:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def run_edit(base: str, key: str, body: dict) -> list[np.ndarray]:
    return run_job(base, key, "/v1/edits", body)[0]


def run_job(base: str, key: str, route: str, body: dict) -> tuple[list[np.ndarray], dict]:
    """Submits to `route`, waits, returns the pictures and the finished job."""
    job, files = finished_job(base, key, route, body)
    return [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in files], job


def test_inpainting_draws_the_prompted_shape_and_keeps_everything_else(shapes_server):
    base, key = shapes_server
    original_scene = world.Scene(shape="circle", size="large", color="red", background="blue", position="left")
    original = world.render(original_scene)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255  # the right half: empty blue background in the original
    wanted = world.Scene(shape="square", size="large", color="yellow", background="blue", position="right")
    pictures = run_edit(base, key, {
        "mode": "inpaint", "model": "tiny-shapes", "image": png_b64(original), "mask": png_b64(mask),
        "prompt": world.canonical_prompt(wanted), "seed": 100, "n": N,
    })
    hits = {"shape": 0, "color": 0, "position": 0, "size": 0}
    for picture in pictures:
        outside = mask == 0
        worst = np.abs(picture.astype(int) - original.astype(int))[outside].max()
        assert worst <= 2, f"a pixel outside the mask moved by {worst}/255"
        # Read only the repainted region: everything outside it becomes plain background.
        region = picture.copy()
        region[outside] = world.COLORS["blue"]
        found = analyse.analyse(region)
        for attribute in hits:
            hits[attribute] += found[attribute] == getattr(wanted, attribute)
    print("inpainting hits of", N, hits)
    assert hits["color"] >= 6, hits
    assert hits["position"] >= 7, hits
    assert hits["size"] >= 6, hits
    assert hits["shape"] >= 4, hits


def kept_attributes(scene: world.Scene, pictures: list[np.ndarray]) -> dict:
    kept = {attribute: 0 for attribute in world.ATTRIBUTES}
    for picture in pictures:
        found = analyse.analyse(picture)
        for attribute in kept:
            kept[attribute] += found[attribute] == getattr(scene, attribute)
    return kept


def mean_change(original: np.ndarray, pictures: list[np.ndarray]) -> float:
    return float(np.mean([np.abs(p.astype(int) - original.astype(int)).mean() for p in pictures]))


def test_img2img_at_strength_0_3_keeps_the_composition(shapes_server):
    base, key = shapes_server
    scene = world.Scene(shape="square", size="large", color="orange", background="purple", position="top right")
    original = world.render(scene)
    edit = {"mode": "img2img", "model": "tiny-shapes", "image": png_b64(original), "n": N}

    # A variation: the picture's own prompt, default guidance. Everything is kept.
    variations = run_edit(base, key, {**edit, "strength": 0.3, "prompt": world.canonical_prompt(scene), "seed": 200})
    kept = kept_attributes(scene, variations)
    print("img2img 0.3, own prompt: kept of", N, kept, "mean |change|", round(mean_change(original, variations), 2))
    assert all(count >= 7 for count in kept.values()), kept

    # A prompt for a wholly different picture, without classifier-free guidance. This model moves plain colours
    # toward the prompt at any strength (likely its offset-noise training: a uniform colour shift looks like noise;
    # diffusers' img2img pipeline on the same graphs does the same: at 0.2 orange on purple comes back as yellow
    # on black), so what strength 0.2 must keep is the layout: where the shape is, how big, what it is. At
    # strength 1.0 (the same request from pure noise) the layout is the prompt's.
    other_scene = world.Scene(shape="circle", size="small", color="white", background="green", position="bottom left")
    unguided = {**edit, "prompt": world.canonical_prompt(other_scene), "seed": 300, "guidance_scale": 1.0}
    low = run_edit(base, key, {**unguided, "strength": 0.2})
    full = run_edit(base, key, {**unguided, "strength": 1.0})
    kept_low, kept_full = kept_attributes(scene, low), kept_attributes(scene, full)
    print("img2img, other prompt, guidance 1: kept at 0.2", kept_low, "kept at 1.0", kept_full)
    assert kept_low["position"] >= 7, kept_low
    assert kept_low["size"] >= 7, kept_low
    assert kept_low["shape"] >= 5, kept_low
    assert kept_full["position"] <= 2 and kept_full["size"] <= 2, kept_full
    assert kept_full["background"] <= 2, kept_full


def test_outpainting_as_multipart_extends_the_canvas_and_keeps_the_picture(shapes_server):
    base, key = shapes_server
    scene = world.Scene(shape="circle", size="large", color="red", background="blue", position="center")
    original = world.render(scene)
    out = io.BytesIO()
    Image.fromarray(original).save(out, format="PNG")
    headers = {"Authorization": f"Bearer {key}"}
    response = httpx.post(
        f"{base}/v1/edits", headers=headers, timeout=60,
        files={"image": ("in.png", out.getvalue(), "image/png")},
        data={"mode": "outpaint", "model": "tiny-shapes", "right": "32", "seed": "5",
              "prompt": "a large red circle left on a blue background"},
    )
    assert response.status_code == 202, response.text
    url = f"{base}/v1/jobs/{response.json()['id']}"
    deadline = time.time() + 120
    while (job := httpx.get(url, headers=headers).json())["status"] in ("queued", "running"):
        assert time.time() < deadline
        time.sleep(0.1)
    assert job["status"] == "succeeded", job
    picture = np.asarray(Image.open(io.BytesIO(httpx.get(base + job["images"][0]["url"], headers=headers).content)).convert("RGB"))
    assert picture.shape == (64, 96, 3)
    worst = np.abs(picture[:, :64].astype(int) - original.astype(int)).max()
    assert worst <= 2, f"the original picture moved by {worst}/255"
    # The new strip continues the blue background.
    strip = picture[:, 72:].reshape(-1, 3).mean(axis=0)
    assert np.abs(strip - np.array(world.COLORS["blue"])).max() < 40, strip


# DiffEdit: (picture's scene, the shape's new colour). Large and small shapes, every shape, several positions.
RECOLOURS = [
    (world.Scene(shape="circle", size="large", color="red", background="blue", position="left"), "yellow"),
    (world.Scene(shape="square", size="large", color="green", background="yellow", position="top right"), "purple"),
    (world.Scene(shape="triangle", size="large", color="white", background="black", position="center"), "orange"),
    (world.Scene(shape="circle", size="small", color="blue", background="white", position="bottom left"), "red"),
    (world.Scene(shape="square", size="small", color="yellow", background="purple", position="top"), "green"),
    (world.Scene(shape="circle", size="large", color="orange", background="green", position="right"), "blue"),
]
SEEDS = 4


def diffedit_rates(base: str, key: str, extra: dict) -> dict:
    """Generates each scene of RECOLOURS with the model (SEEDS seeds), recolours its shape with DiffEdit, and
    counts what the analyser reads; checks on the way that no pixel outside the computed mask moves."""
    headers = {"Authorization": f"Bearer {key}"}
    counts = {"generated": 0, **{attribute: 0 for attribute in world.ATTRIBUTES}}
    covered, areas = [], []
    for scene, colour in RECOLOURS:
        wanted = world.Scene(scene.shape, scene.size, colour, scene.background, scene.position)
        for seed in range(SEEDS):
            [picture], _ = run_job(base, key, "/v1/images", {
                "prompt": world.canonical_prompt(scene), "model": "tiny-shapes", "seed": 1000 + seed,
            })
            found = analyse.analyse(picture)
            counts["generated"] += all(found[a] == getattr(scene, a) for a in world.ATTRIBUTES)
            [edited], job = run_job(base, key, "/v1/edits", {
                "mode": "inpaint", "model": "tiny-shapes", "image": png_b64(picture), "mask": "auto",
                "source_prompt": world.canonical_prompt(scene), "prompt": world.canonical_prompt(wanted),
                "seed": 2000 + seed, **extra,
            })
            assert job["progress"]["total"] == 20 + 10, job["progress"]
            data = httpx.get(base + job["mask"]["url"], headers=headers).content
            mask = np.asarray(Image.open(io.BytesIO(data)).convert("L")) >= 128
            assert mask.shape == (64, 64) and mask.any(), "the computed mask marks nothing"
            worst = np.abs(edited.astype(int) - picture.astype(int)).max(axis=-1)[~mask].max(initial=0)
            assert worst <= 2, f"a pixel outside the computed mask moved by {worst}/255"
            background = np.array(world.COLORS[scene.background], float)
            shape_pixels = np.sqrt(((picture.astype(float) - background) ** 2).sum(-1)) > analyse.MASK_THRESHOLD
            covered.append((mask & shape_pixels).sum() / max(shape_pixels.sum(), 1))
            areas.append(mask.mean())
            found = analyse.analyse(edited)
            for attribute in world.ATTRIBUTES:
                counts[attribute] += found[attribute] == getattr(wanted, attribute)
    counts["shape_covered"] = round(float(np.mean(covered)), 2)
    counts["mask_area"] = round(float(np.mean(areas)), 2)
    return counts


def test_diffedit_recolours_the_shape_and_keeps_the_background(shapes_server):
    base, key = shapes_server
    total = len(RECOLOURS) * SEEDS
    # diffusers' defaults (mask_threshold 3): the mask keeps to the middle of the shape; measured colour 20/24
    # (the four misses: the white triangle's uncovered rim turns orange into yellow for the analyser), shape
    # 23/24, background, size and position 24/24, 89 % of the shape's pixels in a mask of 15 % of the picture.
    default = diffedit_rates(base, key, {})
    print("DiffEdit, mask_threshold 3, of", total, default)
    assert default["generated"] >= total - 2, default
    assert default["color"] >= total * 2 // 3, default
    assert default["background"] == total, default
    assert min(default["position"], default["size"]) >= total - 2, default
    assert default["shape"] >= total - 3, default
    assert default["shape_covered"] >= 0.75 and default["mask_area"] <= 0.35, default
    # A lower threshold takes the whole shape on this model: measured colour 24/24, everything else 24/24, 97 %
    # of the shape's pixels in a mask of 26 % of the picture.
    wide = diffedit_rates(base, key, {"mask_threshold": 1.0})
    print("DiffEdit, mask_threshold 1, of", total, wide)
    assert wide["color"] >= total - 2, wide
    assert min(wide[a] for a in ("background", "position", "size", "shape")) >= total - 2, wide
    assert wide["shape_covered"] >= 0.9 and wide["mask_area"] <= 0.45, wide
