"""Peak memory of attention inside one large image: the fused CPU kernel on 4-D inputs against the
3-D fallback that builds the whole N × N score matrix.

    python bench/attention_memory.py [--patches 4096] [--heads 16] [--head-dim 72]

Each way runs in a fresh process; printed is the growth of its peak resident memory (ru_maxrss)
over the call. vit-extract hands each image to the kernel as a (1, H, n, Dh) batch
(vitcore/encoders/qwen/layers.py, attend_within_images); the test suite checks that it does.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
CHILD = """
import resource, sys, torch
import torch.nn.functional as F
sys.path.insert(0, sys.argv[1])
n, heads, dim, how = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
q, k, v = (torch.randn(heads, n, dim) for _ in range(3))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.inference_mode():
    if how == "vit-extract":
        from vitcore.encoders.qwen.layers import attend_within_images
        attend_within_images(q, k, v, [n])
    else:
        F.scaled_dot_product_attention(q, k, v)  # 3-D inputs
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=72)
    args = parser.parse_args()
    print(f"{args.patches} patches, {args.heads} heads of {args.head_dim}")
    for how in ("vit-extract", "3-D inputs"):
        done = subprocess.run([sys.executable, "-c", CHILD, str(PROJECT), str(args.patches), str(args.heads),
                               str(args.head_dim), how], capture_output=True, text=True, check=True)
        print(f"  {how:>12}: peak growth {float(done.stdout):8.0f} MiB")


if __name__ == "__main__":
    main()
