"""Config sections of the data pipeline and the two data jobs (tokenize, fit_tokenizer).

``DataConfig`` is the one section every data consumer takes (pretraining, fine-tuning, the
tokenize job). Its sizes follow the model unless set (:meth:`DataConfig.fit_model`): mask grid
= ``image_size // patch_size``; the DALL-E tokenizer view must be ``grid * 8`` pixels (its
encoder downsamples by 8), checked only by the jobs that make masked-patch rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from beit_ray.config import RayConfig, StorageConfig, check
from beit_ray.data.randaugment import parse_rand_augment

LAYOUTS = ("auto", "folders", "class_tars", "webdataset", "parquet")
SIZE_FIELDS = ("image_size", "patch_size", "tokenizer_image_size")


@dataclass
class DataConfig:
    """Where images come from and how they become masked-patch rows."""

    source: str = ""
    """Input URI (local path or s3://): a class-folder tree, per-class tars, WebDataset shards or parquet."""
    layout: Literal["auto", "folders", "class_tars", "webdataset", "parquet"] = "auto"
    """Source layout; auto: parquet files → parquet, tars in class-named folder → class_tars when
    tar stems look like classes and members have no .cls/.json, else webdataset; otherwise folders."""
    classes_uri: str | None = None
    """Class index (classes.json, {"classes": [...]}) mapping class name → id; read if it
    exists, written there otherwise. Unset: <source>/classes.json if present, else written
    beside the job's outputs."""
    image_column: str = "image"
    """Parquet layout: the column holding encoded image bytes."""
    label_column: str | None = "label"
    """Parquet layout: an integer label column (ignored when missing)."""
    key_column: str | None = "key"
    """Parquet layout: a string key column; when missing, keys are '<file>#<row>'."""
    image_size: int | None = None
    """Patch view (the model input; the crop for segmentation) in pixels; unset: the model's
    (224 where a job has no model). Set, it must equal the model's."""
    patch_size: int | None = None
    """Model patch size; unset: the model's (16 where a job has no model). The mask grid is
    image_size // patch_size per side."""
    tokenizer_image_size: int | None = None
    """Pretraining tokenizer view in pixels; unset: 8 × the mask grid, which DALL-E needs (112
    for 224/16)."""
    crop_pct: float | None = None
    """Evaluation (and the exported preprocessor_config.json that labelling and serving use):
    shorter side resized to image_size / crop_pct (bicubic), then centre-cropped to image_size;
    unset: 0.875 below 384 px, 1.0 from 384 px on (BEiT's eval)."""
    num_masking_patches: int | None = None
    """Patches masked per image; unset: round(0.3827 * grid²) (75 of 196, as BEiT)."""
    min_num_patches: int | None = None
    """Smallest masked block; unset: 16 for a 14×14 grid, scaled by grid² / 196 (at least 1)."""
    max_num_patches: int | None = None
    """Largest masked block; unset: num_masking_patches."""
    min_aspect: float = 0.3
    """Block aspect ratios are log-uniform in [min_aspect, 1 / min_aspect]."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio range."""
    color_jitter: float = 0.4
    """Brightness/contrast/saturation jitter strength (0 disables), as BEiT's default 0.4."""
    flip: float = 0.5
    """Horizontal flip probability of training views (pretraining, classification,
    segmentation), as BEiT's 0.5; 0 disables (e.g. digits or text, where a mirror is no
    longer the same class)."""
    normalization: Literal["beit", "imagenet"] = "beit"
    """How consumers normalize the uint8 pixels: beit = mean/std 0.5; imagenet = ImageNet stats."""
    max_pixels: int = 89_478_485
    """Decompression-bomb guard: images with more pixels are error records (Pillow's default)."""
    draft: bool = True
    """Decode JPEGs at 1/2, 1/4, 1/8 scale when the crop still covers the target size."""
    region_decode: bool = True
    """Decode only the crop's rows and columns of upright RGB/gray JPEGs (libjpeg, compiled on
    first use; same pixels as a full decode, ~2-3x less work for a random-resized crop). Off,
    or without a C compiler and libjpeg's headers: Pillow decodes the whole image."""
    seed: int | None = None
    """The data's seed: the listing's shuffle, each epoch's read order, and (with the epoch and
    the image key) every crop, flip and mask. Unset: a training job's ``run.seed``, so one
    ``--run.seed`` changes every random draw of a run, as in timm and the HF Trainer
    (``data_seed`` unset); 0 for ``tokenize_shards`` and ``fit_tokenizer``. Set it to vary the
    model's init with the data fixed, or the data with the init fixed."""
    read_tasks: int | None = None
    """Read tasks per epoch at most (training streams); unset: 512. A task reads a slice of
    ≥ 64 listed files, 8 class tars interleaved, or one tar / parquet file, and more of them
    once an epoch has more slices than this."""
    batch_size: int = 64
    """Rows per batch in the decode/augment and tokenizer stages."""
    manifest: str | None = None
    """A listing of the source's images to use instead of listing it: parquet or CSV file(s)
    with a ``path`` (or ``key``, relative to data.source) column, e.g. an S3 Inventory report."""
    listing_uri: str | None = None
    """Where the source's listing (parquet parts + _index.json) is written and reused; training
    jobs default to <run>/listing, other callers to a fresh temp folder."""
    images_per_epoch: int | None = None
    """Images in one epoch, when known (ImageNet-22k: 14,197,122); unset: counted from the
    listing (class folders, parquet footers) or from tar headers, once, in parallel tasks."""
    shuffle_buffer: int = 1024
    """Rows in the consumer's local shuffle buffer (Ray Data's local_shuffle_buffer_size) that
    mixes rows of the units read at once, so a batch spans many inputs and classes; 0 disables.
    Memory: ~0.2 MB a row at 224 px."""
    reserve_per_operator: bool | None = None
    """Ray Data's per-operator resource reservation. Unset (auto): on only when the graph has
    an actor stage (the tokenizer), whose actors it protects (~4% faster there), and off for
    task-only graphs, which it holds to part of the CPUs: measured on a lone map stage, 1.4 of
    2 and 5.6 of 8 tasks ran at once with it, 1.9 and 7.5 without; the decode stage scaled
    1.04x from 1 to 2 CPUs with it and 1.75x without (bench/data_pipeline.py)."""
    tokenizer: Literal["dalle", "codebook", "none"] = "dalle"
    """Visual tokenizer; none: rows carry the tokenizer view (tokenizer_pixels) instead of tokens."""
    tokenizer_weights: str | None = None
    """Tokenizer safetensors (DALL-E encoder converted once, or a fitted codebook)."""
    tokenizer_actors: tuple[int, int] = (1, 2)
    """Tokenizer actor pool (min, max); autoscales between them."""
    tokenizer_num_gpus: float | None = None
    """GPUs per tokenizer actor; unset: 1 if the cluster has GPUs, else CPU actors."""
    tokenizer_num_cpus: float = 0.5
    """CPUs per tokenizer actor; fractional so actors never hold every CPU (Ray Data hangs)."""
    errors_uri: str | None = None
    """Where decode failures are written (jsonl files); unset in streaming mode: logged only."""
    tokenizer_view: Literal["patch", "crop"] = "patch"
    """Where the tokenizer view (Lanczos) is resized from: patch = from the patch view (3x
    cheaper, ~0.3 uint8 levels mean abs diff); crop = from the crop box, as unilm does."""
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"
    """Classification fine-tuning RandAugment, a timm spec (BEiT's --aa default): rand-m<0..10
    magnitude>[-n<ops, 2>][-mstd<magnitude noise std>][-mmax<cap, 10>][-inc<0|1>][-p<op prob,
    0.5>]; '' or null disables. Pretraining and segmentation ignore it."""

    def __post_init__(self) -> None:
        # Sizes left unset follow the model (fit_model); until then, BEiT-base's.
        self._unset = frozenset(f for f in (*SIZE_FIELDS, "seed") if getattr(self, f) is None)
        self.seed = 0 if self.seed is None else self.seed  # until fit_model gives the run's
        self.patch_size = 16 if self.patch_size is None else self.patch_size
        self.image_size = 224 if self.image_size is None else self.image_size
        check(self.layout in LAYOUTS, "data.layout", f"{self.layout!r} is not one of {LAYOUTS}")
        check(self.patch_size > 0, "data.patch_size", "must be positive")
        check(
            self.image_size > 0 and self.image_size % self.patch_size == 0,
            "data.image_size",
            f"must be a positive multiple of data.patch_size ({self.patch_size})",
        )
        if self.tokenizer_image_size is None:
            self.tokenizer_image_size = 8 * self.grid
        check(self.tokenizer_image_size > 0, "data.tokenizer_image_size", "must be positive")
        check(self.crop_pct is None or 0 < self.crop_pct <= 1, "data.crop_pct", "must be in (0, 1]")
        lo, hi = self.crop_scale
        check(0 < lo <= hi <= 1, "data.crop_scale", "needs 0 < min ≤ max ≤ 1")
        check(
            0 < self.crop_ratio[0] <= self.crop_ratio[1], "data.crop_ratio", "needs 0 < min ≤ max"
        )
        check(0 <= self.color_jitter < 1, "data.color_jitter", "must be in [0, 1)")
        check(0 <= self.flip <= 1, "data.flip", "must be in [0, 1]")
        check(self.max_pixels > 0, "data.max_pixels", "must be positive")
        check(self.batch_size > 0, "data.batch_size", "must be positive")
        check(self.read_tasks is None or self.read_tasks > 0, "data.read_tasks", "must be positive")
        check(self.shuffle_buffer >= 0, "data.shuffle_buffer", "must be ≥ 0")
        check(
            self.images_per_epoch is None or self.images_per_epoch > 0,
            "data.images_per_epoch",
            "must be positive",
        )
        a, b = self.tokenizer_actors
        check(1 <= a <= b, "data.tokenizer_actors", "needs 1 ≤ min ≤ max")
        check(self.tokenizer_num_cpus > 0, "data.tokenizer_num_cpus", "must be positive")
        check(self.tokenizer_view in ("patch", "crop"), "data.tokenizer_view", "patch or crop")
        try:
            parse_rand_augment(self.rand_augment)
        except ValueError as e:
            check(False, "data.rand_augment", str(e))

    def fit_model(self, image_size: int, patch_size: int, seed: int | None = None) -> DataConfig:
        """This config with the sizes left unset taken from the model (the tokenizer view: 8 ×
        the grid); sizes that were set must equal the model's. One flag, --model.image_size,
        then changes the resolution of a whole job."""
        for name, want in (("image_size", image_size), ("patch_size", patch_size)):
            check(
                name in self._unset or getattr(self, name) == want,
                f"data.{name}",
                f"is {getattr(self, name)}, the model's is {want}: leave it unset to follow the model",
            )
        fill: dict[str, int] = {}
        if self._unset & {"image_size", "patch_size"}:
            fill.update(image_size=image_size, patch_size=patch_size)
        if "tokenizer_image_size" in self._unset:
            fill["tokenizer_image_size"] = 8 * (image_size // patch_size)
        if "seed" in self._unset and seed is not None:
            fill["seed"] = seed
        return dataclasses.replace(self, **fill) if fill else self

    def check_masked_patches(self) -> None:
        """Validate what only masked-patch rows use (pretraining, tokenize, fit_tokenizer): the
        tokenizer view, the tokenizer and the block masks. Fine-tuning never calls this."""
        g = self.grid
        check(
            self.tokenizer_image_size % g == 0,
            "data.tokenizer_image_size",
            f"must be a multiple of the mask grid ({g})",
        )
        if self.tokenizer == "dalle":
            check(
                self.tokenizer_image_size == 8 * g,
                "data.tokenizer_image_size",
                f"the DALL-E encoder downsamples by 8: use {8 * g} for a {g}×{g} grid",
            )
        n = g * g
        check(0 < self.masking_patches <= n, "data.num_masking_patches", f"must be in [1, {n}]")
        check(self.min_patches >= 1, "data.min_num_patches", "must be ≥ 1")
        check(0 < self.min_aspect <= 1, "data.min_aspect", "must be in (0, 1]")
        if self.tokenizer != "none":
            check(
                bool(self.tokenizer_weights) or self.tokenizer == "dalle",
                "data.tokenizer_weights",
                "a codebook tokenizer needs its fitted weights (jobs/fit_tokenizer.py)",
            )

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def masking_patches(self) -> int:
        n = self.grid**2
        return (
            self.num_masking_patches
            if self.num_masking_patches is not None
            else max(1, round(0.3827 * n))
        )

    @property
    def min_patches(self) -> int:
        if self.min_num_patches is not None:
            return self.min_num_patches
        return max(1, min(round(16 * self.grid**2 / 196), self.masking_patches))


@dataclass
class ShardConfig:
    """How the tokenize job cuts its output into resumable shards."""

    images_per_shard: int = 2000
    """Folder/parquet layouts: input images per shard (a shard is the unit of resume)."""
    tars_per_shard: int = 1
    """Tar layouts: input tars per shard."""
    shards_per_wave: int = 256
    """Shards written per Ray Data execution (one graph over all their inputs: with one tar a
    shard, hundreds of tars a wave); each wave appends one commit to the manifest."""
    epochs: int = 1
    """Augmented copies (epochs 0..N-1) written per image, each with its own crop and mask."""
    limit: int | None = None
    """Only the first N inputs (files or tars) after sorting; for trials."""

    def __post_init__(self) -> None:
        check(self.images_per_shard > 0, "shards.images_per_shard", "must be positive")
        check(self.tars_per_shard > 0, "shards.tars_per_shard", "must be positive")
        check(self.shards_per_wave > 0, "shards.shards_per_wave", "must be positive")
        check(self.epochs > 0, "shards.epochs", "must be positive")


@dataclass
class TokenizeConfig:
    """jobs/tokenize_shards.py: materialize masked-patch rows as parquet shards with a manifest."""

    input: str = ""
    """Source URI (same as data.source; this wins when set)."""
    output: str = ""
    """Output URI for shards, manifest.json, classes.json and errors/."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data pipeline."""
    shards: ShardConfig = field(default_factory=ShardConfig)
    """Sharding and resume."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray connection."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object store."""

    def __post_init__(self) -> None:
        check(bool(self.input or self.data.source), "input", "give --input URI (or data.source)")
        check(bool(self.output), "output", "give --output URI")
        self.data.check_masked_patches()


@dataclass
class CodebookConfig:
    """Codebook tokenizer fitting."""

    vocab_size: int = 8192
    """Codes in the codebook."""
    sample_images: int = 20000
    """Images sampled from the source."""
    patches_per_image: int = 16
    """Random patches kept per sampled image."""
    iterations: int = 20
    """k-means (Lloyd) iterations."""

    def __post_init__(self) -> None:
        check(self.vocab_size >= 2, "codebook.vocab_size", "must be ≥ 2")
        check(self.sample_images > 0, "codebook.sample_images", "must be positive")
        check(self.patches_per_image > 0, "codebook.patches_per_image", "must be positive")
        check(self.iterations > 0, "codebook.iterations", "must be positive")


@dataclass
class FitTokenizerConfig:
    """jobs/fit_tokenizer.py: fit the codebook tokenizer to a sample of the user's images."""

    input: str = ""
    """Source URI (same as data.source; this wins when set)."""
    output: str = ""
    """Where the codebook safetensors is written (a file URI ending in .safetensors)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(tokenizer="none"))
    """Data pipeline (crops as in pretraining; the tokenizer view feeds the features)."""
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    """k-means settings."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray connection."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object store."""

    def __post_init__(self) -> None:
        check(bool(self.input or self.data.source), "input", "give --input URI (or data.source)")
        check(self.output.endswith(".safetensors"), "output", "must end with .safetensors")
        self.data.check_masked_patches()
