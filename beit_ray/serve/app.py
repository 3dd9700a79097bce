"""Ray Serve endpoints: /classify and /segment behind one FastAPI ingress.

    app = build_app(cfg)                 # Serve application; nothing happens at import time
    serve.run(app, name="beit", route_prefix="/")

or ``serve run cluster/serve.yaml`` (``import_path: beit_ray.serve.app:app_builder``).

The ingress reads and checks each request (content type, size, decodability, pixel count,
top_k), decodes and resizes the image exactly as batch labelling does (:class:`Predictor`'s
``prepare``), and hands small uint8 tensors to the model deployments. Each model deployment
holds one :class:`Predictor`, batches requests with ``@serve.batch`` and scales on its own.
Bad requests get a 4xx JSON ``{"error": {"code", "message"}}`` and never reach a model replica.
``GET /`` is a page (static HTML + JS from ``static/``) that sends a dropped image to these
endpoints and draws the answer: top classes as bars, or the mask over the image with a legend.
"""

# No ``from __future__ import annotations``: FastAPI must see real types (Request) on routes.
import asyncio
import base64
import logging
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from beit_ray.config import StorageConfig, build
from beit_ray.infer.config import resolve_dtype as replica_dtype  # shared with labelling
from beit_ray.serve.config import ReplicaConfig, ServeConfig

log = logging.getLogger(__name__)
MODEL_RETRIES = 3  # a model replica that dies mid-request is retried on another one


class ApiError(Exception):
    """An HTTP error answered as JSON."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


api = FastAPI(title="beit-ray", description="BEiT classification and segmentation on Ray Serve")


@api.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    return _error(e.status, e.code, e.message)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    return _error(422, "invalid_request", str(e.errors()))


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    return _error(e.status_code, "http_error", str(e.detail))


def _flag(request: Request, name: str) -> bool:
    raw = request.query_params.get(name, "false").lower()
    if raw not in ("1", "true", "yes", "0", "false", "no"):
        raise ApiError(422, f"bad_{name}", f"{name} must be true or false, got {raw!r}")
    return raw in ("1", "true", "yes")


STATIC_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "page.js": "text/javascript; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
}
"""The page's files (beit_ray/serve/static/, package data): no CDN, no build step."""


def read_static() -> dict[str, bytes]:
    from importlib.resources import files

    folder = files("beit_ray.serve") / "static"
    return {name: (folder / name).read_bytes() for name in STATIC_TYPES}


# --------------------------------------------------------------------------- model replicas


class ModelServer:
    """One checkpoint, loaded once per replica; requests batched into one forward pass."""

    def __init__(
        self,
        checkpoint: str,
        task: str,
        storage: StorageConfig | None,
        threads: int | None,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        dtype: str = "float32",
    ) -> None:
        import ray

        from beit_ray.infer.predictor import Predictor, actor_threads, ray_device

        if threads is None:  # the replica's CPUs, however the YAML set them
            threads = actor_threads(ray.get_runtime_context().get_assigned_resources().get("CPU"))
        # The GPU only when this replica reserved one (replicas.num_gpus > 0).
        device = ray_device(ray.get_gpu_ids())
        dtype = replica_dtype(dtype, device)  # here: YAML ray_actor_options may add the GPU
        self.predictor = Predictor(
            checkpoint,
            task,
            storage,
            device=device,
            threads=threads,
            dtype=dtype,  # type: ignore[arg-type]
        )
        self.run.set_max_batch_size(max_batch_size)
        self.run.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: list[int] = []  # for the benchmark: how full batches were

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def run(
        self, items: list[tuple[np.ndarray, tuple[int, int], int]]
    ) -> list[dict[str, Any]]:
        """Items: (uint8 [3, h, w] from prepare, original (H, W), top_k). One forward per
        shape: a segmentation model exported at its training scale keeps each image's ratio."""
        self.batch_sizes.append(len(items))
        prepared = [item[0] for item in items]  # [3, h, w] uint8 each
        sizes = [item[1] for item in items]
        top_k = max(item[2] for item in items)
        # off the event loop, so the next batch can gather while this one computes
        results = await asyncio.to_thread(self.predictor.forward_prepared, prepared, sizes, top_k)
        for res, (_, _, k) in zip(results, items, strict=True):
            for key in ("top_ids", "top_labels", "top_scores"):
                if key in res:
                    res[key] = res[key][:k]
        return results

    async def __call__(
        self, pixels: np.ndarray, size: tuple[int, int], top_k: int = 5
    ) -> dict[str, Any]:
        return await self.run((pixels, size, top_k))

    def info(self) -> dict[str, Any]:
        p = self.predictor
        return {"checkpoint": p.checkpoint_uri, "task": p.task, "id2label": p.id2label}

    def stats(self) -> list[int]:
        return list(self.batch_sizes)


# --------------------------------------------------------------------------- ingress


