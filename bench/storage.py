"""Stored size and write/read throughput of each --out-dtype × --compression.

    python bench/storage.py [--images 64] [--model small] [--weights FILE_OR_DIR]

Extracts the sample pictures (copied to --images files) once in float32, then writes the same
tokens with the run's own writer under each dtype and compression and reads them back: through
vit-extract's reader (open_tokens, every row) and through plain h5py (`f["tokens"][i]`; bfloat16
is converted to float32 by HDF5 there). Prints bytes per image, the size against float16
uncompressed, and MB/s of tokens (as stored, uncompressed) written and read.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

import vitcore
from vitcore.store import StoreWriter
from vitcore.store.encoding import numpy_dtype
from vitcore.store.reader import StoredTokens
from vitcore.store.schema import Rows, StoreSettings
from vitcore.run.pipeline import ExtractOptions
from sample_copies import sample_copies

CASES = [(d, c) for d in ("float16", "bfloat16", "float32") for c in ("none", "gzip", "lz4", "zstd")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--model", default="small")
    parser.add_argument("--weights", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        pictures = sample_copies(Path(work) / "pictures", args.images)
        reference = os.path.join(work, "float32.h5")
        vitcore.extract([pictures], reference, ExtractOptions(model=args.model if not args.weights else None,
                                                              weights=args.weights, out_dtype="float32",
                                                              dtype="float32"))
        with StoredTokens(reference) as f:
            keys = f.keys
            tokens = np.stack([f[i] for i in range(len(f))])  # (N, T, D) float32
            attrs = dict(f.h5.attrs)
        print(f"{len(keys)} images, tokens {tokens.shape[1:]} per image; model {args.model if not args.weights else args.weights}")
        print(f"{'dtype':9} {'compression':11} {'bytes/image':>12} {'vs f16':>7} {'write MB/s':>10} "
              f"{'read MB/s':>9} {'h5py MB/s':>9}")
        baseline = None
        for out_dtype, compression in CASES:
            path = os.path.join(work, f"{out_dtype}-{compression}.h5")
            stored = tokens.astype(numpy_dtype(out_dtype))
            settings = _settings(attrs, out_dtype, compression, tokens.shape[1:])
            tick = time.perf_counter()
            StoreWriter.prepare(path, settings, [str(pictures)], resuming=False)
            writer = StoreWriter.reopen(path, settings)
            for start in range(0, len(keys), 16):
                part = stored[start:start + 16]
                writer.append(Rows(keys=keys[start:start + 16], root_index=np.zeros(len(part), np.int32),
                                   image_size=np.zeros((len(part), 2), np.int32), arrays={"tokens": part}))
            writer.close(True)
            write_s = time.perf_counter() - tick
            size = os.path.getsize(path)
            baseline = baseline or size
            tick = time.perf_counter()
            with vitcore.open_tokens(path) as f:
                for i in range(len(f)):
                    f[i]
            read_s = time.perf_counter() - tick
            tick = time.perf_counter()
            with h5py.File(path, "r") as h5:
                for i in range(len(keys)):
                    h5["tokens"][i]
            plain_s = time.perf_counter() - tick
            megabytes = stored.nbytes / 1e6
            print(f"{out_dtype:9} {compression:11} {size / len(keys):12,.0f} {size / baseline:7.2f} "
                  f"{megabytes / write_s:10.0f} {megabytes / read_s:9.0f} {megabytes / plain_s:9.0f}")


def _settings(attrs: dict, out_dtype: str, compression: str, shape) -> StoreSettings:
    from vitcore.store.schema import ArraySpec

    return StoreSettings(encoder=attrs["encoder"], weights=attrs["weights"], preprocessing=attrs["preprocessing"],
                         pooling="none", projector="null", compute_dtype="float32", device="cpu",
                         out_dtype=out_dtype, arrays=(ArraySpec("tokens", tuple(shape)),), mean=False,
                         compression=compression)


if __name__ == "__main__":
    main()
