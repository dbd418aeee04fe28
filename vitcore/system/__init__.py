"""The machine: device and compute dtype (device.py), the decoding worker processes (workers.py),
and the main process's memory (host_memory.py)."""
