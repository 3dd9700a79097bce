"""A job's resolved plan in a few lines, printed before any Ray work (and alone by ``--dry-run``).

    for line in plan.pretrain(cfg, demo=True): console.show(line)

One function per job config type. Each reads only what it names, through ``getattr`` with a
default, so configs can grow fields without breaking the plan. Nothing here starts Ray or
lists an object store: a remote input reads "listing in the cluster".
"""

from __future__ import annotations

import os
from typing import Any

from beit_ray import storage
from beit_ray.runtime import training_outputs

MAX_LISTED = 200_000
"""A local input is counted up to this many files (beyond, the plan says "more than")."""


def _get(obj: Any, dotted: str, default: Any = None) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return default
    return obj


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def describe_input(
    source: str | None, layout: str = "auto", demo: bool = False
) -> tuple[str, int | None]:
    """(one line about the input, images found or None) without reading any image."""
    if not source:
        return "none given", None
    if storage.is_remote(source):
        return f"{source} ({layout}; listing in the cluster)", None
    path = storage.strip_scheme(source)
    if not os.path.exists(path):
        if demo:
            return f"{source} (the demo images: made from scikit-image's photos first)", None
        return f"{source} (not found here; listing in the cluster)", None
    if os.path.isfile(path):
        return f"{source} ({layout}, one file)", None
    from beit_ray.data.containers import is_image, is_tar
    from beit_ray.data.walk import iter_local

    images = tars = parquets = other = 0
    folders: set[str] = set()
    for n, (f, _) in enumerate(iter_local(path)):  # the jobs' own walk (hidden names skipped)
        if n >= MAX_LISTED:
            return f"{source} ({layout}; more than {MAX_LISTED} files)", None
        if is_image(f):
            images += 1
            folders.add(os.path.dirname(f))
        elif is_tar(f):
            tars += 1
        elif f.lower().endswith(".parquet"):
            parquets += 1
        else:
            other += 1
    found = [
        f"{images} images in {len(folders)} folders" if images else "",
        f"{tars} tars" if tars else "",
        f"{parquets} parquet files" if parquets else "",
    ]
    what = ", ".join(x for x in found if x) or "no images found"
    return f"{source} ({layout}: {what})", (images or None)


def model_params(flavour: str, task: str, num_labels: int = 1000, vocab: int | None = None) -> int:
    """Parameters of a flavour for a task, from its shape (within ~1% of the built model)."""
    from beit_ray.models.flavours import get_flavour

    f = get_flavour(flavour)
    d, m, n = f.hidden_size, f.mlp, f.depth
    grid = f.image_size // f.patch_size
    block = 4 * d * d + 3 * d + 2 * d * m + m + d + 4 * d
    if f.family == "beit":
        block += 2 * d + ((2 * grid - 1) ** 2 + 3) * f.heads  # layer scale, rel-pos table
    embed = 3 * f.patch_size**2 * d + d + 2 * d
    head = {
        "mim": 2 * d + d * (vocab or f.vocab_size) + (vocab or f.vocab_size),
        "classification": 2 * d + d * num_labels + num_labels,
    }.get(task, 2 * d)
    return n * block + embed + head


def _model_line(cfg: Any, task: str, num_labels: int = 1000) -> str:
    flavour = _get(cfg, "model.flavour", "?")
    try:
        from beit_ray.models.flavours import get_flavour

        f = get_flavour(flavour)
        size = _get(cfg, "model.image_size") or f.image_size
        shape = f"{f.family.upper()}, {f.depth} blocks × {f.hidden_size}, {size} px, patch {f.patch_size}"
        params = f", ≈ {_count(model_params(flavour, task, num_labels, _get(cfg, 'model.vocab_size')))} parameters"
    except Exception:
        shape, params = "", ""
    init = _get(cfg, "model.init_from")
    return f"  model    {flavour} ({shape}{params}); {'from ' + init if init else 'random init'}"


