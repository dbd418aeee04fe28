"""--compile auto on this machine: what it measures and chooses, and what a later run reuses.

    python bench/compile_auto.py [--model small] [--images 160] [--batch 16] [--dtypes float32,bfloat16]

For each dtype, with a fresh cache folder, three whole `vit-extract run` processes over copies of
sample_images:
  off        --compile off: the eager baseline
  trial      --compile auto, nothing remembered: times 2 eager and 2 compiled batches of its own and
             keeps the faster (the "long enough to try" rule is lifted so that a short bench tries)
  remembered --compile auto again: decides from the remembered times (a run this short stays
             eager unless the saving over its images exceeds the remembered compilation)
  on again   --compile on: a compilation that finds inductor's cache under the cache folder
Prints one Markdown row per run: images/s of the run loop, the compilation time, and auto's reason.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from sample_copies import sample_copies

# The CLI with the trial rule lifted: any run may try (a bench run is short).
TRYING = ("import sys; import vitcore.run.compile_choice as c; c.TRIAL_COMPILE_SECONDS = 0.0; "
          "from vitcore.cli.main import main; sys.argv[0] = 'vit-extract'; main()")


def run(pictures: Path, out: Path, cache: Path, args, dtype: str, mode: str, lifted: bool) -> dict:
    command = [sys.executable, "-c", TRYING] if lifted else [sys.executable, "-m", "vitcore.cli"]
    command += ["run", str(pictures), "-o", str(out), "--model", args.model, "--dtype", dtype,
                "--batch-size", str(args.batch), "--compile", mode, "--json", "--overwrite"]
    env = dict(os.environ, VIT_EXTRACT_CACHE_DIR=str(cache))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(done.stderr)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        pictures = sample_copies(Path(work) / "pictures", args.images)
        print(f"{args.model}, {args.images} pictures, batch {args.batch}\n")
        print("| dtype | run | images/s | compile s | auto's reason |")
        print("|---|---|---|---|---|")
        for dtype in args.dtypes.split(","):
            cache = Path(work) / f"cache-{dtype}"
            for label, mode, lifted in (("off", "off", False), ("trial", "auto", True), ("remembered", "auto", False),
                                        ("on again", "on", False)):
                result = run(pictures, Path(work) / "out.h5", cache, args, dtype, mode, lifted)
                compiled = result["timings"].get("compile")
                print(f"| {dtype} | {label} | {result['images_per_second']:.2f} | "
                      f"{f'{compiled:.1f}' if compiled else '—'} | {result.get('compile_reason') or '—'} |", flush=True)


if __name__ == "__main__":
    main()
