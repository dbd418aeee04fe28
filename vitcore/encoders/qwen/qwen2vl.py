"""The Qwen2-VL and Qwen2.5-VL vision towers; transformers' Qwen2VisionTransformerPretrainedModel and
Qwen2_5_VisionTransformerPretrainedModel are the test oracles. Same image processor, positions,
2-D RoPE and packed attention as Qwen3-VL (processor.py, layers.py); no learned position table
and no DeepStack.

    patches (N, 3·2·14·14) in merge-block order → patch embed (Conv3d without bias, as one matmul)
    Qwen2-VL:   depth × block: LayerNorm, attention within each image, LayerNorm, MLP with QuickGELU
    Qwen2.5-VL: depth × block: RMSNorm, attention, RMSNorm, SwiGLU MLP; the blocks named in
                fullatt_block_indexes attend within each image, the others within windows of
                window_size pixels (windows of merged tokens, tokens reordered window by window)
    merger: norm (LayerNorm / RMSNorm) → 2×2 concat → Linear → GELU → Linear → (N/4, out)

Merged tokens come out in raster order over the merged grid, as transformers returns them. The
stored last_hidden is in merge-block order for both (Qwen2.5-VL's own last_hidden_state stays in
its window order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitcore.encoders.layers import Mlp, Rope2D
from vitcore.encoders.qwen.checkpoint import load_tower
from vitcore.encoders.qwen.config import Qwen2VLConfig, Qwen25VLConfig
from vitcore.encoders.qwen.layers import (Block, PatchEmbed, TowerOutput, frame_lengths, layer_norm, merge_order_positions,
                                         rope_tables)
from vitcore.encoders.qwen.processor import QwenVLPreprocess

ACTIVATIONS = {  # config.ACTIVATIONS, as functions
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


# -- layers ------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / rms(x) in float32, then back to the input dtype and scaled (as transformers computes it)."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class GatedMlp(nn.Module):
    """Qwen2.5-VL: down(act(gate(x)) · up(x)), SwiGLU with biases."""

    def __init__(self, cfg: Qwen25VLConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PatchMerger(nn.Module):
    """norm → 2×2 patches concatenated → Linear → GELU (exact) → Linear. (N, D) → (N/4, out)."""

    def __init__(self, cfg, norm):
        super().__init__()
        self.width = cfg.width * cfg.spatial_merge_size**2
        self.ln_q = norm(cfg.width)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, cfg.out_width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.width))


# -- the towers ----------------------------------------------------------------------------------
class Tower(nn.Module):
    """Patch embed → depth × Block(norm, mlp) → PatchMerger(norm); each tower's forward orders them."""

    def __init__(self, cfg, norm, mlp):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg, bias=False)
        self.rope = Rope2D(cfg.width // cfg.num_heads, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.num_heads, norm, mlp()) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, norm)


class Qwen2VLVisionEncoder(Tower):
    """LayerNorm blocks with a QuickGELU MLP; attention within each image."""

    def __init__(self, cfg: Qwen2VLConfig):
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        super().__init__(cfg, layer_norm, lambda: Mlp(cfg.embed_dim, hidden, ACTIVATIONS[cfg.hidden_act]))

    def forward(self, patches: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> TowerOutput:
        """patches (N, 3·T·p·p) of several images packed in one sequence; grid_thw per image."""
        x = self.patch_embed(patches)  # (N, D)
        rows, cols = merge_order_positions(grid_thw, self.cfg.spatial_merge_size, x.device)
        cos, sin = rope_tables(self.rope, rows, cols)  # (N, Dh) float32 each
        lengths = frame_lengths(grid_thw)  # a segment per picture, or per temporal slice of a video
        for block in self.blocks:
            x = block(x, cos, sin, lengths)
        return TowerOutput(tokens=self.merger(x), last_hidden=x)


class Qwen25VLVisionEncoder(Tower):
    """RMSNorm blocks with a SwiGLU MLP; window attention but in fullatt_block_indexes."""

    def __init__(self, cfg: Qwen25VLConfig):
        super().__init__(cfg, RMSNorm, lambda: GatedMlp(cfg))

    def forward(self, patches: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> TowerOutput:
        unit = self.cfg.spatial_merge_size ** 2  # patches per merged token
        order, windows = window_order(grid_thw, self.cfg.spatial_merge_size, self.cfg.window_units)
        order = order.to(patches.device)

        def by_window(a: torch.Tensor) -> torch.Tensor:  # (N, ·) merge-block order → window order
            return a.reshape(-1, unit, a.shape[-1])[order].reshape(a.shape)

        x = by_window(self.patch_embed(patches))  # (N, D)
        rows, cols = merge_order_positions(grid_thw, self.cfg.spatial_merge_size, x.device)
        cos, sin = (by_window(t) for t in rope_tables(self.rope, rows, cols))
        images = frame_lengths(grid_thw)  # each picture (video slice) stays one run in window order
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, images if i in self.cfg.fullatt_block_indexes else windows)
        back = torch.argsort(order)
        tokens = self.merger(x)[back]  # (N/4, out) in raster order over the merged grid
        last_hidden = x.reshape(-1, unit, x.shape[-1])[back].reshape(x.shape)
        return TowerOutput(tokens=tokens, last_hidden=last_hidden)


def window_order(grid_thw: list[tuple[int, int, int]], merge: int, side: int) -> tuple[torch.Tensor, list[int]]:
    """Merged tokens reordered window by window (windows of side × side merged tokens, in raster
    order over each image; the last row and column of windows may be smaller), images one after
    another: (for each position in window order, its merged token in raster order), and the
    length in patches of every window."""
    order, lengths, first = [], [], 0
    for t, h, w in grid_thw:
        rows, cols = h // merge, w // merge
        raster = torch.arange(t * rows * cols).reshape(t, rows, cols)
        for frame in raster:
            for top in range(0, rows, side):
                for left in range(0, cols, side):
                    window = frame[top:top + side, left:left + side].reshape(-1)
                    order.append(window + first)
                    lengths.append(len(window) * merge * merge)
        first += t * rows * cols
    return torch.cat(order), lengths


# -- checkpoints ------------------------------------------------------------------------------
def load_qwen2vl(folder: str, device="cpu", dtype=torch.float32) -> tuple[Qwen2VLVisionEncoder, QwenVLPreprocess]:
    """A Qwen2-VL checkpoint's vision tower, strictly loaded, and its image processor."""
    model, settings = load_tower(folder, Qwen2VLConfig.from_hf, Qwen2VLVisionEncoder, "Qwen2-VL", device, dtype)
    return model, QwenVLPreprocess.from_settings(settings)


def load_qwen25vl(folder: str, device="cpu", dtype=torch.float32) -> tuple[Qwen25VLVisionEncoder, QwenVLPreprocess]:
    """A Qwen2.5-VL checkpoint's vision tower, strictly loaded, and its image processor."""
    model, settings = load_tower(folder, Qwen25VLConfig.from_hf, Qwen25VLVisionEncoder, "Qwen2.5-VL", device, dtype)
    return model, QwenVLPreprocess.from_settings(settings)
