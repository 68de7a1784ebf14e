"""Decision thresholds: the estimator on known distributions, the report, out-of-fold scores, calibrate mode."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import yaml
from scipy import stats

from uadkit import create_model
from uadkit.cli import main
from uadkit.data.formats import load_index
from uadkit.engine.calibration import calibrate, fit_tail, operating_point, recall_report
from uadkit.engine.fitting import fit_distributed, image_loader
from uadkit.errors import UadkitError
from uadkit.inference.predictor import score_images
from uadkit.models import build_model
from uadkit.models.base import squash

KNOWN = {"normal": stats.norm(5, 1), "gamma": stats.gamma(2), "lognormal": stats.lognorm(0.5),
         "weibull": stats.weibull_min(1.5), "student-t": stats.t(5, loc=10)}


def _realised(dist, method: str, n: int, rate: float, trials: int = 150, seed: int = 0) -> np.ndarray:
    """True false-alarm rate of thresholds estimated from n samples of a known distribution."""
    rng = np.random.default_rng(seed)
    return np.array([dist.sf(fit_tail(dist.rvs(n, random_state=rng), method, rate).threshold(rate))
                     for _ in range(trials)])


@pytest.mark.parametrize("name", list(KNOWN))
def test_tail_estimator_holds_the_rate_from_tens_of_scores(name):
    # 30 good scores and a 2% target: the sample quantile sits at the maximum and misses often; the fitted
    # tail must hold the target within a factor 2 in most draws, and do better than the sample quantile.
    real_auto = _realised(KNOWN[name], "auto", 30, 0.02)
    real_emp = _realised(KNOWN[name], "empirical", 30, 0.02)
    err = lambda r: np.median(np.abs(np.log(np.maximum(r, 1e-6) / 0.02)))  # noqa: E731
    assert 0.01 < np.median(real_auto) < 0.04
    assert np.mean(real_auto > 0.04) < 0.35
    assert np.mean(real_auto > 0.04) < np.mean(real_emp > 0.04)
    assert err(real_auto) <= err(real_emp) + 0.05


def test_with_many_scores_every_estimator_converges():
    rng = np.random.default_rng(3)
    good = stats.gamma(2).rvs(5000, random_state=rng)
    truth = stats.gamma(2).isf(0.05)
    for method in ("empirical", "gpd", "auto"):
        assert fit_tail(good, method, 0.05).threshold(0.05) == pytest.approx(truth, rel=0.05)


def test_operating_point_reports_target_estimate_count_and_interval():
    good = stats.lognorm(0.4).rvs(40, random_state=np.random.default_rng(1))
    op = operating_point(good, 0.02, "auto")
    assert op["n_good"] == 40 and op["target_rate"] == 0.02
    assert op["estimated_rate"] == pytest.approx(0.02, abs=1e-4)
    lo, hi = op["rate_interval_90"]
    assert lo < 0.02 < hi and hi - lo > 0.005  # 40 scores cannot pin a 2% tail down
    assert op["rate_on_calibration_scores"] == pytest.approx(np.mean(good >= op["threshold"]))
    # more scores, a narrower interval
    big = operating_point(stats.lognorm(0.4).rvs(400, random_state=np.random.default_rng(1)), 0.02, "auto")
    assert big["rate_interval_90"][1] - big["rate_interval_90"][0] < hi - lo


def test_too_few_good_scores_and_bad_rates_are_one_line_errors():
    with pytest.raises(UadkitError, match="got none"):
        calibrate(np.ones(0), np.ones(0), 0.02)
    # a handful of scores still gives a threshold (the sample quantile; training warns it is rough)
    assert calibrate(np.arange(3.0), np.arange(3.0), 0.05)["image"]["estimator"] == "empirical"
    with pytest.raises(UadkitError, match="false_alarm_rate"):
        calibrate(np.arange(10.0), np.arange(10.0), 0.7)


def test_recall_report_and_best_recall_at_same_flag_rate():
    good = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    bad = np.array([3.5, 5.0, 6.0, 12.0])
    r = recall_report(good, bad, 5.5)  # flags 1 good (10.0), catches 2 of 4
    assert (r["good_flagged"], r["defects_caught"], r["recall"]) == (1, 2, 0.5)
    # flagging at most 1 good, the best threshold sits just above 4.0: catches 5.0, 6.0, 12.0
    assert r["best_recall_at_same_flag_rate"] == 0.75


def test_labelled_defects_report_recall_but_do_not_move_the_threshold():
    rng = np.random.default_rng(2)
    good = rng.gamma(2, size=60)
    a = calibrate(good, good, 0.02)
    b = calibrate(good, good, 0.02, bad_scores=np.array([5.0, 9.0, 30.0]))
    assert a["image_threshold"] == b["image_threshold"]
    assert b["labelled_defects"]["defects_total"] == 3 and "labelled_defects" not in a


def test_normalisation_puts_threshold_at_half_median_good_at_005():
    good = np.random.default_rng(1).normal(5.0, 0.5, 500)
    cal = calibrate(good, good, 0.01)
    t = torch.tensor(cal["image_threshold"])
    lo, hi = torch.tensor(cal["image_scale_low"]), torch.tensor(cal["image_scale_high"])
    x = torch.tensor([float(np.median(good)), cal["image_threshold"], 2 * cal["image_threshold"]])
    assert torch.allclose(squash(x, t, lo, hi), torch.tensor([0.05, 0.5, 0.95]), atol=1e-4)
    assert torch.all(torch.diff(squash(torch.linspace(0, 20, 200), t, lo, hi)) >= 0)  # monotone


@pytest.mark.parametrize("name", ["PatchCore", "PaDiM"])
def test_out_of_fold_scores_equal_a_manual_k_fold(name, demo_dir):
    """Each image's out-of-fold score equals the score of a model fitted without its fold."""
    cfg = {"backbone": "efficientnet_lite0", "layers": None, "input_size": [64, 64], "pretrained_path": None,
           "smoothing_sigma": 4.0}
    if name == "PatchCore":
        cfg.update(coreset_ratio=0.1, coreset_group=2, projection_dim=64, num_neighbors=9, max_bank_size=200000)
    else:
        cfg.update(feature_dim=40, covariance_eps=0.01)
    samples = load_index(demo_dir, 0.0).train[:8]
    model = build_model(name, cfg)
    _, feats = fit_distributed(model, samples, 2, torch.device("cpu"), keep_features=True)
    oof, oof_max, oof_maps = model.out_of_fold_scores(feats, image_loader(samples, model), folds=4)
    assert getattr(model, "_fold_totals", None) is None  # PaDiM frees the totals its fast folds use
    folds = [[0, 1], [2, 3], [4, 5], [6, 7]]  # PatchCore: its coreset groups; PaDiM: 4 contiguous folds
    for held in folds:
        ref = build_model(name, cfg)
        fit_distributed(ref, [s for i, s in enumerate(samples) if i not in held], 2, torch.device("cpu"))
        with torch.no_grad():
            amap, score = ref(image_loader(samples, ref)(held))
        np.testing.assert_allclose(oof[held], score.numpy(), rtol=1e-4)
        np.testing.assert_allclose(oof_max[held], amap.flatten(1).amax(1).numpy(), rtol=1e-4)
        # the held-out maps for the map check (64 px input: the 64 x 64 grid is the map itself)
        np.testing.assert_allclose(oof_maps[held], amap[:, 0].numpy(), rtol=1e-4, atol=1e-5)
    # scoring a subset gives the same scores for those images, in the subset's order
    sub, sub_max, sub_maps = model.out_of_fold_scores(feats, image_loader(samples, model), folds=4,
                                                      scored=np.array([1, 6]))
    np.testing.assert_allclose(sub, oof[[1, 6]], rtol=1e-5)
    np.testing.assert_allclose(sub_max, oof_max[[1, 6]], rtol=1e-5)
    np.testing.assert_allclose(sub_maps, oof_maps[[1, 6]], rtol=1e-5)
    # and they are not the in-sample scores the final model gives its own training images
    with torch.no_grad():
        _, own = model(image_loader(samples, model)(list(range(8))))
    assert np.all(own.numpy() < oof)


