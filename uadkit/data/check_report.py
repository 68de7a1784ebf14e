"""The check_dataset mode: run the check, optionally convert or re-split, write the report and pictures.

Conversion and re-splitting never touch the source folder (it may be read-only or shared): they write a
list-file dataset (train.txt / val.txt / test.txt with absolute paths) under `<output>/dataset/`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

from ..errors import UadkitError
from ..visualize import bar_chart, overlay
from .check import check_index, defect_sizes
from .formats import DatasetIndex, Sample, holdout, load_index
from .image_io import load_image, load_mask, save_image_atomic, write_text_atomic

log = logging.getLogger("uadkit")


def _line(s: Sample) -> str:
    path = os.path.abspath(s.path)
    return f"{path} {os.path.abspath(s.mask)}" if s.mask else path


def write_lists(index: DatasetIndex, folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    for name, samples in (("train.txt", index.train), ("val.txt", index.val), ("test.txt", index.test)):
        write_text_atomic(os.path.join(folder, name), "".join(_line(s) + "\n" for s in samples))
    return folder


def convert(cfg: dict, index: DatasetIndex) -> DatasetIndex:
    c = cfg["CheckDataset"]["convert"]
    if c["src_dataset_type"] not in (None, index.type):
        raise UadkitError(f"CheckDataset.convert.src_dataset_type: the dataset is {index.type}, "
                          f"not {c['src_dataset_type']}")
    folder = write_lists(index, os.path.join(cfg["Global"]["output"], "dataset"))
    log.info("converted %s to list files in %s (test/good kept in test.txt)", index.type, folder)
    return load_index(folder, 0.0)


def resplit(cfg: dict, index: DatasetIndex) -> DatasetIndex:
    sp = cfg["CheckDataset"]["split"]
    tp, vp = sp["train_percent"], sp["val_percent"]
    if tp is None or vp is None or tp <= 0 or vp < 0 or tp + vp != 100:
        raise UadkitError(f"CheckDataset.split: train_percent + val_percent must be 100 with train_percent > 0, "
                          f"got {tp} and {vp}")
    good = index.train + [s for s in index.val if not s.label]
    index.train, index.val = holdout(good, vp / 100, cfg["Global"]["seed"]) if vp else (good, [])
    folder = write_lists(index, os.path.join(cfg["Global"]["output"], "dataset"))
    log.info("re-split good images %d/%d%% into %s", tp, vp, folder)
    return load_index(folder, 0.0)


def _save_samples(index: DatasetIndex, folder: str, n: int = 4) -> list[str]:
    out = []
    picks = index.train[:n] + [s for s in index.test if s.label][: n * 2]
    for s in picks:
        try:  # a broken file is already listed as a problem; it just gets no picture
            im = load_image(s.path)
            mask = load_mask(s.mask, im.shape[:2]) if s.mask else None
        except UadkitError:
            continue
        text = s.defect if s.label else "good"
        amap = mask.astype(np.float32) if mask is not None else np.zeros(im.shape[:2], np.float32)
        img = overlay(im, amap, mask, text, alpha=0.35 if mask is not None else 0.0)
        name = f"{s.defect}_{os.path.splitext(os.path.basename(s.path))[0]}.png"
        save_image_atomic(os.path.join(folder, name), img)
        out.append(os.path.join(folder, name))
    return out


def check_dataset(cfg: dict) -> dict[str, Any]:
    g = cfg["Global"]
    if not g["dataset_dir"]:
        raise UadkitError("Global.dataset_dir: no dataset given to check")
    index = load_index(g["dataset_dir"], 0.0)
    cd = cfg["CheckDataset"]
    if cd["convert"]["enable"]:
        index = convert(cfg, index)
    if cd["split"]["enable"]:
        index = resplit(cfg, index)
    report = check_index(index)
    report["defect_size"] = defect_sizes(index, cfg["Model"])
    folder = os.path.join(g["output"], "check_dataset")
    counts = {"train": len(index.train), "val": len(index.val)}
    counts["test/good"] = report["attributes"]["test_good"]
    for d, n in report["attributes"]["test_per_defect"].items():
        if d != "good":
            counts[f"test/{d}"] = n
    hist = os.path.join(folder, "histogram.png")
    save_image_atomic(hist, bar_chart(counts, f"images per split and defect type ({index.type})"))
    report["analysis"] = {"histogram": hist, "samples": _save_samples(index, os.path.join(folder, "demo_img"))}
    if cd["convert"]["enable"] or cd["split"]["enable"]:
        report["converted_dataset_dir"] = os.path.abspath(index.root)
    write_text_atomic(os.path.join(g["output"], "check_dataset_result.json"), json.dumps(report, indent=2))
    a = report["attributes"]
    print(f"{index.type} dataset {index.root}: {a['train_samples']} train, {a['val_samples']} val, "
          f"{a['test_samples']} test ({a['test_anomalous']} anomalous), {a['masks']} masks")
    sizes = report["image_size"]
    if sizes["min"]:
        print(f"image sizes: {sizes['min'][0]}x{sizes['min'][1]} to {sizes['max'][0]}x{sizes['max'][1]}; model input "
              f"{cfg['Model']['input_size'][1]}x{cfg['Model']['input_size'][0]}")
    if (report["defect_size"] or {}).get("warning"):
        print(f"warning: {report['defect_size']['warning']}")
    if report["check_pass"]:
        print("check passed")
    else:
        print(f"check FAILED: {len(report['problems'])} problems")
        for p in report["problems"]:
            print(f"  {p['file']}: {p['problem']}")
    return report
