"""A PyTorch Dataset over a token file, for training on cached tokens.

    ds = vitcore.TokenDataset("tokens.h5")              # or keys=[...] for a subset, in that order
    loader = DataLoader(ds, batch_size=8, num_workers=4, collate_fn=vitcore.collate_tokens)

The file is opened lazily, once per process that reads from it, and never pickled: the dataset
works with every start method (fork, spawn, forkserver). An h5py handle must not cross a fork
(HDF5's library state is per process), so a process that finds a handle opened by another process id (its
parent's, inherited) opens its own.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from vitcore.errors import VitExtractError
from vitcore.consumers.tensors import as_tensor
from vitcore.consumers.tokens import TokenFile, rows_of


def _fingerprint(f: TokenFile) -> tuple:
    """What tells this file from one written in its place: its run's id and creation time."""
    attrs = f.h5.attrs
    return str(attrs.get("run_id", "")), str(attrs.get("created", ""))


class TokenDataset(torch.utils.data.Dataset):
    """Items (dicts) of a vit-extract file, by position in ``keys`` (all rows, in file order, by default):

        key          the row's key
        tokens       (T, D) tensor (T varies per image for native-resolution files), or (D,) when pooled
        grid_thw     (3,) int64 patch grid, for families that store it (Qwen-VL)
        features     name → tensor for each stored features/<name> (e.g. deepstack_0) and layers/<K>
        meta         name → text for each stored meta/<name> (captions, --keep / --columns)
    """

    def __init__(self, path: str | os.PathLike, keys=None):
        """``keys``: None (every row, in file order), or keys (str) and row numbers (int) in the order
        wanted. A key stored under two roots is refused (give ROOT/KEY or its row number)."""
        self.path = os.path.abspath(os.fspath(path))  # a launcher may change the working directory
        with TokenFile(self.path) as f:  # the index only; each reading process opens its own handle
            self.rows = rows_of(f, keys)  # keys (str) and row numbers (int); None: every row
            self.keys = [f.keys[r] for r in self.rows]
            self.features = [f"features/{name}" for name, _, _ in f.settings.get("features") or []]
            self.features += [f"layers/{k}" for k in f.layers]
            self.meta_names = f.meta_names
            self.has_grid = "grid_thw" in f.h5
            self.made = _fingerprint(f)
        self._file: TokenFile | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"] = state["_pid"] = None  # an open h5py file cannot be pickled, nor shared
        return state

    def _open(self) -> TokenFile:
        if self._file is None or self._pid != os.getpid():
            f = TokenFile(self.path)  # an inherited handle is left alone; a merged file checks its shards
            if _fingerprint(f) != self.made or len(f) <= max(self.rows, default=-1):
                f.close()
                raise VitExtractError(f"{self.path} has changed since this TokenDataset was made (rewritten, or "
                                      "another file in its place): its rows may be other images; make the dataset again")
            self._file, self._pid = f, os.getpid()
        return self._file

    def __getitem__(self, index: int) -> dict:
        f = self._open()
        row = self.rows[index]
        item = {"key": self.keys[index], "tokens": as_tensor(f.tokens(row))}
        if self.has_grid:
            item["grid_thw"] = torch.from_numpy(f.h5["grid_thw"][row].astype(np.int64))
        item["features"] = {name: as_tensor(f.read(name, row)) for name in self.features}
        item["meta"] = {name: f.meta(name, row) for name in self.meta_names}
        return item

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None


def collate_tokens(items: list[dict]) -> dict:
    """A batch as the Qwen-VL models consume images: every image's tokens concatenated in order,
    ``(Σ T_i, D)``, with ``grid_thw`` ``(B, 3)`` and ``num_tokens`` ``(B,)`` to split them again
    (``feature_num_tokens`` for each feature); so for every Qwen-VL file, even at a fixed
    --resolution. Seed files' tokens are stacked ``(B, T, D)``. Meta becomes lists of text.
    Items must come from files with the same features (not a mix)."""
    shapes = {tuple(item["tokens"].shape) for item in items}
    ragged = items[0]["tokens"].dim() == 2 and (len(shapes) > 1 or "grid_thw" in items[0])  # pooled: (D,) each

    def join(tensors):
        return torch.cat(list(tensors)) if ragged else torch.stack(list(tensors))

    batch = {
        "keys": [item["key"] for item in items],
        "tokens": join(item["tokens"] for item in items),
        "features": {name: join(item["features"][name] for item in items) for name in items[0]["features"]},
        "meta": {name: [item["meta"][name] for item in items] for name in items[0]["meta"]},
    }
    if ragged:
        batch["num_tokens"] = torch.tensor([len(item["tokens"]) for item in items], dtype=torch.int64)
        batch["feature_num_tokens"] = {  # rows of each feature per image (last_hidden has 4 per token)
            name: torch.tensor([len(item["features"][name]) for item in items], dtype=torch.int64)
            for name in items[0]["features"]}
    if "grid_thw" in items[0]:
        batch["grid_thw"] = torch.stack([item["grid_thw"] for item in items])
    return batch
