#!/usr/bin/env python3
"""Fetch the ONNX Runtime shared library that denoised loads, from PyPI's `onnxruntime` wheel.

Downloads the pinned wheel with pip (PyPI only), checks its sha256, and extracts
`libonnxruntime.so.<version>` into `.ort/` at the repository root, plus a `libonnxruntime.so` copy that
`config.toml` points at. Runs in well under a second when the library is already there and intact.

Usage: python3 scripts/fetch-onnxruntime.py [--dest DIR]
"""
import argparse
import hashlib
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "1.32.0"
# Wheel file name and sha256 per machine architecture (the cp312 wheel; the shared library inside does not
# depend on the Python version, only the pybind module does).
WHEELS = {
    "x86_64": (
        f"onnxruntime-{VERSION}-cp312-cp312-manylinux_2_28_x86_64.whl",
        "99e1074c4b2197accd5073052a465361be17b89c093b8ffb6e6bd8f986c52df8",
        "manylinux_2_28_x86_64",
    ),
    "aarch64": (
        f"onnxruntime-{VERSION}-cp312-cp312-manylinux_2_28_aarch64.whl",
        "e36c187006e7a7c8b8d6d57f1a209dd63f52430dca6c282b177718ad6b841054",
        "manylinux_2_28_aarch64",
    ),
}
LIBRARY = f"libonnxruntime.so.{VERSION}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=root / ".ort", help="where the library goes")
    args = parser.parse_args()
    dest: Path = args.dest
    machine = platform.machine().lower()
    if sys.platform != "linux" or machine not in WHEELS:
        print(f"error: no pinned onnxruntime wheel for {sys.platform}/{machine}; "
              "set ORT_DYLIB_PATH to an ONNX Runtime >= 1.31 library", file=sys.stderr)
        return 1
    wheel_name, wheel_sha, wheel_platform = WHEELS[machine]
    stamp = dest / f"{LIBRARY}.sha256"
    target = dest / LIBRARY
    link = dest / "libonnxruntime.so"
    if target.exists() and link.exists() and stamp.exists() and stamp.read_text().strip() == sha256(target):
        print(f"onnxruntime {VERSION}: {target} (already present)")
        return 0

    dest.mkdir(parents=True, exist_ok=True)
    cache = dest / "wheels"
    cache.mkdir(exist_ok=True)
    wheel = cache / wheel_name
    if not wheel.exists() or sha256(wheel) != wheel_sha:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "--platform", wheel_platform,
               "--dest", str(cache), f"onnxruntime=={VERSION}"]
        print("fetching", wheel_name, "from PyPI")
        subprocess.run(cmd, check=True)
    actual = sha256(wheel)
    if actual != wheel_sha:
        wheel.unlink()
        print(f"error: {wheel_name} has sha256 {actual}, expected {wheel_sha}", file=sys.stderr)
        return 1
    with zipfile.ZipFile(wheel) as archive, tempfile.TemporaryDirectory(dir=dest) as tmp:
        member = f"onnxruntime/capi/{LIBRARY}"
        extracted = Path(archive.extract(member, tmp))
        shutil.move(str(extracted), target)
    shutil.copyfile(target, link)
    stamp.write_text(sha256(target) + "\n")
    print(f"onnxruntime {VERSION}: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
