"""vLLM's encoder cache, written from a token file: a vLLM server configured as an encoder-cache
consumer (``ECExampleConnector``) loads each picture's or clip's encoder output from shared storage
and never runs the vision tower.

    write_vllm_cache(h5, folder)     one ``{folder}/{uuid}/encoder_cache.safetensors`` per row (one
                                     tensor, ``ec_cache``: what vllm_image_embeds / vllm_video_embeds
                                     give for that row), and ``{folder}/manifest.jsonl``
    vllm_requests(folder, prompts)   the manifest and prompts → vLLM request dicts (grids, timing
                                     and ``multi_modal_uuids``, no pixels)

The uuid is what vLLM keys the cache by (the request's ``multi_modal_uuids``), used verbatim and
joined raw into a path; vLLM trusts it blindly. So it is a digest of everything that decides the
tensor: the input's bytes, the encoder record, the preprocessing, the tower's weights, the compute
and stored dtypes, the grid and the cache's dtype; stable across runs, different when any of them
differs, and a safe file name (hex). Every file is checked as it is written (rows = t·h·w ÷ merge²,
width = the merger's output × (1 + DeepStack levels)), written under a temporary name and renamed,
so a half-written file never appears under its final name; a complete file already there is kept.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np

from vitcore.consumers.lm_inputs import video_timing, vllm_rows
from vitcore.consumers.tokens import TokenFile, rows_of
from vitcore.encoders import registry
from vitcore.choices import OUT_DTYPES
from vitcore.errors import UsageError

MANIFEST = "manifest.jsonl"
CACHE_FILE = "encoder_cache.safetensors"
TENSOR = "ec_cache"  # the name ECExampleConnector loads
DTYPES = OUT_DTYPES  # what a file stores is what a cache may hold
ROWS_READ = 256  # rows read from the token file at a time
UUID_PREFIX = "vx"  # (a uuid of vit-extract's; vLLM treats it as an opaque name)


@dataclass
class CacheResult:
    folder: str
    written: int  # cache files written by this call
    kept: int  # complete files found and kept
    manifest: str
    dtype: str
    entries: list[dict] = field(default_factory=list)


def write_vllm_cache(path: str | os.PathLike, folder: str | os.PathLike, dtype: str | None = None,
                     keys=None) -> CacheResult:
    """One cache file per row (``keys``: those rows; all by default) of a Qwen-VL token file, in the
    dtype the server will run (default: the file's stored dtype), and the manifest beside them."""
    import torch  # only here: the tensors are written as vLLM loads them

    path, folder = os.fspath(path), os.fspath(folder)
    with TokenFile(path) as f:
        settings = f.settings
        family = _check_file(path, settings)
        try:
            rows = rows_of(f, keys)
        except KeyError as err:  # a key the file does not hold
            raise UsageError(str(err.args[0] if err.args else err)) from None
        grids = f.h5["grid_thw"][:] if "grid_thw" in f.h5 else None
        clips = [bool(f.h5["meta/video"][r]) for r in rows] if "meta/video" in f.h5 else [False] * len(rows)
        shown = [f.shown_key(r) for r in rows]
        digests = [_input_digest(f, r) for r in rows]
        token_width = int(f.h5["tokens"].shape[-1])  # the merger's output
    stored = settings.get("out_dtype", "float32")
    dtype = dtype or stored
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: the cache is written as {', '.join(DTYPES)}")
    encoder = settings["encoder"]
    merge = int(encoder.get("spatial_merge_size", 0)) ** 2
    width = token_width * (1 + family.deepstack_levels(encoder))
    _check_language_model_width(settings, token_width)
    common = _common_identity(settings, dtype)
    os.makedirs(folder, exist_ok=True)
    result = CacheResult(folder=folder, written=0, kept=0, manifest=os.path.join(folder, MANIFEST), dtype=dtype)
    missing = []  # the entries whose file is to be written
    for row, key, clip, digest in zip(rows, shown, clips, digests):
        grid = [int(n) for n in grids[row]]
        uuid = _uuid(common, digest, grid, clip)
        entry = {"key": key, "row": row, "uuid": uuid, "modality": "video" if clip else "image", "grid_thw": grid,
                 "tokens": int(np.prod(grid)) // merge, "width": width, "dtype": dtype, "family": family.name,
                 "weights_sha256": (settings.get("weights") or {}).get("sha256"), "file": os.path.abspath(path)}
        result.entries.append(entry)
        if _complete(os.path.join(folder, uuid, CACHE_FILE), (entry["tokens"], width), dtype):
            result.kept += 1
        else:
            missing.append(entry)
    for start in range(0, len(missing), ROWS_READ):  # the file read a slice of rows at a time, not a row
        chunk = missing[start:start + ROWS_READ]
        tensors, _ = vllm_rows(path, [entry["row"] for entry in chunk], getattr(torch, dtype))
        for entry, tokens in zip(chunk, tensors):
            if tuple(tokens.shape) != (entry["tokens"], width):  # what vLLM does not check (extra rows pass, too few kill it)
                raise UsageError(f"{entry['key']}: {tuple(tokens.shape)} tokens for grid {entry['grid_thw']}, but vLLM "
                                 f"takes {entry['tokens']} rows (t·h·w ÷ {merge}) of width {width}")
            _write_atomically(os.path.join(folder, entry["uuid"], CACHE_FILE), tokens.contiguous())
            result.written += 1
    _add_timing(path, result.entries)
    _write_manifest(result.manifest, result.entries)
    return result


def _check_file(path: str, settings: dict):
    """The family of a file vLLM can take from a cache; one line for one it cannot."""
    family = registry.for_record(settings["encoder"])
    if not family.feeds_language_model:
        takers = ", ".join(f.label for f in registry.FAMILIES if f.feeds_language_model)
        raise UsageError(f"{path} was made by the {family.name} encoder; vLLM's encoder cache takes {takers} files")
    if settings.get("pooling", "none") != "none":
        raise UsageError(f"{path} holds pooled vectors; vLLM's cache needs every token (extract with --pool none)")
    if settings.get("projector"):
        raise UsageError(f"{path} holds projected tokens; vLLM's cache needs the merger's own output")
    levels = family.deepstack_levels(settings["encoder"])
    stored = [name for name, *_ in settings.get("features") or [] if name.startswith("deepstack_")]
    if levels and len(stored) != levels:
        raise UsageError(f"{path} has no DeepStack features (made without --features deepstack); vLLM's "
                         f"{family.label} takes them inside each cached tensor: extract again with --features deepstack")
    return family


def _check_language_model_width(settings: dict, width: int) -> None:
    """Tokens as wide as the checkpoint's language model (when the checkpoint is still there to ask)."""
    folder = (settings.get("weights") or {}).get("path")
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, TypeError, ValueError):
        return
    hidden = (config.get("text_config") or {}).get("hidden_size") or config.get("hidden_size")
    if hidden is not None and int(hidden) != width:
        raise UsageError(f"the tokens are {width} wide, but {folder}'s language model takes {hidden}: not a cache "
                         "its vLLM server can use")


