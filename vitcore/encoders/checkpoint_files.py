"""Reading a Hugging Face checkpoint folder's files without the library that made them: its JSON
files, and the bytes of chosen tensors from its safetensors files (by byte range, so a language
model's tensors beside a vision tower's are never read). The families that read such folders
(Qwen-VL, the transformers-defined towers) identify their weights with ``tensor_digest``.

Every problem is a one-line WeightsError that names the file: JSON that does not parse, a shard
the index names but the folder lacks, a git-lfs pointer in place of the weights, a file that is
not safetensors or is cut short.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Callable, Iterator

from vitcore.errors import UsageError, WeightsError

LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


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


def nested_processor(folder: str, key: str) -> tuple[dict, str] | None:
    """v5's processor_config.json's nested ``key`` ("image_processor", "video_processor") and where,
    or None when there is no such file or entry."""
    nested = os.path.join(folder, "processor_config.json")
    if not os.path.isfile(nested):
        return None
    record = read_json(nested).get(key)
    if record is None:
        return None
    if not isinstance(record, dict):
        raise WeightsError(f"{nested}: {key} is not a JSON object")
    return record, f"{nested} ({key})"


def processor_record(folder: str) -> tuple[dict, str]:
    """A folder's image processor settings as transformers reads them: the nested ``image_processor`` of
    v5's processor_config.json, else the whole of preprocessor_config.json, never both; and where."""
    found = nested_processor(folder, "image_processor")
    if found is not None:
        return found
    flat = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(flat):
        return read_json(flat), flat
    raise WeightsError(f"{folder} has no preprocessor_config.json (nor a processor_config.json with an image_processor): "
                       "its image processor is unknown (transformers cannot load it either); copy the file from the "
                       "checkpoint this folder came from")


def has_safetensors(folder: str) -> bool:
    for name in (INDEX, SINGLE, "pytorch_model.bin"):
        refuse_broken_link(os.path.join(folder, name))
    return os.path.isfile(os.path.join(folder, INDEX)) or os.path.isfile(os.path.join(folder, SINGLE))


def refuse_broken_link(path: str) -> None:
    """A hub cache snapshot links each file to a blob; a link to nothing is an unfinished download."""
    if os.path.islink(path) and not os.path.exists(path):
        raise WeightsError(f"{path} is a link to {os.readlink(path)}, which is missing: an incomplete download? "
                           "(download the checkpoint again)")


def shards(folder: str, wanted: Callable[[str], bool]) -> dict[str, list[str] | None]:
    """shard file → the wanted tensor names the index puts there (None: read the names from its header)."""
    index_path = os.path.join(folder, INDEX)
    has_safetensors(folder)  # a link to nothing is said as such
    if os.path.isfile(index_path):
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index_path} has no weight_map")
        files: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            if wanted(name):
                files.setdefault(shard, []).append(name)
        return files
    if os.path.isfile(os.path.join(folder, SINGLE)):
        return {SINGLE: None}
    raise WeightsError(f"{folder} has neither {SINGLE} nor {INDEX}")


def header(handle, path: str) -> tuple[dict, int]:
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
        parsed = json.loads(handle.read(length))
    except ValueError:
        raise WeightsError(f"{path} is not a safetensors file (its header is not JSON)") from None
    return parsed, 8 + length


def tensor_names(folder: str) -> list[str]:
    """Every tensor name in a folder's safetensors files (their headers only)."""
    names = []
    for shard, listed in shards(folder, lambda name: True).items():
        if listed is not None:
            names += listed
            continue
        path = os.path.join(folder, shard)
        with open(path, "rb") as handle:
            names += [n for n in header(handle, path)[0] if n != "__metadata__"]
    return names


def tensor_bytes(folder: str, wanted: Callable[[str], bool]) -> Iterator[tuple[str, str, dict, bytearray]]:
    """(shard path, tensor name, its safetensors entry, its bytes) for each wanted tensor, read by
    byte range from each shard that holds it."""
    for shard, names in shards(folder, wanted).items():
        path = os.path.join(folder, shard)
        refuse_broken_link(path)
        if not os.path.isfile(path):
            raise WeightsError(f"{path} is missing: {INDEX} names it (download it again)")
        yield from file_tensor_bytes(path, wanted, names)


def file_tensor_bytes(path: str, wanted: Callable[[str], bool],
                      names: list[str] | None = None) -> Iterator[tuple[str, str, dict, bytearray]]:
    """tensor_bytes of one safetensors file: ``names`` (an index's list), or every wanted tensor it
    holds. Plain reads, not a memory map: only the tensor being handed out is in memory."""
    with open(path, "rb") as handle:
        entries, base = header(handle, path)
        listed = names if names is not None else [n for n in entries if n != "__metadata__" and wanted(n)]
        for name in listed:
            entry = entries.get(name)
            if entry is None:
                raise WeightsError(f"{path} lacks tensor {name}, which {INDEX} puts there")
            start, stop = entry["data_offsets"]
            handle.seek(base + start)
            raw = bytearray(stop - start)  # a tensor made from it shares it: read once, no copies
            if handle.readinto(raw) != len(raw):
                raise WeightsError(f"{path} is truncated: tensor {name} ends past the end of the file")
            yield path, name, entry, raw


def tensor_digest(raw_by_name: dict) -> str:
    """Weights' identity: a sha256 over the tensors' names and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(raw_by_name):
        digest.update(name.encode() + b"\0" + raw_by_name[name])
    return digest.hexdigest()


def file_digest(path: str) -> str:
    """The sha256 of a whole file (a weights format that cannot be read tensor by tensor)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def hub_snapshot(folder: str) -> str:
    """A Hugging Face hub cache folder (models--ORG--NAME, holding snapshots/ and refs/) → the snapshot
    that refs/main names, or the only one; any other folder as it is."""
    snapshots = os.path.join(folder, "snapshots")
    if os.path.isfile(os.path.join(folder, "config.json")) or not os.path.isdir(snapshots):
        return folder
    main = os.path.join(folder, "refs", "main")
    if os.path.isfile(main):
        with open(main) as handle:
            chosen = os.path.join(snapshots, handle.read().strip())
        if os.path.isdir(chosen):
            return chosen
    found = sorted(os.listdir(snapshots))
    if len(found) == 1:
        return os.path.join(snapshots, found[0])
    raise UsageError(f"--weights {folder} is a hub cache folder with {len(found)} snapshots and no refs/main naming "
                     f"one: give the snapshot folder itself ({os.path.join(snapshots, found[0]) if found else 'none'} …)")