@pytest.fixture(scope="module")
def patchcore_run(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pc_cal")
    assert main(["-c", "configs/PatchCore.yaml", "-o", "Global.mode=train", "-o", f"Global.dataset_dir={demo_dir}",
                 "-o", f"Global.output={out}", "-o", "Model.input_size=[64,64]",
                 "-o", "Train.calibration.false_alarm_rate=0.05"]) == 0
    return str(out)


def test_train_result_states_the_operating_point(patchcore_run, demo_dir):
    cal = json.load(open(os.path.join(patchcore_run, "train_result.json")))["calibration"]
    n_good = len(load_index(demo_dir, 0.0).train)
    # out-of-fold: every good training image, validation goods included, gives a score
    assert cal["good_scores_from"] == "out_of_fold" and cal["n_good"] == n_good
    assert cal["false_alarm_rate"] == 0.05
    for part in ("image", "pixel"):
        assert cal[part]["target_rate"] == 0.05 and cal[part]["n_good"] == n_good
        assert len(cal[part]["rate_interval_90"]) == 2
    s = cal["synthetic_defects"]
    assert s["images"] > 0 and 0 <= s["recall_estimate"] <= 1 and "estimate" in s["note"]


def _good_folder(demo_dir, dst, with_defects=False) -> str:
    idx = load_index(demo_dir, 0.0)
    os.makedirs(os.path.join(dst, "good"))
    for i, s in enumerate(idx.train + [s for s in idx.test if not s.label]):
        shutil.copy(s.path, os.path.join(dst, "good", f"{i:03d}.png"))
    if with_defects:
        os.makedirs(os.path.join(dst, "defect"))
        for i, s in enumerate(s for s in idx.test if s.label):
            shutil.copy(s.path, os.path.join(dst, "defect", f"{i:03d}.png"))
    return str(dst)


def test_calibrate_mode_rewrites_the_model_atomically_and_onnx_agrees(patchcore_run, demo_dir, tmp_path, capsys):
    src = os.path.join(patchcore_run, "best_model")
    model_dir = str(tmp_path / "model")
    shutil.copytree(src, model_dir)
    folder = _good_folder(demo_dir, tmp_path / "newgood", with_defects=True)
    before = yaml.safe_load(open(os.path.join(model_dir, "model.yaml")))["calibration"]["image_threshold"]
    out = tmp_path / "cal_out"
    rc = main(["-c", "configs/PatchCore.yaml", "-o", "Global.mode=calibrate", "-o", f"Global.dataset_dir={folder}",
               "-o", f"Calibrate.model_dir={model_dir}", "-o", f"Global.output={out}",
               "-o", "Calibrate.false_alarm_rate=0.2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "before:" in printed and "after:" in printed and "defects caught" in printed
    res = json.load(open(out / "calibrate_result.json"))
    assert res["after"]["image_threshold"] != before and res["calibration"]["false_alarm_rate"] == 0.2
    assert res["good"] > 0 and res["defects"] > 0 and res["after"]["good_total"] == res["good"]
    meta = yaml.safe_load(open(os.path.join(model_dir, "model.yaml")))
    assert meta["calibration"]["image_threshold"] == pytest.approx(res["after"]["image_threshold"])
    assert meta["recalibrated_on"] == os.path.abspath(folder) and "trained_on" in meta
    info = yaml.safe_load(open(os.path.join(model_dir, "inference", "inference.yml")))
    assert info["calibration"]["image_threshold"] == pytest.approx(res["after"]["image_threshold"])
    # the rewritten ONNX graph and the torch model agree on the new thresholds
    images = [np.asarray(__import__("PIL.Image").Image.open(p).convert("RGB"))
              for p in sorted(os.path.join(folder, "defect", f) for f in os.listdir(os.path.join(folder, "defect")))]
    torch_det = create_model(model_dir=model_dir, run_mode="torch")
    onnx_det = create_model(model_dir=model_dir, run_mode="onnxruntime")
    a = score_images(torch_det.scorer(), images, torch.device("cpu"))
    b = score_images(onnx_det.scorer(), images, torch.device("cpu"))
    np.testing.assert_allclose([x.norm_score for x in a], [x.norm_score for x in b], atol=1e-4)
    # a higher target flags more of the calibration goods than the trained threshold did
    assert res["after"]["good_flagged"] >= res["before"]["good_flagged"]


def test_calibrate_api_and_failed_write_keeps_the_old_model(patchcore_run, demo_dir, tmp_path, monkeypatch):
    model_dir = str(tmp_path / "model")
    shutil.copytree(os.path.join(patchcore_run, "best_model"), model_dir)
    folder = _good_folder(demo_dir, tmp_path / "g")
    det = create_model(model_dir=model_dir)
    old_yaml = open(os.path.join(model_dir, "model.yaml")).read()
    old_onnx = open(os.path.join(model_dir, "inference", "model.onnx"), "rb").read()
    import uadkit.engine.export as export

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(export, "export_onnx", broken)  # fault injection: the write fails half-way
    with pytest.raises(OSError):
        det.calibrate(folder, false_alarm_rate=0.1)
    assert open(os.path.join(model_dir, "model.yaml")).read() == old_yaml
    assert open(os.path.join(model_dir, "inference", "model.onnx"), "rb").read() == old_onnx
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".model")]  # no temp folder left
    monkeypatch.undo()
    res = det.calibrate(folder, false_alarm_rate=0.1)
    assert float(det.model.calibration[0]) == pytest.approx(res["after"]["image_threshold"])
    assert len(list(det.predict(os.path.join(folder, "good", "000.png")))) == 1


def test_calibrate_bad_inputs_are_one_line_errors(patchcore_run, demo_dir, tmp_path, capsys):
    only_defects = tmp_path / "bad"
    os.makedirs(only_defects / "defect")
    os.makedirs(only_defects / "good")  # a good/ folder left empty
    idx = load_index(demo_dir, 0.0)
    shutil.copy(next(s.path for s in idx.test if s.label), only_defects / "defect" / "a.png")
    base = ["-c", "configs/PatchCore.yaml", "-o", "Global.mode=calibrate", "-o", f"Global.output={tmp_path}"]
    cases = [
        ([f"Global.dataset_dir={only_defects}", f"Calibrate.model_dir={patchcore_run}/best_model"], "no good images"),
        ([f"Global.dataset_dir={demo_dir}", f"Calibrate.model_dir={tmp_path}/missing"], "does not exist"),
        ([f"Calibrate.model_dir={patchcore_run}/best_model"], "Global.dataset_dir"),
        ([f"Global.dataset_dir={demo_dir}", "Calibrate.false_alarm_rate=2"], "Calibrate.false_alarm_rate"),
    ]
    for extra, needle in cases:
        rc = main(base + [x for e in extra for x in ("-o", e)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and needle in err and len(err.splitlines()) == 1, err


def test_evaluate_reports_the_decision_and_draws_the_roc(patchcore_run, demo_dir):
    assert main(["-c", "configs/PatchCore.yaml", "-o", "Global.mode=evaluate", "-o", f"Global.dataset_dir={demo_dir}",
                 "-o", f"Global.output={patchcore_run}"]) == 0
    ev = json.load(open(os.path.join(patchcore_run, "evaluate_result.json")))
    d = ev["decision"]
    idx = load_index(demo_dir, 0.0)
    assert d["good_total"] == sum(not s.label for s in idx.test)
    assert d["defects_total"] == sum(s.label for s in idx.test)
    assert sum(v["total"] for v in d["per_defect"].values()) == d["defects_total"]
    assert sum(v["caught"] for v in d["per_defect"].values()) == d["defects_caught"]
    assert d["recall"] <= d["best_recall_at_same_flag_rate"]
    from PIL import Image

    with Image.open(ev["artifacts"]["roc_curve"]) as im:
        assert im.size[0] > 300 and im.getextrema() != ((255, 255), (255, 255), (255, 255))


def test_without_the_serve_extra_calibrate_runs_and_recording_says_what_to_install(trained, demo_dir, tmp_path):
    """The base install has no sqlalchemy: recalibrating from a folder needs none, and asking to record
    decisions names the extra in one line (exit 2), not a ModuleNotFoundError traceback."""
    import shutil
    import subprocess
    import sys

    model_dir = shutil.copytree(os.path.join(trained, "best_model"), tmp_path / "m")
    block = "import sys; sys.modules['sqlalchemy'] = None; from uadkit.cli import main; sys.exit(main(sys.argv[1:]))"
    base = [sys.executable, "-c", block, "-c", "configs/STFPM.yaml", "-o", f"Global.output={tmp_path / 'o'}"]
    r = subprocess.run([*base, "-o", "Global.mode=calibrate", "-o", f"Global.dataset_dir={demo_dir}",
                        "-o", f"Calibrate.model_dir={model_dir}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]
    assert "recalibrated_on" in open(model_dir / "model.yaml").read()
    r = subprocess.run([*base, "-o", "Global.mode=predict", "-o", f"Predict.model_dir={model_dir}", "-o",
                        f"Predict.input={demo_dir}/test", "-o", "Predict.record=true"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert r.stderr.strip().splitlines()[-1].endswith("needs sqlalchemy: pip install -e .[serve]  "
                                                      "(scripts/setup.sh installs it)")
