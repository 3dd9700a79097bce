"""One batch predictor (classify | segment | embed), shared by labelling and serving.

Both paths call the same two halves, so they give the same answer for the same image and
checkpoint: :meth:`Predictor.prepare` (uint8 HxWx3 → resized uint8 [3, H, W], from the
checkpoint's preprocessor config; cheap to ship between processes) and
:meth:`Predictor.forward` (normalize, run the model under ``torch.inference_mode``, post-process).

    p = Predictor("s3://models/beit-ft/", "classify", top_k=5)
    p.predict([image])  # [{"top_ids": [...], "top_labels": [...], "top_scores": [...]}]
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from beit_ray.config import StorageConfig
from beit_ray.infer.config import InferDtype

PredictTask = Literal["classify", "segment", "embed"]
# Our inference task names → the model layer's.
MODEL_TASKS: dict[str, str] = {
    "classify": "classification",
    "segment": "segmentation",
    "embed": "features",
}
# Upsampling [C, H, W] float logits at once above this many elements would take GBs (ADE's 150
# classes on a 12 MP photo: 7 GB); larger maps are upsampled in row bands.
UPSAMPLE_BUDGET = 1 << 26


def load_checkpoint(
    uri: str, task: PredictTask, storage: StorageConfig | None
) -> tuple[torch.nn.Module, Any]:
    """(model, preprocessor) of a checkpoint for ``task``; refuses to invent a missing head."""
    from beit_ray.models.load import load_model, model_dir
    from beit_ray.models.preprocess import Preprocessor

    folder = model_dir(uri, storage)
    preprocessor = Preprocessor.from_pretrained(folder, storage)
    model = load_model(folder, task=MODEL_TASKS[task], storage=storage)  # type: ignore[arg-type]
    new = model.beit_ray_load_report["newly_initialised"]  # type: ignore[index]
    if new:
        source = model.beit_ray_load_report["source_task"]  # type: ignore[index]
        raise ValueError(
            f"{uri} is a {source} checkpoint: it has no trained weights for {task} ({', '.join(new[:3])}...)"
        )
    return model, preprocessor


def ray_device(gpu_ids: list[Any]) -> str:
    """A Ray actor's device: cuda only when Ray assigned it GPUs (``ray.get_gpu_ids()``).

    A GPU that is merely visible belongs to whichever actor reserved it; computing there too
    would compete with that actor (or fail for memory).
    """
    return "cuda" if gpu_ids and torch.cuda.is_available() else "cpu"


def default_device() -> torch.device:
    """cuda when one is visible, except inside a Ray worker that reserved no GPU."""
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            return torch.device(ray_device(ray.get_gpu_ids()))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Predictor:
    """Loads a checkpoint once; predicts on batches of RGB uint8 images."""

    def __init__(
        self,
        checkpoint_uri: str,
        task: PredictTask,
        storage: StorageConfig | None = None,
        top_k: int = 5,
        embed_pool: Literal["pooled", "mean"] = "pooled",
        device: str | torch.device | None = None,
        threads: int | None = None,
        dtype: InferDtype = "float32",
    ) -> None:
        if task not in MODEL_TASKS:
            raise ValueError(f"task {task!r} is not one of {', '.join(MODEL_TASKS)}")
        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        self.checkpoint_uri = checkpoint_uri
        self.task = task
        self.top_k = top_k
        self.embed_pool = embed_pool
        self.device = torch.device(device) if device not in (None, "auto") else default_device()
        # float32 reproduces transformers to 1e-4; bfloat16 runs the matmuls on AMX / tensor
        # cores (BEiT-base, 2 Sapphire Rapids cores: ~5x images/s), scores within ~1e-2.
        self.dtype = {
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }[dtype]
        model, self.preprocessor = load_checkpoint(checkpoint_uri, task, storage)
        self.model = model.eval().to(self.device, self.dtype)
        config = self.model.config
        self.id2label: dict[int, str] = {int(k): str(v) for k, v in (config.id2label or {}).items()}
        self.num_labels = len(self.id2label)
        self.multi_label = getattr(config, "problem_type", None) == "multi_label_classification"

    # ------------------------------------------------------------------ halves
    def prepare(self, image: np.ndarray) -> np.ndarray:
        """RGB uint8 [H, W, 3] → resized uint8 [3, h, w] model input (not yet normalized)."""
        return self.preprocessor.to_uint8(image)

    @torch.inference_mode()
    def forward(
        self,
        pixels: torch.Tensor | np.ndarray,
        sizes: list[tuple[int, int]],
        top_k: int | None = None,
    ) -> list[dict[str, Any]]:
        """uint8 [B, 3, h, w] from :meth:`prepare` and each image's original (H, W) → results.

        segment also takes a list of [3, h, w] of different sizes (a keep-ratio preprocessor)."""
        if self.task == "segment":
            return self._segment(self._segment_logits(pixels), sizes)
        pixels = torch.as_tensor(pixels).to(self.device)
        x = self.preprocessor.normalize(pixels).to(self.dtype)  # [B, 3, h, w]
        if self.task == "classify":
            return self._classify(self.model(pixel_values=x).logits, top_k or self.top_k)
        if self.task == "embed":
            return self._embed(self.model(pixel_values=x))
        raise AssertionError(self.task)

    def forward_prepared(
        self,
        prepared: list[np.ndarray],
        sizes: list[tuple[int, int]],
        top_k: int | None = None,
    ) -> list[dict[str, Any]]:
        """Prepared uint8 [3, h, w] images of any sizes → results in their order: one
        :meth:`forward` per group of one shape (a keep-ratio preprocessor's images differ)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prepared):
            groups.setdefault(tuple(p.shape), []).append(i)
        results: list[dict[str, Any]] = [{} for _ in prepared]
        for idx in groups.values():
            pixels = np.stack([prepared[i] for i in idx])  # [b, 3, h, w] uint8
            out = self.forward(pixels, [sizes[i] for i in idx], top_k)
            for i, res in zip(idx, out, strict=True):
                results[i] = res
        return results

    def predict(self, images: list[np.ndarray], top_k: int | None = None) -> list[dict[str, Any]]:
        """RGB uint8 [H, W, 3] images → one result dict per image (see the task methods)."""
        if not images:
            return []
        prepared = [self.prepare(img) for img in images]  # [3, h, w] uint8 each
        return self.forward_prepared(prepared, [img.shape[:2] for img in images], top_k)

    # ------------------------------------------------------------------ tasks
    def _classify(self, logits: torch.Tensor, top_k: int) -> list[dict[str, Any]]:
        """{top_ids int64[k], top_labels [k], top_scores float32[k]} per image."""
        logits = logits.float()  # [B, C]
        probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        k = min(top_k, probs.shape[-1])
        scores, ids = probs.topk(k, dim=-1)  # [B, k]
        scores, ids = scores.cpu().numpy().astype(np.float32), ids.cpu().numpy().astype(np.int64)
        return [
            {
                "top_ids": i,
                "top_labels": [self.id2label.get(int(c), str(int(c))) for c in i],
                "top_scores": s,
            }
            for i, s in zip(ids, scores, strict=True)
        ]

    def _embed(self, out: Any) -> list[dict[str, Any]]:
        """{embedding float32[D]}: the pooled output, or the mean of the patch tokens."""
        hidden = out.last_hidden_state  # [B, 1 + N, D]
        if self.embed_pool == "mean":
            emb = hidden[:, 1:].mean(dim=1)
        else:
            pooled = getattr(out, "pooler_output", None)
            emb = pooled if pooled is not None else hidden[:, 0]  # no pooler: the CLS token
        emb = emb.float().cpu().numpy()  # [B, D]
        return [{"embedding": e} for e in emb]

    def _segment_logits(self, pixels: Any) -> list[torch.Tensor]:
        """[C, h', w'] logits per prepared image: one forward when a square-resize
        preprocessor makes every image one model window (transformers' way for
        microsoft/beit-*-finetuned-ade-*), else mmseg's slide test with that window over the
        whole prepared image. A keep-ratio preprocessor (size {shortest_edge, longest_edge}: the
        training scale, as a run exports) always slides, also for an image that comes out at
        exactly one window, so the logits are the run's eval's (``segment_logits``)."""
        from beit_ray.data.segmentation import slide_logits

        window = int(self.model.config.image_size)
        batch = isinstance(pixels, torch.Tensor) or (
            isinstance(pixels, np.ndarray) and pixels.dtype != object
        )
        groups = (
            [torch.as_tensor(pixels)]
            if batch
            else [torch.as_tensor(np.asarray(p))[None] for p in pixels]  # sizes differ
        )  # each [b, 3, h, w] uint8

        def run(v: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values=v).logits

        out: list[torch.Tensor] = []
        for g in groups:
            x = self.preprocessor.normalize(g.to(self.device)).to(self.dtype)  # [b, 3, h, w]
            if self.preprocessor.fixed_size and tuple(x.shape[-2:]) == (window, window):
                out.extend(run(x).float())
            else:
                out.extend(slide_logits(run, x, window, int(self.model.config.num_labels)))
        return out

    def _segment(
        self, logits: list[torch.Tensor] | torch.Tensor, sizes: list[tuple[int, int]]
    ) -> list[dict[str, Any]]:
        """{mask [H, W] class ids at the original size, class_ids, pixel_counts} per image.

        As transformers' post_process_semantic_segmentation and mmseg's slide test: bilinear
        upsampling of the logits to the original size (align_corners=False), then argmax.
        """
        dtype = np.uint8 if logits[0].shape[0] <= 256 else np.uint16
        results = []
        for lg, (h, w) in zip(logits, sizes, strict=True):  # lg: [C, h', w']
            mask = upsample_argmax(lg.float(), int(h), int(w)).astype(dtype)
            counts = np.bincount(mask.ravel(), minlength=1)
            present = np.flatnonzero(counts)
            results.append(
                {
                    "mask": mask,
                    "class_ids": present.astype(np.int64),
                    "pixel_counts": counts[present].astype(np.int64),
                }
            )
        return results


def upsample_argmax(logits: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Bilinear (align_corners=False) upsampling of [C, h, w] logits to (height, width), argmax."""
    c, h, w = logits.shape
    if c * height * width <= UPSAMPLE_BUDGET:
        up = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)
        return up[0].argmax(dim=0).cpu().numpy()
    # Separable interpolation in row bands: the same weights as F.interpolate, bounded memory.
    ay = _interp_matrix(h, height, logits.device)  # [H, h]
    ax = _interp_matrix(w, width, logits.device)  # [W, w]
    cols = torch.einsum("chw,Ww->chW", logits, ax)  # [C, h, W]
    band = max(1, UPSAMPLE_BUDGET // (c * width))
    out = np.empty((height, width), dtype=np.int64)
    for r0 in range(0, height, band):
        rows = torch.einsum("Hh,chW->cHW", ay[r0 : r0 + band], cols)  # [C, band, W]
        out[r0 : r0 + band] = rows.argmax(dim=0).cpu().numpy()
    return out


def _interp_matrix(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """[n_out, n_in] weights of 1-D linear interpolation with PyTorch's align_corners=False."""
    scale = n_in / n_out
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    l1 = src - i0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), i0] += 1 - l1
    m[torch.arange(n_out), i1] += l1
    return m.to(device=device, dtype=torch.float32)


def actor_threads(num_cpus: float | None) -> int:
    """torch threads for a process holding ``num_cpus`` logical CPUs (at least 1)."""
    if not num_cpus:
        return os.cpu_count() or 1
    return max(1, math.ceil(num_cpus))
