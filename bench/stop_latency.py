"""How long `vit-extract run` takes to exit after one SIGINT or SIGTERM, with its decoding workers
running normally and with one of them stuck in a read that never returns (a hung mount).

    python bench/stop_latency.py [--rounds 3]

The README promises a clean stop after the current batch, and at most about 3 s of waiting for a
batch that does not come. The tests check that the run stops and that no worker outlives it; this
measures the time, from the signal to the process's exit, as the median of ROUNDS runs.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

PROJECT = Path(__file__).resolve().parent.parent
MODEL = "dim=32,depth=2,heads=2,image_size=56"
# A run whose image loader sleeps forever on one picture (slow.png) and says so in a marker file.
STUCK = """
import os, sys, time
import vitcore.encoders.seed.processor as processor
real, marker = processor.load_image, sys.argv[1]
def load(source, cfg):
    if getattr(source, "name", "").endswith("slow.png"):
        open(marker, "w").close()
        time.sleep(3600)
    return real(source, cfg)
processor.load_image = load
from vitcore.cli.main import main
sys.argv = ["vit-extract", *sys.argv[2:]]
main()
"""


def one_stop(folder: Path, out: Path, marker: Path, stuck: bool, sig: int) -> float:
    out.unlink(missing_ok=True)
    marker.unlink(missing_ok=True)
    args = ["run", str(folder), "-o", str(out), "--model", MODEL, "--workers", "2", "--batch-size", "2",
            "--dtype", "float32", "--quiet"]
    cmd = [sys.executable, "-c", STUCK, str(marker), *args] if stuck else [sys.executable, "-m", "vitcore.cli", *args]
    proc = subprocess.Popen(cmd, cwd=PROJECT, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    if stuck:
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.05)
    else:  # some rows committed: the run is in its loop
        import h5py

        while time.time() < deadline:
            time.sleep(0.1)
            try:
                with h5py.File(out, "r", locking=False) as f:
                    if f.attrs["committed"] >= 4:
                        break
            except (OSError, KeyError):
                pass
    sent = time.perf_counter()
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return time.perf_counter() - sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "imgs"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(400):
            Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(folder / "0100_slow.png")
        for stuck in (False, True):
            for sig in (signal.SIGINT, signal.SIGTERM):
                times = [one_stop(folder, Path(tmp) / "out.h5", Path(tmp) / "asleep", stuck, sig)
                         for _ in range(args.rounds)]
                what = "a worker stuck in a read" if stuck else "workers running"
                print(f"{signal.Signals(sig).name:>7}, {what:>24}: {statistics.median(times):5.2f} s "
                      f"(median of {args.rounds}: {', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
