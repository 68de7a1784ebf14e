"""The HTTP service (FastAPI on uvicorn) and its web page.

POST /image-anomaly-detection {"image": <base64 | http(s) URL>} answers PaddleX-compatible JSON
{logId, errorCode, errorMsg, result: {labelMap, size, image}} plus `score`, `label`, `threshold` and
`imageSize`. Images above Serving.max_answer_pixels are answered with `labelMap` and `image` at a reduced
size (`size` is the labelMap's, `imageSize` the original's), so an answer stays a few MB at most.
Bad input gets a 4xx JSON error. Concurrent requests are queued and run in batches by one worker, so
requests never share state. Slow clients are dropped (header and body timeouts), open connections are
capped, and the pixels in flight are bounded (Serving.max_pending_pixels): later requests wait their turn.

Every decision is recorded (serving/records.py; Serving.record) without delaying its answer. The history
(GET /records, /records/{id}/thumb|overlay, POST /records/{id}/review) needs the token whenever the
service binds to anything but loopback (or Serving.require_token is set); predicting never does.
POST /recalibrate writes the next version X.vN beside the model folder X, serves it (hot swap) and points the
symlink X.latest at it: a service restarted or a `predict` run with X.latest uses the newest version.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import copy
import ctypes
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import os
import re
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.requests import ClientDisconnect

from .. import __version__
from ..data.image_io import (
    IMAGE_FORMATS,
    ImageSource,
    check_pixels,
    decode_image_bytes,
    fetch_url,
    host_allowed,
    quiet_pil_warnings,
)
from ..errors import UadkitError
from ..pipeline import AnomalyDetectionPipeline
from ..visualize import overlay
from . import records

PAGE = os.path.join(os.path.dirname(__file__), "page.html")
REVIEW_PAGE = os.path.join(os.path.dirname(__file__), "review.html")
log = logging.getLogger("uvicorn.error")  # uvicorn's own handler: our lines look like its lines
# Base64 has no ':' so anything starting "word:" is a URL scheme or a drive path, never image data.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
# Requests above this many pixels hand their memory back to the OS when answered (glibc keeps freed heap).
_TRIM_PIXELS = 2_000_000


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str, log_id: str | None = None, close: bool = False) -> JSONResponse:
    return JSONResponse(status_code=status, content={"logId": log_id or uuid.uuid4().hex, "errorCode": status,
                                                     "errorMsg": message},
                        headers={"Connection": "close"} if close else None)


class Batcher:
    """Collects concurrent requests into batches of up to `max_batch` images for one model worker."""

    def __init__(self, pipeline: AnomalyDetectionPipeline, max_batch: int, wait_ms: float, version: str = "") -> None:
        # (predictor, model version) as one value: a batch reads it once, so a hot swap lands between batches
        self.current = (pipeline.detector.predictor(pipeline.threshold), version)
        self.max_batch, self.wait = max_batch, wait_ms / 1000
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="uadkit-model")
        # How many batches of each size ran (for tests and stats): at most max_batch keys, however long it runs.
        self.batch_sizes: collections.Counter[int] = collections.Counter()

    def swap(self, predictor, version: str) -> None:
        """Later batches use `predictor`; the batch running now finishes on the old one (nothing dropped)."""
        self.current = (predictor, version)

    async def submit(self, name: str, image: np.ndarray):
        """The result and the model version that decided it."""
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
            self.batch_sizes[len(items)] += 1
            predictor, version = self.current
            try:
                results = await loop.run_in_executor(self.pool, predictor.run, sources, images)
            except Exception as e:  # a model failure answers every waiting request instead of hanging them
                for *_, fut in items:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            finally:
                del images, sources
            for (*_, fut), res in zip(items, results):
                if not fut.done():
                    fut.set_result((res, version))
            del items, results, predictor


class PixelBudget:
    """At most `total` image pixels decoded, scored or answered at once; the rest wait in arrival order."""

    def __init__(self, total: int) -> None:
        self.total, self.used = int(total), 0
        self.cond = asyncio.Condition()

    @asynccontextmanager
    async def hold(self, pixels: int):
        pixels = min(int(pixels), self.total)  # one image of the full budget can always run, alone
        async with self.cond:
            await self.cond.wait_for(lambda: self.used + pixels <= self.total)
            self.used += pixels
        try:
            yield
        finally:
            async with self.cond:
                self.used -= pixels
                self.cond.notify_all()


def _probe(data: bytes, max_pixels: int) -> int:
    """Pixels of the image in `data`, from its header only: huge images are refused before decoding."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as probe:
            w, h = probe.size
    except Exception as e:
        raise RequestError(400, f"image: not a decodable image ({type(e).__name__})") from e
    try:
        check_pixels(w, h, "image", max_pixels, "Serving.max_pixels")
    except UadkitError as e:
        raise RequestError(413 if w * h else 400, str(e)) from e
    return w * h


