"""The Qwen2-VL and Qwen2.5-VL vision towers against transformers (the oracle), through the model,
the checkpoint reader and the command line."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import vitcore
from tests.helpers import BACKENDS, auto_processor, processor_class, resave_single_file, save_tiny_qwen2vl
from vitcore.encoders.qwen.qwen2vl import load_qwen25vl, load_qwen2vl, window_order
from vitcore.encoders.qwen.processor import patchify_torch, resize_rgb

VERSIONS = {"2": ("qwen2-vl", load_qwen2vl), "2.5": ("qwen2.5-vl", load_qwen25vl)}


@pytest.fixture(scope="module", params=list(VERSIONS))
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"qwen{request.param}vl") / "ckpt"
    return request.param, folder, save_tiny_qwen2vl(folder, request.param)


def _images():
    rng = np.random.default_rng(0)
    noise = lambda w, h: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    return {"wide": noise(300, 200), "tall": noise(100, 450), "small": noise(20, 17), "square": noise(224, 224)}


def _rel(a, b) -> float:
    return (torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double())).item()


def _reference(folder, visual, images, backend="pil"):
    processor = auto_processor(folder, backend)
    batch = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        return visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]), batch["image_grid_thw"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("names", [["wide"], ["tall"], ["small"], ["wide", "tall", "small", "square"]])
def test_tower_matches_transformers_in_float32(checkpoint, names, backend):
    version, folder, visual = checkpoint
    encoder, prep = VERSIONS[version][1](str(folder))
    prep = dataclasses.replace(prep, backend=backend)
    images = [_images()[n] for n in names]
    ref, ref_grids = _reference(folder, visual, images, backend)
    patches, grids = zip(*(patchify_torch(torch.from_numpy(resize_rgb(image, prep)), prep) for image in images))
    assert [tuple(g) for g in ref_grids.tolist()] == list(grids)
    with torch.no_grad():
        ours = encoder(torch.cat(patches), list(grids))
    assert ours.tokens.shape == ref.pooler_output.shape and _rel(ours.tokens, ref.pooler_output) < 1e-4
    hidden = ref.last_hidden_state
    if version == "2.5":  # transformers leaves its last hidden states in window order; ours are in merge-block order
        order, _ = window_order(list(grids), 2, encoder.cfg.window_units)
        unit = hidden.reshape(-1, 4, hidden.shape[-1])
        hidden = torch.empty_like(unit)
        hidden[order] = ref.last_hidden_state.reshape(unit.shape)
        hidden = hidden.reshape(ref.last_hidden_state.shape)
    assert _rel(ours.last_hidden, hidden) < 1e-4


@pytest.mark.parametrize("grid", [[[2, 8, 12]], [[3, 4, 4], [1, 10, 8], [2, 12, 16]]])
def test_video_grids_attend_within_each_temporal_slice_as_transformers(checkpoint, grid):
    """t > 1 (a video's temporal patches): each slice is a segment of its own, in full and window attention."""
    version, folder, visual = checkpoint
    encoder, _ = VERSIONS[version][1](str(folder))
    grid = torch.tensor(grid)
    pixels = torch.randn(int(grid.prod(dim=1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = visual(pixels, grid_thw=grid).pooler_output
        ours = encoder(pixels, [tuple(g) for g in grid.tolist()]).tokens
    assert (torch.linalg.norm(ours.double() - ref.double()) / torch.linalg.norm(ref.double())).item() < 1e-4


def test_windows_match_transformers_window_index(checkpoint):
    from transformers.vision_utils import get_vision_window_index

    grids = [(1, 14, 22), (1, 6, 4), (1, 2, 2), (1, 30, 8)]
    for side in (1, 2, 4):
        order, lengths = window_order(grids, 2, side)
        index, bounds = get_vision_window_index(torch.tensor(grids), 2, side * 2 * 14, 14)
        assert order.tolist() == index.tolist()
        assert np.cumsum([0, *lengths]).tolist() == bounds.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["sharded, model.visual.*", "one file, visual.*", "bilinear resample"])
def test_the_command_line_recognises_the_checkpoint_and_stores_transformers_tokens(checkpoint, tmp_path, cli, layout,
                                                                                   backend):
    version, folder, visual = checkpoint
    processor_class(backend)  # the reference's backend is installed (else skipped)
    if layout != "sharded, model.visual.*":
        folder = resave_single_file(folder, tmp_path / "single")
    if layout == "bilinear resample":  # the processor's filter is the checkpoint's to choose
        config = json.loads((folder / "preprocessor_config.json").read_text())
        (folder / "preprocessor_config.json").write_text(json.dumps({**config, "resample": 2}))
    images = tmp_path / "imgs"
    images.mkdir()
    for name, image in _images().items():
        image.save(images / f"{name}.png")
    out = tmp_path / "q.h5"
    result = cli("run", images, "-o", out, "--weights", folder, "--features", "last_hidden", "--dtype", "float32",
                 "--out-dtype", "float32", "--batch-size", "3", "--workers", "0", "--json", "--processor", backend)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["encoder"] == VERSIONS[version][0]
    with vitcore.open_tokens(out) as f:
        assert f.settings["encoder"]["family"] == VERSIONS[version][0] and f.ragged and len(f) == 4
        for key in f.keys:
            ref, grid = _reference(folder, visual, [Image.open(images / key).convert("RGB")], backend)
            assert f.h5["grid_thw"][f.index(key)].tolist() == grid[0].tolist()
            assert _rel(torch.from_numpy(f[key]), ref.pooler_output) < 1e-4
            assert f.token_grid(key) == (grid[0, 1] // 2, grid[0, 2] // 2)
            assert f.feature("last_hidden", key).shape == (len(f[key]) * 4, 64)
    info = cli("info", out)
    assert f"{VERSIONS[version][0]} vision tower: hidden 64" in info.stdout
    hits = json.loads(cli("similar", out, images / "tall.png", "-k", "1", "--json").stdout)
    assert hits[0]["key"] == "tall.png" and hits[0]["score"] > 0.9999


def test_a_checkpoint_given_to_the_wrong_family_is_one_line(checkpoint, tmp_path, cli):
    version, folder, _ = checkpoint
    other = "qwen3-vl" if version == "2" else "qwen2-vl"
    out = tmp_path / "q.h5"
    result = cli("run", tmp_path, "-o", out, "--weights", folder, "--model", other, "--workers", "0")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    found = "qwen2_vl" if version == "2" else "qwen2_5_vl"
    assert result.exit_code == 2 and len(lines) == 1 and f"holds a '{found}' checkpoint" in lines[0], result.output
    assert not out.exists()
    with pytest.raises(vitcore.VitExtractError, match="--deepstack|offers last_hidden"):
        vitcore.extract([tmp_path], tmp_path / "x.h5", weights=str(folder), features=("deepstack",))


def test_fixed_resolution_matches_transformers_on_the_resized_picture(checkpoint, tmp_path):
    version, folder, visual = checkpoint
    images = tmp_path / "imgs"
    images.mkdir()
    for name, image in _images().items():
        image.save(images / f"{name}.png")
    out = tmp_path / "fixed.h5"
    vitcore.extract([images], out, weights=str(folder), resolution="112", dtype="float32", out_dtype="float32",
                    workers=0, batch_size=4, processor="pil")
    processor = transformers.Qwen2VLImageProcessorPil(size={"shortest_edge": 112 * 112, "longest_edge": 112 * 112})
    with vitcore.open_tokens(out) as f:
        assert not f.ragged and f.h5["tokens"].shape == (4, 16, 48)  # (112/14)² / 4 merged tokens each
        for key in f.keys:
            picture = Image.open(images / key).convert("RGB").resize((112, 112), Image.Resampling.BICUBIC)
            batch = processor(images=[picture], return_tensors="pt")
            with torch.no_grad():
                ref = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
            assert _rel(torch.from_numpy(f[key]), ref) < 1e-4
