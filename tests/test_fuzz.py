"""The fuzz corpus (tests/fuzz_corpus.py, ~270 broken or odd inputs made at test time) through the CLI, the
API and the service: every input gives a result or a one-line error naming it; never a traceback, a 5xx,
a hang, or more than a set memory budget (the CLI and API runs are capped with RLIMIT_AS as well)."""

import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fuzz_corpus import MUST_FAIL, MUST_WORK, make_corpus, odd_arrays
from live_server import b64, health_ok, live_server, memory_kb, post

from uadkit.data.image_io import IMAGE_EXTS

ADDRESS_SPACE_CAP = 3 * 2**30   # RLIMIT_AS of the CLI / API runs: a decoded bomb would need far more
RSS_BUDGET_MB = 1200            # measured about 420 MB for the CLI run over the corpus
SERVER_PEAK_BUDGET_MB = 1500


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fuzz") / "corpus")
    return root, make_corpus(root)


def _listed(cases):
    """The cases a folder run sees: image extensions, not folders (FIFOs and broken links included)."""
    return [c for c in cases if os.path.splitext(c.path)[1].lower() in IMAGE_EXTS]


def _cap_memory():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_CAP, ADDRESS_SPACE_CAP))


def _run_measured(cmd: list[str], folder, timeout: float = 240) -> tuple[int, str, str, float]:
    """Run under the address-space cap; returns (exit code, stdout, stderr, peak RSS in MB) of that child."""
    out, err = open(folder / "stdout.txt", "wb"), open(folder / "stderr.txt", "wb")
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, preexec_fn=_cap_memory)
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"hung: {cmd[-6:]} ran longer than {timeout} s")
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.close()
    err.close()
    read = lambda name: (folder / name).read_bytes().decode("utf-8", "backslashreplace")  # noqa: E731
    return proc.returncode, read("stdout.txt"), read("stderr.txt"), usage.ru_maxrss / 1024


def _check_outcome(case, error: str | None, where: str) -> None:
    if case.ok is MUST_WORK:
        assert error is None, f"{where}: {case.kind} {case.path!r} should work, got {error}"
    if case.ok is MUST_FAIL:
        assert error is not None, f"{where}: {case.kind} {case.path!r} should be refused"
    if error is not None:
        assert error.startswith(f"{case.path}: ") and "\n" not in error, f"{where}: {error!r}"


def test_cli_over_the_corpus(trained, corpus, tmp_path):
    root, cases = corpus
    rc, out, err, peak_mb = _run_measured([
        sys.executable, "main.py", "-c", "configs/STFPM.yaml", "-o", "Global.mode=predict",
        "-o", f"Predict.model_dir={trained}/best_model", "-o", f"Predict.input={root}",
        "-o", f"Global.output={tmp_path}/out", "-o", "Predict.batch_size=4"], tmp_path)
    assert rc == 1, err[-2000:]  # some failed, the rest predicted
    assert "Traceback" not in err + out
    summary = json.load(open(tmp_path / "out" / "predict" / "predict_result.json"))
    listed = _listed(cases)
    by_path = {s["input_path"]: s for s in summary}
    assert sorted(by_path) == sorted(c.path for c in listed)
    for c in listed:
        _check_outcome(c, by_path[c.path].get("error"), "CLI")
    errors = [s["error"] for s in summary if s.get("error")]
    # stderr: exactly one line per failure, each naming its input
    assert sorted(err.splitlines()) == sorted(f"uadkit: skipped: {e}" for e in errors)
    assert f"{len(summary)} images" in out and f"{len(errors)} failed" in out
    assert peak_mb < RSS_BUDGET_MB


