"""A CPU run against its work-conserving bound: decode alone, encode alone, and the whole run, in one go.

    python bench/bound.py [--model small] [--images 96] [--dtypes float32,bfloat16] [--batch 16] [--rounds 1]

On a CPU the decoding workers and the encoder share the cores, so no overlap can beat the work
itself: images/s ≤ 1 / (encode s/image + decode s/image ÷ cores), where encode is the batch on all
cores and decode is one picture on one core (the workers spread it over every core). Measured here:
  decode   the run's own loader over the pictures in this process (one core), s/image
  encode   the run's own BatchRunner over the decoded batches, after a warm-up, s/image
  run      `vit-extract run DIR --model M --dtype D --batch-size B --json`: images/s of its loop
Prints one Markdown row per dtype and round with the run's share of the bound; with several rounds
the three measurements are taken again in turn (this shared machine drifts by 10 % and more between
minutes, so one round's ratio can mislead).
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

import torch

from vitcore.encoders import registry
from vitcore.imaging.loader import ImageDataset, collate
from vitcore.inputs.discover import discover
from vitcore.options import EncoderOptions
from vitcore.run.batching import BatchRunner
from vitcore.run.settings import store_settings
from sample_copies import sample_copies



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as work:
        pictures = sample_copies(Path(work) / "pictures", args.images)
        sources = discover([str(pictures)], None, None).sources
        print(f"{args.model}, {len(sources)} pictures (copies of sample_images), batch {args.batch}, {cores} cores, "
              f"torch {torch.__version__}\n")
        print("| dtype | round | decode ms/image (1 core) | encode ms/image | bound images/s | run images/s | run ÷ bound |")
        print("|---|---|---|---|---|---|---|")
        family = registry.for_run(args.model, None)
        opts = EncoderOptions(model=args.model)
        for name in args.dtypes.split(","):
            for round_ in range(1, args.rounds + 1):
                decode, encode = _decode_and_encode(family, opts, getattr(torch, name), sources, args.batch)
                bound = 1 / (encode + decode / cores)
                run = _run_images_per_second(pictures, Path(work) / f"{name}.h5", args.model, name, args.batch)
                print(f"| {name} | {round_} | {decode * 1000:.1f} | {encode * 1000:.1f} | {bound:.2f} | {run:.2f} "
                      f"| {run / bound:.2f} |", flush=True)


def _decode_and_encode(family, opts, dtype, sources, batch_size) -> tuple[float, float]:
    """Seconds per image: the run's loader alone on one core, then its BatchRunner alone after a warm-up."""
    built = family.build(opts, torch.device("cpu"), dtype)
    dataset = ImageDataset(sources, built.loader, ())
    dataset[0]  # warm-up
    tick = time.perf_counter()
    items = [dataset[i] for i in range(len(sources))]
    decode = (time.perf_counter() - tick) / len(sources)
    runner = BatchRunner(built, store_settings(built, "none", "float16", "cpu", dtype), torch.device("cpu"))
    batches = [collate(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    with torch.inference_mode():
        runner(batches[0], sources)  # warm-up
        tick = time.perf_counter()
        for batch in batches:
            runner(batch, sources)
        encode = (time.perf_counter() - tick) / len(sources)
    return decode, encode


def _run_images_per_second(pictures: Path, out: Path, model: str, dtype: str, batch_size: int) -> float:
    """The images/s of a whole `vit-extract run` (its loop, from its --json record), in a fresh process."""
    done = subprocess.run([sys.executable, "-m", "vitcore.cli", "run", str(pictures), "-o", str(out),
                           "--model", model, "--dtype", dtype, "--batch-size", str(batch_size),
                           "--json", "--overwrite"], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)["images_per_second"]

if __name__ == "__main__":
    main()
