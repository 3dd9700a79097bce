"""The masked-patch data pipeline on Ray Data (sources → decode → augment → mask → tokenize).

Public API (import from the submodules; nothing is imported here):

- ``config``: ``DataConfig`` (the section), ``TokenizeConfig``, ``FitTokenizerConfig``.
- ``decode``: ``decode_image(bytes, max_pixels=..., target_size=None) -> uint8 [H, W, 3]``,
  ``DecodeError`` (``.reason``).
- ``augment``: ``PretrainTransform``, ``ClassifyTransform``, ``normalize(x, kind)``,
  ``image_rng(seed, epoch, key)``.
- ``masking``: ``BlockMaskGenerator``.
- ``listing``: ``list_parts(cfg, uri=..., val_fraction=...)`` (the source listed once into
  parquet parts), ``in_val_split(key, fraction, seed)``.
- ``plan``: ``make_clock()`` (the epoch a pass reads), ``epoch_raw(listing, cfg, ...)``.
- ``sources``: ``list_source(cfg)`` (driver-side), ``class_index(...)``, ``read_raw(...)``.
- ``pipeline``: ``pretraining_dataset(cfg, epoch=0, epochs=1, clock=None)``,
  ``labelled_dataset(cfg, split, clock=None)``, ``classes_for(cfg)``, ``read_errors(uri)``.
- ``segmentation``: ``segmentation_dataset(root, split, crop_size=512)``.
- ``materialize``: ``materialize(TokenizeConfig)``, ``read_materialized(uri)``.
- ``tokenizers``: ``load_tokenizer(kind, weights)``, ``TokenizerActor``; ``dalle``, ``codebook``.
"""
