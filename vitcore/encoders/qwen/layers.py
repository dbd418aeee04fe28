"""What the Qwen-VL vision towers share: the patch embedding, the pre-norm block, their output,
token positions in merge-block order and their 2-D RoPE tables, and attention inside each segment
of a packed sequence (one image, or one window of it), none across segments, with the backend
chosen once per tower."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitcore.encoders.layers import apply_rope
from vitcore.errors import one_line
from vitcore.system.device import is_out_of_memory


def merge_order_positions(grid_thw: list[tuple[int, int, int]], merge: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) in the patch grid of every token, in merge-block order, images concatenated.

    Merge-block order: block row, block col, row in block, col in block, so ``merge²`` consecutive
    patches form one merged token."""
    rows, cols = [], []
    for t, h, w in grid_thw:
        r = torch.arange(h, device=device)[:, None].expand(h, w)
        c = torch.arange(w, device=device)[None, :].expand(h, w)
        order = lambda a: a.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).reshape(-1)  # noqa: E731
        rows.append(order(r).repeat(t))
        cols.append(order(c).repeat(t))
    return torch.cat(rows), torch.cat(cols)


def frame_lengths(grid_thw: list[tuple[int, int, int]]) -> list[int]:
    """Attention segments of a packed sequence: each temporal slice of each image or video
    (h·w patches, t of them), as transformers' cu_seqlens; a picture is one slice (t = 1)."""
    return [h * w for t, h, w in grid_thw for _ in range(t)]


def rope_tables(rope, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (N, Dh) in float32 for tokens at (rows, cols): the shared 2-D RoPE (encoders.layers.Rope2D)."""
    angles = rope.angles(rows.float(), cols.float())  # (N, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


class Attention(nn.Module):
    """Fused qkv with bias, 2-D RoPE on q and k in float32, attention within each segment of a packed
    sequence (an image, or a window of one), output projection. (N, D) → (N, D)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.backend = AttentionBackend()  # shared by every block once choose_attention has run
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        N, D = x.shape
        q, k, v = self.qkv(x).reshape(N, 3, self.heads, self.head_dim).permute(1, 2, 0, 3).unbind(0)  # (H, N, Dh)
        # RoPE in float32, as the reference does, then back to the compute dtype.
        q = apply_rope(q.float(), cos, sin).to(v.dtype)
        k = apply_rope(k.float(), cos, sin).to(v.dtype)
        out = self.backend.attend(q, k, v, lengths)  # (H, N, Dh)
        return self.proj(out.transpose(0, 1).reshape(N, D))


class PatchEmbed(nn.Module):
    """The checkpoint's Conv3d over (c, t, y, x) patches; kernel = stride, so it is one matmul."""

    def __init__(self, cfg, bias: bool):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.width, kernel_size=kernel, stride=kernel, bias=bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)  # (D, 3·T·p·p)
        return F.linear(patches.to(weight.dtype), weight, self.proj.bias)  # (N, D)


def layer_norm(width: int) -> nn.LayerNorm:
    return nn.LayerNorm(width, eps=1e-6)


class Block(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)). (N, D) → (N, D)."""

    def __init__(self, width: int, heads: int, norm, mlp: nn.Module):
        super().__init__()
        self.norm1 = norm(width)
        self.attn = Attention(width, heads)
        self.norm2 = norm(width)
        self.mlp = mlp

    def forward(self, x, cos, sin, lengths):
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


@dataclass
class TowerOutput:
    tokens: torch.Tensor  # (N/4, out): merger output, what the language model sees
    deepstack: list[torch.Tensor] = field(default_factory=list)  # Qwen3-VL: one (N/4, out) per level
    last_hidden: torch.Tensor | None = None  # (N, D) before the merger, merge-block order


@dataclass
class AttentionBackend:
    """The attention every block of one tower uses: chosen once when it is built (choose_attention).

    Should the variable-length kernel still fail on a real batch for a reason other than memory
    (an out-of-memory error goes to the batching path, which splits the batch), every block
    falls back to per-image SDPA for the rest of the run, and the run's notes say so.
    """

    varlen: bool = False
    notes: list[str] = field(default_factory=list)  # the run reports these

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        if self.varlen:
            try:
                return attend_within_images(q, k, v, lengths, varlen=True)
            except Exception as err:
                if is_out_of_memory(err):
                    raise
                self.fall_back(err)
        return attend_within_images(q, k, v, lengths)

    def fall_back(self, err: BaseException) -> None:
        self.varlen = False
        reason = one_line(f"{type(err).__name__}: {err}", 160)
        self.notes.append(f"variable-length attention is not available here ({reason}): images attend one at a time")


def attend_within_images(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int],
                         varlen: bool = False) -> torch.Tensor:
    """Full attention inside each image of a packed sequence, none across images. (H, N, Dh) each.

    varlen (CUDA, half precision; see choose_attention): one variable-length flash-attention call
    over the packed batch (no padding, no Python loop). Otherwise: one SDPA call per image, which
    on a 2-core CPU took 249 ms against 892 ms for a single SDPA call with a block-diagonal mask
    (four images of 256–1024 patches, 16 heads of 72; bench/RESULTS.md), with the same numbers to 4e-7.
    """
    if varlen and len(lengths) > 1:
        from torch.nn.attention.varlen import varlen_attn  # newer torch only; choose_attention probed it

        bounds = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32, device=q.device)
        longest = max(lengths)
        out = varlen_attn(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), bounds, bounds, longest, longest)
        return out.transpose(0, 1)  # (N, H, Dh) → (H, N, Dh)
    # Each segment as a (1, H, n, Dh) batch: PyTorch's fused CPU kernel takes only 4-D inputs, and
    # on 3-D ones falls back to building the whole n × n score matrix (4,096 patches, 16 heads:
    # +2,330 MiB against +23 MiB, the same values to 3e-7; bench/RESULTS.md).
    return torch.cat(
        [F.scaled_dot_product_attention(qs[None], ks[None], vs[None])[0] for qs, ks, vs in
         zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))],
        dim=1,
    )


def choose_attention(encoder: nn.Module, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Pick the attention backend once, when the model is built: variable-length flash attention
    where a probe call works (CUDA, half precision), else exact per-image SDPA. Returns the list
    of notes the run reports (a fallback the user should know about; a later one joins it)."""
    backend = AttentionBackend()
    blocks = [module for module in encoder.modules() if isinstance(module, Attention)]
    for module in blocks:
        module.backend = backend
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        try:
            probe = torch.zeros(2, 4, blocks[0].head_dim, device=device, dtype=dtype)  # (H, N, Dh): 2 images
            attend_within_images(probe, probe, probe, [2, 2], varlen=True)
            backend.varlen = True
        except Exception as err:  # an older torch, an unsupported GPU
            backend.fall_back(err)
    return backend.notes