# NB: serve.ingress pickles the routes now; module globals they use must be defined above.
@serve.ingress(api)
class Ingress:
    """HTTP front: checks and decodes requests, calls the model deployments."""

    def __init__(
        self,
        classifier: DeploymentHandle | None,
        segmenter: DeploymentHandle | None,
        cfg: ServeConfig,
        checkpoints: dict[str, str],
    ) -> None:
        from beit_ray.models.load import model_dir
        from beit_ray.models.preprocess import Preprocessor

        self.cfg = cfg
        self.handles = {"classify": classifier, "segment": segmenter}
        self.checkpoints = checkpoints
        self.preprocessors = {
            task: Preprocessor.from_pretrained(model_dir(uri, cfg.storage), cfg.storage)
            for task, uri in self.checkpoints.items()
        }
        self._info: dict[str, dict[str, Any]] = {}
        self.static = read_static()  # the page's few files, read once per replica

    # ------------------------------------------------------------------ helpers
    async def _body(self, request: Request) -> bytes:
        """The image bytes of a raw image/* body or of multipart field ``image``, size-checked."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        multipart = ctype == "multipart/form-data"
        if not (multipart or ctype.startswith("image/") or ctype == "application/octet-stream"):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"send image bytes (Content-Type image/*) or multipart field 'image', not {ctype or 'no content type'!r}",
            )
        limit = int(self.cfg.http.max_body_mb * 1024 * 1024)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "body_too_large", f"body of {declared} bytes exceeds {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, "body_too_large", f"body exceeds {limit} bytes")
        data = bytes(body)
        if multipart:
            request._body = data  # starlette re-reads the consumed stream from here
            try:
                form = await request.form()
            except Exception as e:
                raise ApiError(
                    400, "bad_multipart", f"cannot parse the multipart body: {e}"
                ) from None
            field = form.get("image")
            if field is None or isinstance(field, str):
                raise ApiError(400, "missing_image", "multipart body has no file field 'image'")
            data = await field.read()
        if not data:
            raise ApiError(400, "empty_body", "the request holds no image bytes")
        return data

    async def _image(self, request: Request, task: str) -> tuple[np.ndarray, tuple[int, int]]:
        """(uint8 [3, h, w] model input, original (H, W)) or an ApiError."""
        from beit_ray.data.decode import DecodeError, decode_image

        if self.handles[task] is None:
            raise ApiError(404, "not_deployed", f"no {task} model is deployed")
        data = await self._body(request)
        try:
            image = await asyncio.to_thread(decode_image, data, self.cfg.http.max_pixels)
        except DecodeError as e:
            status = 413 if e.reason == "too_large" else 400 if e.reason == "empty" else 422
            raise ApiError(status, e.reason, str(e)) from None
        pixels = await asyncio.to_thread(lambda: self.preprocessors[task].to_uint8(image))
        return pixels, (int(image.shape[0]), int(image.shape[1]))

    def _top_k(self, request: Request) -> int:
        raw = request.query_params.get("top_k")
        if raw is None:
            return self.cfg.http.default_top_k
        try:
            k = int(raw)
        except ValueError:
            raise ApiError(422, "bad_top_k", f"top_k must be an integer, got {raw!r}") from None
        if not 1 <= k <= self.cfg.http.max_top_k:
            raise ApiError(
                422, "bad_top_k", f"top_k must be in 1..{self.cfg.http.max_top_k}, got {k}"
            )
        return k

    async def _call(self, task: str, *args: Any) -> dict[str, Any]:
        """Call a model deployment; a replica lost mid-call is retried, then a 503 is answered."""
        from ray.exceptions import RayActorError

        handle = self.handles[task]
        assert handle is not None
        for attempt in range(MODEL_RETRIES):
            try:
                return await handle.remote(*args)
            except RayActorError as e:
                log.warning("%s replica lost (attempt %d): %s", task, attempt + 1, e)
                await asyncio.sleep(0.2 * (attempt + 1))
        raise ApiError(503, "model_unavailable", f"the {task} model is restarting; retry")

    async def _infos(self) -> dict[str, dict[str, Any]]:
        for task, handle in self.handles.items():
            if handle is not None and task not in self._info:
                self._info[task] = await handle.info.remote()
        return self._info

    # ------------------------------------------------------------------ routes
    @api.post("/classify")
    async def classify(self, request: Request) -> dict[str, Any]:
        """Top-k classes of an image: raw bytes (Content-Type image/*) or multipart 'image'."""
        top_k = self._top_k(request)
        pixels, size = await self._image(request, "classify")
        res = await self._call("classify", pixels, size, top_k)
        preds = [
            {"label": label, "id": int(i), "score": float(s)}
            for i, label, s in zip(
                res["top_ids"], res["top_labels"], res["top_scores"], strict=True
            )
        ]
        return {"predictions": preds, "model": self.checkpoints["classify"]}

    @api.post("/segment", response_model=None)
    async def segment(self, request: Request) -> Response | dict[str, Any]:
        """Class ids per pixel: a PNG at the original size (Accept: image/png; a palette image
        whose values are the ids) or JSON stats with each class's colour in that palette;
        ``?with_mask=true`` adds the PNG to the JSON (base64 ``mask_png``)."""
        from beit_ray.infer.masks import hex_color, mask_png

        with_mask = _flag(request, "with_mask")
        pixels, (h, w) = await self._image(request, "segment")
        res = await self._call("segment", pixels, (h, w), 1)
        if "image/png" in request.headers.get("accept", ""):
            return Response(await asyncio.to_thread(mask_png, res["mask"]), media_type="image/png")
        id2label = (await self._infos())["segment"]["id2label"]
        classes = [
            {
                "id": int(c),
                "label": id2label.get(int(c), str(int(c))),
                "pixels": int(n),
                "fraction": float(n) / (h * w),
                "color": hex_color(int(c)),
            }
            for c, n in zip(res["class_ids"], res["pixel_counts"], strict=True)
        ]
        out: dict[str, Any] = {"height": h, "width": w, "classes": classes}
        if with_mask:
            png = await asyncio.to_thread(mask_png, res["mask"])
            out["mask_png"] = base64.b64encode(png).decode("ascii")
        return {**out, "model": self.checkpoints["segment"]}

    @api.get("/", include_in_schema=False)
    async def page(self) -> Response:
        """The page: drop an image, see the top classes or the mask (static/index.html)."""
        return Response(self.static["index.html"], media_type=STATIC_TYPES["index.html"])

    @api.get("/static/{name}", include_in_schema=False)
    async def static_file(self, name: str) -> Response:
        if name not in self.static:
            raise ApiError(404, "not_found", f"no static file {name!r}")
        return Response(self.static[name], media_type=STATIC_TYPES[name])

    @api.get("/labels")
    async def labels(self) -> dict[str, Any]:
        """id → label of each deployed model."""
        return {
            task: {str(k): v for k, v in info["id2label"].items()}
            for task, info in (await self._infos()).items()
        }

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """200 when every model deployment answers (asked afresh each time)."""
        try:
            calls = {t: h.info.remote() for t, h in self.handles.items() if h is not None}
            infos = {t: await asyncio.wait_for(c, timeout=10) for t, c in calls.items()}
        except Exception as e:
            raise ApiError(
                503, "unhealthy", f"a model deployment does not answer: {type(e).__name__}"
            ) from None
        return {"status": "ok", "models": {t: i["checkpoint"] for t, i in infos.items()}}


# --------------------------------------------------------------------------- building


def resolve_checkpoints(cfg: ServeConfig) -> dict[str, str]:
    """{"classify": uri, "segment": uri} from --checkpoint (by its task) and --segment_checkpoint."""
    from transformers import AutoConfig

    from beit_ray import storage as st
    from beit_ray.models.load import model_dir, task_of

    cfg.require()
    out: dict[str, str] = {}
    for uri in filter(None, (cfg.checkpoint, cfg.segment_checkpoint)):
        folder = model_dir(uri, cfg.storage)
        hf = AutoConfig.for_model(**_read_json(st.join(folder, "config.json"), cfg.storage))
        task = {"classification": "classify", "segmentation": "segment"}.get(task_of(hf))
        if task is None:
            raise ValueError(
                f"{uri} is a {task_of(hf)} checkpoint; serving needs classification or segmentation"
            )
        if task in out:
            raise ValueError(f"two {task} checkpoints given ({out[task]}, {uri})")
        out[task] = uri
    return out


def _read_json(uri: str, storage: StorageConfig | None) -> dict[str, Any]:
    import json

    from beit_ray import storage as st

    return json.loads(st.read_text(uri, storage))


def _model_deployment(name: str, uri: str, task: str, r: ReplicaConfig, cfg: ServeConfig) -> Any:
    return (
        serve.deployment(ModelServer)
        .options(
            name=name,
            autoscaling_config=r.autoscaling_config(),
            max_ongoing_requests=r.max_ongoing_requests,
            ray_actor_options={"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
        )
        .bind(
            uri,
            task,
            cfg.storage,
            r.threads,
            cfg.batching.max_batch_size,
            cfg.batching.batch_wait_timeout_s,
            r.dtype,
        )
    )


def build_app(cfg: ServeConfig) -> Any:
    """The Serve application: Ingress → Classifier and/or Segmenter (by the checkpoints' tasks)."""
    checkpoints = resolve_checkpoints(cfg)
    classifier = segmenter = None
    if "classify" in checkpoints:
        classifier = _model_deployment(
            "Classifier", checkpoints["classify"], "classify", cfg.classify, cfg
        )
    if "segment" in checkpoints:
        segmenter = _model_deployment(
            "Segmenter", checkpoints["segment"], "segment", cfg.segment, cfg
        )
    ingress = serve.deployment(Ingress).options(
        name="Ingress",
        num_replicas=cfg.ingress_replicas,
        max_ongoing_requests=256,
        ray_actor_options={"num_cpus": cfg.ingress_cpus},
    )
    return ingress.bind(classifier, segmenter, cfg, checkpoints)


def app_builder(args: dict[str, Any]) -> Any:
    """``serve run cluster/serve.yaml``: the YAML's ``args`` are ServeConfig fields."""
    return build_app(build(ServeConfig, dict(args)))
