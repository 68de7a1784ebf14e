"""Exact ranking metrics in numpy: AUROC, AUPR, F1-max, AUPRO, and threshold-based counts.

Pixel-level metrics run on every pixel at the original mask size. To keep memory bounded they avoid
an argsort index array (8 bytes per pixel): AUROC sorts positives and negatives separately, in place,
as float32 and counts with `searchsorted` (Mann-Whitney U with ties counted as one half).
"""

from __future__ import annotations

import numpy as np


def _split(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores differ in size: {labels.size} vs {scores.size}")
    return scores[labels], scores[~labels]


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (probability a positive outscores a negative; ties count 1/2)."""
    pos, neg = _split(labels, scores)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    neg = np.sort(neg, kind="stable")
    lower = np.searchsorted(neg, pos, side="left").astype(np.float64)
    upper = np.searchsorted(neg, pos, side="right").astype(np.float64)
    return float((lower.sum() + 0.5 * (upper - lower).sum()) / (pos.size * neg.size))


def _pr_counts(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct thresholds (descending) with true/false positives counted at score >= threshold."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return s[last], tp.astype(np.float64), fp.astype(np.float64)


def aupr(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (step-wise area under precision-recall, as scikit-learn computes it)."""
    thr, tp, fp = _pr_counts(labels, scores)
    npos = tp[-1] if tp.size else 0
    if npos == 0:
        return float("nan")
    precision = tp / (tp + fp)
    recall = tp / npos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds (predict positive at score >= threshold) and that threshold."""
    thr, tp, fp = _pr_counts(labels, scores)
    npos = tp[-1] if tp.size else 0
    if npos == 0:
        return float("nan"), float("nan")
    f1 = 2 * tp / (tp + fp + npos)
    i = int(np.argmax(f1))
    return float(f1[i]), float(thr[i])


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold (descending), starting at (0, 0)."""
    thr, tp, fp = _pr_counts(labels, scores)
    npos, nneg = (tp[-1], fp[-1]) if tp.size else (0.0, 0.0)
    return (np.r_[0.0, fp / max(nneg, 1)], np.r_[0.0, tp / max(npos, 1)], np.r_[np.inf, thr])


def binary_counts(labels: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and IoU of binary predictions."""
    y = np.asarray(labels).ravel().astype(bool)
    p = np.asarray(pred).ravel().astype(bool)
    tp = float(np.count_nonzero(y & p))
    fp = float(np.count_nonzero(~y & p))
    fn = float(np.count_nonzero(y & ~p))
    tn = float(y.size - tp - fp - fn)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": (tp + tn) / max(y.size, 1), "precision": prec, "recall": rec,
            "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
            "iou": tp / (tp + fp + fn) if tp + fp + fn else 0.0}


def aupro(masks: list[np.ndarray], maps: list[np.ndarray], fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to `fpr_limit` false-positive rate, normalised to [0, 1].

    Exact (every pixel, every distinct threshold), as in the MVTec AD evaluation: each connected defect
    region weighs equally however large it is; FPR counts all defect-free pixels of all images. Only pixels
    scoring at or above the FPR-limit threshold can shape the curve, so only those are sorted.
    """
    from scipy.ndimage import label as components

    neg = np.concatenate([m[~k].ravel() for m, k in zip(maps, masks)]).astype(np.float32)
    n_neg = neg.size
    regions = []
    for m, k in zip(maps, masks):
        lab, n = components(k)
        for r in range(1, n + 1):
            regions.append(m[lab == r].astype(np.float32))
    if n_neg == 0 or not regions:
        return float("nan")
    k_top = int(np.floor(n_neg * fpr_limit))
    cut = np.partition(neg, n_neg - k_top - 1)[n_neg - k_top - 1] if k_top < n_neg else -np.inf
    neg_top = neg[neg >= cut]
    del neg
    weights = [np.full(np.count_nonzero(r >= cut), 1.0 / (r.size * len(regions))) for r in regions]
    scores = np.concatenate([neg_top] + [r[r >= cut] for r in regions])
    fpr_inc = np.concatenate([np.full(neg_top.size, 1.0 / n_neg)] + [np.zeros(w.size) for w in weights])
    pro_inc = np.concatenate([np.zeros(neg_top.size)] + weights)
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    fpr = np.r_[0.0, np.cumsum(fpr_inc[order])[last]]
    pro = np.r_[0.0, np.cumsum(pro_inc[order])[last]]
    fpr = np.minimum(fpr, 1.0)
    if fpr[-1] < fpr_limit:  # curve ends early (all remaining pixels tie): extend flat
        fpr, pro = np.r_[fpr, fpr_limit], np.r_[pro, pro[-1]]
    i = np.searchsorted(fpr, fpr_limit, side="right")
    x, y = fpr[:i], pro[:i]
    if x[-1] < fpr_limit:
        x1, x2, y1, y2 = fpr[i - 1], fpr[i], pro[i - 1], pro[i]
        y_end = y1 + (y2 - y1) * (fpr_limit - x1) / (x2 - x1) if x2 > x1 else y2
        x, y = np.r_[x, fpr_limit], np.r_[y, y_end]
    return float(np.trapezoid(y, x) / fpr_limit)
