"""The Qwen3-VL vision tower, and reading it from a Hugging Face checkpoint folder (the image
processor is processor.py, the layers the Qwen-VL towers share are layers.py).

Written from the description of the real tower; transformers' Qwen3VLVisionModel is the test
oracle. It shares the seed encoder's 2-D RoPE (same frequencies, same rotate-half layout) from
encoders/layers.py, and its patch embedding and blocks with the Qwen2-VL towers (layers.py).

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

import torch
import torch.nn.functional as F
from torch import nn

from vitcore.encoders.layers import Rope2D
from vitcore.encoders.qwen.checkpoint import load_tower
from vitcore.encoders.qwen.config import Qwen3VLConfig
from vitcore.encoders.qwen.layers import (Block, PatchEmbed, TowerOutput, frame_lengths, layer_norm, merge_order_positions,
                                         rope_tables)
from vitcore.encoders.qwen.processor import QwenVLPreprocess


# -- the encoder -----------------------------------------------------------------------------
class Mlp(nn.Module):
    def __init__(self, cfg: Qwen3VLConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))  # tanh GELU in blocks


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


class Qwen3VLVisionEncoder(nn.Module):
    def __init__(self, cfg: Qwen3VLConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg, bias=True)
        table = torch.empty(cfg.num_position_embeddings, cfg.hidden_size)
        if table.device.type != "meta":  # on the meta device (loading a checkpoint) there is nothing to draw, and
            nn.init.normal_(table)  # normal_ there imports torch's Python decompositions first: 1.4 s of start-up
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size, _weight=table)
        self.rope = Rope2D(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg.hidden_size, cfg.num_heads, layer_norm, Mlp(cfg)) for _ in range(cfg.depth))
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

    def forward(self, patches: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> TowerOutput:
        """patches (N, 3·T·p·p) of several images packed in one sequence; grid_thw per image."""
        x = self.patch_embed(patches)  # (N, D)
        rows, cols = merge_order_positions(grid_thw, self.cfg.spatial_merge_size, x.device)
        x = x + self.position_embedding(rows, cols, grid_thw, x.dtype)
        cos, sin = rope_tables(self.rope, rows, cols)  # (N, Dh) float32 each
        lengths = frame_lengths(grid_thw)  # a segment per picture, or per temporal slice of a video
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, lengths)
            if i in self.cfg.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[self.cfg.deepstack_visual_indexes.index(i)]
                deepstack.append(merger(x))
        return TowerOutput(tokens=self.merger(x), deepstack=deepstack, last_hidden=x)


# -- checkpoints -----------------------------------------------------------------------------
def load_qwen3vl(folder: str, device="cpu", dtype=torch.float32) -> tuple[Qwen3VLVisionEncoder, QwenVLPreprocess]:
    """The vision tower of a local checkpoint folder, strictly loaded, without the language model,
    and its image processor. ``model.weights_sha256`` identifies the vision weights."""
    model, settings = load_tower(folder, Qwen3VLConfig.from_hf, Qwen3VLVisionEncoder, "Qwen3-VL", device, dtype)
    return model, QwenVLPreprocess.from_settings(settings)
