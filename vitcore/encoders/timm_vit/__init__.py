"""ViT-family models defined by timm (DINOv2, EVA, SigLIP, plain ViT): the family object is in
family.py; the registry is the way in."""
