"""Stored arrays as torch tensors, bfloat16 included."""

from __future__ import annotations

import numpy as np
import torch


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A numpy array read from a file → a CPU tensor of the same dtype. ml_dtypes' bfloat16 (numpy
    has none of its own, and torch.from_numpy refuses it) goes over bit for bit as torch.bfloat16."""
    array = np.ascontiguousarray(array)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)
