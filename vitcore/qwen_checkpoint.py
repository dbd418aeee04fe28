"""Reading a Hugging Face Qwen-VL checkpoint folder as transformers would: its JSON files and the
vision tower's tensors (the language model's are never read). Shared by the Qwen-VL families.

Every problem is a one-line WeightsError that names the file: JSON that does not parse, a shard
the index names but the folder lacks, a git-lfs pointer in place of the weights, a file that is
not safetensors or is cut short.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

from vitcore.errors import WeightsError

# Where the vision tower's tensors live: transformers ≥ 4.52 saves them under model.visual.; older
# saves and the bare Qwen*VLModel under visual. (transformers loads both to the same weights).
VISION_PREFIXES = ("model.visual.", "visual.")
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"


def read_json(path: str) -> dict:
    """A JSON object from ``path``; one line naming the file when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(LFS_POINTER))
            if head == LFS_POINTER:
                raise WeightsError(f"{path} is a git-lfs pointer, not the file itself: run git lfs pull")
            data = json.loads(head + handle.read())
    except OSError as err:
        raise WeightsError(f"cannot read {path}: {err.strerror}") from None
    except ValueError as err:
        raise WeightsError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path} does not hold a JSON object")
    return data


def _shards(folder: str) -> dict[str, list[str] | None]:
    """shard file → the tensor names the index puts there (None: read the names from its header)."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index_path} has no weight_map")
        files: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            if name.startswith(VISION_PREFIXES):
                files.setdefault(shard, []).append(name)
        return files
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return {"model.safetensors": None}
    raise WeightsError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")


def _header(handle, path: str) -> tuple[dict, int]:
    """A safetensors file's header and where its data starts."""
    start = handle.read(8)
    if start == LFS_POINTER[:8] and handle.read(len(LFS_POINTER) - 8) == LFS_POINTER[8:]:
        raise WeightsError(f"{path} is a git-lfs pointer, not the weights: run git lfs pull")
    if len(start) < 8:
        raise WeightsError(f"{path} is not a safetensors file (it is {len(start)} bytes long)")
    (length,) = struct.unpack("<Q", start)
    size = os.fstat(handle.fileno()).st_size
    if length > size - 8:
        raise WeightsError(f"{path} is not a safetensors file, or is cut short (header of {length} bytes)")
    try:
        header = json.loads(handle.read(length))
    except ValueError:
        raise WeightsError(f"{path} is not a safetensors file (its header is not JSON)") from None
    return header, 8 + length


def read_vision_tensors(folder: str, dtypes: dict) -> tuple[dict[str, object], str]:
    """The vision tower's tensors (names without their prefix), read by byte range from each shard
    that holds them, and a sha256 over their names and bytes: the weights' identity, without
    hashing the language model. Names are hashed as model.visual.*, so the same weights saved under
    either prefix have the same identity. ``dtypes`` maps safetensors dtype names to torch dtypes."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    raw_by_name: dict[str, bytearray] = {}  # hashed below, before anything can change the tensors
    for shard, names in _shards(folder).items():
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            raise WeightsError(f"{path} is missing: model.safetensors.index.json names it (download it again)")
        with open(path, "rb") as handle:
            header, base = _header(handle, path)
            wanted = names if names is not None else [n for n in header if n.startswith(VISION_PREFIXES)]
            for name in wanted:
                entry = header.get(name)
                if entry is None:
                    raise WeightsError(f"{path} lacks tensor {name}, which model.safetensors.index.json puts there")
                start, stop = entry["data_offsets"]
                handle.seek(base + start)
                raw = bytearray(stop - start)  # the tensor below shares it: read once, no copies
                if handle.readinto(raw) != len(raw):
                    raise WeightsError(f"{path} is truncated: tensor {name} ends past the end of the file")
                dtype = dtypes.get(entry["dtype"])
                if dtype is None:
                    raise WeightsError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
                short = _strip(name)
                if short in tensors:
                    raise WeightsError(f"{folder} holds the vision tensor {short} under both prefixes")
                raw_by_name[VISION_PREFIXES[0] + short] = raw
                tensor = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
                tensors[short] = tensor.reshape(entry["shape"])
    if not tensors:
        raise WeightsError(f"{folder} holds no vision tensors ({' or '.join(p + '*' for p in VISION_PREFIXES)})")
    digest = hashlib.sha256()
    for name in sorted(raw_by_name):
        digest.update(name.encode() + b"\0" + raw_by_name[name])
    return tensors, digest.hexdigest()


def _strip(name: str) -> str:
    for prefix in VISION_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name
