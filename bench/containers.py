"""The same images as loose files, as WebDataset tar shards and as one Parquet file: images/s side
by side, the same tiny encoder, in one run of this script.

    python bench/containers.py                       # 10,000 images, 10 shards, 3 rounds
    python bench/containers.py --images 2000 --rounds 1

Each round runs the three inputs in turn (so drift of a shared machine hits them alike) through
`vit-extract run … --json` in a fresh process, and reads the loop's images/s and the wall time of
the whole command. Medians over the rounds are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image
from throughput import run_command  # bench/ is this script's folder: a command's JSON summary and wall time

TINY = "dim=64,depth=2,heads=4"


def make_inputs(folder: str, images: int, shards: int) -> dict[str, list[str]]:
    """Small JPEGs (about 96 × 72) written three ways; what to pass to `vit-extract run` for each."""
    rng = np.random.default_rng(0)
    loose = os.path.join(folder, "loose")
    os.makedirs(loose)
    per_shard = -(-images // shards)
    rows = []
    writers = []
    for i in range(images):
        if i % per_shard == 0:
            if writers:
                writers[-1].close()
            writers.append(wds.TarWriter(os.path.join(folder, f"{i // per_shard:05d}.tar")))
        base = rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)  # smooth: JPEG sizes like photos'
        picture = Image.fromarray(base).resize((96, 72), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=90)
        data = buffer.getvalue()
        key = f"{i:09d}"
        with open(os.path.join(loose, f"{key}.jpg"), "wb") as handle:
            handle.write(data)
        writers[-1].write({"__key__": key, "jpg": data, "txt": f"caption {i}"})
        rows.append({"image": {"bytes": data, "path": f"{key}.jpg"}, "caption": f"caption {i}"})
    writers[-1].close()
    parquet = os.path.join(folder, "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=100)  # as datasets writes images
    return {
        "loose files": [loose],
        f"{shards} tar shards": [os.path.join(folder, f"{{00000..{shards - 1:05d}}}.tar")],
        "one Parquet file": [parquet],
    }


def run_once(inputs: list[str], output: str, extra: list[str]) -> tuple[float, float]:
    """(images/s of the run loop, wall seconds of the whole command)."""
    if os.path.exists(output):
        os.unlink(output)
    summary, wall = run_command([sys.executable, "-m", "vitcore.cli", "run", *inputs, "-o", output, "--model", TINY, "--json",
                                 *extra])
    return summary["images_per_second"], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", default="64")
    parser.add_argument("--workers", default="2")
    args = parser.parse_args()
    extra = ["--batch-size", args.batch_size, "--workers", args.workers, "--dtype", "float32"]
    with tempfile.TemporaryDirectory(prefix="containers-bench-") as folder:
        kinds = make_inputs(folder, args.images, args.shards)
        results = {name: [] for name in kinds}
        for _ in range(args.rounds):
            for name, inputs in kinds.items():
                results[name].append(run_once(inputs, os.path.join(folder, "out.h5"), extra))
    print(f"{args.images} images of 96×72 (JPEG), encoder {TINY}, float32, batch {args.batch_size}, "
          f"{args.workers} workers; medians of {args.rounds} rounds")
    print("| input | images/s (run loop) | whole command, s |")
    print("|---|---|---|")
    for name, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        wall = statistics.median(w for _, w in runs)
        print(f"| {name} | {rate:,.0f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
