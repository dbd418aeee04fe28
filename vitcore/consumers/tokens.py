"""A finished file read with what its encoder family knows: the grid a row's tokens lie on and a
one-line summary of its encoder. ``vitcore.open_tokens`` gives this reader; the store's own
(store/reader.py) knows only what the file itself says."""

from __future__ import annotations

import functools
import json
import os

import numpy as np

from vitcore.encoders import registry
from vitcore.errors import UsageError
from vitcore.store.reader import StoredTokens


class TokenFile(StoredTokens):
    """Read a vit-extract output: rows by index or key, batches, settings, failures, token grids.

        with vitcore.open_tokens("out.h5") as f:
            x = f["cat.jpg"]          # (T, D) numpy array, or (D,) when pooled
            rows, cols = f.token_grid("cat.jpg")
    """

    @functools.cached_property
    def _made_by(self):
        """(the family that made the file, its encoder record, its preprocessing record): read once."""
        encoder = json.loads(self.h5.attrs["encoder"])
        return registry.for_record(encoder), encoder, json.loads(self.h5.attrs["preprocessing"])

    def _patch_rows(self, what: str) -> None:
        if self.settings.get("pooling", "none") != "none":
            raise UsageError(f"{self.path} holds pooled vectors (pooling {self.settings['pooling']}), one per image: "
                             f"it has no patch tokens for {what}; extract with --pool none")

    def token_grid(self, item: int | str) -> tuple[int, int]:
        """(rows, cols) of the grid a row's patch tokens lie on, in raster order."""
        self._patch_rows("token_grid")
        i = self.row_number(item)
        family, encoder, _ = self._made_by
        grid_thw = tuple(int(v) for v in self.h5["grid_thw"][i]) if "grid_thw" in self.h5 else None
        return family.token_grid(encoder, grid_thw)

    def prefix_tokens(self) -> int:
        """How many tokens (CLS, registers) come before the patch tokens in each row."""
        family, encoder, _ = self._made_by
        return family.prefix_tokens(encoder)

    def patch_tokens(self, item: int | str) -> np.ndarray:
        """A row's patch tokens (T', D), the prefix tokens left out: what token_grid lays out."""
        self._patch_rows("patch_tokens")
        return self.tokens(item)[self.prefix_tokens():]

    def as_seen(self, picture):
        """An original picture (upright RGB, Pillow) framed as this file's encoder saw it."""
        family, _, preprocessing = self._made_by
        return family.framed(picture, preprocessing)

    def describe(self, max_failures: int | None = None) -> dict:
        """What `vit-extract info` shows: a JSON-ready summary of the file."""
        described = super().describe(max_failures)
        described["summary"] = self._made_by[0].describe(described)  # the family reads encoder and preprocessing
        return described


def open_tokens(path: str | os.PathLike, check_shards: bool = True, while_written: bool = False) -> TokenFile:
    return TokenFile(path, check_shards=check_shards, while_written=while_written)


def rows_of(f: TokenFile, keys) -> list[int]:
    """Row numbers for ``keys``: None (every row), one key, or a sequence of keys (str, or a file
    name's bytes) and row numbers (int). A key stored under two roots names two rows: refused; give ROOT/KEY or a row number."""
    if keys is None:
        return list(range(len(f)))
    if isinstance(keys, (str, bytes, int, np.integer)) and not isinstance(keys, bool):
        keys = [keys]  # (one key as bytes too: not a sequence of its byte values as row numbers)
    keys = list(keys)
    if not keys:
        raise UsageError("no keys given: pass None for every row, or some keys or row numbers")
    rows = []
    for key in keys:
        if isinstance(key, (str, bytes)):  # (bytes: a file name's, as os.fsencode gives it)
            rows.append(f.index(os.fsdecode(key)))  # a key under two roots is refused, naming the qualified forms
        elif isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
            rows.append(f.row_number(int(key)))
        else:
            raise UsageError(f"{key!r} is neither a key (str) nor a row number (int)")
    return rows
