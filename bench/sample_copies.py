"""The benchmarks' pictures: ``count`` copies of sample_images' JPEGs and PNGs, in turn, in one folder."""

from __future__ import annotations

import shutil
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def sample_copies(folder: Path, count: int) -> Path:
    """``folder`` (made here) holding 00000.jpg, 00001.png, … copies of the sample pictures in turn."""
    folder.mkdir(parents=True)
    samples = sorted(p for p in (PROJECT / "sample_images").iterdir() if p.suffix in (".jpg", ".png"))
    for i in range(count):
        source = samples[i % len(samples)]
        shutil.copy(source, folder / f"{i:05d}{source.suffix}")
    return folder
