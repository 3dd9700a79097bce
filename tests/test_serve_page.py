"""The page at / of the Serve app, in a real headless Chromium: upload a real photo, read what
the page rendered (top-1, bars, the overlay and its legend) against the API's own answers,
and a bad file shows the API's message."""

from __future__ import annotations

import base64
import io
import re

import httpx
import numpy as np
import pytest
import torch
from conftest import free_port, jpeg_bytes, wait_for
from PIL import Image

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    """Both deployments (so the page shows its task switch), autoscaled, on a loopback port."""
    from ray import serve

    from beit_ray.config import parse_args
    from beit_ray.models.build import build_model
    from beit_ray.models.load import export_hf
    from beit_ray.serve.app import build_app
    from beit_ray.serve.config import ServeConfig

    root = tmp_path_factory.mktemp("page_ckpt")
    torch.manual_seed(3)
    names = ["tabby", "coffee mug", "rocket", "astronaut", "coins", "camera", "sky", "tissue"]
    for task in ("classification", "segmentation"):
        export_hf(
            build_model("debug", task, num_labels=len(names)),
            str(root / task),
            id2label=dict(enumerate(names)),
        )
    port = free_port()
    cfg = parse_args(
        ServeConfig,
        [
            "--checkpoint", str(root / "classification"),
            "--segment_checkpoint", str(root / "segmentation"),
            "--http.port", str(port),
            "--classify.num_cpus", "0.5", "--classify.max_replicas", "2",
            "--segment.num_cpus", "0.5", "--segment.max_replicas", "1", "--ingress_cpus", "0.25",
        ],
    )  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=cfg.name, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _post_form(url: str, data: bytes, name: str) -> httpx.Response:
    return httpx.post(url, files={"image": (name, data, "image/jpeg")}, timeout=60)


def test_static_files_are_served(server):
    page = httpx.get(f"{server}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="static/page.js"' in page.text and "http" not in page.text.split("<footer")[0]
    js = httpx.get(f"{server}/static/page.js", timeout=30)
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    missing = httpx.get(f"{server}/static/secrets.txt", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_page_classifies_and_segments_an_uploaded_photo(server, browser, photos, tmp_path):
    from beit_ray.infer.masks import PALETTE

    photo = photos["chelsea"]  # 300 x 451
    data = jpeg_bytes(photo)
    path = tmp_path / "chelsea.jpg"
    path.write_bytes(data)

    browser.get(f"{server}/")
    models = wait_for(
        browser,
        "document.getElementById('models').textContent.startsWith('serving') && document.getElementById('models').textContent",
    )
    assert models == "serving classify (8 classes) and segment (8 classes)"
    assert browser.find_element("id", "tasks").is_displayed()  # both deployments: a switch
    # what the page hides stays hidden whatever its CSS display (the switch of one deployment)
    assert browser.execute_script(
        "return [...document.querySelectorAll('[hidden]')].every(e => getComputedStyle(e)"
        ".display === 'none') && document.querySelectorAll('[hidden]').length >= 3"
    )

    browser.find_element("id", "file").send_keys(str(path))
    wait_for(browser, "document.querySelectorAll('#top li').length === 5")
    rows = browser.execute_script(
        "return [...document.querySelectorAll('#top li')].map(li => [li.querySelector('.label')"
        ".textContent, li.querySelector('.score').textContent, li.querySelector('.bar span')"
        ".style.width])"
    )
    want = _post_form(f"{server}/classify?top_k=5", data, "chelsea.jpg").json()["predictions"]
    assert [r[0] for r in rows] == [p["label"] for p in want]  # top-1 first, then the rest
    assert rows[0][1] == f"{100 * want[0]['score']:.1f}%"
    assert rows[0][2] == f"{100 * want[0]['score']:.1f}%"  # the bar's length is the score
    assert browser.execute_script("return document.getElementById('photo').naturalWidth") == 451

    browser.find_element("css selector", "input[value='segment']").click()  # resends the file
    wait_for(
        browser,
        "!document.getElementById('overlay').hidden && document.querySelectorAll('#legend li').length > 0",
    )
    size = browser.execute_script(
        "const c = document.getElementById('overlay'); return [c.width, c.height]"
    )
    assert size == [451, 300]  # the overlay is drawn at the photo's own size
    seg = httpx.post(
        f"{server}/segment?with_mask=true",
        files={"image": ("chelsea.jpg", data, "image/jpeg")},
        timeout=60,
    ).json()
    legend = browser.execute_script(
        "return [...document.querySelectorAll('#legend li')].map(li => [Number(li.dataset.classId),"
        " li.querySelector('.label').textContent, li.querySelector('.score').textContent])"
    )
    by_share = sorted(seg["classes"], key=lambda c: -c["fraction"])
    assert [row[0] for row in legend] == [c["id"] for c in by_share]
    assert [row[1] for row in legend] == [c["label"] for c in by_share]
    assert [row[2] for row in legend] == [f"{100 * c['fraction']:.1f}%" for c in by_share]

    # Pixels of the overlay: the photo blended with the palette colour of the API's mask.
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(seg["mask_png"]))))
    alpha = float(browser.execute_script("return document.getElementById('opacity').value"))
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(float)
    for y, x in ((20, 30), (150, 225), (280, 430), (100, 400)):
        got = browser.execute_script(
            f"return [...document.getElementById('overlay').getContext('2d').getImageData({x}, {y}, 1, 1).data]"
        )
        expect = (1 - alpha) * decoded[y, x] + alpha * PALETTE[mask[y, x]]
        assert np.abs(np.array(got[:3]) - expect).max() <= 8, (x, y, got, expect)


def test_page_shows_the_api_message_for_a_bad_file(server, browser, tmp_path):
    bad = tmp_path / "holiday.jpg"
    bad.write_bytes(b"this is not a JPEG, whatever its name says")
    want = _post_form(f"{server}/classify?top_k=5", bad.read_bytes(), "holiday.jpg")
    assert want.status_code == 422
    # PIL's message names the in-memory buffer's address, which differs per request
    message = re.sub(r" at 0x[0-9a-f]+", "", want.json()["error"]["message"])

    browser.get(f"{server}/")
    wait_for(browser, "document.getElementById('models').textContent.startsWith('serving')")
    browser.find_element("id", "file").send_keys(str(bad))
    shown = wait_for(
        browser,
        "!document.getElementById('error').hidden && document.getElementById('error').textContent",
    )
    assert message in re.sub(r" at 0x[0-9a-f]+", "", shown) and "HTTP 422, not_an_image" in shown
    assert browser.find_element("id", "result").is_displayed() is False
