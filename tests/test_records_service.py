"""Every decision of the real service recorded (SQLite and PostgreSQL), the token rule, and predict's record."""

import hashlib
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from live_server import b64, live_server, post

from uadkit.cli import main
from uadkit.serving.records import RecordStore, default_db

TOKEN = "s3cret-token"


def _images(demo_dir) -> list[str]:
    return sorted(os.path.join(demo_dir, "test", d, f) for d in ("good", "scratch", "stain")
                  for f in os.listdir(os.path.join(demo_dir, "test", d)))


def _get(url: str, token: str | None = None) -> tuple[int, dict | bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
            return r.status, json.loads(body) if r.headers.get_content_type() == "application/json" else body
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _review(base: str, rid: int, body: dict, token: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"X-Uadkit-Token": token} if token else {})}
    req = urllib.request.Request(f"{base}/records/{rid}/review", data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _send_all(base: str, paths: list[str], clients: int = 8) -> list[tuple[int, dict]]:
    data = {p: b64(open(p, "rb").read()) for p in set(paths)}
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda p: post(base, {"image": data[p]}), paths))


def test_service_records_every_decision_and_guards_history_with_the_token(trained, demo_dir, tmp_path):
    paths = _images(demo_dir) * 3
    model_dir = os.path.join(trained, "best_model")
    with live_server(model_dir, tmp_path, require_token=True, token=TOKEN, max_batch=4) as (base, _, log):
        answers = _send_all(base, paths)
        assert all(code == 200 for code, _ in answers)
        # the token: history and reviews refused without it (predicting above needed none)
        for url in ("/records", "/records/1/thumb.jpg"):
            code, body = _get(base + url)
            assert code == 401 and "token" in body["errorMsg"]
        assert _get(base + "/records", "wrong")[0] == 401
        assert _review(base, 1, {"review": "confirmed", "reviewer": "ana"})[0] == 401
        # records are written behind the answers: wait until the writer is done
        for _ in range(100):
            health = json.loads(urllib.request.urlopen(base + "/health").read())
            if health["records"]["written"] == len(paths):
                break
            time.sleep(0.1)
        assert health["records"]["written"] == len(paths) and health["records"]["failed"] == 0
        code, listing = _get(base + "/records?limit=1000", TOKEN)
        assert code == 200 and listing["counts"]["total"] == len(paths)
        rows = listing["records"]
        assert len(rows) == len(paths) and len({r["id"] for r in rows}) == len(paths)
        # each row is the decision its request got: same image hash, score, label, model version
        answered = sorted((hashlib.sha256(open(p, "rb").read()).hexdigest(), round(a["result"]["score"], 6),
                           a["result"]["label"]) for p, (_, a) in zip(paths, answers))
        stored = sorted((r["image_sha256"], round(r["score"], 6), r["label"]) for r in rows)
        assert stored == answered
        assert {r["model_version"] for r in rows} == {health["model_version"]} and rows[0]["model_name"] == "STFPM"
        flagged = _get(base + "/records?show=flagged&limit=1000", TOKEN)[1]["records"]
        assert len(flagged) == sum(a["result"]["label"] == "anomalous" for _, a in answers)
        code, jpg = _get(f"{base}/records/{rows[0]['id']}/overlay.jpg?token={TOKEN}")
        assert code == 200 and jpg[:2] == b"\xff\xd8"
        # reviews record who and when
        rid = rows[0]["id"]
        code, body = _review(base, rid, {"review": "false_alarm", "reviewer": "ana"}, TOKEN)
        assert code == 200 and body["record"]["reviewer"] == "ana" and body["record"]["reviewed_at"] > 0
        assert body["counts"]["false_alarm"] == 1
        code, body = _review(base, rid, {"review": "maybe", "reviewer": "ana"}, TOKEN)
        assert code == 400 and "review: expected one of" in body["errorMsg"]
        assert _review(base, 10**6, {"review": "ok", "reviewer": "ana"}, TOKEN)[0] == 404
    # the database file is where the docs say, and holds the same rows after the server stopped
    store = RecordStore(default_db(str(tmp_path / "records")), str(tmp_path / "records" / "files"))
    assert store.counts_by_review()["total"] == len(paths) and store.get(rid)["review"] == "false_alarm"
    store.close()


