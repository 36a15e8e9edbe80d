"""Small helpers shared by the training scripts: device choice, seeding, atomic checkpoints and resuming, logging."""

from __future__ import annotations

import glob
import os
import random
import time

import numpy as np
import torch


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup(seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_ckpt(path: str, state: dict, keep: int = 3) -> None:
    """Write atomically, keep the newest `keep` step checkpoints of the same directory/prefix."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    d = os.path.dirname(path)
    olds = sorted(glob.glob(os.path.join(d, "step_*.pt")))
    for p in olds[:-keep]:
        os.remove(p)


def latest_ckpt(d: str) -> str | None:
    c = sorted(glob.glob(os.path.join(d, "step_*.pt")))
    return c[-1] if c else None


def resume(d: str, device, parts: dict, log) -> tuple[int, str | None]:
    """Load the newest step checkpoint of `d`, if any, into `parts` (checkpoint key -> module or optimiser, loaded
    in that order) and log it; returns (its step, its path), or (0, None) when there is none."""
    ck = latest_ckpt(d)
    if not ck:
        return 0, None
    st = torch.load(ck, map_location=device)
    for key, part in parts.items():
        part.load_state_dict(st[key])
    step = st["step"]
    log(f"resumed from {ck} at step {step}")
    return step, ck


class Log:
    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.f = open(path, "a", buffering=1)
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")
