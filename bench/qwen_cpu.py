"""Qwen-VL towers end to end on the CPU: `vit-extract run` against transformers' own image processor
and vision tower on the same images, random weights of a released vision shape, each side in a
fresh process. Prints one Markdown table.

    python bench/qwen_cpu.py                                  # Qwen3-VL 2B shape, float32 and bf16
    python bench/qwen_cpu.py --shapes qwen3-8b --big          # adds a 2000x1500 and a 1000x40 photo
    python bench/qwen_cpu.py --shapes qwen3-8b --only-big --dtypes float32   # those two alone
    python bench/qwen_cpu.py --shapes qwen2.5-3b --dtypes float32
    python bench/qwen_cpu.py --shapes qwen3-2b,qwen2.5-3b,qwen2-2b --rounds 3   # medians of 3 pairs

Ours:   vit-extract run IMAGES --weights CKPT --dtype D --out-dtype float32 --json (defaults
        otherwise: 2 decoding workers on 2 cores); "loop s" is the run loop (the --json seconds).
Theirs: AutoImageProcessor (the checkpoint's, Pillow backend) + the model's vision tower
        (Qwen3VLVisionModel / Qwen2_5_VisionTransformerPretrainedModel) in D, one image at a time,
        as a user who wants only the visual tokens writes it; "loop s" from the first image opened
        to the last output.
"wall s" is each whole command; "peak" the main process's peak resident memory (ru_maxrss).
"ratio" is theirs ÷ ours (> 1: ours is faster / leaner).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

PROJECT = Path(__file__).resolve().parent.parent

# Released vision shapes (config.json vision_config), weights random.
SHAPES = {
    "qwen3-2b": ("qwen3_vl", dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                                  deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh")),
    "qwen3-8b": ("qwen3_vl", dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                                  deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh")),
    "qwen2.5-3b": ("qwen2_5_vl", dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                      out_hidden_size=2048, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                                      window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")),
    "qwen2-2b": ("qwen2_vl", dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16, patch_size=14,
                                  spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu")),
}
PROCESSORS = {  # as the released checkpoints' preprocessor_config.json
    "qwen3_vl": dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                     size={"shortest_edge": 65536, "longest_edge": 16777216}),
    "qwen2_5_vl": dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=3136, max_pixels=12845056),
}
PROCESSORS["qwen2_vl"] = PROCESSORS["qwen2_5_vl"]


def transformers_tower(model_type: str, vision: dict):
    """transformers' own vision tower of that model type, random weights."""
    import transformers

    if model_type == "qwen3_vl":
        config = transformers.Qwen3VLConfig(vision_config=vision).vision_config
        return transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLVisionModel(config)
    if model_type == "qwen2_5_vl":
        config = transformers.Qwen2_5_VLConfig(vision_config=vision).vision_config
        return transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel(config)
    config = transformers.Qwen2VLConfig(vision_config=vision).vision_config
    return transformers.models.qwen2_vl.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel(config)


def make_checkpoint(folder: Path, shape: str) -> None:
    """config.json, preprocessor_config.json and model.safetensors holding only model.visual.*"""
    import torch
    from safetensors.torch import save_file

    model_type, vision = SHAPES[shape]
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    tower = transformers_tower(model_type, vision)
    state = {f"model.visual.{k}": v.contiguous() for k, v in tower.state_dict().items()}
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "vision_config": vision}))
    processor = {"image_processor_type": "Qwen2VLImageProcessor", **PROCESSORS[model_type]}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))


def make_images(folder: Path, big: bool, samples: bool = True) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for source in sorted((PROJECT / "sample_images").glob("*")) if samples else ():
        if source.suffix.lower() in (".jpg", ".png"):
            paths.append(folder / source.name)
            paths[-1].write_bytes(source.read_bytes())
    if big:
        rng = np.random.default_rng(0)
        for name, (w, h) in (("photo_2000x1500.jpg", (2000, 1500)), ("strip_1000x40.jpg", (1000, 40))):
            base = rng.integers(0, 256, (max(h // 50, 2), max(w // 50, 2), 3), dtype=np.uint8)
            Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC).save(folder / name, quality=90)
            paths.append(folder / name)
    return paths


WRAPPER = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
           "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
           "sys.exit(done.returncode)")


def measured(command: list[str]) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak RSS in GiB of the largest process of that command). A fresh
    wrapper process per command, so ru_maxrss covers that command alone."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WRAPPER, *command], cwd=PROJECT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    peak = int(done.stderr.rsplit("PEAK_KIB", 1)[1].split()[0]) / 2**20
    return done.stdout, wall, peak


