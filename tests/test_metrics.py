import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from uadkit import metrics


def test_auroc_hand_computed_with_ties():
    # Positives 0.9, 0.5; negatives 0.5, 0.1. Pairs: (0.9>0.5)=1, (0.9>0.1)=1, (0.5=0.5)=1/2, (0.5>0.1)=1.
    assert metrics.auroc([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]) == pytest.approx(3.5 / 4)
    assert np.isnan(metrics.auroc([0, 0], [0.1, 0.2]))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_aupr_f1_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(3000) < 0.2
    s = np.round(rng.normal(y * 0.8, 1.0), 2).astype(np.float32)  # rounding makes ties
    assert metrics.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert metrics.aupr(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-9)
    p, r, t = precision_recall_curve(y, s)
    f1 = 2 * p * r / np.maximum(p + r, 1e-12)
    best, thr = metrics.f1_max(y, s)
    assert best == pytest.approx(f1[:-1].max(), abs=1e-9)
    assert thr == pytest.approx(t[np.argmax(f1[:-1])])


def test_f1_max_hand_computed():
    best, thr = metrics.f1_max([0, 1, 1, 0, 1], [0.1, 0.8, 0.7, 0.75, 0.2])
    # threshold 0.7: tp 2, fp 1, fn 1 -> 4/6; threshold 0.2: tp 3, fp 1, fn 0 -> 6/7 (the best)
    assert best == pytest.approx(6 / 7) and thr == pytest.approx(0.2)


def test_binary_counts():
    c = metrics.binary_counts([1, 1, 0, 0], [1, 0, 1, 0])
    assert c == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "iou": 1 / 3}


def test_aupro_perfect_and_hand_computed():
    mask = np.zeros((10, 10), bool)
    mask[2:4, 2:4] = True           # region A, 4 pixels
    mask[7, 7] = True               # region B, 1 pixel
    perfect = mask.astype(np.float32)
    assert metrics.aupro([mask], [perfect]) == pytest.approx(1.0)
    # Region A scores above every normal pixel, region B below all of them: PRO is 0.5 from FPR 0 on.
    amap = np.full((10, 10), 0.5, np.float32)
    amap[mask] = 1.0
    amap[7, 7] = 0.0
    assert metrics.aupro([mask], [amap]) == pytest.approx(0.5)


def test_aupro_random_maps_near_limit_value():
    # Random scores: PRO(FPR) ~ FPR, so the area up to 0.3 normalised by 0.3 is ~0.15.
    rng = np.random.default_rng(0)
    masks = [rng.random((64, 64)) < 0.1 for _ in range(4)]
    maps = [rng.random((64, 64)).astype(np.float32) for _ in range(4)]
    assert metrics.aupro(masks, maps) == pytest.approx(0.15, abs=0.02)
