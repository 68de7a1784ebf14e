"""Calibration as a step of training and as a mode of its own (`Global.mode=calibrate`).

Scores good images the model did not learn from (out-of-fold training scores, the validation split, or
a folder given later), sets the thresholds for the named false-alarm rate (engine/calibration.py), checks
them on generated defects, and, in calibrate mode, rewrites the model folder atomically.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..data.formats import Sample, load_index
from ..data.image_io import load_image, load_mask
from ..data.synthetic import synthetic_defects
from ..errors import UadkitError
from ..inference.predictor import score_images
from ..models import AnomalyModel
from .calibration import CALIBRATION_KEYS, apply_calibration, calibrate, recall_report

log = logging.getLogger("uadkit")


def collect_scores(model: AnomalyModel, samples: list[Sample], device: torch.device, batch_size: int,
                   desc: str, keep_maps: bool = True):
    """Raw scores, labels, map maxima and (optionally) raw maps + masks for a list of samples."""
    scores, labels, maxima, maps, masks = [], [], [], [], []
    model.eval()
    for i in tqdm(range(0, len(samples), batch_size), desc=desc, unit="batch", leave=False, dynamic_ncols=True,
                  disable=None):
        chunk = samples[i:i + batch_size]
        images = [load_image(s.path) for s in chunk]
        for s, im, sc in zip(chunk, images, score_images(model, images, device)):
            scores.append(sc.raw_score)
            labels.append(s.label)
            maxima.append(float(sc.raw_map.max()))
            if keep_maps:
                maps.append(sc.raw_map)
                masks.append(load_mask(s.mask, im.shape[:2]) if s.mask else
                             (np.zeros(im.shape[:2], bool) if s.label == 0 else None))
    return np.array(scores), np.array(labels), np.array(maxima), maps, masks


def synthetic_check(model: AnomalyModel, samples: list[Sample], device: torch.device, batch_size: int,
                    n: int, seed: int) -> dict[str, Any] | None:
    """Recall at the stored image threshold on generated defects pasted onto up to `n` good images."""
    good = [s for s in samples if not s.label][:n]
    if not n or not good:
        return None
    fakes = synthetic_defects([load_image(s.path) for s in good], seed)
    scored = []
    for i in range(0, len(fakes), batch_size):
        scored += score_images(model, [im for im, _ in fakes[i:i + batch_size]], device, with_raw=False)
    caught = sum(s.norm_score >= 0.5 for s in scored)
    return {"images": len(fakes), "caught": int(caught), "recall_estimate": round(caught / len(fakes), 4),
            "note": "generated defects (Perlin-noise blobs of foreign texture, cut-and-paste scars) on held-out "
                    "good images: an estimate of recall at the stored threshold, not a measurement on real defects"}


def calibrate_model(model: AnomalyModel, cfg: dict, device: torch.device, good_scores: np.ndarray,
                    good_maxima: np.ndarray, bad_scores: np.ndarray | None, source: str,
                    check_samples: list[Sample], rate: float | None = None) -> dict[str, Any]:
    """Set the model's thresholds from good scores, then check them on synthetic defects."""
    c = cfg["Train"]["calibration"]
    rate = c["false_alarm_rate"] if rate is None else rate
    if len(good_scores) < 20:
        log.warning("calibrating on only %d good images: the threshold is a rough estimate (see its interval); "
                    "add a validation/good folder or more training images", len(good_scores))
    cal = calibrate(good_scores, good_maxima, rate, c["estimator"], bad_scores, source)
    apply_calibration(model, cal)
    # what the threshold rests on, for train_result.json (not model.yaml): lets a user re-derive any rate
    cal["scores"] = {"image": [float(f"{x:.6g}") for x in good_scores],
                     "map_max": [float(f"{x:.6g}") for x in good_maxima]}
    synth = synthetic_check(model, check_samples, device, cfg["Evaluate"]["batch_size"], c["synthetic_images"],
                            cfg["Global"]["seed"])
    if synth:
        cal["synthetic_defects"] = synth
    img = cal["image"]
    log.info("calibration: %d good scores (%s), target false-alarm rate %.3g, %s estimate %.3g "
             "(90%% interval %.3g-%.3g); image threshold %.6g, pixel threshold %.6g%s", cal["n_good"], source, rate,
             img["estimator"], img["estimated_rate"], *img["rate_interval_90"], cal["image_threshold"],
             cal["pixel_threshold"],
             f"; synthetic defects caught {synth['caught']}/{synth['images']} (an estimate)" if synth else "")
    return cal


