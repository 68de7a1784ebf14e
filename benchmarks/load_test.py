"""Load test of the HTTP service on loopback: N concurrent clients, bounded in requests and time.

    python benchmarks/load_test.py output/best_model --images ../shared/data/mvtec_screw/test/good
    python benchmarks/load_test.py output/best_model -c 4 -n 100          # generated 512x512 images

Starts `uadkit --serve` on 127.0.0.1 (a free port), sends base64 images from --images (or generated
512x512 PNGs) from -c clients, -n requests in all, of which --bad-fraction are bad requests (truncated
images, junk base64, broken or deeply nested JSON, a decompression bomb, a huge body), and prints
requests/s, p50/p99 latency of the good requests, failures (a good request not answered 200, or a bad one
answered other than 4xx), and the server's memory before, after and at its peak. Stops the server.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from fuzz_corpus import png_bomb  # noqa: E402

from uadkit.data.image_io import list_images  # noqa: E402


def memory_mb(pid: int) -> dict[str, float]:
    out = {}
    for line in open(f"/proc/{pid}/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def generated_images(n: int = 16, size: int = 512) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        y, x = np.mgrid[0:size, 0:size]
        a = (128 + 60 * np.sin(x / rng.uniform(8, 30)) * np.cos(y / rng.uniform(8, 30))
             + rng.normal(0, 8, (size, size))).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(np.stack([a] * 3, -1)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def bad_requests(good: bytes) -> list[tuple[str, bytes]]:
    """(kind, request body) pairs that a correct server answers with a 4xx."""
    b64 = lambda data: json.dumps({"image": base64.b64encode(data).decode()}).encode()  # noqa: E731
    return [
        ("truncated image", b64(good[: len(good) // 3])),
        ("not an image", b64(b"hello, not an image" * 10)),
        ("invalid base64", b'{"image": "iVBORw0KGgo%%%"}'),
        ("not JSON", b"not json at all"),
        ("deeply nested JSON", b"[" * 50000 + b"]" * 50000),
        ("wrong field", b'{"img": "x"}'),
        ("server path", b'{"image": "/etc/passwd"}'),
        ("decompression bomb", b64(png_bomb(20000, 20000))),
        ("body too large", b'{"image": "' + b"A" * (21 * 1024 * 1024) + b'"}'),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--images", help="folder of images to send (default: generated 512x512 PNGs)")
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("-n", "--requests", type=int, default=1000)
    ap.add_argument("--bad-fraction", type=float, default=0.1)
    ap.add_argument("--max-seconds", type=float, default=600)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.join(os.path.dirname(__file__), "..")
    server = subprocess.Popen([sys.executable, os.path.join(root, "main.py"), "--serve", "--model_dir",
                               args.model_dir, "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit("the server did not start")
                time.sleep(0.1)
        images = [open(p, "rb").read() for p in list_images(args.images)[:32]] if args.images else generated_images()
        good = [json.dumps({"image": base64.b64encode(d).decode()}).encode() for d in images]
        bad = bad_requests(images[0])
        rng = random.Random(0)
        plan = [("bad", *rng.choice(bad)) if rng.random() < args.bad_fraction
                else ("good", "image", good[i % len(good)]) for i in range(args.requests)]
        urllib.request.urlopen(urllib.request.Request(base + "/image-anomaly-detection", data=good[0]),
                               timeout=120).read()  # warm-up, not counted
        mem_before = memory_mb(server.pid)
        deadline = time.time() + args.max_seconds

        def one(item: tuple[str, str, bytes]) -> tuple[str, str, float, int]:
            what, kind, body = item
            if time.time() > deadline:
                return what, kind, 0.0, -1
            req = urllib.request.Request(base + "/image-anomaly-detection", data=body,
                                         headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    code = r.status if json.loads(r.read())["errorCode"] == 0 else -2
            except urllib.error.HTTPError as e:
                code = e.code
            except (OSError, ValueError):
                code = -1  # reset, timeout, or an answer that is not JSON
            return what, kind, time.perf_counter() - t0, code

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(one, plan))
        wall = time.perf_counter() - t0
        mem_after = memory_mb(server.pid)
        ok = [t for what, _, t, code in results if what == "good" and code == 200]
        failed_good = sum(what == "good" and code != 200 for what, _, _, code in results)
        # a refused huge body may reach the client as a reset while it is still sending: not a server failure
        failed_bad = [(kind, code) for what, kind, _, code in results if what == "bad" and not 400 <= code < 500
                      and not (kind == "body too large" and code == -1)]
        print(json.dumps({
            "requests": args.requests, "concurrency": args.concurrency, "wall_s": round(wall, 1),
            "good_requests": sum(w == "good" for w, *_ in results),
            "bad_requests": sum(w == "bad" for w, *_ in results),
            "requests_per_s": round(len(results) / wall, 2), "good_per_s": round(len(ok) / wall, 2),
            "p50_ms": round(float(np.percentile(ok, 50)) * 1000, 1) if ok else None,
            "p99_ms": round(float(np.percentile(ok, 99)) * 1000, 1) if ok else None,
            "failed_good": failed_good, "failed_bad": len(failed_bad), "failed_bad_kinds": sorted(set(failed_bad)),
            "server_mb_before": mem_before["VmRSS"], "server_mb_after": mem_after["VmRSS"],
            "server_mb_peak": mem_after["VmHWM"],
        }, indent=2))
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
