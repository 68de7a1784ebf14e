import json
import os
import shutil

import numpy as np
from PIL import Image

from uadkit.cli import main
from uadkit.data.formats import load_index


def _check(ds, out, *extra):
    return main(["-c", "configs/STFPM.yaml", "-o", "Global.mode=check_dataset", "-o", f"Global.dataset_dir={ds}",
                 "-o", f"Global.output={out}", *extra])


def test_check_passes_and_writes_report_and_pictures(demo_dir, tmp_path):
    assert _check(demo_dir, tmp_path) == 0
    rep = json.load(open(tmp_path / "check_dataset_result.json"))
    assert rep["check_pass"] is True and rep["dataset_type"] == "MVTec_AD"
    a = rep["attributes"]
    assert (a["train_samples"], a["test_good"], a["test_anomalous"]) == (16, 4, 6)
    assert a["test_per_defect"] == {"good": 4, "scratch": 3, "stain": 3} and a["masks"] == 6
    assert rep["image_size"]["distinct"] == ["128x128"]
    assert Image.open(rep["analysis"]["histogram"]).size == (720, 420)
    assert rep["analysis"]["samples"] and all(os.path.isfile(p) for p in rep["analysis"]["samples"])


def test_check_lists_every_problem_and_training_refuses(demo_dir, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(demo_dir, ds)
    (ds / "train/good/003.png").write_bytes(b"not a png")                       # undecodable
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(ds / "ground_truth/stain/001_mask.png")  # wrong size
    shutil.copy(ds / "train/good/005.png", ds / "test/good/dup.png")           # train/test duplicate
    out = tmp_path / "out"
    assert _check(ds, out) == 1
    rep = json.load(open(out / "check_dataset_result.json"))
    assert rep["check_pass"] is False
    files = {os.path.basename(p["file"]): p["problem"] for p in rep["problems"]}
    assert "does not decode" in files["003.png"]
    assert "mask is 64x64" in files["001_mask.png"]
    assert "identical to training image" in files["dup.png"]
    rc = main(["-c", "configs/STFPM.yaml", "-o", "Global.mode=train", "-o", f"Global.dataset_dir={ds}",
               "-o", f"Global.output={out}/train"])
    assert rc == 2 and not os.path.exists(out / "train" / "best_model")


def test_convert_mvtec_to_lists_keeps_test_good(demo_dir, tmp_path):
    out = tmp_path / "conv"
    assert _check(demo_dir, out, "-o", "CheckDataset.convert.enable=True",
                  "-o", "CheckDataset.convert.src_dataset_type=MVTec_AD") == 0
    rep = json.load(open(out / "check_dataset_result.json"))
    conv = rep["converted_dataset_dir"]
    assert rep["dataset_type"] == "ListFile" and os.path.isfile(os.path.join(conv, "test.txt"))
    idx = load_index(conv, 0.0)
    orig = load_index(demo_dir, 0.0)
    assert sorted(s.path for s in idx.test) == sorted(os.path.abspath(s.path) for s in orig.test)
    assert sum(1 for s in idx.test if s.label == 0) == 4  # test/good survived the conversion
    assert {s.defect for s in idx.test if s.label} == {"scratch", "stain"}
    assert _check(demo_dir, tmp_path / "x", "-o", "CheckDataset.convert.enable=True",
                  "-o", "CheckDataset.convert.src_dataset_type=ListFile") == 2


def test_split_regroups_good_images_by_percent(demo_dir, tmp_path):
    out = tmp_path / "split"
    assert _check(demo_dir, out, "-o", "CheckDataset.split.enable=True", "-o", "CheckDataset.split.train_percent=75",
                  "-o", "CheckDataset.split.val_percent=25") == 0
    rep = json.load(open(out / "check_dataset_result.json"))
    assert rep["attributes"]["train_samples"] == 12 and rep["attributes"]["val_samples"] == 4
    assert _check(demo_dir, tmp_path / "bad", "-o", "CheckDataset.split.enable=True",
                  "-o", "CheckDataset.split.train_percent=80", "-o", "CheckDataset.split.val_percent=30") == 2


def _list_dataset(demo_dir, root):
    """train.txt = good train images, val.txt = held-out good + labelled anomalies, test.txt = the rest."""
    idx = load_index(demo_dir, 0.0)
    bad = [s for s in idx.test if s.label]
    good_test = [s for s in idx.test if not s.label]
    os.makedirs(root, exist_ok=True)

    def line(s):
        return f"{os.path.abspath(s.path)} {os.path.abspath(s.mask)}\n" if s.mask else os.path.abspath(s.path) + "\n"
    (root / "train.txt").write_text("".join(line(s) for s in idx.train[:12]))
    (root / "val.txt").write_text("".join(line(s) for s in idx.train[12:] + bad[::2]))
    (root / "test.txt").write_text("".join(line(s) for s in good_test + bad[1::2]))
    return str(root)


def test_labelled_validation_anomalies_report_recall_at_the_operating_point(demo_dir, tmp_path):
    ds = _list_dataset(demo_dir, tmp_path / "lists")
    out = tmp_path / "out"
    rc = main(["-c", "configs/PaDiM.yaml", "-o", "Global.mode=train", "-o", f"Global.dataset_dir={ds}",
               "-o", f"Global.output={out}", "-o", "Model.input_size=[64,64]"])
    assert rc == 0
    cal = json.load(open(out / "train_result.json"))["calibration"]
    # the 4 validation goods join the fit and every good image is scored out of fold; the 3 labelled
    # anomalies give the recall at the threshold the false-alarm target sets
    assert cal["good_scores_from"] == "out_of_fold" and cal["n_good"] == 16
    rep = cal["labelled_defects"]
    assert rep["defects_total"] == 3 and rep["good_total"] == 16 and 0 <= rep["recall"] <= 1


def test_evaluate_without_masks_reports_image_metrics_only(demo_dir, tmp_path):
    root = tmp_path / "plain"
    idx = load_index(demo_dir, 0.0)
    os.makedirs(root / "good")
    os.makedirs(root / "defect")
    for s in idx.train + [s for s in idx.test if not s.label]:
        shutil.copy(s.path, root / "good" / f"{len(os.listdir(root / 'good'))}.png")
    for s in idx.test:
        if s.label:
            shutil.copy(s.path, root / "defect" / f"{s.defect}_{os.path.basename(s.path)}")
    out = tmp_path / "out"
    base = ["-c", "configs/PaDiM.yaml", "-o", f"Global.dataset_dir={root}", "-o", f"Global.output={out}",
            "-o", "Model.input_size=[64,64]"]
    assert main(base + ["-o", "Global.mode=train"]) == 0
    assert main(base + ["-o", "Global.mode=evaluate"]) == 0
    ev = json.load(open(out / "evaluate_result.json"))
    assert "pixel" not in ev and ev["image"]["auroc"] is not None and ev["num_anomalous"] == 6
