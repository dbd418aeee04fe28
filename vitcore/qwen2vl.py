"""The Qwen2-VL and Qwen2.5-VL vision towers; transformers' Qwen2VisionTransformerPretrainedModel and
Qwen2_5_VisionTransformerPretrainedModel are the test oracles. Same image processor, positions,
2-D RoPE and packed attention as Qwen3-VL (qwen_preprocess.py, qwen_layers.py); no learned
position table and no DeepStack.

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

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vitcore.model import Rope2D
from vitcore.qwen_checkpoint import load_tower
from vitcore.qwen_layers import Attention, TowerConfig, merge_order_positions, rope_tables
from vitcore.qwen_preprocess import QwenVLPreprocess

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def _activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"vision hidden_act {name!r} is not one of {', '.join(ACTIVATIONS)}")
    return name


def _rope_theta(vision: dict) -> float:
    rope = vision.get("rope_parameters") or {}
    return float(rope.get("rope_theta", vision.get("rope_theta", 10000.0)))


@dataclass(frozen=True)
class Qwen2VLConfig(TowerConfig):
    depth: int = 32
    embed_dim: int = 1280  # D, the tower's width
    hidden_size: int = 3584  # the language model's width (the merger's output)
    num_heads: int = 16
    mlp_ratio: float = 4.0
    hidden_act: str = "quick_gelu"
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    in_channels: int = 3
    rope_theta: float = 10000.0

    family = "qwen2-vl"

    @property
    def width(self) -> int:
        return self.embed_dim

    @property
    def out_width(self) -> int:
        return self.hidden_size

    @classmethod
    def from_hf(cls, vision: dict) -> "Qwen2VLConfig":
        """From the ``vision_config`` of a checkpoint's config.json (older ones say in_chans)."""
        return cls(
            depth=vision["depth"], embed_dim=vision["embed_dim"], hidden_size=vision["hidden_size"],
            num_heads=vision["num_heads"], mlp_ratio=float(vision.get("mlp_ratio", 4)),
            hidden_act=_activation(vision.get("hidden_act", "quick_gelu")),
            patch_size=vision.get("patch_size", 14), spatial_merge_size=vision.get("spatial_merge_size", 2),
            temporal_patch_size=vision.get("temporal_patch_size", 2),
            in_channels=vision.get("in_channels", vision.get("in_chans", 3)), rope_theta=_rope_theta(vision),
        )

@dataclass(frozen=True)
class Qwen25VLConfig(TowerConfig):
    depth: int = 32
    hidden_size: int = 1280  # D, the tower's width
    out_hidden_size: int = 3584  # the language model's width
    intermediate_size: int = 3420
    num_heads: int = 16
    hidden_act: str = "silu"
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    in_channels: int = 3
    window_size: int = 112  # pixels: windows of window_size / patch / merge merged tokens a side
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)  # these blocks attend within the whole image
    rope_theta: float = 10000.0

    family = "qwen2.5-vl"

    @property
    def window_units(self) -> int:
        """A window's side in merged tokens."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @classmethod
    def from_hf(cls, vision: dict) -> "Qwen25VLConfig":
        cfg = cls(
            depth=vision["depth"], hidden_size=vision["hidden_size"], out_hidden_size=vision["out_hidden_size"],
            intermediate_size=vision["intermediate_size"], num_heads=vision["num_heads"],
            hidden_act=_activation(vision.get("hidden_act", "silu")), patch_size=vision.get("patch_size", 14),
            spatial_merge_size=vision.get("spatial_merge_size", 2),
            temporal_patch_size=vision.get("temporal_patch_size", 2), in_channels=vision.get("in_channels", 3),
            window_size=vision.get("window_size", 112),
            fullatt_block_indexes=tuple(vision.get("fullatt_block_indexes", (7, 15, 23, 31))),
            rope_theta=_rope_theta(vision),
        )
        if cfg.window_units < 1:
            raise ValueError(f"window_size {cfg.window_size} is smaller than one merged token "
                             f"({cfg.patch_size * cfg.spatial_merge_size} pixels)")
        return cfg


# -- layers ------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.width, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # kernel = stride: the Conv3d is one matmul over each flattened (c, t, y, x) patch.
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)  # (D, 3·T·p·p)
        return F.linear(patches.to(weight.dtype), weight)  # (N, D)


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


class Mlp(nn.Module):
    """Qwen2-VL: fc1 → activation (QuickGELU) → fc2."""

    def __init__(self, cfg: Qwen2VLConfig):
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, cfg.embed_dim)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


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


class Block(nn.Module):
    def __init__(self, width: int, heads: int, norm, mlp: nn.Module):
        super().__init__()
        self.norm1 = norm(width)
        self.attn = Attention(width, heads)
        self.norm2 = norm(width)
        self.mlp = mlp

    def forward(self, x, cos, sin, lengths):
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """norm → 2×2 patches concatenated → Linear → GELU (exact) → Linear. (N, D) → (N/4, out)."""

    def __init__(self, cfg, norm):
        super().__init__()
        self.width = cfg.width * cfg.spatial_merge_size**2
        self.ln_q = norm(cfg.width)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, cfg.out_width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.width))


@dataclass
class TowerOutput:
    tokens: torch.Tensor  # (N/4, out): merger output, what the language model sees
    deepstack: list[torch.Tensor] = field(default_factory=list)  # none in these towers
    last_hidden: torch.Tensor | None = None  # (N, D) before the merger, merge-block order


def _layer_norm(width: int) -> nn.LayerNorm:
    return nn.LayerNorm(width, eps=1e-6)


# -- the towers ----------------------------------------------------------------------------------
class Qwen2VLVisionEncoder(nn.Module):
    def __init__(self, cfg: Qwen2VLConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.rope = Rope2D(cfg.embed_dim // cfg.num_heads, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, _layer_norm, Mlp(cfg)) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, _layer_norm)

    def forward(self, patches: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> TowerOutput:
        """patches (N, 3·T·p·p) of several images packed in one sequence; grid_thw per image."""
        x = self.patch_embed(patches)  # (N, D)
        rows, cols = merge_order_positions(grid_thw, self.cfg.spatial_merge_size, x.device)
        cos, sin = rope_tables(self.rope, rows, cols)  # (N, Dh) float32 each
        lengths = [t * h * w for t, h, w in grid_thw]  # one attention segment per image
        for block in self.blocks:
            x = block(x, cos, sin, lengths)
        return TowerOutput(tokens=self.merger(x), last_hidden=x)


class Qwen25VLVisionEncoder(nn.Module):
    def __init__(self, cfg: Qwen25VLConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.rope = Rope2D(cfg.hidden_size // cfg.num_heads, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg.hidden_size, cfg.num_heads, RMSNorm, GatedMlp(cfg))
                                    for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, RMSNorm)

    def forward(self, patches: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> TowerOutput:
        unit = self.cfg.spatial_merge_size ** 2  # patches per merged token
        order, windows = window_order(grid_thw, self.cfg.spatial_merge_size, self.cfg.window_units)
        order = order.to(patches.device)

        def by_window(a: torch.Tensor) -> torch.Tensor:  # (N, ·) merge-block order → window order
            return a.reshape(-1, unit, a.shape[-1])[order].reshape(a.shape)

        x = by_window(self.patch_embed(patches))  # (N, D)
        rows, cols = merge_order_positions(grid_thw, self.cfg.spatial_merge_size, x.device)
        cos, sin = (by_window(t) for t in rope_tables(self.rope, rows, cols))
        images = [t * h * w for t, h, w in grid_thw]  # each image stays one run in window order
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
