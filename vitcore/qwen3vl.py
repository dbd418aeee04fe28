"""The Qwen3-VL vision tower, its preprocessing, and reading it from a Hugging Face checkpoint folder.

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

import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitcore.device import is_out_of_memory
from vitcore.errors import WeightsError
from vitcore.model import Rope2D, apply_rope
from vitcore.qwen_checkpoint import VISION_PREFIXES, read_json, read_vision_tensors

CHECKPOINT_PREFIX = VISION_PREFIXES[0]  # where transformers ≥ 4.52 saves the vision tower


@dataclass(frozen=True)
class Qwen3VLConfig:
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
        )

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "family": "qwen3-vl"}, sort_keys=True)


# -- preprocessing ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Qwen3VLPreprocess:
    """What the checkpoint's image processor does (Qwen2VLImageProcessor with Qwen3-VL's values)."""

    min_pixels: int = 65536
    max_pixels: int = 16777216
    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    fixed: int | None = None  # --resolution N: every image to N × N (a multiple of 32)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_hf(cls, record: dict) -> "Qwen3VLPreprocess":
        """From preprocessor_config.json (``size`` or the older min_pixels / max_pixels keys)."""
        size = record.get("size") or {}
        return cls(
            min_pixels=int(size.get("shortest_edge", record.get("min_pixels", 65536))),
            max_pixels=int(size.get("longest_edge", record.get("max_pixels", 16777216))),
            patch_size=int(record.get("patch_size", 16)),
            merge_size=int(record.get("merge_size", 2)),
            temporal_patch_size=int(record.get("temporal_patch_size", 2)),
            mean=tuple(record.get("image_mean", (0.5, 0.5, 0.5))),
            std=tuple(record.get("image_std", (0.5, 0.5, 0.5))),
            rescale_factor=float(record.get("rescale_factor", 1 / 255)),
        )

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing: the processor's smart resize, or the fixed side."""
        if self.fixed is not None:
            return self.fixed, self.fixed
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Nearest sides that are multiples of ``factor``, with the area kept within [min, max] pixels."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h_bar = round(height / factor) * factor  # Python's round: half to even, as the processor does
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_rgb(img, prep: Qwen3VLPreprocess) -> np.ndarray:
    """An RGB Pillow image → (H, W, 3) uint8 at the processor's size (Pillow bicubic)."""
    from PIL import Image

    height, width = prep.target_size(img.height, img.width)
    return np.asarray(img.resize((width, height), Image.Resampling.BICUBIC), dtype=np.uint8)


def patchify(pixels: np.ndarray, prep: Qwen3VLPreprocess) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(H, W, 3) uint8 → normalised float32 patches (h·w, 3·T·p·p) in merge-block order, and (1, h, w)."""
    p, m, t = prep.patch_size, prep.merge_size, prep.temporal_patch_size
    x = (pixels.astype(np.float64) * prep.rescale_factor).astype(np.float32)  # (H, W, C)
    x = (x - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    H, W, C = x.shape
    h, w = H // p, W // p
    x = x.transpose(2, 0, 1).reshape(C, h // m, m, p, w // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (h/m, w/m, m, m, C, p, p): merge-block order
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # a still image: T equal frames
    return np.ascontiguousarray(x.reshape(h * w, C * t * p * p)), (1, h, w)


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


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3VLConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.backend = AttentionBackend()  # shared by every block once choose_attention has run
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        N, D = x.shape
        q, k, v = self.qkv(x).reshape(N, 3, self.heads, self.head_dim).permute(1, 2, 0, 3).unbind(0)  # (H, N, Dh)
        # RoPE in float32, as the reference does, then back to the compute dtype.
        q = apply_rope(q.float(), cos, sin).to(v.dtype)
        k = apply_rope(k.float(), cos, sin).to(v.dtype)
        out = self.backend.attend(q, k, v, lengths)  # (H, N, Dh)
        return self.proj(out.transpose(0, 1).reshape(N, D))


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
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:160]
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
        from torch.nn.attention.varlen import varlen_attn

        bounds = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32, device=q.device)
        longest = max(lengths)
        out = varlen_attn(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), bounds, bounds, longest, longest)
        return out.transpose(0, 1)  # (N, H, Dh) → (H, N, Dh)
    return torch.cat(
        [F.scaled_dot_product_attention(qs, ks, vs) for qs, ks, vs in
         zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))],
        dim=1,
    )


def choose_attention(encoder: "Qwen3VLVisionEncoder", device: torch.device, dtype: torch.dtype) -> list[str]:
    """Pick the attention backend once, when the model is built: variable-length flash attention
    where a probe call works (CUDA, half precision), else exact per-image SDPA. Returns the list
    of notes the run reports (a fallback the user should know about; a later one joins it)."""
    backend = AttentionBackend()
    for module in encoder.modules():
        if isinstance(module, Attention):
            module.backend = backend
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        try:
            probe = torch.zeros(2, 4, encoder.cfg.head_dim, device=device, dtype=dtype)  # (H, N, Dh): 2 images
            attend_within_images(probe, probe, probe, [2, 2], varlen=True)
            backend.varlen = True
        except Exception as err:  # an older torch, an unsupported GPU
            backend.fall_back(err)
    return backend.notes


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
        self.attn = Attention(cfg)
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

    def merge_order_positions(self, grid_thw: list[tuple[int, int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, col) in the patch grid of every token, in merge-block order, images concatenated."""
        m = self.cfg.spatial_merge_size
        rows, cols = [], []
        for t, h, w in grid_thw:
            r = torch.arange(h, device=device)[:, None].expand(h, w)
            c = torch.arange(w, device=device)[None, :].expand(h, w)
            order = lambda a: a.reshape(h // m, m, w // m, m).transpose(1, 2).reshape(-1)  # noqa: E731
            rows.append(order(r).repeat(t))
            cols.append(order(c).repeat(t))
        return torch.cat(rows), torch.cat(cols)

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
        rows, cols = self.merge_order_positions(grid_thw, x.device)
        x = x + self.position_embedding(rows, cols, grid_thw, x.dtype)
        angles = self.rope.angles(rows.float(), cols.float())  # (N, Dh/2), float32
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos(), angles.sin()  # (N, Dh) float32
        lengths = [t * h * w for t, h, w in grid_thw]  # one attention segment per image (t = 1)
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, lengths)
            if i in self.cfg.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[self.cfg.deepstack_visual_indexes.index(i)]
                deepstack.append(merger(x))
        return Qwen3VLOutput(tokens=self.merger(x), deepstack=deepstack, last_hidden=x)


