"""Sizes in bytes, read from and shown to a person (torch- and numpy-free: the CLI uses it for --help)."""

from __future__ import annotations

import re

from vitcore.errors import UsageError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from a size such as 2GB (10^9), 512MiB (2^20), 1.5G (a bare letter: 2^30) or 1000000."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = found and found.group(2).lower()
    if not found or unit not in _UNITS:
        raise UsageError(f"{text!r} is not a size: give bytes or a number with a unit, such as 2GB, 512MiB or 1.5G")
    size = int(float(found.group(1)) * _UNITS[unit])
    if size < 1:
        raise UsageError(f"the size {text!r} is not positive")
    return size


def shown_size(count: float) -> str:
    """Bytes as a person reads them: 512 B, 2.3 MiB, 1.5 TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"
