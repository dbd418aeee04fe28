"""Encoder configurations: one dataclass, presets as data.

The presets are the seed architecture's three sizes (README: The encoder).
A custom encoder is the same dataclass with other numbers, written on the command
line as ``dim=64,depth=2,heads=4`` (unnamed fields keep the base preset's values).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from vitcore.errors import UsageError


@dataclass(frozen=True)
class EncoderConfig:
    dim: int = 1024  # token width D
    depth: int = 24  # number of transformer blocks
    heads: int = 16  # attention heads; head dim D/heads must be divisible by 4 (2-D RoPE)
    patch: int = 14  # patch side in pixels (Conv2d kernel = stride = patch)
    image_size: int = 224  # square input side; 224 / 14 = 16 × 16 = 256 tokens
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio · D
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-6  # LayerNorm epsilon
    project_dim: int | None = None  # optional Linear(D → P) on every token after the final norm
    name: str = "custom"  # preset name, or "custom"

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch
        return side, side

    @property
    def num_tokens(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def out_dim(self) -> int:
        """Width of the stored tokens: P with a projector, else D."""
        return self.project_dim or self.dim

    def validate(self) -> "EncoderConfig":
        problems = []
        for field in ("dim", "depth", "heads", "patch", "image_size"):
            if getattr(self, field) < 1:
                problems.append(f"{field} must be at least 1")
        if not problems:
            if self.dim % self.heads:
                problems.append(f"dim {self.dim} is not divisible by heads {self.heads}")
            elif self.head_dim % 4:
                problems.append(
                    f"head dim {self.head_dim} (dim/heads) must be divisible by 4 for 2-D RoPE"
                )
            if self.image_size % self.patch:
                problems.append(f"image_size {self.image_size} is not a multiple of patch {self.patch}")
        if self.project_dim is not None and self.project_dim < 1:
            problems.append("project_dim must be at least 1")
        if problems:
            raise UsageError(f"invalid encoder config: {'; '.join(problems)}")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EncoderConfig":
        try:
            data = json.loads(text)
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = set(data) - known
            if unknown:
                raise ValueError(f"unknown fields {sorted(unknown)}")
            return cls(**data).validate()
        except (ValueError, TypeError) as err:
            raise UsageError(f"unreadable encoder config {text[:80]!r}: {err}") from None

    def with_projector(self, project_dim: int | None) -> "EncoderConfig":
        return dataclasses.replace(self, project_dim=project_dim).validate()


PRESETS: dict[str, EncoderConfig] = {
    "small": EncoderConfig(dim=512, depth=12, heads=8, name="small"),
    "base": EncoderConfig(dim=1024, depth=24, heads=16, name="base"),
    "large": EncoderConfig(dim=1280, depth=32, heads=16, name="large"),
}
DEFAULT_PRESET = "base"

_SPEC_TYPES = {
    "dim": int, "depth": int, "heads": int, "patch": int, "image_size": int,
    "mlp_ratio": float, "rope_theta": float, "norm_eps": float, "project_dim": int,
}


def parse_model(spec: str) -> EncoderConfig:
    """A preset name (``small``) or a custom spec (``dim=64,depth=2,heads=4``)."""
    spec = spec.strip()
    if spec in PRESETS:
        return PRESETS[spec]
    if "=" not in spec:
        raise UsageError(
            f"unknown model {spec!r}: use one of {', '.join(PRESETS)} "
            "or a custom spec like dim=256,depth=4,heads=4"
        )
    values: dict[str, object] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, _, raw = part.partition("=")
        key = key.strip().replace("-", "_")
        if key not in _SPEC_TYPES:
            raise UsageError(f"unknown field {key!r} in model spec; fields: {', '.join(_SPEC_TYPES)}")
        try:
            values[key] = _SPEC_TYPES[key](raw)
        except ValueError:
            raise UsageError(f"model spec field {key}={raw!r} is not a number") from None
    return dataclasses.replace(PRESETS[DEFAULT_PRESET], name="custom", **values).validate()


def parameter_count(cfg: EncoderConfig) -> int:
    """Parameters of the encoder, counted from its shapes (no torch needed; the tests check it)."""
    d, hidden, p = cfg.dim, int(cfg.dim * cfg.mlp_ratio), cfg.patch
    patch_embed = 3 * p * p * d + d
    attention = d * 3 * d + 3 * d + d * d + d  # fused qkv + output projection
    mlp = d * hidden + hidden + hidden * d + d
    norms = 2 * 2 * d
    projector = d * cfg.project_dim + cfg.project_dim if cfg.project_dim else 0
    return patch_embed + cfg.depth * (attention + mlp + norms) + 2 * d + projector


def resolve_layer(index: int, depth: int) -> int:
    """Block index K (negative counts from the end) → 0-based block number."""
    if not -depth <= index < depth:
        raise IndexError(f"layer {index} is out of range for an encoder of depth {depth}")
    return index % depth
