"""Decision thresholds and score scales, fitted on a validation split.

- With labelled anomalies in the split: the F1-optimal threshold on image scores (pixel scores when
  masks exist).
- With good images only: the `quantile` of good-image scores plus `margin` times the spread between that
  quantile and the median. An F1 fit without anomalies is never attempted (it would flag everything).
- The pixel threshold without masks equals the image threshold of the map maxima, so a normal image has
  an empty mask and an anomalous one a non-empty mask.
- Normalised score = sigmoid((raw - threshold) / scale), two-sided: below the threshold the scale is
  (threshold - median good score) / ln 19, so the median good image lands at 0.05; above it the scale
  is threshold / ln 19 (at least the lower one), so twice the threshold lands at 0.95. Scores stay
  spread out above the threshold even when few good images were seen.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..metrics import f1_max
from ..models.base import LN19

CALIBRATION_KEYS = ("image_threshold", "image_scale_low", "image_scale_high",
                    "pixel_threshold", "pixel_scale_low", "pixel_scale_high")


def _scale(threshold: float, good: np.ndarray) -> float:
    spread = threshold - float(np.median(good)) if good.size else 0.0
    if spread <= 0:
        spread = float(np.std(good)) if good.size > 1 else 0.0
    return max(spread / LN19, abs(threshold) * 1e-3, 1e-12)


def quantile_threshold(good: np.ndarray, quantile: float, margin: float) -> float:
    q = float(np.quantile(good, quantile))
    return q + margin * max(q - float(np.median(good)), 0.0)


def calibrate(scores: np.ndarray, labels: np.ndarray, map_max: np.ndarray,
              pixel_scores: np.ndarray | None, pixel_labels: np.ndarray | None,
              quantile: float, margin: float) -> dict[str, Any]:
    """Return image/pixel thresholds and scales in raw units, and how they were chosen."""
    scores, labels, map_max = np.asarray(scores), np.asarray(labels).astype(bool), np.asarray(map_max)
    good = scores[~labels]
    if labels.any() and good.size:
        _, it = f1_max(labels, scores)
        method = "f1_optimal"
    else:
        it = quantile_threshold(good, quantile, margin)
        method = f"quantile {quantile} + margin {margin}"
    if pixel_labels is not None and pixel_labels.any():
        _, pt = f1_max(pixel_labels, pixel_scores)
        pixel_method = "f1_optimal"
    else:
        pt = quantile_threshold(map_max[~labels], quantile, margin) if (~labels).any() else it
        pixel_method = f"map maxima, quantile {quantile} + margin {margin}"
    good_max = map_max[~labels]
    lo_i, lo_p = _scale(float(it), good), _scale(float(pt), good_max)
    return {"image_threshold": float(it), "image_scale_low": lo_i, "image_scale_high": max(lo_i, abs(it) / LN19),
            "pixel_threshold": float(pt), "pixel_scale_low": lo_p, "pixel_scale_high": max(lo_p, abs(pt) / LN19),
            "method": method, "pixel_method": pixel_method,
            "n_good": int((~labels).sum()), "n_anomalous": int(labels.sum())}