def _cluster_line(ray_cfg: Any, asks_cpus: float, asks_gpus: float = 0.0) -> str:
    address = _get(ray_cfg, "address") or os.environ.get("RAY_ADDRESS")
    if address:
        return f"  cluster  {address} (compared with what it has once connected)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = _get(ray_cfg, "num_cpus") or cores or 1
    gpus = _local_gpus()
    verdict = (
        "enough"
        if cpus >= asks_cpus and gpus >= asks_gpus
        else "NOT enough: the run waits or fails"
    )
    return (
        f"  cluster  a local Ray with {cpus:g} logical CPUs ({cores} cores), {gpus} GPUs: {verdict}"
    )


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def cluster_check(asks_cpus: float, asks_gpus: float = 0.0) -> str:
    """After Ray is up: what the cluster has against what the job asks for."""
    import ray

    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    ok = cpus >= asks_cpus and gpus >= asks_gpus
    return (
        f"cluster has {cpus:g} CPUs, {gpus:g} GPUs; the job asks {asks_cpus:g} CPUs"
        + (f", {asks_gpus:g} GPUs" if asks_gpus else "")
        + ("" if ok else "  (NOT enough: it waits for an autoscaler or fails)")
    )


def _storage_lines(ray_cfg: Any, uris: dict[str, str | None], st: Any) -> list[str]:
    """Joining a cluster: the outputs a multi-node cluster refuses, said before starting Ray (the
    job checks them again once connected, where it knows how many nodes there are)."""
    if not (_get(ray_cfg, "address") or os.environ.get("RAY_ADDRESS")):
        return []
    from beit_ray.runtime import unshared_outputs

    bad = unshared_outputs(uris, st)
    if not bad:
        return ["  storage  every output on storage all nodes read (s3:// or storage.shared_paths)"]
    return [
        f"  storage  {name} {uri} is a local path: refused on a cluster of several nodes unless "
        "it is an absolute path under storage.shared_paths (or use s3://)"
        for name, uri in bad.items()
    ]


def _outputs(cfg: Any) -> str:
    base = _get(cfg, "checkpoint.storage_path", "./runs")
    base = base if storage.is_remote(base) else os.path.abspath(base)
    run = storage.join(base, _get(cfg, "checkpoint.name", "run"))
    return f"  outputs  run {run}  (model/ in HF format, logs/, job.log)"


def train_asks(
    cfg: Any, tokenizer_actors: tuple[float, float] | None = None
) -> tuple[float, float]:
    """(CPUs, GPUs) a training run holds: workers, one read/decode CPU, tokenizer actors."""
    workers = _get(cfg, "scaling.num_workers", 1)
    gpu = bool(_get(cfg, "scaling.use_gpu", False))
    cpus = workers * _get(cfg, "scaling.cpus_per_worker", 1.0) + 1.0
    if tokenizer_actors:
        cpus += tokenizer_actors[0] * tokenizer_actors[1]
    return cpus, float(workers if gpu else 0)


def _train_lines(cfg: Any, images: int | None, share: float) -> list[str]:
    ds = _get(cfg, "deepspeed")
    micro, accum = _get(ds, "micro_batch_size", 1), _get(ds, "grad_accum_steps", 1)
    workers = _get(cfg, "scaling.num_workers", 1)
    batch = micro * accum * workers
    epochs = _get(cfg, "run.epochs", 1)
    max_steps, per_epoch = _get(cfg, "run.max_steps"), _get(cfg, "run.steps_per_epoch")
    if max_steps:
        steps = f"{max_steps} steps (run.max_steps)"
    elif per_epoch:
        steps = f"{epochs * per_epoch} steps ({epochs} × {per_epoch})"
    elif images:
        n = int(images * share) // workers // micro // accum
        steps = f"≈ {epochs * n} steps ({epochs} epoch{'s' if epochs != 1 else ''} × {n})"
    else:
        steps = f"{epochs} epoch{'s' if epochs != 1 else ''}, steps counted in the cluster"
    try:  # the resolved precision ("auto" → bf16 on GPU workers, fp32 on CPU)
        from beit_ray.train.deepspeed import precision

        prec = precision(cfg)
    except Exception:
        prec = _get(ds, "precision", "fp32")
    lr = getattr(cfg, "peak_lr", None)
    lr_text = f"peak lr {lr:.3g}" if isinstance(lr, float) else "lr ?"
    return [
        f"  train    {prec}, ZeRO-{_get(ds, 'zero_stage', 0)}, "
        f"global batch {batch} ({micro} × {accum} accum × {workers} workers), {lr_text}, {steps}",
    ]


