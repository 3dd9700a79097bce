"""The model layer: transformers' BEiT/ViT plus what transformers lacks.

Plain torch/transformers; never imports ray or deepspeed, never builds optimizers.
Import submodules directly (``from beit_ray.models.build import build_model``): importing the
transformers BEiT classes takes seconds, and this package does nothing at import time.
"""
