"""Correctness of the GPU paths, checked on the GPU itself (the test suite runs on CPUs only).

    python bench/cuda_check.py            # on a CUDA machine; elsewhere it checks the same on the CPU
    pytest -m cuda                        # the same checks as tests (tests/test_cuda.py), skipped without a GPU

Each check prints PASS or FAIL with its numbers; the exit status is the number of failures.
  1. seed encoder: float32 on the device equals the CPU float32 reference (TF32 off);
     bfloat16 stays close to it (cosine similarity per token).
  2. Qwen3-VL packed attention: the path taken on the device (variable-length flash attention
     where torch has it) equals one SDPA call per image.
  3. extract() on the device, 64 images: the same rows as on the CPU with --batch-size auto and 16
     (pinned memory, the device→host copy stream of transfer.py), and with --compile at batch 3
     (the last batch padded); tokens that overflow float16 are counted on the device as on the CPU.
  4. Qwen3-VL at native resolution on the device (packed attention, the shared copy stream, ragged
     rows) against the CPU: float32 row for row, bfloat16 by cosine similarity.
  5. the copy stream with its race forced (the compute stream busy, the copy stream held back).
  6. --decode gpu: nvJPEG + the on-device resize against Pillow's decode + resize, with odd JPEGs.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import vitcore  # noqa: E402
from vitcore.encoders.qwen import layers as qwen_layers, qwen3vl  # noqa: E402
from vitcore.encoders.qwen.checkpoint import VISION_PREFIXES  # noqa: E402
from vitcore.encoders.seed.weights import build_encoder, save_weights  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
failures = 0


def check(name: str, ok: bool, detail: str) -> None:
    global failures
    failures += not ok
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)


def seed_encoder() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    pixels = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    reference, _ = build_encoder("small")
    with torch.inference_mode():
        expected = reference.forward_features(pixels)[0]  # (4, 256, 512), CPU float32
        for dtype in (torch.float32, torch.bfloat16):
            encoder, _ = build_encoder("small", device=DEVICE, dtype=dtype)
            got = encoder.forward_features(pixels.to(DEVICE, dtype))[0].float().cpu()
            if dtype == torch.float32:
                err = ((got - expected).abs().max() / expected.abs().max()).item()
                check("seed encoder float32", err < 1e-4, f"max error {err:.1e} of the largest value")
            else:
                cos = F.cosine_similarity(got, expected, dim=-1).min().item()
                check("seed encoder bfloat16", cos > 0.99, f"lowest per-token cosine similarity {cos:.4f}")


def packed_attention() -> None:
    lengths = [1024, 256, 600, 400]
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    q, k, v = (torch.randn(16, sum(lengths), 72, generator=gen).to(DEVICE, dtype) for _ in range(3))
    varlen = DEVICE.type == "cuda"  # the path the model chooses there (qwen_layers.choose_attention)
    with torch.inference_mode():
        try:
            got = qwen_layers.attend_within_images(q, k, v, lengths, varlen=varlen).float()
        except Exception:  # not available with this torch or GPU: what the model falls back to
            varlen = False
            got = qwen_layers.attend_within_images(q, k, v, lengths).float()
        per_image = torch.cat([F.scaled_dot_product_attention(a, b, c) for a, b, c in
                               zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))], 1).float()
    path = "variable-length flash attention" if varlen else "per-image SDPA"
    err = (got - per_image).abs().max().item()
    check(f"Qwen3-VL packed attention ({path}, {dtype})", err < (2e-2 if dtype == torch.bfloat16 else 1e-6),
          f"max difference {err:.1e} from one SDPA call per image")


def _photo_folder(folder: Path, generated: int = 56) -> Path:
    """The 8 samples plus distinct generated photos: 64 images, so several batches are in flight."""
    import shutil

    from PIL import Image

    folder.mkdir()
    for image in SAMPLES.iterdir():
        if image.suffix in (".jpg", ".png"):
            shutil.copy(image, folder / image.name)
    rng = np.random.default_rng(0)
    for i in range(generated):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.BICUBIC).save(folder / f"gen{i:03d}.jpg", quality=90)
    return folder


def end_to_end() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        photos = _photo_folder(Path(tmp) / "photos")
        common = dict(model="small", dtype="float32", out_dtype="float32", workers=min(4, os.cpu_count() or 1))
        runs = {
            "cpu": dict(device="cpu", batch_size=16),
            "batch auto": dict(device=str(DEVICE), batch_size="auto"),
            "batch 16": dict(device=str(DEVICE), batch_size=16),  # 4 batches: copies overlap compute
            "--compile, batch 3": dict(device=str(DEVICE), batch_size=3, compile=True),  # the last one padded
        }
        results, tokens, keys = {}, {}, {}
        for name, options in runs.items():
            out = Path(tmp) / f"{len(results)}.h5"
            results[name] = vitcore.extract([photos], out, **common, **options)
            with h5py.File(out) as f:
                tokens[name], keys[name] = f["tokens"][:], list(f["paths"])
        ref = tokens["cpu"]
        for name in list(runs)[1:]:
            result = results[name]
            same_keys = keys[name] == keys["cpu"] and result.rows == results["cpu"].rows == 64
            # Per row: a row from another image (a copy racing the compute) is far off, not 1e-5.
            err = (np.abs(tokens[name] - ref).max(axis=(1, 2)) / np.abs(ref).max()).max()
            extra = f"; compilation {result.timings.get('compile', 0):.1f} s" if "compile" in name else ""
            check(f"extract on {DEVICE}, {name}", same_keys and err < 1e-4,
                  f"{result.rows} rows in the CPU's order: {same_keys}, largest row error {err:.1e}; "
                  f"{result.images_per_second:.1f} images/s{extra}")
        # Batches of 3 (8 images: 3 + 3 + 2), so that several copies are in flight at once.
        loud = Path(tmp) / "loud.safetensors"
        encoder, _ = build_encoder("small")
        with torch.no_grad():
            encoder.norm.weight.mul_(1e6)  # tokens past float16's 65504
        save_weights(encoder, loud)
        counts = []
        for i, device in enumerate(("cpu", str(DEVICE))):
            result = vitcore.extract([SAMPLES], Path(tmp) / f"loud_{i}.h5", weights=str(loud), device=device,
                                     dtype="float32", batch_size=3, workers=2)
            counts.append(" ".join(w for w in result.warnings if "not finite" in w))
        check(f"non-finite tokens counted on {DEVICE}", counts[0] == counts[1] and counts[0].startswith("8 images"),
              f"CPU: {counts[0]!r}; {DEVICE}: {counts[1]!r}")


def _tiny_qwen3vl_checkpoint(folder: Path) -> Path:
    """A random Qwen3-VL vision tower saved in a checkpoint folder's layout (no transformers needed)."""
    import json

    from safetensors.torch import save_file

    vision = dict(depth=2, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=48, patch_size=16,
                  temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=2304,
                  deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh")
    torch.manual_seed(0)
    model = qwen3vl.Qwen3VLVisionEncoder(qwen3vl.Qwen3VLConfig.from_hf(vision))
    folder.mkdir()
    state = {f"{VISION_PREFIXES[0]}{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_vl", "vision_config": vision}))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 3136, "longest_edge": 200_000}, "patch_size": 16, "merge_size": 2,
        "temporal_patch_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    return folder


