"""The record store on a real SQLite file and a real PostgreSQL server: schema, writes, retention, reviews."""

import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from uadkit.errors import UadkitError
from uadkit.inference.result import AnomalyResult
from uadkit.serving import records as R


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/records.db"
    return request.getfixturevalue("pg_url")


def _result(i: int) -> AnomalyResult:
    rng = np.random.default_rng(i)
    image = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    amap = rng.random((64, 80)).astype(np.float32)
    mask = (amap > 0.9).astype(np.uint8)
    score = float(i % 10) / 10 + 0.05
    return AnomalyResult(image=image, input_path=f"img{i}.png", pred_score=score,
                         pred_label="anomalous" if score >= 0.5 else "normal", threshold=0.5,
                         raw_score=score * 3, anomaly_map=amap, pred_mask=mask)


def _pending(i: int, version: str = "v1") -> R.Pending:
    res = _result(i)
    return R.pending_from_result(res, f"img{i}.png", f"{i:064x}", "STFPM", version)


def _store(url, tmp_path, **kw) -> R.RecordStore:
    return R.RecordStore(url, str(tmp_path / "files"), **kw)


def test_concurrent_writes_all_recorded_and_consistent(db_url, tmp_path):
    store = _store(db_url, tmp_path)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: store.add(_pending(i)), range(200)))
    store.flush()
    rows = store.query(limit=1000)
    assert store.stats()["written"] == 200 and store.stats()["failed"] == 0 and len(rows) == 200
    assert sorted(r["source"] for r in rows) == sorted(f"img{i}.png" for i in range(200))
    for r in rows:  # each row is its own decision, with both images on disk
        i = int(r["source"][3:-4])
        assert r["image_sha256"] == f"{i:064x}" and r["score"] == pytest.approx(float(i % 10) / 10 + 0.05)
        assert r["label"] == ("anomalous" if r["score"] >= 0.5 else "normal") and 0 <= r["defect_area"] < 0.2
        for key in ("thumb_path", "overlay_path"):
            assert os.path.getsize(store.path(r[key])) > 100
    assert store.counts_by_review()["total"] == 200 and store.counts_by_review()["flagged"] == 100
    store.close()


def test_retention_deletes_rows_and_files(db_url, tmp_path):
    store = _store(db_url, tmp_path, keep_count=30, prune_every=10**9)
    for i in range(50):
        store.add(_pending(i))
    store.flush()
    files = lambda: sorted(os.path.join(d, f) for d, _, fs in os.walk(store.files_dir) for f in fs)  # noqa: E731
    assert len(files()) == 100
    assert store.prune() == 20
    rows = store.query(limit=1000)
    assert len(rows) == 30
    assert sorted(int(r["source"][3:-4]) for r in rows) == list(range(20, 50))
    kept = sorted(store.path(r[k]) for r in rows for k in ("thumb_path", "overlay_path"))
    assert files() == kept
    # by age: everything older than a day (seen from two days ahead) goes, files too
    store.keep_count, store.keep_days = 0, 1
    assert store.prune(now=time.time() + 2 * 86400) == 30
    assert store.query() == [] and files() == []
    store.close()


def test_migration_from_empty_and_from_version_1(db_url, tmp_path):
    engine = R.make_engine(db_url)
    assert R.migrate(engine, target=1) == (0, 1)  # what uadkit's first record store created
    with engine.begin() as conn:
        assert R.schema_version(conn) == 1
        cols = {c["name"] for c in sa.inspect(conn).get_columns("decisions")}
        assert "review" not in cols
        conn.execute(sa.text("INSERT INTO decisions (ts, source, image_sha256, model_name, model_version, raw_score,"
                             " score, label, threshold, defect_area) VALUES (1.0, 'old.png', 'ab', 'STFPM', 'v0', "
                             "2.0, 0.7, 'anomalous', 0.5, 0.01)"))
    engine.dispose()
    store = _store(db_url, tmp_path)  # opening migrates to the current version, keeping the rows
    [old] = store.query()
    assert old["source"] == "old.png" and old["review"] is None
    assert store.review(old["id"], "false_alarm", "ana")
    with store.engine.connect() as conn:
        assert R.schema_version(conn) == R.SCHEMA_VERSION
    store.close()
    again = _store(db_url, tmp_path)  # already current: nothing to do
    assert R.migrate(again.engine) == (R.SCHEMA_VERSION, R.SCHEMA_VERSION)
    assert again.query()[0]["review"] == "false_alarm"
    again.close()


