"""Attention within each image of a packed Qwen3-VL batch on the CPU: per-image SDPA calls vs one
SDPA call with a block-diagonal mask (what vitcore.encoders.qwen.layers.attend_within_images chooses between).

    python bench/packed_attention.py
"""

import time

import torch
import torch.nn.functional as F

from vitcore.encoders.qwen.layers import attend_within_images

HEADS, HEAD_DIM = 16, 72  # the 8B vision tower
LENGTHS = [1024, 256, 600, 400]  # patches per image


def timed(fn, repeat: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    torch.manual_seed(0)
    total = sum(LENGTHS)
    q, k, v = (torch.randn(HEADS, total, HEAD_DIM) for _ in range(3))
    image = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    mask = image[:, None] == image[None, :]
    per_image = timed(lambda: attend_within_images(q, k, v, LENGTHS))
    masked = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    diff = (attend_within_images(q, k, v, LENGTHS) - F.scaled_dot_product_attention(q, k, v, attn_mask=mask)).abs().max()
    print(f"per-image SDPA   {per_image * 1000:7.1f} ms")
    print(f"block-diag mask  {masked * 1000:7.1f} ms  ({masked / per_image:.1f}x slower)")
    print(f"max difference   {diff:.1e}")


if __name__ == "__main__":
    main()
