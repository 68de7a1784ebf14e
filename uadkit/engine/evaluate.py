"""Evaluate a trained model on the test split: image- and pixel-level metrics, per defect type,
and at the model's stored decision threshold. Writes evaluate_result.json, a score histogram and
overlays of the worst cases."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import numpy as np

from .. import metrics
from ..data.formats import load_index
from ..data.image_io import load_image, save_image_atomic, write_text_atomic
from ..errors import UadkitError
from ..models import AnomalyModel
from ..models.base import squash
from ..visualize import histogram, overlay, roc_plot
from .calibrate import collect_scores
from .calibration import recall_report
from .device import main_device
from .trainer import setup_logging

log = logging.getLogger("uadkit")


def _r(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 4)


def raw_threshold(model: AnomalyModel, norm_threshold: float) -> tuple[float, float]:
    """Image and pixel thresholds in raw units for a normalised threshold (0.5 = calibrated ones)."""
    it, il, ih, pt, pl, ph = (float(v) for v in model.calibration)
    logit = math.log(norm_threshold / (1 - norm_threshold))
    return it + (il if logit < 0 else ih) * logit, pt + (pl if logit < 0 else ph) * logit


def evaluate(model: AnomalyModel, cfg: dict[str, Any], scorer=None) -> dict[str, Any]:
    """Metrics of `model` on the test split; `scorer` (a runtime from uadkit.runtimes, default the torch
    model) runs the scoring, so every runtime's accuracy is measured by this same code."""
    g = cfg["Global"]
    out = g["output"]
    setup_logging(None)
    if not g["dataset_dir"]:
        raise UadkitError("Global.dataset_dir: no dataset given to evaluate on")
    index = load_index(g["dataset_dir"], cfg["Train"]["val_split"], g["seed"])
    samples = index.test
    if not samples:
        raise UadkitError(f"Global.dataset_dir '{g['dataset_dir']}': no test images to evaluate on")
    device = main_device(g["device"])
    thr_norm = cfg["Predict"]["threshold"] or 0.5
    it_raw, pt_raw = raw_threshold(model, thr_norm)
    has_masks = any(s.mask for s in samples if s.label)
    # on Global.device: a CPU-only runtime asked for a GPU says so in one line, as predict does
    scorer = (scorer or model).to(device)
    scores, labels, maxima, maps, masks = collect_scores(
        scorer, samples, device, cfg["Evaluate"]["batch_size"], "evaluating", keep_maps=has_masks)
    labels = labels.astype(bool)
    res: dict[str, Any] = {"model": model.name, "dataset": os.path.abspath(index.root), "dataset_type": index.type,
                           "num_images": len(samples), "num_anomalous": int(labels.sum()),
                           "threshold": thr_norm, "run_mode": cfg["Evaluate"]["run_mode"]}
    image: dict[str, Any] = {"auroc": None, "aupr": None, "f1_max": None, "f1_max_threshold": None}
    both = labels.any() and (~labels).any()
    if both:
        f1, f1_t = metrics.f1_max(labels, scores)
        image = {"auroc": _r(metrics.auroc(labels, scores)), "aupr": _r(metrics.aupr(labels, scores)),
                 "f1_max": _r(f1), "f1_max_threshold_raw": float(f1_t)}
    image["at_threshold"] = {k: _r(v) for k, v in metrics.binary_counts(labels, scores >= it_raw).items()}
    res["image"] = image
    res["decision"] = _decision(samples, scores, labels, maxima, it_raw, pt_raw)
    pix_idx = [i for i, m in enumerate(masks) if m is not None] if has_masks else []
    if pix_idx:
        pm = [maps[i] for i in pix_idx]
        pk = [masks[i] for i in pix_idx]
        flat_s = np.concatenate([m.ravel() for m in pm])
        flat_l = np.concatenate([k.ravel() for k in pk])
        f1p, _ = metrics.f1_max(flat_l, flat_s)
        res["pixel"] = {"auroc": _r(metrics.auroc(flat_l, flat_s)), "aupro": _r(metrics.aupro(pk, pm, 0.3)),
                        "f1_max": _r(f1p),
                        "at_threshold": {k: _r(v) for k, v in metrics.binary_counts(flat_l, flat_s >= pt_raw).items()
                                         if k != "accuracy"}}
        del flat_s, flat_l
    per = {}
    defects = sorted({s.defect for s in samples if s.label})
    good_i = [i for i, s in enumerate(samples) if not s.label]
    for d in defects:
        di = [i for i, s in enumerate(samples) if s.defect == d]
        sel = good_i + di
        entry: dict[str, Any] = {"count": len(di),
                                 "recall_at_threshold": _r(float(np.mean(scores[di] >= it_raw)))}
        if good_i:
            entry["image_auroc"] = _r(metrics.auroc(labels[sel], scores[sel]))
        if pix_idx:
            ds = [i for i in di if masks[i] is not None]
            if ds:
                entry["pixel_auroc"] = _r(metrics.auroc(np.concatenate([masks[i].ravel() for i in ds + good_i]),
                                                       np.concatenate([maps[i].ravel() for i in ds + good_i])))
        per[d] = entry
    res["per_defect"] = per
    os.makedirs(out, exist_ok=True)
    res["artifacts"] = _draw(model, samples, scores, labels, maps, out, cfg["Evaluate"]["num_examples"])
    if both:
        res["artifacts"]["roc_curve"] = _draw_roc(model.name, labels, scores, res["decision"], thr_norm, out)
    path = os.path.join(out, "evaluate_result.json")
    write_text_atomic(path, json.dumps(res, indent=2))
    print(format_table(res))
    log.info("wrote %s", path)
    return res


