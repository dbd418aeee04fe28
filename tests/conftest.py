"""Shared fixtures: a tiny encoder spec, copies of the sample photos, and a CLI runner."""

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
TINY = "dim=32,depth=2,heads=2,image_size=56"  # 4 × 4 = 16 tokens: fast on any CPU


@pytest.fixture
def photos(tmp_path) -> Path:
    """A writable copy of sample_images (images only)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for image in sorted(SAMPLES.iterdir()):
        if image.suffix.lower() in (".jpg", ".png"):
            shutil.copy(image, folder / image.name)
    return folder


@pytest.fixture
def cli():
    runner = CliRunner()

    def invoke(*args, input=None):
        return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)

    return invoke
