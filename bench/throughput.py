"""Throughput in one run: the encoder alone against timm's peers, end to end against the
pipeline users write by hand, memory and start-up. Prints one Markdown table (and --json).

    python bench/throughput.py                          # this machine: CPU, or its GPU
    python bench/throughput.py --presets small,base,large --compile --e2e-images 20000   # a GPU

Rows ("ratio": encoder rows ours ÷ that one, eager to eager and compiled to compiled; e2e rows
that one ÷ the by-hand script):
  encoder   images/s of encoder.forward_features alone, random pixels, after warm-up, median of
            --repeats timed runs. Peers (when timm is installed, `pip install -e .[bench]`):
            timm's Eva with 2-D RoPE and timm's plain VisionTransformer, both the preset's shape
            (patch 14, 224, MLP 4x, no class token), weights cast to the same dtype as ours.
            On CUDA: MFU against the bf16 matrix-product rate measured in this run.
  memory    peak device memory of a forward pass at batch 1 and at the timed batch (CUDA: in the
            encoder rows), or the peak resident memory of a fresh process doing the same (CPU).
  e2e       a generated folder of 640x480 JPEGs to HDF5, each side in a fresh process of its
            own: `vit-extract run --json` with default settings (all tokens as fp16, and --pool
            mean; on CUDA also --decode gpu; with --e2e-compile also --compile) against a by-hand
            script (DataLoader + PIL + timm Eva + h5py) as users write it: fp32 on the CPU, bf16
            autocast on CUDA. images/s over each side's run (loader start to closed file, model
            creation and imports not included); "s": the whole command's wall time.
            `h5py ceiling`: raw fp16 token blocks written to the same disk.
  startup   `vit-extract --help`, and a cold `vit-extract run` of one image with the small preset.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from vitcore.encoders.seed.config import EncoderConfig, parse_model  # noqa: E402
from vitcore.system.device import cpu_has_native_bf16, dtype_name, resolve_device, resolve_dtype  # noqa: E402
from vitcore.imaging.loader import default_workers  # noqa: E402
from vitcore.encoders.seed.processor import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from vitcore.encoders.seed.weights import build_encoder  # noqa: E402



# -- measuring ------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(forward, pixels: torch.Tensor, min_seconds: float) -> float:
    """images/s over whole batches lasting at least ``min_seconds``."""
    count, start = 0, time.perf_counter()
    while True:
        forward(pixels)
        count += pixels.shape[0]
        sync(pixels.device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return count / elapsed


def interleaved_rates(forwards: dict, pixels: torch.Tensor, repeats: int, min_seconds: float) -> dict:
    """Each encoder's median images/s, timed in turns (A B C A B C …) so that a noisy machine's slow
    spells fall on all of them alike, and the median per-round ratio of ours to it: ours eager to
    eager ones, ours compiled to compiled ones."""
    rounds: dict[str, list[float]] = {name: [] for name in forwards}
    with torch.inference_mode():
        for forward in forwards.values():  # warm-up
            forward(pixels)
            sync(pixels.device)
        for _ in range(repeats):
            for name, forward in forwards.items():
                rounds[name].append(timed_run(forward, pixels, min_seconds))
    result = {}
    for name, rates in rounds.items():
        ours = rounds["vit-extract compiled" if name.endswith(" compiled") else "vit-extract"]
        result[name] = (statistics.median(rates), statistics.median(a / b for a, b in zip(ours, rates)))
    return result


def peak_memory_gib(forward, pixels: torch.Tensor, baseline: int) -> float | None:
    """Peak allocated device memory of one forward pass above ``baseline`` bytes, which is what was
    allocated before this encoder was built: its weights count, other encoders' do not (CUDA only)."""
    if pixels.device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(pixels.device)
    with torch.inference_mode():
        forward(pixels)
    sync(pixels.device)
    return (torch.cuda.max_memory_allocated(pixels.device) - baseline) / 2**30


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The rate of a large matrix product in ``dtype``: the denominator of MFU (CUDA only)."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def flops_per_image(cfg: EncoderConfig) -> float:
    """Multiply-adds × 2 of the seed encoder at its input size (projector and pooling left out)."""
    n, d = cfg.num_tokens, cfg.dim
    hidden = int(cfg.mlp_ratio * d)
    per_block = 2 * n * d * (3 * d + d + 2 * hidden) + 2 * 2 * n * n * d  # linears + QK^T and AV
    return 2 * n * 3 * cfg.patch**2 * d + cfg.depth * per_block


