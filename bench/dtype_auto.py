"""`--dtype auto` against each explicit dtype on this machine: is auto as fast as the best?

    python bench/dtype_auto.py [--model small] [--images 8]

Runs `vit-extract run` on copies of the sample pictures, each in a fresh process: first `--dtype
auto` with an empty measurement cache (so its calibration is paid, and its choice is printed),
then `float32` and `bfloat16`. Prints images/s of the run loop and the whole command's seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()
    samples = sorted(p for p in (PROJECT / "sample_images").iterdir() if p.suffix in (".jpg", ".png"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "imgs"
        folder.mkdir()
        for i in range(args.images):
            source = samples[i % len(samples)]
            shutil.copy(source, folder / f"{i:04d}{source.suffix}")
        env = {**os.environ, "VIT_EXTRACT_CACHE_DIR": str(Path(tmp) / "cache")}  # auto measures afresh
        for dtype in ("auto", "float32", "bfloat16"):
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "vitcore.cli", "run", str(folder), "-o", str(Path(tmp) / f"{dtype}.h5"),
                                   "--model", args.model, "--dtype", dtype, "--json"],
                                  capture_output=True, text=True, check=True, env=env, cwd=PROJECT)
            whole = time.perf_counter() - started
            summary = json.loads(done.stdout)
            chose = f" → {summary['dtype_reason']}" if summary.get("dtype_reason") else ""
            print(f"{dtype:>9}: {summary['images_per_second']:6.2f} images/s, whole command {whole:6.1f} s{chose}")


if __name__ == "__main__":
    main()
