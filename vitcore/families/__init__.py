"""Encoder families: the kinds of encoder vit-extract runs, found by name or by what a checkpoint is.

Each family is a module holding ``FAMILY``, an object with the EncoderFamily interface
(families/base.py). Adding a family means writing its module and adding one line to REGISTRY;
nothing outside the family's own modules branches on which family a run uses.

This module and the family modules import torch only inside the calls that build an encoder,
so ``vit-extract --help``, ``info`` and the readers stay torch-free.
"""

from __future__ import annotations

import importlib
import json
import os

from vitcore.errors import UsageError

# name (stored as the encoder record's "family") → module holding FAMILY. The first is the default.
REGISTRY = {
    "seed": "vitcore.families.seed",  # the seed encoders: small | base | large | custom specs, .safetensors
    "qwen3-vl": "vitcore.families.qwen3vl",  # the vision tower of a Hugging Face Qwen3-VL checkpoint folder
    "qwen2.5-vl": "vitcore.families.qwen2_5vl",  # … of a Qwen2.5-VL checkpoint folder
    "qwen2-vl": "vitcore.families.qwen2vl",  # … of a Qwen2-VL checkpoint folder
}
DEFAULT_FAMILY = "seed"


def get(name: str):
    """The family called ``name`` (its FAMILY object)."""
    if name not in REGISTRY:
        raise UsageError(f"unknown encoder family {name!r}: this vit-extract knows {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name]).FAMILY


def all_families() -> list:
    return [get(name) for name in REGISTRY]


def for_run(model, weights: str | None):
    """The family that takes this run's --model and --weights: the one whose name --model is, else
    the one that recognises the weights (a checkpoint is told by what it is), else the default."""
    if isinstance(model, str) and model.strip().lower() in REGISTRY:
        return get(model.strip().lower())
    for family in all_families():
        if family.claims(model, weights):
            return family
    if weights is not None and model is not None:
        owner = next((f for f in all_families() if f.claims(None, weights)), None)
        if owner is not None:
            raise UsageError(f"--weights {weights} is a {owner.name} checkpoint, and --model {model} is not "
                             f"{owner.name}: drop --model (or use --model {owner.name})")
    if weights is not None and os.path.isdir(weights):
        raise UsageError(f"--weights {weights} is a folder but not a checkpoint any encoder family reads "
                         f"({_checkpoint_kind(weights)}); the seed encoders take a .safetensors file")
    return get(DEFAULT_FAMILY)


def checkpoint_config(folder) -> dict | None:
    """A checkpoint folder's config.json as a dict, or None when there is none to read."""
    try:
        with open(os.path.join(folder, "config.json")) as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _checkpoint_kind(folder: str) -> str:
    """What a folder's config.json says it is, in a few words."""
    config = checkpoint_config(folder)
    if config is None:
        return "no readable config.json"
    return f"config.json model_type {config.get('model_type')!r}; families here: {', '.join(REGISTRY)}"


def for_record(encoder: dict | str):
    """The family that made a file, from its ``encoder`` record (files made before records named
    their family are the default family's)."""
    record = json.loads(encoder) if isinstance(encoder, str) else encoder
    return get(record.get("family", DEFAULT_FAMILY))


def listing() -> list[tuple[str, str]]:
    """(name, one line) for every family, for `vit-extract models` and help texts."""
    return [(name, get(name).summary) for name in REGISTRY]