def _asks_line(parts: list[str], cpus: float, gpus: float) -> str:
    total = f"{cpus:g} CPUs" + (f", {gpus:g} GPUs" if gpus else "")
    return f"  asks     {' + '.join(parts)} = {total}"


def pretrain(cfg: Any, demo: bool = False) -> list[str]:
    """The plan of a PretrainConfig run."""
    shards = _get(cfg, "shards")
    data = _get(cfg, "data")
    if shards:
        source, images = f"{shards} (materialized shards)", None
    else:
        source, images = describe_input(_get(data, "source"), _get(data, "layout", "auto"), demo)
    tok = _get(data, "tokenizer", "none")
    actors = None
    lo, hi = _get(data, "tokenizer_actors", (1, 1))
    if tok != "none" and not shards:
        actors = (lo, _get(data, "tokenizer_num_cpus", 1.0))
    cpus, gpus = train_asks(cfg, actors)
    tok_gpus, known_gpus = _tokenizer_device(cfg)
    workers = _get(cfg, "scaling.num_workers", 1)
    parts = [
        f"{workers} workers × {_get(cfg, 'scaling.cpus_per_worker', 1):g} CPU",
        "1 CPU read/decode",
    ]
    if actors:
        per_gpu = f" + {tok_gpus:g} GPU" if tok_gpus else ""
        parts.append(f"tokenizer actors {actors[0]}-{hi} × {actors[1]:g} CPU{per_gpu}")
        gpus += lo * tok_gpus
    weights = _get(data, "tokenizer_weights", "")
    if demo and weights and not storage.is_remote(weights) and not os.path.exists(weights):
        weights += " (fitted on the demo images first)"
    lines = [
        "plan: pretraining (masked image modelling)"
        + (" on the demo data with demo settings" if demo else ""),
        f"  input    {source}",
        _model_line(cfg, "mim")
        + (f"; tokenizer {tok} {weights}".rstrip() if tok != "none" else ""),
        _asks_line(parts, cpus, gpus),
        _cluster_line(_get(cfg, "ray"), cpus, gpus),
        *_storage_lines(_get(cfg, "ray"), training_outputs(cfg), _get(cfg, "storage")),
        *_train_lines(cfg, images, 1.0),
        *_feed_lines(cfg, tok_gpus, known_gpus),
        _outputs(cfg),
    ]
    return lines


def _tokenizer_device(cfg: Any) -> tuple[float, float | None]:
    """(GPUs per tokenizer actor, GPUs the cluster has or None) as the run will decide them
    (``runtime.tokenizer_choice``): set, or 1 GPU when training on GPUs or on a local machine
    with GPUs; a joined cluster's own GPUs are known only once connected."""
    joined = bool(_get(cfg, "ray.address") or os.environ.get("RAY_ADDRESS"))
    local = None if joined else float(_local_gpus())
    requested = _get(cfg, "data.tokenizer_num_gpus")
    if requested is not None:
        return float(requested), local
    return (1.0 if _get(cfg, "scaling.use_gpu", False) or (local or 0) > 0 else 0.0), local


