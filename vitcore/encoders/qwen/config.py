"""The Qwen-VL vision towers' configurations (torch-free): one frozen dataclass per tower, its fields
the checkpoint's vision_config keys, read by ``from_hf``; ``to_json`` is the record a file keeps."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from vitcore.errors import WeightsError

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "silu")  # the vision hidden_act values the towers run


@dataclass(frozen=True)
class TowerConfig:
    """What every Qwen-VL tower config holds and answers: the fields all three read the same way,
    the tower's width D, the merger's output width, the DeepStack levels, the record a file keeps.
    Defaults are Qwen2-VL's and Qwen2.5-VL's; Qwen3-VL sets its own."""

    depth: int = 32
    num_heads: int = 16
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    in_channels: int = 3
    rope_theta: float = 10000.0

    family = ""  # the encoder family's name, in the record
    deepstack_levels = 0
    width_field = "hidden_size"  # the vision_config key of the tower's width D
    out_width_field = "out_hidden_size"  # … of the merger's output width (the language model's)

    @property
    def width(self) -> int:
        return getattr(self, self.width_field)

    @property
    def out_width(self) -> int:
        return getattr(self, self.out_width_field)

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "family": self.family}, sort_keys=True)

    @classmethod
    def shared_fields(cls, vision: dict) -> dict:
        """The fields every tower reads the same way from a vision_config (older ones say in_chans)."""
        rope = vision.get("rope_parameters") or {}
        return dict(
            depth=vision["depth"], num_heads=vision["num_heads"], patch_size=vision.get("patch_size", cls.patch_size),
            spatial_merge_size=vision.get("spatial_merge_size", cls.spatial_merge_size),
            temporal_patch_size=vision.get("temporal_patch_size", cls.temporal_patch_size),
            in_channels=vision.get("in_channels", vision.get("in_chans", cls.in_channels)),
            rope_theta=float(rope.get("rope_theta", vision.get("rope_theta", cls.rope_theta))),
        )


def _activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"vision hidden_act {name!r} is not one of {', '.join(ACTIVATIONS)}")
    return name


@dataclass(frozen=True)
class Qwen3VLConfig(TowerConfig):
    depth: int = 27
    patch_size: int = 16
    hidden_size: int = 1152  # D
    intermediate_size: int = 4304
    out_hidden_size: int = 3584  # the language model's width
    num_position_embeddings: int = 2304  # a 48 × 48 learned table
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)

    family = "qwen3-vl"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def deepstack_levels(self) -> int:
        return len(self.deepstack_visual_indexes)

    @classmethod
    def from_hf(cls, vision: dict) -> "Qwen3VLConfig":
        """From the ``vision_config`` of a checkpoint's config.json."""
        act = vision.get("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise WeightsError(f"unsupported vision hidden_act {act!r} (Qwen3-VL uses gelu_pytorch_tanh)")
        return cls(
            **cls.shared_fields(vision),
            hidden_size=vision["hidden_size"],
            intermediate_size=vision["intermediate_size"],
            out_hidden_size=vision["out_hidden_size"],
            num_position_embeddings=vision.get("num_position_embeddings", 2304),
            deepstack_visual_indexes=tuple(vision.get("deepstack_visual_indexes", (8, 16, 24))),
        ).checked()

    def checked(self) -> "Qwen3VLConfig":
        late = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if late:
            raise ValueError(f"deepstack_visual_indexes {list(self.deepstack_visual_indexes)} name block {late[0]}, "
                             f"but the vision tower has {self.depth} blocks (0..{self.depth - 1})")
        return self


@dataclass(frozen=True)
class Qwen2VLConfig(TowerConfig):
    embed_dim: int = 1280  # D, the tower's width
    hidden_size: int = 3584  # the language model's width (the merger's output)
    mlp_ratio: float = 4.0
    hidden_act: str = "quick_gelu"

    family = "qwen2-vl"
    width_field, out_width_field = "embed_dim", "hidden_size"

    @classmethod
    def from_hf(cls, vision: dict) -> "Qwen2VLConfig":
        return cls(
            **cls.shared_fields(vision), embed_dim=vision["embed_dim"], hidden_size=vision["hidden_size"],
            mlp_ratio=float(vision.get("mlp_ratio", 4)), hidden_act=_activation(vision.get("hidden_act", "quick_gelu")),
        )


@dataclass(frozen=True)
class Qwen25VLConfig(TowerConfig):
    hidden_size: int = 1280  # D, the tower's width
    out_hidden_size: int = 3584  # the language model's width
    intermediate_size: int = 3420
    hidden_act: str = "silu"
    window_size: int = 112  # pixels: windows of window_size / patch / merge merged tokens a side
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)  # these blocks attend within the whole image

    family = "qwen2.5-vl"

    @property
    def window_units(self) -> int:
        """A window's side in merged tokens."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @classmethod
    def from_hf(cls, vision: dict) -> "Qwen25VLConfig":
        cfg = cls(
            **cls.shared_fields(vision), hidden_size=vision["hidden_size"], out_hidden_size=vision["out_hidden_size"],
            intermediate_size=vision["intermediate_size"], hidden_act=_activation(vision.get("hidden_act", "silu")),
            window_size=vision.get("window_size", 112),
            fullatt_block_indexes=tuple(vision.get("fullatt_block_indexes", (7, 15, 23, 31))),
        )
        if cfg.window_units < 1:
            raise ValueError(f"window_size {cfg.window_size} is smaller than one merged token "
                             f"({cfg.patch_size * cfg.spatial_merge_size} pixels)")
        return cfg
