"""Feedback: recalibrate from reviewed records (service endpoint and calibrate mode), a new model version
beside the old one, and the running service swapping to it under load without dropping a request."""

import hashlib
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request

import pytest
import yaml
from live_server import b64, live_server, post
from test_records_service import TOKEN, _get, _images

from uadkit.cli import main
from uadkit.data.formats import load_index
from uadkit.serving.records import Pending, RecordStore, default_db, latest_version, mark_latest, model_version


def _truth(path: str) -> bool:
    return os.path.basename(os.path.dirname(path)) != "good"


def _recalibrate(base: str, body: dict, token: str | None = TOKEN) -> tuple[int, dict]:
    return _post(base, "/recalibrate", body, token)


def _post(base: str, path: str, body: dict, token: str | None = TOKEN) -> tuple[int, dict]:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait_written(base: str, n: int) -> dict:
    for _ in range(200):
        health = json.loads(urllib.request.urlopen(base + "/health").read())
        if health["records"]["written"] >= n:
            return health
        time.sleep(0.1)
    raise AssertionError(f"records not written: {health}")


def test_recalibrate_from_reviews_hot_swaps_under_load(trained, demo_dir, tmp_path):
    model_dir = str(tmp_path / "models" / "best_model")  # a copy: the new version is written beside it
    shutil.copytree(os.path.join(trained, "best_model"), model_dir)
    old_version = model_version(model_dir)
    paths = _images(demo_dir) * 2
    data = {p: b64(open(p, "rb").read()) for p in set(paths)}
    with live_server(model_dir, tmp_path, require_token=True, token=TOKEN, max_batch=4, record_images=True) \
            as (base, _, _):
        assert all(post(base, {"image": data[p]})[0] == 200 for p in paths)
        _wait_written(base, len(paths))
        rows = _get(base + "/records?limit=1000", TOKEN)[1]["records"]
        by_sha = {hashlib.sha256(open(p, "rb").read()).hexdigest(): _truth(p) for p in paths}
        for r in rows:  # the reviewer's truth: the demo folder each image came from
            flagged, defect = r["label"] == "anomalous", by_sha[r["image_sha256"]]
            review = {(True, True): "confirmed", (True, False): "false_alarm", (False, True): "missed",
                      (False, False): "ok"}[(flagged, defect)]
            req = urllib.request.Request(f"{base}/records/{r['id']}/review", headers={
                "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
                data=json.dumps({"review": review, "reviewer": "ana"}).encode())
            urllib.request.urlopen(req, timeout=30).read()
        # export reviewed: the images as received, in a folder layout train reads (good/ and defect/)
        code, exp = _post(base, "/records/export", {})
        assert code == 200 and exp["without_image"] == 0
        assert exp["good"] == len({s for s, d in by_sha.items() if not d}) and exp["defect"] == sum(by_sha.values())
        index = load_index(exp["path"], 0.0)
        assert index.type == "Folder" and len(index.train) + len(index.test) == exp["good"] + exp["defect"]
        assert sorted(open(s.path, "rb").read() for s in index.train + index.test) == \
            sorted(open(p, "rb").read() for p in set(paths))
        assert _post(base, "/records/export", {}, token=None)[0] == 401
        assert _recalibrate(base, {}, token=None)[0] == 401  # a write: the token rule holds
        assert _recalibrate(base, {"false_alarm_rate": 0.9})[0] == 422

        # requests keep coming from 4 clients while the new version is fitted, written and swapped in
        answers: list[int] = []
        stop = threading.Event()

        def client(i: int) -> None:
            while not stop.is_set():
                answers.append(post(base, {"image": data[paths[(i + len(answers)) % len(paths)]]})[0])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        code, result = _recalibrate(base, {"false_alarm_rate": 0.2})
        time.sleep(1.0)  # still under load after the swap
        stop.set()
        for t in threads:
            t.join()
        assert code == 200, result
        assert answers and all(c == 200 for c in answers), f"{answers.count(200)}/{len(answers)} answered"
        new_dir, new_version = result["model_dir"], result["model_version"]
        assert new_dir == model_dir + ".v2" and new_version != old_version
        assert result["latest_link"] == model_dir + ".latest" and os.readlink(model_dir + ".latest") == "best_model.v2"
        assert result["good"] == sum(not _truth(p) for p in paths) and result["defects"] == sum(map(_truth, paths))
        assert model_version(model_dir) == old_version  # the old version stays on disk, untouched
        meta = yaml.safe_load(open(os.path.join(new_dir, "model.yaml")))
        assert meta["lineage"] == [old_version] and meta["calibration"]["image_threshold"] == \
            pytest.approx(result["after"]["image_threshold"])
        health = _wait_written(base, len(paths) + len(answers))
        assert health["model_version"] == new_version and health["records"]["failed"] == 0
        # later decisions carry the new version; each earlier one keeps the version that decided it
        n_after = 6
        assert all(post(base, {"image": data[p]})[0] == 200 for p in paths[:n_after])
        _wait_written(base, len(paths) + len(answers) + n_after)
        rows = _get(base + "/records?limit=1000", TOKEN)[1]["records"]
        assert {r["model_version"] for r in rows[:n_after]} == {new_version}
        assert {r["model_version"] for r in rows[-len(paths):]} == {old_version}
        assert {r["model_version"] for r in rows} == {old_version, new_version}


def test_calibrate_mode_reads_reviews_from_the_database(trained, tmp_path, capsys):
    model_dir = str(tmp_path / "best_model")
    shutil.copytree(os.path.join(trained, "best_model"), model_dir)
    version = model_version(model_dir)
    url = f"sqlite:///{tmp_path / 'records.db'}"
    store = RecordStore(url, str(tmp_path / "files"))
    row = {"source": "x", "image_sha256": "0" * 64, "model_name": "STFPM", "label": "normal", "threshold": 0.5,
           "defect_area": 0.0, "score": 0.5}
    scores = [(v, 0.1 * i) for i, v in enumerate([version] * 12 + ["someother"] * 3)]
    for ver, raw in scores:
        store.add(Pending({**row, "model_version": ver, "raw_score": raw}))
    store.flush()
    ids = [r["id"] for r in sorted(store.query(limit=100), key=lambda r: r["id"])]
    for i in ids[:8] + ids[12:]:
        store.review(i, "ok", "ana")  # 8 goods of this model (3 of another one's weights: not used)
    store.review(ids[10], "confirmed", "ana")
    store.close()
    args = ["-c", "configs/STFPM.yaml", "-o", "Global.mode=calibrate", "-o", f"Calibrate.db={url}",
            "-o", f"Calibrate.model_dir={model_dir}", "-o", f"Global.output={tmp_path / 'out'}"]
    assert main(args) == 0
    res = json.load(open(tmp_path / "out" / "calibrate_result.json"))
    assert res["model_dir"] == model_dir + ".v2" and res["good"] == 8 and res["defects"] == 1
    assert res["calibration"]["pixel"]["kept"] and os.path.isfile(os.path.join(model_dir, "model.yaml"))
    old = yaml.safe_load(open(os.path.join(model_dir, "model.yaml")))["calibration"]
    new = yaml.safe_load(open(os.path.join(model_dir + ".v2", "model.yaml")))["calibration"]
    assert new["pixel_threshold"] == old["pixel_threshold"] and new["image_threshold"] != old["image_threshold"]
    # v2 has the same weights: the reviews of v1 still count, and the next version is v3
    assert main([*args, "-o", f"Calibrate.model_dir={model_dir}.v2"]) == 0
    assert json.load(open(tmp_path / "out" / "calibrate_result.json"))["model_dir"] == model_dir + ".v3"
    # the offline mode moves X.latest as the service does, and from the link the next version is v4
    assert os.path.realpath(model_dir + ".latest") == os.path.realpath(model_dir + ".v3")
    assert main([*args, "-o", f"Calibrate.model_dir={model_dir}.latest"]) == 0
    assert json.load(open(tmp_path / "out" / "calibrate_result.json"))["model_dir"] == model_dir + ".v4"
    assert os.path.realpath(model_dir + ".latest") == os.path.realpath(model_dir + ".v4")
    # too few reviews: one line naming the key
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    assert main([*args, "-o", f"Calibrate.db={empty}"]) != 0
    assert "Calibrate.db: 0 decisions" in capsys.readouterr().err


def test_latest_link_follows_recalibrations_across_restarts_and_predict(trained, demo_dir, tmp_path):
    model_dir = str(tmp_path / "models" / "best_model")
    shutil.copytree(os.path.join(trained, "best_model"), model_dir)
    v1 = model_version(model_dir)
    url = f"sqlite:///{tmp_path / 'records.db'}"
    store = RecordStore(url, str(tmp_path / "files"))
    row = {"source": "x", "image_sha256": "0" * 64, "model_name": "STFPM", "label": "normal", "threshold": 0.5,
           "defect_area": 0.0, "score": 0.5, "model_version": v1}
    for i in range(12):
        store.add(Pending({**row, "raw_score": 0.1 * i}))
    store.flush()
    for r in store.query(limit=100)[:8]:
        store.review(r["id"], "ok", "ana")
    store.close()
    link = model_dir + ".latest"
    with live_server(model_dir, tmp_path, db=url) as (base, _, _):  # loopback: no token needed
        code, r2 = _recalibrate(base, {}, token=None)
        assert code == 200 and r2["latest_link"] == link and os.readlink(link) == "best_model.v2"
        code, r3 = _recalibrate(base, {}, token=None)
        assert code == 200 and r3["model_dir"] == model_dir + ".v3" and os.readlink(link) == "best_model.v3"
    # a service restarted on the link serves the newest version, and its next version is .v4 (not .latest.v2)
    with live_server(link, tmp_path, db=url) as (base, _, _):
        assert json.loads(urllib.request.urlopen(base + "/health").read())["model_version"] == r3["model_version"]
        code, r4 = _recalibrate(base, {}, token=None)
        assert code == 200 and r4["model_dir"] == model_dir + ".v4" and os.readlink(link) == "best_model.v4"
    assert model_version(model_dir) == v1 and latest_version(model_dir) == model_dir + ".v4"
    assert mark_latest(model_dir + ".v2") == link and os.readlink(link) == "best_model.v4"  # never backwards
    os.mkdir(model_dir + ".v5")  # a version still being written (no model.yaml yet) is not the newest
    assert latest_version(model_dir + ".v2") == model_dir + ".v4"
    # the service says so when started on an older version
    with live_server(model_dir, tmp_path, db=url) as (_, _, log):
        pass
    assert f"a newer version {model_dir}.v4 exists" in open(log).read() and f"--model_dir {link}" in open(log).read()
    # predict pointed at the link decides with (and records) the newest version
    out = tmp_path / "pred"
    assert main(["-c", "configs/STFPM.yaml", "-o", "Global.mode=predict", "-o", f"Global.output={out}",
                 "-o", f"Predict.model_dir={link}", "-o", f"Predict.input={demo_dir}/test/stain",
                 "-o", "Predict.record=true", "-o", "Predict.save_images=false"]) == 0
    store = RecordStore(default_db(str(out / "records")), str(out / "records" / "files"))
    rows = store.query()
    store.close()
    assert rows and {r["model_version"] for r in rows} == {r4["model_version"]}
