"""Reading a Hugging Face Qwen-VL checkpoint folder as transformers would: its JSON files and the
vision tower's tensors (the language model's are never read). Shared by the Qwen-VL families.

Every problem is a one-line WeightsError that names the file: JSON that does not parse, a shard
the index names but the folder lacks, a git-lfs pointer in place of the weights, a file that is
not safetensors or is cut short.
"""

from __future__ import annotations

import os

from vitcore.encoders.checkpoint_files import processor_record, read_json, tensor_bytes, tensor_digest
from vitcore.errors import WeightsError
from vitcore.system.cache import cached_digest, known_digest, weights_files

DIGEST_KIND = "qwen-vl vision tensors"  # names (model.visual.*) and bytes, in name order

# Where the vision tower's tensors live: transformers ≥ 4.52 saves them under model.visual.; older
# saves and the bare Qwen*VLModel under visual. (transformers loads both to the same weights).
VISION_PREFIXES = ("model.visual.", "visual.")


def _vision_bytes(folder: str):
    """(shard path, name as hashed: model.visual.*, its safetensors entry, its bytes) for each vision tensor."""
    seen = set()
    for path, name, entry, raw in tensor_bytes(folder, lambda n: n.startswith(VISION_PREFIXES)):
        short = _strip(name)
        if short in seen:
            raise WeightsError(f"{folder} holds the vision tensor {short} under both prefixes")
        seen.add(short)
        yield path, VISION_PREFIXES[0] + short, entry, raw
    if not seen:
        raise WeightsError(f"{folder} holds no vision tensors ({' or '.join(p + '*' for p in VISION_PREFIXES)})")


def vision_weights_sha256(folder: str) -> str:
    """The vision weights' identity (as read_vision_tensors gives it) without making tensors: what a
    resume compares before deciding whether the tower must be built at all."""
    return cached_digest(DIGEST_KIND, weights_files(folder),
                         lambda: tensor_digest({name: raw for _, name, _, raw in _vision_bytes(folder)}))


def read_vision_tensors(folder: str, dtype=None) -> tuple[dict[str, object], str]:
    """The vision tower's tensors (names without their prefix), in ``dtype`` when given, and their
    identity (vision_weights_sha256): the language model's tensors are never read nor hashed. Names
    are hashed as model.visual.*, so the same weights saved under either prefix have the same
    identity. Each tensor is cast as it is read, and its file bytes are kept only while the weights
    must be hashed (their digest is not remembered yet): a float32 checkpoint for a bfloat16 run
    never sits whole in memory beside the bfloat16 tower."""
    import torch  # torch: a record hashes the bytes without it; only loading makes tensors

    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    files = weights_files(folder)
    known = known_digest(DIGEST_KIND, files)
    tensors: dict[str, torch.Tensor] = {}
    raw_by_name: dict[str, bytearray] = {}  # hashed below, before anything can change the tensors
    for path, name, entry, raw in _vision_bytes(folder):
        stored = dtypes.get(entry["dtype"])
        if stored is None:
            raise WeightsError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        if known is None:
            raw_by_name[name] = raw
        tensor = torch.frombuffer(raw, dtype=stored) if raw else torch.empty(0, dtype=stored)
        tensor = tensor.reshape(entry["shape"])
        if dtype is not None and dtype != stored:
            tensor = tensor.to(dtype)  # a copy: the file's bytes can go (unless they are being hashed)
        tensors[_strip(name)] = tensor
    return tensors, known or cached_digest(DIGEST_KIND, files, lambda: tensor_digest(raw_by_name))


def _strip(name: str) -> str:
    for prefix in VISION_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


# -- a tower: its config checked against its processor, its weights loaded strictly -----------------
def read_tower_config(folder: str, parse, label: str):
    """(the tower's config, the processor's settings) of a checkpoint folder, checked against each
    other. ``parse(vision_config)`` builds the family's config; it raises KeyError, TypeError or
    ValueError for a vision config it cannot take."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise WeightsError(f"{folder} is not a {label} checkpoint folder: it has no config.json")
    config = read_json(config_path)
    vision = config.get("vision_config")
    if not isinstance(vision, dict):
        raise WeightsError(f"{config_path} has no readable vision_config")
    try:
        cfg = parse(vision)
    except KeyError as err:
        raise WeightsError(f"{config_path}: vision_config lacks {err}") from None
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{config_path}: {err}") from None
    settings = image_processor_settings(folder, config.get("model_type"))
    for name, theirs, ours in (("patch_size", settings["patch_size"], cfg.patch_size),
                               ("merge_size", settings["merge_size"], cfg.spatial_merge_size),
                               ("temporal_patch_size", settings["temporal_patch_size"], cfg.temporal_patch_size)):
        if theirs != ours:
            raise WeightsError(f"{folder}: the image processor's {name} is {theirs} but the vision config's is "
                               f"{ours}; the processor's settings do not fit this checkpoint")
    return cfg, settings


def load_tower(folder: str, parse, tower, label: str, device="cpu", dtype=None):
    """(the vision tower, strictly loaded, without the language model; the processor's settings).
    ``tower(cfg)`` builds the family's module; ``model.weights_sha256`` identifies its weights."""
    import torch  # torch: a record hashes the bytes without it; only loading makes tensors

    cfg, settings = read_tower_config(folder, parse, label)
    with torch.device("meta"):
        model = tower(cfg)
    state, digest = read_vision_tensors(folder, dtype or torch.float32)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    misshaped = [n for n in sorted(set(expected) & set(state)) if tuple(state[n].shape) != expected[n]]
    if missing or unexpected or misshaped:
        raise WeightsError(f"{folder} does not fit its {label} vision config: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}, wrong shape {misshaped[:4]}")
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype or torch.float32).eval().requires_grad_(False)
    model.weights_sha256 = digest
    return model, settings


