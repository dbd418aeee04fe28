"""--engine ray against a plain run, same inputs, same cores, one run after the other in turns:
Ray's overhead on this machine, the start-up of a Ray run, and 1 against 2 actors.

Run as root (Ray advertises the machine's address, so it runs in a network namespace with loopback
only, as the tests do):

    unshare --net sh -c 'ip link set lo up; .venv/bin/python bench/ray_overhead.py --images 96 --rounds 3'

Each figure is a whole `vit-extract run` command's wall time (a fresh process, a fresh local Ray
instance for each Ray run, as a user's single command gets); the ratio is taken round by round.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


def make_images(folder: Path, count: int) -> None:
    pictures = sorted(p for p in SAMPLES.iterdir() if p.suffix in (".jpg", ".png"))
    for i in range(count):
        with Image.open(pictures[i % len(pictures)]) as picture:
            picture.convert("RGB").rotate(i % 7).save(folder / f"{i:05d}.jpg", quality=90)


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def ray_start_seconds() -> float:
    code = ("import time, ray; t = time.perf_counter(); ray.init(include_dashboard=False, configure_logging=False); "
            "ray.get(ray.remote(lambda: 1).remote()); print(time.perf_counter() - t)")
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--unit-size", type=int, default=32)
    parser.add_argument("--model", default="small")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    try:
        (work / "imgs").mkdir()
        make_images(work / "imgs", args.images)
        base = [sys.executable, "-m", "vitcore.cli", "run", str(work / "imgs"), "--model", args.model,
                "--dtype", "bfloat16", "--quiet", "--overwrite"]
        kinds = {
            "plain": base + ["-o", str(work / "plain.h5")],
            "ray, 1 actor": base + ["-o", str(work / "ray1.h5"), "--engine", "ray", "--unit-size", str(args.unit_size)],
            "ray, 2 actors": base + ["-o", str(work / "ray2.h5"), "--engine", "ray", "--unit-size", str(args.unit_size),
                                     "--actors", "2"],
        }
        timed(kinds["plain"])  # warm-up: caches, the dtype calibration
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(args.rounds):
            for kind, command in kinds.items():
                times[kind].append(timed(command))
        starts = [ray_start_seconds() for _ in range(args.rounds)]
        print(f"{args.images} images, model {args.model}, bfloat16, unit size {args.unit_size}, {args.rounds} rounds")
        print("| run | wall s (median) | min–max | ÷ plain (median of rounds) | images/s |")
        print("|---|---|---|---|---|")
        for kind, values in times.items():
            ratio = statistics.median(v / p for v, p in zip(values, times["plain"]))
            median = statistics.median(values)
            print(f"| {kind} | {median:.1f} | {min(values):.1f}–{max(values):.1f} | {ratio:.2f} | "
                  f"{args.images / median:.1f} |")
        print(f"Ray start-up (ray.init of a local instance + one task): median {statistics.median(starts):.1f} s "
              f"({min(starts):.1f}–{max(starts):.1f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
