"""The towers transformers defines (SigLIP, SigLIP2, CLIP, DINOv2): the family objects are in
family.py; the registry is the way in."""