def test_off_loopback_writes_need_a_token(trained, tmp_path):
    from fastapi.testclient import TestClient

    from uadkit.pipeline import AnomalyDetectionPipeline, load_pipeline_config
    from uadkit.serving.app import create_app, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("192.168.1.5")
    cfg = load_pipeline_config("anomaly_detection")
    cfg["SubModules"]["AnomalyDetection"]["model_dir"] = os.path.join(trained, "best_model")
    # this test binds nothing (TestClient): it checks the rule the service applies when bound to 0.0.0.0
    cfg["Serving"]["records_dir"] = str(tmp_path / "records")
    os.environ.pop("UADKIT_TOKEN", None)
    with TestClient(create_app(AnomalyDetectionPipeline(cfg), host="0.0.0.0")) as client:
        r = client.post("/records/1/review", json={"review": "ok", "reviewer": "ana"})
        assert r.status_code == 403 and "--token" in r.json()["errorMsg"]
        assert client.get("/records").status_code == 403
    cfg["Serving"]["token"] = TOKEN
    with TestClient(create_app(AnomalyDetectionPipeline(cfg), host="0.0.0.0")) as client:
        assert client.get("/records").status_code == 401
        assert client.get("/records", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_two_services_share_one_postgresql_history(trained, demo_dir, tmp_path, pg_url):
    paths = _images(demo_dir) * 2
    model_dir = os.path.join(trained, "best_model")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with live_server(model_dir, tmp_path / "a", db=pg_url) as (a, _, _), \
            live_server(model_dir, tmp_path / "b", db=pg_url) as (b, _, _):
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda base: _send_all(base, paths, 6), (a, b)))
        assert all(code == 200 for answers in results for code, _ in answers)
        # loopback: the history needs no token
        code, listing = _get(a + "/records?limit=1000")
        assert code == 200
    # both stopped: every queued record has been written
    store = RecordStore(pg_url, str(tmp_path / "a" / "records" / "files"))
    rows = store.query(limit=1000)
    assert len(rows) == 2 * len(paths) and len({r["id"] for r in rows}) == 2 * len(paths)
    files = [os.path.join(tmp_path / side / "records" / "files", r["thumb_path"]) for r in rows for side in "ab"]
    assert sum(os.path.isfile(f) for f in files) == 2 * len(paths)  # each in the folder of its own replica
    store.close()


def test_predict_records_with_the_option(trained, demo_dir, tmp_path):
    out = tmp_path / "pred"
    rc = main(["-c", "configs/STFPM.yaml", "-o", "Global.mode=predict", "-o", f"Global.output={out}",
               "-o", f"Predict.model_dir={trained}/best_model", "-o", f"Predict.input={demo_dir}/test/stain",
               "-o", "Predict.record=true", "-o", "Predict.save_images=false"])
    assert rc == 0
    store = RecordStore(default_db(str(out / "records")), str(out / "records" / "files"))
    rows = store.query()
    summary = json.load(open(out / "predict" / "predict_result.json"))
    assert sorted((r["source"], round(r["score"], 6)) for r in rows) == sorted(
        (s["input_path"], round(s["pred_score"], 6)) for s in summary)
    for r in rows:
        assert r["image_sha256"] == hashlib.sha256(open(r["source"], "rb").read()).hexdigest()
        assert os.path.isfile(store.path(r["overlay_path"]))
    store.close()