API_RUN = r"""
import json, resource, sys
sys.path.insert(0, "tests")
from fuzz_corpus import odd_arrays
from uadkit import create_model
from uadkit.errors import UadkitError
from uadkit.inference.predictor import PredictFailure

model = create_model(model_dir=sys.argv[1])
report = {"files": {}, "arrays": []}
run = model.predict(sys.argv[2], batch_size=3)
for item in run.outcomes():
    if isinstance(item, PredictFailure):
        report["files"][item.input_path] = item.error
    else:
        report["files"][item["input_path"]] = None
        assert item["pred_mask"].shape == item["anomaly_map"].shape
for path in sys.argv[3:]:  # one file at a time: the all-failed call raises the first error
    try:
        list(model.predict(path))
        report["files"][path] = None
    except UadkitError as e:
        report["files"][path] = str(e)
arrays = odd_arrays()
for name, a, ok in arrays:
    try:
        [res] = list(model.predict(a))
        report["arrays"].append(None)
        assert list(res["pred_mask"].shape) == res["image_size"][::-1]
    except UadkitError as e:
        report["arrays"].append(str(e))
mixed = model.predict([a for _, a, _ in arrays], batch_size=4)  # bad arrays skipped, good ones predicted
report["mixed"] = [len(list(mixed)), len(mixed.failures)]
report["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(report))
"""


def test_api_over_the_corpus_and_odd_arrays(trained, corpus, tmp_path):
    root, cases = corpus
    listed = {c.path for c in _listed(cases)}
    singles = [c.path for c in cases if c.path not in listed and not os.path.isdir(c.path)]  # GIFs, odd names
    rc, out, err, peak_mb = _run_measured([sys.executable, "-c", API_RUN, f"{trained}/best_model", root, *singles],
                                          tmp_path)
    assert rc == 0 and "Traceback" not in err, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    for c in cases:
        if c.path in report["files"]:
            _check_outcome(c, report["files"][c.path], "API")
    assert set(report["files"]) == listed | set(singles)
    arrays = odd_arrays()
    for (name, _, ok), error in zip(arrays, report["arrays"]):
        if ok is MUST_WORK:
            assert error is None, f"array {name}: {error}"
        if ok is MUST_FAIL:
            assert error and error.startswith("input array 0: ") and "\n" not in error, f"array {name}: {error}"
    n_ok = sum(e is None for e in report["arrays"])
    assert report["mixed"] == [n_ok, len(arrays) - n_ok]
    assert report["peak_mb"] < RSS_BUDGET_MB and peak_mb < RSS_BUDGET_MB


def test_service_over_the_corpus(trained, corpus, tmp_path):
    root, cases = corpus
    regular = [c for c in cases if c.regular and os.path.isfile(c.path)]
    with live_server(f"{trained}/best_model", tmp_path, max_batch=4) as (base, proc, log_path):
        before = memory_kb(proc.pid)

        def send(case):
            data = open(case.path, "rb").read()
            return case, post(base, {"image": b64(data)}, timeout=60)

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(send, regular))
        odd_requests = [  # the request itself is odd
            b"[" * 50000 + b"]" * 50000, b'{"image": ' * 3000 + b"1" + b"}" * 3000, b"", b"\xff\xfe not utf-8",
            b'{"image": null}', b'{"image": 12}', b'{"image": ""}', b'{"image": "   "}', b'{"image": "data:,"}',
            b'{"image": "data:image/png;base64,@@@"}', b'{"image": "C:\\\\x.png"}', b'{"image": "~/x.png"}',
            b'{"image": "ftp://127.0.0.1/x.png"}', b'{"image": "/9j/"}', b'{"image": "' + b"A" * 100001 + b'"}',
            b'{"image": 1e999}', b'{"image": "' + b"9" * 5000 + b'"}', b'{"other": 1}', b"null", b"1" * 10000,
        ]
        odd = [post(base, raw=r, timeout=60) for r in odd_requests]
        assert health_ok(base)
        after = memory_kb(proc.pid)
    log = log_path.read_text()
    for case, (code, body) in answers:
        assert code < 500, (case.path, code, body)
        if code == 200:
            assert body["errorCode"] == 0 and len(body["result"]["labelMap"]) == (
                body["result"]["size"][0] * body["result"]["size"][1])
        else:
            msg = body["errorMsg"]
            assert 400 <= code < 500 and body["errorCode"] == code and "\n" not in msg
            assert msg.startswith(("image: ", "body: ")), msg
        _check_outcome(case, None if code == 200 else case.path + ": " + body["errorMsg"], "service")
    for (code, body), raw in zip(odd, odd_requests):
        assert 400 <= code < 500 and "errorMsg" in body and "\n" not in body["errorMsg"], (raw[:40], code, body)
    assert "Traceback" not in log
    assert after["VmHWM"] / 1024 < SERVER_PEAK_BUDGET_MB, (before, after)
