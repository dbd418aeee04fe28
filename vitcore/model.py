"""The seed encoder: patch embedding, 2-D RoPE, pre-LN blocks, final norm, projector, pooling.

One readable file, top to bottom (reference/seed-architecture.md):

    pixels (B, 3, H, W)  normalised float
      → PatchEmbed: Conv2d(3, D, kernel = stride = patch)       → (B, N, D), N = H/p · W/p
      → depth × Block: x + Attn(LN(x)) ; x + MLP(LN(x))          (2-D RoPE on q and k)
      → final LayerNorm                                          → (B, N, D)
      → projector Linear(D → P) or identity                      → (B, N, P)
      → pooling none | mean | max                                → (B, N, P) or (B, P)

No CLS token and no absolute position embedding: position lives only in the RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vitcore.config import EncoderConfig


class Rope2D(nn.Module):
    """2-D rotary position embedding, rotate-half pairing (the Qwen-VL vision layout).

    For a head of width Dh there are Dh/4 frequencies inv_freq[i] = theta^(-4i/Dh).
    A patch at (row, col) gets Dh/2 angles: the first Dh/4 are row · inv_freq, the
    last Dh/4 are col · inv_freq. Angle j turns the pair (x[j], x[j + Dh/2]):

        x = [ x_0 … x_{Dh/2-1} | x_{Dh/2} … x_{Dh-1} ]
             └── row angles ─┘└ col ┘ (repeated for the second half)
        out = x · cos + rotate_half(x) · sin,   rotate_half(x) = [ -x_second | x_first ]

    cos/sin are computed in float32 once per (grid, device) and cached; any grid works.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        assert head_dim % 4 == 0, "2-D RoPE needs a head dim divisible by 4"
        self.head_dim = head_dim
        self.theta = theta
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        quarter = self.head_dim // 4
        exponent = torch.arange(quarter, dtype=torch.float32, device=device) * 4 / self.head_dim
        return self.theta ** -exponent  # (Dh/4,)

    def angles(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Rotation angles for patches at float positions (rows[i], cols[i]) → (N, Dh/2)."""
        inv_freq = self.inv_freq(rows.device)
        return torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=-1)

    def cos_sin(self, grid_h: int, grid_w: int, device: torch.device, dtype: torch.dtype):
        """cos and sin for a row-major grid → two (N, Dh) tensors in ``dtype``."""
        key = (grid_h, grid_w, str(device), dtype)
        cached = self._cache.get(key)
        if cached is None:
            rows = torch.arange(grid_h, dtype=torch.float32, device=device).repeat_interleave(grid_w)
            cols = torch.arange(grid_w, dtype=torch.float32, device=device).repeat(grid_h)
            angles = self.angles(rows, cols)  # (N, Dh/2), float32
            angles = torch.cat([angles, angles], dim=-1)  # (N, Dh)
            cached = (angles.cos().to(dtype), angles.sin().to(dtype))
            self._cache[key] = cached
        return cached


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (…, N, Dh) by per-position cos/sin of shape (N, Dh)."""
    return x * cos + rotate_half(x) * sin


class PatchEmbed(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch, stride=cfg.patch)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(pixels)  # (B, D, H/p, W/p)
        grid = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid  # (B, N, D), row-major patches


class Attention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)  # fused q, k, v
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, D)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.dim, hidden)
        self.fc2 = nn.Linear(hidden, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class Block(nn.Module):
    """Pre-LayerNorm transformer block with residuals."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


def pool_tokens(tokens: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, N, D) → (B, N, D) for none, (B, D) for mean and max."""
    if mode == "none":
        return tokens
    if mode == "mean":
        return tokens.mean(dim=1)
    if mode == "max":
        return tokens.amax(dim=1)
    raise ValueError(f"unknown pooling {mode!r}")


def resolve_layer(index: int, depth: int) -> int:
    """Block index K (negative counts from the end) → 0-based block number."""
    if not -depth <= index < depth:
        raise IndexError(f"layer {index} is out of range for an encoder of depth {depth}")
    return index % depth


@dataclass
class EncoderOutput:
    tokens: torch.Tensor  # (B, N, P) or pooled (B, P)
    layers: dict[int, torch.Tensor] = field(default_factory=dict)  # K → (B, N, D) or pooled (B, D)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.rope = Rope2D(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.projector = nn.Linear(cfg.dim, cfg.project_dim) if cfg.project_dim else nn.Identity()

    def forward_features(
        self, pixels: torch.Tensor, layers: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """pixels (B, 3, H, W) → tokens (B, N, P) and the hidden states after the requested blocks."""
        x, (grid_h, grid_w) = self.patch_embed(pixels)  # (B, N, D)
        cos, sin = self.rope.cos_sin(grid_h, grid_w, x.device, x.dtype)  # (N, Dh) each
        wanted: dict[int, list[int]] = {}  # block number → the names it was asked for under
        for k in layers:
            wanted.setdefault(resolve_layer(k, len(self.blocks)), []).append(k)
        hidden: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin)
            for k in wanted.get(i, ()):
                hidden[k] = x
        return self.projector(self.norm(x)), hidden

    def forward(
        self, pixels: torch.Tensor, pool: str = "none", layers: tuple[int, ...] = ()
    ) -> EncoderOutput:
        tokens, hidden = self.forward_features(pixels, layers)
        return EncoderOutput(
            tokens=pool_tokens(tokens, pool),
            layers={k: pool_tokens(h, pool) for k, h in hidden.items()},
        )
