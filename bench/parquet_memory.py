"""Memory of a decoding worker reading a Parquet row group, against the row group's size.

    python bench/parquet_memory.py [--images 100] [--image-kb 500]

Writes one Parquet file as Hugging Face datasets does (an Image struct column of random bytes,
snappy, pyarrow's defaults: the whole row group lands in one data page) and, in a fresh process
each, reads every row the way a worker does (vitcore.inputs.parquet, PARQUET_READ_ROWS rows
decoded at a time), and the whole row group at once for comparison. Prints the growth of the
process's anonymous resident memory at its peak (RssAnon, sampled after every row), against the
row group's size.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
import pyarrow as pa, pyarrow.parquet as pq
from vitcore.inputs import parquet

def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) / 1024

path, rows, how = sys.argv[2], int(sys.argv[3]), sys.argv[4]
start = peak = anon()
if how == "whole":
    table = pq.ParquetFile(path).read_row_group(0, columns=["image", "caption"])
    peak = anon()
else:
    parquet.PARQUET_READ_ROWS = int(how)
    for i in range(rows):
        batch, at = parquet._rows_at(path, 0, ("image", "caption"), i)
        batch.column("image")[at].as_py()
        peak = max(peak, anon())
print(peak - start)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--image-kb", type=int, default=500)
    args = parser.parse_args()
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "t.parquet")
        rng = np.random.default_rng(0)
        rows = [{"image": {"bytes": rng.integers(0, 256, args.image_kb * 1000, dtype=np.uint8).tobytes(),
                           "path": f"{i}.jpg"}, "caption": f"caption {i}"} for i in range(args.images)]
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=args.images)
        group_mb = pq.ParquetFile(path).metadata.row_group(0).total_byte_size / 2**20
        print(f"one row group of {args.images} images of {args.image_kb} kB: {group_mb:.0f} MiB")
        for how in ("whole", "16", "1"):
            done = subprocess.run([sys.executable, "-c", CHILD, str(PROJECT), path, str(args.images), how],
                                  capture_output=True, text=True, check=True)
            grown = float(done.stdout)
            label = "read whole" if how == "whole" else f"{how} row{'s' * (how != '1')} at a time"
            print(f"  {label:>18}: peak growth {grown:6.0f} MiB ({grown / group_mb:.1f}× the row group)")


if __name__ == "__main__":
    main()
