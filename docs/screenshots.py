"""The README's screenshots: the Serve page answering a photo, and a labelling preview.

    python docs/screenshots.py page --checkpoint runs/demo-finetune-<time> \\
        --image runs/demo-data/images/chelsea/003.jpg --out docs/page-classify.png
    python docs/screenshots.py page --checkpoint runs/<segmentation run> --task segment \\
        --image shapes.jpg --out docs/page-segment.png
    python docs/screenshots.py preview --labels runs/demo-labels-<time> --out docs/preview.png

Needs Debian's chromium and chromium-driver (as the browser tests) and, for ``page``, a local
Ray: it serves the checkpoint on a loopback port, uploads the image through the page's file
input, waits for the answer and saves a screenshot of the window.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
)
from conftest import CHROMIUM_FLAGS  # noqa: E402 - the tests' flags: no network, a fresh profile

FLAGS = (*CHROMIUM_FLAGS, "--hide-scrollbars")


def chromium(width: int, height: int):  # noqa: ANN201 (selenium's driver)
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in (*FLAGS, f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}")
    service = webdriver.ChromeService(shutil.which("chromedriver") or "chromedriver")
    return webdriver.Chrome(options=options, service=service)


def wait(driver, script: str, timeout: float = 120.0) -> None:  # noqa: ANN001
    end = time.monotonic() + timeout
    while not driver.execute_script(f"return ({script});"):
        if time.monotonic() > end:
            raise TimeoutError(script)
        time.sleep(0.2)


def page(args: argparse.Namespace) -> None:
    from ray import serve

    from beit_ray.config import RayConfig, parse_args
    from beit_ray.runtime import init_ray
    from beit_ray.serve.app import build_app
    from beit_ray.serve.config import ServeConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_ray(RayConfig(num_cpus=4))
    cfg = parse_args(ServeConfig, ["--checkpoint", args.checkpoint, "--http.port", str(port)])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=cfg.name, route_prefix="/")
    driver = chromium(args.width, args.height)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait(driver, "document.getElementById('models').textContent.startsWith('serving')")
        driver.find_element("id", "file").send_keys(os.path.abspath(args.image))
        done = "#top li" if args.task == "classify" else "#legend li"
        wait(driver, f"document.querySelectorAll('{done}').length > 0")
        time.sleep(0.5)  # the image's own decode
        driver.save_screenshot(args.out)
    finally:
        driver.quit()
        serve.shutdown()


def preview(args: argparse.Namespace) -> None:
    driver = chromium(args.width, args.height)
    try:
        driver.get("file://" + os.path.abspath(os.path.join(args.labels, "_PREVIEW.html")))
        wait(driver, "document.readyState === 'complete'")
        driver.save_screenshot(args.out)
    finally:
        driver.quit()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("page")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--task", choices=["classify", "segment"], default="classify")
    v = sub.add_parser("preview")
    v.add_argument("--labels", required=True)
    for s in (p, v):
        s.add_argument("--out", required=True)
        s.add_argument("--width", type=int, default=1100)
        s.add_argument("--height", type=int, default=720)
    args = parser.parse_args()
    (page if args.what == "page" else preview)(args)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
