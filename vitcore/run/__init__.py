"""A run, from options to a finished file: checks.py (what is refused before torch loads),
pipeline.py (extract() in named steps), batching.py (one batching path for every family),
transfer.py (CUDA device→host copies), shard.py (--shard), distributed.py (torchrun).
A new engine (Ray, say) is a module here."""
