"""The output file, and nothing about encoders: its schema (schema.py, one table of every attribute
and dataset), the writer (writer.py), the resume check (resume.py), an output's life in a run
(output.py), one run per output (lock.py), the reader (reader.py) and shards into one file
(merge.py). Reading needs neither torch nor the writer."""

from vitcore.store.output import Output, check_output
from vitcore.store.reader import StoredTokens, open_for_reading
from vitcore.store.resume import ResumeState, check_resumable
from vitcore.store.schema import (
    SCHEMA_VERSION,
    STRING,
    ArraySpec,
    Rows,
    StoreSettings,
    devices_joined,
    ragged_index_names,
    weights_identity,
)
from vitcore.store.writer import HOOKS, AsyncWriter, StoreWriter, WriteError

__all__ = [
    "SCHEMA_VERSION", "STRING", "ArraySpec", "AsyncWriter", "HOOKS", "Output", "ResumeState", "Rows",
    "StoreSettings", "StoreWriter", "StoredTokens", "WriteError", "check_output", "check_resumable",
    "devices_joined", "open_for_reading", "ragged_index_names", "weights_identity",
]
