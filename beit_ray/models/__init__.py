"""The model layer: transformers' BEiT/ViT plus what transformers lacks.

Plain torch/transformers; never imports ray or deepspeed, never builds optimizers.
Import submodules directly (``from beit_ray.models.build import build_model``): importing the
transformers BEiT classes takes seconds, and this package does nothing at import time.

- ``flavours``: named sizes → transformers configs per task (mim, classification,
  segmentation, features).
- ``build``: ``build_model`` / ``build_from_config``, ZeRO-3-safe.
- ``load``: ``load_model`` (HF folders, beit-ray runs, s3://; task changes as BEiT fine-tuning
  does), ``export_hf``, ``model_dir``, ``task_of``, ``build_or_load``.
- ``checkpoint``: where a checkpoint's files are and its tensors in transformers 5 names.
- ``unilm``: microsoft/unilm BEiT ``.pth`` state dicts → transformers names and config.
- ``segmentation``: ``BeitForSemanticSegmentation`` tapping 1-based blocks (unilm's UperNet taps).
- ``upernet``: segmentation exports as transformers' ``UperNetForSemanticSegmentation`` over a
  ``BeitBackbone`` (the same taps), and back.
- ``init``: unilm's from-scratch init (trunc-normal 0.02, output projections / sqrt(2 l)).
- ``posembed``: relative position tables (BEiT's geometric resize) and absolute embeddings.
- ``layer_decay``: ``param_groups`` with layer-wise lr decay and unilm's weight-decay set.
- ``preprocess``: ``Preprocessor``, equal to BeitImageProcessor / ViTImageProcessor.
- ``mim``: ``mim_forward``, the vocabulary head on masked patches only; ``mlm_accuracy``.
"""