# -- the image processor's settings, resolved as transformers resolves them ------------------------
# Qwen2-VL, Qwen2.5-VL and Qwen3-VL share one image processor class (Qwen2VLImageProcessor and its
# Pillow twin); a checkpoint differs only in the values it stores. The class defaults:
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROCESSOR_DEFAULTS = {
    "size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
    "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
    "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD, "rescale_factor": 1 / 255,
    "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
    "resample": 3,  # bicubic
}
RESAMPLE_CODES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
# model_type values for which transformers picks that class when the JSON names none (qwen3_vl_moe
# is not among them in transformers 5.24: such a folder needs image_processor_type).
PROCESSOR_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
PROCESSOR_CLASSES = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorPil")
SIZE_KEY_SETS = ({"shortest_edge", "longest_edge"}, {"shortest_edge"}, {"longest_edge"}, {"min_pixels", "max_pixels"},
                 {"height", "width"}, {"max_height", "max_width"})


def image_processor_settings(folder: str, model_type: str | None) -> dict:
    """min_pixels, max_pixels, patch_size, merge_size, temporal_patch_size, image_mean, image_std and
    rescale_factor as transformers' AutoImageProcessor resolves them for ``folder`` (the Pillow
    backend): the nested ``image_processor`` of v5's processor_config.json, else the whole of
    preprocessor_config.json, never both; top-level min_pixels / max_pixels over ``size``; a key
    given as null is null (transformers then fails on the first image: so does this, at once)."""
    record, where = processor_record(folder)
    kind = record.get("image_processor_type") or (record.get("feature_extractor_type") or "").replace(
        "FeatureExtractor", "ImageProcessor") or None
    if kind is not None and kind.removesuffix("Fast") not in PROCESSOR_CLASSES:
        raise WeightsError(f"{where} names image processor {kind}, not Qwen2VLImageProcessor")
    if kind is None and model_type not in PROCESSOR_MODEL_TYPES:
        raise WeightsError(f"{where} names no image_processor_type and config.json's model_type {model_type!r} "
                           "does not choose one (transformers cannot load it either)")
    size = record.get("size")
    size = dict(PROCESSOR_DEFAULTS["size"]) if size is None else size
    for top, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        if record.get(top) is not None:  # the older top-level keys win over size
            if not isinstance(size, dict):
                raise WeightsError(f"{where}: size {size!r} cannot take {top}")
            size = {**size, edge: record[top]}
            size.pop(top, None)
    if isinstance(size, dict) and set(size) not in SIZE_KEY_SETS:
        raise WeightsError(f"{where}: size has keys {sorted(size)}; transformers takes shortest_edge and longest_edge")
    edges = {k: v for k, v in size.items() if v is not None} if isinstance(size, dict) else {}
    settings = {"min_pixels": edges.get("shortest_edge"), "max_pixels": edges.get("longest_edge"),
                "size_found": f"size {size!r}"}
    for name in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std", "rescale_factor",
                 "do_resize", "do_rescale", "do_normalize", "do_convert_rgb", "resample"):
        settings[name] = record[name] if name in record else PROCESSOR_DEFAULTS[name]
    _check_processor(settings, where)
    return settings


def _check_processor(s: dict, where: str) -> None:
    """What would make transformers fail on the first image, or what this reader does not do."""
    if not s["min_pixels"] or not s["max_pixels"]:
        raise WeightsError(f"{where}: the resize needs size.shortest_edge and size.longest_edge (min and max "
                           f"pixels, or top-level min_pixels and max_pixels); it has {s['size_found']}")
    resample = s["resample"]
    if isinstance(resample, str):
        resample = RESAMPLE_CODES.get(resample.lower())
    if not isinstance(resample, int) or isinstance(resample, bool) or resample not in RESAMPLE_CODES.values():
        raise WeightsError(f"{where}: resample is {s['resample']!r}, not one of Pillow's filters "
                           f"({', '.join(f'{v} {k}' for k, v in RESAMPLE_CODES.items())})")
    s["resample"] = resample
    del s["size_found"]
    for name in ("patch_size", "merge_size", "temporal_patch_size"):
        if not isinstance(s[name], int) or isinstance(s[name], bool) or s[name] < 1:
            raise WeightsError(f"{where}: {name} is {s[name]!r}, not a positive whole number")
    if not isinstance(s["rescale_factor"], (int, float)) or isinstance(s["rescale_factor"], bool):
        raise WeightsError(f"{where}: rescale_factor is {s['rescale_factor']!r}, not a number")
    for name in ("image_mean", "image_std"):
        value = s[name]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = s[name] = (float(value),) * 3  # one number for every channel, as transformers takes it
        if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
            raise WeightsError(f"{where}: {name} is {value!r}, not three numbers")
        s[name] = tuple(float(v) for v in value)
    off = [name for name in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb") if s[name] is False]
    if off:
        raise WeightsError(f"{where}: {', '.join(off)} false is not supported (vit-extract resizes, rescales, "
                           "normalises and converts to RGB as the checkpoints it reads do)")
