"""The seed encoder: patch embedding, 2-D RoPE, pre-LN blocks, final norm, projector, pooling.

One readable file, top to bottom (the user's seed architecture; RoPE and pooling are encoders/layers.py):

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

from vitcore.encoders.layers import Mlp, Rope2D, apply_rope, pool_tokens
from vitcore.encoders.seed.config import EncoderConfig, resolve_layer


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


class Block(nn.Module):
    """Pre-LayerNorm transformer block with residuals."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.dim, int(cfg.dim * cfg.mlp_ratio), F.gelu)  # exact (erf) GELU

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


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