def qwen3vl_end_to_end() -> None:
    """Qwen3-VL at native resolution through the shared batching path (packed attention, copy
    stream, ragged rows) on the device, against the CPU in float32: float32 row for row, bf16 by cosine."""
    with tempfile.TemporaryDirectory() as tmp:
        photos = _photo_folder(Path(tmp) / "photos", generated=8)
        checkpoint = _tiny_qwen3vl_checkpoint(Path(tmp) / "ckpt")
        runs = {"cpu": ("cpu", "float32"), "float32": (str(DEVICE), "float32"), "bfloat16": (str(DEVICE), "bfloat16")}
        rows = {}
        for name, (device, dtype) in runs.items():
            out = Path(tmp) / f"q_{name}.h5"
            vitcore.extract([photos], out, weights=str(checkpoint), device=device, dtype=dtype, out_dtype="float32",
                            batch_size=4, workers=2, features=("deepstack",))
            with vitcore.open_tokens(out) as f:
                rows[name] = {key: f[key] for key in f.keys}
        ref = rows["cpu"]
        for name in ("float32", "bfloat16"):
            same_keys = list(rows[name]) == list(ref) and len(ref) == 16
            if name == "float32":
                err = max(np.abs(rows[name][k] - ref[k]).max() / np.abs(ref[k]).max() for k in ref)
                ok, detail = err < 1e-3, f"largest row error {err:.1e}"
            else:
                cos = min(F.cosine_similarity(torch.from_numpy(rows[name][k]), torch.from_numpy(ref[k]), dim=-1).min().item()
                          for k in ref)
                ok, detail = cos > 0.999, f"lowest per-token cosine similarity {cos:.4f}"
            check(f"Qwen3-VL extract on {DEVICE}, {name}", same_keys and ok,
                  f"{len(rows[name])} images in the CPU's order: {same_keys}; {detail}")


