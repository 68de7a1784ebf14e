"""Calibration as a step of training and as a mode of its own (`Global.mode=calibrate`).

Scores good images the model did not learn from (out-of-fold training scores, the validation split, or
a folder given later), sets the thresholds for the named false-alarm rate (engine/calibration.py), checks
them on generated defects, and, in calibrate mode, rewrites the model folder atomically.
"""

from __future__ import annotations

import logging
import os
import re
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
from .map_check import pool

log = logging.getLogger("uadkit")


def collect_scores(model: AnomalyModel, samples: list[Sample], device: torch.device, batch_size: int,
                   desc: str, keep_maps: bool | str = True):
    """Raw scores, labels, map maxima and (optionally) raw maps + masks for a list of samples.
    `keep_maps="grid"`: each raw map averaged down to map_check.GRID x GRID instead (small; no masks)."""
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
            if keep_maps == "grid":
                maps.append(pool(torch.from_numpy(sc.raw_map)[None])[0])
            elif keep_maps:
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
                    good_maxima: np.ndarray | None, bad_scores: np.ndarray | None, source: str,
                    check_samples: list[Sample], rate: float | None = None) -> dict[str, Any]:
    """Set the model's thresholds from good scores, then check them on synthetic defects.
    `good_maxima=None` (scores from the record store, which holds no maps) keeps the pixel threshold."""
    c = cfg["Train"]["calibration"]
    rate = c["false_alarm_rate"] if rate is None else rate
    if len(good_scores) < 20:
        log.warning("calibrating on only %d good images: the threshold is a rough estimate (see its interval); "
                    "add a validation/good folder or more training images", len(good_scores))
    keep_pixel = good_maxima is None
    cal = calibrate(good_scores, good_scores if keep_pixel else good_maxima, rate, c["estimator"], bad_scores,
                    source)
    if keep_pixel:
        for k, v in zip(CALIBRATION_KEYS, model.calibration.tolist()):
            if k.startswith("pixel_"):
                cal[k] = float(v)
        cal["pixel"] = {"kept": True, "note": "no map maxima in the source: the pixel threshold is unchanged"}
    apply_calibration(model, cal)
    # what the threshold rests on, for train_result.json (not model.yaml): lets a user re-derive any rate
    cal["scores"] = {"image": [float(f"{x:.6g}") for x in good_scores],
                     "map_max": None if keep_pixel else [float(f"{x:.6g}") for x in good_maxima]}
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
                         source: str, rate: float | None = None, batch_size: int | None = None
                         ) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Calibrate from scored samples: good ones set the threshold, labelled defects report recall.
    Also returns the good samples' raw maps on the map_check grid (for engine/map_check.py)."""
    bs = batch_size or cfg["Evaluate"]["batch_size"]
    scores, labels, maxima, maps, _ = collect_scores(model, samples, device, bs, "calibrating", keep_maps="grid")
    good = labels == 0
    cal = calibrate_model(model, cfg, device, scores[good], maxima[good], scores[~good] if (~good).any() else None,
                          source, samples, rate)
    return cal, [m for m, g in zip(maps, good) if g]


def refit_and_save(cfg: dict, model: AnomalyModel, meta: dict[str, Any], model_dir: str, out_dir: str,
                   good: np.ndarray, bad: np.ndarray, good_maxima: np.ndarray | None, source: str,
                   origin: str, check_samples: list[Sample], device: torch.device) -> dict[str, Any]:
    """The scoring-free part of recalibration, shared by the folder and the record-store sources: re-fit the
    thresholds from raw scores, write the model atomically to `out_dir` and report before/after."""
    from .checkpoint import model_version, save_model_dir

    c = cfg["Calibrate"]
    old = model.calibration.clone()
    before = recall_report(good, bad, float(old[0]))
    rate = c["false_alarm_rate"] or (meta.get("calibration_info") or {}).get("false_alarm_rate") \
        or cfg["Train"]["calibration"]["false_alarm_rate"]
    t0 = time.time()
    cal = calibrate_model(model, cfg, device, good, good_maxima, bad if bad.size else None, source, check_samples,
                          rate)
    after = recall_report(good, bad, cal["image_threshold"])
    extra = {k: v for k, v in meta.items() if k not in ("uadkit_version", "model", "Model", "calibration", "saved_at")}
    # versions with these same weights: their records' raw scores are comparable with this model's
    lineage = list(meta.get("lineage") or []) + [model_version(model_dir)]
    extra.update({"calibration_info": {k: v for k, v in cal.items() if k != "scores"}, "recalibrated_on": origin,
                  "lineage": lineage[-50:]})
    save_model_dir(model.cpu(), out_dir, extra=extra, export_opset=cfg["Export"]["opset"])
    result = {"model_dir": os.path.abspath(out_dir), "previous_model_dir": os.path.abspath(model_dir),
              "model_version": model_version(out_dir), "source": source,
              "good": int(good.size), "defects": int(bad.size),
              "before": {"image_threshold": float(old[0]), **before},
              "after": {"image_threshold": cal["image_threshold"], **after},
              "calibration": cal, "seconds": round(time.time() - t0, 2)}
    for name in ("before", "after"):
        r = result[name]
        caught = f", defects caught {r['defects_caught']}/{r['defects_total']}" if r["defects_total"] else ""
        print(f"{name:>6}: threshold {r['image_threshold']:.6g}, good flagged {r['good_flagged']}/{r['good_total']}"
              f"{caught}")
    print(f"recalibrated {model.name} into {out_dir} for a false-alarm rate of {rate:g}")
    return result