def _input_digest(f: TokenFile, row: int) -> str:
    """sha256 of the bytes of the input a row was made from (the picture, the clip)."""
    digest = hashlib.sha256()
    try:
        with f.open_original(row) as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise UsageError(f"{f.shown_key(row)}: its input cannot be read ({err}); the cache's uuid is a digest of "
                         "the input's bytes, so the input must be where the file says it is") from None
    return digest.hexdigest()


def _common_identity(settings: dict, dtype: str) -> bytes:
    """What every row's tensor depends on beside its input and grid."""
    weights = settings.get("weights") or {}
    parts = {"encoder": settings.get("encoder"), "preprocessing": settings.get("preprocessing"),
             "weights": weights.get("sha256") or weights, "compute_dtype": settings.get("compute_dtype"),
             "out_dtype": settings.get("out_dtype"), "features": settings.get("features"), "cache_dtype": dtype}
    return json.dumps(parts, sort_keys=True, default=str).encode()


def _uuid(common: bytes, digest: str, grid: list[int], clip: bool) -> str:
    text = common + json.dumps({"input": digest, "grid": grid, "modality": "video" if clip else "image"}).encode()
    return f"{UUID_PREFIX}-{hashlib.sha256(text).hexdigest()[:40]}"


def _complete(target: str, shape: tuple[int, int], dtype: str) -> bool:
    """A cache file already there with the tensor this row gives (a rerun keeps it)."""
    if not os.path.exists(target):
        return False
    try:
        from safetensors import safe_open

        with safe_open(target, "pt") as cached:
            tensor = cached.get_slice(TENSOR)
            return tuple(tensor.get_shape()) == shape and tensor.get_dtype().lower() == _SAFETENSORS_DTYPES[dtype]
    except Exception:  # cut short, or not ours: written again
        return False