def theirs(folder: str, images: list[str], dtype_name: str) -> None:
    """The transformers side, in its own process: prints {"seconds": loop seconds}."""
    import torch
    import transformers
    from safetensors.torch import load_file

    torch.set_grad_enabled(False)
    dtype = getattr(torch, dtype_name)
    config = json.loads(Path(folder, "config.json").read_text())
    tower = transformers_tower(config["model_type"], config["vision_config"])
    state = {k.removeprefix("model.visual."): v for k, v in load_file(Path(folder, "model.safetensors")).items()}
    tower.load_state_dict(state)
    tower = tower.to(dtype).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    start = time.perf_counter()
    for path in images:
        with Image.open(path) as picture:
            inputs = processor(images=[picture.convert("RGB")], return_tensors="pt")
        tower(inputs["pixel_values"].to(dtype), grid_thw=inputs["image_grid_thw"])
    print(json.dumps({"seconds": time.perf_counter() - start}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="qwen3-2b", help=f"comma-separated: {', '.join(SHAPES)} (default: %(default)s)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes (default: %(default)s)")
    parser.add_argument("--big", action="store_true", help="add a 2000x1500 photo and a 1000x40 strip")
    parser.add_argument("--only-big", action="store_true", help="the 2000x1500 photo and the strip alone")
    parser.add_argument("--rounds", type=int, default=1, help="pairs (ours, theirs) taken in turns (default: 1)")
    parser.add_argument("--theirs", nargs="+", help=argparse.SUPPRESS)  # internal: FOLDER DTYPE IMAGE...
    args = parser.parse_args()
    if args.theirs:
        theirs(args.theirs[0], args.theirs[2:], args.theirs[1])
        return
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        parser.error(f"--shapes {','.join(unknown)}: choose from {', '.join(SHAPES)}")
    for name in args.dtypes.split(","):
        if name not in ("float32", "bfloat16", "float16"):
            parser.error(f"--dtypes {name}: choose from float32, bfloat16, float16")
    if args.rounds < 1:
        parser.error(f"--rounds must be 1 or more, got {args.rounds}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="qwen-cpu-") as work:
        images = make_images(Path(work) / "imgs", args.big or args.only_big, samples=not args.only_big)
        for shape in args.shapes.split(","):
            folder = Path(work) / shape
            make_checkpoint(folder, shape)
            for dtype in args.dtypes.split(","):
                rounds = []
                for _ in range(args.rounds):  # in turns, so a slow spell of the machine falls on both
                    out = Path(work) / "out.h5"
                    out.unlink(missing_ok=True)
                    text, wall, peak = measured([sys.executable, "-m", "vitcore.cli", "run", str(Path(work) / "imgs"), "-o",
                                                 str(out), "--weights", str(folder), "--dtype", dtype,
                                                 "--out-dtype", "float32", "--json"])
                    ours = (json.loads(text)["seconds"], wall, peak)
                    text, wall, peak = measured([sys.executable, __file__, "--theirs", str(folder), dtype,
                                                 *map(str, images)])
                    peer = (json.loads(text)["seconds"], wall, peak)
                    rounds.append((ours, peer))
                    print(f"{shape} {dtype}: ours {ours}, theirs {peer}", file=sys.stderr, flush=True)
                rows.append((shape, dtype, rounds))
    print(f"{len(images)} images ({', '.join(p.name for p in images)}), native resolution, random weights; "
          f"medians of {args.rounds} round(s), ratio = median of the rounds' ratios")
    print("| shape | dtype | ours loop s | theirs loop s | ratio (min–max) | ours wall s | theirs wall s "
          "| ours peak GiB | theirs peak GiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape, dtype, rounds in rows:
        med = lambda side, i: statistics.median(r[side][i] for r in rounds)  # noqa: E731
        ratios = [peer[0] / ours[0] for ours, peer in rounds]
        spread = f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else ""
        print(f"| {shape} | {dtype} | {med(0, 0):.1f} | {med(1, 0):.1f} | {statistics.median(ratios):.2f}{spread} "
              f"| {med(0, 1):.1f} | {med(1, 1):.1f} | {med(0, 2):.2f} | {med(1, 2):.2f} | {med(1, 2) / med(0, 2):.2f} |")

if __name__ == "__main__":
    main()