def next_version_dir(model_dir: str) -> str:
    """`best_model` -> `best_model.v2` (then .v3, ...), claimed with mkdir so two writers never share one."""
    # realpath: from `best_model.latest` (a link to best_model.vN) the next one is best_model.vN+1
    base = re.sub(r"\.v\d+$", "", os.path.realpath(model_dir).rstrip(os.sep))
    parent, stem = os.path.split(base)
    taken = [int(m.group(1)) for n in os.listdir(parent) if (m := re.fullmatch(re.escape(stem) + r"\.v(\d+)", n))]
    n = max(taken, default=1) + 1
    while True:
        path = f"{base}.v{n}"
        try:
            os.mkdir(path)  # save_model_dir swaps its finished folder in over this placeholder
            return path
        except FileExistsError:
            n += 1


def recalibrate_from_records(cfg: dict, model_dir: str, engine: Any) -> dict[str, Any]:
    """Re-fit from reviewed decisions (false alarms and goods vs confirmed and missed defects) made by this
    model's weights, and write a NEW version beside `model_dir` (the old one stays: records point at it)."""
    from ..serving.records import model_version, reviewed_scores
    from .checkpoint import load_model_dir

    model, meta = load_model_dir(model_dir)
    versions = list(meta.get("lineage") or []) + [model_version(model_dir)]
    good, bad = reviewed_scores(engine, versions)
    if good.size < 5:
        raise UadkitError(f"Calibrate.db: {good.size} decisions of this model reviewed as good or false alarm; "
                          "at least 5 are needed to recalibrate")
    url = engine.url.render_as_string(hide_password=True)
    result = refit_and_save(cfg, model, meta, model_dir, next_version_dir(model_dir), good, bad, None,
                            f"reviews in {url}", url, [], torch.device("cpu"))
    from ..serving.records import mark_latest

    mark_latest(result["model_dir"])  # as the service's recalibrate does: X.latest follows the newest version
    return {**result, "db": url, "versions_used": versions}


def recalibrate(cfg: dict) -> dict[str, Any]:
    """`Global.mode=calibrate`: re-fit only the thresholds and scales of a trained model from a folder of
    good images (and labelled defects; the model folder is rewritten atomically) or, with Calibrate.db, from
    the reviewed decisions in the record store (a new model version is written beside the old one)."""
    from .checkpoint import load_model_dir
    from .device import main_device

    g, c = cfg["Global"], cfg["Calibrate"]
    model_dir = c["model_dir"] or os.path.join(g["output"], "best_model")
    if c.get("db"):
        from ..serving.records import make_engine, migrate

        if not isinstance(c["db"], str):
            raise UadkitError(f"Calibrate.db: expected an SQLAlchemy URL (sqlite:///FILE, postgresql://...), "
                              f"got {c['db']!r}")
        try:
            engine = make_engine(c["db"])
        except UadkitError as e:
            raise UadkitError(f"Calibrate.db: {str(e).removeprefix('--db: ').removeprefix('--db ')}") from e
        try:
            migrate(engine)
            return recalibrate_from_records(cfg, model_dir, engine)
        finally:
            engine.dispose()
    if not g["dataset_dir"]:
        raise UadkitError("Global.dataset_dir: no folder of good images given to calibrate on (or set Calibrate.db)")
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
    scores, labels, maxima, _, _ = collect_scores(model, samples, device, c["batch_size"], "scoring", keep_maps=False)
    good = labels == 0
    root = os.path.abspath(index.root)
    result = refit_and_save(cfg, model, meta, model_dir, model_dir, scores[good], scores[~good], maxima[good],
                            f"calibration folder {root}", root, samples, device)
    return {**result, "dataset": root, "images": len(samples)}


__all__ = ["CALIBRATION_KEYS", "calibrate_model", "calibrate_on_samples", "collect_scores", "next_version_dir",
           "recalibrate", "recalibrate_from_records", "refit_and_save", "synthetic_check"]
