"""The record store: every decision of the service (and of `predict -o Predict.record=true`) as a row.

SQLAlchemy Core over any URL: an SQLite file by default, PostgreSQL (`postgresql://...`) for replicas
sharing one history. The tool creates and migrates the schema itself (table `uadkit_schema` holds the
version; MIGRATIONS go from one version to the next). A thumbnail and the heatmap overlay of each decision
are JPEG files in `files_dir` (next to the database); retention by count and age deletes rows and files.

Writing never blocks or fails a prediction: `add()` only queues; one writer thread batches the inserts.
A locked database, a full disk or a full queue is logged and counted (`stats()`, shown in /health).
"""

from __future__ import annotations

import io
import logging
import os
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..engine.checkpoint import model_version  # noqa: F401  (the record store's name for it)
from ..errors import UadkitError

try:
    import sqlalchemy as sa
except ModuleNotFoundError as e:  # an optional extra: one line, not a traceback (a broken install still raises)
    if e.name != "sqlalchemy":
        raise
    raise UadkitError("recording decisions (Predict.record, Calibrate.db, the service's history) needs sqlalchemy: "
                      "pip install -e .[serve]  (scripts/setup.sh installs it)") from e

log = logging.getLogger("uadkit")
SCHEMA_VERSION = 3
REVIEWS = ("confirmed", "false_alarm", "missed", "ok")  # defect confirmed / false alarm / missed defect / good
GOOD_REVIEWS, BAD_REVIEWS = ("false_alarm", "ok"), ("confirmed", "missed")  # what the part truly was
THUMB_PX, OVERLAY_PX = 256, 768

meta = sa.MetaData()
schema_table = sa.Table("uadkit_schema", meta, sa.Column("version", sa.Integer, nullable=False))
decisions = sa.Table(
    "decisions", meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ts", sa.Float, nullable=False),  # Unix time: one comparable type on every database
    sa.Column("source", sa.String(1024), nullable=False),
    sa.Column("image_sha256", sa.String(64), nullable=False),
    sa.Column("model_name", sa.String(64), nullable=False),
    sa.Column("model_version", sa.String(64), nullable=False),
    sa.Column("raw_score", sa.Float, nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("label", sa.String(16), nullable=False),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("defect_area", sa.Float, nullable=False),  # share of the image's pixels marked defect
    sa.Column("thumb_path", sa.String(512)),
    sa.Column("overlay_path", sa.String(512)),
    # version 2: reviews
    sa.Column("review", sa.String(16)),
    sa.Column("reviewer", sa.String(128)),
    sa.Column("reviewed_at", sa.Float),
    # version 3: the image as received (Serving.record_images), for "export reviewed" as a training set
    sa.Column("image_path", sa.String(512)),
)
V1_COLUMNS = [c for c in decisions.columns if c.name not in ("review", "reviewer", "reviewed_at", "image_path")]


def _v1(conn: sa.Connection) -> None:
    v1 = sa.MetaData()
    sa.Table("decisions", v1, *[c._copy() for c in V1_COLUMNS])
    v1.create_all(conn)


def _v2(conn: sa.Connection) -> None:
    for col in ("review VARCHAR(16)", "reviewer VARCHAR(128)", "reviewed_at FLOAT"):
        conn.execute(sa.text(f"ALTER TABLE decisions ADD COLUMN {col}"))
    conn.execute(sa.text("CREATE INDEX ix_decisions_ts ON decisions (ts)"))


def _v3(conn: sa.Connection) -> None:
    conn.execute(sa.text("ALTER TABLE decisions ADD COLUMN image_path VARCHAR(512)"))


MIGRATIONS = {1: _v1, 2: _v2, 3: _v3}  # version -> step from the version before


def normalise_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here (SQLAlchemy would pick psycopg2, which we do not install)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str) -> sa.Engine:
    url = normalise_url(url)
    try:
        parsed = sa.engine.make_url(url)
    except Exception as e:
        raise UadkitError(f"--db: not an SQLAlchemy URL ({url!r}); expected sqlite:///FILE or postgresql://...") from e
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(parsed.database)), exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 5})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # WAL: readers (the review page) never wait for the writer
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=5000")
            cur.close()
        return engine
    try:
        return sa.create_engine(url, pool_pre_ping=True)
    except Exception as e:
        raise UadkitError(f"--db {parsed.render_as_string()}: {e}") from e