def _decode(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        return decode_image_bytes(data, "image", max_pixels, "Serving.max_pixels")
    except UadkitError as e:
        raise RequestError(400, str(e)) from e


def _b64decode(text: str) -> bytes:
    if any(c in text for c in " \t\r\n"):
        text = "".join(text.split())  # base64 wrapped at 76 columns (the `base64` tool, MIME) is still base64
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"image: invalid base64 ({e}); expected base64 image data or an http(s) URL") from e


def _label_map_json(mask: np.ndarray) -> bytes:
    """`[0,1,0,...]` for a 0/1 mask, built in numpy: a Python list of h*w ints would cost ~30x the time."""
    flat = mask.ravel()
    if flat.size == 0:
        return b"[]"
    buf = np.full(2 * flat.size + 1, ord(","), np.uint8)
    buf[0], buf[-1] = ord("["), ord("]")
    buf[1:-1:2] = flat + ord("0")
    return buf.tobytes()


def _answer(res, log_id: str, max_answer_pixels: int) -> tuple[bytes, bytes]:
    """The PaddleX-style JSON answer, as bytes, and its overlay JPEG; both shrunk for very large images."""
    image, amap, mask = res._image, res["anomaly_map"], res["pred_mask"]
    h, w = mask.shape
    if h * w > max_answer_pixels:
        scale = (max_answer_pixels / (h * w)) ** 0.5
        size = (max(1, int(w * scale)), max(1, int(h * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        amap = np.asarray(Image.fromarray(amap).resize(size, Image.BILINEAR))
        mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
    buf = io.BytesIO()
    overlay(image, amap, mask, f"{res['pred_label']} {res['pred_score']:.3f}").save(buf, format="JPEG", quality=90)
    out = {"logId": log_id, "errorCode": 0, "errorMsg": "Success",
           "result": {"labelMap": "@LABELMAP@", "size": list(mask.shape),
                      "image": base64.b64encode(buf.getvalue()).decode(), "score": res["pred_score"],
                      "label": res["pred_label"], "threshold": res["threshold"], "imageSize": [h, w]}}
    head, tail = json.dumps(out).encode().split(b'"@LABELMAP@"')
    return head + _label_map_json(mask) + tail, buf.getvalue()


def is_loopback(host: str | None) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False  # a name or "" (all interfaces): reachable from elsewhere


_libc = None


def _trim_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise: a large request would leave RSS high)."""
    global _libc
    try:
        _libc = _libc or ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def create_app(pipeline: AnomalyDetectionPipeline, host: str | None = None) -> FastAPI:
    s = pipeline.cfg["Serving"]
    host = host or s["host"]
    token = s["token"] or os.environ.get("UADKIT_TOKEN", "")
    need_token = bool(s["require_token"]) or not is_loopback(host)
    if need_token and not token:
        log.warning("serving on %s without a token (--token or UADKIT_TOKEN): the review page and history are "
                    "disabled; predicting works", host)
    store = records.open_store(s["db"] or None, s["records_dir"], int(s["keep_records"]), float(s["keep_days"])) \
        if s["record"] else None
    model_dir = pipeline.cfg["SubModules"]["AnomalyDetection"]["model_dir"]
    version = records.model_version(model_dir) if store else ""
    newest = records.latest_version(model_dir) if os.path.isdir(model_dir) else model_dir
    if os.path.realpath(newest) != os.path.realpath(model_dir):
        link = records.version_base(model_dir)[0] + ".latest"
        follow = link if os.path.realpath(link) == os.path.realpath(newest) else newest
        log.warning("serving %s, but a newer version %s exists (recalibrated from reviews); start with "
                    "--model_dir %s to serve the newest one", model_dir, newest, follow)
    max_body = int(s["max_body_mb"] * 1024 * 1024)
    max_pixels = int(s["max_pixels"])
    batcher = Batcher(pipeline, int(s["max_batch"]), float(s["batch_wait_ms"]), version)
    budget = PixelBudget(max(int(s["max_pending_pixels"]), max_pixels))
    work_pool = ThreadPoolExecutor(2, thread_name_prefix="uadkit-decode")  # decoding and answers, off the loop
    fetch_pool = ThreadPoolExecutor(4, thread_name_prefix="uadkit-fetch")  # slow URLs never hold the decoders

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        if store:
            await asyncio.get_running_loop().run_in_executor(None, store.close)  # what is queued gets written

    app = FastAPI(title="uadkit anomaly detection", version=__version__, lifespan=lifespan,
                  description="Unsupervised visual anomaly detection. POST an image (base64) to "
                              "/image-anomaly-detection; GET / for a web page.")
    app.state.batcher = batcher
    app.state.budget = budget
    app.state.store = store

    async def in_pool(pool: ThreadPoolExecutor, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def read_body(request: Request) -> bytes:
        too_big = RequestError(413, f"request body larger than {s['max_body_mb']} MB")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > 4 * max_body):
            raise too_big  # far too big: answered at once (the connection closes, a sending client sees a reset)
        body, size = bytearray(), 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= max_body:
                body += chunk
            elif size > 4 * max_body:
                raise too_big
        # A body over the limit is read to its end and dropped (bounded by body_timeout_s and 4x the limit):
        # answering before it is all in makes the server close the connection, and the client, still sending,
        # would see a reset instead of its 413.
        if size > max_body:
            raise too_big
        return bytes(body)

    async def image_bytes(payload: Any) -> tuple[str, bytes]:
        if not isinstance(payload, dict) or not isinstance(payload.get("image"), str) or not payload["image"]:
            raise RequestError(422, 'body: expected JSON {"image": "<base64 or http(s) URL>"}')
        text = payload["image"].strip()
        if text.startswith(("http://", "https://")):
            if not s["allow_url_fetch"]:
                raise RequestError(403, "image: fetching URLs is disabled on this server; send base64 image data")
            if not host_allowed(text, s["url_allow_hosts"]):
                host = urllib.parse.urlsplit(text).netloc
                raise RequestError(403, f"image: host '{host}' is not in the server's URL allow-list")
            try:  # the allow-list holds for every redirect hop; url_timeout_s is a total deadline
                return text, await asyncio.wait_for(
                    in_pool(fetch_pool, fetch_url, text, float(s["url_timeout_s"]), int(s["url_max_mb"] * 2**20),
                            set(s["url_allow_hosts"])), float(s["url_timeout_s"]) + 5)
            except UadkitError as e:
                raise RequestError(400, f"image: {e}") from e
            except asyncio.TimeoutError as e:
                raise RequestError(408, "image: URL not downloaded within the time limit") from e
        if text.startswith("data:") and "," in text[:200]:
            text = text.split(",", 1)[1]
        elif _SCHEME.match(text) or text.startswith("~"):
            # never read server-side paths or other schemes ("/..." is base64 too: a JPEG starts "/9j/")
            raise RequestError(400, "image: expected base64 image data or an http(s) URL")
        return "upload", await in_pool(work_pool, _b64decode, text)

    async def handle(request: Request, log_id: str) -> Response:
        try:
            body = await asyncio.wait_for(read_body(request), float(s["body_timeout_s"]))
        except asyncio.TimeoutError:
            log.info("request %s: body not received within %s s; connection closed", log_id, s["body_timeout_s"])
            return _error(408, f"request body not received within {s['body_timeout_s']} s", log_id, close=True)
        try:
            payload = await in_pool(work_pool, json.loads, body) if len(body) > 65536 else json.loads(body)
        except (ValueError, RecursionError) as e:  # RecursionError: deeply nested JSON
            raise RequestError(400, f"body: not valid JSON ({type(e).__name__})") from e
        name, data = await image_bytes(payload)
        del payload, body
        pixels = await in_pool(work_pool, _probe, data, max_pixels)
        digest = await in_pool(work_pool, _sha256, data) if store else ""
        async with budget.hold(pixels):
            try:
                image = await asyncio.wait_for(in_pool(work_pool, _decode, data, max_pixels),
                                               float(s["decode_timeout_s"]))
            except asyncio.TimeoutError as e:
                raise RequestError(408, "image: decoding took too long") from e
            original = data if store and s["record_images"] else None  # opted in: kept for "export reviewed"
            del data
            res, decided_by = await batcher.submit(name, image)
            del image
            answer, overlay_jpeg = await in_pool(work_pool, _answer, res, log_id, int(s["max_answer_pixels"]))
            if store:
                try:  # a record is never worth a failed answer
                    store.add(await in_pool(work_pool, records.pending_from_result, res, name, digest,
                                            pipeline.detector.name, decided_by, overlay_jpeg, original))
                except Exception as e:
                    store._fail("failed", f"record not prepared: {type(e).__name__}: {str(e)[:200]}")
            del res, overlay_jpeg, original
        if pixels > _TRIM_PIXELS:
            await in_pool(work_pool, _trim_memory)
        return Response(answer, media_type="application/json")

    @app.post("/image-anomaly-detection")
    async def detect(request: Request):
        log_id = uuid.uuid4().hex
        try:
            return await handle(request, log_id)
        except RequestError as e:
            return _error(e.status, str(e), log_id)
        except ClientDisconnect:
            log.info("request %s: client disconnected before sending its whole body", log_id)
            return Response(status_code=400)  # nobody is listening
        except Exception as e:  # a bug: one line in the log and a JSON answer, never a bare traceback
            log.error("request %s failed: %s: %s", log_id, type(e).__name__, " ".join(str(e).split())[:300])
            return _error(500, f"internal error ({type(e).__name__}); logId {log_id}", log_id)

    @app.get("/health")
    async def health():  # answered on the event loop, which never runs model or image work
        return {"status": "ok", "model": pipeline.detector.name, "uadkit_version": __version__,
                "model_version": batcher.current[1] or None, "records": store.stats() if store else None}

    def authorise(request: Request) -> None:
        """The history and every write need the token off loopback (header or ?token= for <img> links)."""
        if store is None:
            raise RequestError(404, "recording is off on this server (Serving.record: false)")
        if not need_token:
            return
        if not token:
            raise RequestError(403, f"this server binds to {host} and has no token: start it with --token or "
                                    "UADKIT_TOKEN to use the review page and write endpoints")
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-uadkit-token") \
            or request.query_params.get("token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise RequestError(401, "token: missing or wrong (Authorization: Bearer <token>)")

    def guarded(fn):
        """Token check, then `fn` off the event loop; RequestError and UadkitError become JSON errors."""
        async def run(request: Request, *args):
            try:
                authorise(request)
                return await in_pool(work_pool, fn, *args)
            except RequestError as e:
                return _error(e.status, str(e))
            except UadkitError as e:
                return _error(400, str(e))
        return run

    def _float(q, key: str) -> float | None:
        v = q.get(key)
        if v in (None, ""):
            return None
        try:
            return float(v)
        except ValueError:
            raise UadkitError(f"{key}: expected a number, got {v!r}") from None

    def list_records(q) -> dict:
        try:
            limit, before = int(q.get("limit", 100)), int(q["before_id"]) if q.get("before_id") else None
        except ValueError:
            raise UadkitError("limit, before_id: expected integers") from None
        rows = store.query(q.get("show", "all"), _float(q, "min_score"), _float(q, "max_score"), _float(q, "since"),
                           _float(q, "until"), limit, before)
        return {"records": rows, "counts": store.counts_by_review(), "model_version": batcher.current[1]}

    def review_page() -> HTMLResponse:
        with open(REVIEW_PAGE, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.get("/review", response_class=HTMLResponse)
    async def get_review_page(request: Request):  # off loopback: /review?token=... (kept for the session)
        return await guarded(review_page)(request)

    @app.get("/records")
    async def get_records(request: Request):
        return await guarded(list_records)(request, request.query_params)

    def record_file(record_id: int, kind: str):
        rec = store.get(record_id)
        rel = rec and rec.get(f"{kind}_path")
        if not rel or not os.path.isfile(store.path(rel)):
            raise RequestError(404, f"record {record_id}: no {kind} image")
        return FileResponse(store.path(rel), media_type="image/jpeg")

    @app.get("/records/{record_id}/{kind}.jpg")
    async def get_record_file(request: Request, record_id: int, kind: str):
        if kind not in ("thumb", "overlay"):
            return _error(404, f"kind: expected thumb or overlay, got {kind!r}")
        return await guarded(record_file)(request, record_id, kind)

    def review(record_id: int, payload: Any):
        if not isinstance(payload, dict) or "review" not in payload:
            raise RequestError(422, 'body: expected JSON {"review": "confirmed|false_alarm|missed|ok|null", '
                                    '"reviewer": "name"}')
        if not store.review(record_id, payload["review"], str(payload.get("reviewer") or "")):
            raise RequestError(404, f"record {record_id}: not found")
        return {"record": store.get(record_id), "counts": store.counts_by_review()}

    @app.post("/records/{record_id}/review")
    async def post_review(request: Request, record_id: int):
        try:
            payload = json.loads(await asyncio.wait_for(read_body(request), float(s["body_timeout_s"])))
        except (ValueError, RecursionError, asyncio.TimeoutError, RequestError):
            payload = None
        return await guarded(review)(request, record_id, payload)

    recal_pool = ThreadPoolExecutor(1, thread_name_prefix="uadkit-recalibrate")  # one at a time, never the decoders

    def recalibrate(payload: Any):
        """Fit a new version from the reviews, load it, then swap it in between two batches."""
        nonlocal model_dir
        from ..api import create_model
        from ..engine.calibrate import recalibrate_from_records

        rate = payload.get("false_alarm_rate") if isinstance(payload, dict) else None
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < 0.5):
            raise RequestError(422, f"false_alarm_rate: expected a share of good parts in (0, 0.5), got {rate!r}")
        store.flush()  # reviews are direct writes; this only makes the latest decisions visible too
        cfg = copy.deepcopy(pipeline.detector.cfg)
        cfg["Calibrate"].update({"false_alarm_rate": rate, "db": store.url})
        # the real folder: served through X.latest, the next version is still X.vN (not X.latest.v2)
        result = recalibrate_from_records(cfg, os.path.realpath(model_dir), store.engine)
        result["latest_link"] = records.mark_latest(result["model_dir"])
        sub = pipeline.cfg["SubModules"]["AnomalyDetection"]
        detector = create_model(model_dir=result["model_dir"], device=sub["device"], run_mode=sub["run_mode"])
        predictor = detector.predictor(pipeline.threshold)
        pipeline.detector, model_dir = detector, result["model_dir"]
        batcher.swap(predictor, result["model_version"])
        log.info("recalibrated from reviews: now serving %s (version %s)", model_dir, result["model_version"])
        return {k: result[k] for k in ("model_dir", "previous_model_dir", "model_version", "latest_link", "good",
                                       "defects", "before", "after")}

    @app.post("/recalibrate")
    async def post_recalibrate(request: Request):
        try:
            body = await asyncio.wait_for(read_body(request), float(s["body_timeout_s"]))
            payload = json.loads(body) if body.strip() else {}
        except (ValueError, RecursionError, asyncio.TimeoutError, RequestError):
            payload = None
        try:
            authorise(request)
            if payload is None:
                raise RequestError(422, 'body: expected JSON {"false_alarm_rate": 0.02} or nothing')
            return await in_pool(recal_pool, recalibrate, payload)
        except RequestError as e:
            return _error(e.status, str(e))
        except UadkitError as e:
            return _error(400, str(e))

    def export_reviewed():
        dest = os.path.join(s["records_dir"], "exports", time.strftime("reviewed-%Y%m%d-%H%M%S-")
                            + uuid.uuid4().hex[:6])
        return store.export_reviewed(dest)

    @app.post("/records/export")
    async def post_export(request: Request):  # a write (files on the server): the token rule holds
        return await guarded(export_reviewed)(request)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        with open(PAGE, encoding="utf-8") as f:
            return f.read()

    return app


def _protocol_with_header_timeout(timeout: float) -> type:
    """uvicorn's h11 protocol, plus: each request's headers must be complete within `timeout` seconds of
    the connection opening (or of the previous answer), else the connection is closed with one log line."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(timeout, self._headers_late, self.cycle)

        def _headers_late(self, cycle_then) -> None:
            waiting = self.cycle is cycle_then and (self.cycle is None or self.cycle.response_complete)
            if waiting and not self.transport.is_closing():
                client = f"{self.client[0]}:{self.client[1]}" if self.client else "client"
                log.info("%s: request headers not received within %g s; connection closed", client, timeout)
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def serve(pipeline: AnomalyDetectionPipeline, host: str | None = None, port: int | None = None) -> None:
    import uvicorn

    quiet_pil_warnings()
    s = pipeline.cfg["Serving"]
    host = host or s["host"]
    config = uvicorn.Config(create_app(pipeline, host), host=host, port=int(port or s["port"]),
                            log_level="info", http=_protocol_with_header_timeout(float(s["header_timeout_s"])),
                            limit_concurrency=int(s["max_connections"]), timeout_keep_alive=5)
    uvicorn.Server(config).run()
