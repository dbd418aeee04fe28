"""The machine: device and compute dtype (device.py), the decoding worker processes (workers.py),
the main process's memory (host_memory.py), the
user's cache folder and remembered weights digests (cache.py), and sizes in bytes (units.py)."""
