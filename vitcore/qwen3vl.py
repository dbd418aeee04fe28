"""The Qwen3-VL vision tower, and reading it from a Hugging Face checkpoint folder (the image
processor is qwen_preprocess.py, the layers the Qwen-VL towers share are qwen_layers.py).

Written from reference/qwen3vl-vision.md; transformers' Qwen3VLVisionModel is the test oracle.
It shares the seed encoder's 2-D RoPE (same frequencies, same rotate-half layout) from model.py.

    image → smart resize to multiples of 32 → rescale, normalise (mean/std 0.5)
      → patches flattened in merge-block order: (N, 3·2·16·16), N = h·w patches
      → patch embed (the Conv3d as one matmul) + learned 48×48 position table resampled to (h, w)
      → depth × pre-LN block (tanh-GELU MLP; 2-D RoPE on q, k; full attention within each image)
      → merger: LN → 2×2 concat → Linear → GELU → Linear   → (N/4, out)     the tokens the LM sees
      → DeepStack mergers on the outputs of blocks deepstack_visual_indexes → 3 × (N/4, out)

Token order everywhere is merge-block order (block row, block col, row in block, col in block),
so four consecutive patches form one merged token; merged tokens come out in raster order over
the merged grid (h/2, w/2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vitcore.errors import WeightsError
from vitcore.model import Rope2D
from vitcore.qwen_layers import Attention, TowerConfig, merge_order_positions, rope_tables
from vitcore.qwen_preprocess import QwenVLPreprocess
from vitcore.qwen_checkpoint import VISION_PREFIXES, load_tower

CHECKPOINT_PREFIX = VISION_PREFIXES[0]  # where transformers ≥ 4.52 saves the vision tower


@dataclass(frozen=True)
class Qwen3VLConfig(TowerConfig):
    depth: int = 27
    hidden_size: int = 1152  # D
    num_heads: int = 16
    intermediate_size: int = 4304
    out_hidden_size: int = 3584  # the language model's width
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304  # a 48 × 48 learned table
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = 10000.0
    in_channels: int = 3

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    family = "qwen3-vl"

    @property
    def deepstack_levels(self) -> int:
        return len(self.deepstack_visual_indexes)

    @classmethod
    def from_hf(cls, vision: dict) -> "Qwen3VLConfig":
        """From the ``vision_config`` of a checkpoint's config.json."""
        act = vision.get("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise WeightsError(f"unsupported vision hidden_act {act!r} (Qwen3-VL uses gelu_pytorch_tanh)")
        rope = vision.get("rope_parameters") or {}
        return cls(
            depth=vision["depth"],
            hidden_size=vision["hidden_size"],
            num_heads=vision["num_heads"],
            intermediate_size=vision["intermediate_size"],
            out_hidden_size=vision["out_hidden_size"],
            patch_size=vision.get("patch_size", 16),
            temporal_patch_size=vision.get("temporal_patch_size", 2),
            spatial_merge_size=vision.get("spatial_merge_size", 2),
            num_position_embeddings=vision.get("num_position_embeddings", 2304),
            deepstack_visual_indexes=tuple(vision.get("deepstack_visual_indexes", (8, 16, 24))),
            rope_theta=float(rope.get("rope_theta", vision.get("rope_theta", 10000.0))),
            in_channels=vision.get("in_channels", 3),
        ).checked()

    def checked(self) -> "Qwen3VLConfig":
        late = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if late:
            raise ValueError(f"deepstack_visual_indexes {list(self.deepstack_visual_indexes)} name block {late[0]}, "
                             f"but the vision tower has {self.depth} blocks (0..{self.depth - 1})")
        return self



# -- the encoder -----------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    def __init__(self, cfg: Qwen3VLConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # kernel = stride: the Conv3d is one matmul over each flattened (c, t, y, x) patch.
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)  # (D, 3·T·p·p)
        return F.linear(patches.to(weight.dtype), weight, self.proj.bias)  # (N, D)


class Mlp(nn.Module):
    def __init__(self, cfg: Qwen3VLConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))  # tanh GELU in blocks


