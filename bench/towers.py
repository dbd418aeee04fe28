"""`vit-extract run` on a transformers tower against the loops a user writes with the library itself.

    python bench/towers.py [--family clip|siglip] [--images 64] [--dtypes float32,bfloat16] [--workers 2]

Builds a base-size tower with random weights (CLIP ViT-B/16 or SigLIP base/16 at 224, saved by
transformers' save_pretrained with the class's default image processor), copies of the sample
pictures as inputs, and times each way as a whole fresh process (imports and model loading included):

    vit-extract    vit-extract run DIR --weights CKPT --dtype D
    loop           the processor and the model in a plain loop over batches of paths
    dataloader     the same in a torch DataLoader whose workers open and process the pictures

Prints images/s of each and the ratio to the faster plain loop, per dtype.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent

# One script for both plain loops: what a user of transformers writes (the processor's default backend).
LOOP = r'''
import sys, torch, transformers
from PIL import Image
folder, ckpt, family, dtype, mode, workers, batch = sys.argv[1:8]
dtype, workers, batch = getattr(torch, dtype), int(workers), int(batch)
paths = sorted(str(p) for p in __import__("pathlib").Path(folder).iterdir())
processor = transformers.AutoImageProcessor.from_pretrained(ckpt)
tower = {"clip": transformers.CLIPVisionModelWithProjection, "siglip": transformers.SiglipVisionModel}[family]
model = tower.from_pretrained(ckpt, dtype=dtype).eval()

class Pictures(torch.utils.data.Dataset):
    def __len__(self):
        return len(paths)
    def __getitem__(self, i):
        with Image.open(paths[i]) as img:
            return processor(images=img.convert("RGB"), return_tensors="pt")["pixel_values"][0]

if mode == "loop":
    def batches():
        for i in range(0, len(paths), batch):
            images = [Image.open(p).convert("RGB") for p in paths[i:i + batch]]
            yield processor(images=images, return_tensors="pt")["pixel_values"]
else:
    def batches():
        yield from torch.utils.data.DataLoader(Pictures(), batch_size=batch, num_workers=workers)
kept = 0
with torch.inference_mode():
    for pixels in batches():
        out = model(pixel_values=pixels.to(dtype))
        kept += out.last_hidden_state.float().half().shape[0]  # stored as float16, as vit-extract stores them
assert kept == len(paths)
'''


def make_checkpoint(folder: Path, family: str) -> None:
    import torch
    import transformers as t

    torch.manual_seed(0)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, vocab_size=1000)
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=16)
    if family == "clip":
        t.CLIPModel(t.CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)).save_pretrained(folder)
        t.CLIPImageProcessorPil().save_pretrained(folder)
    else:
        t.SiglipModel(t.SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(folder)
        t.SiglipImageProcessorPil().save_pretrained(folder)


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="clip", choices=("clip", "siglip"))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    samples = sorted(p for p in (PROJECT / "sample_images").iterdir() if p.suffix in (".jpg", ".png"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pictures = tmp / "pictures"
        pictures.mkdir()
        for i in range(args.images):
            source = samples[i % len(samples)]
            shutil.copy(source, pictures / f"{i:04d}{source.suffix}")
        ckpt = tmp / "ckpt"
        make_checkpoint(ckpt, args.family)
        loop = tmp / "loop.py"
        loop.write_text(LOOP)
        env_note = f"{os.cpu_count()} CPUs, {args.images} pictures, batch {args.batch}, {args.workers} workers"
        print(f"{args.family} base/16 at 224, random weights; {env_note}")
        for dtype in args.dtypes.split(","):
            ours = timed([sys.executable, "-m", "vitcore.cli", "run", str(pictures), "-o", str(tmp / f"{dtype}.h5"),
                          "--weights", str(ckpt), "--dtype", dtype, "--batch-size", str(args.batch),
                          "--workers", str(args.workers), "--overwrite", "-q"])
            plain = timed([sys.executable, str(loop), str(pictures), str(ckpt), args.family, dtype, "loop", "0",
                           str(args.batch)])
            loader = timed([sys.executable, str(loop), str(pictures), str(ckpt), args.family, dtype, "dataloader",
                            str(args.workers), str(args.batch)])
            best = min(plain, loader)
            print(f"{dtype:>9}: vit-extract {args.images / ours:6.2f} img/s ({ours:5.1f} s)  loop {args.images / plain:6.2f} "
                  f"({plain:5.1f} s)  dataloader {args.images / loader:6.2f} ({loader:5.1f} s)  "
                  f"ratio to the faster loop {best / ours:4.2f}×")


if __name__ == "__main__":
    main()
