"""The labelling job's typed config: what to label, with which checkpoint, on which actors.

cfg = parse_args(LabelConfig, ["--input", "s3://b/photos/", "--output", "s3://b/labels/",
                               "--checkpoint", "s3://models/beit-ft/", "--task", "classify"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from beit_ray.config import RayConfig, StorageConfig, check

InferTask = Literal["classify", "segment", "embed"]
InferDtype = Literal["float32", "bfloat16", "float16"]
"""Model dtype for labelling and serving (``torch.<name>``)."""
DtypeChoice = Literal["auto", "float32", "bfloat16", "float16"]
"""A configured model dtype: an :data:`InferDtype`, or auto (see :func:`resolve_dtype`)."""
INFER_TASKS: tuple[str, ...] = ("classify", "segment", "embed")
InputLayout = Literal["auto", "files", "class_tars", "webdataset", "parquet", "manifest"]
INPUT_LAYOUTS: tuple[str, ...] = (
    "auto",
    "files",
    "class_tars",
    "webdataset",
    "parquet",
    "manifest",
)


def resolve_dtype(dtype: str, device: str) -> InferDtype:
    """A configured dtype on ``device``: auto is bfloat16 on a GPU (tensor cores), float32 on
    CPU (equal to transformers' forward). Labelling's actors and Serve's replicas both use it."""
    if dtype != "auto":
        return dtype  # type: ignore[return-value]
    return "bfloat16" if device == "cuda" else "float32"


@dataclass
class PredictConfig:
    """What each prediction holds and how images are batched."""

    top_k: int = 5
    """Classify: how many classes (ids, labels, scores) per image."""
    embed_pool: Literal["pooled", "mean"] = "pooled"
    """Embed: the model's pooled output, or the mean of the last layer's patch tokens."""
    batch_size: int = 16
    """Images per forward pass in each actor."""
    max_pixels: int = 50_000_000
    """Images with more pixels than this become error rows (decompression bombs, huge scans)."""
    dtype: DtypeChoice = "auto"
    """Model weights and activations. auto: bfloat16 on actors with a GPU (actors.num_gpus > 0),
    else float32. float32 equals transformers' forward (scores within 1e-4); bfloat16 is ~5x
    faster on CPUs with AMX (Intel Sapphire Rapids and later) and fast on recent GPUs, with
    scores within ~1e-2; float16 is for GPUs."""

    def __post_init__(self) -> None:
        check(self.top_k >= 1, "predict.top_k", "must be >= 1")
        check(self.batch_size >= 1, "predict.batch_size", "must be >= 1")
        check(self.max_pixels >= 1, "predict.max_pixels", "must be >= 1")


@dataclass
class ActorsConfig:
    """The actor pool that holds the model (loaded once per actor)."""

    min_actors: int = 1
    """Smallest pool size; Ray Data grows the pool up to max_actors while work is queued."""
    max_actors: int = 2
    """Largest pool size."""
    num_cpus: float = 1.0
    """Logical CPUs each actor holds. Keep some CPUs free for read/decode tasks: Ray Data
    waits forever (no error) when actors hold every CPU; fractions such as 0.5 are fine."""
    num_gpus: float = 0.0
    """GPUs per actor (fractions share one GPU between actors); 0 runs on CPU."""
    threads: int | None = None
    """torch CPU threads per actor; unset: the actor's CPUs rounded up (at least 1)."""
    decode_cpus: float = 0.25
    """Logical CPUs each read/decode/preprocess task holds."""
    fail_at_chunk: int | None = None
    """Fault drill: the model actor given this chunk exits hard once, before writing it (a
    marker under the output's _debug/ makes it once); Ray restarts it and retries the chunk."""

    def __post_init__(self) -> None:
        check(self.min_actors >= 1, "actors.min_actors", "must be >= 1")
        check(
            self.max_actors >= self.min_actors, "actors.max_actors", "must be >= actors.min_actors"
        )
        check(self.num_cpus > 0, "actors.num_cpus", "must be positive")
        check(self.num_gpus >= 0, "actors.num_gpus", "must be >= 0")
        check(self.threads is None or self.threads >= 1, "actors.threads", "must be >= 1")
        check(self.decode_cpus > 0, "actors.decode_cpus", "must be positive")


@dataclass
class LabelConfig:
    """Label every image under --input with --checkpoint; parquet (+ masks) under --output.

    One row per input image (a loose file, a tar member, a parquet row; see ``layout`` for what
    ``path`` holds): ``path``, ``error`` (null when fine) and the task's columns. A rerun of the
    same command after an interruption skips finished chunks and writes the rest.
    """

    input: str = ""
    """Images: a folder or prefix (local or s3://), one tar/parquet file, or a .parquet/.csv
    manifest of image URIs; what is inside is read as ``layout`` says."""
    layout: InputLayout = "auto"
    """files: every file below input (class folders fine), path = its URI. class_tars (per-class
    tars of images, e.g. ImageNet-22k) and webdataset (<key>.jpg + .cls/.json): every image
    member of every tar below input, path = "<tar uri>/<member>"; a tar that cannot be listed
    gives one error row with path = "<tar uri>". parquet: every row of every .parquet's
    image_column, path = "<parquet uri>#<row index>" (a bad file: one row, path = its URI).
    manifest: the URIs in a .parquet/.csv. auto: detected as the data pipeline does (parquet,
    then tars: .cls/.json members → webdataset), refusing folders that mix kinds. In container
    layouts, other files (e.g. classes.json) are not inputs."""
    image_column: str = "image"
    """parquet layout: the column of encoded image bytes."""
    output: str = ""
    """Where results go (local or s3://): parts/<k>/part-<chunk>.parquet, _masks/, _SUMMARY.json."""
    checkpoint: str = ""
    """An HF-format folder (e.g. a copy of microsoft/beit-base-patch16-224) or a beit-ray run
    output, local or s3://."""
    task: InferTask = "classify"
    """classify (top-k classes), segment (class-id PNG + pixel counts) or embed (a vector)."""
    manifest_column: str = "uri"
    """Manifest input: the column holding image URIs (falls back to "path" when absent)."""
    chunk_size: int = 256
    """Inputs per output file. Chunks are the unit of resumption: a rerun skips written ones."""
    relist: bool = False
    """List the input again instead of reusing the listing a first run saved (``_LISTING/``):
    objects added since become new work (and removed ones keep their rows)."""
    predict: PredictConfig = field(default_factory=PredictConfig)
    """Prediction settings."""
    actors: ActorsConfig = field(default_factory=ActorsConfig)
    """The model actor pool."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray connection."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-store credentials and endpoint (default: the AWS_* environment)."""

    def __post_init__(self) -> None:
        check(
            self.task in INFER_TASKS,
            "task",
            f"{self.task!r} is not one of {', '.join(INFER_TASKS)}",
        )
        check(self.chunk_size >= 1, "chunk_size", "must be >= 1")
        check(
            self.layout in INPUT_LAYOUTS,
            "layout",
            f"{self.layout!r} is not one of {', '.join(INPUT_LAYOUTS)}",
        )
        check(
            self.layout != "manifest"
            or not self.input
            or self.input.lower().endswith((".parquet", ".csv")),
            "layout",
            "manifest needs --input to be a .parquet or .csv file",
        )
        check(bool(self.image_column), "image_column", "must not be empty")
        check(
            not self.input or self.input.rstrip("/") != self.output.rstrip("/"),
            "output",
            "must differ from input (outputs would be relabelled on a rerun)",
        )

    def require(self) -> None:
        """The fields a run needs (kept out of __post_init__ so ``--help`` can build defaults)."""
        check(bool(self.input), "input", "is required (a folder, prefix or manifest of images)")
        check(bool(self.output), "output", "is required (a folder or s3:// prefix)")
        check(bool(self.checkpoint), "checkpoint", "is required (an HF folder or a beit-ray run)")
