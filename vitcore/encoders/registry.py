"""The encoder families, and the only place that names them all: which family takes a run's
--model / --weights, and which made a file.

A family is an object with the interface in base.py, defined in its own package (seed/, qwen/, hf/).
Adding one means writing its package and adding it to FAMILIES; nothing else branches on which
family a run uses. Family objects are torch-free until they build an encoder.
"""

from __future__ import annotations

import json
import os

from vitcore.encoders.base import checkpoint_config
from vitcore.encoders.checkpoint_files import hub_snapshot
from vitcore.encoders.hf.family import CLIP, DINOV2, SIGLIP, SIGLIP2
from vitcore.encoders.qwen.family import QWEN2_5_VL, QWEN2_VL, QWEN3_VL
from vitcore.encoders.seed.family import SEED
from vitcore.encoders.timm_vit.family import TIMM
from vitcore.errors import UsageError

# The first is the default: files made before records named their family are its.
FAMILIES = (SEED, QWEN3_VL, QWEN2_5_VL, QWEN2_VL, SIGLIP, SIGLIP2, CLIP, DINOV2, TIMM)
BY_NAME = {family.name: family for family in FAMILIES}
DEFAULT_FAMILY = FAMILIES[0].name


def get(name: str):
    """The family called ``name``."""
    if name not in BY_NAME:
        raise UsageError(f"unknown encoder family {name!r}: this vit-extract knows {', '.join(BY_NAME)}")
    return BY_NAME[name]


def for_run(model, weights: str | None):
    """The family that takes this run's --model and --weights: the one whose name --model is, else
    the one that recognises the weights (a checkpoint is told by what it is), else the default."""
    if isinstance(model, str) and model.strip().lower() in BY_NAME:
        return get(model.strip().lower())
    for family in FAMILIES[1:] + FAMILIES[:1]:  # the default family, which takes the most, is asked last
        if family.claims(model, weights):
            return family
    if weights is not None and model is not None:
        owner = next((f for f in FAMILIES if f.claims(None, weights)), None)
        if owner is not None:
            raise UsageError(f"--weights {weights} is a {owner.name} checkpoint, and --model {model} is not "
                             f"{owner.name}: drop --model (or use --model {owner.name})")
    if weights is not None and os.path.isdir(weights):
        raise UsageError(f"--weights {weights} is a folder but not a checkpoint any encoder family reads "
                         f"({_checkpoint_kind(weights)}); the seed encoders take a .safetensors file")
    return FAMILIES[0]


def checkpoint_folder(folder: str) -> str:
    """--weights DIR as the families read it: a Hugging Face hub cache folder (models--ORG--NAME) is
    its current snapshot (refs/main), as transformers resolves a model id from the cache."""
    return hub_snapshot(folder)


def _checkpoint_kind(folder: str) -> str:
    """What a folder's config.json says it is, in a few words."""
    config = checkpoint_config(folder)
    if config is None:
        return "no readable config.json"
    if "architecture" in config and "model_type" not in config:  # timm's hub folders: config.json names it so
        return (f"it looks like a timm model folder (architecture {config['architecture']!r}): use "
                f"--model timm:{config['architecture']} --weights {os.path.join(folder, 'model.safetensors')}")
    known = [t for family in FAMILIES for t in getattr(family, "model_types", ())]
    return f"config.json model_type {config.get('model_type')!r} is none of {', '.join(known)}"


def for_record(encoder: dict | str):
    """The family that made a file, from its ``encoder`` record (files made before records named
    their family are the default family's)."""
    record = json.loads(encoder) if isinstance(encoder, str) else encoder
    return get(record.get("family", DEFAULT_FAMILY))


def write_untrained_weights(model, seed: int, project_dim: int | None, path: str) -> str:
    """`vit-extract init-weights`: the default family's seeded encoder written as a weights file that
    says it is untrained; the name of what was written."""
    return FAMILIES[0].write_untrained(model, seed, project_dim, path)


def preset_table() -> list[dict]:
    """The default family's presets, one dict each, for `vit-extract models`."""
    return FAMILIES[0].presets()


def listing() -> list[tuple[str, str]]:
    """(name, one line) for every family, for `vit-extract models` and help texts."""
    return [(family.name, family.summary) for family in FAMILIES]