def _decision(samples, scores: np.ndarray, labels: np.ndarray, maxima: np.ndarray, it_raw: float,
              pt_raw: float) -> dict[str, Any]:
    """What users act on: good parts flagged and defects caught at the stored threshold, beside the best
    recall any threshold reaches while flagging no more good parts; and how often a good part gets a mask."""
    dec = recall_report(scores[~labels], scores[labels], it_raw)
    dec["per_defect"] = {}
    for d in sorted({s.defect for s in samples if s.label}):
        di = np.array([s.defect == d for s in samples])
        dec["per_defect"][d] = {"caught": int((scores[di] >= it_raw).sum()), "total": int(di.sum())}
    good_max = maxima[~labels]
    dec["good_with_mask"] = int((good_max >= pt_raw).sum())
    dec["good_with_mask_rate"] = round(float(np.mean(good_max >= pt_raw)), 5) if good_max.size else None
    return dec


def _draw_roc(name: str, labels: np.ndarray, scores: np.ndarray, dec: dict[str, Any], thr: float, out: str) -> str:
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    point = (dec["good_flag_rate"], dec["recall"])
    label = f"threshold {thr:g}: {dec['good_flagged']}/{dec['good_total']} good flagged, " \
            f"{dec['defects_caught']}/{dec['defects_total']} caught"
    path = os.path.join(out, "roc_curve.png")
    save_image_atomic(path, roc_plot(fpr, tpr, f"{name}: image ROC, AUROC {metrics.auroc(labels, scores):.3f}",
                                     point, label))
    return path


def _draw(model: AnomalyModel, samples, scores, labels, maps, out: str, n: int) -> dict[str, Any]:
    import torch

    c = model.calibration.cpu()
    norm = squash(torch.from_numpy(scores).float(), c[0], c[1], c[2]).numpy()
    groups = {"good": norm[~labels]}
    for d in sorted({s.defect for s in samples if s.label}):
        groups[d] = norm[[i for i, s in enumerate(samples) if s.defect == d]]
    hist_path = os.path.join(out, "score_histogram.png")
    save_image_atomic(hist_path, histogram(groups, f"{model.name}: normalised image scores", 0.5, bins=25,
                                           value_range=(0.0, 1.0), xlabel="normalised score"))
    worst = []
    ex_dir = os.path.join(out, "worst_cases")
    fp = sorted((i for i in range(len(samples)) if not labels[i]), key=lambda i: -scores[i])[: n // 2]
    fn = sorted((i for i in range(len(samples)) if labels[i]), key=lambda i: scores[i])[: n - len(fp)]
    for kind, ids in (("good_highest", fp), ("defect_lowest", fn)):
        for i in ids:
            s = samples[i]
            im = load_image(s.path)
            if maps:
                amap = squash(torch.from_numpy(maps[i]), c[3], c[4], c[5]).numpy()
            else:
                amap = np.zeros(im.shape[:2], np.float32)
            name = f"{kind}_{s.defect}_{os.path.splitext(os.path.basename(s.path))[0]}.png"
            save_image_atomic(os.path.join(ex_dir, name),
                              overlay(im, amap, amap >= 0.5, f"{s.defect} score {norm[i]:.3f}"))
            worst.append(os.path.join(ex_dir, name))
    return {"score_histogram": hist_path, "worst_cases": worst}


def format_table(res: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "  -  " if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = [f"{res['model']} on {res['dataset']} ({res['num_images']} images, {res['num_anomalous']} anomalous)"]
    im = res["image"]
    lines.append(f"  image  AUROC {f(im.get('auroc'))}  AUPR {f(im.get('aupr'))}  F1-max {f(im.get('f1_max'))}")
    a = im["at_threshold"]
    lines.append(f"         at threshold {res['threshold']}: acc {f(a['accuracy'])}  precision {f(a['precision'])}  "
                 f"recall {f(a['recall'])}  F1 {f(a['f1'])}")
    dec = res["decision"]

    def share(n: int, total: int) -> str:
        return f"{n}/{total} ({100 * n / total:.1f}%)" if total else "-"
    lines.append(f"  decision at threshold {res['threshold']}: "
                 f"good flagged {share(dec['good_flagged'], dec['good_total'])}, "
                 f"defects caught {share(dec['defects_caught'], dec['defects_total'])}"
                 + (f" (best possible at that good-flag rate: {100 * dec['best_recall_at_same_flag_rate']:.1f}%)"
                    if dec["best_recall_at_same_flag_rate"] is not None else "")
                 + f"; good images with a mask {share(dec['good_with_mask'], dec['good_total'])}")
    if "pixel" in res:
        p = res["pixel"]
        lines.append(f"  pixel  AUROC {f(p['auroc'])}  AUPRO@0.3 {f(p['aupro'])}  F1-max {f(p['f1_max'])}")
        a = p["at_threshold"]
        lines.append(f"         at threshold: IoU {f(a['iou'])}  precision {f(a['precision'])}  "
                     f"recall {f(a['recall'])}")
    if res["per_defect"]:
        lines.append(f"  {'defect':<20}{'n':>4}{'img AUROC':>11}{'pix AUROC':>11}{'caught':>10}")
        for d, e in res["per_defect"].items():
            c = dec["per_defect"][d]
            lines.append(f"  {d:<20}{e['count']:>4}{f(e.get('image_auroc')):>11}{f(e.get('pixel_auroc')):>11}"
                         f"{c['caught']:>6}/{c['total']:<3}")
    return "\n".join(lines)
