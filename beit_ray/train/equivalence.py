"""One training step, identical under every ZeRO stage, accumulation and worker count.

The same fixed batches go through the job's own step (:func:`beit_ray.train.loop.build_engine`
and :func:`~beit_ray.train.loop.micro_step`: ``engine(...)``, ``engine.backward``,
``engine.step``) and through a plain single-process torch loop over the same micro-batches (loss /
micro-batches, backward, clip, AdamW on the same layer-decay groups). Each cell reports the
largest difference of its initial weights from the loop's (0 when the init is stage-independent)
and of its weights after :data:`STEPS` optimizer steps.

Ranks are gloo processes spawned by ``torch.multiprocessing`` (no Ray); one group runs many cells,
as process start and DeepSpeed's import cost seconds each::

    cells = [Cell("mim", zero, accum, "scratch") for zero in range(4) for accum in (1, 2)]
    rows = run_group(cells, world=2, workdir="/tmp/eq")   # one dict per cell

The global batch is fixed (:data:`GLOBAL_BATCH` images a step), so the micro-batch is
GLOBAL_BATCH / (accumulation x workers) and every cell trains on the same images.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

import torch

STEPS = 3
GLOBAL_BATCH = 8
TOLERANCE = 5e-3
"""Largest max|w - w_ref| / max(max|w_ref|, 0.02) a cell may show after STEPS steps (lr 1e-3).
fp32 sums in another order (micro-batches grouped into ranks, partitioned reductions,
transformers' encoder under ZeRO-3 instead of the fused one) move gradients by ~1e-7 relative;
Adam divides each gradient by its own RMS, so a parameter whose true gradient is zero moves by
its rounding noise (UperNet's conv biases ahead of BatchNorm, the last block's position table):
worst seen 1.3e-3 on CPU. The bugs this is for differ by far more: the MIM step around the
engine under ZeRO-3 with accumulation (the :attr:`Cell.bypass` control), a stage-dependent
init."""
NUM_LABELS = 5
TASKS = ("mim", "classification", "segmentation")


@dataclass(frozen=True)
class Cell:
    """One configuration of the matrix."""

    task: str
    """mim, classification or segmentation."""
    zero: int
    """ZeRO stage 0-3."""
    accum: int
    """Gradient accumulation steps."""
    source: str = "scratch"
    """scratch (a new model from the seed) or checkpoint (``init_from`` the group's MIM export)."""
    bypass: bool = False
    """A control: MIM's forward calls the model's parts around ``engine(...)``, as the step did
    before (under ZeRO-3 with accumulation it then trains on the last micro-batch only). The
    harness must tell this cell apart."""


def cell_config(
    cell: Cell, world: int, init_from: str | None, workdir: str, use_gpu: bool = False
) -> Any:
    """The job config of a cell: tiny debug flavour, fp32, no randomness besides the seed."""
    from beit_ray.config import build
    from beit_ray.train.config import FinetuneConfig, PretrainConfig

    micro = GLOBAL_BATCH // (cell.accum * world)
    raw: dict[str, Any] = {
        "model": {
            "flavour": "debug",
            "drop_path": 0.0,  # drop path draws from the global RNG, per rank
            "init_from": init_from if cell.source == "checkpoint" else None,
        },
        "deepspeed": {
            "micro_batch_size": micro,
            "grad_accum_steps": cell.accum,
            "zero_stage": cell.zero,
            "precision": "fp32",
        },
        "scaling": {"num_workers": world, "use_gpu": use_gpu},
        # clip_grad 0.5 is active here, so the global norm over partitions is checked too
        "optim": {"lr": 1e-3, "warmup_steps": 1, "clip_grad": 0.5, "optimizer": "adamw"},
        "run": {"max_steps": STEPS, "seed": 3},
        "checkpoint": {"storage_path": workdir, "name": "eq"},
    }
    if cell.task == "mim":
        raw["data"] = {"source": "unused", "tokenizer": "none"}
        return build(PretrainConfig, raw)
    raw["optim"].update(mixup=0.0, cutmix=0.0, reprob=0.0)  # per-rank draws otherwise
    raw.update(task=cell.task, data={"source": "unused"}, num_labels=NUM_LABELS)
    return build(FinetuneConfig, raw)


def extra_of(cell: Cell) -> dict[str, Any]:
    return {} if cell.task == "mim" else {"id2label": {i: f"c{i}" for i in range(NUM_LABELS)}}


def make_batches(cfg: Any, task: str, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """:data:`STEPS` global batches of :data:`GLOBAL_BATCH` rows, as the data pipeline gives."""
    g = torch.Generator().manual_seed(seed)
    n, size = GLOBAL_BATCH, 32
    out = []
    for _ in range(STEPS):
        b = {"pixel_values": torch.randint(0, 256, (n, 3, size, size), generator=g).byte()}
        if task == "mim":
            k, patches = cfg.data.masking_patches, 16
            # Half the images get the full count, half two fewer (the block generator may
            # fall short): the fixed-size gather pads those.
            counts = [k if i % 2 == 0 else k - 2 for i in range(n)]
            mask = torch.zeros(n, patches, dtype=torch.bool)
            for i, c in enumerate(counts):
                mask[i, torch.randperm(patches, generator=g)[:c]] = True
            b["bool_masked_pos"] = mask
            b["visual_token_ids"] = torch.randint(0, 256, (n, patches), generator=g)
        elif task == "classification":
            b["label"] = torch.randint(0, NUM_LABELS, (n,), generator=g)
        else:
            labels = torch.randint(0, NUM_LABELS, (n, size, size), generator=g)
            labels[torch.rand(n, size, size, generator=g) < 0.1] = 255  # ignored pixels
            b["labels"] = labels.byte()
            b["valid_hw"] = torch.tensor([[size, size], [24, 32]] * (n // 2), dtype=torch.int32)
        out.append(b)
    return out


def micro_batch(batch: dict[str, torch.Tensor], rank: int, accum_i: int, cell: Cell, world: int):
    """Rank ``rank``'s ``accum_i``-th micro-batch of a global batch."""
    micro = GLOBAL_BATCH // (cell.accum * world)
    start = (rank * cell.accum + accum_i) * micro
    return {k: v[start : start + micro] for k, v in batch.items()}


def whole_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, whole, on the CPU (a collective under ZeRO-3: all ranks call it)."""
    import deepspeed

    params = list(model.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
        return {n: p.detach().float().cpu().clone() for n, p in params}


def reference(
    cell: Cell, cfg: Any, world: int, batches: list, device: str = "cpu"
) -> tuple[dict, dict, list[float]]:
    """(initial, final) weights of a plain torch loop over the same micro-batches, and each
    step's gradient norm before clipping."""
    from beit_ray.models.layer_decay import param_groups
    from beit_ray.train.deepspeed import build_optimizer
    from beit_ray.train.loop import seed_micro_step, set_lr
    from beit_ray.train.schedule import lr_at
    from beit_ray.train.tasks import make_task

    task = make_task(cfg, extra_of(cell))
    with torch.random.fork_rng():
        torch.manual_seed(cfg.run.seed)
        model = task.build(None)
    model.to(device).train()
    init = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    groups = param_groups(
        model, lr=cfg.peak_lr, weight_decay=cfg.optim.weight_decay, layer_decay=task.layer_decay()
    )
    opt = build_optimizer(groups, cfg)
    micros = world * cell.accum
    norms = []
    for step, batch in enumerate(batches):
        set_lr(SimpleNamespace(optimizer=opt), lr_at(step, STEPS, cfg))
        opt.zero_grad(set_to_none=True)
        for rank in range(world):
            for a in range(cell.accum):
                gen = seed_micro_step(cfg.run.seed, step, rank, a)
                loss, _ = task.loss(model, micro_batch(batch, rank, a, cell, world), gen)
                (loss / micros).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms.append(torch.nn.utils.get_total_norm(grads).item())  # before clipping
        if cfg.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        opt.step()
    return init, {n: p.detach().cpu().clone() for n, p in model.named_parameters()}, norms


SCALE_FLOOR = 0.02
"""Weights' init std: a tensor that starts at zero (biases, position tables) and has moved only
a little is measured against a weight's scale, not its own few-step size."""


def rel_diffs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """max|a - b| / max(max|b|, SCALE_FLOOR) per tensor (the names must match)."""
    if a.keys() != b.keys():
        raise KeyError(f"parameter names differ: {sorted(set(a) ^ set(b))[:6]}")
    out = {}
    for n in b:
        scale = max(b[n].abs().max().item(), SCALE_FLOOR)
        out[n] = (a[n] - b[n]).abs().max().item() / scale
    return out


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest of :func:`rel_diffs`."""
    return max(rel_diffs(a, b).values())


class _Bypass:
    """The engine, except that a call runs MIM's parts directly (see :attr:`Cell.bypass`)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def __call__(self, **kw: Any) -> Any:
        from beit_ray.models.mim import mim_forward

        return mim_forward(
            self.engine.module,
            kw["pixel_values"],
            kw["bool_masked_pos"],
            kw["token_ids"],
            kw["num_masked"],
        )


_REFERENCES: dict[tuple, tuple[dict, dict, list[float]]] = {}
"""The plain loop's weights per (task, source, micro-batches a step): the same for every stage."""


def run_cell(
    cell: Cell,
    rank: int,
    world: int,
    init_from: str | None,
    workdir: str,
    use_gpu: bool = False,
) -> dict:
    """Train one cell through the job's step; rank 0 returns its row (others: {}).

    ``use_gpu``: the engine and the plain loop on this process's GPU, in full fp32 (TF32 off)."""
    from beit_ray.train.loop import build_engine, grad_norm, micro_step
    from beit_ray.train.schedule import lr_at
    from beit_ray.train.tasks import make_task

    t0 = time.perf_counter()
    cfg = cell_config(cell, world, init_from, workdir, use_gpu)
    task = make_task(cfg, extra_of(cell))
    engine = build_engine(cfg, task)
    if use_gpu:  # build_engine turned TF32 on; the comparison is of fp32 arithmetic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    init = whole_params(engine.module)
    batches = make_batches(cfg, cell.task)
    stepped = _Bypass(engine) if cell.bypass else engine
    norms = []  # what the job logs as grad_norm: DeepSpeed's (ZeRO 1-3) or micro_step's (0)
    for step, batch in enumerate(batches):
        for a in range(cell.accum):
            mb = micro_batch(batch, rank, a, cell, world)
            metrics = micro_step(stepped, task, mb, lr_at(step, STEPS, cfg), step, rank, True)
        norms.append(grad_norm(engine, metrics.get("grad_norm")))
    final = whole_params(engine.module)
    row: dict[str, Any] = {}
    # ZeRO-3 records the order it fetches parameters in (what its prefetch replays) in hooks
    # that run only when the engine itself is called.
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    traced = offload.get_param_coordinator().is_complete_trace() if offload else None
    if rank == 0:
        key = (cell.task, cell.source, world * cell.accum, use_gpu)  # the same for every stage
        if key not in _REFERENCES:
            _REFERENCES[key] = reference(cell, cfg, world, batches, str(engine.device))
        ref_init, ref_final, ref_norms = _REFERENCES[key]
        diffs = rel_diffs(final, ref_final)
        worst = max(diffs, key=diffs.get)
        row = {
            **asdict(cell),
            "world": world,
            "init_diff": max_rel_diff(init, ref_init),
            "rel_diff": diffs[worst],
            "worst": worst,
            # how far the loop moved the weights: a step that did nothing would differ by this
            "moved": max_rel_diff(ref_init, ref_final),
            # the logged gradient norm against the loop's, per step
            "norm_diff": max(abs(a - b) / b for a, b in zip(norms, ref_norms, strict=True)),
            "zero3_trace": traced,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    del engine
    gc.collect()
    return row


def _group_main(
    rank: int, world: int, port: int, cells: list[Cell], init_from: str | None, workdir: str
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    import importlib

    import deepspeed

    # DeepSpeed's shared-memory all-reduce serves only its inference path; training reduces
    # through torch.distributed. Not loading it saves each rank a second, a minute unbuilt, and
    # a wait on its build lock. (Not `import deepspeed.comm.torch as m`: deepspeed.comm's star
    # import makes that name the real torch module.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    rows = [run_cell(c, rank, world, init_from, workdir) for c in cells]
    if rank == 0:
        with open(os.path.join(workdir, f"rows_world{world}.json"), "w") as f:
            json.dump(rows, f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(
    cells: list[Cell], world: int, workdir: str, init_from: str | None = None
) -> list[dict]:
    """Run ``cells`` in one group of ``world`` spawned gloo ranks; one row per cell."""
    import torch.multiprocessing as mp

    os.makedirs(workdir, exist_ok=True)
    mp.spawn(
        _group_main,
        args=(world, free_port(), cells, init_from, workdir),
        nprocs=world,
        join=True,
    )
    with open(os.path.join(workdir, f"rows_world{world}.json")) as f:
        return json.load(f)


def write_checkpoint(folder: str, seed: int = 11) -> str:
    """An HF export of a new debug MIM model with non-trivial weights: the "checkpoint" cells'
    ``init_from`` (fine-tuning starts from it as from a pretraining run)."""
    from beit_ray.models.build import build_model
    from beit_ray.models.load import export_hf

    model = build_model("debug", "mim", seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # off the init: zero biases, layer scale and tables all matter
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    export_hf(model, folder)
    return folder


def table(rows: list[dict]) -> str:
    """The matrix as a Markdown table: max relative parameter difference after STEPS steps."""
    head = "| task | source | workers | accum | ZeRO-0 | ZeRO-1 | ZeRO-2 | ZeRO-3 |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    rows = [r for r in rows if not r.get("bypass")]
    keys = sorted({(r["task"], r["source"], r["world"], r["accum"]) for r in rows})
    by = {(r["task"], r["source"], r["world"], r["accum"], r["zero"]): r for r in rows}
    for k in keys:
        cells = [by.get((*k, z)) for z in range(4)]
        vals = [f"{c['rel_diff']:.1e}" if c else "-" for c in cells]
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
