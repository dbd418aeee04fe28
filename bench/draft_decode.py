"""JPEG draft decode vs full decode on a 12-megapixel picture: time per image and pixel difference.

    python bench/draft_decode.py [--repeat 5]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vitcore.encoders.seed.processor import PreprocessConfig, load_image

SAMPLE = Path(__file__).resolve().parent.parent / "sample_images" / "coffee.jpg"


def seconds_per_image(path: str, cfg: PreprocessConfig, repeat: int) -> float:
    load_image(path, cfg)  # warm the page cache
    start = time.perf_counter()
    for _ in range(repeat):
        load_image(path, cfg)
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        big = str(Path(tmp) / "big.jpg")
        Image.open(SAMPLE).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC).save(big, quality=90)
        full, draft = PreprocessConfig(decode="full"), PreprocessConfig(decode="draft")
        t_full = seconds_per_image(big, full, args.repeat)
        t_draft = seconds_per_image(big, draft, args.repeat)
        a = load_image(big, full)[0].astype(int)
        b = load_image(big, draft)[0].astype(int)
    print(f"full  {t_full * 1000:7.1f} ms/image")
    print(f"draft {t_draft * 1000:7.1f} ms/image  ({t_full / t_draft:.1f}x faster)")
    print(f"224x224 output difference: mean {np.abs(a - b).mean():.2f}, max {np.abs(a - b).max()} grey levels")


if __name__ == "__main__":
    main()