def copy_stream() -> None:
    """transfer.HostCopier with the race forced: the compute stream is still busy when the copy is
    queued (wait_stream), and the copy stream is held back while the compute stream allocates and
    overwrites memory of the same size (record_stream)."""
    if DEVICE.type != "cuda":
        check("copy stream", True, "no CUDA here: nothing to race")
        return
    from vitcore.store import Rows
    from vitcore.run.transfer import HostCopier

    n, shape = 64, (64, 256, 512)
    spin = 200_000_000  # GPU clock cycles: about 0.1 s

    def rows(tokens):  # as batching.BatchRunner hands them over: the count made on the device
        nonfinite = (~torch.isfinite(tokens.reshape(n, -1))).any(dim=1).sum()
        return Rows(keys=[f"{i}" for i in range(n)], root_index=np.zeros(n, np.int32),
                    image_size=np.ones((n, 2), np.int32), arrays={"tokens": tokens}, nonfinite=nonfinite)

    copier = HostCopier(DEVICE)
    with torch.inference_mode():
        source = torch.zeros(shape, device=DEVICE, dtype=torch.float16)
        torch.cuda._sleep(spin)  # on the compute stream, before the values exist
        source.fill_(3)
        first = copier(rows(source))
        del source
        pending = not first.ready.query()
        first.ready.synchronize()
        filled = bool((first.tokens == 3).all()) and int(first.nonfinite) == 0
        first.release()
        check("copy stream waits for the compute stream", filled,
              f"host buffer holds the computed values: {filled}; copy still pending when queued: {pending}")

        source = torch.full(shape, 5, device=DEVICE, dtype=torch.float16)
        address = source.data_ptr()
        with torch.cuda.stream(copier.stream):
            torch.cuda._sleep(spin)  # the copy stream is held back
        second = copier(rows(source))
        del source
        other = torch.empty(shape, device=DEVICE, dtype=torch.float16)
        reused = other.data_ptr() == address
        other.fill_(-1)  # would land in the copy's source if the allocator had handed it over
        second.ready.synchronize()
        kept = bool((second.tokens == 5).all())
        check("copy stream keeps its source memory", kept and not reused,
              f"host buffer holds the values copied: {kept}; source memory handed out again early: {reused}; "
              f"buffer set reused: {second.tokens.data_ptr() == first.tokens.data_ptr()}")


def gpu_decode_check() -> None:
    """nvJPEG + orientation + the on-device Pillow resize against Pillow's decode + resize
    (--decode full), on the samples plus odd JPEGs: truncated, greyscale, CMYK, EXIF-rotated."""
    import shutil

    from PIL import Image

    from vitcore.encoders.seed.gpu_decode import GpuJpegDecoder, unavailable_reason
    from vitcore.imaging.loader import ImageDataset, collate
    from vitcore.encoders.seed.processor import ImageLoader, PreprocessConfig
    from vitcore.inputs.discover import discover

    reason = unavailable_reason(DEVICE)
    if reason is not None:
        check("--decode gpu", DEVICE.type != "cuda", f"not available: {reason}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for image in SAMPLES.iterdir():
            if image.suffix in (".jpg", ".png"):
                shutil.copy(image, folder / image.name)
        photo = Image.open(SAMPLES / "chelsea.jpg")
        data = (SAMPLES / "chelsea.jpg").read_bytes()
        (folder / "x_truncated.jpg").write_bytes(data[: len(data) * 6 // 10])
        photo.convert("L").save(folder / "x_grey.jpg")
        photo.convert("CMYK").save(folder / "x_cmyk.jpg")
        exif = photo.getexif()
        exif[0x0112] = 6
        photo.save(folder / "x_rotated.jpg", exif=exif)
        sources = discover([str(folder)]).sources
        gpu_cfg, full_cfg = PreprocessConfig(decode="gpu"), PreprocessConfig(decode="full")
        decoder = GpuJpegDecoder(gpu_cfg, DEVICE)
        batch = decoder(collate([ImageDataset(sources, ImageLoader(gpu_cfg))[i] for i in range(len(sources))]), sources)
        expected = collate([ImageDataset(sources, ImageLoader(full_cfg))[i] for i in range(len(sources))])
    diff = (batch.pixels.cpu().int() - expected.pixels.int()).abs().float()
    same = (batch.indices == expected.indices and batch.sizes == expected.sizes
            and [f.index for f in batch.failures] == [f.index for f in expected.failures])
    check("--decode gpu", same and diff.mean().item() < 2,
          f"{len(batch.indices)} rows, {len(batch.failures)} failures as with Pillow: {same}; refused by the GPU: "
          f"{decoder.refused}; pixels against Pillow: mean difference {diff.mean().item():.2f} grey levels, "
          f"largest {diff.max().item():.0f} (nvJPEG is not libjpeg)")


CHECKS = (seed_encoder, packed_attention, end_to_end, qwen3vl_end_to_end, copy_stream, gpu_decode_check)

if __name__ == "__main__":
    print(f"# {torch.cuda.get_device_name() if DEVICE.type == 'cuda' else 'no CUDA: checking on the CPU'}; "
          f"torch {torch.__version__}")
    for run in CHECKS:
        try:
            run()
        except Exception as err:  # a crash is a failed check, and the others still run
            check(run.__name__, False, f"{type(err).__name__}: {' '.join(str(err).split())[:300]}")
    sys.exit(failures)
