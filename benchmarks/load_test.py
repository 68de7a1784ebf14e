"""Load test of the HTTP service on loopback: N concurrent clients, bounded in requests and time, with the
record of every decision off and on (issue 13: recording must cost under 10% of requests/s and p99).

    # the issue's measurement: the same model and requests with recording off, then on; 3 rounds each
    python benchmarks/load_test.py output/best_model -n 1000 -c 16 --bad-fraction 0 --record both --rounds 3
    python benchmarks/load_test.py output/best_model --images ../shared/data/mvtec_screw/test/good --record off
    python benchmarks/load_test.py output/best_model -c 4 -n 100          # generated 512x512 images

Each run starts `main.py --serve` on 127.0.0.1 (a free port; tests/live_server.py) with its own records
folder under --workdir, sends one warm-up request (not timed, but recorded), then -n requests from -c
clients: base64 images from --images (or generated 512x512 PNGs), of which --bad-fraction are bad requests
(truncated images, junk base64, broken or deeply nested JSON, a decompression bomb, a huge body). It reports
requests/s, p50/p99 latency of the good requests, failures (a good request not answered 200, or a bad one
answered other than 4xx), the server's memory, and with recording on the rows in the database once the
server has stopped (all queued records written) against the successful requests + the warm-up. With
--rounds R, modes alternate (off, on, on, off, ...) so drift on the machine hits both, and the table's last
rows are the medians; the on/off ratios compare those medians. --json FILE keeps every run.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from fuzz_corpus import png_bomb  # noqa: E402
from live_server import live_server, memory_kb  # noqa: E402

from uadkit.data.image_io import list_images  # noqa: E402
from uadkit.serving.records import default_db  # noqa: E402

WARMUP = 1  # requests before the timed ones (recorded too)


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


def count_rows(url: str) -> int:
    import sqlalchemy as sa

    from uadkit.serving.records import decisions, make_engine, migrate

    engine = make_engine(url)
    try:
        migrate(engine)  # an empty --db gets its tables: 0 rows, not an error
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(decisions)).scalar_one())
    finally:
        engine.dispose()


def one_run(args: argparse.Namespace, record: bool, plan: list[tuple[str, str, bytes]], warm: bytes,
            folder: str) -> dict[str, Any]:
    """Start a server (recording on or off), send `plan`, stop it; the figures of this run."""
    os.makedirs(folder)
    serving = {"record": record, "max_batch": args.max_batch}
    db = args.db or default_db(os.path.join(folder, "records"))
    if record and args.db:
        serving["db"] = args.db
    rows_before = count_rows(db) if record and args.db else 0
    with live_server(args.model_dir, folder, **serving) as (base, proc, _):
        for _ in range(WARMUP):
            urllib.request.urlopen(urllib.request.Request(base + "/image-anomaly-detection", data=warm),
                                   timeout=120).read()
        mem_before = memory_kb(proc.pid)
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
        mem_after = memory_kb(proc.pid)
        health = json.loads(urllib.request.urlopen(base + "/health", timeout=30).read())
    # the server has stopped: its writer flushed every queued record before exiting
    ok = [t for what, _, t, code in results if what == "good" and code == 200]
    failed_good = sum(what == "good" and code != 200 for what, _, _, code in results)
    # a refused huge body may reach the client as a reset while it is still sending: not a server failure
    failed_bad = [(kind, code) for what, kind, _, code in results if what == "bad" and not 400 <= code < 500
                  and not (kind == "body too large" and code == -1)]
    out = {
        "record": "on" if record else "off", "requests": len(plan), "concurrency": args.concurrency,
        "wall_s": round(wall, 2), "good_requests": sum(w == "good" for w, *_ in results),
        "bad_requests": sum(w == "bad" for w, *_ in results), "ok": len(ok),
        "requests_per_s": round(len(results) / wall, 2), "good_per_s": round(len(ok) / wall, 2),
        "p50_ms": round(float(np.percentile(ok, 50)) * 1000, 1) if ok else None,
        "p99_ms": round(float(np.percentile(ok, 99)) * 1000, 1) if ok else None,
        "failed_good": failed_good, "failed_bad": len(failed_bad), "failed_bad_kinds": sorted(set(failed_bad)),
        "server_mb_before": round(mem_before["VmRSS"] / 1024, 1),
        "server_mb_after": round(mem_after["VmRSS"] / 1024, 1),
        "server_mb_peak": round(mem_after["VmHWM"] / 1024, 1),
    }
    if record:
        out["db_rows"] = count_rows(db) - rows_before
        out["db_rows_expected"] = len(ok) + WARMUP  # every answered image, the warm-up included
        stats = health["records"] or {}
        out["record_failures"] = {k: stats.get(k) for k in ("failed", "dropped", "file_errors")}
    return out


def table(runs: list[dict[str, Any]]) -> str:
    cols = [("record", "record", "{}"), ("req/s", "requests_per_s", "{:.2f}"), ("good/s", "good_per_s", "{:.2f}"),
            ("p50 ms", "p50_ms", "{:.1f}"), ("p99 ms", "p99_ms", "{:.1f}"), ("ok", "ok", "{}"),
            ("failed", "failures", "{}"), ("db rows", "rows", "{}"), ("peak MB", "server_mb_peak", "{:.0f}")]
    width = [12] + [9] * (len(cols) - 1)  # "off (median)"
    lines = [" | ".join(f"{h:>{w}}" for (h, _, _), w in zip(cols, width))]
    for r in runs:
        r = {**r, "failures": r["failed_good"] + r["failed_bad"],
             "rows": f"{r['db_rows']}/{r['db_rows_expected']}" if "db_rows" in r else "-"}
        lines.append(" | ".join(f"{fmt.format(r[k]) if r.get(k) is not None else '-':>{w}}"
                                for (_, k, fmt), w in zip(cols, width)))
    return "\n".join(lines)


def median_run(runs: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    mine = [r for r in runs if r["record"] == mode]
    med = {k: statistics.median(r[k] for r in mine) for k in ("requests_per_s", "good_per_s", "p50_ms", "p99_ms",
                                                                  "server_mb_peak") if all(r[k] is not None
                                                                                           for r in mine)}
    out: dict[str, Any] = {"record": f"{mode} (median)", "ok": sum(r["ok"] for r in mine),
                           "failed_good": sum(r["failed_good"] for r in mine),
                           "failed_bad": sum(r["failed_bad"] for r in mine), **med}
    if mode == "on":
        out["db_rows"] = sum(r["db_rows"] for r in mine)
        out["db_rows_expected"] = sum(r["db_rows_expected"] for r in mine)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--images", help="folder of images to send (default: generated 512x512 PNGs)")
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("-n", "--requests", type=int, default=1000)
    ap.add_argument("--bad-fraction", type=float, default=0.1)
    ap.add_argument("--record", choices=("off", "on", "both"), default="both",
                    help="the record of every decision (Serving.record) off, on, or both to compare")
    ap.add_argument("--rounds", type=int, default=1, help="runs per mode, alternating (medians reported)")
    ap.add_argument("--db", help="SQLAlchemy URL for recording on (default: an SQLite file per run)")
    ap.add_argument("--max-batch", type=int, default=8, help="Serving.max_batch")
    ap.add_argument("--max-seconds", type=float, default=600, help="per run; later requests count as failed")
    ap.add_argument("--workdir", help="where each run's records and server log go (default: a temp folder, "
                                      "deleted afterwards)")
    ap.add_argument("--json", help="write every run's figures to this file")
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(args.model_dir, "model.yaml")):
        sys.exit(f"model_dir '{args.model_dir}': no model.yaml (expected a trained model folder, e.g. "
                 "output/best_model)")
    if args.rounds < 1 or args.requests < 1 or args.concurrency < 1:
        sys.exit("--rounds, -n and -c: expected integers >= 1")
    images = [open(p, "rb").read() for p in list_images(args.images)[:32]] if args.images else generated_images()
    good = [json.dumps({"image": base64.b64encode(d).decode()}).encode() for d in images]
    bad = bad_requests(images[0])
    rng = random.Random(0)  # the same requests in every run
    plan = [("bad", *rng.choice(bad)) if rng.random() < args.bad_fraction
            else ("good", "image", good[i % len(good)]) for i in range(args.requests)]
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.record]
    order = [m for i in range(args.rounds) for m in (modes if i % 2 == 0 else modes[::-1])]
    work = args.workdir or tempfile.mkdtemp(prefix="uadkit-load-")
    runs: list[dict[str, Any]] = []
    try:
        for i, record in enumerate(order):
            print(f"run {i + 1}/{len(order)}: recording {'on' if record else 'off'}, {args.requests} requests "
                  f"from {args.concurrency} clients", file=sys.stderr, flush=True)
            runs.append(one_run(args, record, plan, good[0], os.path.join(work, f"run{i + 1}-"
                                                                          f"{'on' if record else 'off'}")))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    shown = runs + ([median_run(runs, m) for m in ("off", "on") if any(r["record"] == m for r in runs)]
                    if args.rounds > 1 else [])
    print(table(shown))
    summary: dict[str, Any] = {"runs": runs}
    if args.record == "both":
        off, on = median_run(runs, "off"), median_run(runs, "on")
        ratio = {k: round(on[k] / off[k], 3) if off.get(k) and on.get(k) is not None else None
                 for k in ("requests_per_s", "p50_ms", "p99_ms")}
        summary["on_off_ratio"] = ratio
        fails = sum(r["failed_good"] + r["failed_bad"] for r in runs)
        rows_match = all(r["db_rows"] == r["db_rows_expected"] for r in runs if "db_rows" in r)
        print(f"recording on/off: requests/s x{ratio['requests_per_s']}, p50 x{ratio['p50_ms']}, "
              f"p99 x{ratio['p99_ms']}  (issue 13 target: requests/s >= x0.90, p99 <= x1.10); "
              f"failures {fails}; db rows = successful requests + warm-up: {'yes' if rows_match else 'NO'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