def calibrate_on_samples(model: AnomalyModel, samples: list[Sample], cfg: dict, device: torch.device,
                         source: str, rate: float | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """Calibrate from scored samples: good ones set the threshold, labelled defects report recall."""
    scores, labels, maxima, _, _ = collect_scores(model, samples, device, batch_size or cfg["Evaluate"]["batch_size"],
                                                  "calibrating", keep_maps=False)
    good = labels == 0
    return calibrate_model(model, cfg, device, scores[good], maxima[good], scores[~good] if (~good).any() else None,
                           source, samples, rate)


def recalibrate(cfg: dict) -> dict[str, Any]:
    """`Global.mode=calibrate`: re-fit only the thresholds and scales of a trained model from a folder of
    good images (and labelled defects), write the model folder atomically (weights, model.yaml, ONNX graph)
    and report the decision before and after on that folder."""
    from .checkpoint import load_model_dir, save_model_dir
    from .device import main_device

    g, c = cfg["Global"], cfg["Calibrate"]
    model_dir = c["model_dir"] or os.path.join(g["output"], "best_model")
    if not g["dataset_dir"]:
        raise UadkitError("Global.dataset_dir: no folder of good images given to calibrate on")
    model, meta = load_model_dir(model_dir)
    index = load_index(g["dataset_dir"], 0.0, g["seed"])
    samples = index.train + index.val + index.test
    if not any(not s.label for s in samples):
        raise UadkitError(f"Global.dataset_dir '{g['dataset_dir']}': no good images to calibrate on")
    trained_on = meta.get("trained_on")
    if trained_on and os.path.abspath(index.root) == trained_on:
        log.warning("calibrating on the folder the model was trained on: its training images score low, so the "
                    "threshold will flag more good parts than targeted; use good images it has not seen")
    device = main_device(g["device"])
    model.to(device)
    old = model.calibration.clone()
    scores, labels, maxima, _, _ = collect_scores(model, samples, device, c["batch_size"], "scoring", keep_maps=False)
    good = labels == 0
    before = recall_report(scores[good], scores[~good], float(old[0]))
    rate = c["false_alarm_rate"] or (meta.get("calibration_info") or {}).get("false_alarm_rate") \
        or cfg["Train"]["calibration"]["false_alarm_rate"]
    t0 = time.time()
    cal = calibrate_model(model, cfg, device, scores[good], maxima[good], scores[~good] if (~good).any() else None,
                          f"calibration folder {os.path.abspath(index.root)}", samples, rate)
    after = recall_report(scores[good], scores[~good], cal["image_threshold"])
    extra = {k: v for k, v in meta.items() if k not in ("uadkit_version", "model", "Model", "calibration", "saved_at")}
    extra.update({"calibration_info": {k: v for k, v in cal.items() if k != "scores"},
                  "recalibrated_on": os.path.abspath(index.root)})
    save_model_dir(model.cpu(), model_dir, extra=extra, export_opset=cfg["Export"]["opset"])
    result = {"model_dir": os.path.abspath(model_dir), "dataset": os.path.abspath(index.root),
              "images": len(samples), "good": int(good.sum()), "defects": int((~good).sum()),
              "before": {"image_threshold": float(old[0]), **before},
              "after": {"image_threshold": cal["image_threshold"], **after},
              "calibration": cal, "seconds": round(time.time() - t0, 2)}
    for name in ("before", "after"):
        r = result[name]
        caught = f", defects caught {r['defects_caught']}/{r['defects_total']}" if r["defects_total"] else ""
        print(f"{name:>6}: threshold {r['image_threshold']:.6g}, good flagged {r['good_flagged']}/{r['good_total']}"
              f"{caught}")
    print(f"recalibrated {model.name} in {model_dir} for a false-alarm rate of {rate:g}")
    return result


__all__ = ["CALIBRATION_KEYS", "calibrate_model", "calibrate_on_samples", "collect_scores", "recalibrate",
           "synthetic_check"]