class Block(nn.Module):
    def __init__(self, cfg: Qwen3VLConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.mlp = Mlp(cfg)

    def forward(self, x, cos, sin, lengths):
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class Merger(nn.Module):
    """2×2 patches → one token. Main merger: LN(D) then concat; DeepStack: concat then LN(4D)."""

    def __init__(self, cfg: Qwen3VLConfig, norm_after_concat: bool):
        super().__init__()
        self.width = cfg.hidden_size * cfg.spatial_merge_size**2
        self.norm_after_concat = norm_after_concat
        self.norm = nn.LayerNorm(self.width if norm_after_concat else cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.width, self.width)
        self.linear_fc2 = nn.Linear(self.width, cfg.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_after_concat:
            x = self.norm(x.reshape(-1, self.width))
        else:
            x = self.norm(x).reshape(-1, self.width)  # (N/4, 4D)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))  # exact GELU in mergers


@dataclass
class Qwen3VLOutput:
    tokens: torch.Tensor  # (N/4, out): merger output, what the language model sees
    deepstack: list[torch.Tensor] = field(default_factory=list)  # 3 × (N/4, out)
    last_hidden: torch.Tensor | None = None  # (N, D) before the merger


class Qwen3VLVisionEncoder(nn.Module):
    def __init__(self, cfg: Qwen3VLConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.rope = Rope2D(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.merger = Merger(cfg, norm_after_concat=False)
        self.deepstack_merger_list = nn.ModuleList(
            Merger(cfg, norm_after_concat=True) for _ in cfg.deepstack_visual_indexes
        )

    def position_embedding(self, rows, cols, grid_thw, dtype) -> torch.Tensor:
        """The 48×48 table resampled bilinearly (align_corners) to each image's grid → (N, D)."""
        side = int(math.isqrt(self.cfg.num_position_embeddings))
        heights = torch.cat([torch.full((t * h * w,), h) for t, h, w in grid_thw]).to(rows.device)
        widths = torch.cat([torch.full((t * h * w,), w) for t, h, w in grid_thw]).to(rows.device)

        def taps(pos, size):  # align_corners=True: pixel i of n sits at i·(side−1)/(n−1)
            scale = torch.where(size > 1, (side - 1) / (size - 1).clamp(min=1).double(), torch.zeros_like(size, dtype=torch.float64))
            coord = (pos.double() * scale).float()
            low = coord.floor().long().clamp(max=side - 1)
            high = (low + 1).clamp(max=side - 1)
            return low, high, coord - low.float()

        y0, y1, dy = taps(rows, heights)
        x0, x1, dx = taps(cols, widths)
        table = self.pos_embed.weight
        out = (
            table[y0 * side + x0] * ((1 - dy) * (1 - dx))[:, None]
            + table[y0 * side + x1] * ((1 - dy) * dx)[:, None]
            + table[y1 * side + x0] * (dy * (1 - dx))[:, None]
            + table[y1 * side + x1] * (dy * dx)[:, None]
        )
        return out.to(dtype)

    def forward(self, patches: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> Qwen3VLOutput:
        """patches (N, 3·T·p·p) of several images packed in one sequence; grid_thw per image."""
        x = self.patch_embed(patches)  # (N, D)
        rows, cols = merge_order_positions(grid_thw, self.cfg.spatial_merge_size, x.device)
        x = x + self.position_embedding(rows, cols, grid_thw, x.dtype)
        cos, sin = rope_tables(self.rope, rows, cols)  # (N, Dh) float32 each
        lengths = [t * h * w for t, h, w in grid_thw]  # one attention segment per image (t = 1)
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, lengths)
            if i in self.cfg.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[self.cfg.deepstack_visual_indexes.index(i)]
                deepstack.append(merger(x))
        return Qwen3VLOutput(tokens=self.merger(x), deepstack=deepstack, last_hidden=x)


# -- checkpoints -----------------------------------------------------------------------------
def load_qwen3vl(folder: str, device="cpu", dtype=torch.float32) -> tuple[Qwen3VLVisionEncoder, QwenVLPreprocess]:
    """The vision tower of a local checkpoint folder, strictly loaded, without the language model,
    and its image processor. ``model.weights_sha256`` identifies the vision weights."""
    model, settings = load_tower(folder, Qwen3VLConfig.from_hf, Qwen3VLVisionEncoder, "Qwen3-VL", device, dtype)
    return model, QwenVLPreprocess.from_settings(settings)
