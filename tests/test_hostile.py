"""Issue 14, finding by finding: what a clumsy user and an attacker did to the CLI, the API and the service.

The service runs for real (`main.py --serve`) on 127.0.0.1 with short timeouts; URL fetching is tested
against a local HTTP server on 127.0.0.1 only.
"""

import functools
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fuzz_corpus import png_bomb
from live_server import b64, file_b64, health_ok, live_server, memory_kb, post
from PIL import Image

from uadkit import create_model
from uadkit.cli import main
from uadkit.config import parse_override
from uadkit.errors import UadkitError

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
SERVICE_MAX_PIXELS = 3000 * 3000
ANSWER_PIXELS = 512 * 512


class _Files(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, plus /redirect?to=URL (302) and /drip (a body that trickles in forever)."""

    def do_GET(self):
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path.split("=", 1)[1])
            self.end_headers()
        elif self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(200):
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
                    time.sleep(0.25)
            except OSError:
                pass
        else:
            super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def files(demo_dir):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Files, directory=demo_dir))
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(scope="module")
def service(trained, files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile_serve")
    with live_server(os.path.join(trained, "best_model"), folder, max_pixels=SERVICE_MAX_PIXELS,
                     max_pending_pixels=SERVICE_MAX_PIXELS, max_answer_pixels=ANSWER_PIXELS, max_body_mb=8,
                     header_timeout_s=1, body_timeout_s=2, max_connections=12, url_timeout_s=2,
                     allow_url_fetch=True, url_allow_hosts=[files]) as running:
        yield running


def _png(w: int, h: int, seed: int = 0) -> bytes:
    y = np.linspace(0, 200, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 50, w, dtype=np.float32)[None, :]
    a = ((y + x + seed * 7) % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.repeat(a[..., None], 3, axis=2)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


# 1. JPEGs as plain base64 start with "/9j/": that is base64, not a server path.
def test_plain_base64_jpeg_is_accepted(service):
    base = service[0]
    text = file_b64(os.path.join(ASSETS, "chelsea.jpg"))
    assert text.startswith("/9j/")
    code, body = post(base, {"image": text})
    assert code == 200 and body["result"]["imageSize"] == list(np.asarray(
        Image.open(os.path.join(ASSETS, "chelsea.jpg"))).shape[:2])
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))  # the `base64` tool's output
    assert post(base, {"image": wrapped})[0] == 200
    for path in ("/etc/passwd", "file:///etc/passwd", "C:/Windows/x.png", "~/x.png"):
        code, body = post(base, {"image": path})
        assert code == 400 and "base64" in body["errorMsg"]


# 2. One pixel budget, checked from the header before decoding, in the CLI, the API and the service.
def test_pixel_budget_refuses_bombs_before_decoding(trained, tmp_path, capfd):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(20000, 20000))  # ~50 KB claiming 400 megapixels
    model = create_model(model_dir=os.path.join(trained, "best_model"))
    t0 = time.monotonic()
    with pytest.raises(UadkitError, match=r"bomb.png: 20000x20000 = 400000000 pixels exceeds the limit of "
                                          r"25000000 \(Predict.max_pixels\)"):
        list(model.predict(str(bomb)))
    with pytest.raises(UadkitError, match="input array 0: 30000x30000 .* exceeds"):
        list(model.predict(np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (30000, 30000, 3))))
    assert time.monotonic() - t0 < 5
    small = tmp_path / "small.png"
    small.write_bytes(_png(64, 48))
    with pytest.raises(UadkitError, match=r"64x48 = 3072 pixels exceeds the limit of 3000"):
        list(model.predict(str(small), max_pixels=3000))
    rc = main(["-c", "configs/STFPM.yaml", "-o", "Global.mode=predict", "-o", f"Predict.model_dir={trained}/best_model",
               "-o", f"Predict.input={bomb}", "-o", f"Global.output={tmp_path}/out"])
    err = capfd.readouterr().err
    assert rc == 2 and err.strip().splitlines() == [
        f"uadkit: error: {bomb}: 20000x20000 = 400000000 pixels exceeds the limit of 25000000 (Predict.max_pixels)"]


def test_service_refuses_big_images_and_answers_large_ones_reduced(service):
    base = service[0]
    code, body = post(base, {"image": b64(png_bomb(6300, 6300, 8, 2))})
    assert code == 413 and "6300x6300" in body["errorMsg"] and "Serving.max_pixels" in body["errorMsg"]
    code, body = post(base, {"image": b64(_png(1200, 900))})
    res = body["result"]
    assert code == 200 and res["imageSize"] == [900, 1200]
    h, w = res["size"]
    assert h * w <= ANSWER_PIXELS and abs(w / h - 1200 / 900) < 0.01  # reduced, same aspect
    assert len(res["labelMap"]) == h * w and set(res["labelMap"]) <= {0, 1}
    import base64

    assert Image.open(io.BytesIO(base64.b64decode(res["image"]))).size == (w, h)
    code, body = post(base, {"image": b64(_png(300, 200))})  # normal size: PaddleX form, full resolution
    assert code == 200 and body["result"]["size"] == body["result"]["imageSize"] == [200, 300]
    assert len(body["result"]["labelMap"]) == 300 * 200


def test_health_answers_while_large_requests_run_and_memory_comes_back(service):
    base, proc, _ = service
    post(base, {"image": b64(_png(2900, 2900, 9))})  # warm up once at full size
    before = memory_kb(proc.pid)["VmRSS"]
    bodies = [b64(_png(2900, 2900, k)) for k in range(3)]
    with ThreadPoolExecutor(3) as pool:
        answers = pool.map(lambda t: post(base, {"image": t}, timeout=120), bodies)
        waits = []
        for _ in range(12):
            t0 = time.monotonic()
            assert health_ok(base)
            waits.append(time.monotonic() - t0)
            time.sleep(0.1)
        assert all(code == 200 for code, _ in answers)
    assert max(waits) < 1.0, waits
    time.sleep(0.5)
    after = memory_kb(proc.pid)["VmRSS"]
    assert after - before < 150 * 1024, (before, after)  # kB: freed memory goes back to the OS


# 3. Zero-size and other odd arrays are one-line errors, and do not stop the other inputs.
def test_zero_size_arrays(trained):
    model = create_model(model_dir=os.path.join(trained, "best_model"))
    for shape in ((0, 0, 3), (0, 10, 3), (10, 0, 3), (0, 0)):
        with pytest.raises(UadkitError, match=r"input array 0: image has no pixels"):
            list(model.predict(np.zeros(shape, np.uint8)))
    good = np.full((20, 30, 3), 120, np.uint8)
    run = model.predict([np.zeros((0, 10, 3), np.uint8), good, np.zeros((4, 4, 2), np.uint8)], batch_size=3)
    results = list(run)
    assert [r["input_path"] for r in results] == ["array_1"] and results[0]["pred_mask"].shape == (20, 30)
    assert [f.input_path for f in run.failures] == ["array_0", "array_2"]


# 4. Deeply nested JSON is a 400 with a JSON body, not a plain-text 500.
def test_deeply_nested_json(service):
    for raw in (b"[" * 100000 + b"]" * 100000, b'{"a":' * 50000 + b"1" + b"}" * 50000):
        code, body = post(service[0], raw=raw)
        assert code == 400 and body["errorCode"] == 400 and "not valid JSON" in body["errorMsg"]
    assert health_ok(service[0])


# 5. Folder prediction goes on past bad files, lists them, and exits 1; `on_error: stop` stops.
@pytest.fixture
def mixed_folder(demo_dir, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, name in enumerate(sorted(os.listdir(os.path.join(demo_dir, "test", "good")))):
        shutil.copy(os.path.join(demo_dir, "test", "good", name), folder / f"{i}_good.png")
    (folder / "1_bad.png").write_text("not an image")
    data = (folder / "0_good.png").read_bytes()
    (folder / "2_truncated.png").write_bytes(data[: len(data) // 2])
    return folder


def _cli(*args, timeout=180):
    return subprocess.run([sys.executable, "main.py", *args], capture_output=True, text=True, timeout=timeout)


def test_folder_prediction_goes_on_past_bad_files(trained, mixed_folder, tmp_path, capfd):
    base = ["-c", "configs/STFPM.yaml", "-o", "Global.mode=predict", "-o", f"Predict.model_dir={trained}/best_model",
            "-o", f"Predict.input={mixed_folder}", "-o", "Predict.batch_size=4"]
    rc = main(base + ["-o", f"Global.output={tmp_path}/skip"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err == [f"uadkit: skipped: {mixed_folder}/1_bad.png: not an image (unrecognised format)",
                   f"uadkit: skipped: {mixed_folder}/2_truncated.png: corrupt or truncated image "
                   f"({err[1].split('(', 1)[1]}"]
    summary = json.load(open(tmp_path / "skip" / "predict" / "predict_result.json"))
    assert [os.path.basename(s["input_path"]) for s in summary] == sorted(os.listdir(mixed_folder))
    failed = [s for s in summary if s.get("error")]
    assert [os.path.basename(s["input_path"]) for s in failed] == ["1_bad.png", "2_truncated.png"]
    assert all(s["pred_label"] == "error" and s["pred_score"] is None for s in failed)
    good = [s for s in summary if not s.get("error")]
    assert len(good) == 4 and all(0 <= s["pred_score"] <= 1 for s in good)
    # the good images batched with a bad one got the same scores as one by one
    model = create_model(model_dir=os.path.join(trained, "best_model"))
    alone = {r["input_path"]: r["pred_score"] for r in model.predict(
        [str(mixed_folder / f"{i}_good.png") for i in range(4)], batch_size=1)}
    assert {s["input_path"]: s["pred_score"] for s in good} == pytest.approx(alone, abs=1e-5)
    rc = main(base + ["-o", f"Global.output={tmp_path}/stop", "-o", "Predict.on_error=stop"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"uadkit: error: {mixed_folder}/1_bad.png: not an image (unrecognised format)"]
    stopped = json.load(open(tmp_path / "stop" / "predict" / "predict_result.json"))
    assert [os.path.basename(s["input_path"]) for s in stopped] == ["0_good.png", "1_bad.png"]
    (tmp_path / "allbad").mkdir()
    for i in range(3):
        (tmp_path / "allbad" / f"{i}.png").write_bytes(b"junk")
    rc = main(base[:-4] + ["-o", f"Predict.input={tmp_path}/allbad", "-o", f"Global.output={tmp_path}/allbad_out"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 4 and err[-1].startswith("uadkit: error: none of the 3 inputs could be predicted")


def test_loader_workers_keep_errors_to_one_line(trained, mixed_folder, tmp_path):
    r = _cli("-c", "configs/STFPM.yaml", "-o", "Global.mode=predict", "-o", f"Predict.model_dir={trained}/best_model",
             "-o", f"Predict.input={mixed_folder}", "-o", "Predict.num_workers=2", "-o", "Predict.batch_size=2",
             "-o", f"Global.output={tmp_path}/w", "-o", "Predict.save_images=false")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert [ln.split(":")[1].strip() for ln in r.stderr.strip().splitlines()] == ["skipped", "skipped"]
    assert len(json.load(open(tmp_path / "w" / "predict" / "predict_result.json"))) == 6


# 6. -o Predict.input takes file names verbatim; FIFOs and device links are named for what they are.
def test_odd_file_names_fifos_and_devices(trained, demo_dir, tmp_path, capfd):
    assert parse_override("Predict.input=colon: space.png") == (["Predict", "input"], "colon: space.png")
    assert parse_override("Predict.input=hash #1.png") == (["Predict", "input"], "hash #1.png")
    assert parse_override("Predict.input='quoted name.png'") == (["Predict", "input"], "quoted name.png")
    assert parse_override("Predict.input=null") == (["Predict", "input"], None)
    assert parse_override("Predict.model_dir=out: 1/best") == (["Predict", "model_dir"], "out: 1/best")
    src = os.path.join(demo_dir, "test", "good", "000.png")
    base = ["-c", "configs/STFPM.yaml", "-o", "Global.mode=predict", "-o", f"Predict.model_dir={trained}/best_model",
            "-o", f"Global.output={tmp_path}/out"]
    for name in ("colon: space.png", "hash #1.png"):
        shutil.copy(src, tmp_path / name)
        assert main(base + ["-o", f"Predict.input={tmp_path / name}"]) == 0
        assert capfd.readouterr().out.startswith(f"{tmp_path / name}: ")
    os.mkfifo(tmp_path / "fifo.png")
    os.symlink("/dev/zero", tmp_path / "zero.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "broken.png")
    for name, why in (("fifo.png", "is a FIFO (named pipe), expected an image file"),
                      ("zero.png", "is a character device, expected an image file"),
                      ("broken.png", "broken symbolic link")):
        r = _cli(*base, "-o", f"Predict.input={tmp_path / name}", timeout=60)  # a FIFO read would hang
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"uadkit: error: {tmp_path / name}: {why}"]


# 7. Slow clients are dropped; connections are capped; a disconnect is one quiet line.
def _open(base: str) -> socket.socket:
    host, port = base.rsplit("/", 1)[1].split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing, or None if it kept the connection open that long."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return data


def test_slow_clients_are_dropped(service):
    base, _, log_path = service
    stalled = []
    for _ in range(20):
        s = _open(base)
        s.sendall(b"POST /image-anomaly-detection HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        stalled.append(s)
    t0 = time.monotonic()
    assert all(_closed_within(s, 6) is not None for s in stalled)
    assert time.monotonic() - t0 < 6
    s = _open(base)
    s.sendall(b"POST /image-anomaly-detection HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 5000\r\n\r\n{\"image\": \"")  # body never finishes
    answer = _closed_within(s, 8)
    assert answer is not None and answer.startswith(b"HTTP/1.1 408")
    s = _open(base)  # a client that disconnects mid-body
    s.sendall(b"POST /image-anomaly-detection HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{\"im")
    time.sleep(0.3)
    s.close()
    time.sleep(0.5)
    assert health_ok(base)
    log = log_path.read_text()
    assert "Traceback" not in log and "client disconnected before sending its whole body" in log
    assert "request headers not received within 1 s; connection closed" in log


def test_connections_are_capped(service):
    base = service[0]
    held = []
    for _ in range(14):  # over the cap of 12, stalled in their headers
        s = _open(base)
        s.sendall(b"GET /health HTTP/1.1\r\n")
        held.append(s)
    time.sleep(0.2)
    code, _ = post(base, {"image": file_b64(os.path.join(ASSETS, "coffee.jpg"))}, timeout=10)
    assert code == 503
    for s in held:
        _closed_within(s, 5)
        s.close()
    assert post(base, {"image": file_b64(os.path.join(ASSETS, "coffee.jpg"))})[0] == 200


# 8. URL fetching (when on): every redirect hop must be allowed; url_timeout_s is a total deadline.
def test_url_redirects_and_slow_downloads(service, files):
    base = service[0]
    code, body = post(base, {"image": f"http://{files}/test/good/000.png"})
    assert code == 200
    svc_port = base.rsplit(":", 1)[1]
    for target in (f"http://localhost:{files.split(':')[1]}/test/good/000.png", f"http://127.0.0.1:{svc_port}/health",
                   "file:///etc/passwd"):
        code, body = post(base, {"image": f"http://{files}/redirect?to={target}"})
        assert code == 400 and ("allow-list" in body["errorMsg"] or "edirect" in body["errorMsg"]), body
    code, body = post(base, {"image": f"http://{files.replace('127.0.0.1', 'localhost')}/test/good/000.png"})
    assert code == 403
    t0 = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        drips = [pool.submit(post, base, {"image": f"http://{files}/drip"}) for _ in range(2)]
        time.sleep(0.3)
        upload = post(base, {"image": file_b64(os.path.join(ASSETS, "coffee.jpg"))})
        t_upload = time.monotonic() - t0
        answers = [d.result() for d in drips]
    assert upload[0] == 200 and t_upload < 2  # slow downloads hold no decoding thread
    assert all(code == 400 and "within 2 s" in body["errorMsg"] for code, body in answers), answers
    assert time.monotonic() - t0 < 5


# 9. `--serve` without the serve extra: one line naming it, exit 2.
def test_serve_without_extra_is_one_line(trained):
    code = ("import sys; sys.modules['fastapi'] = None; from uadkit.cli import main; "
            f"sys.exit(main(['--serve', '--model_dir', {os.path.join(trained, 'best_model')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "uadkit: error: --serve needs the 'serve' extra (fastapi is not installed): pip install -e .[serve]  "
        "(scripts/setup.sh installs it)"]
    setup = open("scripts/setup.sh").read()
    assert 'extra="[serve]"' in setup  # the README's plain setup installs what `uadkit --serve` needs


# 10. The batcher's statistics stay bounded however long the service runs.
def test_batch_statistics_are_bounded(trained):
    from fastapi.testclient import TestClient

    from uadkit.pipeline import AnomalyDetectionPipeline, load_pipeline_config
    from uadkit.serving.app import create_app

    cfg = load_pipeline_config("anomaly_detection")
    cfg["SubModules"]["AnomalyDetection"]["model_dir"] = os.path.join(trained, "best_model")
    cfg["Serving"].update({"max_batch": 3, "batch_wait_ms": 30, "record": False})
    image = file_b64(os.path.join(ASSETS, "coffee.jpg"))
    with TestClient(create_app(AnomalyDetectionPipeline(cfg))) as client:
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda _: client.post("/image-anomaly-detection", json={"image": image}).status_code,
                                  range(30)))
        stats = client.app.state.batcher.batch_sizes
    assert codes == [200] * 30
    assert sum(k * n for k, n in stats.items()) == 30 and set(stats) <= {1, 2, 3}
