"""Inputs: what a run reads images from, one module per kind.

    base.py      what every kind shares: keys, identities, safe opening, the Discovery result
    files.py     loose files in folders and lists
    tar.py       WebDataset tar shards (members by offset)
    parquet.py   Parquet files with an image column (rows by row group)
    discover.py  paths, lists and stdin → the sorted inputs, over the table of container kinds

A new kind (object storage, video) is a module here and one entry in discover.CONTAINERS.
"""
