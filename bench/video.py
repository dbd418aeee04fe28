"""Qwen-VL video clips end to end on the CPU: `vit-extract run` against transformers' own video
processor and vision tower on the same clips (random weights of a released vision shape), each side
a fresh process, in turns. Needs torchvision (transformers' video processors) and PyAV.

    python bench/video.py                                   # Qwen3-VL 2B shape, 4 clips, float32 and bf16
    python bench/video.py --clips 8 --seconds 10 --rounds 3

Ours:   vit-extract run CLIPS --weights CKPT --dtype D --out-dtype float32 --json (defaults otherwise).
Theirs: transformers.video_utils.load_video(clip, backend="pyav") + the checkpoint's video processor
        + the vision tower in D, one clip at a time, as a user who wants only the visual tokens writes it.
"loop s": ours the run loop (--json seconds), theirs the first clip opened to the last output.
"ratio" is theirs ÷ ours (> 1: ours is faster); clips/s and frames/s (frames sampled) are ours.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "bench"))


def theirs(folder: str, clips: list[str], dtype_name: str) -> None:
    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers.video_utils import load_video

    from qwen_cpu import transformers_tower

    torch.set_grad_enabled(False)
    dtype = getattr(torch, dtype_name)
    config = json.loads(Path(folder, "config.json").read_text())
    tower = transformers_tower(config["model_type"], config["vision_config"])
    tower.load_state_dict({k.removeprefix("model.visual."): v for k, v in load_file(Path(folder, "model.safetensors")).items()})
    tower = tower.to(dtype).eval()
    processor = transformers.AutoVideoProcessor.from_pretrained(folder)
    start = time.perf_counter()
    for path in clips:
        video, metadata = load_video(path, backend="pyav")
        inputs = processor(videos=[video], video_metadata=[metadata], return_tensors="pt")
        tower(inputs["pixel_values_videos"].to(dtype), grid_thw=inputs["video_grid_thw"])
    print(json.dumps({"seconds": time.perf_counter() - start}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-2b")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each clip (25 fps, 320x240)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--theirs", nargs="+", help=argparse.SUPPRESS)  # internal: FOLDER DTYPE CLIP...
    args = parser.parse_args()
    if args.theirs:
        theirs(args.theirs[0], args.theirs[2:], args.theirs[1])
        return
    from qwen_cpu import make_checkpoint, measured
    from tests.helpers import make_clip

    with tempfile.TemporaryDirectory(prefix="video-bench-") as work:
        folder = Path(work) / "ckpt"
        make_checkpoint(folder, args.shape)
        if args.shape.startswith("qwen3"):  # a video processor file of its own, as released Qwen3-VL checkpoints have
            (folder / "video_preprocessor_config.json").write_text(json.dumps(
                {"video_processor_type": "Qwen3VLVideoProcessor", "size": {"shortest_edge": 4096, "longest_edge": 25165824},
                 "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3,
                 "image_std": [0.5] * 3, "fps": 2, "min_frames": 4, "max_frames": 768}))
        clips = Path(work) / "clips"
        clips.mkdir()
        paths = [make_clip(clips / f"c{i}.mp4", int(args.seconds * 25), 320, 240, 25) for i in range(args.clips)]
        print(f"{args.shape}, {args.clips} clips of {args.seconds:g} s (320x240, 25 fps), random weights; "
              f"medians of {args.rounds} round(s)\n")
        print("| dtype | ours loop s | theirs loop s | ratio (min–max) | ours clips/s | ours frames/s |")
        print("|---|---|---|---|---|---|")
        for dtype in args.dtypes.split(","):
            rounds = []
            for _ in range(args.rounds):
                out = Path(work) / "out.h5"
                out.unlink(missing_ok=True)
                text, _, _ = measured([sys.executable, "-m", "vitcore.cli", "run", str(clips), "-o", str(out),
                                       "--weights", str(folder), "--dtype", dtype, "--out-dtype", "float32", "--json"])
                ours = json.loads(text)["seconds"]
                text, _, _ = measured([sys.executable, __file__, "--theirs", str(folder), dtype, *paths])
                rounds.append((ours, json.loads(text)["seconds"]))
                print(f"{dtype}: ours {ours:.1f} s, theirs {rounds[-1][1]:.1f} s", file=sys.stderr, flush=True)
            import h5py

            with h5py.File(out) as f:
                frames = sum(len(json.loads(t)["frames"]) for t in f["meta/video"].asstr()[:])
            ratios = [t / o for o, t in rounds]
            spread = f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else ""
            ours_s = statistics.median(o for o, _ in rounds)
            print(f"| {dtype} | {ours_s:.1f} | {statistics.median(t for _, t in rounds):.1f} | "
                  f"{statistics.median(ratios):.2f}{spread} | {args.clips / ours_s:.2f} | {frames / ours_s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
