"""A transformers checkpoint folder of a SigLIP, SigLIP2, CLIP or DINOv2 model, read for what a run
records before anything is built: the model type (config.json), the image processor's settings
(resolved against its class's defaults), and the identity of the vision tower's weights (a sha256
over the vision tensors' bytes; a text tower beside them is neither read nor hashed)."""

from __future__ import annotations

import dataclasses
import os

from vitcore.system.cache import cached_digest, weights_files
from vitcore.encoders.checkpoint_files import (
    file_digest, has_safetensors, processor_record, read_json, tensor_bytes, tensor_digest,
)
from vitcore.encoders.hf.processor import CLASS_DEFAULTS, HFPreprocess
from vitcore.encoders.pixels import RESAMPLE_NAMES, TORCH_MODES
from vitcore.errors import UsageError, WeightsError

# Where a two-tower checkpoint (CLIPModel, SiglipModel, Siglip2Model) keeps its vision tower.
VISION_PREFIXES = ("vision_model.", "visual_projection.")
LEGACY_WEIGHTS = "pytorch_model.bin"


def model_type(folder: str) -> str | None:
    """config.json's model_type, or None when there is no readable config.json."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        return read_json(path).get("model_type")
    except WeightsError:
        return None


def weights_sha256(folder: str, two_tower: bool) -> str:
    """The vision weights' identity: their tensors' names and bytes (every tensor of a vision-only
    checkpoint), or the whole file for a pytorch_model.bin; remembered while the files are unchanged."""
    return cached_digest(f"transformers tower (two towers: {two_tower})", weights_files(folder),
                         lambda: _weights_sha256(folder, two_tower))


def _weights_sha256(folder: str, two_tower: bool) -> str:
    if has_safetensors(folder):
        wanted = (lambda name: name.startswith(VISION_PREFIXES)) if two_tower else (lambda name: True)
        raw = {name: data for _, name, _, data in tensor_bytes(folder, wanted)}
        if not raw:
            raise WeightsError(f"{folder} holds no vision tensors ({' or '.join(p + '*' for p in VISION_PREFIXES)})")
        return tensor_digest(raw)
    legacy = os.path.join(folder, LEGACY_WEIGHTS)
    if os.path.isfile(legacy):
        return file_digest(legacy)
    raise WeightsError(f"{folder} has no weights: neither model.safetensors (or its index) nor {LEGACY_WEIGHTS}")


def image_processor(folder: str, model_type: str, default_class: str, backend: str) -> HFPreprocess:
    """What the folder's image processor does, as transformers resolves it (its JSON over its class's
    defaults); one line naming the file for a setting vit-extract cannot follow exactly."""
    record, where = processor_record(folder)
    kind = record.get("image_processor_type") or (record.get("feature_extractor_type") or "").replace(
        "FeatureExtractor", "ImageProcessor") or default_class
    kind = kind.removesuffix("Fast").removesuffix("Pil")
    if kind not in CLASS_DEFAULTS:
        raise WeightsError(f"{where} names image processor {kind}; vit-extract follows {', '.join(CLASS_DEFAULTS)}")
    defaults = CLASS_DEFAULTS[kind]

    def get(name, fallback=None):
        return record[name] if name in record else defaults.get(name, fallback)

    off = [name for name in ("do_resize", "do_rescale", "do_normalize") if get(name, True) is False]
    if off:
        raise WeightsError(f"{where}: {', '.join(off)} false is not supported (vit-extract resizes, rescales and "
                           "normalises as the checkpoints it reads do)")
    common = dict(processor=kind, resample=_resample(get("resample"), where), mean=_three(get("image_mean"), "image_mean", where),
                  std=_three(get("image_std"), "image_std", where), rescale_factor=_number(get("rescale_factor", 1 / 255), where),
                  backend=backend)
    if backend == "torchvision" and common["resample"] not in TORCH_MODES:
        raise UsageError(f"--processor torchvision: {where} resamples with {RESAMPLE_NAMES[common['resample']]}, which "
                         "transformers' torchvision backend cannot do; use --processor pil")
    if kind == "Siglip2ImageProcessor":
        return HFPreprocess(resize_rule="max_patches", patch_size=_whole(get("patch_size"), "patch_size", where),
                            max_num_patches=_whole(get("max_num_patches"), "max_num_patches", where), **common)
    size = _size(get("size"), defaults["default_to_square"], where)
    crop = _size(get("crop_size"), True, where) if get("do_center_crop") else None
    if crop is not None and set(crop) != {"height", "width"}:
        raise WeightsError(f"{where}: crop_size {get('crop_size')!r} is not a height and width")
    if "shortest_edge" in size:
        if crop is None:
            raise WeightsError(f"{where}: the shortest edge is resized to {size['shortest_edge']} without a centre crop, "
                               "so pictures differ in size; vit-extract needs a fixed input here (a crop_size, or size "
                               "with height and width)")
        prep = HFPreprocess(resize_rule="shortest_edge", shortest_edge=size["shortest_edge"], **common)
        room = (size["shortest_edge"], size["shortest_edge"])
    else:
        prep = HFPreprocess(resize_rule="fixed", height=size["height"], width=size["width"], **common)
        room = (size["height"], size["width"])
    if crop is not None:
        if crop["height"] > room[0] or crop["width"] > room[1]:
            raise WeightsError(f"{where}: crop_size {crop['height']}×{crop['width']} is larger than the resized picture "
                               f"can be ({room[0]}×{room[1]} at least); the backends pad it differently")
        prep = dataclasses.replace(prep, crop_height=crop["height"], crop_width=crop["width"])
    return prep


def _size(value, default_to_square: bool, where: str) -> dict:
    """transformers' size forms: an int (a square, or the shortest edge), {height, width}, {shortest_edge}."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    if isinstance(value, dict):
        given = {k: v for k, v in value.items() if v is not None}
        if set(given) in ({"height", "width"}, {"shortest_edge"}) and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in given.values()):
            return given
    raise WeightsError(f"{where}: size {value!r} is not a form vit-extract follows ({{height, width}} or "
                       "{shortest_edge}, whole numbers)")


def _resample(value, where: str) -> int:
    if isinstance(value, str) and value.lower() in RESAMPLE_NAMES:
        value = RESAMPLE_NAMES.index(value.lower())
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(RESAMPLE_NAMES):
        raise WeightsError(f"{where}: resample is {value!r}, not one of Pillow's filters "
                           f"({', '.join(f'{i} {n}' for i, n in enumerate(RESAMPLE_NAMES))})")
    return value


def _three(value, name: str, where: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,) * 3  # one number for every channel, as transformers takes it
    if not (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise WeightsError(f"{where}: {name} is {value!r}, not three numbers")
    return tuple(float(v) for v in value)


def _number(value, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise WeightsError(f"{where}: rescale_factor is {value!r}, not a positive number")
    return float(value)


def _whole(value, name: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise WeightsError(f"{where}: {name} is {value!r}, not a positive whole number")
    return value
