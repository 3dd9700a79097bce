"""beit-ray: BEiT pretraining, fine-tuning, batch labelling and serving on Ray.

The package does nothing at import time; import the stage you need:
``beit_ray.data`` → ``beit_ray.train`` → ``beit_ray.infer`` / ``beit_ray.serve``,
with the model layer in ``beit_ray.models`` and configs in ``beit_ray.config``.
"""

__version__ = "0.1.0"