# -- the encoders ---------------------------------------------------------------------------------
def ours(cfg: EncoderConfig, device, dtype):
    encoder, _ = build_encoder(cfg, device=device, dtype=dtype)
    return encoder, lambda m, x: m.forward_features(x)[0]


def timm_available() -> bool:
    try:
        importlib.import_module("timm")
    except Exception:  # ImportError, or a torchvision that does not match torch
        return False
    return True


def timm_eva(cfg: EncoderConfig, device, dtype):
    """timm's EVA with 2-D RoPE, the preset's shape, no class token, no absolute positions."""
    from timm.models.eva import Eva

    grid = cfg.image_size // cfg.patch
    model = Eva(
        img_size=cfg.image_size, patch_size=cfg.patch, embed_dim=cfg.dim, depth=cfg.depth,
        num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_fused=True, class_token=False,
        use_abs_pos_emb=False, use_rot_pos_emb=True, ref_feat_shape=(grid, grid),
        num_classes=0, global_pool="",
    )
    return model.to(device=device, dtype=dtype).eval(), lambda m, x: m.forward_features(x)


def timm_vit(cfg: EncoderConfig, device, dtype):
    """timm's plain ViT (learned absolute positions, no RoPE), the preset's shape, no class token."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=cfg.image_size, patch_size=cfg.patch, embed_dim=cfg.dim, depth=cfg.depth,
        num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, class_token=False, global_pool="",
        num_classes=0,
    )
    return model.to(device=device, dtype=dtype).eval(), lambda m, x: m.forward_features(x)


def bench_encoders(args, device, dtypes, rows: list[dict]) -> None:
    peak = {dt: matmul_tflops(device, dt) for dt in dtypes}
    makers = [("vit-extract", ours)]
    if timm_available():
        makers += [("timm Eva (RoPE)", timm_eva), ("timm ViT (plain)", timm_vit)]
    else:
        print("# timm is not importable here: peers skipped (pip install -e '.[bench]')", file=sys.stderr)
    for preset in args.presets:
        cfg = parse_model(preset)
        for dtype in dtypes:
            batch = args.batch or (256 if device.type == "cuda" else 8)
            pixels = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device, dtype=dtype)
            forwards, compile_s, memory = {}, {}, {}
            for name, make in makers:
                baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                model, call = make(cfg, device, dtype)
                eager = (lambda m, c: lambda x: c(m, x))(model, call)
                memory[name] = (peak_memory_gib(eager, pixels[:1], baseline), peak_memory_gib(eager, pixels, baseline))
                forwards[name] = eager
                if args.compile and preset in args.compile_presets and name != "timm Eva (RoPE)":
                    compiled = torch.compile(eager, dynamic=False)  # one shape: no recompilation
                    start = time.perf_counter()
                    with torch.inference_mode():
                        compiled(pixels)
                    sync(device)
                    label = name + " compiled"
                    compile_s[label] = time.perf_counter() - start
                    memory[label] = (None, peak_memory_gib(compiled, pixels, baseline))
                    forwards[label] = compiled
            rates = interleaved_rates(forwards, pixels, args.repeats, args.min_seconds)
            for label, (rate, ratio) in rates.items():
                row = {
                    "section": "encoder", "preset": preset, "dtype": dtype_name(dtype), "batch": batch,
                    "what": label, "images_per_s": rate, "ratio": ratio,
                    "mfu": rate * flops_per_image(cfg) / (peak[dtype] * 1e12) if peak[dtype] else None,
                    "compile_s": compile_s.get(label),
                    "peak_gib_batch1": memory[label][0], "peak_gib": memory[label][1],
                }
                rows.append(row)
                print(format_row(row), file=sys.stderr, flush=True)
            del forwards
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for dtype, tflops in peak.items():
        if tflops:
            rows.append({"section": "ceiling", "what": f"{dtype_name(dtype)} matmul 8192³", "tflops": tflops})


# VmHWM, not ru_maxrss: the latter keeps the high-water mark of the (large) parent across fork + exec.
_CPU_PEAK = """
import sys, torch
from vitcore.encoders.seed.weights import build_encoder
encoder, _ = build_encoder(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
with torch.inference_mode():
    encoder.forward_features(torch.zeros(int(sys.argv[3]), 3, 224, 224, dtype=getattr(torch, sys.argv[2])))
status = open("/proc/self/status").read().split("VmHWM:")[1]
print(int(status.split()[0]) / 2**20)
"""


def bench_cpu_memory(args, dtypes, rows: list[dict]) -> None:
    """Peak resident memory of a fresh process that builds the encoder and encodes one batch."""
    env = dict(os.environ, PYTHONPATH=str(PROJECT))
    for preset in args.presets:
        for dtype in dtypes:
            peaks = []
            for batch in (1, args.batch or 8):
                done = subprocess.run([sys.executable, "-c", _CPU_PEAK, preset, dtype_name(dtype), str(batch)],
                                      check=True, capture_output=True, text=True, env=env)
                peaks.append(float(done.stdout))
            row = {"section": "memory", "preset": preset, "dtype": dtype_name(dtype), "batch": args.batch or 8,
                   "what": "process peak RSS (CPU)", "peak_gib_batch1": peaks[0], "peak_gib": peaks[1]}
            rows.append(row)
            print(format_row(row), file=sys.stderr, flush=True)


# -- end to end -----------------------------------------------------------------------------------
def make_jpegs(folder: Path, count: int, distinct: int = 64) -> None:
    """``count`` 640×480 JPEGs (quality 90) with smooth structure and grain, like photos to a JPEG
    coder. Only ``distinct`` are drawn; the rest are copies under other names (decoding costs the
    same, and thousands are made in seconds)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    for i in range(count):
        if i >= distinct:
            shutil.copyfile(folder / f"img{i % distinct:06d}.jpg", folder / f"img{i:06d}.jpg")
            continue
        fx, fy, phase = rng.uniform(0.005, 0.03, 2).tolist() + [rng.uniform(0, 6.3)]
        base = 127 + 90 * np.sin(xx * fx + phase)[..., None] * np.cos(yy * fy)[..., None] * rng.uniform(0.3, 1, 3)
        pixels = np.clip(base + rng.normal(0, 12, (480, 640, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:06d}.jpg", quality=90)


class ByHandImages(torch.utils.data.Dataset):
    """What a user writes: open, RGB, resize to 224 (bicubic), to a float tensor, normalise."""

    def __init__(self, files: list[Path], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as im:
            im = im.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255
        return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def by_hand(folder: Path, out: Path, cfg: EncoderConfig, device, batch: int, workers: int, pool: str) -> dict:
    """Folder → DataLoader → timm Eva (our encoder if timm is missing) → h5py, as users write it.

    Returns the images written and the seconds from the loader's start to the closed file (the
    span that vit-extract reports as its own run time)."""
    files = sorted(folder.glob("*.jpg"))
    loader = torch.utils.data.DataLoader(ByHandImages(files, cfg.image_size), batch_size=batch,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    make = timm_eva if timm_available() else ours
    model, call = make(cfg, device, torch.float32)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    shape = (len(files), cfg.dim) if pool == "mean" else (len(files), cfg.num_tokens, cfg.dim)
    began = time.perf_counter()
    with h5py.File(out, "w") as f, torch.inference_mode(), autocast:
        tokens = f.create_dataset("tokens", shape, dtype="float16")
        start = 0
        for x in loader:
            y = call(model, x.to(device, non_blocking=True))
            if pool == "mean":
                y = y.mean(dim=1)
            tokens[start:start + len(y)] = y.float().cpu().numpy()
            start += len(y)
    return {"images": start, "seconds": time.perf_counter() - began, "model": make.__name__}


def encoder_alone(preset: str, device, images: int) -> dict:
    """What `vit-extract run` defaults to (dtype and batch size for the device) with nothing else:
    random 224×224 uint8 batches through the family's own encode (normalisation included), no
    decoding, no copies out, no writing. The end-to-end run's ceiling at the same batch and dtype."""
    from vitcore.encoders.seed.family import SEED as FAMILY
    from vitcore.options import EncoderOptions

    dtype = resolve_dtype("auto", device)
    built = FAMILY.build(EncoderOptions(model=preset), device, dtype)
    batch = built.default_batch_size()
    size = parse_model(preset).image_size
    pixels = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
    with torch.inference_mode():
        built.encode(pixels)  # warm-up: first-call allocations
        sync(device)
        done, began = 0, time.perf_counter()
        while done < images:
            built.encode(pixels)
            done += batch
        sync(device)
    return {"images": done, "seconds": time.perf_counter() - began, "batch": batch, "dtype": dtype_name(dtype)}


def h5py_ceiling(folder: Path, cfg: EncoderConfig, seconds: float = 5.0) -> float:
    """images/s of raw fp16 (256, D) blocks written with h5py to this disk, flushed and fsynced."""
    block = np.random.default_rng(0).standard_normal((64, cfg.num_tokens, cfg.dim)).astype(np.float16)
    path = folder / "ceiling.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("tokens", (0, cfg.num_tokens, cfg.dim), np.float16,
                              maxshape=(None, cfg.num_tokens, cfg.dim), chunks=(1, cfg.num_tokens, cfg.dim))
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            ds.resize(n + len(block), axis=0)
            ds[n:] = block
            n += len(block)
            f.flush()
        os.fsync(f.id.get_vfd_handle())
        rate = n / (time.perf_counter() - start)
    path.unlink()
    return rate


def run_command(command: list[str], env: dict | None = None) -> tuple[dict, float]:
    """Run a command that prints one JSON object; that object and the command's wall seconds."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=PROJECT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])}… exited {done.returncode}: {done.stderr.strip()[-300:]}")
    try:  # a JSON object on stdout; the CLI prints it over several lines, the by-hand child on one
        return json.loads(done.stdout), seconds
    except json.JSONDecodeError:
        raise RuntimeError(f"{' '.join(command[:4])}… printed no JSON object: {done.stdout.strip()[-300:]!r}; "
                           f"stderr: {done.stderr.strip()[-300:]!r}") from None


def bench_end_to_end(args, device, rows: list[dict]) -> None:
    """Each side in a fresh process of its own, as users run them: nothing (allocator state,
    thread pools, CUDA caches, imports) carries from one to the other."""
    cfg = parse_model(args.e2e_preset)
    work = Path(tempfile.mkdtemp(prefix="vit-extract-bench-", dir=args.workdir))
    try:
        images = work / "images"
        start = time.perf_counter()
        make_jpegs(images, args.e2e_images)
        print(f"# generated {args.e2e_images} JPEGs in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        workers = args.workers if args.workers is not None else default_workers()
        batch = args.batch or (256 if device.type == "cuda" else 8)
        if not timm_available():
            print("# timm is not importable here: the by-hand script uses our encoder instead of timm's EVA "
                  "(pip install -e '.[bench]')", file=sys.stderr)
        if args.e2e_images < 4 * batch:
            print(f"# {args.e2e_images} images are fewer than 4 batches: one slow batch moves every e2e figure",
                  file=sys.stderr)
        variants = [("vit-extract (defaults)", [])]
        if device.type == "cuda":
            variants.append(("vit-extract --decode gpu", ["--decode", "gpu"]))
        if args.e2e_compile:
            variants.append(("vit-extract --compile", ["--compile"]))
        our_workers = [] if args.workers is None else ["--workers", str(args.workers)]
        for _ in range(args.e2e_rounds):  # in turns, so a slow spell of the machine falls on both
            alone, _s = run_command([sys.executable, str(Path(__file__).resolve()), "--encoder-alone",
                                     args.e2e_preset, str(device), str(args.e2e_images)])
            result, command_s = run_command([sys.executable, "-m", "vitcore.cli", "run", str(images), "-o",
                                             str(work / "ours.h5"), "--model", args.e2e_preset, "--device",
                                             str(device), "--json", "--overwrite", *our_workers])
            alone_rate = alone["images"] / alone["seconds"]
            rows.append({"section": "e2e", "preset": args.e2e_preset, "what": "encoder alone (defaults' batch and "
                         "dtype, random pixels)", "images_per_s": alone_rate, "batch": alone["batch"],
                         "dtype": alone["dtype"]})
            print(format_row(rows[-1]), file=sys.stderr, flush=True)
            rows.append({"section": "e2e", "preset": args.e2e_preset, "pool": "none",
                         "what": "vit-extract (defaults) ÷ encoder alone", "dtype": result["compute_dtype"],
                         "images_per_s": result["images_per_second"],
                         "ratio": result["images_per_second"] / alone_rate, "seconds": command_s,
                         "timings": result["timings"]})
            print(format_row(rows[-1]), file=sys.stderr, flush=True)
        (work / "ours.h5").unlink(missing_ok=True)
        for pool in ("none", "mean"):
            hand, command_s = run_command([sys.executable, str(Path(__file__).resolve()), "--by-hand", str(images),
                                           str(work / "by_hand.h5"), args.e2e_preset, str(device), str(batch),
                                           str(workers), pool])
            (work / "by_hand.h5").unlink()
            hand_rate = hand["images"] / hand["seconds"]
            rows.append({"section": "e2e", "preset": args.e2e_preset, "pool": pool,
                         "what": f"by-hand script ({hand['model']})", "images_per_s": hand_rate, "batch": batch,
                         "dtype": "bfloat16 autocast" if device.type == "cuda" else "float32",
                         "seconds": command_s})
            print(format_row(rows[-1]), file=sys.stderr, flush=True)
            for what, extra in variants:
                out = work / "ours.h5"
                result, command_s = run_command([
                    sys.executable, "-m", "vitcore.cli", "run", str(images), "-o", str(out), "--model", args.e2e_preset,
                    "--pool", pool, "--device", str(device), "--json", *our_workers, *extra])
                out.unlink()
                rate = result["images_per_second"]
                rows.append({"section": "e2e", "preset": args.e2e_preset, "pool": pool, "what": what,
                             "images_per_s": rate, "ratio": rate / hand_rate, "dtype": result["compute_dtype"],
                             "batch": "auto", "seconds": command_s, "compile_s": result["timings"].get("compile"),
                             "warnings": result["warnings"]})
                print(format_row(rows[-1]), file=sys.stderr, flush=True)
        rows.append({"section": "ceiling", "what": f"h5py fp16 token blocks, {args.e2e_preset}",
                     "images_per_s": h5py_ceiling(work, cfg)})
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- start-up -------------------------------------------------------------------------------------
def bench_startup(args, rows: list[dict]) -> None:
    exe = [sys.executable, "-m", "vitcore.cli"]
    env = dict(os.environ, PYTHONPATH=str(PROJECT))
    help_s = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([*exe, "--help"], check=True, capture_output=True, env=env, cwd=PROJECT)
        help_s.append(time.perf_counter() - start)
    rows.append({"section": "startup", "what": "vit-extract --help", "seconds": statistics.median(help_s)})
    work = Path(tempfile.mkdtemp(prefix="vit-extract-bench-", dir=args.workdir))
    try:
        make_jpegs(work / "one", 1)
        start = time.perf_counter()
        subprocess.run([*exe, "run", str(work / "one"), "-o", str(work / "one.h5"), "--model", "small",
                        "--device", "cpu", "--quiet"], check=True, capture_output=True, env=env, cwd=PROJECT)
        rows.append({"section": "startup", "what": "cold run, 1 image, small, CPU (whole command)",
                     "seconds": time.perf_counter() - start})
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- report ---------------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def format_row(r: dict) -> str:
    cells = [
        r["section"], r.get("preset", ""), r.get("pool", ""), r["what"], str(r.get("dtype", "")),
        str(r.get("batch", "")), _fmt(r.get("images_per_s"), ".1f"), _fmt(r.get("ratio"), ".2f"),
        _fmt(r.get("mfu"), ".0%"), _fmt(r.get("peak_gib_batch1"), ".2f"), _fmt(r.get("peak_gib"), ".2f"),
        _fmt(r.get("compile_s"), ".0f"),
        _fmt(r.get("seconds"), ".2f") or _fmt(r.get("tflops"), ".0f"),
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| section | preset | pool | what | dtype | batch | images/s | ratio | MFU "
          "| peak GiB (b=1) | peak GiB | compile s | s or TFLOP/s |\n" + "|---" * 13 + "|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--presets", default=None, help="comma-separated; default small on CPU, all three on CUDA")
    parser.add_argument("--dtypes", default=None, help="comma-separated; default: float32 on CPU (and bfloat16 where "
                        "native), bfloat16 on CUDA")
    parser.add_argument("--batch", type=int, default=None, help="encoder and by-hand batch (CPU 8, CUDA 256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=2.0, help="length of each timed run")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd encoders (ours, timm ViT)")
    parser.add_argument("--compile-presets", default=None, help="comma-separated presets to compile (default: all)")
    parser.add_argument("--e2e-compile", action="store_true", help="also run end to end with --compile")
    parser.add_argument("--e2e-images", type=int, default=96, help="JPEGs for the end-to-end runs (0: skip)")
    parser.add_argument("--e2e-preset", default="small")
    parser.add_argument("--e2e-rounds", type=int, default=1,
                        help="pairs of (encoder alone, vit-extract run) taken in turns (0: skip that comparison)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--workdir", default=None, help="where the generated images and outputs go (a temp dir)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: encoder,memory,e2e,startup")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--by-hand", nargs=7, default=None, metavar=("IMAGES", "OUT", "PRESET", "DEVICE", "BATCH",
                        "WORKERS", "POOL"), help=argparse.SUPPRESS)  # the e2e section's by-hand child process
    parser.add_argument("--encoder-alone", nargs=3, default=None, metavar=("PRESET", "DEVICE", "IMAGES"),
                        help=argparse.SUPPRESS)  # the e2e section's encoder-alone child process
    args = parser.parse_args()
    if args.encoder_alone:
        preset, device, images = args.encoder_alone
        print(json.dumps(encoder_alone(preset, torch.device(device), int(images))))
        return
    if args.by_hand:
        images, out, preset, device, batch, workers, pool = args.by_hand
        record = by_hand(Path(images), Path(out), parse_model(preset), torch.device(device), int(batch),
                         int(workers), pool)
        print(json.dumps(record))
        return
    device = resolve_device(args.device)
    args.presets = (args.presets or ("small,base,large" if device.type == "cuda" else "small")).split(",")
    if args.dtypes:
        dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    elif device.type == "cuda":
        dtypes = [torch.bfloat16]
    else:
        dtypes = [torch.float32] + ([torch.bfloat16] if cpu_has_native_bf16() else [])
    args.compile_presets = args.compile_presets.split(",") if args.compile_presets else args.presets
    skip = set(filter(None, args.skip.split(",")))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}; torch {torch.__version__}; native CPU bf16: {cpu_has_native_bf16()}; "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    print(HEADER, file=sys.stderr, flush=True)
    rows: list[dict] = []
    sections = [
        ("encoder", lambda: bench_encoders(args, device, dtypes, rows)),
        ("memory", lambda: bench_cpu_memory(args, dtypes, rows) if device.type == "cpu" else None),
        ("e2e", lambda: bench_end_to_end(args, device, rows) if args.e2e_images else None),
        ("startup", lambda: bench_startup(args, rows)),
    ]
    for section, run in sections:
        if section in skip:
            continue
        try:  # one section failing (or a time limit) must not lose the others' figures
            run()
        except Exception as err:
            rows.append({"section": section, "what": f"FAILED: {type(err).__name__}: {' '.join(str(err).split())[:200]}"})
            print(format_row(rows[-1]), file=sys.stderr, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": name, "torch": torch.__version__, "rows": rows}, indent=1))
    print(HEADER)
    for row in rows:
        print(format_row(row))


if __name__ == "__main__":
    main()
