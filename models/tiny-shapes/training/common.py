"""Small helpers shared by the training scripts: device choice, seeding, atomic checkpoints, logging."""

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


class Log:
    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.f = open(path, "a", buffering=1)
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")
