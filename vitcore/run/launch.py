"""Whether this process is a rank of a torchrun launch, from torchrun's variables alone (no torch,
no h5py: the CLI asks before it refuses anything, and refusals stay quick)."""

from __future__ import annotations

import os


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0"))
