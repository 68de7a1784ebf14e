"""The pipeline, and the HTTP service started for real on loopback, plus its web page in Chromium."""

import base64
import io
import json
import os
import shutil
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from live_server import live_server
from PIL import Image

from uadkit import create_model, create_pipeline
from uadkit.cli import main
from uadkit.errors import UadkitError

MAX_PIXELS = 300 * 300


def test_pipeline_gives_same_results_as_model(trained, demo_dir, tmp_path):
    best = os.path.join(trained, "best_model")
    pipe = create_pipeline("anomaly_detection", model_dir=best)
    a = [r["pred_score"] for r in pipe.predict(os.path.join(demo_dir, "test"))]
    b = [r["pred_score"] for r in create_model(model_dir=best).predict(os.path.join(demo_dir, "test"))]
    assert a == b
    rc = main(["--pipeline", "anomaly_detection", "--model_dir", best, "--input", f"{demo_dir}/test/stain",
               "--save_path", str(tmp_path)])
    assert rc == 0 and len([f for f in os.listdir(tmp_path) if f.endswith("_res.json")]) == 3
    with pytest.raises(UadkitError, match="model_dir"):
        create_pipeline("anomaly_detection")
    with pytest.raises(UadkitError, match="unknown pipeline"):
        create_pipeline("segmentation", model_dir=best)


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    # the server's output goes to a log file (a pipe nobody reads would stall it once full)
    with live_server(os.path.join(trained, "best_model"), tmp_path_factory.mktemp("serve"),
                     max_pixels=MAX_PIXELS, max_body_mb=1, max_batch=4, batch_wait_ms=20) as (base, _, _):
        yield base


