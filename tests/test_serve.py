"""Ray Serve endpoints over real HTTP on loopback: answers, bad requests, load, replica loss."""

from __future__ import annotations

import io
import threading
import time
from collections import Counter

import httpx
import numpy as np
import pytest
import torch
from conftest import free_port, jpeg_bytes
from PIL import Image

pytestmark = pytest.mark.integration

MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    from beit_ray.models.build import build_model
    from beit_ray.models.load import export_hf

    root = tmp_path_factory.mktemp("serve_ckpt")
    torch.manual_seed(1)
    out = {}
    for task, n in (("classification", 10), ("segmentation", 5)):
        export_hf(
            build_model("debug", task, num_labels=n),
            str(root / task),
            id2label={i: f"{task[:3]}_{i}" for i in range(n)},
            # segmentation as a run exports it: ratio kept, at the training scale (128, 32)
            preprocessor={"seg_scale": (128, 32)} if task == "segmentation" else None,
        )
        out[task] = str(root / task)
    return out


@pytest.fixture(scope="module")
def server(ray_session, checkpoints):
    """The app on a free loopback port; shut down at the end of the module."""
    from ray import serve

    from beit_ray.config import parse_args
    from beit_ray.serve.app import build_app
    from beit_ray.serve.config import ServeConfig

    port = free_port()
    cfg = parse_args(
        ServeConfig,
        [
            "--checkpoint", checkpoints["classification"], "--segment_checkpoint", checkpoints["segmentation"],
            "--http.port", str(port), "--http.max_pixels", str(MAX_PIXELS),
            "--classify.num_cpus", "0.5", "--classify.max_replicas", "2", "--classify.upscale_delay_s", "1",
            "--segment.num_cpus", "0.5", "--segment.max_replicas", "1", "--ingress_cpus", "0.25",
        ],
    )  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=cfg.name, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _post(
    client: httpx.Client, url: str, data: bytes, ctype: str = "image/jpeg", **kw: object
) -> httpx.Response:
    headers = {"Content-Type": ctype, **kw.pop("headers", {})}  # type: ignore[dict-item]
    return client.post(url, content=data, headers=headers, **kw)  # type: ignore[arg-type]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_endpoints_match_batch_predictor(server, checkpoints, photos):
    from beit_ray.data.decode import decode_image
    from beit_ray.infer.masks import hex_color
    from beit_ray.infer.predictor import Predictor

    classifier = Predictor(checkpoints["classification"], "classify", top_k=3)
    segmenter = Predictor(checkpoints["segmentation"], "segment")
    with httpx.Client(timeout=60) as client:
        for name in ("astronaut", "chelsea", "coffee"):
            data = jpeg_bytes(photos[name])
            image = decode_image(data)
            want = classifier.predict([image])[0]
            raw = _post(client, f"{server}/classify?top_k=3", data)
            form = client.post(
                f"{server}/classify",
                params={"top_k": 3},
                files={"image": ("x.jpg", data, "image/jpeg")},
            )
            for r in (raw, form):
                assert r.status_code == 200, r.text
                preds = r.json()["predictions"]
                assert [p["id"] for p in preds] == want["top_ids"].tolist()
                assert [p["label"] for p in preds] == want["top_labels"]
                np.testing.assert_allclose(
                    [p["score"] for p in preds], want["top_scores"], atol=1e-5
                )
            assert raw.json()["model"] == checkpoints["classification"]

            seg = segmenter.predict([image])[0]
            png = _post(client, f"{server}/segment", data, headers={"Accept": "image/png"})
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            mask = np.asarray(Image.open(io.BytesIO(png.content)))
            assert mask.shape == image.shape[:2] and np.array_equal(mask, seg["mask"])
            assert Image.open(io.BytesIO(png.content)).mode == "P"  # colours in a viewer
            stats = _post(client, f"{server}/segment", data).json()
            assert [c["color"] for c in stats["classes"]] == [
                hex_color(c) for c in seg["class_ids"]
            ]
            assert (stats["height"], stats["width"]) == image.shape[:2]
            assert [c["id"] for c in stats["classes"]] == seg["class_ids"].tolist()
            assert [c["pixels"] for c in stats["classes"]] == seg["pixel_counts"].tolist()
            assert abs(sum(c["fraction"] for c in stats["classes"]) - 1) < 1e-6

        assert (
            len(
                _post(client, f"{server}/classify", jpeg_bytes(photos["rocket"])).json()[
                    "predictions"
                ]
            )
            == 5
        )
        health = client.get(f"{server}/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        labels = client.get(f"{server}/labels").json()
        assert labels["classify"]["3"] == "cla_3" and labels["segment"]["4"] == "seg_4"
        assert client.get(f"{server}/docs").status_code == 200
        assert {"/classify", "/segment", "/healthz", "/labels"} <= set(
            client.get(f"{server}/openapi.json").json()["paths"]
        )


def test_segment_batches_images_of_different_sizes(server, checkpoints, photos):
    """Concurrent /segment requests of other sizes and ratios (keep-ratio export): each mask
    at its image's size, as the predictor's per-image result; one forward per shape."""
    from concurrent.futures import ThreadPoolExecutor

    from beit_ray.infer.predictor import Predictor

    src = photos["coffee"]  # 400x600
    crops = [src[:300, :451], src[:90, :200], src[:64, :96], src[64:128, 96:192], src[:40, :400]]
    segmenter = Predictor(checkpoints["segmentation"], "segment")

    def post(img: np.ndarray) -> np.ndarray:
        with httpx.Client(timeout=60) as client:
            r = _post(client, f"{server}/segment", _png(Image.fromarray(img)), "image/png",
                      headers={"Accept": "image/png"})  # fmt: skip
            assert r.status_code == 200, r.text
            return np.asarray(Image.open(io.BytesIO(r.content)))

    with ThreadPoolExecutor(len(crops)) as pool:
        masks = list(pool.map(post, crops))
    for img, mask in zip(crops, masks, strict=True):
        assert mask.shape == img.shape[:2]
        assert (mask == segmenter.predict([img])[0]["mask"]).mean() > 0.999


def test_bad_requests_get_4xx_json(server, photos):
    good = jpeg_bytes(photos["chelsea"])
    cmyk = io.BytesIO()
    Image.fromarray(photos["coffee"]).convert("CMYK").save(cmyk, format="JPEG")
    cases = [
        ("empty body", dict(data=b""), 400, "empty_body"),
        ("non-image bytes", dict(data=b"hello, not an image"), 422, "not_an_image"),
        ("truncated image", dict(data=good[: len(good) // 3]), 422, None),
        ("wrong content type", dict(data=good, ctype="text/plain"), 415, "unsupported_media_type"),
        (
            "json content type",
            dict(data=b'{"a": 1}', ctype="application/json"),
            415,
            "unsupported_media_type",
        ),
        ("body over the limit", dict(data=b"\xff" * (16 * 1024 * 1024 + 1)), 413, "body_too_large"),
        (
            "image over the pixel limit",
            dict(data=_png(Image.new("RGB", (1200, 1000)))),
            413,
            "too_large",
        ),
        ("top_k zero", dict(data=good, params={"top_k": 0}), 422, "bad_top_k"),
        ("top_k text", dict(data=good, params={"top_k": "many"}), 422, "bad_top_k"),
        ("top_k huge", dict(data=good, params={"top_k": 10**6}), 422, "bad_top_k"),
    ]
    with httpx.Client(timeout=60) as client:
        for what, kw, status, code in cases:
            for route in ("classify", "segment"):
                if route == "segment" and "top_k" in what:
                    continue
                r = _post(client, f"{server}/{route}", **kw)  # type: ignore[arg-type]
                assert r.status_code == status, (what, route, r.status_code, r.text[:200])
                error = r.json()["error"]
                assert error["message"] and (code is None or error["code"] == code), (what, error)
        r = _post(client, f"{server}/segment", good, params={"with_mask": "maybe"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "bad_with_mask"
        r = client.post(f"{server}/classify", files={"file": ("x.jpg", good, "image/jpeg")})
        assert r.status_code == 400 and r.json()["error"]["code"] == "missing_image"
        assert client.get(f"{server}/nope").status_code == 404
        # replicas stay healthy: odd but valid images and then plain ones still work
        assert _post(client, f"{server}/classify", cmyk.getvalue()).status_code == 200
        assert _post(client, f"{server}/classify", good).status_code == 200
        assert client.get(f"{server}/healthz").status_code == 200


def _load(
    url: str, bodies: list[bytes], seconds: float, clients: int, stop: threading.Event | None = None
) -> list[tuple[float, int]]:
    """``clients`` threads posting for ``seconds``; (finish time, status) of every request."""
    results: list[tuple[float, int]] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def worker(i: int) -> None:
        with httpx.Client(timeout=60) as client:
            n = i
            while time.monotonic() < end and not (stop and stop.is_set()):
                try:
                    status = _post(client, url, bodies[n % len(bodies)]).status_code
                except httpx.HTTPError:
                    status = -1  # no answer at all: counted, never ignored
                with lock:
                    results.append((time.monotonic(), status))
                n += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_load_no_5xx(server, photos):
    from ray import serve

    bodies = [jpeg_bytes(img) for img in photos.values()]
    results = _load(f"{server}/classify", bodies, seconds=10, clients=16)
    statuses = Counter(s for _, s in results)
    assert statuses[200] == len(results) and len(results) >= 16, statuses
    sizes = serve.get_deployment_handle("Classifier", app_name="beit").stats.remote().result()
    assert max(sizes) > 1  # concurrent requests were batched together


def _replica_actors(deployment: str) -> dict[str, str]:
    import ray

    return {
        actor_id: info["Name"]
        for actor_id, info in ray._private.state.actors().items()
        if info["State"] == "ALIVE"
        and info["Name"].startswith("SERVE_REPLICA::")
        and f"#{deployment}#" in info["Name"]
    }


def test_replica_killed_under_load_is_replaced(server, photos):
    import ray

    bodies = [jpeg_bytes(photos[n]) for n in ("astronaut", "coffee")]
    before = _replica_actors("Classifier")
    assert before
    victim = sorted(before.values())[0]
    holder: dict[str, list[tuple[float, int]]] = {}
    loader = threading.Thread(
        target=lambda: holder.setdefault("r", _load(f"{server}/classify", bodies, 25, 8))
    )
    loader.start()
    time.sleep(4)
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    loader.join()

    results = holder["r"]
    assert all(s in (200, 503) for _, s in results), Counter(
        s for _, s in results
    )  # no silent drops
    late = [s for t, s in results if t > killed_at + 12]
    assert late and all(s == 200 for s in late), Counter(late)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (set(_replica_actors("Classifier")) - set(before)):
        time.sleep(1)
    assert set(_replica_actors("Classifier")) - set(before), (
        "Serve did not start a replacement replica"
    )
    with httpx.Client(timeout=60) as client:
        assert _post(client, f"{server}/classify", bodies[0]).status_code == 200


def test_serve_yaml_is_a_valid_serve_config(checkpoints):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from beit_ray.serve.app import app_builder

    with open("cluster/serve.yaml") as f:
        doc = yaml.safe_load(f)
    schema = (
        ServeDeploySchema.model_validate(doc)
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(doc)
    )
    app = schema.applications[0]
    assert app.import_path == "beit_ray.serve.app:app_builder"
    assert doc["http_options"]["host"] == "127.0.0.1"
    names = {d["name"] for d in doc["applications"][0]["deployments"]}
    assert names == {"Ingress", "Classifier", "Segmenter"}
    args = {
        **app.args,
        "checkpoint": checkpoints["classification"],
        "segment_checkpoint": checkpoints["segmentation"],
    }
    built = app_builder(args)  # the YAML's args are valid config; nothing deploys
    assert type(built).__name__ == "Application"