# -- checkpoints -----------------------------------------------------------------------------
def read_checkpoint_config(folder: str) -> tuple[Qwen3VLConfig, Qwen3VLPreprocess]:
    """The vision config and the image processor's settings of a checkpoint folder, checked
    against each other before anything is built (one line for each problem)."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise WeightsError(f"{folder} is not a Qwen3-VL checkpoint folder: it has no config.json")
    vision = read_json(config_path).get("vision_config")
    if not isinstance(vision, dict):
        raise WeightsError(f"{config_path} has no readable vision_config")
    try:
        cfg = Qwen3VLConfig.from_hf(vision)
    except (KeyError, TypeError, ValueError) as err:
        raise WeightsError(f"{config_path}: vision_config lacks or garbles {err}") from None
    late = [i for i in cfg.deepstack_visual_indexes if not 0 <= i < cfg.depth]
    if late:
        raise WeightsError(f"{config_path}: deepstack_visual_indexes {list(cfg.deepstack_visual_indexes)} name "
                           f"block {late[0]}, but the vision tower has {cfg.depth} blocks (0..{cfg.depth - 1})")
    prep = Qwen3VLPreprocess()
    prep_path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(prep_path):
        prep = Qwen3VLPreprocess.from_hf(read_json(prep_path))
    for name, theirs, ours in (("patch_size", prep.patch_size, cfg.patch_size),
                               ("merge_size", prep.merge_size, cfg.spatial_merge_size),
                               ("temporal_patch_size", prep.temporal_patch_size, cfg.temporal_patch_size)):
        if theirs != ours:
            raise WeightsError(f"{folder}: the image processor's {name} is {theirs} but the vision config's is "
                               f"{ours}; the processor's settings do not fit this checkpoint")
    return cfg, prep


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def load_qwen3vl(folder: str, device="cpu", dtype=torch.float32) -> tuple[Qwen3VLVisionEncoder, Qwen3VLPreprocess]:
    """The vision tower of a local checkpoint folder, strictly loaded, without the language model.
    ``model.weights_sha256`` identifies the vision weights."""
    cfg, prep = read_checkpoint_config(folder)
    with torch.device("meta"):
        model = Qwen3VLVisionEncoder(cfg)
    state, digest = read_vision_tensors(folder, _DTYPES)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise WeightsError(
            f"{folder} does not fit the Qwen3-VL vision config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.weights_sha256 = digest
    return model, prep


# -- the worker side and the device side of a run (families/qwen3vl.py) ------------------
@dataclass(frozen=True)
class Qwen3VLImageLoader:
    """Worker side: decode → upright RGB → the processor's size (Pillow bicubic) → uint8 (H, W, 3)."""

    prep: Qwen3VLPreprocess
    decode: str = "full"

    def load(self, source) -> tuple[np.ndarray, tuple[int, int]]:
        """An image (a binary file object or a path) → the processor's pixels and its original size."""
        from PIL import Image

        from vitcore.preprocess import decode_rgb

        target = lambda w, h: self.prep.target_size(h, w)[::-1]  # noqa: E731  (w, h) → (w', h')
        rgb, (width, height) = decode_rgb(source, self.decode, target)
        # The size comes from the original picture (a draft decode is smaller), as the processor's would.
        new_w, new_h = target(width, height)
        return np.array(rgb.resize((new_w, new_h), Image.Resampling.BICUBIC), dtype=np.uint8), (width, height)


def patchify_torch(pixels: torch.Tensor, prep: Qwen3VLPreprocess) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """patchify() on the device: uint8 (H, W, 3) → float32 (h·w, 3·T·p·p) in merge-block order."""
    p, m, t = prep.patch_size, prep.merge_size, prep.temporal_patch_size
    mean = torch.tensor(prep.mean, dtype=torch.float32, device=pixels.device)
    std = torch.tensor(prep.std, dtype=torch.float32, device=pixels.device)
    x = ((pixels.double() * prep.rescale_factor).float() - mean) / std  # (H, W, C), as the processor rounds
    H, W, C = x.shape
    h, w = H // p, W // p
    x = x.permute(2, 0, 1).reshape(C, h // m, m, p, w // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    x = x[:, :, :, :, :, None].expand(*x.shape[:5], t, p, p)  # (h/m, w/m, m, m, C, T, p, p)
    return x.reshape(h * w, C * t * p * p), (1, h, w)
