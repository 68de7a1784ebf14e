"""The HTTP service (FastAPI on uvicorn) and its web page.

POST /image-anomaly-detection {"image": <base64 | http(s) URL>} answers PaddleX-compatible JSON
{logId, errorCode, errorMsg, result: {labelMap, size, image}} plus `score` and `label`.
Bad input gets a 4xx JSON error. Concurrent requests are queued and run in batches by one worker, so
requests never share state.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import os
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image

from .. import __version__
from ..data.image_io import ImageSource, decode_image_bytes, fetch_url
from ..errors import UadkitError
from ..pipeline import AnomalyDetectionPipeline

PAGE = os.path.join(os.path.dirname(__file__), "page.html")


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str, log_id: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"logId": log_id or uuid.uuid4().hex, "errorCode": status,
                                                     "errorMsg": message})


class Batcher:
    """Collects concurrent requests into batches of up to `max_batch` images for one model worker."""

    def __init__(self, pipeline: AnomalyDetectionPipeline, max_batch: int, wait_ms: float) -> None:
        self.predictor = pipeline.detector.predictor(pipeline.threshold)
        self.max_batch, self.wait = max_batch, wait_ms / 1000
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="uadkit-model")
        self.batches: list[int] = []  # sizes of the batches run (for tests and stats)

    async def submit(self, name: str, image: np.ndarray):
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((name, image, fut))
        return await fut

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.wait
            while len(items) < self.max_batch:
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            # Same-size images share a batch; the predictor resizes each one to the model input anyway.
            sources = [ImageSource(n) for n, _, _ in items]
            images = [im for _, im, _ in items]
            self.batches.append(len(items))
            try:
                results = await loop.run_in_executor(self.pool, self.predictor.run, sources, images)
            except Exception as e:  # a model failure answers every waiting request instead of hanging them
                for *_, fut in items:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (*_, fut), res in zip(items, results):
                if not fut.done():
                    fut.set_result(res)


def _decode(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as probe:  # header only: refuse huge images before decoding them
            w, h = probe.size
    except Exception as e:
        raise RequestError(400, f"image: not a decodable image ({type(e).__name__})") from e
    if w * h > max_pixels:
        raise RequestError(413, f"image: {w}x{h} pixels exceeds the limit of {max_pixels}")
    try:
        return decode_image_bytes(data, "image")
    except UadkitError as e:
        raise RequestError(400, str(e)) from e


def create_app(pipeline: AnomalyDetectionPipeline) -> FastAPI:
    s = pipeline.cfg["Serving"]
    max_body = int(s["max_body_mb"] * 1024 * 1024)
    batcher = Batcher(pipeline, int(s["max_batch"]), float(s["batch_wait_ms"]))
    decode_pool = ThreadPoolExecutor(2, thread_name_prefix="uadkit-decode")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = FastAPI(title="uadkit anomaly detection", version=__version__, lifespan=lifespan,
                  description="Unsupervised visual anomaly detection. POST an image (base64) to "
                              "/image-anomaly-detection; GET / for a web page.")
    app.state.batcher = batcher

    async def image_from_request(payload: Any) -> tuple[str, np.ndarray]:
        if not isinstance(payload, dict) or not isinstance(payload.get("image"), str) or not payload["image"]:
            raise RequestError(422, 'body: expected JSON {"image": "<base64 or http(s) URL>"}')
        text = payload["image"].strip()
        loop = asyncio.get_running_loop()
        if text.startswith(("http://", "https://")):
            if not s["allow_url_fetch"]:
                raise RequestError(403, "image: fetching URLs is disabled on this server; send base64 image data")
            host = urllib.parse.urlsplit(text).hostname or ""
            if host not in s["url_allow_hosts"]:
                raise RequestError(403, f"image: host '{host}' is not in the server's URL allow-list")
            try:
                data = await loop.run_in_executor(decode_pool, fetch_url, text, float(s["url_timeout_s"]),
                                                  int(s["url_max_mb"] * 1024 * 1024))
            except UadkitError as e:
                raise RequestError(400, str(e)) from e
            name = text
        elif "://" in text[:16] or text.startswith(("/", "file:", "~")):
            # never read server-side paths or other schemes
            raise RequestError(400, "image: expected base64 image data or an http(s) URL")
        else:
            if text.startswith("data:") and "," in text:
                text = text.split(",", 1)[1]
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as e:
                raise RequestError(400, f"image: invalid base64 ({e})") from e
            name = "upload"
        try:
            image = await asyncio.wait_for(loop.run_in_executor(decode_pool, _decode, data, int(s["max_pixels"])),
                                           float(s["decode_timeout_s"]))
        except asyncio.TimeoutError as e:
            raise RequestError(408, "image: decoding took too long") from e
        return name, image

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body):
            return _error(413, f"request body larger than {s['max_body_mb']} MB")
        return await call_next(request)

    @app.post("/image-anomaly-detection")
    async def detect(request: Request):
        log_id = uuid.uuid4().hex
        try:
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body:
                    raise RequestError(413, f"request body larger than {s['max_body_mb']} MB")
            try:
                payload = json.loads(body)
            except ValueError as e:
                raise RequestError(400, "body: not valid JSON") from e
            name, image = await image_from_request(payload)
            res = await batcher.submit(name, image)
        except RequestError as e:
            return _error(e.status, str(e), log_id)
        buf = io.BytesIO()
        res.overlay_image().convert("RGB").save(buf, format="JPEG", quality=90)
        h, w = res["pred_mask"].shape
        # JSONResponse directly: FastAPI's default encoder would walk the h*w labelMap list in Python.
        return JSONResponse({"logId": log_id, "errorCode": 0, "errorMsg": "Success",
                             "result": {"labelMap": res["pred_mask"].ravel().tolist(), "size": [h, w],
                                        "image": base64.b64encode(buf.getvalue()).decode(),
                                        "score": res["pred_score"], "label": res["pred_label"],
                                        "threshold": res["threshold"]}})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": pipeline.detector.name, "uadkit_version": __version__}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        with open(PAGE, encoding="utf-8") as f:
            return f.read()

    return app


def serve(pipeline: AnomalyDetectionPipeline, host: str | None = None, port: int | None = None) -> None:
    import uvicorn

    s = pipeline.cfg["Serving"]
    uvicorn.run(create_app(pipeline), host=host or s["host"], port=int(port or s["port"]), log_level="info")