def schema_version(conn: sa.Connection) -> int:
    if not sa.inspect(conn).has_table("uadkit_schema"):
        return 1 if sa.inspect(conn).has_table("decisions") else 0
    return int(conn.execute(sa.select(sa.func.max(schema_table.c.version))).scalar() or 0)


def migrate(engine: sa.Engine, target: int = SCHEMA_VERSION) -> tuple[int, int]:
    """Bring the schema to `target` one step at a time, in one transaction; returns (before, after).
    Replicas starting together on PostgreSQL take turns (an advisory lock)."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(741305)"))
        before = schema_version(conn)
        if before > SCHEMA_VERSION:
            raise UadkitError(f"--db: schema version {before} is newer than this uadkit ({SCHEMA_VERSION}); "
                              "upgrade uadkit")
        if before < target:
            schema_table.create(conn, checkfirst=True)
            for v in range(before + 1, target + 1):
                MIGRATIONS[v](conn)
            conn.execute(schema_table.delete())
            conn.execute(schema_table.insert().values(version=target))
            log.info("record store: schema migrated from version %d to %d", before, target)
        return before, max(before, target)


# Versions of a model folder X: X itself (v1), then X.v2, X.v3, ... written beside it by "recalibrate from
# reviews"; X.latest is a relative symlink to the newest, so any tool pointed at X.latest uses it.
_VERSION = re.compile(r"\.v(\d+)$")


def version_base(model_dir: str) -> tuple[str, int]:
    """(X, n) for X.vn, (X, 1) for X itself; symlinks resolved (X.latest gives the version it points at)."""
    path = os.path.realpath(model_dir).rstrip(os.sep)
    m = _VERSION.search(path)
    return (path[:m.start()], int(m.group(1))) if m else (path, 1)


def latest_version(model_dir: str) -> str:
    """The newest complete version of `model_dir`'s model: the X.vN with the highest N holding a model.yaml
    (a folder still being written has none), else X. The rule needs no pointer: it holds for versions written
    by the service and by `-o Global.mode=calibrate -o Calibrate.db=...` alike."""
    base, _ = version_base(model_dir)
    parent, stem = os.path.split(base)
    best, path = 1, base
    for name in os.listdir(parent):
        m = re.fullmatch(re.escape(stem) + r"\.v(\d+)", name)
        if m and int(m.group(1)) > best and os.path.isfile(os.path.join(parent, name, "model.yaml")):
            best, path = int(m.group(1)), os.path.join(parent, name)
    return path


def mark_latest(version_dir: str) -> str | None:
    """Point X.latest (a relative symlink beside X) at `version_dir`, atomically and never backwards (two
    replicas recalibrating at once: the higher version stays). Returns the link, or None where symlinks cannot
    be made (logged: the new version is written and served all the same)."""
    base, n = version_base(version_dir)
    link = base + ".latest"
    tmp = os.path.join(os.path.dirname(link), f".{os.path.basename(link)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if os.path.islink(link) and os.path.isdir(link) and version_base(link)[1] > n:
            return link
        os.symlink(os.path.basename(os.path.realpath(version_dir)), tmp, target_is_directory=True)
        os.replace(tmp, link)  # atomic: a reader sees the old version or the new one, never no link
        return link
    except OSError as e:
        if os.path.islink(tmp):
            os.unlink(tmp)
        log.warning("%s: not pointed at the new version %s (%s); use the version folder itself",
                    link, version_dir, e)
        return None


@dataclass
class Pending:
    """One decision waiting for the writer: the row's fields, the JPEG bytes of its two images and, opted in,
    the image file as received."""
    row: dict[str, Any]
    thumb: bytes | None = None
    overlay: bytes | None = None
    original: bytes | None = None
    ts: float = field(default_factory=time.time)


def jpeg(image, max_px: int, quality: int = 85) -> bytes:
    """`image` (HxWx3 uint8 array or PIL image) as a JPEG at most `max_px` on its long side."""
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    if max(im.size) > max_px:
        im = im.copy()
        im.thumbnail((max_px, max_px), Image.BILINEAR)
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def pending_from_result(res, source: str, image_sha256: str, model_name: str, version: str,
                        overlay_jpeg: bytes | None = None, original: bytes | None = None) -> Pending:
    """A record of an AnomalyResult (with its image); `overlay_jpeg` reuses an overlay already drawn;
    `original`: the image file as received, kept for export."""
    mask = res["pred_mask"]
    row = {"source": str(source)[:1024], "image_sha256": image_sha256, "model_name": model_name,
           "model_version": version, "raw_score": float(res["raw_score"]), "score": float(res["pred_score"]),
           "label": str(res["pred_label"]), "threshold": float(res["threshold"]),
           "defect_area": float(mask.mean()) if mask.size else 0.0}
    thumb = jpeg(res._image, THUMB_PX) if res._image is not None else None
    if overlay_jpeg is None and res._image is not None:
        overlay_jpeg = jpeg(res.overlay_image(), OVERLAY_PX)
    return Pending(row, thumb, overlay_jpeg, original)


class RecordStore:
    """Rows in `url`, image files under `files_dir`; `add()` queues, a writer thread writes."""

    def __init__(self, url: str, files_dir: str, keep_count: int = 0, keep_days: float = 0,
                 queue_size: int = 20000, prune_every: int = 200) -> None:
        self.url, self.files_dir = normalise_url(url), os.path.abspath(files_dir)
        self.keep_count, self.keep_days = int(keep_count), float(keep_days)
        self.engine = make_engine(url)
        for attempt in range(3):
            try:
                migrate(self.engine)
                break
            except UadkitError:
                raise
            except Exception as e:  # another process may be migrating the same SQLite file: try again
                if attempt < 2:
                    time.sleep(0.5)
                    continue
                raise UadkitError(f"--db {self.engine.url.render_as_string()}: cannot open the record store "
                                  f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e
        self.queue: queue.Queue[Pending | None] = queue.Queue(queue_size)
        self.prune_every = prune_every
        self.counts = {"written": 0, "failed": 0, "dropped": 0, "file_errors": 0, "pruned": 0}
        self.last_error: str | None = None
        self._since_prune = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="uadkit-records", daemon=True)
        self._thread.start()

    # --- writing -------------------------------------------------------------------------------------
    def add(self, item: Pending) -> None:
        """Queue one decision; never blocks (a full queue drops it, counted)."""
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self._fail("dropped", "record queue full: the database is not keeping up")

    def _fail(self, kind: str, message: str, n: int = 1) -> None:
        with self._lock:
            self.counts[kind] += n
            self.last_error = message
            total = self.counts[kind]
        if total <= 3 or total % 100 == 0:  # a locked database must not flood the log
            log.warning("record store: %s (%s so far: %d)", message, kind, total)

    def _write_files(self, item: Pending) -> None:
        day = time.strftime("%Y%m%d", time.gmtime(item.ts))
        stem = uuid.uuid4().hex
        for key, data in (("thumb_path", item.thumb), ("overlay_path", item.overlay), ("image_path", item.original)):
            item.row[key] = None
            if data is None:
                continue
            ext = "jpg"
            if key == "image_path":  # kept byte for byte: the extension says what the bytes are
                from PIL import Image

                try:
                    with Image.open(io.BytesIO(data)) as im:
                        ext = {"JPEG": "jpg", "TIFF": "tif"}.get(im.format or "", (im.format or "bin").lower())
                except Exception:
                    ext = "bin"
            if key == "overlay_path" and len(data) > 200_000:  # the answer's overlay of a large image: smaller
                from PIL import Image

                data = jpeg(Image.open(io.BytesIO(data)), OVERLAY_PX)
            rel = f"{day}/{stem}_{key.split('_')[0]}.{ext}"
            path = os.path.join(self.files_dir, rel)
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
                item.row[key] = rel
            except OSError as e:  # a full disk: the decision is still recorded, without its images
                self._fail("file_errors", f"cannot write {path}: {e.strerror or e}")

    def _write(self, items: list[Pending]) -> None:
        for it in items:
            self._write_files(it)
        rows = [{**it.row, "ts": it.ts} for it in items]
        try:
            with self.engine.begin() as conn:
                conn.execute(decisions.insert(), rows)
        except Exception as e:
            self._fail("failed", f"{len(rows)} decisions not stored: {type(e).__name__}: "
                                 f"{' '.join(str(e).split())[:200]}", len(rows))
            for r in rows:  # no row points at them: do not leave orphans behind
                self._unlink(r.get("thumb_path"), r.get("overlay_path"), r.get("image_path"))
            return
        with self._lock:
            self.counts["written"] += len(rows)
        self._since_prune += len(rows)
        if self._since_prune >= self.prune_every:
            self._since_prune = 0
            try:
                self.prune()
            except Exception as e:
                self._fail("failed", f"retention failed: {type(e).__name__}: {str(e)[:200]}", 0)

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()]
            while batch[-1] is not None and len(batch) < 64:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            items = [b for b in batch if b is not None]
            if items:
                self._write(items)
            for _ in batch:
                self.queue.task_done()
            if batch[-1] is None:
                return

    def flush(self) -> None:
        """Wait until every queued decision is written (or has failed)."""
        self.queue.join()

    def close(self) -> None:
        if self._thread.is_alive():
            self.queue.put(None)
            self._thread.join()
        self.engine.dispose()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counts, "pending": self.queue.qsize(), "last_error": self.last_error,
                    "db": self.engine.url.render_as_string(hide_password=True)}

    # --- retention -----------------------------------------------------------------------------------
    def _unlink(self, *rels: str | None) -> None:
        for rel in rels:
            if rel:
                try:
                    os.unlink(os.path.join(self.files_dir, rel))
                except FileNotFoundError:
                    pass
                except OSError as e:
                    self._fail("file_errors", f"cannot delete {rel}: {e.strerror or e}", 1)

    def prune(self, now: float | None = None) -> int:
        """Delete rows (and their files) beyond `keep_count` newest or older than `keep_days`."""
        conds = []
        with self.engine.begin() as conn:
            if self.keep_days > 0:
                conds.append(decisions.c.ts < (now or time.time()) - self.keep_days * 86400)
            if self.keep_count > 0:
                cut = conn.execute(sa.select(decisions.c.id).order_by(decisions.c.id.desc())
                                   .offset(self.keep_count).limit(1)).scalar()
                if cut is not None:
                    conds.append(decisions.c.id <= cut)
            if not conds:
                return 0
            gone = conn.execute(sa.delete(decisions).where(sa.or_(*conds))
                                .returning(decisions.c.thumb_path, decisions.c.overlay_path,
                                           decisions.c.image_path)).all()
        for paths in gone:
            self._unlink(*paths)
        with self._lock:
            self.counts["pruned"] += len(gone)
        return len(gone)

    # --- reading and reviewing -----------------------------------------------------------------------
    def query(self, show: str = "all", min_score: float | None = None, max_score: float | None = None,
              since: float | None = None, until: float | None = None, limit: int = 100,
              before_id: int | None = None) -> list[dict[str, Any]]:
        """The newest decisions first; `show`: all | flagged | normal | unreviewed | reviewed."""
        q = sa.select(decisions).order_by(decisions.c.id.desc()).limit(max(1, min(int(limit), 1000)))
        c = decisions.c
        where = {"flagged": c.label == "anomalous", "normal": c.label != "anomalous",
                 "unreviewed": c.review.is_(None), "reviewed": c.review.is_not(None), "all": None}
        if show not in where:
            raise UadkitError(f"show: expected one of {', '.join(where)}, got {show!r}")
        for cond in (where[show], None if min_score is None else c.score >= min_score,
                     None if max_score is None else c.score <= max_score,
                     None if since is None else c.ts >= since, None if until is None else c.ts <= until,
                     None if before_id is None else c.id < before_id):
            if cond is not None:
                q = q.where(cond)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def get(self, record_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            r = conn.execute(sa.select(decisions).where(decisions.c.id == record_id)).first()
        return dict(r._mapping) if r else None

    def review(self, record_id: int, review: str | None, reviewer: str) -> bool:
        """Mark one decision (`review` in REVIEWS, or None to clear); False if there is no such record."""
        if review is not None and review not in REVIEWS:
            raise UadkitError(f"review: expected one of {', '.join(REVIEWS)} or null, got {review!r}")
        if review is not None and not reviewer.strip():
            raise UadkitError("reviewer: a name is needed to review")
        with self.engine.begin() as conn:
            n = conn.execute(sa.update(decisions).where(decisions.c.id == record_id).values(
                review=review, reviewer=reviewer.strip()[:128] if review else None,
                reviewed_at=time.time() if review else None)).rowcount
        return n == 1

    def counts_by_review(self) -> dict[str, int]:
        c = decisions.c
        with self.engine.connect() as conn:
            total, flagged = conn.execute(sa.select(sa.func.count(), sa.func.count().filter(
                c.label == "anomalous"))).one()
            by = dict(conn.execute(sa.select(c.review, sa.func.count()).where(c.review.is_not(None))
                                   .group_by(c.review)).all())
        return {"total": int(total), "flagged": int(flagged), "unreviewed": int(total - sum(by.values())),
                **{r: int(by.get(r, 0)) for r in REVIEWS}}

    def path(self, rel: str) -> str:
        return os.path.join(self.files_dir, rel)

    def export_reviewed(self, dest: str) -> dict[str, Any]:
        """Reviewed images as a dataset folder `train` accepts: dest/good/ (false alarm, ok) and dest/defect/
        (confirmed, missed), one file per image (its latest review), the bytes as received. Decisions recorded
        without their image (Serving.record_images off) are counted, not exported: thumbnails are too small
        to train on. Written beside `dest` and renamed into place."""
        import shutil
        import tempfile

        dest = os.path.abspath(dest)
        if os.path.exists(dest):
            raise UadkitError(f"export: '{dest}' already exists")
        c = decisions.c
        q = sa.select(c.image_sha256, c.review, c.image_path).where(c.review.in_(GOOD_REVIEWS + BAD_REVIEWS)) \
            .order_by(c.reviewed_at, c.id)
        with self.engine.connect() as conn:
            latest = {sha: (review, rel) for sha, review, rel in conn.execute(q)}  # later reviews win
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.tmp-", dir=os.path.dirname(dest))
        counts = {"good": 0, "defect": 0, "without_image": 0}
        try:
            for sub in ("good", "defect"):
                os.makedirs(os.path.join(tmp, sub))
            for sha, (review, rel) in latest.items():
                if not rel or not os.path.isfile(self.path(rel)):
                    counts["without_image"] += 1
                    continue
                sub = "good" if review in GOOD_REVIEWS else "defect"
                shutil.copyfile(self.path(rel), os.path.join(tmp, sub, sha[:16] + os.path.splitext(rel)[1]))
                counts[sub] += 1
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        return {"path": dest, **counts}


def reviewed_scores(engine: sa.Engine, versions: list[str]) -> tuple[Any, Any]:
    """Raw scores of reviewed decisions made by `versions` (one set of weights): (good, defect) arrays."""
    import numpy as np

    c = decisions.c
    q = sa.select(c.raw_score, c.review).where(c.review.in_(GOOD_REVIEWS + BAD_REVIEWS),
                                               c.model_version.in_(versions))
    with engine.connect() as conn:
        rows = conn.execute(q).all()
    return (np.array([r for r, v in rows if v in GOOD_REVIEWS], np.float64),
            np.array([r for r, v in rows if v in BAD_REVIEWS], np.float64))


def default_db(records_dir: str) -> str:
    return f"sqlite:///{os.path.abspath(os.path.join(records_dir, 'records.db'))}"


def open_store(db: str | None, records_dir: str, keep_count: int = 0, keep_days: float = 0) -> RecordStore:
    """The store for `--db` (default: records.db in `records_dir`); image files in `records_dir`/files."""
    return RecordStore(db or default_db(records_dir), os.path.join(records_dir, "files"), keep_count, keep_days)
