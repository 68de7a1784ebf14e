"""Decision thresholds from good-image scores: the operating point a user names, estimated from tens of scores.

The user names a false-alarm rate (`Train.calibration.false_alarm_rate`: the share of good parts the
stored threshold is meant to flag). The threshold is the (1 - rate) quantile of the good-score
distribution, estimated by a tail model fitted to the good scores the model did not learn from
(out-of-fold training scores, the validation split, or a recalibration folder):

- `empirical`: the sample quantile. Unbiased with many scores, but with 30 scores and a 1-2% target it
  sits at the sample maximum and its true rate swings widely.
- `normal`, `lognormal`: a two-parameter fit of all good scores (scores are distances: right-skewed).
- `gpd`: peaks over threshold: a generalised Pareto fitted (probability-weighted moments, stable for
  small samples) to the upper scores, extrapolated to the target.
- `auto`: the default, chosen by measurement (benchmarks/bench_calibration.py --study): the
  empirical quantile once the target leaves enough scores above it, the GPD tail before that.

The pixel threshold is the same estimate on the good images' map maxima, so a good image gets a
non-empty mask at the same rate as it is flagged. Labelled anomalies never move the threshold (an
F1 optimum on a few dozen images is mostly noise, and F1 rewards flagging everything on imbalanced
sets); they give the recall at the operating point instead.

Normalised score = sigmoid((raw - threshold) / scale), two-sided: below the threshold the scale is
(threshold - median good score) / ln 19, so the median good image lands at 0.05; above it the scale is
threshold / ln 19 (at least the lower one), so twice the threshold lands at 0.95.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from ..errors import UadkitError
from ..models.base import LN19

CALIBRATION_KEYS = ("image_threshold", "image_scale_low", "image_scale_high",
                    "pixel_threshold", "pixel_scale_low", "pixel_scale_high")
ESTIMATORS = ("auto", "empirical", "normal", "lognormal", "gpd")
AUTO_MIN_EXCEEDANCES = 50  # auto: the sample quantile only once n x rate scores lie above it (measured)
MIN_TAIL_FIT = 16  # fewer good scores than this: no tail model (8 upper points at least), the sample quantile


@dataclass
class TailFit:
    """A fitted good-score distribution: the threshold for a rate, and the rate of a threshold."""

    method: str
    good: np.ndarray
    params: dict[str, float]

    def threshold(self, rate: float) -> float:
        g, p = self.good, self.params
        if self.method == "empirical":
            return float(np.quantile(g, 1 - rate))
        if self.method == "normal":
            return p["mu"] + p["sd"] * float(stats.norm.isf(rate))
        if self.method == "lognormal":
            return p["shift"] + math.exp(p["mu"] + p["sd"] * float(stats.norm.isf(rate)))
        # gpd: below the tail's start the sample quantile is as good as any model
        if rate >= p["zeta"]:
            return float(np.quantile(g, 1 - rate))
        return p["u"] + _gpd_isf(rate / p["zeta"], p["k"], p["sigma"])

    def rate(self, t: float) -> float:
        g, p = self.good, self.params
        if self.method == "empirical":
            return float(np.mean(g >= t))
        if self.method == "normal":
            return float(stats.norm.sf((t - p["mu"]) / p["sd"]))
        if self.method == "lognormal":
            return float(stats.norm.sf((math.log(t - p["shift"]) - p["mu"]) / p["sd"])) if t > p["shift"] else 1.0
        if t <= p["u"]:
            return float(np.mean(g >= t))
        return p["zeta"] * _gpd_sf(t - p["u"], p["k"], p["sigma"])


def _gpd_isf(p: float, k: float, sigma: float) -> float:
    # Hosking's parametrisation: F(x) = 1 - (1 - k x / sigma)^(1/k); k = -xi
    return -sigma * math.log(p) if abs(k) < 1e-6 else sigma / k * (1 - p**k)


def _gpd_sf(x: float, k: float, sigma: float) -> float:
    if abs(k) < 1e-6:
        return math.exp(-x / sigma)
    base = 1 - k * x / sigma
    return 0.0 if base <= 0 else base ** (1 / k)


def fit_tail(good: np.ndarray, method: str, rate: float) -> TailFit:
    """Fit `method` to the good scores (`auto` resolves to a concrete method for this n and rate)."""
    g = np.sort(np.asarray(good, dtype=np.float64))
    if g.size == 0:
        raise UadkitError("calibration needs good images the model was not fitted on, got none")
    if method == "auto":
        method = "empirical" if g.size * rate >= AUTO_MIN_EXCEEDANCES else "gpd"
    sd = float(g.std(ddof=1)) if g.size > 1 else 0.0
    if method == "empirical" or sd <= 0 or g.size < MIN_TAIL_FIT:
        return TailFit("empirical", g, {})
    if method == "normal":
        return TailFit(method, g, {"mu": float(g.mean()), "sd": sd})
    if method == "lognormal":
        # distances are positive; a shift keeps the log defined for any score range
        shift = 0.0 if g[0] > 0 else float(g[0] - sd)
        lg = np.log(g - shift)
        return TailFit(method, g, {"shift": shift, "mu": float(lg.mean()), "sd": max(float(lg.std(ddof=1)), 1e-12)})
    if method == "gpd":
        # tail start: the top fifth of the scores, and never fewer than 8 of them (or more than half)
        n_exc = int(min(max(8, round(0.2 * g.size)), g.size // 2))
        u = float(g[g.size - n_exc - 1])
        y = g[g.size - n_exc:] - u
        # probability-weighted moments (Hosking & Wallis 1987): no optimiser, defined for 8 points
        pp = (np.arange(1, n_exc + 1) - 0.35) / n_exc
        a0, a1 = float(y.mean()), float(np.mean((1 - pp) * y))
        if a0 <= 0 or a0 - 2 * a1 <= 0:
            return TailFit("empirical", g, {})
        k = a0 / (a0 - 2 * a1) - 2
        sigma = 2 * a0 * a1 / (a0 - 2 * a1)
        k = float(np.clip(k, -0.5, 0.5))  # shape outside +-0.5 from 8-60 points is noise, not a tail
        return TailFit(method, g, {"u": u, "zeta": n_exc / g.size, "k": k, "sigma": float(sigma)})
    raise UadkitError(f"config key 'Train.calibration.estimator': expected one of {', '.join(ESTIMATORS)}, "
                      f"got {method!r}")


def operating_point(good: np.ndarray, rate: float, method: str, n_boot: int = 200,
                    seed: int = 0) -> dict[str, Any]:
    """Threshold for the target rate, with the rate it gives on the scores and a 90% bootstrap interval.

    The interval is over refits of the same estimator on resampled scores: the spread of the rate this
    fixed threshold would have if the good scores had come out differently, i.e. how much the estimate
    can be trusted from this many scores."""
    fit = fit_tail(good, method, rate)
    t = fit.threshold(rate)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        b = rng.choice(fit.good, fit.good.size, replace=True)
        boot.append(fit_tail(b, fit.method, rate).rate(t))
    lo, hi = np.quantile(boot, [0.05, 0.95])
    return {"threshold": float(t), "estimator": fit.method, "target_rate": rate,
            "estimated_rate": round(fit.rate(t), 5),
            "rate_on_calibration_scores": round(float(np.mean(fit.good >= t)), 5),
            "rate_interval_90": [round(float(lo), 5), round(float(hi), 5)],
            "n_good": int(fit.good.size)}


def _scale(threshold: float, good: np.ndarray) -> float:
    spread = threshold - float(np.median(good)) if good.size else 0.0
    if spread <= 0:
        spread = float(np.std(good)) if good.size > 1 else 0.0
    return max(spread / LN19, abs(threshold) * 1e-3, 1e-12)


def recall_report(good: np.ndarray, bad: np.ndarray, threshold: float) -> dict[str, Any]:
    """Decision at `threshold`: good flagged, defects caught, and the best recall any threshold reaches
    while flagging no more good images than this one does."""
    good, bad = np.asarray(good, np.float64), np.asarray(bad, np.float64)
    flagged = int((good >= threshold).sum())
    caught = int((bad >= threshold).sum())
    desc = np.sort(good)[::-1]
    # the lowest threshold flagging at most `flagged` goods sits just above the next good score
    best = 1.0 if flagged >= good.size else float(np.mean(bad > desc[flagged])) if bad.size else None
    return {"good_flagged": flagged, "good_total": int(good.size),
            "good_flag_rate": round(flagged / good.size, 5) if good.size else None,
            "defects_caught": caught, "defects_total": int(bad.size),
            "recall": round(caught / bad.size, 5) if bad.size else None,
            "best_recall_at_same_flag_rate": None if best is None else round(best, 5)}


def calibrate(good_scores: np.ndarray, good_maxima: np.ndarray, rate: float, estimator: str = "auto",
              bad_scores: np.ndarray | None = None, source: str = "validation") -> dict[str, Any]:
    """Image and pixel thresholds + scales in raw units for the target false-alarm `rate`, and the report."""
    if not 0 < rate < 0.5:
        raise UadkitError(f"config key 'Train.calibration.false_alarm_rate': expected 0 < rate < 0.5, got {rate}")
    good, maxima = np.asarray(good_scores, np.float64), np.asarray(good_maxima, np.float64)
    img = operating_point(good, rate, estimator)
    pix = operating_point(maxima, rate, estimator)
    it, pt = img.pop("threshold"), pix.pop("threshold")
    lo_i, lo_p = _scale(it, good), _scale(pt, maxima)
    cal: dict[str, Any] = {
        "image_threshold": it, "image_scale_low": lo_i, "image_scale_high": max(lo_i, abs(it) / LN19),
        "pixel_threshold": pt, "pixel_scale_low": lo_p, "pixel_scale_high": max(lo_p, abs(pt) / LN19),
        "false_alarm_rate": rate, "good_scores_from": source, "n_good": int(good.size),
        "image": img, "pixel": pix,
    }
    if bad_scores is not None and len(bad_scores):
        cal["labelled_defects"] = recall_report(good, np.asarray(bad_scores), it)
    return cal


def apply_calibration(model, cal: dict[str, Any]) -> None:
    """Store thresholds and scales in the model's buffers (they travel with weights and the ONNX graph)."""
    import torch

    model.calibration.copy_(torch.tensor([cal[k] for k in CALIBRATION_KEYS]))
    model.is_calibrated.fill_(True)