def _feed_lines(cfg: Any, tok_gpus: float, known_gpus: float | None) -> list[str]:
    """Images/s the training wants, the decode CPUs and tokenizer actors that feed it, a verdict."""
    try:
        from beit_ray.feed import estimate

        return estimate(cfg, gpus=known_gpus, tokenizer_gpus=tok_gpus).lines()
    except Exception as e:  # the plan never fails on its estimate
        return [f"  feed     not estimated ({type(e).__name__}: {e})"]


def finetune(cfg: Any, demo: bool = False) -> list[str]:
    """The plan of a FinetuneConfig run (classification or segmentation)."""
    data = _get(cfg, "data")
    task = _get(cfg, "task", "classification")
    source, images = describe_input(_get(data, "source"), _get(data, "layout", "auto"), demo)
    val = _get(cfg, "val_source")
    share = 1.0 if val else 1.0 - _get(cfg, "val_fraction", 0.1)
    val_line = (
        f"  val      {describe_input(val, _get(data, 'layout', 'auto'))[0]}"
        if val
        else (f"  val      {_get(cfg, 'val_fraction', 0.1):g} of the input, split by key hash")
    )
    cpus, gpus = train_asks(cfg)
    workers = _get(cfg, "scaling.num_workers", 1)
    parts = [
        f"{workers} workers × {_get(cfg, 'scaling.cpus_per_worker', 1):g} CPU",
        "1 CPU read/decode",
    ]
    labels = _get(cfg, "num_labels") or 1000
    return [
        f"plan: {task} fine-tuning" + (" on the demo data with demo settings" if demo else ""),
        f"  input    {source}",
        val_line,
        _model_line(cfg, task, labels),
        _asks_line(parts, cpus, gpus),
        _cluster_line(_get(cfg, "ray"), cpus, gpus),
        *_storage_lines(_get(cfg, "ray"), training_outputs(cfg), _get(cfg, "storage")),
        *_train_lines(cfg, images, share),
        _outputs(cfg),
    ]


def label(cfg: Any) -> list[str]:
    """The plan of a LabelConfig run."""
    source, _ = describe_input(_get(cfg, "input"), _get(cfg, "layout", "auto"))
    a = _get(cfg, "actors")
    lo, hi = _get(a, "min_actors", 1), _get(a, "max_actors", 1)
    cpus = lo * _get(a, "num_cpus", 1.0) + _get(a, "decode_cpus", 0.25)
    gpus = lo * _get(a, "num_gpus", 0.0)
    per_gpu = f" + {_get(a, 'num_gpus', 0):g} GPU" if gpus else ""
    return [
        f"plan: labelling ({_get(cfg, 'task', '?')})",
        f"  input    {source}",
        f"  model    {_get(cfg, 'checkpoint', '?')} ({_get(cfg, 'predict.dtype', 'float32')}, "
        f"batch {_get(cfg, 'predict.batch_size', '?')})",
        _asks_line(
            [
                f"model actors {lo}-{hi} × {_get(a, 'num_cpus', 1):g} CPU{per_gpu}",
                f"decode tasks × {_get(a, 'decode_cpus', 0.25):g} CPU",
            ],
            cpus,
            gpus,
        ),
        _cluster_line(_get(cfg, "ray"), cpus, gpus),
        *_storage_lines(_get(cfg, "ray"), {"output": _get(cfg, "output")}, _get(cfg, "storage")),
        f"  outputs  {_get(cfg, 'output', '?')}  (parts/*/part-*.parquet, _SUMMARY.json, _job.log; "
        f"{_get(cfg, 'chunk_size', '?')} inputs per part)",
    ]


