"""Peak memory of one `vit-extract run` against the number of images: does it grow?

    python bench/memory_growth.py --counts 1000,20000 [--json out.json]

Makes COUNT small PNGs (64×64, distinct), runs `vit-extract run` on them in a fresh process
(the small model's shape cut to depth 2 so the encoder does not dominate; all tokens stored as
float16; 2 decoding workers, as on a 2-core machine) and reads that process's own peak resident
memory (VmHWM) as it exits. The decoding workers are separate processes and are not counted.
The goal (vitcore/host_memory.py): the peak for 20,000 images within 15 % of the peak for 1,000.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

PROJECT = Path(__file__).resolve().parent.parent
MODEL = "dim=512,depth=2,heads=8"  # the small preset's width, two blocks
CHILD = """
import atexit, sys
def peak():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                print("PEAK_KB", line.split()[1], file=sys.stderr)
atexit.register(peak)
from vitcore.cli.main import main
sys.argv = ["vit-extract", *sys.argv[1:]]
main()
"""


def make_images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((64, 64), Image.Resampling.BILINEAR).save(folder / f"{i:06d}.png")


def run(folder: Path, out: Path) -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "run", str(folder), "-o", str(out), "--model", MODEL,
         "--workers", "2", "--batch-size", "32", "--overwrite", "--quiet", "--json"],
        capture_output=True, text=True, cwd=PROJECT, env={**os.environ, "PYTHONPATH": str(PROJECT)},
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"run failed: {done.stderr[-2000:]}")
    peak = next(int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("PEAK_KB"))
    result = json.loads(done.stdout)
    return {"images": result["rows"], "peak_mib": round(peak / 1024, 1),
            "seconds": round(seconds, 1), "images_per_second": round(result["images_per_second"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1000,20000")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for count in map(int, args.counts.split(",")):
            folder = Path(tmp) / f"imgs{count}"
            make_images(folder, count)
            row = run(folder, Path(tmp) / "out.h5")
            rows.append(row)
            print(json.dumps(row), flush=True)
            (Path(tmp) / "out.h5").unlink(missing_ok=True)
    print("| images | peak MiB (main process) | s | images/s |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['images']} | {row['peak_mib']} | {row['seconds']} | {row['images_per_second']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
