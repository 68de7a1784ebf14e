"""Start the real service (`main.py --serve`) on 127.0.0.1 for a test, and talk to it over HTTP.
Also used by benchmarks/load_test.py and scripts/screenshots.py (one way to start it and wait for it)."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, log_path: str | os.PathLike, timeout: float = 120) -> None:
    """Until GET /health answers; the server's log as the error if it exits or stays silent."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=1).read()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                why = "exited" if proc.poll() is not None else f"no /health answer within {timeout:g} s"
                raise RuntimeError(f"server {why}:\n{open(log_path).read()}") from None
            time.sleep(0.1)


@contextmanager
def live_server(model_dir: str, folder: str | os.PathLike, **serving):
    """Yields (base_url, process, log_path); the log holds everything the server printed. `serving`: keys
    of the pipeline's Serving section (records go under `folder`/records, never the repo's output/)."""
    folder = Path(folder)
    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "pipelines", "anomaly_detection.yaml")))
    cfg["Serving"].update({"records_dir": str(folder / "records"), **serving})
    (folder / "pipe.yaml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log_path = folder / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), "--serve", "--pipeline",
                             str(folder / "pipe.yaml"), "--model_dir", os.path.abspath(model_dir), "--port",
                             str(port)], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log_path)
        yield base, proc, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def post(base: str, payload=None, raw: bytes | None = None, timeout: float = 60) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(base + "/image-anomaly-detection", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, {"raw": body.decode(errors="replace")}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in kB."""
    out = {}
    for line in open(f"/proc/{pid}/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def health_ok(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/health", timeout=10) as r:
            return r.status == 200
    except OSError:
        return False


def file_b64(path: str) -> str:
    with open(path, "rb") as f:
        return b64(f.read())
