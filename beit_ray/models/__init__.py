"""The model layer: transformers' BEiT/ViT plus what transformers lacks.

Plain torch/transformers; never imports ray or deepspeed, never builds optimizers.
Import submodules directly (``from beit_ray.models.build import build_model``): importing the
transformers BEiT classes takes seconds, and this package does nothing at import time.

- ``flavours``: named sizes → transformers configs per task (mim, classification,
  segmentation, features).
- ``build``: ``build_model`` / ``build_from_config``, ZeRO-3-safe.
- ``load``: ``load_model`` (HF folders, beit-ray runs, s3://; task changes as BEiT fine-tuning
  does), ``export_hf``, ``model_dir``, ``task_of``, ``build_or_load``.
- ``posembed``: relative position tables (BEiT's geometric resize) and absolute embeddings.
- ``layer_decay``: ``param_groups`` with layer-wise lr decay and the no-weight-decay set.
- ``preprocess``: ``Preprocessor``, equal to BeitImageProcessor / ViTImageProcessor.
- ``mim``: ``mim_forward``, the vocabulary head on masked patches only; ``mlm_accuracy``.
"""