def _post(base, payload, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(base + "/image-anomaly-detection", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _b64(path) -> str:
    return base64.b64encode(open(path, "rb").read()).decode()


def test_health_and_openapi(server):
    h = json.loads(urllib.request.urlopen(server + "/health").read())
    assert h["status"] == "ok" and h["model"] == "STFPM"
    spec = json.loads(urllib.request.urlopen(server + "/openapi.json").read())
    assert "/image-anomaly-detection" in spec["paths"]


def test_detect_paddlex_compatible_and_equal_to_local(server, trained, demo_dir):
    path = os.path.join(demo_dir, "test/scratch/002.png")
    status, body = _post(server, {"image": _b64(path)})
    assert status == 200 and body["errorCode"] == 0 and body["errorMsg"] == "Success" and body["logId"]
    res = body["result"]
    h, w = res["size"]
    assert (h, w) == (128, 128) and len(res["labelMap"]) == h * w and set(res["labelMap"]) <= {0, 1}
    assert Image.open(io.BytesIO(base64.b64decode(res["image"]))).size == (w, h)
    [local] = create_model(model_dir=os.path.join(trained, "best_model")).predict(path)
    assert res["score"] == pytest.approx(local["pred_score"], abs=1e-6) and res["label"] == local["pred_label"]
    assert res["labelMap"] == local["pred_mask"].ravel().tolist()


@pytest.mark.parametrize("payload,status,needle", [
    ({"image": base64.b64encode(b"hello, not an image").decode()}, 400, "not a decodable image"),
    ({"image": "iVBORw0KGgo%%%"}, 400, "invalid base64"),
    ({"image": "http://127.0.0.1:1/x.png"}, 403, "disabled"),
    ({"image": "/etc/passwd"}, 400, "base64"),
    ({"image": "file:///etc/passwd"}, 400, "base64"),
    ({"img": "x"}, 422, "expected JSON"),
    ([1, 2], 422, "expected JSON"),
])
def test_bad_requests_get_4xx_json(server, payload, status, needle):
    code, body = _post(server, payload)
    assert code == status and body["errorCode"] == status and needle in body["errorMsg"]


def test_truncated_huge_oversized_and_non_json(server, demo_dir):
    data = open(os.path.join(demo_dir, "test/good/000.png"), "rb").read()
    code, body = _post(server, {"image": base64.b64encode(data[: len(data) // 3]).decode()})
    assert code == 400 and ("truncated" in body["errorMsg"] or "decodable" in body["errorMsg"])
    buf = io.BytesIO()
    Image.new("L", (600, 600)).save(buf, "PNG")  # small file, too many pixels
    code, body = _post(server, {"image": base64.b64encode(buf.getvalue()).decode()})
    assert code == 413 and "exceeds" in body["errorMsg"]
    code, body = _post(server, None, raw=b"{" + b" " * (2 * 1024 * 1024) + b"}")
    assert code == 413
    code, body = _post(server, None, raw=b"not json")
    assert code == 400 and "JSON" in body["errorMsg"]


def test_concurrent_requests_are_batched_without_cross_talk(server, trained, demo_dir):
    paths = sorted(os.path.join(demo_dir, "test", d, f) for d in ("good", "scratch", "stain")
                   for f in os.listdir(os.path.join(demo_dir, "test", d)))
    local = {p: r["pred_score"] for p, r in zip(paths, create_model(
        model_dir=os.path.join(trained, "best_model")).predict(paths))}
    jobs = paths * 2
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: _post(server, {"image": _b64(p)}), jobs))
    assert all(code == 200 for code, _ in answers)
    for p, (_, body) in zip(jobs, answers):
        assert body["result"]["score"] == pytest.approx(local[p], abs=1e-5)


def test_url_fetch_allowed_only_for_listed_hosts(trained, demo_dir, tmp_path):
    import functools
    import http.server
    import threading

    from fastapi.testclient import TestClient

    from uadkit.pipeline import AnomalyDetectionPipeline, load_pipeline_config
    from uadkit.serving.app import create_app

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=demo_dir)
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    cfg = load_pipeline_config("anomaly_detection")
    cfg["SubModules"]["AnomalyDetection"]["model_dir"] = os.path.join(trained, "best_model")
    cfg["Serving"].update({"allow_url_fetch": True, "url_allow_hosts": ["127.0.0.1"],
                           "records_dir": str(tmp_path / "records")})
    try:
        with TestClient(create_app(AnomalyDetectionPipeline(cfg))) as client:
            url = f"http://127.0.0.1:{files.server_address[1]}/test/stain/000.png"
            r = client.post("/image-anomaly-detection", json={"image": url})
            assert r.status_code == 200 and r.json()["result"]["size"] == [128, 128]
            r = client.post("/image-anomaly-detection", json={"image": "http://localhost:1/x.png"})
            assert r.status_code == 403 and "allow-list" in r.json()["errorMsg"]
            r = client.post("/image-anomaly-detection", json={"image": url.replace("000.png", "nope.png")})
            assert r.status_code == 400 and "could not be downloaded" in r.json()["errorMsg"]
    finally:
        files.shutdown()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(os.environ.get("CI") != "true" and CHROMIUM is None, reason="Debian chromium not installed")
def test_web_page_in_headless_chromium(server, demo_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "CI must install Debian's chromium (.ci/run does)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        page.goto(server + "/")
        page.set_input_files("#file", os.path.join(demo_dir, "test/stain/001.png"))
        page.wait_for_function("document.getElementById('score').textContent.length > 0", timeout=60000)
        label = page.inner_text("#label")
        score = float(page.inner_text("#score"))
        assert label in ("normal", "anomalous") and 0 <= score <= 1
        assert page.eval_on_selector("#overlay", "img => img.naturalWidth") == 128
        page.screenshot(path=str(tmp_path / "page.png"))
        # an invalid file shows an error message instead of a result
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"nope")
        page.set_input_files("#file", str(bad))
        page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30000)
        assert "not a decodable image" in page.inner_text("#error")
        browser.close()
    assert Image.open(tmp_path / "page.png").size == (1000, 900)
