"""Shared fixtures: copies of the sample photos, a CLI runner, and the `cuda` marker's skip.
Shared constants and helpers are in tests/helpers.py."""

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vitcore.cli.main import app
from tests.helpers import SAMPLES


@pytest.fixture(scope="session", autouse=True)
def measurement_cache(tmp_path_factory):
    """--dtype auto's measurements go to a folder of this session's (inherited by the runs the tests
    start), never into the user's own cache."""
    import os

    folder = tmp_path_factory.mktemp("cache")
    saved = os.environ.get("VIT_EXTRACT_CACHE_DIR")
    os.environ["VIT_EXTRACT_CACHE_DIR"] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop("VIT_EXTRACT_CACHE_DIR", None)
    else:
        os.environ["VIT_EXTRACT_CACHE_DIR"] = saved


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a CUDA device; elsewhere they are skipped, saying why."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m cuda` on a machine with one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


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
