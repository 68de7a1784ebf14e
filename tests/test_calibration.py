import numpy as np
import torch

from uadkit.engine.calibration import calibrate
from uadkit.models.base import squash


def test_good_only_threshold_is_above_good_scores_and_never_flags_everything():
    rng = np.random.default_rng(0)
    good = rng.normal(1.0, 0.1, 200)
    cal = calibrate(good, np.zeros(200), good, None, None, quantile=0.99, margin=0.1)
    assert cal["method"].startswith("quantile")
    assert cal["image_threshold"] > np.quantile(good, 0.99)
    assert np.mean(good >= cal["image_threshold"]) < 0.01
    # without masks the pixel threshold follows the map maxima: normal images get empty masks
    assert cal["pixel_threshold"] == cal["image_threshold"]


def test_with_anomalies_threshold_is_f1_optimal():
    good = np.array([0.1, 0.2, 0.3, 0.35])
    bad = np.array([0.4, 0.8, 0.9])
    scores = np.r_[good, bad]
    labels = np.r_[np.zeros(4), np.ones(3)]
    cal = calibrate(scores, labels, scores, None, None, 0.99, 0.1)
    assert cal["method"] == "f1_optimal" and cal["image_threshold"] == 0.4


def test_with_masks_pixel_threshold_is_f1_optimal_on_pixels():
    pix = np.array([0.1, 0.2, 0.6, 0.7, 0.3])
    lab = np.array([0, 0, 1, 1, 0], bool)
    scores = np.array([0.2, 0.7])
    cal = calibrate(scores, np.array([0, 1]), scores, pix, lab, 0.99, 0.1)
    assert cal["pixel_method"] == "f1_optimal" and cal["pixel_threshold"] == 0.6


def test_normalisation_puts_threshold_at_half_median_good_at_005():
    rng = np.random.default_rng(1)
    good = rng.normal(5.0, 0.5, 500)
    cal = calibrate(good, np.zeros(500), good, None, None, 0.99, 0.1)
    t = torch.tensor(cal["image_threshold"])
    lo, hi = torch.tensor(cal["image_scale_low"]), torch.tensor(cal["image_scale_high"])
    x = torch.tensor([float(np.median(good)), cal["image_threshold"], 2 * cal["image_threshold"]])
    y = squash(x, t, lo, hi)
    assert torch.allclose(y, torch.tensor([0.05, 0.5, 0.95]), atol=1e-4)
    assert torch.all(torch.diff(squash(torch.linspace(0, 20, 200), t, lo, hi)) >= 0)  # monotone