def serve(cfg: Any) -> list[str]:
    """The plan of a ServeConfig deployment."""
    lines = ["plan: serving over HTTP"]
    cpus = _get(cfg, "ingress_cpus", 0.5) * _get(cfg, "ingress_replicas", 1)
    gpus = 0.0
    parts = [f"ingress {_get(cfg, 'ingress_replicas', 1)} × {_get(cfg, 'ingress_cpus', 0.5):g} CPU"]
    for route, key, section in (
        ("/classify", "checkpoint", "classify"),
        ("/segment", "segment_checkpoint", "segment"),
    ):
        ckpt = _get(cfg, key)
        if not ckpt:
            continue
        r = _get(cfg, section)
        lo, hi = max(1, _get(r, "min_replicas", 1)), _get(r, "max_replicas", 1)
        cpus += lo * _get(r, "num_cpus", 1.0)
        gpus += lo * _get(r, "num_gpus", 0.0)
        parts.append(f"{section} replicas {lo}-{hi} × {_get(r, 'num_cpus', 1):g} CPU")
        lines.append(f"  model    {route} {ckpt} ({_get(r, 'dtype', 'float32')})")
    lines += [
        _asks_line(parts, cpus, gpus),
        _cluster_line(_get(cfg, "ray"), cpus, gpus),
        f"  outputs  http://{_get(cfg, 'http.host', '?')}:{_get(cfg, 'http.port', '?')} "
        f"(POST /classify, /segment; docs at /docs); batches of up to {_get(cfg, 'batching.max_batch_size', '?')}",
    ]
    return lines


def tokenize(cfg: Any) -> list[str]:
    """The plan of a TokenizeConfig run (materialized shards)."""
    data = _get(cfg, "data")
    source, _ = describe_input(
        _get(cfg, "input") or _get(data, "source"), _get(data, "layout", "auto")
    )
    lo, hi = _get(data, "tokenizer_actors", (1, 1))
    cpus = 1.0 + lo * _get(data, "tokenizer_num_cpus", 1.0)
    return [
        "plan: tokenizing into masked-patch shards",
        f"  input    {source}",
        f"  tokenizer {_get(data, 'tokenizer', '?')} {_get(data, 'tokenizer_weights') or ''}".rstrip(),
        _asks_line(
            [
                f"tokenizer actors {lo}-{hi} × {_get(data, 'tokenizer_num_cpus', 1):g} CPU",
                "1 CPU read/decode",
            ],
            cpus,
            0.0,
        ),
        _cluster_line(_get(cfg, "ray"), cpus),
        *_storage_lines(_get(cfg, "ray"), {"output": _get(cfg, "output")}, _get(cfg, "storage")),
        f"  outputs  {_get(cfg, 'output', '?')}  (shards, manifest.json; "
        f"{_get(cfg, 'shards.images_per_shard', '?')} images per shard, {_get(cfg, 'shards.epochs', 1)} epochs)",
    ]


def fit_tokenizer(cfg: Any) -> list[str]:
    """The plan of a FitTokenizerConfig run (k-means codebook)."""
    data = _get(cfg, "data")
    source, _ = describe_input(
        _get(cfg, "input") or _get(data, "source"), _get(data, "layout", "auto")
    )
    cb = _get(cfg, "codebook")
    from beit_ray.data.fit import listing_uri

    outputs = {
        "output": _get(cfg, "output"),
        "data.listing_uri": listing_uri(cfg),
        "data.errors_uri": _get(data, "errors_uri"),
    }
    return [
        "plan: fitting a codebook tokenizer (k-means over patch features)",
        f"  input    {source}",
        f"  codebook {_get(cb, 'vocab_size', '?')} codes from {_get(cb, 'sample_images', '?')} images × "
        f"{_get(cb, 'patches_per_image', '?')} patches, {_get(cb, 'iterations', '?')} iterations",
        _asks_line(["read/decode tasks"], 1.0, 0.0),
        _cluster_line(_get(cfg, "ray"), 1.0),
        *_storage_lines(_get(cfg, "ray"), outputs, _get(cfg, "storage")),
        f"  outputs  {_get(cfg, 'output', '?')}",
    ]