def test_reviews_record_who_and_when(db_url, tmp_path):
    store = _store(db_url, tmp_path)
    for i in range(4):
        store.add(_pending(i))
    store.flush()
    ids = [r["id"] for r in store.query()]
    t0 = time.time()
    assert store.review(ids[0], "confirmed", " ana ") and store.review(ids[1], "missed", "bo")
    assert not store.review(10**6, "ok", "ana")
    with pytest.raises(UadkitError, match="review: expected one of"):
        store.review(ids[2], "maybe", "ana")
    with pytest.raises(UadkitError, match="reviewer"):
        store.review(ids[2], "ok", " ")
    r = store.get(ids[0])
    assert r["reviewer"] == "ana" and t0 - 1 <= r["reviewed_at"] <= time.time() + 1
    counts = store.counts_by_review()
    assert counts["confirmed"] == 1 and counts["missed"] == 1 and counts["unreviewed"] == 2
    assert {x["id"] for x in store.query("unreviewed")} == set(ids[2:])
    assert all(x["score"] >= 0.3 for x in store.query(min_score=0.3))
    store.review(ids[0], None, "ana")
    assert store.get(ids[0])["review"] is None and store.get(ids[0])["reviewer"] is None
    store.close()


def test_locked_sqlite_never_blocks_and_failures_are_counted(tmp_path):
    url = f"sqlite:///{tmp_path}/records.db"
    store = _store(url, tmp_path)
    lock = sqlite3.connect(tmp_path / "records.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # another process holds the database
    t0 = time.perf_counter()
    for i in range(20):
        store.add(_pending(i))
    assert time.perf_counter() - t0 < 0.5  # adding only queues
    time.sleep(0.5)
    assert store.stats()["written"] == 0 and store.stats()["pending"] + 20 > 0
    lock.execute("ROLLBACK")  # released within the busy timeout: everything gets written
    store.flush()
    assert store.stats()["written"] == 20
    lock.execute("DROP TABLE decisions")  # a broken database: writes fail, are counted and leave no files
    lock.close()
    store.add(_pending(99))
    store.flush()
    st = store.stats()
    assert st["failed"] == 1 and "decisions" in st["last_error"]
    assert len([f for _, _, fs in os.walk(store.files_dir) for f in fs]) == 40
    store.close()


def test_full_queue_drops_and_counts(tmp_path):
    store = _store(f"sqlite:///{tmp_path}/r.db", tmp_path, queue_size=1)
    hold = threading.Event()
    orig = store._write
    store._write = lambda items: (hold.wait(5), orig(items))  # keep the writer busy with the first item
    for i in range(5):
        store.add(_pending(i))
    hold.set()
    store.flush()
    st = store.stats()
    assert st["written"] + st["dropped"] == 5 and st["dropped"] >= 3
    store.close()


def test_bad_urls_are_one_line_errors(tmp_path):
    with pytest.raises(UadkitError, match="--db"):
        R.RecordStore("nonsense://", str(tmp_path))
    with pytest.raises(UadkitError, match="--db.*cannot open"):
        R.RecordStore("postgresql://nobody@127.0.0.1:1/x", str(tmp_path))


def test_model_version_changes_with_the_folder(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.yaml").write_text("a: 1")
    v1 = R.model_version(str(tmp_path / "m"))
    assert v1 == R.model_version(str(tmp_path / "m")) and len(v1) == 16
    (tmp_path / "m" / "model.yaml").write_text("a: 2")
    assert R.model_version(str(tmp_path / "m")) != v1


def test_migration_from_version_2_adds_the_image_column(db_url, tmp_path):
    engine = R.make_engine(db_url)
    assert R.migrate(engine, target=2) == (0, 2)  # the store before "export reviewed"
    with engine.begin() as conn:
        assert "image_path" not in {c["name"] for c in sa.inspect(conn).get_columns("decisions")}
        conn.execute(sa.text("INSERT INTO decisions (ts, source, image_sha256, model_name, model_version, raw_score,"
                             " score, label, threshold, defect_area, review, reviewer) VALUES (1.0, 'old.png', 'ab',"
                             " 'STFPM', 'v0', 2.0, 0.7, 'anomalous', 0.5, 0.01, 'confirmed', 'ana')"))
    engine.dispose()
    store = _store(db_url, tmp_path)
    [old] = store.query()
    assert old["review"] == "confirmed" and old["image_path"] is None
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    item = _pending(1)
    item.original = png.read_bytes()
    store.add(item)
    store.flush()
    new = store.query(limit=1)[0]
    assert new["image_path"].endswith("_image.png") and open(store.path(new["image_path"]), "rb").read() == \
        png.read_bytes()
    store.review(new["id"], "ok", "ana")
    out = store.export_reviewed(str(tmp_path / "export"))  # the old row has no image: counted, not exported
    assert (out["good"], out["defect"], out["without_image"]) == (1, 0, 1)
    assert os.listdir(tmp_path / "export" / "good") == [f"{1:064x}"[:16] + ".png"]  # named by its hash
    store.close()
