"""Decisions at the stored threshold, on a data set's test split: what users act on.

    python benchmarks/bench_calibration.py ../shared/data/mvtec_screw --model PatchCore
    python benchmarks/bench_calibration.py ../shared/data/mvtec_screw --model STFPM -o Train.epochs_iters=10

Trains (or loads --train_output, a finished training output folder) with the default config, then prints for
the stored threshold: the target false-alarm rate, the measured good-flag rate on test/good, the recall on
the defects, and the best recall any threshold reaches at that same good-flag rate. With --rates and
--estimators it re-derives thresholds from the same calibration scores (kept in train_result.json) to compare
operating points and tail estimators on real scores. Goal (issue 9): measured good-flag rate at most
max(2 images, 2 x target), recall >= 0.9 x the best recall at that rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from uadkit.api import AnomalyDetector  # noqa: E402
from uadkit.config import load_config  # noqa: E402
from uadkit.data.formats import load_index  # noqa: E402
from uadkit.engine.calibrate import collect_scores  # noqa: E402
from uadkit.engine.calibration import operating_point, recall_report  # noqa: E402
from uadkit.engine.checkpoint import load_model_dir  # noqa: E402
from uadkit.metrics import auroc  # noqa: E402


def decision_row(name: str, rate: float, good: np.ndarray, bad: np.ndarray, threshold: float) -> dict:
    r = recall_report(good, bad, threshold)
    allowed = max(2, 2 * rate * r["good_total"])
    ratio = r["recall"] / r["best_recall_at_same_flag_rate"] if r["best_recall_at_same_flag_rate"] else 1.0
    return {"setting": name, "target": rate, "threshold": round(threshold, 6),
            "good_flagged": f"{r['good_flagged']}/{r['good_total']}", "good_flag_rate": r["good_flag_rate"],
            "recall": r["recall"], "best_recall_same_rate": r["best_recall_at_same_flag_rate"],
            "recall_ratio": round(ratio, 3),
            "goal_flag": r["good_flagged"] <= allowed, "goal_recall": ratio >= 0.9}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("--model", default="PatchCore")
    ap.add_argument("--train_output", default=None, help="reuse a finished training output folder")
    ap.add_argument("--output", default=None)
    ap.add_argument("-o", "--override", action="append", default=[])
    ap.add_argument("--rates", default="0.01,0.02,0.05")
    ap.add_argument("--estimators", default="auto,gpd,empirical,lognormal,normal")
    args = ap.parse_args()
    if args.train_output:
        out = args.train_output
    else:
        out = args.output or tempfile.mkdtemp(prefix=f"bench_cal_{args.model}_")
        config = os.path.join(os.path.dirname(__file__), "..", "configs", f"{args.model}.yaml")
        cfg = load_config(config, [f"Global.dataset_dir={args.dataset}", f"Global.output={out}", *args.override])
        t0 = time.time()
        AnomalyDetector(cfg).train()
        print(f"trained in {time.time() - t0:.1f} s -> {out}", file=sys.stderr)
    tr = json.load(open(os.path.join(out, "train_result.json")))
    cal = tr["calibration"]
    model, _ = load_model_dir(os.path.join(out, "best_model"))
    test = load_index(args.dataset, 0.1, 42).test
    scores, labels, _, _, _ = collect_scores(model, test, torch.device("cpu"), 8, "scoring test", keep_maps=False)
    good, bad = scores[labels == 0], scores[labels == 1]
    rows = [decision_row("stored threshold", cal["false_alarm_rate"], good, bad, cal["image_threshold"])]
    calib = np.array(cal["scores"]["image"])
    for rate in (float(r) for r in args.rates.split(",")):
        for est in args.estimators.split(","):
            op = operating_point(calib, rate, est, n_boot=50)
            rows.append(decision_row(f"{est} ({op['estimator']})", rate, good, bad, op["threshold"]))
    summary = {"model": tr["model"], "dataset": args.dataset, "good_scores_from": cal["good_scores_from"],
               "n_good": cal["n_good"], "fit_seconds": tr["fit_seconds"],
               "calibration_seconds": tr.get("calibration_seconds"),
               "stored": {k: cal["image"][k] for k in ("estimator", "target_rate", "estimated_rate",
                                                       "rate_interval_90")},
               "synthetic_defects": cal.get("synthetic_defects", {}).get("recall_estimate"),
               "test": {"good": int(good.size), "defects": int(bad.size),
                        "image_auroc": round(auroc(labels == 1, scores), 4)}, "rows": rows, "output": out}
    print(json.dumps(summary, indent=1))
    print(f"{'setting':<26}{'target':>7}{'good flagged':>14}{'recall':>8}{'best@rate':>10}{'ratio':>7}  goals")
    for r in rows:
        print(f"{r['setting']:<26}{r['target']:>7}{r['good_flagged']:>14}{r['recall']:>8.3f}"
              f"{r['best_recall_same_rate']:>10.3f}{r['recall_ratio']:>7.3f}  "
              f"{'ok' if r['goal_flag'] else 'FLAG'}/{'ok' if r['goal_recall'] else 'RECALL'}")


if __name__ == "__main__":
    main()