_SAFETENSORS_DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def _write_atomically(target: str, tensor) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(target), exist_ok=True)
    temporary = f"{target}.partial-{os.getpid()}"
    try:
        save_file({TENSOR: tensor}, temporary)
        os.replace(temporary, target)  # whole, or not there
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _add_timing(path: str, entries: list[dict]) -> None:
    """Clips: what the request carries beside the grid (Qwen3-VL's timestamps, Qwen2.5-VL's
    second_per_grid_ts)."""
    clips = [e for e in entries if e["modality"] == "video"]
    if not clips:
        return
    timing = video_timing(path, [e["row"] for e in clips])
    for entry, stamps, seconds in zip(clips, timing["timestamps"], timing["second_per_grid_ts"].tolist()):
        if entry["family"] == "qwen3-vl":
            entry["timestamps"] = stamps
        elif entry["family"] == "qwen2.5-vl":
            entry["second_per_grid_ts"] = seconds


def _write_manifest(manifest: str, entries: list[dict]) -> None:
    """The manifest, replaced whole: this call's rows, and those of earlier calls for other rows."""
    kept = {}
    if os.path.exists(manifest):
        with open(manifest, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    entry = json.loads(line)
                    kept[entry["uuid"]] = entry
    for entry in entries:
        kept[entry["uuid"]] = entry
    temporary = f"{manifest}.partial-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        for entry in kept.values():
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
    os.replace(temporary, manifest)


def read_manifest(folder: str | os.PathLike) -> dict[str, dict]:
    """key → manifest entry (the last written for a key)."""
    path = os.path.join(os.fspath(folder), MANIFEST)
    if not os.path.exists(path):
        raise UsageError(f"{folder} has no {MANIFEST}: write the cache with vit-extract vllm-cache first")
    entries = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                entry = json.loads(line)
                entries[entry["key"]] = entry
    return entries


def vllm_requests(folder: str | os.PathLike, prompts) -> list[dict]:
    """vLLM request dicts for ``prompts``: (prompt, keys) pairs, a prompt being text or a dict vLLM
    takes (``{"prompt_token_ids": …}``) with one placeholder per key, in order, and keys those of the
    manifest (pictures and clips may not be mixed in one prompt by this helper). Each request carries
    the grids (and a clip's timing) and ``multi_modal_uuids``: no pixels, no embeddings. A key whose
    cache file is missing is refused here: vLLM 0.32's engine dies on a uuid it finds no file for."""
    import torch

    manifest = read_manifest(folder)
    requests = []
    for prompt, keys in prompts:
        keys = [keys] if isinstance(keys, str) else list(keys)
        missing = [k for k in keys if k not in manifest]
        if missing:
            raise UsageError(f"{missing[0]!r} is not in {os.path.join(os.fspath(folder), MANIFEST)}")
        entries = [manifest[k] for k in keys]
        for entry in entries:  # a uuid vLLM finds no file for takes its whole engine down
            if not os.path.exists(os.path.join(os.fspath(folder), entry["uuid"], CACHE_FILE)):
                raise UsageError(f"{entry['key']!r}: its cache file {entry['uuid']}/{CACHE_FILE} is missing from "
                                 f"{os.fspath(folder)}: write it again with vit-extract vllm-cache")
        kinds = {e["modality"] for e in entries}
        if len(kinds) != 1:
            raise UsageError("one prompt's keys must all be pictures or all clips")
        kind = kinds.pop()
        data = {f"{kind}_grid_thw": torch.tensor([e["grid_thw"] for e in entries], dtype=torch.int64)}
        if kind == "video" and "timestamps" in entries[0]:
            data["timestamps"] = [e["timestamps"] for e in entries]
        if kind == "video" and "second_per_grid_ts" in entries[0]:
            data["second_per_grid_ts"] = torch.tensor([e["second_per_grid_ts"] for e in entries], dtype=torch.float32)
        request = dict(prompt) if isinstance(prompt, dict) else {"prompt": prompt}
        request["multi_modal_data"] = {kind: data}
        request["multi_modal_uuids"] = {kind: [e["uuid"] for e in entries]}
        requests.append(request)
    return requests
