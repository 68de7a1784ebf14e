"""The README's screenshots of the review page (GET /review), regenerated from scratch in about a minute:

    .venv/bin/python scripts/screenshots.py            # writes docs/review_page.png and docs/review_open.png

Generates the demo dataset (uadkit.data.demo), trains a small STFPM on it, starts the real service on
127.0.0.1 (tests/live_server.py) with its records in a temporary folder, sends the demo's test images,
reviews some of them through the API as an inspector would (the truth: the demo folder each image came
from), then opens /review in headless Chromium (playwright; Debian's `chromium`, as the tests use) and
saves two PNGs: the whole page, and the side panel with one flagged decision opened large. PNGs above
--max-kb are reduced to 256 colours.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from live_server import live_server, post  # noqa: E402

from uadkit.cli import main as uadkit  # noqa: E402
from uadkit.data.demo import make_demo_dataset  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def train_demo_model(work: str) -> str:
    data = make_demo_dataset(os.path.join(work, "demo"), n_train=24, n_test_good=8, n_test_defect=6, size=256)
    out = os.path.join(work, "train")
    rc = uadkit(["-c", os.path.join(ROOT, "configs", "STFPM.yaml"), "-o", "Global.mode=train",
                 "-o", f"Global.dataset_dir={data}", "-o", f"Global.output={out}", "-o", "Model.input_size=[128,128]",
                 "-o", "Train.batch_size=4", "-o", "Train.epochs_iters=8"])
    if rc != 0:
        sys.exit("training the demo model failed")
    return data


def review(base: str, record_id: int, verdict: str) -> None:
    req = urllib.request.Request(f"{base}/records/{record_id}/review", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"review": verdict, "reviewer": "ana"}).encode())
    urllib.request.urlopen(req, timeout=30).read()


def shrink(path: str, max_kb: int) -> None:
    """Fewer colours first, then a smaller image, until the PNG is under `max_kb` (the overlays' texture is
    what makes screenshots of this page large)."""
    image = Image.open(path).convert("RGB")
    for scale, colours in ((1, 256), (1, 128), (1, 64), (0.85, 128), (0.85, 64), (0.75, 64), (0.75, 32)):
        if os.path.getsize(path) <= max_kb * 1024:
            break
        size = (round(image.width * scale), round(image.height * scale))
        image.resize(size, Image.LANCZOS).quantize(colours, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"{path}: {image.width}x{image.height} -> {Image.open(path).size}, {os.path.getsize(path) // 1024} KB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"), help="folder for the PNGs (default: docs/)")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                    help="Chromium executable (default: chromium on PATH)")
    ap.add_argument("--max-kb", type=int, default=300, help="PNGs above this are reduced to 256 colours")
    args = ap.parse_args()
    if not args.chromium:
        sys.exit("--chromium: no chromium on PATH (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("scripts/screenshots.py needs playwright: scripts/setup.sh test (or pip install playwright)")

    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="uadkit-screens-")
    try:
        data = train_demo_model(work)
        test = os.path.join(data, "test")
        paths = sorted(os.path.join(test, d, f) for d in sorted(os.listdir(test))
                       for f in sorted(os.listdir(os.path.join(test, d))))
        with live_server(os.path.join(work, "train", "best_model"), work) as (base, _, _):
            truth = {}  # image hash -> a defect part (its demo folder is not "good")
            for p in paths:
                image = open(p, "rb").read()
                code, answer = post(base, {"image": base64.b64encode(image).decode()})
                if code != 200:
                    sys.exit(f"{p}: answered {code}: {answer}")
                truth[hashlib.sha256(image).hexdigest()] = os.path.basename(os.path.dirname(p)) != "good"
            for _ in range(100):  # recorded behind the answers
                if json.loads(urllib.request.urlopen(base + "/health").read())["records"]["written"] >= len(paths):
                    break
                time.sleep(0.1)
            rows = json.loads(urllib.request.urlopen(base + "/records?limit=1000").read())["records"]
            # an inspector's first pass over every other decision: what the part truly was
            for r in rows[1::2]:
                defect, flagged = truth[r["image_sha256"]], r["label"] == "anomalous"
                review(base, r["id"], {(True, True): "confirmed", (True, False): "false_alarm",
                                       (False, True): "missed", (False, False): "ok"}[(flagged, defect)])
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(base + "/review")
                page.fill("#reviewer", "ana")
                page.wait_for_selector(".card")
                page.wait_for_function("[...document.querySelectorAll('.card img')].every(i => i.complete "
                                       "&& i.naturalWidth > 0)")
                # the slider moved up: what that threshold would change on the reviewed decisions
                page.eval_on_selector("#thr", "el => { el.value = '0.9'; el.dispatchEvent(new Event('input')); }")
                page.screenshot(path=os.path.join(args.out, "review_page.png"))
                page.locator(".card", has=page.locator(".anomalous")).first.click()
                page.wait_for_function("document.getElementById('large-overlay').complete")
                page.locator("#side").screenshot(path=os.path.join(args.out, "review_open.png"))
                browser.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name in ("review_page.png", "review_open.png"):
        shrink(os.path.join(args.out, name), args.max_kb)


if __name__ == "__main__":
    main()
