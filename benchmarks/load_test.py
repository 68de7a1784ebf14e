"""Load test of the HTTP service on loopback: N concurrent clients, bounded in requests and time.

    python benchmarks/load_test.py output/best_model --images ../shared/data/mvtec_screw/test/good -c 8 -n 200

Starts `uadkit --serve` on 127.0.0.1 (a free port), sends base64 images from --images, and prints
requests/s, p50/p99 latency and the number of failed requests; stops the server when done.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from uadkit.data.image_io import list_images  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--images", required=True)
    ap.add_argument("-c", "--concurrency", type=int, default=8)
    ap.add_argument("-n", "--requests", type=int, default=200)
    ap.add_argument("--max-seconds", type=float, default=300)
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
                time.sleep(0.1)
        bodies = [json.dumps({"image": base64.b64encode(open(p, "rb").read()).decode()}).encode()
                  for p in list_images(args.images)[:32]]
        deadline = time.time() + args.max_seconds

        def one(i: int) -> tuple[float, bool]:
            if time.time() > deadline:
                return 0.0, False
            req = urllib.request.Request(base + "/image-anomaly-detection", data=bodies[i % len(bodies)],
                                         headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    ok = r.status == 200 and json.loads(r.read())["errorCode"] == 0
            except Exception:
                ok = False
            return time.perf_counter() - t0, ok

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - t0
        lat = np.array([t for t, ok in results if ok])
        print(json.dumps({
            "requests": args.requests, "concurrency": args.concurrency, "failed": sum(not ok for _, ok in results),
            "requests_per_s": round(len(lat) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 1) if len(lat) else None,
        }, indent=2))
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
