"""Layers more than one encoder family uses: the 2-D rotary position embedding (the seed encoders and
the Qwen-VL towers share its frequencies and its rotate-half layout), the two-layer MLP, and token
pooling."""

from __future__ import annotations

import torch
from torch import nn


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


class Mlp(nn.Module):
    """fc1 → activation → fc2 (the seed encoders: exact GELU; Qwen2-VL: QuickGELU). (…, D) → (…, D)."""

    def __init__(self, width: int, hidden: int, act):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def pool_tokens(tokens: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, N, D) → (B, N, D) for none, (B, D) for mean and max."""
    if mode == "none":
        return tokens
    if mode == "mean":
        return tokens.mean(dim=1)
    if mode == "max":
        return tokens.amax(dim=1)
    raise ValueError(f"unknown pooling {mode!r}")
