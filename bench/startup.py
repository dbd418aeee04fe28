"""Start-up and refusals as whole commands: how long a refusal takes (before torch is imported), and
how long a Qwen-VL run of a 2B-shape checkpoint takes from its imports to its first batch, the first
time (weights hashed) and later (the digest remembered per file identity).

    python bench/startup.py [--repeats 5] [--shape qwen3-2b] [--skip qwen]

Fixtures are made in a temporary folder: an output of the `small` preset (for the seed's resume
refusal), a CLIP ViT-B/16 checkpoint with random weights and an output of it (for a transformers
tower's resume refusal), and the Qwen checkpoint (random weights, the released vision shape, about
1.6 GB for qwen3-2b). The cache folder is a fresh one (VIT_EXTRACT_CACHE_DIR), so "first" is first.

Refusals: best of --repeats whole commands, each must exit with status 2, with byte-code caches (as an
installed package has them; the first command writes them). Qwen-VL: one picture,
`--dtype bfloat16 --json`; "imports" is a separate process importing what the run imports (torch,
the CLI, the Qwen-VL family), "imports to the first batch" = wall − imports − the run's loop seconds
(the loop starts at the first batch; closing the file after it is counted too, so this errs high).
Prints one Markdown table.
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

from qwen_cpu import make_checkpoint as make_qwen_checkpoint
from towers import make_checkpoint as make_tower_checkpoint

PROJECT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "vitcore.cli"]
IMPORTS = ("import torch, vitcore.cli, vitcore.run.pipeline, vitcore.encoders.qwen.family, "
           "vitcore.encoders.qwen.qwen3vl, vitcore.encoders.qwen.qwen2vl")


def wall(command: list[str], env: dict, expect: int | None = 0) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=PROJECT)
    seconds = time.perf_counter() - started
    if expect is not None and done.returncode != expect:
        raise SystemExit(f"{' '.join(command[2:6])}… exited {done.returncode}, not {expect}:\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def best(command: list[str], env: dict, repeats: int, expect: int) -> float:
    return min(wall(command, env, expect)[0] for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shape", default="qwen3-2b")
    parser.add_argument("--skip", default="", help="comma-separated: refusals, qwen")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        # Byte-code caches as an installed package has them (a checkout run with PYTHONDONTWRITEBYTECODE
        # compiles every module on each start: 0.05-0.1 s more per command).
        env = dict(os.environ, VIT_EXTRACT_CACHE_DIR=str(work / "cache"), PYTHONPATH=str(PROJECT),
                   PYTHONPYCACHEPREFIX=str(work / "pycache"))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        pictures = work / "pictures"
        pictures.mkdir()
        one = sorted((PROJECT / "sample_images").glob("*.jpg"))[0]
        (pictures / one.name).write_bytes(one.read_bytes())
        print("| what | seconds |")
        print("|---|---|")
        if "refusals" not in skip:
            seed_out, clip_out, clip = work / "seed.h5", work / "clip.h5", work / "clip-ckpt"
            wall([*CLI, "run", str(pictures), "-o", str(seed_out), "--model", "small", "--quiet"], env)
            make_tower_checkpoint(clip, "clip")
            wall([*CLI, "run", str(pictures), "-o", str(clip_out), "--weights", str(clip), "--quiet"], env)
            refusals = {
                "bad option (`--batch-size 0`)": ["run", str(pictures), "-o", str(work / "x.h5"), "--batch-size", "0"],
                "missing input": ["run", str(work / "nothing-here"), "-o", str(work / "x.h5")],
                "output exists (no --overwrite or --resume)": ["run", str(pictures), "-o", str(seed_out)],
                "`--resume` with another `--out-dtype`, seed": ["run", str(pictures), "-o", str(seed_out), "--model",
                                                               "small", "--resume", "--out-dtype", "float32"],
                "`--resume` with another `--pool`, CLIP checkpoint": ["run", str(pictures), "-o", str(clip_out),
                                                                     "--weights", str(clip), "--resume", "--pool",
                                                                     "mean"],
            }
            for what, command in refusals.items():
                print(f"| refusal: {what} | {best([*CLI, *command], env, args.repeats, expect=2):.2f} |", flush=True)
        if "qwen" not in skip:
            checkpoint = work / args.shape
            make_qwen_checkpoint(checkpoint, args.shape)
            imports = min(wall([sys.executable, "-c", IMPORTS], env)[0] for _ in range(3))
            print(f"| imports of a Qwen-VL run (torch, the CLI, the Qwen-VL family) | {imports:.2f} |")
            for when in ("first run of the checkpoint (weights hashed)", "a later run (digest remembered)"):
                seconds, out = wall([*CLI, "run", str(pictures), "-o", str(work / "q.h5"), "--weights",
                                     str(checkpoint), "--dtype", "bfloat16", "--json", "--overwrite"], env)
                loop = json.loads(out)["seconds"]
                print(f"| {args.shape}, {when}: whole command {seconds:.2f}, loop {loop:.2f}; imports to the first "
                      f"batch | {seconds - imports - loop:.2f} |", flush=True)


if __name__ == "__main__":
    main()
