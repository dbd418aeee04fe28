"""The seed encoders against this CPU's matrix-product ceiling, float32 and bfloat16, eager and compiled.

    python bench/cpu_ceiling.py [--presets small,base] [--dtypes float32,bfloat16] [--batch 16] [--compile small]
                                [--seconds 6]

Ceiling: a 4096³ matrix product in each dtype (median of repeats), in GFLOP/s. Encoder: images/s of
forward_features on random pixels at --batch, after a warm-up, median of 3 timed runs of --seconds;
"% of ceiling" = the encoder's matrix-product FLOPs per image (every Linear and the patch
projection, and the two attention products, counted as 2·m·n·k) × images/s ÷ the ceiling of its
dtype. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from vitcore.encoders.seed.config import parse_model
from vitcore.encoders.seed.weights import seeded_encoder


def ceiling(dtype: torch.dtype, n: int = 4096, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - tick)
    return 2 * n**3 / statistics.median(times) / 1e9


def flops_per_image(cfg) -> float:
    """Matrix-product FLOPs of one image through forward_features (no pooling, no projector)."""
    tokens, dim = cfg.num_tokens, cfg.dim
    patch = 2 * tokens * (3 * cfg.patch**2) * dim
    hidden = int(dim * cfg.mlp_ratio)
    per_block = 2 * tokens * dim * (3 * dim) + 2 * tokens * dim * dim  # qkv, output projection
    per_block += 2 * 2 * tokens * tokens * dim  # q·kᵀ and attention·v over all heads
    per_block += 2 * 2 * tokens * dim * hidden  # the MLP's two Linears
    return patch + cfg.depth * per_block


def images_per_second(model, pixels, seconds: float, runs: int = 3) -> float:
    with torch.inference_mode():
        model.forward_features(pixels)  # warm-up (and, compiled, the compilation)
        rates = []
        for _ in range(runs):
            done, tick = 0, time.perf_counter()
            while time.perf_counter() - tick < seconds:
                model.forward_features(pixels)
                done += len(pixels)
            rates.append(done / (time.perf_counter() - tick))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="small,base")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="bfloat16 can be left out where it is emulated "
                        "(a CPU without AVX-512-BF16 or AMX multiplies it 50-100× slower)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--compile", default="small", help="presets also timed compiled (comma-separated, or none)")
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    flags = sorted({f for line in open("/proc/cpuinfo") if line.startswith("flags")
                    for f in line.split(":")[1].split() if f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2")})
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"flags: {' '.join(flags)}")
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    ceilings = {dtype: ceiling(dtype) for dtype in dtypes}
    print("\nceiling (4096³ product): " + ", ".join(f"{str(d).removeprefix('torch.')} {c:.0f} GFLOP/s"
                                                   for d, c in ceilings.items()) + "\n")
    print("| preset | dtype | mode | images/s | GFLOP/image | % of that dtype's ceiling |")
    print("|---|---|---|---|---|---|")
    compiled = set(args.compile.split(",")) if args.compile != "none" else set()
    for name in args.presets.split(","):
        cfg = parse_model(name)
        gflop = flops_per_image(cfg) / 1e9
        for dtype in dtypes:
            model = seeded_encoder(cfg, 0, dtype=dtype).eval()
            pixels = torch.randn(args.batch, 3, cfg.image_size, cfg.image_size, dtype=dtype)
            for mode in ("eager", "compiled") if name in compiled else ("eager",):
                run = torch.compile(model) if mode == "compiled" else model
                rate = images_per_second(run, pixels, args.seconds)
                share = 100 * rate * gflop / ceilings[dtype]
                print(f"| {name} | {str(dtype).removeprefix('torch.')} | {mode} | {rate:.2f} | {gflop:.1f} | {share:.0f} % |",
                      flush=True)


if __name__ == "__main__":
    main()
