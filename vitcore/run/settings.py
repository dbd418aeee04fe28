"""What an output records of a run (StoreSettings), from the family's RunRecord and the options:
torch-free, so a resume can be checked (and refused) before torch is imported."""

from __future__ import annotations

import json

from vitcore import __version__
from vitcore.encoders.base import RunRecord
from vitcore.errors import UsageError
from vitcore.store import ArraySpec, StoreSettings


def store_settings(built: RunRecord, pool: str, out_dtype: str, device, dtype,
                   shard: str = "null", meta: tuple[str, ...] = (), image_column: str | None = None,
                   image_columns_used: tuple[str, ...] = (), compression: str = "none") -> StoreSettings:
    """What the file records for a run of ``built`` (a RunRecord, or the BuiltEncoder made from it):
    its records, and each output as stored (pooled outputs are one (W,) vector per image; --pool
    model: the encoder's own embedding in place of the tokens). ``device`` and ``dtype``: torch's, or
    their names (a resume is checked before torch is imported)."""
    if pool == "model":
        if built.embedding_width is None:
            why = f" ({built.no_embedding})" if built.no_embedding else ""
            raise UsageError(f"--pool model: the {built.name} encoder has no pooled embedding of its own{why}; "
                             "use --pool mean or max")
        if len(built.outputs) > 1:
            raise UsageError("--pool model stores one embedding per image, and --layer K has none of its own: "
                             "use --pool none (or mean, max) with --layer")
        arrays = (ArraySpec("tokens", (built.embedding_width,)),)
    else:
        arrays = tuple(spec if pool == "none" else ArraySpec(spec.name, (spec.width,)) for spec in built.outputs)
    compute_dtype = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    return StoreSettings(
        encoder=built.encoder_record, weights=built.weights.to_json(), preprocessing=built.preprocessing,
        pooling=pool, projector=built.projector, compute_dtype=compute_dtype, device=str(device),
        out_dtype=out_dtype, arrays=arrays, mean=pool == "none", grid_thw=built.grid_thw, version=__version__,
        shard=shard, meta=tuple(meta) + tuple(built.loader_meta), image_column=json.dumps(image_column),
        image_columns_used=json.dumps(sorted(image_columns_used)), compression=compression,
    )
