"""What a seed weights file says without loading it (torch-free, so a run's settings can be checked
before torch is imported): its architecture and untrained marks (safetensors metadata), its content
hash, and the config a run builds from --model, --weights and --project-dim."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open

from vitcore.encoders.base import WeightsInfo
from vitcore.encoders.seed.config import DEFAULT_PRESET, EncoderConfig, parse_model
from vitcore.errors import UsageError, WeightsError
from vitcore.system.cache import cached_digest

CONFIG_METADATA_KEY = "vit_extract.config"
UNTRAINED_METADATA_KEY = "vit_extract.untrained_seed"  # present only in files of a random initialisation


def _metadata(path: str | os.PathLike) -> dict[str, str]:
    """A weights file's metadata (read once per file version: a run asks for its config and its marks)."""
    try:
        stat = os.stat(path)
    except OSError as err:
        raise WeightsError(f"cannot read weights file {path}: {err}") from None
    return dict(_metadata_of(os.fspath(path), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _metadata_of(path: str, size: int, mtime: int) -> tuple:
    try:
        with safe_open(path, framework="numpy") as handle:  # the metadata alone: no tensors made
            return tuple((handle.metadata() or {}).items())
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"cannot read weights file {path}: {err}") from None


def read_weights_config(path: str | os.PathLike) -> EncoderConfig | None:
    """The architecture stored in a weights file, or None when it has none."""
    text = _metadata(path).get(CONFIG_METADATA_KEY)
    return EncoderConfig.from_json(text) if text else None


def file_sha256(path: str | os.PathLike) -> str:
    """The file's sha256, remembered while it is unchanged (system/cache.py)."""
    return cached_digest("file", [os.fspath(path)], lambda: _hash_file(path))


def _hash_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_config(
    model: str | EncoderConfig | None, weights: str | os.PathLike | None, project_dim: int | None
) -> EncoderConfig:
    """The encoder to build from --model, --weights and --project-dim, refusing contradictions."""

    asked = parse_model(model) if isinstance(model, str) else model
    stored = None
    if weights is not None:
        if Path(weights).is_dir():
            raise UsageError(f"--weights {weights} is a folder; the seed encoders read a .safetensors file")
        if not Path(weights).is_file():
            raise WeightsError(f"weights file {weights} does not exist")
        stored = read_weights_config(weights)
    if stored is not None:
        if asked is not None and _architecture(asked) != _architecture(stored):
            raise UsageError(
                f"--model {asked.name} does not match the encoder stored in {weights} "
                f"({stored.name}: dim {stored.dim}, depth {stored.depth}, heads {stored.heads}); "
                "drop --model to use the file's"
            )
        if project_dim is not None and project_dim != stored.project_dim:
            raise UsageError(
                f"--project-dim {project_dim} does not match {weights}, whose projector is "
                f"{stored.project_dim or 'absent'}; drop --project-dim"
            )
        return stored
    cfg = asked or parse_model(DEFAULT_PRESET)
    return cfg.with_projector(project_dim if project_dim is not None else cfg.project_dim)


def _architecture(cfg: EncoderConfig) -> tuple:
    return (cfg.dim, cfg.depth, cfg.heads, cfg.patch, cfg.image_size, cfg.mlp_ratio)


def weights_info(weights: str | os.PathLike | None, seed: int = 0) -> WeightsInfo:
    """What the file records of the weights: the seed, or the weights file's path and content hash."""
    if weights is None:
        return WeightsInfo(source="untrained", seed=seed)
    untrained_seed = _metadata(weights).get(UNTRAINED_METADATA_KEY)
    if untrained_seed is not None:  # written by init-weights: a random initialisation, still
        return WeightsInfo(source="untrained file", seed=int(untrained_seed), path=str(Path(weights).resolve()),
                           sha256=file_sha256(weights))
    return WeightsInfo(source="file", path=str(Path(weights).resolve()), sha256=file_sha256(weights))
