"""Batch inference: one predictor shared by labelling and serving, and the labelling graph.

Import submodules directly (``from beit_ray.infer.label import label``); nothing happens at
import time.
"""