@pytest.mark.parametrize("value", ["yes", 3])
def test_predict_record_option_is_checked(value, tmp_path):
    rc = main(["-c", "configs/STFPM.yaml", "-o", "Global.mode=predict", "-o", f"Global.output={tmp_path}",
               "-o", f"Predict.record={value}", "-o", "Predict.input=x.png"])
    assert rc == 2


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(os.environ.get("CI") != "true" and CHROMIUM is None, reason="Debian chromium not installed")
def test_review_page_in_headless_chromium(trained, demo_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "CI must install Debian's chromium (.ci/run does)"
    paths = _images(demo_dir)
    model_dir = str(tmp_path / "best_model")  # a copy: recalibrating writes a new version beside it
    shutil.copytree(os.path.join(trained, "best_model"), model_dir)
    with live_server(model_dir, tmp_path, require_token=True, token=TOKEN) as (base, _, _):
        assert all(code == 200 for code, _ in _send_all(base, paths, 4))
        for _ in range(100):  # recorded behind the answers
            if _get(base + "/records?limit=1000", TOKEN)[1]["counts"]["total"] == len(paths):
                break
            time.sleep(0.1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            assert page.goto(base + "/review").status == 401  # no token, no page
            page.goto(f"{base}/review?token={TOKEN}")
            page.wait_for_selector(".card")
            assert page.locator(".card").count() == len(paths)
            assert page.inner_text("#count-total") == str(len(paths))
            page.locator(".card").first.click()
            page.wait_for_selector("#large-overlay")
            page.keyboard.press("f")  # no name yet: refused, with the reason
            page.wait_for_function("document.getElementById('error').textContent.includes('reviewer')")
            page.fill("#reviewer", "ana")
            page.locator("#reviewer").dispatch_event("change")
            page.locator(".card").first.click()
            page.keyboard.press("f")  # false alarm; the page moves on to the next record
            page.wait_for_function("document.getElementById('count-false_alarm').textContent === '1'")
            page.keyboard.press("d")  # defect confirmed
            page.wait_for_function("document.getElementById('count-confirmed').textContent === '1'")
            rows = _get(base + "/records?show=reviewed", TOKEN)[1]["records"]
            assert sorted(r["review"] for r in rows) == ["confirmed", "false_alarm"]
            assert {r["reviewer"] for r in rows} == {"ana"}
            # the slider counts, on the reviewed records, the decisions a threshold would change
            for t in (0.0, 0.5, 1.0):
                page.eval_on_selector("#thr", f"el => {{ el.value = '{t}'; el.dispatchEvent(new Event('input')); }}")
                label = lambda r, t=t: "anomalous" if r["score"] >= t else "normal"  # noqa: E731
                assert page.inner_text("#changes") == str(sum(label(r) != r["label"] for r in rows))
                wrong = sum((label(r) == "anomalous") != (r["review"] == "confirmed") for r in rows)
                assert page.inner_text("#errors") == str(wrong)
            page.screenshot(path=str(tmp_path / "review.png"))
            # filters: the unreviewed ones only, then a score range
            page.select_option("#show", "unreviewed")
            page.wait_for_function(f"document.querySelectorAll('.card').length === {len(paths) - 2}")
            page.select_option("#show", "all")
            page.fill("#min", "0.5")
            page.click("#apply")
            flagged = sum(r["score"] >= 0.5 for r in _get(base + "/records?limit=1000", TOKEN)[1]["records"])
            page.wait_for_function(f"document.querySelectorAll('.card').length === {flagged}")
            page.fill("#min", "")
            page.click("#apply")
            page.wait_for_function(f"document.querySelectorAll('.card').length === {len(paths)}")
            # paging: 3 per page, "older" follows the ids down (newest first) and "newer" comes back
            every = _get(base + "/records?limit=1000", TOKEN)[1]["records"]
            ids = lambda: [int(i) for i in page.eval_on_selector_all(".card", "els => els.map(e => e.dataset.id)")]  # noqa: E731
            page.fill("#limit", "3")
            page.locator("#limit").dispatch_event("change")
            page.wait_for_function("document.querySelectorAll('.card').length === 3")
            assert ids() == [r["id"] for r in every[:3]] and page.is_disabled("#newer")
            for start in range(3, len(every), 3):
                page.click("#older")
                page.wait_for_function(f"document.querySelector('.card') && "
                                       f"+document.querySelector('.card').dataset.id === {every[start]['id']}")
                assert ids() == [r["id"] for r in every[start:start + 3]]
            assert page.is_disabled("#older") and f"page {-(-len(every) // 3)} " in page.inner_text("#page")
            back = 3 * ((len(every) - 1) // 3 - 1)  # the page before the last one
            page.click("#newer")
            page.wait_for_function(f"+document.querySelector('.card').dataset.id === {every[back]['id']}")
            assert ids() == [r["id"] for r in every[back:back + 3]] and not page.is_disabled("#older")
            page.fill("#limit", "100")
            page.locator("#limit").dispatch_event("change")
            page.wait_for_function(f"document.querySelectorAll('.card').length === {len(paths)}")
            # time filter: from / to the second of the middle record (local time in the page, as a person types)
            mid = int(sorted(r["ts"] for r in every)[len(every) // 2])
            local = ("t => { const d = new Date(t * 1000), p = n => String(n).padStart(2, '0'); return "
                     "`${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:"
                     "${p(d.getMinutes())}:${p(d.getSeconds())}`; }")
            stamp = page.evaluate(local, mid)
            for since, until, expected in ((stamp, "", sum(r["ts"] >= mid for r in every)),
                                           ("", stamp, sum(r["ts"] <= mid + 0.999 for r in every)),
                                           (page.evaluate(local, mid + 3600), "", 0)):
                page.fill("#since", since)
                page.fill("#until", until)
                page.click("#apply")
                page.wait_for_function(f"document.getElementById('page').textContent.includes('· {expected} shown')")
                assert page.locator(".card").count() == expected
            page.fill("#since", "")
            page.fill("#until", "")
            page.click("#apply")
            page.wait_for_function(f"document.querySelectorAll('.card').length === {len(paths)}")
            # feedback: six marked good, then the buttons: recalibrate (a new version served) and export
            page.locator(".card").first.click()
            for i in range(1, 7):
                page.keyboard.press("o")
                page.wait_for_function(f"document.getElementById('count-ok').textContent === '{i}'")
            old_version = _get(base + "/health")[1]["model_version"]
            page.click("#recal")
            page.wait_for_function("document.getElementById('recal-result').textContent.includes('now serving')",
                                   timeout=120_000)
            new_version = _get(base + "/health")[1]["model_version"]
            assert new_version != old_version and new_version in page.inner_text("#recal-result")
            assert os.path.isfile(os.path.join(model_dir + ".v2", "model.yaml"))
            page.click("#export")  # recorded without Serving.record_images: nothing to export, and it says why
            page.wait_for_function("document.getElementById('recal-result').textContent.includes('exported')")
            assert "6 reviewed without a stored image" in page.inner_text("#recal-result")
            browser.close()
