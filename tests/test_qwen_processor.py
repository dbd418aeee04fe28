"""The image processor's settings of a Qwen-VL checkpoint folder, held to transformers' own
resolution (AutoImageProcessor, Pillow backend) over the layouts users have: v4's
preprocessor_config.json and v5's nested processor_config.json, both size key styles, top-level
min/max_pixels, nulls, missing keys and transformers' defaults. Where transformers fails (at load or
on the first image), vit-extract refuses the folder in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers  # the oracle (a test dependency)
from PIL import Image

from tests.helpers import BACKENDS, processor_class
from vitcore.errors import WeightsError
from vitcore.encoders.qwen.processor import QwenVLPreprocess
from vitcore.encoders.qwen.checkpoint import image_processor_settings

QWEN3 = dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
EDGES = {"shortest_edge": 65536, "longest_edge": 16777216}
PRE, NESTED = "preprocessor_config.json", "processor_config.json"

# name → (config.json model_type, {file: content}); a content of None: the file is absent
VARIANTS = {
    "size in edges": ("qwen3_vl", {PRE: {**QWEN3, "size": EDGES}}),
    "top-level min/max over size (QwenLM/Qwen3-VL#1052)": ("qwen3_vl", {PRE: {**QWEN3, "size": EDGES,
                                                                               "min_pixels": 3136, "max_pixels": 50176}}),
    "only top-level max_pixels": ("qwen3_vl", {PRE: {**QWEN3, "size": EDGES, "max_pixels": 40000}}),
    "no size and no min/max: class defaults": ("qwen3_vl", {PRE: QWEN3}),
    "top-level min/max only": ("qwen2_vl", {PRE: {"min_pixels": 1000, "max_pixels": 60000}}),
    "size null, max_pixels given": ("qwen3_vl", {PRE: {**QWEN3, "size": None, "max_pixels": 300000}}),
    "min_pixels null: size kept": ("qwen3_vl", {PRE: {**QWEN3, "size": EDGES, "min_pixels": None}}),
    "size with only longest_edge": ("qwen3_vl", {PRE: {**QWEN3, "size": {"longest_edge": 50000}}}),
    "size in min/max style": ("qwen3_vl", {PRE: {**QWEN3, "size": {"min_pixels": 3136, "max_pixels": 50000}}}),
    "size min/max style with top-level both": ("qwen3_vl", {PRE: {**QWEN3, "size": {"min_pixels": 1, "max_pixels": 2},
                                                                  "min_pixels": 3136, "max_pixels": 50000}}),
    "size with an extra key": ("qwen3_vl", {PRE: {**QWEN3, "size": {**EDGES, "max_pixels": 9}}}),
    "v5 nested, no preprocessor_config": ("qwen3_vl", {NESTED: {"image_processor": {**QWEN3, "size": {
        "shortest_edge": 4096, "longest_edge": 65536}}}}),
    "nested wins over flat": ("qwen3_vl", {NESTED: {"image_processor": {**QWEN3, "size": {
        "shortest_edge": 4096, "longest_edge": 65536}}}, PRE: {**QWEN3, "size": EDGES}}),
    "nested empty: class defaults, flat ignored": ("qwen3_vl", {NESTED: {"image_processor": {}}, PRE: QWEN3}),
    "nested null: flat used": ("qwen3_vl", {NESTED: {"image_processor": None, "patch_size": 14}, PRE: QWEN3}),
    "no processor file at all": ("qwen3_vl", {}),
    "mean and std missing: CLIP's": ("qwen2_5_vl", {PRE: {"size": {"shortest_edge": 3136, "longest_edge": 80000}}}),
    "patch_size null": ("qwen3_vl", {PRE: {**QWEN3, "size": EDGES, "patch_size": None}}),
    "rescale_factor given": ("qwen3_vl", {PRE: {**QWEN3, "size": EDGES, "rescale_factor": 0.5 / 255}}),
    "another processor class": ("qwen3_vl", {PRE: {**QWEN3, "image_processor_type": "CLIPImageProcessor"}}),
    "Fast class name": ("qwen3_vl", {PRE: {**QWEN3, "image_processor_type": "Qwen2VLImageProcessorFast"}}),
    "qwen3_vl_moe naming no class": ("qwen3_vl_moe", {PRE: QWEN3}),
    "qwen3_vl_moe naming its class": ("qwen3_vl_moe", {PRE: {**QWEN3, "image_processor_type": "Qwen2VLImageProcessor"}}),
    "resample bilinear": ("qwen2_5_vl", {PRE: {"size": {"shortest_edge": 3136, "longest_edge": 80000}, "resample": 2}}),
    "resample by name": ("qwen3_vl", {PRE: {**QWEN3, "size": EDGES, "resample": "bilinear"}}),
    "resample null": ("qwen3_vl", {PRE: {**QWEN3, "size": EDGES, "resample": None}}),
}
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_RNG = np.random.default_rng(7)
SIZES = [(20, 17), (1500, 12), (1000, 800), (224, 224), (640, 480), (4032, 3024)] + [
    (int(w), int(h)) for w, h in _RNG.integers(1, 3000, (20, 2)) if max(w, h) / min(w, h) <= 200
][:6]  # (width, height): fixed ones, then seeded random ones (an aspect ratio over 200 fails any processor)


def _folder(tmp_path, model_type, files):
    tmp_path.joinpath("config.json").write_text(json.dumps({"model_type": model_type}))
    for name, content in files.items():
        tmp_path.joinpath(name).write_text(json.dumps(content))
    return tmp_path


def _transformers(folder, backend):
    """transformers' settings and grids for SIZES, or the error it raises (loading or on an image)."""
    wanted = processor_class(backend).__name__
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(str(folder), backend=backend)
        if type(processor).__name__ != wanted:
            return f"another class: {type(processor).__name__}"
        grids = [processor(images=[Image.new("RGB", size)], return_tensors="np")["image_grid_thw"][0].tolist()
                 for size in SIZES]
    except Exception as err:  # noqa: BLE001 - any failure is what we compare with
        return f"{type(err).__name__}: {err}"
    return dict(grids=grids, mean=list(processor.image_mean), std=list(processor.image_std),
                rescale=processor.rescale_factor, patch=processor.patch_size, merge=processor.merge_size,
                temporal=processor.temporal_patch_size, resample=RESAMPLE.get(processor.resample, processor.resample))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_processor_settings_are_what_transformers_resolves(tmp_path, name, backend):
    model_type, files = VARIANTS[name]
    folder = _folder(tmp_path, model_type, files)
    expected = _transformers(folder, backend)
    if isinstance(expected, str):  # transformers cannot use this folder: neither do we, in one line
        with pytest.raises(WeightsError) as refused:
            image_processor_settings(str(folder), model_type)
        assert "\n" not in str(refused.value) and str(folder) in str(refused.value), expected
        return
    settings = image_processor_settings(str(folder), model_type)
    prep = QwenVLPreprocess.from_settings(settings)
    grids = []
    for width, height in SIZES:
        h, w = prep.target_size(height, width)
        grids.append([1, h // prep.patch_size, w // prep.patch_size])
    assert grids == expected["grids"]
    assert (prep.patch_size, prep.merge_size, prep.temporal_patch_size) == (expected["patch"], expected["merge"],
                                                                            expected["temporal"])
    np.testing.assert_allclose(prep.mean, expected["mean"], rtol=0, atol=0)
    np.testing.assert_allclose(prep.std, expected["std"], rtol=0, atol=0)
    assert prep.rescale_factor == expected["rescale"] and prep.resample == expected["resample"]


def test_the_table_covers_both_outcomes():
    outcomes = {"refused": 0, "read": 0}
    import tempfile
    from pathlib import Path

    for model_type, files in VARIANTS.values():
        with tempfile.TemporaryDirectory() as tmp:
            outcomes["refused" if isinstance(_transformers(_folder(Path(tmp), model_type, files), "pil"), str) else "read"] += 1
    assert outcomes["refused"] >= 5 and outcomes["read"] >= 12, outcomes
